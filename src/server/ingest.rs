//! The ingest listener's routes: `POST /collector` (PROTOCOL.md §1) and `GET /.ok`.

use std::sync::Arc;

use async_trait::async_trait;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::Request;
use kohaku_sink::OffsetDateTime;

use super::{response, HttpResponse, Router};
use crate::metrics::{Metrics, RequestLabels};
use crate::pipeline::{AcceptError, Intake, SinkHealth, SubmitError};
use crate::sora::{check_exporter_type, parse_report, EXPORTER_TYPE_HEADER};
use crate::spool::AppendError;

pub const COLLECTOR_PATH: &str = "/collector";
pub const HEALTH_PATH: &str = "/.ok";
/// Seconds Sora is asked to wait after a 503.
const RETRY_AFTER_SECS: &str = "1";

pub struct IngestRouter {
    pub intake: Intake,
    pub health: SinkHealth,
    pub metrics: Arc<Metrics>,
    pub max_body_bytes: u64,
    pub body_read_timeout: std::time::Duration,
}

#[async_trait]
impl Router for IngestRouter {
    async fn route(&self, request: Request<Incoming>) -> HttpResponse {
        let (path_label, response) = match request.uri().path() {
            COLLECTOR_PATH => (COLLECTOR_PATH, self.collector(request).await),
            HEALTH_PATH => (HEALTH_PATH, self.health_check(&request).await),
            other => {
                tracing::debug!(path = other, "unknown path");
                ("other", response::not_found(other))
            }
        };
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                path: path_label,
                status: response.status().as_u16(),
            })
            .inc();
        response
    }
}

impl IngestRouter {
    async fn collector(&self, request: Request<Incoming>) -> HttpResponse {
        if request.method() != Method::POST {
            return response::method_not_allowed("POST");
        }
        if request.version() != Version::HTTP_2 {
            return refuse(
                StatusCode::BAD_REQUEST,
                "version",
                &format!(
                    "{COLLECTOR_PATH} requires HTTP/2 (h2c with prior knowledge, or h2 over TLS); got {:?}",
                    request.version()
                ),
            );
        }
        let headers = request.headers();
        if let Err(invalid) =
            check_exporter_type(headers.get(EXPORTER_TYPE_HEADER).map(HeaderValue::as_bytes))
        {
            return refuse(StatusCode::BAD_REQUEST, &invalid.field, &invalid.error);
        }
        if let Some(content_type) = headers.get(CONTENT_TYPE) {
            if !is_json(content_type) {
                return refuse(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "content-type",
                    &format!(
                        "expected application/json, got {}",
                        String::from_utf8_lossy(content_type.as_bytes())
                    ),
                );
            }
        }
        let declared_length = headers
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if declared_length.is_some_and(|length| length > self.max_body_bytes) {
            return self.too_large();
        }

        let limit = usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX);
        let reading = Limited::new(request.into_body(), limit).collect();
        let Ok(read) = tokio::time::timeout(self.body_read_timeout, reading).await else {
            return refuse(
                StatusCode::REQUEST_TIMEOUT,
                "body",
                &format!(
                    "the body did not arrive within {} s (server.body_read_timeout_secs)",
                    self.body_read_timeout.as_secs()
                ),
            );
        };
        let body = match read {
            Ok(collected) => collected.to_bytes(),
            Err(err) if err.is::<http_body_util::LengthLimitError>() => return self.too_large(),
            Err(err) => {
                tracing::debug!(error = %err, "cannot read request body");
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "body",
                    &format!("cannot read the body: {err}"),
                );
            }
        };

        let report = match parse_report(&body, OffsetDateTime::now_utc()) {
            Ok(report) => report,
            Err(invalid) => return refuse(StatusCode::BAD_REQUEST, &invalid.field, &invalid.error),
        };
        let channel_id = report.connection.channel_id.clone();
        let connection_id = report.connection.connection_id.clone();
        let objects = report.row_count();
        match self.intake.accept(report, body).await {
            Ok(()) => {
                tracing::debug!(channel_id, connection_id, objects, "report queued");
                response::empty(StatusCode::NO_CONTENT)
            }
            Err(AcceptError::Queue(SubmitError::QueueFull)) => {
                tracing::debug!(
                    channel_id,
                    connection_id,
                    objects,
                    "queue full; answering 503"
                );
                unavailable(
                    "queue",
                    "the queue is full (pipeline.queue_max_rows); retry later",
                )
            }
            Err(
                AcceptError::Queue(SubmitError::Closed) | AcceptError::Spool(AppendError::Closed),
            ) => unavailable("server", "Kohaku is shutting down; retry later"),
            Err(AcceptError::Queue(err @ SubmitError::TooLarge { .. })) => {
                refuse(StatusCode::PAYLOAD_TOO_LARGE, "stats", &err.to_string())
            }
            Err(AcceptError::Spool(err @ AppendError::Full { .. })) => {
                tracing::debug!(
                    channel_id,
                    connection_id,
                    objects,
                    "spool full; answering 503"
                );
                unavailable("spool", &format!("{err}; retry later"))
            }
            Err(AcceptError::Spool(err @ AppendError::Write(_))) => {
                unavailable("spool", &format!("{err}; retry later"))
            }
        }
    }

    fn too_large(&self) -> HttpResponse {
        refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body",
            &format!(
                "the body exceeds {} bytes (server.max_body_bytes)",
                self.max_body_bytes
            ),
        )
    }

    async fn health_check(&self, request: &Request<Incoming>) -> HttpResponse {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return response::method_not_allowed("GET, HEAD");
        }
        health_response(&self.health).await
    }
}

/// 200 `{"status":"ok",…}` when every sink is usable, else 503 naming the failing ones.
pub async fn health_response(health: &SinkHealth) -> HttpResponse {
    let sinks = health.check().await;
    let healthy = sinks.iter().all(|sink| sink.healthy);
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let failing: Vec<&str> = sinks
        .iter()
        .filter(|sink| !sink.healthy)
        .map(|sink| sink.sink.as_str())
        .collect();
    let mut answer = serde_json::json!({
        "status": if healthy { "ok" } else { "unavailable" },
        "failing": failing,
        "sinks": sinks,
    });
    if let Some(spool) = health.spool() {
        answer["spool"] = serde_json::to_value(spool.status()).unwrap_or_default();
    }
    response::json(status, &answer)
}

fn refuse(status: StatusCode, field: &str, message: &str) -> HttpResponse {
    tracing::info!(
        status = status.as_u16(),
        field,
        error = message,
        "request refused"
    );
    response::error(status, field, message)
}

fn unavailable(field: &str, message: &str) -> HttpResponse {
    let mut answer = response::error(StatusCode::SERVICE_UNAVAILABLE, field, message);
    answer
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
    answer
}

fn is_json(content_type: &HeaderValue) -> bool {
    let Ok(text) = content_type.to_str() else {
        return false;
    };
    let essence = text.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
}
