//! One HBONE tunnel into the waypoint: its authority (a service VIP:port, or a pod
//! address) names the destination; the port's protocol decides whether the HTTP engine
//! serves it or its bytes pass through to an endpoint (round robin, L4 semantics: the
//! tunnel is answered 503 when no endpoint can be reached).
//!
//! It must not parse HTTP (the engine's job) nor decide routing beyond picking an
//! endpoint for opaque TCP.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::StatusCode;
use mesh_core::hbone::{HboneMetrics, InboundRequest, StreamIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use crate::app::state::{Destination, PortProtocol, State};
use crate::backend::{Backends, BoxIo, Downstream, Endpoint};
use crate::http::Engine;
use crate::upstream::{endpoint, Upstreams};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TcpLabels {
    reporter: &'static str,
    source_principal: String,
    destination_service: String,
    destination_workload: String,
    request_protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    /// `tcp`, `http`, or why the tunnel was refused.
    outcome: &'static str,
    destination_service: String,
}

/// Istio's L4 metric names for passed-through tunnels, and every tunnel by outcome.
#[derive(Clone, Default)]
pub struct TunnelMetrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    tunnels: Family<TunnelLabels, Counter>,
    pub config_errors: Counter,
}

impl TunnelMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = TunnelMetrics::default();
        let r = registry;
        r.register(
            "istio_tcp_connections_opened",
            "TCP tunnels passed through",
            m.opened.clone(),
        );
        r.register(
            "istio_tcp_connections_closed",
            "TCP tunnels closed",
            m.closed.clone(),
        );
        r.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to endpoints",
            m.sent.clone(),
        );
        r.register(
            "istio_tcp_received_bytes",
            "Bytes received from endpoints",
            m.received.clone(),
        );
        r.register(
            "waypoint_tunnels",
            "HBONE tunnels taken, by outcome",
            m.tunnels.clone(),
        );
        r.register(
            "waypoint_config_errors",
            "Config entries left out",
            m.config_errors.clone(),
        );
        m
    }

    fn tunnel(&self, outcome: &'static str, service: &str) {
        let labels = TunnelLabels {
            outcome,
            destination_service: service.to_owned(),
        };
        self.tunnels.get_or_create(&labels).inc();
    }
}

/// What every tunnel handler shares.
pub struct Tunnels {
    pub state: Arc<ArcSwap<State>>,
    pub upstreams: Arc<Upstreams>,
    pub engine: Arc<Engine>,
    pub metrics: TunnelMetrics,
    pub hbone_metrics: HboneMetrics,
    pub sniff_timeout: Duration,
    round_robin: AtomicUsize,
}

/// Where the bytes of one TCP tunnel go, and what its metrics say.
struct Passthrough {
    candidates: Vec<Arc<Endpoint>>,
    labels: TcpLabels,
}

impl Tunnels {
    pub fn new(
        state: Arc<ArcSwap<State>>,
        upstreams: Arc<Upstreams>,
        engine: Arc<Engine>,
        metrics: TunnelMetrics,
        hbone_metrics: HboneMetrics,
        sniff_timeout: Duration,
    ) -> Self {
        Tunnels {
            state,
            upstreams,
            engine,
            metrics,
            hbone_metrics,
            sniff_timeout,
            round_robin: AtomicUsize::new(0),
        }
    }

    pub async fn handle(self: Arc<Self>, req: InboundRequest) {
        let state = self.state.load_full();
        let client = req.forwarded_for().unwrap_or(req.peer_addr);
        let Some(dest) = state.destination(req.authority) else {
            info!(src = %req.peer, authority = %req.authority, "tunnel to an unknown destination refused");
            self.refuse(
                req,
                StatusCode::SERVICE_UNAVAILABLE,
                "unknown_destination",
                "",
            );
            return;
        };
        match dest {
            Destination::Service { service, port } => {
                let key = service.key();
                let downstream = Downstream {
                    peer: client,
                    identity: Some(req.peer.clone()),
                    service: key.clone(),
                    port,
                };
                match state.protocol(&key, port) {
                    PortProtocol::Http => self.serve_http(req, downstream).await,
                    PortProtocol::Tcp => {
                        let pass = self.passthrough(&req, &service.hostname, &key, port);
                        self.serve_tcp(req, pass).await
                    }
                    PortProtocol::Detect => {
                        self.serve_detected(req, downstream, &service.hostname)
                            .await
                    }
                }
            }
            Destination::Workload { workload, addr } => {
                let pass = Passthrough {
                    candidates: vec![Arc::new(endpoint(&workload, addr))],
                    labels: self.labels(&req, "", &workload.name),
                };
                self.serve_tcp(req, pass).await
            }
        }
    }

    fn refuse(&self, req: InboundRequest, status: StatusCode, reason: &'static str, service: &str) {
        req.reject(status);
        self.hbone_metrics.rejected(status.as_u16(), reason);
        self.metrics.tunnel(reason, service);
    }

    fn labels(&self, req: &InboundRequest, hostname: &str, workload: &str) -> TcpLabels {
        TcpLabels {
            reporter: "waypoint",
            source_principal: req.peer.to_string(),
            destination_service: hostname.to_owned(),
            destination_workload: workload.to_owned(),
            request_protocol: "tcp",
        }
    }

    /// The endpoints of `key`'s `port` in round-robin order from the next turn.
    fn passthrough(
        &self,
        req: &InboundRequest,
        hostname: &str,
        key: &str,
        port: u16,
    ) -> Passthrough {
        let mut candidates = self.upstreams.endpoints(key, port);
        if !candidates.is_empty() {
            let turn = self.round_robin.fetch_add(1, Ordering::Relaxed) % candidates.len();
            candidates.rotate_left(turn);
        }
        Passthrough {
            candidates,
            labels: self.labels(req, hostname, ""),
        }
    }

    async fn serve_http(&self, req: InboundRequest, downstream: Downstream) {
        let Some(io) = self.accept(req, &downstream.service) else {
            return;
        };
        self.metrics.tunnel("http", &downstream.service);
        self.engine.serve(Box::new(io), downstream).await
    }

    /// Reads the client's first bytes: HTTP goes to the engine, anything else (or silence
    /// past the sniff timeout: a server-first protocol) passes through as TCP.
    async fn serve_detected(&self, req: InboundRequest, downstream: Downstream, hostname: &str) {
        let pass = self.passthrough(&req, hostname, &downstream.service, downstream.port);
        let Some(mut io) = self.accept(req, &downstream.service) else {
            return;
        };
        let sniffed = tokio::time::timeout(self.sniff_timeout, io.peek()).await;
        let http = matches!(&sniffed, Ok(Ok(first)) if looks_like_http(first));
        if http {
            self.metrics.tunnel("http", &downstream.service);
            return self.engine.serve(Box::new(io), downstream).await;
        }
        match self.connect_any(&pass).await {
            Some((up, ep)) => self.relay(io, up, ep, pass.labels).await,
            // Already answered 200: all that is left is to end the stream.
            None => self
                .metrics
                .tunnel("no_healthy_upstream", &downstream.service),
        }
    }

    async fn serve_tcp(&self, req: InboundRequest, pass: Passthrough) {
        let service = pass.labels.destination_service.clone();
        let Some((up, ep)) = self.connect_any(&pass).await else {
            warn!(authority = %req.authority, "no endpoint of the destination could be reached");
            return self.refuse(
                req,
                StatusCode::SERVICE_UNAVAILABLE,
                "no_healthy_upstream",
                &service,
            );
        };
        let Some(io) = self.accept(req, &service) else {
            return;
        };
        self.relay(io, up, ep, pass.labels).await
    }

    fn accept(&self, req: InboundRequest, service: &str) -> Option<StreamIo> {
        match req.accept() {
            Ok(stream) => Some(stream.into_io()),
            Err(e) => {
                debug!("answering CONNECT: {e}");
                self.metrics.tunnel("downstream_reset", service);
                None
            }
        }
    }

    /// The first candidate that answers.
    async fn connect_any(&self, pass: &Passthrough) -> Option<(BoxIo, Arc<Endpoint>)> {
        for ep in &pass.candidates {
            match self.upstreams.connect(ep.clone()).await {
                Ok(io) => return Some((io, ep.clone())),
                Err(e) => debug!("endpoint unreachable, trying the next: {e}"),
            }
        }
        None
    }

    async fn relay(
        &self,
        mut io: StreamIo,
        mut up: BoxIo,
        ep: Arc<Endpoint>,
        mut labels: TcpLabels,
    ) {
        labels.destination_workload = ep.workload.clone();
        self.metrics.tunnel("tcp", &labels.destination_service);
        self.metrics.opened.get_or_create(&labels).inc();
        let result = tokio::io::copy_bidirectional(&mut io, &mut up).await;
        let (sent, received) = match &result {
            Ok((a, b)) => (*a, *b),
            Err(_) => (0, 0),
        };
        let _ = io.shutdown().await;
        self.metrics.sent.get_or_create(&labels).inc_by(sent);
        self.metrics
            .received
            .get_or_create(&labels)
            .inc_by(received);
        self.metrics.closed.get_or_create(&labels).inc();
        let outcome = result.err().map(|e| e.to_string());
        info!(
            src = %labels.source_principal,
            service = %labels.destination_service,
            endpoint = %ep.addr,
            sent, received, error = ?outcome,
            "tcp tunnel closed"
        );
    }
}

/// The HTTP/2 preface or an HTTP/1 request line's method and space.
pub fn looks_like_http(first: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
    ];
    first.starts_with(b"PRI * HTTP/2.0") || METHODS.iter().any(|m| first.starts_with(m))
}

#[cfg(test)]
mod tests {
    use super::looks_like_http;

    #[test]
    fn http_is_told_from_other_first_bytes() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(looks_like_http(b"OPTIONS * HTTP/1.1\r\n"));
        for other in [
            &b"GETX / HTTP/1.1"[..],
            b"ping",
            b"",
            b"\x16\x03\x01\x02\x00",
            b"get / ",
        ] {
            assert!(!looks_like_http(other), "{other:?}");
        }
    }
}
