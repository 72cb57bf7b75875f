//! The engine's one error type. `status()` is the single place that decides the HTTP
//! status, Istio's `response_flags` and the body a client sees for each failure.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use super::body::{full, RespBody};
use crate::backend::ConnectError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no healthy upstream for {service}")]
    NoHealthyUpstream { service: String },
    #[error("upstream connect error: {source}")]
    Connect {
        #[source]
        source: ConnectError,
    },
    #[error("upstream connect timeout to {endpoint} after {after:?}")]
    ConnectTimeout { endpoint: String, after: Duration },
    #[error("upstream request timeout after {after:?}")]
    Timeout { after: Duration },
    #[error("upstream reset before response: {reason}")]
    Reset { reason: String },
    #[error("upstream refused the stream: {reason}")]
    RefusedStream { reason: String },
    #[error("no route for {service}: unknown to this waypoint")]
    NoRoute { service: String },
    #[error("fault injected: abort with {status}")]
    FaultAbort {
        status: StatusCode,
        grpc_status: Option<u32>,
    },
    /// The body Istio's clients and tests look for.
    #[error("RBAC: access denied")]
    Denied { policy: String },
    #[error("upstream overflow: {limit} reached")]
    Overflow { limit: &'static str },
    #[error("bad request: {reason}")]
    BadRequest { reason: &'static str },
    #[error("reading the request body: {source}")]
    RequestBody {
        #[source]
        source: hyper::Error,
    },
}

/// What a client sees for an error, and what metrics and the access log record.
pub struct Status {
    pub code: StatusCode,
    /// Istio/Envoy response flag.
    pub flags: &'static str,
    /// gRPC status for gRPC clients (they read it instead of the HTTP status).
    pub grpc: u32,
}

impl Error {
    pub fn status(&self) -> Status {
        let s = |code, flags, grpc| Status { code, flags, grpc };
        // gRPC codes: 4 DEADLINE_EXCEEDED, 8 RESOURCE_EXHAUSTED, 12 UNIMPLEMENTED,
        // 13 INTERNAL, 14 UNAVAILABLE.
        match self {
            Error::NoHealthyUpstream { .. } => s(StatusCode::SERVICE_UNAVAILABLE, "UH", 14),
            Error::Connect { .. } => s(StatusCode::SERVICE_UNAVAILABLE, "UF", 14),
            Error::ConnectTimeout { .. } => s(StatusCode::SERVICE_UNAVAILABLE, "UF", 14),
            Error::Timeout { .. } => s(StatusCode::GATEWAY_TIMEOUT, "UT", 4),
            Error::Reset { .. } => s(StatusCode::SERVICE_UNAVAILABLE, "UR", 14),
            Error::RefusedStream { .. } => s(StatusCode::SERVICE_UNAVAILABLE, "UR", 14),
            Error::NoRoute { .. } => s(StatusCode::NOT_FOUND, "NR", 12),
            Error::FaultAbort {
                status,
                grpc_status,
            } => s(
                *status,
                "FI",
                grpc_status.unwrap_or_else(|| grpc_of(*status)),
            ),
            Error::Overflow { .. } => s(StatusCode::SERVICE_UNAVAILABLE, "UO", 8),
            Error::Denied { .. } => s(StatusCode::FORBIDDEN, "RBAC", 7),
            Error::BadRequest { .. } => s(StatusCode::BAD_REQUEST, "DPE", 13),
            Error::RequestBody { .. } => s(StatusCode::BAD_REQUEST, "DPE", 13),
        }
    }

    /// A connect failure, a reset or a timeout: the endpoint, not the request, failed.
    pub fn is_gateway_error(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. }
                | Error::ConnectTimeout { .. }
                | Error::Reset { .. }
                | Error::RefusedStream { .. }
                | Error::Timeout { .. }
        )
    }

    /// The response a client gets; gRPC clients get HTTP 200 with `grpc-status`, as Envoy
    /// answers them, so their library reports the real reason.
    pub fn response(&self, grpc: bool) -> Response<RespBody> {
        let status = self.status();
        let message = self.to_string();
        let mut resp = if grpc {
            let mut r = Response::new(full(Bytes::new()));
            let h = r.headers_mut();
            h.insert("content-type", HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(status.grpc));
            if let Ok(m) = HeaderValue::from_str(&message) {
                h.insert("grpc-message", m);
            }
            r
        } else {
            let mut r = Response::new(full(Bytes::from(message)));
            *r.status_mut() = status.code;
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("text/plain"));
            r
        };
        if matches!(self, Error::BadRequest { .. } | Error::RequestBody { .. }) {
            // The connection's framing cannot be trusted any more.
            resp.headers_mut()
                .insert("connection", HeaderValue::from_static("close"));
        }
        resp
    }
}

/// gRPC status for an HTTP status, as gRPC's HTTP mapping defines it.
pub fn grpc_of(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}
