//! Test support: real hyper backends on 127.0.0.1, a `Backends` that reaches them with
//! plain TCP (the seam the app fills with HBONE), the engine behind a local listener, and
//! real hyper clients.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::proto::mesh::l7::v1 as pb;
use mesh_core::Identity;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};

use crate::backend::{Backends, BoxIo, ConnectError, Downstream, Endpoint};
use crate::config::Config;
use crate::http::{Engine, Limits};

pub const NS: &str = "default";
pub const PORT: u16 = 80;

pub fn svc_key(name: &str) -> String {
    format!("{NS}/{name}.{NS}.svc.cluster.local")
}

/// What a backend saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// How a backend answers: `status` (default 200), the first `fail_first` requests 503,
/// after `delay`. Request header `x-test-status` overrides the status.
#[derive(Clone, Default)]
pub struct Behaviour {
    pub status: u16,
    pub fail_first: usize,
    pub delay: Duration,
    pub h2: bool,
}

pub struct Server {
    pub name: String,
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub connections: Arc<AtomicUsize>,
}

impl Server {
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request")
    }
}

pub async fn server(name: &str, b: Behaviour) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let connections: Arc<AtomicUsize> = Arc::default();
    let (s, c, n) = (seen.clone(), connections.clone(), name.to_owned());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let (seen, b, name) = (s.clone(), b.clone(), n.clone());
            let h2 = b.h2;
            let svc = hyper::service::service_fn(move |req| {
                let (seen, b, name) = (seen.clone(), b.clone(), name.clone());
                async move { Ok::<_, std::convert::Infallible>(answer(req, &seen, &b, &name).await) }
            });
            tokio::spawn(async move {
                let io = TokioIo::new(tcp);
                if h2 {
                    let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(io, svc).await;
                } else {
                    let builder = hyper::server::conn::http1::Builder::new();
                    let _ = builder.serve_connection(io, svc).with_upgrades().await;
                }
            });
        }
    });
    Server {
        name: name.to_owned(),
        addr,
        seen,
        connections,
    }
}

async fn answer(
    req: Request<Incoming>,
    seen: &Mutex<Vec<Seen>>,
    b: &Behaviour,
    name: &str,
) -> Response<Full<Bytes>> {
    let mut req = req;
    let upgrade = req
        .headers()
        .contains_key("upgrade")
        .then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let n = {
        let mut seen = seen.lock().unwrap();
        seen.push(Seen {
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or("/".into(), |p| p.to_string()),
            headers: parts.headers.clone(),
            body,
        });
        seen.len()
    };
    tokio::time::sleep(b.delay).await;
    let header_status = parts
        .headers
        .get("x-test-status")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let status = match (n <= b.fail_first, header_status, b.status) {
        (true, _, _) => 503,
        (false, Some(s), _) => s,
        (false, None, 0) => 200,
        (false, None, s) => s,
    };
    let mut resp = Response::new(Full::new(Bytes::from(name.to_owned())));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    if let Some(on) = upgrade {
        // An echo protocol after 101, for upgrade tests.
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        resp.headers_mut()
            .insert("upgrade", "echo".parse().unwrap());
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
    }
    resp.headers_mut().insert("x-server", name.parse().unwrap());
    resp
}

type EndpointMap = HashMap<(String, u16), Vec<Arc<Endpoint>>>;

/// Endpoints by (service, port) and a plain-TCP connect: the seam the app implements.
#[derive(Default)]
pub struct TestBackends {
    endpoints: Mutex<EndpointMap>,
    pub connects: AtomicUsize,
}

impl TestBackends {
    pub fn add(
        &self,
        service: &str,
        port: u16,
        uid: &str,
        addr: SocketAddr,
        labels: &[(&str, &str)],
    ) {
        let ep = Endpoint {
            uid: uid.to_owned(),
            addr,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            workload: uid.to_owned(),
            namespace: NS.to_owned(),
            identity: Identity::new("cluster.local", NS, uid).ok(),
        };
        let mut map = self.endpoints.lock().unwrap();
        map.entry((service.to_owned(), port))
            .or_default()
            .push(Arc::new(ep));
    }
}

impl Backends for TestBackends {
    fn endpoints(&self, service: &str, port: u16) -> Vec<Arc<Endpoint>> {
        let map = self.endpoints.lock().unwrap();
        map.get(&(service.to_owned(), port))
            .cloned()
            .unwrap_or_default()
    }

    fn connect(&self, endpoint: Arc<Endpoint>) -> BoxFuture<'static, Result<BoxIo, ConnectError>> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            match TcpStream::connect(endpoint.addr).await {
                Ok(tcp) => Ok(Box::new(tcp) as BoxIo),
                Err(e) => Err(ConnectError::Failed {
                    endpoint: endpoint.uid.clone(),
                    addr: endpoint.addr,
                    reason: e.to_string(),
                }),
            }
        })
    }
}

/// The engine behind a local listener that hands each connection to `serve` as a
/// tunnel for `service:PORT` from identity `client` in namespace `client-ns`.
pub struct Waypoint {
    pub engine: Arc<Engine>,
    pub addr: SocketAddr,
    pub registry: Arc<Mutex<Registry>>,
}

impl Waypoint {
    pub async fn start(backends: Arc<TestBackends>, service: &str, limits: Limits) -> Waypoint {
        let mut registry = Registry::default();
        let engine = Engine::with_limits(backends, &mut registry, limits);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (e, service) = (engine.clone(), service.to_owned());
        tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                let ds = Downstream {
                    peer,
                    identity: Identity::new("cluster.local", "client-ns", "client").ok(),
                    service: service.clone(),
                    port: PORT,
                };
                let e = e.clone();
                tokio::spawn(async move { e.serve(Box::new(tcp), ds).await });
            }
        });
        Waypoint {
            engine,
            addr,
            registry: Arc::new(Mutex::new(registry)),
        }
    }

    pub fn apply(&self, services: Vec<pb::ServiceConfig>) {
        let errors = self.apply_with(services, vec![]);
        assert!(errors.is_empty(), "{errors:?}");
    }

    pub fn apply_with(
        &self,
        services: Vec<pb::ServiceConfig>,
        policies: Vec<pb::Policy>,
    ) -> Vec<crate::config::ConfigError> {
        let (cfg, errors) = Config::from_proto("default/waypoint", &services, &policies);
        self.engine.update(Arc::new(cfg));
        errors
    }

    pub fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry.lock().unwrap())
            .unwrap();
        out
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn server(&self) -> &str {
        self.headers
            .get("x-server")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// An HTTP/1.1 or HTTP/2 (prior knowledge) client on one connection.
pub enum Client {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Client {
    pub async fn h1(addr: SocketAddr) -> Client {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client::H1(send)
    }

    pub async fn h2(addr: SocketAddr) -> Client {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        Client::H2(send)
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Reply {
        let resp = match self {
            Client::H1(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
            Client::H2(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
        };
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send(request("GET", path, headers, Bytes::new())).await
    }
}

pub fn request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://reviews.default.svc.cluster.local{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body)).unwrap()
}

/// One request on a fresh HTTP/1.1 connection.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    Client::h1(addr).await.get(path, headers).await
}

// ---- config builders ----

pub fn service(name: &str, routes: Vec<pb::Route>) -> pb::ServiceConfig {
    pb::ServiceConfig {
        namespace: NS.into(),
        hostname: format!("{name}.{NS}.svc.cluster.local"),
        waypoints: vec!["default/waypoint".into()],
        ports: vec![pb::PortConfig {
            port: PORT.into(),
            target_port: PORT.into(),
            protocol: pb::Protocol::Unspecified as i32,
        }],
        routes,
        ..Default::default()
    }
}

pub fn backend(name: &str, weight: u32) -> pb::WeightedBackend {
    pb::WeightedBackend {
        backend: Some(pb::Backend {
            service: svc_key(name),
            ..Default::default()
        }),
        weight,
        ..Default::default()
    }
}

pub fn forward(name: &str, backends: Vec<pb::WeightedBackend>) -> pb::Route {
    pb::Route {
        name: name.into(),
        action: Some(pb::route::Action::Forward(pb::Forward { backends })),
        ..Default::default()
    }
}

pub fn prefix(p: &str) -> pb::StringMatch {
    pb::StringMatch {
        kind: Some(pb::string_match::Kind::Prefix(p.into())),
    }
}

pub fn exact(p: &str) -> pb::StringMatch {
    pb::StringMatch {
        kind: Some(pb::string_match::Kind::Exact(p.into())),
    }
}

/// Backends `name` with one endpoint per server, and the servers.
pub async fn servers(backends: &TestBackends, name: &str, n: usize, b: Behaviour) -> Vec<Server> {
    let mut out = Vec::new();
    for i in 0..n {
        let s = server(&format!("{name}-{i}"), b.clone()).await;
        backends.add(
            &svc_key(name),
            PORT,
            &s.name,
            s.addr,
            &[("version", &format!("v{i}"))],
        );
        out.push(s);
    }
    out
}
