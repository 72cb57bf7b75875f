//! The HBONE client: a pool of mutual-TLS HTTP/2 connections keyed by
//! (source identity, destination identity, destination socket).
//!
//! A connection takes at most `max_streams_per_conn` streams in its life, then the pool
//! opens another; it is closed when it has no stream left and is retired or idle. Only one
//! dial per key runs at a time, so a burst of requests shares the connections it opens.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, Instrument};

use super::{
    forwarded_for, new_traceparent, ActiveGuard, Config, H2Stream, HboneError, HboneMetrics,
};
use crate::identity::Identity;
use crate::tls::WorkloadCert;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: Identity,
    pub dst: Identity,
    pub addr: SocketAddr,
}

/// What goes in the CONNECT request.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// `<pod-ip>:<target-port>`, or the service VIP:port when sent to a waypoint.
    pub authority: SocketAddr,
    /// The original client, sent as `forwarded: for=`.
    pub client: SocketAddr,
    /// Propagated if present, else a new one is made.
    pub traceparent: Option<String>,
    pub baggage: Option<String>,
}

struct Conn {
    id: u64,
    send: h2::client::SendRequest<Bytes>,
    opened: AtomicU32,
    active: Arc<AtomicUsize>,
    closed: AtomicBool,
    idle_since: Mutex<Instant>,
}

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: Config,
    conns: Mutex<HashMap<PoolKey, Vec<Arc<Conn>>>>,
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    next_id: AtomicU64,
    metrics: HboneMetrics,
}

impl Pool {
    pub fn new(cfg: Config, metrics: HboneMetrics) -> Self {
        Pool {
            inner: Arc::new(Inner {
                cfg,
                conns: Mutex::new(HashMap::new()),
                dialing: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                metrics,
            }),
        }
    }

    /// Open TLS connections in the pool, all keys together.
    pub fn connection_count(&self) -> usize {
        let conns = self.inner.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.values().map(Vec::len).sum()
    }

    /// Opens a stream to `key.addr`, reusing a pooled connection when one has room.
    /// `cert` is the source workload's certificate, used only if a connection is dialed.
    pub async fn connect(
        &self,
        key: &PoolKey,
        cert: &WorkloadCert,
        req: &ConnectRequest,
    ) -> Result<H2Stream, HboneError> {
        let timeout = self.inner.cfg.connect_timeout;
        tokio::time::timeout(timeout, self.connect_inner(key, cert, req))
            .await
            .map_err(|_| HboneError::Timeout {
                addr: key.addr,
                stage: "HBONE connect",
                after: timeout,
            })?
    }

    async fn connect_inner(
        &self,
        key: &PoolKey,
        cert: &WorkloadCert,
        req: &ConnectRequest,
    ) -> Result<H2Stream, HboneError> {
        // A connection can die between pick and use; a bounded number of retries
        // covers that without looping on a peer that keeps failing.
        for _ in 0..3 {
            let conn = match self.inner.pick(key) {
                Some(c) => c,
                None => match self.dial_once(key, cert).await? {
                    Some(c) => c,
                    None => continue,
                },
            };
            match open_stream(&conn, key.addr, req).await {
                Err(e @ HboneError::H2 { .. }) => {
                    debug!(conn = conn.id, "pooled connection failed: {e}");
                    conn.closed.store(true, Ordering::Release);
                    self.inner.remove(key, conn.id);
                }
                other => return other,
            }
        }
        Err(HboneError::Timeout {
            addr: key.addr,
            stage: "HBONE connect (connections kept failing)",
            after: self.inner.cfg.connect_timeout,
        })
    }

    /// Dials a connection unless another task did while we waited for the dial lock.
    /// Returns a connection with a stream reserved, or None to try picking again.
    async fn dial_once(
        &self,
        key: &PoolKey,
        cert: &WorkloadCert,
    ) -> Result<Option<Arc<Conn>>, HboneError> {
        let lock = {
            let mut dialing = self.inner.dialing.lock().unwrap_or_else(|e| e.into_inner());
            dialing.entry(key.clone()).or_default().clone()
        };
        let _held = lock.lock().await;
        if let Some(c) = self.inner.pick(key) {
            return Ok(Some(c));
        }
        let conn = self.dial(key, cert).await?;
        let reserved = conn.try_reserve(self.inner.cfg.max_streams_per_conn);
        let mut conns = self.inner.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.entry(key.clone()).or_default().push(conn.clone());
        Ok(reserved.then_some(conn))
    }

    async fn dial(&self, key: &PoolKey, cert: &WorkloadCert) -> Result<Arc<Conn>, HboneError> {
        let cfg = &self.inner.cfg;
        let addr = key.addr;
        let tcp = tcp_connect(addr, cfg).await?;
        let tls_cfg = cert.client_config(&key.dst)?;
        let handshake = TlsConnector::from(tls_cfg).connect(
            ServerName::IpAddress(addr.ip().into()),
            super::read_buffered(tcp),
        );
        let tls = tokio::time::timeout(cfg.handshake_timeout, handshake)
            .await
            .map_err(|_| HboneError::Timeout {
                addr,
                stage: "TLS handshake",
                after: cfg.handshake_timeout,
            })?
            .map_err(|source| {
                self.inner.metrics.tls_failure("client");
                HboneError::Tls { addr, source }
            })?;
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(cfg.stream_window)
            .initial_connection_window_size(cfg.connection_window)
            .max_frame_size(cfg.max_frame_size)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| HboneError::H2 { addr, source })?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            send,
            opened: AtomicU32::new(0),
            active: Arc::new(AtomicUsize::new(0)),
            closed: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
        });
        self.inner.metrics.connection_opened();
        debug!(conn = id, %addr, src = %key.src, dst = %key.dst, "HBONE connection opened");
        self.spawn_driver(key.clone(), conn.clone(), connection);
        Ok(conn)
    }

    /// Drives the HTTP/2 connection, pings it, and retires it when idle or used up.
    fn spawn_driver<T>(
        &self,
        key: PoolKey,
        conn: Arc<Conn>,
        mut connection: h2::client::Connection<T, Bytes>,
    ) where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let inner = self.inner.clone();
        let mut ping = connection.ping_pong();
        let span = tracing::debug_span!("hbone_conn", id = conn.id, addr = %key.addr);
        let weak = Arc::downgrade(&conn);
        let (id, cfg) = (conn.id, inner.cfg.clone());
        drop(conn);
        tokio::spawn(
            async move {
                let mut tick = tokio::time::interval(cfg.keepalive_interval.min(cfg.idle_timeout) / 2);
                tick.tick().await;
                let mut last_ping = Instant::now();
                loop {
                    tokio::select! {
                        res = &mut connection => {
                            if let Err(e) = res { debug!("connection ended: {e}"); }
                            break;
                        }
                        _ = tick.tick() => {
                            let Some(conn) = weak.upgrade() else { break };
                            if inner.should_retire(&conn) {
                                inner.remove(&key, id);
                                // Keep polling: the connection closes gracefully once
                                // the last request handle and stream are gone.
                                continue;
                            }
                            if last_ping.elapsed() >= cfg.keepalive_interval {
                                last_ping = Instant::now();
                                if let Some(p) = ping.as_mut() {
                                    let pong = tokio::time::timeout(cfg.keepalive_timeout, p.ping(h2::Ping::opaque()));
                                    tokio::select! {
                                        r = pong => if !matches!(r, Ok(Ok(_))) {
                                            debug!("keepalive ping failed; closing");
                                            break;
                                        },
                                        res = &mut connection => {
                                            if let Err(e) = res { debug!("connection ended: {e}"); }
                                            break;
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                if let Some(conn) = weak.upgrade() {
                    conn.closed.store(true, Ordering::Release);
                }
                inner.remove(&key, id);
                inner.metrics.connection_closed();
            }
            .instrument(span),
        );
    }
}

impl Conn {
    fn try_reserve(&self, max: u32) -> bool {
        self.opened
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| {
                (o < max).then_some(o + 1)
            })
            .is_ok()
    }
}

impl Inner {
    fn pick(&self, key: &PoolKey) -> Option<Arc<Conn>> {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.get(key)?.iter().find_map(|c| {
            (!c.closed.load(Ordering::Acquire) && c.try_reserve(self.cfg.max_streams_per_conn))
                .then(|| c.clone())
        })
    }

    fn remove(&self, key: &PoolKey, id: u64) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = conns.get_mut(key) {
            list.retain(|c| c.id != id);
            if list.is_empty() {
                conns.remove(key);
                drop(conns);
                let mut dialing = self.dialing.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(l) = dialing.get(key) {
                    // Only forget the dial lock when no task holds or waits on it.
                    if Arc::strong_count(l) == 1 {
                        dialing.remove(key);
                    }
                }
            }
        }
    }

    fn should_retire(&self, conn: &Conn) -> bool {
        let mut idle_since = conn.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        if conn.active.load(Ordering::Acquire) > 0 {
            *idle_since = Instant::now();
            return false;
        }
        let used_up = conn.opened.load(Ordering::Acquire) >= self.cfg.max_streams_per_conn;
        used_up || idle_since.elapsed() >= self.cfg.idle_timeout
    }
}

async fn tcp_connect(addr: SocketAddr, cfg: &Config) -> Result<TcpStream, HboneError> {
    tokio::time::timeout(
        cfg.connect_timeout,
        super::connect_marked(addr, cfg.socket_mark),
    )
    .await
    .map_err(|_| HboneError::Timeout {
        addr,
        stage: "TCP connect",
        after: cfg.connect_timeout,
    })?
    .map_err(|source| match source.kind() {
        std::io::ErrorKind::ConnectionRefused => HboneError::Refused { addr },
        _ => HboneError::Connect { addr, source },
    })
}

async fn open_stream(
    conn: &Arc<Conn>,
    addr: SocketAddr,
    req: &ConnectRequest,
) -> Result<H2Stream, HboneError> {
    let guard = ActiveGuard::new(conn.active.clone());
    let h2_err = |source| HboneError::H2 { addr, source };
    let mut send = conn.send.clone().ready().await.map_err(h2_err)?;
    let mut builder = Request::builder()
        .method(Method::CONNECT)
        .uri(req.authority.to_string())
        .header("forwarded", forwarded_for(req.client));
    let traceparent = req.traceparent.clone().unwrap_or_else(new_traceparent);
    builder = builder.header("traceparent", traceparent);
    if let Some(b) = &req.baggage {
        builder = builder.header("baggage", b);
    }
    let (response, stream) = send
        .send_request(builder.body(())?, false)
        .map_err(h2_err)?;
    let response = response.await.map_err(|source| match source.reason() {
        Some(reason) if source.is_remote() => HboneError::Reset { addr, reason },
        _ => HboneError::H2 { addr, source },
    })?;
    match response.status() {
        StatusCode::OK => Ok(H2Stream::new(stream, response.into_body(), Some(guard))),
        status @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
            Err(HboneError::Denied { addr, status })
        }
        status @ (StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY) => {
            Err(HboneError::Unavailable { addr, status })
        }
        status => Err(HboneError::Status { addr, status }),
    }
}

impl Default for ConnectRequest {
    fn default() -> Self {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        ConnectRequest {
            authority: unspecified,
            client: unspecified,
            traceparent: None,
            baggage: None,
        }
    }
}
