//! Waypoints: which `Gateway`s are waypoints, and which services and workloads send their
//! traffic through one.
//!
//! A waypoint is a `Gateway` of class `istio-waypoint` with the listener
//! `{name: mesh, port: 15008, protocol: HBONE}`; it is reached at the Service named like
//! the Gateway in its namespace (the controller creates it in Kubernetes; in local mode the
//! directory holds it). `istio.io/use-waypoint` on a pod or service, else on its namespace,
//! names the waypoint (`none` opts out; `istio.io/use-waypoint-namespace` at the same level
//! names another namespace). The waypoint's `istio.io/waypoint-for` label says what it
//! serves: service traffic (default), workload traffic, both, or nothing.
//!
//! Gateways of other classes and waypoint Gateways that are not well formed are reported
//! and never used; a label naming a waypoint that does not exist is reported too, and the
//! service or pod then has no waypoint. This module decides; it must not build resources
//! beyond the `GatewayAddress` a proxy reads.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mesh_core::proto::istio::workload::{gateway_address, GatewayAddress, NamespacedHostname};
use serde::Deserialize;

use super::{hostname, labels};
use crate::objects::{CustomObject, Key, ObjectError, Objects};

pub const WAYPOINT_CLASS: &str = "istio-waypoint";
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// The label Kubernetes gateway deployments put on their pods.
pub const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";
/// The waypoint's HBONE port (its only listener).
pub const HBONE_PORT: u16 = 15008;

/// What traffic a waypoint serves (`istio.io/waypoint-for`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

impl WaypointFor {
    fn parse(text: Option<&str>) -> Result<Self, String> {
        match text.unwrap_or("service") {
            "service" => Ok(WaypointFor::Service),
            "workload" => Ok(WaypointFor::Workload),
            "all" => Ok(WaypointFor::All),
            "none" => Ok(WaypointFor::None),
            other => Err(format!(
                "{WAYPOINT_FOR} {other:?} is not one of service, workload, all, none"
            )),
        }
    }

    fn services(self) -> bool {
        matches!(self, WaypointFor::Service | WaypointFor::All)
    }

    fn workloads(self) -> bool {
        matches!(self, WaypointFor::Workload | WaypointFor::All)
    }
}

/// One valid waypoint Gateway.
#[derive(Clone, Debug, PartialEq)]
pub struct Waypoint {
    pub namespace: String,
    pub name: String,
    pub serves: WaypointFor,
}

impl Waypoint {
    /// "<namespace>/<gateway name>", as the L7 resources name their waypoints.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Where ztunnels send the traffic: the Service named like the Gateway, on 15008.
    pub fn address(&self) -> GatewayAddress {
        GatewayAddress {
            destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
                namespace: self.namespace.clone(),
                hostname: hostname(&self.name, &self.namespace),
            })),
            hbone_mtls_port: u32::from(HBONE_PORT),
        }
    }
}

/// The Gateway spec, as far as a waypoint needs it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GatewaySpec {
    gateway_class_name: String,
    #[serde(default)]
    listeners: Vec<Listener>,
}

#[derive(Debug, Deserialize)]
struct Listener {
    #[serde(default)]
    name: String,
    #[serde(default)]
    port: u32,
    #[serde(default)]
    protocol: String,
}

/// The valid waypoints of a model, by namespace/name.
#[derive(Debug, Default)]
pub struct Waypoints {
    by_key: BTreeMap<Key, Waypoint>,
}

pub fn gateway_error(obj: &CustomObject, reason: String) -> ObjectError {
    let (ns, name) = super::object_key(obj);
    ObjectError {
        origin: "translation".into(),
        object: format!("Gateway {ns}/{name}"),
        reason,
    }
}

impl Waypoints {
    /// The waypoints of `objects`, and the Gateways that are not usable ones.
    pub fn new(objects: &Objects) -> (Self, Vec<ObjectError>) {
        let mut by_key = BTreeMap::new();
        let mut errors = Vec::new();
        for obj in objects.custom("Gateway") {
            match waypoint(obj) {
                Ok(w) => {
                    by_key.insert((w.namespace.clone(), w.name.clone()), w);
                }
                Err(reason) => errors.push(gateway_error(obj, reason)),
            }
        }
        let waypoints = Waypoints { by_key };
        errors.extend(waypoints.missing_services(objects));
        errors.extend(waypoints.dangling_labels(objects));
        (waypoints, errors)
    }

    pub fn get(&self, ns: &str, name: &str) -> Option<&Waypoint> {
        self.by_key.get(&(ns.to_owned(), name.to_owned()))
    }

    /// The waypoint a Service's traffic goes through (Service.waypoint).
    pub fn for_service(&self, objects: &Objects, svc: &Service) -> Option<&Waypoint> {
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        if self.get(ns, name).is_some() {
            // A waypoint's own Service is reached directly.
            return None;
        }
        let wanted = requested(objects, &svc.metadata, ns)?;
        self.get(&wanted.0, &wanted.1)
            .filter(|w| w.serves.services())
    }

    /// The waypoint traffic addressed to a pod goes through (Workload.waypoint).
    pub fn for_pod(&self, objects: &Objects, pod: &Pod) -> Option<&Waypoint> {
        if labels(&pod.metadata).contains_key(GATEWAY_NAME) {
            // A waypoint's (or another gateway's) own pods never get a waypoint.
            return None;
        }
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let wanted = requested(objects, &pod.metadata, ns)?;
        self.get(&wanted.0, &wanted.1)
            .filter(|w| w.serves.workloads())
    }

    /// Waypoints whose Service is missing: ztunnels would be told to use an address
    /// nothing answers (fail closed, but say why).
    fn missing_services<'a>(
        &'a self,
        objects: &'a Objects,
    ) -> impl Iterator<Item = ObjectError> + 'a {
        self.by_key
            .iter()
            .filter(|(key, _)| !objects.services.contains_key(*key))
            .map(|((ns, name), _)| ObjectError {
                origin: "translation".into(),
                object: format!("Gateway {ns}/{name}"),
                reason: format!(
                    "waypoint has no Service {ns}/{name}: traffic sent to it cannot be delivered"
                ),
            })
    }

    /// Namespaces, services and pods whose use-waypoint label names no waypoint.
    fn dangling_labels(&self, objects: &Objects) -> Vec<ObjectError> {
        let mut out = Vec::new();
        let mut check = |kind: &str, meta: &ObjectMeta, ns: &str| {
            let Some(wanted) = own_request(meta, ns) else {
                return;
            };
            if let Some((wns, wname)) = wanted {
                if self.get(&wns, &wname).is_none() {
                    let name = meta.name.as_deref().unwrap_or_default();
                    out.push(ObjectError {
                        origin: "translation".into(),
                        object: format!("{kind} {ns}/{name}"),
                        reason: format!(
                            "{USE_WAYPOINT} names {wns}/{wname}, which is no waypoint Gateway"
                        ),
                    });
                }
            }
        };
        for (name, ns) in &objects.namespaces {
            check("Namespace", &ns.metadata, name);
        }
        for ((ns, _), svc) in &objects.services {
            check("Service", &svc.metadata, ns);
        }
        for ((ns, _), pod) in &objects.pods {
            check("Pod", &pod.metadata, ns);
        }
        out
    }
}

/// `obj` as a waypoint, or why it is not one.
fn waypoint(obj: &CustomObject) -> Result<Waypoint, String> {
    let spec: GatewaySpec =
        serde_json::from_value(obj.spec.clone()).map_err(|e| format!("invalid spec: {e}"))?;
    if spec.gateway_class_name != WAYPOINT_CLASS {
        return Err(format!(
            "gatewayClassName {:?} is not served by this mesh (only {WAYPOINT_CLASS:?})",
            spec.gateway_class_name
        ));
    }
    let mesh = spec
        .listeners
        .iter()
        .any(|l| l.name == "mesh" && l.port == u32::from(HBONE_PORT) && l.protocol == "HBONE");
    if !mesh {
        return Err(format!(
            "a waypoint needs the listener {{name: mesh, port: {HBONE_PORT}, protocol: HBONE}}"
        ));
    }
    let serves = WaypointFor::parse(labels(&obj.metadata).get(WAYPOINT_FOR).map(String::as_str))?;
    let (namespace, name) = super::object_key(obj);
    Ok(Waypoint {
        namespace,
        name,
        serves,
    })
}

/// What an object's own labels ask for: None when it has no use-waypoint label,
/// Some(None) for `none`, else the waypoint's namespace/name.
fn own_request(meta: &ObjectMeta, ns: &str) -> Option<Option<Key>> {
    let l = labels(meta);
    let name = l.get(USE_WAYPOINT)?;
    if name == "none" {
        return Some(None);
    }
    let wns = l.get(USE_WAYPOINT_NAMESPACE).map_or(ns, String::as_str);
    Some(Some((wns.to_owned(), name.clone())))
}

/// The waypoint an object (service or pod) asks for: its own label, else its namespace's.
fn requested(objects: &Objects, meta: &ObjectMeta, ns: &str) -> Option<Key> {
    match own_request(meta, ns) {
        Some(wanted) => wanted,
        None => {
            let namespace = objects.namespaces.get(ns)?;
            own_request(&namespace.metadata, ns).flatten()
        }
    }
}

#[cfg(test)]
mod tests;
