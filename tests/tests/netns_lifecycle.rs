//! The mesh's data path judged from outside, on network namespaces with the real
//! controller and a capturing ztunnel per node (root only, see `mesh_tests::netns`): what
//! crosses the wire between nodes (HBONE only, TLS only, never the payload), what a pod
//! sees while its node's ztunnel is down and once it is back, and bulk transfers (iperf3,
//! 1 GiB with checksums at both ends) through capture and HBONE. The capture mode comes
//! from `capture_mode()` (CI runs these once per mode).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mesh_tests::bench::process::{ChildGuard, Spawn, Stdout};
use mesh_tests::netns::{
    capture_mode, is_root, pod_identity, MeshOptions, Netns, NetnsMesh, NodeSpec, Pod, PodSpec,
    Topology,
};
use rand::distr::{Alphanumeric, SampleString};
use rand::RngCore;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Where the test's own TCP sink listens in the server pod.
const SINK_PORT: u16 = 9000;
/// The longest a single read or write of the test's own client and sink may block.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// A connection attempt that takes longer than this while a ztunnel is down counts as
/// black-holed (curl gives up after 5 s).
const HANG_BOUND: Duration = Duration::from_secs(3);

/// node1 runs the client pod, node2 the server pod; both ambient.
fn start() -> NetnsMesh {
    assert!(is_root(), "netns_* tests need root");
    let topo = Topology::build(&[
        NodeSpec::new("node1", [PodSpec::new("client")]),
        NodeSpec::new("node2", [PodSpec::new("server")]),
    ]);
    let opts = MeshOptions {
        capture: Some(capture_mode()),
        ..MeshOptions::default()
    };
    NetnsMesh::start(topo, &opts).unwrap_or_else(|e| panic!("{e:#}"))
}

fn addr(pod: &Pod, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(pod.ip), port)
}

/// How many of `node`'s access-log records show an mTLS connection from `from`.
fn mtls_records(mesh: &NetnsMesh, node: &str, from: &Pod) -> usize {
    let want = pod_identity(from);
    (mesh.access_log(node).lines())
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["src_identity"] == want.as_str() && r["mtls"] == true)
        .count()
}

/// The sink's side of one transfer.
#[derive(Debug)]
struct Received {
    bytes: u64,
    sha256: [u8; 32],
    /// The first bytes received (up to the `keep` given to `receive`).
    head: Vec<u8>,
}

/// Binds the test's sink on `at` in `ns` (the socket stays in that namespace).
fn sink(ns: &Netns, at: SocketAddr) -> TcpListener {
    ns.run(|| TcpListener::bind(at))
        .unwrap_or_else(|e| panic!("binding the sink on {at}: {e}"))
}

/// Accepts one connection (waiting `IO_TIMEOUT` at most), reads it to EOF, then closes.
fn receive(listener: &TcpListener, keep: usize) -> std::io::Result<Received> {
    listener.set_nonblocking(true)?;
    let start = Instant::now();
    let mut conn = loop {
        match listener.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == ErrorKind::WouldBlock && start.elapsed() < IO_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    };
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut head = Head {
        keep,
        bytes: Vec::new(),
    };
    let (bytes, sha256) = copy_hashed(&mut conn, &mut head)?;
    Ok(Received {
        bytes,
        sha256,
        head: head.bytes,
    })
}

/// Copies `from` to `to` until EOF; the bytes copied and their SHA-256.
fn copy_hashed(mut from: impl Read, mut to: impl Write) -> std::io::Result<(u64, [u8; 32])> {
    let (mut hash, mut bytes) = (Sha256::new(), 0u64);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok((bytes, hash.finalize().into()));
        }
        hash.update(&buf[..n]);
        to.write_all(&buf[..n])?;
        bytes += n as u64;
    }
}

/// Keeps the first `keep` bytes written to it and discards the rest.
struct Head {
    keep: usize,
    bytes: Vec<u8>,
}

impl Write for Head {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = self.keep.saturating_sub(self.bytes.len()).min(buf.len());
        self.bytes.extend_from_slice(&buf[..room]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Connects from `ns` to `to`, sends all of `data`, half-closes and waits for the peer
/// to close (so everything was delivered); the bytes sent and their SHA-256.
fn send(ns: &Netns, to: SocketAddr, data: impl Read) -> std::io::Result<(u64, [u8; 32])> {
    let mut conn = ns.run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    let sent = copy_hashed(data, &mut conn)?;
    conn.shutdown(Shutdown::Write)?;
    let closed = conn.read(&mut [0u8; 1])?;
    assert_eq!(closed, 0, "the sink answered instead of closing");
    Ok(sent)
}

/// One transfer of `data` from `client` to a sink on `to` in `server`, both ends at once.
fn transfer(
    (client, server): (&Netns, &Netns),
    to: SocketAddr,
    data: impl Read + Send,
    keep: usize,
) -> Transfer {
    let listener = sink(server, to);
    let started = Instant::now();
    let (sent, received) = std::thread::scope(|s| {
        let rx = s.spawn(|| receive(&listener, keep));
        let sent = send(client, to, data);
        (sent, rx.join().expect("sink thread"))
    });
    let (sent, received) = match (sent, received) {
        (Ok(sent), Ok(received)) => (sent, received),
        (sent, received) => panic!("transfer failed: sender {sent:?}, sink {received:?}"),
    };
    Transfer {
        sent,
        received,
        took: started.elapsed(),
    }
}

struct Transfer {
    sent: (u64, [u8; 32]),
    received: Received,
    took: Duration,
}

/// `len` random bytes, generated as they are read.
struct RandomBytes {
    left: u64,
}

impl Read for RandomBytes {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        rand::rng().fill_bytes(&mut buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

/// Polls `file` every 20 ms until it contains `needle`; false after `limit`.
fn wait_for_text(file: &Path, needle: &str, limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(needle) {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `signal` (a `kill` name: TERM, INT, KILL) to `child` and waits up to `limit`
/// for it to exit; whether it did.
fn signal_and_wait(child: &mut ChildGuard, signal: &str, limit: Duration) -> bool {
    let pid = child.pid().to_string();
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status();
    assert!(sent.is_ok_and(|s| s.success()), "kill -{signal} {pid}");
    let start = Instant::now();
    while child.exited().is_none() {
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// tcpdump writing every frame of one interface to a pcap file.
struct Tcpdump {
    child: ChildGuard,
    file: PathBuf,
}

impl Tcpdump {
    /// Starts tcpdump on `iface` in `ns` and returns once it says it is listening; its
    /// files in `dir` are named after `label`.
    fn start(ns: &Netns, iface: &str, label: &str, dir: &Path) -> Tcpdump {
        let file = dir.join(format!("{label}.pcap"));
        let log = dir.join(format!("tcpdump-{label}.log"));
        let mut child = ns.spawn(&Spawn {
            name: format!("tcpdump {iface} in {}", ns.name()),
            program: "tcpdump".into(),
            args: ["-i", iface, "-n", "-s", "0", "--immediate-mode", "-U", "-w"]
                .map(String::from)
                .into_iter()
                .chain([file.display().to_string()])
                .collect(),
            env: vec![],
            stdout: Stdout::Discard,
            stderr: log.clone(),
            nofile: 1024,
        });
        let listening = wait_for_text(&log, "listening on", Duration::from_secs(10));
        assert!(listening, "tcpdump not listening: {}", child.describe(10));
        Tcpdump { child, file }
    }

    /// Stops tcpdump once the capture so far satisfies `seen` (or `limit` has passed):
    /// tcpdump may lag behind the wire on a loaded machine, and what it has not read
    /// when it stops is lost.
    fn stop_when(self, seen: impl Fn(&[u8]) -> bool, limit: Duration) -> Vec<u8> {
        let start = Instant::now();
        while start.elapsed() < limit && !seen(&std::fs::read(&self.file).unwrap_or_default()) {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop()
    }

    /// Stops tcpdump (SIGINT: it flushes and exits) and returns the capture.
    fn stop(mut self) -> Vec<u8> {
        let stopped = signal_and_wait(&mut self.child, "INT", Duration::from_secs(5));
        assert!(stopped, "tcpdump did not stop: {}", self.child.describe(10));
        std::fs::read(&self.file).unwrap_or_else(|e| panic!("reading {}: {e}", self.file.display()))
    }
}

/// A TCP segment over IPv4, as captured.
#[derive(Debug)]
struct Segment {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: Vec<u8>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
}

/// The TCP/IPv4 segments of a little-endian pcap file of Ethernet frames (what tcpdump
/// writes on this machine); other frames are skipped.
fn tcp_segments(pcap: &[u8]) -> Vec<Segment> {
    assert!(pcap.len() >= 24, "pcap shorter than its header");
    let magic = &pcap[..4];
    assert!(
        magic == [0xd4, 0xc3, 0xb2, 0xa1] || magic == [0x4d, 0x3c, 0xb2, 0xa1],
        "not a little-endian pcap file: {magic:02x?}"
    );
    assert_eq!(le32(pcap, 20), 1, "link type is not Ethernet");
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let len = le32(pcap, at + 8);
        let frame = &pcap[at + 16..(at + 16 + len).min(pcap.len())];
        at += 16 + len;
        out.extend(tcp_segment(frame));
    }
    out
}

fn tcp_segment(frame: &[u8]) -> Option<Segment> {
    if frame.len() < 14 + 20 || be16(frame, 12) != 0x0800 {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[9] != 6 || ip.len() < ihl + 20 {
        return None;
    }
    let end = usize::from(be16(ip, 2)).clamp(ihl + 20, ip.len());
    let tcp = &ip[ihl..end];
    let data_offset = (usize::from(tcp[12] >> 4) * 4).min(tcp.len());
    Some(Segment {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        sport: be16(tcp, 0),
        dport: be16(tcp, 2),
        payload: tcp[data_offset..].to_vec(),
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A payload of several KB made of one random marker string repeated: any plaintext
/// leak of 2 marker lengths or more holds the marker whole.
fn marker_payload() -> (String, Vec<u8>) {
    let marker = format!(
        "lifecycle-marker-{}",
        Alphanumeric.sample_string(&mut rand::rng(), 40)
    );
    let payload = marker.repeat(8 * 1024 / marker.len() + 1).into_bytes();
    (marker, payload)
}

/// TCP payload bytes toward port `dport` in a capture.
fn bytes_to_port(pcap: &[u8], dport: u16) -> usize {
    (tcp_segments(pcap).iter())
        .filter(|s| s.dport == dport)
        .map(|s| s.payload.len())
        .sum()
}

/// Sends `payload` from `client` to a sink on `to` in `server` while tcpdump captures
/// node1's uplink; the capture, once the sink has received the payload whole and the
/// capture holds as many bytes toward `wire_port` (5 s at most).
fn captured_transfer(
    mesh: &NetnsMesh,
    label: &str,
    (client, server): (&Netns, &Netns),
    (to, wire_port): (SocketAddr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let dump = Tcpdump::start(mesh.node("node1"), "eth0", label, &mesh.work_dir);
    let done = transfer((client, server), to, payload, payload.len());
    let seen = |pcap: &[u8]| bytes_to_port(pcap, wire_port) >= payload.len();
    let pcap = dump.stop_when(seen, Duration::from_secs(5));
    assert_eq!(
        done.received.head, payload,
        "{label}: the sink got other bytes"
    );
    pcap
}

/// What crosses between the nodes while an ambient pod sends a known payload to an
/// ambient pod on the other node: captured on node1's uplink, every TCP segment not to or
/// from the controller has HBONE's port 15008 on one side, the HBONE connection carries
/// TLS records (a handshake record opening a segment, application-data records), at least
/// as many bytes as the payload go toward 15008, and the payload's marker appears nowhere
/// in the capture, while the server received it whole and its node's ztunnel logged the
/// client's identity over mTLS. A control first sends the same payload between the nodes
/// themselves (not captured): there the same capture and parser must find it in clear.
#[test]
fn netns_mesh_wire_carries_only_tls_on_hbone() {
    let mut mesh = start();
    let (marker, payload) = marker_payload();
    let (node1, node2) = (mesh.node("node1"), mesh.node("node2"));
    let to = SocketAddr::new(IpAddr::V4(node2.ip), SINK_PORT);
    let clear = captured_transfer(&mesh, "control", (node1, node2), (to, SINK_PORT), &payload);
    let seen = (tcp_segments(&clear).iter())
        .any(|s| s.dport == SINK_PORT && contains(&s.payload, marker.as_bytes()));
    assert!(
        seen,
        "control: the payload sent in clear is not in the capture"
    );

    let (client, server) = (mesh.pod("client"), mesh.pod("server"));
    let to = addr(server, SINK_PORT);
    let pcap = captured_transfer(&mesh, "mesh", (client, server), (to, 15008), &payload);
    let client_id = pod_identity(client);
    mesh.expect_record(
        "node2",
        |r| r["src_identity"] == client_id.as_str() && r["mtls"] == true,
        Duration::from_secs(5),
    );
    assert_only_tls_on_hbone(&pcap, mesh.fabric.ip, payload.len());
    assert!(
        !contains(&pcap, marker.as_bytes()),
        "the payload crossed in clear"
    );
}

/// See `netns_mesh_wire_carries_only_tls_on_hbone`; segments to or from `fabric` (the
/// controller) are left out.
fn assert_only_tls_on_hbone(pcap: &[u8], fabric: Ipv4Addr, payload_len: usize) {
    let segments = tcp_segments(pcap);
    let between_nodes: Vec<&Segment> = (segments.iter())
        .filter(|s| s.src != fabric && s.dst != fabric)
        .collect();
    assert!(
        !between_nodes.is_empty(),
        "no TCP between the nodes captured ({} bytes of pcap, {} TCP segments)",
        pcap.len(),
        segments.len()
    );
    let off_hbone: Vec<String> = (between_nodes.iter())
        .filter(|s| s.sport != 15008 && s.dport != 15008)
        .map(|s| format!("{}:{} -> {}:{}", s.src, s.sport, s.dst, s.dport))
        .collect();
    assert!(off_hbone.is_empty(), "TCP besides HBONE: {off_hbone:?}");
    let to_hbone: Vec<&&Segment> = (between_nodes.iter())
        .filter(|s| s.dport == 15008)
        .collect();
    let handshake = (to_hbone.iter()).any(|s| s.payload.starts_with(&[0x16, 0x03]));
    let app_data = (between_nodes.iter()).any(|s| contains(&s.payload, &[0x17, 0x03, 0x03]));
    assert!(handshake, "no TLS handshake record toward port 15008");
    assert!(app_data, "no TLS application-data record on the wire");
    let encrypted = bytes_to_port(pcap, 15008);
    assert!(
        encrypted >= payload_len,
        "{encrypted} bytes toward port 15008 carried a {payload_len}-byte payload"
    );
}

/// Curl from the client pod to the server pod, and how long it took.
fn timed_curl(client: &Pod, url: &str) -> (Result<String, String>, Duration) {
    let start = Instant::now();
    let out = client.curl(url);
    (out, start.elapsed())
}

/// A ztunnel that exits, gracefully (SIGTERM) or not (SIGKILL, no chance to clean up),
/// on the client's node or the server's, leaves nothing that black-holes the pods'
/// traffic: while it is down a connection either works (directly) or fails fast. Started
/// again, it captures at once: new connections go through HBONE (the server node's
/// ztunnel logs the client's identity over mTLS).
#[test]
fn netns_mesh_ztunnel_restart_recovers_capture() {
    let mut mesh = start();
    let http = mesh.pod("server").hello_server(&mesh.work_dir);
    let url = format!("http://{}:8080/hello", mesh.pod("server").ip);
    let (body, _) = timed_curl(mesh.pod("client"), &url);
    assert_eq!(body.as_deref(), Ok("hello from server\n"));
    for (node, signal) in [
        ("node1", "TERM"),
        ("node1", "KILL"),
        ("node2", "TERM"),
        ("node2", "KILL"),
    ] {
        check_down(&mut mesh, node, signal, &url);
        mesh.restart_ztunnel(node)
            .unwrap_or_else(|e| panic!("restarting {node}: {e:#}"));
        check_back(&mut mesh, node, &url);
    }
    drop(http);
}

/// Stops `node`'s ztunnel with `signal`; then nothing of it may be left running in the
/// node's namespace (the iptables janitor exits once it has unhooked the rules) and a
/// connection from the client pod must not hang.
fn check_down(mesh: &mut NetnsMesh, node: &str, signal: &str, url: &str) {
    let exited = signal_and_wait(mesh.ztunnel(node), signal, Duration::from_secs(10));
    assert!(exited, "{node} ignored SIG{signal}: {}", mesh.describe());
    let start = Instant::now();
    while !mesh.node(node).pids().is_empty() {
        let left = mesh.node(node).pids();
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "processes left in {node} after its ztunnel's SIG{signal}: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (down, took) = timed_curl(mesh.pod("client"), url);
    println!("{node} down after SIG{signal}: {down:?} in {took:.2?}");
    assert!(
        took < HANG_BOUND,
        "{node} down after SIG{signal}: the connection hung {took:.2?} ({down:?}); \
         node's capture state:\n{}",
        capture_state(mesh.node(node))
    );
}

/// After `node`'s ztunnel was started again: the client pod reaches the server, and
/// node2's ztunnel logs a new connection from the client's identity over mTLS.
fn check_back(mesh: &mut NetnsMesh, node: &str, url: &str) {
    let before = mtls_records(mesh, "node2", mesh.pod("client"));
    let (up, took) = timed_curl(mesh.pod("client"), url);
    assert_eq!(
        up.as_deref(),
        Ok("hello from server\n"),
        "after restarting {node} ({took:.2?}): {}",
        mesh.describe()
    );
    let start = Instant::now();
    while mtls_records(mesh, "node2", mesh.pod("client")) <= before {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no new mTLS record on node2 after restarting {node}: {}\n{}",
            mesh.access_log("node2"),
            mesh.describe()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The node's iptables mangle rules and policy routing: for failure messages.
fn capture_state(node: &Netns) -> String {
    let mut out = String::new();
    for args in [
        &["iptables", "-w", "-t", "mangle", "-S"][..],
        &["ip", "rule"][..],
    ] {
        let text = node.command(args[0]).args(&args[1..]).output();
        let text = text.map_or_else(
            |e| e.to_string(),
            |o| String::from_utf8_lossy(&o.stdout).into_owned(),
        );
        out.push_str(&text);
    }
    out
}

/// iperf3 in the server pod, one test at a time; killed on drop.
fn iperf3_server(pod: &Pod, dir: &Path) -> ChildGuard {
    let out = dir.join("iperf3-server.out");
    let mut server = pod.spawn(&Spawn {
        name: "iperf3 -s".into(),
        program: "iperf3".into(),
        args: [
            "-s",
            "--forceflush",
            "-B",
            &pod.ip.to_string(),
            "-p",
            "5201",
        ]
        .map(String::from)
        .to_vec(),
        env: vec![],
        stdout: Stdout::File(out.clone()),
        stderr: dir.join("iperf3-server.err"),
        nofile: 1024,
    });
    let listening = wait_for_text(&out, "Server listening", Duration::from_secs(10));
    assert!(listening, "iperf3 server: {}", server.describe(10));
    server
}

/// Bulk data through capture and HBONE: an iperf3 run (2 s) from the client pod to the
/// server pod on the other node completes with data received and shows up as mTLS on
/// the server's node; then 1 GiB of random bytes sent by a plain TCP client in the client
/// pod arrives whole at a sink in the server pod, with the same SHA-256 at both ends.
#[test]
fn netns_mesh_bulk_transfers_arrive_intact() {
    let mut mesh = start();
    let _iperf = iperf3_server(mesh.pod("server"), &mesh.work_dir);
    let (client, server) = (mesh.pod("client"), mesh.pod("server"));
    let out = (client.command("timeout"))
        .args(["30", "iperf3", "-c", &server.ip.to_string(), "-p", "5201"])
        .args(["-t", "2", "-J"])
        .output()
        .expect("running iperf3");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        let err = String::from_utf8_lossy(&out.stderr);
        panic!("iperf3 printed no JSON ({e}): {err}")
    });
    assert!(report.get("error").is_none(), "iperf3: {}", report["error"]);
    let received = &report["end"]["sum_received"];
    let bytes = received["bytes"].as_u64().unwrap_or(0);
    assert!(bytes > 0, "iperf3 received nothing: {received}");
    println!(
        "iperf3: {bytes} bytes at {:.2} Gbit/s",
        received["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9
    );
    let client_id = pod_identity(client);
    mesh.expect_record(
        "node2",
        |r| r["src_identity"] == client_id.as_str() && r["mtls"] == true,
        Duration::from_secs(5),
    );

    const GIB: u64 = 1 << 30;
    let (client, server) = (mesh.pod("client"), mesh.pod("server"));
    let to = addr(server, SINK_PORT);
    let done = transfer((client, server), to, RandomBytes { left: GIB }, 0);
    assert_eq!(done.sent.0, GIB);
    assert_eq!(done.received.bytes, GIB, "bytes received");
    assert_eq!(done.received.sha256, done.sent.1, "SHA-256 of the data");
    let secs = done.took.as_secs_f64();
    println!(
        "1 GiB in {secs:.2} s ({:.2} Gbit/s)",
        GIB as f64 * 8.0 / secs / 1e9
    );
}
