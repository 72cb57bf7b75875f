//! Workload certificates a proxy holds: one per identity (a ztunnel's local workloads,
//! a waypoint's own), issued ahead of need (or on demand), renewed at half life, replaced
//! whole so established connections keep theirs. A certificate that could not be had is retried every tick;
//! one that cannot be renewed stays in use until it expires.
//!
//! The issuer is the controller's CA (CreateCertificate, asking on the workload's behalf)
//! or, in local mode, a development CA given on the command line. Reads are lock-free.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::ca_client::{CaClient, CaClientError};
use crate::tls::{CaError, CertificateAuthority, TlsError, WorkloadCert};
use crate::Identity;
use arc_swap::ArcSwap;
use serde::Serialize;
use tracing::{info, warn};

/// Where certificates come from.
pub enum Issuer {
    /// Signs locally (local mode's development CA).
    Local(Box<CertificateAuthority>),
    /// Asks the controller.
    Remote(CaClient),
}

impl Issuer {
    async fn issue(&self, id: &Identity, lifetime: Duration) -> Result<WorkloadCert, CertError> {
        match self {
            Issuer::Local(ca) => ca.issue(id, lifetime).map_err(|source| CertError::Issue {
                identity: id.clone(),
                source: Box::new(source),
            }),
            Issuer::Remote(client) => {
                client
                    .fetch(id, lifetime)
                    .await
                    .map_err(|source| CertError::Fetch {
                        identity: id.clone(),
                        source: Box::new(source),
                    })
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("issuing certificate for {identity}: {source}")]
    Issue {
        identity: Identity,
        source: Box<CaError>,
    },
    #[error("fetching certificate for {identity}: {source}")]
    Fetch {
        identity: Identity,
        source: Box<CaClientError>,
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
    issuer: Issuer,
    lifetime: Duration,
    entries: ArcSwap<HashMap<Identity, Arc<Entry>>>,
    /// Identities of the node's workloads now: kept, retried when missing.
    wanted: Mutex<BTreeSet<Identity>>,
    write: Mutex<()>,
    /// One request to the issuer at a time, so concurrent callers share a result.
    issuing: tokio::sync::Mutex<()>,
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
    pub fn new(issuer: Issuer, lifetime: Duration) -> Self {
        CertManager {
            issuer,
            lifetime,
            entries: ArcSwap::from_pointee(HashMap::new()),
            wanted: Mutex::new(BTreeSet::new()),
            write: Mutex::new(()),
            issuing: tokio::sync::Mutex::new(()),
        }
    }

    pub fn get(&self, id: &Identity) -> Option<Arc<Entry>> {
        self.entries.load().get(id).cloned()
    }

    /// The certificate for `id`, issued now if we do not hold one.
    pub async fn get_or_issue(&self, id: &Identity) -> Result<Arc<Entry>, CertError> {
        if let Some(e) = self.get(id) {
            return Ok(e);
        }
        let _one = self.issuing.lock().await;
        match self.get(id) {
            Some(e) => Ok(e),
            None => self.issue_locked(id).await,
        }
    }

    /// Issues (or re-issues) the certificate for `id` and swaps it in.
    pub async fn issue(&self, id: &Identity) -> Result<Arc<Entry>, CertError> {
        let _one = self.issuing.lock().await;
        self.issue_locked(id).await
    }

    async fn issue_locked(&self, id: &Identity) -> Result<Arc<Entry>, CertError> {
        let cert = self.issuer.issue(id, self.lifetime).await?;
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

    /// Holds certificates for exactly `wanted`: issues missing ones (waiting at most
    /// `patience` for them; the rest are retried by [`Self::renew_due`]), drops the others.
    pub async fn reconcile(&self, wanted: &BTreeSet<Identity>, patience: Duration) {
        *self.wanted.lock().unwrap_or_else(|e| e.into_inner()) = wanted.clone();
        {
            let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
            let mut map = HashMap::clone(&self.entries.load());
            map.retain(|id, _| wanted.contains(id));
            self.entries.store(Arc::new(map));
        }
        let missing = async {
            for id in wanted {
                if let Err(e) = self.get_or_issue(id).await {
                    warn!("{e}; will retry");
                }
            }
        };
        if tokio::time::timeout(patience, missing).await.is_err() {
            warn!("certificates still missing after {patience:?}; retrying in the background");
        }
    }

    /// Renews every certificate past its refresh time and retries missing ones. Called
    /// periodically.
    pub async fn renew_due(&self) {
        let now = SystemTime::now();
        let entries = self.entries.load_full();
        let wanted = self
            .wanted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let missing = wanted.iter().filter(|id| !entries.contains_key(*id));
        let due = (entries.iter())
            .filter(|(_, e)| e.cert.refresh_at() <= now)
            .map(|(id, _)| id);
        let todo: Vec<Identity> = missing.chain(due).cloned().collect();
        for id in todo {
            if let Err(e) = self.issue(&id).await {
                warn!("renewal failed, keeping the current certificate if any: {e}");
            }
        }
    }

    /// Renews and retries every second, for the life of the process.
    pub async fn renew_forever(&self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            self.renew_due().await;
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
