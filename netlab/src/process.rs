//! A child process under test: started with a raised open-file limit, stdout sent to a
//! file or discarded so it can never block the child, stderr kept in a file for
//! diagnostics, and killed when the guard drops, on every exit path of the parent that
//! unwinds or returns.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

/// A binary of this workspace: the environment variable `env` if set, else next to the
/// running executable (or one directory up, for test binaries in `deps/`), else in the
/// workspace's `target/release`.
pub fn workspace_binary(name: &str, env: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return path.into();
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/release")
        .join(name)
}

/// Where the child's stdout goes.
#[derive(Debug, Clone)]
pub enum Stdout {
    Discard,
    File(PathBuf),
}

/// What to run, and how.
#[derive(Debug, Clone)]
pub struct Spawn {
    /// Name used in diagnostics, e.g. "ztunnel node1".
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub stdout: Stdout,
    pub stderr: PathBuf,
    /// Open-file limit to set before `exec`: a proxy holding thousands of connections
    /// needs more descriptors than a login shell's default.
    pub nofile: u64,
}

/// Kills the child (SIGKILL) and reaps it on drop.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    stderr: PathBuf,
}

impl ChildGuard {
    pub fn spawn(spec: &Spawn) -> io::Result<Self> {
        let stdout = match &spec.stdout {
            Stdout::Discard => Stdio::null(),
            Stdout::File(path) => Stdio::from(File::create(path)?),
        };
        let stderr = File::create(&spec.stderr)?;
        // `sh` raises the limit (falling back to the hard limit when not allowed to go
        // higher) and then execs, so the pid is the program's own.
        let script = r#"ulimit -n "$0" 2>/dev/null || ulimit -n "$(ulimit -Hn)"; exec "$@""#;
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(spec.nofile.to_string())
            .arg(&spec.program)
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()?;
        Ok(Self {
            name: spec.name.clone(),
            child,
            stderr: spec.stderr.clone(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the child has already exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr
    }

    /// The last `lines` lines the child wrote to stderr.
    pub fn stderr_tail(&self, lines: usize) -> String {
        match std::fs::read_to_string(&self.stderr) {
            Ok(text) => tail(&text, lines),
            Err(e) => format!("(cannot read {}: {e})", self.stderr.display()),
        }
    }

    /// Whether the child still runs, and what it said last: for error messages.
    pub fn describe(&mut self, lines: usize) -> String {
        let state = match self.exited() {
            Some(status) => format!("exited ({status})"),
            None => "running".to_owned(),
        };
        let stderr = self.stderr_tail(lines);
        let stderr = if stderr.trim().is_empty() {
            "(stderr empty)".to_owned()
        } else {
            format!("stderr:\n{stderr}")
        };
        format!("{} (pid {}) {state}; {stderr}", self.name, self.pid())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, script: &str, dir: &Path) -> Spawn {
        Spawn {
            name: name.to_owned(),
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![],
            stdout: Stdout::Discard,
            stderr: dir.join(format!("{name}.stderr")),
            nofile: 4096,
        }
    }

    #[test]
    fn drop_kills_and_stderr_is_kept() {
        let dir = std::env::temp_dir().join(format!("mesh-process-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = ChildGuard::spawn(&spec(
            "sleeper",
            "echo hello >&2; ulimit -n >&2; sleep 60",
            &dir,
        ))
        .unwrap();
        let pid = child.pid();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(child.exited().is_none());
        assert_eq!(child.stderr_tail(5), "hello\n4096");
        assert!(child.describe(5).contains("running"));
        drop(child);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());

        let mut failing =
            ChildGuard::spawn(&spec("failing", "echo boom >&2; exit 3", &dir)).unwrap();
        for _ in 0..100 {
            if failing.exited().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let described = failing.describe(5);
        assert!(
            described.contains("exited") && described.contains("boom"),
            "{described}"
        );
        drop(failing);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
