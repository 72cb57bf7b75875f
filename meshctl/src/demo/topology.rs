//! The workloads and services of the demo, read from the example config the ztunnels run.
//!
//! Only the fields the demo needs to place servers and clients; ztunnel parses and
//! validates the whole file. Looking names up here (rather than repeating addresses in
//! the demo) keeps the demo right when the example file changes.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use anyhow::{anyhow, Context, Result};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Topology {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default)]
    workloads: Vec<Workload>,
    #[serde(default)]
    services: Vec<Service>,
}

#[derive(Debug, Deserialize)]
pub struct Workload {
    pub name: String,
    pub node: String,
    ips: Vec<IpAddr>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Service {
    pub name: String,
    vips: Vec<IpAddr>,
    ports: Vec<ServicePort>,
    #[serde(default)]
    selector: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServicePort {
    port: u16,
    target_port: Option<u16>,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

impl Topology {
    pub fn parse(yaml: &str) -> Result<Self> {
        serde_yaml::from_str(yaml).context("parse the example mesh config")
    }

    pub fn workload(&self, name: &str) -> Result<&Workload> {
        self.workloads
            .iter()
            .find(|w| w.name == name)
            .ok_or_else(|| anyhow!("the example config has no workload {name:?}"))
    }

    pub fn service(&self, name: &str) -> Result<&Service> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| anyhow!("the example config has no service {name:?}"))
    }

    pub fn on_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads.iter().filter(move |w| w.node == node)
    }

    /// The IPs of every workload that speaks HBONE, where some ztunnel listens.
    pub fn mesh_ips(&self) -> Vec<IpAddr> {
        let in_mesh = self.workloads.iter().filter(|w| w.in_mesh());
        in_mesh.flat_map(|w| w.ips.iter().copied()).collect()
    }

    /// The workloads a service's selector picks, in file order.
    pub fn endpoints(&self, service: &Service) -> Vec<&Workload> {
        self.workloads
            .iter()
            .filter(|w| service.selects(w))
            .collect()
    }
}

impl Workload {
    pub fn ip(&self) -> Result<IpAddr> {
        self.ips
            .first()
            .copied()
            .ok_or_else(|| anyhow!("workload {} has no IP", self.name))
    }

    /// Whether the workload speaks HBONE (the default) rather than plain TCP.
    pub fn in_mesh(&self) -> bool {
        !self
            .protocol
            .as_deref()
            .is_some_and(|p| p.eq_ignore_ascii_case("TCP"))
    }
}

impl Service {
    /// The first VIP and port: what a client dials.
    pub fn vip(&self) -> Result<SocketAddr> {
        let ip = self.vips.first().copied();
        let port = self.ports.first().map(|p| p.port);
        match (ip, port) {
            (Some(ip), Some(port)) => Ok(SocketAddr::new(ip, port)),
            _ => Err(anyhow!("service {} has no VIP or no port", self.name)),
        }
    }

    /// The port the first service port forwards to on its endpoints.
    pub fn target_port(&self) -> Result<u16> {
        let port = self
            .ports
            .first()
            .ok_or_else(|| anyhow!("service {} has no port", self.name))?;
        Ok(port.target_port.unwrap_or(port.port))
    }

    fn selects(&self, workload: &Workload) -> bool {
        !self.selector.is_empty()
            && self
                .selector
                .iter()
                .all(|(k, v)| workload.labels.get(k) == Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_embedded_example() {
        let topo = Topology::parse(super::super::EXAMPLE_CONFIG).unwrap();
        let echo = topo.service("echo").unwrap();
        let names: Vec<_> = topo.endpoints(echo).iter().map(|w| &w.name).collect();
        assert_eq!(names, ["echo-v1", "echo-v2"]);
        assert_eq!(echo.vip().unwrap(), "127.0.10.1:80".parse().unwrap());
        assert_eq!(echo.target_port().unwrap(), 8080);
        assert!(!topo.workload("legacy").unwrap().in_mesh());
        assert!(topo.workload("sleep").unwrap().in_mesh());
    }
}
