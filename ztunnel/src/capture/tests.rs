use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use super::iptables::{base_rules, hook_rule, hooks, iface_rule, janitor_script, pod_rules, Ports};
use super::plan::{
    desired, diff_ambient, diff_ifaces, local_pods, parse_default_devs, parse_links,
    parse_route_dev, Change, Iface, LocalPod,
};
use super::routing::rule_specs;
use super::{CaptureMode, Role};
use crate::model::{Protocol, Snapshot, Workload};

fn workload(name: &str, node: &str, ips: &[&str], protocol: Protocol) -> Workload {
    Workload {
        uid: format!("Kubernetes//Pod/default/{name}"),
        name: name.to_owned(),
        namespace: "default".to_owned(),
        service_account: name.to_owned(),
        trust_domain: "cluster.local".to_owned(),
        ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        node: node.to_owned(),
        protocol,
        labels: Default::default(),
        authorization_policies: Vec::new(),
        waypoint: None,
    }
}

fn pod(name: &str, ip: [u8; 4], ambient: bool) -> LocalPod {
    LocalPod {
        uid: format!("uid-{name}"),
        name: format!("default/{name}"),
        ip: Ipv4Addr::from(ip),
        ambient,
    }
}

fn iface(ifindex: u32, name: &str) -> Iface {
    Iface {
        ifindex,
        name: name.to_owned(),
    }
}

fn roles(pairs: &[(u32, Role)]) -> BTreeMap<u32, Role> {
    pairs.iter().copied().collect()
}

#[test]
fn local_pods_are_this_nodes_ipv4_workloads_with_enrolment() {
    let snap = Snapshot::new(
        "cluster.local".to_owned(),
        vec![
            workload("a", "node1", &["10.1.0.11", "fd00::11"], Protocol::Hbone),
            workload("b", "node1", &["10.1.0.12"], Protocol::Tcp),
            workload("c", "node2", &["10.2.0.11"], Protocol::Hbone),
        ],
        Vec::new(),
        Default::default(),
        Default::default(),
    );
    let pods = local_pods(&snap, "node1");
    let got: Vec<(String, Ipv4Addr, bool)> = pods
        .into_iter()
        .map(|p| (p.name, p.ip, p.ambient))
        .collect();
    assert_eq!(
        got,
        vec![
            ("default/a".to_owned(), Ipv4Addr::new(10, 1, 0, 11), true),
            ("default/b".to_owned(), Ipv4Addr::new(10, 1, 0, 12), false),
        ]
    );
}

#[test]
fn roles_follow_enrolment_and_uplinks_take_ingress() {
    let placed = vec![
        (pod("a", [10, 1, 0, 11], true), iface(5, "veth1")),
        (pod("b", [10, 1, 0, 12], false), iface(6, "veth2")),
    ];
    let (want, problems) = desired(&placed, &[iface(2, "eth0")]);
    assert!(problems.is_empty(), "{problems:?}");
    let got: Vec<(u32, &str, Role, Vec<String>)> = want
        .iter()
        .map(|(i, w)| (*i, w.name.as_str(), w.role, w.pods.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (2, "eth0", Role::Ingress, vec![]),
            (5, "veth1", Role::AmbientPod, vec!["default/a".to_owned()]),
            (6, "veth2", Role::Ingress, vec!["default/b".to_owned()]),
        ]
    );
}

#[test]
fn shared_or_uplink_interfaces_are_left_out_and_reported() {
    let placed = vec![
        (pod("a", [10, 1, 0, 11], true), iface(7, "cni0")),
        (pod("b", [10, 1, 0, 12], false), iface(7, "cni0")),
        (pod("c", [10, 1, 0, 13], true), iface(2, "eth0")),
        (pod("d", [10, 1, 0, 14], true), iface(8, "cni1")),
        (pod("e", [10, 1, 0, 15], true), iface(8, "cni1")),
    ];
    let (want, problems) = desired(&placed, &[iface(2, "eth0")]);
    assert_eq!(want.keys().copied().collect::<Vec<_>>(), vec![2, 8]);
    assert_eq!(want[&2].role, Role::Ingress);
    assert_eq!(want[&8].role, Role::AmbientPod, "all-ambient share is fine");
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems
        .iter()
        .any(|p| p.contains("default/c") && p.contains("uplink eth0")));
    assert!(problems
        .iter()
        .any(|p| p.contains("cni0") && p.contains("mixed")));
}

#[test]
fn diff_touches_only_what_changed() {
    let current = roles(&[
        (2, Role::Ingress),
        (5, Role::AmbientPod),
        (6, Role::Ingress),
    ]);
    // veth 5's pod left ambient, 6 went away, 9 is a new ambient pod; the uplink stays.
    let wanted = roles(&[
        (2, Role::Ingress),
        (5, Role::Ingress),
        (9, Role::AmbientPod),
    ]);
    assert_eq!(
        diff_ifaces(&current, &wanted),
        vec![
            Change::Detach(5),
            Change::Detach(6),
            Change::Attach(5, Role::Ingress),
            Change::Attach(9, Role::AmbientPod),
        ]
    );
    assert!(diff_ifaces(&wanted, &wanted).is_empty());
}

#[test]
fn ambient_set_diff() {
    let ip = |d: u8| Ipv4Addr::new(10, 1, 0, d);
    let current: BTreeSet<_> = [ip(11), ip(12)].into();
    let wanted: BTreeSet<_> = [ip(12), ip(13)].into();
    assert_eq!(
        diff_ambient(&current, &wanted),
        (vec![ip(11)], vec![ip(13)])
    );
}

#[test]
fn parses_ip_json() {
    let get = r#"[{"dst":"10.1.0.11","dev":"veth1","prefsrc":"10.0.0.11","flags":[],"uid":0,"cache":[]}]"#;
    assert_eq!(parse_route_dev(get).unwrap(), "veth1");
    assert!(parse_route_dev("[]").is_err());
    assert!(parse_route_dev("RTNETLINK answers: Network is unreachable").is_err());

    let links = r#"[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP"]},
                    {"ifindex":5,"ifname":"veth1","link_index":2,"link_netnsid":0}]"#;
    let links = parse_links(links).unwrap();
    assert_eq!((links["lo"], links["veth1"]), (1, 5));
    assert!(parse_links(r#"[{"ifname":"x"}]"#).is_err());

    let one = r#"[{"dst":"default","gateway":"10.0.0.1","dev":"eth0","flags":[]}]"#;
    assert_eq!(parse_default_devs(one).unwrap(), vec!["eth0"]);
    let multipath = r#"[{"dst":"default","flags":[],"nexthops":[
        {"gateway":"10.0.0.1","dev":"eth0","weight":1,"flags":[]},
        {"gateway":"10.0.1.1","dev":"eth1","weight":1,"flags":[]},
        {"gateway":"10.0.0.2","dev":"eth0","weight":1,"flags":[]}]}]"#;
    assert_eq!(parse_default_devs(multipath).unwrap(), vec!["eth0", "eth1"]);
    assert!(parse_default_devs("[]").unwrap().is_empty());
}

#[test]
fn iptables_rules_render() {
    let ports = Ports {
        outbound: 15001,
        inbound_hbone: 15008,
        inbound_plaintext: 15006,
    };
    assert_eq!(
        base_rules(),
        vec![
            "-p tcp -m socket --transparent -j MARK --set-mark 0x1000/0x1000",
            "-m mark --mark 0x1000/0x1000 -j ACCEPT",
        ]
    );
    assert_eq!(
        iface_rule("veth1", Role::AmbientPod, ports),
        "-i veth1 -p tcp -j TPROXY --on-port 15001 --on-ip 0.0.0.0 --tproxy-mark 0x1000/0x1000"
    );
    assert_eq!(
        iface_rule("eth0", Role::Ingress, ports),
        "-i eth0 -j MESH_INGRESS"
    );
    assert_eq!(
        pod_rules(Ipv4Addr::new(10, 1, 0, 11), ports),
        vec![
            "-d 10.1.0.11/32 -p tcp --dport 15008 -j TPROXY --on-port 15008 --on-ip 0.0.0.0 --tproxy-mark 0x1000/0x1000",
            "-d 10.1.0.11/32 -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x1000/0x1000",
        ]
    );
}

#[test]
fn hooks_are_tagged_by_pid_and_found_whoever_installed_them() {
    assert_eq!(
        hook_rule(42),
        "-m comment --comment ztunnel-pid-42 -j MESH_PREROUTING"
    );
    assert!(janitor_script(42)
        .ends_with("-D PREROUTING -m comment --comment ztunnel-pid-42 -j MESH_PREROUTING"));
    let listed = "-P PREROUTING ACCEPT\n\
                  -A PREROUTING -m comment --comment ztunnel-pid-7 -j MESH_PREROUTING\n\
                  -A PREROUTING -j MESH_PREROUTING\n\
                  -A PREROUTING -j OTHER\n";
    assert_eq!(
        hooks(listed),
        vec![
            "-m comment --comment ztunnel-pid-7 -j MESH_PREROUTING",
            "-j MESH_PREROUTING",
        ]
    );
}

#[test]
fn routing_rules_render() {
    assert_eq!(
        rule_specs(0x539, 15008),
        vec![
            "fwmark 0x1000/0x1000 lookup 100",
            "fwmark 0x539 ipproto tcp dport 15008 lookup 101",
        ]
    );
}

#[test]
fn capture_mode_parses_and_prints() {
    for mode in [CaptureMode::None, CaptureMode::Iptables, CaptureMode::Ebpf] {
        assert_eq!(mode.to_string().parse::<CaptureMode>().unwrap(), mode);
    }
    assert!("tproxy".parse::<CaptureMode>().is_err());
    assert!(!CaptureMode::None.is_active());
    assert!(CaptureMode::Iptables.is_active());
}
