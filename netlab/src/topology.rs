//! A small cluster as network namespaces: a fabric (the network between nodes, a Linux
//! bridge, and a place for the controller), nodes on it, and pods on the nodes joined by
//! point-to-point veth pairs the way kindnet and Calico wire them.
//!
//! Addressing plan (node `i` and pod `j` count from 1 in the order given):
//! - fabric: bridge `br0` in the fabric namespace carries 10.0.0.0/24; the fabric itself
//!   is 10.0.0.1 (`FABRIC_IP`, where a controller listens) and routes each node's pod CIDR
//!   to that node;
//! - node `i`: uplink `eth0` = 10.0.0.(10+i)/24 (its far end `n<i>` is a bridge port),
//!   default route via 10.0.0.1, pod CIDR 10.i.0.0/24, the other nodes' pod CIDRs routed via
//!   their node IPs, `ip_forward` on;
//! - pod `j` of node `i`: `eth0` = 10.i.0.(10+j)/32, default route via the link-local
//!   gateway 169.254.1.1 which the node answers by proxy ARP on its end `veth<j>`; the
//!   node routes `10.i.0.(10+j)/32 dev veth<j>`.
//!
//! Nothing leaves these namespaces: none is linked to the namespace the test started in,
//! and the fabric has no default route. This module wires namespaces; it must not start
//! mesh components (`mesh.rs` does).

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::ops::Deref;
use std::path::PathBuf;

use super::names::{fresh_stem, sweep_leftovers};
use super::ns::{Netns, HOSTS};

/// The fabric's own address (on its bridge): where a controller serves the nodes.
pub const FABRIC_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The pods' default gateway, answered by proxy ARP on the node's end of each pod's veth.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Node `i`'s uplink address (1-based).
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, 10 + octet(i))
}

/// Node `i`'s pod CIDR, e.g. "10.1.0.0/24".
pub fn pod_cidr(i: usize) -> String {
    format!("10.{}.0.0/24", octet(i))
}

/// Pod `j` of node `i` (both 1-based).
pub fn pod_ip(i: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, octet(i), 0, 10 + octet(j))
}

fn octet(n: usize) -> u8 {
    assert!(
        (1..=200).contains(&n),
        "topology sizes are 1..=200, got {n}"
    );
    n as u8
}

/// A pod to create. The Kubernetes fields are for the mesh's manifests; the wiring uses
/// only `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// Unique within its node; also the Pod's name in the manifests.
    pub name: String,
    /// The Kubernetes namespace (default "default").
    pub namespace: String,
    /// Default: the pod's name.
    pub service_account: String,
    /// Default: `app: <name>`.
    pub labels: Vec<(String, String)>,
    /// Whether the pod is in the mesh (false adds `istio.io/dataplane-mode: none`).
    pub ambient: bool,
}

impl PodSpec {
    pub fn new(name: &str) -> PodSpec {
        PodSpec {
            name: name.to_owned(),
            namespace: "default".to_owned(),
            service_account: name.to_owned(),
            labels: vec![("app".to_owned(), name.to_owned())],
            ambient: true,
        }
    }

    pub fn namespace(mut self, namespace: &str) -> PodSpec {
        namespace.clone_into(&mut self.namespace);
        self
    }

    pub fn service_account(mut self, sa: &str) -> PodSpec {
        sa.clone_into(&mut self.service_account);
        self
    }

    /// Adds a label, replacing one with the same key.
    pub fn label(mut self, key: &str, value: &str) -> PodSpec {
        self.labels.retain(|(k, _)| k != key);
        self.labels.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Keeps the pod out of the mesh.
    pub fn not_ambient(mut self) -> PodSpec {
        self.ambient = false;
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub pods: Vec<PodSpec>,
}

impl NodeSpec {
    pub fn new(name: &str, pods: impl IntoIterator<Item = PodSpec>) -> NodeSpec {
        NodeSpec {
            name: name.to_owned(),
            pods: pods.into_iter().collect(),
        }
    }
}

/// The namespace between the nodes.
#[derive(Debug)]
pub struct Fabric {
    pub ns: Netns,
    pub ip: Ipv4Addr,
}

#[derive(Debug)]
pub struct Node {
    // Pods first: fields drop in order, so pods go before the node they hang off.
    pub pods: Vec<Pod>,
    pub name: String,
    pub ip: Ipv4Addr,
    pub pod_cidr: String,
    pub ns: Netns,
}

#[derive(Debug)]
pub struct Pod {
    pub spec: PodSpec,
    pub ip: Ipv4Addr,
    pub node: String,
    /// The node-side end of the pod's veth pair (in the node's namespace).
    pub node_veth: String,
    pub ns: Netns,
}

/// Deleted on drop (pods, then nodes, then the fabric); the work directory with the
/// processes' logs is kept when dropped during a panic, and its path printed.
#[derive(Debug)]
pub struct Topology {
    pub nodes: Vec<Node>,
    pub fabric: Fabric,
    /// Per-topology scratch space: logs, manifests, tokens.
    pub work_dir: PathBuf,
}

impl Topology {
    /// Sweeps leftovers of killed runs, then creates the namespaces and links. Panics
    /// (after deleting what it made) when a name repeats or a command fails.
    pub fn build(nodes: &[NodeSpec]) -> Topology {
        sweep_leftovers();
        check_names(nodes);
        let stem = fresh_stem();
        let work_dir = std::env::temp_dir().join(format!("{stem}-work"));
        std::fs::create_dir_all(&work_dir)
            .unwrap_or_else(|e| panic!("creating {}: {e}", work_dir.display()));
        let mut topo = Topology {
            nodes: Vec::new(),
            fabric: fabric(&stem),
            work_dir,
        };
        for (i, spec) in nodes.iter().enumerate() {
            let node = node(&stem, &topo.fabric, i + 1, nodes.len(), spec);
            topo.fabric
                .ns
                .ip(&format!("route add {} via {}", node.pod_cidr, node.ip));
            topo.nodes.push(node);
        }
        topo.write_hosts();
        topo
    }

    /// Every namespace resolves the names of the fabric, the nodes and the pods.
    fn write_hosts(&self) {
        let mut hosts = format!("{HOSTS}{} fabric\n", self.fabric.ip);
        for node in &self.nodes {
            let _ = writeln!(hosts, "{} {}", node.ip, node.name);
            for pod in &node.pods {
                let _ = writeln!(hosts, "{} {}", pod.ip, pod.spec.name);
            }
        }
        self.fabric.write_etc("hosts", &hosts);
        for node in &self.nodes {
            node.write_etc("hosts", &hosts);
            for pod in &node.pods {
                pod.write_etc("hosts", &hosts);
            }
        }
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The pod named `name` (on whichever node).
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods()
            .find(|p| p.spec.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.nodes.iter().flat_map(|n| n.pods.iter())
    }

    /// Every namespace's name, fabric first.
    pub fn netns_names(&self) -> Vec<String> {
        let mut names = vec![self.fabric.ns.name().to_owned()];
        for node in &self.nodes {
            names.push(node.ns.name().to_owned());
            names.extend(node.pods.iter().map(|p| p.ns.name().to_owned()));
        }
        names
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("netns topology: logs kept in {}", self.work_dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.work_dir);
        }
    }
}

/// Namespace names are `<stem>-<node>` and `<stem>-<node>-<pod>`: all must differ from
/// each other and from `<stem>-fabric`.
fn check_names(nodes: &[NodeSpec]) {
    let mut seen = std::collections::HashSet::from(["fabric".to_owned()]);
    for node in nodes {
        let roles = std::iter::once(node.name.clone()).chain(
            node.pods
                .iter()
                .map(|p| format!("{}-{}", node.name, p.name)),
        );
        for role in roles {
            assert!(seen.insert(role.clone()), "namespace name {role:?} repeats");
        }
    }
}

fn fabric(stem: &str) -> Fabric {
    let ns = Netns::create(&format!("{stem}-fabric"));
    ns.ip("link add br0 type bridge");
    ns.ip(&format!("addr add {FABRIC_IP}/24 dev br0"));
    ns.ip("link set br0 up");
    Fabric { ns, ip: FABRIC_IP }
}

/// Node `i` of `count`, with its uplink into the fabric's bridge and its pods.
fn node(stem: &str, fabric: &Fabric, i: usize, count: usize, spec: &NodeSpec) -> Node {
    let ns = Netns::create(&format!("{stem}-{}", spec.name));
    let mut node = Node {
        pods: Vec::new(),
        name: spec.name.clone(),
        ip: node_ip(i),
        pod_cidr: pod_cidr(i),
        ns,
    };
    let port = format!("n{i}");
    fabric.ns.ip(&format!(
        "link add {port} type veth peer name eth0 netns {}",
        node.ns.name()
    ));
    fabric.ns.ip(&format!("link set {port} master br0 up"));
    node.ns.ip(&format!("addr add {}/24 dev eth0", node.ip));
    node.ns.ip("link set eth0 up");
    node.ns.ip(&format!("route add default via {}", fabric.ip));
    for k in (1..=count).filter(|&k| k != i) {
        node.ns
            .ip(&format!("route add {} via {}", pod_cidr(k), node_ip(k)));
    }
    node.ns.sysctl("net.ipv4.ip_forward", "1");
    for (j, pod_spec) in spec.pods.iter().enumerate() {
        let pod = pod(stem, &node, pod_ip(i, j + 1), j + 1, pod_spec);
        node.pods.push(pod);
    }
    node
}

/// Pod `j` on `node`: its own namespace, `eth0` with a /32, and a routed veth to the node.
fn pod(stem: &str, node: &Node, ip: Ipv4Addr, j: usize, spec: &PodSpec) -> Pod {
    let ns = Netns::create(&format!("{stem}-{}-{}", node.name, spec.name));
    let veth = format!("veth{j}");
    node.ns.ip(&format!(
        "link add {veth} type veth peer name eth0 netns {}",
        ns.name()
    ));
    // Answer the pods' ARP for the link-local gateway at once (the default delays
    // proxy replies by up to 0.8 s).
    node.ns
        .sysctl(&format!("net.ipv4.conf.{veth}.proxy_arp"), "1");
    node.ns
        .sysctl(&format!("net.ipv4.neigh.{veth}.proxy_delay"), "0");
    node.ns.ip(&format!("link set {veth} up"));
    node.ns.ip(&format!("route add {ip}/32 dev {veth}"));
    ns.ip(&format!("addr add {ip}/32 dev eth0"));
    ns.ip("link set eth0 up");
    ns.ip(&format!("route add {POD_GATEWAY} dev eth0 scope link"));
    ns.ip(&format!("route add default via {POD_GATEWAY} dev eth0"));
    Pod {
        spec: spec.clone(),
        ip,
        node: node.name.clone(),
        node_veth: veth,
        ns,
    }
}

impl Deref for Fabric {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.ns
    }
}

impl Deref for Node {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.ns
    }
}

impl Deref for Pod {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.ns
    }
}
