//! The ztunnel's config model: workloads, services, policies and peer authentication,
//! validated and indexed. Every config source (local file now, xDS later) converts into
//! a `Snapshot`; the data path reads only snapshots, never source types.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use mesh_core::Identity;
use serde::Serialize;

use crate::policy::Policies;

pub type Labels = BTreeMap<String, String>;

/// How a workload receives traffic: over HBONE (enrolled in the mesh) or plain TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Protocol {
    #[serde(rename = "HBONE")]
    Hbone,
    #[serde(rename = "TCP")]
    Tcp,
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
}

impl Workload {
    pub fn identity(&self) -> Identity {
        // Names were validated when the snapshot was built.
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
}

impl Service {
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    Strict,
    Permissive,
}

/// PeerAuthentication resolved to its three levels, most specific first when looked up.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PeerAuthentication {
    pub mesh: Option<MtlsMode>,
    pub namespaces: BTreeMap<String, MtlsMode>,
    /// (namespace, selector labels, mode)
    pub workloads: Vec<(String, Labels, MtlsMode)>,
}

impl PeerAuthentication {
    pub fn mode_for(&self, w: &Workload) -> MtlsMode {
        let selected = self
            .workloads
            .iter()
            .find(|(ns, sel, _)| *ns == w.namespace && labels_match(sel, &w.labels));
        selected
            .map(|(_, _, m)| *m)
            .or_else(|| self.namespaces.get(&w.namespace).copied())
            .or(self.mesh)
            .unwrap_or(MtlsMode::Permissive)
    }
}

/// Kubernetes `matchLabels` semantics: every selector label present with the same value.
pub fn labels_match(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// One immutable, indexed view of the whole config, swapped whole on every change.
#[derive(Debug, Default, Serialize)]
pub struct Snapshot {
    pub trust_domain: String,
    pub workloads: BTreeMap<String, Arc<Workload>>,
    pub services: Vec<Arc<Service>>,
    pub policies: Policies,
    pub peer_authentication: PeerAuthentication,
    #[serde(skip)]
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    #[serde(skip)]
    by_vip: HashMap<IpAddr, Arc<Service>>,
    #[serde(skip)]
    by_host: HashMap<String, Arc<Service>>,
    /// Workload uid -> the services it is an endpoint of.
    #[serde(skip)]
    by_endpoint: HashMap<String, Vec<Arc<Service>>>,
}

impl Snapshot {
    pub fn new(
        trust_domain: String,
        workloads: Vec<Workload>,
        services: Vec<Service>,
        policies: Policies,
        peer_authentication: PeerAuthentication,
    ) -> Self {
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
        let by_host = services
            .iter()
            .map(|s| (s.hostname.clone(), s.clone()))
            .collect();
        let mut by_endpoint: HashMap<String, Vec<Arc<Service>>> = HashMap::new();
        for s in &services {
            for uid in &s.endpoints {
                by_endpoint.entry(uid.clone()).or_default().push(s.clone());
            }
        }
        Snapshot {
            trust_domain,
            workloads,
            services,
            policies,
            peer_authentication,
            by_ip,
            by_vip,
            by_host,
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

    /// Workloads served by the ztunnel of `node`.
    pub fn local_workloads<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> {
        self.workloads.values().filter(move |w| w.node == node)
    }
}
