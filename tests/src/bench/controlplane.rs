//! `mesh-bench controlplane`: the controller serving a large mesh to many proxies.
//!
//! A generated local-mode directory (pods with `spec.nodeName` and `status.podIP`,
//! services with selectors and cluster IPs, ambient namespaces, one namespace-wide
//! AuthorizationPolicy each; a few hundred files) is served by the controller, built with
//! `controller::app::build` in a child process (this binary, hidden subcommand
//! `controlplane-controller`) so that its resident memory is its own. Raw delta-ADS clients
//! (one gRPC connection each, over loopback) subscribe wildcard to Address and
//! Authorization and ACK every response with its nonce.
//!
//! Measured: initial sync per client (stream open -> every resource received and ACKed,
//! all clients at once, as after a controller restart), the time from one pod change (a
//! rewritten file, picked up by the controller's directory poller) to every client's ACK
//! of it, the controller's memory, and the bytes of one full push.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use fnv::FnvHashSet;
use mesh_core::control_plane::ControlPlane;
use mesh_core::proto::envoy::config::core::v3::Node;
use mesh_core::proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use mesh_core::proto::type_url::{ADDRESS, AUTHORIZATION};
use prost::Message as _;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::process::{ChildGuard, Spawn, Stdout};
use super::report::{self, fixed, Table};
use super::rss::{cpu_seconds, kib_to_mib, vm_hwm_kib, vm_rss_kib};
use super::stats::Latencies;

/// Services per generated file (each with its pods).
const SERVICES_PER_FILE: usize = 5;
/// How long any one phase may take before the run counts as stuck.
const STUCK: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, clap::Args)]
pub struct ControlPlaneArgs {
    /// CI sizes: 1,000 pods in 100 services, 10 clients, 10 changes.
    #[arg(long)]
    pub quick: bool,
    /// Pods [default: 10000, or 1000 with --quick].
    #[arg(long)]
    pub pods: Option<usize>,
    /// Pods per service.
    #[arg(long, default_value_t = 10)]
    pub pods_per_service: usize,
    #[arg(long, default_value_t = 20)]
    pub namespaces: usize,
    #[arg(long, default_value_t = 100)]
    pub nodes: usize,
    /// Connected delta-ADS clients [default: 100, or 10 with --quick].
    #[arg(long)]
    pub clients: Option<usize>,
    /// Pod changes timed one after the other [default: 30, or 10 with --quick].
    #[arg(long)]
    pub changes: Option<usize>,
    /// The controller's directory poll interval, in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub config_poll_ms: u64,
}

/// What one run generates and measures.
#[derive(Debug, Clone, Copy)]
struct Plan {
    pods: usize,
    pods_per_service: usize,
    namespaces: usize,
    nodes: usize,
    clients: usize,
    changes: usize,
    poll: Duration,
}

impl Plan {
    fn from_args(a: &ControlPlaneArgs) -> anyhow::Result<Plan> {
        let pick = |v: Option<usize>, full, quick| v.unwrap_or(if a.quick { quick } else { full });
        let plan = Plan {
            pods: pick(a.pods, 10_000, 1_000),
            pods_per_service: a.pods_per_service,
            namespaces: a.namespaces,
            nodes: a.nodes,
            clients: pick(a.clients, 100, 10),
            changes: pick(a.changes, 30, 10),
            poll: Duration::from_millis(a.config_poll_ms),
        };
        if plan.pods_per_service == 0 || !plan.pods.is_multiple_of(plan.pods_per_service) {
            bail!("--pods must be a multiple of --pods-per-service");
        }
        if plan.namespaces == 0 || !plan.services().is_multiple_of(plan.namespaces) {
            bail!(
                "{} services cannot be spread evenly over {} namespaces",
                plan.services(),
                plan.namespaces
            );
        }
        if plan.clients == 0 || plan.nodes == 0 || plan.pods > 1 << 20 {
            bail!("need at least one client and one node, and at most 2^20 pods");
        }
        Ok(plan)
    }

    fn services(&self) -> usize {
        self.pods / self.pods_per_service
    }

    /// Address resources (a Workload per pod, a Service per service) and Authorization
    /// resources (one policy per namespace) every client must end up holding.
    fn expected(&self) -> (usize, usize) {
        (self.pods + self.services(), self.namespaces)
    }
}

// ---------------------------------------------------------------------------------------
// The generated directory

fn namespace(plan: &Plan, service: usize) -> String {
    format!("ns-{:02}", service / (plan.services() / plan.namespaces))
}

fn pod_ip(pod: usize, generation: u32) -> Ipv4Addr {
    // 10.0.0.0/12 for the first generation, the next /12 for each change after it.
    Ipv4Addr::from(0x0a00_0000 + (generation << 20) + 1 + pod as u32)
}

/// The pods' current IP generation (bumped by each change).
struct Directory {
    root: PathBuf,
    plan: Plan,
    generations: Vec<u32>,
}

impl Directory {
    fn create(root: PathBuf, plan: Plan) -> anyhow::Result<Directory> {
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("config"))?;
        let dir = Directory {
            root,
            plan,
            generations: vec![0; plan.pods],
        };
        let mut common = String::new();
        for n in 0..plan.namespaces {
            let _ = write!(
                common,
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n:02}, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n\
                 apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                 metadata: {{name: same-namespace, namespace: ns-{n:02}}}\n\
                 spec: {{action: ALLOW, rules: [{{from: [{{source: {{namespaces: [ns-{n:02}]}}}}]}}]}}\n---\n"
            );
        }
        std::fs::write(dir.config().join("namespaces.yaml"), common)?;
        for file in 0..plan.services().div_ceil(SERVICES_PER_FILE) {
            dir.write_file(file)?;
        }
        Ok(dir)
    }

    fn config(&self) -> PathBuf {
        self.root.join("config")
    }

    fn files(&self) -> usize {
        self.plan.services().div_ceil(SERVICES_PER_FILE) + 1
    }

    /// Rewrites the file holding services `file * SERVICES_PER_FILE ..` and their pods.
    fn write_file(&self, file: usize) -> anyhow::Result<()> {
        let p = &self.plan;
        let mut text = String::new();
        let first = file * SERVICES_PER_FILE;
        for s in first..(first + SERVICES_PER_FILE).min(p.services()) {
            let ns = namespace(p, s);
            let vip = Ipv4Addr::from(0x0a60_0001 + s as u32);
            let _ = write!(
                text,
                "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s:04}, namespace: {ns}}}\n\
                 spec: {{clusterIP: {vip}, selector: {{app: svc-{s:04}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n"
            );
            for i in 0..p.pods_per_service {
                let pod = s * p.pods_per_service + i;
                let _ = write!(
                    text,
                    "apiVersion: v1\nkind: Pod\n\
                     metadata: {{name: svc-{s:04}-{i}, namespace: {ns}, labels: {{app: svc-{s:04}}}}}\n\
                     spec: {{nodeName: node-{:03}, serviceAccountName: svc-{s:04}, containers: [{{name: app, image: app}}]}}\n\
                     status: {{podIP: {}}}\n---\n",
                    pod % p.nodes,
                    pod_ip(pod, self.generations[pod]),
                );
            }
        }
        let path = self.config().join(format!("services-{file:03}.yaml"));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Gives `pod` a new IP; returns its xDS resource name.
    fn change_pod(&mut self, pod: usize) -> anyhow::Result<String> {
        self.generations[pod] = (self.generations[pod] + 1) % 15;
        let service = pod / self.plan.pods_per_service;
        self.write_file(service / SERVICES_PER_FILE)?;
        Ok(format!(
            "Kubernetes//Pod/{}/svc-{service:04}-{}",
            namespace(&self.plan, service),
            pod % self.plan.pods_per_service
        ))
    }
}

impl Drop for Directory {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

// ---------------------------------------------------------------------------------------
// The controller, in a child process

/// Hidden subcommand: a controller built with `controller::app::build`, its addresses
/// written to stdout, serving until killed.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerArgs {
    #[arg(long)]
    pub config_dir: PathBuf,
    #[arg(long)]
    pub state_dir: PathBuf,
    #[arg(long)]
    pub tokens: PathBuf,
    #[arg(long)]
    pub config_poll_ms: u64,
}

pub async fn serve_controller(args: ControllerArgs) -> anyhow::Result<()> {
    mesh_core::admin::init_logging();
    let mut cfg = controller::app::Config::new(args.config_dir, args.state_dir, args.tokens);
    cfg.grpc_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.grpc_tls_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.metrics_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.config_poll = Duration::from_millis(args.config_poll_ms);
    let app = controller::app::build(cfg).await?;
    println!("grpc {}\nmetrics {}", app.grpc, app.metrics);
    std::future::pending::<()>().await;
    Ok(())
}

struct Controller {
    child: ChildGuard,
    grpc: SocketAddr,
    metrics: SocketAddr,
}

impl Controller {
    async fn start(dir: &Directory) -> anyhow::Result<Controller> {
        let tokens = dir.root.join("tokens.yaml");
        std::fs::write(
            &tokens,
            "- {token: bench-token-0123456789abcdef, identity: 'spiffe://cluster.local/ns/istio-system/sa/ztunnel'}\n",
        )?;
        let stdout = dir.root.join("controller.stdout");
        let spec = Spawn {
            name: "controller".into(),
            program: std::env::current_exe()?,
            args: [
                "controlplane-controller",
                "--config-dir",
                &dir.config().display().to_string(),
                "--state-dir",
                &dir.root.join("state").display().to_string(),
                "--tokens",
                &tokens.display().to_string(),
                "--config-poll-ms",
                &dir.plan.poll.as_millis().to_string(),
            ]
            .map(str::to_owned)
            .to_vec(),
            env: vec![(
                "RUST_LOG".into(),
                std::env::var("MESH_BENCH_CONTROLLER_LOG").unwrap_or_else(|_| "warn".into()),
            )],
            stdout: Stdout::File(stdout.clone()),
            stderr: dir.root.join("controller.stderr"),
            nofile: 65536,
        };
        let mut child = ChildGuard::spawn(&spec)?;
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&stdout).unwrap_or_default();
            let addr = |what: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(what)?.trim().parse::<SocketAddr>().ok())
            };
            if let (Some(grpc), Some(metrics)) = (addr("grpc "), addr("metrics ")) {
                return Ok(Controller {
                    child,
                    grpc,
                    metrics,
                });
            }
            if child.exited().is_some() || started.elapsed() > STUCK {
                bail!("controller did not start: {}", child.describe(20));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        Ok(cpu_seconds(self.child.pid())?)
    }

    fn rss_mib(&self) -> anyhow::Result<(f64, f64)> {
        let pid = self.child.pid();
        Ok((kib_to_mib(vm_rss_kib(pid)?), kib_to_mib(vm_hwm_kib(pid)?)))
    }
}

// ---------------------------------------------------------------------------------------
// The clients

enum Event {
    Synced {
        took: Duration,
        bytes: usize,
    },
    /// A response after the initial sync, ACKed at `at`.
    Pushed {
        client: usize,
        names: Vec<String>,
        at: Instant,
    },
    Failed {
        client: usize,
        error: String,
    },
}

/// What every client must hold: (Address count, Authorization count).
type Expected = (usize, usize);

/// One proxy: a wildcard subscription to both types, every response ACKed.
async fn client(
    id: usize,
    channel: tonic::transport::Channel,
    expected: Expected,
    events: mpsc::UnboundedSender<Event>,
) {
    if let Err(e) = run_client(id, channel, expected, &events).await {
        let _ = events.send(Event::Failed {
            client: id,
            error: format!("{e:#}"),
        });
    }
}

/// What a bench client reads of a `DeltaDiscoveryResponse` (same field numbers): the
/// resources' names, not their bodies. A proxy decodes the bodies too, but on its own
/// node; here 100 clients share the controller's cores, and decoding 100 full pushes
/// would measure the clients rather than the controller.
#[derive(Clone, PartialEq, prost::Message)]
struct Lean {
    #[prost(message, repeated, tag = "2")]
    resources: Vec<LeanResource>,
    #[prost(string, tag = "4")]
    type_url: String,
    #[prost(string, repeated, tag = "6")]
    removed_resources: Vec<String>,
    #[prost(string, tag = "5")]
    nonce: String,
}

/// `Resource.name` (field 3, a slice of the received bytes); the version and the `Any`
/// are skipped undecoded.
#[derive(Clone, PartialEq, prost::Message)]
struct LeanResource {
    #[prost(bytes = "bytes", tag = "3")]
    name: bytes::Bytes,
}

/// Requests as usual; responses as [`Lean`], with the bytes each took on the wire.
#[derive(Default)]
struct LeanCodec;

struct LeanDecoder;

impl tonic::codec::Decoder for LeanDecoder {
    type Item = (Lean, usize);
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<(Lean, usize)>, tonic::Status> {
        use bytes::Buf as _;
        let len = buf.remaining();
        let lean = Lean::decode(buf).map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(Some((lean, len)))
    }
}

impl tonic::codec::Codec for LeanCodec {
    type Encode = DeltaDiscoveryRequest;
    type Decode = (Lean, usize);
    type Encoder = tonic_prost::ProstEncoder<DeltaDiscoveryRequest>;
    type Decoder = LeanDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        LeanDecoder
    }
}

const DELTA_ADS: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

async fn run_client(
    id: usize,
    channel: tonic::transport::Channel,
    expected: Expected,
    events: &mpsc::UnboundedSender<Event>,
) -> anyhow::Result<()> {
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(256 << 20);
    let (tx, rx) = mpsc::channel(16);
    let node = Node {
        id: format!(
            "ztunnel~10.250.{}.{}~ztunnel-{id}.istio-system~istio-system.svc.cluster.local",
            id / 256,
            id % 256
        ),
        ..Default::default()
    };
    for type_url in [ADDRESS, AUTHORIZATION] {
        tx.send(DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: type_url.into(),
            ..Default::default()
        })
        .await?;
    }
    let opened = Instant::now();
    grpc.ready().await.context("connecting")?;
    let mut stream = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            http::uri::PathAndQuery::from_static(DELTA_ADS),
            LeanCodec,
        )
        .await
        .context("opening the stream")?
        .into_inner();
    let mut held: HashMap<String, FnvHashSet<bytes::Bytes>> = HashMap::new();
    let mut synced = false;
    let mut bytes = 0;
    while let Some((resp, len)) = stream.message().await.context("receiving")? {
        if !synced {
            bytes += len;
        }
        // Only pushes after the sync are matched against changes by name.
        let names: Vec<String> = if synced {
            resp.resources
                .iter()
                .map(|r| String::from_utf8_lossy(&r.name).into_owned())
                .collect()
        } else {
            Vec::new()
        };
        let of_type = held.entry(resp.type_url.clone()).or_default();
        for r in resp.resources {
            of_type.insert(r.name);
        }
        for name in &resp.removed_resources {
            of_type.remove(name.as_bytes());
        }
        tx.send(DeltaDiscoveryRequest {
            type_url: resp.type_url,
            response_nonce: resp.nonce,
            ..Default::default()
        })
        .await?;
        let at = Instant::now();
        let count = |t: &str| held.get(t).map_or(0, FnvHashSet::len);
        if synced {
            let _ = events.send(Event::Pushed {
                client: id,
                names,
                at,
            });
        } else if (count(ADDRESS), count(AUTHORIZATION)) == expected {
            synced = true;
            let _ = events.send(Event::Synced {
                took: at - opened,
                bytes,
            });
        }
    }
    bail!("the controller closed the stream")
}

// ---------------------------------------------------------------------------------------
// The run

#[derive(Debug, Serialize)]
struct Summary {
    pods: usize,
    services: usize,
    clients: usize,
    config_files: usize,
    config_poll_ms: u64,
    sync_p50_ms: f64,
    sync_10k_ms: f64,
    push_p50_ms: f64,
    push_p99_ms: f64,
    push_max_ms: f64,
    rss_idle_mib: f64,
    rss_mib: f64,
    rss_peak_mib: f64,
    full_push_kib: f64,
    /// CPU seconds the controller used for every client's initial sync.
    sync_controller_cpu_s: f64,
    /// And the clients (this process), decoding names only.
    sync_clients_cpu_s: f64,
}

pub async fn run(args: ControlPlaneArgs) -> anyhow::Result<()> {
    let plan = Plan::from_args(&args)?;
    let root = std::env::temp_dir().join(format!("mesh-bench-controlplane-{}", std::process::id()));
    let mut dir = Directory::create(root, plan)?;
    eprintln!(
        "controlplane: {} pods, {} services, {} files, {} clients",
        plan.pods,
        plan.services(),
        dir.files(),
        plan.clients
    );
    let mut controller = Controller::start(&dir).await?;
    let (rss_idle, _) = controller.rss_mib()?;

    let cpu_before = (controller.cpu_seconds()?, cpu_seconds(std::process::id())?);
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut channels = Vec::new();
    for _ in 0..plan.clients {
        // The transport settings a ztunnel uses.
        let plane = ControlPlane::new(&format!("http://{}", controller.grpc), None, None)?;
        channels.push(
            plane
                .connect()
                .await
                .context("connecting to the controller")?,
        );
    }
    for (id, channel) in channels.into_iter().enumerate() {
        tokio::spawn(client(id, channel, plan.expected(), events_tx.clone()));
    }
    let mut syncs = Latencies::with_capacity(plan.clients);
    let mut full_push = 0;
    while syncs.len() < plan.clients {
        match next_event(&mut events, &mut controller).await? {
            Event::Synced { took, bytes } => {
                syncs.push(took);
                full_push = bytes;
            }
            Event::Pushed { .. } => {}
            Event::Failed { client, error } => bail!("client {client}: {error}"),
        }
    }
    let (rss, _) = controller.rss_mib()?;
    let sync_cpu = (
        controller.cpu_seconds()? - cpu_before.0,
        cpu_seconds(std::process::id())? - cpu_before.1,
    );

    let mut pushes = Latencies::with_capacity(plan.changes);
    for change in 0..plan.changes {
        // Spread over pods and services, and off the poller's phase.
        let pod = (change * 7919 + 13) % plan.pods;
        tokio::time::sleep(Duration::from_millis(50 + (change as u64 * 37) % 50)).await;
        let started = Instant::now();
        let name = dir.change_pod(pod)?;
        let mut acked = vec![false; plan.clients];
        let mut last = started;
        while acked.iter().any(|a| !a) {
            match next_event(&mut events, &mut controller).await? {
                Event::Pushed { client, names, at } if names.contains(&name) => {
                    acked[client] = true;
                    last = last.max(at);
                }
                Event::Failed { client, error } => bail!("client {client}: {error}"),
                _ => {}
            }
        }
        pushes.push(last - started);
    }
    let (_, rss_peak) = controller.rss_mib()?;

    let ms = |l: &mut Latencies, p: f64| {
        report::round(l.percentile(p).unwrap_or_default().as_secs_f64() * 1e3, 1)
    };
    let summary = Summary {
        pods: plan.pods,
        services: plan.services(),
        clients: plan.clients,
        config_files: dir.files(),
        config_poll_ms: plan.poll.as_millis() as u64,
        sync_p50_ms: ms(&mut syncs, 50.0),
        sync_10k_ms: ms(&mut syncs, 100.0),
        push_p50_ms: ms(&mut pushes, 50.0),
        push_p99_ms: ms(&mut pushes, 99.0),
        push_max_ms: ms(&mut pushes, 100.0),
        rss_idle_mib: report::round(rss_idle, 1),
        rss_mib: report::round(rss, 1),
        rss_peak_mib: report::round(rss_peak, 1),
        full_push_kib: report::round(full_push as f64 / 1024.0, 1),
        sync_controller_cpu_s: report::round(sync_cpu.0, 2),
        sync_clients_cpu_s: report::round(sync_cpu.1, 2),
    };
    let server_push = push_histogram(controller.metrics).await.unwrap_or_default();
    print!("{}", render(&summary, &server_push));
    drop(controller);
    drop(dir);
    report::print_json_last(&serde_json::json!({
        "sync_10k_ms": summary.sync_10k_ms,
        "push_p50_ms": summary.push_p50_ms,
        "push_p99_ms": summary.push_p99_ms,
        "rss_mib": summary.rss_mib,
        "full_push_kib": summary.full_push_kib,
        "detail": summary,
    }))
}

async fn next_event(
    events: &mut mpsc::UnboundedReceiver<Event>,
    controller: &mut Controller,
) -> anyhow::Result<Event> {
    match tokio::time::timeout(STUCK, events.recv()).await {
        Ok(Some(e)) => Ok(e),
        Ok(None) => bail!("every client has stopped"),
        Err(_) => bail!(
            "no progress for {STUCK:?}; {}",
            controller.child.describe(20)
        ),
    }
}

/// The controller's own view of push latency (`mesh_xds_push_seconds`): count and mean.
async fn push_histogram(metrics: SocketAddr) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(metrics).await?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    tcp.read_to_string(&mut text).await?;
    let value = |name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    };
    let (Some(sum), Some(count)) = (
        value("mesh_xds_push_seconds_sum "),
        value("mesh_xds_push_seconds_count "),
    ) else {
        return Ok(String::new());
    };
    Ok(format!(
        "{count} responses, mean {:.2} ms",
        sum / count.max(1.0) * 1e3
    ))
}

fn render(s: &Summary, server_push: &str) -> String {
    let mut t = Table::new(["controlplane", "value"]);
    let f = |v: f64| fixed(Some(v), 1);
    t.row([
        "pods / services".into(),
        format!("{} / {}", s.pods, s.services),
    ]);
    t.row(["clients (delta ADS)".into(), s.clients.to_string()]);
    t.row([
        "config files / poll".into(),
        format!("{} / {} ms", s.config_files, s.config_poll_ms),
    ]);
    t.row(["initial sync p50 (ms)".into(), f(s.sync_p50_ms)]);
    t.row(["initial sync max (ms)".into(), f(s.sync_10k_ms)]);
    t.row([
        "initial sync CPU, controller / clients (s)".into(),
        format!(
            "{:.2} / {:.2}",
            s.sync_controller_cpu_s, s.sync_clients_cpu_s
        ),
    ]);
    t.row(["pod change -> all ACKed p50 (ms)".into(), f(s.push_p50_ms)]);
    t.row(["pod change -> all ACKed p99 (ms)".into(), f(s.push_p99_ms)]);
    t.row(["pod change -> all ACKed max (ms)".into(), f(s.push_max_ms)]);
    t.row(["controller RSS idle (MiB)".into(), f(s.rss_idle_mib)]);
    t.row(["controller RSS after sync (MiB)".into(), f(s.rss_mib)]);
    t.row(["controller RSS peak (MiB)".into(), f(s.rss_peak_mib)]);
    t.row(["full push, one client (KiB)".into(), f(s.full_push_kib)]);
    if !server_push.is_empty() {
        t.row(["controller push time".into(), server_push.to_owned()]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_directory_loads_as_planned() {
        let plan = Plan {
            pods: 200,
            pods_per_service: 10,
            namespaces: 4,
            nodes: 7,
            clients: 1,
            changes: 0,
            poll: Duration::from_millis(20),
        };
        let root = std::env::temp_dir().join(format!("cp-gen-test-{}", std::process::id()));
        let mut dir = Directory::create(root, plan).unwrap();
        let (objects, errors) =
            controller::objects::load_dir(&dir.config(), "cluster.local").unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(objects.pods.len(), 200);
        assert_eq!(objects.services.len(), 20);
        assert_eq!(
            controller::translate::addresses(&objects).len(),
            plan.expected().0
        );
        assert_eq!(
            controller::translate::authorizations(&objects).0.len(),
            plan.expected().1
        );
        let name = dir.change_pod(57).unwrap();
        let (after, _) = controller::objects::load_dir(&dir.config(), "cluster.local").unwrap();
        let before = controller::translate::addresses(&objects);
        let now = controller::translate::addresses(&after);
        assert_ne!(before[&name], now[&name], "{name} changed");
        let changed = before
            .iter()
            .filter(|(k, v)| now.get(*k) != Some(v))
            .count();
        assert_eq!(changed, 1);
    }

    #[test]
    fn changed_ips_never_collide_with_other_pods() {
        assert!(pod_ip((1 << 20) - 1, 0) < pod_ip(0, 1));
        assert_eq!(pod_ip(0, 0), Ipv4Addr::new(10, 0, 0, 1));
    }
}
