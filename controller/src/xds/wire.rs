//! The delta ADS method on the wire, with resources encoded once per push rather than once
//! per proxy: [`EncodedResponse`] is a `DeltaDiscoveryResponse` whose resources are
//! already-encoded `Resource` messages (shared, reference-counted bytes), and
//! [`AdsService`] serves `DeltaAggregatedResources` with it. A thousand proxies taking the
//! same 3 MB push then cost one encoding and a thousand copies into the transport, instead
//! of a thousand encodings each allocating every resource's strings anew.
//!
//! Proxies see the same bytes the generated `DeltaDiscoveryResponse` would produce (the
//! field numbers of discovery.proto); the tests decode one with the other. The routing,
//! limits and `Unimplemented` answer for other paths follow what tonic generates.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes};
use mesh_core::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, Resource};
use prost::encoding::{self, DecodeContext, WireType};
use prost::{DecodeError, Message};
use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, Service, StdError};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};

use super::{ResponseStream, XdsServer};

/// The gRPC service name, as in discovery.proto.
pub const SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// Largest request taken: a reconnecting proxy states every version it holds
/// (`initial_resource_versions`), about 60 bytes per resource.
const MAX_REQUEST_BYTES: usize = 64 << 20;

/// `envoy.service.discovery.v3.DeltaDiscoveryResponse` with pre-encoded resources.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EncodedResponse {
    pub system_version_info: String,
    /// Each an encoded `Resource` (field 2, repeated).
    pub resources: Vec<Bytes>,
    pub type_url: String,
    pub removed_resources: Vec<String>,
    pub nonce: String,
}

/// Encodes one resource as it goes into a response, once for every proxy sent it.
pub fn encode_resource(name: &str, version: &str, any: &prost_types::Any) -> Bytes {
    // The `Resource` is built with borrowed-then-copied strings only here, per push.
    Resource {
        name: name.to_owned(),
        version: version.to_owned(),
        resource: Some(any.clone()),
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

impl Message for EncodedResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if !self.system_version_info.is_empty() {
            encoding::string::encode(1, &self.system_version_info, buf);
        }
        for r in &self.resources {
            encoding::bytes::encode(2, r, buf);
        }
        if !self.type_url.is_empty() {
            encoding::string::encode(4, &self.type_url, buf);
        }
        if !self.nonce.is_empty() {
            encoding::string::encode(5, &self.nonce, buf);
        }
        encoding::string::encode_repeated(6, &self.removed_resources, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => encoding::string::merge(wire_type, &mut self.system_version_info, buf, ctx),
            2 => {
                let mut r = Bytes::new();
                encoding::bytes::merge(wire_type, &mut r, buf, ctx)?;
                self.resources.push(r);
                Ok(())
            }
            4 => encoding::string::merge(wire_type, &mut self.type_url, buf, ctx),
            5 => encoding::string::merge(wire_type, &mut self.nonce, buf, ctx),
            6 => encoding::string::merge_repeated(wire_type, &mut self.removed_resources, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let string = |tag, s: &String| {
            if s.is_empty() {
                0
            } else {
                encoding::string::encoded_len(tag, s)
            }
        };
        string(1, &self.system_version_info)
            + self
                .resources
                .iter()
                .map(|r| encoding::bytes::encoded_len(2, r))
                .sum::<usize>()
            + string(4, &self.type_url)
            + string(5, &self.nonce)
            + encoding::string::encoded_len_repeated(6, &self.removed_resources)
    }

    fn clear(&mut self) {
        *self = EncodedResponse::default();
    }
}

/// The tower service `tonic::transport::Server::add_service` takes.
#[derive(Clone)]
pub struct AdsService {
    server: Arc<XdsServer>,
}

impl AdsService {
    pub fn new(server: XdsServer) -> Self {
        AdsService {
            server: Arc::new(server),
        }
    }
}

impl NamedService for AdsService {
    const NAME: &'static str = SERVICE;
}

/// The one method, as `Grpc::streaming` calls it.
struct Delta(Arc<XdsServer>);

impl StreamingService<DeltaDiscoveryRequest> for Delta {
    type Response = EncodedResponse;
    type ResponseStream = ResponseStream;
    type Future = BoxFuture<Response<ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let server = self.0.clone();
        Box::pin(async move { Ok(server.open(request)) })
    }
}

impl<B> Service<http::Request<B>> for AdsService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<http::Response<Body>, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != DELTA_PATH {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let method = Delta(self.server.clone());
        Box::pin(async move {
            let codec =
                tonic_prost::ProstCodec::<EncodedResponse, DeltaDiscoveryRequest>::default();
            let mut grpc = Grpc::new(codec).max_decoding_message_size(MAX_REQUEST_BYTES);
            Ok(grpc.streaming(method, req).await)
        })
    }
}
