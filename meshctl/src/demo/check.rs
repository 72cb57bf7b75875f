//! The outcomes the demo expects, judged from the joined connections and the metrics.
//!
//! Each check names the behaviour a user would see, so a failing `meshctl demo --check`
//! says what broke rather than where.

use std::collections::BTreeMap;

use mesh_core::proto::type_url::{ADDRESS, AUTHORIZATION};

use super::client::{describe, Outcome};
use super::control_plane::{self, SIGNED, XDS_CLIENTS};
use super::metrics::{self, Sample};
use super::node_state::{short_type, NodeState};
use super::traffic::{Connection, Expect};

#[derive(Debug)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

fn check(name: &'static str, passed: bool, detail: String) -> Check {
    Check {
        name,
        passed,
        detail,
    }
}

/// One ztunnel as the control-plane checks see it.
pub struct NodeSeen {
    pub name: &'static str,
    pub state: NodeState,
    /// The identities it needs certificates for.
    pub identities: Vec<String>,
}

/// What the control-plane checks look at, gathered after the traffic.
pub struct ControlSeen {
    pub nodes: Vec<NodeSeen>,
    /// How many Address resources the manifests make.
    pub addresses: usize,
    /// The controller's metrics (empty when they could not be read).
    pub controller: Vec<Sample>,
}

/// `backends` are the endpoints round robin must reach; `source_metrics` are the metrics of
/// the clients' node.
pub fn evaluate(
    conns: &[Connection],
    backends: &[String],
    source_metrics: &[Sample],
    control: &ControlSeen,
) -> Vec<Check> {
    vec![
        synced_from_controller(control),
        certificates_from_controller(control),
        allowed_echoed(conns),
        allowed_over_mtls(conns),
        round_robin(conns, backends),
        denied_blocked(conns),
        denied_logged(conns),
        passthrough_plaintext(conns),
        metrics_counted(source_metrics),
    ]
}

fn expecting(conns: &[Connection], expect: Expect) -> impl Iterator<Item = &Connection> {
    conns.iter().filter(move |c| c.attempt.expect == expect)
}

fn first_seen(conns: &[Connection], expect: Expect) -> String {
    expecting(conns, expect)
        .next()
        .map_or("no such connection was made".into(), |c| describe(&c.seen))
}

fn allowed_echoed(conns: &[Connection]) -> Check {
    let total = expecting(conns, Expect::Allowed).count();
    let echoed = expecting(conns, Expect::Allowed)
        .filter(|c| c.seen.outcome == Outcome::Echoed)
        .count();
    let detail = if echoed > 0 {
        format!("{echoed} of {total} connections to the service echoed their bytes back")
    } else {
        format!(
            "none of {total} did; the first: {}",
            first_seen(conns, Expect::Allowed)
        )
    };
    check("allowed connection echoes", echoed > 0, detail)
}

fn synced_from_controller(seen: &ControlSeen) -> Check {
    let mut problems = Vec::new();
    let mut held = Vec::new();
    for node in &seen.nodes {
        match node_sync_problem(node, seen.addresses) {
            Some(p) => problems.push(format!("{}: {p}", node.name)),
            None => held.push(format!(
                "{} holds {} Address, {} Authorization",
                node.name,
                node.state.held(ADDRESS),
                node.state.held(AUTHORIZATION)
            )),
        }
    }
    let clients = control_plane::value(&seen.controller, XDS_CLIENTS);
    if clients != Some(seen.nodes.len() as f64) {
        let shown = clients.map_or("missing".into(), |v| v.to_string());
        problems.push(format!("controller {XDS_CLIENTS} = {shown}"));
    }
    let passed = problems.is_empty() && !seen.nodes.is_empty();
    let detail = if passed {
        format!(
            "{}; the controller counts {} xDS clients",
            held.join("; "),
            seen.nodes.len()
        )
    } else {
        problems.join("; ")
    };
    check("both ztunnels synced from the controller", passed, detail)
}

fn node_sync_problem(node: &NodeSeen, addresses: usize) -> Option<String> {
    if let Some(e) = &node.state.error {
        return Some(format!("no config_dump: {e}"));
    }
    let Some(xds) = &node.state.xds else {
        return Some("config_dump has no xds section".into());
    };
    if !xds.connected {
        let why = xds.last_error.as_deref().unwrap_or("no error recorded");
        return Some(format!("not connected ({why})"));
    }
    let unsynced: Vec<&str> = [ADDRESS, AUTHORIZATION]
        .into_iter()
        .filter(|t| !node.state.synced(t))
        .map(short_type)
        .collect();
    if !unsynced.is_empty() {
        return Some(format!("never synced {}", unsynced.join(", ")));
    }
    let held = node.state.held(ADDRESS);
    (held != addresses)
        .then(|| format!("holds {held} Address resources, the manifests make {addresses}"))
}

fn certificates_from_controller(seen: &ControlSeen) -> Check {
    let signed = control_plane::value(&seen.controller, SIGNED);
    let wanted: usize = seen.nodes.iter().map(|n| n.identities.len()).sum();
    let missing: Vec<String> = seen
        .nodes
        .iter()
        .flat_map(|n| {
            let lacking = n
                .identities
                .iter()
                .filter(|id| !n.state.has_certificate(id));
            lacking.map(move |id| format!("{} lacks {id}", n.name))
        })
        .collect();
    let counted = signed.is_some_and(|s| s >= wanted as f64 && s > 0.0);
    let shown = signed.map_or("missing".into(), |v| v.to_string());
    let mut detail =
        format!("{SIGNED} = {shown}; the ztunnels need {wanted} workload certificates");
    if missing.is_empty() {
        detail.push_str(", and hold every one");
    } else {
        detail.push_str(&format!("; {}", missing.join(", ")));
    }
    check(
        "certificates signed by the controller",
        counted && missing.is_empty(),
        detail,
    )
}

fn allowed_over_mtls(conns: &[Connection]) -> Check {
    let offender = expecting(conns, Expect::Allowed).find(|c| {
        let decision = c.decider().and_then(|e| e.str("decision"));
        c.mtls() != Some(true) || decision != Some("allow") || !identified(c)
    });
    let detail = match offender {
        None => "every access log of them says mtls true, decision allow; the destination \
                 saw the client's identity"
            .into(),
        Some(c) => format!(
            "{}: logs say mtls {:?}, decision {:?}, source identity {:?} (want {:?})",
            c.attempt,
            c.mtls(),
            c.decider().and_then(|e| e.str("decision")),
            c.inbound.as_ref().and_then(|e| e.str("src_identity")),
            c.attempt.from_identity,
        ),
    };
    check(
        "allowed connections are mTLS with the client's identity and allowed by policy",
        offender.is_none(),
        detail,
    )
}

/// Whether the destination's log names the client's own identity as the peer.
fn identified(c: &Connection) -> bool {
    let seen = c.inbound.as_ref().and_then(|e| e.str("src_identity"));
    seen.is_some() && seen == c.attempt.from_identity.as_deref()
}

fn round_robin(conns: &[Connection], backends: &[String]) -> Check {
    let mut answered: BTreeMap<&str, usize> = BTreeMap::new();
    for c in expecting(conns, Expect::Allowed) {
        if let Some(who) = &c.seen.greeting {
            *answered.entry(who).or_default() += 1;
        }
    }
    let missing: Vec<&str> = backends
        .iter()
        .map(String::as_str)
        .filter(|b| !answered.contains_key(b))
        .collect();
    let tally: Vec<String> = answered.iter().map(|(w, n)| format!("{w} x{n}")).collect();
    let mut detail = format!("answered: {}", tally.join(", "));
    if !missing.is_empty() {
        detail.push_str(&format!("; never answered: {}", missing.join(", ")));
    }
    check(
        "round robin reaches every endpoint",
        missing.is_empty(),
        detail,
    )
}

fn denied_blocked(conns: &[Connection]) -> Check {
    let mut denied = expecting(conns, Expect::Denied).peekable();
    let passed = denied.peek().is_some() && denied.all(|c| c.seen.outcome.blocked());
    let detail = first_seen(conns, Expect::Denied);
    check("denied connection gets no data", passed, detail)
}

fn denied_logged(conns: &[Connection]) -> Check {
    let logged = expecting(conns, Expect::Denied).find_map(|c| {
        let inbound = c.inbound.as_ref()?;
        let why = inbound.str("policy").or(inbound.str("reason"))?;
        (inbound.str("decision") == Some("deny")).then(|| why.to_owned())
    });
    let detail = match &logged {
        Some(why) => format!("inbound log: decision deny, {why}"),
        None => {
            let c = expecting(conns, Expect::Denied).next();
            let line = c.and_then(|c| c.inbound.as_ref()).map(|e| e.raw());
            format!("inbound log line: {}", line.as_deref().unwrap_or("none"))
        }
    };
    check(
        "denial logged with policy or reason",
        logged.is_some(),
        detail,
    )
}

fn passthrough_plaintext(conns: &[Connection]) -> Check {
    let c = expecting(conns, Expect::Passthrough).next();
    let echoed = c.is_some_and(|c| c.seen.outcome == Outcome::Echoed);
    let mtls = c
        .and_then(|c| c.outbound.as_ref())
        .and_then(|e| e.bool("mtls"));
    let detail = format!(
        "{}; outbound log mtls {}",
        first_seen(conns, Expect::Passthrough),
        mtls.map_or("missing".into(), |b| b.to_string())
    );
    check(
        "plaintext passthrough (mtls false)",
        echoed && mtls == Some(false),
        detail,
    )
}

fn metrics_counted(samples: &[Sample]) -> Check {
    let opened: f64 = samples
        .iter()
        .filter(|s| s.name == metrics::OPENED)
        .map(|s| s.value)
        .sum();
    let detail = format!("{} = {opened} on the clients' node", metrics::OPENED);
    check("metrics count the connections", opened > 0.0, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_check_fails_on_an_empty_scrape() {
        assert!(!metrics_counted(&[]).passed);
        let text = format!("{}{{reporter=\"source\"}} 3\n", metrics::OPENED);
        assert!(metrics_counted(&metrics::parse(&text)).passed);
    }

    fn seen(signed: f64, clients: f64, certs: &[&str]) -> ControlSeen {
        let dump = serde_json::json!({
            "certificates": certs.iter().map(|id| serde_json::json!({"identity": id}))
                .collect::<Vec<_>>(),
            "xds": {"connected": true, "synced": [ADDRESS, AUTHORIZATION],
                    "versions": {ADDRESS: {"a": "1", "b": "1"}}}
        });
        let text = format!("{SIGNED} {signed}\n{XDS_CLIENTS} {clients}\n");
        ControlSeen {
            nodes: vec![NodeSeen {
                name: "node1",
                state: super::super::node_state::parse(&dump),
                identities: vec!["spiffe://td/ns/a/sa/b".into()],
            }],
            addresses: 2,
            controller: metrics::parse(&text),
        }
    }

    #[test]
    fn control_plane_checks_need_sync_certificates_and_signatures() {
        let good = seen(1.0, 1.0, &["spiffe://td/ns/a/sa/b"]);
        assert!(synced_from_controller(&good).passed);
        assert!(certificates_from_controller(&good).passed);

        let unsigned = seen(0.0, 1.0, &["spiffe://td/ns/a/sa/b"]);
        assert!(!certificates_from_controller(&unsigned).passed);
        let lacking = certificates_from_controller(&seen(1.0, 1.0, &[]));
        assert!(!lacking.passed);
        assert!(
            lacking.detail.contains("node1 lacks spiffe://td/ns/a/sa/b"),
            "{}",
            lacking.detail
        );

        let mut short = seen(1.0, 1.0, &[]);
        short.addresses = 3;
        let c = synced_from_controller(&short);
        assert!(!c.passed);
        assert!(
            c.detail
                .contains("holds 2 Address resources, the manifests make 3"),
            "{}",
            c.detail
        );
        assert!(!synced_from_controller(&seen(1.0, 0.0, &[])).passed);
        let mut local = seen(1.0, 1.0, &[]);
        local.nodes[0].state = super::super::node_state::parse(&serde_json::json!({}));
        assert!(!synced_from_controller(&local).passed);
    }

    #[test]
    fn round_robin_names_the_endpoint_never_reached() {
        let c = round_robin(&[], &["echo-v1".into()]);
        assert!(!c.passed);
        assert!(c.detail.contains("never answered: echo-v1"), "{}", c.detail);
    }
}
