//! `meshctl demo`: a two-node ambient mesh on loopback, exercised and explained.
//!
//! Starts two real ztunnel processes on the example config, runs the workloads' echo
//! servers in-process, sends allowed, denied and plaintext traffic through node1's SOCKS5
//! port, then prints what happened from the access logs and metrics. `--check` turns the
//! expected outcomes into the exit code. It must not reimplement any proxy behaviour: the
//! point is to watch the real ztunnel.

mod access_log;
mod admin;
mod check;
mod client;
mod mesh;
mod metrics;
mod report;
mod topology;
mod traffic;
mod workdir;
mod workloads;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use mesh_core::tls::CertificateAuthority;

use access_log::AccessLogs;
use check::Check;
use mesh::{Inputs, Mesh, Node, NODE1, NODE2};
use topology::Topology;
use workdir::WorkDir;
use workloads::EchoServers;

/// Embedded so the binary runs from anywhere; the ztunnels get a copy of exactly this.
const EXAMPLE_CONFIG: &str = include_str!("../../examples/local-mesh.yaml");
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// node1 runs the clients, node2 the servers.
const NODES: [Node; 2] = [NODE1, NODE2];

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Exit non-zero, naming what failed, unless every expected outcome happened.
    #[arg(long)]
    check: bool,
    /// The ztunnel binary to run [default: `ztunnel` next to meshctl].
    #[arg(long, value_name = "PATH")]
    ztunnel: Option<PathBuf>,
    /// Also print the raw access-log lines both ztunnels wrote.
    #[arg(long)]
    logs: bool,
}

/// Runs the demo; `Ok(false)` when `--check` found an expected outcome missing.
pub async fn run(args: &DemoArgs) -> Result<bool> {
    let binary = ztunnel_binary(args.ztunnel.as_deref())?;
    let topology = Topology::parse(EXAMPLE_CONFIG)?;
    let work = WorkDir::create()?;
    println!("meshctl demo: a two-node ambient mesh on loopback (examples/local-mesh.yaml)");
    println!("  ztunnel binary: {}", binary.display());
    // Dropping the demo future on Ctrl-C kills the ztunnels (kill_on_drop) and the echo
    // servers; dropping `work` afterwards removes the directory.
    let result = tokio::select! {
        r = demo(&binary, &work, &topology, args.logs) => r,
        () = interrupted() => Err(anyhow!("interrupted by Ctrl-C")),
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

fn ztunnel_binary(flag: Option<&Path>) -> Result<PathBuf> {
    let path = match flag {
        Some(path) => path.to_owned(),
        None => {
            let exe = std::env::current_exe().context("locate meshctl's own executable")?;
            let dir = exe
                .parent()
                .context("meshctl's executable has no directory")?;
            dir.join("ztunnel")
        }
    };
    if !path.is_file() {
        bail!(
            "no ztunnel binary at {}; build it with `cargo build --release -p ztunnel` \
             or pass --ztunnel PATH",
            path.display()
        );
    }
    Ok(path)
}

async fn demo(
    binary: &Path,
    work: &WorkDir,
    topo: &Topology,
    show_logs: bool,
) -> Result<Vec<Check>> {
    let inputs = write_inputs(work, topo)?;
    println!(
        "  work dir {}: a fresh root CA for trust domain {}, the config, ztunnel stderr",
        work.path().display(),
        topo.trust_domain
    );
    mesh::ensure_free(&NODES, &topo.mesh_ips())?;
    let _servers = start_servers(topo).await?;
    let logs = Arc::new(AccessLogs::new());
    let mut mesh = Mesh::start(binary, &NODES, &inputs, work.path(), &logs)?;
    for node in NODES {
        let pid = mesh.pid(node.name).map_or("?".into(), |p| p.to_string());
        let workloads = node_workloads(topo, node.name);
        println!(
            "  started ztunnel {} on {} (pid {pid}) for {workloads}",
            node.name, node.ip
        );
    }
    let result = exercise(&mut mesh, topo, &logs).await;
    if !result.as_ref().is_ok_and(|checks| all_passed(checks)) {
        print_diagnostics(&mut mesh, &logs);
        print_access_logs(&logs);
    } else if show_logs {
        print_access_logs(&logs);
    }
    mesh.stop().await;
    println!("\nStopped both ztunnels.");
    result
}

/// The destination workloads: echo servers on node2's workload IPs.
async fn start_servers(topo: &Topology) -> Result<EchoServers> {
    let servers = traffic::servers(topo, NODE2.name)?;
    let running = EchoServers::start(&servers).await?;
    let listed: Vec<String> = servers.iter().map(|(n, a)| format!("{n} {a}")).collect();
    println!(
        "  echo servers (greet with their name, then echo): {}",
        listed.join(", ")
    );
    Ok(running)
}

fn write_inputs(work: &WorkDir, topo: &Topology) -> Result<Inputs> {
    let ca = CertificateAuthority::generate(&topo.trust_domain).context("generate the demo CA")?;
    Ok(Inputs {
        ca_cert: work.write("ca.pem", ca.root_pem(), 0o644)?,
        ca_key: work.write("ca-key.pem", ca.key_pem(), 0o600)?,
        config: work.write("local-mesh.yaml", EXAMPLE_CONFIG, 0o644)?,
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

async fn exercise(mesh: &mut Mesh, topo: &Topology, logs: &AccessLogs) -> Result<Vec<Check>> {
    let took = mesh.wait_ready(READY_TIMEOUT).await?;
    println!("  both ztunnels ready after {:.1}s", took.as_secs_f64());

    let plan = traffic::plan(topo)?;
    println!(
        "\nTraffic through node1's SOCKS5 port {} (each client binds its workload IP):",
        NODE1.socks()
    );
    let conns = traffic::run(plan, NODE1.socks(), logs).await;

    println!("\nConnections, from both ztunnels' access logs joined with what the client saw:");
    print!("{}", report::connections(&conns, &topo.trust_domain));
    let notes = report::notes(&conns);
    if !notes.is_empty() {
        println!("Notes:");
        notes.iter().for_each(|n| println!("  {n}"));
    }
    let source_metrics = print_metrics().await;
    let checks = check::evaluate(&conns, &traffic::backends(topo)?, &source_metrics);
    print_checks(&checks);
    Ok(checks)
}

/// Prints the metrics summary of both nodes; returns node1's samples for the checks.
async fn print_metrics() -> Vec<metrics::Sample> {
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
    for node in NODES {
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

fn print_diagnostics(mesh: &mut Mesh, logs: &AccessLogs) {
    eprintln!("\nSomething went wrong; what the ztunnels said:");
    eprint!("{}", mesh.diagnostics(logs));
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
