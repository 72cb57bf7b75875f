//! The controller in local mode, as a user runs it: manifests in a directory, its own root
//! in a state folder, proxies asking for certificates over gRPC with their tokens and
//! subscribing to config over delta ADS.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use controller::app::{self, Config};
use controller::castore::CaOrigin;
use mesh_core::ca_client::{CaClient, CaClientError};
use mesh_core::control_plane::ControlPlane;
use mesh_core::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_core::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use mesh_core::proto::istio::workload::{address, Address};
use mesh_core::proto::type_url::ADDRESS;
use mesh_core::Identity;
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "node1-ztunnel-token-0123456789";

fn pod(name: &str, sa: &str, node: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\n\
         spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: c, image: c}}]}}\n\
         status: {{podIP: {ip}}}\n"
    )
}

fn dirs(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let base = std::env::temp_dir().join(format!("controller-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let config = base.join("config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(
        config.join("echo.yaml"),
        pod("echo-1", "echo", "node1", "10.0.1.5"),
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

async fn start(config: &Path, state: &Path, tokens: &Path) -> app::App {
    let mut cfg = Config::new(config.to_owned(), state.to_owned(), tokens.to_owned());
    cfg.grpc_addr = "127.0.0.1:0".parse().unwrap();
    cfg.grpc_tls_addr = "127.0.0.1:0".parse().unwrap();
    cfg.metrics_addr = "127.0.0.1:0".parse().unwrap();
    cfg.config_poll = Duration::from_millis(50);
    app::build(cfg).await.unwrap()
}

/// Asks, as node1's ztunnel, for a certificate of `sa` in namespace default.
async fn ask(app: &app::App, sa: &str) -> Result<Identity, tonic::Status> {
    let controller = ControlPlane::new(&format!("http://{}", app.grpc), None, None).unwrap();
    let client = CaClient::new(&controller, Some(TOKEN.into()), true);
    let want = Identity::new("cluster.local", "default", sa).unwrap();
    match client.fetch(&want, Duration::from_secs(3600)).await {
        Ok(cert) => Ok(cert.identity().clone()),
        Err(CaClientError::Status(status)) => Err(status),
        Err(e) => panic!("{e}"),
    }
}

/// Retries `sa` until granted (or refused, with `granted` false) or `within` passes.
async fn becomes(app: &app::App, sa: &str, granted: bool, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if ask(app, sa).await.is_ok() == granted {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{sa} not {} within {within:?}",
            if granted { "granted" } else { "refused" }
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metrics_text(addr: std::net::SocketAddr) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_follow_the_pods_in_the_directory() {
    let (config, state, tokens) = dirs("follow");
    let app = start(&config, &state, &tokens).await;
    assert_eq!(app.ca_origin, CaOrigin::Created(state.clone()));

    assert_eq!(ask(&app, "echo").await.unwrap().service_account(), "echo");
    let err = ask(&app, "late").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    // A new pod file on node1: its identity is granted within a second.
    std::fs::write(
        config.join("late.yaml"),
        pod("late-1", "late", "node1", "10.0.1.6"),
    )
    .unwrap();
    becomes(&app, "late", true, Duration::from_secs(1)).await;
    // Deleted again: refused.
    std::fs::remove_file(config.join("late.yaml")).unwrap();
    becomes(&app, "late", false, Duration::from_secs(1)).await;

    let text = metrics_text(app.metrics).await;
    let signed: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("mesh_ca_certificates_signed_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no signed counter in:\n{text}"));
    assert!(signed >= 2, "{signed} signed");
    assert!(
        text.contains("mesh_ca_requests_refused_total{reason=\"not_on_node\"}"),
        "{text}"
    );
    app.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_root() {
    let (config, state, tokens) = dirs("restart");
    let first = start(&config, &state, &tokens).await;
    let root_before = std::fs::read_to_string(state.join("root-cert.pem")).unwrap();
    first.shutdown(Duration::from_secs(1)).await;
    let second = start(&config, &state, &tokens).await;
    assert_eq!(second.ca_origin, CaOrigin::Loaded(state.clone()));
    assert_eq!(
        std::fs::read_to_string(state.join("root-cert.pem")).unwrap(),
        root_before
    );
    assert_eq!(
        ask(&second, "echo").await.unwrap().service_account(),
        "echo"
    );
    second.shutdown(Duration::from_secs(1)).await;
}

async fn next(stream: &mut tonic::Streaming<DeltaDiscoveryResponse>) -> DeltaDiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a push within 5 s")
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_receive_workloads_and_their_changes_over_delta_ads() {
    let (config, state, tokens) = dirs("xds");
    std::fs::write(
        config.join("ns.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}\n",
    )
    .unwrap();
    let app = start(&config, &state, &tokens).await;
    let mut grpc = AggregatedDiscoveryServiceClient::connect(format!("http://{}", app.grpc))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest {
        type_url: ADDRESS.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = grpc
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first: DeltaDiscoveryResponse = next(&mut stream).await;
    let uids: Vec<&str> = first.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(uids, ["Kubernetes//Pod/default/echo-1"]);
    let address = Address::decode(
        first.resources[0]
            .resource
            .as_ref()
            .unwrap()
            .value
            .as_slice(),
    )
    .unwrap();
    let Some(address::Type::Workload(w)) = address.r#type else {
        panic!("not a workload: {address:?}")
    };
    assert_eq!(
        (w.node.as_str(), w.service_account.as_str()),
        ("node1", "echo")
    );
    assert_eq!(w.addresses, vec![vec![10, 0, 1, 5]]);
    assert_eq!(w.tunnel_protocol, 1, "HBONE: the namespace is enrolled");

    // A pod file added: pushed alone, within a second.
    let started = Instant::now();
    std::fs::write(
        config.join("late.yaml"),
        pod("late-1", "late", "node1", "10.0.1.6"),
    )
    .unwrap();
    let added = next(&mut stream).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let names: Vec<&str> = added.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["Kubernetes//Pod/default/late-1"]);
    assert!(added.removed_resources.is_empty());
    tx.send(DeltaDiscoveryRequest {
        type_url: ADDRESS.into(),
        response_nonce: added.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Removed again: a removal, nothing else.
    std::fs::remove_file(config.join("late.yaml")).unwrap();
    let removed = next(&mut stream).await;
    assert!(removed.resources.is_empty());
    assert_eq!(
        removed.removed_resources,
        ["Kubernetes//Pod/default/late-1"]
    );
    app.shutdown(Duration::from_secs(1)).await;
}
