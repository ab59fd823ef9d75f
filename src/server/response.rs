//! Building answers. Every error answer is JSON naming the problem, so that a sender (or an
//! operator with curl) sees what is wrong without reading Kohaku's logs.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::StatusCode;
use http_body_util::Full;
use serde::Serialize;

use super::HttpResponse;

const JSON: &str = "application/json";

pub fn empty(status: StatusCode) -> HttpResponse {
    let mut response = HttpResponse::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

pub fn json(status: StatusCode, body: &impl Serialize) -> HttpResponse {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|err| {
        format!(r#"{{"error":"cannot encode the answer: {err}"}}"#).into_bytes()
    });
    let mut response = HttpResponse::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    response
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    field: &'a str,
}

/// `{"error": ..., "field": ...}`: `field` names what is wrong (a body path, a header, `body`).
pub fn error(status: StatusCode, field: &str, message: &str) -> HttpResponse {
    json(
        status,
        &ErrorBody {
            error: message,
            field,
        },
    )
}

pub fn text(status: StatusCode, content_type: &'static str, body: String) -> HttpResponse {
    let mut response = HttpResponse::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

pub fn method_not_allowed(allow: &'static str) -> HttpResponse {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method",
        &format!("method not allowed; use {allow}"),
    );
    response
        .headers_mut()
        .insert(http::header::ALLOW, HeaderValue::from_static(allow));
    response
}

pub fn not_found(path: &str) -> HttpResponse {
    error(
        StatusCode::NOT_FOUND,
        "path",
        &format!("no such path: {path}"),
    )
}
