//! The state every listener of a ztunnel shares, and the pieces of connection handling
//! common to inbound and outbound: original destination, marked dials, relaying.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

use arc_swap::ArcSwap;
use mesh_core::drain::Drain;
use mesh_core::hbone::{self, H2Stream, Pool};
use tokio::net::TcpStream;
use tracing::debug;

use crate::certs::CertManager;
use crate::config::Config;
use crate::model::Snapshot;
use crate::telemetry::{AccessLog, ConnRecord, Direction, Metrics, Outcome};

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
}

/// The far side of a proxied connection.
pub enum Upstream {
    Hbone(H2Stream),
    Plain(TcpStream),
}

impl Proxy {
    /// Dials `addr` directly, with the socket mark so capture never takes our own traffic.
    pub async fn dial(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let connect = hbone::connect_marked(addr, self.cfg.hbone.socket_mark);
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

/// The destination the client meant: from conntrack when the connection was redirected
/// (`SO_ORIGINAL_DST`), else the accepted socket's local address (transparent capture).
pub fn original_dst(tcp: &TcpStream) -> std::io::Result<SocketAddr> {
    let local = tcp.local_addr()?;
    let sock = socket2::SockRef::from(tcp);
    let orig = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    Ok(orig.ok().and_then(|a| a.as_socket()).unwrap_or(local))
}
