//! A certificate authority that signs workload CSRs into SPIFFE leaf certificates.
//! Used in local mode by ztunnel (a development CA given on the command line) and by the
//! controller. It never decides who may have an identity: callers authorize first.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

use super::{pem, TlsError, WorkloadCert};
use crate::identity::Identity;

/// Certificates are backdated this much to tolerate clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA key or certificate: {0}")]
    Load(String),
    #[error("CSR cannot be parsed or its signature is bad: {0}")]
    Csr(rcgen::Error),
    #[error("CSR key is not ECDSA P-256")]
    KeyType,
    #[error("CSR must carry exactly one SAN, the URI {expected}; it has {found:?}")]
    San {
        expected: Identity,
        found: Vec<String>,
    },
    #[error("signing: {0}")]
    Sign(rcgen::Error),
    #[error("issued certificate unusable: {0}")]
    Tls(#[from] TlsError),
}

pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    /// What follows a signed leaf in the chain it is handed: the signing certificate and
    /// any intermediates, then the root.
    above_leaf: Vec<CertificateDer<'static>>,
    root_pem: String,
    key_pem: String,
}

/// Never prints the key.
impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("certificates_above_leaf", &self.above_leaf.len())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed root, ECDSA P-256, valid ten years.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "mesh root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + Duration::from_secs(10 * 365 * 86400)).into();
        let cert = params.self_signed(&key).map_err(CaError::Sign)?;
        let key_pem = key.serialize_pem();
        Ok(CertificateAuthority {
            above_leaf: vec![cert.der().clone()],
            root: cert.der().clone(),
            root_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// An existing CA from its certificate and PKCS#8 key in PEM files (a development CA
    /// given to a proxy on the command line).
    pub fn from_pem_files(cert: &std::path::Path, key: &std::path::Path) -> Result<Self, CaError> {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .map_err(|e| CaError::Load(format!("reading {}: {e}", p.display())))
        };
        Self::from_pem(&read(cert)?, &read(key)?)
    }

    /// An existing CA from its certificate and PKCS#8 key in PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Load(format!("key: {e}")))?;
        let root = first_cert(cert_pem, "the CA PEM")?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| CaError::Load(format!("certificate: {e}")))?;
        Ok(CertificateAuthority {
            issuer,
            above_leaf: vec![root.clone()],
            root,
            root_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        })
    }

    /// An operator's CA in Istio's plug-in layout: `ca_cert_pem` signs (an intermediate,
    /// or the root itself), `cert_chain_pem` runs from it to the root, `root_cert_pem` is
    /// the root workloads trust. The chain must start with the signing certificate and
    /// end with the root.
    pub fn from_plugin(
        ca_cert_pem: &str,
        ca_key_pem: &str,
        cert_chain_pem: &str,
        root_cert_pem: &str,
    ) -> Result<Self, CaError> {
        let key =
            KeyPair::from_pem(ca_key_pem).map_err(|e| CaError::Load(format!("ca-key: {e}")))?;
        let signing = first_cert(ca_cert_pem, "ca-cert")?;
        let root = first_cert(root_cert_pem, "root-cert")?;
        let chain = pem::certs(cert_chain_pem)?;
        match (chain.first(), chain.last()) {
            (Some(first), Some(last)) if *first == signing && *last == root => {}
            _ => {
                return Err(CaError::Load(
                    "cert-chain must start with ca-cert and end with root-cert".into(),
                ))
            }
        }
        let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, key)
            .map_err(|e| CaError::Load(format!("ca-cert: {e}")))?;
        Ok(CertificateAuthority {
            issuer,
            root,
            above_leaf: chain,
            root_pem: root_cert_pem.to_owned(),
            key_pem: ca_key_pem.to_owned(),
        })
    }

    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Signs a CSR whose only SAN must be `identity`'s URI. Returns the chain, leaf first,
    /// root last.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let now = SystemTime::now();
        self.sign_csr_valid(csr_pem, identity, now - BACKDATE, now + lifetime)
    }

    /// As `sign_csr`, with an explicit validity window (tests make expired certificates).
    pub fn sign_csr_valid(
        &self,
        csr_pem: &str,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::Csr)?;
        if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::KeyType);
        }
        let want = identity.to_string();
        let found: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| format!("{s:?}"))
            .collect();
        let ok = matches!(csr.params.subject_alt_names.as_slice(),
            [SanType::URI(u)] if u.as_str() == want);
        if !ok {
            return Err(CaError::San {
                expected: identity.clone(),
                found,
            });
        }
        let params = leaf_params(identity, not_before, not_after)?;
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(CaError::Sign)?;
        let mut chain = vec![signed.der().clone()];
        chain.extend(self.above_leaf.iter().cloned());
        Ok(chain)
    }

    /// Generates a key for `identity` and signs it: local mode, where the proxy holds the CA.
    pub fn issue(&self, identity: &Identity, lifetime: Duration) -> Result<WorkloadCert, CaError> {
        let now = SystemTime::now();
        self.issue_valid(identity, now - BACKDATE, now + lifetime)
    }

    pub fn issue_valid(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, CaError> {
        let (key, csr) = generate_csr(identity)?;
        let mut chain = self.sign_csr_valid(&csr, identity, not_before, not_after)?;
        chain.pop(); // the root travels as a trust anchor, not in the presented chain
        Ok(WorkloadCert::new(
            identity.clone(),
            chain,
            key,
            vec![self.root.clone()],
        )?)
    }
}

impl CertificateAuthority {
    /// A TLS serving certificate for the controller's own endpoints: DNS and IP SANs, no
    /// SPIFFE identity, a fresh ECDSA P-256 key. Returns the chain (leaf first, root last)
    /// and the key.
    pub fn issue_serving(
        &self,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivatePkcs8KeyDer<'static>), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = Vec::new();
        for name in dns_names {
            let dns = name.clone().try_into().map_err(CaError::Sign)?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + lifetime).into();
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Sign)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.above_leaf.iter().cloned());
        Ok((chain, PrivatePkcs8KeyDer::from(key.serialize_der())))
    }
}

fn first_cert(pem_text: &str, what: &str) -> Result<CertificateDer<'static>, CaError> {
    pem::certs(pem_text)?
        .into_iter()
        .next()
        .ok_or_else(|| CaError::Load(format!("no certificate in {what}")))
}

/// A fresh ECDSA P-256 key and a CSR for `identity` (PEM).
pub fn generate_csr(identity: &Identity) -> Result<(PrivatePkcs8KeyDer<'static>, String), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        identity.to_string().try_into().map_err(CaError::Sign)?,
    )];
    let csr = params.serialize_request(&key).map_err(CaError::Sign)?;
    let pem = csr.pem().map_err(CaError::Sign)?;
    Ok((PrivatePkcs8KeyDer::from(key.serialize_der()), pem))
}

fn leaf_params(
    identity: &Identity,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        identity.to_string().try_into().map_err(CaError::Sign)?,
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    Ok(params)
}
