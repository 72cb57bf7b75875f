//! Forwarding one request: backend choice, header changes, body buffering for retries,
//! mirrors, the retry loop with per-try and route timeouts, and the response's headers.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use rand::Rng;

use super::body::{full, Counted, Holding, ReqBody, RespBody};
use super::error::Error;
use super::route::{self, authority, set_authority};
use super::telemetry::Record;
use super::upstream::{HashInput, Picked, Wire};
use super::Engine;
use crate::backend::Downstream;
use crate::config::{
    Backend, Config, Protocol, RetryOn, RetryPolicy, Route, Subset, TrafficPolicy, WeightedBackend,
};

/// A request body that can be sent again (buffered), or only once (too big to buffer).
enum Payload {
    Buffered(Bytes),
    Once(Option<ReqBody>),
}

impl Payload {
    fn take(&mut self) -> ReqBody {
        match self {
            Payload::Buffered(b) => full(b.clone()),
            Payload::Once(body) => body.take().unwrap_or_else(|| full(Bytes::new())),
        }
    }
}

/// Where attempts go, resolved once per request.
struct Target<'a> {
    backend: &'a Backend,
    port: u16,
    policy: TrafficPolicy,
    subset: Option<&'a Subset>,
    wire: Wire,
}

impl Engine {
    pub(super) async fn forward(
        &self,
        cfg: &Config,
        route: Option<&Route>,
        wb: &WeightedBackend,
        req: Request<Incoming>,
        ds: &Downstream,
        rec: &mut Record,
    ) -> Result<Response<RespBody>, Error> {
        let mut req = req;
        let upgrade = upgrade_of(&req).map(|proto| (proto, hyper::upgrade::on(&mut req)));
        let (mut parts, body) = req.into_parts();
        rec.trace_id = edit_request(route, wb, &mut parts);
        if let Some((proto, downstream)) = upgrade {
            parts.headers.insert(
                http::header::CONNECTION,
                HeaderValue::from_static("upgrade"),
            );
            parts.headers.insert(http::header::UPGRADE, proto);
            let target = resolve(cfg, &wb.backend, ds.port, Version::HTTP_11)?;
            let body = Counted::new(body, rec.request_counter.clone()).boxed();
            return self.tunnel(&target, parts, body, downstream, ds, rec).await;
        }

        let retry = route.and_then(|r| r.retry.as_ref());
        let mirrors = route.map(|r| r.mirrors.as_slice()).unwrap_or_default();
        let counted = Counted::new(body, rec.request_counter.clone());
        let mut payload = if retry.is_some_and(|r| r.attempts > 0) || !mirrors.is_empty() {
            buffer(counted, self.limits.max_buffered_body).await?
        } else {
            Payload::Once(Some(counted.boxed()))
        };
        if let Payload::Buffered(bytes) = &payload {
            for m in mirrors.iter().filter(|m| route::chance(m.fraction)) {
                self.mirror(cfg, &m.backend, &parts, bytes.clone(), ds);
            }
        }
        let target = resolve(cfg, &wb.backend, ds.port, parts.version)?;
        let attempts = async {
            self.attempts(&target, &parts, &mut payload, retry, ds, rec)
                .await
        };
        let resp = match route.and_then(|r| r.timeout) {
            Some(after) => tokio::time::timeout(after, attempts)
                .await
                .map_err(|_| Error::Timeout { after })??,
            None => attempts.await?,
        };
        let (mut head, body) = resp.into_parts();
        route::strip_hop_by_hop(&mut head.headers);
        let route_ops = route.map(|r| &r.response_headers);
        for ops in route_ops.into_iter().chain([&wb.response_headers]) {
            ops.apply(&mut head.headers);
        }
        Ok(Response::from_parts(head, body))
    }

    async fn attempts(
        &self,
        target: &Target<'_>,
        parts: &Parts,
        payload: &mut Payload,
        retry: Option<&RetryPolicy>,
        ds: &Downstream,
        rec: &mut Record,
    ) -> Result<Response<RespBody>, Error> {
        let retries = match (retry, &payload) {
            (Some(r), Payload::Buffered(_)) => r.attempts,
            _ => 0,
        };
        let hash = HashInput::of(&target.policy.load_balancer, parts, ds.peer);
        let mut n = 0;
        loop {
            rec.attempts = n + 1;
            let per_try = retry.and_then(|r| r.per_try_timeout);
            let once = self.attempt(target, parts, payload.take(), &hash, rec);
            let result = match per_try {
                Some(after) => tokio::time::timeout(after, once)
                    .await
                    .unwrap_or(Err(Error::Timeout { after })),
                None => once.await,
            };
            let again = n < retries
                && retry.is_some_and(|r| match &result {
                    Ok(resp) => retriable_status(&r.retry_on, resp.status()),
                    Err(e) => retriable_error(&r.retry_on, e),
                });
            if !again {
                return result;
            }
            n += 1;
            if let Some(r) = retry {
                tokio::time::sleep(backoff(r, n)).await;
            }
        }
    }

    async fn attempt(
        &self,
        target: &Target<'_>,
        parts: &Parts,
        body: ReqBody,
        hash: &HashInput,
        rec: &mut Record,
    ) -> Result<Response<RespBody>, Error> {
        let picked = self.pick(target, hash).await?;
        rec.set_upstream(&picked.endpoint);
        let req = upstream_request(parts, body, target.wire);
        let pool = &target.policy.connection_pool;
        let result = self.upstream.send(&picked, target.wire, pool, req).await;
        let (status, gateway) = match &result {
            Ok(r) => (
                Some(r.status().as_u16()),
                matches!(r.status().as_u16(), 502..=504),
            ),
            Err(e) => (None, e.is_gateway_error()),
        };
        self.upstream
            .outcome(&picked, &target.policy, status, gateway);
        let resp = result?;
        Ok(resp.map(|b| Holding::new(b, picked).boxed()))
    }

    /// An HTTP/1.1 upgrade (WebSocket and the like): one attempt on a connection of its
    /// own; on 101 the two upgraded streams are spliced until either side closes.
    async fn tunnel(
        &self,
        target: &Target<'_>,
        parts: Parts,
        body: ReqBody,
        downstream: OnUpgrade,
        ds: &Downstream,
        rec: &mut Record,
    ) -> Result<Response<RespBody>, Error> {
        rec.attempts = 1;
        let hash = HashInput::of(&target.policy.load_balancer, &parts, ds.peer);
        let picked = self.pick(target, &hash).await?;
        rec.set_upstream(&picked.endpoint);
        let req = upstream_request(&parts, body, Wire::Http1);
        let pool = &target.policy.connection_pool;
        let mut resp = self.upstream.send_upgrade(&picked, pool, req).await?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(resp.map(|b| Holding::new(b, picked).boxed()));
        }
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let _picked = picked;
            if let (Ok(down), Ok(up)) = tokio::join!(downstream, upstream) {
                let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            }
        });
        Ok(resp.map(|b| b.boxed()))
    }

    async fn pick(&self, target: &Target<'_>, hash: &HashInput) -> Result<Picked, Error> {
        let b = target.backend;
        let subset = b.subset.as_deref().zip(target.subset);
        self.upstream
            .pick(
                &b.service,
                target.port,
                subset,
                &target.policy,
                target.wire,
                hash,
            )
            .await
    }

    /// Fire and forget: the copy goes to `backend` with `-shadow` on the host, as Envoy
    /// marks mirrored requests; its response and errors are discarded.
    fn mirror(&self, cfg: &Config, backend: &Backend, parts: &Parts, body: Bytes, ds: &Downstream) {
        let Ok(target) = resolve(cfg, backend, ds.port, parts.version) else {
            return;
        };
        let mut parts = clone_parts(parts);
        if let Some(host) = authority(&parts) {
            let shadow = match host.rsplit_once(':') {
                Some((h, p)) if p.parse::<u16>().is_ok() => format!("{h}-shadow:{p}"),
                _ => format!("{host}-shadow"),
            };
            if let Ok(v) = HeaderValue::from_str(&shadow) {
                set_authority(&mut parts, v);
            }
        }
        let (backend, port, policy, wire) = (
            target.backend.clone(),
            target.port,
            target.policy,
            target.wire,
        );
        let subset = target.subset.cloned();
        let engine = self.me.upgrade();
        let peer = ds.peer;
        tokio::spawn(async move {
            let Some(engine) = engine else { return };
            let target = Target {
                backend: &backend,
                port,
                policy,
                subset: subset.as_ref(),
                wire,
            };
            let hash = HashInput::of(&target.policy.load_balancer, &parts, peer);
            let Ok(picked) = engine.pick(&target, &hash).await else {
                return;
            };
            let req = upstream_request(&parts, full(body), wire);
            let pool = &target.policy.connection_pool;
            match engine.upstream.send(&picked, wire, pool, req).await {
                Ok(resp) => drop(resp.into_body().collect().await),
                Err(e) => tracing::debug!(error = %e, "mirror request failed"),
            }
        });
    }
}

/// Route, then backend header changes and the rewrite; returns the trace id.
fn edit_request(route: Option<&Route>, wb: &WeightedBackend, parts: &mut Parts) -> String {
    route::strip_hop_by_hop(&mut parts.headers);
    if let Some(r) = route {
        r.request_headers.apply(&mut parts.headers);
        if let Some(rw) = &r.rewrite {
            route::rewrite(rw, r, parts);
        }
    }
    wb.request_headers.apply(&mut parts.headers);
    route::traceparent(&mut parts.headers)
}

fn resolve<'a>(
    cfg: &'a Config,
    backend: &'a Backend,
    port: u16,
    version: Version,
) -> Result<Target<'a>, Error> {
    let port = backend.port.unwrap_or(port);
    let svc = cfg.service(&backend.service);
    let subset = match (&backend.subset, svc) {
        (None, _) => None,
        (Some(name), Some(svc)) => svc.subsets.get(name),
        (Some(_), None) => None,
    };
    if backend.subset.is_some() && subset.is_none() {
        // A subset no DestinationRule defines has no endpoints, as in Envoy.
        return Err(Error::NoHealthyUpstream {
            service: format!(
                "{} subset {}",
                backend.service,
                backend.subset.as_deref().unwrap_or_default()
            ),
        });
    }
    let wire = match cfg.protocol(&backend.service, port) {
        Protocol::Http2 | Protocol::Grpc => Wire::Http2,
        Protocol::Http1 | Protocol::Tcp => Wire::Http1,
        // Unknown: speak what the client spoke, as Envoy's sniffed upstreams do.
        Protocol::Detect if version == Version::HTTP_2 => Wire::Http2,
        Protocol::Detect => Wire::Http1,
    };
    Ok(Target {
        backend,
        port,
        policy: cfg.traffic_policy(&backend.service, backend.subset.as_deref()),
        subset,
        wire,
    })
}

/// Reads the body into memory up to `limit` so attempts can resend it; a bigger body is
/// passed on as a stream (what was read, then the rest) and is not retried.
async fn buffer(mut body: Counted<Incoming>, limit: usize) -> Result<Payload, Error> {
    let mut frames: Vec<Frame<Bytes>> = Vec::new();
    let mut size = 0;
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame.map_err(|source| Error::RequestBody { source })?;
        size += frame.data_ref().map_or(0, |d| d.len());
        let trailers = frame.is_trailers();
        frames.push(frame);
        if size > limit || trailers {
            let head = futures_util::stream::iter(frames.into_iter().map(Ok));
            let stream = head.chain(BodyStream::new(body));
            return Ok(Payload::Once(Some(BodyExt::boxed(StreamBody::new(stream)))));
        }
    }
    let mut buf = bytes::BytesMut::with_capacity(size);
    for frame in frames {
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
        }
    }
    Ok(Payload::Buffered(buf.freeze()))
}

/// The protocol an HTTP/1.1 request asks to upgrade to (HTTP/2 has no upgrades).
fn upgrade_of(req: &Request<Incoming>) -> Option<HeaderValue> {
    let wants = req
        .headers()
        .get_all(http::header::CONNECTION)
        .iter()
        .any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        });
    let proto = req.headers().get(http::header::UPGRADE)?;
    (wants && req.version() == Version::HTTP_11).then(|| proto.clone())
}

fn clone_parts(parts: &Parts) -> Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}

/// The request as the upstream connection needs it: origin-form and Host for HTTP/1.1,
/// absolute URI with the authority for HTTP/2.
fn upstream_request(parts: &Parts, body: ReqBody, wire: Wire) -> Request<ReqBody> {
    let mut p = clone_parts(parts);
    let host = authority(parts).unwrap_or_default();
    let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    match wire {
        Wire::Http1 => {
            p.version = Version::HTTP_11;
            p.uri = pq.parse().unwrap_or_default();
            if let Ok(v) = HeaderValue::from_str(&host) {
                p.headers.insert(http::header::HOST, v);
            }
        }
        Wire::Http2 => {
            p.version = Version::HTTP_2;
            p.uri = format!("http://{host}{pq}")
                .parse()
                .unwrap_or_else(|_| p.uri.clone());
            p.headers.remove(http::header::HOST);
        }
    }
    Request::from_parts(p, body)
}

fn retriable_status(on: &RetryOn, s: StatusCode) -> bool {
    (on.server_error && s.is_server_error())
        || (on.gateway_error && matches!(s.as_u16(), 502..=504))
        || (on.retriable_4xx && s == StatusCode::CONFLICT)
        || on.status_codes.contains(&s.as_u16())
}

fn retriable_error(on: &RetryOn, e: &Error) -> bool {
    // Envoy counts resets, connect failures and timeouts as 5xx and gateway errors.
    let any_5xx = on.server_error || on.gateway_error;
    match e {
        Error::Connect { .. } | Error::ConnectTimeout { .. } => any_5xx || on.connect_failure,
        Error::RefusedStream { .. } => any_5xx || on.refused_stream || on.reset,
        Error::Reset { .. } => any_5xx || on.reset,
        Error::Timeout { .. } => any_5xx,
        Error::NoHealthyUpstream { .. }
        | Error::NoRoute { .. }
        | Error::FaultAbort { .. }
        | Error::Overflow { .. }
        | Error::Denied { .. }
        | Error::BadRequest { .. }
        | Error::RequestBody { .. } => false,
    }
}

/// Exponential back-off with full jitter: uniform in [0, min(base * 2^(n-1), max)].
fn backoff(r: &RetryPolicy, n: u32) -> Duration {
    let exp = r
        .backoff_base
        .saturating_mul(1u32 << n.saturating_sub(1).min(16));
    let cap = exp.min(r.backoff_max);
    let ms = cap.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(0..=ms))
}
