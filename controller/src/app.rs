//! Wiring: builds a controller from a `Config` (local mode: a directory of manifests;
//! Kubernetes mode: the API server), serves the CA and delta ADS over gRPC and its
//! metrics, and follows the source. `main` parses flags
//! and calls [`build`]; tests call it with port 0.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use mesh_core::admin::{self, Routes};
use mesh_core::drain::{self, Drain, DrainTrigger};
use mesh_core::proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateServiceServer;
use mesh_core::Identity;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::ca::{Authenticator, CaMetrics, CaService, Placement, TokenFile, TokenReviewer};
use crate::castore::{self, CaOrigin};
use crate::kube_source::{self, SourceMetrics, Update};
use crate::objects::{DirSource, ObjectError, Objects};
use crate::serving::{self, ServingCert, ServingMetrics};
use crate::translate::{self, AddressCache};
use crate::xds::{AdsService, Resources, Served, Snapshot, XdsMetrics, XdsServer};
use mesh_core::proto::type_url;
use mesh_core::tls::CertificateAuthority;
use tokio::sync::mpsc;
use tokio::sync::watch;

/// Where the objects, the proxies' identities and the root CA come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Local mode: the manifests, followed for changes; the proxies' bearer tokens (see
    /// `ca::TokenFile`); the root in `state_dir`.
    Dir {
        config_dir: PathBuf,
        tokens: PathBuf,
    },
    /// Kubernetes mode: objects watched on the API server, tokens checked with
    /// TokenReview, the root in a Secret of `system_namespace` (which also holds the node
    /// proxies' service account, `ztunnel`).
    Kubernetes {
        client: Box<kube::Config>,
        system_namespace: String,
    },
}

#[derive(Clone, Debug)]
pub struct Config {
    pub source: Source,
    /// Where the controller keeps its own root CA (local mode).
    pub state_dir: PathBuf,
    /// An operator's CA in the plug-in layout, used instead of our own root.
    pub ca_plugin_dir: Option<PathBuf>,
    pub trust_domain: String,
    /// gRPC (CA and delta ADS), plaintext: 15010.
    pub grpc_addr: SocketAddr,
    /// The same gRPC services over TLS: 15012.
    pub grpc_tls_addr: SocketAddr,
    /// SANs of the TLS serving certificate (the bind IP is added).
    pub serving: ServingCert,
    /// Prometheus `/metrics`: 15014.
    pub metrics_addr: SocketAddr,
    pub max_cert_lifetime: Duration,
    pub config_poll: Duration,
}

impl Config {
    /// Local mode.
    pub fn new(config_dir: PathBuf, state_dir: PathBuf, tokens: PathBuf) -> Self {
        Self::with_source(Source::Dir { config_dir, tokens }, state_dir)
    }

    /// Kubernetes mode, the mesh in `system_namespace` (`istio-system` as a rule).
    pub fn kubernetes(client: kube::Config, system_namespace: &str) -> Self {
        let source = Source::Kubernetes {
            client: Box::new(client),
            system_namespace: system_namespace.to_owned(),
        };
        Self::with_source(source, PathBuf::from("controller-state"))
    }

    fn with_source(source: Source, state_dir: PathBuf) -> Self {
        Config {
            source,
            state_dir,
            ca_plugin_dir: None,
            trust_domain: mesh_core::identity::DEFAULT_TRUST_DOMAIN.to_owned(),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 15010)),
            grpc_tls_addr: SocketAddr::from(([127, 0, 0, 1], 15012)),
            serving: ServingCert {
                dns_names: vec![serving::DEFAULT_SERVING_DNS.to_owned()],
                ips: Vec::new(),
                lifetime: Duration::from_secs(24 * 3600),
            },
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 15014)),
            max_cert_lifetime: Duration::from_secs(48 * 3600),
            config_poll: Duration::from_millis(200),
        }
    }
}

/// The model as it is now; swapped whole when the directory changes, and translated into
/// the xDS snapshot at the same moment.
pub struct LiveObjects {
    model: ArcSwap<Objects>,
    xds: watch::Sender<Arc<Snapshot>>,
    /// The Address resources of the last model, for translating the next one.
    addresses: Mutex<AddressCache<Served>>,
    metrics: TranslateMetrics,
}

impl LiveObjects {
    fn new(model: Objects, metrics: TranslateMetrics) -> Self {
        let model = Arc::new(model);
        let mut addresses = AddressCache::default();
        let snap = snapshot(&mut addresses, &model, Instant::now(), &metrics);
        let (xds, _) = watch::channel(Arc::new(snap));
        LiveObjects {
            model: ArcSwap::new(model),
            xds,
            addresses: Mutex::new(addresses),
            metrics,
        }
    }

    /// What translation leaves out of the current model.
    pub fn metrics(&self) -> &TranslateMetrics {
        &self.metrics
    }

    pub fn load(&self) -> Arc<Objects> {
        self.model.load_full()
    }

    /// Swaps in `model`, which changed at `changed` (when the change was seen).
    fn store(&self, model: Objects, changed: Instant) {
        let model = Arc::new(model);
        let snap = {
            let mut addresses = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
            snapshot(&mut addresses, &model, changed, &self.metrics)
        };
        self.model.store(model);
        self.xds.send_replace(Arc::new(snap));
    }
}

/// The resources every proxy is served, from the model.
fn snapshot(
    addresses: &mut AddressCache<Served>,
    model: &Arc<Objects>,
    changed: Instant,
    metrics: &TranslateMetrics,
) -> Snapshot {
    let addresses = addresses.addresses(model, |a| Served::new(type_url::ADDRESS, a));
    let (auths, mut errors) = translate::authorizations(model);
    errors.extend(translate::waypoint::Waypoints::new(model).1);
    let l7 = translate::l7::resources(model);
    errors.extend(l7.errors);
    for e in &errors {
        warn!("left out of the proxies' config: {e}");
    }
    metrics.record(&errors);
    Snapshot::new(
        [
            (type_url::ADDRESS.to_owned(), addresses),
            (
                type_url::AUTHORIZATION.to_owned(),
                served(type_url::AUTHORIZATION, auths),
            ),
            (
                type_url::L7_SERVICE.to_owned(),
                served(type_url::L7_SERVICE, l7.services),
            ),
            (
                type_url::L7_POLICY.to_owned(),
                served(type_url::L7_POLICY, l7.policies),
            ),
        ],
        changed,
    )
}

fn served<M: prost::Message>(type_url: &str, resources: BTreeMap<String, M>) -> Resources {
    resources
        .into_iter()
        .map(|(name, r)| (name, Served::new(type_url, &r)))
        .collect()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// Objects the current model holds that translation left out, by kind: a gauge, since
/// every model is translated whole.
#[derive(Clone, Default)]
pub struct TranslateMetrics {
    untranslated: Family<KindLabel, Gauge>,
}

impl TranslateMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = TranslateMetrics::default();
        registry.register(
            "mesh_config_objects_untranslated",
            "Objects of the current model left out of the proxies' config (invalid or unusable), by kind",
            m.untranslated.clone(),
        );
        m
    }

    fn record(&self, errors: &[ObjectError]) {
        self.untranslated.clear();
        for e in errors {
            let kind = e.object.split_once(' ').map_or("?", |(k, _)| k);
            self.untranslated
                .get_or_create(&KindLabel {
                    kind: kind.to_owned(),
                })
                .inc();
        }
    }

    /// Objects of `kind` currently left out.
    pub fn untranslated(&self, kind: &str) -> i64 {
        self.untranslated
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .get()
    }
}

impl Placement for LiveObjects {
    fn scheduled_on(&self, identity: &Identity, node: &str) -> bool {
        self.model.load().scheduled_on(identity, node)
    }
}

pub struct App {
    pub grpc: SocketAddr,
    pub grpc_tls: SocketAddr,
    pub metrics: SocketAddr,
    pub ca_origin: CaOrigin,
    pub objects: Arc<LiveObjects>,
    trigger: DrainTrigger,
}

/// What a source gives the controller at start.
struct Opened {
    ca: CertificateAuthority,
    ca_origin: CaOrigin,
    auth: Arc<dyn Authenticator>,
    model: Objects,
    /// Kubernetes mode: the models that follow the first.
    updates: Option<mpsc::Receiver<Update>>,
    /// Local mode: the directory, with what was read of it.
    dir: Option<DirSource>,
}

async fn open(cfg: &Config, registry: &mut Registry) -> anyhow::Result<Opened> {
    let plugin = cfg.ca_plugin_dir.as_deref();
    match &cfg.source {
        Source::Dir { config_dir, tokens } => {
            let (ca, ca_origin) =
                castore::load_or_create(plugin, &cfg.state_dir, &cfg.trust_domain)?;
            let mut dir = DirSource::new(config_dir, &cfg.trust_domain);
            Ok(Opened {
                ca,
                ca_origin,
                auth: Arc::new(TokenFile::load(tokens)?),
                model: load(&mut dir, config_dir)?,
                updates: None,
                dir: Some(dir),
            })
        }
        Source::Kubernetes {
            client,
            system_namespace,
        } => {
            let client = kube::Client::try_from(kube::Config::clone(client))
                .context("building the Kubernetes client")?;
            let (ca, ca_origin) = castore::load_or_create_secret(
                plugin,
                client.clone(),
                system_namespace,
                &cfg.trust_domain,
            )
            .await?;
            let auth = TokenReviewer::new(client.clone(), &cfg.trust_domain, system_namespace);
            let metrics = SourceMetrics::new(registry);
            let mut updates = kube_source::spawn(client, &cfg.trust_domain, metrics);
            info!("waiting for the first list of every kind from the API server");
            let first = updates
                .recv()
                .await
                .context("the Kubernetes source stopped before its first model")?;
            Ok(Opened {
                ca,
                ca_origin,
                auth: Arc::new(auth),
                model: first.objects,
                updates: Some(updates),
                dir: None,
            })
        }
    }
}

pub async fn build(cfg: Config) -> anyhow::Result<App> {
    let mut registry = Registry::default();
    let Opened {
        ca,
        ca_origin,
        auth,
        model,
        updates,
        dir,
    } = open(&cfg, &mut registry).await?;
    let translate_metrics = TranslateMetrics::new(&mut registry);
    let objects = Arc::new(LiveObjects::new(model, translate_metrics));
    let ca_metrics = CaMetrics::new(&mut registry);
    let xds = XdsServer::new(objects.xds.subscribe(), XdsMetrics::new(&mut registry));
    let syncz = xds.status();
    let (trigger, drain) = drain::new();

    let ca = Arc::new(ca);
    let service = CaService::new(
        ca.clone(),
        auth,
        objects.clone(),
        cfg.max_cert_lifetime,
        ca_metrics,
    );
    let ca_server = IstioCertificateServiceServer::new(service);
    let ads_server = AdsService::new(xds);
    let incoming = tonic::transport::server::TcpIncoming::bind(cfg.grpc_addr)
        .map_err(|e| anyhow::anyhow!("binding gRPC on {}: {e}", cfg.grpc_addr))?;
    let grpc = incoming.local_addr()?;
    let tls = serving::listen(
        cfg.grpc_tls_addr,
        ca,
        cfg.serving.clone(),
        ServingMetrics::new(&mut registry),
        drain.clone(),
    )
    .await?;
    let grpc_tls = tls.addr;
    for (name, incoming) in [
        ("plaintext", Incoming::Tcp(incoming)),
        ("TLS", Incoming::Tls(tls.connections)),
    ] {
        let stop = drain.clone();
        let router = tonic::transport::Server::builder()
            .add_service(ca_server.clone())
            .add_service(ads_server.clone());
        tokio::spawn(async move {
            let shutdown = async move { stop.signaled().await };
            let served = match incoming {
                Incoming::Tcp(i) => router.serve_with_incoming_shutdown(i, shutdown).await,
                Incoming::Tls(i) => router.serve_with_incoming_shutdown(i, shutdown).await,
            };
            if let Err(e) = served {
                warn!("{name} gRPC server stopped: {e}");
            }
        });
    }
    let routes = Routes::new()
        .route("/metrics", admin::metrics_route(Arc::new(registry)))
        // Connected proxies and the versions they ACKed (`meshctl proxy-status`).
        .route("/debug/syncz", move |_| admin::json(&syncz.report()));
    let metrics = admin::spawn_server("metrics", cfg.metrics_addr, routes, drain.clone())?;
    if let Some(updates) = updates {
        tokio::spawn(follow_kube(updates, objects.clone(), drain));
    } else if let (Some(source), Source::Dir { config_dir, .. }) = (dir, &cfg.source) {
        let dir = config_dir.clone();
        tokio::spawn(follow_dir(
            dir,
            source,
            cfg.config_poll,
            objects.clone(),
            drain,
        ));
    }
    info!(%grpc, %grpc_tls, %metrics, ca = ?ca_origin, "controller ready");
    Ok(App {
        grpc,
        grpc_tls,
        metrics,
        ca_origin,
        objects,
        trigger,
    })
}

/// The two ways gRPC arrives: plaintext (15010) and TLS (15012).
enum Incoming {
    Tcp(tonic::transport::server::TcpIncoming),
    Tls(tokio_stream::wrappers::ReceiverStream<std::io::Result<serving::TlsConn>>),
}

impl App {
    /// Stops serving and waits up to `deadline` for open calls.
    pub async fn shutdown(self, deadline: Duration) {
        self.trigger.drain(deadline, Duration::from_secs(1)).await;
    }
}

fn load(source: &mut DirSource, dir: &std::path::Path) -> anyhow::Result<Objects> {
    let (objects, errors) = source
        .load()
        .with_context(|| format!("reading {}", dir.display()))?;
    for e in &errors {
        warn!("object skipped: {e}");
    }
    Ok(objects)
}

/// Reloads the model whenever a file below the directory changes (by name, size or
/// modification time), re-reading only the files that changed. A directory that cannot
/// be read keeps the last good model.
async fn follow_dir(
    dir: PathBuf,
    mut source: DirSource,
    poll: Duration,
    objects: Arc<LiveObjects>,
    drain: Drain,
) {
    let mut seen = fingerprint(&dir);
    let mut tick = tokio::time::interval(poll);
    loop {
        tokio::select! {
            _ = drain.signaled() => return,
            _ = tick.tick() => {}
        }
        let now = fingerprint(&dir);
        if now == seen {
            continue;
        }
        let changed = Instant::now();
        seen = now;
        match load(&mut source, &dir) {
            Ok(model) => {
                let pods = model.pods.len();
                let loaded = changed.elapsed();
                objects.store(model, changed);
                info!(
                    pods,
                    files_read = source.reread(),
                    load_ms = loaded.as_millis() as u64,
                    translate_ms = (changed.elapsed() - loaded).as_millis() as u64,
                    "config directory changed; model reloaded"
                );
            }
            Err(e) => warn!("config directory unreadable, keeping the last model: {e:#}"),
        }
    }
}

/// Swaps in each model the Kubernetes source publishes.
async fn follow_kube(mut updates: mpsc::Receiver<Update>, objects: Arc<LiveObjects>, drain: Drain) {
    loop {
        let update = tokio::select! {
            _ = drain.signaled() => return,
            u = updates.recv() => u,
        };
        let Some(update) = update else {
            warn!("the Kubernetes source stopped; keeping the last model");
            return;
        };
        objects.store(update.objects, Instant::now());
    }
}

fn fingerprint(dir: &std::path::Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(path),
                Ok(m) => out.push((path, m.len(), m.modified().ok())),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}
