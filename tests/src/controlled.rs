//! A loopback mesh run by the controller: the `controller` binary in local mode on a
//! directory of Kubernetes manifests (a child process, so a test can stop and restart
//! it), and two in-process ztunnels (`node1`, `node2`) taking config over delta ADS and
//! certificates from its CA. Addresses live in a 127.B.0.0/16 block held for the test.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mesh_core::socks5::{self, ConnectError};
use tokio::net::TcpStream;
use ztunnel::app::App;
use ztunnel::config::Config;

use crate::bench::process::{workspace_binary, ChildGuard, Spawn, Stdout};
use crate::harness::{claim_block, test_ports};

pub const NODE1_TOKEN: &str = "node1-ztunnel-token-0123456789";
pub const NODE2_TOKEN: &str = "node2-ztunnel-token-0123456789";

/// The identity the ztunnels' tokens stand for (Istio's ztunnel service account).
pub const ZTUNNEL_IDENTITY: &str = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";

/// A pod manifest; `127.B.` in `ip` stands for the block.
pub fn pod(name: &str, sa: &str, node: &str, ip: &str, app: &str) -> String {
    pod_in("default", name, sa, node, ip, &[("app", app)])
}

/// A pod manifest in any namespace, with any labels.
pub fn pod_in(
    namespace: &str,
    name: &str,
    sa: &str,
    node: &str,
    ip: &str,
    labels: &[(&str, &str)],
) -> String {
    let labels = labels
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{{labels}}}}}\n\
         spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: c, image: c}}]}}\n\
         status: {{podIP: {ip}}}\n"
    )
}

/// The controller's token file: each `(node, token)` stands for the ztunnel identity,
/// bound to that node.
pub fn tokens_yaml(nodes: &[(&str, &str)]) -> String {
    nodes
        .iter()
        .map(|(node, token)| {
            format!("- {{token: {token}, identity: '{ZTUNNEL_IDENTITY}', node: {node}}}\n")
        })
        .collect()
}

/// The enrolled namespace, the client on node1, two echo pods behind service `echo`
/// (VIP 127.B.10.1:80 -> 8080) on node2. One file per object, so tests can add and remove.
pub fn base_manifests() -> Vec<(&'static str, String)> {
    vec![
        (
            "namespace.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n  labels: {istio.io/dataplane-mode: ambient}\n"
                .to_owned(),
        ),
        ("client.yaml", pod("client", "client", "node1", "127.B.1.10", "client")),
        ("echo-1.yaml", pod("echo-1", "echo", "node2", "127.B.2.10", "echo")),
        ("echo-2.yaml", pod("echo-2", "echo", "node2", "127.B.2.11", "echo")),
        (
            "service.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: default}\n\
             spec: {clusterIP: 127.B.10.1, selector: {app: echo}, ports: [{port: 80, targetPort: 8080}]}\n"
                .to_owned(),
        ),
    ]
}

pub struct ControlledMesh {
    pub block: u8,
    pub dir: PathBuf,
    pub config_dir: PathBuf,
    /// The controller's gRPC address (fixed, so a restart serves at the same place).
    pub grpc: SocketAddr,
    controller: Option<ChildGuard>,
    pub node1: App,
    pub node2: App,
    _lock: std::net::TcpListener,
}

impl ControlledMesh {
    /// Writes `manifests`, starts the controller and both ztunnels (each returns once it
    /// has its first full config).
    pub async fn start(manifests: &[(&str, String)]) -> ControlledMesh {
        ControlledMesh::start_with(manifests, |_| {}).await
    }

    /// As [`ControlledMesh::start`], with `tweak` applied to each node's config.
    pub async fn start_with(
        manifests: &[(&str, String)],
        tweak: impl Fn(&mut Config),
    ) -> ControlledMesh {
        let (block, lock) = claim_block();
        let dir = std::env::temp_dir().join(format!("mesh-ctl-{}-{block}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config_dir = dir.join("config");
        std::fs::create_dir_all(&config_dir).unwrap();
        std::fs::write(
            dir.join("tokens.yaml"),
            tokens_yaml(&[("node1", NODE1_TOKEN), ("node2", NODE2_TOKEN)]),
        )
        .unwrap();
        let grpc = SocketAddr::new(IpAddr::from([127, block, 0, 1]), 15010);
        for (file, text) in manifests {
            write_manifest(&dir, &config_dir, block, file, text);
        }
        let controller = spawn_controller(&dir, &config_dir, grpc).await;
        let node = |name, last, token| {
            let mut c = node_config(block, grpc, name, last, token);
            tweak(&mut c);
            c
        };
        let node1 = ztunnel::app::build(node("node1", 11, NODE1_TOKEN))
            .await
            .unwrap();
        let node2 = ztunnel::app::build(node("node2", 12, NODE2_TOKEN))
            .await
            .unwrap();
        ControlledMesh {
            block,
            dir,
            config_dir,
            grpc,
            controller: Some(controller),
            node1,
            node2,
            _lock: lock,
        }
    }

    /// Starts the controller again (after [`Self::stop_controller`]).
    pub async fn start_controller(&mut self) {
        self.controller = Some(spawn_controller(&self.dir, &self.config_dir, self.grpc).await);
    }

    /// Kills the controller (as a crash or an eviction would).
    pub fn stop_controller(&mut self) {
        self.controller = None;
    }

    /// Writes (or replaces, atomically) one manifest file.
    pub fn write(&self, file: &str, text: &str) {
        write_manifest(&self.dir, &self.config_dir, self.block, file, text);
    }

    pub fn remove(&self, file: &str) {
        std::fs::remove_file(self.config_dir.join(file)).unwrap();
    }

    pub fn config_path(&self) -> &Path {
        &self.config_dir
    }

    /// `"2.10"` -> 127.B.2.10
    pub fn ip(&self, tail: &str) -> IpAddr {
        format!("127.{}.{tail}", self.block).parse().unwrap()
    }

    pub fn addr(&self, tail: &str, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(tail), port)
    }

    /// A SOCKS5 connection from workload `src` through node1; Err(reply code), Err(255)
    /// when closed without a reply.
    pub async fn socks(&self, src: IpAddr, dst: SocketAddr) -> Result<TcpStream, u8> {
        match socks5::connect(src, self.node1.bound().socks5, dst).await {
            Ok(tcp) => Ok(tcp),
            Err(ConnectError::Refused { code }) => Err(code),
            Err(ConnectError::Closed { .. }) => Err(255),
            Err(e) => panic!("SOCKS5 CONNECT {src} -> {dst}: {e}"),
        }
    }

    /// The controller's log so far, for failure messages.
    pub fn controller_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("controller.log")).unwrap_or_default()
    }
}

fn write_manifest(dir: &Path, config_dir: &Path, block: u8, file: &str, text: &str) {
    let text = text.replace("127.B.", &format!("127.{block}."));
    write_atomic(dir, config_dir, file, &text).unwrap();
}

/// Writes `config_dir/file` through a temporary file in `dir` and a rename, so a
/// controller following the directory never reads half a manifest.
pub fn write_atomic(dir: &Path, config_dir: &Path, file: &str, text: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!("{file}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, config_dir.join(file))
}

fn node_config(block: u8, grpc: SocketAddr, node: &str, last: u8, token: &str) -> Config {
    let mut c = Config::with_controller(node, &format!("http://{grpc}"), Some(token.into()));
    c.listen_ip = IpAddr::from([127, block, 0, last]);
    c.ports = test_ports();
    c.access_log_stdout = false;
    c
}

/// Starts the controller process and waits until its gRPC port answers.
async fn spawn_controller(dir: &Path, config_dir: &Path, grpc: SocketAddr) -> ChildGuard {
    let spec = controller_spawn(dir, config_dir, &dir.join("tokens.yaml"), grpc);
    let mut child = ChildGuard::spawn(&spec).expect("starting the controller");
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(grpc).await.is_err() {
        if let Some(status) = child.exited() {
            panic!("controller exited ({status}): {}", child.stderr_tail(20));
        }
        assert!(
            Instant::now() < deadline,
            "controller not serving: {}",
            child.describe(20)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child
}

/// The controller in local mode on `config_dir`: state in `dir/state`, log in
/// `dir/controller.log`, gRPC (and TLS gRPC on 15012, metrics on 15014) on `grpc`'s IP.
pub fn controller_spawn(dir: &Path, config_dir: &Path, tokens: &Path, grpc: SocketAddr) -> Spawn {
    let metrics = SocketAddr::new(grpc.ip(), 15014);
    let args = [
        "--config-dir",
        &config_dir.display().to_string(),
        "--state-dir",
        &dir.join("state").display().to_string(),
        "--tokens",
        &tokens.display().to_string(),
        "--grpc-addr",
        &grpc.to_string(),
        "--metrics-addr",
        &metrics.to_string(),
        "--grpc-tls-addr",
        &SocketAddr::new(grpc.ip(), 15012).to_string(),
    ]
    .map(String::from);
    Spawn {
        name: "controller".into(),
        program: workspace_binary("controller", "CONTROLLER_BIN"),
        args: args.to_vec(),
        env: vec![("RUST_LOG".into(), "info".into())],
        stdout: Stdout::Discard,
        stderr: dir.join("controller.log"),
        nofile: 4096,
    }
}

impl Drop for ControlledMesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `check` every 20 ms until it holds; returns how long that took, or panics with
/// `what` after `limit`.
pub async fn eventually(
    limit: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
