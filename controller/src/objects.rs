//! The controller's one internal model of what users applied: the Kubernetes objects the
//! mesh reads, whichever source they came from (a directory of YAML in local mode, the
//! API server otherwise), and the directory source itself.
//!
//! Objects that cannot be used are reported with their file, kind and name and left out;
//! everything else loads. Translation into xDS resources reads this model and nothing else.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mesh_core::Identity;
use serde::Deserialize;

use crate::ca::Placement;

/// namespace/name
pub type Key = (String, String);

/// An object of a kind the mesh reads without a Rust type of its own yet (Istio's and the
/// Gateway API's custom resources): metadata typed, spec kept as parsed.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomObject {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: serde_json::Value,
}

#[derive(Debug, Default)]
pub struct Objects {
    pub trust_domain: String,
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<Key, Pod>,
    pub services: BTreeMap<Key, Service>,
    pub service_accounts: BTreeMap<Key, ServiceAccount>,
    pub endpoint_slices: BTreeMap<Key, EndpointSlice>,
    /// AuthorizationPolicy, PeerAuthentication, Gateway, HTTPRoute, by kind.
    pub custom: BTreeMap<&'static str, BTreeMap<Key, CustomObject>>,
}

/// Kinds kept as [`CustomObject`]s, with the API groups they may come from.
const CUSTOM_KINDS: [(&str, &str); 4] = [
    ("AuthorizationPolicy", "security.istio.io/"),
    ("PeerAuthentication", "security.istio.io/"),
    ("Gateway", "gateway.networking.k8s.io/"),
    ("HTTPRoute", "gateway.networking.k8s.io/"),
];

/// Why an object was left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectError {
    /// File and document number (from 1), or the API path for the Kubernetes source.
    pub origin: String,
    /// `Kind namespace/name` as far as it could be read.
    pub object: String,
    pub reason: String,
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.origin, self.object, self.reason)
    }
}

impl Objects {
    pub fn new(trust_domain: &str) -> Self {
        Objects {
            trust_domain: trust_domain.to_owned(),
            ..Default::default()
        }
    }

    /// Adds one parsed document; `origin` names where it came from in errors.
    pub fn add(&mut self, doc: serde_yaml::Value, origin: &str) -> Result<(), ObjectError> {
        let field = |name: &str| {
            doc.get(name)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        let meta = doc.get("metadata");
        let text = |name: &str| {
            meta.and_then(|m| m.get(name))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        let name = text("name").unwrap_or_default();
        let namespace = text("namespace").unwrap_or_else(|| "default".to_owned());
        let err = |reason: String| ObjectError {
            origin: origin.to_owned(),
            object: format!(
                "{} {namespace}/{name}",
                if kind.is_empty() { "?" } else { &kind }
            ),
            reason,
        };
        if name.is_empty() {
            return Err(err("metadata.name is missing".into()));
        }
        let key = (namespace.clone(), name.clone());
        let parse_err = |e: serde_yaml::Error| err(format!("invalid {kind}: {e}"));
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Namespace") => {
                let ns: Namespace = serde_yaml::from_value(doc).map_err(parse_err)?;
                insert(&mut self.namespaces, name.clone(), ns).map_err(err)
            }
            ("v1", "Pod") => {
                let pod: Pod = serde_yaml::from_value(doc).map_err(parse_err)?;
                check_pod(&pod).map_err(err)?;
                insert(&mut self.pods, key, pod).map_err(err)
            }
            ("v1", "Service") => {
                let svc: Service = serde_yaml::from_value(doc).map_err(parse_err)?;
                insert(&mut self.services, key, svc).map_err(err)
            }
            ("v1", "ServiceAccount") => {
                let sa: ServiceAccount = serde_yaml::from_value(doc).map_err(parse_err)?;
                insert(&mut self.service_accounts, key, sa).map_err(err)
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                let slice: EndpointSlice = serde_yaml::from_value(doc).map_err(parse_err)?;
                insert(&mut self.endpoint_slices, key, slice).map_err(err)
            }
            (api, k) => {
                let Some((kind, _)) = CUSTOM_KINDS
                    .iter()
                    .find(|(ck, group)| *ck == k && api.starts_with(group))
                else {
                    return Err(err(format!(
                        "{api} {k} is not a kind the mesh reads (skipped)"
                    )));
                };
                let obj: CustomObject = serde_yaml::from_value(doc).map_err(parse_err)?;
                insert(self.custom.entry(kind).or_default(), key, obj).map_err(err)
            }
        }
    }

    /// Adds every document of a multi-document YAML text; `source` (a file name) prefixes
    /// each document's origin in the errors returned.
    pub fn add_documents(&mut self, text: &str, source: &str) -> Vec<ObjectError> {
        let mut errors = Vec::new();
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let origin = format!("{source} (document {})", i + 1);
            match serde_yaml::Value::deserialize(doc) {
                Ok(serde_yaml::Value::Null) => {}
                Ok(value) => errors.extend(self.add(value, &origin).err()),
                Err(e) => {
                    errors.push(ObjectError {
                        origin,
                        object: "?".into(),
                        reason: format!("broken YAML: {e}"),
                    });
                    // The parser cannot resynchronise inside a text.
                    break;
                }
            }
        }
        errors
    }

    /// The custom objects of `kind` (e.g. "AuthorizationPolicy").
    pub fn custom(&self, kind: &str) -> impl Iterator<Item = &CustomObject> {
        self.custom.get(kind).into_iter().flat_map(|m| m.values())
    }

    /// The SPIFFE identity a pod's workload runs as.
    pub fn pod_identity(&self, pod: &Pod) -> Option<Identity> {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .unwrap_or("default");
        Identity::new(&self.trust_domain, ns, sa).ok()
    }
}

impl Placement for Objects {
    fn scheduled_on(&self, identity: &Identity, node: &str) -> bool {
        self.pods.values().any(|pod| {
            pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
                && self.pod_identity(pod).as_ref() == Some(identity)
        })
    }
}

fn insert<K: Ord + fmt::Debug, V>(
    map: &mut BTreeMap<K, V>,
    key: K,
    value: V,
) -> Result<(), String> {
    if map.contains_key(&key) {
        return Err("defined twice; the first definition is kept".into());
    }
    map.insert(key, value);
    Ok(())
}

/// A pod the mesh can serve: scheduled, with an address.
fn check_pod(pod: &Pod) -> Result<(), String> {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    if node.is_none_or(str::is_empty) {
        return Err("spec.nodeName is missing: the pod is not scheduled".into());
    }
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref());
    match ip {
        None | Some("") => Err("status.podIP is missing".into()),
        Some(ip) if ip.parse::<std::net::IpAddr>().is_err() => {
            Err(format!("status.podIP {ip:?} is not an IP address"))
        }
        Some(_) => Ok(()),
    }
}

/// Reads every `*.yaml` / `*.yml` file below `dir` (sorted, so results do not depend on
/// the file system's order), each possibly holding several documents.
pub fn load_dir(dir: &Path, trust_domain: &str) -> std::io::Result<(Objects, Vec<ObjectError>)> {
    let mut files = Vec::new();
    collect_yaml(dir, &mut files)?;
    files.sort();
    let mut objects = Objects::new(trust_domain);
    let mut errors = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        let shown = file
            .strip_prefix(dir)
            .unwrap_or(&file)
            .display()
            .to_string();
        errors.extend(objects.add_documents(&text, &shown));
    }
    Ok((objects, errors))
}

/// Every `*.yaml` / `*.yml` file below `dir`, depth first.
pub fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_yaml(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
