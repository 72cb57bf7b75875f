//! Snapshots of the Address resources for a small cluster: every enrolment case, a
//! Deployment-owned pod, a named target port and a headless service.

use super::*;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-5d9f8c7b6-x2x9z
  namespace: shop
  labels: {app: web, version: v2}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-5d9f8c7b6, uid: u1}]
spec:
  nodeName: node1
  serviceAccountName: web
  containers: [{name: web, image: web, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.0.1.5, podIPs: [{ip: 10.0.1.5}, {ip: "fd00::5"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: debug, namespace: shop, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: node1, containers: [{name: c, image: c}]}
status:
  podIP: 10.0.1.6
  conditions: [{type: Ready, status: "False"}]
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy, labels: {app: old}}
spec: {nodeName: node2, containers: [{name: c, image: c}]}
status: {podIP: 10.0.2.7}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-in, namespace: legacy, labels: {istio.io/dataplane-mode: ambient}}
spec: {nodeName: node2, containers: [{name: c, image: c}]}
status: {podIP: 10.0.2.8}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: http}, {name: admin, port: 9000, targetPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: old, namespace: legacy}
spec:
  selector: {app: old}
  clusterIP: None
  ports: [{port: 80}]
"#;

fn objects() -> Objects {
    let mut objects = Objects::new("cluster.local");
    assert_eq!(objects.add_documents(CLUSTER, "cluster"), vec![]);
    objects
}

#[test]
fn addresses_of_a_small_cluster() {
    insta::assert_debug_snapshot!(addresses(&objects()));
}

#[test]
fn enrolment_follows_namespace_and_pod_labels() {
    let objects = objects();
    let mode = |ns: &str, name: &str| {
        let pod = &objects.pods[&(ns.to_owned(), name.to_owned())];
        enrolled(&objects, pod)
    };
    assert!(mode("shop", "web-5d9f8c7b6-x2x9z"), "namespace label");
    assert!(!mode("shop", "debug"), "pod opts out");
    assert!(!mode("legacy", "old"), "namespace not enrolled");
    assert!(mode("legacy", "opted-in"), "pod opts in");
}

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-allow, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
    - from: [{source: {principals: [cluster.local/ns/shop/sa/*], namespaces: [shop]}}, {source: {ipBlocks: [10.0.0.0/8, 192.168.1.1]}}]
      to: [{operation: {ports: ["8080", 9000]}}]
      when: [{key: source.namespace, notValues: [legacy]}]
    - to: [{operation: {methods: [GET]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  action: DENY
  rules:
    - to: [{operation: {notPorts: ["8080"]}}]
    - to: [{operation: {paths: [/admin]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-wide, namespace: istio-system}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: for-waypoint, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: shop}
spec: {action: AUDIT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-cidr, namespace: shop}
spec: {rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]}
"#;

fn with_policies() -> Objects {
    let mut objects = objects();
    assert_eq!(objects.add_documents(POLICIES, "policies"), vec![]);
    objects
}

#[test]
fn authorizations_for_ztunnels() {
    let (auths, errors) = authorizations(&with_policies());
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(shown.len(), 2, "{shown:#?}");
    assert!(
        shown[0].contains("shop/audit: action Audit is not enforced"),
        "{shown:#?}"
    );
    assert!(
        shown[1].contains("shop/bad-cidr: ipBlock \"10.0.0.0/33\""),
        "{shown:#?}"
    );
    assert!(
        !auths.contains_key("shop/for-waypoint"),
        "waypoint policies stay with waypoints"
    );
    // The ALLOW rule needing L7 is dropped; the DENY one denies everything.
    assert_eq!(auths["shop/web-allow"].rules.len(), 1);
    assert!(auths["shop/no-admin"].rules[1].clauses.is_empty());
    insta::assert_debug_snapshot!(auths);
}

#[test]
fn workloads_name_the_selector_policies_that_apply() {
    let addrs = addresses(&with_policies());
    let Some(address::Type::Workload(web)) =
        &addrs["Kubernetes//Pod/shop/web-5d9f8c7b6-x2x9z"].r#type
    else {
        panic!("web is a workload")
    };
    assert_eq!(web.authorization_policies, ["shop/web-allow"]);
    let Some(address::Type::Workload(debug)) = &addrs["Kubernetes//Pod/shop/debug"].r#type else {
        panic!("debug is a workload")
    };
    assert!(debug.authorization_policies.is_empty());
}

/// What PeerAuthentication gives ztunnels: the Authorization resources it adds, and the
/// policies each workload lists.
fn peer_authn(manifests: &str) -> (Vec<String>, String) {
    let mut objects = objects();
    assert_eq!(objects.add_documents(manifests, "peer"), vec![]);
    let (auths, errors) = authorizations(&objects);
    let listed: BTreeMap<String, Vec<String>> = addresses(&objects)
        .into_values()
        .filter_map(|a| match a.r#type {
            Some(address::Type::Workload(w)) => Some((
                format!("{}/{}", w.namespace, w.name),
                w.authorization_policies,
            )),
            _ => None,
        })
        .collect();
    let shown = format!("{auths:#?}\n{listed:#?}");
    (errors.iter().map(ToString::to_string).collect(), shown)
}

const STATIC: &str = "istio-system/istio_converted_static_strict";

fn listed(shown: &str, pod: &str) -> bool {
    // The workload map prints as `"ns/pod": [ "policy", ],`.
    let at = shown
        .rfind(&format!("\"{pod}\": ["))
        .expect("pod is listed");
    let end = shown[at..].find(']').expect("list closes") + at;
    shown[at..end].contains(STATIC)
}

#[test]
fn mesh_strict_peer_authentication() {
    let (errors, shown) = peer_authn(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"#,
    );
    assert_eq!(errors, Vec::<String>::new());
    for pod in ["shop/web-5d9f8c7b6-x2x9z", "shop/debug", "legacy/old"] {
        assert!(listed(&shown, pod), "{pod}: {shown}");
    }
    insta::assert_snapshot!(shown);
}

#[test]
fn namespace_strict_peer_authentication() {
    let (errors, shown) = peer_authn(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
"#,
    );
    assert_eq!(errors, Vec::<String>::new());
    assert!(listed(&shown, "shop/web-5d9f8c7b6-x2x9z"), "{shown}");
    assert!(listed(&shown, "shop/debug"), "{shown}");
    assert!(!listed(&shown, "legacy/old"), "{shown}");
    insta::assert_snapshot!(shown);
}

#[test]
fn workload_permissive_overrides_namespace_strict() {
    let (errors, shown) = peer_authn(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns-unset, namespace: shop}
spec: {}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web-open, namespace: shop}
spec: {selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}}
"#,
    );
    assert_eq!(errors, Vec::<String>::new());
    assert!(!listed(&shown, "shop/web-5d9f8c7b6-x2x9z"), "{shown}");
    assert!(listed(&shown, "shop/debug"), "UNSET inherits: {shown}");
    insta::assert_snapshot!(shown);
}

#[test]
fn workload_strict_peer_authentication() {
    let (errors, shown) = peer_authn(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web-strict, namespace: shop}
spec: {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}
"#,
    );
    assert_eq!(errors, Vec::<String>::new());
    assert!(listed(&shown, "shop/web-5d9f8c7b6-x2x9z"), "{shown}");
    assert!(!listed(&shown, "shop/debug"), "{shown}");
    assert!(!listed(&shown, "legacy/old"), "{shown}");
    insta::assert_snapshot!(shown);
}

#[test]
fn port_level_exceptions_get_their_own_policy() {
    let (errors, shown) = peer_authn(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web-metrics, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  portLevelMtls:
    "9000": {mode: PERMISSIVE}
    "8080": {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: old-admin, namespace: legacy}
spec:
  selector: {matchLabels: {app: old}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls: {"9443": {mode: STRICT}}
"#,
    );
    assert_eq!(errors, Vec::<String>::new());
    assert!(
        shown.contains("\"shop/converted_peer_authentication_web-metrics\""),
        "{shown}"
    );
    assert!(
        shown.contains("\"legacy/converted_peer_authentication_old-admin\""),
        "{shown}"
    );
    assert!(!listed(&shown, "shop/web-5d9f8c7b6-x2x9z"), "{shown}");
    insta::assert_snapshot!(shown);
}

#[test]
fn bad_peer_authentications_are_reported_and_skipped() {
    let (errors, shown) = peer_authn(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: typo, namespace: shop}
spec: {mtls: {mode: STRICTER}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: bad-port, namespace: shop}
spec: {selector: {matchLabels: {app: web}}, portLevelMtls: {http: {mode: STRICT}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns-ports, namespace: legacy}
spec: {mtls: {mode: STRICT}, portLevelMtls: {"80": {mode: PERMISSIVE}}}
"#,
    );
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(errors[0].contains("legacy/ns-ports: portLevelMtls needs a workload selector"));
    assert!(errors[1].contains("shop/bad-port: portLevelMtls key \"http\""));
    assert!(errors[2].contains("shop/typo: mtls mode \"STRICTER\""));
    // The typo does not make shop STRICT; legacy's own mode still applies.
    assert!(!listed(&shown, "shop/web-5d9f8c7b6-x2x9z"), "{shown}");
    assert!(listed(&shown, "legacy/old"), "{shown}");
}

const SELECTORLESS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: legacy-db, namespace: legacy}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: sql, port: 5432, targetPort: 15432}, {name: metrics, port: 9100}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: legacy-db-a, namespace: legacy, labels: {kubernetes.io/service-name: legacy-db}}
addressType: IPv4
endpoints:
  - addresses: [10.0.2.7]
  - addresses: [192.168.50.1]
ports: [{name: sql, port: 25432, protocol: TCP}, {name: metrics, port: 9100}, {name: other, port: 1}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-managed, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.0.2.8]}]
ports: [{name: http, port: 8080}]
"#;

#[test]
fn selectorless_services_take_endpoints_from_slices() {
    let mut objects = objects();
    assert_eq!(objects.add_documents(SELECTORLESS, "slices"), vec![]);
    let (_, skipped) = slice_backings(&objects);
    let skipped: Vec<String> = skipped.iter().map(ToString::to_string).collect();
    assert_eq!(skipped.len(), 1, "{skipped:#?}");
    assert!(skipped[0].contains("EndpointSlice legacy/legacy-db-a: address 192.168.50.1"));
    let addrs = addresses(&objects);
    let Some(address::Type::Workload(old)) = &addrs["Kubernetes//Pod/legacy/old"].r#type else {
        panic!("old is a workload")
    };
    let Some(address::Type::Workload(opted)) = &addrs["Kubernetes//Pod/legacy/opted-in"].r#type
    else {
        panic!("opted-in is a workload")
    };
    // A Service with a selector ignores slices that name it.
    assert!(!opted
        .services
        .contains_key("shop/web.shop.svc.cluster.local"));
    insta::assert_debug_snapshot!(old.services);
}

/// The cache gives what a full translation gives, model after model, and translates
/// again only the pods that changed while nothing else did.
#[test]
fn address_cache_matches_full_translation_and_reuses_unchanged_pods() {
    let model = |extra: &[&str]| {
        let mut objects = Objects::new("cluster.local");
        for (i, text) in extra.iter().enumerate() {
            assert_eq!(objects.add_documents(text, &format!("part {i}")), vec![]);
        }
        Arc::new(objects)
    };
    let relabelled = CLUSTER.replace("labels: {app: old}", "labels: {app: old, tier: db}");
    let ambient = relabelled.replace(
        "metadata: {name: legacy}",
        "metadata: {name: legacy, labels: {istio.io/dataplane-mode: ambient}}",
    );
    let steps: [(&str, Arc<Objects>, Option<usize>); 7] = [
        ("first", model(&[CLUSTER]), Some(6)),
        ("one pod relabelled", model(&[&relabelled]), Some(1)),
        ("equal model, new objects", model(&[&relabelled]), Some(0)),
        ("a policy added", model(&[&relabelled, POLICIES]), None),
        (
            "slices added",
            model(&[&relabelled, POLICIES, SELECTORLESS]),
            None,
        ),
        (
            "namespace enrolled",
            model(&[&ambient, POLICIES, SELECTORLESS]),
            None,
        ),
        (
            "unchanged",
            model(&[&ambient, POLICIES, SELECTORLESS]),
            Some(0),
        ),
    ];
    let mut cache = AddressCache::default();
    for (what, objects, translated) in steps {
        let count = std::cell::Cell::new(0);
        let got = cache.addresses(&objects, |a| {
            count.set(count.get() + 1);
            a.clone()
        });
        assert_eq!(got, addresses(&objects), "{what}");
        if let Some(n) = translated {
            assert_eq!(count.get(), n, "{what}: resources translated");
        }
    }
}
