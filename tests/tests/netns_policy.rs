//! Policy and enrolment on the mesh run for real (controller in the fabric, a capturing
//! ztunnel per node, unmodified clients in pods): AuthorizationPolicy denials, STRICT and
//! PERMISSIVE PeerAuthentication for pods outside the mesh, plaintext passthrough to them,
//! and pods enrolled and released while the mesh runs. Policies are Istio YAML given to
//! the controller's config directory. Root only (see `mesh_tests::netns`).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use mesh_tests::bench::process::ChildGuard;
use mesh_tests::netns::{
    is_root, pod_identity, wait_for_record, MeshOptions, NetnsMesh, NodeSpec, Pod, PodSpec,
    Topology,
};
use serde_json::Value;

/// Denies `client`'s identity on the web pods' port 8080, and nothing else.
const DENY_CLIENT_8080: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client-8080, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
    - from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]
      to: [{operation: {ports: [\"8080\"]}}]
";

const STRICT_DEFAULT_NS: &str = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: default}
spec: {mtls: {mode: STRICT}}
";

/// The policy the controller turns STRICT into for the ztunnels.
const STRICT_POLICY: &str = "istio-system/istio_converted_static_strict";
const ECHO_PORT: u16 = 7000;
/// How long a refused connection may take to fail: far above a refusal's milliseconds,
/// far below a hang.
const FAIL_FAST: Duration = Duration::from_secs(5);
/// How long a config change may take to reach the ztunnels and the capture.
const PROPAGATION: Duration = Duration::from_secs(15);

/// node1: ambient `client` and `other`, `mover` outside the mesh; node2: ambient `server`
/// (app web), `legacy` outside the mesh.
fn start(manifests: &[(&str, &str)]) -> NetnsMesh {
    assert!(is_root(), "netns_* tests need root");
    let topo = Topology::build(&[
        NodeSpec::new(
            "node1",
            [
                PodSpec::new("client"),
                PodSpec::new("other"),
                PodSpec::new("mover").not_ambient(),
            ],
        ),
        NodeSpec::new(
            "node2",
            [
                PodSpec::new("server").label("app", "web"),
                PodSpec::new("legacy").not_ambient(),
            ],
        ),
    ]);
    let opts = MeshOptions {
        manifests: (manifests.iter())
            .map(|(f, t)| ((*f).to_owned(), (*t).to_owned()))
            .collect(),
        ..MeshOptions::default()
    };
    NetnsMesh::start(topo, &opts).unwrap_or_else(|e| panic!("{e:#}"))
}

fn addr(pod: &Pod, port: u16) -> SocketAddr {
    SocketAddr::new(pod.ip.into(), port)
}

fn hello_url(pod: &Pod, port: u16) -> String {
    format!("http://{}/hello", addr(pod, port))
}

fn hello(pod: &Pod) -> String {
    format!("hello from {}\n", pod.spec.name)
}

/// The number of access-log records `node`'s ztunnel has written so far.
fn log_len(mesh: &NetnsMesh, node: &str) -> usize {
    mesh.access_log(node).lines().count()
}

/// The first record of `node`'s access log after the first `skip` that `matches`, waiting
/// up to `limit` (a record is written when its connection closes).
fn record_after(
    mesh: &NetnsMesh,
    node: &str,
    skip: usize,
    limit: Duration,
    matches: impl Fn(&Value) -> bool,
) -> Option<Value> {
    let read = || {
        let log = mesh.access_log(node);
        log.lines().skip(skip).collect::<Vec<_>>().join("\n")
    };
    wait_for_record(read, matches, limit)
}

/// Like [`record_after`] from the start of the log, failing the test when none comes.
fn record(mesh: &NetnsMesh, node: &str, matches: impl Fn(&Value) -> bool) -> Value {
    record_after(mesh, node, 0, Duration::from_secs(5), matches).unwrap_or_else(|| {
        panic!(
            "no such record on {node}: {}\n{}",
            mesh.access_log(node),
            mesh.ztunnel_log(node)
        )
    })
}

fn is(r: &Value, key: &str, want: &str) -> bool {
    r[key].as_str() == Some(want)
}

fn from_ip(r: &Value, pod: &Pod) -> bool {
    (r["src_addr"].as_str()).is_some_and(|a| a.split(':').next() == Some(&*pod.ip.to_string()))
}

/// A plain TCP client in `from`: connects to `to`, sends `request` if any, and reads the
/// first bytes of the answer. The read's result and the time it all took.
fn tcp_attempt(
    from: &Pod,
    to: SocketAddr,
    request: Option<&[u8]>,
) -> (std::io::Result<usize>, Duration) {
    let start = Instant::now();
    let result = from.run(|| {
        let mut tcp = TcpStream::connect_timeout(&to, FAIL_FAST)?;
        tcp.set_read_timeout(Some(FAIL_FAST))?;
        if let Some(request) = request {
            tcp.write_all(request)?;
        }
        let mut buf = [0u8; 64];
        tcp.read(&mut buf)
    });
    (result, start.elapsed())
}

/// `from` cannot reach `to`, and learns so at once: it gets a reset, well before
/// `FAIL_FAST`. The client waits for the server to speak first: had it written, a proxy
/// closing with the request unread would reset it whether or not it meant to.
fn assert_refused_fast(from: &Pod, to: SocketAddr) {
    let (result, took) = tcp_attempt(from, to, None);
    let reset = (result.as_ref()).is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset);
    assert!(
        reset && took < FAIL_FAST,
        "{} -> {to}: expected a prompt reset, got {result:?} after {took:?}",
        from.spec.name
    );
}

/// An echo server on `pod`'s `ECHO_PORT`, serving until the returned runtime drops.
fn echo_server(pod: &Pod) -> tokio::runtime::Runtime {
    let rt = pod.runtime(1);
    let at = addr(pod, ECHO_PORT);
    rt.spawn(async move {
        if let Err(e) = mesh_core::testing::echo_server(at).await {
            eprintln!("echo server on {at}: {e}");
        }
    });
    pod.wait_tcp(at, Duration::from_secs(5), "echo server");
    rt
}

/// A long-lived TCP session from `from` to `to`'s echo server.
fn echo_session(from: &Pod, to: &Pod) -> TcpStream {
    let at = addr(to, ECHO_PORT);
    let tcp = from
        .run(|| TcpStream::connect_timeout(&at, FAIL_FAST))
        .unwrap_or_else(|e| panic!("{} -> {at}: {e}", from.spec.name));
    tcp.set_read_timeout(Some(FAIL_FAST)).unwrap();
    tcp
}

fn assert_echoes(tcp: &mut TcpStream, msg: &str) {
    tcp.write_all(msg.as_bytes())
        .unwrap_or_else(|e| panic!("echo session, writing {msg:?}: {e}"));
    let mut back = vec![0u8; msg.len()];
    tcp.read_exact(&mut back)
        .unwrap_or_else(|e| panic!("echo session, reading {msg:?} back: {e}"));
    assert_eq!(back, msg.as_bytes());
}

/// An http.server on `pod`'s `port` serving the root `hello_server` made.
fn second_server(mesh: &NetnsMesh, pod: &Pod, port: u16) -> ChildGuard {
    let name = &pod.spec.name;
    let root = mesh.work_dir.join(format!("www-{name}"));
    let log = mesh.work_dir.join(format!("http-{name}-{port}.log"));
    pod.http_server(pod.ip.into(), port, &root, &log)
}

/// A DENY AuthorizationPolicy refuses exactly what it names (client's identity, port
/// 8080): that connection fails at once at the client instead of hanging, the other port
/// and another source pass, and the destination's ztunnel names the policy in its access
/// log and its deny log line.
#[test]
fn netns_mesh_policy_deny_fails_fast_and_names_the_policy() {
    let mesh = start(&[("policy-deny-client.yaml", DENY_CLIENT_8080)]);
    let (client, other, server) = (mesh.pod("client"), mesh.pod("other"), mesh.pod("server"));
    let _http = server.hello_server(&mesh.work_dir);
    let _http_9090 = second_server(&mesh, server, 9090);

    assert_refused_fast(client, addr(server, 8080));
    let err = client.curl(&hello_url(server, 8080)).unwrap_err();
    assert!(!err.contains("timed out"), "{err}");
    assert_eq!(client.curl(&hello_url(server, 9090)), Ok(hello(server)));
    assert_eq!(other.curl(&hello_url(server, 8080)), Ok(hello(server)));

    let denied = record(&mesh, "node2", |r| {
        is(r, "decision", "deny") && is(r, "src_identity", &pod_identity(client))
    });
    assert_eq!(denied["policy"], "default/deny-client-8080", "{denied}");
    assert_eq!(denied["outcome"], "denied", "{denied}");
    assert_eq!(denied["dst_addr"], addr(server, 8080).to_string());
    let line = (mesh.ztunnel_log("node2").lines())
        .find(|l| l.contains("connection denied"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no deny line: {}", mesh.ztunnel_log("node2")));
    assert!(line.contains("default/deny-client-8080"), "{line}");
    // The source's ztunnel logs the refusal too.
    record(&mesh, "node1", |r| {
        is(r, "outcome", "denied") && is(r, "dst_addr", &addr(server, 8080).to_string())
    });
    // Passed connections are logged as allowed, from their own identities.
    for (from, port) in [(client, 9090), (other, 8080)] {
        let rec = record(&mesh, "node2", |r| {
            is(r, "src_identity", &pod_identity(from)) && is(r, "decision", "allow")
        });
        assert_eq!(rec["dst_addr"], addr(server, port).to_string(), "{rec}");
        assert_eq!(rec["outcome"], "ok", "{rec}");
    }
}

/// Calls `f` every 100 ms until it gives a value; fails the test after `limit`.
fn poll<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// PeerAuthentication for pods outside the mesh, from the other node and from the
/// destination's own: under PERMISSIVE (no policy) their plaintext reaches an ambient pod;
/// once STRICT is written into the running controller's config directory their next
/// connections are refused at once and logged under the converted policy, while mesh
/// traffic still passes; removing it admits them again.
#[test]
fn netns_mesh_strict_peer_authentication_refuses_plaintext() {
    let mesh = start(&[]);
    let (client, server) = (mesh.pod("client"), mesh.pod("server"));
    let outsiders = [mesh.pod("mover"), mesh.pod("legacy")];
    let _http = server.hello_server(&mesh.work_dir);
    let url = hello_url(server, 8080);
    for pod in outsiders {
        assert_eq!(pod.curl(&url), Ok(hello(server)), "PERMISSIVE");
        let rec = record(&mesh, "node2", |r| from_ip(r, pod));
        assert_eq!(rec["mtls"], false, "{rec}");
        assert_eq!(rec["outcome"], "ok", "{rec}");
    }

    let skip = log_len(&mesh, "node2");
    mesh.write("peerauth-strict.yaml", STRICT_DEFAULT_NS)
        .unwrap();
    poll(PROPAGATION, "STRICT refusing plaintext", || {
        let request = b"GET /hello HTTP/1.0\r\n\r\n";
        let (result, _) = tcp_attempt(outsiders[1], addr(server, 8080), Some(request));
        (!matches!(result, Ok(n) if n > 0)).then_some(())
    });
    for pod in outsiders {
        assert_refused_fast(pod, addr(server, 8080));
        let rec = record_after(&mesh, "node2", skip, Duration::from_secs(5), |r| {
            from_ip(r, pod) && is(r, "decision", "deny")
        });
        let rec = rec.unwrap_or_else(|| panic!("no deny record: {}", mesh.access_log("node2")));
        assert_eq!(rec["policy"], STRICT_POLICY, "{rec}");
        assert_eq!(rec["mtls"], false, "{rec}");
    }
    assert_eq!(client.curl(&url), Ok(hello(server)), "mTLS under STRICT");
    let rec = record(&mesh, "node2", |r| {
        is(r, "src_identity", &pod_identity(client))
    });
    assert_eq!(rec["mtls"], true, "{rec}");

    mesh.remove("peerauth-strict.yaml").unwrap();
    poll(PROPAGATION, "PERMISSIVE again", || {
        (outsiders[1].curl(&url) == Ok(hello(server))).then_some(())
    });
    assert_eq!(outsiders[0].curl(&url), Ok(hello(server)));
}

/// An ambient pod reaching pods outside the mesh, on the other node and on its own, passes
/// straight through in plaintext: each server sees the client's own address, and the
/// source's ztunnel logs the connection under the client's identity with no mTLS and no
/// HBONE hop; the other node's ztunnel takes no part.
#[test]
fn netns_mesh_ambient_to_outside_pod_is_plaintext_passthrough() {
    let mesh = start(&[]);
    let client = mesh.pod("client");
    for name in ["legacy", "mover"] {
        let to = mesh.pod(name);
        let http = to.hello_server(&mesh.work_dir);
        assert_eq!(client.curl(&hello_url(to, 8080)), Ok(hello(to)));
        let seen = http.stderr_tail(5);
        assert!(
            seen.contains(&format!("{} - - ", client.ip)),
            "{name} saw another source: {seen}"
        );
        let dst = addr(to, 8080).to_string();
        let rec = record(&mesh, "node1", |r| is(r, "dst_addr", &dst));
        assert_eq!(rec["direction"], "outbound", "{rec}");
        assert_eq!(rec["src_identity"], pod_identity(client), "{rec}");
        assert_eq!(rec["dst_workload"], name, "{rec}");
        assert_eq!(rec["mtls"], false, "{rec}");
        assert_eq!(rec["hbone_addr"], Value::Null, "{rec}");
        assert_eq!(rec["outcome"], "ok", "{rec}");
    }
    let legacy = addr(mesh.pod("legacy"), 8080).to_string();
    let node2 = mesh.access_log("node2");
    assert!(!node2.contains(&legacy), "node2 proxied it: {node2}");
}

/// Enrolling a running pod (its manifest loses `istio.io/dataplane-mode: none`) captures
/// its next connections: the destination's ztunnel sees its identity over mTLS. Releasing
/// it makes them plaintext again. Long-lived sessions other pods opened before (an ambient
/// pod on the same node, a pod outside the mesh) keep echoing through both changes, and
/// end as one clean connection each.
#[test]
fn netns_mesh_enrolling_a_running_pod_captures_its_next_connections() {
    let mesh = start(&[]);
    let (mover, server) = (mesh.pod("mover"), mesh.pod("server"));
    let _http = server.hello_server(&mesh.work_dir);
    let _echo = echo_server(server);
    let url = hello_url(server, 8080);
    let mut sessions: Vec<(&Pod, TcpStream)> = ["client", "legacy"]
        .map(|name| mesh.pod(name))
        .into_iter()
        .map(|from| (from, echo_session(from, server)))
        .collect();
    for (_, tcp) in &mut sessions {
        assert_echoes(tcp, "before;");
    }
    assert_eq!(mover.curl(&url), Ok(hello(server)));
    let rec = record(&mesh, "node2", |r| from_ip(r, mover));
    assert_eq!(rec["mtls"], false, "not yet in the mesh: {rec}");

    for (ambient, mtls, step) in [(true, true, "enrolled;"), (false, false, "released;")] {
        let skip = log_len(&mesh, "node2");
        mesh.set_pod_ambient("mover", ambient).unwrap();
        let rec = poll(PROPAGATION, step, || {
            let _ = mover.curl(&url);
            record_after(&mesh, "node2", skip, Duration::from_secs(1), |r| {
                from_ip(r, mover) && r["mtls"] == mtls && is(r, "outcome", "ok")
            })
        });
        let want = if mtls {
            Value::from(pod_identity(mover))
        } else {
            Value::Null
        };
        assert_eq!(rec["src_identity"], want, "{rec}");
        assert_eq!(mover.curl(&url), Ok(hello(server)), "{step}");
        for (_, tcp) in &mut sessions {
            assert_echoes(tcp, step);
        }
    }

    let echo = addr(server, ECHO_PORT).to_string();
    for (from, mut tcp) in sessions {
        tcp.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        tcp.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{rest:?}");
        let rec = record(&mesh, "node2", |r| {
            from_ip(r, from) && is(r, "dst_addr", &echo)
        });
        assert_eq!(rec["outcome"], "ok", "{rec}");
        let total = "before;enrolled;released;".len();
        assert_eq!(rec["bytes_sent"], total, "one connection throughout: {rec}");
    }
}
