//! Listeners: accept TCP (and TLS) connections, serve HTTP/1.1 and HTTP/2 on them with the
//! configured limits, close idle connections, and shut down gracefully with a deadline.
//!
//! The same machinery serves the ingest listener ([`ingest`]) and the exporter listener
//! ([`crate::exporter`]); they differ only in their [`Router`].

pub mod ingest;
pub mod response;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// A TLS handshake must finish within this time, so half-open connections cannot pile up.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed TLS handshakes logged per second at most (a scanner or a misconfigured client can fail
/// thousands); the rest are counted in the next line logged.
static HANDSHAKE_FAILURES_LOGGED: crate::logging::RateLimit = crate::logging::RateLimit::new(10);
/// Upper bound for request headers, on both protocols.
const MAX_HEADER_BYTES: u32 = 64 * 1024;

pub type HttpResponse = Response<Full<Bytes>>;

/// Answers requests of one listener.
#[async_trait]
pub trait Router: Send + Sync + 'static {
    async fn route(&self, request: Request<Incoming>) -> HttpResponse;
}

#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub max_concurrent_streams: u32,
    pub max_frame_size: u32,
    /// Close a connection without requests for this long; `None` keeps it open.
    pub idle_timeout: Option<Duration>,
    /// Connections open at once; a new one beyond it is closed at once, so that idle or
    /// misbehaving clients cannot use up the process's file descriptors.
    pub max_connections: usize,
}

/// How long a connection told to close (idle, or shutting down) may take to finish its open
/// requests and acknowledge; a client that never answers is then cut off.
const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// New connections refused at the limit, logged per second at most.
static REFUSED_CONNECTIONS_LOGGED: crate::logging::RateLimit = crate::logging::RateLimit::new(1);

/// A running listener.
pub struct Server {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    accept_loop: JoinHandle<()>,
    connections_done: mpsc::Receiver<()>,
    name: &'static str,
}

impl Server {
    /// Starts serving `listener`. `name` appears in logs ("ingest", "exporter").
    pub fn start(
        name: &'static str,
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        router: Arc<dyn Router>,
        limits: HttpLimits,
    ) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (alive, connections_done) = mpsc::channel::<()>(1);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .max_buf_size(MAX_HEADER_BYTES as usize);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_frame_size(limits.max_frame_size)
            .max_header_list_size(MAX_HEADER_BYTES);
        let context = Arc::new(ConnectionContext {
            builder,
            router,
            tls: tls.map(TlsAcceptor::from),
            idle_timeout: limits.idle_timeout,
            name,
            slots: Arc::new(tokio::sync::Semaphore::new(limits.max_connections)),
            max_connections: limits.max_connections,
        });
        let accept_loop = tokio::spawn(accept_loop(listener, context, shutdown_rx, alive));
        Ok(Self {
            local_addr,
            shutdown,
            accept_loop,
            connections_done,
            name,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets open requests finish (HTTP/2 GOAWAY), and waits up to `deadline`
    /// for every connection to close.
    pub async fn shutdown(mut self, deadline: Duration) {
        let _ = self.shutdown.send(true);
        if let Err(err) = self.accept_loop.await {
            tracing::error!(listener = self.name, error = %err, "accept loop failed");
        }
        // Each connection task holds a sender; `recv` returns `None` once all have ended.
        if tokio::time::timeout(deadline, self.connections_done.recv())
            .await
            .is_err()
        {
            tracing::warn!(
                listener = self.name,
                deadline_secs = deadline.as_secs(),
                "connections still open after the shutdown deadline; closing them"
            );
        }
    }
}

struct ConnectionContext {
    builder: auto::Builder<TokioExecutor>,
    router: Arc<dyn Router>,
    tls: Option<TlsAcceptor>,
    idle_timeout: Option<Duration>,
    name: &'static str,
    /// One permit per open connection.
    slots: Arc<tokio::sync::Semaphore>,
    max_connections: usize,
}

async fn accept_loop(
    listener: TcpListener,
    context: Arc<ConnectionContext>,
    mut shutdown: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(slot) = Arc::clone(&context.slots).try_acquire_owned() else {
                    if let Some(suppressed) = REFUSED_CONNECTIONS_LOGGED.admit() {
                        tracing::warn!(
                            listener = context.name,
                            %peer,
                            max_connections = context.max_connections,
                            suppressed_since_last = suppressed,
                            "connection limit reached; closing the new connection"
                        );
                    }
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_tcp(
                    stream,
                    peer,
                    Arc::clone(&context),
                    shutdown.clone(),
                    (alive.clone(), slot),
                ));
            }
            Err(err) => {
                // Typically EMFILE: back off instead of spinning.
                tracing::warn!(listener = context.name, error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// `held` lives as long as the connection: the server's count of open connections and the
/// connection's slot under `max_connections`.
async fn serve_tcp(
    stream: TcpStream,
    peer: SocketAddr,
    context: Arc<ConnectionContext>,
    shutdown: watch::Receiver<bool>,
    held: (mpsc::Sender<()>, tokio::sync::OwnedSemaphorePermit),
) {
    match &context.tls {
        None => serve_connection(stream, peer, &context, shutdown).await,
        Some(acceptor) => {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => serve_connection(tls_stream, peer, &context, shutdown).await,
                Ok(Err(err)) => {
                    if let Some(suppressed) = HANDSHAKE_FAILURES_LOGGED.admit() {
                        tracing::info!(listener = context.name, %peer, error = %err, suppressed_since_last = suppressed, "TLS handshake refused");
                    }
                }
                Err(_) => {
                    if let Some(suppressed) = HANDSHAKE_FAILURES_LOGGED.admit() {
                        tracing::info!(listener = context.name, %peer, suppressed_since_last = suppressed, "TLS handshake timed out");
                    }
                }
            }
        }
    }
    drop(held);
}

/// Requests in progress on one connection, and when the last one ended.
struct Activity {
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        ActivityGuard(Arc::clone(self))
    }

    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(
            self.idle_since
                .lock()
                .map(|since| since.elapsed())
                .unwrap_or_default(),
        )
    }
}

struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        if let Ok(mut since) = self.0.idle_since.lock() {
            *since = Instant::now();
        }
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    context: &ConnectionContext,
    mut shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        idle_since: Mutex::new(Instant::now()),
    });
    let router = Arc::clone(&context.router);
    let service_activity = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let router = Arc::clone(&router);
        let guard = service_activity.begin();
        async move {
            let response = router.route(request).await;
            drop(guard);
            Ok::<_, Infallible>(response)
        }
    });
    let connection = context.builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);

    let idle_timeout = context.idle_timeout;
    let check_every = idle_timeout.map_or(Duration::from_secs(3600), |t| {
        (t / 4).max(Duration::from_millis(50))
    });
    let mut idle_check = tokio::time::interval(check_every);
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Set once the connection is told to close: a client that neither finishes nor answers
    // HTTP/2's GOAWAY and PING would otherwise hold it (and a file descriptor) forever.
    let mut cut_off_at: Option<tokio::time::Instant> = None;
    let grace = idle_timeout.map_or(CLOSE_GRACE, |idle| idle.min(CLOSE_GRACE));
    loop {
        let closing = cut_off_at.is_some();
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(listener = context.name, %peer, error = %err, "connection ended with an error");
                }
                break;
            }
            _ = shutdown.wait_for(|stop| *stop), if !closing => {
                cut_off_at = Some(tokio::time::Instant::now() + CLOSE_GRACE);
                connection.as_mut().graceful_shutdown();
            }
            _ = idle_check.tick(), if !closing && idle_timeout.is_some() => {
                if let (Some(idle), Some(limit)) = (activity.idle_for(), idle_timeout) {
                    if idle >= limit {
                        tracing::debug!(listener = context.name, %peer, idle_secs = idle.as_secs(), "closing idle connection");
                        cut_off_at = Some(tokio::time::Instant::now() + grace);
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
            () = crate::sync::sleep_until_some(cut_off_at) => {
                tracing::debug!(listener = context.name, %peer, "connection did not close in time after being told to; cutting it off");
                break;
            }
        }
    }
}
