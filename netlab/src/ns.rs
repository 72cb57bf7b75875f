//! One named network namespace (`/run/netns/NAME`, as `ip netns add` makes it) owned by
//! the test: commands, child processes and threads run inside it, and it is deleted, with
//! whatever still runs in it, when dropped. It must not outlive its owner: nothing here
//! keeps a namespace across runs (leftovers of a killed run are `sweep`'s business).
#![allow(unsafe_code)]

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{ChildGuard, Spawn};

/// Where `ip netns` keeps the namespaces it names.
pub const NETNS_DIR: &str = "/run/netns";
/// Files here replace those of `/etc` for processes started by `ip netns exec NAME`.
pub const ETC_DIR: &str = "/etc/netns";
/// No DNS inside: a lookup fails at once (nothing listens on the namespace's own
/// loopback) instead of waiting for an answer that cannot come (Python's http.server
/// looks its own address up before it listens).
const RESOLV_CONF: &str = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n";
pub(crate) const HOSTS: &str = "127.0.0.1 localhost\n::1 localhost\n";

/// A network namespace this process created; deleted on drop (also while unwinding).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace with loopback up. Panics (failing the test) when `ip` fails,
    /// e.g. without root or when the name is taken.
    pub fn create(name: &str) -> Netns {
        crate::run("ip", &["netns", "add", name]);
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.ip("link set lo up");
        ns.write_etc("resolv.conf", RESOLV_CONF);
        ns.write_etc("hosts", HOSTS);
        ns
    }

    /// Writes `/etc/<file>` as processes started in this namespace see it (through
    /// `ip netns exec`; threads of this process see the real `/etc`).
    pub fn write_etc(&self, file: &str, text: &str) {
        let dir = Path::new(ETC_DIR).join(&self.name);
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(dir.join(file), text))
            .unwrap_or_else(|e| panic!("writing {}/{file}: {e}", dir.display()));
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file, for `nsenter --net=` or `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// `program` run inside the namespace (`ip netns exec NAME program`); add arguments,
    /// output and environment as for any `Command`.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `ip -n NAME <args>` (whitespace-separated), failing the test with its stderr.
    pub fn ip(&self, args: &str) {
        let mut all = vec!["-n", &self.name];
        all.extend(args.split_whitespace());
        crate::run("ip", &all);
    }

    /// Sets a sysctl of this namespace, e.g. `("net.ipv4.ip_forward", "1")`. The
    /// `/proc/sys/net` tree shows the namespace of the thread that opens it.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value))
            .unwrap_or_else(|e| panic!("sysctl {key}={value} in {}: {e}", self.name));
    }

    /// Starts a child process inside the namespace under a guard that kills and reaps it
    /// when dropped; its stdout/stderr go where `spec` says (see `ChildGuard::describe`).
    pub fn spawn(&self, spec: &Spawn) -> ChildGuard {
        let mut inside = spec.clone();
        inside.program = "ip".into();
        inside.args = ["netns", "exec", &self.name]
            .map(String::from)
            .into_iter()
            .chain([spec.program.display().to_string()])
            .chain(spec.args.iter().cloned())
            .collect();
        ChildGuard::spawn(&inside)
            .unwrap_or_else(|e| panic!("starting {} in {}: {e}", spec.name, self.name))
    }

    /// Runs `f` on a new thread that has entered the namespace and returns its result
    /// (a panic in `f` is passed on). Sockets `f` opens belong to the namespace; `f` may
    /// build its own (current-thread) tokio runtime for async servers and clients.
    pub fn run<F, T>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let path = self.path();
        std::thread::scope(|s| {
            let handle = s.spawn(move || {
                enter(&path);
                f()
            });
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Runs `fut` to completion on a current-thread tokio runtime on a new thread inside
    /// the namespace (see [`Netns::run`]): for clients and short-lived servers.
    pub fn block_on<F>(&self, fut: F) -> F::Output
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        self.run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("tokio runtime in {}: {e}", self.name))
                .block_on(fut)
        })
    }

    /// A multi-thread tokio runtime whose worker and blocking threads all live in the
    /// namespace. Spawn the work (`rt.spawn(...)`): a future given to `block_on` runs on
    /// the calling thread, which stays where it was.
    pub fn runtime(&self, workers: usize) -> tokio::runtime::Runtime {
        let path = self.path();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .on_thread_start(move || enter(&path))
            .build()
            .unwrap_or_else(|e| panic!("tokio runtime in {}: {e}", self.name))
    }

    /// Waits until a TCP connection from inside the namespace to `addr` succeeds; panics
    /// after `limit`, naming `what`.
    pub fn wait_tcp(&self, addr: SocketAddr, limit: Duration, what: &str) {
        let start = Instant::now();
        self.run(|| loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "{what}: {addr} not accepting from {} within {limit:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        });
    }

    /// Pids of the processes whose network namespace this is.
    pub fn pids(&self) -> Vec<u32> {
        pids_in(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove(&self.name);
    }
}

/// Kills what still runs in namespace `name` and deletes it; errors are ignored (this runs
/// in `Drop` and while sweeping, where a half-gone namespace is normal).
pub(crate) fn remove(name: &str) {
    for pid in pids_in(name) {
        if pid == std::process::id() {
            continue;
        }
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .output();
    }
    let _ = Command::new("ip").args(["netns", "del", name]).output();
    let _ = std::fs::remove_dir_all(Path::new(ETC_DIR).join(name));
}

fn pids_in(name: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", name])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Moves the calling thread into the namespace at `path` (other threads stay put).
fn enter(path: &Path) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: `setns` only reads the descriptor, which `file` keeps open for the call, and
    // CLONE_NEWNET changes the network namespace of the calling thread alone; no Rust
    // object depends on which namespace a thread is in.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}
