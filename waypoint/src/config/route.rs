//! Routes: matches, actions, header changes, rewrites and resilience settings, validated
//! from `mesh.l7.v1.Route`. Matching helpers live here because they read only the model.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use mesh_core::proto::mesh::l7::v1 as pb;
use regex::Regex;
use serde::{Serialize, Serializer};

use super::{fraction, millis};

type Invalid = String;

#[derive(Debug, Clone, Serialize)]
pub struct Route {
    pub name: String,
    /// Empty: every port.
    pub ports: Vec<u16>,
    /// Empty: every request.
    pub matches: Vec<RouteMatch>,
    pub action: Action,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub rewrite: Option<Rewrite>,
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub fault: Option<Fault>,
    pub mirrors: Vec<Mirror>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Regex(#[serde(serialize_with = "ser_regex")] Regex),
}

#[derive(Debug, Clone, Serialize)]
pub struct HeaderMatch {
    #[serde(serialize_with = "ser_display")]
    pub name: HeaderName,
    /// `None`: the header only has to be present.
    pub value: Option<StringMatch>,
    pub invert: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueryMatch {
    pub name: String,
    pub value: Option<StringMatch>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteMatch {
    pub path: Option<StringMatch>,
    pub headers: Vec<HeaderMatch>,
    pub query_params: Vec<QueryMatch>,
    pub method: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Backend {
    /// `<namespace>/<hostname>`.
    pub service: String,
    /// `None`: the port the request arrived on.
    pub port: Option<u16>,
    pub subset: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WeightedBackend {
    pub backend: Backend,
    pub weight: u32,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

#[derive(Debug, Clone, Serialize)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    /// Replaces the part of the path the route's prefix match matched.
    pub path_prefix: Option<String>,
    #[serde(serialize_with = "ser_display")]
    pub status: StatusCode,
}

#[derive(Debug, Clone, Serialize)]
pub struct DirectResponse {
    #[serde(serialize_with = "ser_display")]
    pub status: StatusCode,
    #[serde(serialize_with = "ser_body")]
    pub body: Bytes,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Backends with weights summing to more than zero.
    Forward(Vec<WeightedBackend>),
    Redirect(Redirect),
    DirectResponse(DirectResponse),
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HeaderOps {
    #[serde(serialize_with = "ser_pairs")]
    pub set: Vec<(HeaderName, HeaderValue)>,
    #[serde(serialize_with = "ser_pairs")]
    pub add: Vec<(HeaderName, HeaderValue)>,
    #[serde(serialize_with = "ser_names")]
    pub remove: Vec<HeaderName>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rewrite {
    pub path_prefix: Option<String>,
    pub full_path: Option<String>,
    pub host: Option<String>,
}

/// Which outcomes of an attempt are retried (Envoy's `retry_on` names).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RetryOn {
    pub server_error: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub retriable_4xx: bool,
    pub status_codes: Vec<u16>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultDelay {
    pub delay: Duration,
    /// 0..=1.
    pub fraction: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultAbort {
    #[serde(serialize_with = "ser_display")]
    pub status: StatusCode,
    pub grpc_status: Option<u32>,
    pub fraction: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Mirror {
    pub backend: Backend,
    pub fraction: f64,
}

/// Envoy's default retry back-off base interval.
const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);

impl Route {
    pub(super) fn from_proto(r: &pb::Route) -> Result<Route, Invalid> {
        let ports = r
            .ports
            .iter()
            .map(|p| u16::try_from(*p).map_err(|_| format!("invalid port {p}")))
            .collect::<Result<_, _>>()?;
        let action = match &r.action {
            None => return Err("route without an action".into()),
            Some(pb::route::Action::Forward(f)) => Action::Forward(forward(f)?),
            Some(pb::route::Action::Redirect(rd)) => Action::Redirect(redirect(rd)?),
            Some(pb::route::Action::DirectResponse(d)) => Action::DirectResponse(DirectResponse {
                status: status(d.status, "direct response")?,
                body: Bytes::copy_from_slice(&d.body),
            }),
        };
        Ok(Route {
            name: r.name.clone(),
            ports,
            matches: r
                .matches
                .iter()
                .map(route_match)
                .collect::<Result<_, _>>()?,
            action,
            request_headers: HeaderOps::from_proto(r.request_headers.as_ref())?,
            response_headers: HeaderOps::from_proto(r.response_headers.as_ref())?,
            rewrite: r.rewrite.as_ref().map(rewrite),
            timeout: millis(r.timeout_ms),
            retry: r.retry.as_ref().map(retry).transpose()?,
            fault: r.fault.as_ref().map(fault).transpose()?,
            mirrors: r.mirrors.iter().map(mirror).collect::<Result<_, _>>()?,
        })
    }

    /// Whether the route takes requests on `port`.
    pub fn serves_port(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.contains(&port)
    }
}

impl StringMatch {
    fn from_proto(m: &pb::StringMatch) -> Result<Option<StringMatch>, Invalid> {
        use pb::string_match::Kind;
        Ok(match &m.kind {
            None => None,
            Some(Kind::Exact(s)) => Some(StringMatch::Exact(s.clone())),
            Some(Kind::Prefix(s)) => Some(StringMatch::Prefix(s.clone())),
            Some(Kind::Suffix(s)) => Some(StringMatch::Suffix(s.clone())),
            Some(Kind::Regex(re)) => {
                // RE2 semantics match the whole value, so anchor it.
                let compiled =
                    Regex::new(&format!("^(?:{re})$")).map_err(|e| format!("regex {re:?}: {e}"))?;
                Some(StringMatch::Regex(compiled))
            }
        })
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Regex(re) => re.is_match(value),
        }
    }
}

fn route_match(m: &pb::RouteMatch) -> Result<RouteMatch, Invalid> {
    let headers = m
        .headers
        .iter()
        .map(|h| {
            Ok(HeaderMatch {
                name: header_name(&h.name)?,
                value: h
                    .value
                    .as_ref()
                    .map(StringMatch::from_proto)
                    .transpose()?
                    .flatten(),
                invert: h.invert,
            })
        })
        .collect::<Result<_, Invalid>>()?;
    let query_params = m
        .query_params
        .iter()
        .map(|q| {
            Ok(QueryMatch {
                name: q.name.clone(),
                value: q
                    .value
                    .as_ref()
                    .map(StringMatch::from_proto)
                    .transpose()?
                    .flatten(),
            })
        })
        .collect::<Result<_, Invalid>>()?;
    let method = (!m.method.is_empty()).then(|| m.method.to_ascii_uppercase());
    Ok(RouteMatch {
        path: m
            .path
            .as_ref()
            .map(StringMatch::from_proto)
            .transpose()?
            .flatten(),
        headers,
        query_params,
        method,
    })
}

fn forward(f: &pb::Forward) -> Result<Vec<WeightedBackend>, Invalid> {
    let backends: Vec<WeightedBackend> = f
        .backends
        .iter()
        .map(|wb| {
            let backend = wb
                .backend
                .as_ref()
                .ok_or("weighted backend without a backend")?;
            Ok(WeightedBackend {
                backend: Backend::from_proto(backend)?,
                weight: wb.weight,
                request_headers: HeaderOps::from_proto(wb.request_headers.as_ref())?,
                response_headers: HeaderOps::from_proto(wb.response_headers.as_ref())?,
            })
        })
        .collect::<Result<_, Invalid>>()?;
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return Err("forward without a backend of positive weight".into());
    }
    Ok(backends)
}

impl Backend {
    fn from_proto(b: &pb::Backend) -> Result<Backend, Invalid> {
        if !b.service.contains('/') {
            return Err(format!(
                "backend service {:?} is not <namespace>/<host>",
                b.service
            ));
        }
        let port = match b.port {
            0 => None,
            p => Some(u16::try_from(p).map_err(|_| format!("invalid backend port {p}"))?),
        };
        Ok(Backend {
            service: b.service.clone(),
            port,
            subset: (!b.subset.is_empty()).then(|| b.subset.clone()),
        })
    }
}

fn redirect(r: &pb::Redirect) -> Result<Redirect, Invalid> {
    let status = match r.status {
        0 => StatusCode::MOVED_PERMANENTLY,
        s => status(s, "redirect")?,
    };
    if !status.is_redirection() {
        return Err(format!("redirect status {status} is not 3xx"));
    }
    let port = match r.port {
        0 => None,
        p => Some(u16::try_from(p).map_err(|_| format!("invalid redirect port {p}"))?),
    };
    let some = |s: &String| (!s.is_empty()).then(|| s.clone());
    Ok(Redirect {
        scheme: some(&r.scheme),
        host: some(&r.host),
        port,
        path: some(&r.path),
        path_prefix: some(&r.path_prefix),
        status,
    })
}

fn rewrite(r: &pb::Rewrite) -> Rewrite {
    let some = |s: &String| (!s.is_empty()).then(|| s.clone());
    Rewrite {
        path_prefix: some(&r.path_prefix),
        full_path: some(&r.full_path),
        host: some(&r.host),
    }
}

fn retry(r: &pb::RetryPolicy) -> Result<RetryPolicy, Invalid> {
    let mut on = RetryOn::default();
    for cond in r.retry_on.iter().flat_map(|c| c.split(',')).map(str::trim) {
        match cond {
            "5xx" => on.server_error = true,
            "gateway-error" => on.gateway_error = true,
            "reset" => on.reset = true,
            "connect-failure" => on.connect_failure = true,
            "refused-stream" => on.refused_stream = true,
            "retriable-4xx" => on.retriable_4xx = true,
            "retriable-status-codes" | "" => {}
            other => return Err(format!("unknown retry_on {other:?}")),
        }
    }
    for code in &r.retriable_status_codes {
        on.status_codes
            .push(status(*code, "retriable status code")?.as_u16());
    }
    let backoff_base = millis(r.backoff_base_ms).unwrap_or(DEFAULT_BACKOFF_BASE);
    Ok(RetryPolicy {
        attempts: r.attempts,
        per_try_timeout: millis(r.per_try_timeout_ms),
        retry_on: on,
        backoff_base,
        backoff_max: millis(r.backoff_max_ms).unwrap_or(backoff_base * 10),
    })
}

fn fault(f: &pb::Fault) -> Result<Fault, Invalid> {
    let delay = f
        .delay
        .as_ref()
        .map(|d| {
            Ok::<_, Invalid>(FaultDelay {
                delay: Duration::from_millis(d.delay_ms),
                fraction: fraction(d.percent)?,
            })
        })
        .transpose()?;
    let abort = f
        .abort
        .as_ref()
        .map(|a| {
            Ok::<_, Invalid>(FaultAbort {
                status: status(a.http_status, "fault abort")?,
                grpc_status: (a.grpc_status != 0).then_some(a.grpc_status),
                fraction: fraction(a.percent)?,
            })
        })
        .transpose()?;
    Ok(Fault { delay, abort })
}

fn mirror(m: &pb::Mirror) -> Result<Mirror, Invalid> {
    let backend = m.backend.as_ref().ok_or("mirror without a backend")?;
    // proto3 cannot tell 0 from unset; a mirror that never fires is no config anyone
    // writes, so 0 reads as "unset" = every request, as Istio and Gateway API default.
    let percent = if m.percent == 0.0 { 100.0 } else { m.percent };
    Ok(Mirror {
        backend: Backend::from_proto(backend)?,
        fraction: fraction(percent)?,
    })
}

impl HeaderOps {
    fn from_proto(ops: Option<&pb::HeaderOps>) -> Result<HeaderOps, Invalid> {
        let Some(ops) = ops else {
            return Ok(HeaderOps::default());
        };
        let pairs = |m: &std::collections::BTreeMap<String, String>| {
            m.iter()
                .map(|(k, v)| {
                    let value = HeaderValue::from_str(v)
                        .map_err(|_| format!("invalid value for header {k}"))?;
                    Ok((header_name(k)?, value))
                })
                .collect::<Result<Vec<_>, Invalid>>()
        };
        Ok(HeaderOps {
            set: pairs(&ops.set)?,
            add: pairs(&ops.add)?,
            remove: ops
                .remove
                .iter()
                .map(|n| header_name(n))
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

fn header_name(name: &str) -> Result<HeaderName, Invalid> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .map_err(|_| format!("invalid header name {name:?}"))
}

fn status(code: u32, what: &str) -> Result<StatusCode, Invalid> {
    u16::try_from(code)
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
        .filter(|s| s.as_u16() >= 200)
        .ok_or_else(|| format!("invalid {what} status {code}"))
}

fn ser_regex<S: Serializer>(re: &Regex, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(re.as_str())
}

pub(super) fn ser_display<S: Serializer, T: std::fmt::Display>(
    v: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn ser_body<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(b))
}

fn ser_pairs<S: Serializer>(v: &[(HeaderName, HeaderValue)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(
        v.iter()
            .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v.as_bytes()))),
    )
}

fn ser_names<S: Serializer>(v: &[HeaderName], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(HeaderName::as_str))
}
