//! The waypoint's validated L7 model, built from the controller's `mesh.l7.v1` resources.
//!
//! Owns the one conversion from wire types to what the HTTP engine reads: compiled
//! regexes, parsed header names, durations, weights, retry conditions. An invalid entry is
//! reported as a [`ConfigError`] and left out; the rest of the config still applies.
//! It must not do I/O or hold runtime state (pools, counters): the engine owns those, and a
//! `Config` is an immutable snapshot swapped whole on each update.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use mesh_core::proto::mesh::l7::v1 as pb;
use serde::Serialize;

use crate::backend::Endpoint;

mod authz;
mod route;
mod upstream;

pub use authz::{Attribute, AuthzAction, AuthzInput, AuthzPolicy, AuthzRule, Check, Value};
pub use route::{
    Action, Backend, DirectResponse, Fault, FaultAbort, FaultDelay, HeaderMatch, HeaderOps, Mirror,
    QueryMatch, Redirect, RetryOn, RetryPolicy, Rewrite, Route, RouteMatch, StringMatch,
    WeightedBackend,
};
pub use upstream::{ConnectionPool, HashKey, LoadBalancer, OutlierDetection, TrafficPolicy};

/// A config entry that was rejected and left out of the snapshot.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("service {service}: {reason}")]
    Service { service: String, reason: String },
    #[error("service {service}, route {route}: {reason}")]
    Route {
        service: String,
        route: String,
        reason: String,
    },
    #[error("policy {policy}: {reason}")]
    Policy { policy: String, reason: String },
}

/// How a service port's traffic is spoken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Not declared: HTTP/2 if the client opens with the h2 preface, else HTTP/1.1.
    Detect,
    Http1,
    Http2,
    Grpc,
    /// Opaque bytes: passed through to an endpoint.
    Tcp,
}

impl Protocol {
    fn from_proto(value: i32) -> Protocol {
        match pb::Protocol::try_from(value) {
            Ok(pb::Protocol::Http1) => Protocol::Http1,
            Ok(pb::Protocol::Http2) => Protocol::Http2,
            Ok(pb::Protocol::Grpc) => Protocol::Grpc,
            Ok(pb::Protocol::Tcp) => Protocol::Tcp,
            // An unknown number from a newer controller: detecting is the safe reading.
            Ok(pb::Protocol::Unspecified) | Err(_) => Protocol::Detect,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Port {
    pub target_port: u16,
    pub protocol: Protocol,
}

/// Everything the waypoint does for one service.
#[derive(Debug, Clone, Serialize)]
pub struct Service {
    pub namespace: String,
    pub hostname: String,
    pub waypoints: Vec<String>,
    pub ports: BTreeMap<u16, Port>,
    pub routes: Vec<Route>,
    pub traffic_policy: TrafficPolicy,
    /// Subset name -> labels and the policy merged over the service-wide one.
    pub subsets: BTreeMap<String, Subset>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Subset {
    pub labels: BTreeMap<String, String>,
    /// Workload uids the controller resolved the labels to (endpoints from xDS carry
    /// no labels); empty: match `labels` against the endpoint's own.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub endpoints: BTreeSet<String>,
    pub traffic_policy: TrafficPolicy,
}

impl Subset {
    pub fn contains(&self, ep: &Endpoint) -> bool {
        if self.endpoints.is_empty() {
            (self.labels.iter()).all(|(k, v)| ep.labels.get(k) == Some(v))
        } else {
            self.endpoints.contains(&ep.uid)
        }
    }
}

/// One immutable snapshot of the waypoint's L7 config.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Config {
    /// `<namespace>/<gateway name>` of this waypoint.
    pub waypoint: String,
    /// Keyed by `<namespace>/<hostname>`, the name `Downstream::service` and
    /// `Backend::service` use. Services of other waypoints are kept too: their ports say
    /// which protocol to speak to them as backends.
    pub services: BTreeMap<String, Service>,
    /// L7 AuthorizationPolicies this waypoint enforces.
    pub authz: Vec<AuthzPolicy>,
}

impl Config {
    /// Validates `services` and `policies`; each invalid entry becomes one error and is
    /// left out. Never panics on any input.
    pub fn from_proto(
        waypoint: &str,
        services: &[pb::ServiceConfig],
        policies: &[pb::Policy],
    ) -> (Config, Vec<ConfigError>) {
        let mut errors = Vec::new();
        let mut config = Config {
            waypoint: waypoint.to_owned(),
            services: BTreeMap::new(),
            authz: Vec::new(),
        };
        for svc in services {
            if let Some(service) = Service::from_proto(svc, &mut errors) {
                let key = format!("{}/{}", service.namespace, service.hostname);
                config.services.insert(key, service);
            }
        }
        for p in policies
            .iter()
            .filter(|p| p.waypoints.iter().any(|w| w == waypoint))
        {
            policy(&mut config, p, &mut errors);
        }
        (config, errors)
    }

    /// The protocol of `service`'s port `port`; `Detect` when either is unknown.
    pub fn protocol(&self, service: &str, port: u16) -> Protocol {
        self.services
            .get(service)
            .and_then(|s| s.ports.get(&port))
            .map_or(Protocol::Detect, |p| p.protocol)
    }

    /// `Err(policy)` when an AuthorizationPolicy denies the request.
    pub fn authorize(&self, input: &AuthzInput<'_>) -> Result<(), String> {
        authz::authorize(&self.authz, &self.waypoint, input)
    }

    pub fn service(&self, service: &str) -> Option<&Service> {
        self.services.get(service)
    }

    /// The upstream policy for a backend: the subset's, else the service's, else defaults.
    pub fn traffic_policy(&self, service: &str, subset: Option<&str>) -> TrafficPolicy {
        let Some(svc) = self.services.get(service) else {
            return TrafficPolicy::default();
        };
        subset
            .and_then(|name| svc.subsets.get(name))
            .map_or_else(|| svc.traffic_policy.clone(), |s| s.traffic_policy.clone())
    }
}

impl Service {
    fn from_proto(svc: &pb::ServiceConfig, errors: &mut Vec<ConfigError>) -> Option<Service> {
        let name = format!("{}/{}", svc.namespace, svc.hostname);
        let fail = |reason: String| ConfigError::Service {
            service: name.clone(),
            reason,
        };
        if svc.namespace.is_empty() || svc.hostname.is_empty() {
            errors.push(fail("namespace and hostname are required".into()));
            return None;
        }
        let ports = ports(svc, &fail, errors);
        let traffic_policy = match TrafficPolicy::from_proto(svc.traffic_policy.as_ref(), None) {
            Ok(tp) => tp,
            Err(reason) => {
                errors.push(fail(format!("traffic policy: {reason}")));
                TrafficPolicy::default()
            }
        };
        let subsets = subsets(svc, &traffic_policy, &fail, errors);
        let routes = svc
            .routes
            .iter()
            .filter_map(|r| match Route::from_proto(r) {
                Ok(route) => Some(route),
                Err(reason) => {
                    errors.push(ConfigError::Route {
                        service: name.clone(),
                        route: r.name.clone(),
                        reason,
                    });
                    None
                }
            })
            .collect();
        Some(Service {
            namespace: svc.namespace.clone(),
            hostname: svc.hostname.clone(),
            waypoints: svc.waypoints.clone(),
            ports,
            routes,
            traffic_policy,
            subsets,
        })
    }
}

fn ports(
    svc: &pb::ServiceConfig,
    fail: &dyn Fn(String) -> ConfigError,
    errors: &mut Vec<ConfigError>,
) -> BTreeMap<u16, Port> {
    let mut ports = BTreeMap::new();
    for p in &svc.ports {
        match (u16::try_from(p.port), u16::try_from(p.target_port)) {
            (Ok(port), Ok(target_port)) if port != 0 => {
                let protocol = Protocol::from_proto(p.protocol);
                ports.insert(
                    port,
                    Port {
                        target_port,
                        protocol,
                    },
                );
            }
            _ => errors.push(fail(format!("invalid port {}->{}", p.port, p.target_port))),
        }
    }
    ports
}

fn subsets(
    svc: &pb::ServiceConfig,
    base: &TrafficPolicy,
    fail: &dyn Fn(String) -> ConfigError,
    errors: &mut Vec<ConfigError>,
) -> BTreeMap<String, Subset> {
    let mut out = BTreeMap::new();
    for s in &svc.subsets {
        if s.name.is_empty() {
            errors.push(fail("subset without a name".into()));
            continue;
        }
        match TrafficPolicy::from_proto(s.traffic_policy.as_ref(), Some(base)) {
            Ok(traffic_policy) => {
                let subset = Subset {
                    labels: s.labels.clone(),
                    endpoints: s.endpoints.iter().cloned().collect(),
                    traffic_policy,
                };
                out.insert(s.name.clone(), subset);
            }
            Err(reason) => errors.push(fail(format!("subset {}: {reason}", s.name))),
        }
    }
    out
}

fn policy(config: &mut Config, p: &pb::Policy, errors: &mut Vec<ConfigError>) {
    let name = format!("{}/{}", p.namespace, p.name);
    let fail = |reason: String| ConfigError::Policy {
        policy: name.clone(),
        reason,
    };
    match &p.kind {
        Some(pb::policy::Kind::Authorization(a)) => {
            let (authz, error) = AuthzPolicy::from_proto(p, a);
            config.authz.push(authz);
            if let Some(reason) = error {
                errors.push(fail(format!("{reason} (enforced failing closed)")));
            }
        }
        // Said rather than silently passing tokens unchecked.
        Some(pb::policy::Kind::RequestAuthentication(_)) => errors.push(fail(
            "RequestAuthentication (JWT) is not enforced by this waypoint yet".into(),
        )),
        None => errors.push(fail("policy without a kind".into())),
    }
}

/// Milliseconds from the wire, 0 meaning "not set".
fn millis(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// A percentage from the wire as a fraction in 0..=1; out of range is an error.
fn fraction(percent: f64) -> Result<f64, String> {
    if (0.0..=100.0).contains(&percent) {
        Ok(percent / 100.0)
    } else {
        Err(format!("percentage {percent} outside 0-100"))
    }
}

#[cfg(test)]
mod tests;
