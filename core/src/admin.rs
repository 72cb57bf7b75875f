//! The small HTTP servers every proxy runs: admin (`/config_dump`, `/logging`) on
//! localhost:15000, Prometheus `/metrics` and `/healthz` on 15020, readiness on 15021.
//!
//! They run on their own current-thread runtime in a thread of their own, so a busy data
//! plane cannot starve health checks and a slow scrape cannot slow the data plane.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::drain::Drain;

pub type Body = Full<Bytes>;
pub type Route = Arc<dyn Fn(&http::request::Parts) -> Response<Body> + Send + Sync>;

/// Paths to handlers for one listener.
#[derive(Clone, Default)]
pub struct Routes {
    map: HashMap<&'static str, Route>,
}

impl Routes {
    pub fn new() -> Self {
        Routes::default()
    }

    pub fn route(
        mut self,
        path: &'static str,
        f: impl Fn(&http::request::Parts) -> Response<Body> + Send + Sync + 'static,
    ) -> Self {
        self.map.insert(path, Arc::new(f));
        self
    }

    fn answer(&self, parts: &http::request::Parts) -> Response<Body> {
        match self.map.get(parts.uri.path()) {
            Some(f) => f(parts),
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

pub fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub fn json(value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// The Prometheus text exposition of `registry`.
pub fn metrics_route(registry: Arc<Registry>) -> impl Fn(&http::request::Parts) -> Response<Body> {
    move |_| {
        let mut out = String::new();
        match prometheus_client::encoding::text::encode(&mut out, &registry) {
            Ok(()) => {
                let mut r = text(StatusCode::OK, out);
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        }
    }
}

/// What still keeps a proxy from being ready (first config, first certificates...).
#[derive(Clone, Default, Debug)]
pub struct Readiness {
    pending: Arc<Mutex<BTreeSet<String>>>,
}

impl Readiness {
    pub fn block(&self, what: &str) {
        self.lock().insert(what.to_owned());
    }

    pub fn unblock(&self, what: &str) {
        self.lock().remove(what);
    }

    pub fn pending(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn route(&self) -> impl Fn(&http::request::Parts) -> Response<Body> {
        let me = self.clone();
        move |_| {
            let pending = me.pending();
            if pending.is_empty() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: waiting for {}\n", pending.join(", ")),
                )
            }
        }
    }
}

/// Serves `routes` on `listener` until drained.
pub async fn serve(listener: TcpListener, routes: Routes, drain: Drain) {
    let routes = Arc::new(routes);
    while let Some((tcp, peer)) = drain.accept(&listener, "admin").await {
        let routes = routes.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (parts, _) = req.into_parts();
                let resp = routes.answer(&parts);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                r = conn => if let Err(e) = r { debug!(%peer, "admin connection: {e}") },
                _ = drain.signaled() => {}
            }
        });
    }
}

/// Binds `addr` now (so the caller learns the port and errors early) and serves `routes`
/// from a dedicated thread with a current-thread runtime.
pub fn spawn_server(
    name: &str,
    addr: SocketAddr,
    routes: Routes,
    drain: Drain,
) -> std::io::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let bound = std_listener.local_addr()?;
    spawn_thread(name, async move {
        match TcpListener::from_std(std_listener) {
            Ok(l) => serve(l, routes, drain).await,
            Err(e) => warn!("admin listener: {e}"),
        }
    })?;
    Ok(bound)
}

/// Runs `fut` on a current-thread runtime in a new named thread.
pub fn spawn_thread(
    name: &str,
    fut: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || rt.block_on(fut))
}

/// Installs the process-wide log subscriber: human-readable to stderr, filtered by
/// `RUST_LOG` (default `info`). Access logs do not go through here.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
