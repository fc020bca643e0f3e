//! clustered seen through a real Prometheus (built from its Go module by
//! `e2e/cluster/build`, beside kubectl), set up
//! as users set it up without the Prometheus operator: `kubernetes_sd` on
//! the local API server, keeping the pods whose `prometheus.io/scrape`
//! annotation the operator wrote, plus the operator's own `/metrics`.
//!
//! It asks Prometheus' HTTP API what a user would: a worker's restart after
//! a `kill -9`, the CPU each worker uses under load, and every query of the
//! chart's Grafana dashboard.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clustered_api::v1alpha1::{ClusteredService, WorkerState};
use clustered_e2e::{Cluster, Operator, demo_service, load, repo_root, wait_for};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, PostParams};

/// Metrics a healthy, idle-or-loaded service never has a series of: they
/// appear with their first event. A dashboard query on them alone may be
/// empty here; every other query must return data.
const ONLY_ON_EVENTS: &[&str] = &[
    "clusterd_rejected_requests_total",
    "clusterd_log_lines_dropped_total",
    "clustered_operator_reconcile_errors_total",
];

/// The Prometheus the test runs, stopped (and its data removed) on drop.
struct Prometheus {
    child: Child,
    url: String,
    client: HttpClient,
    dir: TempDir,
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Prometheus {
    fn start(cluster: &Cluster, namespace: &str, operator: std::net::SocketAddr) -> anyhow::Result<Prometheus> {
        let binary = cluster.bin_dir.join("prometheus");
        let dir = TempDir(std::env::temp_dir().join(format!("clustered-e2e-prometheus-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0)?;
        // The port is picked by the kernel, then handed over: nothing else
        // of this test binds in between.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = format!(
            r#"
global: {{ scrape_interval: 2s, evaluation_interval: 2s }}
scrape_configs:
  # The usual kubernetes-pods job of Prometheus' example configuration.
  - job_name: kubernetes-pods
    kubernetes_sd_configs:
      - role: pod
        kubeconfig_file: {kubeconfig}
        namespaces: {{ names: [{namespace}] }}
    relabel_configs:
      - {{ source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape], action: keep, regex: "true" }}
      - {{ source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_path], target_label: __metrics_path__, regex: (.+) }}
      - source_labels: [__meta_kubernetes_pod_ip, __meta_kubernetes_pod_annotation_prometheus_io_port]
        regex: (.+);(\d+)
        replacement: $1:$2
        target_label: __address__
      - {{ source_labels: [__meta_kubernetes_namespace], target_label: namespace }}
      - {{ source_labels: [__meta_kubernetes_pod_name], target_label: pod }}
  - job_name: clustered-operator
    static_configs:
      - targets: ["{operator}"]
        labels: {{ namespace: {namespace}, pod: clustered-operator-e2e }}
"#,
            kubeconfig = cluster.kubeconfig.display(),
        );
        let config_file = dir.0.join("prometheus.yml");
        std::fs::write(&config_file, config)?;
        let log = std::fs::File::create(dir.0.join("prometheus.log"))?;
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(Prometheus { child, url: format!("http://127.0.0.1:{port}"), client: http_client(), dir })
    }

    /// Waits until it answers `/-/ready`; fails with its log if it exits.
    async fn ready(&mut self) -> anyhow::Result<()> {
        let url: hyper::Uri = format!("{}/-/ready", self.url).parse()?;
        for _ in 0..120 {
            if let Some(exit) = self.child.try_wait()? {
                let log = std::fs::read_to_string(self.dir.0.join("prometheus.log")).unwrap_or_default();
                anyhow::bail!("prometheus exited ({exit}):\n{log}");
            }
            if self.client.get(url.clone()).await.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        anyhow::bail!("prometheus not ready within 60 s")
    }

    /// An instant query's result vector (`[{metric, value}]`).
    async fn query(&self, promql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let query: String = form_urlencoded::Serializer::new(String::new()).append_pair("query", promql).finish();
        let response = self.client.get(format!("{}/api/v1/query?{query}", self.url).parse()?).await?;
        let body: serde_json::Value = serde_json::from_slice(&response.into_body().collect().await?.to_bytes())?;
        anyhow::ensure!(body["status"] == "success", "{promql}: {body}");
        Ok(body["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// The values of a query's result, as numbers.
    async fn values(&self, promql: &str) -> anyhow::Result<Vec<f64>> {
        Ok(self.query(promql).await?.iter().filter_map(|r| r["value"][1].as_str()?.parse::<f64>().ok()).collect())
    }
}

/// `promtool check metrics` on what `url` serves: the problems it finds,
/// but for one that is no problem in OpenMetrics, which clusterd and the
/// operator serve: a counter's `# HELP` names its family (`x`), not its
/// sample (`x_total`), which promtool (a Prometheus-text linter) reports as
/// `x_total no help text`.
async fn promtool_problems(cluster: &Cluster, url: &str) -> anyhow::Result<Vec<String>> {
    use std::io::Write;
    let body = http_client().get(url.parse()?).await?.into_body().collect().await?.to_bytes();
    let text = String::from_utf8(body.to_vec())?;
    let mut promtool = Command::new(cluster.bin_dir.join("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    promtool.stdin.take().expect("stdin").write_all(text.as_bytes())?;
    let out = promtool.wait_with_output()?;
    // 0: clean; 3: lint problems; anything else: it could not read the text.
    anyhow::ensure!(matches!(out.status.code(), Some(0 | 3)), "promtool on {url}: {out:?}");
    let problems = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Ok(problems
        .lines()
        .filter(|line| {
            let family = line.strip_suffix("_total no help text");
            !family.is_some_and(|f| text.contains(&format!("# HELP {f} ")))
        })
        .map(String::from)
        .collect())
}

/// Every `expr` of the dashboard's panels, with its panel's title, the
/// Grafana variables replaced as Grafana would for one service.
fn dashboard_queries(namespace: &str, service: &str) -> anyhow::Result<Vec<(String, String)>> {
    let path = repo_root().join("charts/clustered/dashboards/clustered.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let expr = expr
                    .replace("$namespace", namespace)
                    .replace("$service", service)
                    .replace("$__rate_interval", "30s");
                queries.push((panel["title"].as_str().unwrap_or_default().to_string(), expr));
            }
        }
    }
    anyhow::ensure!(queries.len() > 10, "the dashboard has {} queries", queries.len());
    Ok(queries)
}

#[tokio::test]
async fn prometheus_scrapes_the_pods_and_the_operator_and_the_dashboard_has_data() -> anyhow::Result<()> {
    let cluster = Cluster::get().await?;
    cluster.require_images(&["clustered.dev/clusterd:dev", "clustered.dev/demo-app:dev"]).await?;
    let ns = cluster.namespace("prometheus").await?;
    let operator = Operator::start(&cluster, &ns).await?;
    // It reconciles alone, as the elected leader would.
    operator.metrics.leader.set(1);
    let csvcs: Api<ClusteredService> = Api::namespaced(cluster.client.clone(), &ns);
    let demo = demo_service("metrics", |v| {
        v["spec"]["workers"] = serde_json::json!({ "count": 2 });
        v["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "2".into();
    });
    csvcs.create(&PostParams::default(), &demo).await?;
    wait_for(Duration::from_secs(180), "2 ready workers", || async {
        Ok(csvcs.get("metrics").await?.status.is_some_and(|s| s.workers.ready == 2))
    })
    .await?;
    let mut prometheus = Prometheus::start(&cluster, &ns, operator.admin_addr)?;
    prometheus.ready().await?;

    // Found through the API server and the pod's annotations, and scraped.
    let up = format!(r#"up{{namespace="{ns}"}} == 1"#);
    wait_for(Duration::from_secs(60), "the pod and the operator scraped", || async {
        let jobs: Vec<String> =
            prometheus.query(&up).await?.iter().filter_map(|r| r["metric"]["job"].as_str().map(String::from)).collect();
        Ok(jobs.contains(&"kubernetes-pods".to_string()) && jobs.contains(&"clustered-operator".to_string()))
    })
    .await?;

    // Both expositions pass promtool's lint.
    let status = csvcs.get("metrics").await?.status.expect("status");
    let pod = &status.instances[0].pod;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns);
    let pod_ip = pods.get(pod).await?.status.and_then(|s| s.pod_ip).expect("pod IP");
    for url in [format!("http://{pod_ip}:9901/metrics"), format!("http://{}/metrics", operator.admin_addr)] {
        let problems = promtool_problems(&cluster, &url).await?;
        assert!(problems.is_empty(), "promtool check metrics on {url}:\n{}", problems.join("\n"));
    }

    // A worker killed: its restart is counted where Prometheus reads it.
    let victim = status.instances[0].workers.iter().find(|w| w.state == WorkerState::Ready).expect("a ready worker");
    let kill = format!("process.kill({}, 'SIGKILL')", victim.pid.expect("pid"));
    cluster.kubectl(&["exec", "-n", &ns, pod, "-c", "app", "--", "node", "-e", &kill])?;
    let restarts = format!(r#"sum(clusterd_worker_restarts_total{{namespace="{ns}", pod="{pod}"}})"#);
    wait_for(Duration::from_secs(60), "the restart in Prometheus", || async {
        Ok(prometheus.values(&restarts).await?.first().is_some_and(|n| *n >= 1.0))
    })
    .await?;

    // Under load, each worker's CPU.
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &ns);
    let ip = services.get("metrics").await?.spec.and_then(|s| s.cluster_ip).expect("cluster IP");
    let stop = Arc::new(AtomicBool::new(false));
    let (url, flag) = (format!("http://{ip}:8080/?ms=50"), stop.clone());
    // Bounded: at most 10 000 requests and 3 minutes.
    let load = tokio::spawn(async move { load::run(&url, 4, 10_000, Duration::from_secs(180), flag).await });
    let cpu = format!(r#"sum by (worker) (rate(clusterd_worker_cpu_seconds_total{{namespace="{ns}"}}[20s]))"#);
    let busy = wait_for(Duration::from_secs(90), "both workers busy in Prometheus", || async {
        let per_worker = prometheus.values(&cpu).await?;
        Ok(per_worker.len() == 2 && per_worker.iter().all(|c| *c > 0.1))
    })
    .await;

    // Every query of the dashboard, while the load runs.
    let (mut empty, mut excused) = (Vec::new(), Vec::new());
    let queries = dashboard_queries(&ns, "metrics")?;
    for (panel, expr) in &queries {
        if prometheus.query(expr).await?.is_empty() {
            match ONLY_ON_EVENTS.iter().any(|m| expr.contains(m)) {
                true => excused.push(format!("{panel}: {expr}")),
                false => empty.push(format!("{panel}: {expr}")),
            }
        }
    }
    eprintln!(
        "e2e: {} dashboard queries, {} with data; empty until their event:\n  {}",
        queries.len(),
        queries.len() - empty.len() - excused.len(),
        excused.join("\n  ")
    );
    stop.store(true, Ordering::Relaxed);
    let report = load.await?;
    busy?;
    assert!(empty.is_empty(), "dashboard queries without data:\n{}", empty.join("\n"));
    assert!(report.ok > 0, "{report:?}");

    drop(prometheus);
    operator.stop().await;
    cluster.delete_namespace(&ns).await?;
    Ok(())
}
