//! Local mode config: one YAML file (see `examples/local-mesh.yaml`) converted into a
//! `Snapshot`, and a watcher that applies edits without a restart.
//!
//! A file that does not parse is rejected whole and the last good snapshot stays in
//! force; an object that parses but is invalid is reported by name and skipped.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tracing::{info, warn};

use crate::model::{
    labels_match, GatewayAddress, GatewayDestination, Labels, MtlsMode, PeerAuthentication,
    Protocol, Service, ServicePort, Snapshot, Workload,
};
use crate::policy::{AuthorizationPolicyManifest, Policies, Policy};

#[derive(Debug, thiserror::Error)]
pub enum LocalFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    #[serde(default = "default_trust_domain")]
    trust_domain: String,
    #[serde(default = "default_root_namespace")]
    root_namespace: String,
    #[serde(default)]
    workloads: Vec<WorkloadSpec>,
    #[serde(default)]
    services: Vec<ServiceSpec>,
    #[serde(default)]
    authorization_policies: Vec<AuthorizationPolicyManifest>,
    #[serde(default)]
    peer_authentications: Vec<PeerAuthManifest>,
}

fn default_trust_domain() -> String {
    mesh_core::identity::DEFAULT_TRUST_DOMAIN.to_owned()
}

fn default_root_namespace() -> String {
    "istio-system".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WorkloadSpec {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    uid: Option<String>,
    #[serde(default = "default_sa")]
    service_account: String,
    node: String,
    ips: Vec<IpAddr>,
    #[serde(default)]
    protocol: ProtocolSpec,
    #[serde(default)]
    labels: Labels,
    waypoint: Option<WaypointSpec>,
}

/// A waypoint, as `istio.workload.GatewayAddress` names one: its Service
/// (`{namespace, hostname}`, the hostname short or full) or an `address`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WaypointSpec {
    namespace: Option<String>,
    hostname: Option<String>,
    address: Option<IpAddr>,
    #[serde(default = "default_hbone_port")]
    hbone_mtls_port: u16,
}

fn default_hbone_port() -> u16 {
    mesh_core::hbone::PORT
}

impl WaypointSpec {
    fn resolve_opt(
        spec: &Option<WaypointSpec>,
        own_ns: &str,
        file: &File,
    ) -> Result<Option<GatewayAddress>, String> {
        (spec.as_ref())
            .map(|spec| spec.resolve(own_ns, &file.trust_domain))
            .transpose()
    }

    fn resolve(&self, own_ns: &str, trust_domain: &str) -> Result<GatewayAddress, String> {
        let destination = match (&self.hostname, self.address) {
            (Some(host), None) => {
                let namespace = self.namespace.as_deref().unwrap_or(own_ns).to_owned();
                let hostname = match host.contains('.') {
                    true => host.clone(),
                    false => format!("{host}.{namespace}.svc.{trust_domain}"),
                };
                GatewayDestination::Hostname {
                    namespace,
                    hostname,
                }
            }
            (None, Some(ip)) => GatewayDestination::Address(ip),
            _ => return Err("waypoint needs exactly one of hostname and address".to_owned()),
        };
        Ok(GatewayAddress {
            destination,
            hbone_mtls_port: self.hbone_mtls_port,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
enum ProtocolSpec {
    #[default]
    #[serde(rename = "HBONE")]
    Hbone,
    #[serde(rename = "TCP")]
    Tcp,
}

fn default_namespace() -> String {
    "default".to_owned()
}

fn default_sa() -> String {
    "default".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServiceSpec {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    hostname: Option<String>,
    vips: Vec<IpAddr>,
    ports: Vec<PortSpec>,
    #[serde(default)]
    selector: Labels,
    waypoint: Option<WaypointSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PortSpec {
    port: u16,
    target_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PeerAuthManifest {
    metadata: Meta,
    #[serde(default)]
    spec: PeerAuthSpec,
}

#[derive(Debug, Deserialize)]
struct Meta {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PeerAuthSpec {
    selector: Option<Selector>,
    mtls: Option<MtlsSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Selector {
    #[serde(default)]
    match_labels: Labels,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MtlsSpec {
    mode: Option<String>,
}

/// Reads and converts `path`. Invalid objects are skipped; their errors are returned
/// beside the snapshot so the caller can log and count them.
pub fn load(path: &Path) -> Result<(Snapshot, Vec<String>), LocalFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| LocalFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|source| LocalFileError::Parse {
        path: path.to_owned(),
        source,
    })
}

pub fn parse(text: &str) -> Result<(Snapshot, Vec<String>), serde_yaml::Error> {
    let file: File = serde_yaml::from_str(text)?;
    let mut errors = Vec::new();
    let workloads = workloads(&file, &mut errors);
    let services = services(&file, &workloads, &mut errors);
    let policies = policies(&file, &mut errors);
    let peer_auth = peer_authentication(&file, &mut errors);
    let snap = Snapshot::new(file.trust_domain, workloads, services, policies, peer_auth);
    Ok((snap, errors))
}

fn workloads(file: &File, errors: &mut Vec<String>) -> Vec<Workload> {
    let mut seen_ips = BTreeMap::new();
    let mut out = Vec::new();
    for w in &file.workloads {
        let uid = w
            .uid
            .clone()
            .unwrap_or_else(|| format!("{}/{}", w.namespace, w.name));
        let id = mesh_core::Identity::new(&file.trust_domain, &w.namespace, &w.service_account);
        if let Err(e) = id {
            errors.push(format!("workload {uid}: {e}"));
            continue;
        }
        if w.ips.is_empty() {
            errors.push(format!("workload {uid}: no ips"));
            continue;
        }
        if let Some(other) = w.ips.iter().find_map(|ip| seen_ips.get(ip)) {
            errors.push(format!("workload {uid}: an ip is already used by {other}"));
            continue;
        }
        let waypoint = match WaypointSpec::resolve_opt(&w.waypoint, &w.namespace, file) {
            Ok(wp) => wp,
            Err(e) => {
                errors.push(format!("workload {uid}: {e}"));
                continue;
            }
        };
        seen_ips.extend(w.ips.iter().map(|ip| (*ip, uid.clone())));
        out.push(Workload {
            uid,
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            trust_domain: file.trust_domain.clone(),
            ips: w.ips.clone(),
            node: w.node.clone(),
            protocol: match w.protocol {
                ProtocolSpec::Hbone => Protocol::Hbone,
                ProtocolSpec::Tcp => Protocol::Tcp,
            },
            labels: w.labels.clone(),
            authorization_policies: Vec::new(),
            waypoint,
        });
    }
    out
}

fn services(file: &File, workloads: &[Workload], errors: &mut Vec<String>) -> Vec<Service> {
    let mut out = Vec::new();
    for s in &file.services {
        let name = format!("{}/{}", s.namespace, s.name);
        if s.vips.is_empty() || s.ports.is_empty() {
            errors.push(format!(
                "service {name}: needs at least one vip and one port"
            ));
            continue;
        }
        if s.ports
            .iter()
            .any(|p| p.port == 0 || p.target_port == Some(0))
        {
            errors.push(format!("service {name}: port 0 is not a port"));
            continue;
        }
        let waypoint = match WaypointSpec::resolve_opt(&s.waypoint, &s.namespace, file) {
            Ok(wp) => wp,
            Err(e) => {
                errors.push(format!("service {name}: {e}"));
                continue;
            }
        };
        // An empty selector selects nothing, as for a Kubernetes Service.
        let endpoints = workloads
            .iter()
            .filter(|w| {
                !s.selector.is_empty()
                    && w.namespace == s.namespace
                    && labels_match(&s.selector, &w.labels)
            })
            .map(|w| w.uid.clone())
            .collect();
        out.push(Service {
            hostname: s
                .hostname
                .clone()
                .unwrap_or_else(|| format!("{}.{}.svc.{}", s.name, s.namespace, file.trust_domain)),
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            vips: s.vips.clone(),
            ports: s
                .ports
                .iter()
                .map(|p| ServicePort {
                    port: p.port,
                    target_port: p.target_port.unwrap_or(p.port),
                })
                .collect(),
            endpoints,
            endpoint_ports: BTreeMap::new(),
            waypoint,
        });
    }
    out
}

fn policies(file: &File, errors: &mut Vec<String>) -> Policies {
    let mut out = Vec::new();
    for m in &file.authorization_policies {
        match Policy::from_manifest(m.clone(), &file.root_namespace) {
            Ok(Some(p)) => out.push(p),
            Ok(None) => {}
            Err(e) => errors.push(e.to_string()),
        }
    }
    Policies::new(out)
}

fn peer_authentication(file: &File, errors: &mut Vec<String>) -> PeerAuthentication {
    let mut pa = PeerAuthentication::default();
    for m in &file.peer_authentications {
        let name = format!("{}/{}", m.metadata.namespace, m.metadata.name);
        let mode = match m.spec.mtls.as_ref().and_then(|t| t.mode.as_deref()) {
            Some("STRICT") => MtlsMode::Strict,
            Some("PERMISSIVE") | Some("UNSET") | None => MtlsMode::Permissive,
            Some(other) => {
                errors.push(format!("PeerAuthentication {name}: mode {other:?} is not supported (STRICT, PERMISSIVE)"));
                continue;
            }
        };
        match &m.spec.selector {
            Some(sel) => {
                let labels = sel.match_labels.clone();
                pa.workloads
                    .push((m.metadata.namespace.clone(), labels, mode));
            }
            None if m.metadata.namespace == file.root_namespace => pa.mesh = Some(mode),
            None => {
                pa.namespaces.insert(m.metadata.namespace.clone(), mode);
            }
        }
    }
    pa
}

/// Polls `path` and calls `apply` with each new valid snapshot. Polling (rather than
/// inotify) also follows files replaced by rename, as editors and ConfigMaps do.
pub async fn watch(
    path: PathBuf,
    interval: Duration,
    mut last: Vec<u8>,
    apply: impl Fn(Snapshot, Vec<String>),
    on_error: impl Fn(&LocalFileError),
) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let Ok(bytes) = tokio::fs::read(&path).await else {
            continue;
        };
        if bytes == last {
            continue;
        }
        last = bytes;
        match load(&path) {
            Ok((snap, errs)) => {
                info!(path = %path.display(), "config file changed; applying");
                apply(snap, errs);
            }
            Err(e) => {
                warn!("{e}; keeping the last good config");
                on_error(&e);
            }
        }
    }
}

#[cfg(test)]
mod tests;
