//! The capture manager: on each config snapshot (and on a timer, for pods whose veth
//! appears after their config), works out this node's pods, finds each one's node-side
//! interface by route lookup and the uplinks from the default route, and changes only
//! what differs through the `Backend`. Failures are logged and counted, never fatal;
//! the next pass retries. Everything is detached when the ztunnel stops.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use mesh_core::admin::Readiness;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tracing::{info, warn};

use super::plan::{self, Change, Iface, LocalPod, Wanted};
use super::routing::NodeRouting;
use super::{cmd, Backend, CaptureError, CaptureMode};
use crate::model::Snapshot;

const READY_KEY: &str = "capture";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    operation: &'static str,
}

#[derive(Clone, Debug, Default)]
pub struct CaptureMetrics {
    errors: Family<OpLabels, Counter>,
    interfaces: Gauge,
}

impl CaptureMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = CaptureMetrics::default();
        registry.register(
            "ztunnel_capture_errors",
            "Capture operations that failed (retried on the next pass), by operation",
            m.errors.clone(),
        );
        registry.register(
            "ztunnel_capture_interfaces",
            "Interfaces attached for capture",
            m.interfaces.clone(),
        );
        m
    }

    fn error(&self, operation: &'static str, e: &CaptureError) {
        warn!(operation, "capture: {e}");
        self.errors.get_or_create(&OpLabels { operation }).inc();
    }
}

/// What `/config_dump` shows under `capture`.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaptureDump {
    pub mode: CaptureMode,
    pub interfaces: Vec<AttachedIface>,
    pub local_ambient: Vec<Ipv4Addr>,
    /// Local pods whose interface is not there yet (retried).
    pub pending: Vec<String>,
    /// Pods that cannot be captured as wired (reported, not retried until config changes).
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AttachedIface {
    pub ifindex: u32,
    #[serde(flatten)]
    pub wanted: Wanted,
}

pub struct Capture {
    mode: CaptureMode,
    node: String,
    metrics: CaptureMetrics,
    /// Blocked on "capture" until the first pass is done.
    readiness: Readiness,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// `None` once shut down.
    backend: Option<Box<dyn Backend>>,
    routing: Option<NodeRouting>,
    attached: BTreeMap<u32, Wanted>,
    ambient: BTreeSet<Ipv4Addr>,
    /// (uid, ip) -> interface, so a pass only looks up routes of pods it has not placed.
    resolved: HashMap<(String, Ipv4Addr), Iface>,
    pending: Vec<String>,
    problems: Vec<String>,
    last: Option<Arc<Snapshot>>,
}

impl Capture {
    pub fn new(
        mode: CaptureMode,
        node: &str,
        backend: Box<dyn Backend>,
        routing: NodeRouting,
        metrics: CaptureMetrics,
        readiness: Readiness,
    ) -> Self {
        readiness.block(READY_KEY);
        Capture {
            mode,
            node: node.to_owned(),
            metrics,
            readiness,
            inner: Mutex::new(Inner {
                backend: Some(backend),
                routing: Some(routing),
                ..Inner::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the attachments in line with `snap`. Blocking (runs `ip`/`iptables`).
    pub fn reconcile(&self, snap: Arc<Snapshot>) {
        let mut inner = self.lock();
        inner.last = Some(snap);
        self.pass(&mut inner);
    }

    /// Re-runs the last pass: picks up veths that appeared (or were replaced) since.
    pub fn refresh(&self) {
        let mut inner = self.lock();
        self.pass(&mut inner);
    }

    fn pass(&self, inner: &mut Inner) {
        let Some(snap) = inner.last.clone() else {
            return;
        };
        if inner.backend.is_none() {
            return;
        }
        let (links, uplinks) = match links_and_uplinks() {
            Ok(l) => l,
            Err(e) => return self.metrics.error("list_interfaces", &e),
        };
        let pods = plan::local_pods(&snap, &self.node);
        let (placed, pending) = self.place(inner, pods, &links, &uplinks);
        let (want, problems) = plan::desired(&placed, &uplinks);
        let ambient: BTreeSet<Ipv4Addr> = (placed.iter())
            .filter(|(p, _)| p.ambient)
            .map(|(p, _)| p.ip)
            .collect();
        self.apply(inner, &want, &ambient);
        for p in problems.iter().filter(|p| !inner.problems.contains(p)) {
            self.metrics.error("unsupported_wiring", &unsupported(p));
        }
        inner.problems = problems;
        inner.pending = pending;
        self.metrics.interfaces.set(inner.attached.len() as i64);
        self.readiness.unblock(READY_KEY);
    }

    /// Each pod with its interface, and the names of pods not wired yet.
    fn place(
        &self,
        inner: &mut Inner,
        pods: Vec<LocalPod>,
        links: &HashMap<String, u32>,
        uplinks: &[Iface],
    ) -> (Vec<(LocalPod, Iface)>, Vec<String>) {
        let mut resolved = HashMap::new();
        let (mut placed, mut pending) = (Vec::new(), Vec::new());
        for pod in pods {
            let key = (pod.uid.clone(), pod.ip);
            let known = (inner.resolved.get(&key))
                .filter(|i| links.get(&i.name) == Some(&i.ifindex))
                .cloned();
            let iface = match known {
                Some(i) => Some(i),
                None => resolve(pod.ip, links, uplinks).unwrap_or_else(|e| {
                    self.metrics.error("route_lookup", &e);
                    None
                }),
            };
            match iface {
                Some(i) => {
                    resolved.insert(key, i.clone());
                    placed.push((pod, i));
                }
                None => pending.push(pod.name),
            }
        }
        inner.resolved = resolved;
        (placed, pending)
    }

    fn apply(&self, inner: &mut Inner, want: &BTreeMap<u32, Wanted>, ambient: &BTreeSet<Ipv4Addr>) {
        let Inner {
            backend: Some(backend),
            routing: Some(routing),
            attached,
            ambient: current,
            ..
        } = inner
        else {
            return;
        };
        let roles = |m: &BTreeMap<u32, Wanted>| m.iter().map(|(i, w)| (*i, w.role)).collect();
        let changes = plan::diff_ifaces(&roles(attached), &roles(want));
        for change in changes.iter().filter(|c| matches!(c, Change::Detach(_))) {
            let Change::Detach(ifindex) = *change else {
                continue;
            };
            match backend.detach(ifindex) {
                Ok(()) => {
                    if let Some(w) = attached.remove(&ifindex) {
                        routing.restore_rp_filter(&w.name);
                        info!(iface = %w.name, role = ?w.role, "capture detached");
                    }
                }
                Err(e) => self.metrics.error("detach", &e),
            }
        }
        let (leave, join) = plan::diff_ambient(current, ambient);
        for ip in leave {
            let done = backend.set_local_ambient(ip, false);
            match done.and_then(|()| routing.set_local_hbone(ip, false)) {
                Ok(()) => drop(current.remove(&ip)),
                Err(e) => self.metrics.error("set_local_ambient", &e),
            }
        }
        for ip in join {
            let done = backend.set_local_ambient(ip, true);
            match done.and_then(|()| routing.set_local_hbone(ip, true)) {
                Ok(()) => drop(current.insert(ip)),
                Err(e) => self.metrics.error("set_local_ambient", &e),
            }
        }
        for change in changes {
            let Change::Attach(ifindex, role) = change else {
                continue;
            };
            let w = &want[&ifindex];
            if let Err(e) = routing.loosen_rp_filter(&w.name) {
                self.metrics.error("rp_filter", &e);
            }
            match backend.attach(ifindex, role) {
                Ok(()) => {
                    info!(iface = %w.name, ?role, pods = ?w.pods, "capture attached");
                    attached.insert(ifindex, w.clone());
                }
                Err(e) => self.metrics.error("attach", &e),
            }
        }
        // Same role, maybe other pods behind it: keep the dump's pod lists current.
        for (ifindex, w) in attached.iter_mut() {
            if let Some(new) = want.get(ifindex).filter(|n| n.role == w.role) {
                *w = new.clone();
            }
        }
    }

    /// Detaches everything, removes the backend's rules and the node routing. Idempotent.
    pub fn shutdown(&self) {
        let mut inner = self.lock();
        if let Some(mut backend) = inner.backend.take() {
            for ifindex in std::mem::take(&mut inner.attached).into_keys() {
                if let Err(e) = backend.detach(ifindex) {
                    self.metrics.error("detach", &e);
                }
            }
            for ip in std::mem::take(&mut inner.ambient) {
                if let Err(e) = backend.set_local_ambient(ip, false) {
                    self.metrics.error("set_local_ambient", &e);
                }
            }
            drop(backend);
        }
        if let Some(mut routing) = inner.routing.take() {
            routing.teardown();
        }
        self.metrics.interfaces.set(0);
    }

    pub fn dump(&self) -> CaptureDump {
        let inner = self.lock();
        CaptureDump {
            mode: self.mode,
            interfaces: (inner.attached.iter())
                .map(|(i, w)| AttachedIface {
                    ifindex: *i,
                    wanted: w.clone(),
                })
                .collect(),
            local_ambient: inner.ambient.iter().copied().collect(),
            pending: inner.pending.clone(),
            problems: inner.problems.clone(),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn unsupported(problem: &str) -> CaptureError {
    CaptureError::Unsupported {
        problem: problem.to_owned(),
    }
}

fn links_and_uplinks() -> Result<(HashMap<String, u32>, Vec<Iface>), CaptureError> {
    let links = cmd::links()?;
    let uplinks = (cmd::default_devs()?.into_iter())
        .filter_map(|name| {
            let ifindex = *links.get(&name)?;
            Some(Iface { ifindex, name })
        })
        .collect();
    Ok((links, uplinks))
}

/// The node-side interface `pod` routes through; `None` while it routes through an uplink
/// or loopback (its veth is not there yet, or it is on the host network).
fn resolve(
    pod: Ipv4Addr,
    links: &HashMap<String, u32>,
    uplinks: &[Iface],
) -> Result<Option<Iface>, CaptureError> {
    let name = cmd::route_dev(IpAddr::V4(pod))?;
    if name == "lo" || uplinks.iter().any(|u| u.name == name) {
        return Ok(None);
    }
    Ok(links.get(&name).map(|&ifindex| Iface { ifindex, name }))
}
