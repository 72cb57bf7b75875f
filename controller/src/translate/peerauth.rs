//! PeerAuthentication objects -> `istio.security.Authorization` for ztunnels.
//!
//! A ztunnel knows no mTLS modes: STRICT reaches it as a DENY policy that matches peers
//! without an identity (plaintext), shaped as Istio's istiod sends it so either side
//! interoperates. One shared policy, `istio-system/istio_converted_static_strict`, is sent
//! whenever any PeerAuthentication exists; each workload whose effective mode is STRICT
//! lists it. A workload-selector policy with `portLevelMtls` exceptions becomes its own
//! policy, `<ns>/converted_peer_authentication_<name>`, listed by the workloads it selects
//! instead of the shared one.
//!
//! Precedence, as in Istio: a selector policy in the workload's namespace overrides the
//! namespace-wide one, which overrides the mesh-wide one (no selector, root namespace);
//! UNSET inherits, PERMISSIVE and DISABLE cancel a wider STRICT. Where several policies
//! compete at one level the oldest (then the first by name) wins and the others are
//! reported.

use std::collections::BTreeMap;

use mesh_core::proto::istio::security::{
    string_match::MatchType, Action, Authorization, Clause, Match, Rule, Scope, StringMatch,
};
use serde::Deserialize;

use super::authz::ROOT_NAMESPACE;
use crate::objects::{CustomObject, ObjectError, Objects};

/// The shared STRICT policy's name; `_` cannot occur in a Kubernetes name, so it cannot
/// collide with a user's policy.
pub const STATIC_STRICT: &str = "istio_converted_static_strict";
/// Prefix of the policy converted from a selector PeerAuthentication with port exceptions.
pub const CONVERTED_PREFIX: &str = "converted_peer_authentication_";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Unset,
    Strict,
    Permissive,
    Disable,
}

impl Mode {
    fn parse(text: Option<&str>) -> Result<Mode, String> {
        match text.unwrap_or("UNSET") {
            "UNSET" => Ok(Mode::Unset),
            "STRICT" => Ok(Mode::Strict),
            "PERMISSIVE" => Ok(Mode::Permissive),
            "DISABLE" => Ok(Mode::Disable),
            other => Err(format!(
                "mtls mode {other:?} is not one of UNSET, STRICT, PERMISSIVE, DISABLE (policy skipped)"
            )),
        }
    }

    /// Inheritance: an UNSET narrower level keeps the wider result.
    fn over(self, wider: bool) -> bool {
        match self {
            Mode::Unset => wider,
            Mode::Strict => true,
            Mode::Permissive | Mode::Disable => false,
        }
    }
}

/// The user-facing spec, as far as the mesh reads it.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default)]
    mtls: Option<Mtls>,
    #[serde(default)]
    port_level_mtls: BTreeMap<String, Mtls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Selector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
struct Mtls {
    #[serde(default)]
    mode: Option<String>,
}

/// One usable PeerAuthentication.
#[derive(Clone, Debug)]
pub struct PeerAuth {
    pub namespace: String,
    pub name: String,
    /// Non-empty match labels; None for namespace-wide and mesh-wide policies.
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: Mode,
    /// Port-level exceptions (selector policies only).
    pub ports: BTreeMap<u32, Mode>,
    /// creationTimestamp as written (RFC 3339 sorts as text), empty when absent.
    created: String,
}

/// Every PeerAuthentication, sorted into its level, with the losers of each level left out.
#[derive(Debug, Default)]
pub struct PeerAuths {
    /// Whether any PeerAuthentication parsed (the shared STRICT policy is then sent).
    any: bool,
    mesh: Option<PeerAuth>,
    namespaces: BTreeMap<String, PeerAuth>,
    /// Selector policies, oldest first, so the first that selects a pod wins.
    selectors: Vec<PeerAuth>,
}

fn error(ns: &str, name: &str, reason: String) -> ObjectError {
    ObjectError {
        origin: "translation".into(),
        object: format!("PeerAuthentication {ns}/{name}"),
        reason,
    }
}

/// `obj` read as a PeerAuthentication; errors name what is wrong.
pub fn parse(obj: &CustomObject) -> Result<(PeerAuth, Vec<ObjectError>), ObjectError> {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let ns = obj
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let err = |reason: String| error(&ns, &name, reason);
    let spec: Spec = match &obj.spec {
        serde_json::Value::Null => Spec::default(),
        v => Spec::deserialize(v).map_err(|e| err(format!("invalid spec: {e}")))?,
    };
    let mode = Mode::parse(spec.mtls.as_ref().and_then(|m| m.mode.as_deref())).map_err(err)?;
    let selector = spec
        .selector
        .map(|s| s.match_labels)
        .filter(|l| !l.is_empty());
    let mut notes = Vec::new();
    let mut ports = BTreeMap::new();
    if selector.is_none() && !spec.port_level_mtls.is_empty() {
        notes.push(err(
            "portLevelMtls needs a workload selector; the port exceptions are ignored".into(),
        ));
    } else {
        for (port, mtls) in &spec.port_level_mtls {
            let number = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    err(format!(
                        "portLevelMtls key {port:?} is not a port number (policy skipped)"
                    ))
                })?;
            let mode = Mode::parse(mtls.mode.as_deref()).map_err(err)?;
            ports.insert(u32::from(number), mode);
        }
    }
    let created = obj
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    let policy = PeerAuth {
        namespace: ns,
        name,
        selector,
        mode,
        ports,
        created,
    };
    Ok((policy, notes))
}

impl PeerAuths {
    /// Sorts every PeerAuthentication of `objects` into its level; returns what could not
    /// be used or was overridden.
    pub fn new(objects: &Objects) -> (PeerAuths, Vec<ObjectError>) {
        let mut errors = Vec::new();
        let mut parsed = Vec::new();
        for obj in objects.custom("PeerAuthentication") {
            match parse(obj) {
                Ok((policy, notes)) => {
                    errors.extend(notes);
                    parsed.push(policy);
                }
                Err(e) => errors.push(e),
            }
        }
        // Oldest first; objects without a timestamp count as oldest, then by name.
        parsed.sort_by(|a, b| {
            (a.created.as_str(), &a.namespace, &a.name).cmp(&(
                b.created.as_str(),
                &b.namespace,
                &b.name,
            ))
        });
        let mut out = PeerAuths {
            any: !parsed.is_empty(),
            ..Default::default()
        };
        for policy in parsed {
            let (ns, name) = (policy.namespace.clone(), policy.name.clone());
            let winner = match (&policy.selector, ns == ROOT_NAMESPACE) {
                (Some(_), true) => {
                    errors.push(error(
                        &ns,
                        &name,
                        "a selector policy in the root namespace does not apply to ambient workloads (ignored)".into(),
                    ));
                    continue;
                }
                (Some(_), false) => {
                    out.selectors.push(policy);
                    continue;
                }
                (None, true) => out.mesh.get_or_insert(policy),
                (None, false) => out.namespaces.entry(ns.clone()).or_insert(policy),
            };
            if winner.name != name {
                let level = if ns == ROOT_NAMESPACE {
                    "mesh-wide"
                } else {
                    "namespace-wide"
                };
                let reason = format!(
                    "{ns}/{} is an older {level} policy and takes precedence (ignored)",
                    winner.name
                );
                errors.push(error(&ns, &name, reason));
            }
        }
        (out, errors)
    }

    /// Whether STRICT applies in `ns` before any selector policy is considered.
    fn namespace_strict(&self, ns: &str) -> bool {
        let mesh = self.mesh.as_ref().is_some_and(|p| p.mode == Mode::Strict);
        match self.namespaces.get(ns) {
            Some(p) => p.mode.over(mesh),
            None => mesh,
        }
    }

    /// The selector policy that applies to a pod (the oldest one selecting it).
    fn selecting(&self, ns: &str, labels: &BTreeMap<String, String>) -> Option<&PeerAuth> {
        self.selectors.iter().find(|p| {
            p.namespace == ns
                && p.selector
                    .as_ref()
                    .is_some_and(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
        })
    }

    /// namespace/name of the policies a workload must list (at most one).
    pub fn policies_for(&self, ns: &str, labels: &BTreeMap<String, String>) -> Vec<String> {
        let inherited = self.namespace_strict(ns);
        let Some(selected) = self.selecting(ns, labels) else {
            return if inherited {
                vec![format!("{ROOT_NAMESPACE}/{STATIC_STRICT}")]
            } else {
                vec![]
            };
        };
        if self.converted(selected).is_some() {
            return vec![format!("{ns}/{CONVERTED_PREFIX}{}", selected.name)];
        }
        if selected.mode.over(inherited) {
            vec![format!("{ROOT_NAMESPACE}/{STATIC_STRICT}")]
        } else {
            vec![]
        }
    }

    /// Every Authorization PeerAuthentication gives ztunnels.
    pub fn authorizations(&self) -> Vec<Authorization> {
        if !self.any {
            return vec![];
        }
        let strict = Authorization {
            name: STATIC_STRICT.to_owned(),
            namespace: ROOT_NAMESPACE.to_owned(),
            scope: Scope::WorkloadSelector as i32,
            action: Action::Deny as i32,
            rules: vec![Rule {
                clauses: vec![clause(no_identity())],
            }],
            dry_run: false,
        };
        let mut out = vec![strict];
        out.extend(self.selectors.iter().filter_map(|p| self.converted(p)));
        out
    }

    /// The policy for a selector PeerAuthentication whose port exceptions differ from its
    /// effective mode; None when the shared policy (or none) says the same.
    fn converted(&self, policy: &PeerAuth) -> Option<Authorization> {
        let strict = policy.mode.over(self.namespace_strict(&policy.namespace));
        let rule = if strict {
            // STRICT except on the ports said PERMISSIVE or DISABLE.
            let open: Vec<u32> = ports_in(policy, &[Mode::Permissive, Mode::Disable]);
            if open.is_empty() {
                return None;
            }
            Rule {
                clauses: vec![
                    clause(no_identity()),
                    clause(Match {
                        not_destination_ports: open,
                        ..Default::default()
                    }),
                ],
            }
        } else {
            // Not STRICT except on the ports said STRICT.
            let closed = ports_in(policy, &[Mode::Strict]);
            if closed.is_empty() {
                return None;
            }
            Rule {
                clauses: vec![clause(Match {
                    destination_ports: closed,
                    ..no_identity()
                })],
            }
        };
        Some(Authorization {
            name: format!("{CONVERTED_PREFIX}{}", policy.name),
            namespace: policy.namespace.clone(),
            scope: Scope::WorkloadSelector as i32,
            action: Action::Deny as i32,
            rules: vec![rule],
            dry_run: false,
        })
    }
}

fn ports_in(policy: &PeerAuth, modes: &[Mode]) -> Vec<u32> {
    policy
        .ports
        .iter()
        .filter(|(_, m)| modes.contains(m))
        .map(|(p, _)| *p)
        .collect()
}

/// Matches a peer that presented no identity: "principal is not present".
fn no_identity() -> Match {
    Match {
        not_principals: vec![StringMatch {
            match_type: Some(MatchType::Presence(())),
        }],
        ..Default::default()
    }
}

fn clause(m: Match) -> Clause {
    Clause { matches: vec![m] }
}
