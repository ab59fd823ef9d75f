//! Kohaku: a WebRTC statistics gateway. Sora forwards each client's `getStats()` report over
//! HTTP/2; Kohaku validates it, ties every stats object to its channel, session, client and
//! connection, and writes it in batches to the configured storage backends.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library; tests drive the same [`app::App`].

pub mod app;
pub mod backfill;
pub mod budget;
pub mod config;
pub mod crash;
pub mod exporter;
pub mod import;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod server;
pub mod sinks;
pub mod sora;
pub mod spool;
mod sync;
