//! Translation of the object model into the resources proxies receive over xDS:
//! `istio.workload.Address` (one Workload per pod, one Service per Kubernetes Service) and
//! `istio.security.Authorization` (from AuthorizationPolicy and PeerAuthentication).
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

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_core::proto::istio::workload::{
    address, Address, NetworkAddress, Port, PortList, Service as XdsService, TunnelProtocol,
    Workload, WorkloadStatus, WorkloadType,
};

use tracing::info;

use crate::objects::{Key, ObjectError, Objects};

pub mod authz;
pub mod peerauth;

use peerauth::PeerAuths;

pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// The cluster id and DNS domain of local mode (and of a single-cluster install).
pub const CLUSTER_ID: &str = "Kubernetes";
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Every Address resource, keyed by its xDS name (workload uid, or namespace/hostname).
pub fn addresses(objects: &Objects) -> BTreeMap<String, Address> {
    let mut out = BTreeMap::new();
    for svc in objects.services.values() {
        if let Some(s) = service(svc) {
            let name = format!("{}/{}", s.namespace, s.hostname);
            out.insert(name, wrap(address::Type::Service(s)));
        }
    }
    let policies = Policies {
        authz: selector_policies(objects),
        peer: PeerAuths::new(objects).0,
    };
    let (mut sliced, skipped) = slice_backings(objects);
    for s in &skipped {
        info!("endpoint skipped: {s}");
    }
    for (key, pod) in &objects.pods {
        let mut w = workload(objects, pod, &policies);
        w.services.extend(sliced.remove(key).unwrap_or_default());
        out.insert(w.uid.clone(), wrap(address::Type::Workload(w)));
    }
    out
}

/// The policies workloads list, parsed once for all pods.
struct Policies {
    authz: Vec<SelectorPolicy>,
    peer: PeerAuths,
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
) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

pub fn enrolled(objects: &Objects, pod: &Pod) -> bool {
    let pod_mode = labels(&pod.metadata).get(DATAPLANE_MODE).cloned();
    match pod_mode.as_deref() {
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

fn workload(objects: &Objects, pod: &Pod, policies: &Policies) -> Workload {
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
    let mut authorization_policies = selecting(&policies.authz, &pod_labels, &ns);
    authorization_policies.extend(policies.peer.policies_for(&ns, &pod_labels));
    let ready_false = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "False"));
    Workload {
        uid: format!("{CLUSTER_ID}//Pod/{ns}/{name}"),
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
        services: backed_services(objects, pod, &ns),
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

fn selects(svc: &Service, pod_labels: &BTreeMap<String, String>) -> bool {
    let selector = svc.spec.as_ref().and_then(|s| s.selector.as_ref());
    match selector {
        Some(sel) if !sel.is_empty() => sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
        _ => false,
    }
}

/// "namespace/hostname" -> ports, for each Service selecting the pod.
fn backed_services(objects: &Objects, pod: &Pod, ns: &str) -> BTreeMap<String, PortList> {
    let pod_labels = labels(&pod.metadata);
    let mut out = BTreeMap::new();
    for ((svc_ns, svc_name), svc) in &objects.services {
        if svc_ns != ns || !selects(svc, &pod_labels) {
            continue;
        }
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

fn hostname(name: &str, ns: &str) -> String {
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
            // A named target port differs per pod; each workload's entry carries it.
            target_port: match &p.target_port {
                None => p.port as u32,
                Some(IntOrString::Int(t)) => *t as u32,
                Some(IntOrString::String(_)) => 0,
            },
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
