//! The pure half of the capture manager: which pods are on this node, which role each
//! interface should have, what to change to get there, and reading `ip -j` output. No
//! side effects here, so all of it is unit-tested.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use serde::Serialize;
use serde_json::Value;

use super::Role;
use crate::model::{Protocol, Snapshot};

/// A pod scheduled on this node, as capture sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LocalPod {
    pub uid: String,
    /// `namespace/name`, for logs and the dump.
    pub name: String,
    pub ip: Ipv4Addr,
    pub ambient: bool,
}

/// Every IPv4 address of every workload on `node`; ambient means HBONE. (IPv6 is not
/// captured yet.)
pub fn local_pods(snap: &Snapshot, node: &str) -> Vec<LocalPod> {
    let mut pods: Vec<LocalPod> = snap
        .local_workloads(node)
        .flat_map(|w| {
            w.ips.iter().filter_map(move |ip| match ip {
                IpAddr::V4(ip) => Some(LocalPod {
                    uid: w.uid.clone(),
                    name: format!("{}/{}", w.namespace, w.name),
                    ip: *ip,
                    ambient: w.protocol == Protocol::Hbone,
                }),
                IpAddr::V6(_) => None,
            })
        })
        .collect();
    pods.sort();
    pods
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Iface {
    pub ifindex: u32,
    pub name: String,
}

/// An interface as it should be attached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Wanted {
    pub name: String,
    pub role: Role,
    /// The pods behind it (`namespace/name`); empty for an uplink.
    pub pods: Vec<String>,
}

/// The role of each interface: uplinks take `Ingress`; a pod's veth takes `AmbientPod`
/// when every pod behind it is ambient and `Ingress` when none is (so a non-ambient pod's
/// connections to local ambient pods are captured as inbound). A veth shared by both
/// kinds (a bridge CNI), or a pod routed through an uplink, cannot be captured without
/// taking other pods' traffic: it is left out and reported.
pub fn desired(
    pods: &[(LocalPod, Iface)],
    uplinks: &[Iface],
) -> (BTreeMap<u32, Wanted>, Vec<String>) {
    let mut want: BTreeMap<u32, Wanted> = uplinks
        .iter()
        .map(|u| (u.ifindex, wanted(&u.name, Role::Ingress)))
        .collect();
    let mut problems = Vec::new();
    let mut by_iface: BTreeMap<&Iface, Vec<&LocalPod>> = BTreeMap::new();
    for (pod, iface) in pods {
        by_iface.entry(iface).or_default().push(pod);
    }
    for (iface, pods) in by_iface {
        let names: Vec<String> = pods.iter().map(|p| p.name.clone()).collect();
        if want.contains_key(&iface.ifindex) {
            problems.push(format!(
                "{} routed through uplink {}: not a point-to-point CNI; not captured",
                names.join(", "),
                iface.name
            ));
            continue;
        }
        let ambient = pods.iter().filter(|p| p.ambient).count();
        let role = match ambient {
            0 => Role::Ingress,
            n if n == pods.len() => Role::AmbientPod,
            _ => {
                problems.push(format!(
                    "{} share interface {} with mixed enrolment; not captured",
                    names.join(", "),
                    iface.name
                ));
                continue;
            }
        };
        let mut w = wanted(&iface.name, role);
        w.pods = names;
        want.insert(iface.ifindex, w);
    }
    (want, problems)
}

fn wanted(name: &str, role: Role) -> Wanted {
    Wanted {
        name: name.to_owned(),
        role,
        pods: Vec::new(),
    }
}

/// One step toward the wanted attachments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Detach(u32),
    Attach(u32, Role),
}

/// Detaches first (gone, or changing role), then attaches; interfaces whose role stays
/// are not touched, so their pods' connections never notice.
pub fn diff_ifaces(current: &BTreeMap<u32, Role>, wanted: &BTreeMap<u32, Role>) -> Vec<Change> {
    let detach = current
        .iter()
        .filter(|(i, r)| wanted.get(i) != Some(r))
        .map(|(i, _)| Change::Detach(*i));
    let attach = wanted
        .iter()
        .filter(|(i, r)| current.get(i) != Some(r))
        .map(|(i, r)| Change::Attach(*i, *r));
    detach.chain(attach).collect()
}

/// (addresses leaving, addresses joining) the local ambient set.
pub fn diff_ambient(
    current: &BTreeSet<Ipv4Addr>,
    wanted: &BTreeSet<Ipv4Addr>,
) -> (Vec<Ipv4Addr>, Vec<Ipv4Addr>) {
    (
        current.difference(wanted).copied().collect(),
        wanted.difference(current).copied().collect(),
    )
}

fn parse_array(json: &str) -> Result<Vec<Value>, String> {
    match serde_json::from_str(json) {
        Ok(Value::Array(items)) => Ok(items),
        Ok(_) => Err("expected a JSON array".to_owned()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// The `dev` of `ip -j route get <ip>`.
pub fn parse_route_dev(json: &str) -> Result<String, String> {
    let routes = parse_array(json)?;
    routes
        .first()
        .and_then(|r| r.get("dev"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| "no route with a dev".to_owned())
}

/// name -> ifindex from `ip -j link show`.
pub fn parse_links(json: &str) -> Result<HashMap<String, u32>, String> {
    let links = parse_array(json)?;
    links
        .iter()
        .map(|l| {
            let name = l.get("ifname").and_then(Value::as_str);
            let index = l.get("ifindex").and_then(Value::as_u64);
            match (name, index.and_then(|i| u32::try_from(i).ok())) {
                (Some(n), Some(i)) => Ok((n.to_owned(), i)),
                _ => Err(format!("link without ifname/ifindex: {l}")),
            }
        })
        .collect()
}

/// The interfaces of `ip -j route show default`: each route's `dev`, or its nexthops'
/// for a multipath route; each once, in order.
pub fn parse_default_devs(json: &str) -> Result<Vec<String>, String> {
    let routes = parse_array(json)?;
    let mut devs: Vec<String> = Vec::new();
    for r in &routes {
        let hops = match r.get("nexthops").and_then(Value::as_array) {
            Some(hops) => hops.iter().collect(),
            None => vec![r],
        };
        for dev in hops
            .iter()
            .filter_map(|h| h.get("dev").and_then(Value::as_str))
        {
            if !devs.iter().any(|d| d == dev) {
                devs.push(dev.to_owned());
            }
        }
    }
    Ok(devs)
}
