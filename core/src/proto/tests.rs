//! Wire-compatibility pins: each test encodes one field and compares the exact bytes, so a
//! renumbered field (which would silently break talking to Istio's programs) fails here.

use prost::Message;

use super::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use super::istio::security::{Action, Authorization, Match};
use super::istio::v1::auth::IstioCertificateRequest;
use super::istio::workload::{address, Address, Service, TunnelProtocol, Workload};

/// Tag bytes of a length-delimited field with a one-byte length, then the payload.
fn bytes_field(number: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, &mut out);
    out.push(payload.len() as u8);
    out.extend_from_slice(payload);
    out
}

#[test]
fn workload_fields_carry_istio_numbers() {
    let cases: [(Workload, Vec<u8>); 6] = [
        (
            Workload {
                uid: "u".into(),
                ..Default::default()
            },
            vec![0xa2, 0x01, 1, b'u'],
        ),
        (
            Workload {
                name: "n".into(),
                ..Default::default()
            },
            bytes_field(1, b"n"),
        ),
        (
            Workload {
                addresses: vec![vec![10, 0, 0, 1]],
                ..Default::default()
            },
            bytes_field(3, &[10, 0, 0, 1]),
        ),
        (
            Workload {
                tunnel_protocol: TunnelProtocol::Hbone as i32,
                ..Default::default()
            },
            vec![5 << 3, 1],
        ),
        (
            Workload {
                service_account: "sa".into(),
                ..Default::default()
            },
            bytes_field(7, b"sa"),
        ),
        (
            Workload {
                node: "node1".into(),
                ..Default::default()
            },
            bytes_field(9, b"node1"),
        ),
    ];
    for (workload, wire) in cases {
        assert_eq!(workload.encode_to_vec(), wire, "{workload:?}");
        assert_eq!(Workload::decode(wire.as_slice()).unwrap(), workload);
    }
}

#[test]
fn address_is_workload_1_or_service_2() {
    let w = Address {
        r#type: Some(address::Type::Workload(Workload::default())),
    };
    assert_eq!(w.encode_to_vec(), bytes_field(1, &[]));
    let s = Address {
        r#type: Some(address::Type::Service(Service {
            hostname: "h".into(),
            ..Default::default()
        })),
    };
    assert_eq!(s.encode_to_vec(), bytes_field(2, &bytes_field(3, b"h")));
}

#[test]
fn authorization_fields_carry_istio_numbers() {
    let deny = Authorization {
        action: Action::Deny as i32,
        ..Default::default()
    };
    assert_eq!(deny.encode_to_vec(), vec![4 << 3, 1]);
    let ports = Match {
        destination_ports: vec![80],
        ..Default::default()
    };
    // Packed repeated uint32, field 9.
    assert_eq!(ports.encode_to_vec(), bytes_field(9, &[80]));
}

#[test]
fn certificate_request_fields_carry_istio_numbers() {
    let req = IstioCertificateRequest {
        csr: "c".into(),
        validity_duration: 3600,
        metadata: None,
    };
    let mut wire = bytes_field(1, b"c");
    wire.extend_from_slice(&[3 << 3, 0x90, 0x1c]);
    assert_eq!(req.encode_to_vec(), wire);
}

#[test]
fn delta_discovery_fields_carry_envoy_numbers() {
    let req = DeltaDiscoveryRequest {
        type_url: "t".into(),
        response_nonce: "n".into(),
        ..Default::default()
    };
    let mut wire = bytes_field(2, b"t");
    wire.extend(bytes_field(6, b"n"));
    assert_eq!(req.encode_to_vec(), wire);

    let resp = DeltaDiscoveryResponse {
        type_url: "t".into(),
        nonce: "n".into(),
        removed_resources: vec!["r".into()],
        ..Default::default()
    };
    let mut wire = bytes_field(4, b"t");
    wire.extend(bytes_field(5, b"n"));
    wire.extend(bytes_field(6, b"r"));
    assert_eq!(resp.encode_to_vec(), wire);
}
