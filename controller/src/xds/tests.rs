//! Delta ADS conformance with a raw tonic client over loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use mesh_core::proto::envoy::config::core::v3::Node;
use mesh_core::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_core::proto::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use mesh_core::proto::google::rpc;
use mesh_core::proto::istio::workload::{address, Address, Workload};
use mesh_core::proto::type_url::ADDRESS;
use prometheus_client::registry::Registry;
use prost::Message as _;

use super::*;

fn workload(uid: &str, node: &str) -> Served {
    let w = Workload {
        uid: uid.to_owned(),
        node: node.to_owned(),
        ..Default::default()
    };
    Served::new(
        ADDRESS,
        &Address {
            r#type: Some(address::Type::Workload(w)),
        },
    )
}

fn snapshot(items: &[(&str, &str)]) -> Arc<Snapshot> {
    let mut by_name = BTreeMap::new();
    for (uid, node) in items {
        by_name.insert((*uid).to_owned(), workload(uid, node));
    }
    Arc::new(Snapshot::new(
        [(ADDRESS.to_owned(), by_name)],
        Instant::now(),
    ))
}

struct Client {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl Client {
    async fn connect(addr: std::net::SocketAddr, initial: BTreeMap<String, String>) -> Client {
        let mut grpc = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(16);
        tx.send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: "ztunnel~10.0.0.1~node1".into(),
                ..Default::default()
            }),
            type_url: ADDRESS.into(),
            initial_resource_versions: initial,
            ..Default::default()
        })
        .await
        .unwrap();
        let rx = grpc
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Client { tx, rx }
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("a response within 5 s")
            .unwrap()
            .expect("stream open")
    }

    async fn silent(&mut self) {
        let next = tokio::time::timeout(Duration::from_millis(300), self.rx.message()).await;
        assert!(next.is_err(), "unexpected response: {next:?}");
    }

    async fn ack(&self, resp: &DeltaDiscoveryResponse) {
        self.answer(resp, None).await
    }

    async fn answer(&self, resp: &DeltaDiscoveryResponse, error: Option<&str>) {
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail: error.map(|m| rpc::Status {
                    code: 3,
                    message: m.into(),
                    details: vec![],
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

fn names(resp: &DeltaDiscoveryResponse) -> BTreeSet<String> {
    resp.resources.iter().map(|r| r.name.clone()).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

async fn serve(
    first: Arc<Snapshot>,
) -> (
    std::net::SocketAddr,
    watch::Sender<Arc<Snapshot>>,
    XdsMetrics,
) {
    let (tx, rx) = watch::channel(first);
    let metrics = XdsMetrics::new(&mut Registry::default());
    let incoming =
        tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let server = XdsServer::new(rx, metrics.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(super::AdsService::new(server))
            .serve_with_incoming(incoming),
    );
    (addr, tx, metrics)
}

#[tokio::test]
async fn subscribe_ack_changes_removals_and_nack() {
    let (addr, push, metrics) = serve(snapshot(&[("a", "n1"), ("b", "n1"), ("c", "n2")])).await;
    let mut c = Client::connect(addr, BTreeMap::new()).await;
    let first = c.recv().await;
    assert_eq!(names(&first), set(&["a", "b", "c"]));
    assert!(first.removed_resources.is_empty());
    c.ack(&first).await;
    c.silent().await;

    // b changes, c goes, d arrives: exactly that is pushed.
    push.send(snapshot(&[("a", "n1"), ("b", "n2"), ("d", "n2")]))
        .unwrap();
    let delta = c.recv().await;
    assert_eq!(names(&delta), set(&["b", "d"]));
    assert_eq!(delta.removed_resources, vec!["c".to_owned()]);
    assert_ne!(delta.nonce, first.nonce);

    // A NACK is counted; nothing is resent until something changes.
    c.answer(&delta, Some("bad resource")).await;
    c.silent().await;
    assert_eq!(metrics.nacks(), 1);
    assert_eq!(metrics.connected(), 1);

    // The same content again: no push.
    push.send(snapshot(&[("a", "n1"), ("b", "n2"), ("d", "n2")]))
        .unwrap();
    c.silent().await;
}

#[tokio::test]
async fn reconnect_with_initial_versions_gets_only_the_difference() {
    let snap = snapshot(&[("a", "n1"), ("b", "n1"), ("c", "n2")]);
    let version_a = snap.resources(ADDRESS).unwrap()["a"].version.clone();
    let (addr, _push, _metrics) = serve(snap).await;
    let held = BTreeMap::from([
        ("a".to_owned(), version_a),
        ("b".to_owned(), "stale".to_owned()),
        ("gone".to_owned(), "1".to_owned()),
    ]);
    let mut c = Client::connect(addr, held).await;
    let resp = c.recv().await;
    assert_eq!(names(&resp), set(&["b", "c"]));
    assert_eq!(resp.removed_resources, vec!["gone".to_owned()]);

    // Holding exactly the current state: one empty answer, then nothing.
    let all: BTreeMap<String, String> = resp
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .chain([(
            "a".to_owned(),
            snapshot(&[("a", "n1")]).resources(ADDRESS).unwrap()["a"]
                .version
                .clone(),
        )])
        .collect();
    let mut d = Client::connect(addr, all).await;
    let empty = d.recv().await;
    assert!(empty.resources.is_empty() && empty.removed_resources.is_empty());
    d.silent().await;
}

#[tokio::test]
async fn clients_with_different_progress_each_get_what_they_lack() {
    let (addr, push, metrics) = serve(snapshot(&[("a", "n1")])).await;
    let mut early = Client::connect(addr, BTreeMap::new()).await;
    let r = early.recv().await;
    assert_eq!(names(&r), set(&["a"]));
    early.ack(&r).await;

    push.send(snapshot(&[("a", "n1"), ("b", "n2")])).unwrap();
    let mut late = Client::connect(addr, BTreeMap::new()).await;
    let full = late.recv().await;
    assert_eq!(
        names(&full),
        set(&["a", "b"]),
        "a new client gets everything"
    );
    let delta = early.recv().await;
    assert_eq!(names(&delta), set(&["b"]), "an old client gets the change");
    assert_eq!(metrics.connected(), 2);

    drop(late);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(metrics.connected(), 1, "a closed stream is forgotten");
}

#[tokio::test]
async fn a_large_push_comes_in_responses_of_bounded_size() {
    let uids: Vec<String> = (0..3000).map(|i| format!("workload-{i:05}")).collect();
    let items: Vec<(&str, &str)> = uids.iter().map(|u| (u.as_str(), "n1")).collect();
    let (addr, push, _metrics) = serve(snapshot(&items)).await;
    let mut c = Client::connect(addr, BTreeMap::new()).await;
    let (mut got, mut partial) = (Vec::new(), Vec::new());
    while got.len() < uids.len() {
        let r = c.recv().await;
        let size = prost::Message::encoded_len(&r);
        assert!(size <= RESPONSE_BYTES + 1024, "a response of {size} bytes");
        got.extend(names(&r));
        partial.push(mesh_core::xds::is_partial(&r.system_version_info));
        c.ack(&r).await;
    }
    assert!(partial.len() > 1, "{} response(s)", partial.len());
    // Every part but the last says more follow, so a proxy knows when it has it all.
    let last = partial.pop();
    assert_eq!(last, Some(false));
    assert!(partial.iter().all(|p| *p), "{partial:?}");
    got.sort();
    assert_eq!(got, uids, "each resource sent once");
    c.silent().await;

    // What follows is a delta as usual.
    let mut next = items.clone();
    next[7].1 = "n2";
    next.remove(9);
    push.send(snapshot(&next)).unwrap();
    let delta = c.recv().await;
    assert_eq!(delta.system_version_info, "", "a small push is whole");
    assert_eq!(names(&delta), set(&["workload-00007"]));
    assert_eq!(delta.removed_resources, vec!["workload-00009".to_owned()]);
}

/// A response made of pre-encoded resources decodes, as a proxy's generated type, into
/// exactly the response built field by field; and back.
#[test]
fn encoded_responses_are_delta_discovery_responses_on_the_wire() {
    let (a, b) = (workload("pod-a", "node1"), workload("pod-b", "node2"));
    let encoded = EncodedResponse {
        system_version_info: mesh_core::xds::part_marker(0, 2),
        resources: vec![a.encode("pod-a"), b.encode("pod-b")],
        type_url: ADDRESS.to_owned(),
        removed_resources: vec!["gone-1".into(), "gone-2".into()],
        nonce: "7".into(),
    };
    let bytes = encoded.encode_to_vec();
    assert_eq!(bytes.len(), encoded.encoded_len());
    let resource = |name: &str, s: &Served| Resource {
        name: name.into(),
        version: s.version.clone(),
        resource: Some((*s.resource).clone()),
        ..Default::default()
    };
    let want = DeltaDiscoveryResponse {
        system_version_info: encoded.system_version_info.clone(),
        resources: vec![resource("pod-a", &a), resource("pod-b", &b)],
        type_url: ADDRESS.to_owned(),
        removed_resources: encoded.removed_resources.clone(),
        nonce: "7".into(),
        ..Default::default()
    };
    assert_eq!(DeltaDiscoveryResponse::decode(&bytes[..]).unwrap(), want);
    assert_eq!(EncodedResponse::decode(&bytes[..]).unwrap(), encoded);
    let generated = want.encode_to_vec();
    assert_eq!(EncodedResponse::decode(&generated[..]).unwrap(), encoded);
}
