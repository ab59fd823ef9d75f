//! Test support shared by every backend and by the server's tests.
//!
//! - [`conformance`]: the behaviour suite every backend runs against its real store.
//! - [`sample`]: reports shaped like what browsers and Sora send.
//! - [`ControlledSink`]: an in-memory sink the tests can block, fail and inspect, for exercising
//!   the pipeline (queue full, retries, health) without a database.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::{SinkError, StatsBatch, StatsSink, WriteReport};

pub mod conformance;
pub mod sample;

/// The idempotency key, with the timestamp compared bit for bit as the backends compare it.
type RowKey = (String, String, u64);

/// An in-memory [`StatsSink`] whose behaviour tests switch at run time.
pub struct ControlledSink {
    name: String,
    blocked: tokio::sync::watch::Sender<bool>,
    failing: AtomicBool,
    refused_connection: Mutex<Option<String>>,
    write_calls: AtomicU64,
    health_calls: AtomicU64,
    rows: Mutex<HashMap<RowKey, String>>,
}

impl ControlledSink {
    pub fn new(name: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            blocked: tokio::sync::watch::Sender::new(false),
            failing: AtomicBool::new(false),
            refused_connection: Mutex::new(None),
            write_calls: AtomicU64::new(0),
            health_calls: AtomicU64::new(0),
            rows: Mutex::new(HashMap::new()),
        })
    }

    /// Writes wait until [`unblock`](Self::unblock) is called.
    pub fn block(&self) {
        self.blocked.send_replace(true);
    }

    pub fn unblock(&self) {
        self.blocked.send_replace(false);
    }

    /// While set, writes and health checks fail with [`SinkError::Transient`].
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// While set, any write whose batch holds a report of this connection fails with
    /// [`SinkError::Permanent`], as a store does for data it can never accept.
    pub fn refuse_connection(&self, connection_id: Option<&str>) {
        if let Ok(mut refused) = self.refused_connection.lock() {
            *refused = connection_id.map(str::to_owned);
        }
    }

    pub fn write_calls(&self) -> u64 {
        self.write_calls.load(Ordering::SeqCst)
    }

    /// How often [`StatsSink::health`] was called.
    pub fn health_calls(&self) -> u64 {
        self.health_calls.load(Ordering::SeqCst)
    }

    /// Distinct rows stored so far.
    pub fn stored_rows(&self) -> usize {
        self.rows.lock().map(|rows| rows.len()).unwrap_or(0)
    }

    /// The stored JSON text of one object, if present.
    pub fn stored_object(
        &self,
        connection_id: &str,
        rtc_id: &str,
        rtc_timestamp: f64,
    ) -> Option<String> {
        let key = (
            connection_id.to_owned(),
            rtc_id.to_owned(),
            rtc_timestamp.to_bits(),
        );
        self.rows.lock().ok()?.get(&key).cloned()
    }

    /// Polls until at least `rows` rows are stored; false on timeout.
    pub async fn wait_for_rows(&self, rows: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self.stored_rows() >= rows {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.stored_rows() >= rows
    }

    fn check_failing(&self) -> Result<(), SinkError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(SinkError::Transient {
                message: format!("{} is switched to failing", self.name),
                source: None,
            });
        }
        Ok(())
    }
}

#[async_trait]
impl StatsSink for ControlledSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn migrate(&self) -> Result<(), SinkError> {
        Ok(())
    }

    async fn write(&self, batch: &StatsBatch) -> Result<WriteReport, SinkError> {
        self.write_calls.fetch_add(1, Ordering::SeqCst);
        let mut blocked = self.blocked.subscribe();
        // The sender lives in self, so wait_for cannot fail while self is borrowed.
        let _ = blocked.wait_for(|blocked| !*blocked).await;
        self.check_failing()?;
        let refused = self
            .refused_connection
            .lock()
            .ok()
            .and_then(|refused| refused.clone());
        if let Some(refused) = refused {
            if batch
                .reports()
                .iter()
                .any(|r| r.connection.connection_id == refused)
            {
                return Err(SinkError::Permanent {
                    message: format!("{} refuses connection {refused}", self.name),
                    source: None,
                });
            }
        }
        let mut rows = self.rows.lock().map_err(|_| SinkError::Permanent {
            message: "row store poisoned".into(),
            source: None,
        })?;
        let mut report = WriteReport::default();
        for row in batch.rows() {
            let key = (
                row.report.connection.connection_id.clone(),
                row.object.rtc_id.clone(),
                row.object.rtc_timestamp.to_bits(),
            );
            if rows
                .insert(key, row.object.rtc_data.get().to_owned())
                .is_some()
            {
                report.duplicates += 1;
            } else {
                report.written += 1;
            }
        }
        Ok(report)
    }

    async fn health(&self) -> Result<(), SinkError> {
        self.health_calls.fetch_add(1, Ordering::SeqCst);
        // As slow as a real store's probe, so that concurrent checks overlap.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        self.check_failing()
    }
}
