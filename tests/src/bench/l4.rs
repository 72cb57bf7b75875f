//! `mesh-bench l4`: plain TCP between two workloads, straight and through two ztunnels
//! (SOCKS5 in on node1, HBONE between the nodes, TCP out on node2), measured in the same
//! run so that every mesh figure is read against direct TCP on the same machine.
//!
//! Measures throughput on one and on N connections, 1 KiB round trips on a kept-open
//! connection and on a fresh connection each, and the ztunnels' resident memory idle and
//! holding many tunnels. It reports and never judges speed: it fails only when something
//! does not work.

mod output;
pub(crate) mod traffic;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _};

use super::cpu_latency::CpuDmaLatency;
use super::relay::RelayChain;
use super::report;
use super::rss::{kib_to_mib, vm_rss_kib};
use super::servers::Servers;
use super::stats::{Latencies, LatencySummary};
use super::{default_ztunnel_path, LoopbackMesh, MeshSpec};
use output::{render_table, Summary};
use traffic::{
    connect_request_response, open_held, ping_all, request_response, throughput, Dialer, Route,
};

/// Extra time any step may take beyond its nominal length before it counts as stuck.
const STEP_SLACK: Duration = Duration::from_secs(60);
/// Open-file limit of each relay process.
const RELAY_NOFILE: u64 = 4096;

#[derive(Debug, Clone, clap::Args)]
pub struct L4Args {
    /// CI sizes: about 1 s per throughput test, 2,000 round trips, 500 connects.
    #[arg(long)]
    pub quick: bool,
    /// Seconds per throughput test [default: 3, or 1 with --quick].
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Connections in the multi-connection throughput test.
    #[arg(long, default_value_t = 8)]
    pub streams: usize,
    /// Round trips on one kept-open connection [default: 20000, or 2000 with --quick].
    #[arg(long, value_name = "N")]
    pub rr_samples: Option<usize>,
    /// Connect + round trip + close samples [default: 5000, or 500 with --quick].
    #[arg(long, value_name = "N")]
    pub crr_samples: Option<usize>,
    /// Tunnelled connections held open while reading the ztunnels' memory.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub hold_conns: usize,
    /// The ztunnel binary [default: built with cargo when run by `cargo run`, else
    /// next to this binary or $ZTUNNEL_BIN].
    #[arg(long, value_name = "PATH")]
    pub ztunnel: Option<PathBuf>,
    /// Do not run `cargo build --release -p ztunnel` first.
    #[arg(long)]
    pub no_build: bool,
    /// Leave CPU idle states alone instead of holding /dev/cpu_dma_latency at 0.
    #[arg(long)]
    pub no_poll: bool,
}

/// Sizes of one run, from the flags.
#[derive(Debug, Clone)]
struct Plan {
    duration: Duration,
    streams: usize,
    rr_samples: usize,
    crr_samples: usize,
    hold_conns: usize,
}

impl Plan {
    fn from_args(args: &L4Args) -> anyhow::Result<Self> {
        let (secs, rr, crr) = if args.quick {
            (1.0, 2_000, 500)
        } else {
            (3.0, 20_000, 5_000)
        };
        let secs = args.duration.unwrap_or(secs);
        ensure!(
            secs.is_finite() && secs > 0.0,
            "--duration must be a positive number of seconds"
        );
        let plan = Self {
            duration: Duration::from_secs_f64(secs),
            streams: args.streams,
            rr_samples: args.rr_samples.unwrap_or(rr),
            crr_samples: args.crr_samples.unwrap_or(crr),
            hold_conns: args.hold_conns,
        };
        ensure!(
            plan.streams > 0 && plan.rr_samples > 0 && plan.crr_samples > 0,
            "--streams, --rr-samples and --crr-samples must be at least 1"
        );
        Ok(plan)
    }
}

/// Runs the whole benchmark and prints the table, then the JSON line last.
pub async fn run(args: L4Args) -> anyhow::Result<()> {
    let plan = Plan::from_args(&args)?;
    check_fd_limit(plan.hold_conns)?;
    let mut spec = MeshSpec::new(ztunnel_binary(&args)?);
    // Per-connection info logs would cost the ztunnels time the benchmark then charges
    // to the mesh; RUST_LOG still wins when set.
    spec.log = Some(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()));
    let servers = Servers::start(spec.server_ip.into())
        .await
        .context("starting the benchmark servers")?;
    progress(format_args!(
        "starting ztunnels ({})",
        spec.ztunnel.display()
    ));
    let mut mesh = LoopbackMesh::start(spec).await?;

    let cpu = CpuDmaLatency::unless(args.no_poll);
    let mode = cpu.mode();
    progress(format_args!("{mode}"));
    let measured = measure(&plan, &mesh, &servers).await;
    drop(cpu);
    let results = match measured {
        Ok(results) => results,
        Err(e) => bail!("{e:#}\nztunnels:\n{}", mesh.diagnostics()),
    };
    mesh.check_running()?;
    drop(mesh);

    print!("{}", render_table(&plan, &results, mode));
    report::print_json_last(&Summary::new(&results, mode))
}

#[derive(Debug, Clone, Copy)]
struct RouteResults {
    gbps_one: f64,
    gbps_many: f64,
    rr: LatencySummary,
    crr: LatencySummary,
}

#[derive(Debug, Clone, Copy)]
struct Results {
    direct: RouteResults,
    relays: RouteResults,
    mesh: RouteResults,
    rss_idle_kib: u64,
    rss_held_kib: u64,
}

async fn measure(plan: &Plan, mesh: &LoopbackMesh, servers: &Servers) -> anyhow::Result<Results> {
    let src = IpAddr::from(mesh.spec().client_ip);
    let socks = mesh.socks_addr_for(src);
    let exe = std::env::current_exe().context("the mesh-bench binary's path")?;
    let mut chain = RelayChain::start(&exe, &[servers.sink, servers.echo], RELAY_NOFILE).await?;
    let entry = |server| {
        chain
            .entry_for(server)
            .map(|entry| (server, entry))
            .ok_or_else(|| anyhow!("no relay for {server}"))
    };
    let relay_entries = [entry(servers.sink)?, entry(servers.echo)?];
    let dialer = |route| Dialer {
        route,
        src,
        socks,
        relay_entries,
    };
    let rss_idle_kib = idle_rss(mesh, dialer(Route::Mesh), servers.echo).await?;
    let direct = measure_route(plan, dialer(Route::Direct), servers).await?;
    let relays = measure_route(plan, dialer(Route::Relays), servers)
        .await
        .map_err(|e| anyhow!("{e:#}\nrelays:\n{}", chain.diagnostics()))?;
    drop(chain);
    let mesh_results = measure_route(plan, dialer(Route::Mesh), servers).await?;
    let rss_held_kib = held_rss(plan, mesh, dialer(Route::Mesh), servers.echo).await?;
    Ok(Results {
        direct,
        relays,
        mesh: mesh_results,
        rss_idle_kib,
        rss_held_kib,
    })
}

async fn measure_route(
    plan: &Plan,
    dialer: Dialer,
    servers: &Servers,
) -> anyhow::Result<RouteResults> {
    let name = dialer.route.name();
    let limit = plan.duration + STEP_SLACK;
    let gbps_one = step(
        &format!("{name} throughput, 1 connection"),
        limit,
        throughput(dialer, servers.sink, 1, plan.duration),
    )
    .await?;
    progress(format_args!(
        "{name} 1-connection throughput: {gbps_one:.2} Gbit/s"
    ));
    let gbps_many = step(
        &format!("{name} throughput, {} connections", plan.streams),
        limit,
        throughput(dialer, servers.sink, plan.streams, plan.duration),
    )
    .await?;
    progress(format_args!(
        "{name} {}-connection throughput: {gbps_many:.2} Gbit/s",
        plan.streams
    ));
    let rr = latency_step(
        &format!("{name} request/response"),
        plan.rr_samples,
        request_response(dialer, servers.echo, plan.rr_samples),
    )
    .await?;
    let crr = latency_step(
        &format!("{name} connect+request/response+close"),
        plan.crr_samples,
        connect_request_response(dialer, servers.echo, plan.crr_samples),
    )
    .await?;
    Ok(RouteResults {
        gbps_one,
        gbps_many,
        rr,
        crr,
    })
}

/// Runs a latency test with a time limit proportional to its size and summarises it.
async fn latency_step(
    what: &str,
    samples: usize,
    test: impl std::future::Future<Output = anyhow::Result<Latencies>>,
) -> anyhow::Result<LatencySummary> {
    let limit = STEP_SLACK + Duration::from_millis(5) * samples as u32;
    let mut latencies = step(what, limit, test).await?;
    let summary = latencies
        .summary()
        .ok_or_else(|| anyhow!("{what}: no samples"))?;
    progress(format_args!(
        "{what}: p50 {:.1} us, p99 {:.1} us ({} samples)",
        summary.p50_us, summary.p99_us, summary.samples
    ));
    Ok(summary)
}

/// `test`, failing with the step's name when it errs or outlives `limit`.
async fn step<T>(
    what: &str,
    limit: Duration,
    test: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, test).await {
        Ok(result) => result.with_context(|| what.to_owned()),
        Err(_) => bail!("{what}: did not finish within {limit:?}"),
    }
}

/// Resident memory of the larger ztunnel once a few connections have come and gone.
async fn idle_rss(mesh: &LoopbackMesh, dialer: Dialer, echo: SocketAddr) -> anyhow::Result<u64> {
    step(
        "warm-up connections through the mesh",
        STEP_SLACK,
        connect_request_response(dialer, echo, 5),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kib = max_rss_kib(mesh)?;
    progress(format_args!("ztunnel RSS idle: {:.1} MiB", kib_to_mib(kib)));
    Ok(kib)
}

/// Resident memory of the larger ztunnel while `plan.hold_conns` tunnels stay open, each
/// having carried a few bytes; every tunnel must still work after the reading.
async fn held_rss(
    plan: &Plan,
    mesh: &LoopbackMesh,
    dialer: Dialer,
    echo: SocketAddr,
) -> anyhow::Result<u64> {
    let n = plan.hold_conns;
    let limit = STEP_SLACK + Duration::from_millis(20) * n as u32;
    let what = format!("opening {n} tunnelled connections");
    let mut conns = step(&what, limit, open_held(dialer, echo, n)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kib = max_rss_kib(mesh)?;
    progress(format_args!(
        "ztunnel RSS with {n} open connections: {:.1} MiB",
        kib_to_mib(kib)
    ));
    let what = format!("using the {n} held connections again");
    step(&what, limit, ping_all(&mut conns)).await?;
    Ok(kib)
}

fn max_rss_kib(mesh: &LoopbackMesh) -> anyhow::Result<u64> {
    let mut max = 0;
    for pid in mesh.pids() {
        max = max.max(vm_rss_kib(pid).with_context(|| format!("reading RSS of pid {pid}"))?);
    }
    Ok(max)
}

/// The bench process holds both ends of every held connection.
fn check_fd_limit(hold_conns: usize) -> anyhow::Result<()> {
    let needed = 2 * hold_conns as u64 + 256;
    let limits =
        std::fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    let soft = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse::<u64>().ok());
    match soft {
        Some(soft) if soft < needed => bail!(
            "holding {hold_conns} connections needs about {needed} open files, the limit is \
             {soft}: raise it with `ulimit -n {needed}` or lower --hold-conns"
        ),
        _ => Ok(()),
    }
}

/// The ztunnel to run: `--ztunnel`, else the one next to us after building it when
/// started by `cargo run` (so the benchmark never runs a stale binary).
fn ztunnel_binary(args: &L4Args) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.ztunnel {
        return Ok(path.clone());
    }
    if let (false, Some(cargo)) = (args.no_build, std::env::var_os("CARGO")) {
        progress(format_args!(
            "building ztunnel (cargo build --release -p ztunnel)"
        ));
        let workspace = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let mut build = Command::new(cargo);
        build
            .args([
                "build",
                "--release",
                "--quiet",
                "-p",
                "ztunnel",
                "--bin",
                "ztunnel",
            ])
            .current_dir(workspace);
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(set_by_cargo_run) {
                build.env_remove(key);
            }
        }
        let status = build.status().context("running cargo build")?;
        ensure!(
            status.success(),
            "cargo build --release -p ztunnel failed ({status})"
        );
    }
    Ok(default_ztunnel_path())
}

/// Variables `cargo run` sets for the program it runs. Build scripts (ring's, for one)
/// rerun when these change, so passing them on to a nested cargo would rebuild those
/// crates now and again on the next ordinary build.
fn set_by_cargo_run(key: &str) -> bool {
    key.starts_with("CARGO_PKG_")
        || matches!(
            key,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "OUT_DIR"
        )
}

fn progress(message: std::fmt::Arguments<'_>) {
    eprintln!("[l4] {message}");
}
