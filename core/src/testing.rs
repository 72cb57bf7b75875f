//! Test support (feature `testing`): echo servers, a development CA on disk, and a
//! delta ADS server with a fixed set of resources. Real sockets only; nothing here fakes
//! the network.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A TCP echo server: echoes every byte, and half-closes when the client does.
pub async fn echo_server(addr: SocketAddr) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    Ok((bound, task))
}

/// A server that answers every connection with `greeting` and then echoes: lets a test
/// tell which backend it reached.
pub async fn greeting_echo_server(
    addr: SocketAddr,
    greeting: &'static str,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                if tcp.write_all(greeting.as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; 16 << 10];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if tcp.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = tcp.shutdown().await;
            });
        }
    });
    Ok((bound, task))
}

/// Resources by type URL, each as (xDS name, encoded message).
pub type StaticResources = std::collections::BTreeMap<String, Vec<(String, Vec<u8>)>>;

/// A delta ADS server that answers each subscription once with every resource it holds of
/// that type (none is a valid, empty answer) and then only reads ACKs: a stand-in for the
/// controller where a test builds the resources by hand. Real gRPC on `addr`.
pub async fn static_ads(
    addr: SocketAddr,
    resources: StaticResources,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let incoming = futures_util::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(tcp, _)| tcp);
        Some((next, l))
    });
    let svc = AggregatedDiscoveryServiceServer::new(ads::Static(std::sync::Arc::new(resources)));
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await;
    });
    Ok((bound, task))
}

mod ads {
    use std::pin::Pin;
    use std::sync::Arc;

    use tokio::sync::mpsc;
    use tokio_stream::Stream;

    use super::StaticResources;
    use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
    use crate::proto::envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
    };

    type Responses =
        Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, tonic::Status>> + Send>>;

    pub struct Static(pub Arc<StaticResources>);

    #[tonic::async_trait]
    impl AggregatedDiscoveryService for Static {
        type DeltaAggregatedResourcesStream = Responses;

        async fn delta_aggregated_resources(
            &self,
            request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
        ) -> Result<tonic::Response<Responses>, tonic::Status> {
            let mut incoming = request.into_inner();
            let (tx, rx) = mpsc::channel(16);
            let resources = self.0.clone();
            tokio::spawn(async move {
                let mut nonce = 0u64;
                while let Ok(Some(req)) = incoming.message().await {
                    // A request without a nonce is a subscription; the rest are ACKs.
                    if !req.response_nonce.is_empty() {
                        continue;
                    }
                    nonce += 1;
                    let held = resources.get(&req.type_url).cloned().unwrap_or_default();
                    let resp = response(&req.type_url, held, nonce);
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            });
            let out = tokio_stream::wrappers::ReceiverStream::new(rx);
            Ok(tonic::Response::new(Box::pin(out) as Responses))
        }
    }

    fn response(
        type_url: &str,
        held: Vec<(String, Vec<u8>)>,
        nonce: u64,
    ) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url.to_owned(),
            nonce: nonce.to_string(),
            resources: (held.into_iter())
                .map(|(name, value)| Resource {
                    name,
                    version: "1".to_owned(),
                    resource: Some(prost_types::Any {
                        type_url: type_url.to_owned(),
                        value,
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
}
