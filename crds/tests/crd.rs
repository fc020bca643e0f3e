//! The checked-in CRD matches the types, is structural, and the fixtures
//! say what they must. (The API server's verdict on the fixtures is tested
//! against a real kube-apiserver in `e2e/tests/api.rs`.)

use std::path::{Path, PathBuf};

use clustered_api::v1alpha1::{ClusteredService, PortMode, WorkerCount, crd_yaml};
use serde_json::Value;

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(repo_path(&format!("crds/tests/fixtures/{kind}")))
        .expect("fixture dir")
        .map(|e| e.expect("dir entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no {kind} fixtures");
    files
}

#[test]
fn checked_in_crd_matches_the_types() {
    let checked_in = std::fs::read_to_string(repo_path("crds/clusteredservice.yaml")).expect("read CRD");
    assert!(
        checked_in == crd_yaml().expect("generate CRD"),
        "crds/clusteredservice.yaml is stale: run `cargo run -p clustered-api --bin crdgen > crds/clusteredservice.yaml`"
    );
}

#[test]
fn chart_crd_is_the_generated_one() {
    let chart = repo_path("charts/clustered/crds/clusteredservice.yaml");
    assert!(
        std::fs::read_to_string(chart).expect("read chart CRD") == crd_yaml().expect("generate CRD"),
        "charts/clustered/crds/clusteredservice.yaml is stale: cp crds/clusteredservice.yaml charts/clustered/crds/"
    );
}

/// Every schema node must say its type, the rule of structural schemas,
/// except where Kubernetes allows otherwise.
fn assert_structural(node: &Value, at: &str) {
    let obj = node.as_object().unwrap_or_else(|| panic!("{at}: schema is not an object"));
    for banned in ["$ref", "oneOf", "anyOf", "allOf", "not", "additionalItems"] {
        assert!(!obj.contains_key(banned), "{at}: `{banned}` is not allowed in a structural schema");
    }
    let typed = obj.contains_key("type")
        || obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
        || obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    assert!(typed, "{at}: no type");
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        assert_eq!(obj.get("type"), Some(&Value::from("object")), "{at}: properties without type: object");
        for (name, child) in props {
            assert_structural(child, &format!("{at}.{name}"));
        }
    }
    if let Some(items) = obj.get("items") {
        assert_structural(items, &format!("{at}[]"));
    }
    if let Some(extra) = obj.get("additionalProperties").filter(|v| v.is_object()) {
        assert_structural(extra, &format!("{at}{{}}"));
    }
}

#[test]
fn crd_schema_is_structural() {
    let crd: Value = serde_yaml::from_str(&crd_yaml().expect("generate CRD")).expect("parse CRD");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_structural(&version["schema"]["openAPIV3Schema"], "openAPIV3Schema");
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "csvc");
    let scale = &version["subresources"]["scale"];
    assert_eq!(scale["specReplicasPath"], ".spec.replicas");
    assert_eq!(scale["statusReplicasPath"], ".status.replicas");
    assert_eq!(scale["labelSelectorPath"], ".status.selector");
    assert!(version["subresources"]["status"].is_object());
}

#[test]
fn valid_fixtures_and_the_example_parse_with_defaults() {
    let mut files = fixtures("valid");
    files.push(repo_path("examples/clusteredservice.yaml"));
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read fixture");
        let csvc: ClusteredService = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(csvc.spec.app_container_name().is_some(), "{}: no app container", file.display());
    }
    let minimal: ClusteredService = serde_yaml::from_str(
        &std::fs::read_to_string(repo_path("crds/tests/fixtures/valid/minimal.yaml")).expect("read"),
    )
    .expect("parse");
    assert_eq!(minimal.spec.replicas, 1);
    assert_eq!(minimal.spec.port, 8080);
    assert_eq!(minimal.spec.admin_port, 9901);
    assert_eq!(minimal.spec.port_mode, PortMode::Auto);
    assert_eq!(minimal.spec.workers.count, WorkerCount::Auto);
    assert_eq!(minimal.spec.app_container_name(), Some("app"));
}

#[test]
fn every_invalid_fixture_names_the_error_it_must_get() {
    for file in fixtures("invalid") {
        let text = std::fs::read_to_string(&file).expect("read fixture");
        let expect = text.lines().next().and_then(|l| l.strip_prefix("# expect: "));
        assert!(
            expect.is_some_and(|e| e.len() > 10),
            "{}: first line must be `# expect: <message the API server returns>`",
            file.display()
        );
    }
}

#[test]
fn worker_count_accepts_auto_and_numbers_only() {
    let parse = |s: &str| serde_json::from_str::<WorkerCount>(s);
    assert_eq!(parse(r#""auto""#).expect("auto"), WorkerCount::Auto);
    assert_eq!(parse("3").expect("3"), WorkerCount::Fixed(3));
    assert_eq!(parse(r#""4""#).expect("\"4\""), WorkerCount::Fixed(4));
    assert!(parse(r#""lots""#).is_err());
    assert_eq!(parse("null").expect("null"), WorkerCount::Auto, "null is the default, as the schema allows it");
    assert_eq!(serde_json::to_string(&WorkerCount::Auto).expect("ser"), r#""auto""#);
    assert_eq!(serde_json::to_string(&WorkerCount::Fixed(2)).expect("ser"), "2");
}
