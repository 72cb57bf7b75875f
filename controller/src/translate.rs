//! Translation of the object model into the resources proxies receive over xDS:
//! `istio.workload.Address` (one Workload per pod, one Service per Kubernetes Service, each
//! with its waypoint, `waypoint`), `istio.security.Authorization` (from
//! AuthorizationPolicy and PeerAuthentication) and the waypoints' own `mesh.l7.v1` types
//! (`l7`).
//!
//! A pod backs the Services that select it, and the Services without a selector whose
//! EndpointSlices list its IP; slice addresses that match no pod are logged and left out
//! (endpoints outside the cluster's pods are not modelled yet).
//!
//! Enrolment: a pod is in the mesh (HBONE) when its namespace or the pod itself carries
//! `istio.io/dataplane-mode=ambient` and the pod does not say `none`; other pods are sent
//! too, with no tunnel, so clients in the mesh reach them in plaintext.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_core::proto::istio::workload::{
    address, Address, NetworkAddress, Port, PortList, Service as XdsService, TunnelProtocol,
    Workload, WorkloadStatus, WorkloadType,
};

use tracing::info;

use crate::objects::{Key, ObjectError, Objects};

pub mod authz;
pub mod l7;
pub mod peerauth;
pub mod waypoint;

use peerauth::PeerAuths;
use waypoint::Waypoints;

pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// The cluster id and DNS domain of local mode (and of a single-cluster install).
pub const CLUSTER_ID: &str = "Kubernetes";
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Every Address resource, keyed by its xDS name (workload uid, or namespace/hostname).
pub fn addresses(objects: &Objects) -> BTreeMap<String, Address> {
    let mut out: BTreeMap<_, _> = service_addresses(objects).collect();
    let policies = Policies::new(objects);
    let mut sliced = slice_backings_logged(objects);
    for (key, pod) in &objects.pods {
        let address = pod_address(objects, pod, &policies, sliced.remove(key));
        out.insert(address.0, address.1);
    }
    out
}

/// The Address of each Service, by xDS name.
fn service_addresses(objects: &Objects) -> impl Iterator<Item = (String, Address)> + '_ {
    let waypoints = Waypoints::new(objects).0;
    let waypoint = move |svc: &Service| waypoints.for_service(objects, svc).map(|w| w.address());
    objects
        .services
        .values()
        .filter_map(move |svc| {
            let mut s = service(svc)?;
            s.waypoint = waypoint(svc);
            Some(s)
        })
        .map(|s| {
            let name = format!("{}/{}", s.namespace, s.hostname);
            (name, wrap(address::Type::Service(s)))
        })
}

/// A pod's Workload, named by its uid; `sliced`: the Services that list it in their
/// EndpointSlices.
fn pod_address(
    objects: &Objects,
    pod: &Pod,
    policies: &Policies<'_>,
    sliced: Option<BTreeMap<String, PortList>>,
) -> (String, Address) {
    let mut w = workload(objects, pod, policies);
    w.services.extend(sliced.unwrap_or_default());
    (w.uid.clone(), wrap(address::Type::Workload(w)))
}

fn slice_backings_logged(objects: &Objects) -> BTreeMap<Key, BTreeMap<String, PortList>> {
    let (sliced, skipped) = slice_backings(objects);
    for s in &skipped {
        info!("endpoint skipped: {s}");
    }
    sliced
}

/// Address resources translated for an earlier model, kept in the form `V` they are
/// served in. A pod's resource is reused when the pod is unchanged and so is everything
/// else a workload depends on (trust domain, namespaces, services, endpoint slices and
/// the slice addresses that are its IPs, policies); otherwise it is translated again.
/// What [`AddressCache::addresses`] returns is always what [`addresses`] would give.
pub struct AddressCache<V> {
    model: Option<Arc<Objects>>,
    services: Vec<(String, V)>,
    /// By pod key, sorted.
    pods: Vec<(Key, CachedWorkload<V>)>,
}

struct CachedWorkload<V> {
    pod: Arc<Pod>,
    uid: String,
    sliced: Option<BTreeMap<String, PortList>>,
    value: V,
}

impl<V: Clone> Default for AddressCache<V> {
    fn default() -> Self {
        AddressCache {
            model: None,
            services: Vec::new(),
            pods: Vec::new(),
        }
    }
}

impl<V: Clone> AddressCache<V> {
    /// Every Address resource of `objects`, by xDS name, as `encode` gives it.
    pub fn addresses(
        &mut self,
        objects: &Arc<Objects>,
        encode: impl Fn(&Address) -> V,
    ) -> BTreeMap<String, V> {
        let prev = self.model.replace(objects.clone());
        if !prev.is_some_and(|p| same_context(&p, objects)) {
            self.services = service_addresses(objects)
                .map(|(name, a)| (name, encode(&a)))
                .collect();
            self.pods.clear();
        }
        let mut out = Vec::with_capacity(self.services.len() + objects.pods.len());
        out.extend(self.services.iter().cloned());
        let mut sliced = slice_backings_logged(objects);
        let mut policies = None;
        // Both sorted by key: one walk pairs each pod with what it was translated to.
        let mut old = std::mem::take(&mut self.pods).into_iter().peekable();
        let mut pods = Vec::with_capacity(objects.pods.len());
        for (key, pod) in &objects.pods {
            while old.next_if(|(k, _)| k < key).is_some() {}
            let sliced = sliced.remove(key);
            let cached = old.next_if(|(k, _)| k == key).filter(|(_, c)| {
                (Arc::ptr_eq(&c.pod, pod) || *c.pod == **pod) && c.sliced == sliced
            });
            let entry = match cached {
                Some((key, mut c)) => {
                    // An equal pod from a new model: keep that one, let the old one go.
                    c.pod = pod.clone();
                    (key, c)
                }
                None => {
                    let policies = policies.get_or_insert_with(|| Policies::new(objects));
                    let (uid, address) = pod_address(objects, pod, policies, sliced.clone());
                    let value = encode(&address);
                    let pod = pod.clone();
                    (
                        key.clone(),
                        CachedWorkload {
                            pod,
                            uid,
                            sliced,
                            value,
                        },
                    )
                }
            };
            out.push((entry.1.uid.clone(), entry.1.value.clone()));
            pods.push(entry);
        }
        self.pods = pods;
        // As inserting one after the other would: a later equal name wins.
        out.into_iter().collect()
    }
}

/// Whether two models agree on everything but their pods (and service accounts, which
/// translation does not read).
fn same_context(a: &Objects, b: &Objects) -> bool {
    a.trust_domain == b.trust_domain
        && a.namespaces == b.namespaces
        && a.services == b.services
        && a.endpoint_slices == b.endpoint_slices
        && a.custom == b.custom
}

/// The policies workloads list and the Services that may select them, gathered once for
/// all pods.
struct Policies<'a> {
    authz: Vec<SelectorPolicy>,
    peer: PeerAuths,
    services: ServiceIndex<'a>,
    waypoints: Waypoints,
}

impl<'a> Policies<'a> {
    fn new(objects: &'a Objects) -> Self {
        Policies {
            authz: selector_policies(objects),
            peer: PeerAuths::new(objects).0,
            services: ServiceIndex::new(objects),
            waypoints: Waypoints::new(objects).0,
        }
    }
}

/// The Services with a selector, by namespace and one label of their selector (the first),
/// so that finding the Services of a pod looks at the pod's labels, not at every Service.
struct ServiceIndex<'a> {
    by_label: BTreeMap<(&'a str, &'a str, &'a str), Vec<KeyedService<'a>>>,
}

type KeyedService<'a> = (&'a Key, &'a Service);

impl<'a> ServiceIndex<'a> {
    fn new(objects: &'a Objects) -> Self {
        let mut by_label: BTreeMap<_, Vec<_>> = BTreeMap::new();
        for (key, svc) in &objects.services {
            let selector = svc.spec.as_ref().and_then(|s| s.selector.as_ref());
            if let Some((k, v)) = selector.and_then(|s| s.iter().next()) {
                let at = (key.0.as_str(), k.as_str(), v.as_str());
                by_label.entry(at).or_default().push((key, svc));
            }
        }
        ServiceIndex { by_label }
    }

    /// The Services of `ns` whose selector matches `pod_labels`. Each Service is found
    /// at most once: it is filed under one label, and a pod has one value per label.
    fn selecting<'s>(
        &'s self,
        ns: &'s str,
        pod_labels: &'s BTreeMap<String, String>,
    ) -> impl Iterator<Item = (&'a Key, &'a Service)> + 's {
        pod_labels
            .iter()
            .filter_map(move |(k, v)| self.by_label.get(&(ns, k.as_str(), v.as_str())))
            .flatten()
            .filter(|(_, svc)| selects(svc, pod_labels))
            .copied()
    }
}

/// Every Authorization resource for ztunnels, keyed by namespace/name, and the policies
/// that could not be translated.
pub fn authorizations(
    objects: &Objects,
) -> (
    BTreeMap<String, mesh_core::proto::istio::security::Authorization>,
    Vec<ObjectError>,
) {
    let mut out = BTreeMap::new();
    let mut errors = Vec::new();
    for obj in objects.custom("AuthorizationPolicy") {
        match authz::parse(obj).and_then(authz::authorization) {
            Ok(Some(a)) => {
                out.insert(format!("{}/{}", a.namespace, a.name), a);
            }
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    let (peer, peer_errors) = PeerAuths::new(objects);
    errors.extend(peer_errors);
    for a in peer.authorizations() {
        out.insert(format!("{}/{}", a.namespace, a.name), a);
    }
    (out, errors)
}

/// A selector-based policy for ztunnels: namespace, "namespace/name", selector labels.
type SelectorPolicy = (String, String, BTreeMap<String, String>);

/// The selector-based ztunnel policies, parsed once for all pods. Policies that do not
/// parse are left out here and reported by [`authorizations`].
fn selector_policies(objects: &Objects) -> Vec<SelectorPolicy> {
    objects
        .custom("AuthorizationPolicy")
        .filter_map(|obj| authz::parse(obj).ok())
        .filter(authz::for_ztunnel)
        .filter_map(|p| {
            let selector = p.spec.selector?.match_labels;
            let ns = p.metadata.namespace;
            Some((ns.clone(), format!("{ns}/{}", p.metadata.name), selector))
        })
        .collect()
}

/// namespace/name of the policies whose selector matches the pod.
fn selecting(
    policies: &[SelectorPolicy],
    pod_labels: &BTreeMap<String, String>,
    ns: &str,
) -> Vec<String> {
    policies
        .iter()
        .filter(|(pns, _, selector)| {
            pns == ns && selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
        })
        .map(|(_, name, _)| name.clone())
        .collect()
}

fn wrap(t: address::Type) -> Address {
    Address { r#type: Some(t) }
}

fn labels(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> &BTreeMap<String, String> {
    static NONE: BTreeMap<String, String> = BTreeMap::new();
    meta.labels.as_ref().unwrap_or(&NONE)
}

pub fn enrolled(objects: &Objects, pod: &Pod) -> bool {
    let pod_mode = labels(&pod.metadata).get(DATAPLANE_MODE);
    match pod_mode.map(String::as_str) {
        Some("none") => false,
        Some("ambient") => true,
        _ => {
            let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
            objects
                .namespaces
                .get(ns)
                .map(|n| {
                    labels(&n.metadata).get(DATAPLANE_MODE).map(String::as_str) == Some("ambient")
                })
                .unwrap_or(false)
        }
    }
}

fn ip_bytes(ip: &str) -> Option<Vec<u8>> {
    match ip.parse::<IpAddr>().ok()? {
        IpAddr::V4(v4) => Some(v4.octets().to_vec()),
        IpAddr::V6(v6) => Some(v6.octets().to_vec()),
    }
}

fn workload(objects: &Objects, pod: &Pod, policies: &Policies<'_>) -> Workload {
    let meta = &pod.metadata;
    let ns = meta
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let name = meta.name.clone().unwrap_or_default();
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let pod_labels = labels(meta);
    let label = |keys: &[&str]| keys.iter().find_map(|k| pod_labels.get(*k).cloned());

    let ips = pod_ips(pod);
    let (workload_type, workload_name) = owner(pod, &name);
    let mut authorization_policies = selecting(&policies.authz, pod_labels, &ns);
    authorization_policies.extend(policies.peer.policies_for(&ns, pod_labels));
    let ready_false = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "False"));
    Workload {
        uid: pod_uid(&ns, &name),
        addresses: ips.iter().filter_map(|ip| ip_bytes(ip)).collect(),
        tunnel_protocol: if enrolled(objects, pod) {
            TunnelProtocol::Hbone
        } else {
            TunnelProtocol::None
        } as i32,
        trust_domain: if objects.trust_domain == mesh_core::identity::DEFAULT_TRUST_DOMAIN {
            String::new()
        } else {
            objects.trust_domain.clone()
        },
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned()),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        canonical_name: label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| workload_name.clone()),
        canonical_revision: label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| "latest".to_owned()),
        workload_type: workload_type as i32,
        workload_name,
        services: backed_services(&policies.services, pod, &ns),
        waypoint: policies
            .waypoints
            .for_pod(objects, pod)
            .map(|w| w.address()),
        authorization_policies,
        // A pod said not to be Ready gets no new traffic; local-mode manifests rarely
        // carry conditions, so their absence counts as healthy.
        status: if ready_false {
            WorkloadStatus::Unhealthy
        } else {
            WorkloadStatus::Healthy
        } as i32,
        cluster_id: CLUSTER_ID.to_owned(),
        name,
        namespace: ns,
        ..Default::default()
    }
}

/// The kind and name of what runs the pod: a Deployment (through its ReplicaSet), a Job,
/// or the pod itself.
fn owner(pod: &Pod, pod_name: &str) -> (WorkloadType, String) {
    let owners = pod.metadata.owner_references.as_deref().unwrap_or_default();
    for o in owners {
        match o.kind.as_str() {
            // ReplicaSets of a Deployment are named <deployment>-<pod-template-hash>.
            "ReplicaSet" => {
                let deployment = o.name.rsplit_once('-').map_or(o.name.as_str(), |(d, _)| d);
                return (WorkloadType::Deployment, deployment.to_owned());
            }
            "Job" => return (WorkloadType::Job, o.name.clone()),
            _ => {}
        }
    }
    (WorkloadType::Pod, pod_name.to_owned())
}

/// The Workload uid of pod `ns/name`.
pub fn pod_uid(ns: &str, name: &str) -> String {
    format!("{CLUSTER_ID}//Pod/{ns}/{name}")
}

pub fn selects(svc: &Service, pod_labels: &BTreeMap<String, String>) -> bool {
    let selector = svc.spec.as_ref().and_then(|s| s.selector.as_ref());
    match selector {
        Some(sel) if !sel.is_empty() => sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
        _ => false,
    }
}

/// "namespace/hostname" -> ports, for each Service selecting the pod.
fn backed_services(index: &ServiceIndex, pod: &Pod, ns: &str) -> BTreeMap<String, PortList> {
    let pod_labels = labels(&pod.metadata);
    let mut out = BTreeMap::new();
    for ((svc_ns, svc_name), svc) in index.selecting(ns, pod_labels) {
        let ports = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| {
                let target = match &p.target_port {
                    None => p.port as u32,
                    Some(IntOrString::Int(t)) => *t as u32,
                    Some(IntOrString::String(name)) => named_port(pod, name)?,
                };
                Some(Port {
                    service_port: p.port as u32,
                    target_port: target,
                })
            })
            .collect();
        out.insert(
            format!("{svc_ns}/{}", hostname(svc_name, svc_ns)),
            PortList { ports },
        );
    }
    out
}

/// The label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Services without a selector take their endpoints from EndpointSlices: pod key ->
/// ("namespace/hostname" -> ports) for every slice address that is a pod's IP, and a note
/// for each address that is not.
fn slice_backings(
    objects: &Objects,
) -> (BTreeMap<Key, BTreeMap<String, PortList>>, Vec<ObjectError>) {
    if objects.endpoint_slices.is_empty() {
        return Default::default();
    }
    let mut by_ip: BTreeMap<IpAddr, &Key> = BTreeMap::new();
    for (key, pod) in &objects.pods {
        for ip in pod_ips(pod) {
            if let Ok(ip) = ip.parse() {
                by_ip.insert(ip, key);
            }
        }
    }
    let mut out: BTreeMap<Key, BTreeMap<String, PortList>> = BTreeMap::new();
    let mut skipped = Vec::new();
    for ((ns, slice_name), slice) in &objects.endpoint_slices {
        let Some(svc_name) = labels(&slice.metadata).get(SERVICE_NAME_LABEL).cloned() else {
            continue;
        };
        let Some(svc) = objects.services.get(&(ns.clone(), svc_name.clone())) else {
            continue;
        };
        if has_selector(svc) {
            // The selector decides; Kubernetes' own slices for it say the same.
            continue;
        }
        let ports = slice_ports(svc, slice);
        for ep in &slice.endpoints {
            for addr in &ep.addresses {
                let pod = addr.parse().ok().and_then(|ip: IpAddr| by_ip.get(&ip));
                let Some(pod) = pod else {
                    skipped.push(ObjectError {
                        origin: "translation".into(),
                        object: format!("EndpointSlice {ns}/{slice_name}"),
                        reason: format!(
                            "address {addr} of service {svc_name} is no pod's IP (skipped)"
                        ),
                    });
                    continue;
                };
                let list = out
                    .entry((*pod).clone())
                    .or_default()
                    .entry(format!("{ns}/{}", hostname(&svc_name, ns)))
                    .or_default();
                for p in &ports {
                    if !list.ports.contains(p) {
                        list.ports.push(*p);
                    }
                }
            }
        }
    }
    (out, skipped)
}

fn has_selector(svc: &Service) -> bool {
    svc.spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .is_some_and(|s| !s.is_empty())
}

/// A slice's ports matched by name to the Service's: the service port, and the slice's
/// port as the target.
fn slice_ports(svc: &Service, slice: &k8s_openapi::api::discovery::v1::EndpointSlice) -> Vec<Port> {
    let svc_ports = svc.spec.as_ref().and_then(|s| s.ports.as_ref());
    slice
        .ports
        .iter()
        .flatten()
        .filter_map(|sp| {
            let target = sp.port?;
            let matching = svc_ports
                .into_iter()
                .flatten()
                .find(|p| p.name.as_deref().unwrap_or("") == sp.name.as_deref().unwrap_or(""))?;
            Some(Port {
                service_port: matching.port as u32,
                target_port: target as u32,
            })
        })
        .collect()
}

fn pod_ips(pod: &Pod) -> Vec<String> {
    let status = pod.status.as_ref();
    let mut ips: Vec<String> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|i| i.ip.clone()).collect())
        .unwrap_or_default();
    if ips.is_empty() {
        ips.extend(status.and_then(|s| s.pod_ip.clone()));
    }
    ips
}

/// The container port called `name` in the pod.
fn named_port(pod: &Pod, name: &str) -> Option<u32> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .map(|p| p.container_port as u32)
}

/// namespace/name of a custom object (namespace `default` when unset).
pub fn object_key(obj: &crate::objects::CustomObject) -> Key {
    let ns = obj.metadata.namespace.as_deref().unwrap_or("default");
    (ns.to_owned(), obj.metadata.name.clone().unwrap_or_default())
}

/// A Service port's target port; 0 for a named one, which differs per pod (each
/// workload's entry carries it).
pub fn target_port(p: &k8s_openapi::api::core::v1::ServicePort) -> u32 {
    match &p.target_port {
        None => p.port as u32,
        Some(IntOrString::Int(t)) => *t as u32,
        Some(IntOrString::String(_)) => 0,
    }
}

pub fn hostname(name: &str, ns: &str) -> String {
    format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}")
}

fn service(svc: &Service) -> Option<XdsService> {
    let meta = &svc.metadata;
    let name = meta.name.clone()?;
    let ns = meta
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let spec = svc.spec.as_ref();
    let mut vips: Vec<String> = spec.and_then(|s| s.cluster_ips.clone()).unwrap_or_default();
    if vips.is_empty() {
        vips.extend(spec.and_then(|s| s.cluster_ip.clone()));
    }
    let addresses = vips
        .iter()
        .filter_map(|ip| ip_bytes(ip))
        .map(|address| NetworkAddress {
            network: String::new(),
            address,
        })
        .collect();
    let ports = spec
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .map(|p| Port {
            service_port: p.port as u32,
            target_port: target_port(p),
        })
        .collect();
    Some(XdsService {
        hostname: hostname(&name, &ns),
        name,
        namespace: ns,
        addresses,
        ports,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests;
