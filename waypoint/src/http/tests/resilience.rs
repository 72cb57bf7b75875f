//! Retries, timeouts, faults and mirroring, seen from the client and the backends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mesh_core::proto::mesh::l7::v1 as pb;

use super::support::*;
use crate::http::Limits;

async fn one(b: Behaviour) -> (Waypoint, Server) {
    let backends = Arc::new(TestBackends::default());
    let mut s = servers(&backends, "reviews", 1, b).await;
    let wp = Waypoint::start(backends, &svc_key("reviews"), Limits::default()).await;
    (wp, s.remove(0))
}

fn retry(attempts: u32, on: &[&str]) -> pb::RetryPolicy {
    pb::RetryPolicy {
        attempts,
        retry_on: on.iter().map(|s| s.to_string()).collect(),
        backoff_base_ms: 5,
        ..Default::default()
    }
}

fn route_with(f: impl FnOnce(&mut pb::Route)) -> pb::ServiceConfig {
    let mut r = forward("r", vec![backend("reviews", 1)]);
    f(&mut r);
    service("reviews", vec![r])
}

#[tokio::test]
async fn retries_on_5xx_until_success_and_resends_the_body() {
    let fail_two = Behaviour {
        fail_first: 2,
        ..Default::default()
    };
    let (wp, s) = one(fail_two).await;
    wp.apply(vec![route_with(|r| r.retry = Some(retry(3, &["5xx"])))]);
    let body = Bytes::from_static(b"{\"order\":1}");
    let reply = Client::h1(wp.addr)
        .await
        .send(request("POST", "/", &[], body.clone()))
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(s.count(), 3, "two failures then success");
    assert!(s.seen.lock().unwrap().iter().all(|r| r.body == body));
}

#[tokio::test]
async fn without_retry_policy_one_attempt_and_the_5xx_passes_through() {
    let (wp, s) = one(Behaviour {
        fail_first: 1,
        ..Default::default()
    })
    .await;
    wp.apply(vec![route_with(|_| {})]);
    assert_eq!(get(wp.addr, "/", &[]).await.status, 503);
    assert_eq!(s.count(), 1);
}

#[tokio::test]
async fn retry_attempts_are_bounded_and_conditions_respected() {
    let (wp, s) = one(Behaviour::default()).await;
    wp.apply(vec![route_with(|r| {
        let mut p = retry(2, &["gateway-error", "retriable-status-codes"]);
        p.retriable_status_codes = vec![409];
        r.retry = Some(p);
    })]);
    // 500 is not a gateway error: no retry.
    assert_eq!(
        get(wp.addr, "/", &[("x-test-status", "500")]).await.status,
        500
    );
    assert_eq!(s.count(), 1);
    // 503 is: first attempt plus two retries.
    assert_eq!(
        get(wp.addr, "/", &[("x-test-status", "503")]).await.status,
        503
    );
    assert_eq!(s.count(), 4);
    // 409 is listed.
    assert_eq!(
        get(wp.addr, "/", &[("x-test-status", "409")]).await.status,
        409
    );
    assert_eq!(s.count(), 7);
}

#[tokio::test]
async fn connect_failure_is_retried_on_another_endpoint() {
    let backends = Arc::new(TestBackends::default());
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    backends.add(&svc_key("reviews"), PORT, "dead", closed, &[]);
    let live = servers(&backends, "reviews", 1, Behaviour::default()).await;
    let wp = Waypoint::start(backends, &svc_key("reviews"), Limits::default()).await;
    wp.apply(vec![route_with(|r| {
        r.retry = Some(retry(1, &["connect-failure"]))
    })]);
    for _ in 0..6 {
        assert_eq!(get(wp.addr, "/", &[]).await.status, 200);
    }
    assert_eq!(live[0].count(), 6);
}

#[tokio::test]
async fn route_timeout_answers_504_ut() {
    let (wp, _s) = one(Behaviour {
        delay: Duration::from_secs(3),
        ..Default::default()
    })
    .await;
    wp.apply(vec![route_with(|r| r.timeout_ms = 200)]);
    let mut log = wp.engine.access_log();
    let start = Instant::now();
    let reply = get(wp.addr, "/", &[]).await;
    assert_eq!(reply.status, 504);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(log.recv().await.unwrap().response_flags, "UT");
}

#[tokio::test]
async fn per_try_timeout_retries_then_gives_up() {
    let (wp, s) = one(Behaviour {
        delay: Duration::from_secs(3),
        ..Default::default()
    })
    .await;
    wp.apply(vec![route_with(|r| {
        let mut p = retry(2, &["5xx"]);
        p.per_try_timeout_ms = 100;
        r.retry = Some(p);
    })]);
    let reply = get(wp.addr, "/", &[]).await;
    assert_eq!(reply.status, 504);
    assert_eq!(s.count(), 3);
}

#[tokio::test]
async fn fault_abort_and_delay() {
    let (wp, s) = one(Behaviour::default()).await;
    wp.apply(vec![route_with(|r| {
        r.fault = Some(pb::Fault {
            delay: Some(pb::fault::Delay {
                delay_ms: 100,
                percent: 100.0,
            }),
            abort: Some(pb::fault::Abort {
                http_status: 418,
                grpc_status: 0,
                percent: 50.0,
            }),
        })
    })]);
    let mut c = Client::h1(wp.addr).await;
    let mut aborted = 0;
    for _ in 0..20 {
        let start = Instant::now();
        if c.get("/", &[]).await.status == 418 {
            aborted += 1;
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(100), "not delayed: {took:?}");
    }
    assert_eq!(aborted + s.count(), 20);
    // Binomial(20, 0.5): 0 or 20 has probability 2 in a million.
    assert!((1..=19).contains(&aborted), "aborted {aborted} of 20");
}

#[tokio::test]
async fn fault_abort_percentage_is_statistical() {
    let (wp, s) = one(Behaviour::default()).await;
    wp.apply(vec![route_with(|r| {
        r.fault = Some(pb::Fault {
            delay: None,
            abort: Some(pb::fault::Abort {
                http_status: 503,
                grpc_status: 0,
                percent: 25.0,
            }),
        })
    })]);
    let mut c = Client::h1(wp.addr).await;
    for _ in 0..400 {
        c.get("/", &[]).await;
    }
    let passed = s.count();
    // 300 expected, standard deviation ~8.7.
    assert!((255..=345).contains(&passed), "{passed} of 400 passed");
}

#[tokio::test]
async fn mirror_gets_a_shadow_copy_and_its_answer_is_discarded() {
    let backends = Arc::new(TestBackends::default());
    let primary = servers(&backends, "reviews", 1, Behaviour::default()).await;
    let shadow = servers(
        &backends,
        "shadow",
        1,
        Behaviour {
            status: 500,
            ..Default::default()
        },
    )
    .await;
    let wp = Waypoint::start(backends, &svc_key("reviews"), Limits::default()).await;
    wp.apply(vec![route_with(|r| {
        r.mirrors = vec![pb::Mirror {
            backend: Some(pb::Backend {
                service: svc_key("shadow"),
                ..Default::default()
            }),
            percent: 100.0,
        }]
    })]);
    let body = Bytes::from_static(b"payload");
    let reply = Client::h1(wp.addr)
        .await
        .send(request("PUT", "/m", &[], body.clone()))
        .await;
    assert_eq!((reply.status.as_u16(), reply.server()), (200, "reviews-0"));
    for _ in 0..100 {
        if shadow[0].count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = shadow[0].last();
    assert_eq!(
        seen.headers["host"],
        "reviews.default.svc.cluster.local-shadow"
    );
    assert_eq!((seen.method.as_str(), seen.body.clone()), ("PUT", body));
    assert_eq!(primary[0].count(), 1);
}
