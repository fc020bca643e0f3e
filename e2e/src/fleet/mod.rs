//! The fleet harness (issue 28): the operator against thousands of
//! ClusteredServices whose pods run on kwok's simulated nodes, and whose
//! clusterds are one [`Simulator`] on this machine.
//!
//! * [`Nodes`]: kwok (`e2e/cluster/kwok`) and the simulated nodes, tainted
//!   so that only the fleet's pods (which tolerate it) land on them.
//! * [`service`]: a fleet ClusteredService, pinned to those nodes.
//! * [`OperatorProcess`]: the operator's release binary, run on this
//!   machine against the cluster, with its RSS, CPU time and metrics.
//! * [`ApiRequests`]: the API server's own request counts, by verb.

pub mod sim;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clustered_api::v1alpha1::ClusteredService;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};

pub use sim::Simulator;

use crate::{Cluster, demo_service, repo_root, wait_for};

/// Label of the simulated nodes (kwok manages the nodes that carry it).
pub const NODE_LABEL: (&str, &str) = ("type", "kwok");
/// Taint of the simulated nodes: no other pod is scheduled there.
pub const NODE_TAINT: &str = "kwok.x-k8s.io/node";
/// Pods per simulated node.
pub const PODS_PER_NODE: usize = 500;

/// kwok and its simulated nodes. [`Nodes::remove`] deletes them and stops kwok.
pub struct Nodes {
    client: Client,
    names: Vec<String>,
}

impl Nodes {
    /// Starts kwok (idempotent) and adds enough nodes for `pods` pods.
    pub async fn add(cluster: &Cluster, prefix: &str, pods: usize) -> anyhow::Result<Nodes> {
        run_script("e2e/cluster/kwok", &["start"]).await?;
        let api: Api<Node> = Api::all(cluster.client.clone());
        let count = pods.div_ceil(PODS_PER_NODE).max(1);
        let mut names = Vec::new();
        for i in 0..count {
            let name = format!("{prefix}-{i}");
            let node: Node = serde_json::from_value(serde_json::json!({
                "metadata": {
                    "name": name,
                    "labels": { NODE_LABEL.0: NODE_LABEL.1, "kubernetes.io/hostname": name },
                    "annotations": { "node.alpha.kubernetes.io/ttl": "0" },
                },
                "spec": { "taints": [{ "key": NODE_TAINT, "value": "fake", "effect": "NoSchedule" }] },
                "status": {
                    "allocatable": { "cpu": "1000", "memory": "4Ti", "pods": PODS_PER_NODE.to_string() },
                    "capacity": { "cpu": "1000", "memory": "4Ti", "pods": PODS_PER_NODE.to_string() },
                },
            }))?;
            let _ = api.delete(&name, &DeleteParams::default()).await;
            api.create(&PostParams::default(), &node).await.with_context(|| format!("creating node {name}"))?;
            names.push(name);
        }
        let nodes = Nodes { client: cluster.client.clone(), names };
        let ready = |n: &Node| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        };
        wait_for(Duration::from_secs(60), "simulated nodes Ready", || async {
            let list = api.list(&ListParams::default().labels(&selector())).await?;
            Ok(nodes.names.iter().all(|name| list.items.iter().any(|n| n.name_any() == *name && ready(n))))
        })
        .await?;
        Ok(nodes)
    }

    /// Deletes the nodes (their pods must be gone: delete the namespace
    /// first, while kwok still completes the pods' deletion) and stops kwok.
    pub async fn remove(self) -> anyhow::Result<()> {
        let api: Api<Node> = Api::all(self.client.clone());
        for name in &self.names {
            let _ = api.delete(name, &DeleteParams::default()).await;
        }
        wait_for(Duration::from_secs(60), "simulated nodes deleted", || async {
            Ok(api.list(&ListParams::default().labels(&selector())).await?.items.is_empty())
        })
        .await?;
        run_script("e2e/cluster/kwok", &["stop"]).await
    }
}

fn selector() -> String {
    format!("{}={}", NODE_LABEL.0, NODE_LABEL.1)
}

async fn run_script(script: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = tokio::process::Command::new(repo_root().join(script))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {script}"))?;
    if !out.status.success() {
        bail!("{script} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A fleet ClusteredService: `replicas` pods of `workers` workers, on the
/// simulated nodes, asked for their status on the simulator's port.
pub fn service(name: &str, replicas: i32, workers: u32, admin_port: u16) -> ClusteredService {
    demo_service(name, |v| {
        v["metadata"]["labels"] = serde_json::json!({ "clustered.dev/fleet": "true" });
        v["spec"]["replicas"] = replicas.into();
        v["spec"]["workers"]["count"] = workers.into();
        v["spec"]["adminPort"] = admin_port.into();
        let pod = &mut v["spec"]["template"]["spec"];
        pod["nodeSelector"] = serde_json::json!({ NODE_LABEL.0: NODE_LABEL.1 });
        pod["tolerations"] = serde_json::json!([{ "key": NODE_TAINT, "operator": "Exists", "effect": "NoSchedule" }]);
    })
}

/// The operator's release binary (`make build`): `OPERATOR_BIN`, else the
/// static build in `CARGO_TARGET_DIR` (or the Makefile's default).
pub fn operator_bin() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("OPERATOR_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| {
                let cache = std::env::var_os("CLUSTERED_CACHE").map(PathBuf::from).unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/clustered")
                });
                cache.join("target")
            });
            target.join("x86_64-unknown-linux-gnu/release/clustered-operator")
        }
    };
    if !path.is_file() {
        bail!("no operator binary at {}: run `make build` (or set OPERATOR_BIN)", path.display());
    }
    Ok(path)
}

/// The operator as it ships, a process of its own on this machine, scoped
/// to one namespace: its memory and CPU are its own.
pub struct OperatorProcess {
    child: tokio::process::Child,
    pid: u32,
    metrics: SocketAddr,
    /// Where its log goes.
    pub log: PathBuf,
}

impl OperatorProcess {
    /// Starts the operator for `namespace` with `args` added to its command line.
    pub async fn start(cluster: &Cluster, namespace: &str, args: &[&str]) -> anyhow::Result<OperatorProcess> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let metrics = SocketAddr::from(([127, 0, 0, 1], port));
        let log = std::env::temp_dir().join(format!("clustered-fleet-operator-{namespace}.log"));
        let file = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(operator_bin()?)
            // Its own Lease, in the namespace it serves: an installed
            // operator (`make demo`) holds the release's Lease and would
            // keep this one standing by.
            .args(["--namespace", namespace, "--lease-namespace", namespace])
            .args(["--listen", &metrics.to_string(), "--log-format", "json"])
            .args(args)
            .env("KUBECONFIG", &cluster.kubeconfig)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .context("starting the operator")?;
        let pid = child.id().context("the operator exited at once")?;
        let operator = OperatorProcess { child, pid, metrics, log };
        wait_for(Duration::from_secs(30), "the operator to lead (clustered_operator_leader 1)", || async {
            Ok(operator.metric("clustered_operator_leader").await.is_ok_and(|leader| leader == 1.0))
        })
        .await
        .with_context(|| format!("operator log: {}", operator.log.display()))?;
        Ok(operator)
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmRSS")
    }

    /// CPU time used so far (user + system), seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))?;
        // The fields after the command name, which is in parentheses.
        let fields: Vec<&str> = stat.rsplit_once(')').context("bad stat")?.1.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        // utime and stime are the 14th and 15th fields, in clock ticks of 1/100 s.
        Ok((ticks(11) + ticks(12)) as f64 / 100.0)
    }

    /// Its metrics, each series summed over its labels.
    pub async fn metrics(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let text = http_get(self.metrics, "/metrics").await?;
        Ok(parse_metrics(&text, |_| true))
    }

    /// One metric (summed over its labels), 0 when absent.
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        Ok(self.metrics().await?.get(name).copied().unwrap_or(0.0))
    }

    /// Stops it with SIGTERM, as Kubernetes would, and waits.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = tokio::process::Command::new("kill").args(["-TERM", &self.pid.to_string()]).status().await;
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.is_err() {
            self.child.kill().await?;
        }
        Ok(())
    }
}

/// `name value` lines of a Prometheus text exposition whose series pass
/// `keep` (given the labels' text), summed by metric name.
fn parse_metrics(text: &str, keep: impl Fn(&str) -> bool) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels),
            None => (series, ""),
        };
        if keep(labels) {
            *out.entry(name.to_string()).or_insert(0.0) += value;
        }
    }
    out
}

async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response =
        tokio::time::timeout(Duration::from_secs(10), client.get(format!("http://{addr}{path}").parse()?)).await??;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The API server's `apiserver_request_total`, by verb (`WATCH` included;
/// dry runs apart as `<VERB> (dry run)`), for the resources in `resources`
/// (all when empty).
pub struct ApiRequests(pub BTreeMap<String, f64>);

impl ApiRequests {
    pub async fn read(client: &Client, resources: &[&str]) -> anyhow::Result<ApiRequests> {
        let text = client.request_text(hyper::Request::get("/metrics").body(Vec::new())?).await?;
        let mut by_verb = BTreeMap::new();
        for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            let labels = labels_of(series);
            let label = |key: &str| labels.get(key).copied();
            let resource = label("resource").unwrap_or_default();
            if !resources.is_empty() && !resources.contains(&resource) {
                continue;
            }
            let mut verb = label("verb").unwrap_or("?").to_string();
            if label("subresource").is_some_and(|s| !s.is_empty()) {
                verb = format!("{verb} {}", label("subresource").unwrap_or_default());
            }
            if label("dry_run").is_some_and(|d| !d.is_empty()) {
                verb.push_str(" (dry run)");
            }
            *by_verb.entry(verb).or_insert(0.0) += value;
        }
        Ok(ApiRequests(by_verb))
    }

    /// Requests per second by verb between `earlier` and this reading.
    pub fn rates_since(&self, earlier: &ApiRequests, seconds: f64) -> BTreeMap<String, f64> {
        self.0
            .iter()
            .map(|(verb, n)| (verb.clone(), (n - earlier.0.get(verb).copied().unwrap_or(0.0)) / seconds))
            .filter(|(_, rate)| *rate > 0.0)
            .collect()
    }
}

/// The labels of one series, `name{a="x",b="y"}` (values without quotes or commas).
fn labels_of(series: &str) -> BTreeMap<&str, &str> {
    let inner = series.split_once('{').map(|(_, l)| l.trim_end_matches('}')).unwrap_or_default();
    inner
        .split("\",")
        .filter_map(|pair| {
            let (key, value) = pair.split_once("=\"")?;
            Some((key, value.trim_end_matches('"')))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_their_labels() {
        let text = "# HELP x y\nclustered_operator_reconciles_total{result=\"ok\"} 3\n\
                    clustered_operator_reconciles_total{result=\"error\"} 1\nclustered_operator_status_writes_total 7\n";
        let m = parse_metrics(text, |_| true);
        assert_eq!(m["clustered_operator_reconciles_total"], 4.0);
        assert_eq!(m["clustered_operator_status_writes_total"], 7.0);
    }

    #[test]
    fn series_labels_are_read_by_name() {
        let labels =
            labels_of(r#"apiserver_request_total{code="200",resource="pods",subresource="status",verb="PATCH"}"#);
        assert_eq!((labels["resource"], labels["subresource"], labels["verb"]), ("pods", "status", "PATCH"));
    }
}
