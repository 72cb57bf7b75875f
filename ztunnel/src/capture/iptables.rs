//! The iptables TPROXY backend: chains of our own in the mangle table, jumped to from
//! PREROUTING. Established transparent sockets (replies to the ztunnel's own deliveries
//! that carry a pod's source address) are marked and accepted first; then an ambient
//! pod's veth sends all its TCP to the outbound listener, and an Ingress interface sends
//! connections to local ambient pods to HBONE or plaintext inbound, through per-pod-IP
//! rules in a sub-chain (no ipset needed).
//!
//! TPROXY drops a packet when no transparent listener takes it, so rules that outlive a
//! killed ztunnel would black-hole every connection of its pods (eBPF's tcx links die with
//! the process). A janitor process unhooks our chain when the ztunnel is gone, however it
//! went: the pods' traffic then goes direct, as after a graceful exit.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};

use tracing::{debug, info, warn};

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

/// The PREROUTING rule that sends packets into `CHAIN`, tagged with the owner's pid so
/// that a janitor removes its own ztunnel's hook and never a successor's.
pub fn hook_rule(pid: u32) -> String {
    format!("-m comment --comment ztunnel-pid-{pid} -j {CHAIN}")
}

/// The janitor's script: blocks reading a pipe whose only writer is the ztunnel; when the
/// ztunnel exits (even by SIGKILL) the kernel closes the pipe, `read` returns and the hook
/// is deleted. Only the hook, one atomic command: the unhooked chains do nothing and the
/// next start removes them, while flushing them here could race a successor's install.
/// Signals to the process group (Ctrl-C) are ignored: the janitor waits for the pipe.
pub fn janitor_script(pid: u32) -> String {
    format!(
        "trap '' INT TERM HUP; read _; exec iptables -w -t mangle -D PREROUTING {}",
        hook_rule(pid)
    )
}

fn start_janitor(pid: u32) -> Result<Child, CaptureError> {
    Command::new("sh")
        .args(["-c", &janitor_script(pid)])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| CaptureError::Spawn {
            command: "sh (capture janitor)".to_owned(),
            source,
        })
}

pub struct Iptables {
    ports: Ports,
    /// Holds the write end of the janitor's stdin; killed on a graceful close.
    janitor: Option<Child>,
    /// ifindex -> (name when attached, role): the name is kept because the interface may
    /// be gone (pod deleted) by the time it is detached.
    attached: HashMap<u32, (String, Role)>,
    ambient: BTreeSet<Ipv4Addr>,
    open: bool,
}

impl Iptables {
    /// Removes a crashed run's chains, then creates ours.
    pub fn open(ports: Ports) -> Result<Self, CaptureError> {
        let mut me = Iptables {
            ports,
            janitor: None,
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
        let pid = std::process::id();
        me.janitor = Some(start_janitor(pid)?);
        iptables("-I", "PREROUTING", &format!("1 {}", hook_rule(pid)))?;
        info!(?ports, "iptables capture chains installed");
        Ok(me)
    }
}

/// Unhooks (whichever run's hooks they are) and deletes our chains; errors mean "was not
/// there".
fn remove_chains() {
    let listed = iptables("-S", "PREROUTING", "").unwrap_or_default();
    for hook in hooks(&listed) {
        let _ = iptables("-D", "PREROUTING", &hook);
    }
    let jump = format!("-w -t mangle -D PREROUTING -j {CHAIN}");
    delete_all("iptables", &jump.split_whitespace().collect::<Vec<_>>());
    for action in ["-F", "-X"] {
        for chain in [CHAIN, INGRESS_CHAIN] {
            let _ = iptables(action, chain, "");
        }
    }
}

/// The rule specs (after `-A PREROUTING`) of the jumps to `CHAIN` in `iptables -S`
/// output.
pub fn hooks(listed: &str) -> Vec<String> {
    let jump = format!("-j {CHAIN}");
    (listed.lines())
        .filter_map(|l| l.trim().strip_prefix("-A PREROUTING "))
        .filter(|spec| spec.ends_with(&jump))
        .map(str::to_owned)
        .collect()
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
            if let Some(mut janitor) = self.janitor.take() {
                // SIGKILL: its trap ignores the others. Our own removal follows.
                if let Err(e) = janitor.kill().and_then(|()| janitor.wait().map(drop)) {
                    warn!("stopping the capture janitor: {e}");
                }
            }
            remove_chains();
            info!("iptables capture chains removed");
        }
    }
}
