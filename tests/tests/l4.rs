//! The L4 secure path end to end on loopback: two in-process ztunnels, real TLS, real
//! sockets, SOCKS5 clients bound to workload addresses.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::testing::{echo_server, greeting_echo_server};
use mesh_tests::harness::{Mesh, BASE_CONFIG};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel::telemetry::{ConnRecord, Direction, Outcome};

/// Sends `len` pseudo-random bytes and checks the echo hashes the same.
async fn echo_roundtrip(mut tcp: TcpStream, len: usize) {
    let (mut r, mut w) = tcp.split();
    let writer = async {
        let mut hash = Sha256::new();
        let mut chunk = vec![0u8; 256 << 10];
        let mut left = len;
        let mut seed = len as u64 + 1;
        while left > 0 {
            let n = left.min(chunk.len());
            for b in chunk[..n].iter_mut() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *b = (seed >> 56) as u8;
            }
            w.write_all(&chunk[..n]).await.unwrap();
            hash.update(&chunk[..n]);
            left -= n;
        }
        w.shutdown().await.unwrap();
        hash.finalize()
    };
    let reader = async {
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0usize;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            got += n;
        }
        (hash.finalize(), got)
    };
    let (sent, (received, got)) = tokio::join!(writer, reader);
    assert_eq!(got, len);
    assert_eq!(sent, received, "echoed bytes differ for {len} bytes");
}

async fn next_log(rx: &mut tokio::sync::broadcast::Receiver<Arc<ConnRecord>>) -> Arc<ConnRecord> {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("no access log within 5 s")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks_carries_identical_bytes() {
    let mesh = Mesh::start(BASE_CONFIG).await;
    echo_server(mesh.addr("2.10", 8080)).await.unwrap();
    let mut inbound = mesh.node2.proxy().log.subscribe();
    for len in [1usize, 64 << 10, 1 << 30] {
        let tcp = mesh
            .socks(mesh.ip("1.10"), mesh.addr("2.10", 8080))
            .await
            .unwrap();
        echo_roundtrip(tcp, len).await;
        let rec = next_log(&mut inbound).await;
        assert_eq!(rec.direction, Direction::Inbound);
        assert_eq!(
            rec.src_identity.as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/client"),
            "the server side saw the client's identity"
        );
        assert!(rec.mtls);
        assert_eq!(rec.bytes_sent, len as u64);
        assert_eq!(rec.bytes_received, len as u64);
    }
}

#[tokio::test]
async fn half_close_both_directions() {
    let mesh = Mesh::start(BASE_CONFIG).await;
    // Client closes first: the echo keeps sending what it got, then closes.
    echo_server(mesh.addr("2.10", 8080)).await.unwrap();
    let mut c = mesh
        .socks(mesh.ip("1.10"), mesh.addr("2.10", 8080))
        .await
        .unwrap();
    c.write_all(b"first").await.unwrap();
    c.shutdown().await.unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).await.unwrap();
    assert_eq!(out, b"first");

    // Server closes first: the client can still send afterwards and the server gets it.
    let listener = tokio::net::TcpListener::bind(mesh.addr("2.11", 8080))
        .await
        .unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"bye").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let mut c = mesh
        .socks(mesh.ip("1.10"), mesh.addr("2.11", 8080))
        .await
        .unwrap();
    let mut first = Vec::new();
    c.read_to_end(&mut first).await.unwrap();
    assert_eq!(first, b"bye");
    c.write_all(b"after the server's FIN").await.unwrap();
    c.shutdown().await.unwrap();
    assert_eq!(server.await.unwrap(), b"after the server's FIN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connections_share_two_tls_connections() {
    let mesh = Arc::new(Mesh::start(BASE_CONFIG).await);
    echo_server(mesh.addr("2.10", 8080)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mesh = mesh.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = mesh
                .socks(mesh.ip("1.10"), mesh.addr("2.10", 8080))
                .await
                .unwrap();
            let msg = format!("connection {i}");
            c.write_all(msg.as_bytes()).await.unwrap();
            // Hold every connection open until all are established.
            tokio::time::sleep(Duration::from_millis(300)).await;
            c.shutdown().await.unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            assert_eq!(out, msg);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let opened = mesh.node1.proxy().hbone_metrics.pool_connections_opened();
    assert!(
        (1..=2).contains(&opened),
        "{opened} TLS connections for 200 streams"
    );
}

#[tokio::test]
async fn service_vip_round_robins_and_skips_refusing_endpoints() {
    let mesh = Mesh::start(BASE_CONFIG).await;
    greeting_echo_server(mesh.addr("2.10", 8080), "echo\n")
        .await
        .unwrap();
    let vip = mesh.addr("10.1", 80);
    // echo2 (2.11) has no server yet: every connection must land on echo.
    for _ in 0..4 {
        let mut c = mesh.socks(mesh.ip("1.10"), vip).await.unwrap();
        let mut g = [0u8; 5];
        c.read_exact(&mut g).await.unwrap();
        assert_eq!(&g, b"echo\n");
    }
    greeting_echo_server(mesh.addr("2.11", 8080), "eco2\n")
        .await
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let mut c = mesh.socks(mesh.ip("1.10"), vip).await.unwrap();
        let mut g = [0u8; 5];
        c.read_exact(&mut g).await.unwrap();
        seen.insert(g);
    }
    assert_eq!(seen.len(), 2, "round robin reached both endpoints");
}

const POLICY_CONFIG: &str = r#"
authorizationPolicies:
  - metadata: {name: allow-default-ns, namespace: default}
    spec:
      selector: {matchLabels: {app: echo}}
      rules:
        - from: [{source: {namespaces: [default]}}]
          to: [{operation: {ports: ["8080"]}}]
  - metadata: {name: deny-client, namespace: default}
    spec:
      action: DENY
      rules:
        - from: [{source: {principals: ["cluster.local/ns/default/sa/client"]}}]
          to: [{operation: {ports: ["9090"]}}]
"#;

#[tokio::test]
async fn l4_policy_allow_deny_default_deny_and_live_edit() {
    let config = format!("{BASE_CONFIG}{POLICY_CONFIG}");
    let mesh = Mesh::start(&config).await;
    echo_server(mesh.addr("2.10", 8080)).await.unwrap();
    echo_server(mesh.addr("2.10", 9090)).await.unwrap();
    let mut logs = mesh.node2.proxy().log.subscribe();

    // Namespace match + port match: allowed, and the log names the ALLOW policy.
    let c = mesh
        .socks(mesh.ip("1.10"), mesh.addr("2.10", 8080))
        .await
        .unwrap();
    echo_roundtrip(c, 10).await;
    let rec = next_log(&mut logs).await;
    assert_eq!(rec.policy.as_deref(), Some("default/allow-default-ns"));

    // Another namespace: default deny under an ALLOW policy; SOCKS answers "not allowed".
    let err = mesh
        .socks(mesh.ip("1.11"), mesh.addr("2.10", 8080))
        .await
        .unwrap_err();
    assert_eq!(err, 2);
    let rec = next_log(&mut logs).await;
    assert_eq!(rec.outcome, Outcome::Denied);
    assert!(
        rec.reason.as_deref().unwrap().contains("no ALLOW policy"),
        "{rec:?}"
    );

    // DENY before ALLOW, by principal and port; the log names the DENY policy.
    let err = mesh
        .socks(mesh.ip("1.10"), mesh.addr("2.10", 9090))
        .await
        .unwrap_err();
    assert_eq!(err, 2);
    let rec = next_log(&mut logs).await;
    assert_eq!(rec.policy.as_deref(), Some("default/deny-client"));

    // Remove the policies from the file: the next connection is allowed, no restart.
    mesh.write_config(BASE_CONFIG).await;
    let c = mesh
        .socks(mesh.ip("1.11"), mesh.addr("2.10", 8080))
        .await
        .unwrap();
    echo_roundtrip(c, 10).await;
    let rec = next_log(&mut logs).await;
    assert_eq!(rec.outcome, Outcome::Ok);
    assert_eq!(rec.decision, Some("allow"));
}

#[tokio::test]
async fn unknown_source_is_refused() {
    let mesh = Mesh::start(BASE_CONFIG).await;
    echo_server(mesh.addr("2.10", 8080)).await.unwrap();
    // 127.B.1.99 is no workload of node1.
    let err = mesh
        .socks(mesh.ip("1.99"), mesh.addr("2.10", 8080))
        .await
        .unwrap_err();
    assert_eq!(err, 2);
}
