//! Hostile or broken clients are refused cleanly and do not disturb other requests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::support::*;
use crate::http::Limits;

async fn start(limits: Limits) -> (Waypoint, Vec<Server>) {
    let backends = Arc::new(TestBackends::default());
    let s = servers(&backends, "reviews", 1, Behaviour::default()).await;
    let wp = Waypoint::start(backends, &svc_key("reviews"), limits).await;
    wp.apply(vec![service("reviews", vec![])]);
    (wp, s)
}

/// Writes `bytes` on a fresh connection and reads until the server closes (bounded).
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn smuggling_with_content_length_and_chunked_is_refused() {
    let (wp, s) = start(Limits::default()).await;
    let attack = b"POST / HTTP/1.1\r\nHost: reviews\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: reviews\r\n\r\n";
    let out = raw(wp.addr, attack).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(!s[0]
        .seen
        .lock()
        .unwrap()
        .iter()
        .any(|r| r.path == "/smuggled"));
    assert_eq!(get(wp.addr, "/", &[]).await.status, 200);
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let (wp, s) = start(Limits::default()).await;
    let big = "a".repeat(100 * 1024);
    let req = format!("GET / HTTP/1.1\r\nHost: reviews\r\nx-big: {big}\r\n\r\n");
    let out = raw(wp.addr, req.as_bytes()).await;
    assert!(
        out.starts_with("HTTP/1.1 431"),
        "{}",
        &out[..out.len().min(200)]
    );
    assert_eq!(s[0].count(), 0);
    assert_eq!(get(wp.addr, "/", &[]).await.status, 200);
}

#[tokio::test]
async fn invalid_http2_frames_close_that_connection_only() {
    let (wp, _s) = start(Limits::default()).await;
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // A SETTINGS frame on stream 1 (must be 0): a connection error.
    bytes.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 1]);
    let mut tcp = TcpStream::connect(wp.addr).await.unwrap();
    tcp.write_all(&bytes).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the server closes the connection");
    // A GOAWAY frame (type 7) is among what the server sent.
    assert!(out.windows(4).any(|w| w[3] == 0x7 && w[0] == 0), "{out:?}");
    assert_eq!(get(wp.addr, "/", &[]).await.status, 200);
}

#[tokio::test]
async fn slow_client_is_cut_off_and_others_are_served() {
    let limits = Limits {
        header_read_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let (wp, _s) = start(limits).await;
    let addr = wp.addr;
    let slow = tokio::spawn(async move {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let start = Instant::now();
        for b in b"GET / HTTP/1.1\r\nHost: reviews\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n" {
            if tcp.write_all(&[*b]).await.is_err() {
                return start.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        start.elapsed()
    });
    for _ in 0..3 {
        assert_eq!(get(addr, "/", &[]).await.status, 200);
    }
    let took = slow.await.unwrap();
    assert!(
        took < Duration::from_secs(4),
        "the slow client was cut off after {took:?}"
    );
}

#[tokio::test]
async fn smuggling_guard_follows_framing_of_earlier_requests() {
    let (wp, s) = start(Limits::default()).await;
    // A chunked body that itself contains both header names, a fixed-length body, then
    // the conflicting request: only the third is refused.
    let pipelined = b"POST /one HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n\
2b\r\nContent-Length: 1\r\nTransfer-Encoding: x\r\n\r\n\r\n0\r\n\r\n\
POST /two HTTP/1.1\r\nHost: r\r\nContent-Length: 5\r\n\r\nhello\
POST /three HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n";
    let out = raw(wp.addr, pipelined).await;
    let codes: Vec<&str> = out.split("HTTP/1.1 ").skip(1).map(|r| &r[..3]).collect();
    assert_eq!(codes, ["200", "200", "400"], "{out}");
    let paths: Vec<String> = s[0]
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(paths, ["/one", "/two"]);
}

#[tokio::test]
async fn silent_client_is_closed_after_the_header_timeout() {
    let limits = Limits {
        header_read_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let (wp, _s) = start(limits).await;
    let mut tcp = TcpStream::connect(wp.addr).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "the waypoint closes a connection that sends nothing"
    );
    assert_eq!(get(wp.addr, "/", &[]).await.status, 200);
}
