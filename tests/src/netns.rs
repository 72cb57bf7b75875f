//! Tests that need real redirection (NAT rules of the kind a node installs to capture
//! traffic) run in a network namespace of their own: the test re-runs its own binary under
//! `unshare --net`, so its rules and addresses exist only there and vanish with it.
//!
//! Tests of whole nodes build a [`Topology`]: a fabric, nodes and pods as named network
//! namespaces (`/run/netns`, global whether or not the caller is isolated), wired with
//! veth pairs; [`Netns`] runs commands, child processes and threads inside one.
//!
//! Root only. These tests are named `netns_*` and fail without root; a caller without root
//! skips them by name: `cargo nextest run -E 'not test(/^netns_/)'`.

mod mesh;

pub use mesh::{
    capture_mode, pod_identity, MeshOptions, NetnsMesh, ServiceSpec, CAPTURE_MODE_ENV,
    GATEWAY_NAME_LABEL, SERVICE_CIDR, XDS_PORT,
};
// The namespaces themselves live in mesh-netlab (meshctl's demo builds the same cluster);
// re-exported so the tests name them here as before.
pub use mesh_netlab::{
    is_root, node_ip, pod_cidr, pod_ip, run, sweep_leftovers, wait_for_record, Fabric, Netns, Node,
    NodeSpec, Pod, PodSpec, Topology, FABRIC_IP, NETNS_DIR, POD_GATEWAY, PREFIX,
};
// `mesh` names the topology module by its old path.
use mesh_netlab::topology;

use std::future::Future;
use std::process::Command;

/// Set in the re-run child: the test body runs there.
const CHILD_ENV: &str = "MESH_TEST_IN_NETNS";

/// Runs `body` in a fresh network namespace with loopback up. `name` is the test's name as
/// libtest knows it (the function name for a test at the root of its file).
pub fn run_isolated<F, Fut>(name: &str, body: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    if std::env::var_os(CHILD_ENV).is_some() {
        run("ip", &["link", "set", "lo", "up"]);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(body());
        return;
    }
    assert!(
        is_root(),
        "{name} needs root: it creates a network namespace \
         (skip by name: cargo nextest run -E 'not test(/^netns_/)')"
    );
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new("unshare")
        .arg("--net")
        .arg("--")
        .arg(&exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .expect("running unshare (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    assert!(
        out.status.success(),
        "{name} failed in its network namespace"
    );
    // A name that matched nothing would "pass" with zero tests run.
    assert!(
        stdout.contains("1 passed"),
        "{name} did not run in its network namespace"
    );
}

/// Appends a rule to the nat table's OUTPUT chain (connections made in this namespace).
pub fn nat_output(rule: &str) {
    let mut args = vec!["-w", "-t", "nat", "-A", "OUTPUT"];
    args.extend(rule.split_whitespace());
    run("iptables", &args);
}
