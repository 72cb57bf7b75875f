//! `istio.security.Authorization` resources (from the controller) into [`Policy`]s.
//!
//! The controller has already resolved what a ztunnel cannot see: L7 attributes are gone
//! (dropped from ALLOW, widened in DENY), selectors are resolved into each workload's
//! `authorization_policies`. What is left is the L4 match tree: rules OR'd, clauses AND'd,
//! matches within a clause OR'd, fields within a match AND'd.

use std::net::IpAddr;

use ipnet::IpNet;
use mesh_core::proto::istio::security::{
    self as wire, string_match::MatchType, Action as WireAction, Scope as WireScope,
};

use super::rule::{MatchList, Rule, StringMatch, WireMatch};
use super::{Action, Policy, PolicyError, Scope};

impl Policy {
    pub fn from_wire(a: &wire::Authorization) -> Result<Policy, PolicyError> {
        let id = format!("{}/{}", a.namespace, a.name);
        let action = match WireAction::try_from(a.action) {
            Ok(WireAction::Allow) => Action::Allow,
            Ok(WireAction::Deny) => Action::Deny,
            Err(_) => {
                return Err(PolicyError::UnknownValue {
                    policy: id,
                    field: "action",
                    value: a.action,
                })
            }
        };
        let scope = match WireScope::try_from(a.scope) {
            Ok(WireScope::Global) => Scope::Mesh,
            Ok(WireScope::Namespace) => Scope::Namespace,
            Ok(WireScope::WorkloadSelector) => Scope::Listed,
            Err(_) => {
                return Err(PolicyError::UnknownValue {
                    policy: id,
                    field: "scope",
                    value: a.scope,
                })
            }
        };
        let rules = (a.rules.iter())
            .map(|r| rule(r, &id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy {
            name: a.name.clone(),
            namespace: a.namespace.clone(),
            id,
            scope,
            action,
            rules,
        })
    }
}

fn rule(r: &wire::Rule, policy: &str) -> Result<Rule, PolicyError> {
    let clauses = (r.clauses.iter())
        .map(|c| c.matches.iter().map(|m| one_match(m, policy)).collect())
        .collect::<Result<Vec<Vec<_>>, _>>()?;
    Ok(Rule::from_clauses(clauses))
}

fn one_match(m: &wire::Match, policy: &str) -> Result<WireMatch, PolicyError> {
    let accounts = |list: &[wire::ServiceAccountMatch]| {
        list.iter()
            .map(|s| (s.namespace.clone(), s.service_account.clone()))
            .collect()
    };
    Ok(WireMatch {
        namespaces: MatchList::new(strings(&m.namespaces), strings(&m.not_namespaces)),
        principals: MatchList::new(principals(&m.principals), principals(&m.not_principals)),
        service_accounts: MatchList::new(
            accounts(&m.service_accounts),
            accounts(&m.not_service_accounts),
        ),
        source_ips: MatchList::new(
            nets(&m.source_ips, policy, "source_ips")?,
            nets(&m.not_source_ips, policy, "not_source_ips")?,
        ),
        destination_ips: MatchList::new(
            nets(&m.destination_ips, policy, "destination_ips")?,
            nets(&m.not_destination_ips, policy, "not_destination_ips")?,
        ),
        destination_ports: MatchList::new(
            ports(&m.destination_ports, policy, "destination_ports")?,
            ports(&m.not_destination_ports, policy, "not_destination_ports")?,
        ),
    })
}

fn strings(list: &[wire::StringMatch]) -> Vec<StringMatch> {
    list.iter().filter_map(string).collect()
}

fn string(m: &wire::StringMatch) -> Option<StringMatch> {
    Some(match m.match_type.as_ref()? {
        MatchType::Exact(v) => StringMatch::Exact(v.clone()),
        MatchType::Prefix(v) => StringMatch::Prefix(v.clone()),
        MatchType::Suffix(v) => StringMatch::Suffix(v.clone()),
        MatchType::Presence(_) => StringMatch::Any,
    })
}

/// Principals are compared without the `spiffe://` scheme, whichever way they were sent.
fn principals(list: &[wire::StringMatch]) -> Vec<StringMatch> {
    let strip = |v: &String| v.strip_prefix("spiffe://").unwrap_or(v).to_owned();
    (list.iter().filter_map(string))
        .map(|m| match m {
            StringMatch::Exact(v) => StringMatch::Exact(strip(&v)),
            StringMatch::Prefix(v) => StringMatch::Prefix(strip(&v)),
            other => other,
        })
        .collect()
}

fn nets(list: &[wire::Address], policy: &str, field: &str) -> Result<Vec<IpNet>, PolicyError> {
    list.iter()
        .map(|a| {
            let ip = match a.address.len() {
                4 => <[u8; 4]>::try_from(a.address.as_slice())
                    .map(IpAddr::from)
                    .ok(),
                16 => <[u8; 16]>::try_from(a.address.as_slice())
                    .map(IpAddr::from)
                    .ok(),
                _ => None,
            };
            ip.and_then(|ip| IpNet::new(ip, a.length as u8).ok())
                .filter(|_| a.length <= 128)
                .map(|n| n.trunc())
                .ok_or_else(|| PolicyError::InvalidCidr {
                    policy: policy.to_owned(),
                    field: field.to_owned(),
                    value: format!("{:?}/{}", a.address, a.length),
                })
        })
        .collect()
}

fn ports(list: &[u32], policy: &str, field: &str) -> Result<Vec<u16>, PolicyError> {
    list.iter()
        .map(|p| match u16::try_from(*p) {
            Ok(port) if port != 0 => Ok(port),
            _ => Err(PolicyError::InvalidPort {
                policy: policy.to_owned(),
                field: field.to_owned(),
                value: p.to_string(),
            }),
        })
        .collect()
}
