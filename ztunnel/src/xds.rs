//! Config from the controller: `istio.workload.Address` and `istio.security.Authorization`
//! resources, as delta ADS delivers them, kept and converted into the ztunnel's
//! [`Snapshot`].
//!
//! A response whose resources do not decode is rejected whole (NACK) and changes nothing.
//! A resource that decodes but cannot be used (an invalid identity, a bad CIDR) is
//! reported by name and left out, as the local file does; the rest applies.

use std::collections::BTreeMap;
use std::sync::Mutex;

use mesh_core::proto::envoy::service::discovery::v3::Resource;
use mesh_core::proto::istio::security::Authorization;
use mesh_core::proto::istio::workload as wire;
use mesh_core::proto::type_url;
use mesh_core::xds::{merge, Handler};

use crate::model::{PeerAuthentication, Snapshot};
use crate::policy::{Policies, Policy};

/// Where converted snapshots go (the ztunnel's applier), with the objects left out.
pub type Sink = Box<dyn Fn(Snapshot, Vec<String>) + Send + Sync>;

/// The resources held, by xDS name.
#[derive(Default)]
struct Held {
    addresses: BTreeMap<String, wire::Address>,
    authorizations: BTreeMap<String, Authorization>,
}

pub struct XdsConfigHandler {
    trust_domain: String,
    held: Mutex<Held>,
    sink: Sink,
}

impl XdsConfigHandler {
    pub fn new(trust_domain: &str, sink: Sink) -> Self {
        XdsConfigHandler {
            trust_domain: trust_domain.to_owned(),
            held: Mutex::new(Held::default()),
            sink,
        }
    }
}

impl Handler for XdsConfigHandler {
    fn apply(
        &self,
        type_url: &str,
        updated: &[Resource],
        removed: &[String],
    ) -> Result<(), String> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        match type_url {
            type_url::ADDRESS => merge(&mut held.addresses, type_url, updated, removed)?,
            type_url::AUTHORIZATION => merge(&mut held.authorizations, type_url, updated, removed)?,
            other => return Err(format!("unsupported type {other}")),
        }
        let (snap, errors) = snapshot(&held, &self.trust_domain);
        (self.sink)(snap, errors);
        Ok(())
    }
}

fn snapshot(held: &Held, trust_domain: &str) -> (Snapshot, Vec<String>) {
    let (addresses, mut errors) =
        mesh_core::addresses::wire::convert(&held.addresses, trust_domain);
    let mut policies = Vec::new();
    for a in held.authorizations.values() {
        match Policy::from_wire(a) {
            Ok(p) => policies.push(p),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let snap = Snapshot::from_addresses(
        trust_domain.to_owned(),
        addresses,
        Policies::new(policies),
        // STRICT arrives as an Authorization denying peers without identity.
        PeerAuthentication::default(),
    );
    (snap, errors)
}

#[cfg(test)]
mod tests;
