//! AuthorizationPolicy objects -> `istio.security.Authorization` for ztunnels.
//!
//! Policies that name `targetRefs` are for waypoints and are not sent here. A rule with L7
//! attributes (methods, paths, hosts, request principals, `request.*` conditions) cannot be
//! judged by a ztunnel: in an ALLOW policy it is dropped (it allows nothing), in a DENY
//! policy it becomes a rule without clauses (it denies everything), as in Istio.

use std::net::IpAddr;

use mesh_core::authz_manifest::{
    self as m, AuthorizationPolicyManifest, Condition, Operation, Scalar, Source,
};
use mesh_core::proto::istio::security::{
    string_match::MatchType, Action, Address, Authorization, Clause, Match, Rule, Scope,
    StringMatch,
};

use crate::objects::{CustomObject, ObjectError};

/// The namespace whose selector-less policies apply mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// `obj` read as an AuthorizationPolicy.
pub fn parse(obj: &CustomObject) -> Result<AuthorizationPolicyManifest, ObjectError> {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let ns = obj
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let doc = serde_json::json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": obj.spec,
    });
    serde_json::from_value(doc).map_err(|e| policy_error(&ns, &name, format!("invalid spec: {e}")))
}

fn policy_error(ns: &str, name: &str, reason: String) -> ObjectError {
    ObjectError {
        origin: "translation".into(),
        object: format!("AuthorizationPolicy {ns}/{name}"),
        reason,
    }
}

/// Whether a ztunnel enforces `policy` (waypoint policies name `targetRefs`).
pub fn for_ztunnel(policy: &AuthorizationPolicyManifest) -> bool {
    policy.spec.target_ref.is_none() && policy.spec.target_refs.is_empty()
}

/// The Authorization for `policy`, None when it is not for ztunnels (waypoint policies).
pub fn authorization(
    policy: AuthorizationPolicyManifest,
) -> Result<Option<Authorization>, ObjectError> {
    let (name, ns) = (
        policy.metadata.name.clone(),
        policy.metadata.namespace.clone(),
    );
    let err = |reason: String| policy_error(&ns, &name, reason);
    if !for_ztunnel(&policy) {
        return Ok(None);
    }
    let spec = policy.spec;
    let action = match spec.action {
        m::Action::Allow => Action::Allow,
        m::Action::Deny => Action::Deny,
        other => {
            return Err(err(format!(
                "action {other:?} is not enforced by ztunnels (skipped)"
            )))
        }
    };
    let scope = if spec.selector.is_some() {
        Scope::WorkloadSelector
    } else if ns == ROOT_NAMESPACE {
        Scope::Global
    } else {
        Scope::Namespace
    };
    let mut rules = Vec::new();
    for rule in &spec.rules {
        match clauses(rule).map_err(err)? {
            Some(clauses) => rules.push(Rule { clauses }),
            None if action == Action::Deny => rules.push(Rule { clauses: vec![] }),
            None => {}
        }
    }
    Ok(Some(Authorization {
        name,
        namespace: ns,
        scope: scope as i32,
        action: action as i32,
        rules,
        dry_run: false,
    }))
}

/// The clauses of one rule (all must match); None when it needs L7 attributes.
fn clauses(rule: &m::Rule) -> Result<Option<Vec<Clause>>, String> {
    let mut clauses = Vec::new();
    if !rule.from.is_empty() {
        let mut matches = Vec::new();
        for from in &rule.from {
            let Some(matched) = source(&from.source)? else {
                return Ok(None);
            };
            matches.push(matched);
        }
        clauses.push(Clause { matches });
    }
    if !rule.to.is_empty() {
        let mut matches = Vec::new();
        for to in &rule.to {
            let Some(matched) = operation(&to.operation)? else {
                return Ok(None);
            };
            matches.push(matched);
        }
        clauses.push(Clause { matches });
    }
    for cond in &rule.when {
        let Some(matched) = condition(cond)? else {
            return Ok(None);
        };
        clauses.push(Clause {
            matches: vec![matched],
        });
    }
    Ok(Some(clauses))
}

fn source(s: &Source) -> Result<Option<Match>, String> {
    if !s.request_principals.is_empty() || !s.not_request_principals.is_empty() {
        return Ok(None);
    }
    Ok(Some(Match {
        namespaces: strings(&s.namespaces),
        not_namespaces: strings(&s.not_namespaces),
        principals: strings(&s.principals),
        not_principals: strings(&s.not_principals),
        source_ips: cidrs(s.ip_blocks.iter().chain(&s.remote_ip_blocks))?,
        not_source_ips: cidrs(s.not_ip_blocks.iter().chain(&s.not_remote_ip_blocks))?,
        ..Default::default()
    }))
}

fn operation(o: &Operation) -> Result<Option<Match>, String> {
    let l7 = [
        &o.hosts,
        &o.not_hosts,
        &o.methods,
        &o.not_methods,
        &o.paths,
        &o.not_paths,
    ];
    if l7.iter().any(|v| !v.is_empty()) {
        return Ok(None);
    }
    Ok(Some(Match {
        destination_ports: ports(&o.ports)?,
        not_destination_ports: ports(&o.not_ports)?,
        ..Default::default()
    }))
}

fn condition(c: &Condition) -> Result<Option<Match>, String> {
    let texts = |v: &[Scalar]| v.iter().map(|s| s.0.clone()).collect::<Vec<_>>();
    let (values, not_values) = (texts(&c.values), texts(&c.not_values));
    let mut matched = Match::default();
    match c.key.as_str() {
        "source.ip" | "remote.ip" => {
            matched.source_ips = cidrs(&values)?;
            matched.not_source_ips = cidrs(&not_values)?;
        }
        "source.namespace" => {
            matched.namespaces = strings(&values);
            matched.not_namespaces = strings(&not_values);
        }
        "source.principal" => {
            matched.principals = strings(&values);
            matched.not_principals = strings(&not_values);
        }
        "destination.ip" => {
            matched.destination_ips = cidrs(&values)?;
            matched.not_destination_ips = cidrs(&not_values)?;
        }
        "destination.port" => {
            matched.destination_ports = ports(&c.values)?;
            matched.not_destination_ports = ports(&c.not_values)?;
        }
        _ => return Ok(None),
    }
    Ok(Some(matched))
}

/// Istio's string patterns: `*` (present), `prefix*`, `*suffix`, or exact.
fn strings(patterns: &[String]) -> Vec<StringMatch> {
    patterns
        .iter()
        .map(|p| {
            let kind = if p == "*" {
                MatchType::Presence(())
            } else if let Some(suffix) = p.strip_prefix('*') {
                MatchType::Suffix(suffix.to_owned())
            } else if let Some(prefix) = p.strip_suffix('*') {
                MatchType::Prefix(prefix.to_owned())
            } else {
                MatchType::Exact(p.clone())
            };
            StringMatch {
                match_type: Some(kind),
            }
        })
        .collect()
}

fn cidrs<'a>(blocks: impl IntoIterator<Item = &'a String>) -> Result<Vec<Address>, String> {
    blocks
        .into_iter()
        .map(|block| {
            let (ip, len) = match block.split_once('/') {
                Some((ip, len)) => (ip, Some(len)),
                None => (block.as_str(), None),
            };
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| format!("ipBlock {block:?} is not an address or CIDR"))?;
            let (bytes, max) = match ip {
                IpAddr::V4(v4) => (v4.octets().to_vec(), 32),
                IpAddr::V6(v6) => (v6.octets().to_vec(), 128),
            };
            let length = match len {
                None => max,
                Some(l) => l
                    .parse::<u32>()
                    .ok()
                    .filter(|l| *l <= max)
                    .ok_or_else(|| format!("ipBlock {block:?} has a bad prefix length"))?,
            };
            Ok(Address {
                address: bytes,
                length,
            })
        })
        .collect()
}

/// Port numbers as policies write them (strings or numbers).
pub fn ports(values: &[Scalar]) -> Result<Vec<u32>, String> {
    values
        .iter()
        .map(|v| {
            v.0.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .map(u32::from)
                .ok_or_else(|| format!("port {:?} is not a port number", v.0))
        })
        .collect()
}
