//! mesh-netlab: a small cluster made of Linux network namespaces, and the child processes
//! run in it. A fabric, nodes and pods as named namespaces (`/run/netns`) wired with veth
//! pairs ([`Topology`]); [`Netns`] runs commands, child processes and threads inside one;
//! [`process::ChildGuard`] kills and reaps a child when dropped.
//!
//! Shared by the network-namespace tests (`mesh-tests`) and `meshctl demo`. It wires
//! namespaces and starts processes; it must not know about the mesh (which binaries run,
//! their flags, manifests) nor judge traffic. Root only. Its helpers panic with the
//! failing command's stderr (they were made for tests; a caller that must not panic runs
//! them where an unwinding panic is caught, and the drops on the way delete what was made).

pub mod names;
pub mod ns;
pub mod process;
pub mod tools;
pub mod topology;

pub use names::{sweep_leftovers, PREFIX};
pub use ns::{Netns, NETNS_DIR};
pub use process::{ChildGuard, Spawn, Stdout};
pub use tools::wait_for_record;
pub use topology::{
    node_ip, pod_cidr, pod_ip, Fabric, Node, NodeSpec, Pod, PodSpec, Topology, FABRIC_IP,
    POD_GATEWAY,
};

use std::process::Command;

/// Runs a command and panics with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this process runs as (effective) root, which namespaces need.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}
