//! User-facing AuthorizationPolicy types, shaped like the `security.istio.io/v1` Kubernetes
//! object so a manifest can be applied to both meshes. Shared by the controller (which
//! translates them into `istio.security.Authorization`) and the ztunnel's local mode.
//!
//! Owns deserialization only: every spec-level type rejects unknown fields so a typo is an
//! error rather than a silently wider policy. Validation and meaning live with the readers
//! (the ztunnel's `Policy::from_manifest`, the controller's translation); nothing here is
//! read on the data path.

use std::fmt;

use serde::de::{self, IgnoredAny, Visitor};
use serde::{Deserialize, Deserializer};

/// Label keys to values.
pub type Labels = std::collections::BTreeMap<String, String>;

/// One AuthorizationPolicy object. `apiVersion`, `kind` and `status` are accepted and ignored;
/// any other top-level field is an error, so a misspelt `spec` cannot become an empty spec.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicyManifest {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub metadata: Metadata,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: Spec,
    #[serde(default)]
    pub status: Option<IgnoredAny>,
}

/// Object metadata; labels, annotations and the like are ignored.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

fn default_namespace() -> String {
    "default".to_owned()
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    #[serde(default)]
    pub selector: Option<Selector>,
    /// Deprecated single form of `targetRefs`; either one hands the policy to a waypoint.
    #[serde(default)]
    pub target_ref: Option<TargetRef>,
    #[serde(default, deserialize_with = "nullable")]
    pub target_refs: Vec<TargetRef>,
    #[serde(default, deserialize_with = "nullable")]
    pub action: Action,
    /// Only meaningful with CUSTOM, which the ztunnel rejects; accepted so the error says so.
    #[serde(default)]
    pub provider: Option<Provider>,
    #[serde(default, deserialize_with = "nullable")]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    #[serde(default, deserialize_with = "nullable")]
    pub match_labels: Labels,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Provider {
    pub name: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default, deserialize_with = "nullable")]
    pub from: Vec<RuleFrom>,
    #[serde(default, deserialize_with = "nullable")]
    pub to: Vec<RuleTo>,
    #[serde(default, deserialize_with = "nullable")]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    #[serde(default, deserialize_with = "nullable")]
    pub source: Source,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default, deserialize_with = "nullable")]
    pub principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub request_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_request_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub namespaces: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_namespaces: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    #[serde(default, deserialize_with = "nullable")]
    pub operation: Operation,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default, deserialize_with = "nullable")]
    pub hosts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_hosts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<Scalar>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_ports: Vec<Scalar>,
    #[serde(default, deserialize_with = "nullable")]
    pub methods: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_methods: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub paths: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_paths: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default, deserialize_with = "nullable")]
    pub values: Vec<Scalar>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_values: Vec<Scalar>,
}

/// A string-typed API value that YAML authors often write unquoted (`ports: [8080]`):
/// accepts a string or an integer and keeps its text for validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl Visitor<'_> for ScalarVisitor {
    type Value = Scalar;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or an integer")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
        Ok(Scalar(v.to_owned()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
        Ok(Scalar(v.to_string()))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
        Ok(Scalar(v.to_string()))
    }
}

/// Kubernetes manifests often carry `rules:` or `from:` with no value; YAML reads that as
/// null, which means the same as absent.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}
