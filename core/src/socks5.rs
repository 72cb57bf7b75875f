//! SOCKS5 (RFC 1928), both ends of the wire: the server side the ztunnel speaks on port
//! 15080 to clients that are not captured, and the client side that tools and tests use to
//! reach it.
//!
//! Owns the protocol only: NO AUTHENTICATION, CONNECT, the encoding of requests and
//! replies, and the one table of reply codes. The server must not resolve names, connect
//! upstream or apply policy (its caller does, then calls [`reply`]). Neither side may read a
//! byte past the handshake: payload may follow in the same segment and belongs to the
//! caller, so every read is an exact-length read on the bare stream.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Bound on the whole server handshake, so a silent or trickling client cannot hold a task.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const VERSION: u8 = 0x05;
const METHOD_NO_AUTH: u8 = 0x00;
const METHOD_NONE_ACCEPTABLE: u8 = 0xFF;
const CMD_CONNECT: u8 = 0x01;
const ATYP_IPV4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_IPV6: u8 = 0x04;

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

/// The REP field of a reply (RFC 1928 section 6): what a server reports once it has tried
/// to reach the [`Target`], and what a client reads back. The discriminants are the codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    Succeeded = 0x00,
    GeneralFailure = 0x01,
    NotAllowed = 0x02,
    NetworkUnreachable = 0x03,
    HostUnreachable = 0x04,
    ConnectionRefused = 0x05,
    TtlExpired = 0x06,
    CommandNotSupported = 0x07,
    AddressTypeNotSupported = 0x08,
}

impl Reply {
    /// Every assigned code, in order.
    pub const ALL: [Reply; 9] = [
        Reply::Succeeded,
        Reply::GeneralFailure,
        Reply::NotAllowed,
        Reply::NetworkUnreachable,
        Reply::HostUnreachable,
        Reply::ConnectionRefused,
        Reply::TtlExpired,
        Reply::CommandNotSupported,
        Reply::AddressTypeNotSupported,
    ];

    pub const fn code(self) -> u8 {
        self as u8
    }

    /// `None` for the unassigned codes 0x09 to 0xFF.
    pub fn from_code(code: u8) -> Option<Reply> {
        Reply::ALL.into_iter().find(|reply| reply.code() == code)
    }

    /// RFC 1928's wording for the code.
    pub const fn name(self) -> &'static str {
        match self {
            Reply::Succeeded => "succeeded",
            Reply::GeneralFailure => "general SOCKS server failure",
            Reply::NotAllowed => "connection not allowed by ruleset",
            Reply::NetworkUnreachable => "network unreachable",
            Reply::HostUnreachable => "host unreachable",
            Reply::ConnectionRefused => "connection refused",
            Reply::TtlExpired => "TTL expired",
            Reply::CommandNotSupported => "command not supported",
            Reply::AddressTypeNotSupported => "address type not supported",
        }
    }
}

/// RFC 1928's wording for any REP code a proxy may send, assigned or not.
pub fn reply_name(code: u8) -> &'static str {
    Reply::from_code(code).map_or("unassigned", Reply::name)
}

/// Why the server side of a handshake failed.
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
    write_flush(stream, &encode(outcome.code(), bound)).await
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
        send_refusal(stream, &refusal(Reply::CommandNotSupported)).await;
        return Err(Socks5Error::UnsupportedCommand { cmd });
    }
    match read_target(stream, atyp).await {
        Err(err @ Socks5Error::UnsupportedAddressType { .. }) => {
            send_refusal(stream, &refusal(Reply::AddressTypeNotSupported)).await;
            Err(err)
        }
        Err(err @ Socks5Error::BadDomain { .. }) => {
            send_refusal(stream, &refusal(Reply::GeneralFailure)).await;
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
fn refusal(outcome: Reply) -> Vec<u8> {
    encode(outcome.code(), SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
}

/// A request (`field` is CMD) or a reply (`field` is REP): both are the version, that
/// field, a reserved zero and an address with its port.
fn encode(field: u8, addr: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(22);
    out.extend_from_slice(&[VERSION, field, 0x00]);
    match addr {
        SocketAddr::V4(v4) => {
            out.push(ATYP_IPV4);
            out.extend_from_slice(&v4.ip().octets());
        }
        SocketAddr::V6(v6) => {
            out.push(ATYP_IPV6);
            out.extend_from_slice(&v6.ip().octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
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

/// Why a client did not get its CONNECT through a SOCKS5 proxy.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No TCP connection to the proxy from the source address (bind or connect failed).
    #[error("connect from {src} to socks5 proxy {proxy}: {source}")]
    Dial {
        src: IpAddr,
        proxy: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The proxy went away before its reply was complete.
    #[error("socks5 proxy closed the connection before replying ({stage}: {source})")]
    Closed {
        stage: &'static str,
        #[source]
        source: io::Error,
    },
    /// Any other I/O failure during the handshake.
    #[error("socks5 {stage}: {source}")]
    Io {
        stage: &'static str,
        #[source]
        source: io::Error,
    },
    /// The proxy answered with a byte RFC 1928 does not allow there.
    #[error("socks5 {stage}: unexpected {field} {found:#04x}")]
    Protocol {
        stage: &'static str,
        field: &'static str,
        found: u8,
    },
    /// The proxy answered the CONNECT with a failure REP code.
    #[error("socks5 proxy refused the CONNECT with reply {code:#04x} ({})", reply_name(*code))]
    Refused { code: u8 },
}

/// Whether an I/O error means the peer went away, rather than that something local broke:
/// what the client reports as [`ConnectError::Closed`].
pub fn is_closed(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

fn client_io(stage: &'static str) -> impl FnOnce(io::Error) -> ConnectError {
    move |source| {
        if is_closed(&source) {
            ConnectError::Closed { stage, source }
        } else {
            ConnectError::Io { stage, source }
        }
    }
}

/// Connects from `src` (port chosen by the kernel) to the proxy, then asks it to CONNECT
/// to `dst`; on success the stream carries bytes to and from `dst`.
///
/// The ztunnel tells workloads apart by the source address of the connection, hence the
/// bind to `src` before connecting.
pub async fn connect(
    src: IpAddr,
    proxy: SocketAddr,
    dst: SocketAddr,
) -> Result<TcpStream, ConnectError> {
    let mut stream = dial(src, proxy).await?;
    client_handshake(&mut stream, dst).await?;
    Ok(stream)
}

/// The TCP connection to the proxy from `src`, before any SOCKS5 byte: for callers that
/// want the local address even when the handshake then fails.
pub async fn dial(src: IpAddr, proxy: SocketAddr) -> Result<TcpStream, ConnectError> {
    let dial = async {
        let socket = match src {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(src, 0))?;
        socket.connect(proxy).await
    };
    dial.await
        .map_err(|source| ConnectError::Dial { src, proxy, source })
}

/// Runs the client handshake on a stream already connected to the proxy: offers NO
/// AUTHENTICATION only, asks for a CONNECT to `dst`, and on success leaves the stream just
/// past the reply. No timeout here: callers bound it as they bound the rest of their work.
pub async fn client_handshake<S>(stream: &mut S, dst: SocketAddr) -> Result<(), ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    write_flush(stream, &[VERSION, 1, METHOD_NO_AUTH])
        .await
        .map_err(client_io("write greeting"))?;
    let mut choice = [0u8; 2];
    stream
        .read_exact(&mut choice)
        .await
        .map_err(client_io("read method selection"))?;
    expect("method selection", "version", VERSION, choice[0])?;
    expect("method selection", "method", METHOD_NO_AUTH, choice[1])?;

    write_flush(stream, &encode(CMD_CONNECT, dst))
        .await
        .map_err(client_io("write request"))?;
    let mut head = [0u8; 4];
    stream
        .read_exact(&mut head)
        .await
        .map_err(client_io("read reply"))?;
    let [version, code, _reserved, atyp] = head;
    expect("reply", "version", VERSION, version)?;
    if code != Reply::Succeeded.code() {
        return Err(ConnectError::Refused { code });
    }
    skip_bound_addr(stream, atyp).await
}

fn expect(
    stage: &'static str,
    field: &'static str,
    want: u8,
    found: u8,
) -> Result<(), ConnectError> {
    if found == want {
        return Ok(());
    }
    Err(ConnectError::Protocol {
        stage,
        field,
        found,
    })
}

/// The client has no use for the address the proxy connected from, but must consume it.
async fn skip_bound_addr<S: AsyncRead + Unpin>(
    stream: &mut S,
    atyp: u8,
) -> Result<(), ConnectError> {
    let stage = "read bound address";
    let len = match atyp {
        ATYP_IPV4 => 4,
        ATYP_IPV6 => 16,
        ATYP_DOMAIN => usize::from(stream.read_u8().await.map_err(client_io(stage))?),
        found => {
            return Err(ConnectError::Protocol {
                stage: "reply",
                field: "address type",
                found,
            })
        }
    };
    let mut addr_and_port = [0u8; 255 + 2];
    stream
        .read_exact(&mut addr_and_port[..len + 2])
        .await
        .map(drop)
        .map_err(client_io(stage))
}

#[cfg(test)]
mod tests;
