//! The delta ADS client every proxy uses to take its config from the controller.
//!
//! One stream, wildcard subscriptions for the types the proxy asks for. Each response is
//! handed to the proxy's [`Handler`] whole: it either takes every resource in it (ACK) or
//! none (NACK with the reason; the proxy keeps what it had). The versions the proxy holds
//! survive a lost stream and are sent as `initial_resource_versions` on reconnect, so the
//! controller sends only the difference. Reconnects back off exponentially with jitter;
//! the handler's state is never cleared by a disconnect.
//!
//! A large push may come as several responses (the controller cuts them to bound its
//! memory); every part but the last says so in `system_version_info` ([`part_marker`]),
//! and a type counts as synced only once the last part is accepted. A server that never
//! cuts (istiod) sends no marker: each of its responses is complete.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::control_plane::ControlPlane;
use crate::drain::Drain;
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use crate::proto::google::rpc::Status as RpcStatus;

/// gRPC `INVALID_ARGUMENT`, the code a NACK carries.
const INVALID_ARGUMENT: i32 = 3;

/// Where the controller is and who we are.
#[derive(Clone, Debug)]
pub struct XdsConfig {
    pub controller: ControlPlane,
    /// `Node.id`, as the controller's proxy-status shows it.
    pub node_id: String,
    /// Bearer token sent with every call, if any.
    pub token: Option<String>,
    /// Type URLs to subscribe to (wildcard).
    pub types: Vec<String>,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl XdsConfig {
    pub fn new(controller: ControlPlane, node_id: impl Into<String>, types: &[&str]) -> Self {
        XdsConfig {
            controller,
            node_id: node_id.into(),
            token: None,
            types: types.iter().map(|t| (*t).to_owned()).collect(),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// The proxy's side: validates and applies one response of one type.
pub trait Handler: Send + Sync + 'static {
    /// `Err(reason)` rejects the whole response: nothing of it may have been applied.
    fn apply(&self, type_url: &str, updated: &[Resource], removed: &[String])
        -> Result<(), String>;
}

/// What the client has done so far, for readiness, dumps and tests.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct XdsStatus {
    pub connected: bool,
    /// Types for which at least one complete push was accepted since start.
    pub synced: BTreeSet<String>,
    /// Accepted responses.
    pub acks: u64,
    /// Rejected responses.
    pub nacks: u64,
    /// Streams opened (first connect included).
    pub connects: u64,
    pub last_error: Option<String>,
    /// Resource versions held, by type: what a reconnect announces.
    pub versions: BTreeMap<String, BTreeMap<String, String>>,
}

impl XdsStatus {
    /// Every subscribed type has been accepted at least once.
    pub fn synced_all(&self, types: &[String]) -> bool {
        types.iter().all(|t| self.synced.contains(t))
    }
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("the token is not a valid header value")]
    Token,
    #[error("stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("controller closed the stream")]
    Closed,
}

pub struct XdsClient<H> {
    cfg: XdsConfig,
    handler: Arc<H>,
    status: watch::Sender<XdsStatus>,
}

impl<H: Handler> XdsClient<H> {
    pub fn new(cfg: XdsConfig, handler: Arc<H>) -> Self {
        let (status, _) = watch::channel(XdsStatus::default());
        XdsClient {
            cfg,
            handler,
            status,
        }
    }

    pub fn status(&self) -> watch::Receiver<XdsStatus> {
        self.status.subscribe()
    }

    /// Keeps a stream open until `drain` signals, reconnecting with backoff.
    pub async fn run(self, drain: Drain) {
        let mut backoff = self.cfg.backoff_min;
        loop {
            let before = self.status.borrow().acks + self.status.borrow().nacks;
            let ended = tokio::select! {
                _ = drain.signaled() => return,
                ended = self.stream_once() => ended,
            };
            let progressed = self.status.borrow().acks + self.status.borrow().nacks > before;
            if progressed {
                backoff = self.cfg.backoff_min;
            }
            let reason = match ended {
                Ok(()) => StreamError::Closed.to_string(),
                Err(e) => e.to_string(),
            };
            let wait = jitter(backoff);
            warn!(
                controller = %self.cfg.controller.address(),
                retry_in_ms = wait.as_millis() as u64,
                "xDS stream lost, keeping the last good config: {reason}"
            );
            self.status.send_modify(|s| {
                s.connected = false;
                s.last_error = Some(reason);
            });
            tokio::select! {
                _ = drain.signaled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            backoff = (backoff * 2).min(self.cfg.backoff_max);
        }
    }

    async fn stream_once(&self) -> Result<(), StreamError> {
        let mut client = AggregatedDiscoveryServiceClient::new(self.cfg.controller.channel())
            .max_decoding_message_size(usize::MAX);
        let (tx, rx) = mpsc::channel(16);
        let held = self.status.borrow().versions.clone();
        for type_url in &self.cfg.types {
            let req = DeltaDiscoveryRequest {
                node: Some(Node {
                    id: self.cfg.node_id.clone(),
                    ..Default::default()
                }),
                type_url: type_url.clone(),
                initial_resource_versions: held.get(type_url).cloned().unwrap_or_default(),
                ..Default::default()
            };
            // The channel has room for every initial request.
            let _ = tx.try_send(req);
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = &self.cfg.token {
            request
                .metadata_mut()
                .insert("authorization", bearer(token).ok_or(StreamError::Token)?);
        }
        let mut responses = client
            .delta_aggregated_resources(request)
            .await?
            .into_inner();
        info!(controller = %self.cfg.controller.address(), node = %self.cfg.node_id, "xDS stream open");
        self.status.send_modify(|s| {
            s.connected = true;
            s.connects += 1;
            s.last_error = None;
        });
        while let Some(resp) = responses.message().await? {
            let reply = self.on_response(resp);
            if tx.send(reply).await.is_err() {
                return Err(StreamError::Closed);
            }
        }
        Ok(())
    }

    /// Applies one response and builds its ACK or NACK.
    fn on_response(&self, resp: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let DeltaDiscoveryResponse {
            type_url,
            resources,
            removed_resources,
            nonce,
            system_version_info,
            ..
        } = resp;
        let more_to_come = is_partial(&system_version_info);
        let mut reply = DeltaDiscoveryRequest {
            type_url: type_url.clone(),
            response_nonce: nonce.clone(),
            ..Default::default()
        };
        let outcome = if self.cfg.types.contains(&type_url) {
            self.handler
                .apply(&type_url, &resources, &removed_resources)
        } else {
            Err(format!("type {type_url} was not subscribed"))
        };
        match outcome {
            Ok(()) => {
                debug!(%type_url, %nonce, updated = resources.len(), removed = removed_resources.len(), "xDS ACK");
                self.status.send_modify(|s| {
                    s.acks += 1;
                    if !more_to_come {
                        s.synced.insert(type_url.clone());
                    }
                    let held = s.versions.entry(type_url.clone()).or_default();
                    for name in &removed_resources {
                        held.remove(name);
                    }
                    for r in &resources {
                        held.insert(r.name.clone(), r.version.clone());
                    }
                });
            }
            Err(reason) => {
                warn!(%type_url, %nonce, "xDS response rejected (NACK), keeping the last good config: {reason}");
                self.status.send_modify(|s| s.nacks += 1);
                reply.error_detail = Some(RpcStatus {
                    code: INVALID_ARGUMENT,
                    message: reason,
                    details: Vec::new(),
                });
            }
        }
        reply
    }
}

/// Applies one response of one type to the resources a handler holds (by xDS name):
/// decodes every resource first; only if all decode are they and the removals applied,
/// so an `Err` (the NACK reason) leaves `held` as it was.
pub fn merge<M: Message + Default>(
    held: &mut BTreeMap<String, M>,
    type_url: &str,
    updated: &[Resource],
    removed: &[String],
) -> Result<(), String> {
    let mut decoded = Vec::with_capacity(updated.len());
    let mut errors = Vec::new();
    for r in updated {
        let Some(any) = &r.resource else {
            errors.push(format!("{}: no resource body", r.name));
            continue;
        };
        if any.type_url != type_url {
            errors.push(format!(
                "{}: type {} in a {type_url} response",
                r.name, any.type_url
            ));
            continue;
        }
        match M::decode(any.value.as_slice()) {
            Ok(m) => decoded.push((r.name.clone(), m)),
            Err(e) => errors.push(format!("{}: {e}", r.name)),
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    for name in removed {
        held.remove(name);
    }
    held.extend(decoded);
    Ok(())
}

/// What part `part` (from 0) of a push cut into `parts` responses says in
/// `system_version_info`: `"part 1/3"` and so on; empty for a push sent whole.
pub fn part_marker(part: usize, parts: usize) -> String {
    if parts <= 1 {
        String::new()
    } else {
        format!("part {}/{parts}", part + 1)
    }
}

/// Whether a response says more parts of its push follow (see [`part_marker`]).
pub fn is_partial(system_version_info: &str) -> bool {
    let Some((part, parts)) = system_version_info
        .strip_prefix("part ")
        .and_then(|p| p.split_once('/'))
    else {
        return false;
    };
    matches!((part.parse::<usize>(), parts.parse::<usize>()), (Ok(a), Ok(b)) if a < b)
}

/// `authorization` metadata for a bearer token; `None` if the token cannot be a header.
pub fn bearer(token: &str) -> Option<tonic::metadata::AsciiMetadataValue> {
    format!("Bearer {token}").parse().ok()
}

/// `base` scaled by a random factor in [0.5, 1.5), so proxies do not reconnect in step.
fn jitter(base: Duration) -> Duration {
    base.mul_f64(0.5 + rand::random::<f64>())
}

#[cfg(test)]
mod tests;
