//! A private temporary directory for the demo's manifests, tokens, the controller's state
//! and the processes' logs.
//!
//! Removed when dropped, so an error or Ctrl-C leaves nothing behind. It must not hold
//! anything the user needs after the demo: the CA key and tokens in it are throwaway.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    pub fn create() -> Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let name = format!("meshctl-demo-{}-{nanos:x}", std::process::id());
        let path = std::env::temp_dir().join(name);
        DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("create work dir {}", path.display()))?;
        Ok(WorkDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates a private subdirectory.
    pub fn mkdir(&self, name: &str) -> Result<PathBuf> {
        let path = self.path.join(name);
        DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("create {}", path.display()))?;
        Ok(path)
    }

    /// Writes a new file (`name` may be inside a subdirectory made by [`WorkDir::mkdir`]) readable only by `mode`'s owner bits, e.g. 0o600 for keys.
    pub fn write(&self, name: &str, contents: &str, mode: u32) -> Result<PathBuf> {
        let path = self.path.join(name);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .with_context(|| format!("create {}", path.display()))?;
        file.write_all(contents.as_bytes())
            .with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("meshctl: could not remove {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn files_keep_their_mode_and_the_dir_goes_away() {
        let work = WorkDir::create().unwrap();
        let key = work.write("key.pem", "secret", 0o600).unwrap();
        let mode = fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir = work.path().to_owned();
        drop(work);
        assert!(!dir.exists());
    }
}
