//! The address model every proxy shares: workloads and services (Istio's `Address`
//! resources, or a local file, converted and validated), indexed for the lookups of the
//! data path, and the waypoints they name resolved to reachable pods.
//!
//! It holds no policy and no proxy's own config: a ztunnel wraps it with its L4 policy,
//! a waypoint with its L7 config. Conversion from the wire is in [`wire`].

pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::Serialize;

use crate::Identity;

pub type Labels = BTreeMap<String, String>;

/// How a workload receives traffic: over HBONE (enrolled in the mesh) or plain TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Protocol {
    #[serde(rename = "HBONE")]
    Hbone,
    #[serde(rename = "TCP")]
    Tcp,
}

/// Where a waypoint is: a service (its endpoints are the waypoint's pods) or one address
/// (a pod's, or a service VIP), and the port it takes HBONE on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    pub hbone_mtls_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum GatewayDestination {
    /// The waypoint's Service, by `namespace` and fully qualified `hostname`.
    Hostname {
        namespace: String,
        hostname: String,
    },
    Address(IpAddr),
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    pub ips: Vec<IpAddr>,
    pub node: String,
    pub protocol: Protocol,
    pub labels: Labels,
    /// `namespace/name` of the selector policies that apply, as resolved by the
    /// controller (xDS mode; local mode matches selectors against `labels` instead).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub authorization_policies: Vec<String>,
    /// The waypoint traffic addressed to this workload's own IP goes through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddress>,
}

impl Workload {
    pub fn identity(&self) -> Identity {
        // Names were validated when the model was built.
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
            .unwrap_or_else(|_| unreachable_identity())
    }
}

fn unreachable_identity() -> Identity {
    Identity::new("invalid", "invalid", "invalid").expect("constant identity is valid")
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Workload uids, resolved from the service's selector.
    pub endpoints: Vec<String>,
    /// Per-endpoint target ports where they differ by pod (named target ports), by uid.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub endpoint_ports: BTreeMap<String, Vec<ServicePort>>,
    /// The waypoint traffic to this service's VIPs goes through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddress>,
}

impl Service {
    /// `<namespace>/<hostname>`: the xDS name of the service, and how L7 config names it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    pub fn has_port(&self, port: u16) -> bool {
        self.ports.iter().any(|p| p.port == port)
    }

    /// The port endpoint `uid` serves service port `port` on; `None` when the service has
    /// no such port or the endpoint does not serve it.
    pub fn target_port(&self, uid: &str, port: u16) -> Option<u16> {
        let own = (self.endpoint_ports.get(uid))
            .and_then(|ps| ps.iter().find(|p| p.port == port))
            .map(|p| p.target_port);
        own.or_else(|| {
            (self.ports.iter())
                .find(|p| p.port == port)
                .map(|p| p.target_port)
        })
        .filter(|p| *p != 0)
    }

    fn targets(&self, uid: &str, target_port: u16) -> bool {
        let own = self
            .endpoint_ports
            .get(uid)
            .map(Vec::as_slice)
            .unwrap_or_default();
        (own.iter().chain(&self.ports)).any(|p| p.target_port == target_port)
    }
}

/// Kubernetes `matchLabels` semantics: every selector label present with the same value.
pub fn labels_match(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// One pod of a waypoint, where a tunnel to it goes and who must answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointPod {
    pub uid: String,
    pub addr: SocketAddr,
    pub identity: Identity,
}

/// Every workload and service, indexed; immutable once built.
#[derive(Debug, Default, Serialize)]
pub struct Addresses {
    pub workloads: BTreeMap<String, Arc<Workload>>,
    pub services: Vec<Arc<Service>>,
    #[serde(skip)]
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    #[serde(skip)]
    by_vip: HashMap<IpAddr, Arc<Service>>,
    #[serde(skip)]
    by_host: HashMap<String, Arc<Service>>,
    /// `<namespace>/<hostname>` -> service.
    #[serde(skip)]
    by_key: HashMap<String, Arc<Service>>,
    /// Workload uid -> the services it is an endpoint of.
    #[serde(skip)]
    by_endpoint: HashMap<String, Vec<Arc<Service>>>,
}

impl Addresses {
    pub fn new(workloads: Vec<Workload>, services: Vec<Service>) -> Self {
        let workloads: BTreeMap<String, Arc<Workload>> = workloads
            .into_iter()
            .map(|w| (w.uid.clone(), Arc::new(w)))
            .collect();
        let by_ip = workloads
            .values()
            .flat_map(|w| w.ips.iter().map(move |ip| (*ip, w.clone())))
            .collect();
        let services: Vec<Arc<Service>> = services.into_iter().map(Arc::new).collect();
        let by_vip = services
            .iter()
            .flat_map(|s| s.vips.iter().map(move |ip| (*ip, s.clone())))
            .collect();
        let by_host = (services.iter())
            .map(|s| (s.hostname.clone(), s.clone()))
            .collect();
        let by_key = services.iter().map(|s| (s.key(), s.clone())).collect();
        let mut by_endpoint: HashMap<String, Vec<Arc<Service>>> = HashMap::new();
        for s in &services {
            for uid in &s.endpoints {
                by_endpoint.entry(uid.clone()).or_default().push(s.clone());
            }
        }
        Addresses {
            workloads,
            services,
            by_ip,
            by_vip,
            by_host,
            by_key,
            by_endpoint,
        }
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&ip)
    }

    /// The service named `<namespace>/<hostname>`.
    pub fn service_by_key(&self, key: &str) -> Option<&Arc<Service>> {
        self.by_key.get(key)
    }

    /// Looks a service up by hostname: full (`echo.default.svc.cluster.local`) or short
    /// forms `name.namespace` and `name.namespace.svc`.
    pub fn service_by_host(&self, host: &str) -> Option<&Arc<Service>> {
        self.by_host.get(host).or_else(|| {
            self.services.iter().find(|s| {
                let short = format!("{}.{}", s.name, s.namespace);
                host == short || host == format!("{short}.svc")
            })
        })
    }

    /// The service a connection to workload `uid` on `target_port` was meant for: the
    /// first service that has the workload as an endpoint and maps a port to that one.
    pub fn service_for_endpoint(&self, uid: &str, target_port: u16) -> Option<&Arc<Service>> {
        self.by_endpoint
            .get(uid)?
            .iter()
            .find(|s| s.targets(uid, target_port))
    }

    /// The workloads behind service port `port` of `svc`, each with its target port, in
    /// the service's endpoint order.
    pub fn endpoints(&self, svc: &Service, port: u16) -> Vec<(Arc<Workload>, u16)> {
        (svc.endpoints.iter())
            .filter_map(|uid| Some((self.workload(uid)?.clone(), svc.target_port(uid, port)?)))
            .collect()
    }

    /// The pods of waypoint `gw`: the endpoints of its Service (hostname form), or the
    /// workload at its address, or the endpoints of the service whose VIP it is. Empty
    /// when nothing known answers there (a tunnel to it could not check the identity).
    pub fn waypoint_pods(&self, gw: &GatewayAddress) -> Vec<WaypointPod> {
        let port = match gw.hbone_mtls_port {
            0 => crate::hbone::PORT,
            p => p,
        };
        let pod = |w: &Workload| {
            Some(WaypointPod {
                uid: w.uid.clone(),
                addr: SocketAddr::new(*w.ips.first()?, port),
                identity: w.identity(),
            })
        };
        let of_service = |s: &Service| -> Vec<WaypointPod> {
            (s.endpoints.iter())
                .filter_map(|uid| pod(self.workload(uid)?))
                .collect()
        };
        match &gw.destination {
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => (self.service_by_key(&format!("{namespace}/{hostname}")))
                .map(|s| of_service(s))
                .unwrap_or_default(),
            GatewayDestination::Address(ip) => match self.workload_by_ip(*ip) {
                Some(w) => pod(w).map(|mut p| {
                    p.addr = SocketAddr::new(*ip, port);
                    p
                }),
                None => None,
            }
            .map(|p| vec![p])
            .or_else(|| self.service_by_vip(*ip).map(|s| of_service(s)))
            .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests;
