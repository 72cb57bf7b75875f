//! Routing through the engine with real HTTP clients and backends.

use std::sync::Arc;

use bytes::Bytes;
use mesh_core::proto::mesh::l7::v1 as pb;

use super::Limits;
use support::*;

mod authz;
mod bad_input;
mod resilience;
mod support;
mod telemetry;
mod upstream;

/// reviews (the tunnel's service) has v1 (the service itself) and routes to ratings.
async fn setup() -> (Waypoint, Arc<TestBackends>, Vec<Server>, Vec<Server>) {
    let backends = Arc::new(TestBackends::default());
    let reviews = servers(&backends, "reviews", 1, Behaviour::default()).await;
    let ratings = servers(&backends, "ratings", 1, Behaviour::default()).await;
    let wp = Waypoint::start(backends.clone(), &svc_key("reviews"), Limits::default()).await;
    (wp, backends, reviews, ratings)
}

#[tokio::test]
async fn routes_by_path_header_query_and_method() {
    let (wp, _b, _reviews, _ratings) = setup().await;
    let m = |f: fn(&mut pb::RouteMatch)| {
        let mut m = pb::RouteMatch::default();
        f(&mut m);
        m
    };
    let mut by_path = forward("path", vec![backend("ratings", 1)]);
    by_path.matches = vec![m(|m| m.path = Some(prefix("/ratings")))];
    let mut by_header = forward("header", vec![backend("ratings", 1)]);
    by_header.matches = vec![m(|m| {
        m.headers = vec![pb::HeaderMatch {
            name: "x-user".into(),
            value: Some(exact("jason")),
            invert: false,
        }]
    })];
    let mut by_query = forward("query", vec![backend("ratings", 1)]);
    by_query.matches = vec![m(|m| {
        m.query_params = vec![pb::QueryMatch {
            name: "canary".into(),
            value: Some(exact("1")),
        }]
    })];
    let mut by_method = forward("method", vec![backend("ratings", 1)]);
    by_method.matches = vec![m(|m| {
        m.method = "DELETE".into();
        m.path = Some(pb::StringMatch {
            kind: Some(pb::string_match::Kind::Regex("/items/[0-9]+".into())),
        });
    })];
    wp.apply(vec![
        service("reviews", vec![by_path, by_header, by_query, by_method]),
        service("ratings", vec![]),
    ]);
    let a = wp.addr;
    assert_eq!(get(a, "/ratings/1", &[]).await.server(), "ratings-0");
    assert_eq!(get(a, "/other", &[]).await.server(), "reviews-0");
    assert_eq!(
        get(a, "/", &[("x-user", "jason")]).await.server(),
        "ratings-0"
    );
    assert_eq!(
        get(a, "/", &[("x-user", "bob")]).await.server(),
        "reviews-0"
    );
    assert_eq!(get(a, "/?canary=1", &[]).await.server(), "ratings-0");
    assert_eq!(get(a, "/?canary=2", &[]).await.server(), "reviews-0");
    let mut c = Client::h1(a).await;
    let del = |p: &str| request("DELETE", p, &[], Bytes::new());
    assert_eq!(c.send(del("/items/42")).await.server(), "ratings-0");
    assert_eq!(c.send(del("/items/4x")).await.server(), "reviews-0");
    assert_eq!(c.get("/items/42", &[]).await.server(), "reviews-0");
}

#[tokio::test]
async fn inverted_header_match_routes_requests_without_the_header() {
    let (wp, _b, _reviews, _ratings) = setup().await;
    let mut r = forward("no-debug", vec![backend("ratings", 1)]);
    r.matches = vec![pb::RouteMatch {
        headers: vec![pb::HeaderMatch {
            name: "x-debug".into(),
            value: None,
            invert: true,
        }],
        ..Default::default()
    }];
    wp.apply(vec![service("reviews", vec![r])]);
    assert_eq!(get(wp.addr, "/", &[]).await.server(), "ratings-0");
    assert_eq!(
        get(wp.addr, "/", &[("x-debug", "1")]).await.server(),
        "reviews-0"
    );
}

#[tokio::test]
async fn weighted_split_stays_within_statistical_bounds() {
    let (wp, _b, _reviews, _ratings) = setup().await;
    let split = forward(
        "split",
        vec![backend("reviews", 80), backend("ratings", 20)],
    );
    wp.apply(vec![service("reviews", vec![split])]);
    let mut c = Client::h1(wp.addr).await;
    let mut ratings = 0;
    for _ in 0..400 {
        if c.get("/", &[]).await.server() == "ratings-0" {
            ratings += 1;
        }
    }
    // Mean 80, standard deviation 8: 40..120 is five deviations either side.
    assert!(
        (40..=120).contains(&ratings),
        "ratings got {ratings} of 400"
    );
}

#[tokio::test]
async fn redirect_and_direct_response() {
    let (wp, _b, reviews, _ratings) = setup().await;
    let mut redirect = pb::Route {
        name: "redirect".into(),
        action: Some(pb::route::Action::Redirect(pb::Redirect {
            scheme: "https".into(),
            host: "new.example".into(),
            path: "/moved".into(),
            status: 302,
            ..Default::default()
        })),
        ..Default::default()
    };
    redirect.matches = vec![pb::RouteMatch {
        path: Some(exact("/old")),
        ..Default::default()
    }];
    let direct = pb::Route {
        name: "direct".into(),
        action: Some(pb::route::Action::DirectResponse(pb::DirectResponse {
            status: 418,
            body: b"short and stout".to_vec(),
        })),
        ..Default::default()
    };
    // Gateway API ReplacePrefixMatch: only the matched prefix changes.
    let mut prefix = pb::Route {
        name: "prefix-redirect".into(),
        action: Some(pb::route::Action::Redirect(pb::Redirect {
            path_prefix: "/v2/".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    prefix.matches = vec![pb::RouteMatch {
        path: Some(pb::StringMatch {
            kind: Some(pb::string_match::Kind::Prefix("/v1/".into())),
        }),
        ..Default::default()
    }];
    wp.apply(vec![service("reviews", vec![redirect, prefix, direct])]);
    let r = get(wp.addr, "/old?x=1", &[]).await;
    assert_eq!(r.status, 302);
    assert_eq!(r.headers["location"], "https://new.example/moved?x=1");
    let r = get(wp.addr, "/v1/items/7", &[]).await;
    assert_eq!(r.status, 301);
    let location = r.headers["location"].to_str().expect("ascii location");
    assert!(location.ends_with("/v2/items/7"), "{location}");
    let r = get(wp.addr, "/teapot", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.body.as_str()),
        (418, "short and stout")
    );
    assert_eq!(reviews[0].count(), 0, "neither reached a backend");
}

#[tokio::test]
async fn header_changes_and_rewrites_reach_backend_and_client() {
    let (wp, _b, _reviews, ratings) = setup().await;
    let ops = |set: &[(&str, &str)], add: &[(&str, &str)], remove: &[&str]| pb::HeaderOps {
        set: set
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        add: add
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        remove: remove.iter().map(|s| s.to_string()).collect(),
    };
    let mut wb = backend("ratings", 1);
    wb.request_headers = Some(ops(&[("x-backend-level", "yes")], &[], &[]));
    wb.response_headers = Some(ops(&[], &[("x-backend-resp", "b")], &[]));
    let mut r = forward("rewrite", vec![wb]);
    r.matches = vec![pb::RouteMatch {
        path: Some(prefix("/api/")),
        ..Default::default()
    }];
    r.request_headers = Some(ops(
        &[("x-route", "r1")],
        &[("x-multi", "two")],
        &["x-secret"],
    ));
    r.response_headers = Some(ops(&[("x-resp", "set")], &[], &["x-server-internal"]));
    r.rewrite = Some(pb::Rewrite {
        path_prefix: "/v2/".into(),
        host: "ratings.internal".into(),
        ..Default::default()
    });
    wp.apply(vec![service("reviews", vec![r])]);
    let h = [("x-secret", "s3cret"), ("x-multi", "one")];
    let reply = get(wp.addr, "/api/items?id=7", &h).await;
    assert_eq!(reply.status, 200);
    let seen = ratings[0].last();
    assert_eq!(seen.path, "/v2/items?id=7");
    assert_eq!(seen.headers["host"], "ratings.internal");
    assert_eq!(seen.headers["x-route"], "r1");
    assert_eq!(seen.headers["x-backend-level"], "yes");
    assert!(seen.headers.get("x-secret").is_none());
    let multi: Vec<_> = seen.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["one", "two"]);
    assert_eq!(reply.headers["x-resp"], "set");
    assert_eq!(reply.headers["x-backend-resp"], "b");
}

#[tokio::test]
async fn errors_map_to_status_and_flags() {
    let backends = Arc::new(TestBackends::default());
    // An endpoint on a port nobody listens on: connect fails.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    backends.add(&svc_key("dead"), PORT, "dead-0", closed, &[]);
    let wp = Waypoint::start(backends.clone(), &svc_key("reviews"), Limits::default()).await;
    wp.apply(vec![
        service(
            "reviews",
            vec![forward("to-dead", vec![backend("dead", 1)])],
        ),
        service("empty", vec![]),
    ]);
    let mut log = wp.engine.access_log();
    let r = get(wp.addr, "/", &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(log.recv().await.unwrap().response_flags, "UF");
    // A service with config but no endpoints: no healthy upstream.
    wp.apply(vec![service(
        "reviews",
        vec![forward("to-empty", vec![backend("empty", 1)])],
    )]);
    let r = get(wp.addr, "/", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.body.as_str()),
        (
            503,
            "no healthy upstream for default/empty.default.svc.cluster.local"
        )
    );
    assert_eq!(log.recv().await.unwrap().response_flags, "UH");
    // Unknown to the config and to the endpoints: no route.
    wp.apply(vec![]);
    let r = get(wp.addr, "/", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(log.recv().await.unwrap().response_flags, "NR");
}

#[tokio::test]
async fn http2_clients_and_backends_and_detection() {
    let backends = Arc::new(TestBackends::default());
    let h2 = Behaviour {
        h2: true,
        ..Default::default()
    };
    let grpc = servers(&backends, "grpc", 1, h2).await;
    let web = servers(&backends, "web", 1, Behaviour::default()).await;
    let wp = Waypoint::start(backends.clone(), &svc_key("reviews"), Limits::default()).await;
    let mut grpc_svc = service("grpc", vec![]);
    grpc_svc.ports[0].protocol = pb::Protocol::Grpc as i32;
    let mut web_svc = service("web", vec![]);
    web_svc.ports[0].protocol = pb::Protocol::Http1 as i32;
    let mut to_grpc = forward("grpc", vec![backend("grpc", 1)]);
    to_grpc.matches = vec![pb::RouteMatch {
        path: Some(prefix("/pkg.Svc/")),
        ..Default::default()
    }];
    let to_web = forward("web", vec![backend("web", 1)]);
    wp.apply(vec![
        service("reviews", vec![to_grpc, to_web]),
        grpc_svc,
        web_svc,
    ]);
    // The tunnel's port is undeclared: the h2 preface picks HTTP/2, else HTTP/1.1.
    let mut c2 = Client::h2(wp.addr).await;
    let reply = c2.get("/pkg.Svc/Call", &[]).await;
    assert_eq!(reply.server(), "grpc-0");
    assert_eq!(grpc[0].count(), 1);
    // HTTP/2 client to an HTTP/1.1 backend, by the backend port's declared protocol.
    let reply = c2.get("/plain", &[]).await;
    assert_eq!((reply.status.as_u16(), reply.server()), (200, "web-0"));
    // HTTP/1.1 client to the HTTP/2 (gRPC-port) backend.
    let reply = get(wp.addr, "/pkg.Svc/Call", &[]).await;
    assert_eq!(reply.server(), "grpc-0");
    assert_eq!(grpc[0].count(), 2);
    assert_eq!(web[0].count(), 1);
}

#[tokio::test]
async fn config_update_applies_to_next_request_on_open_connection() {
    let (wp, _b, _reviews, _ratings) = setup().await;
    wp.apply(vec![service("reviews", vec![])]);
    let mut c = Client::h1(wp.addr).await;
    assert_eq!(c.get("/", &[]).await.server(), "reviews-0");
    wp.apply(vec![service(
        "reviews",
        vec![forward("all", vec![backend("ratings", 1)])],
    )]);
    assert_eq!(c.get("/", &[]).await.server(), "ratings-0");
}

#[tokio::test]
async fn http1_upgrade_is_spliced_after_101() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (wp, _b, reviews, _ratings) = setup().await;
    wp.apply(vec![service("reviews", vec![])]);
    let mut tcp = tokio::net::TcpStream::connect(wp.addr).await.unwrap();
    let req = "GET /ws HTTP/1.1\r\nHost: reviews\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n";
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    tcp.write_all(b"ping over the tunnel").await.unwrap();
    let mut back = [0u8; 20];
    tcp.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping over the tunnel");
    assert_eq!(reviews[0].count(), 1);
}

#[tokio::test]
async fn tcp_ports_are_passed_through_to_an_endpoint() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backends = Arc::new(TestBackends::default());
    let (echo, _task) = mesh_core::testing::echo_server("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    backends.add(&svc_key("reviews"), PORT, "echo", echo, &[]);
    let wp = Waypoint::start(backends, &svc_key("reviews"), Limits::default()).await;
    let mut svc = service("reviews", vec![]);
    svc.ports[0].protocol = pb::Protocol::Tcp as i32;
    wp.apply(vec![svc]);
    let mut tcp = tokio::net::TcpStream::connect(wp.addr).await.unwrap();
    // Not HTTP: bytes arrive unchanged and come back.
    tcp.write_all(b"\x00\x01 opaque bytes").await.unwrap();
    let mut back = [0u8; 15];
    tcp.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"\x00\x01 opaque bytes");
}
