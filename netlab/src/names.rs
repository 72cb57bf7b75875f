//! Names of the namespaces a test run creates, and the sweep of those a killed run left
//! behind. A name is `mt<pid>-<n>-<role>`: the pid of the process that made it and a
//! counter, so concurrent test processes never collide, and a namespace whose pid is gone
//! is known to be a leftover. Only names of exactly that shape are ever touched.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use super::ns::{remove, ETC_DIR, NETNS_DIR};

/// What every name this harness gives starts with.
pub const PREFIX: &str = "mt";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh `mt<pid>-<n>` stem for one topology; its namespaces append `-<role>`.
pub fn fresh_stem() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}{}-{n}", std::process::id())
}

/// The pid in a name of our shape, `None` for any other name.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, tail) = rest.split_once('-')?;
    let (n, role) = tail.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(n) || role.is_empty() {
        return None;
    }
    pid.parse().ok()
}

/// Deletes namespaces (and their processes) and work directories left by test processes
/// that no longer run. Returns the namespaces removed.
pub fn sweep_leftovers() -> Vec<String> {
    let dead = |name: &str| {
        owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let mut removed = Vec::new();
    for name in list(Path::new(NETNS_DIR)) {
        if dead(&name) {
            remove(&name);
            removed.push(name);
        }
    }
    for name in list(Path::new(ETC_DIR)) {
        if dead(&name) {
            let _ = std::fs::remove_dir_all(Path::new(ETC_DIR).join(&name));
        }
    }
    for name in list(&std::env::temp_dir()) {
        if dead(&name) {
            let _ = std::fs::remove_dir_all(std::env::temp_dir().join(&name));
        }
    }
    removed
}

fn list(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_shape_has_an_owner() {
        assert_eq!(owner_pid("mt123-0-fabric"), Some(123));
        assert_eq!(owner_pid("mt123-4-node1-client"), Some(123));
        assert_eq!(owner_pid("mt123-fabric"), None);
        assert_eq!(owner_pid("mtx-0-fabric"), None);
        assert_eq!(owner_pid("mt123-0-"), None);
        assert_eq!(owner_pid("cni-1234"), None);
        assert!(owner_pid(&format!("{}-node", fresh_stem())).is_some());
    }
}
