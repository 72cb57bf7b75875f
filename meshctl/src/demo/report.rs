//! What the newcomer reads: the connection table (access logs of both ztunnels joined
//! with what the client saw), notes on anything unusual, the metrics summary and the
//! control plane as the ztunnels and the controller report it.
//!
//! Pure formatting: no I/O and no verdicts (those are in `check`).

use mesh_core::socks5;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::access_log::Entry;
use super::client::Outcome;
use super::metrics::Sample;
use super::node_state::{short_type, NodeState};
use super::traffic::Connection;

const HEADER: [&str; 10] = [
    "#",
    "FROM",
    "TO",
    "ANSWERED",
    "SRC IDENTITY",
    "DST IDENTITY",
    "MTLS",
    "POLICY",
    "BYTES OUT/IN",
    "OUTCOME",
];

/// One row per connection.
pub fn connections(conns: &[Connection], trust_domain: &str) -> String {
    let header = HEADER.map(String::from).to_vec();
    let rows = conns
        .iter()
        .enumerate()
        .map(|(i, c)| row(i + 1, c, trust_domain));
    table(std::iter::once(header).chain(rows).collect())
}

fn row(n: usize, c: &Connection, trust_domain: &str) -> Vec<String> {
    let identity = |key| short_identity(c.field(key), trust_domain);
    vec![
        n.to_string(),
        c.attempt.from.clone(),
        destination(c),
        c.seen.greeting.clone().unwrap_or_else(|| "-".into()),
        identity("src_identity"),
        identity("dst_identity"),
        yes_no(c.mtls()),
        policy(c),
        bytes(c),
        c.decider()
            .and_then(|e| e.str("outcome"))
            .unwrap_or("no log")
            .to_owned(),
    ]
}

/// The service's short name if the log names one, else the workload, else what was dialed.
fn destination(c: &Connection) -> String {
    match (c.field("dst_service"), c.field("dst_workload")) {
        (Some(svc), _) => svc.split(".svc.").next().unwrap_or(svc).to_owned(),
        (None, Some(workload)) => workload.to_owned(),
        (None, None) => c.attempt.target_name.clone(),
    }
}

fn short_identity(id: Option<&str>, trust_domain: &str) -> String {
    let Some(id) = id else { return "-".into() };
    let prefix = format!("spiffe://{trust_domain}/");
    id.strip_prefix(&prefix).unwrap_or(id).to_owned()
}

fn yes_no(b: Option<bool>) -> String {
    match b {
        Some(true) => "yes",
        Some(false) => "no",
        None => "?",
    }
    .into()
}

fn policy(c: &Connection) -> String {
    let Some(e) = c.decider() else {
        return "-".into();
    };
    match (e.str("decision"), e.str("policy")) {
        (Some(d), Some(p)) => format!("{d} {p}"),
        (Some(d), None) => match e.str("reason") {
            Some(reason) => format!("{d}: {reason}"),
            None => d.to_owned(),
        },
        (None, Some(p)) => p.to_owned(),
        (None, None) => "-".into(),
    }
}

/// Bytes from the client and back to it, as the source's ztunnel counted them.
fn bytes(c: &Connection) -> String {
    let Some(e) = &c.outbound else {
        return "-".into();
    };
    let count = |k| e.u64(k).map_or("?".into(), |n| n.to_string());
    format!("{}/{}", count("bytes_sent"), count("bytes_received"))
}

/// Lines explaining rows whose story the table cannot tell on its own.
pub fn notes(conns: &[Connection]) -> Vec<String> {
    let mut notes = Vec::new();
    for (i, c) in conns.iter().enumerate() {
        let n = i + 1;
        if let Some(client) = client_note(c) {
            notes.push(format!("#{n}: {client}"));
        }
        for (e, reason) in other_reasons(c) {
            let dir = e.direction().unwrap_or("access");
            notes.push(format!("#{n}: {}'s {dir} log says: {reason}", e.node));
        }
        notes.extend(log_notes(c).into_iter().map(|l| format!("#{n}: {l}")));
    }
    notes
}

/// Reasons in the logs other than the decider's, which the POLICY column already shows.
fn other_reasons(c: &Connection) -> Vec<(&Entry, &str)> {
    let decider = c.decider();
    let others = c
        .logs()
        .filter(|e| !decider.is_some_and(|d| std::ptr::eq(*e, d)));
    others.filter_map(|e| Some((e, e.str("reason")?))).collect()
}

fn client_note(c: &Connection) -> Option<String> {
    Some(match &c.seen.outcome {
        Outcome::Echoed => return None,
        Outcome::Refused(code) => format!(
            "the client got SOCKS5 reply {code:#04x} ({})",
            socks5::reply_name(*code)
        ),
        Outcome::ClosedWithoutData => "the connection closed before any byte arrived".into(),
        Outcome::Mismatch => "the bytes that came back were not the bytes sent".into(),
        Outcome::Failed(why) => format!("the client failed: {why}"),
    })
}

fn log_notes(c: &Connection) -> Vec<String> {
    let mut notes = Vec::new();
    match (&c.outbound, c.attempt.outbound_logged) {
        (None, true) => notes.push("no outbound access log from the source's ztunnel".into()),
        (None, false) => notes.push(format!(
            "no outbound log: {} is outside the mesh, so its own traffic is not captured",
            c.attempt.from
        )),
        _ => {}
    }
    match (&c.inbound, c.attempt.inbound_logged) {
        (None, true) => notes.push("no inbound access log from the destination's ztunnel".into()),
        (None, false) => notes.push(format!(
            "no inbound log: {} is outside the mesh, so no ztunnel sits in front of it",
            c.attempt.target_name
        )),
        _ => {}
    }
    let (answered, logged) = (c.seen.greeting.as_deref(), c.field("dst_workload"));
    if let (Some(a), Some(l)) = (answered, logged) {
        if a != l {
            notes.push(format!("{a} answered but the access log says {l}"));
        }
    }
    notes
}

/// One row per node: its xDS client as its ztunnel reports it.
pub fn xds_status(nodes: &[(&str, &NodeState)]) -> String {
    let header = [
        "NODE",
        "XDS",
        "SYNCED",
        "HELD",
        "ACKS/NACKS",
        "STREAMS",
        "LAST ERROR",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    for (name, state) in nodes {
        let mut row = vec![name.to_string()];
        match (&state.error, &state.xds) {
            (Some(e), _) => row.push(format!("unreadable: {e}")),
            (None, None) => row.push("not on xDS".into()),
            (None, Some(x)) => {
                let types: Vec<&str> = x.synced.iter().map(|t| short_type(t)).collect();
                let held = x.held.iter().map(|(t, n)| format!("{n} {}", short_type(t)));
                row.extend([
                    if x.connected {
                        "connected"
                    } else {
                        "disconnected"
                    }
                    .into(),
                    types.join(", "),
                    held.collect::<Vec<_>>().join(", "),
                    format!("{}/{}", x.acks, x.nacks),
                    x.connects.to_string(),
                    x.last_error.clone().unwrap_or_else(|| "-".into()),
                ]);
            }
        }
        rows.push(row);
    }
    table(rows)
}

/// One row per certificate a ztunnel holds; `now` in Unix seconds.
pub fn certificates(nodes: &[(&str, &NodeState)], trust_domain: &str, now: i64) -> String {
    let header = ["NODE", "IDENTITY", "EXPIRES"];
    let mut rows = vec![header.map(String::from).to_vec()];
    for (name, state) in nodes {
        if state.certificates.is_empty() {
            rows.push(vec![name.to_string(), "none".into()]);
        }
        for c in &state.certificates {
            let id = short_identity(Some(&c.identity), trust_domain);
            rows.push(vec![name.to_string(), id, expiry(c.not_after, now)]);
        }
    }
    table(rows)
}

fn expiry(not_after: Option<i64>, now: i64) -> String {
    let Some(t) = not_after else {
        return "?".into();
    };
    let when = OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| d.format(&Rfc3339).ok())
        .unwrap_or_else(|| t.to_string());
    let left = t - now;
    if left <= 0 {
        return format!("{when} (expired)");
    }
    format!("{when} (in {}h{:02}m)", left / 3600, left % 3600 / 60)
}

/// The samples named in `names`, in that order, as exposition lines.
pub fn metric_lines(samples: &[Sample], names: &[&str]) -> Vec<String> {
    let mut lines = Vec::new();
    for name in names {
        for s in samples.iter().filter(|s| s.name == *name) {
            let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            let labels = if labels.is_empty() {
                String::new()
            } else {
                format!("{{{}}}", labels.join(","))
            };
            lines.push(format!("{}{labels} {}", s.name, s.value));
        }
    }
    lines
}

/// Left-aligned columns two spaces apart.
pub fn table(rows: Vec<Vec<String>>) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width = |col: usize| {
        let cells = rows.iter().filter_map(|r| r.get(col));
        cells.map(|c| c.chars().count()).max().unwrap_or(0)
    };
    let widths: Vec<usize> = (0..columns).map(width).collect();
    let mut out = String::new();
    for row in &rows {
        let cells = row.iter().zip(&widths);
        let line: Vec<String> = cells.map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str("  ");
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::client::Seen;
    use super::super::traffic::{Attempt, Connection, Expect};
    use super::*;

    fn entry(node: &'static str, json: &str) -> Option<Entry> {
        let json = serde_json::from_str(json).unwrap();
        Some(Entry { node, json })
    }

    fn denied() -> Connection {
        Connection {
            attempt: Attempt {
                from: "notsleep".into(),
                from_ip: "127.0.1.11".parse().unwrap(),
                from_identity: None,
                target: "127.0.10.1:80".parse().unwrap(),
                target_name: "echo".into(),
                expect: Expect::Denied,
                inbound_logged: true,
                outbound_logged: true,
            },
            seen: Seen {
                local: None,
                outcome: Outcome::Refused(2),
                greeting: None,
                sent: 0,
                received: 0,
            },
            outbound: entry(
                "node1",
                r#"{"direction":"outbound","src_identity":"spiffe://cluster.local/ns/other/sa/notsleep",
                    "dst_service":"echo.default.svc.cluster.local","mtls":true,"decision":"deny",
                    "outcome":"denied","reason":"the tunnel was refused (401)",
                    "bytes_sent":0,"bytes_received":0}"#,
            ),
            inbound: entry(
                "node2",
                r#"{"direction":"inbound","dst_identity":"spiffe://cluster.local/ns/default/sa/echo",
                    "decision":"deny","policy":null,"outcome":"denied",
                    "reason":"no ALLOW policy matched"}"#,
            ),
        }
    }

    #[test]
    fn a_denied_row_joins_both_logs() {
        let row = row(5, &denied(), "cluster.local");
        let expected = [
            "5",
            "notsleep",
            "echo.default",
            "-",
            "ns/other/sa/notsleep",
            "ns/default/sa/echo",
            "yes",
            "deny: no ALLOW policy matched",
            "0/0",
            "denied",
        ];
        assert_eq!(row, expected);
    }

    #[test]
    fn notes_explain_the_denial() {
        let notes = notes(&[denied()]);
        let expected = [
            "#1: the client got SOCKS5 reply 0x02 (connection not allowed by ruleset)",
            "#1: node1's outbound log says: the tunnel was refused (401)",
        ];
        assert_eq!(notes, expected);
    }

    #[test]
    fn control_plane_tables() {
        let dump = serde_json::json!({
            "certificates": [{"identity": "spiffe://cluster.local/ns/default/sa/echo",
                              "not_after": 90_000}],
            "xds": {"connected": true, "acks": 2, "nacks": 0, "connects": 1,
                    "synced": ["type.googleapis.com/istio.workload.Address"],
                    "versions": {"type.googleapis.com/istio.workload.Address": {"a": "1"}}}
        });
        let state = super::super::node_state::parse(&dump);
        let nodes = [("node2", &state)];
        assert_eq!(
            xds_status(&nodes).lines().nth(1).unwrap(),
            "  node2  connected  Address  1 Address  2/0         1        -"
        );
        let certs = certificates(&nodes, "cluster.local", 3_600);
        assert_eq!(
            certs.lines().nth(1).unwrap(),
            "  node2  ns/default/sa/echo  1970-01-02T01:00:00Z (in 24h00m)"
        );
        let samples = super::super::metrics::parse("a 1\nb{x=\"y\"} 2\nc 3\n");
        assert_eq!(metric_lines(&samples, &["b", "a"]), ["b{x=\"y\"} 2", "a 1"]);
    }

    #[test]
    fn table_aligns_columns() {
        let rows = vec![
            vec!["A".into(), "B".into()],
            vec!["long".into(), "x".into()],
        ];
        assert_eq!(table(rows), "  A     B\n  long  x\n");
    }
}
