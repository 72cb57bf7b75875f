//! The HTTP load generators `mesh-bench l7` drives, run as processes (inside the client
//! pod's namespace: callers pass `Netns::command`): `wrk` (HTTP/1.1) and `h2load` (HTTP/2 over cleartext, and HTTP/1.1 at
//! a fixed request rate). Their text output is parsed here; a run with failed requests,
//! socket errors or non-2xx answers is an error, never a figure.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::bench::stats::{Latencies, LatencySummary};
use anyhow::{bail, ensure, Context as _};

/// Requests per second and latency of one load run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadFigures {
    pub rps: f64,
    pub latency: LatencySummary,
    pub requests: u64,
}

/// `wrk` with `connections` connections on one thread for `secs` seconds.
pub fn wrk(
    mut wrk: Command,
    url: &str,
    connections: usize,
    secs: u32,
) -> anyhow::Result<LoadFigures> {
    let out = wrk
        .args(["-t1", "--latency", "--timeout", "5s"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{secs}s"))
        .arg(url)
        .output()
        .context("running wrk (apt-get install wrk)")?;
    parse_wrk(&stdout_of("wrk", &out)?)
}

/// `h2load` over HTTP/2 cleartext (prior knowledge): `clients` connections with
/// `streams` concurrent streams each, for `secs` seconds.
pub fn h2load(
    h2load: Command,
    url: &str,
    clients: usize,
    streams: usize,
    secs: u32,
    log: &Path,
) -> anyhow::Result<LoadFigures> {
    let args = [
        format!("-c{clients}"),
        format!("-m{streams}"),
        format!("-D{secs}"),
        "--warm-up-time=1".to_owned(),
    ];
    run_h2load(h2load, url, &args, log)
}

/// `h2load --h1` at a fixed total rate (`clients` x `rps_per_client`) for `secs` seconds:
/// the load at which the waypoint's CPU and memory are read.
pub fn h2load_fixed_rate(
    h2load: Command,
    url: &str,
    clients: usize,
    rps_per_client: usize,
    secs: u32,
    log: &Path,
) -> anyhow::Result<LoadFigures> {
    let args = [
        "--h1".to_owned(),
        format!("-c{clients}"),
        format!("--rps={rps_per_client}"),
        format!("-n{}", clients * rps_per_client * secs as usize),
    ];
    run_h2load(h2load, url, &args, log)
}

fn run_h2load(
    mut h2load: Command,
    url: &str,
    args: &[String],
    log: &Path,
) -> anyhow::Result<LoadFigures> {
    let out = h2load
        .args(args)
        .arg(format!("--log-file={}", log.display()))
        .arg(url)
        .output()
        .context("running h2load (apt-get install nghttp2-client)")?;
    let text = stdout_of("h2load", &out)?;
    let (rps, requests) = parse_h2load(&text)?;
    let log_text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let latency = h2load_latencies(&log_text)?;
    Ok(LoadFigures {
        rps,
        latency,
        requests,
    })
}

fn stdout_of(tool: &str, out: &Output) -> anyhow::Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "{tool} failed ({}): {}{}",
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// Reads requests/s, the total and the 50%/99% latencies from wrk's `--latency` output.
pub fn parse_wrk(text: &str) -> anyhow::Result<LoadFigures> {
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix).map(str::trim))
    };
    if let Some(errors) = field("Socket errors:") {
        bail!("wrk saw socket errors ({errors}):\n{text}");
    }
    if let Some(n) = field("Non-2xx or 3xx responses:") {
        bail!("wrk got {n} non-2xx/3xx responses:\n{text}");
    }
    let rps: f64 = field("Requests/sec:")
        .context("no Requests/sec line")?
        .parse()
        .with_context(|| format!("wrk output:\n{text}"))?;
    let requests: u64 = (text.lines())
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.parse().ok())
        .context("no request count")?;
    let latency = LatencySummary {
        samples: requests as usize,
        p50_us: wrk_duration_us(field("50%").context("no 50% line")?)?,
        p99_us: wrk_duration_us(field("99%").context("no 99% line")?)?,
    };
    ensure!(requests > 0, "wrk completed no request:\n{text}");
    Ok(LoadFigures {
        rps,
        latency,
        requests,
    })
}

/// wrk prints durations as `668.00us`, `1.42ms` or `2.01s`.
fn wrk_duration_us(s: &str) -> anyhow::Result<f64> {
    let (number, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        bail!("unknown wrk duration {s:?}")
    };
    let n: f64 = number
        .parse()
        .with_context(|| format!("wrk duration {s:?}"))?;
    Ok(n * scale)
}

/// Reads requests/s and the completed count from h2load's summary; fails on any failed,
/// errored, timed-out or non-2xx request.
pub fn parse_h2load(text: &str) -> anyhow::Result<(f64, u64)> {
    let line = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .with_context(|| format!("no `{prefix}` line in h2load output:\n{text}"))
    };
    let finished = line("finished in ")?;
    let rps: f64 = (finished.split(", ").nth(1))
        .and_then(|s| s.strip_suffix(" req/s"))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("h2load rate in {finished:?}"))?;
    let requests = counts(line("requests: ")?);
    let codes = counts(line("status codes: ")?);
    let get = |map: &[(String, u64)], key: &str| {
        map.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
            .with_context(|| format!("h2load output has no {key:?} count:\n{text}"))
    };
    let succeeded = get(&requests, "succeeded")?;
    for bad in ["failed", "errored", "timeout"] {
        ensure!(get(&requests, bad)? == 0, "h2load: requests {bad}:\n{text}");
    }
    for class in ["3xx", "4xx", "5xx"] {
        ensure!(get(&codes, class)? == 0, "h2load: {class} answers:\n{text}");
    }
    ensure!(succeeded > 0, "h2load completed no request:\n{text}");
    Ok((rps, succeeded))
}

/// `108917 total, 108917 started, 0 failed` -> [(total, 108917), ...].
fn counts(s: &str) -> Vec<(String, u64)> {
    s.split(", ")
        .filter_map(|part| {
            let (n, name) = part.trim().split_once(' ')?;
            Some((name.to_owned(), n.parse().ok()?))
        })
        .collect()
}

/// p50/p99 from h2load's `--log-file` (start us, status, duration us per request).
pub fn h2load_latencies(log: &str) -> anyhow::Result<LatencySummary> {
    let mut latencies = Latencies::with_capacity(log.lines().count());
    for line in log.lines() {
        let mut cols = line.split('\t');
        let duration = cols.nth(2).and_then(|d| d.trim().parse::<u64>().ok());
        let duration = duration.with_context(|| format!("h2load log line {line:?}"))?;
        latencies.push(Duration::from_micros(duration));
    }
    latencies.summary().context("h2load logged no request")
}

#[cfg(test)]
mod tests;
