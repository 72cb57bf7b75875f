//! The traffic `mesh-bench l4` generates, along either route: bulk transfers, request/
//! response round trips, and connections held open. Each checks every byte it gets back
//! and fails on the first mismatch.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::bench::socks5;
use crate::bench::stats::{gbit_per_s, Latencies};

const WRITE_CHUNK: usize = 128 << 10;
const MESSAGE: usize = 1024;
/// How long a sender waits for the sink's count once it has stopped writing.
const SINK_REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How many connections open at once while filling up to `--hold-conns`.
const OPEN_CONCURRENCY: usize = 32;

/// How a client reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Direct,
    /// SOCKS5 into the first of two plain relays: the topology's floor (`bench::relay`).
    Relays,
    Mesh,
}

impl Route {
    pub(super) fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Relays => "2 relays",
            Route::Mesh => "mesh",
        }
    }
}

/// Opens client connections from the client workload's IP along one route.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dialer {
    pub(crate) route: Route,
    pub(crate) src: IpAddr,
    pub(crate) socks: SocketAddr,
    /// (server, relay entry leading to it) for the servers the benchmark uses.
    pub(crate) relay_entries: [(SocketAddr, SocketAddr); 2],
}

impl Dialer {
    pub(crate) async fn dial(self, dst: SocketAddr) -> anyhow::Result<TcpStream> {
        match self.route {
            Route::Direct => socks5::bound_connect(self.src, dst)
                .await
                .with_context(|| format!("connect from {} to {dst}", self.src)),
            Route::Relays => {
                let entry = self
                    .relay_entries
                    .iter()
                    .find_map(|(server, entry)| (*server == dst).then_some(*entry))
                    .with_context(|| format!("no relay leads to {dst}"))?;
                socks5::connect(self.src, entry, dst)
                    .await
                    .with_context(|| format!("SOCKS5 from {} via relay {entry}", self.src))
            }
            Route::Mesh => socks5::connect(self.src, self.socks, dst)
                .await
                .with_context(|| format!("SOCKS5 from {} via {} to {dst}", self.src, self.socks)),
        }
    }
}

/// Gbit/s over `streams` connections, each writing for `duration`. Time runs until each
/// sink has confirmed, after the half-close, that it received every byte sent.
pub(super) async fn throughput(
    dialer: Dialer,
    dst: SocketAddr,
    streams: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let mut conns = Vec::with_capacity(streams);
    for _ in 0..streams {
        conns.push(dialer.dial(dst).await?);
    }
    let start = Instant::now();
    let deadline = start + duration;
    // Blocking writes on threads of their own: bulk transfer gains nothing from the
    // async runtime, and a sender sharing a worker with other tasks measures the sharing.
    let mut senders = JoinSet::new();
    for conn in conns {
        let conn = blocking(conn)?;
        senders.spawn_blocking(move || send_until(conn, deadline));
    }
    let mut total = 0;
    while let Some(sent) = senders.join_next().await {
        total += sent.context("sender thread")??;
    }
    Ok(gbit_per_s(total, start.elapsed()))
}

fn blocking(conn: TcpStream) -> anyhow::Result<std::net::TcpStream> {
    let conn = conn.into_std()?;
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(SINK_REPLY_TIMEOUT))?;
    Ok(conn)
}

/// Writes until `deadline`, half-closes, and checks the sink's byte count.
fn send_until(mut conn: std::net::TcpStream, deadline: Instant) -> anyhow::Result<u64> {
    let chunk = vec![0x5a_u8; WRITE_CHUNK];
    let mut sent = 0u64;
    while Instant::now() < deadline {
        conn.write_all(&chunk).context("write")?;
        sent += chunk.len() as u64;
    }
    conn.shutdown(std::net::Shutdown::Write)
        .context("half-close")?;
    let mut count = [0u8; 8];
    conn.read_exact(&mut count)
        .context("reading the sink's byte count after half-close")?;
    let received = u64::from_be_bytes(count);
    ensure!(
        received == sent,
        "sent {sent} bytes, the sink received {received}"
    );
    Ok(sent)
}

/// A request numbered `i`, so a reply to the wrong request does not pass.
fn stamp(message: &mut [u8; MESSAGE], i: usize) {
    message[..8].copy_from_slice(&(i as u64).to_be_bytes());
}

fn request() -> [u8; MESSAGE] {
    std::array::from_fn(|i| (i % 251) as u8)
}

async fn round_trip(
    conn: &mut TcpStream,
    req: &[u8; MESSAGE],
    resp: &mut [u8; MESSAGE],
) -> anyhow::Result<()> {
    conn.write_all(req).await.context("write request")?;
    conn.read_exact(resp).await.context("read response")?;
    ensure!(resp == req, "the echoed response differs from the request");
    Ok(())
}

/// 1 KiB round trips on one kept-open connection, after a warm-up.
pub(crate) async fn request_response(
    dialer: Dialer,
    dst: SocketAddr,
    samples: usize,
) -> anyhow::Result<Latencies> {
    let warmup = (samples / 10).clamp(10, 1000);
    let mut conn = dialer.dial(dst).await?;
    let (mut req, mut resp) = (request(), [0u8; MESSAGE]);
    let mut latencies = Latencies::with_capacity(samples);
    for i in 0..warmup + samples {
        stamp(&mut req, i);
        let start = Instant::now();
        round_trip(&mut conn, &req, &mut resp).await?;
        if i >= warmup {
            latencies.push(start.elapsed());
        }
    }
    Ok(latencies)
}

/// Connect, one 1 KiB round trip, close, after a warm-up.
pub(super) async fn connect_request_response(
    dialer: Dialer,
    dst: SocketAddr,
    samples: usize,
) -> anyhow::Result<Latencies> {
    let warmup = (samples / 20).clamp(5, 100);
    let (mut req, mut resp) = (request(), [0u8; MESSAGE]);
    let mut latencies = Latencies::with_capacity(samples);
    for i in 0..warmup + samples {
        stamp(&mut req, i);
        let start = Instant::now();
        let mut conn = dialer.dial(dst).await?;
        round_trip(&mut conn, &req, &mut resp).await?;
        drop(conn);
        if i >= warmup {
            latencies.push(start.elapsed());
        }
    }
    Ok(latencies)
}

/// `n` connections, opened a few at a time, each having carried a few bytes each way.
pub(super) async fn open_held(
    dialer: Dialer,
    dst: SocketAddr,
    n: usize,
) -> anyhow::Result<Vec<TcpStream>> {
    let mut conns = Vec::with_capacity(n);
    let mut opening = JoinSet::new();
    for i in 0..n {
        if opening.len() >= OPEN_CONCURRENCY {
            conns.push(next_opened(&mut opening).await?);
        }
        opening.spawn(async move {
            let mut conn = dialer.dial(dst).await?;
            ping(&mut conn, i).await?;
            anyhow::Ok(conn)
        });
    }
    while !opening.is_empty() {
        conns.push(next_opened(&mut opening).await?);
    }
    Ok(conns)
}

async fn next_opened(
    opening: &mut JoinSet<anyhow::Result<TcpStream>>,
) -> anyhow::Result<TcpStream> {
    let joined = opening.join_next().await.context("no connection pending")?;
    joined.context("opening task")?
}

pub(super) async fn ping_all(conns: &mut [TcpStream]) -> anyhow::Result<()> {
    for (i, conn) in conns.iter_mut().enumerate() {
        ping(conn, i)
            .await
            .with_context(|| format!("connection {i}"))?;
    }
    Ok(())
}

/// A few bytes there and back.
async fn ping(conn: &mut TcpStream, i: usize) -> anyhow::Result<()> {
    let msg = format!("conn {i:08}\n");
    conn.write_all(msg.as_bytes()).await.context("write")?;
    let mut back = vec![0u8; msg.len()];
    conn.read_exact(&mut back).await.context("read echo")?;
    ensure!(back == msg.as_bytes(), "echo differs from what was sent");
    Ok(())
}
