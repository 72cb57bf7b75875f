//! Config from the controller: `istio.workload.Address` and `istio.security.Authorization`
//! resources, as delta ADS delivers them, kept and converted into the ztunnel's
//! [`Snapshot`].
//!
//! A response whose resources do not decode is rejected whole (NACK) and changes nothing.
//! A resource that decodes but cannot be used (an invalid identity, a bad CIDR) is
//! reported by name and left out, as the local file does; the rest applies.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

use mesh_core::proto::envoy::service::discovery::v3::Resource;
use mesh_core::proto::istio::security::Authorization;
use mesh_core::proto::istio::workload::{self as wire, address::Type as AddressType};
use mesh_core::proto::type_url;
use mesh_core::xds::Handler;
use prost::Message;

use crate::model::{PeerAuthentication, Protocol, Service, ServicePort, Snapshot, Workload};
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

/// Decodes every resource first; only if all decode are they and the removals applied.
fn merge<M: Message + Default>(
    held: &mut BTreeMap<String, M>,
    type_url: &str,
    updated: &[Resource],
    removed: &[String],
) -> Result<(), String> {
    let mut decoded = Vec::with_capacity(updated.len());
    let mut errors = Vec::new();
    for r in updated {
        let Some(any) = &r.resource else {
            errors.push(format!("{}: no resource body", r.name));
            continue;
        };
        if any.type_url != type_url {
            errors.push(format!(
                "{}: type {} in a {type_url} response",
                r.name, any.type_url
            ));
            continue;
        }
        match M::decode(any.value.as_slice()) {
            Ok(m) => decoded.push((r.name.clone(), m)),
            Err(e) => errors.push(format!("{}: {e}", r.name)),
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    for name in removed {
        held.remove(name);
    }
    held.extend(decoded);
    Ok(())
}

fn snapshot(held: &Held, trust_domain: &str) -> (Snapshot, Vec<String>) {
    let mut errors = Vec::new();
    let mut workloads = Vec::new();
    // "namespace/hostname" -> (uid, ports) of the workloads behind it.
    let mut backends: BTreeMap<&str, Vec<(&str, &wire::PortList)>> = BTreeMap::new();
    let mut services = Vec::new();
    for (name, address) in &held.addresses {
        match &address.r#type {
            Some(AddressType::Workload(w)) => match workload(w, trust_domain) {
                Ok(converted) => {
                    for (svc, ports) in &w.services {
                        backends.entry(svc).or_default().push((&w.uid, ports));
                    }
                    workloads.push(converted);
                }
                Err(e) => errors.push(format!("workload {name}: {e}")),
            },
            Some(AddressType::Service(s)) => services.push(s),
            None => errors.push(format!("address {name}: neither workload nor service")),
        }
    }
    let services = services
        .into_iter()
        .filter_map(|s| {
            let key = format!("{}/{}", s.namespace, s.hostname);
            let behind = backends
                .get(key.as_str())
                .map(Vec::as_slice)
                .unwrap_or_default();
            service(s, behind)
                .map_err(|e| errors.push(format!("service {key}: {e}")))
                .ok()
        })
        .collect();
    let mut policies = Vec::new();
    for a in held.authorizations.values() {
        match Policy::from_wire(a) {
            Ok(p) => policies.push(p),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let snap = Snapshot::new(
        trust_domain.to_owned(),
        workloads,
        services,
        Policies::new(policies),
        // STRICT arrives as an Authorization denying peers without identity.
        PeerAuthentication::default(),
    );
    (snap, errors)
}

fn ip(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

fn workload(w: &wire::Workload, default_td: &str) -> Result<Workload, String> {
    let trust_domain = if w.trust_domain.is_empty() {
        default_td
    } else {
        &w.trust_domain
    };
    let service_account = if w.service_account.is_empty() {
        "default"
    } else {
        &w.service_account
    };
    mesh_core::Identity::new(trust_domain, &w.namespace, service_account)
        .map_err(|e| e.to_string())?;
    let ips = (w.addresses.iter())
        .map(|a| ip(a).ok_or_else(|| format!("address of {} bytes", a.len())))
        .collect::<Result<Vec<_>, _>>()?;
    if ips.is_empty() {
        return Err("no addresses".to_owned());
    }
    let protocol = match wire::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(wire::TunnelProtocol::Hbone) => Protocol::Hbone,
        Ok(wire::TunnelProtocol::None) => Protocol::Tcp,
        Err(_) => return Err(format!("unknown tunnel_protocol {}", w.tunnel_protocol)),
    };
    Ok(Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: service_account.to_owned(),
        trust_domain: trust_domain.to_owned(),
        ips,
        node: w.node.clone(),
        protocol,
        labels: Default::default(),
        authorization_policies: w.authorization_policies.clone(),
    })
}

fn port(p: &wire::Port) -> Result<ServicePort, String> {
    let narrow = |v: u32| u16::try_from(v).map_err(|_| format!("port {v} out of range"));
    Ok(ServicePort {
        port: narrow(p.service_port)?,
        target_port: narrow(p.target_port)?,
    })
}

fn service(s: &wire::Service, behind: &[(&str, &wire::PortList)]) -> Result<Service, String> {
    let vips = (s.addresses.iter())
        .map(|a| ip(&a.address).ok_or_else(|| format!("address of {} bytes", a.address.len())))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = s.ports.iter().map(port).collect::<Result<Vec<_>, _>>()?;
    let mut endpoint_ports = BTreeMap::new();
    for (uid, list) in behind {
        let ps = list.ports.iter().map(port).collect::<Result<Vec<_>, _>>()?;
        endpoint_ports.insert((*uid).to_owned(), ps);
    }
    Ok(Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        vips,
        ports,
        endpoints: behind.iter().map(|(uid, _)| (*uid).to_owned()).collect(),
        endpoint_ports,
    })
}

#[cfg(test)]
mod tests;
