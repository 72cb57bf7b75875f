//! Node-level capture end to end: nodes and pods as network namespaces (`Topology`), the
//! ztunnel binary in each node's namespace with `--capture <mode>` (local mode, one config
//! file), unmodified clients (curl) in pods that know nothing of the mesh. The server in
//! the destination pod answers with the address it saw, so a test can tell whether the
//! client's own address survived the trip.
//!
//! The mode is `ebpf` unless `MESH_CAPTURE_MODE` names another (`iptables`). Root only
//! (see `mesh_tests::netns`).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use mesh_core::tls::CertificateAuthority;
use mesh_tests::bench::process::{workspace_binary, ChildGuard, Spawn, Stdout};
use mesh_tests::netns::{
    capture_mode, pod_identity, run_isolated, wait_for_record, Netns, Node, NodeSpec, Pod, PodSpec,
    Topology,
};
use serde_json::Value;

const READY_URL: &str = "http://127.0.0.1:15021/healthz/ready";
const SERVER_PORT: u16 = 8080;

/// Answers each HTTP request with the client address it saw, then closes.
const PEER_SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
while True:
    c, (ip, _) = s.accept()
    c.recv(4096)
    c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(ip), ip.encode()))
    c.close()
"#;

/// A ztunnel process in a node's namespace; its stdout holds the access log.
struct Ztunnel {
    child: ChildGuard,
    stdout: PathBuf,
}

/// The local-mode config for every pod of `topo`, and a development CA; returns the
/// ztunnel arguments naming them.
fn write_config(topo: &Topology) -> Vec<String> {
    let mut yaml = String::from("workloads:\n");
    for pod in topo.pods() {
        let protocol = if pod.spec.ambient { "HBONE" } else { "TCP" };
        yaml.push_str(&format!(
            "  - {{name: {}, namespace: {}, serviceAccount: {}, node: {}, ips: [{}], protocol: {protocol}}}\n",
            pod.spec.name, pod.spec.namespace, pod.spec.service_account, pod.node, pod.ip
        ));
    }
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let file = |name: &str, text: &str| {
        let path = topo.work_dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    vec![
        "--config".to_owned(),
        file("mesh.yaml", &yaml),
        "--ca-cert".to_owned(),
        file("ca.pem", ca.root_pem()),
        "--ca-key".to_owned(),
        file("ca-key.pem", ca.key_pem()),
    ]
}

/// Starts the ztunnel of `node` and waits until it reports ready (capture set up).
fn start_ztunnel(topo: &Topology, node: &Node, config: &[String]) -> Ztunnel {
    let stdout = topo.work_dir.join(format!("ztunnel-{}.stdout", node.name));
    let mut args = vec!["--node".to_owned(), node.name.clone()];
    args.extend(config.iter().cloned());
    args.extend(["--capture".to_owned(), capture_mode()]);
    let mut child = node.spawn(&Spawn {
        name: format!("ztunnel {}", node.name),
        program: workspace_binary("ztunnel", "ZTUNNEL_BIN"),
        args,
        env: vec![],
        stdout: Stdout::File(stdout.clone()),
        stderr: topo.work_dir.join(format!("ztunnel-{}.stderr", node.name)),
        nofile: 4096,
    });
    let start = Instant::now();
    while !succeeds(
        node.command("curl")
            .args(["-sf", "--max-time", "1", READY_URL]),
    ) {
        assert!(
            child.exited().is_none() && start.elapsed() < Duration::from_secs(30),
            "ztunnel {} not ready: {}",
            node.name,
            child.describe(20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ztunnel { child, stdout }
}

fn start_all(topo: &Topology) -> Vec<Ztunnel> {
    let config = write_config(topo);
    (topo.nodes.iter())
        .map(|node| start_ztunnel(topo, node, &config))
        .collect()
}

/// SIGTERM, then waits for a clean exit.
fn stop(mut zt: Ztunnel) {
    let pid = zt.child.pid().to_string();
    assert!(succeeds(Command::new("kill").args(["-TERM", &pid])));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = zt.child.exited() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} did not exit after SIGTERM",
            zt.child.describe(20)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{}", zt.child.describe(20));
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn peer_server(topo: &Topology, pod: &Pod) -> ChildGuard {
    let server = pod.spawn(&Spawn {
        name: format!("peer server in {}", pod.spec.name),
        program: "python3".into(),
        args: vec![
            "-c".to_owned(),
            PEER_SERVER.to_owned(),
            pod.ip.to_string(),
            SERVER_PORT.to_string(),
        ],
        env: vec![],
        stdout: Stdout::Discard,
        stderr: topo
            .work_dir
            .join(format!("server-{}.stderr", pod.spec.name)),
        nofile: 1024,
    });
    let addr = (pod.ip, SERVER_PORT).into();
    pod.wait_tcp(addr, Duration::from_secs(10), "peer server");
    server
}

/// curl from `from` to the peer server in `to`: the address the server saw.
fn seen_by_server(from: &Netns, to: &Pod) -> String {
    from.curl(&format!("http://{}:{SERVER_PORT}/", to.ip))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The first access-log record of `zt` that `pred` accepts (waits up to 10 s: a record is
/// written when its connection closes).
fn access_log(zt: &Ztunnel, pred: impl Fn(&Value) -> bool) -> Value {
    let read = || std::fs::read_to_string(&zt.stdout).unwrap_or_default();
    wait_for_record(read, pred, Duration::from_secs(10)).unwrap_or_else(|| {
        panic!(
            "no such access-log record in {}:\n{}",
            zt.stdout.display(),
            read()
        )
    })
}

fn is(r: &Value, key: &str, want: &str) -> bool {
    r[key].as_str() == Some(want)
}

/// A plain TCP client in ambient pod `from` reaches the server in ambient pod `to` through
/// the ztunnel(s): the server sees `from`'s address, the destination's ztunnel logs an
/// mTLS inbound connection from `from`'s identity, the source's an outbound one.
fn ambient_to_ambient(topo: &Topology, zts: &[Ztunnel], from: &str, to: &str) {
    let (from, to) = (topo.pod(from), topo.pod(to));
    let _server = peer_server(topo, to);
    assert_eq!(seen_by_server(from, to), from.ip.to_string());
    let node = |pod: &Pod| topo.nodes.iter().position(|n| n.name == pod.node).unwrap();
    let dst_addr = format!("{}:{SERVER_PORT}", to.ip);
    let inbound = access_log(&zts[node(to)], |r| {
        is(r, "direction", "inbound") && is(r, "dst_addr", &dst_addr)
    });
    assert_eq!(
        inbound["src_identity"].as_str(),
        Some(&*pod_identity(from)),
        "{inbound}"
    );
    assert_eq!(inbound["mtls"], true, "{inbound}");
    assert_eq!(inbound["outcome"], "ok", "{inbound}");
    let outbound = access_log(&zts[node(from)], |r| {
        is(r, "direction", "outbound") && is(r, "dst_addr", &dst_addr)
    });
    assert_eq!(outbound["src_workload"].as_str(), Some(&*from.spec.name));
    assert_eq!(
        outbound["hbone_addr"],
        format!("{}:15008", to.ip),
        "{outbound}"
    );
}

fn topology() -> Topology {
    Topology::build(&[
        NodeSpec::new(
            "node1",
            [
                PodSpec::new("a"),
                PodSpec::new("c"),
                PodSpec::new("x").namespace("legacy").not_ambient(),
            ],
        ),
        NodeSpec::new("node2", [PodSpec::new("b")]),
    ])
}

/// Runs `ambient_to_ambient` from `from` to `to` as test `name`.
fn ambient_pair(name: &str, from: &'static str, to: &'static str) {
    run_isolated(name, || async move {
        let topo = topology();
        let zts = start_all(&topo);
        ambient_to_ambient(&topo, &zts, from, to);
        zts.into_iter().for_each(stop);
    });
}

#[test]
fn netns_capture_ambient_pods_across_nodes() {
    ambient_pair("netns_capture_ambient_pods_across_nodes", "a", "b");
}

#[test]
fn netns_capture_ambient_pods_on_one_node() {
    ambient_pair("netns_capture_ambient_pods_on_one_node", "a", "c");
}

/// A pod outside the mesh reaching an ambient pod is captured on the way in (uplink or
/// its own veth) and arrives as plaintext inbound, with its own address.
#[test]
fn netns_capture_non_ambient_client_arrives_as_plaintext() {
    run_isolated(
        "netns_capture_non_ambient_client_arrives_as_plaintext",
        || async {
            let topo = topology();
            let zts = start_all(&topo);
            let x = topo.pod("x");
            for (to, node) in [("b", 1), ("c", 0)] {
                let to = topo.pod(to);
                let _server = peer_server(&topo, to);
                assert_eq!(seen_by_server(x, to), x.ip.to_string());
                let dst_addr = format!("{}:{SERVER_PORT}", to.ip);
                let inbound = access_log(&zts[node], |r| {
                    is(r, "direction", "inbound") && is(r, "dst_addr", &dst_addr)
                });
                assert_eq!(inbound["mtls"], false, "{inbound}");
                assert_eq!(
                    inbound["src_addr"].as_str().unwrap().split(':').next(),
                    Some(&*x.ip.to_string())
                );
            }
            zts.into_iter().for_each(stop);
        },
    );
}

/// What capture adds to a node: mangle rules, policy rules, routes in tables 100/101.
fn capture_state(node: &Node) -> String {
    let out = |args: &[&str]| {
        let o = node.command(args[0]).args(&args[1..]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    [
        out(&["iptables", "-w", "-t", "mangle", "-S"]),
        out(&["ip", "rule"]),
        out(&["ip", "route", "show", "table", "100"]),
        out(&["ip", "route", "show", "table", "101"]),
    ]
    .join("")
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// Rules are in place while a ztunnel runs; after a crash (SIGKILL) the only change is
/// the iptables janitor unhooking the dead run's chain (so pods are not black-holed; eBPF
/// links go with the process), a restart removes the dead run's leftovers instead of
/// adding a second set, and SIGTERM removes everything.
#[test]
fn netns_capture_rules_are_removed_at_exit_and_after_a_crash() {
    run_isolated(
        "netns_capture_rules_are_removed_at_exit_and_after_a_crash",
        || async {
            let topo = Topology::build(&[NodeSpec::new("node1", [PodSpec::new("a")])]);
            let node = &topo.nodes[0];
            let before = capture_state(node);
            let config = write_config(&topo);
            let mut crashed = start_ztunnel(&topo, node, &config);
            let running = any_pid(&capture_state(node));
            assert_ne!(
                running,
                any_pid(&before),
                "capture changed nothing on the node"
            );
            assert_eq!(count(&running, "lookup 100"), 1, "{running}");
            let pid = crashed.child.pid().to_string();
            assert!(succeeds(Command::new("kill").args(["-KILL", &pid])));
            while crashed.child.exited().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let unhooked = without_hook(&running);
            let start = Instant::now();
            while any_pid(&capture_state(node)) != unhooked {
                let now = capture_state(node);
                assert!(
                    start.elapsed() < Duration::from_secs(3),
                    "after a crash: want only the hook gone from\n{running}\ngot\n{now}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let restarted = start_ztunnel(&topo, node, &config);
            assert_eq!(
                any_pid(&capture_state(node)),
                running,
                "restart duplicated or lost rules"
            );
            stop(restarted);
            assert_eq!(capture_state(node), before);
        },
    );
}

/// `state` with the pid in the PREROUTING hook's tag blanked, so runs compare equal.
fn any_pid(state: &str) -> String {
    (state.lines())
        .map(|l| match l.split_once("ztunnel-pid-") {
            Some((head, tail)) => {
                let rest = tail.trim_start_matches(|c: char| c.is_ascii_digit());
                format!("{head}ztunnel-pid-N{rest}\n")
            }
            None => format!("{l}\n"),
        })
        .collect()
}

/// `state` without the PREROUTING jump into the capture chain.
fn without_hook(state: &str) -> String {
    (state.lines())
        .filter(|l| !(l.starts_with("-A PREROUTING ") && l.ends_with("-j MESH_PREROUTING")))
        .map(|l| format!("{l}\n"))
        .collect()
}
