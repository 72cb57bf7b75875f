use std::collections::BTreeMap;

use prost::Message;

use super::*;
use crate::proto::istio::workload as pb;

fn workload(uid: &str, sa: &str, ip: [u8; 4]) -> Workload {
    Workload {
        uid: uid.to_owned(),
        name: uid.to_owned(),
        namespace: "default".to_owned(),
        service_account: sa.to_owned(),
        trust_domain: "cluster.local".to_owned(),
        ips: vec![IpAddr::from(ip)],
        node: "node1".to_owned(),
        protocol: Protocol::Hbone,
        labels: Labels::new(),
        authorization_policies: Vec::new(),
        waypoint: None,
    }
}

fn service(name: &str, vip: [u8; 4], endpoints: &[&str]) -> Service {
    Service {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        hostname: format!("{name}.default.svc.cluster.local"),
        vips: vec![IpAddr::from(vip)],
        ports: vec![ServicePort {
            port: 80,
            target_port: 8080,
        }],
        endpoints: endpoints.iter().map(|e| (*e).to_owned()).collect(),
        endpoint_ports: BTreeMap::new(),
        waypoint: None,
    }
}

fn by_hostname(port: u16) -> GatewayAddress {
    GatewayAddress {
        destination: GatewayDestination::Hostname {
            namespace: "default".to_owned(),
            hostname: "waypoint.default.svc.cluster.local".to_owned(),
        },
        hbone_mtls_port: port,
    }
}

/// Two waypoint pods behind Service `waypoint`, an echo pod and the echo service.
fn mesh() -> Addresses {
    Addresses::new(
        vec![
            workload("wp-1", "waypoint", [10, 0, 3, 1]),
            workload("wp-2", "waypoint", [10, 0, 3, 2]),
            workload("echo", "echo", [10, 0, 2, 1]),
        ],
        vec![
            service("waypoint", [10, 96, 0, 9], &["wp-1", "wp-2"]),
            service("echo", [10, 96, 0, 1], &["echo"]),
        ],
    )
}

#[test]
fn a_hostname_waypoint_resolves_to_its_service_pods_on_the_hbone_port() {
    let a = mesh();
    let pods = a.waypoint_pods(&by_hostname(0));
    let addrs: Vec<String> = pods.iter().map(|p| p.addr.to_string()).collect();
    assert_eq!(addrs, ["10.0.3.1:15008", "10.0.3.2:15008"]);
    assert_eq!(
        pods[0].identity.to_string(),
        "spiffe://cluster.local/ns/default/sa/waypoint"
    );
    assert_eq!(a.waypoint_pods(&by_hostname(15099))[1].addr.port(), 15099);
}

#[test]
fn an_address_waypoint_is_a_pod_or_a_service_vip_and_unknown_ones_resolve_to_nothing() {
    let a = mesh();
    let at = |ip: [u8; 4]| GatewayAddress {
        destination: GatewayDestination::Address(IpAddr::from(ip)),
        hbone_mtls_port: 15008,
    };
    let pod = a.waypoint_pods(&at([10, 0, 3, 2]));
    assert_eq!(pod.len(), 1);
    assert_eq!(pod[0].uid, "wp-2");
    let vip = a.waypoint_pods(&at([10, 96, 0, 9]));
    assert_eq!(vip.len(), 2, "{vip:?}");
    assert!(a.waypoint_pods(&at([10, 9, 9, 9])).is_empty());
    let missing = GatewayAddress {
        destination: GatewayDestination::Hostname {
            namespace: "default".to_owned(),
            hostname: "nope.default.svc.cluster.local".to_owned(),
        },
        hbone_mtls_port: 15008,
    };
    assert!(a.waypoint_pods(&missing).is_empty());
}

#[test]
fn endpoints_carry_their_target_port_and_services_are_found_by_key() {
    let a = mesh();
    let svc = a
        .service_by_key("default/echo.default.svc.cluster.local")
        .unwrap();
    let eps = a.endpoints(svc, 80);
    assert_eq!(eps.len(), 1);
    assert_eq!((eps[0].0.uid.as_str(), eps[0].1), ("echo", 8080));
    assert!(a.endpoints(svc, 81).is_empty());
}

fn gateway_pb(hostname: &str) -> pb::GatewayAddress {
    pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Hostname(
            pb::NamespacedHostname {
                namespace: "default".to_owned(),
                hostname: hostname.to_owned(),
            },
        )),
        hbone_mtls_port: 15008,
    }
}

#[test]
fn the_wire_waypoint_of_services_and_workloads_is_kept() {
    let svc = pb::Service {
        name: "echo".to_owned(),
        namespace: "default".to_owned(),
        hostname: "echo.default.svc.cluster.local".to_owned(),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 1],
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 8080,
        }],
        waypoint: Some(gateway_pb("waypoint.default.svc.cluster.local")),
        ..Default::default()
    };
    let w = pb::Workload {
        uid: "echo".to_owned(),
        namespace: "default".to_owned(),
        addresses: vec![vec![10, 0, 2, 1]],
        waypoint: Some(pb::GatewayAddress {
            destination: Some(pb::gateway_address::Destination::Address(
                pb::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 0, 3, 1],
                },
            )),
            hbone_mtls_port: 15008,
        }),
        ..Default::default()
    };
    let broken = pb::Workload {
        uid: "broken".to_owned(),
        namespace: "default".to_owned(),
        addresses: vec![vec![10, 0, 2, 2]],
        waypoint: Some(pb::GatewayAddress::default()),
        ..Default::default()
    };
    let wrap = |t| pb::Address { r#type: Some(t) };
    let held: BTreeMap<String, pb::Address> = [
        ("svc".to_owned(), wrap(pb::address::Type::Service(svc))),
        ("echo".to_owned(), wrap(pb::address::Type::Workload(w))),
        (
            "broken".to_owned(),
            wrap(pb::address::Type::Workload(broken)),
        ),
    ]
    .into();
    // Round-trip through bytes, as xDS delivers them.
    let held: BTreeMap<String, pb::Address> = (held.into_iter())
        .map(|(k, v)| {
            (
                k,
                pb::Address::decode(v.encode_to_vec().as_slice()).unwrap(),
            )
        })
        .collect();
    let (a, errors) = wire::convert(&held, "cluster.local");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("broken") && errors[0].contains("destination"));
    let svc = a.service_by_vip(IpAddr::from([10, 96, 0, 1])).unwrap();
    assert_eq!(svc.waypoint, Some(by_hostname(15008)));
    let w = a.workload("echo").unwrap();
    assert_eq!(
        w.waypoint.as_ref().map(|g| &g.destination),
        Some(&GatewayDestination::Address(IpAddr::from([10, 0, 3, 1])))
    );
}
