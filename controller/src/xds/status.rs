//! How far each connected proxy has followed the delta ADS server, for `/debug/syncz` and
//! `meshctl proxy-status`: per stream the node id, peer and connect time; per type the
//! resource set the proxy last ACKed, the last nonce sent and ACKed, and the last NACK.
//!
//! It only observes: the server calls [`Tracked::request`] and [`Tracked::sent`] and
//! nothing here changes what is pushed. The hooks are O(1) (one uncontended lock of the
//! stream's own state, an `Arc` clone); digests of the ACKed sets are computed only when
//! someone asks for the report.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use mesh_core::proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::debug;

use super::{Resources, Snapshot};

/// Responses remembered per type until the proxy answers them. The newest is always kept,
/// so an ACK of the latest push is always resolved; a proxy that never answers costs no
/// more than this.
const PENDING_KEPT: usize = 16;

/// Every open stream of one server. Cheap to clone.
#[derive(Clone)]
pub struct Statuses {
    inner: Arc<Inner>,
}

struct Inner {
    streams: Mutex<BTreeMap<u64, Arc<Mutex<StreamState>>>>,
    next_id: AtomicU64,
    /// What is served now, to tell SYNCED from STALE.
    snapshots: watch::Receiver<Arc<Snapshot>>,
}

/// One stream's entry; removed from the report when dropped (the stream ended).
pub struct Tracked {
    id: u64,
    state: Arc<Mutex<StreamState>>,
    owner: Arc<Inner>,
}

struct StreamState {
    node: String,
    peer: Option<SocketAddr>,
    connected: Instant,
    connected_at: SystemTime,
    types: BTreeMap<String, TypeState>,
}

#[derive(Default)]
struct TypeState {
    /// Responses sent and not yet answered: nonce and what the proxy holds once it has
    /// applied that response. Oldest first.
    pending: VecDeque<(String, Arc<Resources>)>,
    acked: Option<Arc<Resources>>,
    last_sent: Option<String>,
    last_acked: Option<String>,
    last_nack: Option<Nack>,
}

struct Nack {
    nonce: String,
    message: String,
    at: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Statuses {
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>) -> Self {
        Statuses {
            inner: Arc::new(Inner {
                streams: Mutex::new(BTreeMap::new()),
                next_id: AtomicU64::new(1),
                snapshots,
            }),
        }
    }

    /// Registers a new stream from `peer` (unknown for connections whose transport does
    /// not say).
    pub fn open(&self, peer: Option<SocketAddr>) -> Tracked {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(Mutex::new(StreamState {
            node: String::new(),
            peer,
            connected: Instant::now(),
            connected_at: SystemTime::now(),
            types: BTreeMap::new(),
        }));
        lock(&self.inner.streams).insert(id, state.clone());
        Tracked {
            id,
            state,
            owner: self.inner.clone(),
        }
    }

    /// Every connected proxy, oldest stream first, compared with what is served now.
    pub fn report(&self) -> Report {
        let streams: Vec<_> = lock(&self.inner.streams).values().cloned().collect();
        let snap = self.inner.snapshots.borrow().clone();
        let mut digests = Digests::default();
        let proxies = streams
            .iter()
            .map(|s| lock(s).status(&snap, &mut digests))
            .collect();
        Report { proxies }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        lock(&self.owner.streams).remove(&self.id);
    }
}

impl Tracked {
    /// Notes the node id (from the first request that names one) and any ACK or NACK.
    pub fn request(&self, req: &DeltaDiscoveryRequest) {
        let mut state = lock(&self.state);
        if state.node.is_empty() {
            if let Some(node) = &req.node {
                state.node = node.id.clone();
            }
        }
        let t = state.types.entry(req.type_url.clone()).or_default();
        if req.response_nonce.is_empty() {
            return;
        }
        let nonce = &req.response_nonce;
        let answered = t.pending.iter().position(|(n, _)| n == nonce);
        match &req.error_detail {
            Some(err) => {
                t.last_nack = Some(Nack {
                    nonce: nonce.clone(),
                    message: err.message.clone(),
                    at: Instant::now(),
                });
                // What the proxy holds after a rejection is unknown; it keeps its last ACK.
                if let Some(i) = answered {
                    t.pending.drain(..=i);
                }
            }
            None => {
                t.last_acked = Some(nonce.clone());
                match answered {
                    Some(i) => t.acked = t.pending.drain(..=i).next_back().map(|(_, r)| r),
                    None => debug!(%nonce, "ACK of a response no longer remembered"),
                }
            }
        }
    }

    /// Notes a response sent with `nonce`, after which the proxy holds `held`.
    pub fn sent(&self, type_url: &str, nonce: &str, held: &Arc<Resources>) {
        self.recorder().sent(type_url, nonce, held)
    }

    /// A handle that records responses as the transport writes them.
    pub fn recorder(&self) -> SentRecorder {
        SentRecorder(self.state.clone())
    }
}

/// Records pushed responses into one stream's entry (see [`Tracked::recorder`]).
#[derive(Clone)]
pub struct SentRecorder(Arc<Mutex<StreamState>>);

impl SentRecorder {
    pub fn sent(&self, type_url: &str, nonce: &str, held: &Arc<Resources>) {
        let mut state = lock(&self.0);
        let t = state.types.entry(type_url.to_owned()).or_default();
        if t.pending.len() == PENDING_KEPT {
            t.pending.pop_front();
        }
        t.pending.push_back((nonce.to_owned(), held.clone()));
        t.last_sent = Some(nonce.to_owned());
    }
}

/// Digests by resource set, computed once per report for sets many streams share. The
/// `Arc` is kept so its address cannot be reused by another set within the report.
#[derive(Default)]
struct Digests(HashMap<usize, (Arc<Resources>, String)>);

impl Digests {
    fn of(&mut self, r: &Arc<Resources>) -> String {
        let key = Arc::as_ptr(r) as usize;
        let entry = self.0.entry(key).or_insert_with(|| (r.clone(), digest(r)));
        entry.1.clone()
    }
}

/// FNV-1a over the sorted `name`, `version` pairs: equal sets, equal digests.
pub fn digest(resources: &Resources) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, served) in resources {
        for part in [name.as_bytes(), &[0], served.version.as_bytes(), &[0]] {
            for b in part {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    format!("{h:016x}")
}

impl StreamState {
    fn status(&self, snap: &Snapshot, digests: &mut Digests) -> ProxyStatus {
        let empty = Arc::new(Resources::new());
        let types = self
            .types
            .iter()
            .map(|(type_url, t)| {
                let serving = snap.resources(type_url).unwrap_or(&empty);
                (type_url.clone(), t.status(serving, digests))
            })
            .collect();
        ProxyStatus {
            node: self.node.clone(),
            address: self.peer.map(|p| p.to_string()),
            connected_seconds: self.connected.elapsed().as_secs_f64(),
            connected_at: self
                .connected_at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            types,
        }
    }
}

impl TypeState {
    fn status(&self, serving: &Arc<Resources>, digests: &mut Digests) -> TypeStatus {
        let serving_digest = digests.of(serving);
        let acked_digest = self.acked.as_ref().map(|r| digests.of(r));
        let nacked_last = matches!((&self.last_sent, &self.last_nack),
            (Some(sent), Some(n)) if *sent == n.nonce);
        let state = if nacked_last {
            SyncState::Nacked
        } else if self.last_sent.is_some()
            && self.last_sent == self.last_acked
            && acked_digest.as_ref() == Some(&serving_digest)
        {
            SyncState::Synced
        } else {
            SyncState::Stale
        };
        TypeStatus {
            state,
            acked: self.acked.as_ref().map_or(0, |r| r.len()),
            serving: serving.len(),
            acked_digest,
            serving_digest,
            last_sent_nonce: self.last_sent.clone(),
            last_acked_nonce: self.last_acked.clone(),
            last_nack: self.last_nack.as_ref().map(|n| NackStatus {
                nonce: n.nonce.clone(),
                message: n.message.clone(),
                seconds_ago: n.at.elapsed().as_secs_f64(),
            }),
        }
    }
}

/// The body of `/debug/syncz`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub proxies: Vec<ProxyStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProxyStatus {
    /// The node id the proxy sent (`ztunnel~<ip>~<node>` for our ztunnel); empty if none.
    pub node: String,
    /// The peer's socket address, when the transport gives it.
    #[serde(default)]
    pub address: Option<String>,
    pub connected_seconds: f64,
    /// Unix seconds.
    pub connected_at: u64,
    /// By type URL, the types the proxy subscribed to.
    pub types: BTreeMap<String, TypeStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TypeStatus {
    pub state: SyncState,
    /// Resources in the set the proxy last ACKed.
    pub acked: usize,
    /// Resources served now.
    pub serving: usize,
    #[serde(default)]
    pub acked_digest: Option<String>,
    pub serving_digest: String,
    #[serde(default)]
    pub last_sent_nonce: Option<String>,
    #[serde(default)]
    pub last_acked_nonce: Option<String>,
    #[serde(default)]
    pub last_nack: Option<NackStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NackStatus {
    pub nonce: String,
    pub message: String,
    pub seconds_ago: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SyncState {
    /// The proxy ACKed the latest push and holds exactly what is served now.
    Synced,
    /// A push is not ACKed yet, or what is served changed since the last ACK.
    Stale,
    /// The proxy rejected the latest push.
    Nacked,
}

impl std::fmt::Display for SyncState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SyncState::Synced => "SYNCED",
            SyncState::Stale => "STALE",
            SyncState::Nacked => "NACKED",
        })
    }
}
