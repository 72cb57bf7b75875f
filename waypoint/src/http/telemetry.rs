//! What the waypoint reports about each request: Istio's L7 metrics (reporter
//! "waypoint") and one JSON access-log line on stdout, both built
//! from one [`Record`] so they never disagree.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::backend::{Downstream, Endpoint};

/// Everything known about one request, filled in as it progresses.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub timestamp: String,
    #[serde(skip)]
    pub start: Instant,
    pub source_address: SocketAddr,
    pub source_principal: Option<String>,
    pub source_namespace: Option<String>,
    /// `<namespace>/<hostname>`.
    pub service: String,
    pub port: u16,
    pub method: String,
    pub path: String,
    pub authority: String,
    pub protocol: &'static str,
    pub route: Option<String>,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_workload: Option<String>,
    pub upstream_namespace: Option<String>,
    pub upstream_principal: Option<String>,
    pub attempts: u32,
    pub response_code: u16,
    pub response_flags: &'static str,
    pub grpc_status: Option<String>,
    pub error: Option<String>,
    pub trace_id: String,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub duration_ms: f64,
    /// Shared with the request body's counter.
    #[serde(skip)]
    pub request_counter: Arc<AtomicU64>,
}

impl Record {
    pub fn new<B>(req: &http::Request<B>, ds: &Downstream, grpc: bool) -> Record {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                let host = req.headers().get(http::header::HOST)?;
                host.to_str().ok().map(str::to_owned)
            })
            .unwrap_or_default();
        Record {
            timestamp: now_rfc3339(),
            start: Instant::now(),
            source_address: ds.peer,
            source_principal: ds.identity.as_ref().map(|i| i.principal()),
            source_namespace: ds.identity.as_ref().map(|i| i.namespace().to_owned()),
            service: ds.service.clone(),
            port: ds.port,
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
            authority,
            protocol: if grpc { "grpc" } else { "http" },
            route: None,
            upstream_host: None,
            upstream_workload: None,
            upstream_namespace: None,
            upstream_principal: None,
            attempts: 0,
            response_code: 0,
            response_flags: "-",
            grpc_status: None,
            error: None,
            trace_id: String::new(),
            request_bytes: 0,
            response_bytes: 0,
            duration_ms: 0.0,
            request_counter: Arc::default(),
        }
    }

    pub fn set_upstream(&mut self, ep: &Endpoint) {
        self.upstream_host = Some(ep.addr);
        self.upstream_workload = Some(ep.workload.clone());
        self.upstream_namespace = Some(ep.namespace.clone());
        self.upstream_principal = ep.identity.as_ref().map(|i| i.principal());
    }
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    reporter: &'static str,
    source_workload: String,
    source_workload_namespace: String,
    source_principal: String,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_service: String,
    destination_service_name: String,
    destination_service_namespace: String,
    request_protocol: &'static str,
    response_code: String,
    response_flags: &'static str,
    grpc_response_status: String,
    connection_security_policy: &'static str,
}

type HistogramFamily = Family<HttpLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // Istio's buckets for istio_request_duration_milliseconds.
    let buckets = [
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ];
    Histogram::new(buckets)
}

fn bytes_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1.0, 10.0, 10,
    ))
}

/// L7 metrics and the access log; cheap to clone (shared families).
#[derive(Clone)]
pub struct Telemetry {
    requests: Family<HttpLabels, Counter>,
    duration: HistogramFamily,
    request_bytes: HistogramFamily,
    response_bytes: HistogramFamily,
    log: broadcast::Sender<Arc<Record>>,
}

impl Telemetry {
    pub fn new(registry: &mut Registry) -> Telemetry {
        let t = Telemetry {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(bytes_histogram),
            response_bytes: Family::new_with_constructor(bytes_histogram),
            log: broadcast::channel(4096).0,
        };
        // prometheus-client appends `_total` to counters itself.
        registry.register("istio_requests", "Requests", t.requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            t.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            t.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            t.response_bytes.clone(),
        );
        t
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Record>> {
        self.log.subscribe()
    }

    pub fn emit(&self, mut r: Record) {
        r.duration_ms = r.start.elapsed().as_secs_f64() * 1000.0;
        r.request_bytes = r.request_counter.load(Ordering::Relaxed);
        let l = labels(&r);
        self.requests.get_or_create(&l).inc();
        self.duration.get_or_create(&l).observe(r.duration_ms);
        self.request_bytes
            .get_or_create(&l)
            .observe(r.request_bytes as f64);
        self.response_bytes
            .get_or_create(&l)
            .observe(r.response_bytes as f64);
        // One JSON line per request on stdout, as the ztunnel logs connections: the
        // access log a collector reads, apart from the process's own log on stderr.
        if let Ok(mut line) = serde_json::to_vec(&r) {
            line.push(b'\n');
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), &line);
        }
        let _ = self.log.send(Arc::new(r));
    }
}

fn labels(r: &Record) -> HttpLabels {
    let v = |o: &Option<String>| o.clone().unwrap_or_else(|| "unknown".into());
    let (svc_ns, host) = r.service.split_once('/').unwrap_or(("unknown", &r.service));
    let svc_name = host.split('.').next().unwrap_or(host);
    HttpLabels {
        reporter: "waypoint",
        // The tunnel carries the client's identity, not its workload name.
        source_workload: "unknown".into(),
        source_workload_namespace: v(&r.source_namespace),
        source_principal: v(&r.source_principal),
        destination_workload: v(&r.upstream_workload),
        destination_workload_namespace: v(&r.upstream_namespace),
        destination_principal: v(&r.upstream_principal),
        destination_service: host.to_owned(),
        destination_service_name: svc_name.to_owned(),
        destination_service_namespace: svc_ns.to_owned(),
        request_protocol: r.protocol,
        response_code: r.response_code.to_string(),
        response_flags: r.response_flags,
        grpc_response_status: r.grpc_status.clone().unwrap_or_default(),
        connection_security_policy: "mutual_tls",
    }
}
