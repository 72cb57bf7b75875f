//! The HBONE server loop: mutual TLS, HTTP/2, `CONNECT` only. Each valid request is
//! handed, with the peer's verified identity, to the proxy's handler, which accepts or
//! rejects it. Malformed requests are answered here and never reach the handler.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn, Instrument};

use super::{parse_authority, Config, H2Stream, HboneMetrics};
use crate::drain::Drain;
use crate::identity::Identity;
use crate::tls::identity_of;

/// Chooses the server certificate by the local address a connection arrived on (the
/// destination pod's address when traffic is captured). None refuses the connection.
pub type TlsForLocalAddr =
    Arc<dyn Fn(SocketAddr) -> Option<Arc<rustls::ServerConfig>> + Send + Sync>;

pub type Handler =
    Arc<dyn Fn(InboundRequest) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A well-formed CONNECT from an authenticated peer, waiting for the handler's verdict.
pub struct InboundRequest {
    pub peer: Identity,
    pub peer_addr: SocketAddr,
    pub local_addr: SocketAddr,
    pub authority: SocketAddr,
    pub headers: http::HeaderMap,
    respond: h2::server::SendResponse<Bytes>,
    recv: h2::RecvStream,
}

impl InboundRequest {
    /// Answers 200 and returns the stream to splice.
    pub fn accept(mut self) -> Result<H2Stream, h2::Error> {
        let send = self
            .respond
            .send_response(status_response(StatusCode::OK), false)?;
        Ok(H2Stream::new(send, self.recv, None))
    }

    /// Answers with an error status and ends the stream.
    pub fn reject(mut self, status: StatusCode) {
        if let Err(e) = self.respond.send_response(status_response(status), true) {
            debug!("rejecting stream: {e}");
        }
    }

    /// The original client from `forwarded: for="ip:port"`, if present and well formed.
    pub fn forwarded_for(&self) -> Option<SocketAddr> {
        let v = self.headers.get("forwarded")?.to_str().ok()?;
        v.split(';').find_map(|part| {
            let f = part.trim().strip_prefix("for=")?;
            f.trim_matches('"').parse().ok()
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }
}

fn status_response(status: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    r
}

/// Accepts HBONE connections until drained.
pub async fn serve(
    listener: TcpListener,
    tls_for: TlsForLocalAddr,
    handler: Handler,
    cfg: Config,
    metrics: HboneMetrics,
    drain: Drain,
) {
    let cfg = Arc::new(cfg);
    while let Some((tcp, peer)) = drain.accept(&listener, "hbone").await {
        let conn = ServerConn {
            tls_for: tls_for.clone(),
            handler: handler.clone(),
            cfg: cfg.clone(),
            metrics: metrics.clone(),
            drain: drain.clone(),
        };
        let span = tracing::debug_span!("hbone_in", %peer);
        tokio::spawn(conn.run(tcp, peer).instrument(span));
    }
}

struct ServerConn {
    tls_for: TlsForLocalAddr,
    handler: Handler,
    cfg: Arc<Config>,
    metrics: HboneMetrics,
    drain: Drain,
}

impl ServerConn {
    async fn run(self, tcp: TcpStream, peer: SocketAddr) {
        let Ok(local) = tcp.local_addr() else { return };
        let Some(tls_cfg) = (self.tls_for)(local) else {
            self.metrics.tls_failure("server");
            warn!(%peer, %local, "HBONE connection refused: no certificate for this address");
            return;
        };
        let _ = tcp.set_nodelay(true);
        let accept = TlsAcceptor::from(tls_cfg).accept(super::read_buffered(tcp));
        let tls = match tokio::time::timeout(self.cfg.handshake_timeout, accept).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return self.handshake_failed(peer, &e.to_string()),
            Err(_) => return self.handshake_failed(peer, "timed out"),
        };
        let identity = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(identity_of);
        let identity = match identity {
            Some(Ok(id)) => id,
            Some(Err(e)) => return self.handshake_failed(peer, &e.to_string()),
            None => return self.handshake_failed(peer, "no client certificate"),
        };
        self.metrics.server_connection();
        let handshake = h2::server::Builder::new()
            .initial_window_size(self.cfg.stream_window)
            .initial_connection_window_size(self.cfg.connection_window)
            .max_frame_size(self.cfg.max_frame_size)
            .max_concurrent_streams(self.cfg.max_concurrent_streams)
            .max_header_list_size(self.cfg.max_header_list_size)
            .handshake::<_, Bytes>(tls);
        let conn = match tokio::time::timeout(self.cfg.handshake_timeout, handshake).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return debug!("HTTP/2 preface from {peer} failed: {e}"),
            Err(_) => return debug!("HTTP/2 preface from {peer} timed out"),
        };
        self.serve_streams(conn, identity, peer, local).await;
    }

    fn handshake_failed(&self, peer: SocketAddr, why: &str) {
        self.metrics.tls_failure("server");
        warn!(%peer, "HBONE TLS handshake failed: {why}");
    }

    async fn serve_streams<T>(
        &self,
        mut conn: h2::server::Connection<T, Bytes>,
        identity: Identity,
        peer: SocketAddr,
        local: SocketAddr,
    ) where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut draining = false;
        loop {
            tokio::select! {
                next = conn.accept() => match next {
                    Some(Ok((req, respond))) => self.dispatch(req, respond, &identity, peer, local),
                    Some(Err(e)) => {
                        debug!("HBONE connection from {peer} ended: {e}");
                        break;
                    }
                    None => break,
                },
                _ = self.drain.signaled(), if !draining => {
                    // GOAWAY: no new streams; open ones run to completion.
                    conn.graceful_shutdown();
                    draining = true;
                }
                _ = self.drain.forced() => break,
            }
        }
    }

    fn dispatch(
        &self,
        req: Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        identity: &Identity,
        peer: SocketAddr,
        local: SocketAddr,
    ) {
        let (parts, recv) = req.into_parts();
        let verdict = if parts.method != Method::CONNECT {
            Err((StatusCode::METHOD_NOT_ALLOWED, "method"))
        } else {
            parts
                .uri
                .authority()
                .and_then(|a| parse_authority(a.as_str()))
                .ok_or((StatusCode::BAD_REQUEST, "authority"))
        };
        let authority = match verdict {
            Ok(a) => a,
            Err((status, reason)) => {
                self.metrics.rejected(status.as_u16(), reason);
                debug!(%peer, method = %parts.method, uri = %parts.uri, "HBONE request rejected: {status}");
                let _ = respond.send_response(status_response(status), true);
                return;
            }
        };
        let inbound = InboundRequest {
            peer: identity.clone(),
            peer_addr: peer,
            local_addr: local,
            authority,
            headers: parts.headers,
            respond,
            recv,
        };
        tokio::spawn((self.handler)(inbound).in_current_span());
    }
}
