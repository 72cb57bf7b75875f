use mesh_core::proto::mesh::l7::v1 as pb;

use super::*;

fn svc(routes: Vec<pb::Route>) -> pb::ServiceConfig {
    pb::ServiceConfig {
        namespace: "default".into(),
        hostname: "reviews.default.svc.cluster.local".into(),
        waypoints: vec!["default/waypoint".into()],
        ports: vec![
            pb::PortConfig {
                port: 80,
                target_port: 8080,
                protocol: pb::Protocol::Http1 as i32,
            },
            pb::PortConfig {
                port: 9090,
                target_port: 9090,
                protocol: pb::Protocol::Grpc as i32,
            },
        ],
        routes,
        ..Default::default()
    }
}

fn fwd(name: &str, weights: &[u32]) -> pb::Route {
    let backends = weights
        .iter()
        .map(|w| pb::WeightedBackend {
            backend: Some(pb::Backend {
                service: "default/reviews.default.svc.cluster.local".into(),
                ..Default::default()
            }),
            weight: *w,
            ..Default::default()
        })
        .collect();
    pb::Route {
        name: name.into(),
        action: Some(pb::route::Action::Forward(pb::Forward { backends })),
        ..Default::default()
    }
}

#[test]
fn valid_config_converts_and_reports_protocols() {
    let mut r = fwd("ok", &[90, 10]);
    r.matches = vec![pb::RouteMatch {
        path: Some(pb::StringMatch {
            kind: Some(pb::string_match::Kind::Regex("/a/[0-9]+".into())),
        }),
        ..Default::default()
    }];
    r.retry = Some(pb::RetryPolicy {
        attempts: 2,
        retry_on: vec!["5xx,connect-failure".into()],
        ..Default::default()
    });
    let (cfg, errors) = Config::from_proto("default/waypoint", &[svc(vec![r])], &[]);
    assert!(errors.is_empty(), "{errors:?}");
    let key = "default/reviews.default.svc.cluster.local";
    assert_eq!(cfg.protocol(key, 80), Protocol::Http1);
    assert_eq!(cfg.protocol(key, 9090), Protocol::Grpc);
    assert_eq!(cfg.protocol(key, 1), Protocol::Detect);
    assert_eq!(cfg.protocol("default/other", 80), Protocol::Detect);
    let route = &cfg.services[key].routes[0];
    let m = route.matches[0].path.as_ref().unwrap();
    // Regexes match the whole path.
    assert!(m.matches("/a/12") && !m.matches("/a/12/b") && !m.matches("/x/a/1"));
    let retry = route.retry.as_ref().unwrap();
    assert!(retry.retry_on.server_error && retry.retry_on.connect_failure);
    assert!(!retry.retry_on.reset);
    // The dump shows what runs.
    let dump = serde_json::to_value(&cfg).unwrap();
    assert_eq!(
        dump["services"][key]["routes"][0]["matches"][0]["path"]["regex"],
        "^(?:/a/[0-9]+)$"
    );
}

#[test]
fn invalid_entries_are_reported_and_left_out() {
    let bad_regex = {
        let mut r = fwd("bad-regex", &[1]);
        r.matches = vec![pb::RouteMatch {
            path: Some(pb::StringMatch {
                kind: Some(pb::string_match::Kind::Regex("(".into())),
            }),
            ..Default::default()
        }];
        r
    };
    let zero = fwd("zero-weights", &[0, 0]);
    let mut bad_retry = fwd("bad-retry", &[1]);
    bad_retry.retry = Some(pb::RetryPolicy {
        attempts: 1,
        retry_on: vec!["sometimes".into()],
        ..Default::default()
    });
    let mut bad_fault = fwd("bad-fault", &[1]);
    bad_fault.fault = Some(pb::Fault {
        abort: Some(pb::fault::Abort {
            http_status: 503,
            grpc_status: 0,
            percent: 150.0,
        }),
        delay: None,
    });
    let mut bad_header = fwd("bad-header", &[1]);
    bad_header.request_headers = Some(pb::HeaderOps {
        set: [("bad header".to_string(), "v".to_string())].into(),
        ..Default::default()
    });
    let no_action = pb::Route {
        name: "no-action".into(),
        ..Default::default()
    };
    let good = fwd("good", &[1]);
    let routes = vec![
        bad_regex, zero, bad_retry, bad_fault, bad_header, no_action, good,
    ];
    let nameless = pb::ServiceConfig::default();
    let (cfg, errors) = Config::from_proto("default/waypoint", &[svc(routes), nameless], &[]);
    let names: Vec<String> = cfg
        .services
        .values()
        .flat_map(|s| s.routes.iter().map(|r| r.name.clone()))
        .collect();
    assert_eq!(names, ["good"]);
    assert_eq!(errors.len(), 7, "{errors:#?}");
    assert!(errors
        .iter()
        .any(|e| matches!(e, ConfigError::Route { route, reason, .. }
        if route == "bad-regex" && reason.contains("regex"))));
    assert!(errors
        .iter()
        .any(|e| matches!(e, ConfigError::Service { .. })));
}

#[test]
fn subset_policy_overrides_the_service_policy_field_by_field() {
    use pb::load_balancer::{Policy, Simple};
    let mut s = svc(vec![]);
    s.traffic_policy = Some(pb::TrafficPolicy {
        load_balancer: Some(pb::LoadBalancer {
            policy: Some(Policy::Simple(Simple::LeastRequest as i32)),
        }),
        connection_pool: Some(pb::ConnectionPool {
            max_connections: 5,
            ..Default::default()
        }),
        ..Default::default()
    });
    s.subsets = vec![pb::Subset {
        name: "v2".into(),
        labels: [("version".to_string(), "v2".to_string())].into(),
        traffic_policy: Some(pb::TrafficPolicy {
            load_balancer: Some(pb::LoadBalancer {
                policy: Some(Policy::Simple(Simple::Random as i32)),
            }),
            ..Default::default()
        }),
        endpoints: Vec::new(),
    }];
    let (cfg, errors) = Config::from_proto("default/waypoint", &[s], &[]);
    assert!(errors.is_empty(), "{errors:?}");
    let key = "default/reviews.default.svc.cluster.local";
    let v2 = cfg.traffic_policy(key, Some("v2"));
    assert_eq!(v2.load_balancer, LoadBalancer::Random);
    assert_eq!(v2.connection_pool.max_connections, Some(5));
    assert_eq!(
        cfg.traffic_policy(key, None).load_balancer,
        LoadBalancer::LeastRequest
    );
}
