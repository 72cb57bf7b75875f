//! The waypoint's HTTP engine: serves HTTP/1.1, HTTP/2 and gRPC inside one tunnel,
//! routes each request by the current [`Config`] snapshot, applies faults, retries,
//! timeouts and mirrors, and forwards to endpoints through [`Backends`].
//!
//! It owns request handling, upstream pools and L7 telemetry. It must not know how bytes
//! reach an endpoint (HBONE is the app's, behind `Backends`), terminate TLS, or read xDS:
//! the app builds the `Config` and calls [`Engine::update`].

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::sync::broadcast;
use tokio::time::timeout;

use crate::backend::{Backends, BoxIo, Downstream};
use crate::config::{
    Action, AuthzInput, Backend, Config, DirectResponse, Fault, HeaderOps, Protocol,
    WeightedBackend,
};
use detect::Inbound;

mod body;
mod detect;
mod error;
mod forward;
mod route;
mod smuggle;
mod telemetry;
mod upstream;

pub use body::{RespBody, Tracked};
pub use error::{Error, Status};
pub use telemetry::Record;

/// Bounds on what one client may make the engine hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// An HTTP/1.1 request head must arrive within this (slow-client defence).
    pub header_read_timeout: Duration,
    /// Request head size (HTTP/1.1 read buffer, HTTP/2 header list): larger gets 431.
    pub max_header_bytes: usize,
    /// Bodies up to this size are buffered so retries and mirrors can resend them.
    pub max_buffered_body: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_buffered_body: 64 * 1024,
        }
    }
}

pub struct Engine {
    config: ArcSwap<Config>,
    upstream: upstream::Upstream,
    telemetry: telemetry::Telemetry,
    limits: Limits,
    /// For tasks that outlive a request (mirrors).
    me: Weak<Engine>,
}

impl Engine {
    pub fn new(backends: Arc<dyn Backends>, registry: &mut Registry) -> Arc<Engine> {
        Engine::with_limits(backends, registry, Limits::default())
    }

    pub fn with_limits(
        backends: Arc<dyn Backends>,
        registry: &mut Registry,
        limits: Limits,
    ) -> Arc<Engine> {
        let telemetry = telemetry::Telemetry::new(registry);
        Arc::new_cyclic(|me| Engine {
            config: ArcSwap::from_pointee(Config::default()),
            upstream: upstream::Upstream::new(backends),
            telemetry,
            limits,
            me: me.clone(),
        })
    }

    /// Swaps the config: the next request uses it; requests in flight finish on theirs.
    pub fn update(&self, config: Arc<Config>) {
        self.config.store(config);
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Every request's access-log record, for in-process observers (tests, admin).
    pub fn access_log(&self) -> broadcast::Receiver<Arc<Record>> {
        self.telemetry.subscribe()
    }

    /// Serves one tunnel until it closes: HTTP by the port's protocol (detected when the
    /// config does not say), or opaque TCP to an endpoint.
    pub async fn serve(self: &Arc<Self>, io: BoxIo, downstream: Downstream) {
        let protocol = self
            .config
            .load()
            .protocol(&downstream.service, downstream.port);
        let ds = Arc::new(downstream);
        let result = match protocol {
            Protocol::Tcp => {
                let r = self.upstream.passthrough(io, &ds.service, ds.port).await;
                r.map_err(|e| e.to_string())
            }
            Protocol::Http1 => self.serve_h1(Inbound::new(io), ds.clone()).await,
            Protocol::Http2 | Protocol::Grpc => self.serve_h2(Inbound::new(io), ds.clone()).await,
            // A client that never sends its first bytes is cut off like a slow HTTP/1.1 one.
            Protocol::Detect => {
                match timeout(self.limits.header_read_timeout, detect::sniff(io)).await {
                    Ok(Ok((io, true))) => self.serve_h2(io, ds.clone()).await,
                    Ok(Ok((io, false))) => self.serve_h1(io, ds.clone()).await,
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("no request within the header read timeout".into()),
                }
            }
        };
        if let Err(error) = result {
            tracing::debug!(%error, peer = %ds.peer, service = %ds.service, "tunnel ended with an error");
        }
    }

    async fn serve_h1(self: &Arc<Self>, io: Inbound, ds: Arc<Downstream>) -> Result<(), String> {
        let engine = self.clone();
        let flag = smuggle::Flag::default();
        let io = io.scanned(smuggle::Scanner::new(
            self.limits.max_header_bytes,
            flag.clone(),
        ));
        let requests = Arc::new(AtomicUsize::new(0));
        let svc = service_fn(move |req| {
            let (engine, ds) = (engine.clone(), ds.clone());
            let smuggled = flag.is(requests.fetch_add(1, Ordering::Relaxed) + 1);
            async move { Ok::<_, Infallible>(engine.handle(req, ds, smuggled).await) }
        });
        http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            // hyper refuses buffers under 8 KiB.
            .max_buf_size(self.limits.max_header_bytes.max(8192))
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades()
            .await
            .map_err(|e| e.to_string())
    }

    async fn serve_h2(self: &Arc<Self>, io: Inbound, ds: Arc<Downstream>) -> Result<(), String> {
        let engine = self.clone();
        let svc = service_fn(move |req| {
            let (engine, ds) = (engine.clone(), ds.clone());
            async move { Ok::<_, Infallible>(engine.handle(req, ds, false).await) }
        });
        http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(self.limits.max_header_bytes as u32)
            .serve_connection(TokioIo::new(io), svc)
            .await
            .map_err(|e| e.to_string())
    }

    /// `smuggled`: the request carried both Content-Length and Transfer-Encoding.
    async fn handle(
        &self,
        req: Request<Incoming>,
        ds: Arc<Downstream>,
        smuggled: bool,
    ) -> Response<Tracked> {
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let mut rec = Record::new(&req, &ds, grpc);
        let cfg = self.config.load_full();
        let result = if smuggled {
            Err(Error::BadRequest {
                reason: "both content-length and transfer-encoding",
            })
        } else {
            self.dispatch(&cfg, req, &ds, &mut rec).await
        };
        let resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                let status = e.status();
                rec.response_flags = status.flags;
                rec.error = Some(e.to_string());
                tracing::debug!(error = %e, service = %ds.service, "request failed");
                e.response(grpc)
            }
        };
        rec.response_code = resp.status().as_u16();
        if let Some(g) = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
        {
            rec.grpc_status = Some(g.to_owned());
        }
        resp.map(|b| Tracked::new(b, rec, self.telemetry.clone()))
    }

    async fn dispatch(
        &self,
        cfg: &Config,
        req: Request<Incoming>,
        ds: &Downstream,
        rec: &mut Record,
    ) -> Result<Response<RespBody>, Error> {
        let (parts, body) = req.into_parts();
        authorize(cfg, &parts, ds).map_err(|policy| {
            rec.error = Some(format!("denied by {policy}"));
            Error::Denied { policy }
        })?;
        let svc = cfg.service(&ds.service);
        let route = svc.and_then(|s| route::select(s, &parts, ds.port));
        if let Some(r) = route {
            rec.route = Some(r.name.clone());
            if let Some(f) = &r.fault {
                fault(f).await?;
            }
        }
        match route.map(|r| (r, &r.action)) {
            Some((r, Action::Redirect(rd))) => Ok(route::redirect(rd, r, &parts)),
            Some((_, Action::DirectResponse(d))) => Ok(direct(d)),
            Some((_, Action::Forward(backends))) => {
                let wb = route::weighted(backends).ok_or_else(|| Error::NoRoute {
                    service: ds.service.clone(),
                })?;
                self.forward(cfg, route, wb, Request::from_parts(parts, body), ds, rec)
                    .await
            }
            None => {
                let backends = self.upstream.backends();
                if svc.is_none() && backends.endpoints(&ds.service, ds.port).is_empty() {
                    return Err(Error::NoRoute {
                        service: ds.service.clone(),
                    });
                }
                // No route fits: the service itself, as a mesh without routes would.
                let wb = WeightedBackend {
                    backend: Backend {
                        service: ds.service.clone(),
                        port: None,
                        subset: None,
                    },
                    weight: 1,
                    request_headers: HeaderOps::default(),
                    response_headers: HeaderOps::default(),
                };
                self.forward(cfg, None, &wb, Request::from_parts(parts, body), ds, rec)
                    .await
            }
        }
    }
}

fn authorize(cfg: &Config, parts: &http::request::Parts, ds: &Downstream) -> Result<(), String> {
    if cfg.authz.is_empty() {
        return Ok(());
    }
    let host = route::authority(parts).unwrap_or_default();
    let principal = ds.identity.as_ref().map(|i| i.principal());
    cfg.authorize(&AuthzInput {
        service: &ds.service,
        principal: principal.as_deref(),
        namespace: ds.identity.as_ref().map(|i| i.namespace()),
        source_ip: ds.peer.ip(),
        host: &host,
        port: ds.port,
        method: parts.method.as_str(),
        path: parts.uri.path(),
        headers: &parts.headers,
    })
}

async fn fault(f: &Fault) -> Result<(), Error> {
    if let Some(d) = f.delay.as_ref().filter(|d| route::chance(d.fraction)) {
        tokio::time::sleep(d.delay).await;
    }
    match f.abort.as_ref().filter(|a| route::chance(a.fraction)) {
        Some(a) => Err(Error::FaultAbort {
            status: a.status,
            grpc_status: a.grpc_status,
        }),
        None => Ok(()),
    }
}

fn direct(d: &DirectResponse) -> Response<RespBody> {
    let mut resp = Response::new(body::full(d.body.clone()));
    *resp.status_mut() = d.status;
    resp
}

#[cfg(test)]
mod tests;
