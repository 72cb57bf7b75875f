//! The L4 secure path end to end on loopback: two in-process ztunnels, real TLS, real
//! sockets, SOCKS5 clients bound to workload addresses.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::testing::{echo_server, greeting_echo_server};
use mesh_tests::harness::{
    echo_roundtrip, half_close_checks, identical_bytes_checks, next_log, Mesh, Route, BASE_CONFIG,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel::telemetry::Outcome;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks_carries_identical_bytes() {
    let mesh = Mesh::start(BASE_CONFIG).await;
    identical_bytes_checks(&mesh, Route::Socks).await;
}

#[tokio::test]
async fn half_close_both_directions() {
    let mesh = Mesh::start(BASE_CONFIG).await;
    half_close_checks(&mesh, Route::Socks).await;
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
