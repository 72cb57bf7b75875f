//! Gateway API `HTTPRoute` and `GRPCRoute` with a Service as parent (GAMMA) -> routes of
//! that service.
//!
//! Each match of each rule becomes its own route, so that the routes of every object
//! attached to one service can be put in the Gateway API's precedence order (exact path,
//! longest prefix, method, most header matches, most query matches, oldest object, name,
//! rule order). A `PathPrefix` matches whole path segments: `/foo` becomes an exact `/foo`
//! route and a `/foo/` prefix route, each with the prefix rewrite or redirect made exact for
//! it. A rule without backends sends to its parent service.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use super::{check_regex, duration_ms, host_service, object_error, service_id, spec};
use crate::objects::{CustomObject, Key, ObjectError, Objects};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use mesh_core::proto::mesh::l7::v1::{
    route::Action, string_match::Kind as Sm, Backend, Forward, HeaderMatch, HeaderOps, Mirror,
    QueryMatch, Redirect, RetryPolicy, Rewrite, Route, RouteMatch, StringMatch, WeightedBackend,
};

pub mod types;

use types::*;

/// Where a route stands among the routes of one service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Precedence {
    /// 0 exact, 1 regular expression, 2 prefix.
    path_kind: u8,
    prefix_len: Reverse<usize>,
    no_method: bool,
    headers: Reverse<usize>,
    query: Reverse<usize>,
    created: Option<Time>,
    object: Key,
    rule: usize,
    matched: usize,
}

/// The routes of every HTTPRoute and GRPCRoute, by the Service they attach to, each
/// service's in precedence order.
pub fn routes(objects: &Objects, errors: &mut Vec<ObjectError>) -> BTreeMap<Key, Vec<Route>> {
    let mut by_service: BTreeMap<Key, Vec<(Precedence, Route)>> = BTreeMap::new();
    for obj in objects
        .custom("HTTPRoute")
        .chain(objects.custom("GRPCRoute"))
    {
        match object_routes(objects, obj, errors) {
            Ok(attached) => {
                for (key, routes) in attached {
                    by_service.entry(key).or_default().extend(routes);
                }
            }
            Err(reason) => errors.push(object_error(obj, reason)),
        }
    }
    by_service
        .into_iter()
        .map(|(key, mut routes)| {
            routes.sort_by(|a, b| a.0.cmp(&b.0));
            (key, routes.into_iter().map(|(_, r)| r).collect())
        })
        .collect()
}

type Attached = Vec<(Key, Vec<(Precedence, Route)>)>;

/// One object's routes per parent Service; parents that are not Services of this
/// cluster are reported and skipped.
fn object_routes(
    objects: &Objects,
    obj: &CustomObject,
    errors: &mut Vec<ObjectError>,
) -> Result<Attached, String> {
    let route_spec: RouteSpec = spec(obj)?;
    let key = super::object_key(obj);
    let grpc = obj.kind == "GRPCRoute";
    let mut rules = Vec::new();
    for (i, rule) in route_spec.rules.iter().enumerate() {
        let at = |e: String| format!("rules[{i}]: {e}");
        let base = rule_route(&key, &obj.kind, i, rule).map_err(at)?;
        let precedence = Precedence {
            path_kind: 2,
            prefix_len: Reverse(1),
            no_method: true,
            headers: Reverse(0),
            query: Reverse(0),
            created: obj.metadata.creation_timestamp.clone(),
            object: key.clone(),
            rule: i,
            matched: 0,
        };
        if rule.matches.is_empty() {
            rules.push((precedence, base));
            continue;
        }
        for (j, m) in rule.matches.iter().enumerate() {
            let matched = Precedence {
                matched: j,
                ..precedence.clone()
            };
            rules.extend(match_routes(&base, m, grpc, matched).map_err(at)?);
        }
    }
    let mut out = Vec::new();
    for parent in &route_spec.parent_refs {
        match parent_service(objects, parent, &key.0) {
            Ok(svc) => {
                let routes = rules
                    .iter()
                    .map(|(p, r)| (p.clone(), for_parent(r, &svc, parent)))
                    .collect();
                out.push((svc, routes));
            }
            Err(reason) => errors.push(object_error(obj, reason)),
        }
    }
    Ok(out)
}

/// A route as attached to one parent: its port, and the parent as the default backend.
fn for_parent(route: &Route, svc: &Key, parent: &ParentRef) -> Route {
    let mut route = route.clone();
    route.ports.extend(parent.port);
    if let Some(Action::Forward(f)) = &mut route.action {
        for b in f.backends.iter_mut().filter_map(|w| w.backend.as_mut()) {
            if b.service.is_empty() {
                b.service = service_id(svc);
            }
        }
    }
    route
}

fn parent_service(objects: &Objects, parent: &ParentRef, ns: &str) -> Result<Key, String> {
    let kind = parent.kind.as_deref().unwrap_or("Gateway");
    let group = parent
        .group
        .as_deref()
        .unwrap_or("gateway.networking.k8s.io");
    if kind != "Service" || !matches!(group, "" | "core") {
        return Err(format!(
            "parentRef {group}/{kind} {} is not served by waypoints (only Services, group \"\")",
            parent.name
        ));
    }
    let ns = parent.namespace.as_deref().unwrap_or(ns);
    host_service(objects, &parent.name, ns)
        .ok_or_else(|| format!("parentRef Service {ns}/{} does not exist", parent.name))
}

/// A rule's route without its matches.
fn rule_route(key: &Key, kind: &str, i: usize, rule: &Rule) -> Result<Route, String> {
    let mut route = Route {
        name: format!("{kind}/{}/{}/{i}", key.0, key.1),
        ..Default::default()
    };
    for f in &rule.filters {
        route_filter(&mut route, f, &key.0)?;
    }
    if route.action.is_none() {
        let mut backends = rule
            .backend_refs
            .iter()
            .map(|b| weighted(b, &key.0))
            .collect::<Result<Vec<_>, _>>()?;
        if backends.is_empty() {
            // Filled with the parent Service by `for_parent`.
            backends.push(WeightedBackend {
                backend: Some(Backend::default()),
                weight: 1,
                ..Default::default()
            });
        }
        route.action = Some(Action::Forward(Forward { backends }));
    }
    if let Some(t) = &rule.timeouts {
        route.timeout_ms = t
            .request
            .as_deref()
            .map(duration_ms)
            .transpose()?
            .unwrap_or(0);
        if let Some(per_try) = t.backend_request.as_deref() {
            route.retry.get_or_insert_default().per_try_timeout_ms = duration_ms(per_try)?;
        }
    }
    if let Some(r) = &rule.retry {
        let retry = route.retry.get_or_insert_default();
        retry.attempts = r.attempts.unwrap_or(1);
        retry.backoff_base_ms = r
            .backoff
            .as_deref()
            .map(duration_ms)
            .transpose()?
            .unwrap_or(0);
        retry_codes(retry, &r.codes);
    }
    Ok(route)
}

fn retry_codes(retry: &mut RetryPolicy, codes: &[u32]) {
    if codes.is_empty() {
        retry.retry_on = ["gateway-error", "connect-failure", "reset"]
            .map(String::from)
            .into();
    } else {
        retry.retry_on = ["retriable-status-codes", "connect-failure"]
            .map(String::from)
            .into();
        retry.retriable_status_codes = codes.to_vec();
    }
}

/// Applies one rule-level filter.
fn route_filter(route: &mut Route, f: &Filter, ns: &str) -> Result<(), String> {
    match f.type_.as_str() {
        "RequestHeaderModifier" => {
            route.request_headers = Some(header_ops(&f.request_header_modifier)?)
        }
        "ResponseHeaderModifier" => {
            route.response_headers = Some(header_ops(&f.response_header_modifier)?)
        }
        "RequestRedirect" => {
            let r = f
                .request_redirect
                .as_ref()
                .ok_or("RequestRedirect without its settings")?;
            let mut redirect = Redirect {
                scheme: r.scheme.clone().unwrap_or_default(),
                host: r.hostname.clone().unwrap_or_default(),
                port: r.port.unwrap_or(0),
                status: r.status_code.unwrap_or(302),
                ..Default::default()
            };
            if let Some(p) = &r.path {
                match path_modifier(p)? {
                    PathChange::Full(path) => redirect.path = path,
                    PathChange::Prefix(prefix) => redirect.path_prefix = prefix,
                }
            }
            route.action = Some(Action::Redirect(redirect));
        }
        "URLRewrite" => {
            let r = f
                .url_rewrite
                .as_ref()
                .ok_or("URLRewrite without its settings")?;
            let mut rewrite = Rewrite {
                host: r.hostname.clone().unwrap_or_default(),
                ..Default::default()
            };
            if let Some(p) = &r.path {
                match path_modifier(p)? {
                    PathChange::Full(path) => rewrite.full_path = path,
                    PathChange::Prefix(prefix) => rewrite.path_prefix = prefix,
                }
            }
            route.rewrite = Some(rewrite);
        }
        "RequestMirror" => {
            let m = f
                .request_mirror
                .as_ref()
                .ok_or("RequestMirror without its settings")?;
            let percent = match (&m.fraction, m.percent) {
                (Some(fr), _) if fr.denominator == 0 => {
                    return Err("RequestMirror fraction with denominator 0".into())
                }
                (Some(fr), _) => f64::from(fr.numerator) * 100.0 / f64::from(fr.denominator),
                (None, Some(p)) => f64::from(p),
                (None, None) => 100.0,
            };
            route.mirrors.push(Mirror {
                backend: Some(backend(&m.backend_ref, ns)?),
                percent,
            });
        }
        other => return Err(format!("filter {other:?} is not supported by waypoints")),
    }
    Ok(())
}

enum PathChange {
    Full(String),
    Prefix(String),
}

fn path_modifier(p: &PathModifier) -> Result<PathChange, String> {
    match p.type_.as_str() {
        "ReplaceFullPath" => p.replace_full_path.clone().map(PathChange::Full),
        "ReplacePrefixMatch" => p.replace_prefix_match.clone().map(PathChange::Prefix),
        other => return Err(format!("path modifier type {other:?} is not known")),
    }
    .ok_or_else(|| format!("path modifier {} without its value", p.type_))
}

fn header_ops(m: &Option<HeaderModifier>) -> Result<HeaderOps, String> {
    let m = m.as_ref().ok_or("header modifier without its settings")?;
    let pairs = |v: &[HeaderValue]| {
        v.iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
            .collect()
    };
    Ok(HeaderOps {
        set: pairs(&m.set),
        add: pairs(&m.add),
        remove: m.remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
    })
}

fn backend(b: &BackendObjectRef, ns: &str) -> Result<Backend, String> {
    let kind = b.kind.as_deref().unwrap_or("Service");
    let group = b.group.as_deref().unwrap_or("");
    if kind != "Service" || !matches!(group, "" | "core") {
        return Err(format!(
            "backendRef {group}/{kind} {} is not supported (only Services)",
            b.name
        ));
    }
    let port = b
        .port
        .ok_or_else(|| format!("backendRef Service {} needs a port", b.name))?;
    let key = (
        b.namespace.clone().unwrap_or_else(|| ns.to_owned()),
        b.name.clone(),
    );
    Ok(Backend {
        service: service_id(&key),
        port,
        subset: String::new(),
    })
}

fn weighted(b: &BackendRef, ns: &str) -> Result<WeightedBackend, String> {
    let mut out = WeightedBackend {
        backend: Some(backend(&b.target(), ns)?),
        weight: b.weight.unwrap_or(1),
        ..Default::default()
    };
    for f in &b.filters {
        match f.type_.as_str() {
            "RequestHeaderModifier" => {
                out.request_headers = Some(header_ops(&f.request_header_modifier)?)
            }
            "ResponseHeaderModifier" => {
                out.response_headers = Some(header_ops(&f.response_header_modifier)?)
            }
            other => return Err(format!("backendRef filter {other:?} is not supported")),
        }
    }
    Ok(out)
}

/// The routes of one match (two for a segment prefix), with their precedence.
fn match_routes(
    base: &Route,
    m: &Match,
    grpc: bool,
    mut precedence: Precedence,
) -> Result<Vec<(Precedence, Route)>, String> {
    let mut matched = RouteMatch {
        headers: m
            .headers
            .iter()
            .map(header_match)
            .collect::<Result<_, _>>()?,
        query_params: m
            .query_params
            .iter()
            .map(query_match)
            .collect::<Result<_, _>>()?,
        ..Default::default()
    };
    precedence.headers = Reverse(matched.headers.len());
    precedence.query = Reverse(matched.query_params.len());
    match &m.method {
        Some(MethodMatch::Http(method)) => {
            matched.method = method.clone();
            precedence.no_method = false;
        }
        Some(MethodMatch::Grpc(g)) => {
            let kind = grpc_path(g)?;
            precedence.path_kind = if matches!(kind, Sm::Exact(_)) { 0 } else { 1 };
            precedence.no_method = false;
            matched.path = Some(StringMatch { kind: Some(kind) });
        }
        None => {}
    }
    if grpc || m.path.is_none() {
        return Ok(vec![(precedence, with_match(base, matched))]);
    }
    let path = m.path.as_ref().expect("checked above");
    let value = path.value.clone().unwrap_or_else(|| "/".to_owned());
    match path.type_.as_deref().unwrap_or("PathPrefix") {
        "Exact" => {
            precedence.path_kind = 0;
            matched.path = Some(StringMatch {
                kind: Some(Sm::Exact(value)),
            });
            Ok(vec![(precedence, with_match(base, matched))])
        }
        "RegularExpression" => {
            check_regex(&value)?;
            precedence.path_kind = 1;
            matched.path = Some(StringMatch {
                kind: Some(Sm::Regex(value)),
            });
            Ok(vec![(precedence, with_match(base, matched))])
        }
        "PathPrefix" => Ok(segment_prefix(base, matched, &value, precedence)),
        other => Err(format!("path match type {other:?} is not known")),
    }
}

/// A `PathPrefix` match, which matches whole segments: the path itself, exactly, and
/// everything below it.
fn segment_prefix(
    base: &Route,
    mut matched: RouteMatch,
    value: &str,
    mut precedence: Precedence,
) -> Vec<(Precedence, Route)> {
    let prefix = value.trim_end_matches('/');
    precedence.prefix_len = Reverse(prefix.len().max(1));
    if prefix.is_empty() {
        matched.path = None;
        return vec![(precedence, with_match(base, matched))];
    }
    let below = |s: &str| {
        if s.ends_with('/') {
            s.to_owned()
        } else {
            format!("{s}/")
        }
    };
    let mut exact = with_match(
        base,
        RouteMatch {
            path: Some(StringMatch {
                kind: Some(Sm::Exact(prefix.to_owned())),
            }),
            ..matched.clone()
        },
    );
    let mut under = with_match(
        base,
        RouteMatch {
            path: Some(StringMatch {
                kind: Some(Sm::Prefix(below(prefix))),
            }),
            ..matched
        },
    );
    if let Some(rw) = exact.rewrite.as_mut().filter(|r| !r.path_prefix.is_empty()) {
        rw.full_path = std::mem::take(&mut rw.path_prefix);
    }
    if let Some(rw) = under.rewrite.as_mut().filter(|r| !r.path_prefix.is_empty()) {
        rw.path_prefix = below(&rw.path_prefix);
    }
    if let Some(Action::Redirect(r)) = exact.action.as_mut() {
        if !r.path_prefix.is_empty() {
            r.path = std::mem::take(&mut r.path_prefix);
        }
    }
    if let Some(Action::Redirect(r)) = under.action.as_mut() {
        if !r.path_prefix.is_empty() {
            r.path_prefix = below(&r.path_prefix);
        }
    }
    vec![(precedence.clone(), exact), (precedence, under)]
}

fn with_match(base: &Route, m: RouteMatch) -> Route {
    let mut route = base.clone();
    route.matches = vec![m];
    route
}

/// A gRPC method match as a path match: `/<service>/<method>`.
fn grpc_path(g: &GrpcMethod) -> Result<Sm, String> {
    let kind = g.type_.as_deref().unwrap_or("Exact");
    let (svc, method) = (g.service.as_deref(), g.method.as_deref());
    let matched = match (kind, svc, method) {
        (_, None, None) => return Err("gRPC method match needs a service or a method".into()),
        ("Exact", Some(s), Some(m)) => Sm::Exact(format!("/{s}/{m}")),
        ("Exact", Some(s), None) => Sm::Prefix(format!("/{s}/")),
        ("Exact", None, Some(m)) => Sm::Regex(format!("/[^/]+/{}", regex::escape(m))),
        ("RegularExpression", s, m) => {
            for re in [s, m].into_iter().flatten() {
                check_regex(re)?;
            }
            Sm::Regex(format!(
                "/(?:{})/(?:{})",
                s.unwrap_or("[^/]+"),
                m.unwrap_or("[^/]+")
            ))
        }
        (other, _, _) => return Err(format!("gRPC method match type {other:?} is not known")),
    };
    Ok(matched)
}

fn value_match(type_: Option<&str>, value: &str) -> Result<StringMatch, String> {
    let kind = match type_.unwrap_or("Exact") {
        "Exact" => Sm::Exact(value.to_owned()),
        "RegularExpression" => {
            check_regex(value)?;
            Sm::Regex(value.to_owned())
        }
        other => return Err(format!("match type {other:?} is not known")),
    };
    Ok(StringMatch { kind: Some(kind) })
}

fn header_match(h: &ValueMatch) -> Result<HeaderMatch, String> {
    Ok(HeaderMatch {
        name: h.name.to_ascii_lowercase(),
        value: Some(value_match(h.type_.as_deref(), &h.value)?),
        invert: false,
    })
}

fn query_match(q: &ValueMatch) -> Result<QueryMatch, String> {
    Ok(QueryMatch {
        name: q.name.clone(),
        value: Some(value_match(q.type_.as_deref(), &q.value)?),
    })
}
