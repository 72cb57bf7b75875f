//! Which services and workloads get which waypoint, and which Gateways are reported.

use mesh_core::proto::istio::workload::address;

use super::*;
use crate::translate::addresses;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: for-pods, namespace: shop, labels: {istio.io/waypoint-for: workload}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: for-all, namespace: shop, labels: {istio.io/waypoint-for: all}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: shop}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wrong-port, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15009, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: typo, namespace: shop, labels: {istio.io/waypoint-for: services}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: no-spec, namespace: shop}
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: shop}
spec:
  clusterIP: 10.96.0.50
  selector: {gateway.networking.k8s.io/gateway-name: waypoint}
  ports: [{name: mesh, port: 15008}]
---
apiVersion: v1
kind: Service
metadata: {name: for-all, namespace: shop}
spec: {clusterIP: 10.96.0.52, ports: [{name: mesh, port: 15008}]}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-7c9d, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {nodeName: node1, serviceAccountName: waypoint, containers: [{name: w, image: w}]}
status: {podIP: 10.0.1.50}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {selector: {app: reviews}, clusterIP: 10.96.0.10, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec: {selector: {app: ratings}, clusterIP: 10.96.0.11, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: details, namespace: shop, labels: {istio.io/use-waypoint: for-pods}}
spec: {selector: {app: details}, clusterIP: 10.96.0.12, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata:
  name: cross
  namespace: other
  labels: {istio.io/use-waypoint: waypoint, istio.io/use-waypoint-namespace: shop}
spec: {clusterIP: 10.96.1.10, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: other}
spec: {clusterIP: 10.96.1.11, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ghost, namespace: other, labels: {istio.io/use-waypoint: nowhere}}
spec: {clusterIP: 10.96.1.12, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-1, namespace: shop, labels: {app: reviews}}
spec: {nodeName: node1, containers: [{name: c, image: c}]}
status: {podIP: 10.0.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: details-1, namespace: shop, labels: {app: details, istio.io/use-waypoint: for-all}}
spec: {nodeName: node1, containers: [{name: c, image: c}]}
status: {podIP: 10.0.1.12}
---
apiVersion: v1
kind: Pod
metadata: {name: ratings-1, namespace: shop, labels: {app: ratings, istio.io/use-waypoint: for-pods}}
spec: {nodeName: node1, containers: [{name: c, image: c}]}
status: {podIP: 10.0.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec: {nodeName: node1, containers: [{name: c, image: c}]}
status: {podIP: 10.0.1.13}
"#;

fn objects() -> Objects {
    let mut objects = Objects::new("cluster.local");
    assert_eq!(objects.add_documents(CLUSTER, "cluster"), vec![]);
    objects
}

/// Each Address resource's name and the waypoint hostname it carries.
fn waypoint_of_each(objects: &Objects) -> BTreeMap<String, Option<String>> {
    let host = |w: &Option<GatewayAddress>| {
        w.as_ref().map(|w| match &w.destination {
            Some(gateway_address::Destination::Hostname(h)) => {
                format!("{}/{}:{}", h.namespace, h.hostname, w.hbone_mtls_port)
            }
            other => format!("{other:?}"),
        })
    };
    addresses(objects)
        .into_iter()
        .map(|(name, a)| {
            let w = match &a.r#type {
                Some(address::Type::Service(s)) => host(&s.waypoint),
                Some(address::Type::Workload(w)) => host(&w.waypoint),
                None => None,
            };
            (name, w)
        })
        .collect()
}

#[test]
fn services_and_workloads_get_the_waypoint_their_labels_name() {
    let got = waypoint_of_each(&objects());
    let at = |name: &str| got[name].as_deref();
    let shop = Some("shop/waypoint.shop.svc.cluster.local:15008");
    let all = Some("shop/for-all.shop.svc.cluster.local:15008");
    assert_eq!(
        at("shop/reviews.shop.svc.cluster.local"),
        shop,
        "namespace label"
    );
    assert_eq!(
        at("shop/ratings.shop.svc.cluster.local"),
        None,
        "none opts out"
    );
    assert_eq!(
        at("shop/details.shop.svc.cluster.local"),
        None,
        "a workload waypoint serves no service"
    );
    assert_eq!(
        at("other/cross.other.svc.cluster.local"),
        shop,
        "other namespace"
    );
    assert_eq!(at("other/plain.other.svc.cluster.local"), None);
    assert_eq!(
        at("other/ghost.other.svc.cluster.local"),
        None,
        "no such waypoint"
    );
    assert_eq!(
        at("shop/waypoint.shop.svc.cluster.local"),
        None,
        "its own Service"
    );
    assert_eq!(
        at("Kubernetes//Pod/shop/reviews-1"),
        None,
        "the namespace's waypoint serves services only"
    );
    assert_eq!(at("Kubernetes//Pod/shop/details-1"), all, "pod label, all");
    assert_eq!(
        at("Kubernetes//Pod/shop/ratings-1"),
        Some("shop/for-pods.shop.svc.cluster.local:15008"),
        "pod label, workload"
    );
    assert_eq!(at("Kubernetes//Pod/shop/opted-out"), None);
    assert_eq!(
        at("Kubernetes//Pod/shop/waypoint-7c9d"),
        None,
        "its own pods"
    );
    insta::assert_debug_snapshot!(got);
}

#[test]
fn gateways_that_are_no_waypoint_and_dangling_labels_are_reported() {
    let (waypoints, errors) = Waypoints::new(&objects());
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    insta::assert_debug_snapshot!(shown);
    assert_eq!(shown.len(), 6, "{shown:#?}");
    let ids: Vec<String> = waypoints.by_key.values().map(Waypoint::id).collect();
    assert_eq!(ids, ["shop/for-all", "shop/for-pods", "shop/waypoint"]);
}

#[test]
fn the_address_carries_the_waypoint_service_and_hbone_port() {
    let objects = objects();
    let addrs = addresses(&objects);
    let Some(address::Type::Service(reviews)) =
        &addrs["shop/reviews.shop.svc.cluster.local"].r#type
    else {
        panic!("reviews is a service")
    };
    insta::assert_debug_snapshot!(reviews.waypoint);
}
