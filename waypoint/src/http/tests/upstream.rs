//! Load balancing, subsets, pooling, pool limits and outlier detection.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::proto::mesh::l7::v1 as pb;
use pb::load_balancer::{consistent_hash::Key, ConsistentHash, Policy, Simple};

use super::support::*;
use crate::http::Limits;

async fn cluster(n: usize, b: Behaviour) -> (Waypoint, Arc<TestBackends>, Vec<Server>) {
    let backends = Arc::new(TestBackends::default());
    let s = servers(&backends, "reviews", n, b).await;
    let wp = Waypoint::start(backends.clone(), &svc_key("reviews"), Limits::default()).await;
    (wp, backends, s)
}

fn with_policy(tp: pb::TrafficPolicy) -> pb::ServiceConfig {
    let mut svc = service("reviews", vec![]);
    svc.traffic_policy = Some(tp);
    svc
}

fn lb(policy: Policy) -> pb::TrafficPolicy {
    pb::TrafficPolicy {
        load_balancer: Some(pb::LoadBalancer {
            policy: Some(policy),
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn round_robin_spreads_evenly_over_pooled_connections() {
    let (wp, backends, s) = cluster(3, Behaviour::default()).await;
    wp.apply(vec![service("reviews", vec![])]);
    let mut c = Client::h1(wp.addr).await;
    for _ in 0..30 {
        assert_eq!(c.get("/", &[]).await.status, 200);
    }
    for server in &s {
        assert_eq!(server.count(), 10, "{}", server.name);
        // Sequential requests reuse one connection per endpoint.
        assert_eq!(
            server.connections.load(Ordering::SeqCst),
            1,
            "{}",
            server.name
        );
    }
    assert_eq!(backends.connects.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn subsets_select_endpoints_by_label() {
    let (wp, _b, s) = cluster(2, Behaviour::default()).await;
    let mut svc = service("reviews", vec![]);
    svc.subsets = vec![pb::Subset {
        name: "v1".into(),
        labels: [("version".to_string(), "v1".to_string())].into(),
        traffic_policy: None,
        endpoints: Vec::new(),
    }];
    let mut wb = backend("reviews", 1);
    wb.backend.as_mut().unwrap().subset = "v1".into();
    svc.routes = vec![forward("v1-only", vec![wb])];
    wp.apply(vec![svc]);
    for _ in 0..6 {
        assert_eq!(get(wp.addr, "/", &[]).await.server(), "reviews-1");
    }
    assert_eq!(s[0].count(), 0);
}

// Endpoints from xDS carry no labels: the controller's uid list decides, and the
// labels are not consulted (no endpoint here has version v7).
#[tokio::test]
async fn subsets_select_endpoints_by_the_controllers_uid_list() {
    let (wp, _b, s) = cluster(3, Behaviour::default()).await;
    let mut svc = service("reviews", vec![]);
    svc.subsets = vec![pb::Subset {
        name: "picked".into(),
        labels: [("version".to_string(), "v7".to_string())].into(),
        traffic_policy: None,
        endpoints: vec!["reviews-0".into(), "reviews-2".into()],
    }];
    let mut wb = backend("reviews", 1);
    wb.backend.as_mut().unwrap().subset = "picked".into();
    svc.routes = vec![forward("picked-only", vec![wb])];
    wp.apply(vec![svc]);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..8 {
        seen.insert(get(wp.addr, "/", &[]).await.server().to_owned());
    }
    assert_eq!(seen, ["reviews-0", "reviews-2"].map(String::from).into());
    assert_eq!(s[1].count(), 0);
}

#[tokio::test]
async fn consistent_hash_by_header_is_sticky() {
    let (wp, _b, _s) = cluster(4, Behaviour::default()).await;
    let key = Key::HttpHeaderName("x-user".into());
    wp.apply(vec![with_policy(lb(Policy::ConsistentHash(
        ConsistentHash {
            key: Some(key),
            cookie_ttl_ms: 0,
        },
    )))]);
    let mut c = Client::h1(wp.addr).await;
    let mut chosen = std::collections::BTreeSet::new();
    for user in ["ann", "bob", "cy", "dee", "eve", "fay"] {
        let first = c.get("/", &[("x-user", user)]).await.server().to_owned();
        for _ in 0..5 {
            assert_eq!(
                c.get("/", &[("x-user", user)]).await.server(),
                first,
                "{user}"
            );
        }
        chosen.insert(first);
    }
    assert!(chosen.len() > 1, "keys spread over endpoints: {chosen:?}");
}

#[tokio::test]
async fn random_and_least_request_reach_every_endpoint() {
    for policy in [Simple::Random, Simple::LeastRequest] {
        let (wp, _b, s) = cluster(2, Behaviour::default()).await;
        wp.apply(vec![with_policy(lb(Policy::Simple(policy as i32)))]);
        let mut c = Client::h1(wp.addr).await;
        for _ in 0..100 {
            c.get("/", &[]).await;
        }
        // Binomial(100, 0.5) (or better balanced): below 20 is ~6 deviations off.
        assert!(
            s.iter().all(|s| s.count() >= 20),
            "{policy:?}: {} / {}",
            s[0].count(),
            s[1].count()
        );
    }
}

#[tokio::test]
async fn pool_limits_overflow_with_503_uo() {
    let slow = Behaviour {
        delay: Duration::from_millis(600),
        ..Default::default()
    };
    let (wp, _b, s) = cluster(1, slow).await;
    wp.apply(vec![with_policy(pb::TrafficPolicy {
        connection_pool: Some(pb::ConnectionPool {
            max_connections: 1,
            max_pending_requests: 1,
            ..Default::default()
        }),
        ..Default::default()
    })]);
    let addr = wp.addr;
    let tasks: Vec<_> = (0..4)
        .map(|_| tokio::spawn(async move { get(addr, "/", &[]).await }))
        .collect();
    let mut statuses = Vec::new();
    let mut bodies = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        statuses.push(r.status.as_u16());
        bodies.push(r.body);
    }
    statuses.sort();
    // One in flight, one pending, two refused.
    assert_eq!(statuses, [200, 200, 503, 503], "{bodies:?}");
    assert!(
        bodies.iter().any(|b| b.contains("max pending requests")),
        "{bodies:?}"
    );
    assert_eq!(s[0].count(), 2);
}

#[tokio::test]
async fn max_requests_per_connection_opens_new_connections() {
    let (wp, _b, s) = cluster(1, Behaviour::default()).await;
    wp.apply(vec![with_policy(pb::TrafficPolicy {
        connection_pool: Some(pb::ConnectionPool {
            max_requests_per_connection: 2,
            ..Default::default()
        }),
        ..Default::default()
    })]);
    let mut c = Client::h1(wp.addr).await;
    for _ in 0..6 {
        assert_eq!(c.get("/", &[]).await.status, 200);
    }
    assert_eq!(s[0].connections.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn outlier_detection_ejects_the_failing_endpoint() {
    let backends = Arc::new(TestBackends::default());
    let good = servers(&backends, "reviews", 1, Behaviour::default()).await;
    let bad = server(
        "bad",
        Behaviour {
            status: 503,
            ..Default::default()
        },
    )
    .await;
    backends.add(&svc_key("reviews"), PORT, "bad", bad.addr, &[]);
    let wp = Waypoint::start(backends, &svc_key("reviews"), Limits::default()).await;
    wp.apply(vec![with_policy(pb::TrafficPolicy {
        outlier_detection: Some(pb::OutlierDetection {
            consecutive_5xx_errors: 2,
            base_ejection_time_ms: 60_000,
            max_ejection_percent: 50,
            ..Default::default()
        }),
        ..Default::default()
    })]);
    let mut c = Client::h1(wp.addr).await;
    for _ in 0..20 {
        c.get("/", &[]).await;
    }
    // Round robin alternates, so the bad endpoint sees its two failures, then no more.
    assert_eq!(bad.count(), 2);
    assert_eq!(good[0].count(), 18);
}
