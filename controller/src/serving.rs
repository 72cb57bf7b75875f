//! The controller's TLS endpoint (15012): the same gRPC services as the plaintext port,
//! behind a serving certificate the mesh CA issues to the controller itself at start
//! (DNS and IP SANs) and renews at half life, without dropping open connections.
//!
//! It owns the certificate's life and the TLS handshakes; it must not know the services
//! it carries.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use mesh_core::drain::Drain;
use mesh_core::tls::CertificateAuthority;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use rustls::pki_types::PrivateKeyDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

/// The name proxies expect of the controller, as of Istio's istiod.
pub const DEFAULT_SERVING_DNS: &str = "istiod.istio-system.svc";
/// A handshake taking longer than this is abandoned.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A failed renewal is retried after this long (the current certificate stays).
const RENEW_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("issuing the serving certificate: {0}")]
    Issue(#[from] mesh_core::tls::CaError),
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("binding TLS gRPC on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the serving certificate says and how long it lives.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ServingCert {
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub lifetime: Duration,
}

/// The current serving certificate, swapped whole on renewal; each handshake reads it.
#[derive(Debug)]
struct Current(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

fn issue(ca: &CertificateAuthority, spec: &ServingCert) -> Result<CertifiedKey, ServingError> {
    let (chain, key) = ca.issue_serving(&spec.dns_names, &spec.ips, spec.lifetime)?;
    let signing = mesh_core::tls::provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(key))?;
    Ok(CertifiedKey::new(chain, signing))
}

/// Counts handshakes that failed (wrong root on the client, not TLS at all, timeouts).
#[derive(Clone)]
pub struct ServingMetrics {
    handshake_failures: Counter,
    renewals: Counter,
}

impl ServingMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = ServingMetrics {
            handshake_failures: Counter::default(),
            renewals: Counter::default(),
        };
        registry.register(
            "mesh_grpc_tls_handshake_failures",
            "TLS handshakes on the controller's gRPC port that failed",
            m.handshake_failures.clone(),
        );
        registry.register(
            "mesh_serving_cert_renewals",
            "Serving certificates issued after the first",
            m.renewals.clone(),
        );
        m
    }
}

/// A TLS connection for tonic; the peer's address is passed on, for `/debug/syncz`.
pub struct TlsConn(TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The TLS listener: bound, with its first certificate issued.
pub struct TlsIncoming {
    pub addr: SocketAddr,
    pub connections: ReceiverStream<std::io::Result<TlsConn>>,
}

/// Binds `addr`, issues the first certificate (the bind IP added to its SANs) and starts
/// accepting and renewing until `drain` fires.
pub async fn listen(
    addr: SocketAddr,
    ca: Arc<CertificateAuthority>,
    mut spec: ServingCert,
    metrics: ServingMetrics,
    drain: Drain,
) -> Result<TlsIncoming, ServingError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServingError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServingError::Bind { addr, source })?;
    if !bound.ip().is_unspecified() && !spec.ips.contains(&bound.ip()) {
        spec.ips.push(bound.ip());
    }
    let current = Arc::new(Current(ArcSwap::from_pointee(issue(&ca, &spec)?)));
    let mut config = rustls::ServerConfig::builder_with_provider(mesh_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(current.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];
    info!(%bound, dns = ?spec.dns_names, ips = ?spec.ips, "gRPC over TLS");
    tokio::spawn(renew(ca, spec, current, metrics.clone(), drain.clone()));
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept(
        listener,
        TlsAcceptor::from(Arc::new(config)),
        tx,
        metrics,
        drain,
    ));
    Ok(TlsIncoming {
        addr: bound,
        connections: ReceiverStream::new(rx),
    })
}

async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<std::io::Result<TlsConn>>,
    metrics: ServingMetrics,
    drain: Drain,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = drain.signaled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!("TLS gRPC accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, tx, metrics) = (acceptor.clone(), tx.clone(), metrics.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send(Ok(TlsConn(tls))).await;
                }
                Ok(Err(e)) => {
                    metrics.handshake_failures.inc();
                    debug!(%peer, "TLS handshake failed: {e}");
                }
                Err(_) => {
                    metrics.handshake_failures.inc();
                    debug!(%peer, "TLS handshake timed out");
                }
            }
        });
    }
}

/// Reissues the certificate at half its lifetime, measured from its issue.
async fn renew(
    ca: Arc<CertificateAuthority>,
    spec: ServingCert,
    current: Arc<Current>,
    metrics: ServingMetrics,
    drain: Drain,
) {
    let mut wait = spec.lifetime / 2;
    loop {
        tokio::select! {
            _ = drain.signaled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match issue(&ca, &spec) {
            Ok(next) => {
                current.0.store(Arc::new(next));
                metrics.renewals.inc();
                info!(at = ?SystemTime::now(), "serving certificate renewed");
                wait = spec.lifetime / 2;
            }
            Err(e) => {
                warn!("serving certificate renewal failed, keeping the current one: {e}");
                wait = RENEW_RETRY.min(spec.lifetime / 2);
            }
        }
    }
}
