//! L4 AuthorizationPolicy for the ztunnel, with Istio's semantics.
//!
//! Owns the conversion of `security.istio.io` AuthorizationPolicy manifests into a validated
//! model (`Policy`), the index of policies by scope (`Policies`) and the per-connection
//! decision (`Policies::evaluate`). It sees only what a ztunnel sees: peer identity, source
//! and destination address and port. It must not parse HTTP: L7 attributes are resolved
//! conservatively at conversion (an ALLOW rule using them never matches; a DENY rule drops
//! them and denies on the rest). Policies with `targetRefs` belong to a waypoint and are
//! skipped. Evaluation takes no lock and allocates only to name the deciding policy.

pub use mesh_core::authz_manifest as manifest;
mod rule;
mod wire;

use std::collections::HashMap;
use std::net::IpAddr;

use mesh_core::Identity;
use serde::Serialize;

use crate::model::{labels_match, Labels, Workload};

pub use manifest::AuthorizationPolicyManifest;
pub use rule::{MatchList, Rule, StringMatch};

/// Istio's default root namespace: a policy there without a selector covers the mesh.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("AuthorizationPolicy {policy}: action CUSTOM is not supported by the ztunnel")]
    CustomAction { policy: String },
    #[error("AuthorizationPolicy {policy}: {field} value {value:?} is not an IP address or CIDR")]
    InvalidCidr {
        policy: String,
        field: String,
        value: String,
    },
    #[error("AuthorizationPolicy {policy}: {field} value {value:?} is not a port (1-65535)")]
    InvalidPort {
        policy: String,
        field: String,
        value: String,
    },
    #[error("AuthorizationPolicy {policy}: unsupported `when` key {key:?}")]
    UnknownConditionKey { policy: String, key: String },
    #[error("AuthorizationPolicy {policy}: `when` key {key:?} has neither values nor notValues")]
    EmptyCondition { policy: String, key: String },
    #[error("Authorization {policy}: unknown {field} value {value}")]
    UnknownValue {
        policy: String,
        field: &'static str,
        value: i32,
    },
}

/// What a policy does when one of its rules matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
    /// Marks matching connections for audit; never changes the decision.
    Audit,
}

/// Which workloads a policy covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum Scope {
    /// No selector, in the root namespace: every workload in the mesh.
    Mesh,
    /// No selector: every workload of the policy's namespace.
    Namespace,
    /// Selector: matching workloads of the policy's namespace.
    Selector { match_labels: Labels },
    /// Selector in the root namespace: matching workloads of every namespace.
    MeshSelector { match_labels: Labels },
    /// Selector resolved by the controller: the workloads that list the policy in their
    /// `authorization_policies`.
    Listed,
}

impl Scope {
    fn mesh_wide(&self) -> bool {
        // A listed policy of the root namespace covers workloads of every namespace.
        matches!(
            self,
            Scope::Mesh | Scope::MeshSelector { .. } | Scope::Listed
        )
    }
}

/// One validated AuthorizationPolicy, as the ztunnel enforces it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    name: String,
    namespace: String,
    /// `namespace/name`, built once so decisions can name the policy cheaply.
    #[serde(skip)]
    id: String,
    scope: Scope,
    action: Action,
    rules: Vec<Rule>,
}

impl Policy {
    /// Validates a manifest. `Ok(None)` for a policy attached by `targetRefs`: that one is
    /// enforced by a waypoint, not here.
    pub fn from_manifest(
        m: AuthorizationPolicyManifest,
        root_namespace: &str,
    ) -> Result<Option<Policy>, PolicyError> {
        let manifest::Metadata { name, namespace } = m.metadata;
        let spec = m.spec;
        if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
            return Ok(None);
        }
        let id = format!("{namespace}/{name}");
        let action = match spec.action {
            manifest::Action::Allow => Action::Allow,
            manifest::Action::Deny => Action::Deny,
            manifest::Action::Audit => Action::Audit,
            manifest::Action::Custom => return Err(PolicyError::CustomAction { policy: id }),
        };
        let rules = (spec.rules.into_iter())
            .map(|r| Rule::from_manifest(r, action, &id))
            .collect::<Result<Vec<_>, _>>()?;
        let l7 = rules
            .iter()
            .filter(|r| !r.l7_attributes().is_empty())
            .count();
        if l7 > 0 {
            tracing::info!(policy = %id, rules = l7, ?action, "L7 attributes ignored at the ztunnel");
        }
        let root = namespace == root_namespace;
        let scope = match (spec.selector, root) {
            (None, true) => Scope::Mesh,
            (None, false) => Scope::Namespace,
            (Some(s), false) => Scope::Selector {
                match_labels: s.match_labels,
            },
            (Some(s), true) => Scope::MeshSelector {
                match_labels: s.match_labels,
            },
        };
        Ok(Some(Policy {
            name,
            namespace,
            id,
            scope,
            action,
            rules,
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// `namespace/name`.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn action(&self) -> Action {
        self.action
    }

    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether the policy's scope covers `w`.
    pub fn applies_to(&self, w: &Workload) -> bool {
        match &self.scope {
            Scope::Mesh => true,
            Scope::Namespace => w.namespace == self.namespace,
            Scope::Selector { match_labels } => {
                w.namespace == self.namespace && labels_match(match_labels, &w.labels)
            }
            Scope::MeshSelector { match_labels } => labels_match(match_labels, &w.labels),
            Scope::Listed => w.authorization_policies.contains(&self.id),
        }
    }

    /// The first rule matching `conn`; a policy without rules matches nothing.
    pub fn matching_rule(&self, conn: &ConnInfo<'_>) -> Option<&Rule> {
        let conn = conn.canonical();
        self.rules.iter().find(|r| r.matches(&conn))
    }
}

/// What the ztunnel knows about an inbound connection when it authorizes it.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo<'a> {
    /// The peer's mTLS identity; `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    /// The workload (target) port.
    pub dst_port: u16,
}

impl ConnInfo<'_> {
    /// Dual-stack sockets report IPv4 peers as `::ffff:a.b.c.d`; CIDRs are written in v4.
    fn canonical(&self) -> Self {
        ConnInfo {
            src_ip: self.src_ip.to_canonical(),
            dst_ip: self.dst_ip.to_canonical(),
            ..*self
        }
    }
}

/// The outcome for one connection. `policy` is `namespace/name` of the deciding policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow {
        policy: Option<String>,
    },
    Deny {
        policy: Option<String>,
        reason: String,
    },
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

/// Every policy of a snapshot, indexed by scope so a connection checks only those that can
/// cover its destination. Serializes as the list of policies.
#[derive(Debug, Default, Serialize)]
#[serde(transparent)]
pub struct Policies {
    list: Vec<Policy>,
    /// Indices into `list` of policies with a mesh-wide scope.
    #[serde(skip)]
    mesh_wide: Vec<usize>,
    /// Indices into `list` of the other policies, by namespace.
    #[serde(skip)]
    by_namespace: HashMap<String, Vec<usize>>,
}

impl Policies {
    pub fn new(list: Vec<Policy>) -> Self {
        let mut mesh_wide = Vec::new();
        let mut by_namespace: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, p) in list.iter().enumerate() {
            if p.scope.mesh_wide() {
                mesh_wide.push(i);
            } else {
                by_namespace.entry(p.namespace.clone()).or_default().push(i);
            }
        }
        Policies {
            list,
            mesh_wide,
            by_namespace,
        }
    }

    /// Converts manifests, skipping those that belong to a waypoint.
    pub fn from_manifests(
        manifests: impl IntoIterator<Item = AuthorizationPolicyManifest>,
        root_namespace: &str,
    ) -> Result<Self, PolicyError> {
        let mut list = Vec::new();
        for m in manifests {
            list.extend(Policy::from_manifest(m, root_namespace)?);
        }
        Ok(Policies::new(list))
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Policy> {
        self.list.iter()
    }

    /// Policies whose scope covers `dst`.
    pub fn applicable<'a, 'w>(
        &'a self,
        dst: &'w Workload,
    ) -> impl Iterator<Item = &'a Policy> + use<'a, 'w> {
        let local = self.by_namespace.get(dst.namespace.as_str());
        let local = local.map(Vec::as_slice).unwrap_or_default();
        (self.mesh_wide.iter().chain(local))
            .filter_map(|&i| self.list.get(i))
            .filter(move |p| p.applies_to(dst))
    }

    /// Istio's order: a matching DENY denies; with no ALLOW policy the connection is
    /// allowed; otherwise one ALLOW policy must match. AUDIT policies are not consulted.
    pub fn evaluate(&self, dst: &Workload, conn: &ConnInfo<'_>) -> Decision {
        let conn = conn.canonical();
        let mut has_allow = false;
        let mut allowed_by = None;
        for p in self.applicable(dst) {
            match p.action {
                Action::Deny => {
                    if let Some(rule) = p.rules.iter().find(|r| r.matches(&conn)) {
                        return deny(p, rule);
                    }
                }
                Action::Allow => {
                    has_allow = true;
                    if allowed_by.is_none() && p.rules.iter().any(|r| r.matches(&conn)) {
                        allowed_by = Some(p);
                    }
                }
                Action::Audit => {}
            }
        }
        match (has_allow, allowed_by) {
            (false, _) => Decision::Allow { policy: None },
            (true, Some(p)) => Decision::Allow {
                policy: Some(p.id.clone()),
            },
            (true, None) => Decision::Deny {
                policy: None,
                reason: "no ALLOW policy matched".to_owned(),
            },
        }
    }

    /// The first AUDIT policy matching the connection, for access logs.
    pub fn audit(&self, dst: &Workload, conn: &ConnInfo<'_>) -> Option<&Policy> {
        let conn = conn.canonical();
        self.applicable(dst)
            .filter(|p| p.action == Action::Audit)
            .find(|p| p.rules.iter().any(|r| r.matches(&conn)))
    }
}

impl<'a> IntoIterator for &'a Policies {
    type Item = &'a Policy;
    type IntoIter = std::slice::Iter<'a, Policy>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

fn deny(p: &Policy, rule: &Rule) -> Decision {
    let mut reason = format!("denied by DENY policy {}", p.id);
    if !rule.l7_attributes().is_empty() {
        reason.push_str(&format!(
            " (its L7 attributes {} were dropped at L4, so it denies more broadly)",
            rule.l7_attributes().join(", ")
        ));
    }
    Decision::Deny {
        policy: Some(p.id.clone()),
        reason,
    }
}

#[cfg(test)]
mod tests;
