//! What the data path reads: the mesh's addresses and how each service port is spoken,
//! one immutable snapshot swapped whole on every xDS update.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::addresses::{Addresses, Service, Workload};
use mesh_core::proto::mesh::l7::v1 as pb;
use serde::Serialize;

/// How a service port's bytes are handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// HTTP/1.1, HTTP/2 or gRPC: the HTTP engine serves the tunnel.
    Http,
    /// Opaque: passed through to an endpoint.
    Tcp,
    /// Not declared: HTTP if the client's first bytes are, else TCP.
    Detect,
}

impl PortProtocol {
    pub fn from_proto(value: i32) -> PortProtocol {
        match pb::Protocol::try_from(value) {
            Ok(pb::Protocol::Http1 | pb::Protocol::Http2 | pb::Protocol::Grpc) => {
                PortProtocol::Http
            }
            Ok(pb::Protocol::Tcp) => PortProtocol::Tcp,
            // Unknown numbers come from a newer controller: detecting is the safe reading.
            Ok(pb::Protocol::Unspecified) | Err(_) => PortProtocol::Detect,
        }
    }
}

/// Where a tunnel's authority points.
pub enum Destination {
    /// A service VIP and one of its ports.
    Service { service: Arc<Service>, port: u16 },
    /// A pod address (a workload that uses this waypoint for itself).
    Workload {
        workload: Arc<Workload>,
        addr: SocketAddr,
    },
}

#[derive(Debug, Default, Serialize)]
pub struct State {
    pub addresses: Addresses,
    /// `<namespace>/<hostname>` -> service port -> protocol, from the ServiceConfigs.
    pub protocols: BTreeMap<String, BTreeMap<u16, PortProtocol>>,
}

impl State {
    pub fn new(addresses: Addresses, services: &[pb::ServiceConfig]) -> State {
        let protocols = (services.iter())
            .map(|s| {
                let ports = (s.ports.iter())
                    .filter_map(|p| {
                        let port = u16::try_from(p.port).ok()?;
                        Some((port, PortProtocol::from_proto(p.protocol)))
                    })
                    .collect();
                (format!("{}/{}", s.namespace, s.hostname), ports)
            })
            .collect();
        State {
            addresses,
            protocols,
        }
    }

    /// The declared protocol of `service`'s `port`, else [`PortProtocol::Detect`].
    pub fn protocol(&self, service: &str, port: u16) -> PortProtocol {
        (self.protocols.get(service))
            .and_then(|ports| ports.get(&port))
            .copied()
            .unwrap_or(PortProtocol::Detect)
    }

    /// What a tunnel to `authority` is for: a service port first (the VIP:port a ztunnel
    /// sends), else a pod.
    pub fn destination(&self, authority: SocketAddr) -> Option<Destination> {
        if let Some(svc) = self.addresses.service_by_vip(authority.ip()) {
            return svc
                .has_port(authority.port())
                .then(|| Destination::Service {
                    service: svc.clone(),
                    port: authority.port(),
                });
        }
        let workload = self.addresses.workload_by_ip(authority.ip())?;
        Some(Destination::Workload {
            workload: workload.clone(),
            addr: authority,
        })
    }
}
