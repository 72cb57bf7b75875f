//! The mesh started for real on a [`Topology`]: the `controller` binary in local mode in
//! the fabric namespace, serving delta xDS and the CA on `FABRIC_IP:15010`, and one
//! `ztunnel` process per node inside the node's namespace, each with its own bearer
//! token. The controller's manifests are generated from the topology's pods (Namespace
//! labelled ambient, Pod with `spec.nodeName` and `status.podIP`) plus the given Services.
//!
//! Service VIPs come from 10.96.0.0/16 (`SERVICE_CIDR`), which nothing routes: only a
//! capturing ztunnel makes them reachable. This module starts and stops processes and
//! waits for readiness; it must not judge traffic (tests do).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rand::distr::{Alphanumeric, SampleString};

use super::topology::{Pod, Topology};
use crate::bench::loopback::{default_ztunnel_path, http_status, READINESS_PORT};
use crate::bench::process::{ChildGuard, Spawn, Stdout};
use crate::controlled::{controller_spawn, pod_in, tokens_yaml, write_atomic};
use mesh_netlab::wait_for_record;

mod waypoint;
pub use waypoint::GATEWAY_NAME_LABEL;

/// Where Service VIPs are taken from (not routed anywhere).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The controller's plaintext gRPC port (delta xDS and CA) on the fabric address.
pub const XDS_PORT: u16 = 15010;
const STDERR_LINES: usize = 30;

/// A Service selecting pods by their `app` label.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    /// From `SERVICE_CIDR`.
    pub vip: Ipv4Addr,
    /// The `app` label the selector matches.
    pub app: String,
    /// More selector labels besides `app`.
    pub selector: Vec<(String, String)>,
    pub port: u16,
    pub target_port: u16,
    /// Labels of the Service object (e.g. `istio.io/use-waypoint`).
    pub labels: Vec<(String, String)>,
}

impl ServiceSpec {
    pub fn new(name: &str, vip: Ipv4Addr, app: &str, port: u16, target_port: u16) -> Self {
        ServiceSpec {
            name: name.to_owned(),
            namespace: "default".to_owned(),
            vip,
            app: app.to_owned(),
            port,
            target_port,
            labels: Vec::new(),
            selector: Vec::new(),
        }
    }

    /// Sends the service's traffic through waypoint `name` (`istio.io/use-waypoint`).
    pub fn use_waypoint(mut self, name: &str) -> Self {
        (self.labels).push(("istio.io/use-waypoint".to_owned(), name.to_owned()));
        self
    }

    fn manifest(&self) -> String {
        let mut selector = vec![("app".to_owned(), self.app.clone())];
        selector.extend(self.selector.iter().cloned());
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}, labels: {{{}}}}}\n\
             spec: {{clusterIP: {}, selector: {{{}}}, ports: [{{port: {}, targetPort: {}}}]}}\n",
            self.name,
            self.namespace,
            flow_map(&self.labels),
            self.vip,
            flow_map(&selector),
            self.port,
            self.target_port
        )
    }
}

#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// The ztunnels' `--capture` mode (`iptables`, `ebpf`); `None` leaves the flag out.
    pub capture: Option<String>,
    pub services: Vec<ServiceSpec>,
    /// More manifests for the controller (policies, ...): (file name, YAML).
    pub manifests: Vec<(String, String)>,
    /// Extra flags for every ztunnel.
    pub ztunnel_args: Vec<String>,
    /// Waypoints, by name: each runs in the topology's pod of that name (see
    /// `mesh/waypoint.rs`) behind a Gateway and Service of that name.
    pub waypoints: Vec<String>,
    /// `RUST_LOG` of the controller and the ztunnels.
    pub log: String,
    /// How long the controller and each ztunnel get to become ready.
    pub ready_timeout: Duration,
}

/// Environment variable naming the capture mode the netns tests run the ztunnels in.
pub const CAPTURE_MODE_ENV: &str = "MESH_CAPTURE_MODE";

/// `ebpf` (the design's capture), unless `MESH_CAPTURE_MODE` names another (`iptables`):
/// CI runs the capture tests once in each mode.
pub fn capture_mode() -> String {
    std::env::var(CAPTURE_MODE_ENV).unwrap_or_else(|_| "ebpf".to_owned())
}

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            capture: Some(capture_mode()),
            services: Vec::new(),
            manifests: Vec::new(),
            ztunnel_args: Vec::new(),
            waypoints: Vec::new(),
            log: "info".to_owned(),
            ready_timeout: Duration::from_secs(30),
        }
    }
}

/// Dropping the mesh kills the ztunnels, then the controller, then deletes the topology.
#[derive(Debug)]
pub struct NetnsMesh {
    // Field order is drop order.
    waypoints: Vec<ChildGuard>,
    ztunnels: Vec<ChildGuard>,
    controller: ChildGuard,
    /// Kept to start a ztunnel again with the same flags ([`NetnsMesh::restart_ztunnel`]).
    opts: MeshOptions,
    /// The directory the controller follows; see [`NetnsMesh::write`].
    pub config_dir: PathBuf,
    dir: PathBuf,
    pub topo: Topology,
}

impl NetnsMesh {
    /// Writes manifests and tokens, starts the controller and waits until it serves, then
    /// starts every node's ztunnel and waits until each answers `/healthz/ready` (it has
    /// its first full config and certificates).
    pub fn start(topo: Topology, opts: &MeshOptions) -> anyhow::Result<NetnsMesh> {
        let dir = topo.work_dir.join("mesh");
        let config_dir = dir.join("config");
        std::fs::create_dir_all(&config_dir)
            .with_context(|| format!("creating {}", config_dir.display()))?;
        for (file, text) in manifests(&topo, opts) {
            write_atomic(&dir, &config_dir, &file, &text)
                .with_context(|| format!("writing manifest {file}"))?;
        }
        let tokens = write_tokens(&topo, opts, &dir)?;
        let controller = start_controller(&topo, &dir, &config_dir, opts)?;
        let mut mesh = NetnsMesh {
            waypoints: Vec::new(),
            ztunnels: Vec::new(),
            controller,
            opts: opts.clone(),
            config_dir,
            dir,
            topo,
        };
        for (i, token) in tokens.iter().enumerate() {
            let ztunnel = mesh.start_ztunnel(i, token)?;
            mesh.ztunnels.push(ztunnel);
        }
        for name in &opts.waypoints {
            let waypoint = mesh.start_waypoint(name)?;
            mesh.waypoints.push(waypoint);
        }
        Ok(mesh)
    }

    /// Writes (or atomically replaces) one manifest file; the controller follows it.
    pub fn write(&self, file: &str, text: &str) -> std::io::Result<()> {
        write_atomic(&self.dir, &self.config_dir, file, text)
    }

    /// Rewrites pod `name`'s manifest in (`ambient`: its namespace's ambient label then
    /// applies) or out of the mesh (`istio.io/dataplane-mode: none` on the pod), as a user
    /// relabels a running pod; the pod itself is not touched.
    pub fn set_pod_ambient(&self, name: &str, ambient: bool) -> std::io::Result<()> {
        let pod = self.topo.pod(name);
        self.write(&format!("pod-{name}.yaml"), &pod_manifest(pod, ambient))
    }

    pub fn remove(&self, file: &str) -> std::io::Result<()> {
        std::fs::remove_file(self.config_dir.join(file))
    }

    /// The access log (one JSON line per connection) of node `node`'s ztunnel so far.
    pub fn access_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("ztunnel-{node}.access.log")))
            .unwrap_or_default()
    }

    /// Node `node`'s ztunnel's own log (stderr) so far.
    pub fn ztunnel_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("ztunnel-{node}.log"))).unwrap_or_default()
    }

    /// The ztunnel process of node `node`.
    pub fn ztunnel(&mut self, node: &str) -> &mut ChildGuard {
        let i = self.node_index(node);
        &mut self.ztunnels[i]
    }

    pub fn controller(&mut self) -> &mut ChildGuard {
        &mut self.controller
    }

    /// Every process's state and last log lines: for failure messages.
    pub fn describe(&mut self) -> String {
        let mut out = self.controller.describe(STDERR_LINES);
        for z in self.ztunnels.iter_mut().chain(&mut self.waypoints) {
            let _ = write!(out, "\n{}", z.describe(STDERR_LINES));
        }
        out
    }

    /// Starts node `node`'s ztunnel again, with the same flags and token, and waits until
    /// it is ready; a ztunnel still running is killed (SIGKILL) first. The previous run's
    /// logs are kept as `ztunnel-<node>.previous.{log,access.log}`; `access_log` reads
    /// the new run's.
    pub fn restart_ztunnel(&mut self, node: &str) -> anyhow::Result<()> {
        let i = self.node_index(node);
        let old = &mut self.ztunnels[i];
        if old.exited().is_none() {
            let pid = old.pid().to_string();
            std::process::Command::new("kill")
                .args(["-KILL", &pid])
                .status()
                .context("running kill")?;
            let start = Instant::now();
            while old.exited().is_none() && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if old.exited().is_none() {
                bail!("{} did not exit after SIGKILL", old.name());
            }
        }
        for log in ["log", "access.log"] {
            let from = self.dir.join(format!("ztunnel-{node}.{log}"));
            let to = self.dir.join(format!("ztunnel-{node}.previous.{log}"));
            std::fs::rename(&from, &to).with_context(|| format!("keeping {}", from.display()))?;
        }
        let token = token_path(&self.dir, node);
        self.ztunnels[i] = self.start_ztunnel(i, &token)?;
        Ok(())
    }

    /// The first record of `node`'s access log that `matches`, waiting up to `limit` for
    /// it (records are written when connections close); panics, with every process's
    /// state, when none comes.
    pub fn expect_record(
        &mut self,
        node: &str,
        matches: impl Fn(&serde_json::Value) -> bool,
        limit: Duration,
    ) -> serde_json::Value {
        let found = wait_for_record(|| self.access_log(node), matches, limit);
        found.unwrap_or_else(|| {
            let log = self.access_log(node);
            panic!("no such record on {node}: {log}\n{}", self.describe())
        })
    }

    fn node_index(&self, node: &str) -> usize {
        self.topo
            .nodes
            .iter()
            .position(|n| n.name == node)
            .unwrap_or_else(|| panic!("no node {node}"))
    }

    fn start_ztunnel(&self, i: usize, token: &Path) -> anyhow::Result<ChildGuard> {
        let node = &self.topo.nodes[i];
        let opts = &self.opts;
        let xds = format!("http://{}:{XDS_PORT}", self.topo.fabric.ip);
        let mut args: Vec<String> = [
            "--node",
            &node.name,
            "--xds-address",
            &xds,
            "--token-file",
            &token.display().to_string(),
            "--listen-ip",
            &node.ip.to_string(),
        ]
        .map(String::from)
        .to_vec();
        if let Some(mode) = &opts.capture {
            args.extend(["--capture".to_owned(), mode.clone()]);
        }
        args.extend(opts.ztunnel_args.iter().cloned());
        let spec = Spawn {
            name: format!("ztunnel {}", node.name),
            program: default_ztunnel_path(),
            args,
            env: vec![("RUST_LOG".into(), opts.log.clone())],
            stdout: Stdout::File(self.dir.join(format!("ztunnel-{}.access.log", node.name))),
            stderr: self.dir.join(format!("ztunnel-{}.log", node.name)),
            nofile: 65536,
        };
        let mut child = node.spawn(&spec);
        let ready = SocketAddr::new(IpAddr::V4(node.ip), READINESS_PORT);
        wait_child(&mut child, opts.ready_timeout, || {
            node.block_on(http_status(ready, "/healthz/ready"))
                .is_ok_and(|code| code == 200)
        })?;
        Ok(child)
    }
}

impl Deref for NetnsMesh {
    type Target = Topology;
    fn deref(&self) -> &Topology {
        &self.topo
    }
}

/// Namespaces (ambient), pods and services, one file each.
fn manifests(topo: &Topology, opts: &MeshOptions) -> Vec<(String, String)> {
    let mut namespaces: Vec<&str> = topo.pods().map(|p| p.spec.namespace.as_str()).collect();
    namespaces.extend(opts.services.iter().map(|s| s.namespace.as_str()));
    namespaces.sort_unstable();
    namespaces.dedup();
    let mut out: Vec<(String, String)> = namespaces
        .iter()
        .map(|ns| {
            let text = format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  \
                 labels: {{istio.io/dataplane-mode: ambient}}\n"
            );
            (format!("namespace-{ns}.yaml"), text)
        })
        .collect();
    out.extend(topo.pods().map(|p| {
        let text = match waypoint::pod_labels(p, opts) {
            Some(labels) => pod_manifest_labelled(p, &labels),
            None => pod_manifest(p, p.spec.ambient),
        };
        (format!("pod-{}.yaml", p.spec.name), text)
    }));
    out.extend(waypoint::manifests(topo, opts));
    out.extend(opts.services.iter().map(|s| {
        (
            format!("service-{}-{}.yaml", s.namespace, s.name),
            s.manifest(),
        )
    }));
    out.extend(opts.manifests.iter().cloned());
    out
}

fn pod_manifest(pod: &Pod, ambient: bool) -> String {
    let off = [("istio.io/dataplane-mode".to_owned(), "none".to_owned())];
    pod_manifest_labelled(pod, if ambient { &[] } else { &off })
}

/// Pod `pod`'s manifest with `extra` labels besides its own.
fn pod_manifest_labelled(pod: &Pod, extra: &[(String, String)]) -> String {
    let labels: Vec<(&str, &str)> = (pod.spec.labels.iter().chain(extra))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    pod_in(
        &pod.spec.namespace,
        &pod.spec.name,
        &pod.spec.service_account,
        &pod.node,
        &pod.ip.to_string(),
        &labels,
    )
}

/// The SPIFFE identity the controller issues `pod` (as its `spiffe://` string, the form
/// access logs carry).
pub fn pod_identity(pod: &Pod) -> String {
    mesh_core::Identity::new(
        "cluster.local",
        &pod.spec.namespace,
        &pod.spec.service_account,
    )
    .map(|id| id.to_string())
    .unwrap_or_else(|e| panic!("pod {}: {e}", pod.spec.name))
}

/// A fresh random token per node: the controller's token file and one file per ztunnel.
/// `{k: v, ...}`'s inside, for a YAML flow map.
fn flow_map(pairs: &[(String, String)]) -> String {
    let items: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    items.join(", ")
}

fn write_tokens(topo: &Topology, opts: &MeshOptions, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut rng = rand::rng();
    let tokens: Vec<(&str, String)> = topo
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), Alphanumeric.sample_string(&mut rng, 32)))
        .collect();
    let listed: Vec<(&str, &str)> = tokens.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let file = dir.join("tokens.yaml");
    let yaml = tokens_yaml(&listed) + &waypoint::tokens(topo, opts, dir)?;
    std::fs::write(&file, yaml).context("writing tokens.yaml")?;
    let mut per_node = Vec::new();
    for (node, token) in &tokens {
        let path = token_path(dir, node);
        std::fs::write(&path, token).with_context(|| format!("writing {}", path.display()))?;
        per_node.push(path);
    }
    Ok(per_node)
}

fn token_path(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}.token"))
}

fn start_controller(
    topo: &Topology,
    dir: &Path,
    config_dir: &Path,
    opts: &MeshOptions,
) -> anyhow::Result<ChildGuard> {
    let grpc = SocketAddr::new(IpAddr::V4(topo.fabric.ip), XDS_PORT);
    let mut spec = controller_spawn(dir, config_dir, &dir.join("tokens.yaml"), grpc);
    spec.env = vec![("RUST_LOG".into(), opts.log.clone())];
    let mut child = topo.fabric.spawn(&spec);
    wait_child(&mut child, opts.ready_timeout, || {
        topo.fabric
            .run(|| TcpStream::connect_timeout(&grpc, Duration::from_millis(200)))
            .is_ok()
    })?;
    Ok(child)
}

/// Polls `ready` every 50 ms until it holds, failing early if the child exits.
fn wait_child(
    child: &mut ChildGuard,
    limit: Duration,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while !ready() {
        if child.exited().is_some() || start.elapsed() > limit {
            let described = child.describe(STDERR_LINES);
            let waited = start.elapsed();
            bail!(
                "{} not ready after {waited:.1?} (limit {limit:?}): {described}",
                child.name()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
