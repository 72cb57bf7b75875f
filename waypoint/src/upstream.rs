//! The app's side of the engine seam: [`Backends`] over the Address snapshot (a service's
//! endpoints with their target ports, labels and identities) and HBONE to the endpoint's
//! node with the waypoint's own certificate, pooled; plaintext TCP to workloads outside
//! the mesh. The TCP passthrough uses the same two calls, so both paths pick and reach
//! endpoints alike.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use mesh_core::addresses::{Protocol, Workload};
use mesh_core::certs::CertManager;
use mesh_core::hbone::{self, ConnectRequest, HboneError, Pool, PoolKey};
use mesh_core::Identity;

use crate::app::state::State;
use crate::backend::{Backends, BoxIo, ConnectError, Endpoint};

/// Cheap to share: every connect takes a handle to the same pool and certificates.
pub struct Upstreams(Arc<Inner>);

struct Inner {
    state: Arc<ArcSwap<State>>,
    certs: Arc<CertManager>,
    pool: Pool,
    /// The waypoint's own identity: the source of every upstream tunnel.
    identity: Identity,
    /// The port endpoints' ztunnels take HBONE on.
    hbone_port: u16,
    /// Sent as `forwarded` when the original client is not known at this seam.
    local: SocketAddr,
    hbone: hbone::Config,
}

impl Upstreams {
    pub fn new(
        state: Arc<ArcSwap<State>>,
        certs: Arc<CertManager>,
        pool: Pool,
        identity: Identity,
        settings: &crate::app::Settings,
    ) -> Self {
        Upstreams(Arc::new(Inner {
            state,
            certs,
            pool,
            identity,
            hbone_port: settings.upstream_hbone_port,
            local: SocketAddr::new(settings.listen_ip, 0),
            hbone: settings.hbone.clone(),
        }))
    }
}

impl Inner {
    async fn connect_hbone(&self, ep: &Endpoint, dst: &Identity) -> Result<BoxIo, ConnectError> {
        let cert = (self.certs.get_or_issue(&self.identity).await)
            .map_err(|e| failed(ep, e.to_string()))?;
        let key = PoolKey {
            src: self.identity.clone(),
            dst: dst.clone(),
            addr: SocketAddr::new(ep.addr.ip(), self.hbone_port),
        };
        let req = ConnectRequest {
            authority: ep.addr,
            client: self.local,
            ..Default::default()
        };
        match self.pool.connect(&key, &cert.cert, &req).await {
            Ok(stream) => Ok(Box::new(stream.into_io())),
            Err(e @ (HboneError::Denied { .. } | HboneError::Refused { .. })) => {
                Err(refused(ep, e.to_string()))
            }
            Err(e) => Err(failed(ep, e.to_string())),
        }
    }

    async fn connect_plain(&self, ep: &Endpoint) -> Result<BoxIo, ConnectError> {
        let dial = hbone::connect_marked(ep.addr, self.hbone.socket_mark);
        match tokio::time::timeout(self.hbone.connect_timeout, dial).await {
            Ok(Ok(tcp)) => Ok(Box::new(tcp)),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Err(refused(ep, e.to_string()))
            }
            Ok(Err(e)) => Err(failed(ep, e.to_string())),
            Err(_) => Err(failed(ep, "connect timed out".to_owned())),
        }
    }
}

fn failed(ep: &Endpoint, reason: String) -> ConnectError {
    ConnectError::Failed {
        endpoint: ep.uid.clone(),
        addr: ep.addr,
        reason,
    }
}

fn refused(ep: &Endpoint, reason: String) -> ConnectError {
    ConnectError::Refused {
        endpoint: ep.uid.clone(),
        addr: ep.addr,
        reason,
    }
}

/// `w` as the engine sees it, serving on `addr`.
pub fn endpoint(w: &Workload, addr: SocketAddr) -> Endpoint {
    Endpoint {
        uid: w.uid.clone(),
        addr,
        labels: w.labels.clone(),
        workload: w.name.clone(),
        namespace: w.namespace.clone(),
        identity: (w.protocol == Protocol::Hbone).then(|| w.identity()),
    }
}

impl Backends for Upstreams {
    fn endpoints(&self, service: &str, port: u16) -> Vec<Arc<Endpoint>> {
        let state = self.0.state.load();
        let Some(svc) = state.addresses.service_by_key(service) else {
            return Vec::new();
        };
        (state.addresses.endpoints(svc, port).iter())
            .filter_map(|(w, target)| {
                let ip = *w.ips.first()?;
                Some(Arc::new(endpoint(w, SocketAddr::new(ip, *target))))
            })
            .collect()
    }

    fn connect(&self, ep: Arc<Endpoint>) -> BoxFuture<'static, Result<BoxIo, ConnectError>> {
        let me = self.0.clone();
        async move {
            match &ep.identity {
                Some(dst) => me.connect_hbone(&ep, dst).await,
                None => me.connect_plain(&ep).await,
            }
        }
        .boxed()
    }
}
