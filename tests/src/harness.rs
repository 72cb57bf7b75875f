//! In-process loopback mesh for integration tests: two ztunnels (`node1`, `node2`) built
//! with `ztunnel::app::build`, a development CA and a config file on disk, all on a
//! 127.B.0.0/16 block that no other test process holds at the same time.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use mesh_core::tls::CertificateAuthority;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use ztunnel::app::App;
use ztunnel::config::{Config, Ports};

/// Two nodes: node1 runs `client` (ns default) and `other` (ns other); node2 runs `echo`
/// and `echo2` behind service `echo` (VIP 127.B.10.1:80 -> 8080).
pub const BASE_CONFIG: &str = r#"
workloads:
  - {name: client, namespace: default, serviceAccount: client, node: node1, ips: [127.B.1.10], labels: {app: client}}
  - {name: other, namespace: other, serviceAccount: other, node: node1, ips: [127.B.1.11]}
  - {name: echo, namespace: default, serviceAccount: echo, node: node2, ips: [127.B.2.10], labels: {app: echo}}
  - {name: echo2, namespace: default, serviceAccount: echo, node: node2, ips: [127.B.2.11], labels: {app: echo}}
services:
  - {name: echo, namespace: default, vips: [127.B.10.1], ports: [{port: 80, targetPort: 8080}], selector: {app: echo}}
"#;

pub struct Mesh {
    pub block: u8,
    pub dir: PathBuf,
    pub ca: CertificateAuthority,
    pub node1: App,
    pub node2: App,
    _lock: std::net::TcpListener,
}

/// Holds 127.B.0.1:19999 for the life of the test: the bind is the cross-process lock.
fn claim_block() -> (u8, std::net::TcpListener) {
    let start = (std::process::id() % 150) as u8;
    for i in 0..150u8 {
        let b = 100 + (start.wrapping_add(i) % 150);
        if let Ok(l) = std::net::TcpListener::bind((IpAddr::from([127, b, 0, 1]), 19999)) {
            return (b, l);
        }
    }
    panic!("no free 127.B.0.0/16 block for the test");
}

impl Mesh {
    /// Starts both nodes with `config` (a YAML text where `127.B.` stands for the block).
    pub async fn start(config: &str) -> Mesh {
        let (block, lock) = claim_block();
        let dir = std::env::temp_dir().join(format!("mesh-test-{}-{block}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        std::fs::write(dir.join("ca.pem"), ca.root_pem()).unwrap();
        std::fs::write(dir.join("ca-key.pem"), ca.key_pem()).unwrap();
        let mut mesh_cfg = Mesh::render_for(block, config);
        mesh_cfg.push('\n');
        std::fs::write(dir.join("mesh.yaml"), mesh_cfg).unwrap();
        let node = |name: &str, last: u8| {
            let mut c = Config::new(
                name,
                dir.join("mesh.yaml"),
                dir.join("ca.pem"),
                dir.join("ca-key.pem"),
            );
            c.listen_ip = IpAddr::from([127, block, 0, last]);
            c.ports = Ports {
                hbone: 15008,
                outbound: 0,
                inbound_plaintext: 0,
                socks5: 0,
                admin: 0,
                metrics: 0,
                readiness: 0,
            };
            c.access_log_stdout = false;
            c.config_poll = Duration::from_millis(50);
            c
        };
        let node1 = ztunnel::app::build(node("node1", 11)).await.unwrap();
        let node2 = ztunnel::app::build(node("node2", 12)).await.unwrap();
        Mesh {
            block,
            dir,
            ca,
            node1,
            node2,
            _lock: lock,
        }
    }

    fn render_for(block: u8, text: &str) -> String {
        text.replace("127.B.", &format!("127.{block}."))
    }

    /// `"2.10"` -> 127.B.2.10
    pub fn ip(&self, tail: &str) -> IpAddr {
        format!("127.{}.{tail}", self.block).parse().unwrap()
    }

    pub fn addr(&self, tail: &str, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(tail), port)
    }

    /// Replaces the config file and waits for both nodes to apply it.
    pub async fn write_config(&self, config: &str) {
        let text = Mesh::render_for(self.block, config);
        let tmp = self.dir.join("mesh.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.join("mesh.yaml")).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// A SOCKS5 connection from workload `src` through node1 to `dst`. Err(code) when
    /// the ztunnel refused with SOCKS reply `code`.
    pub async fn socks(&self, src: IpAddr, dst: SocketAddr) -> Result<TcpStream, u8> {
        socks_connect(src, self.node1.bound().socks5, dst).await
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// SOCKS5 CONNECT from `src` via `proxy` to `dst` (IPv4).
pub async fn socks_connect(
    src: IpAddr,
    proxy: SocketAddr,
    dst: SocketAddr,
) -> Result<TcpStream, u8> {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(src, 0)).unwrap();
    let mut tcp = sock.connect(proxy).await.unwrap();
    tcp.write_all(&[5, 1, 0]).await.unwrap();
    let mut hello = [0u8; 2];
    tcp.read_exact(&mut hello).await.unwrap();
    assert_eq!(hello, [5, 0]);
    let IpAddr::V4(ip) = dst.ip() else {
        panic!("IPv4 only")
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&ip.octets());
    req.extend_from_slice(&dst.port().to_be_bytes());
    tcp.write_all(&req).await.unwrap();
    let mut reply = [0u8; 10];
    tcp.read_exact(&mut reply).await.map_err(|_| 255u8)?;
    match reply[1] {
        0 => Ok(tcp),
        code => Err(code),
    }
}
