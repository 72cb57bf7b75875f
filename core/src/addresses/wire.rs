//! `istio.workload.Address` resources (as delta ADS delivers them) converted into the
//! address model. A resource that decodes but cannot be used (an invalid identity, an
//! address of the wrong length) is reported by name and left out; the rest converts.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::proto::istio::workload::{self as wire, address::Type as AddressType};

use super::{
    Addresses, GatewayAddress, GatewayDestination, Protocol, Service, ServicePort, Workload,
};

/// The model of every held `Address` (by xDS name), and one line per resource left out.
pub fn convert<'a>(
    held: impl IntoIterator<Item = (&'a String, &'a wire::Address)>,
    trust_domain: &str,
) -> (Addresses, Vec<String>) {
    let mut errors = Vec::new();
    let mut workloads = Vec::new();
    // "namespace/hostname" -> (uid, ports) of the workloads behind it.
    let mut backends: BTreeMap<&str, Vec<(&str, &wire::PortList)>> = BTreeMap::new();
    let mut services = Vec::new();
    for (name, address) in held {
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
    (Addresses::new(workloads, services), errors)
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
    crate::Identity::new(trust_domain, &w.namespace, service_account).map_err(|e| e.to_string())?;
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
        waypoint: w.waypoint.as_ref().map(gateway).transpose()?,
    })
}

fn narrow(v: u32) -> Result<u16, String> {
    u16::try_from(v).map_err(|_| format!("port {v} out of range"))
}

fn port(p: &wire::Port) -> Result<ServicePort, String> {
    Ok(ServicePort {
        port: narrow(p.service_port)?,
        target_port: narrow(p.target_port)?,
    })
}

/// A waypoint's address; an empty one (no destination) is an error, not "no waypoint".
pub fn gateway(g: &wire::GatewayAddress) -> Result<GatewayAddress, String> {
    use wire::gateway_address::Destination;
    let destination = match &g.destination {
        Some(Destination::Hostname(h)) => GatewayDestination::Hostname {
            namespace: h.namespace.clone(),
            hostname: h.hostname.clone(),
        },
        Some(Destination::Address(a)) => GatewayDestination::Address(
            ip(&a.address)
                .ok_or_else(|| format!("waypoint address of {} bytes", a.address.len()))?,
        ),
        None => return Err("waypoint without a destination".to_owned()),
    };
    Ok(GatewayAddress {
        destination,
        hbone_mtls_port: narrow(g.hbone_mtls_port)?,
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
        waypoint: s.waypoint.as_ref().map(gateway).transpose()?,
    })
}
