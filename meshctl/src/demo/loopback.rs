//! The demo on loopback, for machines without root: the controller, both ztunnels and the
//! echo servers on 127.0.0.0/8 addresses, clients through node1's SOCKS5 port (binding
//! their workload IPs), since nothing can capture their traffic here.
//!
//! The manifests carry the network-namespace demo's pod addresses (10.i.0.x, VIPs in
//! 10.96.0.0/16); the controller gets a copy with each 10.a.b.c moved to 127.a.b.c. This
//! module must not judge the traffic: `report` and `check` do, as for the other demo.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use anyhow::{bail, Result};
use mesh_core::identity::DEFAULT_TRUST_DOMAIN;
use serde::Deserialize;
use serde_yaml::Value;

use super::access_log::AccessLogs;
use super::check::Check;
use super::control_plane::{self, LOOPBACK_IP};
use super::mesh::{self, Mesh, NODE1};
use super::topology::Topology;
use super::traffic::{self, Dialer};
use super::workdir::WorkDir;
use super::workloads::EchoServers;
use super::{
    finish, interrupted, node_workloads, print_controller_diagnostics, report, start_control_plane,
    write_inputs, Binaries, NODES, READY_TIMEOUT,
};

pub async fn run(bins: &Binaries, work: &WorkDir, show_logs: bool) -> Result<Vec<Check>> {
    println!(
        "meshctl demo --loopback: a two-node ambient mesh on loopback, run by its controller \
         (examples/mesh)"
    );
    println!("  controller binary: {}", bins.controller.display());
    println!("  ztunnel binary: {}", bins.ztunnel.display());
    // Dropping the demo future on Ctrl-C kills the controller and the ztunnels
    // (kill_on_drop) and the echo servers; the caller removes the work dir afterwards.
    tokio::select! {
        r = demo(bins, work, show_logs) => r,
        () = interrupted() => Err(anyhow::anyhow!("interrupted by Ctrl-C")),
    }
}

async fn demo(bins: &Binaries, work: &WorkDir, show_logs: bool) -> Result<Vec<Check>> {
    let inputs = write_inputs(work, to_loopback)?;
    let topo = Topology::load(&inputs.config_dir, DEFAULT_TRUST_DOMAIN)?;
    println!(
        "  work dir {}: the manifests (mesh/, addresses moved to loopback), random ztunnel \
         tokens, the controller's state (a fresh root CA for {}), stderr logs",
        work.path().display(),
        topo.trust_domain
    );
    let controller_addrs = [
        control_plane::grpc_addr(LOOPBACK_IP),
        control_plane::grpc_tls_addr(LOOPBACK_IP),
        control_plane::metrics_addr(LOOPBACK_IP),
    ];
    mesh::ensure_free(&NODES, &topo.mesh_ips(), &controller_addrs)?;
    let _servers = start_servers(&topo).await?;
    let mut cp = start_control_plane(&bins.controller, &inputs, work.path(), LOOPBACK_IP).await?;
    let logs = Arc::new(AccessLogs::new());
    let ztunnel_inputs = mesh::Inputs {
        xds_address: format!("http://{}", control_plane::grpc_addr(LOOPBACK_IP)),
        tokens: inputs.node_tokens.clone(),
        netns: Vec::new(),
        capture: None,
    };
    let mut mesh = match Mesh::start(&bins.ztunnel, &NODES, &ztunnel_inputs, work.path(), &logs) {
        Ok(mesh) => mesh,
        Err(e) => {
            print_controller_diagnostics(&mut cp);
            return Err(e);
        }
    };
    for node in NODES {
        let pid = mesh.pid(node.name).map_or("?".into(), |p| p.to_string());
        let workloads = node_workloads(&topo, node.name);
        println!(
            "  started ztunnel {} on {} (pid {pid}) for {workloads}",
            node.name, node.ip
        );
    }
    let result = exercise(&mut mesh, &cp, &topo, &logs).await;
    finish(&result, mesh, cp, &logs, show_logs).await;
    result
}

async fn exercise(
    mesh: &mut Mesh,
    cp: &control_plane::ControlPlane,
    topo: &Topology,
    logs: &AccessLogs,
) -> Result<Vec<Check>> {
    let took = mesh.wait_ready(READY_TIMEOUT).await?;
    println!(
        "  both ztunnels ready after {:.1}s (config synced from the controller over delta ADS)",
        took.as_secs_f64()
    );
    let plan = traffic::plan(topo)?;
    println!(
        "\nTraffic through node1's SOCKS5 port {} (each client binds its workload IP):",
        NODE1.socks()
    );
    let conns = traffic::run(plan, Dialer::Socks5(NODE1.socks()), logs).await;
    Ok(report(&conns, &NODES, cp, topo).await)
}

/// The destination workloads: in-process echo servers on their workload IPs.
async fn start_servers(topo: &Topology) -> Result<EchoServers> {
    let servers = traffic::servers(topo)?;
    let running = EchoServers::start(&servers).await?;
    let listed: Vec<String> = servers.iter().map(|(n, a)| format!("{n} {a}")).collect();
    println!(
        "  echo servers (greet with their name, then echo): {}",
        listed.join(", ")
    );
    Ok(running)
}

/// The manifests with every pod IP and cluster IP in 10.0.0.0/8 moved to 127.0.0.0/8 (same
/// last three octets), as YAML again (comments are not kept).
fn to_loopback(text: &str) -> Result<String> {
    let mut out = String::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let mut value = Value::deserialize(doc)?;
        for path in [["status", "podIP"], ["spec", "clusterIP"]] {
            if let Some(field) = value.get_mut(path[0]).and_then(|v| v.get_mut(path[1])) {
                *field = Value::String(loopback_ip(field.as_str().unwrap_or_default())?);
            }
        }
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&serde_yaml::to_string(&value)?);
    }
    Ok(out)
}

fn loopback_ip(ip: &str) -> Result<String> {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) if v4.octets()[0] == 10 => {
            let [_, b, c, d] = v4.octets();
            Ok(Ipv4Addr::new(127, b, c, d).to_string())
        }
        _ => bail!("address {ip:?} is not in 10.0.0.0/8, where the demo's pods and VIPs live"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::MANIFESTS;
    use super::*;

    #[test]
    fn moves_pod_and_service_addresses_to_loopback() {
        let work = WorkDir::create().unwrap();
        for (name, text) in MANIFESTS {
            work.write(name, &to_loopback(text).unwrap(), 0o644)
                .unwrap();
        }
        let topo = Topology::load(work.path(), "cluster.local").unwrap();
        let echo = topo.service("echo").unwrap();
        assert_eq!(echo.vip().unwrap(), "127.96.0.10:80".parse().unwrap());
        assert_eq!(
            topo.workload("echo-v1").unwrap().ip().unwrap(),
            "127.2.0.11".parse::<IpAddr>().unwrap()
        );
        assert!(loopback_ip("192.168.1.1").is_err());
        assert!(loopback_ip("not an address").is_err());
    }
}
