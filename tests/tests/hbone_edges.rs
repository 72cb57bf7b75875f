//! What a ztunnel's HBONE port does with bad input and bad peers, and certificate
//! rotation under load. Every case checks that an established tunnel is unaffected.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mesh_core::testing::echo_server;
use mesh_core::tls::{identity_of, CertificateAuthority, WorkloadCert, WorkloadServerVerifier};
use mesh_core::Identity;
use mesh_tests::harness::{Mesh, BASE_CONFIG};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "default", sa).unwrap()
}

async fn tls_to(
    addr: SocketAddr,
    cert: &WorkloadCert,
    expect: &Identity,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let cfg = cert.client_config(expect).unwrap();
    TlsConnector::from(cfg)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
}

/// Opens an h2 connection with a mesh certificate and sends one request.
async fn h2_request(
    addr: SocketAddr,
    cert: &WorkloadCert,
    req: http::Request<()>,
) -> Result<u16, String> {
    let tls = tls_to(addr, cert, &id("echo"))
        .await
        .map_err(|e| e.to_string())?;
    let (send, conn) = h2::client::handshake(tls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut send = send.ready().await.map_err(|e| e.to_string())?;
    let (resp, _stream) = send.send_request(req, false).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .map_err(|_| "no response".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}

async fn assert_echo_alive(c: &mut TcpStream, round: u8) {
    let msg = [round; 100];
    c.write_all(&msg).await.unwrap();
    let mut back = [0u8; 100];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut back))
        .await
        .expect("established tunnel stalled")
        .unwrap();
    assert_eq!(back, msg);
}

#[tokio::test]
async fn bad_input_on_hbone_port_leaves_other_connections_untouched() {
    let mesh = Mesh::start(BASE_CONFIG).await;
    echo_server(mesh.addr("2.10", 8080)).await.unwrap();
    let mut established = mesh
        .socks(mesh.ip("1.10"), mesh.addr("2.10", 8080))
        .await
        .unwrap();
    assert_echo_alive(&mut established, 1).await;
    let hbone = mesh.addr("2.10", 15008);
    let metrics = &mesh.node2.proxy().hbone_metrics;
    let failures_before = metrics.tls_failures("server");

    // Random bytes, then plain HTTP/1.1: TLS fails, the connection closes.
    for junk in [
        &rand::random::<[u8; 512]>()[..],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut tcp = TcpStream::connect(hbone).await.unwrap();
        tcp.write_all(junk).await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "server did not close after junk");
    }
    assert!(metrics.tls_failures("server") >= failures_before + 2);
    assert_echo_alive(&mut established, 2).await;

    // A certificate from the mesh CA for the requests below.
    let client = mesh
        .ca
        .issue(&id("client"), Duration::from_secs(3600))
        .unwrap();
    let req = |method: http::Method, uri: &str| {
        http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap()
    };
    let get = req(http::Method::GET, &format!("https://{hbone}/"));
    assert_eq!(h2_request(hbone, &client, get).await.unwrap(), 405);
    let unknown = req(http::Method::CONNECT, &mesh.addr("2.99", 8080).to_string());
    assert_eq!(h2_request(hbone, &client, unknown).await.unwrap(), 503);
    let bad_authority = req(http::Method::CONNECT, "not-an-ip:8080");
    assert_eq!(
        h2_request(hbone, &client, bad_authority).await.unwrap(),
        400
    );
    let mut big = req(http::Method::CONNECT, &mesh.addr("2.10", 8080).to_string());
    big.headers_mut()
        .insert("x-big", "a".repeat(64 << 10).parse().unwrap());
    match h2_request(hbone, &client, big).await {
        Ok(status) => assert_eq!(status, 431, "oversized headers"),
        Err(e) => assert!(!e.is_empty()), // refused at the HTTP/2 layer: also a clean end
    }
    assert_echo_alive(&mut established, 3).await;
}

#[tokio::test]
async fn untrusted_clients_fail_the_handshake_and_are_counted() {
    let mesh = Mesh::start(BASE_CONFIG).await;
    let hbone = mesh.addr("2.10", 15008);
    let metrics = &mesh.node2.proxy().hbone_metrics;
    let before = metrics.tls_failures("server");
    let stranger_ca = CertificateAuthority::generate("cluster.local").unwrap();
    let stranger = stranger_ca
        .issue(&id("client"), Duration::from_secs(3600))
        .unwrap();
    // Trusts the mesh root (so the client side is happy) but presents a foreign chain.
    let stranger = WorkloadCert::new(
        stranger.identity().clone(),
        stranger.chain().to_vec(),
        stranger.key().clone_key(),
        vec![mesh.ca.root().clone()],
    )
    .unwrap();
    let other_td = mesh
        .ca
        .issue(
            &Identity::new("evil.example", "default", "x").unwrap(),
            Duration::from_secs(3600),
        )
        .unwrap();
    let now = std::time::SystemTime::now();
    let expired = mesh
        .ca
        .issue_valid(
            &id("client"),
            now - Duration::from_secs(7200),
            now - Duration::from_secs(60),
        )
        .unwrap();
    let logs = capture_logs();
    for cert in [&stranger, &other_td, &expired] {
        let r = async {
            let tls = tls_to(hbone, cert, &id("echo")).await?;
            server_verdict(tls).await
        }
        .await;
        assert!(r.is_err(), "handshake with {:?} succeeded", cert.identity());
    }
    // No client certificate at all, though the client trusts the mesh root.
    let mut no_cert = rustls::ClientConfig::builder_with_provider(mesh_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(WorkloadServerVerifier::new(
            Arc::new(roots(&mesh.ca)),
            id("echo"),
        )))
        .with_no_client_auth();
    no_cert.alpn_protocols = vec![b"h2".to_vec()];
    let r = async {
        let tcp = TcpStream::connect(hbone).await?;
        let tls = TlsConnector::from(Arc::new(no_cert))
            .connect(ServerName::IpAddress(hbone.ip().into()), tcp)
            .await?;
        server_verdict(tls).await
    }
    .await;
    assert!(
        r.is_err(),
        "handshake without a client certificate succeeded"
    );

    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(metrics.tls_failures("server") >= before + 4);
    let logged = logs.lock().unwrap().clone();
    let logged = String::from_utf8_lossy(&logged);
    let lines = logged
        .lines()
        .filter(|l| l.contains("HBONE TLS handshake failed"))
        .count();
    assert!(lines >= 4, "{lines} handshake failures logged:\n{logged}");
}

/// TLS 1.3: the server's verdict on our certificate arrives with the first read.
async fn server_verdict(mut tls: TlsStream<TcpStream>) -> std::io::Result<()> {
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    let mut b = [0u8; 1];
    tls.read_exact(&mut b).await.map(|_| ())
}

fn roots(ca: &CertificateAuthority) -> rustls::RootCertStore {
    let mut store = rustls::RootCertStore::empty();
    store.add(ca.root().clone()).unwrap();
    store
}

/// Collects this process's log lines (each test runs in a process of its own).
fn capture_logs() -> Arc<std::sync::Mutex<Vec<u8>>> {
    #[derive(Clone)]
    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Sink(buf.clone());
    tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .try_init()
        .expect("a log subscriber for this test process");
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_mid_transfer() {
    let mesh = Mesh::start(BASE_CONFIG).await;
    echo_server(mesh.addr("2.10", 8080)).await.unwrap();
    let echo_id = id("echo");
    let before = mesh.node2.proxy().certs.get(&echo_id).unwrap().cert.chain()[0].clone();

    let mut c = mesh
        .socks(mesh.ip("1.10"), mesh.addr("2.10", 8080))
        .await
        .unwrap();
    let transfer = tokio::spawn(async move {
        let total = 64usize << 20;
        let (mut r, mut w) = c.split();
        let write = async {
            let chunk = vec![7u8; 1 << 20];
            for _ in 0..total / chunk.len() {
                w.write_all(&chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            w.shutdown().await.unwrap();
        };
        let read = async {
            let mut n = 0usize;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let k = r.read(&mut buf).await.unwrap();
                if k == 0 {
                    break n;
                }
                assert!(buf[..k].iter().all(|b| *b == 7));
                n += k;
            }
        };
        let (_, n) = tokio::join!(write, read);
        assert_eq!(n, total);
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    mesh.node1.proxy().certs.issue(&id("client")).await.unwrap();
    mesh.node2.proxy().certs.issue(&echo_id).await.unwrap();
    transfer.await.unwrap();

    // A new handshake presents the new certificate.
    let client = mesh
        .ca
        .issue(&id("client"), Duration::from_secs(3600))
        .unwrap();
    let tls = tls_to(mesh.addr("2.10", 15008), &client, &echo_id)
        .await
        .unwrap();
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_ne!(presented, before, "still presenting the old certificate");
    assert_eq!(identity_of(&presented).unwrap(), echo_id);
    let _ = Bytes::new();
    let _ = Arc::new(());
}
