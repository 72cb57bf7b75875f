//! Outbound: connections from local workloads, taken from the capture listener (15001)
//! or SOCKS5 (15080). Resolves the destination (service VIP or hostname -> endpoint,
//! pod IP -> workload), then tunnels over HBONE to a mesh destination (or to the waypoint
//! the service or workload names, with the VIP or pod address as authority) or passes
//! plaintext through to anything else.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use mesh_core::hbone::{ConnectRequest, HboneError, PoolKey};
use mesh_core::socks5::{self, Reply, Target};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn, Instrument};

use crate::model::{GatewayAddress, Protocol, Service, Snapshot, Workload};
use crate::proxy::{original_dst, reset, Proxy, Upstream};
use crate::telemetry::{ConnRecord, Direction, Outcome};

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("source {ip} is not a mesh workload on this node")]
    UnknownSource { ip: std::net::IpAddr },
    #[error("no service named {host}")]
    UnknownHost { host: String },
    #[error("service {service} has no port {port}")]
    NoPort { service: String, port: u16 },
    #[error("service {service} has no endpoints")]
    NoEndpoints { service: String },
    #[error("every endpoint of {service} refused; last: {last}")]
    AllEndpointsFailed { service: String, last: HboneError },
    #[error("{0}")]
    Hbone(#[from] HboneError),
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Cert(#[from] mesh_core::certs::CertError),
    #[error("capture loop: {addr} is this ztunnel's own listener")]
    Loop { addr: SocketAddr },
    #[error("waypoint of {destination} has no reachable pod")]
    NoWaypoint { destination: String },
}

impl OutboundError {
    fn outcome(&self) -> Outcome {
        match self {
            OutboundError::Hbone(HboneError::Denied { .. }) => Outcome::Denied,
            OutboundError::UnknownSource { .. } => Outcome::Denied,
            _ => Outcome::Error,
        }
    }

    fn socks_reply(&self) -> Reply {
        match self {
            OutboundError::Hbone(HboneError::Denied { .. })
            | OutboundError::UnknownSource { .. } => Reply::NotAllowed,
            OutboundError::UnknownHost { .. }
            | OutboundError::NoEndpoints { .. }
            | OutboundError::NoWaypoint { .. } => Reply::HostUnreachable,
            OutboundError::Hbone(HboneError::Refused { .. })
            | OutboundError::AllEndpointsFailed { .. }
            | OutboundError::Hbone(HboneError::Unavailable { .. }) => Reply::ConnectionRefused,
            OutboundError::Hbone(HboneError::Timeout { .. }) => Reply::TtlExpired,
            _ => Reply::GeneralFailure,
        }
    }
}

impl Proxy {
    /// Resolves `target` for the workload at `src` and opens the upstream connection.
    pub async fn outbound_connect(
        &self,
        src: SocketAddr,
        target: &Target,
        rec: &mut ConnRecord,
    ) -> Result<Upstream, OutboundError> {
        let snap = self.state.load_full();
        let src_w = snap
            .workload_by_ip(src.ip())
            .filter(|w| w.node == self.cfg.node && w.protocol == Protocol::Hbone)
            .ok_or(OutboundError::UnknownSource { ip: src.ip() })?
            .clone();
        rec.set_source(&src_w);
        match target {
            Target::Host { host, port } => {
                let svc = snap
                    .service_by_host(host)
                    .ok_or_else(|| OutboundError::UnknownHost { host: host.clone() })?;
                let vip = svc.vips.first().map(|ip| SocketAddr::new(*ip, *port));
                self.to_service(&snap, &src_w, svc, *port, vip, src, rec)
                    .await
            }
            Target::Addr(addr) => {
                if let Some(svc) = snap.service_by_vip(addr.ip()) {
                    self.to_service(&snap, &src_w, svc, addr.port(), Some(*addr), src, rec)
                        .await
                } else if let Some(w) = snap.workload_by_ip(addr.ip()) {
                    let waypoint = w.waypoint.as_ref().map(|gw| (gw, *addr));
                    if let Some(up) = self.via_waypoint(&snap, &src_w, waypoint, src, rec).await {
                        rec.set_destination(w);
                        return up;
                    }
                    self.to_workload(&src_w, w, *addr, src, rec).await
                } else {
                    self.passthrough(*addr, src, rec).await
                }
            }
        }
    }

    /// `vip` is the service address the client named (the authority a waypoint gets).
    #[allow(clippy::too_many_arguments)]
    async fn to_service(
        &self,
        snap: &Snapshot,
        src_w: &Workload,
        svc: &Service,
        port: u16,
        vip: Option<SocketAddr>,
        client: SocketAddr,
        rec: &mut ConnRecord,
    ) -> Result<Upstream, OutboundError> {
        rec.dst_service = Some(svc.hostname.clone());
        if !svc.has_port(port) {
            return Err(OutboundError::NoPort {
                service: svc.hostname.clone(),
                port,
            });
        }
        // A service without a VIP (headless) has no address to name to a waypoint.
        let waypoint = svc.waypoint.as_ref().zip(vip);
        if let Some(up) = self.via_waypoint(snap, src_w, waypoint, client, rec).await {
            return up;
        }
        let endpoints = snap.endpoints(svc, port);
        if endpoints.is_empty() {
            return Err(OutboundError::NoEndpoints {
                service: svc.hostname.clone(),
            });
        }
        let start = self.round_robin.fetch_add(1, Ordering::Relaxed);
        let mut last = None;
        for i in 0..endpoints.len() {
            let (ep, target_port) = &endpoints[(start + i) % endpoints.len()];
            let addr = SocketAddr::new(ep.ips[0], *target_port);
            match self.to_workload(src_w, ep, addr, client, rec).await {
                Err(OutboundError::Hbone(e)) if e.is_refusal() => {
                    debug!(endpoint = %addr, "endpoint refused; trying the next: {e}");
                    last = Some(e);
                }
                other => return other,
            }
        }
        Err(OutboundError::AllEndpointsFailed {
            service: svc.hostname.clone(),
            last: last.unwrap_or(HboneError::Unavailable {
                addr: client,
                status: http::StatusCode::SERVICE_UNAVAILABLE,
            }),
        })
    }

    /// Tunnels to a pod of `waypoint` (the gateway and the authority to ask it for), unless
    /// there is none or the source is one of its pods (its own upstream traffic must reach
    /// the destination, not loop back). `None`: go direct.
    async fn via_waypoint(
        &self,
        snap: &Snapshot,
        src_w: &Workload,
        waypoint: Option<(&GatewayAddress, SocketAddr)>,
        client: SocketAddr,
        rec: &mut ConnRecord,
    ) -> Option<Result<Upstream, OutboundError>> {
        let (gw, authority) = waypoint?;
        let pods = snap.waypoint_pods(gw);
        if pods.iter().any(|p| p.uid == src_w.uid) {
            return None;
        }
        rec.dst_addr = Some(authority);
        rec.mtls = true;
        let no_pod = || OutboundError::NoWaypoint {
            destination: authority.to_string(),
        };
        let start = self.round_robin.fetch_add(1, Ordering::Relaxed);
        let mut last = Err(no_pod());
        for i in 0..pods.len() {
            let pod = &pods[(start + i) % pods.len()];
            rec.waypoint = Some(pod.uid.clone());
            rec.hbone_addr = Some(pod.addr);
            let req = ConnectRequest {
                authority,
                client,
                ..Default::default()
            };
            last = self.tunnel(src_w, &pod.identity, pod.addr, &req).await;
            match &last {
                Err(OutboundError::Hbone(e)) if e.is_refusal() => {
                    debug!(waypoint = %pod.addr, "waypoint pod refused; trying the next: {e}");
                }
                _ => break,
            }
        }
        Some(last)
    }

    /// An HBONE stream from `src_w` to `addr` (a ztunnel's or waypoint's 15008), which must
    /// present `dst`.
    async fn tunnel(
        &self,
        src_w: &Workload,
        dst: &mesh_core::Identity,
        addr: SocketAddr,
        req: &ConnectRequest,
    ) -> Result<Upstream, OutboundError> {
        let src_id = src_w.identity();
        let cert = self.certs.get_or_issue(&src_id).await?;
        let key = PoolKey {
            src: src_id,
            dst: dst.clone(),
            addr,
        };
        let stream = self.pool.connect(&key, &cert.cert, req).await?;
        Ok(Upstream::Hbone(stream))
    }

    async fn to_workload(
        &self,
        src_w: &Workload,
        dst_w: &Workload,
        addr: SocketAddr,
        client: SocketAddr,
        rec: &mut ConnRecord,
    ) -> Result<Upstream, OutboundError> {
        rec.set_destination(dst_w);
        rec.dst_addr = Some(addr);
        if dst_w.protocol != Protocol::Hbone {
            return self.passthrough(addr, client, rec).await;
        }
        let hbone = SocketAddr::new(addr.ip(), self.cfg.ports.hbone);
        rec.hbone_addr = Some(hbone);
        rec.mtls = true;
        let req = ConnectRequest {
            authority: addr,
            client,
            ..Default::default()
        };
        self.tunnel(src_w, &dst_w.identity(), hbone, &req).await
    }

    /// Plaintext to `addr`; in capture modes from `client`'s own address.
    async fn passthrough(
        &self,
        addr: SocketAddr,
        client: SocketAddr,
        rec: &mut ConnRecord,
    ) -> Result<Upstream, OutboundError> {
        rec.dst_addr = Some(addr);
        rec.mtls = false;
        let own = [self.cfg.ports.outbound, self.cfg.ports.socks5];
        if addr.ip() == self.cfg.listen_ip && own.contains(&addr.port()) {
            return Err(OutboundError::Loop { addr });
        }
        let tcp = self
            .dial(addr, Some(client.ip()))
            .await
            .map_err(|source| OutboundError::Connect { addr, source })?;
        Ok(Upstream::Plain(tcp))
    }

    fn outbound_failed(&self, mut rec: ConnRecord, e: &OutboundError, started: Instant) {
        rec.decision = matches!(e.outcome(), Outcome::Denied).then_some("deny");
        rec.fail(e.outcome(), e.to_string());
        warn!(src = %rec.src_addr, "outbound connection failed: {e}");
        self.finish(rec, started);
    }
}

/// Accepts captured connections on 15001 until drained.
pub async fn serve_capture(proxy: Arc<Proxy>, listener: TcpListener) {
    accept_loop(proxy, listener, "capture", |proxy, tcp, peer| async move {
        let started = Instant::now();
        let mut rec = ConnRecord::new(Direction::Outbound, peer);
        let dst = match original_dst(&tcp, proxy.cfg.capture.is_active()) {
            Ok(d) => d,
            Err(e) => return proxy.metrics.failure(&format!("original_dst: {e}")),
        };
        let target = Target::Addr(dst);
        match proxy.outbound_connect(peer, &target, &mut rec).await {
            Ok(up) => {
                proxy.metrics.opened(&mut rec);
                proxy.relay(tcp, up, rec, started).await
            }
            Err(e) => {
                // The client's connection was accepted before the upstream was tried.
                reset(tcp);
                proxy.outbound_failed(rec, &e, started)
            }
        }
    })
    .await
}

/// Accepts SOCKS5 clients on 15080 until drained.
pub async fn serve_socks5(proxy: Arc<Proxy>, listener: TcpListener) {
    accept_loop(
        proxy,
        listener,
        "socks5",
        |proxy, mut tcp, peer| async move {
            let started = Instant::now();
            let target = match socks5::handshake(&mut tcp).await {
                Ok(t) => t,
                Err(e) => {
                    debug!(%peer, "SOCKS5 handshake failed: {e}");
                    return proxy.metrics.failure(&format!("socks5_{}", e.reason()));
                }
            };
            let mut rec = ConnRecord::new(Direction::Outbound, peer);
            let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
            match proxy.outbound_connect(peer, &target, &mut rec).await {
                Ok(up) => {
                    if socks5::reply(&mut tcp, Reply::Succeeded, unspecified)
                        .await
                        .is_ok()
                    {
                        proxy.metrics.opened(&mut rec);
                        proxy.relay(tcp, up, rec, started).await
                    }
                }
                Err(e) => {
                    let _ = socks5::reply(&mut tcp, e.socks_reply(), unspecified).await;
                    proxy.outbound_failed(rec, &e, started)
                }
            }
        },
    )
    .await
}

/// Accepts until drained, one task per connection; each task holds a drain handle.
pub(crate) async fn accept_loop<F, Fut>(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    name: &'static str,
    handle: F,
) where
    F: Fn(Arc<Proxy>, TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let drain = proxy.drain.clone();
    while let Some((tcp, peer)) = drain.accept(&listener, name).await {
        let _ = tcp.set_nodelay(true);
        let span = tracing::debug_span!("conn", listener = name, %peer);
        let held = drain.clone();
        let fut = handle(proxy.clone(), tcp, peer);
        tokio::spawn(
            async move {
                fut.await;
                drop(held);
            }
            .instrument(span),
        );
    }
}
