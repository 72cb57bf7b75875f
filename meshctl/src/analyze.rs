//! `meshctl analyze DIR`: checks a directory of manifests before it reaches the mesh.
//!
//! The directory is read with the controller's own loader, so what this command calls
//! malformed is exactly what the controller would leave out; the checks then look for
//! references that point at nothing (selectors, principals, routes, waypoints) and for
//! enrolled namespaces the mesh cannot serve. Each finding names its file, the object and
//! a one-line fix. It never changes the files.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use controller::objects::{self, CustomObject, ObjectError, Objects};
use serde::Serialize;
use serde_json::Value;

#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    /// Directory of Kubernetes YAML (as read by the controller's local mode).
    pub dir: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Trust domain principals are checked against.
    #[arg(long, default_value = mesh_core::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Severity {
    Error,
    Warning,
    Info,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "ERROR",
            Severity::Warning => "WARNING",
            Severity::Info => "INFO",
        })
    }
}

/// What the analysis can report, each with its stable code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    Malformed,
    UnreadKind,
    Untranslatable,
    SelectsNoPod,
    UnknownServiceAccount,
    MissingParent,
    MissingBackend,
    MissingWaypoint,
    EnrolledUnscheduled,
    EnrolledEmpty,
}

impl Check {
    fn code(self) -> &'static str {
        match self {
            Check::Malformed => "MESH0001",
            Check::UnreadKind => "MESH0002",
            Check::Untranslatable => "MESH0003",
            Check::SelectsNoPod => "MESH0004",
            Check::UnknownServiceAccount => "MESH0005",
            Check::MissingParent => "MESH0006",
            Check::MissingBackend => "MESH0007",
            Check::MissingWaypoint => "MESH0008",
            Check::EnrolledUnscheduled => "MESH0009",
            Check::EnrolledEmpty => "MESH0010",
        }
    }

    fn severity(self) -> Severity {
        match self {
            Check::Malformed
            | Check::Untranslatable
            | Check::MissingParent
            | Check::MissingBackend
            | Check::MissingWaypoint => Severity::Error,
            Check::SelectsNoPod
            | Check::UnknownServiceAccount
            | Check::EnrolledUnscheduled
            | Check::EnrolledEmpty => Severity::Warning,
            Check::UnreadKind => Severity::Info,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub code: &'static str,
    pub file: String,
    /// `Kind namespace/name`.
    pub object: String,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}: {}: {}. Fix: {}",
            self.severity, self.code, self.file, self.object, self.message, self.fix
        )
    }
}

/// Prints the findings; Ok(false) when any is an error.
pub fn run(args: &AnalyzeArgs) -> anyhow::Result<bool> {
    let findings = analyze(&args.dir, &args.trust_domain)?;
    match args.output {
        Output::Text => {
            for f in &findings {
                println!("{f}");
            }
            let errors = findings
                .iter()
                .filter(|f| f.severity == Severity::Error)
                .count();
            eprintln!(
                "{} finding(s), {errors} error(s) in {}",
                findings.len(),
                args.dir.display()
            );
        }
        Output::Json => println!("{}", serde_json::to_string_pretty(&findings)?),
    }
    Ok(!findings.iter().any(|f| f.severity == Severity::Error))
}

/// Every finding for the manifests below `dir`, sorted by file, then object.
pub fn analyze(dir: &Path, trust_domain: &str) -> anyhow::Result<Vec<Finding>> {
    let (objects, load_errors) =
        objects::load_dir(dir, trust_domain).with_context(|| format!("read {}", dir.display()))?;
    let files = FileIndex::build(dir).with_context(|| format!("read {}", dir.display()))?;
    let mut a = Analysis {
        objects: &objects,
        files: &files,
        findings: Vec::new(),
    };
    a.load_errors(&load_errors);
    a.translation();
    a.selectors();
    a.principals();
    a.routes();
    a.waypoints();
    a.enrolled_namespaces(&load_errors);
    let mut findings = a.findings;
    findings.sort_by(|x, y| (&x.file, &x.object, x.code).cmp(&(&y.file, &y.object, y.code)));
    Ok(findings)
}

/// Which file defined each object: `Kind namespace/name` -> file, first definition kept.
struct FileIndex(BTreeMap<String, String>);

impl FileIndex {
    fn build(dir: &Path) -> std::io::Result<FileIndex> {
        let mut files = Vec::new();
        objects::collect_yaml(dir, &mut files)?;
        files.sort();
        let mut index = BTreeMap::new();
        for file in files {
            let text = std::fs::read_to_string(&file)?;
            let shown = file
                .strip_prefix(dir)
                .unwrap_or(&file)
                .display()
                .to_string();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                // Broken documents are reported by the loader; here they only end the file.
                let Ok(value) = <serde_yaml::Value as serde::Deserialize>::deserialize(doc) else {
                    break;
                };
                let text =
                    |v: Option<&serde_yaml::Value>| v.and_then(|v| v.as_str()).map(str::to_owned);
                let meta = value.get("metadata");
                let (Some(kind), Some(name)) = (
                    text(value.get("kind")),
                    text(meta.and_then(|m| m.get("name"))),
                ) else {
                    continue;
                };
                let ns = text(meta.and_then(|m| m.get("namespace")))
                    .unwrap_or_else(|| "default".to_owned());
                let object = if kind == "Namespace" {
                    format!("Namespace {name}")
                } else {
                    format!("{kind} {ns}/{name}")
                };
                index.entry(object).or_insert_with(|| shown.clone());
            }
        }
        Ok(FileIndex(index))
    }

    fn file(&self, object: &str) -> String {
        self.0.get(object).cloned().unwrap_or_else(|| "?".into())
    }
}

struct Analysis<'a> {
    objects: &'a Objects,
    files: &'a FileIndex,
    findings: Vec<Finding>,
}

type Labels = BTreeMap<String, String>;

fn meta_key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        meta.namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        meta.name.clone().unwrap_or_default(),
    )
}

fn custom_object(obj: &CustomObject) -> String {
    let (ns, name) = meta_key(&obj.metadata);
    format!("{} {ns}/{name}", obj.kind)
}

fn match_labels(spec: &Value, path: &[&str]) -> Option<Labels> {
    let mut v = spec;
    for p in path {
        v = v.get(p)?;
    }
    serde_json::from_value(v.clone()).ok()
}

impl Analysis<'_> {
    fn report(&mut self, check: Check, object: String, message: String, fix: &str) {
        self.findings.push(Finding {
            severity: check.severity(),
            code: check.code(),
            file: self.files.file(&object),
            object,
            message,
            fix: fix.to_owned(),
        });
    }

    fn load_errors(&mut self, errors: &[ObjectError]) {
        for e in errors {
            // The loader names "file (document N)"; the document number stays in the message.
            let (file, doc) = match e.origin.rsplit_once(" (") {
                Some((file, doc)) => (file.to_owned(), format!(" ({doc}")),
                None => (e.origin.clone(), String::new()),
            };
            let (check, fix) = if e.reason.contains("is not a kind the mesh reads") {
                (
                    Check::UnreadKind,
                    "nothing to do if the object is for Kubernetes alone; the mesh ignores it",
                )
            } else {
                (
                    Check::Malformed,
                    "correct the object so it parses as its kind (the controller leaves it out until then)",
                )
            };
            self.findings.push(Finding {
                severity: check.severity(),
                code: check.code(),
                file,
                object: e.object.clone(),
                message: format!("{}{doc}", e.reason),
                fix: fix.to_owned(),
            });
        }
    }

    /// Policies the controller parses but cannot turn into ztunnel config.
    fn translation(&mut self) {
        let (_, errors) = controller::translate::authorizations(self.objects);
        for e in errors {
            self.report(
                Check::Untranslatable,
                e.object.clone(),
                e.reason.clone(),
                "change the policy as the message says; until then ztunnels do not enforce it",
            );
        }
    }

    fn pods_matching(&self, ns: Option<&str>, selector: &Labels) -> usize {
        self.objects
            .pods
            .iter()
            .filter(|((pns, _), pod)| {
                let labels = pod.metadata.labels.clone().unwrap_or_default();
                ns.is_none_or(|ns| ns == pns)
                    && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .count()
    }

    fn selectors(&mut self) {
        let mut found = Vec::new();
        for kind in ["AuthorizationPolicy", "PeerAuthentication"] {
            for obj in self.objects.custom(kind) {
                let Some(selector) = match_labels(&obj.spec, &["selector", "matchLabels"]) else {
                    continue;
                };
                if selector.is_empty() {
                    continue;
                }
                let (ns, _) = meta_key(&obj.metadata);
                // A selector in the root namespace picks workloads of every namespace.
                let scope = (ns != controller::translate::authz::ROOT_NAMESPACE).then_some(&ns);
                if self.pods_matching(scope.map(String::as_str), &selector) == 0 {
                    let shown: Vec<String> =
                        selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    found.push((
                        custom_object(obj),
                        format!(
                            "selector {} matches no pod in namespace {ns}",
                            shown.join(",")
                        ),
                    ));
                }
            }
        }
        for (object, message) in found {
            self.report(
                Check::SelectsNoPod,
                object,
                message,
                "fix the selector's labels or the namespace; as written the policy applies to nothing",
            );
        }
    }

    /// Service accounts in use: ServiceAccount objects and pods' `serviceAccountName`.
    fn service_accounts(&self) -> BTreeSet<(String, String)> {
        let mut out: BTreeSet<_> = self.objects.service_accounts.keys().cloned().collect();
        for ((ns, _), pod) in &self.objects.pods {
            let sa = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".to_owned());
            out.insert((ns.clone(), sa));
        }
        out
    }

    fn principals(&mut self) {
        let known = self.service_accounts();
        let mut found = Vec::new();
        for obj in self.objects.custom("AuthorizationPolicy") {
            for principal in policy_principals(&obj.spec) {
                let Some((ns, sa)) = principal_account(&principal) else {
                    continue;
                };
                if !known.contains(&(ns.clone(), sa.clone())) {
                    found.push((
                        custom_object(obj),
                        format!("principal {principal} names service account {ns}/{sa}, which no ServiceAccount or pod uses"),
                    ));
                }
            }
        }
        for (object, message) in found {
            self.report(
                Check::UnknownServiceAccount,
                object,
                message,
                "correct the namespace or service account name, or add the ServiceAccount",
            );
        }
    }

    fn routes(&mut self) {
        let gateways: BTreeSet<_> = self
            .objects
            .custom
            .get("Gateway")
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let mut found = Vec::new();
        for route in self.objects.custom("HTTPRoute") {
            let (ns, _) = meta_key(&route.metadata);
            let refs = route.spec.get("parentRefs").and_then(Value::as_array);
            for parent in refs.into_iter().flatten() {
                let r = Ref::read(parent, &ns, "Gateway");
                let exists = match r.kind.as_str() {
                    "Gateway" => gateways.contains(&r.key()),
                    "Service" => self.objects.services.contains_key(&r.key()),
                    _ => continue,
                };
                if !exists {
                    found.push((
                        Check::MissingParent,
                        custom_object(route),
                        format!("parentRef {} does not exist", r),
                    ));
                }
            }
            let rules = route.spec.get("rules").and_then(Value::as_array);
            for rule in rules.into_iter().flatten() {
                let backends = rule.get("backendRefs").and_then(Value::as_array);
                for backend in backends.into_iter().flatten() {
                    let r = Ref::read(backend, &ns, "Service");
                    if r.kind == "Service" && !self.objects.services.contains_key(&r.key()) {
                        found.push((
                            Check::MissingBackend,
                            custom_object(route),
                            format!("backendRef {} does not exist", r),
                        ));
                    }
                }
            }
        }
        for (check, object, message) in found {
            let fix = match check {
                Check::MissingParent => "name an existing Gateway or Service (with its namespace if it is in another) or add it",
                _ => "name an existing Service (with its namespace if it is in another) or add it",
            };
            self.report(check, object, message, fix);
        }
    }

    fn waypoints(&mut self) {
        let o = self.objects;
        let mut labelled: Vec<(String, String, Labels)> = Vec::new();
        for (name, n) in &o.namespaces {
            let labels = n.metadata.labels.clone().unwrap_or_default();
            labelled.push((format!("Namespace {name}"), name.clone(), labels));
        }
        for ((ns, name), s) in &o.services {
            let labels = s.metadata.labels.clone().unwrap_or_default();
            labelled.push((format!("Service {ns}/{name}"), ns.clone(), labels));
        }
        for ((ns, name), p) in &o.pods {
            let labels = p.metadata.labels.clone().unwrap_or_default();
            labelled.push((format!("Pod {ns}/{name}"), ns.clone(), labels));
        }
        let gateways = o.custom.get("Gateway");
        for (object, ns, labels) in labelled {
            let Some(waypoint) = labels.get(USE_WAYPOINT) else {
                continue;
            };
            if waypoint == "none" {
                continue;
            }
            let wns = labels.get(USE_WAYPOINT_NAMESPACE).unwrap_or(&ns).clone();
            if gateways.is_some_and(|g| g.contains_key(&(wns.clone(), waypoint.clone()))) {
                continue;
            }
            self.report(
                Check::MissingWaypoint,
                object,
                format!("label {USE_WAYPOINT}={waypoint} names Gateway {wns}/{waypoint}, which does not exist"),
                "apply the waypoint Gateway (`meshctl waypoint apply`) or correct the label",
            );
        }
    }

    fn enrolled_namespaces(&mut self, load_errors: &[ObjectError]) {
        let mut found = Vec::new();
        for (name, n) in &self.objects.namespaces {
            let labels = n.metadata.labels.clone().unwrap_or_default();
            if labels.get(DATAPLANE_MODE).map(String::as_str) != Some("ambient") {
                continue;
            }
            if self.objects.pods.keys().any(|(ns, _)| ns == name) {
                continue;
            }
            let prefix = format!("Pod {name}/");
            let unscheduled = load_errors
                .iter()
                .filter(|e| e.object.starts_with(&prefix) && e.reason.contains("nodeName"))
                .count();
            found.push((name.clone(), unscheduled));
        }
        for (name, unscheduled) in found {
            let object = format!("Namespace {name}");
            if unscheduled > 0 {
                self.report(
                    Check::EnrolledUnscheduled,
                    object,
                    format!("namespace is enrolled in ambient but its {unscheduled} pod(s) are on no node"),
                    "schedule the pods (set spec.nodeName in local mode) so a ztunnel serves them",
                );
            } else {
                self.report(
                    Check::EnrolledEmpty,
                    object,
                    "namespace is enrolled in ambient but has no pods".into(),
                    "add the namespace's pods, or drop the istio.io/dataplane-mode label if it is unused",
                );
            }
        }
    }
}

const USE_WAYPOINT: &str = "istio.io/use-waypoint";
const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
const DATAPLANE_MODE: &str = controller::translate::DATAPLANE_MODE;

/// A Gateway API reference with its defaults filled in.
struct Ref {
    kind: String,
    namespace: String,
    name: String,
}

impl Ref {
    fn read(v: &Value, ns: &str, default_kind: &str) -> Ref {
        let text = |k: &str| v.get(k).and_then(Value::as_str);
        Ref {
            kind: text("kind").unwrap_or(default_kind).to_owned(),
            namespace: text("namespace").unwrap_or(ns).to_owned(),
            name: text("name").unwrap_or_default().to_owned(),
        }
    }

    fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }
}

impl fmt::Display for Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Every principal an AuthorizationPolicy names (from sources and `source.principal`
/// conditions, positive or negative).
fn policy_principals(spec: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let strings = |v: Option<&Value>, out: &mut Vec<String>| {
        out.extend(
            v.and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned),
        )
    };
    let rules = spec.get("rules").and_then(Value::as_array);
    for rule in rules.into_iter().flatten() {
        let froms = rule.get("from").and_then(Value::as_array);
        for from in froms.into_iter().flatten() {
            let source = from.get("source");
            strings(source.and_then(|s| s.get("principals")), &mut out);
            strings(source.and_then(|s| s.get("notPrincipals")), &mut out);
        }
        let whens = rule.get("when").and_then(Value::as_array);
        for when in whens.into_iter().flatten() {
            if when.get("key").and_then(Value::as_str) == Some("source.principal") {
                strings(when.get("values"), &mut out);
                strings(when.get("notValues"), &mut out);
            }
        }
    }
    out
}

/// (namespace, service account) of an exact `<trust-domain>/ns/<ns>/sa/<sa>` principal;
/// None for patterns, which may match accounts yet to come.
fn principal_account(principal: &str) -> Option<(String, String)> {
    if principal.contains('*') {
        return None;
    }
    let parts: Vec<&str> = principal.split('/').collect();
    match parts.as_slice() {
        [_, "ns", ns, "sa", sa] if !ns.is_empty() && !sa.is_empty() => {
            Some(((*ns).to_owned(), (*sa).to_owned()))
        }
        _ => None,
    }
}
