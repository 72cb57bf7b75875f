//! The seam between the HTTP engine and the rest of the waypoint: which endpoints a
//! service has, and a byte stream to one of them. The app implements [`Backends`] with
//! the Address resources from xDS and HBONE to the endpoint's node; the engine never
//! knows how bytes reach an endpoint, so its tests can use plain local sockets.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use mesh_core::Identity;
use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream to an endpoint (an HBONE stream in production).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

pub type BoxIo = Box<dyn Io>;

/// One workload that can serve a service port.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Workload uid, stable across config updates (keys pools and outlier state).
    pub uid: String,
    /// The pod's address and the target port the service port maps to on it.
    pub addr: SocketAddr,
    pub labels: BTreeMap<String, String>,
    /// Name of the workload and its namespace, for metrics labels.
    pub workload: String,
    pub namespace: String,
    /// `None` for a workload outside the mesh (reached in plaintext).
    pub identity: Option<Identity>,
}

/// What the app tells the engine about one tunnel's downstream.
#[derive(Clone, Debug)]
pub struct Downstream {
    /// The original client (from the tunnel's `forwarded` header, else the TLS peer).
    pub peer: SocketAddr,
    /// The client's SPIFFE identity from its certificate (the source ztunnel's mTLS).
    pub identity: Option<Identity>,
    /// `<namespace>/<hostname>` of the service the tunnel's authority (VIP:port) names.
    pub service: String,
    /// The service port the client connected to.
    pub port: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {endpoint} ({addr}): {reason}")]
    Failed {
        endpoint: String,
        addr: SocketAddr,
        reason: String,
    },
    /// The endpoint's side refused the stream (HBONE 401/403, TCP reset).
    #[error("connect to {endpoint} ({addr}) refused: {reason}")]
    Refused {
        endpoint: String,
        addr: SocketAddr,
        reason: String,
    },
}

/// Endpoints and connections, implemented by the app over xDS + HBONE.
pub trait Backends: Send + Sync + 'static {
    /// Endpoints of `service` (`<namespace>/<hostname>`) serving service port `port`, with
    /// `Endpoint::addr` carrying the target port; empty when the service is unknown.
    fn endpoints(&self, service: &str, port: u16) -> Vec<Arc<Endpoint>>;

    /// A new byte stream to `endpoint` (cheap: HBONE multiplexes streams on a pool).
    fn connect(&self, endpoint: Arc<Endpoint>) -> BoxFuture<'static, Result<BoxIo, ConnectError>>;
}
