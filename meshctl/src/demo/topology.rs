//! The workloads and services of the demo, read with the controller's own loader from the
//! manifests the controller runs on.
//!
//! Only what the demo needs to place servers and clients and to know what to expect:
//! names, nodes, addresses, enrolment and identities. Looking names up here (rather than
//! repeating addresses in the demo) keeps the demo right when the manifests change.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use controller::objects::{self, Objects};
use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

#[derive(Debug)]
pub struct Topology {
    pub trust_domain: String,
    workloads: Vec<Workload>,
    services: Vec<Service>,
}

#[derive(Debug)]
pub struct Workload {
    pub name: String,
    namespace: String,
    pub node: String,
    ip: Option<IpAddr>,
    labels: BTreeMap<String, String>,
    in_mesh: bool,
    /// The SPIFFE identity its certificate carries.
    pub identity: Option<String>,
}

#[derive(Debug)]
pub struct Service {
    pub name: String,
    namespace: String,
    vip: Option<IpAddr>,
    /// (port, target port); a named target port counts as the port itself.
    ports: Vec<(u16, u16)>,
    selector: BTreeMap<String, String>,
}

impl Topology {
    /// Reads a manifest directory as the controller does; every object must load.
    pub fn load(dir: &Path, trust_domain: &str) -> Result<Self> {
        let (objects, errors) = objects::load_dir(dir, trust_domain)
            .with_context(|| format!("read the manifests in {}", dir.display()))?;
        if !errors.is_empty() {
            let listed: Vec<String> = errors.iter().map(|e| format!("  {e}")).collect();
            bail!(
                "the demo's manifests do not load cleanly:\n{}",
                listed.join("\n")
            );
        }
        Ok(Self::from_objects(&objects))
    }

    pub fn from_objects(objects: &Objects) -> Self {
        Topology {
            trust_domain: objects.trust_domain.clone(),
            workloads: objects
                .pods
                .values()
                .map(|p| Workload::new(objects, p))
                .collect(),
            services: objects.services.values().filter_map(Service::new).collect(),
        }
    }

    pub fn workload(&self, name: &str) -> Result<&Workload> {
        self.workloads
            .iter()
            .find(|w| w.name == name)
            .ok_or_else(|| anyhow!("the demo's manifests have no pod {name:?}"))
    }

    pub fn service(&self, name: &str) -> Result<&Service> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| anyhow!("the demo's manifests have no service {name:?}"))
    }

    pub fn on_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads.iter().filter(move |w| w.node == node)
    }

    /// The IPs of every workload in the mesh, where some ztunnel listens for HBONE.
    pub fn mesh_ips(&self) -> Vec<IpAddr> {
        let in_mesh = self.workloads.iter().filter(|w| w.in_mesh());
        in_mesh.filter_map(|w| w.ip).collect()
    }

    /// The identities a node's ztunnel needs certificates for: its in-mesh workloads'.
    pub fn identities_on(&self, node: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .on_node(node)
            .filter(|w| w.in_mesh())
            .filter_map(|w| w.identity.clone())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// How many xDS Address resources the controller should serve: a Workload per pod,
    /// a Service per service.
    pub fn address_count(&self) -> usize {
        self.workloads.len() + self.services.len()
    }

    /// The workloads a service's selector picks, in namespace/name order.
    pub fn endpoints(&self, service: &Service) -> Vec<&Workload> {
        self.workloads
            .iter()
            .filter(|w| service.selects(w))
            .collect()
    }
}

impl Workload {
    fn new(objects: &Objects, pod: &Pod) -> Self {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref());
        Workload {
            name: meta.name.clone().unwrap_or_default(),
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            ip: ip.and_then(|ip| ip.parse().ok()),
            labels: meta.labels.clone().unwrap_or_default(),
            in_mesh: controller::translate::enrolled(objects, pod),
            identity: objects.pod_identity(pod).map(|id| id.to_string()),
        }
    }

    pub fn ip(&self) -> Result<IpAddr> {
        self.ip
            .ok_or_else(|| anyhow!("pod {} has no IP", self.name))
    }

    /// Whether the workload is enrolled (HBONE) rather than reached in plaintext.
    pub fn in_mesh(&self) -> bool {
        self.in_mesh
    }
}

impl Service {
    fn new(svc: &KubeService) -> Option<Self> {
        let spec = svc.spec.as_ref()?;
        let port = |p: &k8s_openapi::api::core::v1::ServicePort| {
            let port = u16::try_from(p.port).ok()?;
            let target = match &p.target_port {
                Some(IntOrString::Int(t)) => u16::try_from(*t).ok()?,
                _ => port,
            };
            Some((port, target))
        };
        Some(Service {
            name: svc.metadata.name.clone()?,
            namespace: (svc.metadata.namespace.clone()).unwrap_or_else(|| "default".into()),
            vip: spec.cluster_ip.as_deref().and_then(|ip| ip.parse().ok()),
            ports: spec.ports.iter().flatten().filter_map(port).collect(),
            selector: spec.selector.clone().unwrap_or_default(),
        })
    }

    /// The VIP and first port: what a client dials.
    pub fn vip(&self) -> Result<SocketAddr> {
        match (self.vip, self.ports.first()) {
            (Some(ip), Some((port, _))) => Ok(SocketAddr::new(ip, *port)),
            _ => Err(anyhow!(
                "service {} has no cluster IP or no port",
                self.name
            )),
        }
    }

    /// The port the first service port forwards to on its endpoints.
    pub fn target_port(&self) -> Result<u16> {
        let (_, target) = self
            .ports
            .first()
            .ok_or_else(|| anyhow!("service {} has no port", self.name))?;
        Ok(*target)
    }

    fn selects(&self, workload: &Workload) -> bool {
        workload.namespace == self.namespace
            && !self.selector.is_empty()
            && self
                .selector
                .iter()
                .all(|(k, v)| workload.labels.get(k) == Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{workdir::WorkDir, MANIFESTS};
    use super::*;

    #[test]
    fn reads_the_embedded_manifests() {
        let work = WorkDir::create().unwrap();
        for (name, text) in MANIFESTS {
            work.write(name, text, 0o644).unwrap();
        }
        let topo = Topology::load(work.path(), "cluster.local").unwrap();
        let echo = topo.service("echo").unwrap();
        let names: Vec<_> = topo.endpoints(echo).iter().map(|w| &w.name).collect();
        assert_eq!(names, ["echo-v1", "echo-v2"]);
        assert_eq!(echo.vip().unwrap(), "10.96.0.10:80".parse().unwrap());
        assert_eq!(echo.target_port().unwrap(), 8080);
        assert!(!topo.workload("legacy").unwrap().in_mesh());
        assert!(topo.workload("notsleep").unwrap().in_mesh());
        assert_eq!(
            topo.identities_on("node1"),
            [
                "spiffe://cluster.local/ns/default/sa/sleep",
                "spiffe://cluster.local/ns/other/sa/notsleep"
            ]
        );
        assert_eq!(
            topo.identities_on("node2"),
            ["spiffe://cluster.local/ns/default/sa/echo"]
        );
        assert_eq!(topo.address_count(), 6);
        assert!(!topo.mesh_ips().contains(&"10.1.0.13".parse().unwrap()));
    }

    #[test]
    fn a_broken_manifest_is_named() {
        let work = WorkDir::create().unwrap();
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: default}\n\
                   spec: {containers: []}\n";
        work.write("bad.yaml", pod, 0o644).unwrap();
        let err = Topology::load(work.path(), "cluster.local").unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("bad.yaml") && err.contains("nodeName"),
            "{err}"
        );
    }
}
