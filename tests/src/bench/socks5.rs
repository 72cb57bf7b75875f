//! SOCKS5 (RFC 1928) client side, as a workload that is not captured reaches the mesh
//! through its node's ztunnel: no authentication, CONNECT to an IP address.
//!
//! The ztunnel identifies the source workload by the source IP of the connection, so the
//! socket is bound to the workload's address before connecting.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const VERSION: u8 = 0x05;
const METHOD_NO_AUTH: u8 = 0x00;
const CMD_CONNECT: u8 = 0x01;
const ATYP_IPV4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_IPV6: u8 = 0x04;
const REP_SUCCEEDED: u8 = 0x00;

#[derive(Debug)]
pub enum Socks5Error {
    /// The TCP connection to the proxy could not be made.
    Connect {
        src: IpAddr,
        proxy: SocketAddr,
        source: io::Error,
    },
    /// The connection broke during the handshake.
    Handshake {
        proxy: SocketAddr,
        stage: &'static str,
        source: io::Error,
    },
    /// The proxy spoke, but not the protocol we expect.
    Protocol { proxy: SocketAddr, detail: String },
    /// The proxy refused the CONNECT with this RFC 1928 reply code (e.g. 0x02 "not allowed
    /// by ruleset" when policy denies, 0x05 "connection refused").
    Rejected {
        proxy: SocketAddr,
        dst: SocketAddr,
        code: u8,
    },
}

impl fmt::Display for Socks5Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Socks5Error::Connect { src, proxy, source } => {
                write!(f, "connect from {src} to SOCKS5 proxy {proxy}: {source}")
            }
            Socks5Error::Handshake {
                proxy,
                stage,
                source,
            } => write!(f, "SOCKS5 {stage} with {proxy}: {source}"),
            Socks5Error::Protocol { proxy, detail } => {
                write!(f, "SOCKS5 proxy {proxy}: {detail}")
            }
            Socks5Error::Rejected { proxy, dst, code } => write!(
                f,
                "SOCKS5 proxy {proxy} rejected CONNECT {dst} with reply {code:#04x} ({})",
                reply_name(*code)
            ),
        }
    }
}

impl std::error::Error for Socks5Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Socks5Error::Connect { source, .. } | Socks5Error::Handshake { source, .. } => {
                Some(source)
            }
            Socks5Error::Protocol { .. } | Socks5Error::Rejected { .. } => None,
        }
    }
}

/// RFC 1928 section 6 names of the reply codes.
pub fn reply_name(code: u8) -> &'static str {
    match code {
        0x00 => "succeeded",
        0x01 => "general SOCKS server failure",
        0x02 => "connection not allowed by ruleset",
        0x03 => "network unreachable",
        0x04 => "host unreachable",
        0x05 => "connection refused",
        0x06 => "TTL expired",
        0x07 => "command not supported",
        0x08 => "address type not supported",
        _ => "unassigned",
    }
}

/// Opens a TCP connection from `src` (port chosen by the kernel) to `dst` through the
/// SOCKS5 proxy at `proxy`; on success the stream carries bytes to and from `dst`.
/// TCP_NODELAY is set, as request/response clients do.
pub async fn connect(
    src: IpAddr,
    proxy: SocketAddr,
    dst: SocketAddr,
) -> Result<TcpStream, Socks5Error> {
    let mut stream = bound_connect(src, proxy)
        .await
        .map_err(|source| Socks5Error::Connect { src, proxy, source })?;
    handshake(&mut stream, proxy, dst).await?;
    Ok(stream)
}

/// A TCP connection from `src` to `dst`, with TCP_NODELAY set.
///
/// The source port is chosen here, not by `bind(src:0)`: with thousands of sockets of
/// `src` in TIME_WAIT, the kernel's search for a free port at bind time takes
/// milliseconds, which would be measured as connection latency. Walking our own port
/// counter with SO_REUSEADDR binds in a microsecond; a port whose 4-tuple is still taken
/// fails at once and the next one is tried.
pub async fn bound_connect(src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let mut last_err = None;
    for _ in 0..MAX_PORT_ATTEMPTS {
        let socket = match src {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        if let Err(e) = socket.bind(SocketAddr::new(src, next_source_port())) {
            last_err = Some(e);
            continue;
        }
        match socket.connect(dst).await {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) if port_taken(&e) => last_err = Some(e),
            Err(e) => return Err(e),
        }
    }
    let last = last_err.map_or_else(String::new, |e| format!(": {e}"));
    Err(io::Error::new(
        io::ErrorKind::AddrNotAvailable,
        format!("no free source port on {src} after {MAX_PORT_ATTEMPTS} tries{last}"),
    ))
}

const SOURCE_PORTS: std::ops::RangeInclusive<u16> = 10_000..=60_999;
const MAX_PORT_ATTEMPTS: usize = 2_000;

/// Ports in turn over [`SOURCE_PORTS`], starting at a per-process offset so concurrent
/// runs rarely collide. A full cycle takes long enough that TIME_WAIT entries of a
/// port's previous use may be recycled (`tcp_tw_reuse`, on for loopback by default).
fn next_source_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(SOURCE_PORTS.end() - SOURCE_PORTS.start()) + 1;
    let start = std::process::id().wrapping_mul(7919) % span;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % span;
    SOURCE_PORTS.start() + n as u16
}

/// Whether connect failed only because this source port cannot be used for `dst` now.
fn port_taken(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
    )
}

/// Runs the method negotiation and the CONNECT on an open connection to the proxy.
pub async fn handshake(
    stream: &mut TcpStream,
    proxy: SocketAddr,
    dst: SocketAddr,
) -> Result<(), Socks5Error> {
    let io_err = |stage| {
        move |source| Socks5Error::Handshake {
            proxy,
            stage,
            source,
        }
    };
    let protocol = |detail: String| Socks5Error::Protocol { proxy, detail };

    stream
        .write_all(&[VERSION, 1, METHOD_NO_AUTH])
        .await
        .map_err(io_err("greeting"))?;
    let mut choice = [0u8; 2];
    stream
        .read_exact(&mut choice)
        .await
        .map_err(io_err("method reply"))?;
    if choice != [VERSION, METHOD_NO_AUTH] {
        return Err(protocol(format!("method reply {choice:02x?}, want 05 00")));
    }

    stream
        .write_all(&connect_request(dst))
        .await
        .map_err(io_err("CONNECT request"))?;
    let mut head = [0u8; 4];
    stream
        .read_exact(&mut head)
        .await
        .map_err(io_err("CONNECT reply"))?;
    if head[0] != VERSION {
        return Err(protocol(format!("CONNECT reply version {:#04x}", head[0])));
    }
    // The bound address follows even in a failure reply; read it so the stream is left
    // exactly at the payload.
    let bound_len = match head[3] {
        ATYP_IPV4 => 4 + 2,
        ATYP_IPV6 => 16 + 2,
        ATYP_DOMAIN => {
            let mut len = [0u8; 1];
            stream
                .read_exact(&mut len)
                .await
                .map_err(io_err("CONNECT reply"))?;
            usize::from(len[0]) + 2
        }
        other => return Err(protocol(format!("CONNECT reply address type {other:#04x}"))),
    };
    let mut bound = [0u8; 257];
    stream
        .read_exact(&mut bound[..bound_len])
        .await
        .map_err(io_err("CONNECT reply"))?;
    if head[1] != REP_SUCCEEDED {
        return Err(Socks5Error::Rejected {
            proxy,
            dst,
            code: head[1],
        });
    }
    Ok(())
}

fn connect_request(dst: SocketAddr) -> Vec<u8> {
    let mut req = vec![VERSION, CMD_CONNECT, 0x00];
    match dst.ip() {
        IpAddr::V4(ip) => {
            req.push(ATYP_IPV4);
            req.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            req.push(ATYP_IPV6);
            req.extend_from_slice(&ip.octets());
        }
    }
    req.extend_from_slice(&dst.port().to_be_bytes());
    req
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A one-shot proxy that checks the client's bytes and answers with `reply`, then
    /// echoes.
    async fn fake_proxy(reply: Vec<u8>) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut greeting = [0u8; 3];
            tcp.read_exact(&mut greeting).await.unwrap();
            tcp.write_all(&[5, 0]).await.unwrap();
            let mut request = [0u8; 10];
            tcp.read_exact(&mut request).await.unwrap();
            tcp.write_all(&reply).await.unwrap();
            let mut seen = greeting.to_vec();
            seen.extend_from_slice(&request);
            let mut rest = [0u8; 4];
            if tcp.read_exact(&mut rest).await.is_ok() {
                tcp.write_all(&rest).await.unwrap();
            }
            seen
        });
        (addr, task)
    }

    #[tokio::test]
    async fn connects_and_carries_payload() {
        let (proxy, task) = fake_proxy(vec![5, 0, 0, 1, 127, 0, 0, 1, 0x12, 0x34]).await;
        let dst: SocketAddr = "127.0.2.10:8080".parse().unwrap();
        let mut stream = connect("127.0.0.1".parse().unwrap(), proxy, dst)
            .await
            .unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        stream.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
        let seen = task.await.unwrap();
        assert_eq!(seen, [5, 1, 0, 5, 1, 0, 1, 127, 0, 2, 10, 0x1f, 0x90]);
    }

    #[tokio::test]
    async fn bound_connect_uses_the_source_ip_and_fresh_ports() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        let src: IpAddr = "127.0.0.2".parse().unwrap();
        let mut ports = std::collections::HashSet::new();
        for _ in 0..50 {
            let stream = bound_connect(src, dst).await.unwrap();
            let (accepted, peer) = listener.accept().await.unwrap();
            assert_eq!(peer, stream.local_addr().unwrap());
            assert_eq!(peer.ip(), src);
            assert!(SOURCE_PORTS.contains(&peer.port()));
            ports.insert(peer.port());
            // Client closes first, leaving its side in TIME_WAIT, as in the benchmark.
            drop(stream);
            drop(accepted);
        }
        assert_eq!(ports.len(), 50);
    }

    #[tokio::test]
    async fn reports_rejection_code() {
        let (proxy, _task) = fake_proxy(vec![5, 2, 0, 1, 0, 0, 0, 0, 0, 0]).await;
        let dst: SocketAddr = "127.0.2.10:8080".parse().unwrap();
        let err = connect("127.0.0.1".parse().unwrap(), proxy, dst)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Socks5Error::Rejected { code: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("not allowed by ruleset"));
    }
}
