//! What the ztunnel reports about each connection: Istio's L4 metrics and one JSON
//! access-log line. Both are built from one `ConnRecord` so they never disagree.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::model::Workload;

/// Everything known about one proxied connection, filled in as it progresses.
#[derive(Clone, Debug, Serialize)]
pub struct ConnRecord {
    pub timestamp: String,
    pub direction: Direction,
    pub src_addr: SocketAddr,
    pub src_workload: Option<String>,
    pub src_namespace: Option<String>,
    pub src_identity: Option<String>,
    pub dst_addr: Option<SocketAddr>,
    pub dst_service: Option<String>,
    pub dst_workload: Option<String>,
    pub dst_namespace: Option<String>,
    pub dst_identity: Option<String>,
    pub hbone_addr: Option<SocketAddr>,
    /// Uid of the waypoint pod the tunnel went to, when the destination uses a waypoint.
    pub waypoint: Option<String>,
    pub mtls: bool,
    pub decision: Option<&'static str>,
    pub policy: Option<String>,
    pub outcome: Outcome,
    pub reason: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: f64,
    /// Counted in `istio_tcp_connections_opened`; only such connections count as closed.
    #[serde(skip)]
    pub opened: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Denied,
    Error,
}

impl ConnRecord {
    pub fn new(direction: Direction, src_addr: SocketAddr) -> Self {
        ConnRecord {
            timestamp: now_rfc3339(),
            direction,
            src_addr,
            src_workload: None,
            src_namespace: None,
            src_identity: None,
            dst_addr: None,
            dst_service: None,
            dst_workload: None,
            dst_namespace: None,
            dst_identity: None,
            hbone_addr: None,
            waypoint: None,
            mtls: false,
            decision: None,
            policy: None,
            outcome: Outcome::Ok,
            reason: None,
            bytes_sent: 0,
            bytes_received: 0,
            duration_ms: 0.0,
            opened: false,
        }
    }

    pub fn set_source(&mut self, w: &Workload) {
        self.src_workload = Some(w.name.clone());
        self.src_namespace = Some(w.namespace.clone());
        self.src_identity = Some(w.identity().to_string());
    }

    pub fn set_destination(&mut self, w: &Workload) {
        self.dst_workload = Some(w.name.clone());
        self.dst_namespace = Some(w.namespace.clone());
        // Only mesh workloads hold an identity.
        self.dst_identity =
            (w.protocol == crate::model::Protocol::Hbone).then(|| w.identity().to_string());
    }

    pub fn fail(&mut self, outcome: Outcome, reason: impl Into<String>) {
        self.outcome = outcome;
        self.reason = Some(reason.into());
    }
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TcpLabels {
    reporter: &'static str,
    source_workload: String,
    source_workload_namespace: String,
    source_principal: String,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_service: String,
    request_protocol: &'static str,
    response_flags: &'static str,
    connection_security_policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// L4 metrics with Istio's names and labels, plus the ztunnel's own error counters.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    errors: Family<ReasonLabels, Counter>,
    config_errors: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent from source to destination",
            m.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes sent from destination back to source",
            m.received.clone(),
        );
        registry.register(
            "ztunnel_connection_failures",
            "Connections that failed or were refused, by reason",
            m.errors.clone(),
        );
        registry.register(
            "ztunnel_config_errors",
            "Config objects or files rejected",
            m.config_errors.clone(),
        );
        m
    }

    pub fn opened(&self, r: &mut ConnRecord) {
        r.opened = true;
        self.opened.get_or_create(&labels(r)).inc();
    }

    pub fn closed(&self, r: &ConnRecord) {
        if r.opened {
            let l = labels(r);
            self.closed.get_or_create(&l).inc();
            self.sent.get_or_create(&l).inc_by(r.bytes_sent);
            self.received.get_or_create(&l).inc_by(r.bytes_received);
        }
        if r.outcome != Outcome::Ok {
            let reason = r.reason.clone().unwrap_or_else(|| "unknown".into());
            let reason = reason.split(':').next().unwrap_or_default().to_owned();
            self.errors.get_or_create(&ReasonLabels { reason }).inc();
        }
    }

    pub fn failure(&self, reason: &str) {
        self.errors
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn config_error(&self) {
        self.config_errors.inc();
    }
}

fn labels(r: &ConnRecord) -> TcpLabels {
    let v = |o: &Option<String>| o.clone().unwrap_or_else(|| "unknown".into());
    let principal = |o: &Option<String>| {
        o.as_deref()
            .map(|s| s.trim_start_matches("spiffe://").to_owned())
            .unwrap_or_else(|| "unknown".into())
    };
    TcpLabels {
        reporter: match r.direction {
            Direction::Outbound => "source",
            Direction::Inbound => "destination",
        },
        source_workload: v(&r.src_workload),
        source_workload_namespace: v(&r.src_namespace),
        source_principal: principal(&r.src_identity),
        destination_workload: v(&r.dst_workload),
        destination_workload_namespace: v(&r.dst_namespace),
        destination_principal: principal(&r.dst_identity),
        destination_service: v(&r.dst_service),
        request_protocol: "tcp",
        response_flags: match r.outcome {
            Outcome::Ok => "-",
            Outcome::Denied => "DENY",
            Outcome::Error => "UF",
        },
        connection_security_policy: if r.mtls { "mutual_tls" } else { "none" },
    }
}

/// One JSON line per connection on stdout, and a channel for in-process observers.
#[derive(Clone)]
pub struct AccessLog {
    stdout: bool,
    tx: broadcast::Sender<Arc<ConnRecord>>,
}

impl AccessLog {
    pub fn new(stdout: bool) -> Self {
        let (tx, _) = broadcast::channel(4096);
        AccessLog { stdout, tx }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ConnRecord>> {
        self.tx.subscribe()
    }

    pub fn emit(&self, r: ConnRecord) {
        if self.stdout {
            if let Ok(mut line) = serde_json::to_vec(&r) {
                line.push(b'\n');
                let _ = std::io::stdout().lock().write_all(&line);
            }
        }
        let _ = self.tx.send(Arc::new(r));
    }
}
