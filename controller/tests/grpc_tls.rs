//! The controller's TLS port (15012): proxies that trust the mesh root reach the CA and
//! delta ADS over it; a client trusting another root is refused in the handshake.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use controller::app::{self, Config};
use mesh_core::ca_client::{CaClient, CaClientError};
use mesh_core::control_plane::ControlPlane;
use mesh_core::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_core::proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use mesh_core::proto::type_url::ADDRESS;
use mesh_core::tls::{pem, CertificateAuthority};
use mesh_core::Identity;
use rustls::pki_types::{CertificateDer, ServerName};
use tonic::transport::Channel;

const TOKEN: &str = "node1-ztunnel-token-0123456789";

fn dirs(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let base = std::env::temp_dir().join(format!("controller-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let config = base.join("config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(
        config.join("echo.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: echo-1, namespace: default}\n\
         spec: {nodeName: node1, serviceAccountName: echo, containers: [{name: c, image: c}]}\n\
         status: {podIP: 10.0.1.5}\n",
    )
    .unwrap();
    let tokens = base.join("tokens.yaml");
    std::fs::write(
        &tokens,
        format!("- {{token: {TOKEN}, identity: 'spiffe://cluster.local/ns/istio-system/sa/ztunnel', node: node1}}\n"),
    )
    .unwrap();
    (config, base.join("state"), tokens)
}

async fn start(name: &str, lifetime: Duration) -> (app::App, PathBuf) {
    let (config, state, tokens) = dirs(name);
    let mut cfg = Config::new(config, state.clone(), tokens);
    cfg.grpc_addr = "127.0.0.1:0".parse().unwrap();
    cfg.grpc_tls_addr = "127.0.0.1:0".parse().unwrap();
    cfg.metrics_addr = "127.0.0.1:0".parse().unwrap();
    cfg.serving.lifetime = lifetime;
    (app::build(cfg).await.unwrap(), state)
}

/// A gRPC channel over TLS to `addr`, trusting only `root`, checking `server_name`:
/// the proxies' own client (`ControlPlane`), connected now.
async fn tls_channel(
    addr: std::net::SocketAddr,
    root: CertificateDer<'static>,
    server_name: &'static str,
) -> Result<Channel, tonic::transport::Error> {
    let root = pem::encode_cert(&root);
    ControlPlane::new(&format!("https://{addr}"), Some(&root), Some(server_name))
        .unwrap()
        .connect()
        .await
}

fn root_of(state: &std::path::Path) -> CertificateDer<'static> {
    let text = std::fs::read_to_string(state.join("root-cert.pem")).unwrap();
    pem::certs(&text).unwrap().remove(0)
}

async fn create_certificate(channel: Channel) -> Result<Identity, tonic::Status> {
    let client = CaClient::from_channel(channel, Some(TOKEN.into()), true);
    let want = Identity::new("cluster.local", "default", "echo").unwrap();
    match client.fetch(&want, Duration::from_secs(3600)).await {
        Ok(cert) => Ok(cert.identity().clone()),
        Err(CaClientError::Status(status)) => Err(status),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_port_serves_the_ca_and_ads_to_clients_trusting_the_mesh_root() {
    let (app, state) = start("ok", Duration::from_secs(3600)).await;
    let root = root_of(&state);

    let channel = tls_channel(app.grpc_tls, root.clone(), "istiod.istio-system.svc")
        .await
        .unwrap();
    let id = create_certificate(channel.clone()).await.unwrap();
    assert_eq!(id.service_account(), "echo");

    // Delta ADS over the same TLS connection.
    let mut ads = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        type_url: ADDRESS.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = ads
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let names: Vec<&str> = first.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["Kubernetes//Pod/default/echo-1"]);

    // The bind IP is a SAN too.
    tls_channel(app.grpc_tls, root, "127.0.0.1").await.unwrap();
    app.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_port_refuses_clients_trusting_another_root_or_name() {
    let (app, state) = start("refused", Duration::from_secs(3600)).await;
    let other = CertificateAuthority::generate("cluster.local").unwrap();
    let refused = tls_channel(
        app.grpc_tls,
        other.root().clone(),
        "istiod.istio-system.svc",
    )
    .await;
    assert!(refused.is_err(), "a client trusting another root connected");
    let wrong_name = tls_channel(app.grpc_tls, root_of(&state), "evil.example.com").await;
    assert!(wrong_name.is_err(), "a name not in the SANs was accepted");
    app.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_certificate_is_renewed_at_half_life_without_dropping_connections() {
    let (app, state) = start("renew", Duration::from_secs(4)).await;
    let root = root_of(&state);
    let channel = tls_channel(app.grpc_tls, root.clone(), "istiod.istio-system.svc")
        .await
        .unwrap();
    create_certificate(channel.clone()).await.unwrap();
    let serial = |der: &CertificateDer<'_>| {
        let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        cert.raw_serial().to_vec()
    };
    let first = serial(&peer_cert(app.grpc_tls, &root).await);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let second = serial(&peer_cert(app.grpc_tls, &root).await);
    assert_ne!(first, second, "not renewed after half its lifetime");
    // The connection opened before the renewal still works.
    create_certificate(channel).await.unwrap();
    app.shutdown(Duration::from_secs(1)).await;
}

/// The leaf the TLS port presents now.
async fn peer_cert(
    addr: std::net::SocketAddr,
    root: &CertificateDer<'static>,
) -> CertificateDer<'static> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(mesh_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(
            ServerName::try_from("istiod.istio-system.svc").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}
