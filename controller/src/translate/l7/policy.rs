//! AuthorizationPolicy and RequestAuthentication attached with `targetRefs` -> the
//! waypoint's `Policy`. A policy names the waypoints that enforce it: the Gateway it
//! targets (when that is a waypoint), or the waypoint of the Service it targets. Policies
//! without `targetRefs` are not the waypoints' (AuthorizationPolicy goes to ztunnels,
//! `authz`); a policy no waypoint would enforce is reported and left out.

use std::collections::BTreeMap;

use mesh_core::authz_manifest::{self as m, TargetRef};
use mesh_core::proto::mesh::l7::v1::{
    authorization, policy, Authorization, AuthzRule, Condition, JwtHeader, JwtRule, Operation,
    Policy, RequestAuthentication, Source,
};
use serde::Deserialize;

use super::{object_error, spec};
use crate::objects::{CustomObject, Key, ObjectError, Objects};
use crate::translate::authz;
use crate::translate::waypoint::Waypoints;

/// Every waypoint Policy, by xDS name.
pub fn policies(
    objects: &Objects,
    waypoints: &Waypoints,
    bound: &BTreeMap<Key, Vec<String>>,
    errors: &mut Vec<ObjectError>,
) -> BTreeMap<String, Policy> {
    let attach = Attach { waypoints, bound };
    let mut out = BTreeMap::new();
    for obj in objects.custom("AuthorizationPolicy") {
        let Ok(p) = authz::parse(obj) else {
            // Reported by the ztunnels' translation, which reads every policy.
            continue;
        };
        if authz::for_ztunnel(&p) {
            continue;
        }
        match authorization_policy(&attach, p) {
            Ok(policy) => {
                out.insert(format!("{}/{}", policy.namespace, policy.name), policy);
            }
            Err(reason) => errors.push(object_error(obj, reason)),
        }
    }
    for obj in objects.custom("RequestAuthentication") {
        match request_authentication(&attach, obj) {
            Ok(policy) => {
                let name = format!("{}/RequestAuthentication/{}", policy.namespace, policy.name);
                out.insert(name, policy);
            }
            Err(reason) => errors.push(object_error(obj, reason)),
        }
    }
    out
}

/// What target references resolve against.
struct Attach<'a> {
    waypoints: &'a Waypoints,
    /// Services whose traffic goes through a waypoint, with its id.
    bound: &'a BTreeMap<Key, Vec<String>>,
}

impl Attach<'_> {
    /// The targets as "<kind>/<namespace>/<name>" and the waypoints enforcing them.
    fn resolve(&self, ns: &str, refs: &[TargetRef]) -> Result<(Vec<String>, Vec<String>), String> {
        let (mut targets, mut waypoints) = (Vec::new(), Vec::new());
        for r in refs {
            if r.namespace.as_deref().is_some_and(|n| n != ns) {
                return Err(format!(
                    "targetRef {} {} is in another namespace than the policy",
                    r.kind, r.name
                ));
            }
            let key = (ns.to_owned(), r.name.clone());
            match (r.group.as_str(), r.kind.as_str()) {
                ("gateway.networking.k8s.io", "Gateway") => {
                    let w = self.waypoints.get(ns, &r.name).ok_or_else(|| {
                        format!("targetRef Gateway {ns}/{} is no waypoint", r.name)
                    })?;
                    waypoints.push(w.id());
                }
                ("" | "core", "Service") => {
                    let ids = self.bound.get(&key).ok_or_else(|| {
                        format!("targetRef Service {ns}/{} does not use a waypoint", r.name)
                    })?;
                    waypoints.extend(ids.iter().cloned());
                }
                (group, kind) => {
                    return Err(format!(
                        "targetRef {group}/{kind} is not supported (Gateway or Service)"
                    ))
                }
            }
            targets.push(format!("{}/{ns}/{}", r.kind, r.name));
        }
        waypoints.sort();
        waypoints.dedup();
        Ok((targets, waypoints))
    }
}

fn authorization_policy(
    attach: &Attach,
    p: m::AuthorizationPolicyManifest,
) -> Result<Policy, String> {
    let spec = p.spec;
    let refs: Vec<TargetRef> = spec
        .target_ref
        .into_iter()
        .chain(spec.target_refs)
        .collect();
    let (targets, waypoints) = attach.resolve(&p.metadata.namespace, &refs)?;
    let action = match spec.action {
        m::Action::Allow => authorization::Action::Allow,
        m::Action::Deny => authorization::Action::Deny,
        m::Action::Audit => authorization::Action::Audit,
        m::Action::Custom => return Err("action CUSTOM is not supported by waypoints".into()),
    };
    let rules = spec.rules.iter().map(rule).collect::<Result<_, String>>()?;
    Ok(Policy {
        name: p.metadata.name,
        namespace: p.metadata.namespace,
        targets,
        waypoints,
        kind: Some(policy::Kind::Authorization(Authorization {
            action: action as i32,
            rules,
        })),
    })
}

fn rule(r: &m::Rule) -> Result<AuthzRule, String> {
    let from = r
        .from
        .iter()
        .map(|f| {
            let s = &f.source;
            // The waypoint sees the client's own address; both kinds of block name it.
            let both = |a: &[String], b: &[String]| a.iter().chain(b).cloned().collect();
            Source {
                principals: s.principals.clone(),
                not_principals: s.not_principals.clone(),
                request_principals: s.request_principals.clone(),
                not_request_principals: s.not_request_principals.clone(),
                namespaces: s.namespaces.clone(),
                not_namespaces: s.not_namespaces.clone(),
                ip_blocks: both(&s.ip_blocks, &s.remote_ip_blocks),
                not_ip_blocks: both(&s.not_ip_blocks, &s.not_remote_ip_blocks),
            }
        })
        .collect();
    let to =
        r.to.iter()
            .map(|t| {
                let o = &t.operation;
                Ok(Operation {
                    hosts: o.hosts.clone(),
                    not_hosts: o.not_hosts.clone(),
                    ports: authz::ports(&o.ports)?,
                    not_ports: authz::ports(&o.not_ports)?,
                    methods: o.methods.clone(),
                    not_methods: o.not_methods.clone(),
                    paths: o.paths.clone(),
                    not_paths: o.not_paths.clone(),
                })
            })
            .collect::<Result<_, String>>()?;
    let text = |v: &[m::Scalar]| v.iter().map(|s| s.0.clone()).collect();
    let when = r
        .when
        .iter()
        .map(|c| Condition {
            key: c.key.clone(),
            values: text(&c.values),
            not_values: text(&c.not_values),
        })
        .collect();
    Ok(AuthzRule { from, to, when })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RequestAuthnSpec {
    #[serde(default)]
    selector: Option<serde_json::Value>,
    #[serde(default)]
    target_ref: Option<TargetRef>,
    #[serde(default)]
    target_refs: Vec<TargetRef>,
    #[serde(default)]
    jwt_rules: Vec<JwtRuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JwtRuleSpec {
    issuer: String,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    jwks: Option<String>,
    #[serde(default)]
    jwks_uri: Option<String>,
    #[serde(default)]
    from_headers: Vec<FromHeader>,
    #[serde(default)]
    from_params: Vec<String>,
    #[serde(default)]
    forward_original_token: bool,
    #[serde(default)]
    output_claim_to_headers: Vec<ClaimToHeader>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FromHeader {
    name: String,
    #[serde(default)]
    prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimToHeader {
    header: String,
    claim: String,
}

/// A policy without `targetRefs` is an error: nothing enforces it in ambient mode.
fn request_authentication(attach: &Attach, obj: &CustomObject) -> Result<Policy, String> {
    let ra: RequestAuthnSpec = spec(obj)?;
    let refs: Vec<TargetRef> = ra.target_ref.into_iter().chain(ra.target_refs).collect();
    if refs.is_empty() {
        return Err(if ra.selector.is_some() {
            "a selector is not enforced in ambient mode; attach it with targetRefs".into()
        } else {
            "without targetRefs no waypoint enforces it; attach it with targetRefs".into()
        });
    }
    let (ns, name) = super::object_key(obj);
    let (targets, waypoints) = attach.resolve(&ns, &refs)?;
    let jwt_rules = ra
        .jwt_rules
        .into_iter()
        .map(|j| {
            if j.jwks.is_none() && j.jwks_uri.is_none() {
                return Err(format!(
                    "jwtRule of issuer {:?} needs jwks or jwksUri",
                    j.issuer
                ));
            }
            Ok(JwtRule {
                issuer: j.issuer,
                audiences: j.audiences,
                jwks: j.jwks.unwrap_or_default(),
                jwks_uri: j.jwks_uri.unwrap_or_default(),
                from_headers: j
                    .from_headers
                    .into_iter()
                    .map(|h| JwtHeader {
                        name: h.name.to_ascii_lowercase(),
                        prefix: h.prefix.unwrap_or_default(),
                    })
                    .collect(),
                from_params: j.from_params,
                forward_original_token: j.forward_original_token,
                output_claim_to_headers: j
                    .output_claim_to_headers
                    .into_iter()
                    .map(|c| (c.claim, c.header.to_ascii_lowercase()))
                    .collect(),
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(Policy {
        name,
        namespace: ns,
        targets,
        waypoints,
        kind: Some(policy::Kind::RequestAuthentication(RequestAuthentication {
            jwt_rules,
        })),
    })
}
