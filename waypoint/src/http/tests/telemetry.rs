//! Metrics, access log records and trace context, as a scraper and a backend see them.

use std::sync::Arc;

use super::support::*;
use crate::http::Limits;

#[tokio::test]
async fn metrics_carry_istio_labels() {
    let backends = Arc::new(TestBackends::default());
    let _s = servers(&backends, "reviews", 1, Behaviour::default()).await;
    let wp = Waypoint::start(backends, &svc_key("reviews"), Limits::default()).await;
    wp.apply(vec![service("reviews", vec![])]);
    let mut log = wp.engine.access_log();
    let mut c = Client::h1(wp.addr).await;
    c.get("/", &[]).await;
    c.get("/", &[("x-test-status", "503")]).await;
    // The record is emitted when the response body is done: wait for both.
    log.recv().await.unwrap();
    log.recv().await.unwrap();
    let text = wp.metrics();
    let labels = [
        "reporter=\"waypoint\"",
        "source_workload_namespace=\"client-ns\"",
        "source_principal=\"cluster.local/ns/client-ns/sa/client\"",
        "destination_workload=\"reviews-0\"",
        "destination_workload_namespace=\"default\"",
        "destination_principal=\"cluster.local/ns/default/sa/reviews-0\"",
        "destination_service=\"reviews.default.svc.cluster.local\"",
        "destination_service_name=\"reviews\"",
        "destination_service_namespace=\"default\"",
        "request_protocol=\"http\"",
        "response_flags=\"-\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    let line = |code: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains(&format!("response_code=\"{code}\""))
            })
            .unwrap_or_else(|| panic!("no {code} line in\n{text}"))
            .to_owned()
    };
    for code in ["200", "503"] {
        let l = line(code);
        assert!(l.ends_with(" 1"), "{l}");
        for want in labels {
            assert!(l.contains(want), "{want} missing in {l}");
        }
    }
    assert!(
        text.contains("istio_request_duration_milliseconds_bucket{"),
        "{text}"
    );
    assert!(text.contains("istio_response_bytes_sum{"), "{text}");
    assert!(text.contains("istio_request_bytes_count{"), "{text}");
}

#[tokio::test]
async fn access_log_records_each_request() {
    let backends = Arc::new(TestBackends::default());
    let _s = servers(&backends, "reviews", 1, Behaviour::default()).await;
    let wp = Waypoint::start(backends, &svc_key("reviews"), Limits::default()).await;
    wp.apply(vec![service(
        "reviews",
        vec![forward("all", vec![backend("reviews", 1)])],
    )]);
    let mut log = wp.engine.access_log();
    let reply = get(wp.addr, "/path?q=1", &[]).await;
    assert_eq!(reply.status, 200);
    let r = log.recv().await.unwrap();
    assert_eq!(
        (r.method.as_str(), r.path.as_str(), r.response_code),
        ("GET", "/path", 200)
    );
    assert_eq!(r.route.as_deref(), Some("all"));
    assert_eq!(r.upstream_workload.as_deref(), Some("reviews-0"));
    assert_eq!(
        (r.attempts, r.response_bytes),
        (1, "reviews-0".len() as u64)
    );
    let json = serde_json::to_value(&*r).unwrap();
    assert_eq!(json["response_flags"], "-");
    assert_eq!(json["trace_id"].as_str().unwrap().len(), 32);
}

#[tokio::test]
async fn traceparent_is_continued_or_created() {
    let backends = Arc::new(TestBackends::default());
    let s = servers(&backends, "reviews", 1, Behaviour::default()).await;
    let wp = Waypoint::start(backends, &svc_key("reviews"), Limits::default()).await;
    wp.apply(vec![service("reviews", vec![])]);
    let incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    get(
        wp.addr,
        "/",
        &[("traceparent", incoming), ("tracestate", "k=v")],
    )
    .await;
    let seen = s[0].last();
    let tp = seen.headers["traceparent"].to_str().unwrap().to_owned();
    assert!(
        tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
        "{tp}"
    );
    assert_ne!(tp, incoming, "a new span id of the waypoint's own");
    assert_eq!(seen.headers["tracestate"], "k=v");
    get(wp.addr, "/", &[]).await;
    let tp = s[0].last().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(
        (parts.len(), parts[0], parts[1].len(), parts[2].len()),
        (4, "00", 32, 16),
        "{tp}"
    );
}

#[tokio::test]
async fn grpc_clients_get_grpc_status_and_grpc_labels() {
    use mesh_core::proto::mesh::l7::v1 as pb;
    let backends = Arc::new(TestBackends::default());
    let h2 = Behaviour {
        h2: true,
        ..Default::default()
    };
    let _s = servers(&backends, "reviews", 1, h2).await;
    let wp = Waypoint::start(backends, &svc_key("reviews"), Limits::default()).await;
    let mut r = forward("abort", vec![backend("reviews", 1)]);
    r.fault = Some(pb::Fault {
        delay: None,
        abort: Some(pb::fault::Abort {
            http_status: 503,
            grpc_status: 0,
            percent: 100.0,
        }),
    });
    let mut svc = service("reviews", vec![r]);
    svc.ports[0].protocol = pb::Protocol::Grpc as i32;
    wp.apply(vec![svc]);
    let mut log = wp.engine.access_log();
    let mut c = Client::h2(wp.addr).await;
    let ct = [("content-type", "application/grpc")];
    let reply = c.get("/pkg.Svc/Call", &ct).await;
    // gRPC reads the status from grpc-status; HTTP 200 as Envoy answers.
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["grpc-status"], "14");
    let rec = log.recv().await.unwrap();
    assert_eq!((rec.protocol, rec.response_flags), ("grpc", "FI"));
    let text = wp.metrics();
    let line = text
        .lines()
        .find(|l| l.starts_with("istio_requests_total{"))
        .unwrap();
    assert!(line.contains("request_protocol=\"grpc\""), "{line}");
    assert!(line.contains("grpc_response_status=\"14\""), "{line}");
    assert!(line.contains("response_flags=\"FI\""), "{line}");
}
