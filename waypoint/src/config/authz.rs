//! L7 AuthorizationPolicy attached to the waypoint or a service: the validated model and
//! its evaluation (DENY before ALLOW; any ALLOW policy makes the default deny; AUDIT
//! never changes the decision). Istio's string forms: exact, `prefix*`, `*suffix`, `*`.

use std::net::IpAddr;

use ipnet::IpNet;
use mesh_core::proto::mesh::l7::v1 as pb;
use pb::authorization::Action as PbAction;
use serde::Serialize;

use super::StringMatch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AuthzAction {
    Allow,
    Deny,
    Audit,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuthzPolicy {
    /// `<namespace>/<name>`.
    pub name: String,
    /// `<kind>/<namespace>/<name>`; Gateway targets cover every service of the waypoint.
    pub targets: Vec<String>,
    pub action: AuthzAction,
    pub rules: Vec<AuthzRule>,
}

/// Each non-empty part must match; within a part, any entry.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuthzRule {
    pub from: Vec<Vec<Check>>,
    pub to: Vec<Vec<Check>>,
    pub when: Vec<Check>,
}

/// One attribute test: the attribute's value must match one of `values` (when set) and
/// none of `not_values`.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub attribute: Attribute,
    pub values: Vec<Value>,
    pub not_values: Vec<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attribute {
    Principal,
    RequestPrincipal,
    Namespace,
    SourceIp,
    Host,
    Port,
    Method,
    Path,
    Header(String),
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Value {
    Text(StringMatch),
    Net(#[serde(serialize_with = "super::route::ser_display")] IpNet),
    Port(u16),
}

/// What a policy can see of one request.
pub struct AuthzInput<'a> {
    /// `<namespace>/<hostname>` of the service.
    pub service: &'a str,
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub source_ip: IpAddr,
    pub host: &'a str,
    pub port: u16,
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
}

impl AuthzPolicy {
    /// An invalid policy fails closed: a DENY denies everything, an ALLOW allows nothing
    /// (so the default deny of having an ALLOW policy holds). Returns the reason too.
    pub(super) fn from_proto(
        p: &pb::Policy,
        a: &pb::Authorization,
    ) -> (AuthzPolicy, Option<String>) {
        let action = match PbAction::try_from(a.action) {
            Ok(PbAction::Allow) => AuthzAction::Allow,
            Ok(PbAction::Deny) | Err(_) => AuthzAction::Deny,
            Ok(PbAction::Audit) => AuthzAction::Audit,
        };
        let parsed: Result<Vec<AuthzRule>, String> = a.rules.iter().map(rule).collect();
        let (rules, error) = match (parsed, action) {
            (Ok(rules), _) => (rules, None),
            (Err(e), AuthzAction::Deny) => (vec![AuthzRule::default()], Some(e)),
            (Err(e), AuthzAction::Allow | AuthzAction::Audit) => (Vec::new(), Some(e)),
        };
        let policy = AuthzPolicy {
            name: format!("{}/{}", p.namespace, p.name),
            targets: p.targets.clone(),
            action,
            rules,
        };
        (policy, error)
    }

    fn applies(&self, waypoint: &str, service: &str) -> bool {
        let (svc_ns, host) = service.split_once('/').unwrap_or_default();
        let short = host.split('.').next().unwrap_or_default();
        self.targets.iter().any(|t| {
            let mut it = t.splitn(3, '/');
            match (it.next(), it.next(), it.next()) {
                (Some("Gateway"), Some(ns), Some(name)) => waypoint == format!("{ns}/{name}"),
                (Some("Service"), Some(ns), Some(name)) => {
                    ns == svc_ns && (name == short || name == host)
                }
                _ => false,
            }
        })
    }

    fn matches(&self, input: &AuthzInput<'_>) -> bool {
        self.rules.iter().any(|r| {
            let part = |entries: &Vec<Vec<Check>>| {
                entries.is_empty() || entries.iter().any(|e| e.iter().all(|c| c.matches(input)))
            };
            part(&r.from) && part(&r.to) && r.when.iter().all(|c| c.matches(input))
        })
    }
}

/// `Err(policy name)` when the request is denied.
pub fn authorize(
    policies: &[AuthzPolicy],
    waypoint: &str,
    input: &AuthzInput<'_>,
) -> Result<(), String> {
    let applicable: Vec<&AuthzPolicy> = policies
        .iter()
        .filter(|p| p.applies(waypoint, input.service))
        .collect();
    let of = |a: AuthzAction| applicable.iter().filter(move |p| p.action == a);
    if let Some(p) = of(AuthzAction::Deny).find(|p| p.matches(input)) {
        return Err(p.name.clone());
    }
    let mut allows = of(AuthzAction::Allow).peekable();
    if allows.peek().is_none() {
        return Ok(());
    }
    if allows.any(|p| p.matches(input)) {
        Ok(())
    } else {
        Err("default deny (ALLOW policies present)".into())
    }
}

impl Check {
    fn matches(&self, input: &AuthzInput<'_>) -> bool {
        let hit = |v: &Value| self.hit(v, input);
        (self.values.is_empty() || self.values.iter().any(hit)) && !self.not_values.iter().any(hit)
    }

    /// A missing attribute (no identity, no header) matches no value.
    fn hit(&self, v: &Value, input: &AuthzInput<'_>) -> bool {
        let text = |s: Option<&str>| match v {
            Value::Text(m) => s.is_some_and(|s| m.matches(s)),
            Value::Net(_) | Value::Port(_) => false,
        };
        match &self.attribute {
            Attribute::Principal => text(input.principal),
            // JWT is not verified yet: no request has a request principal.
            Attribute::RequestPrincipal => text(None),
            Attribute::Namespace => text(input.namespace),
            Attribute::Host => text(Some(input.host)),
            Attribute::Method => text(Some(input.method)),
            Attribute::Path => text(Some(input.path)),
            Attribute::Header(h) => input
                .headers
                .get_all(h.as_str())
                .iter()
                .any(|hv| text(hv.to_str().ok())),
            Attribute::SourceIp => matches!(v, Value::Net(n) if n.contains(&input.source_ip)),
            Attribute::Port => matches!(v, Value::Port(p) if *p == input.port),
        }
    }
}

fn rule(r: &pb::AuthzRule) -> Result<AuthzRule, String> {
    let from = r.from.iter().map(source).collect::<Result<_, _>>()?;
    let to = r.to.iter().map(operation).collect::<Result<_, _>>()?;
    let when = r.when.iter().map(condition).collect::<Result<_, _>>()?;
    Ok(AuthzRule { from, to, when })
}

fn source(s: &pb::Source) -> Result<Vec<Check>, String> {
    let mut checks = Vec::new();
    text(
        &mut checks,
        Attribute::Principal,
        &s.principals,
        &s.not_principals,
    );
    text(
        &mut checks,
        Attribute::RequestPrincipal,
        &s.request_principals,
        &s.not_request_principals,
    );
    text(
        &mut checks,
        Attribute::Namespace,
        &s.namespaces,
        &s.not_namespaces,
    );
    if !s.ip_blocks.is_empty() || !s.not_ip_blocks.is_empty() {
        checks.push(Check {
            attribute: Attribute::SourceIp,
            values: nets(&s.ip_blocks)?,
            not_values: nets(&s.not_ip_blocks)?,
        });
    }
    Ok(checks)
}

fn operation(o: &pb::Operation) -> Result<Vec<Check>, String> {
    let mut checks = Vec::new();
    text(&mut checks, Attribute::Host, &o.hosts, &o.not_hosts);
    text(&mut checks, Attribute::Method, &o.methods, &o.not_methods);
    text(&mut checks, Attribute::Path, &o.paths, &o.not_paths);
    if !o.ports.is_empty() || !o.not_ports.is_empty() {
        let ports = |ps: &[u32]| {
            ps.iter()
                .map(|p| {
                    u16::try_from(*p)
                        .map(Value::Port)
                        .map_err(|_| format!("invalid port {p}"))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        checks.push(Check {
            attribute: Attribute::Port,
            values: ports(&o.ports)?,
            not_values: ports(&o.not_ports)?,
        });
    }
    Ok(checks)
}

fn condition(c: &pb::Condition) -> Result<Check, String> {
    let key = c.key.as_str();
    let attribute = if let Some(h) = key
        .strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'))
    {
        Attribute::Header(h.to_ascii_lowercase())
    } else {
        match key {
            "source.ip" | "remote.ip" => Attribute::SourceIp,
            "source.namespace" => Attribute::Namespace,
            "source.principal" => Attribute::Principal,
            "request.auth.principal" => Attribute::RequestPrincipal,
            "destination.port" => Attribute::Port,
            other => return Err(format!("unsupported condition key {other:?}")),
        }
    };
    let values = |vs: &[String]| -> Result<Vec<Value>, String> {
        match attribute {
            Attribute::SourceIp => nets(vs),
            Attribute::Port => vs
                .iter()
                .map(|v| {
                    v.parse()
                        .map(Value::Port)
                        .map_err(|_| format!("invalid port {v:?}"))
                })
                .collect(),
            _ => Ok(vs.iter().map(|v| Value::Text(pattern(v))).collect()),
        }
    };
    Ok(Check {
        values: values(&c.values)?,
        not_values: values(&c.not_values)?,
        attribute,
    })
}

fn text(checks: &mut Vec<Check>, attribute: Attribute, values: &[String], not_values: &[String]) {
    if values.is_empty() && not_values.is_empty() {
        return;
    }
    let conv = |vs: &[String]| vs.iter().map(|v| Value::Text(pattern(v))).collect();
    checks.push(Check {
        attribute,
        values: conv(values),
        not_values: conv(not_values),
    });
}

/// Istio's forms onto the route matcher: `*` is the empty prefix.
fn pattern(v: &str) -> StringMatch {
    if let Some(suffix) = v.strip_prefix('*') {
        StringMatch::Suffix(suffix.to_owned())
    } else if let Some(prefix) = v.strip_suffix('*') {
        StringMatch::Prefix(prefix.to_owned())
    } else {
        StringMatch::Exact(v.to_owned())
    }
}

fn nets(vs: &[String]) -> Result<Vec<Value>, String> {
    vs.iter()
        .map(|v| {
            v.parse::<IpNet>()
                .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
                .map(Value::Net)
                .map_err(|_| format!("invalid IP block {v:?}"))
        })
        .collect()
}
