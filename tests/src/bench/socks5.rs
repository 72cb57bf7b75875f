//! How the benchmark reaches the mesh: SOCKS5 (mesh_core's client) over a TCP connection
//! from the client workload's IP, with source ports chosen here rather than by the kernel.
//!
//! The ztunnel identifies the source workload by the source IP of the connection, so the
//! socket is bound to the workload's address before connecting. The same port walking
//! serves the direct route, so both routes pay the same cost to open a connection.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};

use mesh_core::socks5::{self, ConnectError};
use tokio::net::{TcpSocket, TcpStream};

/// Opens a TCP connection from `src` to `dst` through the SOCKS5 proxy at `proxy`, the
/// source port from [`bound_connect`]; on success the stream carries bytes to and from
/// `dst`. TCP_NODELAY is set, as request/response clients do.
pub async fn connect(
    src: IpAddr,
    proxy: SocketAddr,
    dst: SocketAddr,
) -> Result<TcpStream, ConnectError> {
    let mut stream = bound_connect(src, proxy)
        .await
        .map_err(|source| ConnectError::Dial { src, proxy, source })?;
    socks5::client_handshake(&mut stream, dst).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn connect_walks_source_ports_and_carries_payload() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let dst: SocketAddr = "127.0.2.10:8080".parse().unwrap();
        let server = tokio::spawn(async move {
            let (mut tcp, peer) = listener.accept().await.unwrap();
            let target = socks5::handshake(&mut tcp).await.unwrap();
            let bound = tcp.local_addr().unwrap();
            socks5::reply(&mut tcp, socks5::Reply::Succeeded, bound)
                .await
                .unwrap();
            let mut ping = [0u8; 4];
            tcp.read_exact(&mut ping).await.unwrap();
            tcp.write_all(&ping).await.unwrap();
            (target, peer)
        });
        let src: IpAddr = "127.0.0.2".parse().unwrap();
        let mut stream = connect(src, proxy, dst).await.unwrap();
        assert!(stream.nodelay().unwrap());
        stream.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        stream.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
        let (target, peer) = server.await.unwrap();
        assert_eq!(target, socks5::Target::Addr(dst));
        assert_eq!(peer.ip(), src);
        assert!(SOURCE_PORTS.contains(&peer.port()));
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
}
