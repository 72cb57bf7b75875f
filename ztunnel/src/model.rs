//! The ztunnel's config model: the mesh's addresses (workloads and services, shared with
//! the waypoint through `mesh_core::addresses`), policies and peer authentication,
//! validated and indexed. Every config source (local file, xDS) converts into a
//! `Snapshot`; the data path reads only snapshots, never source types.

use std::collections::BTreeMap;
use std::ops::Deref;

use mesh_core::addresses::Addresses;
pub use mesh_core::addresses::{
    labels_match, GatewayAddress, GatewayDestination, Labels, Protocol, Service, ServicePort,
    WaypointPod, Workload,
};
use serde::Serialize;

use crate::policy::Policies;

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

/// One immutable, indexed view of the whole config, swapped whole on every change.
/// Address lookups go to the shared model it wraps (`Deref`).
#[derive(Debug, Default, Serialize)]
pub struct Snapshot {
    pub trust_domain: String,
    #[serde(flatten)]
    pub addresses: Addresses,
    pub policies: Policies,
    pub peer_authentication: PeerAuthentication,
}

impl Deref for Snapshot {
    type Target = Addresses;

    fn deref(&self) -> &Addresses {
        &self.addresses
    }
}

impl Snapshot {
    pub fn new(
        trust_domain: String,
        workloads: Vec<Workload>,
        services: Vec<Service>,
        policies: Policies,
        peer_authentication: PeerAuthentication,
    ) -> Self {
        Self::from_addresses(
            trust_domain,
            Addresses::new(workloads, services),
            policies,
            peer_authentication,
        )
    }

    pub fn from_addresses(
        trust_domain: String,
        addresses: Addresses,
        policies: Policies,
        peer_authentication: PeerAuthentication,
    ) -> Self {
        Snapshot {
            trust_domain,
            addresses,
            policies,
            peer_authentication,
        }
    }

    /// Workloads served by the ztunnel of `node`.
    pub fn local_workloads<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = &'a std::sync::Arc<Workload>> {
        self.workloads.values().filter(move |w| w.node == node)
    }
}
