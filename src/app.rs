//! Wires a validated [`Config`] and built sinks into a running Kohaku: the pipeline, the ingest
//! listener and the exporter listener, and takes them down in an order that loses nothing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kohaku_sink::StatsSink;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::exporter::ExporterRouter;
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, PipelineOptions, ShutdownSummary};
use crate::server::ingest::IngestRouter;
use crate::server::{tls, HttpLimits, Server};
use crate::spool::{Spool, SpoolError};

/// Scrapers and health probes; a few at a time in any real deployment.
const EXPORTER_MAX_CONNECTIONS: usize = 64;

/// Files Kohaku opens besides connections (databases, spool segments, logs, the exporter's
/// connections), kept free under the open-file limit.
const FILES_BESIDES_CONNECTIONS: u64 = 128;

/// `server.max_connections` above what the process may open would let connections use up the
/// descriptors the databases, the spool and the logs need: say so at start-up.
fn warn_if_connections_exceed_open_files(max_connections: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let open_files = limit.rlim_cur;
    if max_connections.saturating_add(FILES_BESIDES_CONNECTIONS) > open_files {
        tracing::warn!(
            max_connections,
            open_file_limit = open_files,
            "server.max_connections is close to or above the open-file limit (ulimit -n): raise the limit (e.g. LimitNOFILE= in the systemd unit) or lower server.max_connections"
        );
    }
}

/// The exporter only answers scrapes; it need not wait long for them at shutdown.
const EXPORTER_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("cannot listen on {addr} (`{key}`): {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub struct App {
    ingest_server: Server,
    exporter_server: Server,
    pipeline: Pipeline,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    shutdown_timeout: Duration,
}

impl App {
    /// Starts serving. The sinks must already be migrated.
    pub async fn start(
        config: &Config,
        sinks: Vec<Arc<dyn StatsSink>>,
    ) -> Result<Self, StartError> {
        let server_tls = tls::server_config(&config.server)?;
        let ingest_listener = bind(
            "server.listen_addr/listen_port",
            SocketAddr::new(config.server.listen_addr, config.server.listen_port),
        )
        .await?;
        let exporter_listener = bind(
            "exporter.listen_addr/listen_port",
            SocketAddr::new(config.exporter.listen_addr, config.exporter.listen_port),
        )
        .await?;

        let mut metrics = Metrics::new();
        metrics.register_sink_counters(&sinks);
        let sink_names = sinks
            .iter()
            .map(|sink| sink.name())
            .collect::<Vec<_>>()
            .join(",");
        let spool = match &config.spool {
            Some(spool) => Some(Spool::open(&spool.options())?),
            None => None,
        };
        let pipeline = Pipeline::start(
            sinks,
            PipelineOptions::from(&config.pipeline),
            metrics,
            spool,
        );
        let metrics = pipeline.metrics();
        let ready = Arc::new(AtomicBool::new(true));

        let ingest_router = Arc::new(IngestRouter {
            intake: pipeline.intake(),
            health: pipeline.health(),
            metrics: Arc::clone(&metrics),
            max_body_bytes: config.server.max_body_bytes,
            body_read_timeout: Duration::from_secs(config.server.body_read_timeout_secs),
            webhook_path: config.server.webhook_path.clone(),
        });
        let limits = HttpLimits {
            max_concurrent_streams: config.server.http2_max_concurrent_streams,
            max_frame_size: config.server.http2_max_read_frame_size,
            idle_timeout: (config.server.http2_idle_timeout > 0)
                .then(|| Duration::from_secs(config.server.http2_idle_timeout)),
            max_connections: usize::try_from(config.server.max_connections).unwrap_or(usize::MAX),
        };
        warn_if_connections_exceed_open_files(config.server.max_connections);
        let ingest_server = Server::start(
            "ingest",
            ingest_listener,
            server_tls.clone(),
            ingest_router,
            limits.clone(),
        )
        .map_err(|source| StartError::Bind {
            key: "server.listen_addr/listen_port",
            addr: SocketAddr::new(config.server.listen_addr, config.server.listen_port),
            source,
        })?;
        let exporter_router = Arc::new(ExporterRouter {
            metrics: Arc::clone(&metrics),
            health: pipeline.health(),
            ready: Arc::clone(&ready),
        });
        let exporter_tls = if config.exporter.https {
            server_tls
        } else {
            None
        };
        let exporter_server = Server::start(
            "exporter",
            exporter_listener,
            exporter_tls,
            exporter_router,
            HttpLimits {
                max_connections: EXPORTER_MAX_CONNECTIONS,
                ..limits
            },
        )
        .map_err(|source| StartError::Bind {
            key: "exporter.listen_addr/listen_port",
            addr: SocketAddr::new(config.exporter.listen_addr, config.exporter.listen_port),
            source,
        })?;

        tracing::info!(
            ingest_addr = %ingest_server.local_addr(),
            exporter_addr = %exporter_server.local_addr(),
            https = config.server.https,
            mtls = config.server.tls_verify_cacert_path.is_some(),
            sinks = sink_names,
            version = env!("CARGO_PKG_VERSION"),
            "kohaku listening"
        );
        Ok(Self {
            ingest_server,
            exporter_server,
            pipeline,
            ready,
            metrics,
            shutdown_timeout: Duration::from_secs(config.pipeline.shutdown_timeout_secs),
        })
    }

    pub fn ingest_addr(&self) -> SocketAddr {
        self.ingest_server.local_addr()
    }

    pub fn exporter_addr(&self) -> SocketAddr {
        self.exporter_server.local_addr()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stop accepting → let in-flight requests finish (they only enqueue) → write the queue to
    /// the sinks within `pipeline.shutdown_timeout_secs` → close the sinks.
    pub async fn shutdown(self) -> ShutdownSummary {
        self.ready.store(false, Ordering::SeqCst);
        tracing::info!("shutting down: no new connections; finishing open requests");
        // One deadline for the whole shutdown, as pipeline.shutdown_timeout_secs promises: the
        // listener's drain and the sinks' flush share it.
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        self.ingest_server.shutdown(self.shutdown_timeout).await;
        let summary = self.pipeline.shutdown_by(deadline).await;
        self.exporter_server
            .shutdown(EXPORTER_SHUTDOWN_DEADLINE)
            .await;
        if summary.dropped_rows > 0 {
            tracing::error!(
                dropped_rows = summary.dropped_rows,
                "shutdown finished; some stats were not written"
            );
        } else {
            tracing::info!("shutdown finished; every accepted stats object was written");
        }
        summary
    }
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { key, addr, source })
}
