//! Upstream side of the engine: endpoint choice (load balancing, subsets, outlier
//! ejection), connection pools per endpoint (HTTP/1.1 connections reused when idle, one
//! multiplexed HTTP/2 connection), and the pool limits that answer 503 UO.
//! It never decides about retries or routes: `forward` does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::body::ReqBody;
use super::error::Error;
use crate::backend::{Backends, BoxIo, Endpoint};
use crate::config::{ConnectionPool, Subset, TrafficPolicy};

mod lb;
mod outlier;

pub use lb::HashInput;
use outlier::Outlier;

/// How long a connection attempt may take when the policy sets no connect timeout.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_H1: usize = 64;

/// Which HTTP version to speak to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Http1,
    Http2,
}

/// The endpoints, limits and policy one request's backend resolves to.
#[derive(Clone, Hash, PartialEq, Eq)]
struct ClusterKey {
    service: String,
    port: u16,
    subset: Option<String>,
    /// Part of the key so a changed limit starts from a fresh semaphore.
    max_connections: Option<u32>,
    max_requests: Option<u32>,
}

struct Cluster {
    rr: AtomicUsize,
    /// HTTP/1.1 requests in flight (each holds a connection) when limited.
    connections: Option<Arc<Semaphore>>,
    /// HTTP/2 requests in flight when limited.
    requests: Option<Arc<Semaphore>>,
    pending: AtomicU32,
}

/// State kept per endpoint across config updates (keyed by workload uid).
#[derive(Default)]
pub struct EndpointState {
    pub active: AtomicUsize,
    h1: Mutex<Vec<H1Conn>>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<ReqBody>>>,
    outlier: Mutex<Outlier>,
}

struct H1Conn {
    sender: http1::SendRequest<ReqBody>,
    uses: u32,
}

/// A chosen endpoint with what the request holds while in flight.
pub struct Picked {
    pub endpoint: Arc<Endpoint>,
    pub state: Arc<EndpointState>,
    pub all: Arc<[Arc<Endpoint>]>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Upstream {
    backends: Arc<dyn Backends>,
    endpoints: Mutex<HashMap<String, Arc<EndpointState>>>,
    clusters: Mutex<HashMap<ClusterKey, Arc<Cluster>>>,
}

impl Upstream {
    pub fn new(backends: Arc<dyn Backends>) -> Upstream {
        Upstream {
            backends,
            endpoints: Mutex::default(),
            clusters: Mutex::default(),
        }
    }

    pub fn backends(&self) -> &Arc<dyn Backends> {
        &self.backends
    }

    fn state(&self, uid: &str) -> Arc<EndpointState> {
        let mut map = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(uid.to_owned()).or_default().clone()
    }

    fn cluster(&self, key: ClusterKey) -> Arc<Cluster> {
        let mut map = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        let sem = |n: Option<u32>| n.map(|n| Arc::new(Semaphore::new(n as usize)));
        map.entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Cluster {
                    rr: AtomicUsize::new(0),
                    connections: sem(key.max_connections),
                    requests: sem(key.max_requests),
                    pending: AtomicU32::new(0),
                })
            })
            .clone()
    }

    /// Chooses an endpoint of `service:port` (within the subset when one is named)
    /// and takes the pool-limit permit the request holds until it ends.
    pub async fn pick(
        &self,
        service: &str,
        port: u16,
        subset: Option<(&str, &Subset)>,
        policy: &TrafficPolicy,
        wire: Wire,
        hash: &HashInput,
    ) -> Result<Picked, Error> {
        let all: Arc<[Arc<Endpoint>]> = self
            .backends
            .endpoints(service, port)
            .into_iter()
            .filter(|ep| subset.is_none_or(|(_, s)| s.contains(ep)))
            .collect();
        let no_upstream = || Error::NoHealthyUpstream {
            service: service.to_owned(),
        };
        if all.is_empty() {
            return Err(no_upstream());
        }
        let pool = &policy.connection_pool;
        let cluster = self.cluster(ClusterKey {
            service: service.to_owned(),
            port,
            subset: subset.map(|(n, _)| n.to_owned()),
            max_connections: pool.max_connections,
            max_requests: pool.max_requests,
        });
        let permit = admit(&cluster, pool, wire).await?;
        let states: Vec<_> = all.iter().map(|ep| self.state(&ep.uid)).collect();
        let healthy: Vec<usize> = (0..all.len()).filter(|&i| !states[i].ejected()).collect();
        // Envoy's panic mode: with every endpoint ejected, use them all rather than none.
        let candidates = if healthy.is_empty() {
            (0..all.len()).collect()
        } else {
            healthy
        };
        let i = lb::choose(
            &policy.load_balancer,
            &cluster.rr,
            &all,
            &states,
            &candidates,
            hash,
        )
        .ok_or_else(no_upstream)?;
        states[i].active.fetch_add(1, Ordering::Relaxed);
        Ok(Picked {
            endpoint: all[i].clone(),
            state: states[i].clone(),
            all,
            _permit: permit,
        })
    }

    /// Reports an attempt's outcome to outlier detection.
    pub fn outcome(
        &self,
        picked: &Picked,
        policy: &TrafficPolicy,
        status: Option<u16>,
        gateway: bool,
    ) {
        let Some(od) = &policy.outlier_detection else {
            return;
        };
        let ejected = picked
            .all
            .iter()
            .filter(|ep| ep.uid != picked.endpoint.uid && self.state(&ep.uid).ejected())
            .count();
        let mut o = picked
            .state
            .outlier
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        o.record(od, status, gateway, ejected, picked.all.len());
    }

    /// Sends one request on a pooled connection to the picked endpoint.
    pub async fn send(
        &self,
        picked: &Picked,
        wire: Wire,
        pool: &ConnectionPool,
        req: http::Request<ReqBody>,
    ) -> Result<http::Response<Incoming>, Error> {
        match wire {
            Wire::Http1 => self.send_h1(picked, pool, req).await,
            Wire::Http2 => self.send_h2(picked, pool, req).await,
        }
    }

    async fn send_h1(
        &self,
        picked: &Picked,
        pool: &ConnectionPool,
        req: http::Request<ReqBody>,
    ) -> Result<http::Response<Incoming>, Error> {
        let idle = {
            let mut conns = picked.state.h1.lock().unwrap_or_else(|e| e.into_inner());
            conns.retain(|c| !c.sender.is_closed());
            conns
                .iter()
                .position(|c| c.sender.is_ready())
                .map(|i| conns.swap_remove(i))
        };
        let mut conn = match idle {
            Some(c) => c,
            None => {
                let io = self.connect(&picked.endpoint, pool).await?;
                let (sender, conn) = http1::handshake(TokioIo::new(io))
                    .await
                    .map_err(|e| reset(&e))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                H1Conn { sender, uses: 0 }
            }
        };
        conn.uses += 1;
        let resp = conn.sender.send_request(req).await.map_err(|e| reset(&e))?;
        // Back in the pool now: it turns ready once this response's body is read.
        let reusable = pool
            .max_requests_per_connection
            .is_none_or(|max| conn.uses < max);
        if reusable {
            let mut conns = picked.state.h1.lock().unwrap_or_else(|e| e.into_inner());
            if conns.len() < MAX_IDLE_H1 {
                conns.push(conn);
            }
        }
        Ok(resp)
    }

    async fn send_h2(
        &self,
        picked: &Picked,
        pool: &ConnectionPool,
        req: http::Request<ReqBody>,
    ) -> Result<http::Response<Incoming>, Error> {
        let mut sender = {
            let mut slot = picked.state.h2.lock().await;
            match slot.as_ref().filter(|s| !s.is_closed()) {
                Some(s) => s.clone(),
                None => {
                    let io = self.connect(&picked.endpoint, pool).await?;
                    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                        .await
                        .map_err(|e| reset(&e))?;
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    *slot = Some(sender.clone());
                    sender
                }
            }
        };
        sender.ready().await.map_err(|e| reset(&e))?;
        sender.send_request(req).await.map_err(|e| reset(&e))
    }

    /// An upgrade request on a connection of its own: once upgraded it carries another
    /// protocol and never returns to the pool.
    pub async fn send_upgrade(
        &self,
        picked: &Picked,
        pool: &ConnectionPool,
        req: http::Request<ReqBody>,
    ) -> Result<http::Response<Incoming>, Error> {
        let io = self.connect(&picked.endpoint, pool).await?;
        let (mut sender, conn) = http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| reset(&e))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        sender.send_request(req).await.map_err(|e| reset(&e))
    }

    async fn connect(&self, ep: &Arc<Endpoint>, pool: &ConnectionPool) -> Result<BoxIo, Error> {
        let after = pool.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        match tokio::time::timeout(after, self.backends.connect(ep.clone())).await {
            Ok(Ok(io)) => Ok(io),
            Ok(Err(source)) => Err(Error::Connect { source }),
            Err(_) => Err(Error::ConnectTimeout {
                endpoint: ep.uid.clone(),
                after,
            }),
        }
    }

    /// Opaque TCP: splices the tunnel to one endpoint of the service.
    pub async fn passthrough(&self, mut io: BoxIo, service: &str, port: u16) -> Result<(), Error> {
        let policy = TrafficPolicy::default();
        let none = HashInput::default();
        let picked = self
            .pick(service, port, None, &policy, Wire::Http1, &none)
            .await?;
        let mut up = self
            .connect(&picked.endpoint, &policy.connection_pool)
            .await?;
        let _ = tokio::io::copy_bidirectional(&mut io, &mut up).await;
        Ok(())
    }
}

/// Takes a permit under the cluster's limits, waiting in the pending queue when
/// HTTP/1.1 connections are all busy, or fails with overflow.
async fn admit(
    cluster: &Cluster,
    pool: &ConnectionPool,
    wire: Wire,
) -> Result<Option<OwnedSemaphorePermit>, Error> {
    let sem = match wire {
        Wire::Http1 => cluster.connections.clone(),
        Wire::Http2 => cluster.requests.clone(),
    };
    let Some(sem) = sem else {
        return Ok(None);
    };
    if let Ok(p) = sem.clone().try_acquire_owned() {
        return Ok(Some(p));
    }
    if wire == Wire::Http2 {
        return Err(Error::Overflow {
            limit: "max requests",
        });
    }
    // Envoy's default pending queue when only max connections is set.
    let max_pending = pool.max_pending_requests.unwrap_or(1024);
    if cluster.pending.fetch_add(1, Ordering::AcqRel) >= max_pending {
        cluster.pending.fetch_sub(1, Ordering::AcqRel);
        return Err(Error::Overflow {
            limit: "max pending requests",
        });
    }
    let permit = sem.acquire_owned().await;
    cluster.pending.fetch_sub(1, Ordering::AcqRel);
    permit.map(Some).map_err(|_| Error::Overflow {
        limit: "max connections",
    })
}

/// Classifies a hyper client error: refused streams are safe to retry anywhere.
fn reset(e: &hyper::Error) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return Error::RefusedStream {
                    reason: e.to_string(),
                };
            }
        }
        source = s.source();
    }
    Error::Reset {
        reason: e.to_string(),
    }
}
