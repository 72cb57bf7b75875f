//! Certificates from the controller's CA (`istio.v1.auth.IstioCertificateService/
//! CreateCertificate`): a fresh P-256 key and CSR per request, the bearer token of the
//! proxy, and `ImpersonatedIdentity` when a node proxy asks on behalf of a workload.

use std::time::Duration;

use tonic::transport::Channel;

use crate::control_plane::ControlPlane;
use crate::proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::istio::v1::auth::IstioCertificateRequest;
use crate::tls::{self, pem, WorkloadCert};
use crate::xds;
use crate::Identity;

/// The request metadata key naming the identity a node proxy asks for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("the token is not a valid header value")]
    Token,
    #[error("making a CSR: {0}")]
    Csr(#[from] tls::CaError),
    #[error("CA refused or failed: {0}")]
    Status(#[from] tonic::Status),
    #[error("CA answered with an unusable chain: {0}")]
    Chain(String),
}

#[derive(Clone)]
pub struct CaClient {
    channel: Channel,
    token: Option<String>,
    /// Whether to ask for workload identities on their behalf (node proxies).
    impersonate: bool,
}

impl CaClient {
    /// Connects lazily: the first request dials, a lost connection is redialled.
    pub fn new(controller: &ControlPlane, token: Option<String>, impersonate: bool) -> Self {
        Self::from_channel(controller.channel(), token, impersonate)
    }

    /// Over an existing channel (shared with ADS, or made by the caller).
    pub fn from_channel(channel: Channel, token: Option<String>, impersonate: bool) -> Self {
        CaClient {
            channel,
            token,
            impersonate,
        }
    }

    /// A certificate for `identity` valid for `lifetime`, with the CA's root as trust anchor.
    pub async fn fetch(
        &self,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<WorkloadCert, CaClientError> {
        let (key, csr) = tls::generate_csr(identity)?;
        let metadata = self.impersonate.then(|| prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
                },
            )]
            .into(),
        });
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: lifetime.as_secs() as i64,
            metadata,
        });
        if let Some(token) = &self.token {
            request.metadata_mut().insert(
                "authorization",
                xds::bearer(token).ok_or(CaClientError::Token)?,
            );
        }
        request.set_timeout(Duration::from_secs(10));
        let mut client = IstioCertificateServiceClient::new(self.channel.clone());
        let chain = client
            .create_certificate(request)
            .await?
            .into_inner()
            .cert_chain;
        let mut ders = Vec::new();
        for p in &chain {
            ders.extend(pem::certs(p).map_err(|e| CaClientError::Chain(e.to_string()))?);
        }
        // Leaf first, root last; the root is the trust anchor, the rest is presented.
        if ders.len() < 2 {
            return Err(CaClientError::Chain(format!(
                "{} certificate(s), need a leaf and a root",
                ders.len()
            )));
        }
        let root = ders.pop().into_iter().collect();
        WorkloadCert::new(identity.clone(), ders, key, root)
            .map_err(|e| CaClientError::Chain(e.to_string()))
    }
}
