use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use ztunnel::capture::CaptureMode;
use ztunnel::config::{Config, Ports};

/// ztunnel: the per-node L4 proxy of the ambient mesh. Config and certificates come from
/// the controller (`--xds-address`), or in local mode from a file and a development CA.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Node whose workloads this ztunnel serves.
    #[arg(long)]
    node: String,
    /// The controller's gRPC address (delta ADS and CA), e.g. http://127.0.0.1:15010.
    #[arg(long, conflicts_with_all = ["config", "ca_cert", "ca_key"])]
    xds_address: Option<String>,
    /// The mesh root certificate (PEM) to verify the controller with, for an https://
    /// address (15012).
    #[arg(long, requires = "xds_address")]
    xds_root_cert: Option<PathBuf>,
    /// File holding this ztunnel's bearer token for the controller.
    #[arg(long, requires = "xds_address")]
    token_file: Option<PathBuf>,
    /// Local mode: config file (see examples/local-mesh.yaml); edits apply live.
    #[arg(long, required_unless_present = "xds_address", requires_all = ["ca_cert", "ca_key"])]
    config: Option<PathBuf>,
    /// Local mode: development CA certificate (PEM) that signs this node's certificates.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Local mode: development CA private key (PKCS#8 PEM).
    #[arg(long)]
    ca_key: Option<PathBuf>,
    /// Address for node-level listeners (capture, plaintext inbound, SOCKS5, admin).
    #[arg(long, default_value = "127.0.0.1")]
    listen_ip: IpAddr,
    #[arg(long, default_value_t = 15008)]
    hbone_port: u16,
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    #[arg(long, default_value_t = 15006)]
    inbound_plaintext_port: u16,
    #[arg(long, default_value_t = 15080)]
    socks5_port: u16,
    #[arg(long, default_value_t = 15000)]
    admin_port: u16,
    #[arg(long, default_value_t = 15020)]
    metrics_port: u16,
    #[arg(long, default_value_t = 15021)]
    readiness_port: u16,
    /// Workload certificate lifetime in seconds (renewed at half life).
    #[arg(long, default_value_t = 86400)]
    cert_lifetime_secs: u64,
    /// SO_MARK for the ztunnel's own outgoing sockets, so capture rules can skip them
    /// (default 0x539 with --capture iptables|ebpf, none otherwise).
    #[arg(long, value_parser = parse_mark)]
    socket_mark: Option<u32>,
    /// How ambient pods' TCP reaches this ztunnel: none (SOCKS5 or someone else's rules),
    /// iptables (TPROXY rules) or ebpf. Capture modes need root in the node's network
    /// namespace and bind the capture listeners transparent on 0.0.0.0.
    #[arg(long, default_value_t = CaptureMode::None)]
    capture: CaptureMode,
    /// Data-plane worker threads (default: one per CPU).
    #[arg(long)]
    worker_threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    mesh_core::admin::init_logging();
    let args = Args::parse();
    let mut cfg = match (args.xds_address, args.config, args.ca_cert, args.ca_key) {
        (Some(address), ..) => {
            let token = (args.token_file.as_deref())
                .map(|p| {
                    mesh_core::control_plane::read_token(p)
                        .with_context(|| format!("reading {}", p.display()))
                })
                .transpose()?;
            let mut cfg = Config::with_controller(&args.node, &address, token);
            if let ztunnel::config::Source::Controller { root_cert, .. } = &mut cfg.source {
                *root_cert = args.xds_root_cert;
            }
            cfg
        }
        (None, Some(config), Some(ca_cert), Some(ca_key)) => {
            Config::new(&args.node, config, ca_cert, ca_key)
        }
        _ => anyhow::bail!("give --xds-address, or --config with --ca-cert and --ca-key"),
    };
    cfg.listen_ip = args.listen_ip;
    cfg.ports = Ports {
        hbone: args.hbone_port,
        outbound: args.outbound_port,
        inbound_plaintext: args.inbound_plaintext_port,
        socks5: args.socks5_port,
        admin: args.admin_port,
        metrics: args.metrics_port,
        readiness: args.readiness_port,
    };
    cfg.cert_lifetime = Duration::from_secs(args.cert_lifetime_secs);
    cfg.capture = args.capture;
    cfg.hbone.socket_mark = args.socket_mark;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(async {
        let app = ztunnel::app::build(cfg).await?;
        app.wait_termination().await;
        Ok(())
    })
}

/// A mark in decimal or 0x-hex.
fn parse_mark(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("{s:?} is not a mark (decimal or 0x-hex): {e}"))
}
