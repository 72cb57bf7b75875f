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
