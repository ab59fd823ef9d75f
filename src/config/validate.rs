//! Checks of the whole configuration that need no network, each error naming the key and the file.

use std::path::Path;

use super::{
    Config, ConfigError, ConfigSource, FsyncMode, SinksConfig, DEFAULT_WEBHOOK_PATH,
    RESERVED_INGEST_PATHS,
};

/// Bounds of HTTP/2's SETTINGS_MAX_FRAME_SIZE (RFC 9113 §6.5.2).
const H2_FRAME_SIZE_RANGE: std::ops::RangeInclusive<u32> = 16_384..=16_777_215;
/// 2^28 entries: 6 GiB of cache, far past any deployment; a larger value is a typo.
const MAX_SKIP_CACHE_ENTRIES: u64 = 1 << 28;

impl Config {
    pub fn validate(&self, source: &ConfigSource) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            source_name: source.clone(),
            key: key.to_owned(),
            message,
        };
        let server = &self.server;
        let path = &server.webhook_path;
        if !path.starts_with('/')
            || path.contains(['?', '#'])
            || path.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "server.webhook_path",
                format!(
                    "`{path}` is not a URL path: it must start with `/` and hold no query, fragment or spaces (e.g. {DEFAULT_WEBHOOK_PATH})"
                ),
            ));
        }
        if RESERVED_INGEST_PATHS.contains(&path.as_str()) {
            return Err(invalid(
                "server.webhook_path",
                format!("`{path}` is already served by Kohaku; choose another path"),
            ));
        }
        if server.https {
            if server.tls_fullchain_file.is_none() {
                return Err(invalid(
                    "server.tls_fullchain_file",
                    "required when server.https = true".into(),
                ));
            }
            if server.tls_privkey_file.is_none() {
                return Err(invalid(
                    "server.tls_privkey_file",
                    "required when server.https = true".into(),
                ));
            }
        } else if server.tls_verify_cacert_path.is_some() {
            return Err(invalid(
                "server.tls_verify_cacert_path",
                "client certificates need TLS: set server.https = true".into(),
            ));
        }
        if server.http2_max_concurrent_streams == 0 {
            return Err(invalid(
                "server.http2_max_concurrent_streams",
                "must be at least 1".into(),
            ));
        }
        if !H2_FRAME_SIZE_RANGE.contains(&server.http2_max_read_frame_size) {
            return Err(invalid(
                "server.http2_max_read_frame_size",
                format!(
                    "{} is outside HTTP/2's allowed range {}..={}",
                    server.http2_max_read_frame_size,
                    H2_FRAME_SIZE_RANGE.start(),
                    H2_FRAME_SIZE_RANGE.end()
                ),
            ));
        }
        if server.max_connections == 0 {
            return Err(invalid(
                "server.max_connections",
                "must be at least 1".into(),
            ));
        }
        if server.max_body_bytes == 0 {
            return Err(invalid(
                "server.max_body_bytes",
                "must be at least 1".into(),
            ));
        }
        if self.exporter.https && !server.https {
            return Err(invalid(
                "exporter.https",
                "the exporter uses the [server] certificate: set server.https = true and its TLS files".into(),
            ));
        }
        if self.exporter.listen_port != 0
            && self.exporter.listen_port == server.listen_port
            && (self.exporter.listen_addr == server.listen_addr
                || self.exporter.listen_addr.is_unspecified()
                || server.listen_addr.is_unspecified())
        {
            return Err(invalid(
                "exporter.listen_port",
                format!("{} is also server.listen_port", self.exporter.listen_port),
            ));
        }

        let log = &self.log;
        if log.dir.is_none() && !log.stdout {
            return Err(invalid(
                "log",
                "set `dir` or `stdout = true`: as configured Kohaku would log nowhere".into(),
            ));
        }
        if log.name.is_empty() || log.name.contains(['/', '\\']) {
            return Err(invalid(
                "log.name",
                format!("{:?} must be a plain file name", log.name),
            ));
        }
        if log.rotate_max_size == 0 {
            return Err(invalid(
                "log.rotate_max_size",
                "must be at least 1 (megabyte)".into(),
            ));
        }

        let pipeline = &self.pipeline;
        for (key, value) in [
            ("pipeline.queue_max_rows", pipeline.queue_max_rows),
            ("pipeline.batch_max_rows", pipeline.batch_max_rows),
            ("pipeline.batch_max_wait_ms", pipeline.batch_max_wait_ms),
            (
                "pipeline.retry_initial_backoff_ms",
                pipeline.retry_initial_backoff_ms,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        // The queue is a semaphore of rows; tokio caps its permits.
        let max_queue = tokio::sync::Semaphore::MAX_PERMITS as u64;
        if pipeline.queue_max_rows > max_queue {
            return Err(invalid(
                "pipeline.queue_max_rows",
                format!("must be at most {max_queue}"),
            ));
        }
        if pipeline.batch_max_rows > pipeline.queue_max_rows {
            return Err(invalid(
                "pipeline.batch_max_rows",
                format!(
                    "{} is larger than pipeline.queue_max_rows ({}): a batch could never fill",
                    pipeline.batch_max_rows, pipeline.queue_max_rows
                ),
            ));
        }
        // The largest body, and the report parsed from it, must fit with room for others.
        let smallest_budget = server.max_body_bytes.saturating_mul(4);
        if pipeline.memory_max_bytes < smallest_budget {
            return Err(invalid(
                "pipeline.memory_max_bytes",
                format!(
                    "{} is less than four times server.max_body_bytes ({}): the largest report could not be read and parsed",
                    pipeline.memory_max_bytes, server.max_body_bytes
                ),
            ));
        }
        if !(crate::pipeline::WAYS as u64..=MAX_SKIP_CACHE_ENTRIES)
            .contains(&pipeline.skip_unchanged_cache_entries)
        {
            return Err(invalid(
                "pipeline.skip_unchanged_cache_entries",
                format!(
                    "must be {} to {MAX_SKIP_CACHE_ENTRIES} ({} bytes each)",
                    crate::pipeline::WAYS,
                    crate::pipeline::ENTRY_BYTES
                ),
            ));
        }
        if let super::SkipUnchanged::Types(types) = &pipeline.skip_unchanged {
            if types.is_empty() || types.iter().any(String::is_empty) {
                return Err(invalid(
                    "pipeline.skip_unchanged",
                    "a list must name stats types (e.g. [\"codec\", \"certificate\"]); use \"off\" for none".into(),
                ));
            }
        }
        if pipeline.retry_max_backoff_ms < pipeline.retry_initial_backoff_ms {
            return Err(invalid(
                "pipeline.retry_max_backoff_ms",
                "must not be smaller than pipeline.retry_initial_backoff_ms".into(),
            ));
        }

        if server.max_body_bytes > crate::spool::record::MAX_PAYLOAD_LEN as u64 / 2 {
            return Err(invalid(
                "server.max_body_bytes",
                format!(
                    "must be at most {} (512 MiB)",
                    crate::spool::record::MAX_PAYLOAD_LEN / 2
                ),
            ));
        }
        if server.body_read_timeout_secs == 0 {
            return Err(invalid(
                "server.body_read_timeout_secs",
                "must be at least 1".into(),
            ));
        }

        if let Some(spool) = &self.spool {
            if spool.dir.as_os_str().is_empty() {
                return Err(invalid("spool.dir", "must not be empty".into()));
            }
            if spool.max_bytes < server.max_body_bytes.saturating_mul(2) {
                return Err(invalid(
                    "spool.max_bytes",
                    format!(
                        "{} is less than twice server.max_body_bytes ({}): the spool must hold the largest report with room to spare",
                        spool.max_bytes, server.max_body_bytes
                    ),
                ));
            }
            if spool.fsync == FsyncMode::Interval && spool.fsync_interval_ms == 0 {
                return Err(invalid(
                    "spool.fsync_interval_ms",
                    "must be at least 1".into(),
                ));
            }
        }

        // Time settings far past any sensible value are typos; some would also overflow a timer
        // and fail only at start-up. The backends bound their own in their `validate`.
        use kohaku_sink::{DAY_SECS, HOUR_MS};
        for (key, value, max, unit) in [
            (
                "pipeline.batch_max_wait_ms",
                Some(pipeline.batch_max_wait_ms),
                HOUR_MS,
                "ms",
            ),
            (
                "pipeline.retry_initial_backoff_ms",
                Some(pipeline.retry_initial_backoff_ms),
                HOUR_MS,
                "ms",
            ),
            (
                "pipeline.retry_max_backoff_ms",
                Some(pipeline.retry_max_backoff_ms),
                HOUR_MS,
                "ms",
            ),
            (
                "pipeline.shutdown_timeout_secs",
                Some(pipeline.shutdown_timeout_secs),
                DAY_SECS,
                "s",
            ),
            (
                "server.body_read_timeout_secs",
                Some(server.body_read_timeout_secs),
                DAY_SECS,
                "s",
            ),
            (
                "server.http2_idle_timeout",
                Some(server.http2_idle_timeout),
                7 * DAY_SECS,
                "s",
            ),
            (
                "spool.fsync_interval_ms",
                self.spool.as_ref().map(|s| s.fsync_interval_ms),
                HOUR_MS,
                "ms",
            ),
        ] {
            if let Some(value) = value {
                kohaku_sink::InvalidSetting::check_at_most(key, value, max, unit)
                    .map_err(|too_large| invalid(key, too_large.message))?;
            }
        }
        // What `serve` would refuse only after creating files: paths that cannot be used.
        let not_a_directory = |key: &str, dir: &Path| -> Result<(), ConfigError> {
            if dir.exists() && !dir.is_dir() {
                return Err(invalid(
                    key,
                    format!("{} exists and is not a directory", dir.display()),
                ));
            }
            Ok(())
        };
        if let Some(dir) = &log.dir {
            not_a_directory("log.dir", dir)?;
        }
        if let Some(spool) = &self.spool {
            not_a_directory("spool.dir", &spool.dir)?;
        }
        if let Some(sinks) = &self.sinks {
            if *sinks == SinksConfig::default() {
                return Err(invalid(
                    "sinks",
                    "the table names no sink: add e.g. [sinks.sqlite], or remove [sinks] to use SQLite at ./kohaku.db".into(),
                ));
            }
            crate::sinks::validate(sinks).map_err(|(sink, setting)| {
                invalid(&format!("sinks.{sink}.{}", setting.key), setting.message)
            })?;
        }
        Ok(())
    }
}
