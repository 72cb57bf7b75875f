//! The mesh run by its controller: the `controller` binary in local mode on a directory of
//! Kubernetes manifests, two in-process ztunnels on delta ADS and the controller's CA.
//! Real gRPC, real TLS, real sockets on loopback.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use mesh_core::proto::type_url;
use mesh_core::testing::echo_server;
use mesh_tests::controlled::{base_manifests, eventually, pod, ControlledMesh};
use mesh_tests::harness::{echo_roundtrip, next_log};
use ztunnel::app::App;
use ztunnel::telemetry::Direction;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";

/// The xDS names a node holds for `type_url`.
fn held(node: &App, type_url: &str) -> BTreeSet<String> {
    let status = node.xds_status().expect("controller mode");
    status
        .versions
        .get(type_url)
        .map(|v| v.keys().cloned().collect())
        .unwrap_or_default()
}

fn pod_uid(name: &str) -> String {
    format!("Kubernetes//Pod/default/{name}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_flows_with_config_and_certificates_from_the_controller() {
    let mesh = ControlledMesh::start(&base_manifests()).await;
    echo_server(mesh.addr("2.10", 8080)).await.unwrap();
    echo_server(mesh.addr("2.11", 8080)).await.unwrap();

    let want: BTreeSet<String> = ["client", "echo-1", "echo-2"]
        .map(pod_uid)
        .into_iter()
        .chain(["default/echo.default.svc.cluster.local".to_owned()])
        .collect();
    assert_eq!(held(&mesh.node1, type_url::ADDRESS), want);
    assert_eq!(held(&mesh.node2, type_url::ADDRESS), want);

    // Each node holds certificates for its own workloads' identities only, issued by the
    // controller's CA with the default 24 h lifetime.
    let certs = mesh.node1.proxy().certs.summary();
    let ids: Vec<_> = certs.iter().map(|c| c.identity.as_str()).collect();
    assert_eq!(ids, [CLIENT_ID]);
    // The CA backdates not_before a little for clock skew.
    let lifetime = certs[0].not_after - certs[0].not_before;
    assert!(
        (24 * 3600..24 * 3600 + 300).contains(&lifetime),
        "{lifetime} s"
    );
    let ids: Vec<_> = (mesh.node2.proxy().certs.summary())
        .into_iter()
        .map(|c| c.identity)
        .collect();
    assert_eq!(ids, ["spiffe://cluster.local/ns/default/sa/echo"]);

    let mut inbound = mesh.node2.proxy().log.subscribe();
    for _ in 0..4 {
        let tcp = mesh
            .socks(mesh.ip("1.10"), mesh.addr("10.1", 80))
            .await
            .expect("client -> service VIP");
        echo_roundtrip(tcp, 64 << 10).await;
        let rec = next_log(&mut inbound).await;
        assert_eq!(rec.direction, Direction::Inbound);
        assert!(rec.mtls);
        assert_eq!(rec.src_identity.as_deref(), Some(CLIENT_ID));
        assert_eq!(
            rec.dst_service.as_deref(),
            Some("echo.default.svc.cluster.local")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pod_is_reachable_within_a_second_and_a_deleted_one_leaves_the_mesh() {
    let mesh = ControlledMesh::start(&base_manifests()).await;
    echo_server(mesh.addr("2.12", 8080)).await.unwrap();
    let mut inbound = mesh.node2.proxy().log.subscribe();

    let written = Instant::now();
    mesh.write(
        "echo-3.yaml",
        &pod("echo-3", "echo3", "node2", "127.B.2.12", "other"),
    );
    // Reachable means: carried over mTLS to node2, which holds the new identity's cert.
    eventually(
        Duration::from_secs(1),
        "the new pod reachable over HBONE",
        async || {
            mesh.node2.hbone_addresses().contains(&mesh.ip("2.12"))
                && mesh
                    .node1
                    .proxy()
                    .state
                    .load()
                    .workload_by_ip(mesh.ip("2.12"))
                    .is_some()
        },
    )
    .await;
    let tcp = mesh
        .socks(mesh.ip("1.10"), mesh.addr("2.12", 8080))
        .await
        .expect("client -> new pod");
    echo_roundtrip(tcp, 1024).await;
    let took = written.elapsed();
    let rec = next_log(&mut inbound).await;
    assert!(rec.mtls && rec.src_identity.as_deref() == Some(CLIENT_ID));
    assert!(
        took < Duration::from_secs(1),
        "first connection after {took:?}"
    );

    mesh.remove("echo-3.yaml");
    eventually(
        Duration::from_secs(1),
        "the deleted pod gone from both nodes",
        async || {
            !mesh.node2.hbone_addresses().contains(&mesh.ip("2.12"))
                && mesh
                    .node1
                    .proxy()
                    .state
                    .load()
                    .workload_by_ip(mesh.ip("2.12"))
                    .is_none()
        },
    )
    .await;
    assert!(!held(&mesh.node1, type_url::ADDRESS).contains(&pod_uid("echo-3")));
    let ids: Vec<_> = (mesh.node2.proxy().certs.summary())
        .into_iter()
        .map(|c| c.identity)
        .collect();
    assert_eq!(
        ids,
        ["spiffe://cluster.local/ns/default/sa/echo"],
        "echo3's certificate dropped"
    );
    // Nothing the mesh knows is there any more: the connection is plain passthrough.
    let mut outbound = mesh.node1.proxy().log.subscribe();
    if let Ok(tcp) = mesh.socks(mesh.ip("1.10"), mesh.addr("2.12", 8080)).await {
        drop(tcp);
    }
    let rec = next_log(&mut outbound).await;
    assert!(!rec.mtls, "a deleted pod is not reached through the mesh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_policy_changes_the_decision_for_new_connections() {
    let mesh = ControlledMesh::start(&base_manifests()).await;
    echo_server(mesh.addr("2.10", 8080)).await.unwrap();
    let reach = async || match mesh.socks(mesh.ip("1.10"), mesh.addr("2.10", 8080)).await {
        Ok(tcp) => {
            echo_roundtrip(tcp, 16).await;
            true
        }
        Err(_) => false,
    };
    assert!(reach().await);
    // Held open across the policy change: a decision is made once, at connect.
    let open = mesh
        .socks(mesh.ip("1.10"), mesh.addr("2.10", 8080))
        .await
        .unwrap();

    let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
        metadata: {name: no-client, namespace: default}\n\
        spec:\n  selector: {matchLabels: {app: echo}}\n  action: DENY\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/default/sa/client]}\n";
    mesh.write("policy.yaml", policy);
    eventually(
        Duration::from_secs(2),
        "the DENY policy in force",
        async || !reach().await,
    )
    .await;
    let mut inbound = mesh.node2.proxy().log.subscribe();
    assert!(!reach().await);
    let rec = next_log(&mut inbound).await;
    assert_eq!(rec.policy.as_deref(), Some("default/no-client"), "{rec:?}");

    echo_roundtrip(open, 1024).await;

    mesh.remove("policy.yaml");
    eventually(
        Duration::from_secs(2),
        "the DENY policy lifted",
        async || reach().await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_survives_the_controller_and_a_restart_resyncs_exactly() {
    let mut mesh = ControlledMesh::start(&base_manifests()).await;
    echo_server(mesh.addr("2.10", 8080)).await.unwrap();
    echo_server(mesh.addr("2.11", 8080)).await.unwrap();
    echo_server(mesh.addr("2.12", 8080)).await.unwrap();

    mesh.stop_controller();
    eventually(Duration::from_secs(5), "both nodes notice", async || {
        !mesh.node1.xds_status().unwrap().connected && !mesh.node2.xds_status().unwrap().connected
    })
    .await;
    // New connections keep working on the last good config and certificates.
    for _ in 0..4 {
        let tcp = mesh
            .socks(mesh.ip("1.10"), mesh.addr("10.1", 80))
            .await
            .expect("traffic while the controller is away");
        echo_roundtrip(tcp, 4096).await;
    }

    // Changes made while it was down: one pod gone, one new.
    mesh.remove("echo-2.yaml");
    mesh.write(
        "echo-3.yaml",
        &pod("echo-3", "echo", "node2", "127.B.2.12", "echo"),
    );
    mesh.start_controller().await;
    let want: BTreeSet<String> = ["client", "echo-1", "echo-3"]
        .map(pod_uid)
        .into_iter()
        .chain(["default/echo.default.svc.cluster.local".to_owned()])
        .collect();
    for node in [&mesh.node1, &mesh.node2] {
        eventually(
            Duration::from_secs(15),
            "resynced after the restart",
            async || {
                let s = node.xds_status().unwrap();
                s.connected && s.connects == 2 && held(node, type_url::ADDRESS) == want
            },
        )
        .await;
        node.wait_applied().await;
        let snap = node.proxy().state.load_full();
        let uids: BTreeSet<String> = snap.workloads.keys().cloned().collect();
        let expected: BTreeSet<String> = ["client", "echo-1", "echo-3"].map(pod_uid).into();
        assert_eq!(uids, expected, "no workload missing or left over");
        assert_eq!(snap.services.len(), 1, "one service, not duplicated");
        assert_eq!(snap.services[0].endpoints.len(), 2);
    }
    let tcp = mesh
        .socks(mesh.ip("1.10"), mesh.addr("2.12", 8080))
        .await
        .expect("the pod added while the controller was down");
    echo_roundtrip(tcp, 1024).await;
}

/// STRICT from a PeerAuthentication reaches the ztunnel as a policy denying peers without
/// identity: a plaintext connection redirected to node2's 15006 (iptables DNAT in a
/// network namespace of the test's own, as in `capture.rs`) is refused, HBONE is not.
#[test]
fn netns_strict_peer_authentication_from_the_controller_refuses_plaintext() {
    use mesh_tests::netns::{nat_output, run_isolated};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpSocket;
    use ztunnel::telemetry::Outcome;

    const MARK: u32 = 0x539;
    run_isolated(
        "netns_strict_peer_authentication_from_the_controller_refuses_plaintext",
        || async {
            let mesh =
                ControlledMesh::start_with(&base_manifests(), |c| c.hbone.socket_mark = Some(MARK))
                    .await;
            let plaintext = mesh.node2.bound().inbound_plaintext;
            let capture = mesh.node1.bound().outbound;
            let block = mesh.block;
            nat_output(&format!("-p tcp -m mark --mark {MARK} -j RETURN"));
            nat_output(&format!(
                "-p tcp -s 127.{block}.1.0/24 -j DNAT --to-destination {capture}"
            ));
            nat_output(&format!(
                "-p tcp -d 127.{block}.2.0/24 -j DNAT --to-destination {plaintext}"
            ));
            echo_server(mesh.addr("2.10", 8080)).await.unwrap();
            let mut inbound = mesh.node2.proxy().log.subscribe();
            let outsider = mesh.ip("3.1");
            let attempt = async || {
                let sock = TcpSocket::new_v4()?;
                sock.bind(std::net::SocketAddr::new(outsider, 0))?;
                let mut c = sock.connect(mesh.addr("2.10", 8080)).await?;
                c.write_all(b"hello").await?;
                let mut buf = [0u8; 16];
                let n = c.read(&mut buf).await?;
                Ok::<_, std::io::Error>(buf[..n].to_vec())
            };
            // PERMISSIVE: delivered in plaintext.
            assert_eq!(attempt().await.unwrap(), b"hello");
            let rec = next_log(&mut inbound).await;
            assert!(!rec.mtls && rec.outcome == Outcome::Ok, "{rec:?}");

            mesh.write(
                "strict.yaml",
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
                 metadata: {name: strict, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n",
            );
            eventually(Duration::from_secs(2), "STRICT in force", async || {
                attempt().await.is_err()
            })
            .await;
            let rec = loop {
                let rec = next_log(&mut inbound).await;
                if rec.outcome == Outcome::Denied {
                    break rec;
                }
            };
            assert!(!rec.mtls);
            assert!(
                rec.policy.as_deref().is_some_and(|p| p.contains("strict")),
                "the log names the policy: {rec:?}"
            );

            // Mesh traffic to the same workload still flows.
            let sock = TcpSocket::new_v4().unwrap();
            sock.bind(std::net::SocketAddr::new(mesh.ip("1.10"), 0))
                .unwrap();
            let c = sock.connect(mesh.addr("2.10", 8080)).await.unwrap();
            echo_roundtrip(c, 4096).await;
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_the_controller_are_renewed_at_half_life() {
    let mesh = ControlledMesh::start_with(&base_manifests(), |c| {
        c.cert_lifetime = Duration::from_secs(4)
    })
    .await;
    echo_server(mesh.addr("2.10", 8080)).await.unwrap();
    let first = mesh.node1.proxy().certs.summary();
    assert_eq!(first.len(), 1);
    // Half of the 4 s it was issued for (not_before is backdated 60 s for clock skew).
    let due_in = first[0].refresh_at - (first[0].not_after - 4);
    assert!(
        (1..=3).contains(&due_in),
        "refresh {due_in} s after issuance"
    );
    let before = tokio::time::Instant::now();
    let renewed = eventually(Duration::from_secs(5), "renewed", async || {
        mesh.node1.proxy().certs.summary()[0].not_after > first[0].not_after
    })
    .await;
    assert!(
        before.elapsed() >= Duration::from_secs(1),
        "renewed too early: {renewed:?}"
    );
    // New connections use the renewed certificate.
    let tcp = mesh
        .socks(mesh.ip("1.10"), mesh.addr("2.10", 8080))
        .await
        .unwrap();
    echo_roundtrip(tcp, 1024).await;
}
