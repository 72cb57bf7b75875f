//! The controller's one internal model of what users applied: the Kubernetes objects the
//! mesh reads, whichever source they came from (a directory of YAML in local mode, the
//! API server otherwise), and the directory source itself.
//!
//! Objects that cannot be used are reported with their file, kind and name and left out;
//! everything else loads. Translation into xDS resources reads this model and nothing else.
//!
//! The directory source ([`DirSource`]) keeps each file's parsed documents and re-reads
//! only the files that changed; the model is rebuilt from them in file order, so it and its
//! errors are exactly what reading every file again would give.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

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
#[derive(Clone, Debug, PartialEq, Deserialize)]
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
    /// Shared with the directory source's cache (pods are most of a large model), and
    /// compared by pointer to find the pods that did not change.
    pub pods: BTreeMap<Key, Arc<Pod>>,
    pub services: BTreeMap<Key, Service>,
    pub service_accounts: BTreeMap<Key, ServiceAccount>,
    pub endpoint_slices: BTreeMap<Key, EndpointSlice>,
    /// Istio's and the Gateway API's kinds ([`CUSTOM_KINDS`]), by kind.
    pub custom: BTreeMap<&'static str, BTreeMap<Key, CustomObject>>,
}

/// Kinds kept as [`CustomObject`]s, with the API groups they may come from.
const CUSTOM_KINDS: [(&str, &str); 8] = [
    ("AuthorizationPolicy", "security.istio.io/"),
    ("PeerAuthentication", "security.istio.io/"),
    ("RequestAuthentication", "security.istio.io/"),
    ("Gateway", "gateway.networking.k8s.io/"),
    ("HTTPRoute", "gateway.networking.k8s.io/"),
    ("GRPCRoute", "gateway.networking.k8s.io/"),
    ("VirtualService", "networking.istio.io/"),
    ("DestinationRule", "networking.istio.io/"),
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
        let (item, about) = parse(doc, origin)?;
        self.insert(item, &about)
    }

    /// Adds every document of a multi-document YAML text; `source` (a file name) prefixes
    /// each document's origin in the errors returned.
    pub fn add_documents(&mut self, text: &str, source: &str) -> Vec<ObjectError> {
        let mut errors = Vec::new();
        for doc in parse_documents(text, source) {
            match doc {
                Ok((item, about)) => errors.extend(self.insert(item, &about).err()),
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    /// Puts a parsed object into its map; the first definition of a name is kept.
    fn insert(&mut self, item: Item, about: &About) -> Result<(), ObjectError> {
        let placed = match item {
            Item::Namespace(name, ns) => insert(&mut self.namespaces, name, *ns),
            Item::Pod(key, pod) => insert(&mut self.pods, key, pod),
            Item::Service(key, svc) => insert(&mut self.services, key, *svc),
            Item::ServiceAccount(key, sa) => insert(&mut self.service_accounts, key, *sa),
            Item::EndpointSlice(key, slice) => insert(&mut self.endpoint_slices, key, *slice),
            Item::Custom(kind, key, obj) => insert(self.custom.entry(kind).or_default(), key, *obj),
        };
        placed.map_err(|reason| about.error(reason))
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

/// One document read into its kind's type, not yet in a model. Items live briefly (one
/// per document while a file is read and cached), so their size differences do not matter.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
enum Item {
    Namespace(String, Box<Namespace>),
    Pod(Key, Arc<Pod>),
    Service(Key, Box<Service>),
    ServiceAccount(Key, Box<ServiceAccount>),
    EndpointSlice(Key, Box<EndpointSlice>),
    Custom(&'static str, Key, Box<CustomObject>),
}

/// Where a document came from and what it is, for its errors.
#[derive(Clone, Debug)]
struct About {
    origin: String,
    /// `Kind namespace/name` as far as it could be read.
    object: String,
}

impl About {
    fn error(&self, reason: String) -> ObjectError {
        ObjectError {
            origin: self.origin.clone(),
            object: self.object.clone(),
            reason,
        }
    }
}

/// Reads one document into its kind's type; `origin` names where it came from in errors.
fn parse(doc: serde_yaml::Value, origin: &str) -> Result<(Item, About), ObjectError> {
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
    let about = About {
        origin: origin.to_owned(),
        object: format!(
            "{} {namespace}/{name}",
            if kind.is_empty() { "?" } else { &kind }
        ),
    };
    let err = |reason: String| about.error(reason);
    if name.is_empty() {
        return Err(err("metadata.name is missing".into()));
    }
    let key = (namespace, name.clone());
    let parse_err = |e: serde_yaml::Error| err(format!("invalid {kind}: {e}"));
    let item = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => {
            Item::Namespace(name, serde_yaml::from_value(doc).map_err(parse_err)?)
        }
        ("v1", "Pod") => {
            let pod: Pod = serde_yaml::from_value(doc).map_err(parse_err)?;
            check_pod(&pod).map_err(err)?;
            Item::Pod(key, Arc::new(pod))
        }
        ("v1", "Service") => Item::Service(key, serde_yaml::from_value(doc).map_err(parse_err)?),
        ("v1", "ServiceAccount") => {
            Item::ServiceAccount(key, serde_yaml::from_value(doc).map_err(parse_err)?)
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            Item::EndpointSlice(key, serde_yaml::from_value(doc).map_err(parse_err)?)
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
            Item::Custom(kind, key, serde_yaml::from_value(doc).map_err(parse_err)?)
        }
    };
    Ok((item, about))
}

/// Every document of a multi-document YAML text, read; `source` (a file name) prefixes
/// each document's origin.
fn parse_documents(text: &str, source: &str) -> Vec<Result<(Item, About), ObjectError>> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let origin = format!("{source} (document {})", i + 1);
        match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => {}
            Ok(value) => out.push(parse(value, &origin)),
            Err(e) => {
                out.push(Err(ObjectError {
                    origin,
                    object: "?".into(),
                    reason: format!("broken YAML: {e}"),
                }));
                // The parser cannot resynchronise inside a text.
                break;
            }
        }
    }
    out
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
    DirSource::new(dir, trust_domain).load()
}

/// A directory of manifests followed over time: each file's documents are kept as read,
/// and a load re-reads only the files whose size, modification time or inode changed.
pub struct DirSource {
    dir: PathBuf,
    trust_domain: String,
    files: BTreeMap<PathBuf, CachedFile>,
    reread: usize,
}

struct CachedFile {
    stamp: Stamp,
    docs: Vec<Result<(Item, About), ObjectError>>,
}

/// What tells that a file changed without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Stamp> {
        let m = std::fs::metadata(path)?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let inode = 0;
        Ok(Stamp {
            len: m.len(),
            modified: m.modified().ok(),
            inode,
        })
    }
}

impl DirSource {
    pub fn new(dir: &Path, trust_domain: &str) -> Self {
        DirSource {
            dir: dir.to_owned(),
            trust_domain: trust_domain.to_owned(),
            files: BTreeMap::new(),
            reread: 0,
        }
    }

    /// The model of every `*.yaml` / `*.yml` file below the directory, files in sorted
    /// order, and what was left out: what [`load_dir`] gives. A file or directory that
    /// cannot be read fails the whole load and leaves the cache as it was.
    pub fn load(&mut self) -> std::io::Result<(Objects, Vec<ObjectError>)> {
        let mut paths = Vec::new();
        collect_yaml(&self.dir, &mut paths)?;
        let mut files = BTreeMap::new();
        let read = self.refresh(paths, &mut files);
        // Whatever was read or moved stays valid; entries of removed files go on success.
        if read.is_err() {
            self.files.append(&mut files);
        } else {
            self.files = files;
        }
        self.reread = read?;
        Ok(self.model())
    }

    /// Moves each file's entry from the cache into `files`, reading those that changed;
    /// the number read.
    fn refresh(
        &mut self,
        paths: Vec<PathBuf>,
        files: &mut BTreeMap<PathBuf, CachedFile>,
    ) -> std::io::Result<usize> {
        let mut reread = 0;
        for path in paths {
            // Stamped before reading: a write after the stamp shows at the next load.
            let stamp = Stamp::of(&path)?;
            let file = match self.files.remove(&path) {
                Some(cached) if cached.stamp == stamp => cached,
                _ => {
                    let text = std::fs::read_to_string(&path)?;
                    let shown = path.strip_prefix(&self.dir).unwrap_or(&path).display();
                    reread += 1;
                    CachedFile {
                        stamp,
                        docs: parse_documents(&text, &shown.to_string()),
                    }
                }
            };
            files.insert(path, file);
        }
        Ok(reread)
    }

    /// Files read (not taken from the cache) by the last load.
    pub fn reread(&self) -> usize {
        self.reread
    }

    fn model(&self) -> (Objects, Vec<ObjectError>) {
        let mut objects = Objects::new(&self.trust_domain);
        let mut errors = Vec::new();
        for file in self.files.values() {
            for doc in &file.docs {
                match doc {
                    Ok((item, about)) => errors.extend(objects.insert(item.clone(), about).err()),
                    Err(e) => errors.push(e.clone()),
                }
            }
        }
        (objects, errors)
    }
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
