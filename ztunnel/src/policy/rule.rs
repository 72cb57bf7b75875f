//! The validated form of one AuthorizationPolicy rule and how it matches a connection.
//!
//! Owns the conversion of a manifest rule (CIDRs, ports, `when` keys, wildcards parsed once)
//! and the L4 view of L7 attributes: an ALLOW rule naming any never matches, a DENY or AUDIT
//! rule loses them and applies on the rest. Matching must not allocate or lock: it runs
//! for every inbound connection.

use std::collections::BTreeSet;
use std::fmt;

use ipnet::IpNet;
use serde::{Serialize, Serializer};

use super::manifest;
use super::{Action, ConnInfo, PolicyError};

/// One rule: any `from` entry, any `to` entry and every `when` condition must match.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    from: Vec<Source>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    to: Vec<Operation>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    when: Vec<Condition>,
    /// Rules that came over xDS (`istio.security.Rule`): every clause must match, and a
    /// clause matches when one of its matches does.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    clauses: Vec<Vec<WireMatch>>,
    /// L7 attributes the rule named; a ztunnel cannot see them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    l7_attributes: Vec<String>,
    /// An ALLOW rule with L7 attributes: matching it on its L4 part would widen access.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    never_matches: bool,
}

impl Rule {
    /// L7 attribute names the rule used (`methods`, `request.headers[x-user]`, ...), sorted.
    pub fn l7_attributes(&self) -> &[String] {
        &self.l7_attributes
    }

    /// True when the rule can never match at L4 (an ALLOW rule with L7 attributes).
    pub fn never_matches(&self) -> bool {
        self.never_matches
    }

    pub(super) fn matches(&self, conn: &ConnInfo<'_>) -> bool {
        !self.never_matches
            && (self.from.is_empty() || self.from.iter().any(|s| s.matches(conn)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(conn)))
            && self.when.iter().all(|c| c.matches(conn))
            && (self.clauses.iter()).all(|c| c.is_empty() || c.iter().any(|m| m.matches(conn)))
    }

    /// A rule as the controller sends it: clauses of alternative matches.
    pub(super) fn from_clauses(clauses: Vec<Vec<WireMatch>>) -> Rule {
        Rule {
            from: Vec::new(),
            to: Vec::new(),
            when: Vec::new(),
            clauses,
            l7_attributes: Vec::new(),
            never_matches: false,
        }
    }

    pub(super) fn from_manifest(
        rule: manifest::Rule,
        action: Action,
        policy: &str,
    ) -> Result<Rule, PolicyError> {
        let mut l7 = BTreeSet::new();
        let from = (rule.from.into_iter())
            .map(|f| Source::from_manifest(f.source, policy, &mut l7))
            .collect::<Result<_, _>>()?;
        let to = (rule.to.into_iter())
            .map(|t| Operation::from_manifest(t.operation, policy, &mut l7))
            .collect::<Result<_, _>>()?;
        let when = (rule.when.into_iter())
            .filter_map(|c| Condition::from_manifest(c, policy, &mut l7).transpose())
            .collect::<Result<_, _>>()?;
        Ok(Rule {
            from,
            to,
            when,
            clauses: Vec::new(),
            never_matches: action == Action::Allow && !l7.is_empty(),
            l7_attributes: l7.into_iter().collect(),
        })
    }
}

/// A list and its negation, as in `principals` / `notPrincipals`: one of `values` (when
/// any are set) and none of `not_values` must match.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MatchList<T> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    values: Vec<T>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    not_values: Vec<T>,
}

impl<T> MatchList<T> {
    pub(super) fn new(values: Vec<T>, not_values: Vec<T>) -> Self {
        MatchList { values, not_values }
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && self.not_values.is_empty()
    }

    /// `hit` answers for one value; it returns false for every value when the attribute
    /// is missing (no peer identity), so the positive list fails and the negative passes.
    fn matches(&self, mut hit: impl FnMut(&T) -> bool) -> bool {
        (self.values.is_empty() || self.values.iter().any(&mut hit))
            && !self.not_values.iter().any(hit)
    }
}

/// One `istio.security.Match`: every list that is set must match.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct WireMatch {
    #[serde(skip_serializing_if = "MatchList::is_empty")]
    pub(super) namespaces: MatchList<StringMatch>,
    #[serde(skip_serializing_if = "MatchList::is_empty")]
    pub(super) principals: MatchList<StringMatch>,
    /// (namespace, service account)
    #[serde(skip_serializing_if = "MatchList::is_empty")]
    pub(super) service_accounts: MatchList<(String, String)>,
    #[serde(skip_serializing_if = "MatchList::is_empty")]
    pub(super) source_ips: MatchList<IpNet>,
    #[serde(skip_serializing_if = "MatchList::is_empty")]
    pub(super) destination_ips: MatchList<IpNet>,
    #[serde(skip_serializing_if = "MatchList::is_empty")]
    pub(super) destination_ports: MatchList<u16>,
}

impl<T> Default for MatchList<T> {
    fn default() -> Self {
        MatchList::new(Vec::new(), Vec::new())
    }
}

impl WireMatch {
    fn matches(&self, conn: &ConnInfo<'_>) -> bool {
        self.namespaces.matches(|m| namespace_matches(m, conn))
            && self.principals.matches(|m| principal_matches(m, conn))
            && self.service_accounts.matches(|(ns, sa)| {
                conn.src_identity
                    .is_some_and(|id| id.namespace() == ns && id.service_account() == sa)
            })
            && self.source_ips.matches(|net| net.contains(&conn.src_ip))
            && self
                .destination_ips
                .matches(|net| net.contains(&conn.dst_ip))
            && self.destination_ports.matches(|p| *p == conn.dst_port)
    }
}

/// The L4 part of a `from.source`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Source {
    #[serde(skip_serializing_if = "MatchList::is_empty")]
    principals: MatchList<StringMatch>,
    #[serde(skip_serializing_if = "MatchList::is_empty")]
    namespaces: MatchList<StringMatch>,
    #[serde(skip_serializing_if = "MatchList::is_empty")]
    ip_blocks: MatchList<IpNet>,
    #[serde(skip_serializing_if = "MatchList::is_empty")]
    remote_ip_blocks: MatchList<IpNet>,
}

impl Source {
    fn matches(&self, conn: &ConnInfo<'_>) -> bool {
        self.principals.matches(|m| principal_matches(m, conn))
            && self.namespaces.matches(|m| namespace_matches(m, conn))
            && self.ip_blocks.matches(|net| net.contains(&conn.src_ip))
            // Without PROXY protocol or X-Forwarded-For, the remote IP is the peer's.
            && self.remote_ip_blocks.matches(|net| net.contains(&conn.src_ip))
    }

    fn from_manifest(
        s: manifest::Source,
        policy: &str,
        l7: &mut BTreeSet<String>,
    ) -> Result<Source, PolicyError> {
        note_l7(l7, "requestPrincipals", &s.request_principals);
        note_l7(l7, "notRequestPrincipals", &s.not_request_principals);
        Ok(Source {
            principals: strings(s.principals, s.not_principals),
            namespaces: strings(s.namespaces, s.not_namespaces),
            ip_blocks: MatchList::new(
                cidrs(policy, "ipBlocks", &s.ip_blocks)?,
                cidrs(policy, "notIpBlocks", &s.not_ip_blocks)?,
            ),
            remote_ip_blocks: MatchList::new(
                cidrs(policy, "remoteIpBlocks", &s.remote_ip_blocks)?,
                cidrs(policy, "notRemoteIpBlocks", &s.not_remote_ip_blocks)?,
            ),
        })
    }
}

/// The L4 part of a `to.operation`: the destination port.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Operation {
    #[serde(skip_serializing_if = "MatchList::is_empty")]
    ports: MatchList<u16>,
}

impl Operation {
    fn matches(&self, conn: &ConnInfo<'_>) -> bool {
        self.ports.matches(|p| *p == conn.dst_port)
    }

    fn from_manifest(
        o: manifest::Operation,
        policy: &str,
        l7: &mut BTreeSet<String>,
    ) -> Result<Operation, PolicyError> {
        note_l7(l7, "hosts", &o.hosts);
        note_l7(l7, "notHosts", &o.not_hosts);
        note_l7(l7, "methods", &o.methods);
        note_l7(l7, "notMethods", &o.not_methods);
        note_l7(l7, "paths", &o.paths);
        note_l7(l7, "notPaths", &o.not_paths);
        Ok(Operation {
            ports: MatchList::new(
                ports(policy, "ports", &o.ports)?,
                ports(policy, "notPorts", &o.not_ports)?,
            ),
        })
    }
}

/// A `when` condition on an attribute the ztunnel sees.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
enum Condition {
    SourceIp(MatchList<IpNet>),
    RemoteIp(MatchList<IpNet>),
    SourceNamespace(MatchList<StringMatch>),
    SourcePrincipal(MatchList<StringMatch>),
    DestinationIp(MatchList<IpNet>),
    DestinationPort(MatchList<u16>),
}

impl Condition {
    fn matches(&self, conn: &ConnInfo<'_>) -> bool {
        match self {
            Condition::SourceIp(l) | Condition::RemoteIp(l) => {
                l.matches(|net| net.contains(&conn.src_ip))
            }
            Condition::SourceNamespace(l) => l.matches(|m| namespace_matches(m, conn)),
            Condition::SourcePrincipal(l) => l.matches(|m| principal_matches(m, conn)),
            Condition::DestinationIp(l) => l.matches(|net| net.contains(&conn.dst_ip)),
            Condition::DestinationPort(l) => l.matches(|p| *p == conn.dst_port),
        }
    }

    /// `Ok(None)` for an L7 (`request.*`) condition, which is recorded in `l7` instead.
    fn from_manifest(
        c: manifest::Condition,
        policy: &str,
        l7: &mut BTreeSet<String>,
    ) -> Result<Option<Condition>, PolicyError> {
        let key = c.key.as_str();
        if c.values.is_empty() && c.not_values.is_empty() {
            return Err(PolicyError::EmptyCondition {
                policy: policy.to_owned(),
                key: c.key,
            });
        }
        if key.starts_with("request.") {
            l7.insert(c.key);
            return Ok(None);
        }
        let (values, not_values) = (texts(&c.values), texts(&c.not_values));
        let field = |neg: bool| format!("when {key} {}", if neg { "notValues" } else { "values" });
        let ips = || -> Result<MatchList<IpNet>, PolicyError> {
            Ok(MatchList::new(
                cidrs(policy, &field(false), &values)?,
                cidrs(policy, &field(true), &not_values)?,
            ))
        };
        let condition = match key {
            "source.ip" => Condition::SourceIp(ips()?),
            "remote.ip" => Condition::RemoteIp(ips()?),
            "destination.ip" => Condition::DestinationIp(ips()?),
            "source.namespace" => Condition::SourceNamespace(strings(values, not_values)),
            "source.principal" => Condition::SourcePrincipal(strings(values, not_values)),
            "destination.port" => Condition::DestinationPort(MatchList::new(
                ports(policy, &field(false), &c.values)?,
                ports(policy, &field(true), &c.not_values)?,
            )),
            _ => {
                return Err(PolicyError::UnknownConditionKey {
                    policy: policy.to_owned(),
                    key: c.key,
                })
            }
        };
        Ok(Some(condition))
    }
}

/// Istio's string wildcards for principals and namespaces: `*`, `prefix*`, `*suffix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl StringMatch {
    pub fn parse(value: &str) -> StringMatch {
        if value == "*" {
            StringMatch::Any
        } else if let Some(suffix) = value.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_owned())
        } else if let Some(prefix) = value.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_owned())
        } else {
            StringMatch::Exact(value.to_owned())
        }
    }

    /// Matches the concatenation of `pieces` without building it.
    pub fn matches(&self, pieces: &[&str]) -> bool {
        match self {
            StringMatch::Any => true,
            StringMatch::Exact(v) => {
                pieces.iter().map(|p| p.len()).sum::<usize>() == v.len() && starts_with(pieces, v)
            }
            StringMatch::Prefix(v) => starts_with(pieces, v),
            StringMatch::Suffix(v) => ends_with(pieces, v),
        }
    }
}

/// Shown in the config dump as the user wrote it.
impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Any => f.write_str("*"),
            StringMatch::Exact(v) => f.write_str(v),
            StringMatch::Prefix(v) => write!(f, "{v}*"),
            StringMatch::Suffix(v) => write!(f, "*{v}"),
        }
    }
}

impl Serialize for StringMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn starts_with(pieces: &[&str], prefix: &str) -> bool {
    let mut rest = prefix;
    for piece in pieces {
        if rest.len() <= piece.len() {
            return piece.starts_with(rest);
        }
        match rest.strip_prefix(piece) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
}

fn ends_with(pieces: &[&str], suffix: &str) -> bool {
    let mut rest = suffix;
    for piece in pieces.iter().rev() {
        if rest.len() <= piece.len() {
            return piece.ends_with(rest);
        }
        match rest.strip_suffix(piece) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
}

/// Compares with `Identity::principal()` (`td/ns/<ns>/sa/<sa>`) piece by piece.
fn principal_matches(m: &StringMatch, conn: &ConnInfo<'_>) -> bool {
    conn.src_identity.is_some_and(|id| {
        let pieces = [
            id.trust_domain(),
            "/ns/",
            id.namespace(),
            "/sa/",
            id.service_account(),
        ];
        m.matches(&pieces)
    })
}

fn namespace_matches(m: &StringMatch, conn: &ConnInfo<'_>) -> bool {
    conn.src_identity
        .is_some_and(|id| m.matches(&[id.namespace()]))
}

fn note_l7<T>(l7: &mut BTreeSet<String>, field: &str, values: &[T]) {
    if !values.is_empty() {
        l7.insert(field.to_owned());
    }
}

fn strings(values: Vec<String>, not_values: Vec<String>) -> MatchList<StringMatch> {
    let parse = |v: Vec<String>| v.iter().map(|s| StringMatch::parse(s)).collect();
    MatchList::new(parse(values), parse(not_values))
}

fn texts(values: &[manifest::Scalar]) -> Vec<String> {
    values.iter().map(|v| v.0.clone()).collect()
}

/// A CIDR, or a bare address meaning /32 or /128.
fn cidrs(policy: &str, field: &str, values: &[String]) -> Result<Vec<IpNet>, PolicyError> {
    values
        .iter()
        .map(|v| {
            let text = v.trim();
            text.parse::<IpNet>()
                .map(|net| net.trunc())
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| PolicyError::InvalidCidr {
                    policy: policy.to_owned(),
                    field: field.to_owned(),
                    value: v.clone(),
                })
        })
        .collect()
}

fn ports(policy: &str, field: &str, values: &[manifest::Scalar]) -> Result<Vec<u16>, PolicyError> {
    values
        .iter()
        .map(|v| match v.0.trim().parse::<u16>() {
            Ok(port) if port != 0 => Ok(port),
            _ => Err(PolicyError::InvalidPort {
                policy: policy.to_owned(),
                field: field.to_owned(),
                value: v.0.clone(),
            }),
        })
        .collect()
}
