//! HBONE connection and handshake metrics, shared by client and server.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideLabels {
    side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    code: u16,
    reason: &'static str,
}

#[derive(Clone, Debug, Default)]
pub struct HboneMetrics {
    tls_failures: Family<SideLabels, Counter>,
    pool_connections_opened: Counter,
    pool_connections_open: Gauge,
    server_connections: Counter,
    rejected: Family<RejectLabels, Counter>,
}

impl HboneMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = HboneMetrics::default();
        let r = registry.sub_registry_with_prefix("hbone");
        r.register(
            "tls_handshake_failures",
            "TLS handshakes that failed (bad or missing certificate, wrong identity, timeout)",
            m.tls_failures.clone(),
        );
        r.register(
            "pool_connections_opened",
            "HBONE client connections dialed",
            m.pool_connections_opened.clone(),
        );
        r.register(
            "pool_connections",
            "HBONE client connections open now",
            m.pool_connections_open.clone(),
        );
        r.register(
            "server_connections",
            "HBONE connections accepted",
            m.server_connections.clone(),
        );
        r.register(
            "requests_rejected",
            "HBONE requests answered with an error status or reset",
            m.rejected.clone(),
        );
        m
    }

    pub(crate) fn tls_failure(&self, side: &'static str) {
        self.tls_failures.get_or_create(&SideLabels { side }).inc();
    }

    pub fn tls_failures(&self, side: &'static str) -> u64 {
        self.tls_failures.get_or_create(&SideLabels { side }).get()
    }

    pub(crate) fn connection_opened(&self) {
        self.pool_connections_opened.inc();
        self.pool_connections_open.inc();
    }

    pub(crate) fn connection_closed(&self) {
        self.pool_connections_open.dec();
    }

    pub fn pool_connections_opened(&self) -> u64 {
        self.pool_connections_opened.get()
    }

    pub(crate) fn server_connection(&self) {
        self.server_connections.inc();
    }

    pub fn rejected(&self, code: u16, reason: &'static str) {
        self.rejected
            .get_or_create(&RejectLabels { code, reason })
            .inc();
    }
}
