//! The waypoint in the netns mesh: a Gateway of class `istio-waypoint`, its pod running
//! the `waypoint` binary on node2, services labelled `istio.io/use-waypoint`, and curl in
//! a captured client pod on node1. Root only (see `mesh_tests::netns`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use mesh_tests::bench::process::ChildGuard;
use mesh_tests::netns::{
    is_root, pod_identity, MeshOptions, NetnsMesh, NodeSpec, PodSpec, ServiceSpec, Topology,
};

/// `echo` (through the waypoint) selects both versions; `echo-v1`/`echo-v2` one each.
const ECHO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 8, 10);
const V1_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 8, 11);
const V2_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 8, 12);
/// The same pods without a waypoint.
const PLAIN_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 8, 13);

/// The mesh and the pods' HTTP servers (stopped when dropped, before the mesh).
fn start() -> (Vec<ChildGuard>, NetnsMesh) {
    assert!(is_root(), "netns_* tests need root");
    let topo = Topology::build(&[
        NodeSpec::new("node1", [PodSpec::new("client")]),
        NodeSpec::new(
            "node2",
            [
                PodSpec::new("echo-v1")
                    .label("app", "echo")
                    .label("version", "v1"),
                PodSpec::new("echo-v2")
                    .label("app", "echo")
                    .label("version", "v2"),
                PodSpec::new("waypoint"),
            ],
        ),
    ]);
    let mut v1 = ServiceSpec::new("echo-v1", V1_VIP, "echo", 80, 8080);
    let mut v2 = ServiceSpec::new("echo-v2", V2_VIP, "echo", 80, 8080);
    v1.selector.push(("version".into(), "v1".into()));
    v2.selector.push(("version".into(), "v2".into()));
    let opts = MeshOptions {
        services: vec![
            ServiceSpec::new("echo", ECHO_VIP, "echo", 80, 8080).use_waypoint("waypoint"),
            v1.use_waypoint("waypoint"),
            v2.use_waypoint("waypoint"),
            ServiceSpec::new("plain", PLAIN_VIP, "echo", 80, 8080),
        ],
        waypoints: vec!["waypoint".to_owned()],
        ..MeshOptions::default()
    };
    let mesh = NetnsMesh::start(topo, &opts).unwrap_or_else(|e| panic!("{e:#}"));
    let servers = ["echo-v1", "echo-v2"]
        .map(|pod| mesh.pod(pod).hello_server(&mesh.work_dir))
        .into();
    (servers, mesh)
}

/// `curl` from the client pod: the body, which names the pod that answered.
fn get(mesh: &NetnsMesh, vip: Ipv4Addr, headers: &[&str]) -> Result<String, String> {
    let client = mesh.pod("client");
    let mut cmd = client.command("curl");
    cmd.args(["-sS", "--fail", "--max-time", "5"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .arg(format!("http://{vip}/hello"))
        .output()
        .map_err(|e| format!("running curl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Answers of `n` requests, counted by body.
fn tally(mesh: &NetnsMesh, vip: Ipv4Addr, headers: &[&str], n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let body = get(mesh, vip, headers).unwrap_or_else(|e| panic!("curl: {e}"));
        *seen.entry(body).or_default() += 1;
    }
    seen
}

/// Retries `check` for up to 10 s (config reaches the waypoint over xDS).
fn eventually(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let start = Instant::now();
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if start.elapsed() > Duration::from_secs(10) => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

#[test]
fn netns_waypoint_carries_labelled_service_traffic_only() {
    let (_servers, mut mesh) = start();
    let before = mesh.waypoint_requests();
    let body = get(&mesh, ECHO_VIP, &[]).unwrap_or_else(|e| panic!("{e}\n{}", mesh.describe()));
    assert!(body.starts_with("hello from echo-v"), "{body}");
    eventually("the waypoint logs the request", || {
        let log = mesh.waypoint_access_log("waypoint");
        (mesh.waypoint_requests() > before)
            .then_some(())
            .ok_or(format!("waypoint access log: {log}"))
    });
    // The endpoint's ztunnel saw the waypoint's identity, not the client's.
    let waypoint_id = pod_identity(mesh.pod("waypoint"));
    mesh.expect_record(
        "node2",
        |r| r["src_identity"].as_str() == Some(waypoint_id.as_str()),
        Duration::from_secs(5),
    );
    // A service without the label goes straight to the pods.
    let through = mesh.waypoint_requests();
    for _ in 0..5 {
        let body = get(&mesh, PLAIN_VIP, &[]).expect("plain service");
        assert!(body.starts_with("hello from echo-v"), "{body}");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        mesh.waypoint_requests(),
        through,
        "plain traffic reached the waypoint"
    );
}

const SPLIT: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo-split, namespace: default}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{headers: [{name: x-version, value: v2}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - backendRefs: [{name: echo-v1, port: 80, weight: 80}, {name: echo-v2, port: 80, weight: 20}]
";

const ALL_V2: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo-split, namespace: default}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 80}]
  rules:
  - backendRefs: [{name: echo-v2, port: 80}]
";

#[test]
fn netns_waypoint_http_route_splits_matches_and_changes_live() {
    let (_servers, mesh) = start();
    mesh.write("route-echo.yaml", SPLIT)
        .expect("writing the route");
    eventually("the header match sends every request to v2", || {
        let seen = tally(&mesh, ECHO_VIP, &["x-version: v2"], 5);
        (seen.keys().all(|b| b == "hello from echo-v2"))
            .then_some(())
            .ok_or(format!("{seen:?}"))
    });
    // 200 requests at 80/20: v1 expects 160 (sd about 5.7); 130..=190 is over 5 sd.
    let seen = tally(&mesh, ECHO_VIP, &[], 200);
    let v1 = seen.get("hello from echo-v1").copied().unwrap_or(0);
    let v2 = seen.get("hello from echo-v2").copied().unwrap_or(0);
    assert_eq!(v1 + v2, 200, "{seen:?}");
    assert!((130..=190).contains(&v1), "80/20 split gave {seen:?}");
    // A changed route applies to the next requests.
    mesh.write("route-echo.yaml", ALL_V2)
        .expect("rewriting the route");
    eventually("the new route sends everything to v2", || {
        let seen = tally(&mesh, ECHO_VIP, &[], 10);
        (seen.keys().all(|b| b == "hello from echo-v2"))
            .then_some(())
            .ok_or(format!("{seen:?}"))
    });
}
