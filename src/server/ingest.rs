//! The ingest listener's routes: Sora's stats webhook (`server.webhook_path`, HTTP/1.1 or HTTP/2),
//! its stats exporter (`POST /collector`, HTTP/2) and `GET /.ok`. The README's "Pointing Sora at
//! Kohaku" and `docs/protocol.md` describe them.

use std::borrow::Cow;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::Request;
use kohaku_sink::OffsetDateTime;

use super::{response, HttpResponse, Router};
use crate::budget::{report_bytes, Held};
use crate::metrics::{Metrics, RequestLabels};
use crate::pipeline::{AcceptError, Intake, SinkHealth};
use crate::sora::{
    check_exporter_type, parse_report, parse_webhook, InvalidReport, Protocol, Webhook,
    EXPORTER_TYPE_HEADER, MAX_ERROR_BYTES, WEBHOOK_TYPE_HEADER,
};

pub const COLLECTOR_PATH: &str = "/collector";
pub const HEALTH_PATH: &str = "/.ok";
/// The longest webhook type quoted back in an "ignored" answer and its log line.
const MAX_ECHOED_TYPE_BYTES: usize = 128;
/// Seconds Sora is asked to wait after a 503.
const RETRY_AFTER_SECS: &str = "1";

pub struct IngestRouter {
    pub intake: Intake,
    pub health: SinkHealth,
    pub metrics: Arc<Metrics>,
    pub max_body_bytes: u64,
    pub body_read_timeout: std::time::Duration,
    /// `server.webhook_path`.
    pub webhook_path: String,
}

/// Why a body was not read whole.
enum ReadError {
    TooLarge,
    OutOfMemory,
    Body(hyper::Error),
}

/// How a request's body is to be read, decided from its path and headers before it is read.
enum Expect {
    /// An exporter body (`x-sora-stats-exporter-type: connection.user-agent`).
    Exporter,
    /// A stats-webhook body, typed by `sora-stats-webhook-type` when Sora sent it, else by its own
    /// `type` (which may also name an exporter body).
    Webhook { header_type: Option<String> },
}

#[async_trait]
impl Router for IngestRouter {
    async fn route(&self, request: Request<Incoming>) -> HttpResponse {
        let path = request.uri().path();
        let (path_label, response) = if path == self.webhook_path {
            (
                Cow::Owned(self.webhook_path.clone()),
                self.webhook(request).await,
            )
        } else if path == COLLECTOR_PATH {
            (Cow::Borrowed(COLLECTOR_PATH), self.collector(request).await)
        } else if path == HEALTH_PATH {
            (
                Cow::Borrowed(HEALTH_PATH),
                self.health_check(&request).await,
            )
        } else {
            tracing::debug!(path, "unknown path");
            let answer = response::not_found(path);
            (Cow::Borrowed("other"), answer)
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
    /// `POST /collector`: the exporter's path, HTTP/2 only, exactly as older Sora expects. A request
    /// carrying the webhook header is a webhook whose URL was set to this path, and is taken as one.
    async fn collector(&self, request: Request<Incoming>) -> HttpResponse {
        if request.method() != Method::POST {
            return response::method_not_allowed("POST");
        }
        if request.headers().contains_key(WEBHOOK_TYPE_HEADER) {
            return self.webhook(request).await;
        }
        if request.version() != Version::HTTP_2 {
            return refuse(
                StatusCode::BAD_REQUEST,
                "version",
                &format!(
                    "{COLLECTOR_PATH} requires HTTP/2 (h2c with prior knowledge, or h2 over TLS); got {:?}. \
                     Sora's stats webhook (HTTP/1.1) posts to {}",
                    request.version(),
                    self.webhook_path
                ),
            );
        }
        if let Err(invalid) = check_exporter_type(
            request
                .headers()
                .get(EXPORTER_TYPE_HEADER)
                .map(HeaderValue::as_bytes),
        ) {
            return refuse(StatusCode::BAD_REQUEST, &invalid.field, &invalid.error);
        }
        self.ingest(request, Expect::Exporter).await
    }

    /// `POST <server.webhook_path>`: the stats webhook over HTTP/1.1 or HTTP/2; an exporter request
    /// sent here is taken too, told apart by its header.
    async fn webhook(&self, request: Request<Incoming>) -> HttpResponse {
        if request.method() != Method::POST {
            return response::method_not_allowed("POST");
        }
        let headers = request.headers();
        let expect = if let Some(exporter_type) = headers.get(EXPORTER_TYPE_HEADER) {
            if let Err(invalid) = check_exporter_type(Some(exporter_type.as_bytes())) {
                return refuse(StatusCode::BAD_REQUEST, &invalid.field, &invalid.error);
            }
            Expect::Exporter
        } else {
            match webhook_type(headers) {
                Ok(header_type) => Expect::Webhook { header_type },
                Err(invalid) => {
                    return refuse(StatusCode::BAD_REQUEST, &invalid.field, &invalid.error)
                }
            }
        };
        self.ingest(request, expect).await
    }

    /// Reads, parses and queues (or spools) one report; answers once it is accepted or refused.
    async fn ingest(&self, request: Request<Incoming>, expect: Expect) -> HttpResponse {
        let budget = self.intake.budget();
        let mut memory = budget.nothing();
        let body = match self.read_body(request, &mut memory).await {
            Ok(body) => body,
            Err(answer) => return answer,
        };
        let received_at = OffsetDateTime::now_utc();
        let parsed = match &expect {
            Expect::Exporter => parse_report(&body, received_at).map(|r| (r, Protocol::Exporter)),
            Expect::Webhook { header_type } => {
                match parse_webhook(&body, header_type.as_deref(), received_at) {
                    Ok(Webhook::Stats(report)) => Ok((report, Protocol::Webhook)),
                    Ok(Webhook::Exporter(report)) => Ok((report, Protocol::Exporter)),
                    Ok(Webhook::Ignored { kind }) => return self.ignored(&kind),
                    Err(invalid) => Err(invalid),
                }
            }
        };
        let (report, protocol) = match parsed {
            Ok(parsed) => parsed,
            Err(invalid) => return refuse(StatusCode::BAD_REQUEST, &invalid.field, &invalid.error),
        };
        // The parsed report is held beside the body until the body is dropped; the report's
        // share goes with it into the queue.
        let report_size = report_bytes(&report);
        if !budget.try_grow(&mut memory, report_size) {
            return self.out_of_memory();
        }
        let report_memory = memory.split(report_size);
        let protocol_name = protocol.as_str();
        // Kept for the debug lines only when they are logged: two allocations per request
        // otherwise.
        let ids = tracing::enabled!(tracing::Level::DEBUG).then(|| {
            (
                report.connection.channel_id.clone(),
                report.connection.connection_id.clone(),
            )
        });
        let (channel_id, connection_id) = ids.as_ref().map_or(("", ""), |(channel, connection)| {
            (channel.as_str(), connection.as_str())
        });
        let objects = report.row_count();
        match self
            .intake
            .accept(report, body, protocol, report_memory)
            .await
        {
            Ok(()) => {
                tracing::debug!(
                    protocol = protocol_name,
                    channel_id,
                    connection_id,
                    objects,
                    "report queued"
                );
                response::empty(StatusCode::NO_CONTENT)
            }
            Err(AcceptError::Full { what, message }) => {
                tracing::debug!(
                    protocol = protocol_name,
                    channel_id,
                    connection_id,
                    objects,
                    what,
                    "no room; answering 503"
                );
                unavailable(what, &format!("{message}; retry later"))
            }
            Err(AcceptError::Unavailable { what, message }) => {
                unavailable(what, &format!("{message}; retry later"))
            }
            Err(AcceptError::Closed) => {
                unavailable("server", "Kohaku is shutting down; retry later")
            }
            Err(AcceptError::TooLarge(message)) => {
                refuse(StatusCode::PAYLOAD_TOO_LARGE, "stats", &message)
            }
        }
    }

    /// The whole body, within `server.max_body_bytes`, `server.body_read_timeout_secs` and the
    /// memory budget (whose bytes `memory` takes as the body arrives), or the answer that refuses
    /// it.
    async fn read_body(
        &self,
        request: Request<Incoming>,
        memory: &mut Held,
    ) -> Result<Bytes, HttpResponse> {
        let headers = request.headers();
        if let Some(content_type) = headers.get(CONTENT_TYPE) {
            if !is_json(content_type) {
                return Err(refuse(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "content-type",
                    &format!(
                        "expected application/json, got {}",
                        String::from_utf8_lossy(content_type.as_bytes())
                    ),
                ));
            }
        }
        let declared_length = headers
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if declared_length.is_some_and(|length| length > self.max_body_bytes) {
            return Err(self.too_large());
        }
        let limit = usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX);
        let budget = self.intake.budget();
        // A declared length is taken at once: a body that cannot fit is refused before it is
        // read. Without one, each frame is taken as it arrives.
        let declared = declared_length.and_then(|length| usize::try_from(length).ok());
        if declared.is_some_and(|length| !budget.try_grow(memory, length)) {
            return Err(self.out_of_memory());
        }
        // With a declared length the body goes into one buffer of exactly that size. Without,
        // each frame is copied out (a frame hyper hands over shares, and keeps alive, a larger
        // read buffer the budget does not see) and the copies joined once at the end: growing
        // one buffer instead would reallocate it again and again, each time holding the old and
        // the new copy at once.
        let mut whole = BytesMut::with_capacity(declared.unwrap_or(0));
        let mut frames: Vec<Bytes> = Vec::new();
        let mut received = 0usize;
        let mut body = request.into_body();
        let reading = async {
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame.map_err(ReadError::Body)?.into_data() else {
                    continue;
                };
                received += data.len();
                if received > limit {
                    return Err(ReadError::TooLarge);
                }
                if declared.is_some() && received <= whole.capacity() {
                    whole.extend_from_slice(&data);
                } else if budget.try_grow(memory, data.len()) {
                    frames.push(Bytes::copy_from_slice(&data));
                } else {
                    return Err(ReadError::OutOfMemory);
                }
            }
            Ok(())
        };
        match tokio::time::timeout(self.body_read_timeout, reading).await {
            Ok(Ok(())) => {
                if frames.is_empty() {
                    return Ok(whole.freeze());
                }
                if whole.is_empty() && frames.len() == 1 {
                    return Ok(frames.swap_remove(0));
                }
                // The joined copy lives beside the frames until they are dropped.
                let copied = received - whole.len();
                if !budget.try_grow(memory, received) {
                    return Err(self.out_of_memory());
                }
                whole.reserve(received - whole.len());
                for frame in frames.drain(..) {
                    whole.extend_from_slice(&frame);
                }
                drop(memory.split(copied));
                Ok(whole.freeze())
            }
            Ok(Err(ReadError::TooLarge)) => Err(self.too_large()),
            Ok(Err(ReadError::OutOfMemory)) => Err(self.out_of_memory()),
            Ok(Err(ReadError::Body(err))) => {
                tracing::debug!(error = %err, "cannot read request body");
                Err(refuse(
                    StatusCode::BAD_REQUEST,
                    "body",
                    &format!("cannot read the body: {err}"),
                ))
            }
            Err(_) => Err(refuse(
                StatusCode::REQUEST_TIMEOUT,
                "body",
                &format!(
                    "the body did not arrive within {} s (server.body_read_timeout_secs)",
                    self.body_read_timeout.as_secs()
                ),
            )),
        }
    }

    fn out_of_memory(&self) -> HttpResponse {
        unavailable(
            "memory",
            &format!(
                "Kohaku holds as much report data as it may ({} bytes, pipeline.memory_max_bytes); retry later",
                self.intake.budget().capacity()
            ),
        )
    }

    /// A webhook of a type Kohaku does not store: 200, so that Sora does not log a failed send
    /// for every one, counted, and logged once per type.
    fn ignored(&self, kind: &str) -> HttpResponse {
        let kind = &crate::sora::bounded(kind.to_owned(), MAX_ECHOED_TYPE_BYTES);
        if self.metrics.count_ignored(kind) {
            tracing::info!(
                protocol = Protocol::Webhook.as_str(),
                r#type = kind,
                "stats webhook of a type Kohaku does not store: answered 200 and not stored \
                 (kohaku_reports_ignored_total counts them; logged once per type)"
            );
        }
        response::json(
            StatusCode::OK,
            &serde_json::json!({"status": "ignored", "type": kind}),
        )
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

/// 200 `{"status":"ok",…}` when every sink is usable and the spool (if any) can be written, else
/// 503 naming what is failing (`"spool"` among the sinks' names).
pub async fn health_response(health: &SinkHealth) -> HttpResponse {
    let sinks = health.check().await;
    let mut failing: Vec<&str> = sinks
        .iter()
        .filter(|sink| !sink.healthy)
        .map(|sink| sink.sink.as_str())
        .collect();
    let spool = health.spool().map(|spool| spool.status());
    if spool
        .as_ref()
        .is_some_and(|status| status.write_error.is_some())
    {
        failing.push("spool");
    }
    let healthy = failing.is_empty();
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut answer = serde_json::json!({
        "status": if healthy { "ok" } else { "unavailable" },
        "failing": failing,
        "sinks": sinks,
    });
    if let Some(spool) = spool {
        answer["spool"] = serde_json::to_value(spool).unwrap_or_default();
    }
    response::json(status, &answer)
}

/// Refused requests logged per second at most; the rest are counted in the next line logged.
static REFUSALS_LOGGED: crate::logging::RateLimit = crate::logging::RateLimit::new(20);

fn refuse(status: StatusCode, field: &str, message: &str) -> HttpResponse {
    let message = &crate::sora::bounded(message.to_owned(), MAX_ERROR_BYTES);
    if let Some(suppressed) = REFUSALS_LOGGED.admit() {
        tracing::info!(
            status = status.as_u16(),
            field,
            error = message,
            suppressed_since_last = suppressed,
            "request refused"
        );
    }
    response::error(status, field, message)
}

fn unavailable(field: &str, message: &str) -> HttpResponse {
    let mut answer = response::error(StatusCode::SERVICE_UNAVAILABLE, field, message);
    answer
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
    answer
}

/// The `sora-stats-webhook-type` header's value; `None` when it is absent or empty, so that the
/// body's `type` decides.
fn webhook_type(headers: &HeaderMap) -> Result<Option<String>, InvalidReport> {
    let Some(value) = headers.get(WEBHOOK_TYPE_HEADER) else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| InvalidReport {
        field: WEBHOOK_TYPE_HEADER.to_owned(),
        error: "the header is not printable ASCII".to_owned(),
    })?;
    let text = text.trim();
    Ok((!text.is_empty()).then(|| text.to_owned()))
}

fn is_json(content_type: &HeaderValue) -> bool {
    let Ok(text) = content_type.to_str() else {
        return false;
    };
    let essence = text.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
}
