//! The controller against an API server. No cluster runs here, so a local HTTP server
//! replays recorded API-server answers (tests/fixtures/apiserver/: lists, watch streams,
//! Status errors, TokenReviews, in the API's JSON shapes) to a real `kube::Client`: the
//! source's watchers, the TokenReview authenticator and the CA Secret store talk to it as
//! they would to a cluster.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use controller::app::{self, Config};
use controller::ca::{AuthError, Authenticator, TokenReviewer};
use controller::castore::CaOrigin;
use controller::kube_source::{self, SourceMetrics, Update};
use controller::objects::Objects;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use mesh_core::ca_client::{CaClient, CaClientError};
use mesh_core::control_plane::ControlPlane;
use mesh_core::tls::pem;
use mesh_core::Identity;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, Notify};

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/apiserver/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

/// What the replaying server answers: a status and a JSON (or JSON lines) body.
#[derive(Clone)]
struct Reply {
    status: u16,
    body: String,
}

impl Reply {
    fn ok(name: &str) -> Self {
        Reply {
            status: 200,
            body: fixture(name),
        }
    }

    fn status(code: u16, name: &str) -> Self {
        Reply {
            status: code,
            body: fixture(name),
        }
    }
}

/// The replaying API server. Lists are answered at once from the reply set for their
/// path. A watch from `resourceVersion` R waits until the test supplies the events for
/// (path, R), then sends them and ends the stream, as the API server does at its timeout;
/// the client then watches again from the last version it saw.
#[derive(Default)]
struct State {
    lists: Mutex<HashMap<String, Reply>>,
    watches: Mutex<HashMap<(String, String), Reply>>,
    reviews: Mutex<HashMap<String, Reply>>,
    secrets: Mutex<BTreeMap<String, serde_json::Value>>,
    /// "LIST path", "WATCH path@version", "POST path", ... in arrival order.
    log: Mutex<Vec<String>>,
    /// Bodies of the TokenReviews posted.
    review_bodies: Mutex<Vec<serde_json::Value>>,
    changed: Notify,
}

struct ApiServer {
    addr: SocketAddr,
    state: Arc<State>,
}

impl ApiServer {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| answer(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
        ApiServer { addr, state }
    }

    /// A cluster as listed at resourceVersion 100: namespaces, pods (one not yet running),
    /// a service, service accounts, an EndpointSlice, one AuthorizationPolicy, no
    /// HTTPRoutes, and neither PeerAuthentication's nor Gateway's CRD installed.
    async fn cluster() -> Self {
        let s = Self::start().await;
        for (path, reply) in [
            ("/api/v1/namespaces", Reply::ok("namespaces.json")),
            ("/api/v1/pods", Reply::ok("pods.json")),
            ("/api/v1/services", Reply::ok("services.json")),
            ("/api/v1/serviceaccounts", Reply::ok("serviceaccounts.json")),
            (
                "/apis/discovery.k8s.io/v1/endpointslices",
                Reply::ok("endpointslices.json"),
            ),
            (
                "/apis/security.istio.io/v1/authorizationpolicies",
                Reply::ok("authorizationpolicies.json"),
            ),
            (
                "/apis/security.istio.io/v1/peerauthentications",
                Reply::status(404, "not-found.json"),
            ),
            (
                "/apis/gateway.networking.k8s.io/v1/gateways",
                Reply::status(404, "not-found.json"),
            ),
            (
                "/apis/gateway.networking.k8s.io/v1/httproutes",
                Reply::ok("httproutes.json"),
            ),
        ] {
            s.list(path, reply);
        }
        s
    }

    fn list(&self, path: &str, reply: Reply) {
        self.state
            .lists
            .lock()
            .unwrap()
            .insert(path.to_owned(), reply);
    }

    fn watch(&self, path: &str, version: &str, events: &str) {
        self.state.watches.lock().unwrap().insert(
            (path.to_owned(), version.to_owned()),
            Reply {
                status: 200,
                body: fixture(events),
            },
        );
        self.state.changed.notify_waiters();
    }

    fn review(&self, token: &str, reply: Reply) {
        self.state
            .reviews
            .lock()
            .unwrap()
            .insert(token.to_owned(), reply);
    }

    fn log(&self) -> Vec<String> {
        self.state.log.lock().unwrap().clone()
    }

    async fn until_logged(&self, line: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.log().iter().any(|l| l == line) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the client never sent {line}; it sent {:#?}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn client(&self) -> kube::Client {
        kube::Client::try_from(self.kube_config()).unwrap()
    }

    fn kube_config(&self) -> kube::Config {
        kube::Config::new(format!("http://{}", self.addr).parse().unwrap())
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn respond(reply: Reply) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(reply.status).expect("fixture status codes are valid"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(reply.body)).boxed())
        .expect("a response from parts that are valid")
}

fn not_found() -> Reply {
    Reply::status(404, "not-found.json")
}

async fn answer(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let method = req.method().clone();
    let body: serde_json::Value = {
        let bytes = req.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
    };
    let reply = if method == Method::GET && query.get("watch").map(String::as_str) == Some("true") {
        let version = query.get("resourceVersion").cloned().unwrap_or_default();
        state
            .log
            .lock()
            .unwrap()
            .push(format!("WATCH {path}@{version}"));
        let key = (path, version);
        loop {
            let waiting = state.changed.notified();
            if let Some(reply) = state.watches.lock().unwrap().remove(&key) {
                break reply;
            }
            waiting.await;
        }
    } else if path == "/apis/authentication.k8s.io/v1/tokenreviews" && method == Method::POST {
        state.log.lock().unwrap().push(format!("POST {path}"));
        let token = body["spec"]["token"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        state.review_bodies.lock().unwrap().push(body);
        let reviews = state.reviews.lock().unwrap();
        reviews
            .get(&token)
            .cloned()
            .unwrap_or_else(|| Reply::ok("tokenreview-refused.json"))
    } else if path.starts_with("/api/v1/namespaces/") && path.contains("/secrets") {
        state.log.lock().unwrap().push(format!("{method} {path}"));
        secret(&state, &method, &path, body)
    } else {
        state.log.lock().unwrap().push(format!("LIST {path}"));
        let lists = state.lists.lock().unwrap();
        lists.get(&path).cloned().unwrap_or_else(not_found)
    };
    Ok(respond(reply))
}

/// Secrets are kept as posted: a GET finds what a POST created.
fn secret(state: &State, method: &Method, path: &str, body: serde_json::Value) -> Reply {
    let mut secrets = state.secrets.lock().unwrap();
    if *method == Method::POST {
        let name = body["metadata"]["name"].as_str().unwrap_or_default();
        let at = format!("{path}/{name}");
        if secrets.contains_key(&at) {
            return Reply {
                status: 409,
                body: r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","reason":"AlreadyExists","code":409}"#.into(),
            };
        }
        let mut stored = body;
        stored["metadata"]["resourceVersion"] = "300".into();
        stored["metadata"]["uid"] = "1f2e3d4c-0007-4a5b-9c8d-000000000001".into();
        secrets.insert(at, stored.clone());
        return Reply {
            status: 201,
            body: stored.to_string(),
        };
    }
    match secrets.get(path) {
        Some(s) => Reply {
            status: 200,
            body: s.to_string(),
        },
        None => not_found(),
    }
}

fn pods(objects: &Objects) -> BTreeMap<String, String> {
    objects
        .pods
        .iter()
        .map(|((_, name), pod)| {
            let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
            (name.clone(), ip.unwrap_or_default())
        })
        .collect()
}

fn expect_pods(want: &[(&str, &str)]) -> BTreeMap<String, String> {
    want.iter()
        .map(|(n, ip)| (n.to_string(), ip.to_string()))
        .collect()
}

/// Receives models until one has `want` pods; panics with the last one seen after 10 s.
async fn until_pods(rx: &mut mpsc::Receiver<Update>, want: &[(&str, &str)]) -> Update {
    let want = expect_pods(want);
    let mut last = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(update)) if pods(&update.objects) == want => return update,
            Ok(Some(update)) => last = Some(pods(&update.objects)),
            Ok(None) => panic!("the source stopped"),
            Err(_) => panic!("pods never became {want:?}; last model had {last:?}"),
        }
    }
}

fn start_source(server: &ApiServer) -> (mpsc::Receiver<Update>, SourceMetrics) {
    let mut registry = Registry::default();
    let metrics = SourceMetrics::new(&mut registry);
    let rx = kube_source::spawn(server.client(), "cluster.local", metrics.clone());
    (rx, metrics)
}

const PODS: &str = "/api/v1/pods";

#[tokio::test]
async fn first_model_is_the_whole_listed_cluster() {
    let server = ApiServer::cluster().await;
    let (mut rx, metrics) = start_source(&server);
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a first model within 10 s")
        .expect("the source runs");
    let o = &first.objects;
    assert_eq!(
        pods(o),
        expect_pods(&[("echo-1", "10.0.1.5"), ("echo-2", "10.0.2.6")])
    );
    assert_eq!(
        o.namespaces.keys().collect::<Vec<_>>(),
        ["default", "istio-system"]
    );
    assert!(o.services.contains_key(&("default".into(), "echo".into())));
    assert_eq!(o.service_accounts.len(), 2);
    assert_eq!(o.endpoint_slices.len(), 1);
    let policies: Vec<_> = o
        .custom("AuthorizationPolicy")
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(policies, ["echo-allow-ztunnel-peers"]);
    // The missing CRDs leave their kinds empty and everything else loaded.
    assert_eq!(o.custom("PeerAuthentication").count(), 0);
    assert_eq!(o.custom("Gateway").count(), 0);
    // The pending pod is reported with its API path and left out.
    assert_eq!(first.rejected.len(), 1, "{:?}", first.rejected);
    let e = &first.rejected[0];
    assert_eq!(e.origin, "/api/v1/namespaces/default/pods/pending-0");
    assert!(e.reason.contains("podIP"), "{e}");
    assert_eq!(metrics.rejected("Pod"), 1);
    // Every kind was listed before the model was published.
    let log = server.log();
    for path in [
        PODS,
        "/apis/security.istio.io/v1/peerauthentications",
        "/apis/gateway.networking.k8s.io/v1/httproutes",
    ] {
        assert!(log.contains(&format!("LIST {path}")), "{log:#?}");
    }
    assert_eq!(metrics.models_published(), 1);
}

#[tokio::test]
async fn watch_events_bookmarks_and_a_relist_after_410() {
    let server = ApiServer::cluster().await;
    let (mut rx, metrics) = start_source(&server);
    until_pods(&mut rx, &[("echo-1", "10.0.1.5"), ("echo-2", "10.0.2.6")]).await;
    server.until_logged(&format!("WATCH {PODS}@100")).await;

    // Added, modified, deleted.
    server.watch(PODS, "100", "pods-watch-100.jsonl");
    until_pods(&mut rx, &[("echo-1", "10.0.1.50"), ("echo-3", "10.0.1.7")]).await;

    // The stream ended: the client watches again from the last event's version; a
    // bookmark moves that version on and changes nothing.
    server.until_logged(&format!("WATCH {PODS}@103")).await;
    let published = metrics.models_published();
    server.watch(PODS, "103", "pods-watch-103.jsonl");
    server.until_logged(&format!("WATCH {PODS}@150")).await;
    tokio::time::sleep(kube_source::DEBOUNCE * 4).await;
    assert!(rx.try_recv().is_err(), "a bookmark published a model");
    assert_eq!(metrics.models_published(), published);
    assert_eq!(metrics.rejected("Pod"), 1, "counted once, not per rebuild");

    // 410 Gone: the version expired. The re-list replaces the state: echo-3, deleted
    // during the gap, goes; echo-4, created during it, comes.
    let lists_before = server
        .log()
        .iter()
        .filter(|l| **l == format!("LIST {PODS}"))
        .count();
    server.list(PODS, Reply::ok("pods-relist.json"));
    server.watch(PODS, "150", "pods-watch-150.jsonl");
    let update = until_pods(&mut rx, &[("echo-1", "10.0.1.50"), ("echo-4", "10.0.2.9")]).await;
    assert!(update.rejected.is_empty(), "{:?}", update.rejected);
    let lists_after = server
        .log()
        .iter()
        .filter(|l| **l == format!("LIST {PODS}"))
        .count();
    assert_eq!(lists_after, lists_before + 1, "{:#?}", server.log());
    server.until_logged(&format!("WATCH {PODS}@200")).await;
    // The other kinds were untouched by the pods' re-list.
    assert_eq!(update.objects.services.len(), 1);
    assert_eq!(update.objects.custom("AuthorizationPolicy").count(), 1);
}

#[tokio::test]
async fn nothing_is_published_until_every_kind_is_listed() {
    let server = ApiServer::cluster().await;
    // The pods' list fails (the API server is overloaded) until it recovers.
    server.list(PODS, Reply::status(500, "internal-error.json"));
    let (mut rx, _metrics) = start_source(&server);
    server.until_logged(&format!("LIST {PODS}")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.try_recv().is_err(), "a model without pods was published");
    server.list(PODS, Reply::ok("pods.json"));
    let first = until_pods(&mut rx, &[("echo-1", "10.0.1.5"), ("echo-2", "10.0.2.6")]).await;
    assert_eq!(first.objects.namespaces.len(), 2);
}

fn reviewer(server: &ApiServer) -> TokenReviewer {
    TokenReviewer::new(server.client(), "cluster.local", "istio-system")
}

#[tokio::test]
async fn token_review_names_the_caller() {
    let server = ApiServer::start().await;
    server.review("ztunnel-token", Reply::ok("tokenreview-ztunnel.json"));
    server.review("echo-token", Reply::ok("tokenreview-workload.json"));
    server.review("other-aud", Reply::ok("tokenreview-other-audience.json"));
    server.review("expired", Reply::ok("tokenreview-refused.json"));
    server.review("boom", Reply::status(500, "internal-error.json"));
    let auth = reviewer(&server);

    let ztunnel = auth.authenticate("ztunnel-token").await.unwrap();
    assert_eq!(
        ztunnel.identity,
        Identity::new("cluster.local", "istio-system", "ztunnel").unwrap()
    );
    assert_eq!(ztunnel.node.as_deref(), Some("node1"));
    // A workload's bound token names its node too, but only the node proxy may act for it.
    let echo = auth.authenticate("echo-token").await.unwrap();
    assert_eq!(
        echo.identity,
        Identity::new("cluster.local", "default", "echo").unwrap()
    );
    assert_eq!(echo.node, None);

    let err = auth.authenticate("expired").await.unwrap_err();
    assert!(
        matches!(&err, AuthError::Refused(m) if m.contains("expired")),
        "{err}"
    );
    let err = auth.authenticate("other-aud").await.unwrap_err();
    assert!(
        matches!(&err, AuthError::Refused(m) if m.contains("istio-ca")),
        "{err}"
    );
    let err = auth.authenticate("boom").await.unwrap_err();
    assert!(matches!(err, AuthError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("webhook unavailable"), "{err}");

    // Each review asked for the CA's audience, with the token as given.
    let bodies = server.state.review_bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 5);
    for b in &bodies {
        assert_eq!(b["kind"], "TokenReview");
        assert_eq!(b["apiVersion"], "authentication.k8s.io/v1");
        assert_eq!(b["spec"]["audiences"], serde_json::json!(["istio-ca"]));
    }
    assert_eq!(bodies[0]["spec"]["token"], "ztunnel-token");
}

/// Asks for `want` with `token` (as a node proxy on its behalf when `impersonate`); the
/// granted identity and the root PEM.
async fn ask(
    grpc: SocketAddr,
    token: &str,
    want: &Identity,
    impersonate: bool,
) -> Result<(Identity, String), tonic::Status> {
    let controller = ControlPlane::new(&format!("http://{grpc}"), None, None).unwrap();
    let client = CaClient::new(&controller, Some(token.into()), impersonate);
    match client.fetch(want, Duration::from_secs(3600)).await {
        Ok(cert) => Ok((cert.identity().clone(), pem::encode_cert(&cert.roots()[0]))),
        Err(CaClientError::Status(status)) => Err(status),
        Err(e) => panic!("{e}"),
    }
}

async fn metrics_text(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out
}

async fn start_app(server: &ApiServer) -> app::App {
    let mut cfg = Config::kubernetes(server.kube_config(), "istio-system");
    cfg.grpc_addr = "127.0.0.1:0".parse().unwrap();
    cfg.metrics_addr = "127.0.0.1:0".parse().unwrap();
    tokio::time::timeout(Duration::from_secs(15), app::build(cfg))
        .await
        .expect("the controller starts within 15 s")
        .unwrap()
}

#[tokio::test]
async fn kubernetes_mode_end_to_end() {
    let server = ApiServer::cluster().await;
    server.review("ztunnel-token", Reply::ok("tokenreview-ztunnel.json"));
    server.review("echo-token", Reply::ok("tokenreview-workload.json"));
    server.review("boom", Reply::status(500, "internal-error.json"));

    let app = start_app(&server).await;
    let secret = "istio-system/istio-ca-secret".to_owned();
    assert_eq!(app.ca_origin, CaOrigin::SecretCreated(secret.clone()));
    assert_eq!(
        pods(&app.objects.load()),
        expect_pods(&[("echo-1", "10.0.1.5"), ("echo-2", "10.0.2.6")])
    );

    // node1's ztunnel gets echo's identity (echo-1 runs on node1); the echo workload
    // gets its own, but may not act for another.
    let echo = Identity::new("cluster.local", "default", "echo").unwrap();
    let (got, root) = ask(app.grpc, "ztunnel-token", &echo, true).await.unwrap();
    assert_eq!(got, echo);
    assert_eq!(
        ask(app.grpc, "echo-token", &echo, false).await.unwrap().0,
        echo
    );
    let err = ask(app.grpc, "echo-token", &echo, true).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let err = ask(app.grpc, "unknown-token", &echo, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    let err = ask(app.grpc, "boom", &echo, false).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.message().contains("token review failed"), "{err}");

    let metrics = metrics_text(app.metrics).await;
    for line in [
        r#"mesh_config_objects_rejected_total{kind="Pod"} 1"#,
        r#"mesh_ca_requests_refused_total{reason="auth_unavailable"} 1"#,
        r#"mesh_ca_requests_refused_total{reason="unauthenticated"} 1"#,
    ] {
        assert!(metrics.contains(line), "no {line} in\n{metrics}");
    }

    // A watch event reaches the served model.
    server.until_logged(&format!("WATCH {PODS}@100")).await;
    server.watch(PODS, "100", "pods-watch-100.jsonl");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !pods(&app.objects.load()).contains_key("echo-3") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "echo-3 never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    {
        let secrets = server.state.secrets.lock().unwrap();
        let s = &secrets["/api/v1/namespaces/istio-system/secrets/istio-ca-secret"];
        assert_eq!(s["type"], "istio.io/ca-root");
        assert!(s["data"]["ca-key.pem"].is_string(), "{s}");
    }
    app.shutdown(Duration::from_secs(1)).await;

    // A restart reads the root back from the Secret instead of making a new one.
    let again = start_app(&server).await;
    assert_eq!(again.ca_origin, CaOrigin::SecretLoaded(secret));
    assert_eq!(server.state.secrets.lock().unwrap().len(), 1);
    let (_, root_again) = ask(again.grpc, "ztunnel-token", &echo, true).await.unwrap();
    assert_eq!(root_again, root, "the same root signs after a restart");
    again.shutdown(Duration::from_secs(1)).await;
}
