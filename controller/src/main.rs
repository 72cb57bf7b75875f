//! `controller`: the mesh's control plane. Local mode reads manifests from a directory and
//! proxies' tokens from a file; `--kubernetes` watches the API server, checks tokens with
//! TokenReview and keeps the root CA in a Secret.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use controller::app::{self, Config};

#[derive(Debug, Parser)]
#[command(name = "controller", about = "The mesh's control plane")]
struct Args {
    /// Directory of manifests (Namespace, Pod, Service, ... as for kubectl), followed live.
    #[arg(
        long,
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    config_dir: Option<PathBuf>,
    /// Watch the API server instead (in-cluster, or the KUBECONFIG / ~/.kube/config context).
    #[arg(long)]
    kubernetes: bool,
    /// Kubernetes mode: the mesh's namespace (root CA Secret, ztunnel service account).
    #[arg(long, default_value = "istio-system")]
    system_namespace: String,
    /// Where the controller keeps its root CA in local mode (created on first start).
    #[arg(long, default_value = "controller-state")]
    state_dir: PathBuf,
    /// An operator's CA: ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem.
    #[arg(long)]
    ca_plugin_dir: Option<PathBuf>,
    /// Local mode: bearer tokens of the proxies (YAML list of {token, identity, node}).
    #[arg(
        long,
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    tokens: Option<PathBuf>,
    #[arg(long, default_value = mesh_core::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    #[arg(long, default_value = "127.0.0.1:15010")]
    grpc_addr: SocketAddr,
    /// The same gRPC services over TLS, with a certificate from the mesh CA.
    #[arg(long, default_value = "127.0.0.1:15012")]
    grpc_tls_addr: SocketAddr,
    /// DNS SANs of the TLS serving certificate (repeat the flag for several).
    #[arg(long, default_value = controller::serving::DEFAULT_SERVING_DNS)]
    serving_dns: Vec<String>,
    /// IP SANs of the TLS serving certificate besides the bind IP (repeatable).
    #[arg(long)]
    serving_ip: Vec<std::net::IpAddr>,
    /// Serving certificate lifetime, in seconds (renewed at half of it).
    #[arg(long, default_value_t = 24 * 3600)]
    serving_cert_lifetime_secs: u64,
    #[arg(long, default_value = "127.0.0.1:15014")]
    metrics_addr: SocketAddr,
    /// How often the config directory is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 200)]
    config_poll_ms: u64,
    /// Longest certificate lifetime granted, in seconds.
    #[arg(long, default_value_t = 48 * 3600)]
    max_cert_lifetime_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mesh_core::admin::init_logging();
    let args = Args::parse();
    let mut cfg = match (args.config_dir, args.tokens) {
        (Some(dir), Some(tokens)) => Config::new(dir, args.state_dir, tokens),
        _ => {
            let client = kube::Config::infer()
                .await
                .context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
            Config::kubernetes(client, &args.system_namespace)
        }
    };
    cfg.ca_plugin_dir = args.ca_plugin_dir;
    cfg.trust_domain = args.trust_domain;
    cfg.grpc_addr = args.grpc_addr;
    cfg.grpc_tls_addr = args.grpc_tls_addr;
    cfg.serving.dns_names = args.serving_dns;
    cfg.serving.ips = args.serving_ip;
    cfg.serving.lifetime = Duration::from_secs(args.serving_cert_lifetime_secs);
    cfg.metrics_addr = args.metrics_addr;
    cfg.config_poll = Duration::from_millis(args.config_poll_ms);
    cfg.max_cert_lifetime = Duration::from_secs(args.max_cert_lifetime_secs);
    let app = app::build(cfg).await?;
    tokio::signal::ctrl_c().await?;
    app.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
