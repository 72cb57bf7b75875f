//! Load-balancing choices over the candidate endpoints of one cluster.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rand::Rng;

use super::EndpointState;
use crate::backend::Endpoint;
use crate::config::{HashKey, LoadBalancer};

/// The request's consistent-hash key, hashed; `None` when the request lacks it (then
/// the choice is random, as Envoy's).
#[derive(Default)]
pub struct HashInput(pub Option<u64>);

impl HashInput {
    pub fn of(lb: &LoadBalancer, req: &http::request::Parts, peer: SocketAddr) -> HashInput {
        let LoadBalancer::ConsistentHash(key) = lb else {
            return HashInput(None);
        };
        let value: Option<String> = match key {
            HashKey::Header(name) => req
                .headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            HashKey::Cookie { name, .. } => cookie(&req.headers, name),
            HashKey::SourceIp => Some(peer.ip().to_string()),
            HashKey::QueryParameter(name) => super::super::route::query_param(&req.uri, name),
        };
        HashInput(value.map(|v| hash(&v)))
    }
}

fn cookie(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn hash<T: Hash + ?Sized>(v: &T) -> u64 {
    // Fixed keys: every waypoint replica must map a key to the same endpoint.
    let mut h = std::hash::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// Index into `all` of the chosen endpoint, among `candidates`.
pub fn choose(
    lb: &LoadBalancer,
    rr: &AtomicUsize,
    all: &[Arc<Endpoint>],
    states: &[Arc<EndpointState>],
    candidates: &[usize],
    input: &HashInput,
) -> Option<usize> {
    let n = candidates.len();
    if n == 0 {
        return None;
    }
    let random = || candidates[rand::rng().random_range(0..n)];
    Some(match (lb, input.0) {
        (LoadBalancer::RoundRobin, _) => candidates[rr.fetch_add(1, Ordering::Relaxed) % n],
        (LoadBalancer::Random, _) | (LoadBalancer::ConsistentHash(_), None) => random(),
        (LoadBalancer::LeastRequest, _) => {
            // Power of two choices: near-least-loaded without scanning every endpoint.
            let (a, b) = (random(), random());
            let load = |i: usize| states[i].active.load(Ordering::Relaxed);
            if load(b) < load(a) {
                b
            } else {
                a
            }
        }
        (LoadBalancer::ConsistentHash(_), Some(key)) => {
            // Rendezvous hashing: stable per key, and only keys of a removed endpoint move.
            *candidates
                .iter()
                .max_by_key(|&&i| hash(&(key, all[i].uid.as_str())))?
        }
    })
}
