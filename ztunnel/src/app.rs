//! Wiring: builds a ztunnel from a `Config`, binds every listener, and drains it.
//! `main` only parses flags and calls `build`; tests call `build` with port 0.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use mesh_core::admin::{self, Readiness, Routes};
use mesh_core::drain::{self, DrainOutcome, DrainTrigger};
use mesh_core::hbone::{HboneMetrics, Pool};
use mesh_core::tls::CertificateAuthority;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tracing::{info, warn};

use crate::certs::CertManager;
use crate::config::Config;
use crate::inbound::{self, HboneListeners};
use crate::localfile;
use crate::model::{Protocol, Snapshot};
use crate::outbound;
use crate::proxy::Proxy;
use crate::telemetry::{AccessLog, Metrics};

/// Where each listener ended up (ports may have been 0).
#[derive(Clone, Debug, Serialize)]
pub struct Bound {
    pub outbound: SocketAddr,
    pub inbound_plaintext: SocketAddr,
    pub socks5: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
}

pub struct App {
    bound: Bound,
    proxy: Arc<Proxy>,
    listeners: Arc<HboneListeners>,
    trigger: DrainTrigger,
}

pub async fn build(cfg: Config) -> anyhow::Result<App> {
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let hbone_metrics = HboneMetrics::new(&mut registry);
    let ca = load_ca(&cfg)?;
    let (snap, errors) = localfile::load(&cfg.config_file)?;
    let (trigger, drain) = drain::new();
    let proxy = Arc::new(Proxy {
        certs: CertManager::new(ca, cfg.cert_lifetime),
        pool: Pool::new(cfg.hbone.clone(), hbone_metrics.clone()),
        state: ArcSwap::from_pointee(Snapshot::default()),
        metrics,
        hbone_metrics,
        log: AccessLog::new(cfg.access_log_stdout),
        drain,
        round_robin: AtomicUsize::new(0),
        cfg,
    });
    let listeners = Arc::new(HboneListeners::default());
    apply(&proxy, &listeners, snap, errors);
    let bound = bind_all(&proxy, &listeners, registry).await?;
    spawn_background(&proxy, &listeners).await?;
    info!(node = %proxy.cfg.node, ?bound, "ztunnel ready");
    Ok(App {
        bound,
        proxy,
        listeners,
        trigger,
    })
}

fn load_ca(cfg: &Config) -> anyhow::Result<CertificateAuthority> {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let cert = read(&cfg.ca_cert)?;
    let key = read(&cfg.ca_key)?;
    CertificateAuthority::from_pem(&cert, &key).context("loading the development CA")
}

/// Makes `snap` the running config: certificates first, so listeners bound for new
/// workloads can present them at once.
fn apply(proxy: &Arc<Proxy>, listeners: &HboneListeners, snap: Snapshot, errors: Vec<String>) {
    for e in &errors {
        warn!("config object skipped: {e}");
        proxy.metrics.config_error();
    }
    let local: Vec<_> = snap
        .local_workloads(&proxy.cfg.node)
        .filter(|w| w.protocol == Protocol::Hbone)
        .cloned()
        .collect();
    let identities: BTreeSet<_> = local.iter().map(|w| w.identity()).collect();
    let ips: BTreeSet<IpAddr> = local.iter().flat_map(|w| w.ips.iter().copied()).collect();
    proxy.certs.reconcile(&identities);
    proxy.state.store(Arc::new(snap));
    listeners.reconcile(proxy, &ips);
}

async fn bind_all(
    proxy: &Arc<Proxy>,
    _listeners: &Arc<HboneListeners>,
    registry: Registry,
) -> anyhow::Result<Bound> {
    let cfg = &proxy.cfg;
    let bind = |port: u16, what: &str| {
        let addr = cfg.addr(port);
        inbound::bind(addr).with_context(|| format!("binding {what} listener on {addr}"))
    };
    let capture = bind(cfg.ports.outbound, "outbound capture")?;
    let plaintext = bind(cfg.ports.inbound_plaintext, "inbound plaintext")?;
    let socks = bind(cfg.ports.socks5, "SOCKS5")?;
    let bound_capture = capture.local_addr()?;
    let bound_plain = plaintext.local_addr()?;
    let bound_socks = socks.local_addr()?;
    tokio::spawn(outbound::serve_capture(proxy.clone(), capture));
    tokio::spawn(inbound::serve_plaintext(proxy.clone(), plaintext));
    tokio::spawn(outbound::serve_socks5(proxy.clone(), socks));

    let readiness = Readiness::default();
    let registry = Arc::new(registry);
    let metrics_routes = Routes::new()
        .route("/metrics", admin::metrics_route(registry))
        .route("/healthz", |_| admin::text(http::StatusCode::OK, "ok\n"));
    let ready_routes = Routes::new().route("/healthz/ready", readiness.route());
    let dump_proxy = proxy.clone();
    let admin_routes =
        Routes::new().route("/config_dump", move |_| admin::json(&dump(&dump_proxy)));
    let drain = proxy.drain.clone();
    Ok(Bound {
        outbound: bound_capture,
        inbound_plaintext: bound_plain,
        socks5: bound_socks,
        admin: admin::spawn_server(
            "admin",
            cfg.addr(cfg.ports.admin),
            admin_routes,
            drain.clone(),
        )?,
        metrics: admin::spawn_server(
            "metrics",
            cfg.addr(cfg.ports.metrics),
            metrics_routes,
            drain.clone(),
        )?,
        readiness: admin::spawn_server(
            "readiness",
            cfg.addr(cfg.ports.readiness),
            ready_routes,
            drain,
        )?,
    })
}

#[derive(Serialize)]
struct Dump<'a> {
    config: &'a Config,
    snapshot: Arc<Snapshot>,
    certificates: Vec<crate::certs::CertSummary>,
}

fn dump(proxy: &Proxy) -> Dump<'_> {
    Dump {
        config: &proxy.cfg,
        snapshot: proxy.state.load_full(),
        certificates: proxy.certs.summary(),
    }
}

/// The config-file watcher and certificate renewal.
async fn spawn_background(
    proxy: &Arc<Proxy>,
    listeners: &Arc<HboneListeners>,
) -> anyhow::Result<()> {
    let path = proxy.cfg.config_file.clone();
    let initial = tokio::fs::read(&path).await.unwrap_or_default();
    let (p, l) = (proxy.clone(), listeners.clone());
    let perr = proxy.clone();
    tokio::spawn(localfile::watch(
        path,
        proxy.cfg.config_poll,
        initial,
        move |snap, errors| apply(&p, &l, snap, errors),
        move |_| perr.metrics.config_error(),
    ));
    let renew = proxy.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            renew.certs.renew_due();
        }
    });
    Ok(())
}

impl App {
    pub fn bound(&self) -> &Bound {
        &self.bound
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Local addresses with an HBONE listener now.
    pub fn hbone_addresses(&self) -> Vec<IpAddr> {
        self.listeners.addresses()
    }

    /// Stops accepting, lets connections finish up to the deadline, then closes them.
    pub async fn shutdown(self) -> DrainOutcome {
        let deadline = self.proxy.cfg.drain_deadline;
        self.listeners.reconcile(&self.proxy, &BTreeSet::new());
        drop(self.proxy);
        self.trigger.drain(deadline, Duration::from_secs(1)).await
    }

    /// Runs until SIGTERM or Ctrl-C, then drains.
    pub async fn wait_termination(self) -> DrainOutcome {
        wait_for_signal().await;
        info!("terminating: draining connections");
        self.shutdown().await
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
