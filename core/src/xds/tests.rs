use std::pin::Pin;

use tokio_stream::Stream;

use super::*;
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};

#[test]
fn only_parts_before_the_last_are_partial() {
    assert_eq!(part_marker(0, 1), "");
    assert!(!is_partial(&part_marker(0, 1)));
    assert!(is_partial(&part_marker(0, 3)));
    assert!(is_partial(&part_marker(1, 3)));
    assert!(!is_partial(&part_marker(2, 3)));
    // Whatever another server puts there is not a marker.
    for other in ["", "v1", "part x/2", "part 2/1", "2026-11-29T10:00:00Z"] {
        assert!(!is_partial(other), "{other}");
    }
}

#[test]
fn jitter_stays_within_half_either_side() {
    let base = Duration::from_millis(1000);
    for _ in 0..1000 {
        let j = jitter(base);
        assert!(j >= Duration::from_millis(500) && j < Duration::from_millis(1500));
    }
}

type Responses = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, tonic::Status>> + Send>>;

/// A server whose one stream sends what the test gives it and reports what it is sent.
struct Scripted {
    responses: std::sync::Mutex<Option<mpsc::Receiver<DeltaDiscoveryResponse>>>,
    requests: mpsc::UnboundedSender<DeltaDiscoveryRequest>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Scripted {
    type DeltaAggregatedResourcesStream = Responses;

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Responses>, tonic::Status> {
        let mut incoming = request.into_inner();
        let requests = self.requests.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = incoming.message().await {
                let _ = requests.send(req);
            }
        });
        let rx = self.responses.lock().unwrap().take().expect("one stream");
        let out = tokio_stream::StreamExt::map(ReceiverStream::new(rx), Ok);
        Ok(tonic::Response::new(Box::pin(out) as Responses))
    }
}

struct Accept;

impl Handler for Accept {
    fn apply(&self, _: &str, _: &[Resource], _: &[String]) -> Result<(), String> {
        Ok(())
    }
}

fn part(nonce: &str, marker: String, name: &str) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        system_version_info: marker,
        type_url: "t".into(),
        nonce: nonce.into(),
        resources: vec![Resource {
            name: name.into(),
            version: "1".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn next(seen: &mut mpsc::UnboundedReceiver<DeltaDiscoveryRequest>) -> DeltaDiscoveryRequest {
    tokio::time::timeout(Duration::from_secs(5), seen.recv())
        .await
        .expect("a request within 5 s")
        .expect("the stream is open")
}

#[tokio::test]
async fn a_type_is_synced_only_when_the_last_part_of_a_cut_push_is_taken() {
    let (send, responses) = mpsc::channel(4);
    let (requests, mut seen) = mpsc::unbounded_channel();
    let server = Scripted {
        responses: std::sync::Mutex::new(Some(responses)),
        requests,
    };
    let incoming =
        tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(server))
            .serve_with_incoming(incoming),
    );
    let plane = ControlPlane::new(&format!("http://{addr}"), None, None).unwrap();
    let client = XdsClient::new(XdsConfig::new(plane, "node", &["t"]), Arc::new(Accept));
    let mut status = client.status();
    let (_trigger, drain) = crate::drain::new();
    tokio::spawn(client.run(drain));
    assert_eq!(next(&mut seen).await.type_url, "t", "the subscription");

    send.send(part("1", part_marker(0, 2), "a")).await.unwrap();
    assert_eq!(next(&mut seen).await.response_nonce, "1");
    let s = status.borrow_and_update().clone();
    assert_eq!(
        (s.acks, s.synced.len()),
        (1, 0),
        "half a push is not a sync"
    );

    send.send(part("2", part_marker(1, 2), "b")).await.unwrap();
    assert_eq!(next(&mut seen).await.response_nonce, "2");
    let s = status.borrow_and_update().clone();
    assert!(s.synced_all(&["t".to_owned()]), "{s:?}");
    assert_eq!(s.versions["t"].len(), 2);
}
