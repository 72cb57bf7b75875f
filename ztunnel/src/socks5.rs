//! SOCKS5 (RFC 1928) server side, as spoken on the ztunnel's port 15080 by clients that are
//! not captured.
//!
//! Owns the wire protocol only: the method negotiation (NO AUTHENTICATION only), parsing a
//! CONNECT request into a [`Target`], and encoding the reply. It must not resolve names,
//! connect upstream or apply policy (the caller does, then calls [`reply`]), and it must not
//! read a byte past the request: a client's payload may follow in the same segment and
//! belongs to the caller, so every read is an exact-length read on the bare stream.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bound on the whole handshake, so a silent or trickling client cannot hold a task.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const VERSION: u8 = 0x05;
const METHOD_NO_AUTH: u8 = 0x00;
const METHOD_NONE_ACCEPTABLE: u8 = 0xFF;
const CMD_CONNECT: u8 = 0x01;
const ATYP_IPV4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_IPV6: u8 = 0x04;
const REP_COMMAND_NOT_SUPPORTED: u8 = 0x07;
const REP_ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;

/// Where the client asked to be connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Addr(SocketAddr),
    /// A domain name, kept as sent: the caller resolves it against service hostnames.
    Host {
        host: String,
        port: u16,
    },
}

impl Target {
    pub fn port(&self) -> u16 {
        match self {
            Target::Addr(addr) => addr.port(),
            Target::Host { port, .. } => *port,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Addr(addr) => addr.fmt(f),
            Target::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// The outcome the caller reports once it has tried to reach the [`Target`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Succeeded,
    GeneralFailure,
    NotAllowed,
    NetworkUnreachable,
    HostUnreachable,
    ConnectionRefused,
    TtlExpired,
}

impl Reply {
    /// The REP field of RFC 1928 section 6.
    pub const fn code(self) -> u8 {
        match self {
            Reply::Succeeded => 0x00,
            Reply::GeneralFailure => 0x01,
            Reply::NotAllowed => 0x02,
            Reply::NetworkUnreachable => 0x03,
            Reply::HostUnreachable => 0x04,
            Reply::ConnectionRefused => 0x05,
            Reply::TtlExpired => 0x06,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Socks5Error {
    #[error("socks5 {stage}: unsupported version {found:#04x}")]
    BadVersion { stage: &'static str, found: u8 },
    #[error("socks5 greeting: no acceptable authentication method among {offered:02x?}")]
    NoAcceptableMethod { offered: Vec<u8> },
    #[error("socks5 request: unsupported command {cmd:#04x}")]
    UnsupportedCommand { cmd: u8 },
    #[error("socks5 request: unsupported address type {atyp:#04x}")]
    UnsupportedAddressType { atyp: u8 },
    #[error("socks5 request: bad domain name ({len} bytes): {problem}")]
    BadDomain { len: usize, problem: &'static str },
    #[error("socks5 handshake not completed within {after:?}")]
    TimedOut { after: Duration },
    #[error("socks5 {stage}: {source}")]
    Io {
        stage: &'static str,
        #[source]
        source: io::Error,
    },
}

impl Socks5Error {
    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Socks5Error::BadVersion { .. } => "bad_version",
            Socks5Error::NoAcceptableMethod { .. } => "no_acceptable_method",
            Socks5Error::UnsupportedCommand { .. } => "unsupported_command",
            Socks5Error::UnsupportedAddressType { .. } => "unsupported_address_type",
            Socks5Error::BadDomain { .. } => "bad_domain",
            Socks5Error::TimedOut { .. } => "timed_out",
            Socks5Error::Io { .. } => "io",
        }
    }
}

fn io_err(stage: &'static str) -> impl FnOnce(io::Error) -> Socks5Error {
    move |source| Socks5Error::Io { stage, source }
}

/// [`handshake_with_timeout`] bounded by [`HANDSHAKE_TIMEOUT`].
pub async fn handshake<S>(stream: &mut S) -> Result<Target, Socks5Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    handshake_with_timeout(stream, HANDSHAKE_TIMEOUT).await
}

/// Negotiates the method and reads one CONNECT request, leaving the stream positioned just
/// after it. On success the caller must send exactly one [`reply`].
///
/// Protocol errors the client can be told about (no acceptable method, unsupported command
/// or address type, bad domain) have already been answered on error; on any error the
/// caller only logs, counts and closes.
pub async fn handshake_with_timeout<S>(
    stream: &mut S,
    limit: Duration,
) -> Result<Target, Socks5Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let negotiate = async {
        negotiate_method(stream).await?;
        read_request(stream).await
    };
    tokio::time::timeout(limit, negotiate)
        .await
        .map_err(|_| Socks5Error::TimedOut { after: limit })?
}

/// Sends the reply to a CONNECT request; `bound` is the address the proxy connected from.
pub async fn reply<S: AsyncWrite + Unpin>(
    stream: &mut S,
    outcome: Reply,
    bound: SocketAddr,
) -> io::Result<()> {
    write_flush(stream, &encode_reply(outcome.code(), bound)).await
}

async fn negotiate_method<S>(stream: &mut S) -> Result<(), Socks5Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut head = [0u8; 2];
    stream
        .read_exact(&mut head)
        .await
        .map_err(io_err("read greeting"))?;
    let [version, count] = head;
    if version != VERSION {
        return Err(Socks5Error::BadVersion {
            stage: "greeting",
            found: version,
        });
    }
    let mut offered = vec![0u8; usize::from(count)];
    stream
        .read_exact(&mut offered)
        .await
        .map_err(io_err("read greeting methods"))?;
    if !offered.contains(&METHOD_NO_AUTH) {
        send_refusal(stream, &[VERSION, METHOD_NONE_ACCEPTABLE]).await;
        return Err(Socks5Error::NoAcceptableMethod { offered });
    }
    write_flush(stream, &[VERSION, METHOD_NO_AUTH])
        .await
        .map_err(io_err("write method selection"))
}

async fn read_request<S>(stream: &mut S) -> Result<Target, Socks5Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut head = [0u8; 4];
    stream
        .read_exact(&mut head)
        .await
        .map_err(io_err("read request"))?;
    // The reserved byte should be zero; clients that set it are tolerated.
    let [version, cmd, _reserved, atyp] = head;
    if version != VERSION {
        return Err(Socks5Error::BadVersion {
            stage: "request",
            found: version,
        });
    }
    if cmd != CMD_CONNECT {
        send_refusal(stream, &refusal(REP_COMMAND_NOT_SUPPORTED)).await;
        return Err(Socks5Error::UnsupportedCommand { cmd });
    }
    match read_target(stream, atyp).await {
        Err(err @ Socks5Error::UnsupportedAddressType { .. }) => {
            send_refusal(stream, &refusal(REP_ADDRESS_TYPE_NOT_SUPPORTED)).await;
            Err(err)
        }
        Err(err @ Socks5Error::BadDomain { .. }) => {
            send_refusal(stream, &refusal(Reply::GeneralFailure.code())).await;
            Err(err)
        }
        other => other,
    }
}

async fn read_target<S>(stream: &mut S, atyp: u8) -> Result<Target, Socks5Error>
where
    S: AsyncRead + Unpin,
{
    let addr = match atyp {
        ATYP_IPV4 => {
            let mut octets = [0u8; 4];
            read_addr(stream, &mut octets).await?;
            let port = read_port(stream).await?;
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(octets), port))
        }
        ATYP_IPV6 => {
            let mut octets = [0u8; 16];
            read_addr(stream, &mut octets).await?;
            let port = read_port(stream).await?;
            SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(octets), port, 0, 0))
        }
        ATYP_DOMAIN => return read_domain(stream).await,
        atyp => return Err(Socks5Error::UnsupportedAddressType { atyp }),
    };
    Ok(Target::Addr(addr))
}

async fn read_domain<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Target, Socks5Error> {
    let len = usize::from(stream.read_u8().await.map_err(io_err("read address"))?);
    let mut name = vec![0u8; len];
    read_addr(stream, &mut name).await?;
    let port = read_port(stream).await?;
    if name.is_empty() {
        return Err(Socks5Error::BadDomain {
            len,
            problem: "empty",
        });
    }
    let host = String::from_utf8(name).map_err(|_| Socks5Error::BadDomain {
        len,
        problem: "not valid UTF-8",
    })?;
    Ok(Target::Host { host, port })
}

async fn read_addr<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
) -> Result<(), Socks5Error> {
    stream
        .read_exact(buf)
        .await
        .map(drop)
        .map_err(io_err("read address"))
}

async fn read_port<S: AsyncRead + Unpin>(stream: &mut S) -> Result<u16, Socks5Error> {
    // Network byte order, as tokio's read_u16 reads.
    stream.read_u16().await.map_err(io_err("read port"))
}

/// A reply for a request refused before any connection was tried: no bound address.
fn refusal(code: u8) -> Vec<u8> {
    encode_reply(code, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
}

fn encode_reply(code: u8, bound: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(22);
    out.extend_from_slice(&[VERSION, code, 0x00]);
    match bound {
        SocketAddr::V4(v4) => {
            out.push(ATYP_IPV4);
            out.extend_from_slice(&v4.ip().octets());
        }
        SocketAddr::V6(v6) => {
            out.push(ATYP_IPV6);
            out.extend_from_slice(&v6.ip().octets());
        }
    }
    out.extend_from_slice(&bound.port().to_be_bytes());
    out
}

/// Best effort: the handshake is failing anyway, and the protocol error is what matters.
async fn send_refusal<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) {
    if let Err(error) = write_flush(stream, bytes).await {
        tracing::debug!(%error, "socks5: could not send refusal");
    }
}

async fn write_flush<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests;
