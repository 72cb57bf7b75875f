//! The node's workload certificates: one per identity of a local workload, issued ahead
//! of need, renewed at half life, replaced whole so established connections keep theirs.
//!
//! In local mode certificates come from a development CA given on the command line; the
//! controller issue replaces the issuer, not this cache. Reads are lock-free.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use mesh_core::tls::{CaError, CertificateAuthority, TlsError, WorkloadCert};
use mesh_core::Identity;
use serde::Serialize;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("issuing certificate for {identity}: {source}")]
    Issue {
        identity: Identity,
        source: Box<CaError>,
    },
    #[error("TLS config for {identity}: {source}")]
    Tls {
        identity: Identity,
        source: Box<TlsError>,
    },
}

/// A certificate and the server config built from it, swapped together.
pub struct Entry {
    pub cert: Arc<WorkloadCert>,
    pub server: Arc<rustls::ServerConfig>,
}

pub struct CertManager {
    ca: CertificateAuthority,
    lifetime: Duration,
    entries: ArcSwap<HashMap<Identity, Arc<Entry>>>,
    write: Mutex<()>,
}

/// What `/config_dump` shows of a certificate.
#[derive(Serialize)]
pub struct CertSummary {
    pub identity: String,
    pub not_before: u64,
    pub not_after: u64,
    pub refresh_at: u64,
}

impl CertManager {
    pub fn new(ca: CertificateAuthority, lifetime: Duration) -> Self {
        CertManager {
            ca,
            lifetime,
            entries: ArcSwap::from_pointee(HashMap::new()),
            write: Mutex::new(()),
        }
    }

    pub fn get(&self, id: &Identity) -> Option<Arc<Entry>> {
        self.entries.load().get(id).cloned()
    }

    /// The certificate for `id`, issued now if we do not hold one.
    pub fn get_or_issue(&self, id: &Identity) -> Result<Arc<Entry>, CertError> {
        match self.get(id) {
            Some(e) => Ok(e),
            None => self.issue(id),
        }
    }

    /// Issues (or re-issues) the certificate for `id` and swaps it in.
    pub fn issue(&self, id: &Identity) -> Result<Arc<Entry>, CertError> {
        let cert = self
            .ca
            .issue(id, self.lifetime)
            .map_err(|source| CertError::Issue {
                identity: id.clone(),
                source: Box::new(source),
            })?;
        let server = cert.server_config().map_err(|source| CertError::Tls {
            identity: id.clone(),
            source: Box::new(source),
        })?;
        let entry = Arc::new(Entry {
            cert: Arc::new(cert),
            server,
        });
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let mut map = HashMap::clone(&self.entries.load());
        map.insert(id.clone(), entry.clone());
        self.entries.store(Arc::new(map));
        info!(identity = %id, "certificate issued");
        Ok(entry)
    }

    /// Holds certificates for exactly `wanted`: issues missing ones, drops the rest.
    pub fn reconcile(&self, wanted: &BTreeSet<Identity>) {
        for id in wanted {
            if self.get(id).is_none() {
                if let Err(e) = self.issue(id) {
                    warn!("{e}");
                }
            }
        }
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let mut map = HashMap::clone(&self.entries.load());
        map.retain(|id, _| wanted.contains(id));
        self.entries.store(Arc::new(map));
    }

    /// Renews every certificate past its refresh time. Called periodically.
    pub fn renew_due(&self) {
        let now = SystemTime::now();
        let due: Vec<Identity> = self
            .entries
            .load()
            .iter()
            .filter(|(_, e)| e.cert.refresh_at() <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Err(e) = self.issue(&id) {
                warn!("renewal failed, keeping the current certificate: {e}");
            }
        }
    }

    pub fn summary(&self) -> Vec<CertSummary> {
        let secs = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
        };
        let mut out: Vec<CertSummary> = self
            .entries
            .load()
            .values()
            .map(|e| CertSummary {
                identity: e.cert.identity().to_string(),
                not_before: secs(e.cert.not_before()),
                not_after: secs(e.cert.not_after()),
                refresh_at: secs(e.cert.refresh_at()),
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}
