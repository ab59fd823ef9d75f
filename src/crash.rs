//! A last log line when Kohaku is killed by SIGBUS. SQLite maps its WAL index (`kohaku.db-shm`)
//! into memory; when the disk under it is full or failing, touching a page of it raises SIGBUS,
//! which ends the process before any log line is written. Operators then see only an exit by
//! signal. The handler writes one JSON line to stderr and stdout, then lets the signal end the
//! process as it would have.

/// What the handler writes: fixed bytes, as a signal handler may not format or allocate.
const SIGBUS_LINE: &[u8] = b"{\"level\":\"ERROR\",\"message\":\"kohaku killed by SIGBUS: a memory-mapped file could not be read or written (most often SQLite's kohaku.db-shm on a full or failing disk). Stats not yet stored are lost unless [spool] is on; free space and restart\"}\n";

extern "C" fn on_fatal_signal(signal: libc::c_int) {
    // SAFETY: write(2) and raise(3) are async-signal-safe; the buffer is static.
    unsafe {
        libc::write(2, SIGBUS_LINE.as_ptr().cast(), SIGBUS_LINE.len());
        libc::write(1, SIGBUS_LINE.as_ptr().cast(), SIGBUS_LINE.len());
        // SA_RESETHAND restored the default action: the signal, delivered again once this
        // handler returns, ends the process by it (a core dump where enabled).
        libc::raise(signal);
    }
}

/// Installs the handler; failures are ignored, since the process runs as it did without it.
pub fn log_fatal_signals() {
    // SAFETY: a zeroed sigaction is a valid value; the handler only calls async-signal-safe
    // functions.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_fatal_signal as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESETHAND;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}
