//! mesh-bench: benchmarks of the mesh against direct connections on the same machine.
//! `mesh-bench l4` runs two ztunnels on loopback; `mesh-bench controlplane` the controller
//! with many delta-ADS clients; `mesh-bench netns` and `mesh-bench l7` pods in network
//! namespaces; see `mesh_tests::bench`.

use clap::{Parser, Subcommand};
use mesh_tests::bench::{controlplane, l4, l7, netns, relay};

#[derive(Debug, Parser)]
#[command(
    name = "mesh-bench",
    about = "Benchmarks of the mesh against direct TCP"
)]
struct Cli {
    #[command(subcommand)]
    command: Benchmark,
}

#[derive(Debug, Subcommand)]
enum Benchmark {
    /// TCP through two ztunnels (SOCKS5 + HBONE) against direct TCP: throughput, round-trip
    /// latency, connect latency and ztunnel memory. The last stdout line is JSON.
    L4(l4::L4Args),
    /// Pods on two nodes as network namespaces (root): iperf3 on 1 and 4 streams and 1 KiB
    /// round trips, direct and then through the mesh with capture. The last stdout line is
    /// JSON.
    Netns(netns::NetnsArgs),
    /// HTTP/1.1 (wrk) and HTTP/2 (h2load) between pods on two nodes: direct, through the
    /// ztunnels, and through the waypoint; the waypoint's CPU and memory at 1,000
    /// requests/s (root). The last stdout line is JSON.
    L7(l7::L7Args),
    /// The controller serving 10,000 pods to 100 delta-ADS clients: initial sync, pod
    /// change to every ACK, memory, full push size. The last stdout line is JSON.
    Controlplane(controlplane::ControlPlaneArgs),
    /// The controller under test in `controlplane` (its own process, for its memory).
    #[command(hide = true)]
    ControlplaneController(controlplane::ControllerArgs),
    /// One plain TCP relay (the floor `l4` compares against): LISTEN=TARGET pairs.
    #[command(hide = true)]
    Relay {
        /// Clients speak SOCKS5 first (the first relay of the chain).
        #[arg(long)]
        socks: bool,
        #[arg(required = true, value_parser = relay::parse_map)]
        maps: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bench = async {
        match cli.command {
            Benchmark::L4(args) => l4::run(args).await,
            Benchmark::Netns(args) => netns::run(args).await,
            Benchmark::L7(args) => l7::run(args).await,
            Benchmark::Controlplane(args) => controlplane::run(args).await,
            Benchmark::ControlplaneController(args) => controlplane::serve_controller(args).await,
            Benchmark::Relay { maps, socks } => relay::serve(maps, socks).await,
        }
    };
    // Returning (rather than dying on the signal) drops the benchmark, whose guards kill
    // the child proxies.
    tokio::select! {
        result = bench => result,
        signal = terminated() => anyhow::bail!("interrupted by {signal}"),
    }
}

async fn terminated() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    }
}
