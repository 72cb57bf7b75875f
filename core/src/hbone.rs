//! HBONE: TCP streams carried as HTTP/2 `CONNECT` streams over mutual TLS.
//!
//! Owns the wire format (authority, `forwarded`, `traceparent`, status codes), the client
//! connection pool, the server loop and the byte splicing between a TCP socket and a
//! stream. It does not decide who may connect where: the server hands every request with
//! its verified peer identity to the proxy's handler, and the client is told which
//! identity the destination must present.

mod client;
mod io;
mod metrics;
mod server;
mod splice;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub use client::{ConnectRequest, Pool, PoolKey};
pub use io::StreamIo;
pub use metrics::HboneMetrics;
pub use server::{serve, Handler, InboundRequest, TlsForLocalAddr};
pub use splice::{splice, SpliceError, Transferred};

/// The HBONE port, on ztunnels and waypoints.
pub const PORT: u16 = 15008;

/// Tunables shared by client and server. Defaults are the design's.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    /// A connection takes no new stream after this many.
    pub max_streams_per_conn: u32,
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// A pooled connection with no stream is closed after this long.
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Server: streams a peer may have open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Server: largest request header block accepted.
    pub max_header_list_size: u32,
    /// Server: time a peer has to finish TLS and the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// Mark put on outgoing sockets (SO_MARK) so capture rules can skip them.
    pub socket_mark: Option<u32>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_streams_per_conn: 100,
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            max_frame_size: 256 << 10,
            idle_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            max_concurrent_streams: 1000,
            max_header_list_size: 16 << 10,
            handshake_timeout: Duration::from_secs(10),
            socket_mark: None,
        }
    }
}

/// A TCP connection to `addr` with TCP_NODELAY, its socket carrying `mark` (SO_MARK) when
/// given so capture rules can leave the proxy's own connections alone. Shared by the HBONE
/// pool and the proxies' direct dials; callers bound the wait.
pub async fn connect_marked(
    addr: SocketAddr,
    mark: Option<u32>,
) -> std::io::Result<tokio::net::TcpStream> {
    connect_marked_from(addr, mark, None).await
}

/// As [`connect_marked`], and when `transparent_src` is given the socket is bound to that
/// address (any port) with IP_TRANSPARENT, so the destination sees the original client's
/// address rather than the proxy's: a node proxy delivering captured traffic does this, as
/// Istio's does. Needs CAP_NET_ADMIN and routing that brings the replies back.
pub async fn connect_marked_from(
    addr: SocketAddr,
    mark: Option<u32>,
    transparent_src: Option<std::net::IpAddr>,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(mark) = mark {
        socket2::SockRef::from(&socket).set_mark(mark)?;
    }
    if let Some(src) = transparent_src {
        let sock = socket2::SockRef::from(&socket);
        match src {
            std::net::IpAddr::V4(_) => sock.set_ip_transparent_v4(true)?,
            std::net::IpAddr::V6(_) => sock.set_ip_transparent_v6(true)?,
        }
        socket.bind(SocketAddr::new(src, 0))?;
    }
    let tcp = socket.connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Bytes read from a TLS connection's socket per syscall, at most.
const TLS_READ_BUFFER: usize = 64 << 10;

/// The socket under a TLS session, read through a large buffer: rustls asks for a few
/// KiB at a time, which would otherwise be one syscall each on a busy tunnel.
fn read_buffered(tcp: tokio::net::TcpStream) -> tokio::io::BufReader<tokio::net::TcpStream> {
    tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, tcp)
}

/// Why an HBONE connect failed. Each kind is distinct so callers can retry, count and
/// report precisely.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connect to {addr}: refused")]
    Refused { addr: SocketAddr },
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{stage} to {addr} timed out after {after:?}")]
    Timeout {
        addr: SocketAddr,
        stage: &'static str,
        after: Duration,
    },
    #[error("TLS with {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS config: {0}")]
    TlsConfig(#[from] crate::tls::TlsError),
    #[error("HTTP/2 with {addr}: {source}")]
    H2 { addr: SocketAddr, source: h2::Error },
    #[error("stream to {addr} reset: {reason:?}")]
    Reset {
        addr: SocketAddr,
        reason: h2::Reason,
    },
    #[error("{addr} denied the tunnel ({status})")]
    Denied {
        addr: SocketAddr,
        status: http::StatusCode,
    },
    #[error("{addr} cannot reach the destination ({status})")]
    Unavailable {
        addr: SocketAddr,
        status: http::StatusCode,
    },
    #[error("{addr} answered {status}")]
    Status {
        addr: SocketAddr,
        status: http::StatusCode,
    },
    #[error("bad CONNECT request: {0}")]
    Request(#[from] http::Error),
}

impl HboneError {
    /// A short stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            HboneError::Refused { .. } => "refused",
            HboneError::Connect { .. } => "connect_error",
            HboneError::Timeout { .. } => "timeout",
            HboneError::Tls { .. } | HboneError::TlsConfig(_) => "tls_error",
            HboneError::H2 { .. } => "http2_error",
            HboneError::Reset { .. } => "reset",
            HboneError::Denied { .. } => "denied",
            HboneError::Unavailable { .. } => "unavailable",
            HboneError::Status { .. } => "bad_status",
            HboneError::Request(_) => "bad_request",
        }
    }

    /// Whether another endpoint of the same service might succeed.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            HboneError::Refused { .. } | HboneError::Unavailable { .. }
        )
    }
}

/// One end of an HBONE stream: what we send and what we receive.
pub struct H2Stream {
    pub(crate) send: h2::SendStream<Bytes>,
    pub(crate) recv: h2::RecvStream,
    _guard: Option<ActiveGuard>,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream").finish_non_exhaustive()
    }
}

impl H2Stream {
    pub(crate) fn new(
        send: h2::SendStream<Bytes>,
        recv: h2::RecvStream,
        guard: Option<ActiveGuard>,
    ) -> Self {
        H2Stream {
            send,
            recv,
            _guard: guard,
        }
    }
}

/// Counts a stream as active on its pooled connection while it lives.
pub(crate) struct ActiveGuard(Arc<AtomicUsize>);

impl ActiveGuard {
    pub(crate) fn new(counter: Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(counter)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `forwarded: for="<ip:port>"` (RFC 7239; IPv6 in brackets, so quoted).
pub fn forwarded_for(addr: SocketAddr) -> String {
    format!("for=\"{addr}\"")
}

/// A new W3C `traceparent` with random ids, sampled.
pub fn new_traceparent() -> String {
    let trace: u128 = rand::random::<u128>() | 1;
    let span: u64 = rand::random::<u64>() | 1;
    format!("00-{trace:032x}-{span:016x}-01")
}

/// Parses a CONNECT authority: an IP literal and a port (IPv6 in brackets).
pub fn parse_authority(authority: &str) -> Option<SocketAddr> {
    let addr: SocketAddr = authority.parse().ok()?;
    (addr.port() != 0).then_some(addr)
}

#[cfg(test)]
mod tests;
