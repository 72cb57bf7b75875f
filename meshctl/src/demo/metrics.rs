//! The ztunnels' Prometheus metrics: scraped after the traffic, summarised per flow.
//!
//! Parses the text exposition format just enough to read a sample's name, labels and
//! value; the summary keeps Istio's TCP metrics and a few of their labels.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::{bail, Result};

use super::admin;

pub const OPENED: &str = "istio_tcp_connections_opened_total";
const CLOSED: &str = "istio_tcp_connections_closed_total";
const SENT: &str = "istio_tcp_sent_bytes_total";
const RECEIVED: &str = "istio_tcp_received_bytes_total";
const SUMMARISED: [&str; 4] = [OPENED, CLOSED, SENT, RECEIVED];

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

pub async fn scrape(addr: SocketAddr) -> Result<Vec<Sample>> {
    let response = admin::get(addr, "/metrics").await?;
    if response.status != 200 {
        bail!("GET http://{addr}/metrics: HTTP {}", response.status);
    }
    Ok(parse(&response.body))
}

pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(char::is_whitespace)?;
    let value = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, parse_labels(rest.trim_end().strip_suffix('}')?)?),
        None => (series.trim(), BTreeMap::new()),
    };
    let name = name.trim().to_owned();
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// `a="x",b="y \"quoted\""` into a map; `None` if malformed.
fn parse_labels(mut rest: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if rest.is_empty() {
            return Some(labels);
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => value.push(unescape(chars.next()?.1)),
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        rest = &after[end + 1..];
    }
}

fn unescape(c: char) -> char {
    if c == 'n' {
        '\n'
    } else {
        c
    }
}

/// Rows of `[reporter, source, destination, security, opened, closed, sent, received]`
/// for one node's Istio TCP metrics, one row per flow.
pub fn summary(samples: &[Sample]) -> Vec<[String; 8]> {
    let mut flows: BTreeMap<[String; 4], [f64; 4]> = BTreeMap::new();
    for s in samples {
        let Some(column) = SUMMARISED.iter().position(|m| *m == s.name) else {
            continue;
        };
        let label = |k: &str| s.labels.get(k).cloned().unwrap_or_else(|| "-".into());
        let key = [
            label("reporter"),
            label("source_workload"),
            label("destination_workload"),
            label("connection_security_policy"),
        ];
        flows.entry(key).or_default()[column] += s.value;
    }
    let rows = flows.into_iter().map(|([rep, src, dst, sec], values)| {
        let [o, c, s, r] = values.map(|v| format!("{v}"));
        [rep, src, dst, sec, o, c, s, r]
    });
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"
# HELP istio_tcp_connections_opened Total TCP connections opened.
# TYPE istio_tcp_connections_opened counter
istio_tcp_connections_opened_total{reporter="source",source_workload="sleep",destination_workload="echo-v1",connection_security_policy="mutual_tls",odd="a \"b\", c"} 2
istio_tcp_sent_bytes_total{reporter="source",source_workload="sleep",destination_workload="echo-v1",connection_security_policy="mutual_tls"} 40
istio_build 1
"#;

    #[test]
    fn parses_names_labels_and_values() {
        let samples = parse(TEXT);
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[0].name, OPENED);
        assert_eq!(samples[0].labels["odd"], "a \"b\", c");
        assert_eq!(samples[0].value, 2.0);
        assert_eq!(samples[2].name, "istio_build");
        assert!(parse_line(r#"broken{a="x} 1"#).is_none());
    }

    #[test]
    fn summarises_one_row_per_flow() {
        let rows = summary(&parse(TEXT));
        assert_eq!(rows.len(), 1);
        assert_eq!(
            rows[0],
            [
                "source",
                "sleep",
                "echo-v1",
                "mutual_tls",
                "2",
                "0",
                "40",
                "0"
            ]
            .map(String::from)
        );
    }
}
