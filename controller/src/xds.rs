//! The delta ADS server (`envoy.service.discovery.v3.AggregatedDiscoveryService/
//! DeltaAggregatedResources`): each proxy subscribes per type (wildcard), gets everything
//! it lacks, then only what changed or was removed. Responses carry nonces; an ACK or NACK
//! names one. A NACK is logged and counted and nothing is resent until the resource
//! changes again: the proxy keeps what it had. A reconnecting proxy states the versions it
//! holds (`initial_resource_versions`) and receives only the difference.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mesh_core::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use mesh_core::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

/// One resource as served: its version and its encoded form.
#[derive(Clone, Debug, PartialEq)]
pub struct Served {
    pub version: String,
    pub resource: prost_types::Any,
}

/// Everything served, by type URL then resource name.
pub type Snapshot = BTreeMap<String, BTreeMap<String, Served>>;

impl Served {
    /// Wraps `message`; the version is derived from its bytes, so equal content keeps its
    /// version across restarts of the controller.
    pub fn new(type_url: &str, message: &impl prost::Message) -> Self {
        let value = message.encode_to_vec();
        Served {
            version: version_of(&value),
            resource: prost_types::Any {
                type_url: type_url.to_owned(),
                value,
            },
        }
    }
}

/// FNV-1a of the bytes, as hex: cheap and stable.
fn version_of(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[derive(Clone)]
pub struct XdsMetrics {
    connected: Gauge,
    pushes: Counter,
    nacks: Counter,
}

impl XdsMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = XdsMetrics {
            connected: Gauge::default(),
            pushes: Counter::default(),
            nacks: Counter::default(),
        };
        registry.register("pilot_xds", "Connected xDS clients", m.connected.clone());
        registry.register("pilot_xds_pushes", "Responses sent", m.pushes.clone());
        registry.register(
            "mesh_xds_nacks",
            "Responses a proxy rejected",
            m.nacks.clone(),
        );
        m
    }

    pub fn connected(&self) -> i64 {
        self.connected.get()
    }

    pub fn nacks(&self) -> u64 {
        self.nacks.get()
    }
}

pub struct XdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    metrics: XdsMetrics,
    nonces: Arc<AtomicU64>,
}

impl XdsServer {
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>, metrics: XdsMetrics) -> Self {
        XdsServer {
            snapshots,
            metrics,
            nonces: Arc::new(AtomicU64::new(1)),
        }
    }
}

/// What one stream knows about one type.
#[derive(Default)]
struct Subscription {
    /// Resource versions the proxy holds (or was just sent).
    held: BTreeMap<String, String>,
    /// Answered once already (the first request always gets a response).
    answered: bool,
}

struct Stream_ {
    node: String,
    types: BTreeMap<String, Subscription>,
    out: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    nonces: Arc<AtomicU64>,
    metrics: XdsMetrics,
}

impl Stream_ {
    fn on_request(&mut self, req: DeltaDiscoveryRequest, snap: &Snapshot) -> bool {
        if let Some(node) = &req.node {
            self.node = node.id.clone();
        }
        if !req.response_nonce.is_empty() {
            if let Some(err) = &req.error_detail {
                self.metrics.nacks.inc();
                warn!(node = %self.node, type_url = %req.type_url, nonce = %req.response_nonce,
                      "proxy rejected a push: {}", err.message);
            } else {
                debug!(node = %self.node, nonce = %req.response_nonce, "ACK");
            }
            if self.types.contains_key(&req.type_url) {
                return true;
            }
        }
        let sub = self.types.entry(req.type_url.clone()).or_default();
        if !sub.answered {
            sub.held = req.initial_resource_versions.clone();
        }
        for name in &req.resource_names_unsubscribe {
            sub.held.remove(name);
        }
        self.push(&req.type_url, snap)
    }

    /// Sends what `type_url` lacks; false when the proxy has gone.
    fn push(&mut self, type_url: &str, snap: &Snapshot) -> bool {
        let Some(sub) = self.types.get_mut(type_url) else {
            return true;
        };
        let empty = BTreeMap::new();
        let current = snap.get(type_url).unwrap_or(&empty);
        let resources: Vec<Resource> = current
            .iter()
            .filter(|(name, s)| sub.held.get(*name) != Some(&s.version))
            .map(|(name, s)| Resource {
                name: name.clone(),
                version: s.version.clone(),
                resource: Some(s.resource.clone()),
                ..Default::default()
            })
            .collect();
        let removed: Vec<String> = sub
            .held
            .keys()
            .filter(|name| !current.contains_key(*name))
            .cloned()
            .collect();
        if resources.is_empty() && removed.is_empty() && sub.answered {
            return true;
        }
        sub.answered = true;
        for r in &resources {
            sub.held.insert(r.name.clone(), r.version.clone());
        }
        for name in &removed {
            sub.held.remove(name);
        }
        let nonce = self.nonces.fetch_add(1, Ordering::Relaxed).to_string();
        debug!(node = %self.node, type_url, changed = resources.len(), removed = removed.len(), %nonce, "push");
        self.metrics.pushes.inc();
        let resp = DeltaDiscoveryResponse {
            type_url: type_url.to_owned(),
            resources,
            removed_resources: removed,
            nonce,
            ..Default::default()
        };
        self.out.try_send(Ok(resp)).is_ok()
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let mut snapshots = self.snapshots.clone();
        let metrics = self.metrics.clone();
        let mut stream = Stream_ {
            node: String::new(),
            types: BTreeMap::new(),
            out: tx,
            nonces: self.nonces.clone(),
            metrics: metrics.clone(),
        };
        metrics.connected.inc();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    next = incoming.next() => match next {
                        Some(Ok(req)) => {
                            let snap = snapshots.borrow_and_update().clone();
                            if !stream.on_request(req, &snap) { break; }
                        }
                        Some(Err(e)) => { debug!(node = %stream.node, "stream ended: {e}"); break; }
                        None => break,
                    },
                    changed = snapshots.changed() => {
                        if changed.is_err() { break; }
                        let snap = snapshots.borrow_and_update().clone();
                        let types: Vec<String> = stream.types.keys().cloned().collect();
                        if !types.iter().all(|t| stream.push(t, &snap)) { break; }
                    }
                }
            }
            info!(node = %stream.node, "xDS client disconnected");
            metrics.connected.dec();
        });
        let out = ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(out) as ResponseStream))
    }
}

#[cfg(test)]
mod tests;
