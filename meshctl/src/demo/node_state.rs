//! What each ztunnel says it got from the controller, read from its admin `/config_dump`:
//! the xDS client's status (connected, types synced, resources held) and the certificates
//! it holds.
//!
//! Read leniently, like `meshctl ztunnel-config`: a missing or renamed field shows as
//! absent and fails the check that needs it, never the whole demo.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde_json::Value;

/// One ztunnel's view of the control plane.
#[derive(Debug, Clone, Default)]
pub struct NodeState {
    /// `None` when the dump has no `xds` section (not run against a controller).
    pub xds: Option<Xds>,
    pub certificates: Vec<Certificate>,
    /// Why the dump could not be read.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Xds {
    pub connected: bool,
    /// Type URLs accepted at least once.
    pub synced: Vec<String>,
    /// Resources held, by type URL.
    pub held: BTreeMap<String, usize>,
    pub acks: u64,
    pub nacks: u64,
    pub connects: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Certificate {
    pub identity: String,
    /// Unix seconds.
    pub not_after: Option<i64>,
}

pub async fn read(admin: SocketAddr) -> NodeState {
    match crate::ztunnel_config::fetch_dump(&format!("http://{admin}")).await {
        Ok(dump) => parse(&dump),
        Err(e) => NodeState {
            error: Some(format!("{e:#}")),
            ..NodeState::default()
        },
    }
}

pub fn parse(dump: &Value) -> NodeState {
    let certificates = dump
        .get("certificates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| {
            Some(Certificate {
                identity: c.get("identity")?.as_str()?.to_owned(),
                not_after: field(c, "not_after", "notAfter").and_then(Value::as_i64),
            })
        })
        .collect();
    NodeState {
        xds: dump.get("xds").filter(|x| x.is_object()).map(xds),
        certificates,
        error: None,
    }
}

fn xds(x: &Value) -> Xds {
    let count = |key| x.get(key).and_then(Value::as_u64).unwrap_or(0);
    let synced = x
        .get("synced")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    let versions = x
        .get("versions")
        .and_then(Value::as_object)
        .into_iter()
        .flatten();
    let held = versions.map(|(ty, names)| {
        let n = names.as_object().map_or(0, |m| m.len());
        (ty.clone(), n)
    });
    let last_error = field(x, "last_error", "lastError").and_then(Value::as_str);
    Xds {
        connected: x.get("connected").and_then(Value::as_bool) == Some(true),
        synced: synced.filter_map(Value::as_str).map(String::from).collect(),
        held: held.collect(),
        acks: count("acks"),
        nacks: count("nacks"),
        connects: count("connects"),
        last_error: last_error.map(String::from),
    }
}

fn field<'a>(v: &'a Value, snake: &str, camel: &str) -> Option<&'a Value> {
    v.get(snake).or_else(|| v.get(camel))
}

/// `type.googleapis.com/istio.workload.Address` -> `Address`
pub fn short_type(type_url: &str) -> &str {
    type_url.rsplit(['.', '/']).next().unwrap_or(type_url)
}

impl NodeState {
    pub fn held(&self, type_url: &str) -> usize {
        let held = self.xds.as_ref().and_then(|x| x.held.get(type_url));
        held.copied().unwrap_or(0)
    }

    pub fn synced(&self, type_url: &str) -> bool {
        self.xds
            .as_ref()
            .is_some_and(|x| x.synced.iter().any(|t| t == type_url))
    }

    pub fn has_certificate(&self, identity: &str) -> bool {
        self.certificates.iter().any(|c| c.identity == identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::proto::type_url::{ADDRESS, AUTHORIZATION};

    #[test]
    fn reads_xds_status_and_certificates() {
        let dump = serde_json::json!({
            "config": {},
            "certificates": [{"identity": "spiffe://cluster.local/ns/default/sa/echo",
                              "not_before": 1, "not_after": 86401, "refresh_at": 43201}],
            "xds": {"connected": true, "synced": [ADDRESS, AUTHORIZATION], "acks": 3,
                    "nacks": 0, "connects": 1, "last_error": null,
                    "versions": {ADDRESS: {"a": "1", "b": "2"}, AUTHORIZATION: {}}}
        });
        let state = parse(&dump);
        let xds = state.xds.as_ref().unwrap();
        assert!(xds.connected && state.synced(ADDRESS) && state.synced(AUTHORIZATION));
        assert_eq!((state.held(ADDRESS), state.held(AUTHORIZATION)), (2, 0));
        assert_eq!((xds.acks, xds.last_error.as_deref()), (3, None));
        assert!(state.has_certificate("spiffe://cluster.local/ns/default/sa/echo"));
        assert_eq!(state.certificates[0].not_after, Some(86401));
    }

    #[test]
    fn a_local_mode_dump_has_no_xds() {
        let state = parse(&serde_json::json!({"certificates": []}));
        assert!(state.xds.is_none() && !state.synced(ADDRESS));
        assert_eq!(short_type(ADDRESS), "Address");
        assert_eq!(short_type(AUTHORIZATION), "Authorization");
    }
}
