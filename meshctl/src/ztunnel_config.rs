//! `meshctl ztunnel-config workloads|services|policies|certificates`: what one ztunnel
//! holds, read from its admin `/config_dump` and shown as tables (or the raw section as
//! JSON).
//!
//! The dump's shape belongs to the ztunnel and changes with it, so it is read leniently:
//! every field is optional, both camelCase and snake_case names are accepted, and what is
//! missing shows as `-`. Only loopback-style plain HTTP admin addresses are supported; the
//! admin port is never exposed beyond the node.

use std::fmt::Write as _;

use clap::{Args, ValueEnum};
use serde_json::Value;

#[derive(Args, Debug)]
pub struct ZtunnelConfigArgs {
    /// What to show.
    #[arg(value_enum)]
    pub what: Section,
    /// The ztunnel's admin address.
    #[arg(long, default_value = "http://127.0.0.1:15000")]
    pub admin: String,
    /// Output format: a table, or the dump's section as JSON.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Section {
    Workloads,
    Services,
    Policies,
    Certificates,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

pub async fn run(args: &ZtunnelConfigArgs) -> anyhow::Result<bool> {
    let dump = fetch_dump(&args.admin).await?;
    let out = match args.output {
        Format::Json => serde_json::to_string_pretty(section(&dump, args.what))? + "\n",
        Format::Table => render(&table(&dump, args.what)),
    };
    print!("{out}");
    Ok(true)
}

/// GET `/config_dump` from `admin` (`http://host:port`).
pub async fn fetch_dump(admin: &str) -> anyhow::Result<Value> {
    crate::http::get_json(admin, "/config_dump").await
}

/// The raw part of the dump `what` is drawn from.
fn section(dump: &Value, what: Section) -> &Value {
    match what {
        Section::Workloads => &dump["snapshot"]["workloads"],
        Section::Services => &dump["snapshot"]["services"],
        Section::Policies => &dump["snapshot"]["policies"],
        Section::Certificates => &dump["certificates"],
    }
}

/// The entries of a list, or the values of a map (keyed by uid or name).
fn entries(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(a) => a.iter().collect(),
        Value::Object(m) => m.values().collect(),
        _ => vec![],
    }
}

/// The first of `names` that holds a value, as text; `-` when none does.
fn text(v: &Value, names: &[&str]) -> String {
    names
        .iter()
        .find_map(|n| match v.get(n)? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        })
        .unwrap_or_else(|| "-".to_owned())
}

fn list<'a>(v: &'a Value, names: &[&str]) -> Vec<&'a Value> {
    names
        .iter()
        .find_map(|n| v.get(n).map(entries))
        .unwrap_or_default()
}

fn joined(items: impl IntoIterator<Item = String>) -> String {
    let items: Vec<String> = items.into_iter().collect();
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

/// A header row followed by data rows.
pub type Table = Vec<Vec<String>>;

fn table(dump: &Value, what: Section) -> Table {
    let rows = entries(section(dump, what));
    let header: &[&str] = match what {
        Section::Workloads => &["NAMESPACE", "NAME", "IP", "NODE", "PROTOCOL", "IDENTITY"],
        Section::Services => &["NAMESPACE", "NAME", "VIP", "PORTS", "ENDPOINTS"],
        Section::Policies => &["NAMESPACE", "NAME", "SCOPE", "ACTION", "RULES"],
        Section::Certificates => &["IDENTITY", "NOT-BEFORE", "NOT-AFTER", "REFRESH-AT"],
    };
    let trust_domain = match text(&dump["snapshot"], &["trust_domain", "trustDomain"]) {
        td if td == "-" => mesh_core::identity::DEFAULT_TRUST_DOMAIN.to_owned(),
        td => td,
    };
    let mut out = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    for r in rows {
        out.push(match what {
            Section::Workloads => workload_row(r, &trust_domain),
            Section::Services => service_row(r),
            Section::Policies => policy_row(r),
            Section::Certificates => certificate_row(r),
        });
    }
    out[1..].sort();
    out
}

fn workload_row(w: &Value, trust_domain: &str) -> Vec<String> {
    let ns = text(w, &["namespace"]);
    let sa = text(w, &["serviceAccount", "service_account"]);
    let td = match text(w, &["trustDomain", "trust_domain"]) {
        td if td == "-" => trust_domain.to_owned(),
        td => td,
    };
    let identity = if sa == "-" || ns == "-" {
        "-".to_owned()
    } else {
        format!("spiffe://{td}/ns/{ns}/sa/{sa}")
    };
    let ips = list(w, &["ips", "addresses"])
        .into_iter()
        .filter_map(|ip| ip.as_str().map(str::to_owned));
    vec![
        ns,
        text(w, &["name"]),
        joined(ips),
        text(w, &["node"]),
        text(w, &["protocol", "tunnelProtocol", "tunnel_protocol"]),
        identity,
    ]
}

fn service_row(s: &Value) -> Vec<String> {
    let vips = list(s, &["vips", "addresses"])
        .into_iter()
        .filter_map(|ip| ip.as_str().map(str::to_owned));
    let ports = list(s, &["ports"]).into_iter().map(|p| {
        let port = text(p, &["port", "servicePort", "service_port"]);
        match text(p, &["targetPort", "target_port"]) {
            t if t == "-" || t == port => port,
            t => format!("{port}->{t}"),
        }
    });
    vec![
        text(s, &["namespace"]),
        text(s, &["name"]),
        joined(vips),
        joined(ports),
        list(s, &["endpoints"]).len().to_string(),
    ]
}

fn policy_row(p: &Value) -> Vec<String> {
    vec![
        text(p, &["namespace"]),
        text(p, &["name"]),
        scope(p.get("scope")),
        text(p, &["action"]),
        list(p, &["rules", "groups"]).len().to_string(),
    ]
}

/// The scope's kind, in Istio's words; a selector's labels follow it.
fn scope(v: Option<&Value>) -> String {
    let (kind, labels) = match v {
        Some(Value::String(s)) => (s.clone(), None),
        Some(Value::Object(m)) => match m.iter().next() {
            Some((k, inner)) => (k.clone(), inner.get("matchLabels")),
            None => return "-".to_owned(),
        },
        _ => return "-".to_owned(),
    };
    let name = match kind.as_str() {
        "mesh" | "GLOBAL" => "Global",
        "namespace" | "NAMESPACE" => "Namespace",
        "selector" | "WORKLOAD_SELECTOR" => "WorkloadSelector",
        "meshSelector" => "GlobalWorkloadSelector",
        other => other,
    };
    match labels.and_then(Value::as_object) {
        Some(l) if !l.is_empty() => {
            let shown = l
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()));
            format!("{name}({})", shown.collect::<Vec<_>>().join(","))
        }
        _ => name.to_owned(),
    }
}

fn certificate_row(c: &Value) -> Vec<String> {
    let time = |names: &[&str]| {
        let v = names.iter().find_map(|n| c.get(n));
        match v {
            Some(Value::Number(n)) => n.as_i64().map_or_else(|| "-".to_owned(), rfc3339),
            Some(Value::String(s)) => s.clone(),
            _ => "-".to_owned(),
        }
    };
    vec![
        text(c, &["identity"]),
        time(&["not_before", "notBefore"]),
        time(&["not_after", "notAfter"]),
        time(&["refresh_at", "refreshAt"]),
    ]
}

/// Unix seconds as RFC 3339 UTC.
fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs}s"))
}

/// Columns padded to their widest cell, three spaces apart, as istioctl prints.
pub fn render(table: &Table) -> String {
    let columns = table.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            table
                .iter()
                .map(|r| r.get(i).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in table {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}   ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_missing_fields_show_as_dashes() {
        let dump = serde_json::json!({
            "snapshot": {
                "workloads": {"a": {"name": "a", "namespace": "ns", "extra": 1}},
                "policies": [{"name": "p", "scope": {"selector": {"matchLabels": {"app": "web"}}}, "rules": [{}, {}]}],
            },
            "certificates": [{"identity": "spiffe://td/ns/a/sa/b", "not_before": 0, "notAfter": "later"}],
        });
        assert_eq!(
            table(&dump, Section::Workloads)[1],
            ["ns", "a", "-", "-", "-", "-"]
        );
        assert_eq!(
            table(&dump, Section::Policies)[1],
            ["-", "p", "WorkloadSelector(app=web)", "-", "2"]
        );
        assert_eq!(
            table(&dump, Section::Certificates)[1],
            [
                "spiffe://td/ns/a/sa/b",
                "1970-01-01T00:00:00Z",
                "later",
                "-"
            ]
        );
        assert_eq!(table(&dump, Section::Services).len(), 1, "header only");
    }
}
