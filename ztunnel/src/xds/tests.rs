use std::sync::{Arc, Mutex};

use mesh_core::proto::istio::security::{
    self as sec, string_match::MatchType, Action, Authorization, Clause, Match, Rule, Scope,
};
use mesh_core::proto::istio::workload::{
    address, Address, NetworkAddress, Port, PortList, Service as WireService, TunnelProtocol,
    Workload as WireWorkload,
};

use prost::Message;

use super::*;
use crate::policy::ConnInfo;

type Applied = Arc<Mutex<Vec<(Arc<Snapshot>, Vec<String>)>>>;

fn handler() -> (XdsConfigHandler, Applied) {
    let applied: Applied = Arc::default();
    let sink = applied.clone();
    let h = XdsConfigHandler::new(
        "cluster.local",
        Box::new(move |snap, errors| sink.lock().unwrap().push((Arc::new(snap), errors))),
    );
    (h, applied)
}

fn resource(name: &str, type_url: &str, msg: &impl Message) -> Resource {
    Resource {
        name: name.to_owned(),
        version: "1".to_owned(),
        resource: Some(prost_types::Any {
            type_url: type_url.to_owned(),
            value: msg.encode_to_vec(),
        }),
        ..Default::default()
    }
}

fn workload(name: &str, ip: [u8; 4], svc_ports: &[(u32, u32)], policies: &[&str]) -> Resource {
    let w = WireWorkload {
        uid: format!("Kubernetes//Pod/default/{name}"),
        name: name.to_owned(),
        namespace: "default".to_owned(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: TunnelProtocol::Hbone as i32,
        service_account: name.to_owned(),
        node: "node1".to_owned(),
        services: [(
            "default/echo.default.svc.cluster.local".to_owned(),
            PortList {
                ports: (svc_ports.iter())
                    .map(|&(service_port, target_port)| Port {
                        service_port,
                        target_port,
                    })
                    .collect(),
            },
        )]
        .into(),
        authorization_policies: policies.iter().map(|p| (*p).to_owned()).collect(),
        ..Default::default()
    };
    let a = Address {
        r#type: Some(address::Type::Workload(w.clone())),
    };
    resource(&w.uid, type_url::ADDRESS, &a)
}

fn echo_service() -> Resource {
    let s = WireService {
        name: "echo".to_owned(),
        namespace: "default".to_owned(),
        hostname: "echo.default.svc.cluster.local".to_owned(),
        addresses: vec![NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 1],
        }],
        // A named target port: 0 at service level, resolved per pod.
        ports: vec![Port {
            service_port: 80,
            target_port: 0,
        }],
        ..Default::default()
    };
    let a = Address {
        r#type: Some(address::Type::Service(s)),
    };
    resource(
        "default/echo.default.svc.cluster.local",
        type_url::ADDRESS,
        &a,
    )
}

fn last(applied: &Applied) -> Arc<Snapshot> {
    applied.lock().unwrap().last().unwrap().0.clone()
}

#[test]
fn named_target_ports_resolve_per_endpoint() {
    let (h, applied) = handler();
    let updated = [
        workload("a", [10, 0, 0, 1], &[(80, 8080)], &[]),
        workload("b", [10, 0, 0, 2], &[(80, 9090)], &[]),
        echo_service(),
    ];
    h.apply(type_url::ADDRESS, &updated, &[]).unwrap();
    let snap = last(&applied);
    let svc = snap.service_by_vip([10, 96, 0, 1].into()).unwrap();
    assert_eq!(svc.endpoints.len(), 2);
    assert_eq!(svc.target_port("Kubernetes//Pod/default/a", 80), Some(8080));
    assert_eq!(svc.target_port("Kubernetes//Pod/default/b", 80), Some(9090));
    assert_eq!(svc.target_port("Kubernetes//Pod/default/b", 81), None);
    let found = snap.service_for_endpoint("Kubernetes//Pod/default/b", 9090);
    assert_eq!(found.map(|s| s.name.as_str()), Some("echo"));
}

#[test]
fn an_undecodable_resource_rejects_the_whole_response_and_keeps_what_was_held() {
    let (h, applied) = handler();
    h.apply(
        type_url::ADDRESS,
        &[workload("a", [10, 0, 0, 1], &[], &[])],
        &[],
    )
    .unwrap();
    let mut broken = workload("b", [10, 0, 0, 2], &[], &[]);
    if let Some(any) = broken.resource.as_mut() {
        any.value = vec![0xff, 0xff, 0xff];
    }
    let err = h
        .apply(
            type_url::ADDRESS,
            &[workload("c", [10, 0, 0, 3], &[], &[]), broken],
            &["Kubernetes//Pod/default/a".to_owned()],
        )
        .unwrap_err();
    assert!(err.contains("Kubernetes//Pod/default/b"), "{err}");
    assert_eq!(
        applied.lock().unwrap().len(),
        1,
        "nothing applied for the NACK"
    );
    // The next good response builds on what was held before the rejected one.
    h.apply(
        type_url::ADDRESS,
        &[workload("d", [10, 0, 0, 4], &[], &[])],
        &[],
    )
    .unwrap();
    let uids: Vec<_> = last(&applied).workloads.keys().cloned().collect();
    assert_eq!(
        uids,
        ["Kubernetes//Pod/default/a", "Kubernetes//Pod/default/d"]
    );
}

#[test]
fn unusable_objects_are_reported_and_the_rest_applies() {
    let (h, applied) = handler();
    let mut bad = workload("bad", [10, 0, 0, 9], &[], &[]);
    let w = WireWorkload {
        uid: "Kubernetes//Pod/default/bad".to_owned(),
        name: "bad".to_owned(),
        namespace: "default".to_owned(),
        addresses: vec![vec![1, 2, 3]],
        ..Default::default()
    };
    bad.resource = Some(prost_types::Any {
        type_url: type_url::ADDRESS.to_owned(),
        value: Address {
            r#type: Some(address::Type::Workload(w)),
        }
        .encode_to_vec(),
    });
    h.apply(
        type_url::ADDRESS,
        &[bad, workload("a", [10, 0, 0, 1], &[], &[])],
        &[],
    )
    .unwrap();
    let (snap, errors) = applied.lock().unwrap().last().cloned().unwrap();
    assert_eq!(snap.workloads.len(), 1);
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].contains("bad") && errors[0].contains("3 bytes"),
        "{errors:?}"
    );
}

fn presence() -> sec::StringMatch {
    sec::StringMatch {
        match_type: Some(MatchType::Presence(())),
    }
}

fn deny_without_identity(name: &str, scope: Scope) -> Resource {
    let a = Authorization {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        scope: scope as i32,
        action: Action::Deny as i32,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    not_principals: vec![presence()],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    resource(&format!("default/{name}"), type_url::AUTHORIZATION, &a)
}

#[test]
fn listed_policies_apply_only_to_the_workloads_that_list_them() {
    let (h, applied) = handler();
    let updated = [
        workload("strict", [10, 0, 0, 1], &[], &["default/strict"]),
        workload("open", [10, 0, 0, 2], &[], &[]),
    ];
    h.apply(type_url::ADDRESS, &updated, &[]).unwrap();
    h.apply(
        type_url::AUTHORIZATION,
        &[deny_without_identity("strict", Scope::WorkloadSelector)],
        &[],
    )
    .unwrap();
    let snap = last(&applied);
    let id = mesh_core::Identity::new("cluster.local", "default", "client").unwrap();
    let conn = |dst: [u8; 4], identity| ConnInfo {
        src_identity: identity,
        src_ip: [10, 0, 9, 9].into(),
        dst_ip: dst.into(),
        dst_port: 8080,
    };
    let strict = snap.workload_by_ip([10, 0, 0, 1].into()).unwrap();
    let open = snap.workload_by_ip([10, 0, 0, 2].into()).unwrap();
    let plaintext = snap.policies.evaluate(strict, &conn([10, 0, 0, 1], None));
    assert!(!plaintext.is_allow(), "{plaintext:?}");
    assert!(snap
        .policies
        .evaluate(strict, &conn([10, 0, 0, 1], Some(&id)))
        .is_allow());
    assert!(snap
        .policies
        .evaluate(open, &conn([10, 0, 0, 2], None))
        .is_allow());
}

#[test]
fn a_namespace_policy_covers_its_namespace() {
    let (h, applied) = handler();
    h.apply(
        type_url::ADDRESS,
        &[workload("a", [10, 0, 0, 1], &[], &[])],
        &[],
    )
    .unwrap();
    h.apply(
        type_url::AUTHORIZATION,
        &[deny_without_identity("ns-strict", Scope::Namespace)],
        &[],
    )
    .unwrap();
    let snap = last(&applied);
    let a = snap.workload_by_ip([10, 0, 0, 1].into()).unwrap();
    let conn = ConnInfo {
        src_identity: None,
        src_ip: [10, 0, 9, 9].into(),
        dst_ip: [10, 0, 0, 1].into(),
        dst_port: 80,
    };
    let d = snap.policies.evaluate(a, &conn);
    assert_eq!(
        d,
        crate::policy::Decision::Deny {
            policy: Some("default/ns-strict".into()),
            reason: "denied by DENY policy default/ns-strict".into()
        }
    );
}
