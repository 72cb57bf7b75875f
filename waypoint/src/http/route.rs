//! Request-side routing decisions: which route fits, which weighted backend, rewrites,
//! redirects and the W3C trace context. Pure functions over the request and the model.

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Response, Uri};
use rand::Rng;

use super::body::{full, RespBody};
use crate::config::{Redirect, Rewrite, Route, RouteMatch, Service, StringMatch, WeightedBackend};

/// The first route of `svc` that takes `port` and whose matches fit the request.
pub fn select<'a>(svc: &'a Service, req: &Parts, port: u16) -> Option<&'a Route> {
    svc.routes.iter().find(|r| {
        r.serves_port(port) && (r.matches.is_empty() || r.matches.iter().any(|m| fits(m, req)))
    })
}

fn fits(m: &RouteMatch, req: &Parts) -> bool {
    if m.method
        .as_deref()
        .is_some_and(|want| want != req.method.as_str())
    {
        return false;
    }
    if m.path.as_ref().is_some_and(|p| !p.matches(req.uri.path())) {
        return false;
    }
    let headers_fit = m.headers.iter().all(|h| {
        let found = req
            .headers
            .get_all(&h.name)
            .iter()
            .any(|v| match (&h.value, v.to_str()) {
                (None, _) => true,
                (Some(want), Ok(v)) => want.matches(v),
                (Some(_), Err(_)) => false,
            });
        found != h.invert
    });
    headers_fit
        && m.query_params
            .iter()
            .all(|q| match query_param(&req.uri, &q.name) {
                None => false,
                Some(v) => q.value.as_ref().is_none_or(|want| want.matches(&v)),
            })
}

/// The first value of query parameter `name` (not percent-decoded: matches compare the
/// raw form, as Envoy's exact query matches do).
pub fn query_param(uri: &Uri, name: &str) -> Option<String> {
    uri.query()?
        .split('&')
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Random choice by weight; `backends` has a positive total (checked by config).
pub fn weighted(backends: &[WeightedBackend]) -> Option<&WeightedBackend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut n = rand::rng().random_range(0..total);
    backends.iter().find(|b| {
        let w = u64::from(b.weight);
        if n < w {
            return true;
        }
        n -= w;
        false
    })
}

/// `true` with probability `fraction` (0..=1).
pub fn chance(fraction: f64) -> bool {
    fraction >= 1.0 || (fraction > 0.0 && rand::rng().random_bool(fraction))
}

/// Applies a rewrite to the request's path and authority.
pub fn rewrite(rw: &Rewrite, route: &Route, parts: &mut Parts) {
    let path = parts.uri.path();
    let new_path = if let Some(full_path) = &rw.full_path {
        Some(full_path.clone())
    } else if let Some(prefix) = &rw.path_prefix {
        replace_prefix(route, path, prefix)
    } else {
        None
    };
    if let Some(p) = new_path {
        let pq = match parts.uri.query() {
            Some(q) => format!("{p}?{q}"),
            None => p,
        };
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.path_and_query = pq.parse().ok();
        parts.uri = Uri::from_parts(uri).unwrap_or_default();
    }
    if let Some(host) = &rw.host {
        if let Ok(v) = HeaderValue::from_str(host) {
            set_authority(parts, v);
        }
    }
}

/// `path` with the part `route`'s prefix match matched replaced by `prefix`; `None` when
/// no prefix match of the route matched it.
fn replace_prefix(route: &Route, path: &str, prefix: &str) -> Option<String> {
    let matched = route.matches.iter().find_map(|m| match &m.path {
        Some(StringMatch::Prefix(p)) if path.starts_with(p.as_str()) => Some(p.len()),
        _ => None,
    });
    matched.map(|n| join_prefix(prefix, &path[n..]))
}

/// `/v1` + `/x` and `/v1/` + `/x` both give `/v1/x`; an empty rest keeps the prefix.
fn join_prefix(prefix: &str, rest: &str) -> String {
    match (prefix.ends_with('/'), rest.starts_with('/')) {
        (true, true) => format!("{prefix}{}", &rest[1..]),
        (false, false) if !rest.is_empty() && !prefix.is_empty() => format!("{prefix}/{rest}"),
        _ if prefix.is_empty() && !rest.starts_with('/') => format!("/{rest}"),
        _ => format!("{prefix}{rest}"),
    }
}

/// The request's authority: from the URI (HTTP/2) or the Host header (HTTP/1.1).
pub fn authority(parts: &Parts) -> Option<String> {
    parts.uri.authority().map(|a| a.to_string()).or_else(|| {
        let host = parts.headers.get(header::HOST)?;
        host.to_str().ok().map(str::to_owned)
    })
}

/// Sets the authority in both places a later hop may read it.
pub fn set_authority(parts: &mut Parts, value: HeaderValue) {
    if parts.uri.authority().is_some() {
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.authority = value.to_str().ok().and_then(|v| v.parse().ok());
        parts.uri = Uri::from_parts(uri).unwrap_or_default();
    }
    parts.headers.insert(header::HOST, value);
}

pub fn redirect(rd: &Redirect, route: &Route, parts: &Parts) -> Response<RespBody> {
    let own = authority(parts).unwrap_or_default();
    let (own_host, own_port) = match own.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_owned(), Some(p.to_owned())),
        _ => (own.clone(), None),
    };
    let scheme = rd.scheme.as_deref().unwrap_or("http");
    let host = rd.host.clone().unwrap_or(own_host);
    let port = rd.port.map(|p| p.to_string()).or(own_port);
    let own_path = parts.uri.path();
    let prefixed = (rd.path_prefix.as_deref()).and_then(|p| replace_prefix(route, own_path, p));
    let path = (rd.path.clone())
        .or(prefixed)
        .unwrap_or_else(|| own_path.to_owned());
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let location = match port {
        Some(p) => format!("{scheme}://{host}:{p}{path}{query}"),
        None => format!("{scheme}://{host}{path}{query}"),
    };
    let mut resp = Response::new(full(bytes::Bytes::new()));
    *resp.status_mut() = rd.status;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// Continues the caller's W3C trace with a new span of ours, or starts a trace; returns
/// the trace id for the access log.
pub fn traceparent(headers: &mut HeaderMap) -> String {
    let incoming = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent);
    let mut rng = rand::rng();
    let (trace, flags) =
        incoming.unwrap_or_else(|| (format!("{:032x}", rng.random::<u128>()), "01".into()));
    let span = format!("{:016x}", rng.random::<u64>().max(1));
    if let Ok(v) = HeaderValue::from_str(&format!("00-{trace}-{span}-{flags}")) {
        headers.insert("traceparent", v);
    }
    trace
}

fn parse_traceparent(v: &str) -> Option<(String, String)> {
    let mut it = v.trim().split('-');
    let (version, trace, parent, flags) = (it.next()?, it.next()?, it.next()?, it.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = version != "ff"
        && hex(version, 2)
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0');
    valid.then(|| (trace.to_ascii_lowercase(), flags.to_owned()))
}

/// Headers that belong to one hop and must not be forwarded (RFC 9110 7.6.1).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
    // `te: trailers` is the one TE value HTTP/2 allows, and gRPC needs it.
    if headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
}
