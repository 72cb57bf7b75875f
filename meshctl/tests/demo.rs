//! `meshctl demo` and its mesh, run as a user runs them: the manifests pass `meshctl
//! analyze`, and a demo that cannot start its controller says why and leaves nothing
//! behind, in both ways of running it (as root the default builds network namespaces).
//! (The full demo runs in CI as `meshctl demo --check`, which needs the controller and
//! ztunnel binaries built next to meshctl.)

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn meshctl(args: &[&str]) -> Output {
    meshctl_with_pid(args).0
}

/// The output and the pid meshctl ran as (the network namespaces it makes carry it).
fn meshctl_with_pid(args: &[&str]) -> (Output, u32) {
    let child = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("meshctl runs");
    let pid = child.id();
    (child.wait_with_output().expect("meshctl output"), pid)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_demo_mesh_passes_analyze_without_errors() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh");
    let out = meshctl(&["analyze", dir.to_str().unwrap(), "-o", "json"]);
    let findings: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out.stdout)));
    let errors: Vec<&serde_json::Value> = findings
        .as_array()
        .expect("a list of findings")
        .iter()
        .filter(|f| f["severity"] == "ERROR")
        .collect();
    assert!(errors.is_empty(), "analyze found errors: {errors:#?}");
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
}

#[test]
fn a_missing_controller_binary_is_named_with_the_flag_to_pass() {
    let me = env!("CARGO_BIN_EXE_meshctl");
    let out = meshctl(&[
        "demo",
        "--ztunnel",
        me,
        "--controller",
        "/nonexistent/controller",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("no controller binary at /nonexistent/controller")
            && err.contains("--controller PATH"),
        "{err}"
    );
}

/// `false` as the controller: it exits at once, and the demo must report that with the
/// controller's state, remove its work dir (and, as root, its network namespaces) and
/// never start the ztunnels.
#[test]
fn a_controller_that_exits_is_reported_and_the_work_dir_removed() {
    controller_exits(&[]);
}

#[test]
fn a_controller_that_exits_is_reported_and_the_work_dir_removed_on_loopback() {
    controller_exits(&["--loopback"]);
}

fn controller_exits(mode: &[&str]) {
    let me = env!("CARGO_BIN_EXE_meshctl");
    let mut args = vec![
        "demo",
        "--check",
        "--ztunnel",
        me,
        "--controller",
        "/bin/false",
    ];
    args.extend(mode);
    let (out, pid) = meshctl_with_pid(&args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stderr.contains("the controller exited") && stderr.contains("--- controller: exited"),
        "stderr: {stderr}\nstdout: {stdout}"
    );
    assert!(!stdout.contains("started ztunnel"), "{stdout}");
    let removed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Removed "))
        .and_then(|d| d.strip_suffix('.'))
        .unwrap_or_else(|| panic!("no 'Removed <dir>.' line: {stdout}"));
    assert!(!PathBuf::from(removed).exists(), "{removed} left behind");
    let ours = format!("mt{pid}-");
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&ours))
        .collect();
    assert!(left.is_empty(), "network namespaces left behind: {left:?}");
    if mode.is_empty() && stdout.contains("network namespaces") {
        assert!(stdout.contains("Deleted the"), "{stdout}");
    }
}
