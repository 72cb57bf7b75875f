//! Snapshots of the waypoint's resources: Gateway API routes, VirtualService and
//! DestinationRule, targetRefs policies, the objects left out, and the examples.

use mesh_core::proto::mesh::l7::v1::{authorization, policy};

use super::*;
use crate::translate::authorizations;

/// Namespace shop uses waypoint `waypoint`; namespace plain uses none.
const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: shop}
spec: {clusterIP: 10.96.0.50, ports: [{name: mesh, port: 15008}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  selector: {app: reviews}
  clusterIP: 10.96.0.10
  ports:
    - {name: http-web, port: 9080, targetPort: 8080}
    - {name: api, port: 9090, appProtocol: grpc, targetPort: grpc}
    - {name: tcp-db, port: 5432}
    - {name: h2, port: 8081, appProtocol: kubernetes.io/h2c}
    - {name: other, port: 7000}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec: {selector: {app: reviews, version: v1}, clusterIP: 10.96.0.11, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec: {selector: {app: reviews, version: v2}, clusterIP: 10.96.0.12, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: details, namespace: shop}
spec: {selector: {app: details}, clusterIP: 10.96.0.13, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: plain}
spec: {selector: {app: ratings}, clusterIP: 10.96.1.10, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: details-a, namespace: shop, labels: {app: details, version: v1}}
spec: {nodeName: node1, serviceAccountName: details}
status: {podIP: 10.1.0.21}
---
apiVersion: v1
kind: Pod
metadata: {name: details-b, namespace: shop, labels: {app: details, version: v2}}
spec: {nodeName: node2, serviceAccountName: details}
status: {podIP: 10.2.0.21}
---
# version v1 too, but not selected by the details Service: in no subset of it.
apiVersion: v1
kind: Pod
metadata: {name: other-v1, namespace: shop, labels: {app: other, version: v1}}
spec: {nodeName: node2, serviceAccountName: other}
status: {podIP: 10.2.0.22}
"#;

const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
    - matches:
        - path: {type: PathPrefix, value: /api/}
          headers: [{name: X-Canary, value: "true"}]
          queryParams: [{name: debug, type: RegularExpression, value: "^(1|yes)$"}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: X-Route, value: canary}], remove: [X-Old]}
        - type: URLRewrite
          urlRewrite: {hostname: reviews.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
      backendRefs:
        - {name: reviews-v1, port: 9080, weight: 90}
        - name: reviews-v2
          port: 9080
          weight: 10
          filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-version, value: v2}]}}]
      timeouts: {request: 2s, backendRequest: 500ms}
    - matches: [{path: {type: Exact, value: /login}, method: POST}]
      filters:
        - type: RequestRedirect
          requestRedirect: {scheme: https, statusCode: 301}
    - matches: [{path: {type: RegularExpression, value: "/items/[0-9]+"}}]
      filters:
        - type: RequestMirror
          requestMirror:
            backendRef: {name: ratings, namespace: plain, port: 9080}
            fraction: {numerator: 1, denominator: 4}
      retry: {attempts: 3, codes: [503], backoff: 100ms}
    - filters:
        - type: RequestMirror
          requestMirror: {backendRef: {name: reviews-v2, port: 9080}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: reviews-grpc, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9090}]
  rules:
    - matches:
        - method: {service: reviews.Reviews, method: Get}
        - method: {service: reviews.Admin}
          headers: [{name: x-admin, value: "1"}]
      backendRefs: [{name: reviews-v2, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: details, namespace: shop}
spec:
  hosts: [details]
  http:
    - name: jason
      match:
        - headers: {end-user: {exact: jason}}
          withoutHeaders: {x-skip: {prefix: "y"}}
          queryParams: {v: {regex: "^2"}}
          uri: {prefix: /details}
          method: {exact: GET}
      route: [{destination: {host: details, subset: v2}}]
      rewrite: {uri: /d}
      fault:
        delay: {fixedDelay: 5s, percentage: {value: 10}}
        abort: {grpcStatus: UNAVAILABLE, percentage: {value: 0.5}}
      retries: {attempts: 3, perTryTimeout: 1s, retryOn: "5xx,connect-failure,503"}
      headers:
        request: {set: {X-User: jason}}
        response: {remove: [server]}
    - route:
        - {destination: {host: details.shop.svc.cluster.local, subset: v1, port: {number: 9080}}, weight: 75}
        - {destination: {host: details, subset: v2}, weight: 25, headers: {request: {add: {x-canary: "1"}}}}
      timeout: 3s
      mirror: {host: ratings.plain}
      mirrorPercentage: {value: 20}
    - match: [{uri: {exact: /old}}]
      redirect: {uri: /new, authority: details.example, redirectCode: 308}
    - match: [{uri: {exact: /health}, port: 9080}]
      directResponse: {status: 200, body: {string: ok}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: details, namespace: shop}
spec:
  host: details.shop.svc.cluster.local
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 250ms}
      http: {http1MaxPendingRequests: 10, http2MaxRequests: 1000, maxRequestsPerConnection: 5, maxRetries: 2, idleTimeout: 1m}
    outlierDetection: {consecutive5xxErrors: 3, interval: 5s}
  subsets:
    - {name: v1, labels: {version: v1}}
    - name: v2
      labels: {version: v2}
      trafficPolicy:
        loadBalancer: {consistentHash: {httpCookie: {name: session, ttl: 1h}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: plain}
spec:
  host: ratings
  trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}
"#;

/// One bad object of each kind, each left out with an error that names it.
const BAD: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: cors, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules: [{filters: [{type: CORS, cors: {allowOrigins: ["*"]}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bad-regex, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules: [{matches: [{path: {type: RegularExpression, value: "/(unclosed"}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: north-south, namespace: shop}
spec:
  parentRefs: [{name: ingress}]
  rules: [{backendRefs: [{name: reviews, port: 9080}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: no-port, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules: [{backendRefs: [{name: reviews-v2}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp, namespace: shop}
spec:
  hosts: [reviews]
  tcp: [{route: [{destination: {host: reviews}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: source-labels, namespace: shop}
spec:
  hosts: [reviews]
  http: [{match: [{sourceLabels: {app: x}}], route: [{destination: {host: reviews}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bad-duration, namespace: shop}
spec:
  hosts: [reviews]
  http: [{timeout: 5 seconds, route: [{destination: {host: reviews}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: second, namespace: shop}
spec: {host: details, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: nowhere, namespace: shop}
spec: {host: nothing.example.com}
"#;

fn model(parts: &[&str]) -> Objects {
    let mut objects = Objects::new("cluster.local");
    for (i, text) in parts.iter().enumerate() {
        assert_eq!(objects.add_documents(text, &format!("part {i}")), vec![]);
    }
    objects
}

fn shown(errors: &[ObjectError]) -> Vec<String> {
    errors.iter().map(ToString::to_string).collect()
}

#[test]
fn routes_and_upstream_policy_of_waypoint_services() {
    let l7 = resources(&model(&[CLUSTER, ROUTES]));
    assert_eq!(shown(&l7.errors), Vec::<String>::new());
    let names: Vec<&str> = l7.services.keys().map(String::as_str).collect();
    // Waypoint services (details, reviews, the waypoint's own is not), and the services
    // they send to, without routes of their own.
    assert_eq!(
        names,
        [
            "plain/ratings.plain.svc.cluster.local",
            "shop/details.shop.svc.cluster.local",
            "shop/reviews-v1.shop.svc.cluster.local",
            "shop/reviews-v2.shop.svc.cluster.local",
            "shop/reviews.shop.svc.cluster.local",
        ]
    );
    let reviews = &l7.services["shop/reviews.shop.svc.cluster.local"];
    assert_eq!(reviews.waypoints, ["shop/waypoint"]);
    let ratings = &l7.services["plain/ratings.plain.svc.cluster.local"];
    assert!(ratings.routes.is_empty() && ratings.traffic_policy.is_some());
    // Subsets carry the uids of the service's pods their labels pick.
    let details = &l7.services["shop/details.shop.svc.cluster.local"];
    let subsets: Vec<(&str, &[String])> = (details.subsets.iter())
        .map(|s| (s.name.as_str(), s.endpoints.as_slice()))
        .collect();
    assert_eq!(
        subsets,
        [
            ("v1", &["Kubernetes//Pod/shop/details-a".to_owned()][..]),
            ("v2", &["Kubernetes//Pod/shop/details-b".to_owned()][..]),
        ]
    );
    insta::assert_debug_snapshot!(l7.services);
}

#[test]
fn gateway_api_precedence_orders_the_routes_of_a_service() {
    let l7 = resources(&model(&[CLUSTER, ROUTES]));
    let reviews = &l7.services["shop/reviews.shop.svc.cluster.local"];
    let order: Vec<String> = reviews
        .routes
        .iter()
        .map(|r| {
            let path = r.matches.first().and_then(|m| m.path.as_ref());
            format!("{} {:?}", r.name, path.and_then(|p| p.kind.as_ref()))
        })
        .collect();
    insta::assert_debug_snapshot!(order);
    // Exact paths first, the catch-all last.
    assert!(order[0].contains("Exact(\"/login\")"), "{order:#?}");
    assert!(order.last().unwrap().ends_with("/3 None"), "{order:#?}");
}

#[test]
fn bad_route_objects_are_reported_and_left_out() {
    let l7 = resources(&model(&[CLUSTER, ROUTES, BAD]));
    let errors = shown(&l7.errors);
    insta::assert_debug_snapshot!(errors);
    for name in [
        "HTTPRoute shop/cors",
        "HTTPRoute shop/bad-regex",
        "HTTPRoute shop/north-south",
        "GRPCRoute shop/no-port",
        "VirtualService shop/tcp",
        "VirtualService shop/source-labels",
        "VirtualService shop/bad-duration",
        "DestinationRule shop/second",
        "DestinationRule shop/nowhere",
    ] {
        assert!(
            errors.iter().any(|e| e.contains(name)),
            "{name}: {errors:#?}"
        );
    }
    // The rest is served as without them.
    let good = resources(&model(&[CLUSTER, ROUTES]));
    assert_eq!(l7.services, good.services);
}

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint-get-only, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules:
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/*"], remoteIpBlocks: [10.0.0.0/8]}}]
      to: [{operation: {methods: [GET], paths: ["/api/*", "*/health"], ports: ["9080"], hosts: [reviews.shop.svc.cluster.local]}}]
      when: [{key: "request.headers[x-user]", values: [alice]}, {key: "request.auth.claims[group]", notValues: [guests]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-deny-admin, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}], from: [{source: {notRequestPrincipals: ["*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-all, namespace: shop}
spec:
  targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
  action: AUDIT
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ztunnel-l4, namespace: shop}
spec:
  selector: {matchLabels: {app: reviews}}
  rules: [{from: [{source: {namespaces: [shop]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: not-a-waypoint, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: ingress}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: unbound-service, namespace: plain}
spec:
  targetRefs: [{kind: Service, group: "", name: ratings}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: custom, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: CUSTOM
  provider: {name: ext-authz}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  jwtRules:
    - issuer: https://issuer.example
      audiences: [reviews]
      jwksUri: https://issuer.example/jwks.json
      fromHeaders: [{name: X-Jwt, prefix: "Bearer "}]
      fromParams: [token]
      forwardOriginalToken: true
      outputClaimToHeaders: [{header: X-Sub, claim: sub}]
    - issuer: local
      jwks: '{"keys": []}'
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: reviews-jwt, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  jwtRules: [{issuer: local, jwks: '{"keys": []}'}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: by-selector, namespace: shop}
spec:
  selector: {matchLabels: {app: reviews}}
  jwtRules: [{issuer: local, jwks: '{"keys": []}'}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: no-keys, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  jwtRules: [{issuer: local}]
"#;

#[test]
fn target_ref_policies_go_to_waypoints_only() {
    let objects = model(&[CLUSTER, POLICIES]);
    let l7 = resources(&objects);
    let names: Vec<&str> = l7.policies.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "shop/RequestAuthentication/jwt",
            "shop/RequestAuthentication/reviews-jwt",
            "shop/audit-all",
            "shop/reviews-deny-admin",
            "shop/waypoint-get-only",
        ]
    );
    for p in l7.policies.values() {
        assert_eq!(p.waypoints, ["shop/waypoint"], "{}", p.name);
    }
    let Some(policy::Kind::Authorization(deny)) = &l7.policies["shop/reviews-deny-admin"].kind
    else {
        panic!("an authorization")
    };
    assert_eq!(deny.action, authorization::Action::Deny as i32);
    let errors = shown(&l7.errors);
    assert_eq!(errors.len(), 5, "{errors:#?}");
    insta::assert_debug_snapshot!((&l7.policies, errors));
    // Ztunnels get the selector policy and none of the waypoints'.
    let (ztunnel, _) = authorizations(&objects);
    let for_ztunnels: Vec<&str> = ztunnel.keys().map(String::as_str).collect();
    assert_eq!(for_ztunnels, ["shop/ztunnel-l4"]);
}

#[test]
fn the_waypoint_example_translates_without_errors() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files = Vec::new();
    for dir in ["mesh", "waypoint"] {
        crate::objects::collect_yaml(&examples.join(dir), &mut files).unwrap();
    }
    files.sort();
    let mut objects = Objects::new("cluster.local");
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let errors = objects.add_documents(&text, &file.display().to_string());
        assert_eq!(shown(&errors), Vec::<String>::new());
    }
    let l7 = resources(&objects);
    assert_eq!(shown(&l7.errors), Vec::<String>::new());
    assert_eq!(
        shown(&crate::translate::waypoint::Waypoints::new(&objects).1),
        Vec::<String>::new()
    );
    let web = &l7.services["default/echo-web.default.svc.cluster.local"];
    let Some(Action::Forward(split)) = &web.routes[1].action else {
        panic!("the split forwards")
    };
    let weights: Vec<u32> = split.backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [90, 10]);
    insta::assert_debug_snapshot!((&l7.services, &l7.policies));
}

#[test]
fn durations_read_as_go_writes_them() {
    assert_eq!(duration_ms("2s"), Ok(2000));
    assert_eq!(duration_ms("1.5s"), Ok(1500));
    assert_eq!(duration_ms("250ms"), Ok(250));
    assert_eq!(duration_ms("1h30m"), Ok(5_400_000));
    assert_eq!(duration_ms("0"), Ok(0));
    for bad in ["", "5", "5 seconds", "1d", "s"] {
        assert!(duration_ms(bad).is_err(), "{bad}");
    }
}

#[test]
fn port_protocols_follow_app_protocol_then_name() {
    assert_eq!(protocol(Some("http"), Some("tcp-x")), Protocol::Http1);
    assert_eq!(protocol(None, Some("http-web")), Protocol::Http1);
    assert_eq!(protocol(None, Some("http2")), Protocol::Http2);
    assert_eq!(protocol(Some("kubernetes.io/h2c"), None), Protocol::Http2);
    assert_eq!(protocol(None, Some("grpc-api")), Protocol::Grpc);
    assert_eq!(protocol(None, Some("tcp")), Protocol::Tcp);
    assert_eq!(protocol(None, Some("web")), Protocol::Unspecified);
    assert_eq!(protocol(None, Some("httpx")), Protocol::Unspecified);
}
