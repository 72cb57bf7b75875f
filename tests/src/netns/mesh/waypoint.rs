//! Waypoints in the netns mesh, as a user deploys them in local mode: a pod of the
//! topology named like the waypoint runs the `waypoint` binary, and the manifests hold
//! the `Gateway` (class `istio-waypoint`) and the Service in front of the pod. The pod
//! carries `gateway.networking.k8s.io/gateway-name` and stays outside capture
//! (`istio.io/dataplane-mode: none`): it speaks HBONE itself.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rand::distr::{Alphanumeric, SampleString};

use super::{wait_child, MeshOptions, NetnsMesh, XDS_PORT};
use crate::bench::loopback::{http_status, READINESS_PORT};
use crate::bench::process::{workspace_binary, ChildGuard, Spawn, Stdout};
use crate::netns::topology::{Pod, Topology};

/// The label that names a waypoint pod's Gateway.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Waypoint Service VIPs: the top of `SERVICE_CIDR`, one per waypoint in order.
const WAYPOINT_VIP_BASE: [u8; 3] = [10, 96, 255];
const HBONE_PORT: u16 = 15008;

/// A waypoint's Service VIP (the `i`th waypoint of the options).
fn waypoint_vip(i: usize) -> Ipv4Addr {
    let [a, b, c] = WAYPOINT_VIP_BASE;
    Ipv4Addr::new(a, b, c, 10 + i as u8)
}

/// The Gateway and the Service of every waypoint in `opts` (file name, YAML).
pub(super) fn manifests(topo: &Topology, opts: &MeshOptions) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, name) in opts.waypoints.iter().enumerate() {
        let ns = &topo.pod(name).spec.namespace;
        out.push((
            format!("gateway-{ns}-{name}.yaml"),
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
                 metadata: {{name: {name}, namespace: {ns}}}\n\
                 spec:\n  gatewayClassName: istio-waypoint\n  \
                 listeners: [{{name: mesh, port: {HBONE_PORT}, protocol: HBONE}}]\n"
            ),
        ));
        out.push((
            format!("service-{ns}-{name}.yaml"),
            format!(
                "apiVersion: v1\nkind: Service\n\
                 metadata: {{name: {name}, namespace: {ns}, labels: {{{GATEWAY_NAME_LABEL}: {name}}}}}\n\
                 spec: {{clusterIP: {}, selector: {{{GATEWAY_NAME_LABEL}: {name}}}, \
                 ports: [{{name: mesh, port: {HBONE_PORT}, targetPort: {HBONE_PORT}}}]}}\n",
                waypoint_vip(i)
            ),
        ));
    }
    out
}

/// Labels of pod `pod` when it is one of the waypoints (else `None`).
pub(super) fn pod_labels(pod: &Pod, opts: &MeshOptions) -> Option<Vec<(String, String)>> {
    opts.waypoints.contains(&pod.spec.name).then(|| {
        vec![
            (GATEWAY_NAME_LABEL.to_owned(), pod.spec.name.clone()),
            ("istio.io/dataplane-mode".to_owned(), "none".to_owned()),
        ]
    })
}

/// The token entries (controller side) and token files of the waypoints: each proves
/// its own workload identity, bound to no node.
pub(super) fn tokens(topo: &Topology, opts: &MeshOptions, dir: &Path) -> anyhow::Result<String> {
    let mut yaml = String::new();
    let mut rng = rand::rng();
    for name in &opts.waypoints {
        let token = Alphanumeric.sample_string(&mut rng, 32);
        let identity = super::pod_identity(topo.pod(name));
        yaml.push_str(&format!("- {{token: {token}, identity: '{identity}'}}\n"));
        let path = token_path(dir, name);
        std::fs::write(&path, &token).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(yaml)
}

fn token_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("waypoint-{name}.token"))
}

impl NetnsMesh {
    /// Starts waypoint `name` in its pod and waits until it answers `/healthz/ready`.
    pub(super) fn start_waypoint(&self, name: &str) -> anyhow::Result<ChildGuard> {
        let pod = self.topo.pod(name);
        let xds = format!("http://{}:{XDS_PORT}", self.topo.fabric.ip);
        let args = [
            "--name",
            &format!("{}/{name}", pod.spec.namespace),
            "--service-account",
            &pod.spec.service_account,
            "--xds-address",
            &xds,
            "--token-file",
            &token_path(&self.dir, name).display().to_string(),
            "--listen-ip",
            &pod.ip.to_string(),
        ];
        let spec = Spawn {
            name: format!("waypoint {name}"),
            program: workspace_binary("waypoint", "WAYPOINT_BIN"),
            args: args.map(String::from).to_vec(),
            env: vec![("RUST_LOG".into(), self.opts.log.clone())],
            stdout: Stdout::File(self.dir.join(format!("waypoint-{name}.access.log"))),
            stderr: self.dir.join(format!("waypoint-{name}.log")),
            nofile: 65536,
        };
        let mut child = pod.spawn(&spec);
        let ready = SocketAddr::new(IpAddr::V4(pod.ip), READINESS_PORT);
        wait_child(&mut child, self.opts.ready_timeout, || {
            pod.block_on(http_status(ready, "/healthz/ready"))
                .is_ok_and(|code| code == 200)
        })?;
        Ok(child)
    }

    /// The access log (one JSON line per request) of waypoint `name` so far.
    pub fn waypoint_access_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("waypoint-{name}.access.log")))
            .unwrap_or_default()
    }

    /// Requests the waypoints have logged so far, all waypoints together.
    pub fn waypoint_requests(&self) -> usize {
        (self.opts.waypoints.iter())
            .map(|name| self.waypoint_access_log(name).lines().count())
            .sum()
    }

    /// The first waypoint's process id, while it runs.
    pub fn waypoint_pid(&mut self) -> Option<u32> {
        let first = self.waypoints.first_mut()?;
        first.exited().is_none().then(|| first.pid())
    }
}
