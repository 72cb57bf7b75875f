//! L7 AuthorizationPolicy as a client sees it: 403 `RBAC: access denied`.

use std::sync::Arc;

use bytes::Bytes;
use mesh_core::proto::mesh::l7::v1 as pb;
use pb::authorization::Action;

use super::support::*;
use crate::http::Limits;

fn policy(name: &str, target: &str, action: Action, rules: Vec<pb::AuthzRule>) -> pb::Policy {
    pb::Policy {
        name: name.into(),
        namespace: NS.into(),
        targets: vec![target.into()],
        waypoints: vec!["default/waypoint".into()],
        kind: Some(pb::policy::Kind::Authorization(pb::Authorization {
            action: action as i32,
            rules,
        })),
    }
}

fn to(op: pb::Operation) -> pb::AuthzRule {
    pb::AuthzRule {
        to: vec![op],
        ..Default::default()
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

async fn start() -> (Waypoint, Vec<Server>) {
    let backends = Arc::new(TestBackends::default());
    let s = servers(&backends, "reviews", 1, Behaviour::default()).await;
    let wp = Waypoint::start(backends, &svc_key("reviews"), Limits::default()).await;
    (wp, s)
}

#[tokio::test]
async fn deny_policy_refuses_matching_paths_with_wildcards() {
    let (wp, s) = start().await;
    let deny = policy(
        "no-admin",
        "Gateway/default/waypoint",
        Action::Deny,
        vec![to(pb::Operation {
            paths: strings(&["/admin*", "*.secret"]),
            ..Default::default()
        })],
    );
    let errors = wp.apply_with(vec![service("reviews", vec![])], vec![deny]);
    assert!(errors.is_empty(), "{errors:?}");
    let r = get(wp.addr, "/admin/users", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.body.as_str()),
        (403, "RBAC: access denied")
    );
    assert_eq!(get(wp.addr, "/keys.secret", &[]).await.status, 403);
    assert_eq!(get(wp.addr, "/public", &[]).await.status, 200);
    assert_eq!(s[0].count(), 1, "denied requests never reach the backend");
}

#[tokio::test]
async fn allow_policy_makes_everything_else_denied() {
    let (wp, _s) = start().await;
    let allow = policy(
        "get-from-client-ns",
        "Service/default/reviews",
        Action::Allow,
        vec![pb::AuthzRule {
            from: vec![pb::Source {
                namespaces: strings(&["client-*"]),
                ..Default::default()
            }],
            to: vec![pb::Operation {
                methods: strings(&["GET"]),
                ..Default::default()
            }],
            when: vec![pb::Condition {
                key: "request.headers[x-team]".into(),
                values: strings(&["blue"]),
                not_values: vec![],
            }],
        }],
    );
    let errors = wp.apply_with(vec![service("reviews", vec![])], vec![allow]);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(get(wp.addr, "/", &[("x-team", "blue")]).await.status, 200);
    assert_eq!(get(wp.addr, "/", &[("x-team", "red")]).await.status, 403);
    assert_eq!(get(wp.addr, "/", &[]).await.status, 403);
    let post = request("POST", "/", &[("x-team", "blue")], Bytes::new());
    assert_eq!(Client::h1(wp.addr).await.send(post).await.status, 403);
}

#[tokio::test]
async fn principals_and_service_targets_scope_policies() {
    let (wp, _s) = start().await;
    // Allows only another namespace's principals, but targets another service.
    let elsewhere = policy(
        "ratings-only",
        "Service/default/ratings",
        Action::Allow,
        vec![pb::AuthzRule {
            from: vec![pb::Source {
                principals: strings(&["cluster.local/ns/other/*"]),
                ..Default::default()
            }],
            ..Default::default()
        }],
    );
    let errors = wp.apply_with(vec![service("reviews", vec![])], vec![elsewhere.clone()]);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(get(wp.addr, "/", &[]).await.status, 200);
    // The same policy on reviews: our client's principal does not match.
    let mut here = elsewhere;
    here.targets = vec!["Service/default/reviews".into()];
    wp.apply_with(vec![service("reviews", vec![])], vec![here]);
    assert_eq!(get(wp.addr, "/", &[]).await.status, 403);
}

#[tokio::test]
async fn invalid_deny_policy_fails_closed() {
    let (wp, _s) = start().await;
    let bad = policy(
        "bad-ip",
        "Gateway/default/waypoint",
        Action::Deny,
        vec![pb::AuthzRule {
            from: vec![pb::Source {
                ip_blocks: strings(&["not-an-ip"]),
                ..Default::default()
            }],
            ..Default::default()
        }],
    );
    let errors = wp.apply_with(vec![service("reviews", vec![])], vec![bad]);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(get(wp.addr, "/", &[]).await.status, 403);
}
