//! Unmodified clients run inside a test's network namespaces, the way a user's workload
//! would run them.

use crate::netns::Netns;

/// `curl -sS <url>` run in `from` (10 s at most); returns the body, failing the test with
/// curl's error when it fails.
pub fn curl(from: &Netns, url: &str) -> String {
    let out = from
        .command("curl")
        .args(["-sS", "--max-time", "10", url])
        .output()
        .unwrap_or_else(|e| panic!("running curl in {}: {e}", from.name()));
    assert!(
        out.status.success(),
        "curl {url} from {}: {}",
        from.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
