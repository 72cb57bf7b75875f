//! Node-level capture: makes this node's ambient pods' TCP arrive at the ztunnel's
//! transparent listeners (15001 outbound, 15006 plaintext inbound, 15008 HBONE) without
//! touching the pods.
//!
//! Owns the node's policy routing (marked packets delivered locally), the capture
//! manager (which interfaces are attached in which role, kept in step with each config
//! snapshot) and the `Backend` seam with the eBPF loader's operations, plus an iptables
//! TPROXY backend. It must not handle connections (inbound/outbound do, reading the
//! original destination from the accepted socket's local address), must never stop the
//! proxy on a failed attach (it logs, counts and retries), and must leave nothing behind
//! on the node when the ztunnel exits.

mod cmd;
mod ebpf;
mod iptables;
mod manager;
mod plan;
mod routing;

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use mesh_core::admin::Readiness;
use serde::Serialize;
use tokio::net::TcpListener;

pub use manager::{Capture, CaptureDump, CaptureMetrics};
pub use plan::{parse_default_devs, parse_links, parse_route_dev};

/// Set on steered packets (and on replies to the ztunnel's transparent sockets); the node
/// routes packets carrying it to itself through `ROUTE_TABLE`.
pub const CAPTURE_MARK: u32 = 0x1000;
/// Holds `local 0.0.0.0/0 dev lo`: every address is local to packets routed here.
pub const ROUTE_TABLE: u32 = 100;
/// Holds `local <pod-ip>/32 dev lo` for each local ambient pod, consulted for the
/// ztunnel's own marked HBONE dials, so HBONE to a pod on this node reaches this
/// ztunnel's 15008 listener instead of the pod, while HBONE to other nodes' pods (no
/// route here) falls through to the main table.
pub const LOCAL_HBONE_TABLE: u32 = 101;
/// The ztunnel's own socket mark in capture modes unless `--socket-mark` says otherwise.
pub const DEFAULT_SOCKET_MARK: u32 = 0x539;

/// How traffic reaches the ztunnel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    /// Nothing is captured: clients use SOCKS5, or rules someone else installs redirect to
    /// the listeners (today's loopback tests).
    #[default]
    None,
    /// iptables TPROXY rules in the mangle table.
    Iptables,
    /// tc programs from the eBPF loader (wired in by the `ebpf` backend adapter).
    Ebpf,
}

impl CaptureMode {
    /// Whether listeners are transparent and the node's routing is ours to set up.
    pub fn is_active(self) -> bool {
        self != CaptureMode::None
    }
}

impl FromStr for CaptureMode {
    type Err = CaptureError;
    fn from_str(s: &str) -> Result<Self, CaptureError> {
        match s {
            "none" => Ok(CaptureMode::None),
            "iptables" => Ok(CaptureMode::Iptables),
            "ebpf" => Ok(CaptureMode::Ebpf),
            other => Err(CaptureError::UnknownMode {
                mode: other.to_owned(),
            }),
        }
    }
}

impl fmt::Display for CaptureMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CaptureMode::None => "none",
            CaptureMode::Iptables => "iptables",
            CaptureMode::Ebpf => "ebpf",
        })
    }
}

/// What an attached interface captures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    /// The node-side end of an ambient pod's veth: every TCP connection the pod opens goes
    /// to the outbound listener.
    AmbientPod,
    /// Traffic entering the node here (the uplink, or a non-ambient local pod's veth):
    /// connections to local ambient pods go to HBONE (port 15008) or plaintext inbound.
    Ingress,
}

/// The operations of a capture mechanism, exactly those of the eBPF loader
/// (`mesh_ebpf::Redirector`), so its adapter is thin. Dropping a backend removes whatever
/// it installed.
pub trait Backend: Send {
    fn attach(&mut self, ifindex: u32, role: Role) -> Result<(), CaptureError>;
    fn detach(&mut self, ifindex: u32) -> Result<(), CaptureError>;
    /// Whether `ip` is an ambient pod on this node (an Ingress interface captures only
    /// connections to these).
    fn set_local_ambient(&mut self, ip: Ipv4Addr, ambient: bool) -> Result<(), CaptureError>;
}

/// The listeners a backend steers to, bound transparent on the wildcard address.
pub struct Listeners<'a> {
    pub outbound: &'a TcpListener,
    pub inbound_hbone: &'a TcpListener,
    pub inbound_plaintext: &'a TcpListener,
}

/// Sets up the node's routing and the backend for `mode`, ready to attach; on error,
/// whatever was set up is removed again.
pub fn open(
    mode: CaptureMode,
    node: &str,
    socket_mark: u32,
    listeners: &Listeners<'_>,
    metrics: CaptureMetrics,
    readiness: Readiness,
) -> Result<Capture, CaptureError> {
    let hbone_port = (listeners.inbound_hbone.local_addr())
        .map_err(|source| CaptureError::Listener { source })?
        .port();
    let routing = routing::NodeRouting::install(socket_mark, hbone_port)?;
    let backend = open_backend(mode, listeners)?;
    Ok(Capture::new(
        mode, node, backend, routing, metrics, readiness,
    ))
}

/// Opens the backend for `mode`. `None` has no backend.
pub fn open_backend(
    mode: CaptureMode,
    listeners: &Listeners<'_>,
) -> Result<Box<dyn Backend>, CaptureError> {
    let port = |l: &TcpListener| {
        l.local_addr()
            .map(|a| a.port())
            .map_err(|source| CaptureError::Listener { source })
    };
    match mode {
        CaptureMode::Iptables => Ok(Box::new(iptables::Iptables::open(iptables::Ports {
            outbound: port(listeners.outbound)?,
            inbound_hbone: port(listeners.inbound_hbone)?,
            inbound_plaintext: port(listeners.inbound_plaintext)?,
        })?)),
        CaptureMode::Ebpf => Ok(Box::new(ebpf::Ebpf::open(listeners)?)),
        CaptureMode::None => Err(CaptureError::NoBackend { mode }),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("unknown capture mode {mode:?} (none, iptables, ebpf)")]
    UnknownMode { mode: String },
    #[error("capture mode {mode} has no backend in this build")]
    NoBackend { mode: CaptureMode },
    #[error("running `{command}`: {source} (scripts/setup.sh installs iproute2 and iptables)")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}` printed what we cannot read: {reason}")]
    Output { command: String, reason: String },
    #[error("{problem}")]
    Unsupported { problem: String },
    #[error("no interface has index {ifindex}")]
    NoInterface { ifindex: u32 },
    #[error("sysctl {key}: {source}")]
    Sysctl { key: String, source: std::io::Error },
    #[error("listener address: {source}")]
    Listener { source: std::io::Error },
    /// From a backend outside this crate (the eBPF loader).
    #[error("{op}: {source}")]
    Loader {
        op: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

#[cfg(test)]
mod tests;
