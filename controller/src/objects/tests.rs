use std::fs;

use super::*;

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: echo, namespace: default}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-1, namespace: default, labels: {app: echo}}
spec:
  nodeName: node1
  serviceAccountName: echo
  containers: [{name: echo, image: echo}]
status: {podIP: 10.0.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: default}
spec:
  nodeName: node2
  containers: [{name: sleep, image: sleep}]
status: {podIP: 10.0.2.7}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  selector: {app: echo}
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: 8080}]
"#;

const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/default]}}]}]
"#;

const BROKEN: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: default}
spec: {nodeName: node1, containers: [{name: c, image: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: bad-ip, namespace: default}
spec: {nodeName: node1, containers: [{name: c, image: c}]}
status: {podIP: not-an-ip}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec: {ports: [{port: 81}]}
"#;

/// Writes `files` into a fresh directory, loads it, and removes it again.
fn load(name: &str, files: &[(&str, &str)]) -> (Objects, Vec<ObjectError>) {
    let dir = std::env::temp_dir().join(format!("objects-{name}-{}", std::process::id()));
    fs::create_dir_all(dir.join("sub")).unwrap();
    for (file, text) in files {
        fs::write(dir.join(file), text).unwrap();
    }
    let loaded = load_dir(&dir, "cluster.local").unwrap();
    let _ = fs::remove_dir_all(&dir);
    loaded
}

#[test]
fn a_directory_of_manifests_loads_into_the_model() {
    let (objects, errors) = load(
        "ok",
        &[
            ("app.yaml", APP),
            ("sub/policy.yml", POLICY),
            ("notes.txt", "x"),
        ],
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(objects.namespaces.len(), 1);
    assert_eq!(objects.pods.len(), 2);
    assert_eq!(objects.services.len(), 1);
    assert_eq!(objects.service_accounts.len(), 1);
    let policy: Vec<_> = objects.custom("AuthorizationPolicy").collect();
    assert_eq!(policy.len(), 1);
    assert_eq!(policy[0].metadata.name.as_deref(), Some("allow-sleep"));
    assert_eq!(
        policy[0].spec["selector"]["matchLabels"]["app"],
        serde_json::json!("echo")
    );
}

#[test]
fn placement_follows_pods_nodes_and_service_accounts() {
    let (objects, _) = load("placement", &[("app.yaml", APP)]);
    let echo = Identity::new("cluster.local", "default", "echo").unwrap();
    let default_sa = Identity::new("cluster.local", "default", "default").unwrap();
    assert!(objects.scheduled_on(&echo, "node1"));
    assert!(!objects.scheduled_on(&echo, "node2"));
    assert!(
        objects.scheduled_on(&default_sa, "node2"),
        "no serviceAccountName: default"
    );
}

#[test]
fn malformed_objects_are_named_and_skipped() {
    let (objects, errors) = load(
        "broken",
        &[
            ("a-app.yaml", APP),
            ("b-broken.yaml", BROKEN),
            ("c-garbage.yaml", "kind: Pod\nmetadata: {name: x\n  : ]["),
        ],
    );
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let has = |needle: &str| shown.iter().any(|e| e.contains(needle));
    assert!(
        has("Pod default/pending: spec") || has("pending: status.podIP"),
        "{shown:#?}"
    );
    assert!(
        has("Pod default/bad-ip: status.podIP \"not-an-ip\""),
        "{shown:#?}"
    );
    assert!(
        has("Deployment default/web: apps/v1 Deployment is not a kind"),
        "{shown:#?}"
    );
    assert!(
        has("b-broken.yaml (document 4): Service default/echo: defined twice"),
        "{shown:#?}"
    );
    assert!(
        has("c-garbage.yaml (document 1): ?: broken YAML"),
        "{shown:#?}"
    );
    assert_eq!(errors.len(), 5, "{shown:#?}");
    // Everything valid still loaded.
    assert_eq!(objects.pods.len(), 2);
    assert_eq!(
        objects.services[&("default".to_owned(), "echo".to_owned())]
            .spec
            .as_ref()
            .unwrap()
            .ports
            .as_ref()
            .unwrap()[0]
            .port,
        80,
        "the first definition is kept"
    );
}

/// A followed directory: each load gives exactly what reading it afresh gives, reading
/// only the files that changed or appeared.
#[test]
fn a_followed_directory_rereads_only_what_changed() {
    let dir = std::env::temp_dir().join(format!("objects-follow-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::write(dir.join("b-app.yaml"), APP).unwrap();
    fs::write(dir.join("sub/policy.yml"), POLICY).unwrap();
    let mut source = DirSource::new(&dir, "cluster.local");
    let mut step = |reread: usize, what: &str| {
        let got = source.load().unwrap();
        assert_eq!(source.reread(), reread, "{what}: files read");
        let fresh = load_dir(&dir, "cluster.local").unwrap();
        assert_eq!(format!("{got:?}"), format!("{fresh:?}"), "{what}");
        got
    };
    let (objects, errors) = step(2, "first load");
    assert!(errors.is_empty() && objects.pods.len() == 2, "{errors:?}");
    step(0, "nothing changed");

    // An earlier file now defines echo too: the later definition is the duplicate.
    fs::write(dir.join("a-broken.yaml"), BROKEN).unwrap();
    let (objects, errors) = step(1, "a file added");
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(
        shown
            .iter()
            .any(|e| e.contains("b-app.yaml (document 5): Service default/echo: defined twice")),
        "{shown:#?}"
    );
    let echo = &objects.services[&("default".to_owned(), "echo".to_owned())];
    let port = echo.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port;
    assert_eq!(port, 81, "the first file's definition is kept");

    fs::write(dir.join("b-app.yaml"), APP.replace("10.0.1.5", "10.0.1.99")).unwrap();
    let (objects, _) = step(1, "a file changed");
    let echo_1 = &objects.pods[&("default".to_owned(), "echo-1".to_owned())];
    let ip = echo_1.status.as_ref().unwrap().pod_ip.as_deref();
    assert_eq!(ip, Some("10.0.1.99"));

    fs::remove_file(dir.join("a-broken.yaml")).unwrap();
    let (objects, errors) = step(0, "a file removed");
    assert!(errors.is_empty(), "{errors:?}");
    let echo = &objects.services[&("default".to_owned(), "echo".to_owned())];
    assert_eq!(
        echo.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port,
        80
    );

    // An unreadable directory fails the load and leaves what was read.
    fs::rename(&dir, dir.with_extension("moved")).unwrap();
    assert!(source.load().is_err());
    fs::rename(dir.with_extension("moved"), &dir).unwrap();
    let (objects, _) = source.load().unwrap();
    assert_eq!((source.reread(), objects.pods.len()), (0, 2));
    let _ = fs::remove_dir_all(&dir);
}
