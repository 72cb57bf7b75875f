//! `meshctl ztunnel-config` against a real ztunnel: the loopback harness starts two
//! in-process ztunnels (admin on port 0), traffic makes them issue certificates, and the
//! real meshctl binary reads node1's and node2's admin `/config_dump`.

use std::net::SocketAddr;
use std::process::Command;
use std::time::SystemTime;

use mesh_core::testing::echo_server;
use mesh_tests::harness::{echo_roundtrip, Mesh, BASE_CONFIG};

const POLICIES: &str = r#"
authorizationPolicies:
  - metadata: {name: echo-from-default, namespace: default}
    spec:
      selector: {matchLabels: {app: echo}}
      rules:
        - from: [{source: {namespaces: [default]}}]
        - to: [{operation: {ports: ["9000"]}}]
  - metadata: {name: deny-legacy, namespace: istio-system}
    spec:
      action: DENY
      rules: [{from: [{source: {namespaces: [legacy]}}]}]
"#;

fn meshctl(admin: SocketAddr, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .arg("ztunnel-config")
        .args(args)
        .args(["--admin", &format!("http://{admin}")])
        .output()
        .expect("meshctl runs");
    assert!(
        out.status.success(),
        "meshctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The table's rows (header first), split on runs of spaces.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_show_what_the_ztunnel_holds() {
    let mesh = Mesh::start(&format!("{BASE_CONFIG}{POLICIES}")).await;
    echo_server(mesh.addr("2.10", 8080)).await.unwrap();
    let tcp = mesh
        .socks(mesh.ip("1.10"), mesh.addr("2.10", 8080))
        .await
        .expect("client reaches echo");
    echo_roundtrip(tcp, 1024).await;
    let admin = mesh.node1.bound().admin;
    let b = mesh.block;

    let table = tokio::task::spawn_blocking(move || meshctl(admin, &["workloads"]))
        .await
        .unwrap();
    let workloads = rows(&table);
    assert_eq!(
        workloads[0],
        ["NAMESPACE", "NAME", "IP", "NODE", "PROTOCOL", "IDENTITY"]
    );
    assert_eq!(workloads.len(), 5, "{table}");
    assert!(
        workloads.contains(
            &[
                "default",
                "client",
                &format!("127.{b}.1.10"),
                "node1",
                "HBONE",
                "spiffe://cluster.local/ns/default/sa/client",
            ]
            .map(String::from)
            .to_vec()
        ),
        "{table}"
    );

    let table = tokio::task::spawn_blocking(move || meshctl(admin, &["services"]))
        .await
        .unwrap();
    assert_eq!(
        rows(&table),
        [
            vec!["NAMESPACE", "NAME", "VIP", "PORTS", "ENDPOINTS"],
            vec!["default", "echo", &format!("127.{b}.10.1"), "80->8080", "2"],
        ],
        "{table}"
    );

    let table = tokio::task::spawn_blocking(move || meshctl(admin, &["policies"]))
        .await
        .unwrap();
    assert_eq!(
        rows(&table),
        [
            vec!["NAMESPACE", "NAME", "SCOPE", "ACTION", "RULES"],
            vec![
                "default",
                "echo-from-default",
                "WorkloadSelector(app=echo)",
                "ALLOW",
                "2"
            ],
            vec!["istio-system", "deny-legacy", "Global", "DENY", "1"],
        ],
        "{table}"
    );

    // node1 holds the client's certificate since the connection above.
    let table = tokio::task::spawn_blocking(move || meshctl(admin, &["certificates"]))
        .await
        .unwrap();
    let certs = rows(&table);
    assert_eq!(
        certs[0],
        ["IDENTITY", "NOT-BEFORE", "NOT-AFTER", "REFRESH-AT"]
    );
    let client = certs
        .iter()
        .find(|r| r[0] == "spiffe://cluster.local/ns/default/sa/client")
        .unwrap_or_else(|| panic!("client certificate listed: {table}"));
    // RFC 3339 UTC sorts as text: issued within the last hour, refreshed before expiry.
    let at = |offset: i64| {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        time::OffsetDateTime::from_unix_timestamp(now + offset)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let (not_before, not_after, refresh) = (&client[1], &client[2], &client[3]);
    assert!(not_before.ends_with('Z'), "{table}");
    assert!(*not_before >= at(-3600) && *not_before <= at(60), "{table}");
    assert!(refresh > not_before && refresh < not_after, "{table}");
    assert!(
        *not_after > at(23 * 3600) && *not_after <= at(25 * 3600),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_is_the_dump_section() {
    let mesh = Mesh::start(BASE_CONFIG).await;
    let admin = mesh.node2.bound().admin;
    let out = tokio::task::spawn_blocking(move || meshctl(admin, &["workloads", "-o", "json"]))
        .await
        .unwrap();
    let workloads: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let names: Vec<&str> = workloads
        .as_object()
        .expect("workloads by uid")
        .values()
        .filter_map(|w| w["name"].as_str())
        .collect();
    assert_eq!(names.len(), 4, "{out}");
    assert!(names.contains(&"echo2"), "{out}");
}

#[tokio::test]
async fn unreachable_admin_is_a_clear_error() {
    // A port just released: nothing listens there.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_meshctl"))
            .args([
                "ztunnel-config",
                "workloads",
                "--admin",
                &format!("http://{addr}"),
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("connect to {addr}")), "{stderr}");
}
