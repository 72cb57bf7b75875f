//! The CA service over real gRPC on loopback: tonic server and client, real CSRs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_core::proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use mesh_core::proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateServiceServer;
use mesh_core::proto::istio::v1::auth::IstioCertificateRequest;
use mesh_core::tls::{generate_csr, identity_of, pem, CertificateAuthority};
use mesh_core::Identity;
use prometheus_client::registry::Registry;
use tonic::transport::{Channel, Server};
use tonic::Code;

use super::*;

const ZTUNNEL_TOKEN: &str = "node1-ztunnel-token-0123456789";
const WAYPOINT_TOKEN: &str = "waypoint-token-0123456789abcdef";

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa).unwrap()
}

struct Fixture {
    client: IstioCertificateServiceClient<Channel>,
    ca: Arc<CertificateAuthority>,
    metrics: CaMetrics,
}

async fn start() -> Fixture {
    let ca = Arc::new(CertificateAuthority::generate("cluster.local").unwrap());
    let tokens = TokenFile::parse(&format!(
        "- {{token: {ZTUNNEL_TOKEN}, identity: 'spiffe://cluster.local/ns/istio-system/sa/ztunnel', node: node1}}\n\
         - {{token: {WAYPOINT_TOKEN}, identity: 'spiffe://cluster.local/ns/default/sa/waypoint'}}\n"
    ))
    .unwrap();
    let placement = PodPlacement::new([
        (id("default", "echo"), "node1".to_owned()),
        (id("default", "other"), "node2".to_owned()),
    ]);
    let metrics = CaMetrics::new(&mut Registry::default());
    let svc = CaService::new(
        ca.clone(),
        Arc::new(tokens),
        Arc::new(placement),
        Duration::from_secs(48 * 3600),
        metrics.clone(),
    );
    let incoming =
        tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(IstioCertificateServiceServer::new(svc))
            .serve_with_incoming(incoming),
    );
    let client = IstioCertificateServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Fixture {
        client,
        ca,
        metrics,
    }
}

impl Fixture {
    async fn ask(
        &mut self,
        csr: String,
        secs: i64,
        impersonate: Option<&Identity>,
        token: Option<&str>,
    ) -> Result<Vec<String>, tonic::Status> {
        let req = request(csr, secs, impersonate, token);
        let resp = self.client.create_certificate(req).await?;
        Ok(resp.into_inner().cert_chain)
    }
}

fn request(
    csr: String,
    secs: i64,
    impersonate: Option<&Identity>,
    token: Option<&str>,
) -> tonic::Request<IstioCertificateRequest> {
    let metadata = impersonate.map(|i| prost_types::Struct {
        fields: BTreeMap::from([(
            IMPERSONATED_IDENTITY.to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(i.to_string())),
            },
        )]),
    });
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: secs,
        metadata,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

#[tokio::test]
async fn node_proxy_gets_a_local_pods_identity_with_the_right_san_and_lifetime() {
    let mut f = start().await;
    let echo = id("default", "echo");
    let (_key, csr) = generate_csr(&echo).unwrap();
    let resp = f
        .ask(csr, 3600, Some(&echo), Some(ZTUNNEL_TOKEN))
        .await
        .unwrap();
    assert_eq!(resp.len(), 2, "leaf and root");
    let leaf = &pem::certs(&resp[0]).unwrap()[0];
    assert_eq!(identity_of(leaf).unwrap(), echo);
    assert_eq!(&pem::certs(&resp[1]).unwrap()[0], f.ca.root());
    let (_, x509) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
    let not_after = x509.validity().not_after.timestamp();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (not_after - now - 3600).abs() < 60,
        "not_after {not_after} is not an hour from now ({now})"
    );
    assert_eq!(f.metrics.signed(), 1);
}

#[tokio::test]
async fn caller_without_impersonation_gets_its_own_identity_only() {
    let mut f = start().await;
    let own = id("default", "waypoint");
    let (_key, csr) = generate_csr(&own).unwrap();
    let resp = f.ask(csr, 0, None, Some(WAYPOINT_TOKEN)).await.unwrap();
    let leaf = &pem::certs(&resp[0]).unwrap()[0];
    assert_eq!(identity_of(leaf).unwrap(), own);

    // A waypoint is no node proxy: it may not ask for another identity.
    let echo = id("default", "echo");
    let (_key, csr) = generate_csr(&echo).unwrap();
    let err = f
        .ask(csr, 0, Some(&echo), Some(WAYPOINT_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert_eq!(f.metrics.refused("impersonation_not_allowed"), 1);
}

#[tokio::test]
async fn missing_or_bad_tokens_are_refused() {
    let mut f = start().await;
    let echo = id("default", "echo");
    for token in [None, Some("not-a-known-token-at-all")] {
        let (_key, csr) = generate_csr(&echo).unwrap();
        let err = f.ask(csr, 0, Some(&echo), token).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    }
    assert_eq!(f.metrics.refused("unauthenticated"), 2);
    assert_eq!(f.metrics.signed(), 0);
}

#[tokio::test]
async fn another_nodes_pod_identity_is_refused() {
    let mut f = start().await;
    let other = id("default", "other");
    let (_key, csr) = generate_csr(&other).unwrap();
    let err = f
        .ask(csr, 0, Some(&other), Some(ZTUNNEL_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("node1"), "{err}");
    assert_eq!(f.metrics.refused("not_on_node"), 1);
}

#[tokio::test]
async fn bad_csrs_and_lifetimes_are_refused() {
    let mut f = start().await;
    let echo = id("default", "echo");

    // Extra SAN beside the identity.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(echo.to_string().try_into().unwrap()));
    let extra_san = params.serialize_request(&key).unwrap().pem().unwrap();

    // Right SAN, wrong key type (P-384).
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(echo.to_string().try_into().unwrap())];
    let wrong_key = params.serialize_request(&key).unwrap().pem().unwrap();

    let (_key, good) = generate_csr(&echo).unwrap();
    let cases = [
        (extra_san, 0, "san"),
        (wrong_key, 0, "key_type"),
        (good.clone(), 72 * 3600, "lifetime_too_long"),
        (good, -5, "bad_lifetime"),
        (
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                .to_owned(),
            0,
            "bad_csr",
        ),
    ];
    for (csr, secs, reason) in cases {
        let err = f
            .ask(csr, secs, Some(&echo), Some(ZTUNNEL_TOKEN))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{reason}: {err}");
        assert_eq!(f.metrics.refused(reason), 1, "{reason}: {err}");
    }
    assert_eq!(f.metrics.signed(), 0);
}

#[test]
fn token_files_reject_bad_entries() {
    assert!(
        TokenFile::parse("- {token: short, identity: 'spiffe://cluster.local/ns/a/sa/b'}")
            .unwrap_err()
            .contains("shorter")
    );
    assert!(
        TokenFile::parse("- {token: 0123456789abcdef, identity: 'not-spiffe'}")
            .unwrap_err()
            .contains("identity")
    );
    let twice = "- {token: 0123456789abcdef, identity: 'spiffe://cluster.local/ns/a/sa/b'}\n\
                 - {token: 0123456789abcdef, identity: 'spiffe://cluster.local/ns/a/sa/c'}\n";
    assert!(TokenFile::parse(twice).unwrap_err().contains("twice"));
    assert!(TokenFile::parse("- {tokn: x}").is_err());
}
