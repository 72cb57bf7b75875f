//! The waypoint on loopback: two in-process ztunnels (local file naming waypoint `wp` for
//! services `echo` and `echo-auto`), the waypoint app in-process with its certificate from
//! the same development CA and its config over delta ADS from a stand-in server holding
//! hand-built Address and ServiceConfig resources. Traffic goes client -> ztunnel@node1 ->
//! waypoint -> ztunnel@node2 -> echo server, each hop real HBONE over mutual TLS.

use std::net::SocketAddr;

use mesh_core::proto::istio::workload as pb;
use mesh_core::proto::mesh::l7::v1 as l7;
use mesh_core::proto::type_url;
use mesh_core::testing::{echo_server, static_ads, StaticResources};
use mesh_tests::harness::{echo_roundtrip, next_log, Mesh};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waypoint::app::{CaSource, Ports, Settings};

const CONFIG: &str = r#"
workloads:
  - {name: client, namespace: default, serviceAccount: client, node: node1, ips: [127.B.1.10]}
  - {name: wp, namespace: default, serviceAccount: waypoint, node: node1, ips: [127.B.3.10], protocol: TCP, labels: {gateway: wp}}
  - {name: echo, namespace: default, serviceAccount: echo, node: node2, ips: [127.B.2.10], labels: {app: echo}}
  - {name: echo2, namespace: default, serviceAccount: echo, node: node2, ips: [127.B.2.11], labels: {app: echo}}
services:
  - {name: wp, namespace: default, vips: [127.B.10.9], ports: [{port: 15008}], selector: {gateway: wp}}
  - {name: echo, namespace: default, vips: [127.B.10.1], ports: [{port: 80, targetPort: 8080}], selector: {app: echo}, waypoint: {hostname: wp}}
  - {name: echo-auto, namespace: default, vips: [127.B.10.2], ports: [{port: 80, targetPort: 8080}], selector: {app: echo}, waypoint: {hostname: wp}}
  - {name: nowhere, namespace: default, vips: [127.B.10.3], ports: [{port: 80}], waypoint: {hostname: wp}}
"#;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/default/sa/waypoint";

fn host(name: &str) -> String {
    format!("{name}.default.svc.cluster.local")
}

/// The pods the waypoint needs to know of, as the controller would send them.
fn workload(mesh: &Mesh, name: &str, sa: &str, tail: &str, hbone: bool) -> (String, Vec<u8>) {
    let ports = pb::PortList {
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 8080,
        }],
    };
    let services = match name.starts_with("echo") {
        true => [host("echo"), host("echo-auto")]
            .map(|h| (format!("default/{h}"), ports.clone()))
            .into(),
        false => Default::default(),
    };
    let ip = match mesh.ip(tail) {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let w = pb::Workload {
        uid: format!("default/{name}"),
        name: name.to_owned(),
        namespace: "default".to_owned(),
        service_account: sa.to_owned(),
        addresses: vec![ip],
        tunnel_protocol: match hbone {
            true => pb::TunnelProtocol::Hbone as i32,
            false => pb::TunnelProtocol::None as i32,
        },
        node: if hbone { "node2" } else { "node1" }.to_owned(),
        services,
        ..Default::default()
    };
    let a = pb::Address {
        r#type: Some(pb::address::Type::Workload(w)),
    };
    (format!("default/{name}"), a.encode_to_vec())
}

fn service(mesh: &Mesh, name: &str, vip: &str) -> (String, Vec<u8>) {
    let s = pb::Service {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        hostname: host(name),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: match mesh.ip(vip) {
                std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
                std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
            },
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 8080,
        }],
        ..Default::default()
    };
    let a = pb::Address {
        r#type: Some(pb::address::Type::Service(s)),
    };
    (format!("default/{}", host(name)), a.encode_to_vec())
}

/// `echo` declares its port TCP; `echo-auto` declares nothing (detected).
fn resources(mesh: &Mesh) -> StaticResources {
    let echo_cfg = l7::ServiceConfig {
        namespace: "default".to_owned(),
        hostname: host("echo"),
        waypoints: vec!["default/wp".to_owned()],
        ports: vec![l7::PortConfig {
            port: 80,
            target_port: 8080,
            protocol: l7::Protocol::Tcp as i32,
        }],
        ..Default::default()
    };
    [
        (
            type_url::ADDRESS.to_owned(),
            vec![
                workload(mesh, "client", "client", "1.10", true),
                workload(mesh, "echo", "echo", "2.10", true),
                workload(mesh, "echo2", "echo", "2.11", true),
                service(mesh, "echo", "10.1"),
                service(mesh, "echo-auto", "10.2"),
            ],
        ),
        (
            type_url::L7_SERVICE.to_owned(),
            vec![(
                format!("default/{}", host("echo")),
                echo_cfg.encode_to_vec(),
            )],
        ),
    ]
    .into()
}

async fn start_waypoint(mesh: &Mesh) -> waypoint::app::App {
    let (ads, _) = static_ads(mesh.addr("0.2", 0), resources(mesh))
        .await
        .unwrap();
    let mut s = Settings::new("default/wp", "waypoint", &format!("http://{ads}"));
    s.ca = CaSource::Local {
        ca_cert: mesh.dir.join("ca.pem"),
        ca_key: mesh.dir.join("ca-key.pem"),
    };
    s.listen_ip = mesh.ip("3.10");
    s.admin_ip = mesh.ip("3.10");
    s.ports = Ports {
        hbone: 15008,
        admin: 0,
        metrics: 0,
        readiness: 0,
    };
    waypoint::app::build(s).await.unwrap()
}

/// GET `path` from `addr` over HTTP/1.0; the body.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.0\r\nhost: x\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_passes_through_the_waypoint_to_an_endpoint_over_hbone() {
    let mesh = Mesh::start(CONFIG).await;
    echo_server(mesh.addr("2.10", 8080)).await.unwrap();
    echo_server(mesh.addr("2.11", 8080)).await.unwrap();
    let wp = start_waypoint(&mesh).await;
    let status = wp.xds_status();
    assert!(status.synced.contains(type_url::ADDRESS), "{status:?}");
    let ready = http_get(wp.bound().readiness, "/healthz/ready").await;
    assert!(ready.contains(" 200 OK"), "{ready}");
    let mut outbound = mesh.node1.proxy().log.subscribe();
    let mut inbound = mesh.node2.proxy().log.subscribe();

    let mut endpoints = std::collections::BTreeSet::new();
    for vip in ["10.1", "10.2", "10.1", "10.2"] {
        let tcp = mesh
            .socks(mesh.ip("1.10"), mesh.addr(vip, 80))
            .await
            .unwrap();
        echo_roundtrip(tcp, 256 << 10).await;
        // ztunnel@node1 tunnelled to the waypoint, asking for the VIP.
        let out = next_log(&mut outbound).await;
        assert_eq!(out.waypoint.as_deref(), Some("default/wp"));
        assert_eq!(out.hbone_addr, Some(mesh.addr("3.10", 15008)));
        assert_eq!(out.dst_addr, Some(mesh.addr(vip, 80)));
        // ztunnel@node2 took the waypoint's tunnel, with the pod address as authority.
        let inb = next_log(&mut inbound).await;
        assert_eq!(inb.src_identity.as_deref(), Some(WAYPOINT_ID));
        assert!(inb.mtls);
        assert_eq!(inb.bytes_received, 256 << 10, "{inb:?}");
        endpoints.insert(inb.dst_workload.clone().unwrap());
    }
    assert_eq!(
        endpoints.len(),
        2,
        "round robin over both endpoints: {endpoints:?}"
    );

    let metrics = http_get(wp.bound().metrics, "/metrics").await;
    for svc in ["echo", "echo-auto"] {
        let line = format!(
            "istio_tcp_connections_opened_total{{reporter=\"waypoint\",source_principal=\"{CLIENT_ID}\",destination_service=\"{}\"",
            host(svc)
        );
        assert!(metrics.contains(&line), "no {line} in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_the_waypoint_cannot_place_is_refused() {
    let mesh = Mesh::start(CONFIG).await;
    let wp = start_waypoint(&mesh).await;
    // `nowhere` names the waypoint in the ztunnels' config, but the waypoint knows no such
    // service: it answers 503, and the client's SOCKS CONNECT is refused (reply 5).
    let refused = mesh.socks(mesh.ip("1.10"), mesh.addr("10.3", 80)).await;
    assert_eq!(refused.err(), Some(5));
    // `echo` is known but no endpoint listens: 503 again, nothing relayed.
    let refused = mesh.socks(mesh.ip("1.10"), mesh.addr("10.1", 80)).await;
    assert_eq!(refused.err(), Some(5));
    let metrics = http_get(wp.bound().metrics, "/metrics").await;
    for outcome in ["unknown_destination", "no_healthy_upstream"] {
        let line = format!("waypoint_tunnels_total{{outcome=\"{outcome}\"");
        assert!(metrics.contains(&line), "no {line} in\n{metrics}");
    }
}
