//! Workload certificates and the rustls configurations built from them.
//!
//! Owns: the mesh's TLS policy (TLS 1.3 only, AES-GCM suites, ALPN `h2`, mutual
//! authentication, SPIFFE identity checks), the development/controller CA and key/CSR
//! generation. It does not fetch or rotate certificates: callers hold `WorkloadCert`s and
//! build a fresh config when one is replaced, so established connections keep the old one.

mod ca;
mod verify;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

pub use ca::{generate_csr, CaError, CertificateAuthority};
pub use verify::{TrustDomainClientVerifier, WorkloadServerVerifier};

use crate::identity::Identity;

pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("no root certificate could be loaded: {0}")]
    Roots(String),
    #[error("certificate has no SPIFFE URI SAN")]
    NoSpiffeId,
    #[error("certificate SPIFFE id: {0}")]
    BadSpiffeId(#[from] crate::identity::IdentityError),
    #[error("certificate cannot be parsed: {0}")]
    Parse(String),
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// The one crypto provider of the mesh: ring, TLS 1.3 AES-GCM suites only.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    let mut p = default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(p)
}

/// A workload's key, its certificate chain (leaf first, root excluded) and the roots it
/// trusts. Immutable: rotation replaces the whole value.
pub struct WorkloadCert {
    identity: Identity,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    roots: Vec<CertificateDer<'static>>,
    not_before: SystemTime,
    not_after: SystemTime,
    /// When this certificate was built from its chain (issued or fetched).
    received: SystemTime,
    certified: Arc<CertifiedKey>,
    root_store: Arc<RootCertStore>,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl WorkloadCert {
    /// Builds from a signed chain. The leaf's SPIFFE id must be `identity`.
    pub fn new(
        identity: Identity,
        chain: Vec<CertificateDer<'static>>,
        key: PrivatePkcs8KeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, TlsError> {
        let leaf = chain.first().ok_or(TlsError::NoPeerCertificate)?;
        let found = identity_of(leaf)?;
        if found != identity {
            return Err(TlsError::Parse(format!(
                "leaf certificate is for {found}, expected {identity}"
            )));
        }
        let (not_before, not_after) = validity_of(leaf)?;
        let signing = provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(key.clone_key()))?;
        let certified = Arc::new(CertifiedKey::new(chain.clone(), signing));
        let mut store = RootCertStore::empty();
        let (added, _) = store.add_parsable_certificates(roots.iter().cloned());
        if added == 0 {
            return Err(TlsError::Roots("no usable root in bundle".into()));
        }
        Ok(WorkloadCert {
            identity,
            chain,
            key,
            roots,
            not_before,
            not_after,
            received: SystemTime::now(),
            certified,
            root_store: Arc::new(store),
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn key(&self) -> &PrivatePkcs8KeyDer<'static> {
        &self.key
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The moment to renew: half of the lifetime, as Istio does, counted from when we got
    /// the certificate (or from not_before if later): CAs backdate not_before for clock
    /// skew, which would otherwise make short-lived certificates due at once.
    pub fn refresh_at(&self) -> SystemTime {
        let start = self.received.max(self.not_before);
        let life = self
            .not_after
            .duration_since(start)
            .unwrap_or(Duration::ZERO);
        start + life / 2
    }

    /// Server side of HBONE: requires a client certificate chained to our roots from our
    /// trust domain.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = TrustDomainClientVerifier::new(
            self.root_store.clone(),
            self.identity.trust_domain().to_owned(),
        )?;
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                self.certified.clone(),
            )));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        cfg.max_early_data_size = 0;
        cfg.send_tls13_tickets = 0;
        Ok(Arc::new(cfg))
    }

    /// Client side of HBONE toward a peer that must present exactly `expected`.
    pub fn client_config(&self, expected: &Identity) -> Result<Arc<ClientConfig>, TlsError> {
        let verifier = WorkloadServerVerifier::new(self.root_store.clone(), expected.clone());
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                self.certified.clone(),
            )));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(cfg))
    }
}

/// The SPIFFE identity in a certificate's URI SAN.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    let (_, x509) =
        X509Certificate::from_der(cert.as_ref()).map_err(|e| TlsError::Parse(e.to_string()))?;
    let sans = x509
        .subject_alternative_name()
        .map_err(|e| TlsError::Parse(e.to_string()))?
        .ok_or(TlsError::NoSpiffeId)?;
    let mut uris = sans.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    });
    let uri = uris.next().ok_or(TlsError::NoSpiffeId)?;
    if uris.next().is_some() {
        return Err(TlsError::Parse("more than one SPIFFE id".into()));
    }
    Ok(uri.parse()?)
}

fn validity_of(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), TlsError> {
    let (_, x509) =
        X509Certificate::from_der(cert.as_ref()).map_err(|e| TlsError::Parse(e.to_string()))?;
    let v = x509.validity();
    let to_sys = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    Ok((
        to_sys(v.not_before.timestamp()),
        to_sys(v.not_after.timestamp()),
    ))
}

/// PEM helpers shared by the CA, the proxies and tests.
pub mod pem {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

    pub fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, super::TlsError> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| super::TlsError::Parse(format!("certificate PEM: {e}")))
    }

    pub fn key(pem: &str) -> Result<PrivatePkcs8KeyDer<'static>, super::TlsError> {
        PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| super::TlsError::Parse(format!("PKCS#8 key PEM: {e}")))
    }

    pub fn encode_cert(der: &CertificateDer<'_>) -> String {
        encode("CERTIFICATE", der.as_ref())
    }

    pub fn encode_key(der: &PrivatePkcs8KeyDer<'_>) -> String {
        encode("PRIVATE KEY", der.secret_pkcs8_der())
    }

    fn encode(label: &str, der: &[u8]) -> String {
        ::pem::encode(&::pem::Pem::new(label, der.to_vec()))
    }
}

#[cfg(test)]
mod tests;
