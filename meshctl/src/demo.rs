//! `meshctl demo`: a two-node ambient mesh run by its controller, exercised and explained.
//!
//! Starts the real `controller` in local mode on the demo's Kubernetes manifests (with a
//! fresh root CA and random ztunnel tokens), then two real ztunnel processes that take
//! their config over delta ADS and their certificates from it, and sends allowed, denied
//! and plaintext traffic between the workloads' echo servers. Two ways to run it:
//! - as root (`netns`): nodes and pods are network namespaces, each ztunnel captures its
//!   pods' traffic transparently (eBPF, else iptables), unmodified clients in the pods
//!   dial pod IPs and the service VIP;
//! - anywhere (`loopback`, `--loopback`): everything on 127.0.0.0/8, clients go through
//!   node1's SOCKS5 port.
//!
//! Both then print what happened from the access logs, the metrics and the control
//! plane's own view (this module); `--check` turns the expected outcomes into the exit
//! code. It must not reimplement any proxy or controller behaviour: the point is to watch
//! the real ones.

mod access_log;
mod admin;
mod check;
mod client;
mod control_plane;
mod loopback;
mod mesh;
mod metrics;
mod netns;
mod node_state;
mod report;
mod topology;
mod traffic;
mod workdir;
mod workloads;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use access_log::AccessLogs;
use check::{Check, ControlSeen, NodeSeen};
use control_plane::ControlPlane;
use mesh::{Mesh, Node, NODE1, NODE2};
use topology::Topology;
use traffic::Connection;
use workdir::WorkDir;

/// The demo's mesh, embedded so the binary runs from anywhere; the controller gets a copy
/// of these files (with loopback addresses in the loopback demo).
const MANIFESTS: [(&str, &str); 4] = [
    (
        "namespaces.yaml",
        include_str!("../../examples/mesh/namespaces.yaml"),
    ),
    (
        "workloads.yaml",
        include_str!("../../examples/mesh/workloads.yaml"),
    ),
    (
        "services.yaml",
        include_str!("../../examples/mesh/services.yaml"),
    ),
    (
        "policies.yaml",
        include_str!("../../examples/mesh/policies.yaml"),
    ),
];
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// node1 runs the clients, node2 the servers (loopback addresses; the network-namespace
/// demo keeps the names and takes the addresses its cluster gives the nodes).
const NODES: [Node; 2] = [NODE1, NODE2];

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Exit non-zero, naming what failed, unless every expected outcome happened.
    #[arg(long)]
    check: bool,
    /// Run everything on loopback addresses, clients through a SOCKS5 port: no root
    /// needed, no transparent capture. The default when not root.
    #[arg(long)]
    loopback: bool,
    /// How the ztunnels capture their pods' traffic in the network-namespace demo: `ebpf`
    /// (falls back to `iptables`, saying so, where eBPF cannot load) or `iptables`.
    #[arg(long, value_name = "MODE", default_value = "ebpf", value_parser = ["ebpf", "iptables"])]
    capture: String,
    /// The ztunnel binary to run [default: `ztunnel` next to meshctl].
    #[arg(long, value_name = "PATH")]
    ztunnel: Option<PathBuf>,
    /// The controller binary to run [default: `controller` next to meshctl].
    #[arg(long, value_name = "PATH")]
    controller: Option<PathBuf>,
    /// Also print the raw access-log lines both ztunnels wrote.
    #[arg(long)]
    logs: bool,
}

struct Binaries {
    ztunnel: PathBuf,
    controller: PathBuf,
}

/// Runs the demo; `Ok(false)` when `--check` found an expected outcome missing.
pub async fn run(args: &DemoArgs) -> Result<bool> {
    let bins = Binaries {
        ztunnel: sibling_binary("ztunnel", "--ztunnel", args.ztunnel.as_deref())?,
        controller: sibling_binary("controller", "--controller", args.controller.as_deref())?,
    };
    let in_netns = !args.loopback && mesh_netlab::is_root();
    if !args.loopback && !in_netns {
        println!(
            "meshctl demo: not root, so no network namespaces: running the loopback demo \
             (as root, the nodes and pods are network namespaces with transparent capture)"
        );
    }
    let work = WorkDir::create()?;
    let result = if in_netns {
        netns::run(&bins, &work, &args.capture, args.logs).await
    } else {
        loopback::run(&bins, &work, args.logs).await
    };
    let dir = work.path().display().to_string();
    drop(work);
    println!("Removed {dir}.");
    let checks = result?;
    Ok(verdict(&checks, args.check))
}

async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// `flag`'s path, or the binary `name` in meshctl's own directory (as cargo builds them).
fn sibling_binary(name: &str, flag: &str, given: Option<&Path>) -> Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_owned(),
        None => {
            let exe = std::env::current_exe().context("locate meshctl's own executable")?;
            let dir = exe
                .parent()
                .context("meshctl's executable has no directory")?;
            dir.join(name)
        }
    };
    if !path.is_file() {
        bail!(
            "no {name} binary at {}; build it with `cargo build --release -p {name}` \
             or pass {flag} PATH",
            path.display()
        );
    }
    Ok(path)
}

/// Starts the controller on `ip` (in the calling thread's network namespace) and waits
/// until it serves.
async fn start_control_plane(
    binary: &Path,
    inputs: &control_plane::Inputs,
    work: &Path,
    ip: std::net::IpAddr,
) -> Result<ControlPlane> {
    let mut cp = ControlPlane::spawn(binary, inputs, work, ip)?;
    let pid = cp.pid().map_or("?".into(), |p| p.to_string());
    match cp.wait_serving(READY_TIMEOUT).await {
        Ok(took) => println!(
            "  started the controller (pid {pid}): xDS and CA on {} (TLS {}), metrics on {}, \
             serving after {:.1}s",
            control_plane::grpc_addr(ip),
            control_plane::grpc_tls_addr(ip),
            control_plane::metrics_addr(ip),
            took.as_secs_f64()
        ),
        Err(e) => {
            print_controller_diagnostics(&mut cp);
            return Err(e);
        }
    }
    Ok(cp)
}

/// The manifests (in `mesh/`, each passed through `rewrite`), the tokens, and where the
/// controller keeps its CA.
fn write_inputs(
    work: &WorkDir,
    rewrite: impl Fn(&str) -> Result<String>,
) -> Result<control_plane::Inputs> {
    let config_dir = work.mkdir("mesh")?;
    for (name, text) in MANIFESTS {
        let text = rewrite(text).with_context(|| format!("rewrite {name}"))?;
        work.write(&format!("mesh/{name}"), &text, 0o644)?;
    }
    let (tokens, node_tokens) = control_plane::write_tokens(work, &NODES)?;
    Ok(control_plane::Inputs {
        config_dir,
        state_dir: work.path().join("state"),
        tokens,
        node_tokens,
    })
}

fn node_workloads(topo: &Topology, node: &str) -> String {
    let describe = |w: &topology::Workload| match w.ip() {
        Ok(ip) => format!("{} {ip}", w.name),
        Err(_) => w.name.clone(),
    };
    let names: Vec<String> = topo.on_node(node).map(describe).collect();
    names.join(", ")
}

/// Everything after the traffic, the same for both ways of running: the connection
/// table, notes, metrics, the control plane's view and the expected outcomes. Reads the
/// nodes' and the controller's ports from the calling thread's network namespace.
async fn report(
    conns: &[Connection],
    nodes: &[Node],
    cp: &ControlPlane,
    topo: &Topology,
) -> Vec<Check> {
    println!("\nConnections, from both ztunnels' access logs joined with what the client saw:");
    print!("{}", report::connections(conns, &topo.trust_domain));
    let notes = report::notes(conns);
    if !notes.is_empty() {
        println!("Notes:");
        notes.iter().for_each(|n| println!("  {n}"));
    }
    let source_metrics = print_metrics(nodes).await;
    let control = print_control_plane(cp, topo, nodes).await;
    let backends = traffic::backends(topo).unwrap_or_default();
    let checks = check::evaluate(conns, &backends, &source_metrics, &control);
    print_checks(&checks);
    checks
}

/// Prints the metrics summary of both nodes; returns node1's samples for the checks.
async fn print_metrics(nodes: &[Node]) -> Vec<metrics::Sample> {
    println!("\nMetrics (istio_tcp_*, from each ztunnel's /metrics on port 15020):");
    let header = [
        "NODE",
        "REPORTER",
        "SOURCE",
        "DESTINATION",
        "SECURITY",
        "OPENED",
    ];
    let header2 = ["CLOSED", "SENT", "RECEIVED"];
    let mut rows = vec![header
        .iter()
        .chain(&header2)
        .map(|s| s.to_string())
        .collect()];
    let mut source = Vec::new();
    for node in nodes {
        match metrics::scrape(node.metrics()).await {
            Ok(samples) => {
                for cells in metrics::summary(&samples) {
                    rows.push(std::iter::once(node.name.into()).chain(cells).collect());
                }
                if node.name == NODE1.name {
                    source = samples;
                }
            }
            Err(e) => println!("  {}: could not read metrics: {e:#}", node.name),
        }
    }
    print!("{}", report::table(rows));
    source
}

/// Prints what each ztunnel got from the controller and the controller's own counters;
/// returns them for the checks.
async fn print_control_plane(cp: &ControlPlane, topo: &Topology, of: &[Node]) -> ControlSeen {
    let mut nodes = Vec::new();
    for node in of {
        nodes.push(NodeSeen {
            name: node.name,
            state: node_state::read(node.admin()).await,
            identities: topo.identities_on(node.name),
        });
    }
    let states: Vec<(&str, &node_state::NodeState)> =
        nodes.iter().map(|n| (n.name, &n.state)).collect();
    println!("\nControl plane, as each ztunnel reports it (admin /config_dump on port 15000):");
    print!("{}", report::xds_status(&states));
    println!("Certificates the ztunnels hold, issued by the controller's CA:");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    print!("{}", report::certificates(&states, &topo.trust_domain, now));
    let addr = control_plane::metrics_addr(cp.ip);
    let controller = match cp.metrics().await {
        Ok(samples) => samples,
        Err(e) => {
            println!("  could not read the controller's metrics: {e:#}");
            Vec::new()
        }
    };
    println!("The controller's metrics (http://{addr}/metrics):");
    for line in report::metric_lines(&controller, &control_plane::SHOWN) {
        println!("  {line}");
    }
    ControlSeen {
        nodes,
        addresses: topo.address_count(),
        controller,
    }
}

fn print_checks(checks: &[Check]) {
    println!("\nExpected outcomes:");
    for c in checks {
        let mark = if c.passed { "ok  " } else { "FAIL" };
        println!("  {mark}  {}: {}", c.name, c.detail);
    }
}

fn all_passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.passed)
}

/// After the run: what went wrong if anything did (or the raw logs if asked), then stops
/// the ztunnels and the controller.
async fn finish(
    result: &Result<Vec<Check>>,
    mut mesh: Mesh,
    mut cp: ControlPlane,
    logs: &AccessLogs,
    show_logs: bool,
) {
    if !result.as_ref().is_ok_and(|checks| all_passed(checks)) {
        print_diagnostics(&mut mesh, logs);
        print_controller_diagnostics(&mut cp);
        print_access_logs(logs);
    } else if show_logs {
        print_access_logs(logs);
    }
    mesh.stop().await;
    cp.stop().await;
    println!("\nStopped both ztunnels and the controller.");
}

fn print_diagnostics(mesh: &mut Mesh, logs: &AccessLogs) {
    eprintln!("\nSomething went wrong; what the ztunnels said:");
    eprint!("{}", mesh.diagnostics(logs));
}

fn print_controller_diagnostics(cp: &mut ControlPlane) {
    let mut out = String::new();
    cp.describe(&mut out);
    eprint!("{out}");
}

fn print_access_logs(logs: &AccessLogs) {
    let entries = logs.entries();
    eprintln!("\nAccess log lines ({}):", entries.len());
    for e in entries {
        eprintln!("  {}| {}", e.node, e.raw());
    }
}

/// Whether the run counts as a success; with `--check`, failed outcomes are named on stderr.
fn verdict(checks: &[Check], strict: bool) -> bool {
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.name)
        .collect();
    if !strict || failed.is_empty() {
        return true;
    }
    eprintln!(
        "meshctl demo --check: {} of {} expected outcomes did not happen: {}",
        failed.len(),
        checks.len(),
        failed.join("; ")
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest added to examples/mesh but not embedded would be silently left out.
    #[test]
    fn embeds_every_manifest_of_examples_mesh() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh");
        let mut on_disk: Vec<(String, String)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read_to_string(&p).unwrap())
            })
            .collect();
        on_disk.sort();
        let mut embedded: Vec<(String, String)> = MANIFESTS
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        embedded.sort();
        assert_eq!(embedded, on_disk);
    }
}
