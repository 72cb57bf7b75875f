//! The outcomes the demo expects, judged from the joined connections and the metrics.
//!
//! Each check names the behaviour a user would see, so a failing `meshctl demo --check`
//! says what broke rather than where.

use std::collections::BTreeMap;

use super::client::{describe, Outcome};
use super::metrics::{self, Sample};
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

/// `backends` are the endpoints round robin must reach; `source_metrics` are the metrics of
/// the clients' node.
pub fn evaluate(
    conns: &[Connection],
    backends: &[String],
    source_metrics: &[Sample],
) -> Vec<Check> {
    vec![
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

fn allowed_over_mtls(conns: &[Connection]) -> Check {
    let offender = expecting(conns, Expect::Allowed).find(|c| {
        let decision = c.decider().and_then(|e| e.str("decision"));
        c.mtls() != Some(true) || decision != Some("allow")
    });
    let detail = match offender {
        None => "every access log of them says mtls true, decision allow".into(),
        Some(c) => format!(
            "{}: logs say mtls {:?}, decision {:?}",
            c.attempt,
            c.mtls(),
            c.decider().and_then(|e| e.str("decision"))
        ),
    };
    check(
        "allowed connections are mTLS and allowed by policy",
        offender.is_none(),
        detail,
    )
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

    #[test]
    fn round_robin_names_the_endpoint_never_reached() {
        let c = round_robin(&[], &["echo-v1".into()]);
        assert!(!c.passed);
        assert!(c.detail.contains("never answered: echo-v1"), "{}", c.detail);
    }
}
