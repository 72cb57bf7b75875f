//! Upstream policy (DestinationRule's trafficPolicy): load balancing, connection pool
//! limits and outlier detection, validated from `mesh.l7.v1.TrafficPolicy`.

use std::time::Duration;

use mesh_core::proto::mesh::l7::v1 as pb;
use pb::load_balancer::{consistent_hash::Key, Policy, Simple};
use serde::Serialize;

use super::millis;

#[derive(Debug, Clone, Default, Serialize)]
pub struct TrafficPolicy {
    pub load_balancer: LoadBalancer,
    pub connection_pool: ConnectionPool,
    pub outlier_detection: Option<OutlierDetection>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancer {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
    ConsistentHash(HashKey),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    Header(#[serde(serialize_with = "super::route::ser_display")] http::HeaderName),
    Cookie { name: String, ttl: Option<Duration> },
    SourceIp,
    QueryParameter(String),
}

/// `None` in a field: no limit.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnectionPool {
    /// HTTP/1.1 connections (= requests in flight) per backend cluster.
    pub max_connections: Option<u32>,
    /// Requests waiting for an HTTP/1.1 connection when all are busy.
    pub max_pending_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    /// HTTP/2 requests in flight per backend cluster.
    pub max_requests: Option<u32>,
    pub max_retries: Option<u32>,
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OutlierDetection {
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub base_ejection_time: Duration,
    /// 0..=100.
    pub max_ejection_percent: u32,
}

/// Istio's defaults for the fields left at zero.
const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

impl TrafficPolicy {
    /// `base`: the service-wide policy a subset's overrides field by field.
    pub(super) fn from_proto(
        p: Option<&pb::TrafficPolicy>,
        base: Option<&TrafficPolicy>,
    ) -> Result<TrafficPolicy, String> {
        let base = base.cloned().unwrap_or_default();
        let Some(p) = p else {
            return Ok(base);
        };
        let load_balancer = match &p.load_balancer {
            Some(lb) => LoadBalancer::from_proto(lb)?,
            None => base.load_balancer,
        };
        let connection_pool = match &p.connection_pool {
            Some(cp) => ConnectionPool::from_proto(cp),
            None => base.connection_pool,
        };
        let outlier_detection = match &p.outlier_detection {
            Some(od) => OutlierDetection::from_proto(od)?,
            None => base.outlier_detection,
        };
        Ok(TrafficPolicy {
            load_balancer,
            connection_pool,
            outlier_detection,
        })
    }
}

impl LoadBalancer {
    fn from_proto(lb: &pb::LoadBalancer) -> Result<LoadBalancer, String> {
        Ok(match &lb.policy {
            None => LoadBalancer::RoundRobin,
            Some(Policy::Simple(s)) => match Simple::try_from(*s) {
                Ok(Simple::Unspecified | Simple::RoundRobin) => LoadBalancer::RoundRobin,
                Ok(Simple::LeastRequest) => LoadBalancer::LeastRequest,
                Ok(Simple::Random) => LoadBalancer::Random,
                Err(_) => return Err(format!("unknown load balancer {s}")),
            },
            Some(Policy::ConsistentHash(ch)) => LoadBalancer::ConsistentHash(match &ch.key {
                None => return Err("consistent hash without a key".into()),
                Some(Key::HttpHeaderName(h)) => HashKey::Header(
                    http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                        .map_err(|_| format!("invalid hash header {h:?}"))?,
                ),
                Some(Key::HttpCookie(name)) => HashKey::Cookie {
                    name: name.clone(),
                    ttl: millis(ch.cookie_ttl_ms),
                },
                Some(Key::UseSourceIp(_)) => HashKey::SourceIp,
                Some(Key::HttpQueryParameterName(q)) => HashKey::QueryParameter(q.clone()),
            }),
        })
    }
}

impl ConnectionPool {
    fn from_proto(cp: &pb::ConnectionPool) -> ConnectionPool {
        let limit = |v: u32| (v > 0).then_some(v);
        ConnectionPool {
            max_connections: limit(cp.max_connections),
            max_pending_requests: limit(cp.max_pending_requests),
            max_requests_per_connection: limit(cp.max_requests_per_connection),
            max_requests: limit(cp.max_requests),
            max_retries: limit(cp.max_retries),
            connect_timeout: millis(cp.connect_timeout_ms),
            idle_timeout: millis(cp.idle_timeout_ms),
        }
    }
}

impl OutlierDetection {
    fn from_proto(od: &pb::OutlierDetection) -> Result<Option<OutlierDetection>, String> {
        if od.max_ejection_percent > 100 {
            return Err(format!(
                "max_ejection_percent {} > 100",
                od.max_ejection_percent
            ));
        }
        let limit = |v: u32| (v > 0).then_some(v);
        let (c5xx, cgw) = (
            limit(od.consecutive_5xx_errors),
            limit(od.consecutive_gateway_errors),
        );
        if c5xx.is_none() && cgw.is_none() {
            return Ok(None);
        }
        Ok(Some(OutlierDetection {
            consecutive_5xx_errors: c5xx,
            consecutive_gateway_errors: cgw,
            base_ejection_time: millis(od.base_ejection_time_ms).unwrap_or(DEFAULT_BASE_EJECTION),
            max_ejection_percent: match od.max_ejection_percent {
                0 => DEFAULT_MAX_EJECTION_PERCENT,
                p => p,
            },
        }))
    }
}
