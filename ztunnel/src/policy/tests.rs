use std::net::IpAddr;

use mesh_core::Identity;
use serde::Deserialize;

use super::*;
use crate::model::Protocol;

const ROOT: &str = "istio-system";

fn manifests(yaml: &str) -> Result<Vec<AuthorizationPolicyManifest>, serde_yaml::Error> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(AuthorizationPolicyManifest::deserialize)
        .collect()
}

fn policies(yaml: &str) -> Policies {
    let parsed = manifests(yaml).expect("fixture parses");
    Policies::from_manifests(parsed, ROOT).expect("fixture converts")
}

fn convert_err(yaml: &str) -> PolicyError {
    let parsed = manifests(yaml).expect("fixture parses");
    Policies::from_manifests(parsed, ROOT).expect_err("conversion fails")
}

fn workload(namespace: &str, labels: &[(&str, &str)]) -> Workload {
    Workload {
        uid: format!("{namespace}/w"),
        name: "w".to_owned(),
        namespace: namespace.to_owned(),
        service_account: "w".to_owned(),
        trust_domain: "cluster.local".to_owned(),
        ips: vec![ip(DST_IP)],
        node: "node-1".to_owned(),
        protocol: Protocol::Hbone,
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        authorization_policies: Vec::new(),
        waypoint: None,
    }
}

const DST_IP: &str = "10.0.0.9";
const SRC_IP: &str = "10.1.2.3";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn peer(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa).expect("test identity")
}

/// Decision for a connection to `dst` on `port` from `src` at `src_ip`.
fn decide(
    p: &Policies,
    dst: &Workload,
    src: Option<&Identity>,
    src_ip: &str,
    port: u16,
) -> Decision {
    let conn = ConnInfo {
        src_identity: src,
        src_ip: ip(src_ip),
        dst_ip: ip(DST_IP),
        dst_port: port,
    };
    p.evaluate(dst, &conn)
}

fn allowed(p: &Policies, dst: &Workload, src: Option<&Identity>) -> bool {
    decide(p, dst, src, SRC_IP, 8080).is_allow()
}

fn allow_by(policy: &str) -> Decision {
    Decision::Allow {
        policy: Some(policy.to_owned()),
    }
}

const DEFAULT_DENY: &str = "no ALLOW policy matched";

fn default_deny() -> Decision {
    Decision::Deny {
        policy: None,
        reason: DEFAULT_DENY.to_owned(),
    }
}

#[test]
fn no_policies_allow_everything() {
    let p = Policies::default();
    assert!(p.is_empty());
    let d = decide(&p, &workload("app", &[]), None, SRC_IP, 80);
    assert_eq!(d, Decision::Allow { policy: None });
}

#[test]
fn allow_policy_allows_its_principal_and_denies_the_rest() {
    let p = policies(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-sleep
  namespace: app
  labels: {team: a}
  annotations: {note: x}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/client/sa/sleep"]
"#,
    );
    assert_eq!(p.len(), 1);
    let dst = workload("app", &[]);
    let sleep = peer("client", "sleep");
    let other = peer("client", "other");
    let d = decide(&p, &dst, Some(&sleep), SRC_IP, 8080);
    assert_eq!(d, allow_by("app/allow-sleep"));
    assert_eq!(decide(&p, &dst, Some(&other), SRC_IP, 8080), default_deny());
}

#[test]
fn deny_policy_denies_and_names_itself() {
    let p = policies(
        r#"
metadata: {name: no-bad, namespace: app}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: [bad]}
"#,
    );
    let dst = workload("app", &[]);
    match decide(&p, &dst, Some(&peer("bad", "x")), SRC_IP, 80) {
        Decision::Deny { policy, reason } => {
            assert_eq!(policy.as_deref(), Some("app/no-bad"));
            assert!(reason.contains("app/no-bad"), "{reason}");
            assert!(!reason.contains("L7"), "{reason}");
        }
        d => panic!("expected deny, got {d:?}"),
    }
    // No ALLOW policy: anything not denied is allowed, without naming a policy.
    let d = decide(&p, &dst, Some(&peer("good", "x")), SRC_IP, 80);
    assert_eq!(d, Decision::Allow { policy: None });
}

#[test]
fn deny_is_checked_before_allow() {
    let p = policies(
        r#"
metadata: {name: allow-all, namespace: app}
spec:
  rules: [{}]
---
metadata: {name: deny-evil, namespace: app}
spec:
  action: DENY
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/client/sa/evil"]}
"#,
    );
    let dst = workload("app", &[]);
    let d = decide(&p, &dst, Some(&peer("client", "evil")), SRC_IP, 80);
    assert!(!d.is_allow());
    assert!(matches!(d, Decision::Deny { policy: Some(ref n), .. } if n == "app/deny-evil"));
    let d = decide(&p, &dst, Some(&peer("client", "good")), SRC_IP, 80);
    assert_eq!(d, allow_by("app/allow-all"));
}

#[test]
fn namespace_selector_and_root_scopes() {
    let p = policies(
        r#"
metadata: {name: ns-wide, namespace: app}
spec: {}
---
metadata: {name: only-db, namespace: data}
spec:
  selector:
    matchLabels: {app: db}
---
metadata: {name: mesh-deny, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: [quarantine]}
---
metadata: {name: mesh-legacy, namespace: istio-system}
spec:
  selector:
    matchLabels: {tier: legacy}
"#,
    );
    let client = peer("client", "c");
    // `spec: {}` in app: an ALLOW policy without rules denies every app workload.
    assert!(!allowed(&p, &workload("app", &[]), Some(&client)));
    // ... and nothing in other namespaces.
    assert!(allowed(&p, &workload("web", &[]), Some(&client)));
    // The selector covers only matching workloads of its own namespace.
    assert!(!allowed(
        &p,
        &workload("data", &[("app", "db")]),
        Some(&client)
    ));
    assert!(allowed(
        &p,
        &workload("data", &[("app", "cache")]),
        Some(&client)
    ));
    assert!(allowed(
        &p,
        &workload("web", &[("app", "db")]),
        Some(&client)
    ));
    // Root namespace without selector: every namespace.
    let quarantined = peer("quarantine", "q");
    for ns in ["app", "data", "web", ROOT] {
        let d = decide(&p, &workload(ns, &[]), Some(&quarantined), SRC_IP, 80);
        assert!(
            matches!(d, Decision::Deny { policy: Some(ref n), .. } if n == "istio-system/mesh-deny"),
            "{ns}: {d:?}"
        );
    }
    // Root namespace with selector: matching workloads of every namespace.
    assert!(!allowed(
        &p,
        &workload("web", &[("tier", "legacy")]),
        Some(&client)
    ));
    let applicable: Vec<&str> = p
        .applicable(&workload("data", &[("app", "db")]))
        .map(Policy::id)
        .collect();
    assert_eq!(applicable, ["istio-system/mesh-deny", "data/only-db"]);
}

#[test]
fn principal_wildcards() {
    let cases = [
        ("*", true),
        ("cluster.local/ns/client/sa/sleep", true),
        ("cluster.local/ns/client/*", true),
        ("cluster.local/ns/cli*", true),
        ("*/sa/sleep", true),
        ("*sleep", true),
        ("*/ns/client/sa/sleep", true),
        ("cluster.local/ns/client/sa/sleep2", false),
        ("cluster.local/ns/client/sa/slee", false),
        ("cluster.local/ns/other/*", false),
        ("*/sa/other", false),
        ("spiffe://cluster.local/ns/client/sa/sleep", false),
        ("other.domain/ns/client/sa/sleep", false),
    ];
    let sleep = peer("client", "sleep");
    for (principal, expect) in cases {
        let p = policies(&format!(
            "metadata: {{name: p, namespace: app}}\n\
             spec:\n  rules:\n  - from:\n    - source: {{principals: [\"{principal}\"]}}\n"
        ));
        let got = allowed(&p, &workload("app", &[]), Some(&sleep));
        assert_eq!(got, expect, "principal {principal:?}");
    }
}

#[test]
fn namespaces_match_exact_and_wildcards() {
    let p = policies(
        r#"
metadata: {name: p, namespace: app}
spec:
  rules:
  - from:
    - source: {namespaces: [client, "team-*", "*-prod"]}
"#,
    );
    let dst = workload("app", &[]);
    for (ns, expect) in [
        ("client", true),
        ("team-a", true),
        ("shop-prod", true),
        ("clients", false),
        ("prod", false),
    ] {
        assert_eq!(allowed(&p, &dst, Some(&peer(ns, "x"))), expect, "{ns}");
    }
}

#[test]
fn not_principals_deny_everyone_else_including_plaintext() {
    let p = policies(
        r#"
metadata: {name: only-gw, namespace: app}
spec:
  action: DENY
  rules:
  - from:
    - source:
        notPrincipals: ["cluster.local/ns/ingress/sa/gateway"]
"#,
    );
    let dst = workload("app", &[]);
    assert!(allowed(&p, &dst, Some(&peer("ingress", "gateway"))));
    assert!(!allowed(&p, &dst, Some(&peer("ingress", "other"))));
    assert!(!allowed(&p, &dst, None));
}

#[test]
fn plaintext_peer_matches_no_principal_or_namespace() {
    let p = policies(
        r#"
metadata: {name: any-identity, namespace: app}
spec:
  rules:
  - from:
    - source: {principals: ["*"]}
  - from:
    - source: {namespaces: ["*"]}
---
metadata: {name: not-ns, namespace: other}
spec:
  action: DENY
  rules:
  - from:
    - source: {notNamespaces: [client]}
"#,
    );
    assert!(allowed(&p, &workload("app", &[]), Some(&peer("x", "y"))));
    assert!(!allowed(&p, &workload("app", &[]), None));
    assert!(allowed(
        &p,
        &workload("other", &[]),
        Some(&peer("client", "y"))
    ));
    assert!(!allowed(&p, &workload("other", &[]), None));
}

#[test]
fn ip_blocks_and_not_ip_blocks() {
    let p = policies(
        r#"
metadata: {name: nets, namespace: app}
spec:
  rules:
  - from:
    - source:
        ipBlocks: ["10.1.0.0/16", "192.168.7.7", "fd00::/8"]
        notIpBlocks: ["10.1.2.3"]
"#,
    );
    let dst = workload("app", &[]);
    for (src, expect) in [
        ("10.1.9.9", true),
        ("::ffff:10.1.9.9", true),
        ("192.168.7.7", true),
        ("fd00::1", true),
        ("10.1.2.3", false),
        ("192.168.7.8", false),
        ("10.2.0.1", false),
        ("fe80::1", false),
    ] {
        let got = decide(&p, &dst, None, src, 80).is_allow();
        assert_eq!(got, expect, "{src}");
    }
}

#[test]
fn ports_and_not_ports_compare_with_the_target_port() {
    let p = policies(
        r#"
metadata: {name: ports, namespace: app}
spec:
  rules:
  - to:
    - operation: {ports: ["8080", 9090]}
  - to:
    - operation: {notPorts: ["8080", "9090", "22"]}
    from:
    - source: {namespaces: [admin]}
"#,
    );
    let dst = workload("app", &[]);
    let user = peer("user", "u");
    let admin = peer("admin", "a");
    let check = |src: &Identity, port| decide(&p, &dst, Some(src), SRC_IP, port).is_allow();
    assert!(check(&user, 8080));
    assert!(check(&user, 9090));
    assert!(!check(&user, 3000));
    assert!(check(&admin, 3000));
    assert!(!check(&admin, 22));
}

#[test]
fn allow_rule_with_l7_attributes_never_matches() {
    let p = policies(
        r#"
metadata: {name: http-only, namespace: app}
spec:
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/client/sa/sleep"]}
    to:
    - operation: {methods: [GET], paths: ["/health"]}
  - to:
    - operation: {ports: ["9090"]}
"#,
    );
    let dst = workload("app", &[]);
    let sleep = peer("client", "sleep");
    assert_eq!(decide(&p, &dst, Some(&sleep), SRC_IP, 8080), default_deny());
    // The L4-only rule of the same policy still applies.
    let d = decide(&p, &dst, Some(&sleep), SRC_IP, 9090);
    assert_eq!(d, allow_by("app/http-only"));
    let rules = p.iter().next().expect("one policy").rules();
    assert_eq!(rules[0].l7_attributes(), ["methods", "paths"]);
    assert!(rules[0].never_matches());
    assert!(!rules[1].never_matches());
}

#[test]
fn deny_rule_with_l7_attributes_denies_on_its_l4_part() {
    let p = policies(
        r#"
metadata: {name: no-admin, namespace: app}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: [client], requestPrincipals: ["*"]}
    to:
    - operation: {paths: ["/admin"]}
---
metadata: {name: header, namespace: web}
spec:
  action: DENY
  rules:
  - when:
    - key: request.headers[x-user]
      values: [mallory]
"#,
    );
    let d = decide(
        &p,
        &workload("app", &[]),
        Some(&peer("client", "c")),
        SRC_IP,
        80,
    );
    match d {
        Decision::Deny { policy, reason } => {
            assert_eq!(policy.as_deref(), Some("app/no-admin"));
            assert!(reason.contains("L7"), "{reason}");
            assert!(reason.contains("paths, requestPrincipals"), "{reason}");
        }
        d => panic!("expected deny, got {d:?}"),
    }
    assert!(allowed(
        &p,
        &workload("app", &[]),
        Some(&peer("other", "c"))
    ));
    // A DENY rule made only of L7 conditions denies every connection.
    assert!(!allowed(&p, &workload("web", &[]), None));
}

#[test]
fn when_conditions() {
    let p = policies(
        r#"
metadata: {name: when, namespace: app}
spec:
  rules:
  - when:
    - key: source.ip
      values: ["10.1.0.0/16"]
      notValues: ["10.1.2.3"]
    - key: destination.port
      values: [8080, "8443"]
    - key: destination.ip
      values: ["10.0.0.0/24"]
    - key: source.principal
      notValues: ["*/sa/blocked"]
"#,
    );
    let dst = workload("app", &[]);
    let ok = peer("client", "ok");
    let check = |src: Option<&Identity>, src_ip, port| decide(&p, &dst, src, src_ip, port);
    assert!(check(Some(&ok), "10.1.9.9", 8080).is_allow());
    assert!(check(Some(&ok), "10.1.9.9", 8443).is_allow());
    assert!(check(None, "10.1.9.9", 8443).is_allow());
    assert!(!check(Some(&ok), "10.1.2.3", 8080).is_allow());
    assert!(!check(Some(&ok), "10.9.9.9", 8080).is_allow());
    assert!(!check(Some(&ok), "10.1.9.9", 80).is_allow());
    assert!(!check(Some(&peer("client", "blocked")), "10.1.9.9", 8080).is_allow());
}

#[test]
fn when_source_namespace_and_remote_ip() {
    let p = policies(
        r#"
metadata: {name: when-ns, namespace: app}
spec:
  action: DENY
  rules:
  - when:
    - key: source.namespace
      values: ["untrusted-*"]
    - key: remote.ip
      notValues: ["10.1.0.0/16"]
"#,
    );
    let dst = workload("app", &[]);
    let bad = peer("untrusted-1", "x");
    assert!(!decide(&p, &dst, Some(&bad), "172.16.0.1", 80).is_allow());
    assert!(decide(&p, &dst, Some(&bad), "10.1.0.1", 80).is_allow());
    assert!(decide(&p, &dst, Some(&peer("trusted", "x")), "172.16.0.1", 80).is_allow());
}

#[test]
fn empty_spec_denies_all_and_empty_rule_allows_all() {
    let deny_all = policies("metadata: {name: deny-all, namespace: app}\nspec: {}\n");
    let allow_all = policies("metadata: {name: allow-all, namespace: app}\nspec:\n  rules: [{}]\n");
    let dst = workload("app", &[]);
    let c = peer("client", "c");
    assert_eq!(
        decide(&deny_all, &dst, Some(&c), SRC_IP, 80),
        default_deny()
    );
    assert_eq!(decide(&deny_all, &dst, None, SRC_IP, 80), default_deny());
    let d = decide(&allow_all, &dst, None, SRC_IP, 80);
    assert_eq!(d, allow_by("app/allow-all"));
    // A DENY policy without rules matches nothing.
    let inert = policies("metadata: {name: d, namespace: app}\nspec: {action: DENY}\n");
    assert_eq!(
        decide(&inert, &dst, None, SRC_IP, 80),
        Decision::Allow { policy: None }
    );
}

#[test]
fn audit_policies_never_change_the_decision() {
    let p = policies(
        r#"
metadata: {name: audit-all, namespace: app}
spec:
  action: AUDIT
  rules: [{}]
"#,
    );
    let dst = workload("app", &[]);
    let conn = ConnInfo {
        src_identity: None,
        src_ip: ip(SRC_IP),
        dst_ip: ip(DST_IP),
        dst_port: 80,
    };
    assert_eq!(p.evaluate(&dst, &conn), Decision::Allow { policy: None });
    assert_eq!(p.audit(&dst, &conn).map(Policy::id), Some("app/audit-all"));
    assert!(p.audit(&workload("web", &[]), &conn).is_none());
}

#[test]
fn unknown_fields_are_errors() {
    for yaml in [
        "metadata: {name: p}\nspec: {sleector: {matchLabels: {a: b}}}\n",
        "metadata: {name: p}\nspec: {rules: [{from: [{source: {principal: [x]}}]}]}\n",
        "metadata: {name: p}\nspec: {rules: [{to: [{operation: {port: ['80']}}]}]}\n",
        "metadata: {name: p}\nsepc: {}\n",
    ] {
        let err = manifests(yaml).expect_err(yaml).to_string();
        assert!(err.contains("unknown field"), "{yaml}: {err}");
    }
    let err = manifests("metadata: {name: p}\nspec: {action: ALOW}\n").expect_err("bad action");
    assert!(err.to_string().contains("ALOW"), "{err}");
}

#[test]
fn malformed_values_are_named_errors() {
    let err = convert_err(
        "metadata: {name: bad, namespace: app}\n\
         spec: {rules: [{from: [{source: {ipBlocks: ['10.0.0.0/8', '10.0.0.300/8']}}]}]}\n",
    );
    let want = PolicyError::InvalidCidr {
        policy: "app/bad".to_owned(),
        field: "ipBlocks".to_owned(),
        value: "10.0.0.300/8".to_owned(),
    };
    assert_eq!(err, want);
    assert!(err.to_string().contains("app/bad"), "{err}");
    for port in ["'0'", "70000", "http", "'-1'", "'80-90'"] {
        let err = convert_err(&format!(
            "metadata: {{name: bad}}\nspec: {{rules: [{{to: [{{operation: {{notPorts: [{port}]}}}}]}}]}}\n"
        ));
        assert!(
            matches!(err, PolicyError::InvalidPort { ref policy, ref field, .. }
                if policy == "default/bad" && field == "notPorts"),
            "{port}: {err:?}"
        );
    }
    let err = convert_err(
        "metadata: {name: bad, namespace: app}\n\
         spec: {rules: [{when: [{key: destination.port, values: ['99999']}]}]}\n",
    );
    assert!(matches!(err, PolicyError::InvalidPort { .. }), "{err:?}");
}

#[test]
fn unsupported_when_keys_custom_action_and_empty_conditions_are_errors() {
    let err = convert_err(
        "metadata: {name: p, namespace: app}\n\
         spec: {rules: [{when: [{key: connection.sni, values: [x]}]}]}\n",
    );
    let want = PolicyError::UnknownConditionKey {
        policy: "app/p".to_owned(),
        key: "connection.sni".to_owned(),
    };
    assert_eq!(err, want);
    let err = convert_err(
        "metadata: {name: ext, namespace: app}\n\
         spec: {action: CUSTOM, provider: {name: opa}, rules: [{}]}\n",
    );
    let want = PolicyError::CustomAction {
        policy: "app/ext".to_owned(),
    };
    assert_eq!(err, want);
    let err = convert_err(
        "metadata: {name: p, namespace: app}\nspec: {rules: [{when: [{key: source.ip}]}]}\n",
    );
    assert!(matches!(err, PolicyError::EmptyCondition { .. }), "{err:?}");
}

#[test]
fn target_ref_policies_belong_to_waypoints() {
    let yaml = r#"
metadata: {name: waypoint-l7, namespace: app}
spec:
  targetRefs:
  - {kind: Service, group: "", name: reviews}
  rules:
  - to:
    - operation: {methods: [GET]}
---
metadata: {name: legacy, namespace: app}
spec:
  targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
"#;
    for m in manifests(yaml).expect("fixture parses") {
        assert!(Policy::from_manifest(m, ROOT).expect("valid").is_none());
    }
    let p = policies(yaml);
    assert!(p.is_empty());
    assert!(allowed(&p, &workload("app", &[]), None));
}

#[test]
fn metadata_defaults_and_null_lists() {
    let p = policies(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: p
  uid: 1234
spec:
  rules:
  - from:
    to:
status:
  validationMessages: []
"#,
    );
    let policy = p.iter().next().expect("one policy");
    assert_eq!(policy.id(), "default/p");
    assert_eq!(policy.scope(), &Scope::Namespace);
    assert!(allowed(&p, &workload("default", &[]), None));
}

#[test]
fn config_dump_shows_the_model() {
    let p = policies(
        r#"
metadata: {name: dump, namespace: istio-system}
spec:
  selector: {matchLabels: {app: db}}
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/a/*"], ipBlocks: ["10.0.0.1"]}
    to:
    - operation: {ports: ["5432"], methods: [GET]}
"#,
    );
    let dump = serde_json::to_value(&p).expect("serializes");
    let want = serde_json::json!([{
        "name": "dump",
        "namespace": "istio-system",
        "scope": {"meshSelector": {"matchLabels": {"app": "db"}}},
        "action": "ALLOW",
        "rules": [{
            "from": [{
                "principals": {"values": ["cluster.local/ns/a/*"]},
                "ipBlocks": {"values": ["10.0.0.1/32"]},
            }],
            "to": [{"ports": {"values": [5432]}}],
            "l7Attributes": ["methods"],
            "neverMatches": true,
        }],
    }]);
    assert_eq!(dump, want);
}

#[test]
fn string_match_spans_pieces() {
    let pieces = ["cluster.local", "/ns/", "a", "/sa/", "b"];
    for (pattern, expect) in [
        ("cluster.local/ns/a/sa/b", true),
        ("cluster.local/ns/a/sa/bb", false),
        ("cluster.local/ns/a/sa/", false),
        ("cluster.local/ns/a/s*", true),
        ("cluster.local/ns/a/sa/b*", true),
        ("cluster.local/ns/a/sa/bc*", false),
        ("*local/ns/a/sa/b", true),
        ("*xcluster.local/ns/a/sa/b", false),
        ("*", true),
        ("", false),
    ] {
        assert_eq!(
            StringMatch::parse(pattern).matches(&pieces),
            expect,
            "{pattern:?}"
        );
    }
}
