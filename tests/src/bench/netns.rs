//! `mesh-bench netns`: a client pod on node1 and a server pod on node2 as network
//! namespaces (`crate::netns`), measured directly (no mesh running) and then through the
//! mesh (controller and ztunnels started, traffic captured on both nodes), in one run:
//! iperf3 throughput on 1 and 4 streams, and 1 KiB request/response latency on a
//! kept-open connection from an unmodified socket in the client pod.
//!
//! It reports and never judges speed: it fails only when something does not work.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use serde::Serialize;

use super::cpu_latency::{json_mode, CpuDmaLatency};
use super::l4::traffic::{request_response, Dialer, Route};
use super::process::{ChildGuard, Spawn, Stdout};
use super::report::{self, fixed, round, Table};
use super::servers::Servers;
use super::stats::LatencySummary;
use crate::netns::{MeshOptions, NetnsMesh, NodeSpec, Pod, PodSpec, Topology};

const IPERF_PORT: u16 = 5201;
const STREAMS: usize = 4;

#[derive(Debug, Clone, clap::Args)]
pub struct NetnsArgs {
    /// CI sizes: 1 s per iperf3 run, 2,000 round trips.
    #[arg(long)]
    pub quick: bool,
    /// The ztunnels' --capture mode.
    #[arg(long, default_value = "ebpf")]
    pub capture: String,
    /// Leave CPU idle states alone instead of holding /dev/cpu_dma_latency at 0.
    #[arg(long)]
    pub no_poll: bool,
    /// The ztunnels' --worker-threads (default: theirs, one per CPU).
    #[arg(long)]
    pub ztunnel_workers: Option<usize>,
}

#[derive(Debug, Clone, Copy)]
struct Figures {
    gbps_one: f64,
    gbps_many: f64,
    rr: LatencySummary,
}

#[derive(Debug, Serialize)]
struct Summary {
    mode: &'static str,
    direct_gbps: f64,
    mesh_gbps: f64,
    throughput_ratio: f64,
    direct_gbps_4: f64,
    mesh_gbps_4: f64,
    throughput_ratio_4: f64,
    rr_added_p50_us: f64,
    rr_added_p99_us: f64,
}

/// Runs both rounds and prints the table, then the JSON line last.
pub async fn run(args: NetnsArgs) -> anyhow::Result<()> {
    let (secs, rr_samples) = if args.quick { (1, 2_000) } else { (3, 20_000) };
    // Namespace work blocks (commands, threads joined): keep it off the async workers.
    tokio::task::spawn_blocking(move || measure_both(&args, secs, rr_samples))
        .await
        .context("benchmark thread")?
}

fn measure_both(args: &NetnsArgs, secs: u32, rr_samples: usize) -> anyhow::Result<()> {
    let topo = Topology::build(&[
        NodeSpec::new("node1", [PodSpec::new("client")]),
        NodeSpec::new("node2", [PodSpec::new("server")]),
    ]);
    let server = topo.pod("server");
    let _iperf = iperf_server(&topo, server)?;
    let rt = server.runtime(1);
    let servers = rt
        .block_on(rt.spawn(Servers::start(IpAddr::V4(server.ip))))
        .context("server task")?
        .context("starting the echo server")?;
    let cpu = CpuDmaLatency::unless(args.no_poll);
    let mode = cpu.mode();
    progress(format_args!("{mode}"));
    let direct = measure(&topo, "direct", secs, rr_samples, servers.echo)?;
    progress(format_args!("starting the mesh (capture {})", args.capture));
    let opts = MeshOptions {
        capture: Some(args.capture.clone()),
        log: std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
        ztunnel_args: args
            .ztunnel_workers
            .map(|n| vec!["--worker-threads".to_owned(), n.to_string()])
            .unwrap_or_default(),
        ..MeshOptions::default()
    };
    let mut mesh = NetnsMesh::start(topo, &opts)?;
    let through = match measure(&mesh, "mesh", secs, rr_samples, servers.echo) {
        Ok(figures) => figures,
        Err(e) => bail!("{e:#}\n{}", mesh.describe()),
    };
    drop(cpu);
    let captured = mesh.access_log("node2").lines().count();
    ensure!(
        captured > 0,
        "the mesh round logged no connection on node2: traffic was not captured"
    );
    print!("{}", table(&direct, &through, mode));
    report::print_json_last(&summary(&direct, &through, mode))
}

fn measure(
    topo: &Topology,
    name: &str,
    secs: u32,
    rr_samples: usize,
    echo: SocketAddr,
) -> anyhow::Result<Figures> {
    let client = topo.pod("client");
    let server = topo.pod("server");
    let gbps_one = iperf(client, server, 1, secs)?;
    progress(format_args!("{name} iperf3 1 stream: {gbps_one:.2} Gbit/s"));
    let gbps_many = iperf(client, server, STREAMS, secs)?;
    progress(format_args!(
        "{name} iperf3 {STREAMS} streams: {gbps_many:.2} Gbit/s"
    ));
    let dialer = Dialer {
        route: Route::Direct,
        src: IpAddr::V4(client.ip),
        socks: echo,
        relay_entries: [(echo, echo); 2],
    };
    let mut latencies = client
        .block_on(request_response(dialer, echo, rr_samples))
        .with_context(|| format!("{name} request/response"))?;
    let rr = latencies.summary().context("no round trips")?;
    progress(format_args!(
        "{name} 1 KiB request/response: p50 {:.1} us, p99 {:.1} us",
        rr.p50_us, rr.p99_us
    ));
    Ok(Figures {
        gbps_one,
        gbps_many,
        rr,
    })
}

fn iperf_server(topo: &Topology, server: &Pod) -> anyhow::Result<ChildGuard> {
    let ip = server.ip.to_string();
    let spec = Spawn {
        name: "iperf3 server".into(),
        program: "iperf3".into(),
        args: ["-s", "-B", &ip, "-p", &IPERF_PORT.to_string()]
            .map(String::from)
            .to_vec(),
        env: vec![],
        stdout: Stdout::Discard,
        stderr: topo.work_dir.join("iperf3-server.log"),
        nofile: 4096,
    };
    let child = server.spawn(&spec);
    let addr = SocketAddr::new(IpAddr::V4(server.ip), IPERF_PORT);
    server.wait_tcp(
        addr,
        Duration::from_secs(10),
        "iperf3 server (is iperf3 installed?)",
    );
    Ok(child)
}

/// Gbit/s the iperf3 server received from `client` over `streams` connections.
fn iperf(client: &Pod, server: &Pod, streams: usize, secs: u32) -> anyhow::Result<f64> {
    let out = client
        .command("iperf3")
        .args(["-J", "-c", &server.ip.to_string()])
        .args(["-p", &IPERF_PORT.to_string(), "-t", &secs.to_string()])
        .args(["-P", &streams.to_string()])
        .output()
        .context("running iperf3 (apt-get install iperf3)")?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    ensure!(
        out.status.success(),
        "iperf3 failed: {}",
        json["error"].as_str().unwrap_or("(no message)")
    );
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e9)
        .context("iperf3 reported no received rate")
}

/// Which latency figure a table row shows.
type Pick = fn(LatencySummary) -> f64;

fn table(direct: &Figures, mesh: &Figures, mode: &str) -> String {
    let mut t = Table::new(["metric", "direct", "mesh", "mesh/direct"]);
    let ratio = |m: f64, d: f64| format!("{:.2}x", m / d);
    t.row([
        "iperf3 1 stream Gbit/s".into(),
        fixed(Some(direct.gbps_one), 2),
        fixed(Some(mesh.gbps_one), 2),
        ratio(mesh.gbps_one, direct.gbps_one),
    ]);
    t.row([
        format!("iperf3 {STREAMS} streams Gbit/s"),
        fixed(Some(direct.gbps_many), 2),
        fixed(Some(mesh.gbps_many), 2),
        ratio(mesh.gbps_many, direct.gbps_many),
    ]);
    let rows: [(&str, Pick); 2] = [
        ("1 KiB rr p50 us", |l| l.p50_us),
        ("1 KiB rr p99 us", |l| l.p99_us),
    ];
    for (name, pick) in rows {
        t.row([
            name.into(),
            fixed(Some(pick(direct.rr)), 1),
            fixed(Some(pick(mesh.rr)), 1),
            format!("+{:.1} us", pick(mesh.rr) - pick(direct.rr)),
        ]);
    }
    format!(
        "mesh-bench netns: pods on two nodes (network namespaces); {mode}\n{}",
        t.render()
    )
}

fn summary(direct: &Figures, mesh: &Figures, mode: &str) -> Summary {
    Summary {
        mode: json_mode(mode),
        direct_gbps: round(direct.gbps_one, 2),
        mesh_gbps: round(mesh.gbps_one, 2),
        throughput_ratio: round(mesh.gbps_one / direct.gbps_one, 3),
        direct_gbps_4: round(direct.gbps_many, 2),
        mesh_gbps_4: round(mesh.gbps_many, 2),
        throughput_ratio_4: round(mesh.gbps_many / direct.gbps_many, 3),
        rr_added_p50_us: round(mesh.rr.p50_us - direct.rr.p50_us, 1),
        rr_added_p99_us: round(mesh.rr.p99_us - direct.rr.p99_us, 1),
    }
}

fn progress(message: std::fmt::Arguments<'_>) {
    eprintln!("[netns] {message}");
}
