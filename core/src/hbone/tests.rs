use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::drain;
use crate::identity::Identity;
use crate::testing::echo_server;
use crate::tls::{CertificateAuthority, WorkloadCert};

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "default", sa).unwrap()
}

struct Fixture {
    hbone: SocketAddr,
    echo: SocketAddr,
    client: Arc<WorkloadCert>,
    server_id: Identity,
    pool: Pool,
    metrics: HboneMetrics,
    _drain: drain::DrainTrigger,
}

/// A server that splices every accepted stream to the authority it names.
async fn fixture() -> Fixture {
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let server_id = id("server");
    let server_cert = ca.issue(&server_id, Duration::from_secs(3600)).unwrap();
    let client = Arc::new(ca.issue(&id("client"), Duration::from_secs(3600)).unwrap());
    let tls = server_cert.server_config().unwrap();
    let (echo, _) = echo_server("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hbone = listener.local_addr().unwrap();
    let handler: Handler = Arc::new(|req: InboundRequest| {
        Box::pin(async move {
            let target = req.authority;
            let Ok(tcp) = TcpStream::connect(target).await else {
                return req.reject(http::StatusCode::SERVICE_UNAVAILABLE);
            };
            if let Ok(stream) = req.accept() {
                let _ = splice(tcp, stream).await;
            }
        })
    });
    let (trigger, drain) = drain::new();
    let metrics = HboneMetrics::default();
    tokio::spawn(serve(
        listener,
        Arc::new(move |_| Some(tls.clone())),
        handler,
        Config::default(),
        metrics.clone(),
        drain,
    ));
    Fixture {
        hbone,
        echo,
        client,
        server_id,
        pool: Pool::new(Config::default(), metrics.clone()),
        metrics,
        _drain: trigger,
    }
}

impl Fixture {
    fn key(&self) -> PoolKey {
        PoolKey {
            src: self.client.identity().clone(),
            dst: self.server_id.clone(),
            addr: self.hbone,
        }
    }

    fn request(&self, authority: SocketAddr) -> ConnectRequest {
        ConnectRequest {
            authority,
            client: "127.0.0.1:1234".parse().unwrap(),
            ..Default::default()
        }
    }

    /// A local TCP pair whose far end is spliced into a new HBONE stream to `authority`.
    async fn tunnel(&self, authority: SocketAddr) -> Result<TcpStream, HboneError> {
        let stream = self
            .pool
            .connect(&self.key(), &self.client, &self.request(authority))
            .await?;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (inner, _) = l.accept().await.unwrap();
        tokio::spawn(splice(inner, stream));
        Ok(client)
    }
}

#[tokio::test]
async fn echo_with_half_close() {
    let f = fixture().await;
    let mut c = f.tunnel(f.echo).await.unwrap();
    c.write_all(b"hello hbone").await.unwrap();
    c.shutdown().await.unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).await.unwrap();
    assert_eq!(out, b"hello hbone");
}

#[tokio::test]
async fn concurrent_streams_share_connections() {
    let f = Arc::new(fixture().await);
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = f.tunnel(f.echo).await.unwrap();
            let msg = format!("message {i}");
            c.write_all(msg.as_bytes()).await.unwrap();
            c.shutdown().await.unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            assert_eq!(out, msg);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let opened = f.metrics.pool_connections_opened();
    assert!(
        (1..=2).contains(&opened),
        "{opened} TLS connections for 200 streams"
    );
}

#[tokio::test]
async fn unreachable_destination_is_distinct_error() {
    let f = fixture().await;
    // Nothing listens on port 1 of loopback.
    let err = f.tunnel("127.0.0.1:1".parse().unwrap()).await.unwrap_err();
    assert!(matches!(err, HboneError::Unavailable { .. }), "{err}");
    let err = f
        .pool
        .connect(
            &PoolKey {
                addr: "127.0.0.1:1".parse().unwrap(),
                ..f.key()
            },
            &f.client,
            &f.request(f.echo),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, HboneError::Refused { .. }), "{err}");
}

#[tokio::test]
async fn wrong_server_identity_fails_tls() {
    let f = fixture().await;
    let key = PoolKey {
        dst: id("someone-else"),
        ..f.key()
    };
    let err = f
        .pool
        .connect(&key, &f.client, &f.request(f.echo))
        .await
        .unwrap_err();
    assert!(matches!(err, HboneError::Tls { .. }), "{err}");
}

#[test]
fn authority_parsing() {
    assert_eq!(
        parse_authority("10.0.0.1:80"),
        Some("10.0.0.1:80".parse().unwrap())
    );
    assert_eq!(
        parse_authority("[::1]:80"),
        Some("[::1]:80".parse().unwrap())
    );
    for bad in [
        "",
        "10.0.0.1",
        "host:80",
        "10.0.0.1:0",
        "::1:80",
        "10.0.0.1:99999",
    ] {
        assert_eq!(parse_authority(bad), None, "{bad}");
    }
    assert_eq!(forwarded_for("[::1]:5".parse().unwrap()), "for=\"[::1]:5\"");
    let tp = new_traceparent();
    assert_eq!(tp.len(), 55);
    assert!(tp.starts_with("00-") && tp.ends_with("-01"));
}
