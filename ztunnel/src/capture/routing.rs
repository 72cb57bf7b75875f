//! The node's policy routing for capture, the same whichever backend steers packets:
//! packets carrying the capture mark are delivered locally (to a transparent socket),
//! and the ztunnel's own HBONE dials to pods of this node come back to its own 15008
//! listener. Installed at start (after removing a crashed run's leftovers), removed on
//! exit, including when the value is dropped on an error path.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use tracing::{info, warn};

use super::cmd::{self, delete_all, ip};
use super::{CaptureError, CAPTURE_MARK, LOCAL_HBONE_TABLE, ROUTE_TABLE};

/// What `ip rule` holds while capture runs (the selectors, without add/del).
pub fn rule_specs(socket_mark: u32, hbone_port: u16) -> Vec<String> {
    vec![
        format!("fwmark {CAPTURE_MARK:#x}/{CAPTURE_MARK:#x} lookup {ROUTE_TABLE}"),
        format!(
            "fwmark {socket_mark:#x} ipproto tcp dport {hbone_port} lookup {LOCAL_HBONE_TABLE}"
        ),
    ]
}

fn capture_route() -> String {
    format!("local 0.0.0.0/0 dev lo table {ROUTE_TABLE}")
}

/// The source is loopback's: a local route would otherwise pick the pod's address as
/// the source, which is not the node's (the kernel refuses it for a non-transparent
/// socket), and the listener's replies to 127.0.0.1 stay on the node by themselves.
fn local_hbone_route(pod: Ipv4Addr) -> String {
    format!("local {pod}/32 dev lo table {LOCAL_HBONE_TABLE} src 127.0.0.1")
}

pub struct NodeRouting {
    rules: Vec<String>,
    local_hbone: BTreeSet<Ipv4Addr>,
    /// rp_filter values we changed (`all` and attached interfaces), to put back.
    rp_filter: BTreeMap<String, String>,
    installed: bool,
}

impl NodeRouting {
    pub fn install(socket_mark: u32, hbone_port: u16) -> Result<Self, CaptureError> {
        let mut routing = NodeRouting {
            rules: rule_specs(socket_mark, hbone_port),
            local_hbone: BTreeSet::new(),
            rp_filter: BTreeMap::new(),
            installed: true,
        };
        routing.remove_all();
        for rule in &routing.rules {
            ip(&format!("rule add {rule}"))?;
        }
        ip(&format!("route add {}", capture_route()))?;
        // Replies to transparent sockets arrive addressed to other hosts' addresses; a
        // strict reverse-path check on `all` would apply to every interface.
        routing.loosen_rp_filter("all")?;
        info!(rules = ?routing.rules, "capture routing installed");
        Ok(routing)
    }

    /// Routes the ztunnel's HBONE dials to `pod` (on this node) to itself, or stops.
    pub fn set_local_hbone(&mut self, pod: Ipv4Addr, on: bool) -> Result<(), CaptureError> {
        if on {
            ip(&format!("route replace {}", local_hbone_route(pod)))?;
            self.local_hbone.insert(pod);
        } else {
            self.local_hbone.remove(&pod);
            ip(&format!("route del {}", local_hbone_route(pod)))?;
        }
        Ok(())
    }

    /// Turns off reverse-path filtering on `iface` (`all` or a name), remembering the old
    /// value; the kernel applies the larger of `all` and the interface's own.
    pub fn loosen_rp_filter(&mut self, iface: &str) -> Result<(), CaptureError> {
        let key = format!("conf/{iface}/rp_filter");
        let old = cmd::read_sysctl(&key)?;
        if old != "0" {
            cmd::write_sysctl(&key, "0")?;
            self.rp_filter.entry(iface.to_owned()).or_insert(old);
        }
        Ok(())
    }

    /// Puts back what `loosen_rp_filter` changed on `iface` (if it still exists).
    pub fn restore_rp_filter(&mut self, iface: &str) {
        if let Some(old) = self.rp_filter.remove(iface) {
            let _ = cmd::write_sysctl(&format!("conf/{iface}/rp_filter"), &old);
        }
    }

    /// Removes everything this (or a crashed earlier) run installed; errors mean "was not
    /// there" and are ignored.
    fn remove_all(&mut self) {
        for rule in &self.rules {
            let args: Vec<&str> = ["rule", "del"]
                .into_iter()
                .chain(rule.split_whitespace())
                .collect();
            delete_all("ip", &args);
        }
        let route = format!("route del {}", capture_route());
        delete_all("ip", &route.split_whitespace().collect::<Vec<_>>());
        let table = LOCAL_HBONE_TABLE.to_string();
        let _ = cmd::run("ip", &["route", "flush", "table", &table]);
        self.local_hbone.clear();
    }

    pub fn teardown(&mut self) {
        if !std::mem::take(&mut self.installed) {
            return;
        }
        self.remove_all();
        let changed: Vec<String> = self.rp_filter.keys().cloned().collect();
        for iface in changed {
            self.restore_rp_filter(&iface);
        }
        info!("capture routing removed");
    }
}

impl Drop for NodeRouting {
    fn drop(&mut self) {
        if self.installed {
            warn!("capture routing dropped without shutdown; removing it now");
            self.teardown();
        }
    }
}
