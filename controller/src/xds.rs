//! The delta ADS server (`envoy.service.discovery.v3.AggregatedDiscoveryService/
//! DeltaAggregatedResources`): each proxy subscribes per type (wildcard), gets everything
//! it lacks, then only what changed or was removed. Responses carry nonces; an ACK or NACK
//! names one. A NACK is logged and counted and nothing is resent until the resource
//! changes again: the proxy keeps what it had. A reconnecting proxy states the versions it
//! holds (`initial_resource_versions`) and receives only the difference. A large push (a
//! new proxy's first, in a large mesh) is cut into several responses, each ACKed on its
//! own.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use mesh_core::proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

pub mod status;
pub mod wire;

pub use wire::{AdsService, EncodedResponse};

/// One resource as served: its version and its encoded form (shared by the snapshots
/// and pushes that carry it, copied only into a response being written).
#[derive(Clone, Debug, PartialEq)]
pub struct Served {
    pub version: String,
    pub resource: Arc<prost_types::Any>,
}

/// The resources of one type, by name.
pub type Resources = BTreeMap<String, Served>;

/// Everything served, by type URL, and when the model it came from changed. Each type's
/// resources are shared (never copied) by every stream that was sent them.
#[derive(Debug)]
pub struct Snapshot {
    types: BTreeMap<String, Arc<Resources>>,
    changed: Instant,
}

impl Snapshot {
    /// `changed`: when the model change this snapshot carries was seen, for
    /// `mesh_xds_push_seconds`.
    pub fn new(types: impl IntoIterator<Item = (String, Resources)>, changed: Instant) -> Self {
        Snapshot {
            types: types.into_iter().map(|(t, r)| (t, Arc::new(r))).collect(),
            changed,
        }
    }

    pub fn resources(&self, type_url: &str) -> Option<&Arc<Resources>> {
        self.types.get(type_url)
    }
}

impl Served {
    /// Wraps `message`; the version is derived from its bytes, so equal content keeps its
    /// version across restarts of the controller.
    pub fn new(type_url: &str, message: &impl prost::Message) -> Self {
        let value = message.encode_to_vec();
        Served {
            version: version_of(&value),
            resource: Arc::new(prost_types::Any {
                type_url: type_url.to_owned(),
                value,
            }),
        }
    }

    fn encode(&self, name: &str) -> Bytes {
        wire::encode_resource(name, &self.version, &self.resource)
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
    push_time: Histogram,
}

impl XdsMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = XdsMetrics {
            connected: Gauge::default(),
            pushes: Counter::default(),
            nacks: Counter::default(),
            push_time: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        };
        registry.register("pilot_xds", "Connected xDS clients", m.connected.clone());
        registry.register("pilot_xds_pushes", "Responses sent", m.pushes.clone());
        registry.register(
            "mesh_xds_nacks",
            "Responses a proxy rejected",
            m.nacks.clone(),
        );
        registry.register(
            "mesh_xds_push_seconds",
            "From a model change to its response handed to the proxy's stream",
            m.push_time.clone(),
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

/// What changed between two versions of one type's resources, and where it is cut into
/// responses. Resources are held encoded (`Resource` messages), made once per delta and
/// shared by every stream that sends it.
#[derive(Debug)]
struct Delta {
    resources: Vec<Bytes>,
    removed: Vec<String>,
    /// The end (in `resources`) of each response; the removals go with the first.
    ends: Vec<usize>,
}

impl Default for Delta {
    fn default() -> Self {
        Delta {
            resources: Vec::new(),
            removed: Vec::new(),
            ends: vec![0],
        }
    }
}

/// Encoded resources per response, past which a push is cut into several (the initial
/// push of a large mesh): each stream then holds one such response at a time while it is
/// encoded and written, rather than the whole push.
const RESPONSE_BYTES: usize = 128 << 10;

impl Delta {
    fn is_empty(&self) -> bool {
        self.resources.is_empty() && self.removed.is_empty()
    }

    /// Cuts the resources into responses of at most [`RESPONSE_BYTES`] (or one resource).
    fn cut(mut self) -> Delta {
        self.ends.clear();
        let mut bytes = 0;
        for (i, r) in self.resources.iter().enumerate() {
            // Exact: the field's tag, length and bytes.
            let len = prost::encoding::bytes::encoded_len(2, r);
            if bytes > 0 && bytes + len > RESPONSE_BYTES {
                self.ends.push(i);
                bytes = 0;
            }
            bytes += len;
        }
        self.ends.push(self.resources.len());
        self
    }

    /// Response `i` of the push (`None` past the last).
    fn response(&self, i: usize, type_url: &str, nonce: String) -> Option<EncodedResponse> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(EncodedResponse {
            system_version_info: mesh_core::xds::part_marker(i, self.ends.len()),
            type_url: type_url.to_owned(),
            resources: self.resources[start..end].to_vec(),
            removed_resources: if i == 0 {
                self.removed.clone()
            } else {
                Vec::new()
            },
            nonce,
        })
    }

    /// Merge walk of two sorted maps.
    fn between(from: &Resources, to: &Resources) -> Delta {
        let mut delta = Delta::default();
        let (mut old, mut new) = (from.iter().peekable(), to.iter().peekable());
        loop {
            match (old.peek(), new.peek()) {
                (None, None) => return delta.cut(),
                (Some((name, _)), None) => {
                    delta.removed.push((*name).clone());
                    old.next();
                }
                (None, Some((name, s))) => {
                    delta.resources.push(s.encode(name));
                    new.next();
                }
                (Some((o, os)), Some((n, ns))) => match o.cmp(n) {
                    std::cmp::Ordering::Less => {
                        delta.removed.push((*o).clone());
                        old.next();
                    }
                    std::cmp::Ordering::Greater => {
                        delta.resources.push(ns.encode(n));
                        new.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if os.version != ns.version {
                            delta.resources.push(ns.encode(n));
                        }
                        old.next();
                        new.next();
                    }
                },
            }
        }
    }

    /// Against versions a proxy stated rather than ones we sent.
    fn from_stated(held: &BTreeMap<String, String>, to: &Resources) -> Delta {
        Delta {
            resources: to
                .iter()
                .filter(|(name, s)| held.get(*name) != Some(&s.version))
                .map(|(name, s)| s.encode(name))
                .collect(),
            removed: held
                .keys()
                .filter(|name| !to.contains_key(*name))
                .cloned()
                .collect(),
            ends: Vec::new(),
        }
        .cut()
    }
}

/// Deltas between recent snapshots, computed once and shared by every stream that makes
/// the same step (the usual case: all proxies were in sync before a change).
#[derive(Default)]
struct Deltas {
    recent: Mutex<VecDeque<Step>>,
}

/// From, to, and what changed between them.
type Step = (Arc<Resources>, Arc<Resources>, Arc<Delta>);

/// Steps kept: a few per type, so streams a change or two behind still share.
const DELTAS_KEPT: usize = 8;

impl Deltas {
    fn between(&self, from: &Arc<Resources>, to: &Arc<Resources>) -> Arc<Delta> {
        // Held while computing, so concurrent streams wait for the one result.
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let hit = recent
            .iter()
            .find(|(f, t, _)| Arc::ptr_eq(f, from) && Arc::ptr_eq(t, to));
        if let Some((_, _, delta)) = hit {
            return delta.clone();
        }
        let delta = Arc::new(Delta::between(from, to));
        if recent.len() == DELTAS_KEPT {
            recent.pop_front();
        }
        // The Arcs kept here also keep the pointers compared above from being reused.
        recent.push_back((from.clone(), to.clone(), delta.clone()));
        delta
    }
}

pub struct XdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    metrics: XdsMetrics,
    shared: Arc<Shared>,
    status: status::Statuses,
}

/// What every stream of one server shares.
struct Shared {
    nonces: AtomicU64,
    deltas: Deltas,
    /// Where a new wildcard subscription starts, so its full push is computed once too.
    empty: Arc<Resources>,
}

impl XdsServer {
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>, metrics: XdsMetrics) -> Self {
        XdsServer {
            status: status::Statuses::new(snapshots.clone()),
            snapshots,
            metrics,
            shared: Arc::new(Shared {
                nonces: AtomicU64::new(1),
                deltas: Deltas::default(),
                empty: Arc::new(Resources::new()),
            }),
        }
    }

    /// The connected proxies and how far each has followed, for `/debug/syncz`.
    pub fn status(&self) -> status::Statuses {
        self.status.clone()
    }
}

/// The resource versions a proxy holds of one type.
enum Held {
    /// Exactly a snapshot's resources, which we sent (ACKed or NACKed: either way the
    /// proxy is not sent them again until they change).
    Sent(Arc<Resources>),
    /// What the proxy stated on connecting, or what is left after unsubscribes.
    Stated(BTreeMap<String, String>),
}

impl Held {
    fn remove(&mut self, names: &[String]) {
        if names.is_empty() {
            return;
        }
        let mut map = match self {
            Held::Sent(r) => r
                .iter()
                .map(|(n, s)| (n.clone(), s.version.clone()))
                .collect(),
            Held::Stated(m) => std::mem::take(m),
        };
        for name in names {
            map.remove(name);
        }
        *self = Held::Stated(map);
    }
}

/// What one stream knows about one type.
struct Subscription {
    held: Held,
    /// Answered once already (the first request always gets a response).
    answered: bool,
}

/// A push of one type waiting for the transport, which turns it into responses one at a
/// time as it writes them; for pushes caused by a model change, when that change was seen.
struct Outgoing {
    node: String,
    /// What the proxy holds once it has taken every response of this push.
    held: Arc<Resources>,
    recorder: status::SentRecorder,
    type_url: String,
    delta: Arc<Delta>,
    changed: Option<Instant>,
}

/// The responses of one push, made as the transport asks for them.
struct Responses {
    push: Outgoing,
    next: usize,
    shared: Arc<Shared>,
    metrics: XdsMetrics,
}

impl Iterator for Responses {
    type Item = Result<EncodedResponse, Status>;

    fn next(&mut self) -> Option<Self::Item> {
        let push = &self.push;
        if self.next == push.delta.ends.len() {
            return None;
        }
        let nonce = self.shared.nonces.fetch_add(1, Ordering::Relaxed);
        let resp = push
            .delta
            .response(self.next, &push.type_url, nonce.to_string())?;
        self.next += 1;
        push.recorder
            .sent(&push.type_url, &nonce.to_string(), &push.held);
        debug!(node = %push.node, type_url = %push.type_url, changed = resp.resources.len(),
               removed = resp.removed_resources.len(), %nonce, "push");
        self.metrics.pushes.inc();
        // Timed when the transport takes the response to write it.
        if let Some(changed) = push.changed {
            self.metrics
                .push_time
                .observe(changed.elapsed().as_secs_f64());
        }
        Some(Ok(resp))
    }
}

struct Stream_ {
    node: String,
    types: BTreeMap<String, Subscription>,
    out: mpsc::Sender<Outgoing>,
    shared: Arc<Shared>,
    metrics: XdsMetrics,
    status: status::Tracked,
}

impl Stream_ {
    fn on_request(&mut self, req: DeltaDiscoveryRequest, snap: &Snapshot) -> bool {
        self.status.request(&req);
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
        let empty = &self.shared.empty;
        let sub = self
            .types
            .entry(req.type_url.clone())
            .or_insert_with(|| Subscription {
                held: if req.initial_resource_versions.is_empty() {
                    Held::Sent(empty.clone())
                } else {
                    Held::Stated(req.initial_resource_versions.clone())
                },
                answered: false,
            });
        sub.held.remove(&req.resource_names_unsubscribe);
        self.push(&req.type_url, snap, None)
    }

    /// Sends what `type_url` lacks; false when the proxy has gone. `changed`: when the
    /// model change behind this push was seen.
    fn push(&mut self, type_url: &str, snap: &Snapshot, changed: Option<Instant>) -> bool {
        let Some(sub) = self.types.get_mut(type_url) else {
            return true;
        };
        let current = snap
            .resources(type_url)
            .unwrap_or(&self.shared.empty)
            .clone();
        let delta = match &sub.held {
            Held::Sent(prev) if Arc::ptr_eq(prev, &current) => Arc::new(Delta::default()),
            Held::Sent(prev) => self.shared.deltas.between(prev, &current),
            Held::Stated(held) => Arc::new(Delta::from_stated(held, &current)),
        };
        sub.held = Held::Sent(current.clone());
        if delta.is_empty() && sub.answered {
            return true;
        }
        sub.answered = true;
        let push = Outgoing {
            node: self.node.clone(),
            held: current.clone(),
            recorder: self.status.recorder(),
            type_url: type_url.to_owned(),
            delta,
            changed,
        };
        self.out.try_send(push).is_ok()
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<EncodedResponse, Status>> + Send>>;

impl XdsServer {
    /// One proxy's delta ADS stream (`wire::AdsService` calls this).
    fn open(&self, request: Request<Streaming<DeltaDiscoveryRequest>>) -> Response<ResponseStream> {
        let tracked = self.status.open(request.remote_addr());
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let mut snapshots = self.snapshots.clone();
        let metrics = self.metrics.clone();
        let mut stream = Stream_ {
            node: String::new(),
            types: BTreeMap::new(),
            out: tx,
            shared: self.shared.clone(),
            metrics: metrics.clone(),
            status: tracked,
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
                        if !types.iter().all(|t| stream.push(t, &snap, Some(snap.changed))) { break; }
                    }
                }
            }
            info!(node = %stream.node, "xDS client disconnected");
            metrics.connected.dec();
        });
        let (shared, metrics) = (self.shared.clone(), self.metrics.clone());
        let out = futures_util::StreamExt::flat_map(ReceiverStream::new(rx), move |push| {
            futures_util::stream::iter(Responses {
                push,
                next: 0,
                shared: shared.clone(),
                metrics: metrics.clone(),
            })
        });
        Response::new(Box::pin(out) as ResponseStream)
    }
}

#[cfg(test)]
mod tests;
