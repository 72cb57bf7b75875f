//! Body types: one boxed type each way, a counting wrapper for request bytes, and the
//! response wrapper that completes a request's telemetry when the last byte has gone
//! (or the client went away), so durations and byte counts cover the whole exchange.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};

use super::telemetry::{Record, Telemetry};

pub type RespBody = BoxBody<Bytes, hyper::Error>;
pub type ReqBody = BoxBody<Bytes, hyper::Error>;

pub fn full(bytes: Bytes) -> BoxBody<Bytes, hyper::Error> {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// Counts the data bytes flowing through a body into a shared counter.
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Counted { inner, count }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.count
                    .fetch_add(data.remaining() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response body handed to hyper: counts bytes, notes a gRPC status from trailers,
/// and emits the request's metrics and access log line when dropped.
pub struct Tracked {
    inner: RespBody,
    record: Option<Record>,
    telemetry: Telemetry,
}

impl Tracked {
    pub fn new(inner: RespBody, record: Record, telemetry: Telemetry) -> Self {
        Tracked {
            inner,
            record: Some(record),
            telemetry,
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(record)) = (&polled, self.record.as_mut()) {
            if let Some(data) = frame.data_ref() {
                record.response_bytes += data.remaining() as u64;
            } else if let Some(grpc) = frame.trailers_ref().and_then(|t| t.get("grpc-status")) {
                record.grpc_status = grpc.to_str().ok().map(str::to_owned);
            }
        }
        if let (Poll::Ready(Some(Err(_))), Some(record)) = (&polled, self.record.as_mut()) {
            // The upstream broke off mid-body: Envoy's "upstream remote reset".
            record.response_flags = "UR";
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            self.telemetry.emit(record);
        }
    }
}

/// A body that keeps `guard` alive until it is dropped: the upstream permit and the
/// endpoint's in-flight count last as long as the response streams.
pub struct Holding<B, G> {
    inner: B,
    _guard: G,
}

impl<B, G> Holding<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        Holding {
            inner,
            _guard: guard,
        }
    }
}

impl<B: Body + Unpin, G: Unpin> Body for Holding<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
