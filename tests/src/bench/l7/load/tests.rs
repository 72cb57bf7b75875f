use std::net::SocketAddr;
use std::process::Command;

use super::*;
use crate::bench::l7::server::HttpServer;

async fn server() -> HttpServer {
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("address");
    HttpServer::start(addr).await.expect("HTTP server")
}

// The real tools against the bench's server on loopback: the parsers read what the
// installed wrk and h2load print, and the server speaks both protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn wrk_and_h2load_runs_are_parsed() {
    let http = server().await;
    let url = format!("http://{}/", http.addr);
    let dir = std::env::temp_dir().join(format!("l7-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (h1, h2, fixed) = tokio::task::spawn_blocking(move || {
        let h1 = wrk(Command::new("wrk"), &url, 4, 1).expect("wrk");
        let h2 = h2load(Command::new("h2load"), &url, 4, 2, 1, &dir.join("h2.log")).expect("h2");
        let fixed = h2load_fixed_rate(Command::new("h2load"), &url, 2, 50, 1, &dir.join("f.log"))
            .expect("fixed rate");
        let _ = std::fs::remove_dir_all(&dir);
        (h1, h2, fixed)
    })
    .await
    .expect("load thread");
    for f in [h1, h2] {
        assert!(f.rps > 100.0, "{f:?}");
        assert!(f.requests > 100, "{f:?}");
        assert!(
            f.latency.p50_us > 0.0 && f.latency.p50_us <= f.latency.p99_us,
            "{f:?}"
        );
    }
    // 2 clients x 50 requests/s for 1 s: exactly the requested count, at about that rate.
    assert_eq!(fixed.requests, 100, "{fixed:?}");
    assert!(fixed.rps < 1000.0, "{fixed:?}");
}

#[test]
fn wrk_failures_are_errors() {
    let errors = "  1 threads and 4 connections\n  Socket errors: connect 4, read 0, write 0, timeout 0\nRequests/sec:      0.00\n";
    let e = parse_wrk(errors).expect_err("socket errors");
    assert!(e.to_string().contains("socket errors"), "{e}");
    let non_2xx = "  10 requests in 1.00s, 1.00KB read\n  Non-2xx or 3xx responses: 10\nRequests/sec:     10.00\n";
    let e = parse_wrk(non_2xx).expect_err("non-2xx");
    assert!(e.to_string().contains("non-2xx"), "{e}");
}

#[test]
fn wrk_durations_in_every_unit() {
    assert_eq!(wrk_duration_us("668.00us").expect("us"), 668.0);
    assert_eq!(wrk_duration_us("1.42ms").expect("ms"), 1420.0);
    assert_eq!(wrk_duration_us("2.00s").expect("s"), 2_000_000.0);
    assert!(wrk_duration_us("3m").is_err());
}

#[test]
fn h2load_failures_are_errors() {
    let text = "finished in 1.00s, 90.00 req/s, 9.00KB/s\n\
                requests: 100 total, 100 started, 100 done, 90 succeeded, 10 failed, 0 errored, 0 timeout\n\
                status codes: 90 2xx, 0 3xx, 0 4xx, 10 5xx\n";
    let e = parse_h2load(text).expect_err("failed requests");
    assert!(e.to_string().contains("failed"), "{e}");
    assert!(h2load_latencies("1\t200\tx\n").is_err());
}
