//! The mesh run for real on network namespaces: the controller in the fabric, a ztunnel
//! process per node, pods' unmodified clients (curl) and servers (Python's http.server).
//! Root only (see `mesh_tests::netns`). The capture tests need `ztunnel --capture`.

use std::net::Ipv4Addr;
use std::time::Duration;

use mesh_tests::netns::{
    capture_mode, is_root, pod_identity, MeshOptions, NetnsMesh, NodeSpec, PodSpec, ServiceSpec,
    Topology,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn start(capture: Option<&str>) -> NetnsMesh {
    assert!(is_root(), "netns_* tests need root");
    let topo = Topology::build(&[
        NodeSpec::new("node1", [PodSpec::new("client")]),
        NodeSpec::new(
            "node2",
            [
                PodSpec::new("server").label("app", "web"),
                PodSpec::new("neighbor"),
                PodSpec::new("legacy").not_ambient(),
            ],
        ),
    ]);
    let opts = MeshOptions {
        capture: capture.map(str::to_owned),
        services: vec![ServiceSpec::new("web", VIP, "web", 80, 8080)],
        ..MeshOptions::default()
    };
    NetnsMesh::start(topo, &opts).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Without capture: both ztunnels take their config and certificates from the controller
/// in the fabric, and know every pod of the topology by the address it has there.
#[test]
fn netns_mesh_nodes_get_config_from_the_fabric() {
    let mut mesh = start(None);
    for node in &mesh.topo.nodes {
        let dump = node
            .curl(&format!("http://{}:15000/config_dump", node.ip))
            .unwrap();
        for pod in mesh.pods() {
            assert!(
                dump.contains(&format!("\"{}\"", pod.ip)),
                "{} does not know {} at {}: {dump}",
                node.name,
                pod.spec.name,
                pod.ip
            );
        }
        let local = node.pods.iter().find(|p| p.spec.ambient).unwrap();
        assert!(
            dump.contains(&pod_identity(local)),
            "{} has no certificate for {}: {dump}",
            node.name,
            local.spec.name
        );
    }
    assert!(mesh.controller().exited().is_none());
}

/// Unmodified clients in ambient pods, one on the other node and one on the server's own
/// node, reach the server by pod IP and by Service VIP; the destination's ztunnel saw each
/// client's identity over mTLS, and the server saw the client's own address.
#[test]
fn netns_mesh_captured_pod_to_pod_across_nodes_and_on_one_node() {
    let mut mesh = start(Some(&capture_mode()));
    let server = mesh.pod("server");
    let http = server.hello_server(&mesh.work_dir);
    let server_ip = server.ip;
    // From the other node, then from the server's own node (HBONE to the local 15008).
    for (from, node) in [("client", "node1"), ("neighbor", "node2")] {
        let client = mesh.pod(from);
        for url in [
            format!("http://{server_ip}:8080/hello"),
            format!("http://{VIP}/hello"),
        ] {
            let body = client.curl(&url).unwrap_or_else(|e| panic!("{from}: {e}"));
            assert_eq!(body, "hello from server\n", "{from} {url}");
        }
        let client_ip = client.ip.to_string();
        let want = pod_identity(client);
        let log = http.stderr_tail(5);
        assert!(
            log.contains(&format!("{client_ip} - - ")),
            "{from} ({node}): server saw another source: {log}"
        );
        let rec = mesh.expect_record(
            "node2",
            |r| r["src_identity"] == want.as_str() && r["mtls"] == true,
            Duration::from_secs(5),
        );
        assert_eq!(
            rec["src_addr"].as_str().unwrap().split(':').next(),
            Some(client_ip.as_str())
        );
    }
}
