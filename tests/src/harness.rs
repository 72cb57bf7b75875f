//! In-process loopback mesh for integration tests: two ztunnels (`node1`, `node2`) built
//! with `ztunnel::app::build`, a development CA and a config file on disk, all on a
//! 127.B.0.0/16 block that no other test process holds at the same time.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::socks5::{self, ConnectError};
use mesh_core::testing::echo_server;
use mesh_core::tls::CertificateAuthority;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use ztunnel::app::App;
use ztunnel::config::{Config, Ports};
use ztunnel::telemetry::{ConnRecord, Direction};

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

/// How a test client reaches the mesh.
#[derive(Clone, Copy, Debug)]
pub enum Route {
    /// Through node1's SOCKS5 listener.
    Socks,
    /// A plain connect, taken to node1's capture listener by redirection rules the test
    /// installed (see `netns`).
    Captured,
}

pub struct Mesh {
    pub block: u8,
    pub dir: PathBuf,
    pub ca: CertificateAuthority,
    pub node1: App,
    pub node2: App,
    _lock: std::net::TcpListener,
}

/// HBONE on its standard port (one address per workload), every node listener on a
/// port the system picks.
pub fn test_ports() -> Ports {
    Ports {
        hbone: 15008,
        outbound: 0,
        inbound_plaintext: 0,
        socks5: 0,
        admin: 0,
        metrics: 0,
        readiness: 0,
    }
}

/// Holds 127.B.0.1:19999 for the life of the test: the bind is the cross-process lock.
pub fn claim_block() -> (u8, std::net::TcpListener) {
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
        Mesh::start_with(config, |_| {}).await
    }

    /// As [`Mesh::start`], with `tweak` applied to each node's config before it starts.
    pub async fn start_with(config: &str, tweak: impl Fn(&mut Config)) -> Mesh {
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
            c.ports = test_ports();
            c.access_log_stdout = false;
            c.config_poll = Duration::from_millis(50);
            tweak(&mut c);
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
    /// the ztunnel refused with SOCKS reply `code`, Err(255) when it closed the connection
    /// before replying; anything else fails the test.
    pub async fn socks(&self, src: IpAddr, dst: SocketAddr) -> Result<TcpStream, u8> {
        match socks5::connect(src, self.node1.bound().socks5, dst).await {
            Ok(tcp) => Ok(tcp),
            Err(ConnectError::Refused { code }) => Err(code),
            Err(ConnectError::Closed { .. }) => Err(255),
            Err(e) => panic!("SOCKS5 CONNECT {src} -> {dst}: {e}"),
        }
    }

    /// A connection from workload `src` on node1 to `dst`, the way `route` says.
    pub async fn connect(&self, route: Route, src: IpAddr, dst: SocketAddr) -> TcpStream {
        match route {
            Route::Socks => self.socks(src, dst).await.unwrap_or_else(|code| {
                panic!("SOCKS5 CONNECT {src} -> {dst} refused with reply {code}")
            }),
            Route::Captured => {
                let sock = TcpSocket::new_v4().unwrap();
                sock.bind(SocketAddr::new(src, 0)).unwrap();
                sock.connect(dst).await.unwrap()
            }
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends `len` pseudo-random bytes and checks the echo hashes the same.
pub async fn echo_roundtrip(mut tcp: TcpStream, len: usize) {
    let (mut r, mut w) = tcp.split();
    let writer = async {
        let mut hash = Sha256::new();
        let mut chunk = vec![0u8; 256 << 10];
        let mut left = len;
        let mut seed = len as u64 + 1;
        while left > 0 {
            let n = left.min(chunk.len());
            for b in chunk[..n].iter_mut() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *b = (seed >> 56) as u8;
            }
            w.write_all(&chunk[..n]).await.unwrap();
            hash.update(&chunk[..n]);
            left -= n;
        }
        w.shutdown().await.unwrap();
        hash.finalize()
    };
    let reader = async {
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0usize;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            got += n;
        }
        (hash.finalize(), got)
    };
    let (sent, (received, got)) = tokio::join!(writer, reader);
    assert_eq!(got, len);
    assert_eq!(sent, received, "echoed bytes differ for {len} bytes");
}

/// The next access-log record, within 5 s.
pub async fn next_log(
    rx: &mut tokio::sync::broadcast::Receiver<Arc<ConnRecord>>,
) -> Arc<ConnRecord> {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("no access log within 5 s")
        .unwrap()
}

/// Half-close both ways through the mesh: the client closes first and still reads the
/// echo; the server closes first and still reads what the client sends afterwards.
pub async fn half_close_checks(mesh: &Mesh, route: Route) {
    let mut inbound = mesh.node2.proxy().log.subscribe();
    echo_server(mesh.addr("2.10", 8080)).await.unwrap();
    let mut c = mesh
        .connect(route, mesh.ip("1.10"), mesh.addr("2.10", 8080))
        .await;
    c.write_all(b"first").await.unwrap();
    c.shutdown().await.unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).await.unwrap();
    assert_eq!(out, b"first");
    assert!(next_log(&mut inbound).await.mtls, "went through the mesh");

    let listener = tokio::net::TcpListener::bind(mesh.addr("2.11", 8080))
        .await
        .unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"bye").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let mut c = mesh
        .connect(route, mesh.ip("1.10"), mesh.addr("2.11", 8080))
        .await;
    let mut first = Vec::new();
    c.read_to_end(&mut first).await.unwrap();
    assert_eq!(first, b"bye");
    c.write_all(b"after the server's FIN").await.unwrap();
    c.shutdown().await.unwrap();
    assert_eq!(server.await.unwrap(), b"after the server's FIN");
    assert!(next_log(&mut inbound).await.mtls, "went through the mesh");
}

/// 1 B, 64 KiB and 1 GiB from workload 1.10 on node1 to the echo server on node2 come back
/// identical (SHA-256), and node2 saw the client's SPIFFE identity over mTLS.
pub async fn identical_bytes_checks(mesh: &Mesh, route: Route) {
    echo_server(mesh.addr("2.10", 8080)).await.unwrap();
    let mut inbound = mesh.node2.proxy().log.subscribe();
    for len in [1usize, 64 << 10, 1 << 30] {
        let tcp = mesh
            .connect(route, mesh.ip("1.10"), mesh.addr("2.10", 8080))
            .await;
        echo_roundtrip(tcp, len).await;
        let rec = next_log(&mut inbound).await;
        assert_eq!(rec.direction, Direction::Inbound);
        assert_eq!(
            rec.src_identity.as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/client"),
            "the server side saw the client's identity"
        );
        assert!(rec.mtls);
        assert_eq!(
            rec.dst_service.as_deref(),
            Some("echo.default.svc.cluster.local"),
            "port 8080 of an endpoint of service echo"
        );
        assert_eq!(rec.bytes_sent, len as u64);
        assert_eq!(rec.bytes_received, len as u64);
    }
}
