//! Wiring: builds a waypoint from its [`Settings`], binds every listener, and drains it.
//! `main` only parses flags and calls [`build`]; tests call it with port 0.
//!
//! Certificates come from the controller's CA (or a development CA), config over delta
//! ADS; the HBONE server hands each tunnel to [`Tunnels`], which serves it with the HTTP
//! engine or passes it through.

pub mod settings;
pub mod state;
mod xds;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use mesh_core::admin::{self, Readiness, Routes};
use mesh_core::ca_client::CaClient;
use mesh_core::certs::{CertManager, Issuer};
use mesh_core::control_plane::ControlPlane;
use mesh_core::drain::{self, Drain, DrainOutcome, DrainTrigger};
use mesh_core::hbone::{self, HboneMetrics, Pool};
use mesh_core::tls::CertificateAuthority;
use mesh_core::xds::{XdsClient, XdsConfig, XdsStatus};
use mesh_core::Identity;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

pub use settings::{CaSource, Ports, Settings};
use state::State;

use crate::http::Engine;
use crate::tunnel::{TunnelMetrics, Tunnels};
use crate::upstream::Upstreams;

/// How long start-up waits for the first certificate before serving (and retrying).
const CERT_PATIENCE: Duration = Duration::from_secs(5);

/// Where each listener ended up (ports may have been 0).
#[derive(Clone, Debug, Serialize)]
pub struct Bound {
    pub hbone: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
}

pub struct App {
    bound: Bound,
    settings: Arc<Settings>,
    state: Arc<ArcSwap<State>>,
    certs: Arc<CertManager>,
    xds: watch::Receiver<XdsStatus>,
    trigger: DrainTrigger,
}

pub async fn build(settings: Settings) -> anyhow::Result<App> {
    let settings = Arc::new(settings);
    let identity = settings.identity().context("the waypoint's identity")?;
    let controller =
        ControlPlane::with_root_file(&settings.controller, settings.root_cert.as_deref())?;
    let certs = Arc::new(CertManager::new(
        issuer(&settings, &controller)?,
        settings.cert_lifetime,
    ));
    let mut registry = Registry::default();
    let hbone_metrics = HboneMetrics::new(&mut registry);
    let metrics = TunnelMetrics::new(&mut registry);
    let readiness = Readiness::default();
    readiness.block("certificate");
    readiness.block("xds");
    let (trigger, drain) = drain::new();
    let state = Arc::new(ArcSwap::from_pointee(State::default()));
    let pool = Pool::new(settings.hbone.clone(), hbone_metrics.clone());
    let upstreams = Arc::new(Upstreams::new(
        state.clone(),
        certs.clone(),
        pool,
        identity.clone(),
        &settings,
    ));
    let engine = Engine::new(upstreams.clone(), &mut registry);
    let handler = xds::XdsHandler::new(
        &settings.name,
        &settings.trust_domain,
        state.clone(),
        engine.clone(),
        metrics.config_errors.clone(),
    );
    let xds = start_xds(&settings, controller, handler, drain.clone());
    first_certificate(&certs, &identity, &readiness).await;
    wait_synced(&settings, xds.clone(), &readiness).await;
    let tunnels = Arc::new(Tunnels::new(
        state.clone(),
        upstreams,
        engine,
        metrics,
        hbone_metrics.clone(),
        settings.sniff_timeout,
    ));
    let hbone = serve_hbone(
        &settings,
        &certs,
        &identity,
        tunnels,
        hbone_metrics,
        drain.clone(),
    )?;
    let app = App {
        bound: serve_admin(
            &settings, hbone, registry, readiness, &state, &certs, &xds, drain,
        )?,
        settings,
        state,
        certs: certs.clone(),
        xds,
        trigger,
    };
    tokio::spawn(async move { certs.renew_forever().await });
    info!(waypoint = %app.settings.name, %identity, bound = ?app.bound, "waypoint ready");
    Ok(app)
}

fn issuer(settings: &Settings, controller: &ControlPlane) -> anyhow::Result<Issuer> {
    Ok(match &settings.ca {
        CaSource::Local { ca_cert, ca_key } => Issuer::Local(Box::new(
            CertificateAuthority::from_pem_files(ca_cert, ca_key)
                .context("loading the development CA")?,
        )),
        // The waypoint asks for its own identity, never on anyone's behalf.
        CaSource::Controller => {
            Issuer::Remote(CaClient::new(controller, settings.token.clone(), false))
        }
    })
}

/// Asks for the waypoint's certificate (kept and renewed from then on); readiness waits
/// for it, in the background if the CA is slow.
async fn first_certificate(certs: &Arc<CertManager>, identity: &Identity, readiness: &Readiness) {
    certs
        .reconcile(&BTreeSet::from([identity.clone()]), CERT_PATIENCE)
        .await;
    if certs.get(identity).is_some() {
        return readiness.unblock("certificate");
    }
    let (certs, identity, readiness) = (certs.clone(), identity.clone(), readiness.clone());
    tokio::spawn(async move {
        while certs.get(&identity).is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        readiness.unblock("certificate");
    });
}

fn start_xds(
    settings: &Settings,
    controller: ControlPlane,
    handler: xds::XdsHandler,
    drain: Drain,
) -> watch::Receiver<XdsStatus> {
    let node_id = format!("waypoint~{}~{}", settings.listen_ip, settings.name);
    let mut cfg = XdsConfig::new(controller, node_id, &xds::TYPES);
    cfg.token = settings.token.clone();
    let client = XdsClient::new(cfg, Arc::new(handler));
    let status = client.status();
    tokio::spawn(client.run(drain));
    status
}

/// Waits (bounded) for every type's first push; readiness follows whenever it comes.
async fn wait_synced(
    settings: &Settings,
    status: watch::Receiver<XdsStatus>,
    readiness: &Readiness,
) {
    let types: Vec<String> = xds::TYPES.iter().map(|t| (*t).to_owned()).collect();
    let mut wait = status.clone();
    let synced = wait.wait_for(|s| s.synced_all(&types));
    if let Ok(Ok(_)) = tokio::time::timeout(settings.initial_sync_timeout, synced).await {
        return readiness.unblock("xds");
    }
    warn!(controller = %settings.controller, "no full config from the controller yet; serving what we have");
    let (mut status, readiness) = (status, readiness.clone());
    tokio::spawn(async move {
        if status.wait_for(|s| s.synced_all(&types)).await.is_ok() {
            readiness.unblock("xds");
        }
    });
}

fn serve_hbone(
    settings: &Settings,
    certs: &Arc<CertManager>,
    identity: &Identity,
    tunnels: Arc<Tunnels>,
    metrics: HboneMetrics,
    drain: Drain,
) -> anyhow::Result<SocketAddr> {
    let addr = settings.addr(settings.ports.hbone);
    let std_listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("binding HBONE on {addr}"))?;
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    let bound = listener.local_addr()?;
    let (certs, identity) = (certs.clone(), identity.clone());
    // Every address is the waypoint's own: one certificate for all.
    let tls_for: hbone::TlsForLocalAddr =
        Arc::new(move |_| Some(certs.get(&identity)?.server.clone()));
    let handler: hbone::Handler = Arc::new(move |req| Box::pin(tunnels.clone().handle(req)));
    tokio::spawn(hbone::serve(
        listener,
        tls_for,
        handler,
        settings.hbone.clone(),
        metrics,
        drain,
    ));
    Ok(bound)
}

#[derive(Serialize)]
struct Dump<'a> {
    settings: &'a Settings,
    state: Arc<State>,
    certificates: Vec<mesh_core::certs::CertSummary>,
    xds: XdsStatus,
}

#[allow(clippy::too_many_arguments)]
fn serve_admin(
    settings: &Arc<Settings>,
    hbone: SocketAddr,
    registry: Registry,
    readiness: Readiness,
    state: &Arc<ArcSwap<State>>,
    certs: &Arc<CertManager>,
    xds: &watch::Receiver<XdsStatus>,
    drain: Drain,
) -> anyhow::Result<Bound> {
    let metrics_routes = Routes::new()
        .route("/metrics", admin::metrics_route(Arc::new(registry)))
        .route("/healthz", |_| admin::text(http::StatusCode::OK, "ok\n"));
    let ready_routes = Routes::new().route("/healthz/ready", readiness.route());
    let (s, st, c, x) = (settings.clone(), state.clone(), certs.clone(), xds.clone());
    let admin_routes = Routes::new().route("/config_dump", move |_| {
        admin::json(&Dump {
            settings: &s,
            state: st.load_full(),
            certificates: c.summary(),
            xds: x.borrow().clone(),
        })
    });
    let admin_addr = SocketAddr::new(settings.admin_ip, settings.ports.admin);
    Ok(Bound {
        hbone,
        admin: admin::spawn_server("admin", admin_addr, admin_routes, drain.clone())?,
        metrics: admin::spawn_server(
            "metrics",
            settings.addr(settings.ports.metrics),
            metrics_routes,
            drain.clone(),
        )?,
        readiness: admin::spawn_server(
            "readiness",
            settings.addr(settings.ports.readiness),
            ready_routes,
            drain,
        )?,
    })
}

impl App {
    pub fn bound(&self) -> &Bound {
        &self.bound
    }

    /// The config the data path reads now.
    pub fn state(&self) -> Arc<State> {
        self.state.load_full()
    }

    pub fn xds_status(&self) -> XdsStatus {
        self.xds.borrow().clone()
    }

    pub fn certificates(&self) -> Vec<mesh_core::certs::CertSummary> {
        self.certs.summary()
    }

    /// Waits until the xDS client has accepted `n` responses in all.
    pub async fn wait_acks(&self, n: u64) {
        let _ = self.xds.clone().wait_for(|s| s.acks >= n).await;
    }

    /// Stops accepting (GOAWAY to HBONE peers), lets tunnels finish up to the deadline,
    /// then closes them.
    pub async fn shutdown(self) -> DrainOutcome {
        self.trigger
            .drain(self.settings.drain_deadline, Duration::from_secs(1))
            .await
    }

    /// Runs until SIGTERM or Ctrl-C, then drains.
    pub async fn wait_termination(self) -> DrainOutcome {
        drain::wait_for_signal().await;
        info!("terminating: draining tunnels");
        self.shutdown().await
    }
}
