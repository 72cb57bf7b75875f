//! ztunnel honours waypoints: traffic to a service (or pod) that names one goes over
//! HBONE to a waypoint pod with the original VIP:port (or pod address) as authority,
//! checked against the waypoint's identity; the waypoint's own traffic goes direct. The
//! waypoint here is a bare HBONE server that records each CONNECT and echoes, so the
//! test sees exactly what the ztunnel sent. Real sockets and TLS on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::hbone::{self, HboneMetrics, InboundRequest};
use mesh_core::testing::echo_server;
use mesh_core::Identity;
use mesh_tests::harness::{echo_roundtrip, next_log, Mesh};
use prometheus_client::registry::Registry;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// The waypoint `wp` (pods: `wp` on node1, HBONE on 15009 so node1's own HBONE listener
/// for the pod can share its address) serves service `echo` and pod `echo`; pod `plain`
/// uses no waypoint.
const CONFIG: &str = r#"
workloads:
  - {name: client, namespace: default, serviceAccount: client, node: node1, ips: [127.B.1.10]}
  - {name: wp, namespace: default, serviceAccount: waypoint, node: node1, ips: [127.B.3.10], labels: {gateway: wp}}
  - {name: echo, namespace: default, serviceAccount: echo, node: node2, ips: [127.B.2.10], labels: {app: echo}, waypoint: {hostname: wp, hboneMtlsPort: 15009}}
  - {name: plain, namespace: default, serviceAccount: echo, node: node2, ips: [127.B.2.11]}
services:
  - {name: wp, namespace: default, vips: [127.B.10.9], ports: [{port: 15008}], selector: {gateway: wp}}
  - {name: echo, namespace: default, vips: [127.B.10.1], ports: [{port: 80, targetPort: 8080}], selector: {app: echo}, waypoint: {hostname: wp, hboneMtlsPort: 15009}}
"#;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/default/sa/waypoint";

/// (peer identity, authority) of each CONNECT the waypoint took.
type Seen = mpsc::UnboundedReceiver<(String, SocketAddr)>;

/// An HBONE server at `addr` with the waypoint's certificate that echoes every tunnel.
async fn bare_waypoint(mesh: &Mesh, addr: SocketAddr) -> (Seen, mesh_core::drain::DrainTrigger) {
    let id = Identity::new("cluster.local", "default", "waypoint").unwrap();
    let cert = mesh.ca.issue(&id, Duration::from_secs(3600)).unwrap();
    let server = cert.server_config().unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (tx, seen) = mpsc::unbounded_channel();
    let tls_for: hbone::TlsForLocalAddr = Arc::new(move |_| Some(server.clone()));
    let handler: hbone::Handler = Arc::new(move |req: InboundRequest| {
        let _ = tx.send((req.peer.to_string(), req.authority));
        Box::pin(async move {
            let Ok(stream) = req.accept() else { return };
            let (mut r, mut w) = tokio::io::split(stream.into_io());
            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                let _ = w.shutdown().await;
            }
        })
    });
    let (trigger, drain) = mesh_core::drain::new();
    let metrics = HboneMetrics::new(&mut Registry::default());
    tokio::spawn(hbone::serve(
        listener,
        tls_for,
        handler,
        hbone::Config::default(),
        metrics,
        drain,
    ));
    (seen, trigger)
}

async fn next_seen(seen: &mut Seen) -> (String, SocketAddr) {
    tokio::time::timeout(Duration::from_secs(5), seen.recv())
        .await
        .expect("the waypoint saw no tunnel within 5 s")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_and_pod_traffic_goes_to_the_waypoint_with_the_original_authority() {
    let mesh = Mesh::start(CONFIG).await;
    let (mut seen, _stop) = bare_waypoint(&mesh, mesh.addr("3.10", 15009)).await;
    echo_server(mesh.addr("2.11", 8080)).await.unwrap();
    let mut outbound = mesh.node1.proxy().log.subscribe();

    let tcp = mesh
        .socks(mesh.ip("1.10"), mesh.addr("10.1", 80))
        .await
        .unwrap();
    echo_roundtrip(tcp, 64 << 10).await;
    let (peer, authority) = next_seen(&mut seen).await;
    assert_eq!(peer, CLIENT_ID);
    assert_eq!(authority, mesh.addr("10.1", 80), "the VIP:port, not a pod");
    let rec = next_log(&mut outbound).await;
    assert_eq!(rec.waypoint.as_deref(), Some("default/wp"));
    assert_eq!(rec.hbone_addr, Some(mesh.addr("3.10", 15009)));
    assert_eq!(
        rec.dst_service.as_deref(),
        Some("echo.default.svc.cluster.local")
    );

    let tcp = mesh
        .socks(mesh.ip("1.10"), mesh.addr("2.10", 8080))
        .await
        .unwrap();
    echo_roundtrip(tcp, 1024).await;
    let (_, authority) = next_seen(&mut seen).await;
    assert_eq!(authority, mesh.addr("2.10", 8080), "the pod's own address");
    let rec = next_log(&mut outbound).await;
    assert_eq!(rec.waypoint.as_deref(), Some("default/wp"));
    assert_eq!(rec.dst_workload.as_deref(), Some("echo"));

    // A pod without a waypoint is reached directly.
    let tcp = mesh
        .socks(mesh.ip("1.10"), mesh.addr("2.11", 8080))
        .await
        .unwrap();
    echo_roundtrip(tcp, 1024).await;
    let rec = next_log(&mut outbound).await;
    assert_eq!(rec.waypoint, None);
    assert_eq!(rec.hbone_addr, Some(mesh.addr("2.11", 15008)));
    assert!(
        seen.try_recv().is_err(),
        "the waypoint saw the direct connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waypoints_own_traffic_is_never_sent_back_to_it() {
    let mesh = Mesh::start(CONFIG).await;
    let (mut seen, _stop) = bare_waypoint(&mesh, mesh.addr("3.10", 15009)).await;
    echo_server(mesh.addr("2.10", 8080)).await.unwrap();
    let mut inbound = mesh.node2.proxy().log.subscribe();

    let tcp = mesh
        .socks(mesh.ip("3.10"), mesh.addr("10.1", 80))
        .await
        .unwrap();
    echo_roundtrip(tcp, 4096).await;
    let rec = next_log(&mut inbound).await;
    assert_eq!(rec.src_identity.as_deref(), Some(WAYPOINT_ID));
    assert_eq!(rec.dst_workload.as_deref(), Some("echo"));
    assert!(
        seen.try_recv().is_err(),
        "the waypoint's own connection looped back to it"
    );

    // A client's connection, by contrast, is redirected.
    let tcp = mesh
        .socks(mesh.ip("1.10"), mesh.addr("10.1", 80))
        .await
        .unwrap();
    echo_roundtrip(tcp, 16).await;
    assert_eq!(next_seen(&mut seen).await.0, CLIENT_ID);
}
