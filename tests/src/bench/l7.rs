//! `mesh-bench l7`: HTTP between a client pod on node1 and a server pod on node2 (network
//! namespaces), in one run: direct (no mesh running), through the ztunnels only (a Service
//! VIP without a waypoint) and through the waypoint (a Service labelled
//! `istio.io/use-waypoint`). Load comes from unmodified tools in the client pod: `wrk`
//! (HTTP/1.1) and `h2load` (HTTP/2 cleartext) at fixed concurrency, 1 KiB responses.
//! Then `h2load --h1` at a fixed 1,000 requests/s through the waypoint, while the
//! waypoint's CPU time and resident memory are read from /proc.
//!
//! It reports and never judges speed: it fails only when something does not work.

mod load;
mod server;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{ensure, Context as _};
use serde::Serialize;

use super::cpu_latency::{json_mode, CpuDmaLatency};
use super::report::{self, fixed, round, Table};
use super::rss::{cpu_seconds, kib_to_mib, vm_rss_kib};
use crate::netns::{MeshOptions, NetnsMesh, NodeSpec, PodSpec, ServiceSpec, Topology};
use load::{h2load, h2load_fixed_rate, wrk, LoadFigures};
use server::HttpServer;

const SERVER_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;
/// A Service whose traffic the ztunnels carry straight to the pod.
const L4_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 10);
/// The same pods behind a Service that uses the waypoint.
const WAYPOINT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 11);
/// Total rate and clients of the fixed-rate round (Istio's waypoint sizing is quoted per
/// 1,000 requests per second).
const FIXED_RPS: usize = 1000;
const FIXED_CLIENTS: usize = 10;

#[derive(Debug, Clone, clap::Args)]
pub struct L7Args {
    /// CI sizes: 1 s per load run, 2 s at the fixed rate.
    #[arg(long)]
    pub quick: bool,
    /// Concurrent connections of wrk and of h2load (one stream each).
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// The ztunnels' --capture mode.
    #[arg(long, default_value = "ebpf")]
    pub capture: String,
    /// Leave CPU idle states alone instead of holding /dev/cpu_dma_latency at 0.
    #[arg(long)]
    pub no_poll: bool,
}

/// One path's figures: HTTP/1.1 (wrk) and HTTP/2 (h2load).
#[derive(Debug, Clone, Copy)]
struct Round {
    h1: LoadFigures,
    h2: LoadFigures,
}

/// The waypoint's cost at the fixed rate.
#[derive(Debug, Clone, Copy)]
struct Cost {
    rps: f64,
    cpu_ms_per_1k_req: f64,
    rss_mib: f64,
}

#[derive(Debug, Serialize)]
struct Summary {
    mode: &'static str,
    direct_rps: f64,
    l4_rps: f64,
    waypoint_rps: f64,
    direct_h2_rps: f64,
    l4_h2_rps: f64,
    waypoint_h2_rps: f64,
    waypoint_added_p50_us: f64,
    waypoint_added_p99_us: f64,
    waypoint_fixed_rps: f64,
    waypoint_cpu_ms_per_1k_req: f64,
    waypoint_rss_mib: f64,
}

pub async fn run(args: L7Args) -> anyhow::Result<()> {
    // Namespace work blocks (commands, threads joined): keep it off the async workers.
    tokio::task::spawn_blocking(move || measure_all(&args))
        .await
        .context("benchmark thread")?
}

fn measure_all(args: &L7Args) -> anyhow::Result<()> {
    let secs = if args.quick { 1 } else { 5 };
    let topo = Topology::build(&[
        NodeSpec::new("node1", [PodSpec::new("client")]),
        NodeSpec::new("node2", [PodSpec::new("server"), PodSpec::new("waypoint")]),
    ]);
    let server = topo.pod("server");
    let rt = server.runtime(1);
    // Spawned, not run by block_on: the runtime's workers are the threads in the pod.
    let addr = SocketAddr::new(IpAddr::V4(server.ip), SERVER_PORT);
    let http = rt
        .block_on(rt.spawn(HttpServer::start(addr)))
        .context("server task")?
        .context("starting the HTTP server")?;
    let cpu = CpuDmaLatency::unless(args.no_poll);
    let mode = cpu.mode();
    progress(format_args!("{mode}"));
    let direct = measure(&topo, "direct", http.addr, args, secs)?;
    progress(format_args!("starting the mesh (capture {})", args.capture));
    let opts = MeshOptions {
        capture: Some(args.capture.clone()),
        log: std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
        services: vec![
            ServiceSpec::new("echo-l4", L4_VIP, "server", SERVICE_PORT, SERVER_PORT),
            ServiceSpec::new("echo-wp", WAYPOINT_VIP, "server", SERVICE_PORT, SERVER_PORT)
                .use_waypoint("waypoint"),
        ],
        waypoints: vec!["waypoint".to_owned()],
        ..MeshOptions::default()
    };
    let mut mesh = NetnsMesh::start(topo, &opts)?;
    let rounds = (|| {
        let l4 = measure(&mesh, "l4", vip(L4_VIP), args, secs)?;
        let wp = measure(&mesh, "waypoint", vip(WAYPOINT_VIP), args, secs)?;
        let cost = fixed_rate(&mut mesh, if args.quick { 2 } else { 10 })?;
        anyhow::Ok((l4, wp, cost))
    })();
    let (l4, wp, cost) = match rounds {
        Ok(r) => r,
        Err(e) => anyhow::bail!("{e:#}\n{}", mesh.describe()),
    };
    drop(cpu);
    drop(http);
    ensure!(
        mesh.waypoint_requests() > 0,
        "the waypoint round logged no request at the waypoint: traffic bypassed it"
    );
    print!("{}", table(&direct, &l4, &wp, &cost, mode));
    report::print_json_last(&summary(&direct, &l4, &wp, &cost, mode))
}

fn vip(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), SERVICE_PORT)
}

fn measure(
    topo: &Topology,
    name: &str,
    target: SocketAddr,
    args: &L7Args,
    secs: u32,
) -> anyhow::Result<Round> {
    let client = topo.pod("client");
    let url = format!("http://{target}/");
    let h1 = wrk(client.command("wrk"), &url, args.connections, secs)
        .with_context(|| format!("{name} wrk"))?;
    progress(format_args!(
        "{name} HTTP/1.1: {:.0} req/s, p50 {:.0} us, p99 {:.0} us",
        h1.rps, h1.latency.p50_us, h1.latency.p99_us
    ));
    let log = topo.work_dir.join(format!("h2load-{name}.log"));
    let h2 = h2load(
        client.command("h2load"),
        &url,
        args.connections,
        1,
        secs,
        &log,
    )
    .with_context(|| format!("{name} h2load"))?;
    progress(format_args!(
        "{name} HTTP/2: {:.0} req/s, p50 {:.0} us, p99 {:.0} us",
        h2.rps, h2.latency.p50_us, h2.latency.p99_us
    ));
    Ok(Round { h1, h2 })
}

/// HTTP/1.1 at `FIXED_RPS` through the waypoint for `secs`: its CPU per 1,000 requests
/// and its resident memory at the end.
fn fixed_rate(mesh: &mut NetnsMesh, secs: u32) -> anyhow::Result<Cost> {
    let pid = mesh.waypoint_pid().context("the waypoint is not running")?;
    let client = mesh.pod("client");
    let url = format!("http://{}/", vip(WAYPOINT_VIP));
    let log = mesh.work_dir.join("h2load-fixed.log");
    let before = cpu_seconds(pid).context("waypoint CPU time")?;
    let run = h2load_fixed_rate(
        client.command("h2load"),
        &url,
        FIXED_CLIENTS,
        FIXED_RPS / FIXED_CLIENTS,
        secs,
        &log,
    )?;
    let cpu = cpu_seconds(pid).context("waypoint CPU time")? - before;
    let rss = kib_to_mib(vm_rss_kib(pid).context("waypoint memory")?);
    let cost = Cost {
        rps: run.rps,
        cpu_ms_per_1k_req: cpu * 1e3 / (run.requests as f64 / 1e3),
        rss_mib: rss,
    };
    progress(format_args!(
        "waypoint at {:.0} req/s: {:.1} CPU ms per 1,000 requests, {:.1} MiB resident",
        cost.rps, cost.cpu_ms_per_1k_req, cost.rss_mib
    ));
    Ok(cost)
}

/// Which figure of a round a table row shows.
type Pick = fn(&Round) -> f64;

fn table(direct: &Round, l4: &Round, wp: &Round, cost: &Cost, mode: &str) -> String {
    let mut t = Table::new([
        "metric",
        "direct",
        "ztunnel",
        "waypoint",
        "waypoint-ztunnel",
    ]);
    let rows: [(&str, Pick); 6] = [
        ("HTTP/1.1 req/s", |r| r.h1.rps),
        ("HTTP/1.1 p50 us", |r| r.h1.latency.p50_us),
        ("HTTP/1.1 p99 us", |r| r.h1.latency.p99_us),
        ("HTTP/2 req/s", |r| r.h2.rps),
        ("HTTP/2 p50 us", |r| r.h2.latency.p50_us),
        ("HTTP/2 p99 us", |r| r.h2.latency.p99_us),
    ];
    for (name, pick) in rows {
        let [d, z, w] = [direct, l4, wp].map(pick);
        t.row([
            name.into(),
            fixed(Some(d), 0),
            fixed(Some(z), 0),
            fixed(Some(w), 0),
            format!("{:+.0}", w - z),
        ]);
    }
    format!(
        "mesh-bench l7: client pod on node1, server pod on node2, 1 KiB responses; {mode}\n{}\
         waypoint at {:.0} req/s (HTTP/1.1): {:.1} CPU ms per 1,000 requests, {:.1} MiB resident\n",
        t.render(),
        cost.rps,
        cost.cpu_ms_per_1k_req,
        cost.rss_mib
    )
}

fn summary(direct: &Round, l4: &Round, wp: &Round, cost: &Cost, mode: &str) -> Summary {
    Summary {
        mode: json_mode(mode),
        direct_rps: round(direct.h1.rps, 0),
        l4_rps: round(l4.h1.rps, 0),
        waypoint_rps: round(wp.h1.rps, 0),
        direct_h2_rps: round(direct.h2.rps, 0),
        l4_h2_rps: round(l4.h2.rps, 0),
        waypoint_h2_rps: round(wp.h2.rps, 0),
        waypoint_added_p50_us: round(wp.h1.latency.p50_us - l4.h1.latency.p50_us, 0),
        waypoint_added_p99_us: round(wp.h1.latency.p99_us - l4.h1.latency.p99_us, 0),
        waypoint_fixed_rps: round(cost.rps, 0),
        waypoint_cpu_ms_per_1k_req: round(cost.cpu_ms_per_1k_req, 1),
        waypoint_rss_mib: round(cost.rss_mib, 1),
    }
}

fn progress(message: std::fmt::Arguments<'_>) {
    eprintln!("[l7] {message}");
}
