//! The exporter listener: `/metrics` for Prometheus, `/health` and `/ready` for orchestration.
//! It is separate from the ingest listener so that it can stay on loopback (the default) while
//! Sora reaches the ingest port.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, StatusCode};
use hyper::body::Incoming;
use hyper::Request;

use crate::metrics::{Metrics, RequestLabels};
use crate::pipeline::SinkHealth;
use crate::server::ingest::health_response;
use crate::server::{response, HttpResponse, Router};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub struct ExporterRouter {
    pub metrics: Arc<Metrics>,
    pub health: SinkHealth,
    /// True while Kohaku accepts reports; false during shutdown.
    pub ready: Arc<AtomicBool>,
}

#[async_trait]
impl Router for ExporterRouter {
    async fn route(&self, request: Request<Incoming>) -> HttpResponse {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return response::method_not_allowed("GET, HEAD");
        }
        let (path, answer) = match request.uri().path() {
            "/metrics" => (
                "/metrics",
                response::text(StatusCode::OK, OPENMETRICS, self.metrics.encode()),
            ),
            "/health" => ("/health", health_response(&self.health).await),
            "/ready" => {
                let ready = self.ready.load(Ordering::SeqCst);
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let state = if ready { "ready" } else { "shutting down" };
                (
                    "/ready",
                    response::json(status, &serde_json::json!({ "status": state })),
                )
            }
            other => ("other", response::not_found(other)),
        };
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                path: path.into(),
                status: answer.status().as_u16(),
            })
            .inc();
        answer
    }
}
