//! The demo's traffic: which workload calls what, run one connection at a time, each
//! joined with the access-log lines both ztunnels wrote for it.
//!
//! Connections run sequentially so that "the next outbound and inbound line from this
//! client's IP" identifies a connection's logs even when ztunnels rewrite source ports.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Result;
use tokio::net::TcpSocket;

use super::access_log::{AccessLogs, Entry};
use super::client::{self, Seen};
use super::topology::{Topology, Workload};

/// The workload in namespace `default`, which the demo's ALLOW policy lets in.
const CLIENT: &str = "sleep";
/// A workload in another namespace, which the policy does not match.
const OUTSIDER: &str = "notsleep";
const SERVICE: &str = "echo";
/// A destination outside the mesh.
const LEGACY: &str = "legacy";
/// A server reached by its pod IP rather than the service VIP.
const BY_POD_IP: &str = "echo-v2";
/// The endpoint the pod outside the mesh calls.
const FROM_OUTSIDE_TO: &str = "echo-v1";
/// Enough calls to the VIP for round robin to reach every endpoint at least twice.
const VIP_CALLS: usize = 4;

const LOG_WAIT: Duration = Duration::from_secs(3);
/// How long to watch for a log line that should not come (a hop outside the mesh).
const STRAY_WAIT: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Allowed,
    Denied,
    Passthrough,
}

#[derive(Debug, Clone)]
pub struct Attempt {
    pub from: String,
    pub from_ip: IpAddr,
    /// The client's SPIFFE identity, which the destination should see.
    pub from_identity: Option<String>,
    pub target: SocketAddr,
    /// The service or workload name the client means to reach.
    pub target_name: String,
    pub expect: Expect,
    /// Whether a ztunnel on the destination side is on the path and writes an inbound line.
    pub inbound_logged: bool,
    /// Whether the client's own ztunnel writes an outbound line (it is in the mesh).
    pub outbound_logged: bool,
}

/// How a client reaches its target.
#[derive(Clone, Copy)]
pub enum Dialer<'a> {
    /// Through a ztunnel's SOCKS5 port, binding the client's workload IP (loopback demo).
    Socks5(SocketAddr),
    /// Straight to the target from a socket opened in the named client pod's network
    /// namespace; the node's ztunnel captures it (network-namespace demo).
    Pod(&'a (dyn Fn(&str) -> std::io::Result<TcpSocket> + Sync)),
}

/// One connection: what was tried, what the client saw, and what the ztunnels logged.
#[derive(Debug, Clone)]
pub struct Connection {
    pub attempt: Attempt,
    pub seen: Seen,
    pub outbound: Option<Entry>,
    pub inbound: Option<Entry>,
}

/// The connections of the network-namespace demo: those of [`plan`], one by pod IP, and
/// one from the pod outside the mesh into it (plaintext, so no identity the ALLOW policy
/// could match: denied at the destination).
pub fn plan_captured(topo: &Topology) -> Result<Vec<Attempt>> {
    let mut plan = plan(topo)?;
    let client = topo.workload(CLIENT)?;
    let port = topo.service(SERVICE)?.target_port()?;
    let by_ip = topo.workload(BY_POD_IP)?;
    let by_ip_addr = SocketAddr::new(by_ip.ip()?, port);
    let direct = Attempt::new(client, by_ip_addr, BY_POD_IP, Expect::Allowed, true)?;
    plan.insert(VIP_CALLS, direct);
    let legacy = topo.workload(LEGACY)?;
    let inside = topo.workload(FROM_OUTSIDE_TO)?;
    let inside_addr = SocketAddr::new(inside.ip()?, port);
    plan.push(Attempt::new(
        legacy,
        inside_addr,
        FROM_OUTSIDE_TO,
        Expect::Denied,
        true,
    )?);
    Ok(plan)
}

/// The connections of the demo, in order.
pub fn plan(topo: &Topology) -> Result<Vec<Attempt>> {
    let client = topo.workload(CLIENT)?;
    let outsider = topo.workload(OUTSIDER)?;
    let service = topo.service(SERVICE)?;
    let legacy = topo.workload(LEGACY)?;
    let vip = service.vip()?;
    let legacy_addr = SocketAddr::new(legacy.ip()?, service.target_port()?);
    let mut plan = Vec::new();
    for _ in 0..VIP_CALLS {
        plan.push(Attempt::new(client, vip, SERVICE, Expect::Allowed, true)?);
    }
    plan.push(Attempt::new(outsider, vip, SERVICE, Expect::Denied, true)?);
    let in_mesh = legacy.in_mesh();
    plan.push(Attempt::new(
        client,
        legacy_addr,
        LEGACY,
        Expect::Passthrough,
        in_mesh,
    )?);
    Ok(plan)
}

/// The echo servers to run: the service's endpoints and the workload outside the mesh,
/// on the service's target port.
pub fn servers(topo: &Topology) -> Result<Vec<(String, SocketAddr)>> {
    let service = topo.service(SERVICE)?;
    let port = service.target_port()?;
    let mut workloads = topo.endpoints(service);
    workloads.push(topo.workload(LEGACY)?);
    workloads
        .into_iter()
        .map(|w| Ok((w.name.clone(), SocketAddr::new(w.ip()?, port))))
        .collect()
}

/// The names of the service's endpoints, which round robin should all reach.
pub fn backends(topo: &Topology) -> Result<Vec<String>> {
    let service = topo.service(SERVICE)?;
    let endpoints = topo.endpoints(service);
    Ok(endpoints.into_iter().map(|w| w.name.clone()).collect())
}

/// Runs the plan, one connection at a time, printing one line per connection.
pub async fn run(plan: Vec<Attempt>, dialer: Dialer<'_>, logs: &AccessLogs) -> Vec<Connection> {
    let mut conns = Vec::new();
    for (i, attempt) in plan.into_iter().enumerate() {
        let mark = logs.mark();
        let payload = format!("hello from {} #{}\n", attempt.from, i + 1);
        let seen = match dialer {
            Dialer::Socks5(proxy) => {
                client::run(proxy, attempt.from_ip, attempt.target, &payload).await
            }
            Dialer::Pod(open) => match open(&attempt.from) {
                Ok(socket) => client::direct(socket, attempt.target, &payload).await,
                Err(e) => client::not_opened(&attempt.from, &e),
            },
        };
        println!("  #{} {}: {}", i + 1, attempt, client::describe(&seen));
        let (outbound, inbound) = find_logs(logs, mark, &attempt, seen.local).await;
        conns.push(Connection {
            attempt,
            seen,
            outbound,
            inbound,
        });
    }
    conns
}

/// The outbound and inbound lines of the connection from `local`.
async fn find_logs(
    logs: &AccessLogs,
    mark: usize,
    a: &Attempt,
    local: Option<SocketAddr>,
) -> (Option<Entry>, Option<Entry>) {
    let wait = |expected| if expected { LOG_WAIT } else { STRAY_WAIT };
    let inbound_wait = wait(a.inbound_logged);
    tokio::join!(
        find_log(logs, mark, wait(a.outbound_logged), "outbound", a, local),
        find_log(logs, mark, inbound_wait, "inbound", a, local),
    )
}

/// Waits for the line whose source is exactly the client's socket; failing that (a ztunnel
/// that rewrites source ports), takes the first line from the client's IP or workload.
async fn find_log(
    logs: &AccessLogs,
    mark: usize,
    wait: Duration,
    direction: &str,
    a: &Attempt,
    local: Option<SocketAddr>,
) -> Option<Entry> {
    let ours = |e: &Entry| e.direction() == Some(direction);
    let exact = |e: &Entry| ours(e) && local.is_some() && e.src_addr() == local;
    if let Some(entry) = logs.wait_for(mark, wait, exact).await {
        return Some(entry);
    }
    logs.find(mark, |e| ours(e) && a.is_source_of(e))
}

impl Attempt {
    fn new(
        from: &Workload,
        target: SocketAddr,
        name: &str,
        expect: Expect,
        inbound_logged: bool,
    ) -> Result<Self> {
        Ok(Attempt {
            from: from.name.clone(),
            from_ip: from.ip()?,
            from_identity: from.identity.clone(),
            target,
            target_name: name.to_owned(),
            expect,
            inbound_logged,
            outbound_logged: from.in_mesh(),
        })
    }

    /// Whether a log line describes a connection from this attempt's client.
    fn is_source_of(&self, e: &Entry) -> bool {
        e.src_ip() == Some(self.from_ip) || e.str("src_workload") == Some(self.from.as_str())
    }
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (from, ip, to, addr) = (&self.from, self.from_ip, &self.target_name, self.target);
        write!(f, "{from} ({ip}) -> {to} ({addr})")
    }
}

impl Connection {
    /// The first of the outbound and inbound lines that has `key`.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.logs().find_map(|e| e.str(key))
    }

    pub fn mtls(&self) -> Option<bool> {
        self.logs().find_map(|e| e.bool("mtls"))
    }

    /// The line that carries the authorization decision: the destination's (which enforces
    /// policy) before the source's, a denial before anything else.
    pub fn decider(&self) -> Option<&Entry> {
        let denial = |e: &&Entry| e.str("decision") == Some("deny");
        let inbound = self.inbound.as_ref();
        let outbound = self.outbound.as_ref();
        inbound
            .filter(denial)
            .or(outbound.filter(denial))
            .or(inbound)
            .or(outbound)
    }

    pub fn logs(&self) -> impl Iterator<Item = &Entry> {
        self.outbound.iter().chain(self.inbound.iter())
    }
}
