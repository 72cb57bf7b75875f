//! `meshctl proxy-status` against a real controller (local mode, ports 0) with two raw
//! delta ADS clients: one ACKs everything, the other rejects its addresses. The real
//! meshctl binary reads the controller's `/debug/syncz`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use controller::app::{self, Config};
use mesh_core::proto::envoy::config::core::v3::Node;
use mesh_core::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_core::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use mesh_core::proto::google::rpc;
use mesh_core::proto::type_url::{ADDRESS, AUTHORIZATION};
use tokio::sync::mpsc;

const MANIFESTS: &str = "apiVersion: v1\nkind: Namespace\n\
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: echo-1, namespace: default, labels: {app: echo}}\n\
spec: {nodeName: node1, serviceAccountName: echo, containers: [{name: c, image: c}]}\n\
status: {podIP: 10.0.1.5}\n---\n\
apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
metadata: {name: echo-allow, namespace: default}\n\
spec: {selector: {matchLabels: {app: echo}}, action: ALLOW, rules: [{from: [{source: {namespaces: [default]}}]}]}\n";

async fn controller() -> app::App {
    let base = std::env::temp_dir().join(format!("meshctl-ps-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let config: PathBuf = base.join("config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("mesh.yaml"), MANIFESTS).unwrap();
    std::fs::write(base.join("tokens.yaml"), "[]\n").unwrap();
    let mut cfg = Config::new(config, base.join("state"), base.join("tokens.yaml"));
    cfg.grpc_addr = "127.0.0.1:0".parse().unwrap();
    cfg.grpc_tls_addr = "127.0.0.1:0".parse().unwrap();
    cfg.metrics_addr = "127.0.0.1:0".parse().unwrap();
    app::build(cfg).await.unwrap()
}

/// A raw delta ADS client: subscribes to both types, answers each first response with an
/// ACK, or with a NACK for the types in `reject`. Returns the stream halves so the
/// connection stays open.
async fn proxy(
    grpc: SocketAddr,
    node: &str,
    reject: &[&str],
) -> (
    mpsc::Sender<DeltaDiscoveryRequest>,
    tonic::Streaming<DeltaDiscoveryResponse>,
) {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    for type_url in [ADDRESS, AUTHORIZATION] {
        let node = Node {
            id: node.to_owned(),
            ..Default::default()
        };
        tx.send(DeltaDiscoveryRequest {
            node: Some(node),
            type_url: type_url.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let mut stream = client
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        let resp = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("a response within 5 s")
            .unwrap()
            .expect("stream open");
        assert!(
            !resp.resources.is_empty(),
            "{} served nothing",
            resp.type_url
        );
        let error_detail = reject
            .contains(&resp.type_url.as_str())
            .then(|| rpc::Status {
                code: 3,
                message: "unknown field in workload".to_owned(),
                ..Default::default()
            });
        tx.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    (tx, stream)
}

async fn meshctl(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .arg("proxy-status")
        .args(args)
        .output()
        .await
        .expect("meshctl runs")
}

const SYNCED: &str = "ztunnel~127.0.0.1~node1";
const REJECTING: &str = "ztunnel~127.0.0.2~node2";

fn row<'a>(table: &'a str, node: &str) -> Option<&'a str> {
    table.lines().find(|l| l.starts_with(&format!("{node} ")))
}

/// A row's cells: columns are at least three spaces apart, cells hold single spaces.
fn cells(row: &str) -> Vec<&str> {
    row.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_shows_synced_and_nacked_proxies() {
    let app = controller().await;
    let _synced = proxy(app.grpc, SYNCED, &[]).await;
    let _rejecting = proxy(app.grpc, REJECTING, &[ADDRESS]).await;
    let base = format!("http://{}", app.metrics);

    // The controller takes the answers asynchronously: ask until both are settled.
    let start = Instant::now();
    let table = loop {
        let out = meshctl(&["--controller", &base]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "meshctl failed: {stderr}");
        let table = String::from_utf8(out.stdout).unwrap();
        let settled = |node| row(&table, node).is_some_and(|r| !r.contains("STALE"));
        if settled(SYNCED) && settled(REJECTING) {
            break table;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{table}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "ADDRESS",
            "CONNECTED",
            "ADDRESS-TYPE",
            "AUTHORIZATION"
        ]
    );
    // One pod, one policy: a count of 1 each where ACKed.
    let synced = cells(row(&table, SYNCED).expect("row of the synced proxy"));
    assert!(synced[1].starts_with("127.0.0.1:"), "{synced:?}");
    assert!(
        synced[2].ends_with('s'),
        "connected seconds ago: {synced:?}"
    );
    assert_eq!(synced[3..], ["SYNCED (1)", "SYNCED (1)"], "{synced:?}");
    let rejecting = cells(row(&table, REJECTING).expect("row of the rejecting proxy"));
    assert_eq!(
        rejecting[3..],
        ["NACKED (0/1)", "SYNCED (1)"],
        "{rejecting:?}"
    );
    assert!(
        table.contains(&format!("{REJECTING} rejected Address (nonce "))
            && table.contains("unknown field in workload"),
        "{table}"
    );

    let out = meshctl(&["--controller", &base, "-o", "json"]).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let proxies = json["proxies"].as_array().expect("proxies");
    assert_eq!(proxies.len(), 2, "{json}");
    app.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_controller_is_named_in_the_error() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = meshctl(&["--controller", &format!("http://{addr}")]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("connect to {addr}")), "{stderr}");
}
