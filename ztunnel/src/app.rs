//! Wiring: builds a ztunnel from a `Config`, binds every listener, and drains it.
//! `main` only parses flags and calls `build`; tests call `build` with port 0.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

use mesh_core::ca_client::CaClient;
use mesh_core::control_plane::ControlPlane;
use mesh_core::proto::type_url;
use mesh_core::xds::{XdsClient, XdsConfig, XdsStatus};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::capture::{self, Capture, CaptureDump, CaptureMetrics};
use crate::config::{Config, Source};
use crate::inbound::{self, HboneListeners};
use crate::localfile;
use crate::model::{Protocol, Snapshot};
use crate::outbound;
use crate::proxy::Proxy;
use crate::telemetry::{AccessLog, Metrics};
use crate::xds::XdsConfigHandler;
use mesh_core::certs::{CertManager, Issuer};

/// How long applying a config waits for certificates of new workloads before going on
/// (the rest are retried every second).
const CERT_PATIENCE: Duration = Duration::from_secs(2);

/// How often capture looks again for pods whose interface was not there yet.
const CAPTURE_REFRESH: Duration = Duration::from_secs(2);

/// A new config, the objects that were left out of it, and its sequence number.
type Update = (Snapshot, Vec<String>, u64);

/// The queue from config sources to the applier, numbering what it carries.
#[derive(Clone)]
struct Updates {
    tx: mpsc::UnboundedSender<Update>,
    sent: Arc<AtomicU64>,
}

impl Updates {
    fn send(&self, snap: Snapshot, errors: Vec<String>) {
        let seq = self.sent.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = self.tx.send((snap, errors, seq));
    }
}

/// Where each listener ended up (ports may have been 0).
#[derive(Clone, Debug, Serialize)]
pub struct Bound {
    pub outbound: SocketAddr,
    /// The wildcard HBONE listener, in capture modes.
    pub hbone: Option<SocketAddr>,
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
    /// Configs applied so far (the initial one included).
    applied: watch::Receiver<u64>,
    sent: Arc<AtomicU64>,
    xds: Option<watch::Receiver<XdsStatus>>,
}

pub async fn build(cfg: Config) -> anyhow::Result<App> {
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let hbone_metrics = HboneMetrics::new(&mut registry);
    let issuer = match &cfg.source {
        Source::Local {
            ca_cert, ca_key, ..
        } => Issuer::Local(Box::new(load_ca(ca_cert, ca_key)?)),
        Source::Controller {
            address,
            root_cert,
            token,
            ..
        } => Issuer::Remote(CaClient::new(
            &control_plane(address, root_cert.as_deref())?,
            token.clone(),
            true,
        )),
    };
    let mut cfg = cfg;
    if cfg.capture.is_active() && cfg.hbone.socket_mark.is_none() {
        cfg.hbone.socket_mark = Some(capture::DEFAULT_SOCKET_MARK);
    }
    let readiness = Readiness::default();
    let data = bind_data(&cfg)?;
    let capture = open_capture(&cfg, &data, &mut registry, &readiness)?;
    let (trigger, drain) = drain::new();
    let proxy = Arc::new(Proxy {
        certs: CertManager::new(issuer, cfg.cert_lifetime),
        pool: Pool::new(cfg.hbone.clone(), hbone_metrics.clone()),
        state: ArcSwap::from_pointee(Snapshot::default()),
        metrics,
        hbone_metrics,
        log: AccessLog::new(cfg.access_log_stdout),
        drain,
        round_robin: AtomicUsize::new(0),
        capture,
        cfg,
    });
    let listeners = Arc::new(HboneListeners::default());
    let (tx, pending) = mpsc::unbounded_channel::<Update>();
    let updates = Updates {
        tx,
        sent: Arc::new(AtomicU64::new(0)),
    };
    let (applied_tx, applied) = watch::channel(0u64);
    spawn_applier(&proxy, &listeners, pending, applied_tx);
    let mut xds = None;
    match proxy.cfg.source.clone() {
        Source::Local { config_file, .. } => {
            let initial = tokio::fs::read(&config_file).await.unwrap_or_default();
            let (snap, errors) = localfile::load(&config_file)?;
            apply(&proxy, &listeners, snap, errors).await;
            let p = proxy.clone();
            let tx = updates.clone();
            tokio::spawn(localfile::watch(
                config_file,
                proxy.cfg.config_poll,
                initial,
                move |snap, errors| tx.send(snap, errors),
                move |_| p.metrics.config_error(),
            ));
        }
        Source::Controller {
            address,
            root_cert,
            token,
            initial_sync_timeout,
        } => {
            let controller = control_plane(&address, root_cert.as_deref())?;
            let status = start_xds(&proxy, controller, token, updates.clone());
            readiness.block("xds");
            let synced = wait_synced(status.clone(), applied.clone(), updates.sent.clone());
            if tokio::time::timeout(initial_sync_timeout, synced)
                .await
                .is_err()
            {
                warn!(controller = %address, "no full config from the controller yet; serving what we have and retrying");
            }
            spawn_ready_when_synced(status.clone(), readiness.clone());
            xds = Some(status);
        }
    }
    let sent = updates.sent.clone();
    drop(updates);
    let bound = serve_all(&proxy, data, registry, readiness, xds.clone())?;
    spawn_renewal(&proxy);
    spawn_capture_refresh(&proxy);
    info!(node = %proxy.cfg.node, ?bound, "ztunnel ready");
    Ok(App {
        bound,
        proxy,
        listeners,
        trigger,
        applied,
        sent,
        xds,
    })
}

fn load_ca(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<CertificateAuthority> {
    CertificateAuthority::from_pem_files(cert, key).context("loading the development CA")
}

/// Starts the delta ADS client; converted configs go to `updates`.
fn control_plane(
    address: &str,
    root_cert: Option<&std::path::Path>,
) -> anyhow::Result<ControlPlane> {
    Ok(ControlPlane::with_root_file(address, root_cert)?)
}

fn start_xds(
    proxy: &Arc<Proxy>,
    controller: ControlPlane,
    token: Option<String>,
    updates: Updates,
) -> watch::Receiver<XdsStatus> {
    let node_id = format!("ztunnel~{}~{}", proxy.cfg.listen_ip, proxy.cfg.node);
    let mut cfg = XdsConfig::new(
        controller,
        node_id,
        &[type_url::ADDRESS, type_url::AUTHORIZATION],
    );
    cfg.token = token;
    let handler = XdsConfigHandler::new(
        &proxy.cfg.trust_domain,
        Box::new(move |snap, errors| updates.send(snap, errors)),
    );
    let client = XdsClient::new(cfg, Arc::new(handler));
    let status = client.status();
    tokio::spawn(client.run(proxy.drain.clone()));
    status
}

/// Resolves once every subscribed type has been received and what came is applied.
async fn wait_synced(
    mut status: watch::Receiver<XdsStatus>,
    applied: watch::Receiver<u64>,
    sent: Arc<AtomicU64>,
) {
    let types = [
        type_url::ADDRESS.to_owned(),
        type_url::AUTHORIZATION.to_owned(),
    ];
    let _ = status.wait_for(|s| s.synced_all(&types)).await;
    wait_applied(applied, sent.load(Ordering::SeqCst)).await;
}

async fn wait_applied(mut applied: watch::Receiver<u64>, seq: u64) {
    let _ = applied.wait_for(|n| *n >= seq).await;
}

fn spawn_ready_when_synced(mut status: watch::Receiver<XdsStatus>, readiness: Readiness) {
    tokio::spawn(async move {
        let types = [
            type_url::ADDRESS.to_owned(),
            type_url::AUTHORIZATION.to_owned(),
        ];
        if status.wait_for(|s| s.synced_all(&types)).await.is_ok() {
            readiness.unblock("xds");
        }
    });
}

/// Applies configs in the order they came, one at a time.
fn spawn_applier(
    proxy: &Arc<Proxy>,
    listeners: &Arc<HboneListeners>,
    mut pending: mpsc::UnboundedReceiver<Update>,
    applied: watch::Sender<u64>,
) {
    let (proxy, listeners) = (proxy.clone(), listeners.clone());
    tokio::spawn(async move {
        while let Some(mut update) = pending.recv().await {
            // Only the newest of a burst matters.
            while let Ok(newer) = pending.try_recv() {
                update = newer;
            }
            let (snap, errors, seq) = update;
            apply(&proxy, &listeners, snap, errors).await;
            applied.send_replace(seq);
        }
    });
}

/// Makes `snap` the running config: certificates first, so listeners bound for new
/// workloads can present them at once.
async fn apply(
    proxy: &Arc<Proxy>,
    listeners: &HboneListeners,
    snap: Snapshot,
    errors: Vec<String>,
) {
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
    proxy.certs.reconcile(&identities, CERT_PATIENCE).await;
    proxy.state.store(Arc::new(snap));
    match &proxy.capture {
        // One wildcard HBONE listener serves every local workload.
        Some(capture) => {
            let (capture, snap) = (capture.clone(), proxy.state.load_full());
            if let Err(e) = tokio::task::spawn_blocking(move || capture.reconcile(snap)).await {
                warn!("capture pass did not finish: {e}");
            }
        }
        None => listeners.reconcile(proxy, &ips),
    }
}

/// The data-plane listeners, bound before anything is served. In capture modes the
/// outbound, plaintext and HBONE listeners are transparent on the wildcard address.
struct DataListeners {
    outbound: TcpListener,
    plaintext: TcpListener,
    socks: TcpListener,
    /// Capture modes only; otherwise HBONE listeners follow the local workloads.
    hbone: Option<TcpListener>,
}

fn bind_data(cfg: &Config) -> anyhow::Result<DataListeners> {
    let transparent = cfg.capture.is_active();
    let bind = |addr: SocketAddr, transparent: bool, what: &str| {
        inbound::bind(addr, transparent)
            .with_context(|| format!("binding {what} listener on {addr}"))
    };
    let captured = |port: u16| match transparent {
        true => SocketAddr::from(([0, 0, 0, 0], port)),
        false => cfg.addr(port),
    };
    Ok(DataListeners {
        outbound: bind(
            captured(cfg.ports.outbound),
            transparent,
            "outbound capture",
        )?,
        plaintext: bind(
            captured(cfg.ports.inbound_plaintext),
            transparent,
            "inbound plaintext",
        )?,
        socks: bind(cfg.addr(cfg.ports.socks5), false, "SOCKS5")?,
        hbone: match transparent {
            true => Some(bind(captured(cfg.ports.hbone), true, "HBONE")?),
            false => None,
        },
    })
}

/// Node routing and the capture backend, in capture modes.
fn open_capture(
    cfg: &Config,
    data: &DataListeners,
    registry: &mut Registry,
    readiness: &Readiness,
) -> anyhow::Result<Option<Arc<Capture>>> {
    let Some(hbone) = &data.hbone else {
        return Ok(None);
    };
    let listeners = capture::Listeners {
        outbound: &data.outbound,
        inbound_hbone: hbone,
        inbound_plaintext: &data.plaintext,
    };
    let mark = cfg
        .hbone
        .socket_mark
        .unwrap_or(capture::DEFAULT_SOCKET_MARK);
    let metrics = CaptureMetrics::new(registry);
    let capture = capture::open(
        cfg.capture,
        &cfg.node,
        mark,
        &listeners,
        metrics,
        readiness.clone(),
    )
    .with_context(|| format!("setting up {} capture", cfg.capture))?;
    Ok(Some(Arc::new(capture)))
}

/// Re-runs the capture pass every few seconds: a pod's veth may appear after its config.
fn spawn_capture_refresh(proxy: &Arc<Proxy>) {
    let Some(capture) = proxy.capture.clone() else {
        return;
    };
    let drain = proxy.drain.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CAPTURE_REFRESH);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = drain.signaled() => return,
            }
            let c = capture.clone();
            let _ = tokio::task::spawn_blocking(move || c.refresh()).await;
        }
    });
}

fn serve_all(
    proxy: &Arc<Proxy>,
    data: DataListeners,
    registry: Registry,
    readiness: Readiness,
    xds: Option<watch::Receiver<XdsStatus>>,
) -> anyhow::Result<Bound> {
    let cfg = &proxy.cfg;
    let bound_capture = data.outbound.local_addr()?;
    let bound_plain = data.plaintext.local_addr()?;
    let bound_socks = data.socks.local_addr()?;
    let bound_hbone = data.hbone.as_ref().map(|l| l.local_addr()).transpose()?;
    tokio::spawn(outbound::serve_capture(proxy.clone(), data.outbound));
    tokio::spawn(inbound::serve_plaintext(proxy.clone(), data.plaintext));
    tokio::spawn(outbound::serve_socks5(proxy.clone(), data.socks));
    if let Some(hbone) = data.hbone {
        tokio::spawn(inbound::serve_hbone(proxy.clone(), hbone));
    }

    let registry = Arc::new(registry);
    let metrics_routes = Routes::new()
        .route("/metrics", admin::metrics_route(registry))
        .route("/healthz", |_| admin::text(http::StatusCode::OK, "ok\n"));
    let ready_routes = Routes::new().route("/healthz/ready", readiness.route());
    let dump_proxy = proxy.clone();
    let admin_routes = Routes::new().route("/config_dump", move |_| {
        admin::json(&dump(&dump_proxy, xds.as_ref().map(|s| s.borrow().clone())))
    });
    let drain = proxy.drain.clone();
    Ok(Bound {
        outbound: bound_capture,
        hbone: bound_hbone,
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
    certificates: Vec<mesh_core::certs::CertSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    xds: Option<XdsStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    capture: Option<CaptureDump>,
}

fn dump(proxy: &Proxy, xds: Option<XdsStatus>) -> Dump<'_> {
    Dump {
        config: &proxy.cfg,
        snapshot: proxy.state.load_full(),
        certificates: proxy.certs.summary(),
        xds,
        capture: proxy.capture.as_ref().map(|c| c.dump()),
    }
}

/// Certificate renewal, and retries of certificates that could not be had.
fn spawn_renewal(proxy: &Arc<Proxy>) {
    let renew = proxy.clone();
    tokio::spawn(async move { renew.certs.renew_forever().await });
}

impl App {
    pub fn bound(&self) -> &Bound {
        &self.bound
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// The xDS client's progress (controller mode).
    pub fn xds_status(&self) -> Option<XdsStatus> {
        self.xds.as_ref().map(|s| s.borrow().clone())
    }

    /// Waits until every config received so far has been applied.
    pub async fn wait_applied(&self) {
        wait_applied(self.applied.clone(), self.sent.load(Ordering::SeqCst)).await
    }

    /// Local addresses with an HBONE listener now.
    pub fn hbone_addresses(&self) -> Vec<IpAddr> {
        self.listeners.addresses()
    }

    /// Stops accepting, lets connections finish up to the deadline, then closes them.
    pub async fn shutdown(self) -> DrainOutcome {
        let deadline = self.proxy.cfg.drain_deadline;
        self.listeners.reconcile(&self.proxy, &BTreeSet::new());
        let capture = self.proxy.capture.clone();
        drop(self.proxy);
        let outcome = self.trigger.drain(deadline, Duration::from_secs(1)).await;
        // After the drain, so pods fail closed rather than bypass the mesh meanwhile.
        if let Some(capture) = capture {
            if let Err(e) = tokio::task::spawn_blocking(move || capture.shutdown()).await {
                warn!("capture teardown did not finish: {e}");
            }
        }
        outcome
    }

    /// Runs until SIGTERM or Ctrl-C, then drains.
    pub async fn wait_termination(self) -> DrainOutcome {
        drain::wait_for_signal().await;
        info!("terminating: draining connections");
        self.shutdown().await
    }
}
