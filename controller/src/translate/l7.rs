//! Translation into the waypoint's own xDS types (`mesh.l7.v1`, core/proto/l7.proto):
//! one `ServiceConfig` per service whose traffic goes through a waypoint (plus one, without
//! routes, per service those send to, so the waypoint knows its subsets and upstream
//! policy), and one `Policy` per AuthorizationPolicy or RequestAuthentication attached to a
//! waypoint with `targetRefs`.
//!
//! Routes of a service: those of Gateway API `HTTPRoute`/`GRPCRoute`s with the service as
//! parent, one route per match in the Gateway API's precedence order, then those of Istio
//! `VirtualService`s naming the service, in their own order. A `DestinationRule` for the
//! service gives its traffic policy and subsets.
//!
//! An object that cannot be translated whole is reported with its kind and name and left
//! out; the rest is served. This module must not decide which services use a waypoint
//! (`waypoint` does).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;
use mesh_core::proto::mesh::l7::v1::{
    route::Action, PortConfig, Protocol, Route, ServiceConfig, Subset, TrafficPolicy,
};

use super::waypoint::Waypoints;
use super::{hostname, object_key, pod_uid, selects, CLUSTER_DOMAIN};
use crate::objects::{CustomObject, Key, ObjectError, Objects};

pub mod gateway_api;
pub mod istio;
pub mod policy;

/// The waypoints' resources and what was left out.
#[derive(Debug, Default)]
pub struct L7 {
    /// By xDS name, "<namespace>/<hostname>".
    pub services: BTreeMap<String, ServiceConfig>,
    /// By xDS name: "<namespace>/<name>" (AuthorizationPolicy),
    /// "<namespace>/RequestAuthentication/<name>".
    pub policies: BTreeMap<String, mesh_core::proto::mesh::l7::v1::Policy>,
    pub errors: Vec<ObjectError>,
}

/// Every L7 resource of `objects`.
pub fn resources(objects: &Objects) -> L7 {
    let (waypoints, _) = Waypoints::new(objects);
    let bound: BTreeMap<Key, Vec<String>> = objects
        .services
        .iter()
        .filter_map(|(key, svc)| {
            let w = waypoints.for_service(objects, svc)?;
            Some((key.clone(), vec![w.id()]))
        })
        .collect();
    let mut errors = Vec::new();
    let mut routes = gateway_api::routes(objects, &mut errors);
    for (key, more) in istio::routes(objects, &mut errors) {
        routes.entry(key).or_default().extend(more);
    }
    let mut upstream = istio::destination_rules(objects, &mut errors);
    let mut services = BTreeMap::new();
    let mut backends: BTreeMap<Key, BTreeSet<String>> = BTreeMap::new();
    for (key, ids) in &bound {
        let svc_routes = routes.remove(key).unwrap_or_default();
        for b in svc_routes.iter().flat_map(route_backends) {
            backends.entry(b).or_default().extend(ids.iter().cloned());
        }
        let config = service_config(objects, key, ids.clone(), svc_routes, upstream.remove(key));
        services.extend(config);
    }
    for (key, ids) in backends {
        if bound.contains_key(&key) {
            continue;
        }
        let ids = ids.into_iter().collect();
        services.extend(service_config(
            objects,
            &key,
            ids,
            Vec::new(),
            upstream.remove(&key),
        ));
    }
    let policies = policy::policies(objects, &waypoints, &bound, &mut errors);
    L7 {
        services,
        policies,
        errors,
    }
}

/// The config of the Service `key` (None when it does not exist), by xDS name.
fn service_config(
    objects: &Objects,
    key: &Key,
    waypoints: Vec<String>,
    routes: Vec<Route>,
    upstream: Option<(TrafficPolicy, Vec<Subset>)>,
) -> Option<(String, ServiceConfig)> {
    let svc = objects.services.get(key)?;
    let (traffic_policy, mut subsets) = match upstream {
        Some((policy, subsets)) => (Some(policy), subsets),
        None => (None, Vec::new()),
    };
    for subset in &mut subsets {
        subset.endpoints = subset_endpoints(objects, key, svc, &subset.labels);
    }
    let config = ServiceConfig {
        namespace: key.0.clone(),
        hostname: hostname(&key.1, &key.0),
        waypoints,
        ports: ports(svc),
        routes,
        traffic_policy,
        subsets,
    };
    Some((service_id(key), config))
}

/// Workload uids of the pods Service `key` selects whose labels also match `labels`.
fn subset_endpoints(
    objects: &Objects,
    key: &Key,
    svc: &Service,
    labels: &BTreeMap<String, String>,
) -> Vec<String> {
    let in_subset = |pod_labels: &BTreeMap<String, String>| {
        selects(svc, pod_labels) && labels.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
    };
    (objects.pods.iter())
        .filter(|((ns, _), _)| *ns == key.0)
        .filter(|(_, pod)| pod.metadata.labels.as_ref().is_some_and(in_subset))
        .map(|((ns, name), _)| pod_uid(ns, name))
        .collect()
}

/// The services a route sends to (forwarded or mirrored), by namespace/name.
fn route_backends(route: &Route) -> impl Iterator<Item = Key> + '_ {
    let forwarded = match &route.action {
        Some(Action::Forward(f)) => f.backends.as_slice(),
        _ => &[],
    };
    forwarded
        .iter()
        .filter_map(|w| w.backend.as_ref())
        .chain(route.mirrors.iter().filter_map(|m| m.backend.as_ref()))
        .filter_map(|b| {
            let (ns, host) = b.service.split_once('/')?;
            let name = host.strip_suffix(&format!(".{ns}.svc.{CLUSTER_DOMAIN}"))?;
            Some((ns.to_owned(), name.to_owned()))
        })
}

/// "<namespace>/<hostname>": how L7 resources name a service.
pub fn service_id(key: &Key) -> String {
    format!("{}/{}", key.0, hostname(&key.1, &key.0))
}

/// The service's ports and how each is spoken.
fn ports(svc: &Service) -> Vec<PortConfig> {
    let ports = svc.spec.as_ref().and_then(|s| s.ports.as_ref());
    ports
        .into_iter()
        .flatten()
        .map(|p| PortConfig {
            port: p.port as u32,
            target_port: super::target_port(p),
            protocol: protocol(p.app_protocol.as_deref(), p.name.as_deref()) as i32,
        })
        .collect()
}

/// A port's protocol from its `appProtocol`, else its name's prefix (Istio's rules).
pub fn protocol(app_protocol: Option<&str>, name: Option<&str>) -> Protocol {
    let by_name = || {
        let name = name.unwrap_or_default();
        name.split_once('-').map_or(name, |(p, _)| p).to_owned()
    };
    let text = app_protocol.map_or_else(by_name, str::to_owned);
    match text.to_ascii_lowercase().as_str() {
        "http" => Protocol::Http1,
        "http2" | "h2c" | "kubernetes.io/h2c" => Protocol::Http2,
        "grpc" | "grpc-web" => Protocol::Grpc,
        "tcp" | "https" | "tls" | "mongo" | "mysql" | "redis" | "kubernetes.io/ws"
        | "kubernetes.io/wss" => Protocol::Tcp,
        _ => Protocol::Unspecified,
    }
}

/// An error about a custom object, named by its kind.
pub fn object_error(obj: &CustomObject, reason: String) -> ObjectError {
    let (ns, name) = object_key(obj);
    ObjectError {
        origin: "translation".into(),
        object: format!("{} {ns}/{name}", obj.kind),
        reason,
    }
}

/// Reads `obj`'s spec as `T`.
pub fn spec<T: serde::de::DeserializeOwned>(obj: &CustomObject) -> Result<T, String> {
    serde_json::from_value(obj.spec.clone()).map_err(|e| format!("invalid spec: {e}"))
}

/// A Service named by a host: a short name (in `ns`), `name.ns`, `name.ns.svc` or the
/// fully qualified name; None when no such Service exists.
pub fn host_service(objects: &Objects, host: &str, ns: &str) -> Option<Key> {
    let suffix = format!(".svc.{CLUSTER_DOMAIN}");
    let host = host.strip_suffix(&suffix).unwrap_or(host);
    let host = host.strip_suffix(".svc").unwrap_or(host);
    let key = match host.split_once('.') {
        Some((name, svc_ns)) if !svc_ns.contains('.') => (svc_ns.to_owned(), name.to_owned()),
        Some(_) => return None,
        None => (ns.to_owned(), host.to_owned()),
    };
    objects.services.contains_key(&key).then_some(key)
}

/// A duration as Kubernetes and Istio write them (Go syntax: "1h30m", "1.5s", "250ms"),
/// in milliseconds.
pub fn duration_ms(text: &str) -> Result<u64, String> {
    let bad = || format!("duration {text:?} is not like 10s, 1.5s, 250ms or 1h30m");
    let mut rest = text.trim();
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0.0_f64;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1_000.0,
            "ms" => 1.0,
            "us" | "µs" => 0.001,
            "ns" => 0.000_001,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Ok(total.round() as u64)
}

/// Checks a regular expression the waypoint will compile.
pub fn check_regex(re: &str) -> Result<(), String> {
    regex::Regex::new(re)
        .map(drop)
        .map_err(|e| format!("regular expression {re:?} does not compile: {e}"))
}

#[cfg(test)]
mod tests;
