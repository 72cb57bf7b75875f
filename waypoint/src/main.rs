use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use waypoint::app::{CaSource, Ports, Settings};

/// waypoint: the L7 proxy of the ambient mesh for the services that name it. Config and
/// its certificate come from the controller (`--xds-address`); a development CA
/// (`--ca-cert`, `--ca-key`) can sign the certificate instead.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// This waypoint, as `<namespace>/<gateway name>` (the name L7 config uses).
    #[arg(long)]
    name: String,
    /// Service account the waypoint runs as (default: the gateway's name, as the
    /// controller creates it).
    #[arg(long)]
    service_account: Option<String>,
    #[arg(long, default_value = mesh_core::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// The controller's gRPC address (delta ADS and CA), e.g. http://127.0.0.1:15010.
    #[arg(long)]
    xds_address: String,
    /// The mesh root certificate (PEM) to verify the controller with (https:// address).
    #[arg(long)]
    xds_root_cert: Option<PathBuf>,
    /// File holding the waypoint's bearer token for the controller.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Development CA certificate (PEM) that signs the waypoint's certificate instead of
    /// the controller's CA.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// Development CA private key (PKCS#8 PEM).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Address of the HBONE, metrics and readiness listeners.
    #[arg(long, default_value = "0.0.0.0")]
    listen_ip: IpAddr,
    /// Address of the admin listener (/config_dump).
    #[arg(long, default_value = "127.0.0.1")]
    admin_ip: IpAddr,
    #[arg(long, default_value_t = 15008)]
    hbone_port: u16,
    #[arg(long, default_value_t = 15000)]
    admin_port: u16,
    #[arg(long, default_value_t = 15020)]
    metrics_port: u16,
    #[arg(long, default_value_t = 15021)]
    readiness_port: u16,
    /// Certificate lifetime in seconds (renewed at half life).
    #[arg(long, default_value_t = 86400)]
    cert_lifetime_secs: u64,
    /// Data-plane worker threads (default: one per CPU).
    #[arg(long)]
    worker_threads: Option<usize>,
}

fn settings(args: Args) -> anyhow::Result<Settings> {
    let gateway = args.name.split_once('/').map(|(_, gw)| gw.to_owned());
    let Some(gateway) = gateway.filter(|g| !g.is_empty()) else {
        anyhow::bail!(
            "--name must be <namespace>/<gateway name>, not {:?}",
            args.name
        );
    };
    let sa = args.service_account.unwrap_or(gateway);
    let mut s = Settings::new(&args.name, &sa, &args.xds_address);
    s.trust_domain = args.trust_domain;
    s.root_cert = args.xds_root_cert;
    s.token = (args.token_file.as_deref())
        .map(|p| {
            mesh_core::control_plane::read_token(p)
                .with_context(|| format!("reading {}", p.display()))
        })
        .transpose()?;
    if let (Some(ca_cert), Some(ca_key)) = (args.ca_cert, args.ca_key) {
        s.ca = CaSource::Local { ca_cert, ca_key };
    }
    s.listen_ip = args.listen_ip;
    s.admin_ip = args.admin_ip;
    s.ports = Ports {
        hbone: args.hbone_port,
        admin: args.admin_port,
        metrics: args.metrics_port,
        readiness: args.readiness_port,
    };
    s.cert_lifetime = Duration::from_secs(args.cert_lifetime_secs);
    Ok(s)
}

fn main() -> anyhow::Result<()> {
    mesh_core::admin::init_logging();
    let args = Args::parse();
    let workers = args.worker_threads;
    let settings = settings(args)?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(async {
        let app = waypoint::app::build(settings).await?;
        app.wait_termination().await;
        Ok(())
    })
}
