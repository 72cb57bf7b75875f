//! The two ztunnel child processes of the demo, run against the controller: start,
//! readiness, diagnostics, stop.
//!
//! Children are killed when dropped, so an error or Ctrl-C anywhere in the demo stops
//! them. Their stdout (access logs) goes to [`AccessLogs`]; stderr to a file in the work
//! dir, shown only when something fails. This module must not judge their traffic.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use super::access_log::AccessLogs;
use super::admin;

const SOCKS_PORT: u16 = 15080;
const METRICS_PORT: u16 = 15020;
const READINESS_PORT: u16 = 15021;
const OUTBOUND_PORT: u16 = 15001;
const INBOUND_PLAINTEXT_PORT: u16 = 15006;
const ADMIN_PORT: u16 = 15000;
/// Every port a ztunnel binds on its node address.
const NODE_PORTS: [u16; 6] = [
    OUTBOUND_PORT,
    INBOUND_PLAINTEXT_PORT,
    ADMIN_PORT,
    SOCKS_PORT,
    METRICS_PORT,
    READINESS_PORT,
];
/// The port a ztunnel binds on each of its mesh workloads' IPs.
const HBONE_PORT: u16 = 15008;
/// Stderr lines shown from each end of the file: errors come first, backtraces last.
const STDERR_HEAD: usize = 12;
const STDERR_TAIL: usize = 12;

/// A node of the demo mesh: one ztunnel listening on its own loopback address.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    pub name: &'static str,
    pub ip: Ipv4Addr,
}

pub const NODE1: Node = Node {
    name: "node1",
    ip: Ipv4Addr::new(127, 0, 0, 11),
};
pub const NODE2: Node = Node {
    name: "node2",
    ip: Ipv4Addr::new(127, 0, 0, 12),
};

impl Node {
    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), port)
    }

    pub fn socks(&self) -> SocketAddr {
        self.addr(SOCKS_PORT)
    }

    pub fn metrics(&self) -> SocketAddr {
        self.addr(METRICS_PORT)
    }

    pub fn admin(&self) -> SocketAddr {
        self.addr(ADMIN_PORT)
    }

    fn readiness(&self) -> SocketAddr {
        self.addr(READINESS_PORT)
    }
}

/// Where the ztunnels find the controller, each node's bearer token file, and for the
/// network-namespace demo each node's namespace and the capture mode.
pub struct Inputs {
    pub xds_address: String,
    pub tokens: Vec<(&'static str, PathBuf)>,
    /// Node name and the network namespace its ztunnel runs in (`ip netns exec`); a node
    /// not listed runs where meshctl does.
    pub netns: Vec<(&'static str, String)>,
    /// `--capture` mode (`ebpf`, `iptables`), if any.
    pub capture: Option<String>,
}

struct Ztunnel {
    node: Node,
    child: Child,
    stderr: PathBuf,
    stdout_reader: JoinHandle<()>,
}

pub struct Mesh {
    ztunnels: Vec<Ztunnel>,
}

/// Fails, naming the address, if anything already listens where the demo's ztunnels (or
/// `others`, the controller's ports) will: their readiness port would answer for them and
/// traffic would go to the wrong mesh.
pub fn ensure_free(nodes: &[Node], workload_ips: &[IpAddr], others: &[SocketAddr]) -> Result<()> {
    let node_addrs = nodes
        .iter()
        .flat_map(|n| NODE_PORTS.map(|port| n.addr(port)));
    let hbone_addrs = workload_ips
        .iter()
        .map(|ip| SocketAddr::new(*ip, HBONE_PORT));
    let all = node_addrs.chain(hbone_addrs).chain(others.iter().copied());
    for addr in all {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            bail!(
                "cannot use {addr} ({e}): is another mesh (a ztunnel, the benchmark, \
                 another demo) running on these loopback addresses?"
            );
        }
    }
    Ok(())
}

impl Mesh {
    pub fn start(
        binary: &Path,
        nodes: &[Node],
        inputs: &Inputs,
        work: &Path,
        logs: &Arc<AccessLogs>,
    ) -> Result<Self> {
        let ztunnels = nodes
            .iter()
            .map(|node| Ztunnel::spawn(binary, *node, inputs, work, logs))
            .collect::<Result<_>>()?;
        Ok(Mesh { ztunnels })
    }

    pub fn pid(&self, node: &str) -> Option<u32> {
        let z = self.ztunnels.iter().find(|z| z.node.name == node)?;
        z.child.id()
    }

    /// Waits until every ztunnel answers 200 on its readiness port; returns how long it took.
    pub async fn wait_ready(&mut self, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        let deadline = started + limit;
        for z in &mut self.ztunnels {
            z.wait_ready(deadline, limit).await?;
        }
        Ok(started.elapsed())
    }

    /// The last stderr line of each ztunnel that has exited: usually why it did.
    pub fn exit_reasons(&mut self) -> Vec<String> {
        let mut reasons = Vec::new();
        for z in &mut self.ztunnels {
            if !matches!(z.child.try_wait(), Ok(Some(_))) {
                continue;
            }
            let stderr = std::fs::read_to_string(&z.stderr).unwrap_or_default();
            if let Some(line) = stderr.lines().rev().find(|l| !l.trim().is_empty()) {
                reasons.push(format!("{}: {}", z.node.name, line.trim()));
            }
        }
        reasons
    }

    /// Exit status, stderr tail and stray stdout of each ztunnel, for error reports.
    pub fn diagnostics(&mut self, logs: &AccessLogs) -> String {
        let mut out = String::new();
        for z in &mut self.ztunnels {
            z.describe(&mut out, logs);
        }
        out
    }

    pub async fn stop(self) {
        for mut z in self.ztunnels {
            // SIGKILL: the demo has already read what it needs, nothing to drain.
            let _ = z.child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), z.child.wait()).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), z.stdout_reader).await;
        }
    }
}

impl Ztunnel {
    fn spawn(
        binary: &Path,
        node: Node,
        inputs: &Inputs,
        work: &Path,
        logs: &Arc<AccessLogs>,
    ) -> Result<Self> {
        let stderr_path = work.join(format!("{}.stderr.log", node.name));
        let stderr = std::fs::File::create(&stderr_path)
            .with_context(|| format!("create {}", stderr_path.display()))?;
        let token = inputs.tokens.iter().find(|(n, _)| *n == node.name);
        let (_, token) = token.with_context(|| format!("no token for {}", node.name))?;
        let netns = inputs.netns.iter().find(|(n, _)| *n == node.name);
        let mut command = match netns {
            Some((_, ns)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        if let Some(mode) = &inputs.capture {
            command.args(["--capture", mode]);
        }
        let mut child = command
            .arg("--node")
            .arg(node.name)
            .arg("--xds-address")
            .arg(&inputs.xds_address)
            .arg("--token-file")
            .arg(token)
            .arg("--listen-ip")
            .arg(node.ip.to_string())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {} for {}", binary.display(), node.name))?;
        let stdout = child.stdout.take().context("ztunnel stdout not piped")?;
        let logs = logs.clone();
        let stdout_reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                logs.push_line(node.name, &line);
            }
        });
        Ok(Ztunnel {
            node,
            child,
            stderr: stderr_path,
            stdout_reader,
        })
    }

    async fn wait_ready(&mut self, deadline: Instant, limit: Duration) -> Result<()> {
        let url = format!("http://{}/healthz/ready", self.node.readiness());
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "ztunnel {} exited ({status}) before it was ready",
                    self.node.name
                );
            }
            let last = match admin::get(self.node.readiness(), "/healthz/ready").await {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => format!("HTTP {}: {}", r.status, r.body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "ztunnel {} not ready after {limit:?}; {url} last said: {last}",
                    self.node.name
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn describe(&mut self, out: &mut String, logs: &AccessLogs) {
        let name = self.node.name;
        let state = match self.child.try_wait() {
            Ok(Some(status)) => format!("exited ({status})"),
            Ok(None) => "running".to_owned(),
            Err(e) => format!("unknown ({e})"),
        };
        let _ = writeln!(out, "--- ztunnel {name}: {state}");
        let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = stderr.lines().collect();
        let _ = writeln!(out, "    stderr ({} lines):", lines.len());
        for line in head_and_tail(&lines) {
            let _ = writeln!(out, "    | {line}");
        }
        for line in head_and_tail(&logs.other_lines(name)) {
            let _ = writeln!(out, "    stdout| {line}");
        }
    }
}

pub fn head_and_tail<S: AsRef<str>>(lines: &[S]) -> Vec<String> {
    let text = |l: &S| l.as_ref().to_owned();
    if lines.len() <= STDERR_HEAD + STDERR_TAIL {
        return lines.iter().map(text).collect();
    }
    let tail_start = lines.len() - STDERR_TAIL;
    let mut shown: Vec<String> = lines[..STDERR_HEAD].iter().map(text).collect();
    shown.push(format!("... ({} lines skipped)", tail_start - STDERR_HEAD));
    shown.extend(lines[tail_start..].iter().map(text));
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_output_keeps_its_first_and_last_lines() {
        let lines: Vec<String> = (0..100).map(|i| i.to_string()).collect();
        let shown = head_and_tail(&lines);
        assert_eq!(shown.len(), STDERR_HEAD + 1 + STDERR_TAIL);
        assert_eq!(
            (shown[0].as_str(), shown[STDERR_HEAD + 1].as_str()),
            ("0", "88")
        );
        assert_eq!(shown[STDERR_HEAD], "... (76 lines skipped)");
        assert_eq!(head_and_tail(&["a", "b"]), ["a", "b"]);
    }

    #[test]
    fn a_busy_address_is_named() {
        let node = Node {
            name: "n",
            ip: Ipv4Addr::new(127, 0, 0, 77),
        };
        let busy = std::net::TcpListener::bind(node.socks()).unwrap();
        let err = ensure_free(&[node], &[], &[]).unwrap_err().to_string();
        assert!(err.contains("127.0.0.77:15080"), "{err}");
        let other = std::net::TcpListener::bind("127.0.0.78:0").unwrap();
        let other_addr = other.local_addr().unwrap();
        drop(busy);
        let err = ensure_free(&[node], &[], &[other_addr]).unwrap_err();
        assert!(err.to_string().contains(&other_addr.to_string()), "{err}");
        drop(other);
        ensure_free(&[node], &[IpAddr::V4(node.ip)], &[other_addr]).unwrap();
    }
}
