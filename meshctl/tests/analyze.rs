//! `meshctl analyze` run as a user runs it, against fixture directories that each hold one
//! mistake (and a clean one that holds none).

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/analyze/{name}"))
}

fn analyze(name: &str, json: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshctl"));
    cmd.arg("analyze").arg(fixture(name));
    if json {
        cmd.args(["-o", "json"]);
    }
    cmd.output().expect("meshctl runs")
}

/// (codes found, exit status success) for a fixture, read from the JSON output.
fn codes(name: &str) -> (Vec<String>, bool) {
    let out = analyze(name, true);
    let findings: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{name}: output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let codes = findings
        .as_array()
        .expect("a list of findings")
        .iter()
        .map(|f| {
            f["code"]
                .as_str()
                .expect("each finding has a code")
                .to_owned()
        })
        .collect();
    (codes, out.status.success())
}

#[test]
fn each_fixture_reports_exactly_its_mistake() {
    // (fixture, codes, exit 0?)
    let cases: [(&str, &[&str], bool); 10] = [
        ("malformed", &["MESH0001"], false),
        ("unread-kind", &["MESH0002"], true),
        ("untranslatable", &["MESH0003"], false),
        ("selects-no-pod", &["MESH0004"], true),
        ("unknown-service-account", &["MESH0005"], true),
        ("missing-parent", &["MESH0006"], false),
        ("missing-backend", &["MESH0007"], false),
        ("missing-waypoint", &["MESH0008"], false),
        // The pod without a node is also left out by the loader.
        ("enrolled-unscheduled", &["MESH0001", "MESH0009"], false),
        ("enrolled-empty", &["MESH0010"], true),
    ];
    for (name, want, success) in cases {
        let (mut got, ok) = codes(name);
        got.sort();
        assert_eq!(got, want, "{name}");
        assert_eq!(ok, success, "{name}: exit status");
    }
}

#[test]
fn clean_directory_has_no_findings() {
    let (got, ok) = codes("clean");
    assert_eq!(got, Vec::<String>::new());
    assert!(ok);
    let out = analyze("clean", false);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
}

#[test]
fn text_lines_name_file_object_and_fix() {
    let out = analyze("missing-waypoint", false);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert!(
        lines[0].starts_with(
            "ERROR MESH0008 service.yaml: Service shop/api: label istio.io/use-waypoint=shop-waypoint names Gateway shop/shop-waypoint, which does not exist. Fix: "
        ),
        "{stdout}"
    );

    let out = analyze("malformed", false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("ERROR MESH0001 pod.yaml: Pod shop/web-2: status.podIP \"10.0.1.300\" is not an IP address (document 1). Fix: "),
        "{stdout}"
    );
}

#[test]
fn missing_directory_is_an_error() {
    let out = analyze("no-such-fixture", false);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-fixture"));
}
