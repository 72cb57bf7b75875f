//! `meshctl proxy-status`: the proxies connected to the controller's delta ADS server and,
//! per type, whether each holds what the controller serves now (SYNCED), has a push it
//! has not ACKed (STALE) or rejected the last one (NACKED). Read from the controller's
//! `/debug/syncz` on its metrics port; the controller decides the states, this only shows
//! them.

use std::fmt::Write as _;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use controller::xds::status::{Report, SyncState, TypeStatus};
use mesh_core::proto::type_url::{ADDRESS, AUTHORIZATION};

use crate::ztunnel_config::{render, Table};

#[derive(Args, Debug)]
pub struct ProxyStatusArgs {
    /// The controller's metrics address, which serves /debug/syncz.
    #[arg(long, default_value = "http://127.0.0.1:15014")]
    pub controller: String,
    /// Output format: a table, or the controller's report as JSON.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

pub async fn run(args: &ProxyStatusArgs) -> anyhow::Result<bool> {
    let body = crate::http::get_json(&args.controller, "/debug/syncz").await?;
    if let Format::Json = args.output {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(true);
    }
    let report: Report = serde_json::from_value(body).with_context(|| {
        format!(
            "{}/debug/syncz is not a proxy status report",
            args.controller
        )
    })?;
    if report.proxies.is_empty() {
        eprintln!("no proxies connected to {}", args.controller);
    }
    print!("{}", render(&table(&report)));
    print!("{}", rejections(&report));
    Ok(true)
}

/// One row per stream, by node id.
fn table(report: &Report) -> Table {
    let header = [
        "NAME",
        "ADDRESS",
        "CONNECTED",
        "ADDRESS-TYPE",
        "AUTHORIZATION",
    ];
    let mut out: Table = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    for p in &report.proxies {
        out.push(vec![
            or_dash(&p.node),
            p.address.clone().unwrap_or_else(|| "-".to_owned()),
            age(p.connected_seconds),
            state(p.types.get(ADDRESS)),
            state(p.types.get(AUTHORIZATION)),
        ]);
    }
    out[1..].sort();
    out
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

/// The state and the resources ACKed, with what is served when they differ; `-` for a
/// type the proxy did not subscribe to.
fn state(t: Option<&TypeStatus>) -> String {
    match t {
        None => "-".to_owned(),
        Some(t) if t.acked == t.serving => format!("{} ({})", t.state, t.acked),
        Some(t) => format!("{} ({}/{})", t.state, t.acked, t.serving),
    }
}

/// Why each NACKED type was rejected, in the proxy's words.
fn rejections(report: &Report) -> String {
    let mut out = String::new();
    for p in &report.proxies {
        for (type_url, t) in &p.types {
            let Some(nack) = t
                .last_nack
                .as_ref()
                .filter(|_| t.state == SyncState::Nacked)
            else {
                continue;
            };
            let short = type_url.rsplit('.').next().unwrap_or(type_url);
            let _ = writeln!(
                out,
                "{} rejected {short} (nonce {}, {} ago): {}",
                or_dash(&p.node),
                nack.nonce,
                age(nack.seconds_ago),
                nack.message
            );
        }
    }
    if !out.is_empty() {
        out.insert(0, '\n');
    }
    out
}

/// Seconds as kubectl prints ages: `45s`, `3m12s`, `5h4m`, `2d3h`.
fn age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_states_read_like_istioctl() {
        assert_eq!(
            [0.4, 59.9, 192.0, 18_240.0, 183_600.0].map(age),
            ["0s", "59s", "3m12s", "5h4m", "2d3h"]
        );
        let report: Report = serde_json::from_value(serde_json::json!({"proxies": [{
            "node": "", "connected_seconds": 1.0, "connected_at": 0,
            "types": {(ADDRESS): {"state": "STALE", "acked": 2, "serving": 3, "serving_digest": "x"}},
        }]}))
        .unwrap();
        assert_eq!(table(&report)[1], ["-", "-", "1s", "STALE (2/3)", "-"]);
        assert_eq!(rejections(&report), "");
    }
}
