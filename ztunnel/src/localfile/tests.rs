use super::*;

#[test]
fn example_file_parses() {
    let (snap, errors) = parse(include_str!("../../../examples/local-mesh.yaml")).unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    let echo = snap.service_by_vip("127.0.10.1".parse().unwrap()).unwrap();
    assert_eq!(echo.hostname, "echo.default.svc.cluster.local");
    assert_eq!(echo.target_port("default/echo-v1", 80), Some(8080));
    assert_eq!(echo.endpoints, vec!["default/echo-v1", "default/echo-v2"]);
    let sleep = snap.workload_by_ip("127.0.1.10".parse().unwrap()).unwrap();
    assert_eq!(
        sleep.identity().to_string(),
        "spiffe://cluster.local/ns/default/sa/sleep"
    );
    let legacy = snap.workload("legacy/legacy").unwrap();
    assert_eq!(legacy.protocol, Protocol::Tcp);
    assert_eq!(snap.policies.len(), 1);
    assert_eq!(snap.local_workloads("node2").count(), 3);
    assert!(snap.service_by_host("echo.default").is_some());
}

#[test]
fn invalid_objects_are_named_and_skipped() {
    let text = r#"
workloads:
  - {name: ok, node: n1, ips: [127.0.0.5]}
  - {name: Bad_Name, serviceAccount: "A", node: n1, ips: [127.0.0.6]}
  - {name: dup, node: n1, ips: [127.0.0.5]}
  - {name: noip, node: n1, ips: []}
services:
  - {name: s, vips: [], ports: [{port: 80}]}
peerAuthentications:
  - metadata: {name: x, namespace: default}
    spec: {mtls: {mode: SOMETIMES}}
"#;
    let (snap, errors) = parse(text).unwrap();
    assert_eq!(snap.workloads.len(), 1);
    let joined = errors.join("\n");
    for needle in [
        "default/Bad_Name",
        "default/dup",
        "default/noip",
        "service default/s",
        "default/x",
    ] {
        assert!(joined.contains(needle), "{needle} not in {joined}");
    }
}

#[test]
fn broken_yaml_and_unknown_fields_are_errors() {
    assert!(parse("workloads: [").is_err());
    assert!(parse("workloadz: []").is_err());
}

#[test]
fn peer_authentication_levels() {
    let text = r#"
workloads:
  - {name: a, namespace: ns1, node: n, ips: [127.0.0.5], labels: {app: a}}
  - {name: b, namespace: ns1, node: n, ips: [127.0.0.6]}
  - {name: c, namespace: ns2, node: n, ips: [127.0.0.7]}
peerAuthentications:
  - metadata: {name: mesh, namespace: istio-system}
    spec: {mtls: {mode: STRICT}}
  - metadata: {name: ns, namespace: ns1}
    spec: {mtls: {mode: PERMISSIVE}}
  - metadata: {name: wl, namespace: ns1}
    spec: {selector: {matchLabels: {app: a}}, mtls: {mode: STRICT}}
"#;
    let (snap, errors) = parse(text).unwrap();
    assert!(errors.is_empty());
    let mode = |uid: &str| {
        snap.peer_authentication
            .mode_for(snap.workload(uid).unwrap())
    };
    assert_eq!(mode("ns1/a"), MtlsMode::Strict);
    assert_eq!(mode("ns1/b"), MtlsMode::Permissive);
    assert_eq!(mode("ns2/c"), MtlsMode::Strict);
}

#[test]
fn waypoints_of_services_and_workloads_are_kept_and_bad_ones_named() {
    let text = r#"
workloads:
  - {name: wp, serviceAccount: wp, node: n2, ips: [127.0.3.10], protocol: TCP, labels: {gw: wp}}
  - {name: echo, node: n2, ips: [127.0.2.10], labels: {app: echo}, waypoint: {address: 127.0.3.10}}
  - {name: bad, node: n2, ips: [127.0.2.11], waypoint: {hostname: wp, address: 127.0.3.10}}
services:
  - {name: wp, vips: [127.0.10.9], ports: [{port: 15008}], selector: {gw: wp}}
  - {name: echo, vips: [127.0.10.1], ports: [{port: 80, targetPort: 8080}], selector: {app: echo}, waypoint: {hostname: wp}}
"#;
    let (snap, errors) = parse(text).unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("workload default/bad"), "{errors:?}");
    let echo = snap.service_by_vip("127.0.10.1".parse().unwrap()).unwrap();
    let gw = echo.waypoint.as_ref().unwrap();
    assert_eq!(
        gw.destination,
        GatewayDestination::Hostname {
            namespace: "default".to_owned(),
            hostname: "wp.default.svc.cluster.local".to_owned(),
        }
    );
    let pods = snap.waypoint_pods(gw);
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].addr.to_string(), "127.0.3.10:15008");
    assert_eq!(
        pods[0].identity.to_string(),
        "spiffe://cluster.local/ns/default/sa/wp"
    );
    let w = snap.workload("default/echo").unwrap();
    assert_eq!(snap.waypoint_pods(w.waypoint.as_ref().unwrap()), pods);
}
