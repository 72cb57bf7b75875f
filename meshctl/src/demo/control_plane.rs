//! The demo's control plane: the `controller` child process in local mode on the demo's
//! manifests, the bearer tokens the ztunnels present to it, and its metrics.
//!
//! The child is killed when dropped, so an error or Ctrl-C anywhere in the demo stops it.
//! Its stderr goes to a file in the work dir, shown when something fails. This module
//! must not judge what the controller serves: the ztunnels' own view is the evidence.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::distr::{Alphanumeric, SampleString};
use tokio::process::{Child, Command};

use super::admin;
use super::mesh::{head_and_tail, Node};
use super::metrics::{self, Sample};
use super::workdir::WorkDir;

/// The controller's own loopback address in the loopback demo, apart from the nodes'.
pub const LOOPBACK_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10));
const GRPC_PORT: u16 = 15010;
const METRICS_PORT: u16 = 15014;
const GRPC_TLS_PORT: u16 = 15012;
/// The identity the ztunnels' tokens stand for (Istio's ztunnel service account).
const ZTUNNEL_IDENTITY: &str = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";
const TOKEN_LEN: usize = 32;

pub const SIGNED: &str = "mesh_ca_certificates_signed_total";
pub const XDS_CLIENTS: &str = "pilot_xds";
pub const PUSHES: &str = "pilot_xds_pushes_total";
/// The controller metrics the report shows.
pub const SHOWN: [&str; 3] = [SIGNED, XDS_CLIENTS, PUSHES];

pub fn grpc_addr(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, GRPC_PORT)
}

pub fn grpc_tls_addr(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, GRPC_TLS_PORT)
}

pub fn metrics_addr(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, METRICS_PORT)
}

/// Where the controller reads from and the token file each node's ztunnel gets.
pub struct Inputs {
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub tokens: PathBuf,
    pub node_tokens: Vec<(&'static str, PathBuf)>,
}

/// Writes a fresh random token per node: the controller's token file (each token bound
/// to its node) and one file per ztunnel, all readable by the owner only.
pub fn write_tokens(
    work: &WorkDir,
    nodes: &[Node],
) -> Result<(PathBuf, Vec<(&'static str, PathBuf)>)> {
    let mut rng = rand::rng();
    let mut listed = String::new();
    let mut per_node = Vec::new();
    for node in nodes {
        let token = Alphanumeric.sample_string(&mut rng, TOKEN_LEN);
        let _ = writeln!(
            listed,
            "- {{token: {token}, identity: '{ZTUNNEL_IDENTITY}', node: {}}}",
            node.name
        );
        let file = format!("{}.token", node.name);
        per_node.push((node.name, work.write(&file, &token, 0o600)?));
    }
    Ok((work.write("tokens.yaml", &listed, 0o600)?, per_node))
}

pub struct ControlPlane {
    child: Child,
    stderr: PathBuf,
    /// Where it listens.
    pub ip: IpAddr,
}

impl ControlPlane {
    /// Starts the controller listening on `ip`, in the network namespace of the calling
    /// thread.
    pub fn spawn(binary: &Path, inputs: &Inputs, work: &Path, ip: IpAddr) -> Result<Self> {
        let stderr_path = work.join("controller.stderr.log");
        let stderr = std::fs::File::create(&stderr_path)
            .with_context(|| format!("create {}", stderr_path.display()))?;
        let child = Command::new(binary)
            .arg("--config-dir")
            .arg(&inputs.config_dir)
            .arg("--state-dir")
            .arg(&inputs.state_dir)
            .arg("--tokens")
            .arg(&inputs.tokens)
            .arg("--grpc-addr")
            .arg(grpc_addr(ip).to_string())
            .arg("--metrics-addr")
            .arg(metrics_addr(ip).to_string())
            .arg("--grpc-tls-addr")
            .arg(grpc_tls_addr(ip).to_string())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        Ok(ControlPlane {
            child,
            stderr: stderr_path,
            ip,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits until both the metrics and the gRPC port answer; returns how long it took.
    pub async fn wait_serving(&mut self, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        let (metrics, grpc) = (metrics_addr(self.ip), grpc_addr(self.ip));
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the controller exited ({status}) before it served");
            }
            let last = match admin::get(metrics, "/metrics").await {
                Ok(r) if r.status == 200 => match tokio::net::TcpStream::connect(grpc).await {
                    Ok(_) => return Ok(started.elapsed()),
                    Err(e) => format!("gRPC {grpc}: {e}"),
                },
                Ok(r) => format!("metrics HTTP {}", r.status),
                Err(e) => format!("{e:#}"),
            };
            if started.elapsed() >= limit {
                bail!("the controller is not serving after {limit:?}; last: {last}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The controller's metrics now.
    pub async fn metrics(&self) -> Result<Vec<Sample>> {
        metrics::scrape(metrics_addr(self.ip)).await
    }

    /// Exit status and stderr head and tail, for error reports.
    pub fn describe(&mut self, out: &mut String) {
        let state = match self.child.try_wait() {
            Ok(Some(status)) => format!("exited ({status})"),
            Ok(None) => "running".to_owned(),
            Err(e) => format!("unknown ({e})"),
        };
        let _ = writeln!(out, "--- controller: {state}");
        let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = stderr.lines().collect();
        let _ = writeln!(out, "    stderr ({} lines):", lines.len());
        for line in head_and_tail(&lines) {
            let _ = writeln!(out, "    | {line}");
        }
    }

    pub async fn stop(mut self) {
        // SIGKILL: its state dir is thrown away with the work dir.
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// The value of an unlabelled metric, if present.
pub fn value(samples: &[Sample], name: &str) -> Option<f64> {
    samples.iter().find(|s| s.name == name).map(|s| s.value)
}

#[cfg(test)]
mod tests {
    use super::super::mesh::{NODE1, NODE2};
    use super::*;

    #[test]
    fn tokens_are_random_and_bound_to_their_node() {
        let work = WorkDir::create().unwrap();
        let (list, files) = write_tokens(&work, &[NODE1, NODE2]).unwrap();
        let list = std::fs::read_to_string(list).unwrap();
        let entries: Vec<serde_yaml::Value> = serde_yaml::from_str(&list).unwrap();
        let tokens: Vec<String> = files
            .iter()
            .map(|(_, f)| std::fs::read_to_string(f).unwrap())
            .collect();
        assert_ne!(tokens[0], tokens[1]);
        for (entry, ((node, _), token)) in entries.iter().zip(files.iter().zip(&tokens)) {
            assert_eq!(token.len(), TOKEN_LEN);
            assert_eq!(entry["token"].as_str(), Some(token.as_str()));
            assert_eq!(entry["node"].as_str(), Some(*node));
            assert_eq!(entry["identity"].as_str(), Some(ZTUNNEL_IDENTITY));
        }
    }
}
