//! Inbound: HBONE on 15008 (mutual TLS, peer identity, L4 policy, then a connection to
//! the destination workload) and plaintext on 15006 (allowed only under PERMISSIVE).
//!
//! Without capture the HBONE listeners are bound per local workload address; in capture
//! modes one transparent wildcard listener takes them all. Either way the address a
//! connection arrived on names the destination and picks the certificate to present.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::StatusCode;
use mesh_core::hbone::{self, InboundRequest};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::model::{MtlsMode, Protocol, Workload};
use crate::outbound::accept_loop;
use crate::policy::{ConnInfo, Decision};
use crate::proxy::{original_dst, reset, Proxy, Upstream};
use crate::telemetry::{ConnRecord, Direction, Outcome};

impl Proxy {
    /// The local HBONE workload at `ip`, if this node serves one.
    fn local_workload(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        let snap = self.state.load();
        snap.workload_by_ip(ip)
            .filter(|w| w.node == self.cfg.node)
            .cloned()
    }

    /// The hostname of the service the connection was for, for metrics and logs.
    fn service_name(&self, dst: &Workload, port: u16) -> Option<String> {
        let snap = self.state.load();
        snap.service_for_endpoint(&dst.uid, port)
            .map(|s| s.hostname.clone())
    }

    fn decide(&self, dst: &Workload, conn: &ConnInfo<'_>, rec: &mut ConnRecord) -> bool {
        let decision = self.state.load().policies.evaluate(dst, conn);
        match decision {
            Decision::Allow { policy } => {
                rec.decision = Some("allow");
                rec.policy = policy;
                true
            }
            Decision::Deny { policy, reason } => {
                rec.decision = Some("deny");
                rec.policy = policy;
                rec.fail(Outcome::Denied, reason);
                false
            }
        }
    }

    async fn handle_hbone(self: Arc<Self>, req: InboundRequest) {
        let started = Instant::now();
        let authority = req.authority;
        let client = req.forwarded_for().unwrap_or(req.peer_addr);
        let mut rec = ConnRecord::new(Direction::Inbound, client);
        rec.mtls = true;
        rec.src_identity = Some(req.peer.to_string());
        if let Some(w) = self.state.load().workload_by_ip(client.ip()) {
            if w.identity() == req.peer {
                rec.set_source(w);
            }
        }
        rec.dst_addr = Some(req.authority);
        let Some(dst) = self
            .local_workload(req.authority.ip())
            .filter(|w| w.protocol == Protocol::Hbone)
        else {
            req.reject(StatusCode::SERVICE_UNAVAILABLE);
            self.hbone_metrics.rejected(503, "unknown_destination");
            rec.fail(Outcome::Error, format!("unknown destination {authority}"));
            return self.finish(rec, started);
        };
        rec.set_destination(&dst);
        rec.dst_service = self.service_name(&dst, authority.port());
        let conn = ConnInfo {
            src_identity: Some(&req.peer),
            src_ip: client.ip(),
            dst_ip: req.authority.ip(),
            dst_port: req.authority.port(),
        };
        if !self.decide(&dst, &conn, &mut rec) {
            info!(src = %req.peer, dst = %authority, policy = ?rec.policy, "connection denied: {}", rec.reason.as_deref().unwrap_or(""));
            req.reject(StatusCode::UNAUTHORIZED);
            self.hbone_metrics.rejected(401, "policy");
            return self.finish(rec, started);
        }
        let tcp = match self.dial(req.authority, Some(client.ip())).await {
            Ok(t) => t,
            Err(e) => {
                warn!(dst = %authority, "cannot reach the destination workload: {e}");
                req.reject(StatusCode::SERVICE_UNAVAILABLE);
                self.hbone_metrics.rejected(503, "connect_failed");
                rec.fail(Outcome::Error, format!("connect to {authority}: {e}"));
                return self.finish(rec, started);
            }
        };
        match req.accept() {
            Ok(stream) => {
                self.metrics.opened(&mut rec);
                self.relay(tcp, Upstream::Hbone(stream), rec, started).await
            }
            Err(e) => {
                rec.fail(Outcome::Error, format!("answering CONNECT: {e}"));
                self.finish(rec, started)
            }
        }
    }

    async fn handle_plaintext(self: Arc<Self>, tcp: tokio::net::TcpStream, peer: SocketAddr) {
        let started = Instant::now();
        let mut rec = ConnRecord::new(Direction::Inbound, peer);
        let dst_addr = match original_dst(&tcp, self.cfg.capture.is_active()) {
            Ok(a) => a,
            Err(e) => return self.metrics.failure(&format!("original_dst: {e}")),
        };
        rec.dst_addr = Some(dst_addr);
        let Some(dst) = self.local_workload(dst_addr.ip()) else {
            rec.fail(Outcome::Error, format!("unknown destination {dst_addr}"));
            return self.finish(rec, started);
        };
        rec.set_destination(&dst);
        rec.dst_service = self.service_name(&dst, dst_addr.port());
        if dst.protocol == Protocol::Hbone
            && self.state.load().peer_authentication.mode_for(&dst) == MtlsMode::Strict
        {
            rec.decision = Some("deny");
            rec.fail(Outcome::Denied, "STRICT mTLS: plaintext refused");
            reset(tcp);
            return self.finish(rec, started);
        }
        let conn = ConnInfo {
            src_identity: None,
            src_ip: peer.ip(),
            dst_ip: dst_addr.ip(),
            dst_port: dst_addr.port(),
        };
        if !self.decide(&dst, &conn, &mut rec) {
            reset(tcp);
            return self.finish(rec, started);
        }
        match self.dial(dst_addr, Some(peer.ip())).await {
            Ok(up) => {
                self.metrics.opened(&mut rec);
                self.relay(tcp, Upstream::Plain(up), rec, started).await
            }
            Err(e) => {
                rec.fail(Outcome::Error, format!("connect to {dst_addr}: {e}"));
                self.finish(rec, started)
            }
        }
    }
}

/// Accepts plaintext connections to local workloads on 15006.
pub async fn serve_plaintext(proxy: Arc<Proxy>, listener: TcpListener) {
    accept_loop(proxy, listener, "inbound_plaintext", |proxy, tcp, peer| {
        proxy.handle_plaintext(tcp, peer)
    })
    .await
}

/// One HBONE listener per local workload address, kept in step with the config.
#[derive(Default)]
pub struct HboneListeners {
    by_ip: Mutex<HashMap<IpAddr, JoinHandle<()>>>,
}

impl HboneListeners {
    pub fn reconcile(&self, proxy: &Arc<Proxy>, wanted: &BTreeSet<IpAddr>) {
        let mut by_ip = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        by_ip.retain(|ip, task| {
            let keep = wanted.contains(ip);
            if !keep {
                task.abort();
                info!(%ip, "HBONE listener closed");
            }
            keep
        });
        for ip in wanted {
            if by_ip.contains_key(ip) {
                continue;
            }
            let addr = SocketAddr::new(*ip, proxy.cfg.ports.hbone);
            match bind(addr, false) {
                Ok(listener) => {
                    by_ip.insert(*ip, tokio::spawn(serve_hbone(proxy.clone(), listener)));
                    info!(%addr, "HBONE listener bound");
                }
                Err(e) => {
                    proxy.metrics.failure("hbone_bind");
                    warn!(%addr, "cannot bind HBONE listener: {e}");
                }
            }
        }
    }

    pub fn addresses(&self) -> Vec<IpAddr> {
        let by_ip = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        by_ip.keys().copied().collect()
    }
}

/// A listener on `addr`; `transparent` (IP_TRANSPARENT) lets it take connections
/// addressed to any host that capture steers to it, the local address then being the
/// original destination.
pub fn bind(addr: SocketAddr, transparent: bool) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if transparent {
        match addr {
            SocketAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
            SocketAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

pub async fn serve_hbone(proxy: Arc<Proxy>, listener: TcpListener) {
    let tls_proxy = proxy.clone();
    let tls_for: hbone::TlsForLocalAddr = Arc::new(move |local: SocketAddr| {
        let w = tls_proxy.local_workload(local.ip())?;
        Some(tls_proxy.certs.get(&w.identity())?.server.clone())
    });
    let handler_proxy = proxy.clone();
    let handler: hbone::Handler =
        Arc::new(move |req| Box::pin(handler_proxy.clone().handle_hbone(req)));
    hbone::serve(
        listener,
        tls_for,
        handler,
        proxy.cfg.hbone.clone(),
        proxy.hbone_metrics.clone(),
        proxy.drain.clone(),
    )
    .await
}
