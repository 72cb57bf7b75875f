//! The certificate authority's gRPC service, `istio.v1.auth.IstioCertificateService`:
//! signs a workload's CSR into a short-lived SPIFFE certificate.
//!
//! Who may have which identity: the caller proves itself with `authorization: Bearer
//! <token>` ([`Authenticator`]). Without `ImpersonatedIdentity` in the request metadata it
//! gets its own identity; with it, only a node proxy may ask, and only for an identity with
//! a pod scheduled on its own node ([`Placement`]). The CSR must be ECDSA P-256 and carry
//! exactly the granted identity's URI SAN; a lifetime above the cap is refused.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateService;
use mesh_core::proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use mesh_core::tls::{pem, CaError, CertificateAuthority};
use mesh_core::Identity;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

#[cfg(test)]
mod tests;

/// The metadata key a node proxy sets to ask for a workload's identity.
pub use mesh_core::ca_client::IMPERSONATED_IDENTITY;
/// Lifetime given when the request names none.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Who called, as their token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub identity: Identity,
    /// Set for node proxies (ztunnels): the node they serve.
    pub node: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token in the authorization header")]
    Missing,
    #[error("unknown or invalid token")]
    Invalid,
    /// The token was checked and refused, for this reason.
    #[error("token refused: {0}")]
    Refused(String),
    /// The token could not be checked (the API server failed or is away).
    #[error("token review failed: {0}")]
    Unavailable(String),
}

/// Turns a bearer token into a caller: Kubernetes TokenReview, or a token file.
#[tonic::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthError>;
}

/// Which node runs pods of an identity: the controller's view of scheduled pods.
pub trait Placement: Send + Sync + 'static {
    fn scheduled_on(&self, identity: &Identity, node: &str) -> bool;
}

/// Local mode's authenticator: a YAML list of `{token, identity, node}` (node only for
/// node proxies). Tokens are compared whole; the file should be mode 0600.
#[derive(Debug, Default)]
pub struct TokenFile {
    callers: HashMap<String, Caller>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    token: String,
    identity: String,
    node: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Invalid { path: String, detail: String },
}

impl TokenFile {
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|detail| TokenFileError::Invalid {
            path: path.display().to_string(),
            detail,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let entries: Vec<TokenEntry> = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let mut callers = HashMap::new();
        for (i, e) in entries.into_iter().enumerate() {
            if e.token.len() < 16 {
                return Err(format!("entry {i}: token shorter than 16 characters"));
            }
            let identity: Identity = e
                .identity
                .parse()
                .map_err(|err| format!("entry {i}: identity {:?}: {err}", e.identity))?;
            let caller = Caller {
                identity,
                node: e.node,
            };
            if callers.insert(e.token, caller).is_some() {
                return Err(format!("entry {i}: token listed twice"));
            }
        }
        Ok(TokenFile { callers })
    }
}

#[tonic::async_trait]
impl Authenticator for TokenFile {
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        self.callers.get(token).cloned().ok_or(AuthError::Invalid)
    }
}

/// Kubernetes mode's authenticator: a TokenReview (authentication.k8s.io/v1) for the CA's
/// audience. `system:serviceaccount:NS:SA` is the identity; the node proxies' service
/// account gets the node its bound token names (the `authentication.kubernetes.io/node-name`
/// extra), which lets it ask for the identities of pods on that node, as a token file's
/// `node` does. Any other service account is a workload and gets its own identity only.
pub struct TokenReviewer {
    client: kube::Client,
    trust_domain: String,
    /// namespace/name of the node proxies' service account.
    node_proxy: (String, String),
}

/// The audience the proxies' projected tokens are minted for.
pub const CA_AUDIENCE: &str = "istio-ca";
/// The user extra of a bound token that names the node of its pod.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

impl TokenReviewer {
    /// `system_namespace`'s `ztunnel` service account is the node proxies'.
    pub fn new(client: kube::Client, trust_domain: &str, system_namespace: &str) -> Self {
        TokenReviewer {
            client,
            trust_domain: trust_domain.to_owned(),
            node_proxy: (system_namespace.to_owned(), "ztunnel".to_owned()),
        }
    }

    /// The caller a review's answer names, or why it is refused.
    pub fn caller(
        &self,
        status: k8s_openapi::api::authentication::v1::TokenReviewStatus,
    ) -> Result<Caller, AuthError> {
        if status.authenticated != Some(true) {
            let why = status.error.filter(|e| !e.is_empty());
            return Err(AuthError::Refused(
                why.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        if !status.audiences.iter().flatten().any(|a| a == CA_AUDIENCE) {
            return Err(AuthError::Refused(format!(
                "not valid for the audience {CA_AUDIENCE}"
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((ns, sa)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(AuthError::Refused(format!(
                "{username:?} is not a service account"
            )));
        };
        let identity = Identity::new(&self.trust_domain, ns, sa)
            .map_err(|e| AuthError::Refused(format!("{username}: {e}")))?;
        let node = if (ns, sa) == (self.node_proxy.0.as_str(), self.node_proxy.1.as_str()) {
            user.extra
                .as_ref()
                .and_then(|extra| extra.get(NODE_NAME_EXTRA))
                .and_then(|nodes| nodes.first())
                .filter(|n| !n.is_empty())
                .cloned()
        } else {
            None
        };
        Ok(Caller { identity, node })
    }
}

#[tonic::async_trait]
impl Authenticator for TokenReviewer {
    async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let review = TokenReview {
            metadata: Default::default(),
            spec: TokenReviewSpec {
                audiences: Some(vec![CA_AUDIENCE.to_owned()]),
                token: Some(token.to_owned()),
            },
            status: None,
        };
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let answer = api
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let status = answer.status.ok_or_else(|| {
            AuthError::Unavailable("the TokenReview came back without a status".into())
        })?;
        self.caller(status)
    }
}

/// Placement from a list of (identity, node) pairs, one per scheduled pod.
#[derive(Debug, Default)]
pub struct PodPlacement {
    pods: Vec<(Identity, String)>,
}

impl PodPlacement {
    pub fn new(pods: impl IntoIterator<Item = (Identity, String)>) -> Self {
        PodPlacement {
            pods: pods.into_iter().collect(),
        }
    }
}

impl Placement for PodPlacement {
    fn scheduled_on(&self, identity: &Identity, node: &str) -> bool {
        self.pods.iter().any(|(i, n)| i == identity && n == node)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    reason: &'static str,
}

#[derive(Clone)]
pub struct CaMetrics {
    signed: Counter,
    refused: Family<RefusedLabels, Counter>,
}

impl CaMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = CaMetrics {
            signed: Counter::default(),
            refused: Family::default(),
        };
        registry.register(
            "mesh_ca_certificates_signed",
            "Certificates signed",
            m.signed.clone(),
        );
        registry.register(
            "mesh_ca_requests_refused",
            "Certificate requests refused, by reason",
            m.refused.clone(),
        );
        m
    }

    pub fn signed(&self) -> u64 {
        self.signed.get()
    }

    pub fn refused(&self, reason: &'static str) -> u64 {
        self.refused.get_or_create(&RefusedLabels { reason }).get()
    }
}

pub struct CaService {
    ca: Arc<CertificateAuthority>,
    auth: Arc<dyn Authenticator>,
    placement: Arc<dyn Placement>,
    max_lifetime: Duration,
    metrics: CaMetrics,
}

impl CaService {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        auth: Arc<dyn Authenticator>,
        placement: Arc<dyn Placement>,
        max_lifetime: Duration,
        metrics: CaMetrics,
    ) -> Self {
        CaService {
            ca,
            auth,
            placement,
            max_lifetime,
            metrics,
        }
    }

    fn refuse(&self, reason: &'static str, status: Status) -> Status {
        self.metrics
            .refused
            .get_or_create(&RefusedLabels { reason })
            .inc();
        warn!(reason, "certificate request refused: {}", status.message());
        status
    }

    fn sign(
        &self,
        caller: &Caller,
        req: &IstioCertificateRequest,
    ) -> Result<(Identity, Vec<String>), Status> {
        let identity = match impersonated(req)
            .map_err(|m| self.refuse("bad_metadata", Status::invalid_argument(m)))?
        {
            None => caller.identity.clone(),
            Some(wanted) => {
                let Some(node) = &caller.node else {
                    return Err(self.refuse(
                        "impersonation_not_allowed",
                        Status::permission_denied(format!(
                            "{} is not a node proxy and may not ask for {wanted}",
                            caller.identity
                        )),
                    ));
                };
                if !self.placement.scheduled_on(&wanted, node) {
                    return Err(self.refuse(
                        "not_on_node",
                        Status::permission_denied(format!(
                            "no pod of {wanted} is scheduled on node {node}"
                        )),
                    ));
                }
                wanted
            }
        };
        let lifetime = match req.validity_duration {
            0 => DEFAULT_LIFETIME.min(self.max_lifetime),
            s if s < 0 => {
                return Err(self.refuse(
                    "bad_lifetime",
                    Status::invalid_argument(format!("negative validity_duration {s}")),
                ))
            }
            s if s as u64 > self.max_lifetime.as_secs() => {
                return Err(self.refuse(
                    "lifetime_too_long",
                    Status::invalid_argument(format!(
                        "validity_duration {s} s exceeds the maximum of {} s",
                        self.max_lifetime.as_secs()
                    )),
                ))
            }
            s => Duration::from_secs(s as u64),
        };
        let chain = self
            .ca
            .sign_csr(&req.csr, &identity, lifetime)
            .map_err(|e| {
                let reason = match e {
                    CaError::KeyType => "key_type",
                    CaError::San { .. } => "san",
                    CaError::Csr(_) => "bad_csr",
                    _ => "signing",
                };
                self.refuse(reason, Status::invalid_argument(e.to_string()))
            })?;
        Ok((
            identity,
            chain.iter().map(|c| pem::encode_cert(c)).collect(),
        ))
    }
}

/// The identity named by `ImpersonatedIdentity`, if the request carries one.
fn impersonated(req: &IstioCertificateRequest) -> Result<Option<Identity>, String> {
    use prost_types::value::Kind;
    let Some(field) = req
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    match &field.kind {
        Some(Kind::StringValue(s)) => s
            .parse()
            .map(Some)
            .map_err(|e| format!("{IMPERSONATED_IDENTITY} {s:?}: {e}")),
        other => Err(format!(
            "{IMPERSONATED_IDENTITY} must be a string, got {other:?}"
        )),
    }
}

fn bearer<T>(req: &Request<T>) -> Result<&str, AuthError> {
    let value = req
        .metadata()
        .get("authorization")
        .ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::Invalid)?;
    value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Invalid)
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let token = bearer(&request)
            .map_err(|e| self.refuse("unauthenticated", Status::unauthenticated(e.to_string())))?;
        let caller = self.auth.authenticate(token).await.map_err(|e| match e {
            AuthError::Unavailable(_) => {
                self.refuse("auth_unavailable", Status::unavailable(e.to_string()))
            }
            _ => self.refuse("unauthenticated", Status::unauthenticated(e.to_string())),
        })?;
        let (identity, cert_chain) = self.sign(&caller, request.get_ref())?;
        self.metrics.signed.inc();
        info!(caller = %caller.identity, %identity, "certificate signed");
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}
