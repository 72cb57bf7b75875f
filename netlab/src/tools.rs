//! Real clients and servers run inside a namespace: `curl` and Python's `http.server`,
//! as a pod would run them. Test helpers only: they panic with the tool's stderr.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use super::ns::Netns;
use super::topology::Pod;
use crate::process::{ChildGuard, Spawn, Stdout};

impl Netns {
    /// `python3 -m http.server` serving `root` on `ip:port`, its request log (one line per
    /// request, starting with the client's address) in `log`; returns once it accepts.
    pub fn http_server(&self, ip: IpAddr, port: u16, root: &Path, log: &Path) -> ChildGuard {
        let server = self.spawn(&Spawn {
            name: format!("http.server in {}", self.name()),
            program: "python3".into(),
            args: vec![
                "-m".into(),
                "http.server".into(),
                port.to_string(),
                "--bind".into(),
                ip.to_string(),
                "--directory".into(),
                root.display().to_string(),
            ],
            env: vec![],
            stdout: Stdout::Discard,
            stderr: log.to_owned(),
            nofile: 1024,
        });
        self.wait_tcp(
            SocketAddr::new(ip, port),
            Duration::from_secs(10),
            "http.server",
        );
        server
    }

    /// `curl -sS` of `url` from inside the namespace (5 s at most); the body, or curl's
    /// error message.
    pub fn curl(&self, url: &str) -> Result<String, String> {
        let out = self
            .command("curl")
            .args(["-sS", "--max-time", "5", url])
            .output()
            .map_err(|e| format!("running curl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "curl {url} from {}: {}",
                self.name(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Pod {
    /// An http.server on the pod's port 8080 whose file `hello` reads
    /// `hello from <pod>\n`; its root and request log go in `work_dir`.
    pub fn hello_server(&self, work_dir: &Path) -> ChildGuard {
        let name = &self.spec.name;
        let root = work_dir.join(format!("www-{name}"));
        std::fs::create_dir_all(&root)
            .and_then(|()| std::fs::write(root.join("hello"), format!("hello from {name}\n")))
            .unwrap_or_else(|e| panic!("writing {}: {e}", root.display()));
        let log = work_dir.join(format!("http-{name}.log"));
        self.http_server(IpAddr::V4(self.ip), 8080, &root, &log)
    }
}

/// The first JSON access-log record that `matches`, read again from `read` every 50 ms
/// (a record is written when its connection closes); `None` once `limit` has passed.
pub fn wait_for_record(
    read: impl Fn() -> String,
    matches: impl Fn(&serde_json::Value) -> bool,
    limit: Duration,
) -> Option<serde_json::Value> {
    let start = std::time::Instant::now();
    loop {
        let found = (read().lines())
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|r| matches(r));
        if found.is_some() || start.elapsed() >= limit {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
