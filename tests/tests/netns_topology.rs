//! The network-namespace harness itself: pods reach each other within and across nodes
//! and reach the fabric with their own addresses (no NAT) through real clients, nothing is
//! left after a topology drops, and what a killed run left is swept by the next build.
//! Root only (see `mesh_tests::netns`).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use mesh_core::testing::echo_server;
use mesh_tests::harness::echo_roundtrip;
use mesh_tests::netns::{is_root, run_isolated, NodeSpec, PodSpec, Topology, NETNS_DIR};
use tokio::net::{TcpListener, TcpStream};

fn two_nodes() -> Topology {
    assert!(is_root(), "netns_* tests need root");
    Topology::build(&[
        NodeSpec::new("node1", [PodSpec::new("a"), PodSpec::new("b")]),
        NodeSpec::new("node2", [PodSpec::new("c")]),
    ])
}

/// Curl from pod `a` to an http.server in `to`; the server must log `a`'s own address.
fn curl_checks(topo: &Topology, to: &str) {
    let a = topo.pod("a");
    let to = topo.pod(to);
    let mut server = to.hello_server(&topo.work_dir);
    let body = a.curl(&format!("http://{}:8080/hello", to.ip)).unwrap();
    assert_eq!(body, format!("hello from {}\n", to.spec.name));
    let log = server.stderr_tail(5);
    assert!(
        log.contains(&format!("{} - - ", a.ip)),
        "server saw another source: {}",
        server.describe(5)
    );
}

#[test]
fn netns_topology_pod_to_pod_across_nodes_with_curl() {
    let topo = two_nodes();
    curl_checks(&topo, "c");
}

#[test]
fn netns_topology_pod_to_pod_within_a_node() {
    let topo = two_nodes();
    curl_checks(&topo, "b");
    // An in-process tokio echo server in `b`, a tokio client in `a`.
    let b = topo.pod("b");
    let rt = b.runtime(1);
    let addr = SocketAddr::new(IpAddr::V4(b.ip), 9000);
    rt.block_on(rt.spawn(echo_server(addr))).unwrap().unwrap();
    topo.pod("a").block_on(async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        echo_roundtrip(tcp, 1 << 20).await;
    });
}

/// Pods on both nodes reach a listener in the fabric namespace, seen with their own IPs.
#[test]
fn netns_topology_pods_reach_the_fabric() {
    let topo = two_nodes();
    let rt = topo.fabric.runtime(1);
    let fabric = SocketAddr::new(IpAddr::V4(topo.fabric.ip), 15010);
    let listener = rt
        .block_on(rt.spawn(TcpListener::bind(fabric)))
        .unwrap()
        .unwrap();
    for pod in ["a", "c"] {
        let pod = topo.pod(pod);
        pod.block_on(TcpStream::connect(fabric)).unwrap();
        let (_, peer) = rt.block_on(listener.accept()).unwrap();
        assert_eq!(peer.ip(), IpAddr::V4(pod.ip));
    }
    // Nodes reach it too (a ztunnel's xDS connection).
    topo.node("node2")
        .wait_tcp(fabric, Duration::from_secs(5), "fabric");
}

#[test]
fn netns_topology_works_inside_run_isolated() {
    run_isolated("netns_topology_works_inside_run_isolated", || async {
        let topo = two_nodes();
        curl_checks(&topo, "c");
    });
}

/// Namespaces, processes left running in them, links and the work directory all go.
/// Isolated, so that the links of the namespace the test runs in are its own.
#[test]
fn netns_topology_leaves_nothing_after_drop() {
    run_isolated("netns_topology_leaves_nothing_after_drop", || async {
        let links_before = links_here();
        let topo = two_nodes();
        let names = topo.netns_names();
        assert_eq!(names.len(), 6);
        let work_dir = topo.work_dir.clone();
        let mut stray = topo
            .pod("c")
            .command("sleep")
            .arg("60")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        assert!(names.iter().all(|n| Path::new(NETNS_DIR).join(n).exists()));
        assert_eq!(
            links_here(),
            links_before,
            "links made outside the topology"
        );
        drop(topo);
        for name in &names {
            assert!(!Path::new(NETNS_DIR).join(name).exists(), "{name} remains");
        }
        assert!(!work_dir.exists());
        let status = stray.wait().unwrap();
        assert!(!status.success(), "sleep should have been killed: {status}");
        assert_eq!(links_here(), links_before);
    });
}

/// A failing test unwinds through the topology's drop: its namespaces go too.
#[test]
fn netns_topology_is_removed_when_a_test_panics() {
    let mut names = Vec::new();
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = two_nodes();
        names = topo.netns_names();
        panic!("a failing assertion");
    }));
    assert!(failed.is_err());
    assert_eq!(names.len(), 6);
    for name in &names {
        assert!(!Path::new(NETNS_DIR).join(name).exists(), "{name} remains");
    }
}

/// A run killed without unwinding (abort) leaves namespaces and a process in one; the
/// next build removes both.
#[test]
fn netns_topology_sweeps_leftovers_of_a_killed_run() {
    const CRASH: &str = "MESH_NETNS_CRASH";
    if std::env::var_os(CRASH).is_some() {
        let topo = two_nodes();
        // Its output must not hold our pipe open after the abort.
        let sleep = topo
            .pod("a")
            .command("sleep")
            .arg("60")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        println!("names {}", topo.netns_names().join(" "));
        println!("sleep {}", sleep.id());
        std::process::abort();
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "netns_topology_sweeps_leftovers_of_a_killed_run",
            "--exact",
            "--nocapture",
        ])
        .env(CRASH, "1")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the crashing run exited cleanly");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key:?} in {stdout}"))
            .to_owned()
    };
    let names = field("names ");
    let sleep = field("sleep ");
    for name in names.split_whitespace() {
        assert!(Path::new(NETNS_DIR).join(name).exists(), "{name} not left");
    }
    let _topo = two_nodes();
    for name in names.split_whitespace() {
        assert!(
            !Path::new(NETNS_DIR).join(name).exists(),
            "{name} not swept"
        );
    }
    assert!(!alive(&sleep), "the leftover's process still runs");
}

/// Interfaces of the namespace this test runs in.
fn links_here() -> String {
    let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split(':').nth(1).unwrap_or_default().trim().to_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `pid` runs (a zombie waiting for its reaper counts as gone).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat.rsplit(')').next().unwrap_or_default().trim_start();
            !state.starts_with('Z')
        })
        .unwrap_or(false)
}
