//! The state every listener of a ztunnel shares, and the pieces of connection handling
//! common to inbound and outbound: original destination, marked dials, relaying.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use mesh_core::drain::Drain;
use mesh_core::hbone::{self, H2Stream, Pool};
use tokio::net::TcpStream;
use tracing::debug;

use crate::capture::Capture;
use crate::config::Config;
use crate::model::Snapshot;
use crate::telemetry::{AccessLog, ConnRecord, Direction, Metrics, Outcome};
use mesh_core::certs::CertManager;

pub struct Proxy {
    pub cfg: Config,
    pub state: ArcSwap<Snapshot>,
    pub certs: CertManager,
    pub pool: Pool,
    pub metrics: Metrics,
    pub hbone_metrics: hbone::HboneMetrics,
    pub log: AccessLog,
    pub drain: Drain,
    pub(crate) round_robin: AtomicUsize,
    /// The capture manager, in capture modes.
    pub capture: Option<Arc<Capture>>,
}

/// The far side of a proxied connection.
pub enum Upstream {
    Hbone(H2Stream),
    Plain(TcpStream),
}

impl Proxy {
    /// Dials `addr` directly, with the socket mark so capture never takes our own traffic.
    /// In capture modes a connection made for `client` leaves from the client's address
    /// (IP_TRANSPARENT), so the destination sees who really connected.
    pub async fn dial(
        &self,
        addr: SocketAddr,
        client: Option<IpAddr>,
    ) -> std::io::Result<TcpStream> {
        let src = client
            .filter(|_| self.cfg.capture.is_active())
            .and_then(|c| transparent_source(c, addr));
        let connect = hbone::connect_marked_from(addr, self.cfg.hbone.socket_mark, src);
        tokio::time::timeout(self.cfg.hbone.connect_timeout, connect)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
    }

    /// Moves bytes until both sides are done (or the drain deadline passes), then records
    /// the connection in metrics and the access log.
    pub async fn relay(
        &self,
        mut tcp: TcpStream,
        upstream: Upstream,
        mut rec: ConnRecord,
        started: Instant,
    ) {
        let drain = self.drain.clone();
        let work = async {
            match upstream {
                Upstream::Hbone(stream) => {
                    let (t, res) = hbone::splice(tcp, stream).await;
                    (
                        t.tcp_to_stream,
                        t.stream_to_tcp,
                        res.err().map(|e| e.to_string()),
                    )
                }
                Upstream::Plain(mut up) => {
                    match tokio::io::copy_bidirectional(&mut tcp, &mut up).await {
                        Ok((a, b)) => (a, b, None),
                        Err(e) => (0, 0, Some(format!("relay: {e}"))),
                    }
                }
            }
        };
        let (sent, received, err) = tokio::select! {
            r = work => r,
            _ = drain.forced() => (0, 0, Some("closed by drain deadline".to_owned())),
        };
        // Records count source->destination as sent; inbound, our TCP side is the
        // destination, so its directions are the other way round.
        let (sent, received) = match rec.direction {
            Direction::Outbound => (sent, received),
            Direction::Inbound => (received, sent),
        };
        rec.bytes_sent = sent;
        rec.bytes_received = received;
        if let Some(e) = err {
            debug!("connection ended with error: {e}");
            rec.fail(Outcome::Error, e);
        }
        self.finish(rec, started);
    }

    /// Records a finished (or refused) connection.
    pub fn finish(&self, mut rec: ConnRecord, started: Instant) {
        rec.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        self.metrics.closed(&rec);
        self.log.emit(rec);
    }
}

/// Closes a client connection we refuse with RST, so the client sees a refusal at once
/// (ECONNRESET), not an empty reply it could take for a valid one.
pub fn reset(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
}

/// The destination the client meant. Capture modes deliver connections to transparent
/// listeners, so it is the accepted socket's local address; otherwise conntrack's
/// (`SO_ORIGINAL_DST`) when the connection was redirected, else the local address.
pub fn original_dst(tcp: &TcpStream, transparent: bool) -> std::io::Result<SocketAddr> {
    let local = tcp.local_addr()?;
    if transparent {
        return Ok(local);
    }
    let sock = socket2::SockRef::from(tcp);
    let orig = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    Ok(orig.ok().and_then(|a| a.as_socket()).unwrap_or(local))
}

/// The address to dial `dst` from on behalf of `client`, if it can be the client's own:
/// an IPv4 unicast address other than the destination's (a pod reaching itself through a
/// service would see its own address as a martian source).
pub fn transparent_source(client: IpAddr, dst: SocketAddr) -> Option<IpAddr> {
    let IpAddr::V4(v4) = client else { return None };
    let unusable = v4.is_loopback()
        || v4.is_unspecified()
        || v4.is_multicast()
        || v4.is_broadcast()
        || client == dst.ip();
    (!unusable).then_some(client)
}

#[cfg(test)]
mod tests {
    use super::transparent_source;
    use std::net::{IpAddr, SocketAddr};

    #[test]
    fn transparent_source_only_for_usable_client_addresses() {
        let dst: SocketAddr = "10.1.0.11:80".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            transparent_source(ip("10.2.0.11"), dst),
            Some(ip("10.2.0.11"))
        );
        for bad in [
            "10.1.0.11",
            "127.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "fd00::1",
        ] {
            assert_eq!(transparent_source(ip(bad), dst), None, "{bad}");
        }
    }
}
