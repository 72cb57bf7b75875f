//! The waypoint's config from the controller: `istio.workload.Address` (services and
//! their endpoints), `mesh.l7.v1.ServiceConfig` and `mesh.l7.v1.Policy`, held by xDS
//! name and turned into a new [`State`] and engine config on every accepted response.
//!
//! A response whose resources do not decode is rejected whole (NACK) and changes nothing;
//! an entry that decodes but cannot be used is logged, counted and left out.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use mesh_core::proto::envoy::service::discovery::v3::Resource;
use mesh_core::proto::istio::workload as wire;
use mesh_core::proto::mesh::l7::v1 as pb;
use mesh_core::proto::type_url;
use mesh_core::xds::{merge, Handler};
use prometheus_client::metrics::counter::Counter;
use tracing::warn;

use super::state::State;
use crate::config::Config;
use crate::http::Engine;

/// The types a waypoint subscribes to.
pub const TYPES: [&str; 3] = [type_url::ADDRESS, type_url::L7_SERVICE, type_url::L7_POLICY];

#[derive(Default)]
struct Held {
    addresses: BTreeMap<String, wire::Address>,
    services: BTreeMap<String, pb::ServiceConfig>,
    policies: BTreeMap<String, pb::Policy>,
}

pub struct XdsHandler {
    /// `<namespace>/<gateway>` of this waypoint.
    name: String,
    trust_domain: String,
    held: Mutex<Held>,
    state: Arc<ArcSwap<State>>,
    engine: Arc<Engine>,
    config_errors: Counter,
}

impl XdsHandler {
    pub fn new(
        name: &str,
        trust_domain: &str,
        state: Arc<ArcSwap<State>>,
        engine: Arc<Engine>,
        config_errors: Counter,
    ) -> Self {
        XdsHandler {
            name: name.to_owned(),
            trust_domain: trust_domain.to_owned(),
            held: Mutex::new(Held::default()),
            state,
            engine,
            config_errors,
        }
    }

    /// Makes what is held the running config: the engine's first, so a tunnel that sees
    /// the new addresses also sees the routes written for them.
    fn publish(&self, held: &Held) {
        let (addresses, errors) =
            mesh_core::addresses::wire::convert(&held.addresses, &self.trust_domain);
        let services: Vec<pb::ServiceConfig> = held.services.values().cloned().collect();
        // Policies name the waypoints that enforce them; the others are not ours.
        let policies: Vec<pb::Policy> = (held.policies.values())
            .filter(|p| p.waypoints.contains(&self.name))
            .cloned()
            .collect();
        let (config, config_errors) = Config::from_proto(&self.name, &services, &policies);
        let errors = errors
            .into_iter()
            .chain(config_errors.iter().map(|e| e.to_string()));
        for e in errors {
            warn!("config entry skipped: {e}");
            self.config_errors.inc();
        }
        self.engine.update(Arc::new(config));
        self.state.store(Arc::new(State::new(addresses, &services)));
    }
}

impl Handler for XdsHandler {
    fn apply(
        &self,
        type_url: &str,
        updated: &[Resource],
        removed: &[String],
    ) -> Result<(), String> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        match type_url {
            type_url::ADDRESS => merge(&mut held.addresses, type_url, updated, removed)?,
            type_url::L7_SERVICE => merge(&mut held.services, type_url, updated, removed)?,
            type_url::L7_POLICY => merge(&mut held.policies, type_url, updated, removed)?,
            other => return Err(format!("unsupported type {other}")),
        }
        self.publish(&held);
        Ok(())
    }
}
