//! The iptables TPROXY backend: chains of our own in the mangle table, jumped to from
//! PREROUTING. Established transparent sockets (replies to the ztunnel's own deliveries
//! that carry a pod's source address) are marked and accepted first; then an ambient
//! pod's veth sends all its TCP to the outbound listener, and an Ingress interface sends
//! connections to local ambient pods to HBONE or plaintext inbound, through per-pod-IP
//! rules in a sub-chain (no ipset needed).

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;

use tracing::{debug, info};

use super::cmd::{self, delete_all, run};
use super::{Backend, CaptureError, Role, CAPTURE_MARK};

pub const CHAIN: &str = "MESH_PREROUTING";
pub const INGRESS_CHAIN: &str = "MESH_INGRESS";

/// The transparent listeners' ports.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub outbound: u16,
    pub inbound_hbone: u16,
    pub inbound_plaintext: u16,
}

fn mark() -> String {
    format!("{CAPTURE_MARK:#x}/{CAPTURE_MARK:#x}")
}

fn tproxy(port: u16) -> String {
    format!(
        "-j TPROXY --on-port {port} --on-ip 0.0.0.0 --tproxy-mark {}",
        mark()
    )
}

/// The head of `CHAIN`, before any interface's rule.
pub fn base_rules() -> Vec<String> {
    vec![
        format!(
            "-p tcp -m socket --transparent -j MARK --set-mark {}",
            mark()
        ),
        format!("-m mark --mark {} -j ACCEPT", mark()),
    ]
}

/// The rule in `CHAIN` for an interface attached in `role`.
pub fn iface_rule(name: &str, role: Role, ports: Ports) -> String {
    match role {
        Role::AmbientPod => format!("-i {name} -p tcp {}", tproxy(ports.outbound)),
        Role::Ingress => format!("-i {name} -j {INGRESS_CHAIN}"),
    }
}

/// The rules in `INGRESS_CHAIN` for a local ambient pod: HBONE to HBONE, the rest to
/// plaintext inbound.
pub fn pod_rules(ip: Ipv4Addr, ports: Ports) -> Vec<String> {
    let hbone = ports.inbound_hbone;
    vec![
        format!("-d {ip}/32 -p tcp --dport {hbone} {}", tproxy(hbone)),
        format!("-d {ip}/32 -p tcp {}", tproxy(ports.inbound_plaintext)),
    ]
}

fn iptables(action: &str, chain: &str, rule: &str) -> Result<String, CaptureError> {
    let args: Vec<&str> = ["-w", "-t", "mangle", action, chain]
        .into_iter()
        .chain(rule.split_whitespace())
        .collect();
    run("iptables", &args)
}

pub struct Iptables {
    ports: Ports,
    /// ifindex -> (name when attached, role): the name is kept because the interface may
    /// be gone (pod deleted) by the time it is detached.
    attached: HashMap<u32, (String, Role)>,
    ambient: BTreeSet<Ipv4Addr>,
    open: bool,
}

impl Iptables {
    /// Removes a crashed run's chains, then creates ours.
    pub fn open(ports: Ports) -> Result<Self, CaptureError> {
        let me = Iptables {
            ports,
            attached: HashMap::new(),
            ambient: BTreeSet::new(),
            open: true,
        };
        remove_chains();
        for chain in [CHAIN, INGRESS_CHAIN] {
            iptables("-N", chain, "")?;
        }
        for rule in base_rules() {
            iptables("-A", CHAIN, &rule)?;
        }
        iptables("-I", "PREROUTING", &format!("1 -j {CHAIN}"))?;
        info!(?ports, "iptables capture chains installed");
        Ok(me)
    }
}

/// Unhooks and deletes our chains; errors mean "was not there".
fn remove_chains() {
    let jump = format!("-w -t mangle -D PREROUTING -j {CHAIN}");
    delete_all("iptables", &jump.split_whitespace().collect::<Vec<_>>());
    for action in ["-F", "-X"] {
        for chain in [CHAIN, INGRESS_CHAIN] {
            let _ = iptables(action, chain, "");
        }
    }
}

impl Backend for Iptables {
    fn attach(&mut self, ifindex: u32, role: Role) -> Result<(), CaptureError> {
        if self.attached.get(&ifindex).map(|(_, r)| *r) == Some(role) {
            return Ok(());
        }
        self.detach(ifindex)?;
        let name = cmd::links()?
            .into_iter()
            .find(|(_, i)| *i == ifindex)
            .map(|(n, _)| n)
            .ok_or(CaptureError::NoInterface { ifindex })?;
        iptables("-A", CHAIN, &iface_rule(&name, role, self.ports))?;
        debug!(%name, ?role, "interface attached");
        self.attached.insert(ifindex, (name, role));
        Ok(())
    }

    fn detach(&mut self, ifindex: u32) -> Result<(), CaptureError> {
        if let Some((name, role)) = self.attached.remove(&ifindex) {
            iptables("-D", CHAIN, &iface_rule(&name, role, self.ports))?;
            debug!(%name, "interface detached");
        }
        Ok(())
    }

    fn set_local_ambient(&mut self, ip: Ipv4Addr, ambient: bool) -> Result<(), CaptureError> {
        let (action, changed) = if ambient {
            ("-A", self.ambient.insert(ip))
        } else {
            ("-D", self.ambient.remove(&ip))
        };
        if !changed {
            return Ok(());
        }
        let done = pod_rules(ip, self.ports)
            .iter()
            .try_for_each(|rule| iptables(action, INGRESS_CHAIN, rule).map(drop));
        if done.is_err() && ambient {
            // Not (fully) in place: the next reconcile tries again.
            self.ambient.remove(&ip);
        }
        done
    }
}

impl Drop for Iptables {
    fn drop(&mut self) {
        if std::mem::take(&mut self.open) {
            remove_chains();
            info!("iptables capture chains removed");
        }
    }
}
