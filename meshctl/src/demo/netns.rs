//! The demo for real, as root: nodes and pods are Linux network namespaces (mesh-netlab's
//! cluster: a fabric bridge, node1 and node2, one namespace per pod of the manifests, at
//! the addresses the manifests give them), the controller runs in the fabric namespace,
//! each node's ztunnel in its node's namespace with transparent capture (`--capture
//! ebpf`, falling back to iptables), echo servers listen in their pods and unmodified TCP
//! clients connect from theirs to pod IPs and the service VIP.
//!
//! Everything that talks to the mesh runs on a runtime whose threads live in the fabric
//! namespace (which reaches the controller and both nodes); sockets of pods are made
//! inside the pod's namespace and keep it. Teardown (processes, then namespaces, with the
//! capture state inside them) runs on every exit: success, error, panic and Ctrl-C. This
//! module must not judge the traffic: `report` and `check` do, as for the loopback demo.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use mesh_core::identity::DEFAULT_TRUST_DOMAIN;
use mesh_netlab::{NodeSpec, PodSpec};
use tokio::net::TcpSocket;
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::access_log::AccessLogs;
use super::check::Check;
use super::control_plane::{self, ControlPlane};
use super::mesh::{self, Mesh, Node};
use super::topology::Topology;
use super::traffic::{self, Dialer};
use super::workdir::WorkDir;
use super::workloads::EchoServers;
use super::{
    finish, node_workloads, print_controller_diagnostics, report, start_control_plane,
    write_inputs, Binaries, NODES, READY_TIMEOUT,
};

/// The capture every ztunnel falls back to when eBPF cannot be loaded.
const FALLBACK_CAPTURE: &str = "iptables";

/// The cluster of namespaces, shared with the task that runs in it.
type Lab = Arc<mesh_netlab::Topology>;

pub async fn run(
    bins: &Binaries,
    work: &WorkDir,
    capture: &str,
    show_logs: bool,
) -> Result<Vec<Check>> {
    println!(
        "meshctl demo: a two-node ambient mesh in network namespaces, run by its controller \
         (examples/mesh)"
    );
    println!("  controller binary: {}", bins.controller.display());
    println!("  ztunnel binary: {}", bins.ztunnel.display());
    let inputs = write_inputs(work, |text| Ok(text.to_owned()))?;
    let topo = Topology::load(&inputs.config_dir, DEFAULT_TRUST_DOMAIN)?;
    println!(
        "  work dir {}: the manifests (mesh/), random ztunnel tokens, the controller's state \
         (a fresh root CA for {}), stderr logs",
        work.path().display(),
        topo.trust_domain
    );
    // Listening from here on: a Ctrl-C while the namespaces are being made waits for
    // them and then deletes them, instead of killing meshctl and leaving them behind.
    let mut stop = Stop::listen()?;
    let lab = build(&topo).await?;
    let result = match (check_addresses(&lab, &topo), stop.already()) {
        (Err(e), _) => Err(e),
        (Ok(()), Some(signal)) => Err(anyhow!("interrupted ({signal})")),
        (Ok(()), None) => {
            let owned = Owned {
                lab: Arc::clone(&lab),
                ztunnel: bins.ztunnel.clone(),
                controller: bins.controller.clone(),
                work: work.path().to_owned(),
                capture: capture.to_owned(),
                show_logs,
            };
            in_fabric(owned, inputs, topo, &mut stop).await
        }
    };
    teardown(lab).await;
    result
}

/// SIGINT (Ctrl-C) and SIGTERM, caught so that teardown runs.
struct Stop {
    int: Signal,
    term: Signal,
}

impl Stop {
    fn listen() -> Result<Stop> {
        Ok(Stop {
            int: signal(SignalKind::interrupt()).context("listen for SIGINT")?,
            term: signal(SignalKind::terminate()).context("listen for SIGTERM")?,
        })
    }

    /// Waits for either signal; returns its name.
    async fn wait(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "Ctrl-C",
            _ = self.term.recv() => "SIGTERM",
        }
    }

    /// The signal that came already, if any.
    fn already(&mut self) -> Option<&'static str> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let wait = std::pin::pin!(self.wait());
        match wait.poll(&mut cx) {
            std::task::Poll::Ready(signal) => Some(signal),
            std::task::Poll::Pending => None,
        }
    }
}

/// Runs the demo on a runtime inside the fabric namespace until it ends or Ctrl-C; either
/// way the task (and with it every child process and server) is gone on return.
async fn in_fabric(
    args: Owned,
    inputs: control_plane::Inputs,
    topo: Topology,
    stop: &mut Stop,
) -> Result<Vec<Check>> {
    let rt = args.lab.fabric.runtime(2);
    let mut task = rt.spawn(async move { demo(args, inputs, topo).await });
    let result = tokio::select! {
        r = &mut task => r.unwrap_or_else(|e| Err(anyhow!("the demo task failed: {e}"))),
        signal = stop.wait() => {
            println!("\nInterrupted ({signal}): stopping the mesh and deleting the namespaces.");
            task.abort();
            let _ = task.await;
            Err(anyhow!("interrupted ({signal})"))
        }
    };
    rt.shutdown_background();
    result
}

/// What the task in the fabric namespace owns.
struct Owned {
    lab: Lab,
    ztunnel: std::path::PathBuf,
    controller: std::path::PathBuf,
    work: std::path::PathBuf,
    capture: String,
    show_logs: bool,
}

async fn demo(args: Owned, inputs: control_plane::Inputs, topo: Topology) -> Result<Vec<Check>> {
    let nodes = nodes(&args.lab);
    let _servers = start_servers(&args.lab, &topo)?;
    let fabric_ip = IpAddr::V4(args.lab.fabric.ip);
    let mut cp = start_control_plane(&args.controller, &inputs, &args.work, fabric_ip).await?;
    let (mesh, logs) = match start_mesh(&args, &nodes, &inputs, &cp, &topo).await {
        Ok(started) => started,
        Err(e) => {
            print_controller_diagnostics(&mut cp);
            return Err(e);
        }
    };
    let plan = traffic::plan_captured(&topo)?;
    println!(
        "\nTraffic from unmodified TCP clients in the pods' network namespaces, to pod IPs and \
         the service VIP (each node's ztunnel captures it):"
    );
    let open = |pod: &str| open_socket(&args.lab, pod);
    let conns = traffic::run(plan, Dialer::Pod(&open), &logs).await;
    let result = Ok(report(&conns, &nodes, &cp, &topo).await);
    finish(&result, mesh, cp, &logs, args.show_logs).await;
    result
}

/// Builds the cluster the manifests describe: node1 and node2, and on each its pods in
/// address order (so pod j gets 10.i.0.(10+j)). mesh-netlab panics on a failed command
/// after deleting what it made; the panic becomes an error here.
async fn build(topo: &Topology) -> Result<Lab> {
    let specs: Vec<NodeSpec> = NODES
        .iter()
        .map(|node| {
            let mut pods: Vec<_> = topo.on_node(node.name).collect();
            pods.sort_by_key(|w| w.ip().ok());
            NodeSpec::new(node.name, pods.iter().map(|w| PodSpec::new(&w.name)))
        })
        .collect();
    let lab = tokio::task::spawn_blocking(move || mesh_netlab::Topology::build(&specs))
        .await
        .map_err(|e| {
            anyhow!(
                "building the network namespaces failed ({e}; the cause is printed above); \
                 `meshctl demo --loopback` runs without them"
            )
        })?;
    let names = lab.netns_names();
    println!(
        "  created {} network namespaces ({} ... {}): a fabric bridge 10.0.0.1/24, {}",
        names.len(),
        names.first().map_or("", String::as_str),
        names.last().map_or("", String::as_str),
        lab.nodes
            .iter()
            .map(|n| format!("{} {} (pods {})", n.name, n.ip, n.pod_cidr))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(Arc::new(lab))
}

/// Every pod must sit at the address its manifest gives it (the controller tells the
/// ztunnels those addresses).
fn check_addresses(lab: &Lab, topo: &Topology) -> Result<()> {
    for pod in lab.pods() {
        let wanted = topo.workload(&pod.spec.name)?.ip()?;
        if wanted != IpAddr::V4(pod.ip) {
            bail!(
                "pod {} got {} in the network namespaces but its manifest says {wanted}: \
                 pod j of node i must be 10.i.0.(10+j), in address order",
                pod.spec.name,
                pod.ip
            );
        }
    }
    Ok(())
}

/// Deletes the namespaces (killing whatever still runs in them, which takes the capture
/// state in the nodes with it) and says so.
async fn teardown(lab: Lab) {
    let count = lab.netns_names().len();
    let deleted = tokio::task::spawn_blocking(move || match Arc::try_unwrap(lab) {
        Ok(lab) => {
            drop(lab);
            true
        }
        Err(_) => false,
    })
    .await;
    if deleted.unwrap_or(false) {
        println!("Deleted the {count} network namespaces.");
    } else {
        eprintln!(
            "meshctl demo: the network namespaces are still in use; the next demo sweeps them"
        );
    }
}

/// The demo's nodes at the cluster's node addresses.
fn nodes(lab: &Lab) -> Vec<Node> {
    NODES
        .iter()
        .filter_map(|node| {
            let ip = lab.nodes.iter().find(|n| n.name == node.name)?.ip;
            Some(Node {
                name: node.name,
                ip,
            })
        })
        .collect()
}

/// Echo servers listening inside their pods' namespaces, served from this runtime.
fn start_servers(lab: &Lab, topo: &Topology) -> Result<EchoServers> {
    let servers = traffic::servers(topo)?;
    let mut listeners = Vec::new();
    for (name, addr) in &servers {
        let pod = lab.pods().find(|p| &p.spec.name == name);
        let pod = pod.with_context(|| format!("no pod {name} in the namespaces"))?;
        let listener = pod
            .run(|| std::net::TcpListener::bind(addr))
            .with_context(|| format!("bind echo server {name} on {addr} in {}", pod.name()))?;
        listeners.push((name.clone(), listener));
    }
    let running = EchoServers::serve(listeners)?;
    let listed: Vec<String> = servers.iter().map(|(n, a)| format!("{n} {a}")).collect();
    println!(
        "  echo servers in their pods (greet with their name, then echo): {}",
        listed.join(", ")
    );
    Ok(running)
}

/// A TCP socket made inside pod `name`'s namespace: connecting it is what any program in
/// that pod does.
fn open_socket(lab: &Lab, name: &str) -> std::io::Result<TcpSocket> {
    let pod = lab.pods().find(|p| p.spec.name == name);
    let pod = pod.ok_or_else(|| std::io::Error::other(format!("no pod {name}")))?;
    pod.run(TcpSocket::new_v4)
}

/// Starts a ztunnel per node in its namespace with `--capture`, waiting until both are
/// ready; eBPF that cannot load makes them start again with iptables.
async fn start_mesh(
    args: &Owned,
    nodes: &[Node],
    inputs: &control_plane::Inputs,
    cp: &ControlPlane,
    topo: &Topology,
) -> Result<(Mesh, Arc<AccessLogs>)> {
    let first = start_ztunnels(args, nodes, inputs, cp, &args.capture).await;
    let (mesh, logs) = match first {
        Ok(started) => started,
        Err(e) if args.capture != FALLBACK_CAPTURE => {
            println!(
                "  --capture {} did not work here ({e});\n  falling back to \
                 --capture {FALLBACK_CAPTURE}",
                args.capture
            );
            start_ztunnels(args, nodes, inputs, cp, FALLBACK_CAPTURE).await?
        }
        Err(e) => return Err(e),
    };
    for node in nodes {
        let pid = mesh.pid(node.name).map_or("?".into(), |p| p.to_string());
        println!(
            "  started ztunnel {} in its node's namespace on {} (pid {pid}) for {}",
            node.name,
            node.ip,
            node_workloads(topo, node.name)
        );
    }
    Ok((mesh, logs))
}

async fn start_ztunnels(
    args: &Owned,
    nodes: &[Node],
    inputs: &control_plane::Inputs,
    cp: &ControlPlane,
    capture: &str,
) -> Result<(Mesh, Arc<AccessLogs>)> {
    let logs = Arc::new(AccessLogs::new());
    let ztunnel_inputs = mesh::Inputs {
        xds_address: format!("http://{}", control_plane::grpc_addr(cp.ip)),
        tokens: inputs.node_tokens.clone(),
        netns: (args.lab.nodes.iter())
            .filter_map(|n| {
                let node = NODES.iter().find(|d| d.name == n.name)?;
                Some((node.name, n.ns.name().to_owned()))
            })
            .collect(),
        capture: Some(capture.to_owned()),
    };
    let mut mesh = Mesh::start(&args.ztunnel, nodes, &ztunnel_inputs, &args.work, &logs)?;
    match mesh.wait_ready(READY_TIMEOUT).await {
        Ok(took) => {
            println!(
                "  both ztunnels ready with --capture {capture} after {:.1}s (config synced \
                 from the controller over delta ADS)",
                took.as_secs_f64()
            );
            Ok((mesh, logs))
        }
        Err(e) => {
            // The readiness error on top (the fallback message shows it), what the ztunnels
            // said underneath (shown if the demo gives up).
            let reasons = mesh.exit_reasons();
            let why = mesh.diagnostics(&logs);
            mesh.stop().await;
            let mut e = format!("{e:#}");
            for reason in reasons {
                e.push_str(&format!("; {reason}"));
            }
            Err(anyhow!(why).context(e))
        }
    }
}
