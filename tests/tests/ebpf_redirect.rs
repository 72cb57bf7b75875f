//! eBPF capture (mesh-ebpf) with real namespaces: each test's isolated network namespace
//! plays the node, pods are namespaces joined to it by veth pairs, and transparent tokio
//! listeners on 15001/15006/15008 stand in for ztunnel. Every server greets with its name
//! and the local address the connection arrived at, then echoes, so a test sees both where
//! a connection landed and its original destination.
//!
//! Root only (see `mesh_tests::netns`); the pod namespaces are named after the test
//! process and deleted on drop.

// setns(2), to open sockets inside pod namespaces from a helper thread.
#![allow(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;
use std::time::Duration;

use mesh_ebpf::{Listeners, Redirector, Role};
use mesh_tests::netns::{run, run_isolated};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const MARK: u32 = 0x100;
const OUTBOUND: u16 = 15001;
const PLAINTEXT: u16 = 15006;
const HBONE: u16 = 15008;
/// Node-side address of every pod veth: the pods' default gateway.
const GATEWAY: &str = "169.254.1.1";
/// Bounds a step that would otherwise hang when traffic goes astray.
const STEP: Duration = Duration::from_secs(10);

/// Policy routing for steered packets, as ztunnel sets it up on a node, and forwarding so
/// traffic the program leaves alone reaches pods directly.
fn node_routing() {
    let mark = format!("{MARK:#x}/{MARK:#x}");
    run("ip", &["rule", "add", "fwmark", &mark, "lookup", "100"]);
    run(
        "ip",
        &[
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "100",
        ],
    );
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enable forwarding");
}

/// The node's routing and `N` pods attached to it.
fn node_with_pods<const N: usize>() -> [Pod; N] {
    node_routing();
    std::array::from_fn(|n| Pod::add(n as u8))
}

/// A pod: a network namespace with `eth0`, a /32 address and a default route via the
/// node-side veth. Dropping it deletes the namespace and with it the veth pair.
struct Pod {
    ns: String,
    ip: Ipv4Addr,
    ifindex: u32,
}

impl Pod {
    fn add(n: u8) -> Pod {
        let ns = format!("mesh-ebpf-{}-{n}", std::process::id());
        let veth = format!("pod{n}");
        let mut pod = Pod {
            ns,
            ip: Ipv4Addr::new(10, 77, 0, 10 + n),
            ifindex: 0,
        };
        let (ns, ip) = (pod.ns.as_str(), pod.ip);
        run("ip", &["netns", "add", ns]);
        run(
            "ip",
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        );
        run(
            "ip",
            &["addr", "add", &format!("{GATEWAY}/32"), "dev", &veth],
        );
        run("ip", &["link", "set", &veth, "up"]);
        run("ip", &["route", "add", &format!("{ip}/32"), "dev", &veth]);
        let in_pod = |args: &[&str]| run("ip", &[&["-n", ns], args].concat());
        in_pod(&["link", "set", "lo", "up"]);
        in_pod(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
        in_pod(&["link", "set", "eth0", "up"]);
        in_pod(&[
            "route", "add", "default", "via", GATEWAY, "dev", "eth0", "onlink",
        ]);
        pod.ifindex = ifindex(&veth);
        pod
    }

    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.ip, port))
    }

    /// Runs `f` on a thread inside the pod's namespace: sockets it opens live there.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = std::fs::File::open(format!("/run/netns/{}", self.ns)).expect("open netns");
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: `ns` is an open namespace file for the whole call; setns only
                // moves this short-lived thread, which ends when `f` returns.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in pod namespace")
        })
    }

    /// A greeting echo server named `name` on the pod's address.
    fn serve(&self, port: u16, name: &'static str) {
        let listener = self.enter(|| std::net::TcpListener::bind(self.addr(port)).unwrap());
        serve(listener, name);
    }

    /// A connection from inside the pod, as any process of the pod makes it.
    async fn connect(&self, dst: SocketAddr) -> TcpStream {
        let socket = self.enter(|| TcpSocket::new_v4().unwrap());
        timed(socket.connect(dst)).await.unwrap()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

fn ifindex(name: &str) -> u32 {
    let out = Command::new("ip")
        .args(["-o", "link", "show", "dev", name])
        .output()
        .expect("ip link show");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ifindex for {name}: {text}"))
}

async fn timed<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

/// Accepts forever; each connection gets "`name` `local address`\n", then an echo.
fn serve(listener: std::net::TcpListener, name: &'static str) {
    listener.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let local = stream.local_addr()?;
                stream
                    .write_all(format!("{name} {local}\n").as_bytes())
                    .await?;
                let (mut r, mut w) = stream.split();
                tokio::io::copy(&mut r, &mut w).await.map(drop)
            });
        }
    });
}

/// A transparent listener on 0.0.0.0:`port` in the node namespace, as ztunnel binds one.
fn transparent_listener(port: u16) -> std::net::TcpListener {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_ip_transparent_v4(true).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket
        .bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
        .unwrap();
    socket.listen(128).unwrap();
    socket.into()
}

/// The ztunnel stand-in's listeners, serving, and the redirector loaded with them.
fn load_redirector() -> Redirector {
    let outbound = transparent_listener(OUTBOUND);
    let hbone = transparent_listener(HBONE);
    let plaintext = transparent_listener(PLAINTEXT);
    let redirector = Redirector::load(
        Listeners {
            outbound: outbound.as_fd(),
            inbound_hbone: hbone.as_fd(),
            inbound_plaintext: plaintext.as_fd(),
        },
        MARK,
    )
    .expect("load redirector");
    serve(outbound, "outbound");
    serve(hbone, "hbone");
    serve(plaintext, "plaintext");
    redirector
}

/// Reads the greeting, checks that bytes echo unchanged, returns the greeting.
async fn greeting_and_echo(mut stream: TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8];
    while byte[0] != b'\n' {
        timed(stream.read_exact(&mut byte)).await.unwrap();
        line.push(byte[0]);
    }
    let sent: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let mut back = vec![0u8; sent.len()];
    let (mut r, mut w) = stream.split();
    let (wrote, read) =
        timed(async { tokio::join!(w.write_all(&sent), r.read_exact(&mut back)) }).await;
    wrote.unwrap();
    read.unwrap();
    assert!(sent == back, "echoed bytes differ");
    String::from_utf8(line).unwrap().trim_end().to_string()
}

async fn greeting_from(pod: &Pod, dst: SocketAddr) -> String {
    greeting_and_echo(pod.connect(dst).await).await
}

#[test]
fn netns_ebpf_check_kernel_passes() {
    run_isolated("netns_ebpf_check_kernel_passes", || async {
        mesh_ebpf::check_kernel().expect("this machine runs the capture program");
    });
}

#[test]
fn netns_ebpf_ambient_pod_outbound_keeps_original_destination() {
    run_isolated(
        "netns_ebpf_ambient_pod_outbound_keeps_original_destination",
        || async {
            let [pod] = node_with_pods();
            let mut redirector = load_redirector();
            redirector.attach(pod.ifindex, Role::AmbientPod).unwrap();
            assert_eq!(redirector.attached(), vec![(pod.ifindex, Role::AmbientPod)]);
            // 10.99.0.5 exists nowhere: only capture can answer.
            let dst: SocketAddr = "10.99.0.5:80".parse().unwrap();
            assert_eq!(greeting_from(&pod, dst).await, "outbound 10.99.0.5:80");
            let dst: SocketAddr = "10.99.0.6:15008".parse().unwrap();
            assert_eq!(greeting_from(&pod, dst).await, "outbound 10.99.0.6:15008");
        },
    );
}

#[test]
fn netns_ebpf_ingress_steers_local_ambient_pods_only() {
    run_isolated(
        "netns_ebpf_ingress_steers_local_ambient_pods_only",
        || async {
            let [client, ambient, outside] = node_with_pods();
            outside.serve(8080, "outside");
            let mut redirector = load_redirector();
            redirector.attach(client.ifindex, Role::Ingress).unwrap();
            redirector.set_local_ambient(ambient.ip, true).unwrap();

            let hbone = greeting_from(&client, ambient.addr(HBONE)).await;
            assert_eq!(hbone, format!("hbone {}", ambient.addr(HBONE)));
            let plain = greeting_from(&client, ambient.addr(80)).await;
            assert_eq!(plain, format!("plaintext {}", ambient.addr(80)));
            let direct = greeting_from(&client, outside.addr(8080)).await;
            assert_eq!(direct, format!("outside {}", outside.addr(8080)));

            // Once the pod leaves the mesh its address is no longer captured.
            ambient.serve(80, "ambient");
            redirector.set_local_ambient(ambient.ip, false).unwrap();
            let direct = greeting_from(&client, ambient.addr(80)).await;
            assert_eq!(direct, format!("ambient {}", ambient.addr(80)));
        },
    );
}

#[test]
fn netns_ebpf_transparent_socket_gets_replies() {
    run_isolated("netns_ebpf_transparent_socket_gets_replies", || async {
        let [server, other] = node_with_pods();
        server.serve(8080, "server");
        let mut redirector = load_redirector();
        redirector.attach(server.ifindex, Role::AmbientPod).unwrap();
        // As ztunnel delivers a connection: from the node, with the client pod's address.
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_ip_transparent_v4(true).unwrap();
        socket.bind(&other.addr(0).into()).unwrap();
        socket.set_nonblocking(true).unwrap();
        let socket = TcpSocket::from_std_stream(socket.into());
        let stream = timed(socket.connect(server.addr(8080))).await.unwrap();
        assert_eq!(stream.local_addr().unwrap().ip(), other.ip);
        let greeting = greeting_and_echo(stream).await;
        assert_eq!(greeting, format!("server {}", server.addr(8080)));
    });
}

#[test]
fn netns_ebpf_detach_and_drop_stop_capture() {
    run_isolated("netns_ebpf_detach_and_drop_stop_capture", || async {
        let [client, server] = node_with_pods();
        server.serve(8080, "server");
        let dst = server.addr(8080);
        let captured = format!("outbound {dst}");
        let direct = format!("server {dst}");
        let mut redirector = load_redirector();

        redirector.attach(client.ifindex, Role::AmbientPod).unwrap();
        assert_eq!(greeting_from(&client, dst).await, captured);
        redirector.detach(client.ifindex).unwrap();
        assert_eq!(redirector.attached(), vec![]);
        assert_eq!(greeting_from(&client, dst).await, direct);
        redirector.detach(client.ifindex).unwrap();

        // Re-attaching with another role replaces the role: the server is not ambient.
        redirector.attach(client.ifindex, Role::AmbientPod).unwrap();
        assert_eq!(greeting_from(&client, dst).await, captured);
        redirector.attach(client.ifindex, Role::Ingress).unwrap();
        assert_eq!(redirector.attached(), vec![(client.ifindex, Role::Ingress)]);
        assert_eq!(greeting_from(&client, dst).await, direct);

        redirector.attach(client.ifindex, Role::AmbientPod).unwrap();
        assert_eq!(greeting_from(&client, dst).await, captured);
        drop(redirector);
        assert_eq!(greeting_from(&client, dst).await, direct);
    });
}

#[test]
fn netns_ebpf_errors_name_the_problem() {
    run_isolated("netns_ebpf_errors_name_the_problem", || async {
        let listener = transparent_listener(OUTBOUND);
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let load_with = |hbone: std::os::fd::BorrowedFd<'_>| {
            Redirector::load(
                Listeners {
                    outbound: listener.as_fd(),
                    inbound_hbone: hbone,
                    inbound_plaintext: listener.as_fd(),
                },
                MARK,
            )
        };
        for (fd, problem) in [
            (udp.as_fd(), "is not a TCP socket"),
            (plain.as_fd(), "lacks IP_TRANSPARENT"),
        ] {
            let err = load_with(fd).err().expect("a listener ztunnel cannot use");
            assert!(
                matches!(
                    err,
                    mesh_ebpf::Error::BadListener { which: "inbound HBONE", problem: p } if p == problem
                ),
                "{err}"
            );
        }

        let mut redirector = load_with(listener.as_fd()).unwrap();
        let err = redirector.attach(9999, Role::Ingress).unwrap_err();
        assert!(
            matches!(err, mesh_ebpf::Error::Interface { ifindex: 9999, .. }),
            "{err}"
        );
        assert_eq!(redirector.attached(), vec![]);
        redirector.detach(9999).unwrap();

        // A pod deleted before its interface is detached: the link died with the veth.
        let [pod] = node_with_pods();
        redirector.attach(pod.ifindex, Role::AmbientPod).unwrap();
        let ifindex = pod.ifindex;
        drop(pod);
        redirector.detach(ifindex).unwrap();
        assert_eq!(redirector.attached(), vec![]);
    });
}
