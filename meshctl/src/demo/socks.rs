//! The client side of SOCKS5 (RFC 1928): NO AUTHENTICATION, CONNECT to an IP address.
//!
//! The client socket is bound to the workload's IP before dialing the proxy, because the
//! ztunnel tells workloads apart by source address. Nothing here reads past the reply.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const VERSION: u8 = 0x05;
const NO_AUTH: u8 = 0x00;
const CONNECT: u8 = 0x01;
const ATYP_IPV4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_IPV6: u8 = 0x04;
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// How the proxy answered a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Succeeded,
    /// A failure REP code (RFC 1928 section 6).
    Refused(u8),
    /// The proxy closed the connection before replying.
    Closed,
}

/// Opens a TCP connection to the proxy from `from` (port chosen by the kernel).
pub async fn dial(proxy: SocketAddr, from: IpAddr) -> Result<TcpStream> {
    let socket = match from {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .context("create client socket")?;
    socket
        .bind(SocketAddr::new(from, 0))
        .with_context(|| format!("bind client socket to {from}"))?;
    tokio::time::timeout(DIAL_TIMEOUT, socket.connect(proxy))
        .await
        .with_context(|| format!("connect to SOCKS5 proxy {proxy}: timed out"))?
        .with_context(|| format!("connect to SOCKS5 proxy {proxy}"))
}

/// Negotiates NO AUTHENTICATION and asks the proxy to CONNECT to `target`.
pub async fn connect(stream: &mut TcpStream, target: SocketAddr) -> Result<Reply> {
    match negotiate(stream, target).await {
        Err(e) if e.downcast_ref::<io::Error>().is_some_and(closed) => Ok(Reply::Closed),
        other => other,
    }
}

async fn negotiate(stream: &mut TcpStream, target: SocketAddr) -> Result<Reply> {
    stream
        .write_all(&[VERSION, 1, NO_AUTH])
        .await
        .context("write SOCKS5 greeting")?;
    let mut choice = [0u8; 2];
    stream
        .read_exact(&mut choice)
        .await
        .context("read SOCKS5 method selection")?;
    if choice != [VERSION, NO_AUTH] {
        bail!("SOCKS5 proxy refused NO AUTHENTICATION: answered {choice:02x?}");
    }
    stream
        .write_all(&request(target))
        .await
        .context("write SOCKS5 request")?;
    let mut head = [0u8; 4];
    stream
        .read_exact(&mut head)
        .await
        .context("read SOCKS5 reply")?;
    if head[0] != VERSION {
        bail!("SOCKS5 reply has version {:#04x}", head[0]);
    }
    if head[1] != 0 {
        return Ok(Reply::Refused(head[1]));
    }
    skip_bound_addr(stream, head[3]).await?;
    Ok(Reply::Succeeded)
}

/// Whether an I/O error means the peer went away rather than something local broke.
pub fn closed(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

/// RFC 1928's wording for a REP code.
pub fn meaning(code: u8) -> &'static str {
    match code {
        0x01 => "general SOCKS server failure",
        0x02 => "connection not allowed by ruleset",
        0x03 => "network unreachable",
        0x04 => "host unreachable",
        0x05 => "connection refused",
        0x06 => "TTL expired",
        0x07 => "command not supported",
        0x08 => "address type not supported",
        _ => "unassigned code",
    }
}

fn request(target: SocketAddr) -> Vec<u8> {
    let mut req = vec![VERSION, CONNECT, 0x00];
    match target.ip() {
        IpAddr::V4(ip) => {
            req.push(ATYP_IPV4);
            req.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            req.push(ATYP_IPV6);
            req.extend_from_slice(&ip.octets());
        }
    }
    req.extend_from_slice(&target.port().to_be_bytes());
    req
}

async fn skip_bound_addr(stream: &mut TcpStream, atyp: u8) -> Result<()> {
    let len = match atyp {
        ATYP_IPV4 => 4,
        ATYP_IPV6 => 16,
        ATYP_DOMAIN => usize::from(stream.read_u8().await?),
        other => bail!("SOCKS5 reply has address type {other:#04x}"),
    };
    let mut rest = vec![0u8; len + 2];
    stream
        .read_exact(&mut rest)
        .await
        .context("read SOCKS5 bound address")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A one-shot proxy that checks the request and answers `rep`, then says "hi".
    async fn fake_proxy(rep: u8) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, peer) = listener.accept().await.unwrap();
            assert_eq!(peer.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
            let mut greeting = [0u8; 3];
            s.read_exact(&mut greeting).await.unwrap();
            s.write_all(&[5, 0]).await.unwrap();
            let mut req = [0u8; 10];
            s.read_exact(&mut req).await.unwrap();
            assert_eq!(req, [5, 1, 0, 1, 127, 0, 10, 1, 0, 80]);
            s.write_all(&[5, rep, 0, 1, 127, 0, 0, 11, 0x3a, 0x98])
                .await
                .unwrap();
            s.write_all(b"hi").await.unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn connect_succeeds_and_leaves_the_payload_unread() {
        let proxy = fake_proxy(0).await;
        let mut s = dial(proxy, "127.0.0.1".parse().unwrap()).await.unwrap();
        let reply = connect(&mut s, "127.0.10.1:80".parse().unwrap()).await;
        assert_eq!(reply.unwrap(), Reply::Succeeded);
        let mut hi = [0u8; 2];
        s.read_exact(&mut hi).await.unwrap();
        assert_eq!(&hi, b"hi");
    }

    #[tokio::test]
    async fn connect_reports_a_refusal() {
        let proxy = fake_proxy(2).await;
        let mut s = dial(proxy, "127.0.0.1".parse().unwrap()).await.unwrap();
        let reply = connect(&mut s, "127.0.10.1:80".parse().unwrap()).await;
        assert_eq!(reply.unwrap(), Reply::Refused(2));
    }

    #[tokio::test]
    async fn connect_reports_a_proxy_that_hangs_up() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        tokio::spawn(async move { drop(listener.accept().await) });
        let mut s = dial(proxy, "127.0.0.1".parse().unwrap()).await.unwrap();
        let reply = connect(&mut s, "127.0.10.1:80".parse().unwrap()).await;
        assert_eq!(reply.unwrap(), Reply::Closed);
    }
}
