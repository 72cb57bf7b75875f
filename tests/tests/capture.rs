//! Redirected traffic, as a node's capture rules deliver it: workloads' outbound
//! connections DNAT-ed to node1's capture listener (15001), plaintext to node2's workloads
//! DNAT-ed to node2's inbound listener (15006). Each test runs in its own network
//! namespace (root; see `mesh_tests::netns`); the ztunnels' own connections carry the
//! socket mark and are left alone, as Istio's rules do.

use std::time::Duration;

use mesh_core::testing::echo_server;
use mesh_tests::harness::{
    echo_roundtrip, half_close_checks, identical_bytes_checks, next_log, Mesh, Route, BASE_CONFIG,
};
use mesh_tests::netns::{nat_output, run_isolated};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use ztunnel::telemetry::{Direction, Outcome};

const MARK: u32 = 0x539;

/// Starts the mesh with marked dials and installs the capture rules for it.
async fn captured_mesh(config: &str) -> Mesh {
    let mesh = Mesh::start_with(config, |c| c.hbone.socket_mark = Some(MARK)).await;
    let node1_capture = mesh.node1.bound().outbound;
    let node2_plaintext = mesh.node2.bound().inbound_plaintext;
    let block = mesh.block;
    nat_output(&format!("-p tcp -m mark --mark {MARK} -j RETURN"));
    nat_output(&format!(
        "-p tcp -s 127.{block}.1.0/24 -j DNAT --to-destination {node1_capture}"
    ));
    nat_output(&format!(
        "-p tcp -d 127.{block}.2.0/24 -j DNAT --to-destination {node2_plaintext}"
    ));
    mesh
}

/// A connection from an address outside the mesh.
async fn connect_from(src: std::net::IpAddr, dst: std::net::SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(std::net::SocketAddr::new(src, 0)).unwrap();
    sock.connect(dst).await.unwrap()
}

/// A refused connection: `attempt` fails with a reset, at once (5 s at most).
async fn assert_reset(attempt: impl std::future::Future<Output = std::io::Result<usize>>) {
    let result = tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .expect("a refusal must close the connection at once");
    assert!(
        matches!(result, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "expected a reset, got {result:?}"
    );
}

#[test]
fn netns_capture_carries_identical_bytes() {
    run_isolated("netns_capture_carries_identical_bytes", || async {
        let mesh = captured_mesh(BASE_CONFIG).await;
        let mut outbound = mesh.node1.proxy().log.subscribe();
        identical_bytes_checks(&mesh, Route::Captured).await;
        // node1 took the destination from the redirected socket and tunnelled it.
        let rec = next_log(&mut outbound).await;
        assert_eq!(rec.direction, Direction::Outbound);
        assert_eq!(rec.dst_addr, Some(mesh.addr("2.10", 8080)));
        assert!(rec.mtls, "{rec:?}");
    });
}

#[test]
fn netns_capture_half_close_both_directions() {
    run_isolated("netns_capture_half_close_both_directions", || async {
        let mesh = captured_mesh(BASE_CONFIG).await;
        half_close_checks(&mesh, Route::Captured).await;
    });
}

#[test]
fn netns_capture_resolves_service_vip() {
    run_isolated("netns_capture_resolves_service_vip", || async {
        let mesh = captured_mesh(BASE_CONFIG).await;
        echo_server(mesh.addr("2.10", 8080)).await.unwrap();
        echo_server(mesh.addr("2.11", 8080)).await.unwrap();
        let mut inbound = mesh.node2.proxy().log.subscribe();
        let c = mesh
            .connect(Route::Captured, mesh.ip("1.10"), mesh.addr("10.1", 80))
            .await;
        echo_roundtrip(c, 4096).await;
        let rec = next_log(&mut inbound).await;
        assert_eq!(rec.dst_addr.map(|a| a.port()), Some(8080), "{rec:?}");
    });
}

const STRICT: &str = r#"
peerAuthentications:
  - metadata: {name: strict, namespace: default}
    spec: {mtls: {mode: STRICT}}
"#;

#[test]
fn netns_plaintext_inbound_permissive_then_strict() {
    run_isolated("netns_plaintext_inbound_permissive_then_strict", || async {
        let mesh = captured_mesh(BASE_CONFIG).await;
        echo_server(mesh.addr("2.10", 8080)).await.unwrap();
        let mut inbound = mesh.node2.proxy().log.subscribe();
        // 127.B.3.1 is no workload: its connection reaches node2 in plaintext on 15006.
        let outsider = mesh.ip("3.1");

        // PERMISSIVE (no PeerAuthentication): accepted and delivered.
        let c = connect_from(outsider, mesh.addr("2.10", 8080)).await;
        echo_roundtrip(c, 64 << 10).await;
        let rec = next_log(&mut inbound).await;
        assert_eq!(rec.outcome, Outcome::Ok, "{rec:?}");
        assert!(!rec.mtls);
        assert_eq!(rec.src_addr.ip(), outsider);

        // STRICT for the namespace: the plaintext connection is reset, and logged.
        mesh.write_config(&format!("{BASE_CONFIG}{STRICT}")).await;
        let attempt = async {
            let sock = TcpSocket::new_v4()?;
            sock.bind(std::net::SocketAddr::new(outsider, 0))?;
            let mut c = sock.connect(mesh.addr("2.10", 8080)).await?;
            c.write_all(b"hello").await?;
            let mut buf = [0u8; 16];
            c.read(&mut buf).await
        };
        assert_reset(attempt).await;
        let rec = next_log(&mut inbound).await;
        assert_eq!(rec.outcome, Outcome::Denied, "{rec:?}");
        assert!(rec.reason.as_deref().unwrap().contains("STRICT"), "{rec:?}");

        // Mesh traffic (HBONE from node1) still reaches the same workload.
        let c = mesh
            .connect(Route::Captured, mesh.ip("1.10"), mesh.addr("2.10", 8080))
            .await;
        echo_roundtrip(c, 1024).await;
        let rec = next_log(&mut inbound).await;
        assert_eq!(rec.outcome, Outcome::Ok, "{rec:?}");
        assert!(rec.mtls);
    });
}

const DENY_CLIENT: &str = r#"
authorizationPolicies:
  - metadata: {name: deny-client, namespace: default}
    spec:
      action: DENY
      rules:
        - from: [{source: {principals: ["cluster.local/ns/default/sa/client"]}}]
"#;

/// The capture listener accepts a connection before the destination decides; when the
/// destination refuses it, the client gets a reset at once, not an empty reply it could
/// take for a valid one.
#[test]
fn netns_capture_refused_connection_is_reset() {
    run_isolated("netns_capture_refused_connection_is_reset", || async {
        let mesh = captured_mesh(&format!("{BASE_CONFIG}{DENY_CLIENT}")).await;
        echo_server(mesh.addr("2.10", 8080)).await.unwrap();
        let mut outbound = mesh.node1.proxy().log.subscribe();
        // The reset may come before the client's connect returns (the ztunnel took the
        // handshake and refused at once): that counts too.
        let attempt = async {
            let sock = TcpSocket::new_v4()?;
            sock.bind(std::net::SocketAddr::new(mesh.ip("1.10"), 0))?;
            let mut c = sock.connect(mesh.addr("2.10", 8080)).await?;
            let mut buf = [0u8; 16];
            c.read(&mut buf).await
        };
        assert_reset(attempt).await;
        let rec = next_log(&mut outbound).await;
        assert_eq!(rec.outcome, Outcome::Denied, "{rec:?}");
    });
}
