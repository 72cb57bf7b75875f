//! Istio's `VirtualService` (routes of the services its hosts name) and `DestinationRule`
//! (a service's upstream policy and subsets) -> the waypoint's types.
//!
//! A VirtualService applies to waypoints when it names no `gateways` or names `mesh`. Its
//! `http` routes keep their order; `tcp` and `tls` routes are not served by waypoints and
//! make the object an error. Where Istio fills defaults that change behaviour (a single
//! destination weighs 100, a mirror or fault without percentage applies to every request,
//! outlier detection's 5 errors / 10 s / 30 s / 10 %), the translation fills them, so the
//! waypoint reads what the user would get from Istio.

use std::collections::BTreeMap;

use mesh_core::proto::mesh::l7::v1::{
    fault, load_balancer, route::Action, string_match::Kind as Sm, Backend, ConnectionPool,
    DirectResponse, Fault, Forward, HeaderMatch, HeaderOps, LoadBalancer, Mirror, OutlierDetection,
    QueryMatch, Redirect, RetryPolicy, Rewrite, Route, RouteMatch, StringMatch, Subset,
    TrafficPolicy, WeightedBackend,
};

use super::{check_regex, duration_ms, host_service, object_error, service_id, spec};
use crate::objects::{CustomObject, Key, ObjectError, Objects};

pub mod types;

use types::*;

/// The routes of every VirtualService, by the Service its hosts name.
pub fn routes(objects: &Objects, errors: &mut Vec<ObjectError>) -> BTreeMap<Key, Vec<Route>> {
    let mut out: BTreeMap<Key, Vec<Route>> = BTreeMap::new();
    for obj in objects.custom("VirtualService") {
        match virtual_service(objects, obj, errors) {
            Ok(attached) => {
                for (key, routes) in attached {
                    out.entry(key).or_default().extend(routes);
                }
            }
            Err(reason) => errors.push(object_error(obj, reason)),
        }
    }
    out
}

fn virtual_service(
    objects: &Objects,
    obj: &CustomObject,
    errors: &mut Vec<ObjectError>,
) -> Result<Vec<(Key, Vec<Route>)>, String> {
    let vs: VirtualServiceSpec = spec(obj)?;
    if !vs.gateways.is_empty() && !vs.gateways.iter().any(|g| g == "mesh") {
        return Ok(Vec::new());
    }
    if !vs.tcp.is_empty() || !vs.tls.is_empty() {
        return Err("tcp and tls routes are not served by waypoints".into());
    }
    let key = super::object_key(obj);
    let mut routes = Vec::new();
    for (i, http) in vs.http.iter().enumerate() {
        let route = http_route(objects, &key, i, http).map_err(|e| format!("http[{i}]: {e}"))?;
        routes.push(route);
    }
    let mut out = Vec::new();
    for host in &vs.hosts {
        match host_service(objects, host, &key.0) {
            Some(svc) => out.push((svc, routes.clone())),
            None => errors.push(object_error(
                obj,
                format!("host {host:?} is no Service of the cluster (skipped)"),
            )),
        }
    }
    Ok(out)
}

fn http_route(objects: &Objects, vs: &Key, i: usize, http: &HttpRoute) -> Result<Route, String> {
    let mut route = Route {
        name: format!("VirtualService/{}/{}/{i}", vs.0, vs.1),
        matches: http
            .matches
            .iter()
            .map(route_match)
            .collect::<Result<_, _>>()?,
        ports: match_ports(&http.matches)?,
        action: Some(action(objects, &vs.0, http)?),
        timeout_ms: http
            .timeout
            .as_deref()
            .map(duration_ms)
            .transpose()?
            .unwrap_or(0),
        retry: http.retries.as_ref().map(retry).transpose()?,
        fault: http.fault.as_ref().map(fault).transpose()?,
        ..Default::default()
    };
    if let Some(h) = &http.headers {
        route.request_headers = h.request.as_ref().map(header_ops);
        route.response_headers = h.response.as_ref().map(header_ops);
    }
    if let Some(rw) = &http.rewrite {
        // Istio replaces the matched prefix, or the whole path after an exact match.
        let exact_only = !http.matches.is_empty()
            && http
                .matches
                .iter()
                .all(|m| m.uri.as_ref().is_some_and(|u| u.exact.is_some()));
        let uri = rw.uri.clone().unwrap_or_default();
        route.rewrite = Some(Rewrite {
            path_prefix: if exact_only {
                String::new()
            } else {
                uri.clone()
            },
            full_path: if exact_only { uri } else { String::new() },
            host: rw.authority.clone().unwrap_or_default(),
        });
    }
    if let Some(m) = &http.mirror {
        let percent = http.mirror_percentage.as_ref().map_or(100.0, |p| p.value);
        route.mirrors.push(mirror(objects, &vs.0, m, percent)?);
    }
    for m in &http.mirrors {
        let percent = m.percentage.as_ref().map_or(100.0, |p| p.value);
        route
            .mirrors
            .push(mirror(objects, &vs.0, &m.destination, percent)?);
    }
    Ok(route)
}

/// The ports a route applies to: those its matches name (all or none must name one).
fn match_ports(matches: &[HttpMatch]) -> Result<Vec<u32>, String> {
    let ports: Vec<u32> = matches.iter().filter_map(|m| m.port).collect();
    if !ports.is_empty() && ports.len() != matches.len() {
        return Err("port is set on some matches of a route but not all (not supported)".into());
    }
    let mut ports = ports;
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

fn action(objects: &Objects, ns: &str, http: &HttpRoute) -> Result<Action, String> {
    if let Some(r) = &http.redirect {
        return Ok(Action::Redirect(Redirect {
            scheme: r.scheme.clone().unwrap_or_default(),
            host: r.authority.clone().unwrap_or_default(),
            port: r.port.unwrap_or(0),
            path: r.uri.clone().unwrap_or_default(),
            status: r.redirect_code.unwrap_or(301),
            path_prefix: String::new(),
        }));
    }
    if let Some(d) = &http.direct_response {
        let body = d
            .body
            .as_ref()
            .and_then(|b| b.string.clone())
            .unwrap_or_default();
        return Ok(Action::DirectResponse(DirectResponse {
            status: d.status,
            body: body.into_bytes(),
        }));
    }
    if http.route.is_empty() {
        return Err("a route needs route, redirect or directResponse".into());
    }
    let single = http.route.len() == 1;
    let backends = http
        .route
        .iter()
        .map(|d| {
            let (request_headers, response_headers) = match &d.headers {
                Some(h) => (
                    h.request.as_ref().map(header_ops),
                    h.response.as_ref().map(header_ops),
                ),
                None => (None, None),
            };
            Ok(WeightedBackend {
                backend: Some(destination(objects, ns, &d.destination)?),
                weight: d.weight.unwrap_or(if single { 100 } else { 0 }),
                request_headers,
                response_headers,
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(Action::Forward(Forward { backends }))
}

fn destination(objects: &Objects, ns: &str, d: &Destination) -> Result<Backend, String> {
    let key = host_service(objects, &d.host, ns)
        .ok_or_else(|| format!("destination host {:?} is no Service of the cluster", d.host))?;
    Ok(Backend {
        service: service_id(&key),
        port: d.port.as_ref().map_or(0, |p| p.number),
        subset: d.subset.clone().unwrap_or_default(),
    })
}

fn mirror(objects: &Objects, ns: &str, d: &Destination, percent: f64) -> Result<Mirror, String> {
    if !(0.0..=100.0).contains(&percent) {
        return Err(format!("mirror percentage {percent} is not within 0-100"));
    }
    Ok(Mirror {
        backend: Some(destination(objects, ns, d)?),
        percent,
    })
}

fn string_match(m: &types::StringMatch) -> Result<StringMatch, String> {
    let kind = match (&m.exact, &m.prefix, &m.regex) {
        (Some(e), None, None) => Sm::Exact(e.clone()),
        (None, Some(p), None) => Sm::Prefix(p.clone()),
        (None, None, Some(r)) => {
            check_regex(r)?;
            Sm::Regex(r.clone())
        }
        _ => return Err("a string match needs exactly one of exact, prefix, regex".into()),
    };
    Ok(StringMatch { kind: Some(kind) })
}

fn route_match(m: &HttpMatch) -> Result<RouteMatch, String> {
    let method = match &m.method {
        None => String::new(),
        Some(types::StringMatch {
            exact: Some(method),
            prefix: None,
            regex: None,
        }) => method.clone(),
        Some(_) => return Err("method matches only exactly here".into()),
    };
    let header = |(name, value): (&String, &types::StringMatch), invert| {
        Ok::<_, String>(HeaderMatch {
            name: name.to_ascii_lowercase(),
            value: Some(string_match(value)?),
            invert,
        })
    };
    let mut headers: Vec<HeaderMatch> = m
        .headers
        .iter()
        .map(|h| header(h, false))
        .collect::<Result<_, _>>()?;
    for h in &m.without_headers {
        headers.push(header(h, true)?);
    }
    Ok(RouteMatch {
        path: m.uri.as_ref().map(string_match).transpose()?,
        headers,
        query_params: m
            .query_params
            .iter()
            .map(|(name, v)| {
                Ok::<_, String>(QueryMatch {
                    name: name.clone(),
                    value: Some(string_match(v)?),
                })
            })
            .collect::<Result<_, _>>()?,
        method,
    })
}

fn header_ops(h: &HeaderOperations) -> HeaderOps {
    let lower = |m: &BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect()
    };
    HeaderOps {
        set: lower(&h.set),
        add: lower(&h.add),
        remove: h.remove.iter().map(|k| k.to_ascii_lowercase()).collect(),
    }
}

/// `retryOn` is Envoy's comma-separated list; numbers are status codes to retry.
fn retry(r: &Retries) -> Result<RetryPolicy, String> {
    let mut policy = RetryPolicy {
        attempts: r.attempts,
        per_try_timeout_ms: r
            .per_try_timeout
            .as_deref()
            .map(duration_ms)
            .transpose()?
            .unwrap_or(0),
        backoff_base_ms: r
            .backoff
            .as_deref()
            .map(duration_ms)
            .transpose()?
            .unwrap_or(0),
        ..Default::default()
    };
    for on in r.retry_on.iter().flat_map(|s| s.split(',')).map(str::trim) {
        match on.parse::<u32>() {
            Ok(code) => policy.retriable_status_codes.push(code),
            Err(_) if !on.is_empty() => policy.retry_on.push(on.to_owned()),
            Err(_) => {}
        }
    }
    let codes = "retriable-status-codes".to_owned();
    if !policy.retriable_status_codes.is_empty() && !policy.retry_on.contains(&codes) {
        policy.retry_on.push(codes);
    }
    Ok(policy)
}

fn percent(p: &Option<Percent>) -> Result<f64, String> {
    let value = p.as_ref().map_or(100.0, |p| p.value);
    if !(0.0..=100.0).contains(&value) {
        return Err(format!("percentage {value} is not within 0-100"));
    }
    Ok(value)
}

fn fault(f: &types::Fault) -> Result<Fault, String> {
    let delay = f
        .delay
        .as_ref()
        .map(|d| {
            Ok::<_, String>(fault::Delay {
                delay_ms: duration_ms(&d.fixed_delay)?,
                percent: percent(&d.percentage)?,
            })
        })
        .transpose()?;
    let abort = f
        .abort
        .as_ref()
        .map(|a| {
            let grpc_status = a
                .grpc_status
                .as_deref()
                .map(grpc_code)
                .transpose()?
                .unwrap_or(0);
            if a.http_status.is_none() && grpc_status == 0 {
                return Err("abort needs httpStatus or grpcStatus".to_owned());
            }
            Ok(fault::Abort {
                http_status: a.http_status.unwrap_or(0),
                grpc_status,
                percent: percent(&a.percentage)?,
            })
        })
        .transpose()?;
    Ok(Fault { delay, abort })
}

/// gRPC status names (as Istio writes them) or numbers.
fn grpc_code(name: &str) -> Result<u32, String> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    name.parse()
        .ok()
        .or_else(|| NAMES.iter().position(|n| *n == name).map(|i| i as u32))
        .ok_or_else(|| format!("grpcStatus {name:?} is not a gRPC status"))
}

/// The upstream policy and subsets of each Service a DestinationRule names; a second
/// rule for the same Service is reported and left out.
pub fn destination_rules(
    objects: &Objects,
    errors: &mut Vec<ObjectError>,
) -> BTreeMap<Key, (TrafficPolicy, Vec<Subset>)> {
    let mut out = BTreeMap::new();
    let mut owner: BTreeMap<Key, Key> = BTreeMap::new();
    for obj in objects.custom("DestinationRule") {
        let key = super::object_key(obj);
        let translated = spec(obj).and_then(|dr: DestinationRuleSpec| {
            let svc = host_service(objects, &dr.host, &key.0)
                .ok_or_else(|| format!("host {:?} is no Service of the cluster", dr.host))?;
            if let Some(first) = owner.get(&svc) {
                return Err(format!(
                    "{}/{} already configures {:?}; this rule is left out",
                    first.0, first.1, dr.host
                ));
            }
            Ok((svc, upstream(&dr)?))
        });
        match translated {
            Ok((svc, config)) => {
                owner.insert(svc.clone(), key);
                out.insert(svc, config);
            }
            Err(reason) => errors.push(object_error(obj, reason)),
        }
    }
    out
}

fn upstream(dr: &DestinationRuleSpec) -> Result<(TrafficPolicy, Vec<Subset>), String> {
    let policy = dr.traffic_policy.as_ref().map(traffic_policy).transpose()?;
    let subsets = dr
        .subsets
        .iter()
        .map(|s| {
            Ok(Subset {
                name: s.name.clone(),
                labels: s.labels.clone().into_iter().collect(),
                traffic_policy: s.traffic_policy.as_ref().map(traffic_policy).transpose()?,
                // Resolved against the service's pods when its config is built.
                endpoints: Vec::new(),
            })
        })
        .collect::<Result<_, String>>()?;
    Ok((policy.unwrap_or_default(), subsets))
}

fn traffic_policy(p: &Policy) -> Result<TrafficPolicy, String> {
    Ok(TrafficPolicy {
        load_balancer: p.load_balancer.as_ref().map(load_balancer).transpose()?,
        connection_pool: p
            .connection_pool
            .as_ref()
            .map(connection_pool)
            .transpose()?,
        outlier_detection: p.outlier_detection.as_ref().map(outlier).transpose()?,
    })
}

fn load_balancer(lb: &types::LoadBalancer) -> Result<LoadBalancer, String> {
    use load_balancer::{consistent_hash::Key as HashKey, ConsistentHash, Policy as Lb, Simple};
    let policy = match (&lb.simple, &lb.consistent_hash) {
        (Some(s), None) => Lb::Simple(match s.as_str() {
            "ROUND_ROBIN" | "UNSPECIFIED" => Simple::RoundRobin,
            "LEAST_REQUEST" | "LEAST_CONN" => Simple::LeastRequest,
            "RANDOM" => Simple::Random,
            other => return Err(format!("loadBalancer.simple {other:?} is not supported")),
        } as i32),
        (None, Some(h)) => {
            let mut ttl = 0;
            let key = match (&h.http_header_name, &h.http_cookie, h.use_source_ip, &h.http_query_parameter_name) {
                (Some(name), None, None | Some(false), None) => HashKey::HttpHeaderName(name.to_ascii_lowercase()),
                (None, Some(c), None | Some(false), None) => {
                    ttl = c.ttl.as_deref().map(duration_ms).transpose()?.unwrap_or(0);
                    HashKey::HttpCookie(c.name.clone())
                }
                (None, None, Some(true), None) => HashKey::UseSourceIp(true),
                (None, None, None | Some(false), Some(q)) => HashKey::HttpQueryParameterName(q.clone()),
                _ => return Err("consistentHash needs exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName".into()),
            };
            Lb::ConsistentHash(ConsistentHash {
                key: Some(key),
                cookie_ttl_ms: ttl,
            })
        }
        _ => return Err("loadBalancer needs exactly one of simple, consistentHash".into()),
    };
    Ok(LoadBalancer {
        policy: Some(policy),
    })
}

fn connection_pool(c: &types::ConnectionPool) -> Result<ConnectionPool, String> {
    let mut pool = ConnectionPool::default();
    if let Some(tcp) = &c.tcp {
        pool.max_connections = tcp.max_connections;
        pool.connect_timeout_ms = tcp
            .connect_timeout
            .as_deref()
            .map(duration_ms)
            .transpose()?
            .unwrap_or(0);
        pool.idle_timeout_ms = tcp
            .idle_timeout
            .as_deref()
            .map(duration_ms)
            .transpose()?
            .unwrap_or(0);
    }
    if let Some(http) = &c.http {
        pool.max_pending_requests = http.http1_max_pending_requests;
        pool.max_requests = http.http2_max_requests;
        pool.max_requests_per_connection = http.max_requests_per_connection;
        pool.max_retries = http.max_retries;
        if let Some(idle) = &http.idle_timeout {
            pool.idle_timeout_ms = duration_ms(idle)?;
        }
    }
    Ok(pool)
}

fn outlier(o: &types::OutlierDetection) -> Result<OutlierDetection, String> {
    let ms = |d: &Option<String>, default| d.as_deref().map_or(Ok(default), duration_ms);
    let max = o.max_ejection_percent.unwrap_or(10);
    if max > 100 {
        return Err(format!("maxEjectionPercent {max} is over 100"));
    }
    Ok(OutlierDetection {
        consecutive_5xx_errors: o.consecutive_5xx_errors.unwrap_or(5),
        consecutive_gateway_errors: o.consecutive_gateway_errors.unwrap_or(0),
        interval_ms: ms(&o.interval, 10_000)?,
        base_ejection_time_ms: ms(&o.base_ejection_time, 30_000)?,
        max_ejection_percent: max,
    })
}
