//! `/debug/syncz` on the metrics port: raw delta ADS clients of different progress against
//! a controller in local mode, and what the controller reports about each.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use controller::app::{self, Config};
use controller::xds::status::{ProxyStatus, Report, SyncState};
use mesh_core::proto::envoy::config::core::v3::Node;
use mesh_core::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_core::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use mesh_core::proto::google::rpc;
use mesh_core::proto::type_url::{ADDRESS, AUTHORIZATION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

fn pod(name: &str, node: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: echo}}}}\n\
         spec: {{nodeName: {node}, serviceAccountName: echo, containers: [{{name: c, image: c}}]}}\n\
         status: {{podIP: {ip}}}\n"
    )
}

const POLICY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
metadata: {name: echo-allow, namespace: default}\n\
spec: {selector: {matchLabels: {app: echo}}, action: ALLOW, rules: [{from: [{source: {namespaces: [default]}}]}]}\n";

fn config_dir(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let base = std::env::temp_dir().join(format!("controller-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let config = base.join("config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(
        config.join("ns.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}\n",
    )
    .unwrap();
    std::fs::write(config.join("a.yaml"), pod("echo-1", "node1", "10.0.1.5")).unwrap();
    std::fs::write(config.join("b.yaml"), pod("echo-2", "node2", "10.0.2.5")).unwrap();
    std::fs::write(config.join("policy.yaml"), POLICY).unwrap();
    let tokens = base.join("tokens.yaml");
    std::fs::write(&tokens, "[]\n").unwrap();
    (config, base.join("state"), tokens)
}

async fn start(name: &str) -> (app::App, PathBuf) {
    let (config, state, tokens) = config_dir(name);
    let mut cfg = Config::new(config.clone(), state, tokens);
    cfg.grpc_addr = "127.0.0.1:0".parse().unwrap();
    cfg.grpc_tls_addr = "127.0.0.1:0".parse().unwrap();
    cfg.metrics_addr = "127.0.0.1:0".parse().unwrap();
    cfg.config_poll = Duration::from_millis(50);
    (app::build(cfg).await.unwrap(), config)
}

/// A proxy subscribed (wildcard) to addresses and authorizations on one stream.
struct Proxy {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl Proxy {
    async fn connect(grpc: SocketAddr, node: &str) -> Proxy {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(16);
        for type_url in [ADDRESS, AUTHORIZATION] {
            tx.send(DeltaDiscoveryRequest {
                node: Some(Node {
                    id: node.to_owned(),
                    ..Default::default()
                }),
                type_url: type_url.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let rx = client
            .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Proxy { tx, rx }
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("a response within 5 s")
            .unwrap()
            .expect("stream open")
    }

    /// The first response of each type, by type URL.
    async fn initial(&mut self) -> BTreeMap<String, DeltaDiscoveryResponse> {
        let mut out = BTreeMap::new();
        while out.len() < 2 {
            let r = self.recv().await;
            out.insert(r.type_url.clone(), r);
        }
        out
    }

    async fn answer(&self, resp: &DeltaDiscoveryResponse, nack: Option<&str>) {
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail: nack.map(|m| rpc::Status {
                    code: 3,
                    message: m.to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

async fn syncz(metrics: SocketAddr) -> Report {
    let mut tcp = tokio::net::TcpStream::connect(metrics).await.unwrap();
    tcp.write_all(b"GET /debug/syncz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await.unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&out[..split]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    serde_json::from_slice(&out[split..])
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out[split..])))
}

fn proxy<'a>(report: &'a Report, node: &str) -> Option<&'a ProxyStatus> {
    report.proxies.iter().find(|p| p.node == node)
}

fn state(report: &Report, node: &str, type_url: &str) -> Option<SyncState> {
    Some(proxy(report, node)?.types.get(type_url)?.state)
}

/// Polls `/debug/syncz` until `ok` holds (the server handles ACKs asynchronously).
async fn until(metrics: SocketAddr, what: &str, ok: impl Fn(&Report) -> bool) -> Report {
    let start = Instant::now();
    loop {
        let report = syncz(metrics).await;
        if ok(&report) {
            return report;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{what} not seen within 5 s: {report:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const A: &str = "ztunnel~127.0.0.1~node-a";
const B: &str = "ztunnel~127.0.0.2~node-b";
const C: &str = "ztunnel~127.0.0.3~node-c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncz_reports_synced_nacked_and_stale_proxies() {
    let (app, config) = start("syncz").await;
    let model = app.objects.load();
    let addresses = controller::translate::addresses(&model).len();
    let authorizations = controller::translate::authorizations(&model).0.len();
    assert!(
        addresses >= 2 && authorizations >= 1,
        "fixture served nothing"
    );

    // A ACKs everything; B rejects its addresses and ACKs its policies; C answers nothing.
    let mut a = Proxy::connect(app.grpc, A).await;
    for resp in a.initial().await.values() {
        a.answer(resp, None).await;
    }
    let mut b = Proxy::connect(app.grpc, B).await;
    let b_initial = b.initial().await;
    b.answer(&b_initial[ADDRESS], Some("workload echo-1: bad address"))
        .await;
    b.answer(&b_initial[AUTHORIZATION], None).await;
    let mut c = Proxy::connect(app.grpc, C).await;
    c.initial().await;

    let report = until(app.metrics, "A and B answered", |r| {
        state(r, A, ADDRESS) == Some(SyncState::Synced)
            && state(r, A, AUTHORIZATION) == Some(SyncState::Synced)
            && state(r, B, ADDRESS) == Some(SyncState::Nacked)
            && state(r, B, AUTHORIZATION) == Some(SyncState::Synced)
    })
    .await;
    let pa = proxy(&report, A).unwrap();
    assert_eq!(pa.types[ADDRESS].acked, addresses);
    assert_eq!(pa.types[AUTHORIZATION].acked, authorizations);
    assert_eq!(
        pa.types[ADDRESS].acked_digest.as_deref(),
        Some(pa.types[ADDRESS].serving_digest.as_str())
    );
    let peer = pa.address.as_deref().expect("peer address");
    assert!(peer.starts_with("127.0.0.1:"), "{peer}");
    assert!(pa.connected_seconds < 60.0, "{}", pa.connected_seconds);

    let pb = proxy(&report, B).unwrap();
    let nack = pb.types[ADDRESS].last_nack.as_ref().expect("the NACK");
    assert_eq!(nack.message, "workload echo-1: bad address");
    assert_eq!(nack.nonce, b_initial[ADDRESS].nonce);
    assert_eq!(pb.types[ADDRESS].acked, 0, "B never ACKed addresses");

    let pc = proxy(&report, C).unwrap();
    for type_url in [ADDRESS, AUTHORIZATION] {
        let t = &pc.types[type_url];
        assert_eq!(t.state, SyncState::Stale, "{type_url}: {t:?}");
        assert_eq!((t.acked, t.last_acked_nonce.as_deref()), (0, None));
        assert!(t.last_sent_nonce.is_some(), "{t:?}");
    }

    // A new pod: A is sent it and, until it ACKs, is behind the controller.
    std::fs::write(config.join("late.yaml"), pod("late-1", "node1", "10.0.1.6")).unwrap();
    let push = a.recv().await;
    assert_eq!(push.type_url, ADDRESS);
    let report = syncz(app.metrics).await;
    let t = &proxy(&report, A).unwrap().types[ADDRESS];
    assert_eq!(t.state, SyncState::Stale, "{t:?}");
    assert_eq!((t.acked, t.serving), (addresses, addresses + 1));
    a.answer(&push, None).await;
    let report = until(app.metrics, "A's ACK of the new pod", |r| {
        state(r, A, ADDRESS) == Some(SyncState::Synced)
    })
    .await;
    assert_eq!(
        proxy(&report, A).unwrap().types[ADDRESS].acked,
        addresses + 1
    );
    // B is sent the new pod too: no longer NACKED, but not synced until it ACKs.
    let report = until(app.metrics, "B's push outstanding", |r| {
        state(r, B, ADDRESS) == Some(SyncState::Stale)
    })
    .await;
    assert!(proxy(&report, B).unwrap().types[ADDRESS]
        .last_nack
        .is_some());

    // C goes away: its entry goes with it; the others stay.
    drop(c);
    let report = until(app.metrics, "C removed", |r| proxy(r, C).is_none()).await;
    assert!(proxy(&report, A).is_some() && proxy(&report, B).is_some());
    app.shutdown(Duration::from_secs(1)).await;
}

/// A gRPC channel over TLS to `addr`, trusting the mesh root in `state`.
async fn tls_channel(addr: SocketAddr, state: &std::path::Path) -> tonic::transport::Channel {
    let text = std::fs::read_to_string(state.join("root-cert.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(mesh_core::tls::pem::certs(&text).unwrap().remove(0))
        .unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(mesh_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let connect = tower::service_fn(move |_: http::Uri| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = rustls::pki_types::ServerName::try_from("istiod.istio-system.svc")
                .map_err(std::io::Error::other)?;
            let stream = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    tonic::transport::Endpoint::from_static("http://controller.invalid")
        .connect_with_connector(connect)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_on_the_tls_port_are_listed_with_their_address() {
    let (app, config) = start("syncz-tls").await;
    let channel = tls_channel(app.grpc_tls, &config.with_file_name("state")).await;
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: A.to_owned(),
            ..Default::default()
        }),
        type_url: ADDRESS.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let ack = Proxy { tx, rx: stream };
    ack.answer(&first, None).await;
    let report = until(app.metrics, "the TLS proxy synced", |r| {
        state(r, A, ADDRESS) == Some(SyncState::Synced)
    })
    .await;
    let peer = proxy(&report, A).unwrap().address.clone();
    assert!(
        peer.as_deref().is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{peer:?}"
    );
    app.shutdown(Duration::from_secs(1)).await;
}
