//! The Kubernetes source: watches the API server for every kind the mesh reads and hands
//! whole models ([`Objects`]) to the controller, the way the directory source does.
//!
//! Every kind is watched as a `DynamicObject` (kube-runtime's watcher: list, then watch
//! from the list's resourceVersion, bookmarks followed, a re-list after 410 Gone) and kept
//! raw in a store per kind; the typed decoding and the checks happen in [`Objects::add`],
//! shared with the directory source, so one malformed object is reported with its API path
//! and left out instead of failing its kind's whole list. Core kinds take their API
//! coordinates from the k8s-openapi types; Istio's and the Gateway API's kinds are named
//! here, and a missing CRD (404) leaves that kind empty.
//!
//! A model is published only once every kind has completed its first list (proxies never
//! see half a cluster), then after each burst of changes (debounced). This module must not
//! write to the API server.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::stream::{self, StreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt as _;
use kube::{Api, Client, ResourceExt as _};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument as _};

use crate::objects::{ObjectError, Objects};

/// How long a burst of changes may last before the model is rebuilt.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// One kind the source watches.
#[derive(Clone, Debug)]
pub struct Kind {
    pub resource: ApiResource,
    pub namespaced: bool,
    /// Served by a CRD that may not be installed: a 404 means "none", not an error.
    pub optional: bool,
}

impl Kind {
    fn typed<K>(namespaced: bool) -> Self
    where
        K: kube::Resource<DynamicType = ()>,
    {
        Kind {
            resource: ApiResource::erase::<K>(&()),
            namespaced,
            optional: false,
        }
    }

    fn custom(group: &str, kind: &str, plural: &str) -> Self {
        Kind {
            resource: ApiResource {
                group: group.to_owned(),
                version: "v1".to_owned(),
                api_version: format!("{group}/v1"),
                kind: kind.to_owned(),
                plural: plural.to_owned(),
            },
            namespaced: true,
            optional: true,
        }
    }

    /// The object's path on the API server, for error reports.
    pub fn path(&self, namespace: Option<&str>, name: &str) -> String {
        let r = &self.resource;
        let base = if r.group.is_empty() {
            format!("/api/{}", r.version)
        } else {
            format!("/apis/{}/{}", r.group, r.version)
        };
        match namespace.filter(|_| self.namespaced) {
            Some(ns) => format!("{base}/namespaces/{ns}/{}/{name}", r.plural),
            None => format!("{base}/{}/{name}", r.plural),
        }
    }
}

/// Every kind the mesh reads, in the order they are added to the model.
pub fn kinds() -> Vec<Kind> {
    const ISTIO: &str = "security.istio.io";
    const GATEWAY: &str = "gateway.networking.k8s.io";
    const NETWORKING: &str = "networking.istio.io";
    vec![
        Kind::typed::<Namespace>(false),
        Kind::typed::<Pod>(true),
        Kind::typed::<Service>(true),
        Kind::typed::<ServiceAccount>(true),
        Kind::typed::<EndpointSlice>(true),
        Kind::custom(ISTIO, "AuthorizationPolicy", "authorizationpolicies"),
        Kind::custom(ISTIO, "PeerAuthentication", "peerauthentications"),
        Kind::custom(ISTIO, "RequestAuthentication", "requestauthentications"),
        Kind::custom(GATEWAY, "Gateway", "gateways"),
        Kind::custom(GATEWAY, "HTTPRoute", "httproutes"),
        Kind::custom(GATEWAY, "GRPCRoute", "grpcroutes"),
        Kind::custom(NETWORKING, "VirtualService", "virtualservices"),
        Kind::custom(NETWORKING, "DestinationRule", "destinationrules"),
    ]
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone)]
pub struct SourceMetrics {
    rejected: Family<KindLabels, Counter>,
    watch_errors: Family<KindLabels, Counter>,
    models: Counter,
}

impl SourceMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = SourceMetrics {
            rejected: Family::default(),
            watch_errors: Family::default(),
            models: Counter::default(),
        };
        registry.register(
            "mesh_config_objects_rejected",
            "Objects left out of the model (malformed or unusable), counted once per version",
            m.rejected.clone(),
        );
        registry.register(
            "mesh_config_watch_errors",
            "Failed list or watch calls to the API server, by kind",
            m.watch_errors.clone(),
        );
        registry.register(
            "mesh_config_models_published",
            "Models built from the API server's objects and published",
            m.models.clone(),
        );
        m
    }

    pub fn rejected(&self, kind: &str) -> u64 {
        self.rejected
            .get_or_create(&KindLabels { kind: kind.into() })
            .get()
    }

    pub fn models_published(&self) -> u64 {
        self.models.get()
    }
}

/// What the source publishes: the model and the objects left out of it.
#[derive(Debug)]
pub struct Update {
    pub objects: Objects,
    pub rejected: Vec<ObjectError>,
}

/// Starts watching; the first [`Update`] arrives once every kind has been listed. The
/// watch stops when the receiver is dropped.
pub fn spawn(client: Client, trust_domain: &str, metrics: SourceMetrics) -> mpsc::Receiver<Update> {
    let (tx, rx) = mpsc::channel(1);
    let source = Source::new(kinds(), trust_domain, metrics);
    tokio::spawn(source.run(client, tx).in_current_span());
    rx
}

type Key = (String, String);

/// The objects of one kind as the API server last told them.
#[derive(Default)]
struct Store {
    objects: BTreeMap<Key, DynamicObject>,
    /// Objects of a re-list under way, swapped in whole when it completes.
    relist: Option<BTreeMap<Key, DynamicObject>>,
    listed: bool,
    /// The CRD is not installed (logged once per absence).
    missing: bool,
}

struct Source {
    kinds: Vec<Kind>,
    stores: Vec<Store>,
    trust_domain: String,
    metrics: SourceMetrics,
    /// Rejections already reported, so a rebuild does not report them again.
    reported: BTreeSet<(String, String)>,
}

impl Source {
    fn new(kinds: Vec<Kind>, trust_domain: &str, metrics: SourceMetrics) -> Self {
        Source {
            stores: kinds.iter().map(|_| Store::default()).collect(),
            kinds,
            trust_domain: trust_domain.to_owned(),
            metrics,
            reported: BTreeSet::new(),
        }
    }

    async fn run(mut self, client: Client, tx: mpsc::Sender<Update>) {
        let mut events = stream::select_all(self.kinds.iter().enumerate().map(|(i, kind)| {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &kind.resource);
            watcher::watcher(api, watcher::Config::default())
                .default_backoff()
                .map(move |e| (i, e))
                .boxed()
        }));
        let mut publish_at: Option<Instant> = None;
        loop {
            let due = publish_at.filter(|_| self.stores.iter().all(|s| s.listed));
            let tick = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = tx.closed() => {
                    debug!("model receiver gone; the Kubernetes source stops");
                    return;
                }
                next = events.next() => {
                    let Some((i, event)) = next else { return };
                    if self.handle(i, event) && publish_at.is_none() {
                        publish_at = Some(Instant::now() + DEBOUNCE);
                    }
                }
                () = tick => {
                    publish_at = None;
                    let update = self.build();
                    self.metrics.models.inc();
                    if tx.send(update).await.is_err() {
                        debug!("model receiver gone; the Kubernetes source stops");
                        return;
                    }
                }
            }
        }
    }

    /// Applies one watcher event; true when the kind's objects may have changed.
    fn handle(&mut self, i: usize, event: Result<Event<DynamicObject>, watcher::Error>) -> bool {
        let kind = &self.kinds[i];
        let store = &mut self.stores[i];
        let key = |o: &DynamicObject| {
            (
                o.metadata.namespace.clone().unwrap_or_default(),
                o.metadata.name.clone().unwrap_or_default(),
            )
        };
        match event {
            Ok(Event::Init) => {
                store.relist = Some(BTreeMap::new());
                false
            }
            Ok(Event::InitApply(o)) => {
                store.relist.get_or_insert_default().insert(key(&o), o);
                false
            }
            Ok(Event::InitDone) => {
                store.objects = store.relist.take().unwrap_or_default();
                if !store.listed {
                    info!(kind = %kind.resource.kind, count = store.objects.len(), "initial list done");
                }
                store.listed = true;
                store.missing = false;
                true
            }
            Ok(Event::Apply(o)) => {
                store.objects.insert(key(&o), o);
                true
            }
            Ok(Event::Delete(o)) => store.objects.remove(&key(&o)).is_some(),
            Err(e) => self.failed(i, e),
        }
    }

    fn failed(&mut self, i: usize, error: watcher::Error) -> bool {
        let kind = &self.kinds[i];
        let store = &mut self.stores[i];
        let name = &kind.resource.kind;
        let status = match &error {
            watcher::Error::InitialListFailed(kube::Error::Api(s)) => Some(s.code),
            _ => None,
        };
        if kind.optional && status == Some(404) {
            if !store.missing {
                warn!(kind = %name, api = %kind.resource.api_version, "not served by the API server (CRD not installed?): treated as having no objects");
            }
            store.missing = true;
            store.relist = None;
            let had = !store.objects.is_empty() || !store.listed;
            store.objects.clear();
            store.listed = true;
            return had;
        }
        store.relist = None;
        match &error {
            watcher::Error::WatchError(s) if s.code == 410 => {
                info!(kind = %name, "resourceVersion expired (410 Gone): listing again");
            }
            _ => {
                self.metrics
                    .watch_errors
                    .get_or_create(&KindLabels { kind: name.clone() })
                    .inc();
                warn!(kind = %name, "watch of the API server failed (retrying with backoff): {error}");
            }
        }
        false
    }

    /// A new model from every store, kinds in order and objects by namespace/name.
    fn build(&mut self) -> Update {
        let mut objects = Objects::new(&self.trust_domain);
        let mut rejected = Vec::new();
        let mut now_reported = BTreeSet::new();
        for (kind, store) in self.kinds.iter().zip(&self.stores) {
            for obj in store.objects.values() {
                let origin = kind.path(obj.metadata.namespace.as_deref(), &obj.name_any());
                let result = document(kind, obj)
                    .map_err(|reason| ObjectError {
                        origin: origin.clone(),
                        object: format!("{} {}", kind.resource.kind, obj.name_any()),
                        reason,
                    })
                    .and_then(|doc| objects.add(doc, &origin));
                let Err(e) = result else { continue };
                let version = obj.metadata.resource_version.clone().unwrap_or_default();
                let seen = (format!("{origin}@{version}"), e.reason.clone());
                if !self.reported.contains(&seen) {
                    warn!("object skipped: {e}");
                    self.metrics
                        .rejected
                        .get_or_create(&KindLabels {
                            kind: kind.resource.kind.clone(),
                        })
                        .inc();
                }
                now_reported.insert(seen);
                rejected.push(e);
            }
        }
        self.reported = now_reported;
        info!(
            pods = objects.pods.len(),
            services = objects.services.len(),
            rejected = rejected.len(),
            "model rebuilt from the API server"
        );
        Update { objects, rejected }
    }
}

/// The object as a manifest document: list items carry no apiVersion and kind, so they
/// are set from the kind watched.
fn document(kind: &Kind, obj: &DynamicObject) -> Result<serde_yaml::Value, String> {
    let mut json = serde_json::to_value(obj).map_err(|e| format!("unreadable object: {e}"))?;
    let Some(map) = json.as_object_mut() else {
        return Err("not a JSON object".into());
    };
    map.insert(
        "apiVersion".into(),
        kind.resource.api_version.clone().into(),
    );
    map.insert("kind".into(), kind.resource.kind.clone().into());
    serde_yaml::to_value(json).map_err(|e| format!("unreadable object: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_paths_follow_the_group_and_scope() {
        let all = kinds();
        let by = |k: &str| all.iter().find(|x| x.resource.kind == k).unwrap();
        assert_eq!(
            by("Pod").path(Some("ns"), "p"),
            "/api/v1/namespaces/ns/pods/p"
        );
        assert_eq!(by("Namespace").path(None, "ns"), "/api/v1/namespaces/ns");
        assert_eq!(
            by("EndpointSlice").path(Some("ns"), "s"),
            "/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices/s"
        );
        assert_eq!(
            by("HTTPRoute").path(Some("ns"), "r"),
            "/apis/gateway.networking.k8s.io/v1/namespaces/ns/httproutes/r"
        );
        assert!(by("AuthorizationPolicy").optional && !by("Service").optional);
    }
}
