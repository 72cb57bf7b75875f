//! [`LoopbackMesh`]: two ztunnel processes on loopback, one per node, in local-file mode.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use mesh_core::socks5::ConnectError;
use mesh_core::tls::CertificateAuthority;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::process::{ChildGuard, Spawn, Stdout};
use super::socks5;

pub const HBONE_PORT: u16 = 15008;
pub const SOCKS5_PORT: u16 = 15080;
pub const READINESS_PORT: u16 = 15021;
/// Every port a ztunnel binds on its listen IP (with the defaults of its flags).
const NODE_PORTS: [u16; 6] = [15000, 15001, 15006, 15020, READINESS_PORT, SOCKS5_PORT];
/// How long to wait for another mesh on the same addresses to go away.
const PORTS_FREE_TIMEOUT: Duration = Duration::from_secs(30);

const NODES: [&str; 2] = ["node1", "node2"];
const STDERR_LINES: usize = 40;

/// What to start. [`MeshSpec::new`] gives the benchmark layout: workload `bench-client`
/// (127.0.1.10) on node1, `bench-server` (127.0.2.10) on node2, both HBONE, in namespace
/// `bench`, no policies; ztunnels listening on 127.0.0.11 (node1) and 127.0.0.12 (node2).
#[derive(Debug, Clone)]
pub struct MeshSpec {
    pub ztunnel: PathBuf,
    /// Listen IPs of the node1 and node2 ztunnels (SOCKS5 on :15080, readiness on :15021).
    pub node_ips: [Ipv4Addr; 2],
    pub client_ip: Ipv4Addr,
    pub server_ip: Ipv4Addr,
    pub trust_domain: String,
    /// The local-mesh YAML (format of `examples/local-mesh.yaml`); `None` generates the
    /// two-workload config above. Nodes must be named `node1` and `node2`.
    pub config_yaml: Option<String>,
    /// `RUST_LOG` for the ztunnels; `None` inherits ours.
    pub log: Option<String>,
    /// Keep each ztunnel's stdout (its JSON access log) for [`LoopbackMesh::access_log`];
    /// otherwise it is discarded.
    pub keep_access_logs: bool,
    pub ready_timeout: Duration,
}

impl MeshSpec {
    pub fn new(ztunnel: impl Into<PathBuf>) -> Self {
        Self {
            ztunnel: ztunnel.into(),
            node_ips: [Ipv4Addr::new(127, 0, 0, 11), Ipv4Addr::new(127, 0, 0, 12)],
            client_ip: Ipv4Addr::new(127, 0, 1, 10),
            server_ip: Ipv4Addr::new(127, 0, 2, 10),
            trust_domain: "cluster.local".to_owned(),
            config_yaml: None,
            log: None,
            keep_access_logs: false,
            ready_timeout: Duration::from_secs(20),
        }
    }

    /// The config file the ztunnels are given.
    pub fn config(&self) -> String {
        if let Some(yaml) = &self.config_yaml {
            return yaml.clone();
        }
        format!(
            "\
trustDomain: {td}
workloads:
  - name: bench-client
    namespace: bench
    serviceAccount: bench-client
    node: node1
    ips: [{client}]
  - name: bench-server
    namespace: bench
    serviceAccount: bench-server
    node: node2
    ips: [{server}]
",
            td = self.trust_domain,
            client = self.client_ip,
            server = self.server_ip,
        )
    }
}

/// The `ztunnel` binary (see [`super::process::workspace_binary`]); `ZTUNNEL_BIN` overrides.
pub fn default_ztunnel_path() -> PathBuf {
    super::process::workspace_binary("ztunnel", "ZTUNNEL_BIN")
}

/// Two ztunnels running as child processes on loopback, node1 and node2, sharing a
/// freshly generated CA and one local config file, as in `examples/local-mesh.yaml`.
///
/// [`LoopbackMesh::start`] writes the CA and config into a private temp directory, starts
/// both ztunnels and returns once both answer `/healthz/ready`. Dropping the mesh kills
/// both processes and removes the directory. Workloads reach the mesh through their
/// node's SOCKS5 port with [`LoopbackMesh::socks_connect`]; a server for a workload is
/// any listener on the workload's IP. The ports are fixed, so only one mesh with given
/// listen IPs runs at a time: `start` first waits (up to 30 s) for them to be free.
///
/// ```no_run
/// # async fn example() -> anyhow::Result<()> {
/// use mesh_tests::bench::{default_ztunnel_path, LoopbackMesh, MeshSpec};
///
/// let mesh = LoopbackMesh::start(MeshSpec::new(default_ztunnel_path())).await?;
/// let (client, server) = (mesh.spec().client_ip, mesh.spec().server_ip);
/// let _listener = tokio::net::TcpListener::bind((server, 8080)).await?;
/// let _stream = mesh.socks_connect(client.into(), (server, 8080).into()).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct LoopbackMesh {
    spec: MeshSpec,
    dir: PathBuf,
    config_path: PathBuf,
    nodes: Vec<ChildGuard>,
    /// Which node hosts each workload IP of the config.
    node_of_ip: HashMap<IpAddr, usize>,
}

impl LoopbackMesh {
    pub async fn start(spec: MeshSpec) -> anyhow::Result<Self> {
        if !spec.ztunnel.is_file() {
            bail!(
                "ztunnel binary not found at {} (build it with `cargo build --release -p \
                 ztunnel`, or set ZTUNNEL_BIN)",
                spec.ztunnel.display()
            );
        }
        let config = spec.config();
        let node_of_ip = workload_nodes(&config)?;
        wait_ports_free(&mesh_addrs(&spec, &node_of_ip), PORTS_FREE_TIMEOUT).await?;
        let dir = private_dir()?;
        let mut mesh = Self {
            config_path: dir.join("mesh.yaml"),
            dir,
            spec,
            nodes: Vec::new(),
            node_of_ip,
        };
        mesh.write_files(&config)?;
        for node in 0..NODES.len() {
            let child = ChildGuard::spawn(&mesh.spawn_spec(node))
                .with_context(|| format!("spawning {}", mesh.spec.ztunnel.display()))?;
            mesh.nodes.push(child);
        }
        for node in 0..NODES.len() {
            mesh.wait_ready(node).await?;
        }
        Ok(mesh)
    }

    pub fn spec(&self) -> &MeshSpec {
        &self.spec
    }

    /// The config file both ztunnels watch: rewrite it to change the mesh live.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The SOCKS5 address of node `node` (0 = node1, 1 = node2).
    pub fn socks_addr(&self, node: usize) -> SocketAddr {
        SocketAddr::new(self.spec.node_ips[node].into(), SOCKS5_PORT)
    }

    /// The SOCKS5 address of the ztunnel on the node hosting workload `src_ip` (node1 for
    /// an IP that is not a workload of the config).
    pub fn socks_addr_for(&self, src_ip: IpAddr) -> SocketAddr {
        self.socks_addr(self.node_of_ip.get(&src_ip).copied().unwrap_or(0))
    }

    /// Connects from workload `src_ip` to `dst` through the SOCKS5 port of the workload's
    /// node's ztunnel; the returned stream carries bytes to and from `dst`.
    pub async fn socks_connect(
        &self,
        src_ip: IpAddr,
        dst: SocketAddr,
    ) -> Result<TcpStream, ConnectError> {
        socks5::connect(src_ip, self.socks_addr_for(src_ip), dst).await
    }

    /// Process ids of the node1 and node2 ztunnels.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(ChildGuard::pid).collect()
    }

    /// What each ztunnel has written to stdout so far (needs `keep_access_logs`).
    pub fn access_log(&self, node: usize) -> std::io::Result<String> {
        std::fs::read_to_string(self.stdout_path(node))
    }

    /// State and last stderr lines of both ztunnels, for error messages.
    pub fn diagnostics(&mut self) -> String {
        self.nodes
            .iter_mut()
            .map(|n| n.describe(STDERR_LINES))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// An error if either ztunnel has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if self.nodes.iter_mut().any(|n| n.exited().is_some()) {
            bail!("a ztunnel exited:\n{}", self.diagnostics());
        }
        Ok(())
    }

    fn write_files(&self, config: &str) -> anyhow::Result<()> {
        let ca = CertificateAuthority::generate(&self.spec.trust_domain)
            .map_err(|e| anyhow::anyhow!("generating the mesh CA: {e}"))?;
        let write = |name: &str, contents: &str| {
            let path = self.dir.join(name);
            std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))
        };
        write("ca.pem", ca.root_pem())?;
        write("ca-key.pem", ca.key_pem())?;
        write("mesh.yaml", config)
    }

    fn stdout_path(&self, node: usize) -> PathBuf {
        self.dir.join(format!("{}.stdout", NODES[node]))
    }

    fn spawn_spec(&self, node: usize) -> Spawn {
        let path = |name: &str| self.dir.join(name).display().to_string();
        let args = [
            ("--node", NODES[node].to_owned()),
            ("--config", path("mesh.yaml")),
            ("--ca-cert", path("ca.pem")),
            ("--ca-key", path("ca-key.pem")),
            ("--listen-ip", self.spec.node_ips[node].to_string()),
            ("--socks5-port", SOCKS5_PORT.to_string()),
            ("--readiness-port", READINESS_PORT.to_string()),
        ];
        Spawn {
            name: format!("ztunnel {}", NODES[node]),
            program: self.spec.ztunnel.clone(),
            args: args
                .into_iter()
                .flat_map(|(k, v)| [k.to_owned(), v])
                .collect(),
            env: self
                .spec
                .log
                .iter()
                .map(|l| ("RUST_LOG".to_owned(), l.clone()))
                .collect(),
            stdout: if self.spec.keep_access_logs {
                Stdout::File(self.stdout_path(node))
            } else {
                Stdout::Discard
            },
            stderr: self.dir.join(format!("{}.stderr", NODES[node])),
            nofile: 65536,
        }
    }

    async fn wait_ready(&mut self, node: usize) -> anyhow::Result<()> {
        let addr = SocketAddr::new(self.spec.node_ips[node].into(), READINESS_PORT);
        let started = Instant::now();
        let mut last = String::from("no answer yet");
        while started.elapsed() < self.spec.ready_timeout {
            if self.nodes[node].exited().is_some() {
                let described = self.nodes[node].describe(STDERR_LINES);
                bail!("ztunnel {} did not become ready: {described}", NODES[node]);
            }
            match http_status(addr, "/healthz/ready").await {
                Ok(200) => return Ok(()),
                Ok(code) => last = format!("HTTP {code}"),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let described = self.nodes[node].describe(STDERR_LINES);
        bail!(
            "ztunnel {} not ready after {:?} (last probe of http://{addr}/healthz/ready: \
             {last}); {described}",
            NODES[node],
            self.spec.ready_timeout,
        )
    }
}

impl Drop for LoopbackMesh {
    fn drop(&mut self) {
        // Kill the processes before removing the files they hold open.
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The addresses the two ztunnels will listen on.
fn mesh_addrs(spec: &MeshSpec, node_of_ip: &HashMap<IpAddr, usize>) -> Vec<SocketAddr> {
    let node_level = spec
        .node_ips
        .iter()
        .flat_map(|ip| NODE_PORTS.map(|port| SocketAddr::new((*ip).into(), port)));
    let inbound = node_of_ip.keys().map(|ip| SocketAddr::new(*ip, HBONE_PORT));
    node_level.chain(inbound).collect()
}

/// Waits until nothing listens on `addrs`: a mesh left by another run (or another test
/// using the same addresses) would otherwise answer in place of ours.
async fn wait_ports_free(addrs: &[SocketAddr], timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        // A successful bind, dropped at once, proves the address is free right now.
        let busy: Vec<_> = addrs
            .iter()
            .filter(|addr| std::net::TcpListener::bind(addr).is_err())
            .collect();
        if busy.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            bail!(
                "addresses still in use after {timeout:?}, is another mesh \
                 running? {busy:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A fresh directory under the system temp dir, unique per process and per mesh.
fn private_dir() -> anyhow::Result<PathBuf> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("mesh-bench-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Maps each workload IP in a local-mesh config to the index of its node.
fn workload_nodes(config: &str) -> anyhow::Result<HashMap<IpAddr, usize>> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        workloads: Vec<Workload>,
    }
    #[derive(serde::Deserialize)]
    struct Workload {
        node: String,
        #[serde(default)]
        ips: Vec<IpAddr>,
    }
    let file: File = serde_yaml::from_str(config).context("parsing the mesh config")?;
    let mut map = HashMap::new();
    for w in file.workloads {
        if let Some(node) = NODES.iter().position(|n| *n == w.node) {
            map.extend(w.ips.into_iter().map(|ip| (ip, node)));
        }
    }
    Ok(map)
}

/// The status code of `GET path` over a fresh HTTP/1.1 connection.
pub async fn http_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let probe = async {
        let mut tcp = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await?;
        let mut head = Vec::with_capacity(256);
        let mut buf = [0u8; 256];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
            let n = tcp.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        parse_status_line(&head)
    };
    tokio::time::timeout(Duration::from_secs(1), probe)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("timed out")))
}

fn parse_status_line(head: &[u8]) -> std::io::Result<u16> {
    let text = String::from_utf8_lossy(head);
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next().map(str::parse::<u16>)) {
        (Some(v), Some(Ok(code))) if v.starts_with("HTTP/1.") => Ok(code),
        _ => Err(std::io::Error::other(format!("bad status line {line:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_config_places_workloads() {
        let spec = MeshSpec::new("/nonexistent");
        let nodes = workload_nodes(&spec.config()).unwrap();
        assert_eq!(nodes[&IpAddr::from([127, 0, 1, 10])], 0);
        assert_eq!(nodes[&IpAddr::from([127, 0, 2, 10])], 1);
    }

    #[test]
    fn custom_config_places_workloads() {
        let yaml = "\
workloads:
  - {name: a, node: node2, ips: [127.0.2.30, 127.0.2.31]}
  - {name: b, node: node3, ips: [127.0.3.10]}
";
        let nodes = workload_nodes(yaml).unwrap();
        assert_eq!(nodes[&IpAddr::from([127, 0, 2, 31])], 1);
        assert!(!nodes.contains_key(&IpAddr::from([127, 0, 3, 10])));
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n").unwrap(), 200);
        assert_eq!(parse_status_line(b"HTTP/1.0 503 x\r\n").unwrap(), 503);
        assert!(parse_status_line(b"SSH-2.0\r\n").is_err());
    }

    #[tokio::test]
    async fn busy_ports_are_detected() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (held_addr, free_addr) = (held.local_addr().unwrap(), free.local_addr().unwrap());
        drop(free);
        wait_ports_free(&[free_addr], Duration::ZERO).await.unwrap();
        let err = wait_ports_free(&[free_addr, held_addr], Duration::ZERO)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&held_addr.to_string()), "{err}");
    }

    #[tokio::test]
    async fn missing_binary_is_a_clear_error() {
        let err = LoopbackMesh::start(MeshSpec::new("/nonexistent/ztunnel"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("cargo build --release -p ztunnel"));
    }
}
