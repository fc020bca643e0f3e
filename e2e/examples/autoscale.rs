//! The autoscaling benchmark (`benches/autoscale`; docs/benchmarks.md,
//! "Autoscaling: CPU HPA vs concurrency"): the same step load, from idle to
//! four times one pod's capacity, against the same demo service scaled
//! (a) by the HPA on CPU (fed by metrics-server) and (b) by the operator on
//! concurrency (from clusterd's in-flight figures). Same pods, same bounds;
//! the two modes are measured alternately in one run, each from one idle
//! pod. The operator runs in this process, as in the e2e tests.
//!
//! Writes a Markdown report to `AUTOSCALE_REPORT` (default: stdout after
//! the logs); progress and every run's raw figures go to stderr. Settings
//! from the environment: `AUTOSCALE_REPEATS` (2), `AUTOSCALE_STEP_SECONDS`
//! (150), `AUTOSCALE_IMAGE` (the demo app's image, by default
//! `clustered.dev/demo-app:dev`; `benches/autoscale` gives it a tag of its
//! own, so that other tests replacing that image meanwhile cannot stop new
//! pods from starting: seen once, pods stuck in `ErrImageNeverPull`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clustered_api::v1alpha1::ClusteredService;
use clustered_e2e::{Cluster, Operator, load, repo_root, wait_for};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, PostParams};

/// The pod: one worker, CPU request = limit (its capacity is exactly this).
const POD_CPU_MILLIS: u32 = 100;
/// CPU each request costs (the demo app's `/?ms=`, on the CPU clock).
const REQUEST_CPU_MS: u32 = 10;
/// The step: this many times one pod's nominal capacity.
const STEP_FACTOR: f64 = 4.0;
const MIN_REPLICAS: i32 = 1;
const MAX_REPLICAS: i32 = 8;
/// Equivalent headroom in both modes: 70 % of the CPU request, 0.7 requests in flight per worker.
const CPU_TARGET_PERCENT: i32 = 70;
const CONCURRENCY_TARGET: f64 = 0.7;
/// Short, so the next run starts from idle sooner; scale-up is unaffected.
const SCALE_DOWN_STABILIZATION_SECONDS: i32 = 10;
/// Admission control in each pod: at most this many requests in the
/// worker, the rest wait in clusterd's bounded queue (100, 10 s: the
/// defaults). Without it an overloaded worker's own backlog grows without
/// bound, its health probe times out behind it, and the pod leaves the
/// Service again and again (seen: 1,490 of 2,232 requests refused).
const MAX_CONCURRENCY: i32 = 4;
/// A request unanswered after this counts as failed (the user gave up).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// "After settling": requests sent in the step's last this many seconds.
const SETTLED: Duration = Duration::from_secs(30);
/// Idle time before each step, so the CPU metrics show an idle pod.
const IDLE_BEFORE: Duration = Duration::from_secs(20);
/// Bound on the wait for a service to be back at one pod.
const BACK_TO_IDLE: Duration = Duration::from_secs(360);
const POD_START: Duration = Duration::from_secs(180);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Cpu,
    Concurrency,
}

impl Mode {
    fn service(self) -> &'static str {
        match self {
            Mode::Cpu => "cpu",
            Mode::Concurrency => "conc",
        }
    }

    fn label(self) -> String {
        match self {
            Mode::Cpu => format!("CPU HPA (target {CPU_TARGET_PERCENT} %)"),
            Mode::Concurrency => format!("concurrency (target {CONCURRENCY_TARGET} per worker)"),
        }
    }

    fn autoscaling(self) -> serde_json::Value {
        let mut a = serde_json::json!({ "minReplicas": MIN_REPLICAS, "maxReplicas": MAX_REPLICAS,
            "scaleDownStabilizationSeconds": SCALE_DOWN_STABILIZATION_SECONDS });
        match self {
            Mode::Cpu => a["targetCpuUtilizationPercentage"] = CPU_TARGET_PERCENT.into(),
            Mode::Concurrency => {
                a["metric"] = "concurrency".into();
                a["targetPerWorker"] = CONCURRENCY_TARGET.into();
            }
        }
        a
    }
}

/// The demo app with `benches/cpu-clock.js` preloaded (from a ConfigMap),
/// so a request costs a fixed amount of CPU, not of wall-clock time.
fn demo(name: &str, image: &str, autoscaling: Option<serde_json::Value>) -> anyhow::Result<ClusteredService> {
    let cpu = format!("{POD_CPU_MILLIS}m");
    let mut spec = serde_json::json!({
        "replicas": 1,
        // Explicit: the proxy counts in-flight requests and admits them (auto may pick node mode).
        "portMode": "proxy",
        "workers": { "count": 1, "maxConcurrency": MAX_CONCURRENCY },
        "healthCheck": { "path": "/healthz", "periodSeconds": 2, "timeoutSeconds": 2 },
        "shutdown": { "drainTimeoutSeconds": 2 },
        "template": { "spec": {
            "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": { "type": "RuntimeDefault" } },
            "volumes": [{ "name": "cpu-clock", "configMap": { "name": "cpu-clock" } }],
            "containers": [{
                "name": "app",
                "image": image,
                "imagePullPolicy": "Never",
                "command": ["node", "--require", "/bench/cpu-clock.js", "/app/server.js"],
                "volumeMounts": [{ "name": "cpu-clock", "mountPath": "/bench", "readOnly": true }],
                "resources": { "requests": { "cpu": cpu, "memory": "64Mi" }, "limits": { "cpu": cpu, "memory": "128Mi" } },
                "securityContext": { "allowPrivilegeEscalation": false, "capabilities": { "drop": ["ALL"] } }
            }]
        }}
    });
    if let Some(a) = autoscaling {
        spec["autoscaling"] = a;
    }
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "clustered.dev/v1alpha1",
        "kind": "ClusteredService",
        "metadata": { "name": name },
        "spec": spec,
    }))?)
}

/// The autoscaling fields this build's CRD serves.
const AUTOSCALING_FIELDS: &[&str] = &["scaleDownStabilizationSeconds", "observedConcurrencyPerWorker"];

async fn ensure_our_crd(cluster: &Cluster) -> anyhow::Result<()> {
    cluster.ensure_crd_serves(AUTOSCALING_FIELDS).await
}

/// The pods of one service as the poller sees them.
#[derive(Clone, Debug, Default, PartialEq)]
struct PodCounts {
    /// `spec.replicas` (what the autoscaler set).
    desired: i32,
    /// Pods that are Ready and not terminating.
    ready: usize,
    /// Pods that exist, terminating ones included.
    existing: usize,
    ready_names: Vec<String>,
}

async fn pod_counts(csvcs: &Api<ClusteredService>, pods: &Api<Pod>, name: &str) -> anyhow::Result<PodCounts> {
    let desired = csvcs.get(name).await?.spec.replicas;
    let list = pods.list(&ListParams::default().labels(&format!("clustered.dev/service={name}"))).await?;
    let mut counts = PodCounts { desired, existing: list.items.len(), ..Default::default() };
    for pod in list.items {
        let ready = pod.metadata.deletion_timestamp.is_none()
            && pod
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
        if ready {
            counts.ready += 1;
            counts.ready_names.push(pod.metadata.name.unwrap_or_default());
        }
    }
    Ok(counts)
}

/// What the autoscaler saw at one instant: the HPA's CPU utilisation and
/// desired count, or the operator's concurrency per worker and panic flag.
async fn signal(
    mode: Mode,
    csvcs: &Api<ClusteredService>,
    hpas: &Api<HorizontalPodAutoscaler>,
    name: &str,
) -> anyhow::Result<String> {
    Ok(match mode {
        Mode::Cpu => {
            let status = hpas.get_opt(name).await?.and_then(|h| h.status);
            let cpu = status
                .as_ref()
                .and_then(|s| s.current_metrics.as_ref())
                .and_then(|m| m.first())
                .and_then(|m| m.resource.as_ref())
                .and_then(|r| r.current.average_utilization);
            let desired = status.map(|s| s.desired_replicas);
            format!("cpu {}% → {}", cpu.map_or("?".into(), |c| c.to_string()), desired.unwrap_or(0))
        }
        Mode::Concurrency => {
            let a = csvcs.get(name).await?.status.and_then(|s| s.autoscaling);
            match a {
                Some(a) => format!(
                    "{:.2}/worker{} → {}",
                    a.observed_concurrency_per_worker.unwrap_or_default(),
                    if a.panic { " panic" } else { "" },
                    a.desired_replicas
                ),
                None => "?".into(),
            }
        }
    })
}

/// One observation of the replica poller, `t` seconds after the step began.
#[derive(Clone, Debug)]
struct Tick {
    t: f64,
    pods: PodCounts,
    signal: String,
}

/// One request of the step.
#[derive(Clone, Debug)]
struct Sent {
    /// When it was due, seconds after the step began (open loop: it was sent then).
    at: f64,
    /// When it finished, seconds after the step began.
    done: f64,
    /// The pod that answered, or why it failed.
    outcome: Result<String, String>,
}

impl Sent {
    fn latency(&self) -> f64 {
        self.done - self.at
    }
}

/// CPU time of the calling thread (`/proc/thread-self/schedstat`, ns on CPU).
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// CPU time (user + system) of this whole process: the load generator and
/// the in-process operator.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 = fields.get(11..13).map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The step: `rate` requests per second for `duration`, each sent when it
/// is due whatever the answers (open loop, as independent users arrive),
/// each on a new connection, each given up after [`REQUEST_TIMEOUT`]. At
/// most rate × duration requests, and at most rate × timeout in flight.
/// Runs on a thread and runtime of its own, so its CPU time is its own.
fn step_load(
    url: String,
    rate: f64,
    duration: Duration,
    t0: Instant,
) -> std::thread::JoinHandle<(Vec<Sent>, Duration)> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        let cpu0 = thread_cpu();
        let sent = runtime.block_on(async move {
            let client = load::client();
            let start = tokio::time::Instant::from_std(t0);
            let count = (rate * duration.as_secs_f64()).round() as usize;
            let mut tasks = Vec::with_capacity(count);
            for i in 0..count {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due).await;
                let (client, url) = (client.clone(), url.clone());
                tasks.push(tokio::spawn(async move {
                    let outcome = match tokio::time::timeout(REQUEST_TIMEOUT, load::get(&client, &url)).await {
                        Ok(Ok(answer)) => Ok(answer.body["host"].as_str().unwrap_or("?").to_string()),
                        Ok(Err(e)) => Err(short_error(&format!("{e:#}"))),
                        Err(_) => Err(format!("no answer in {} s", REQUEST_TIMEOUT.as_secs())),
                    };
                    Sent { at: (due - start).as_secs_f64(), done: start.elapsed().as_secs_f64(), outcome }
                }));
            }
            let mut sent = Vec::with_capacity(count);
            for task in tasks {
                if let Ok(s) = task.await {
                    sent.push(s);
                }
            }
            sent
        });
        (sent, thread_cpu().saturating_sub(cpu0))
    })
}

/// The kind of a failure: its first line, without the URL, the pool's name or the OS error number.
fn short_error(e: &str) -> String {
    let e = e.split_once(": ").map_or(e, |(_, rest)| rest);
    let e = e.lines().next().unwrap_or_default();
    e.split(" (").next().unwrap_or_default().trim().to_string()
}

/// Nearest-rank percentile of `values` (sorted here), in the same unit.
fn percentile(values: &mut [f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * values.len() as f64).ceil().max(1.0) as usize;
    Some(values[rank.min(values.len()) - 1])
}

/// What one run (one mode, one repetition) measured.
#[derive(Debug)]
struct Run {
    mode: Mode,
    rep: usize,
    /// From the step to the first answer of a pod that was not serving before it.
    first_new_pod: Option<f64>,
    /// From the step until answers had come from as many pods as the step needs.
    enough_pods: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    p99_settled: Option<f64>,
    sent: usize,
    failed: usize,
    failed_settled: usize,
    /// Failures by kind.
    errors: BTreeMap<String, usize>,
    max_desired: i32,
    ready_at_end: usize,
    /// From the end of the step until one pod is left.
    back_to_one: Option<f64>,
    /// Desired/ready pod counts whenever they changed.
    timeline: Vec<Tick>,
    generator_cpu_percent: f64,
    process_cpu_percent: f64,
    load_before: String,
    load_after: String,
}

impl Run {
    fn from_requests(mode: Mode, rep: usize, initial: &[String], sent: &[Sent], step: Duration) -> Run {
        let needed = STEP_FACTOR.ceil() as usize;
        let mut answered: Vec<&Sent> = sent.iter().filter(|s| s.outcome.is_ok()).collect();
        answered.sort_by(|a, b| a.done.total_cmp(&b.done));
        let host = |s: &Sent| s.outcome.clone().unwrap_or_default();
        let first_new_pod = answered.iter().find(|s| !initial.contains(&host(s))).map(|s| s.done);
        let mut hosts = Vec::new();
        let mut enough_pods = None;
        for s in &answered {
            if !hosts.contains(&host(s)) {
                hosts.push(host(s));
                if hosts.len() >= needed {
                    enough_pods = Some(s.done);
                    break;
                }
            }
        }
        let settled_from = (step.saturating_sub(SETTLED)).as_secs_f64();
        let mut all: Vec<f64> = answered.iter().map(|s| s.latency() * 1000.0).collect();
        let mut settled: Vec<f64> =
            answered.iter().filter(|s| s.at >= settled_from).map(|s| s.latency() * 1000.0).collect();
        let mut errors = BTreeMap::new();
        for e in sent.iter().filter_map(|s| s.outcome.as_ref().err()) {
            *errors.entry(e.clone()).or_default() += 1;
        }
        Run {
            mode,
            rep,
            first_new_pod,
            enough_pods,
            p50: percentile(&mut all, 50.0),
            p99: percentile(&mut all, 99.0),
            p99_settled: percentile(&mut settled, 99.0),
            sent: sent.len(),
            failed: sent.iter().filter(|s| s.outcome.is_err()).count(),
            failed_settled: sent.iter().filter(|s| s.at >= settled_from && s.outcome.is_err()).count(),
            errors,
            max_desired: 0,
            ready_at_end: 0,
            back_to_one: None,
            timeline: Vec::new(),
            generator_cpu_percent: 0.0,
            process_cpu_percent: 0.0,
            load_before: String::new(),
            load_after: String::new(),
        }
    }

    /// "desired/ready" at every change, e.g. `0 s 1/1 · 21 s 2/1 · 25 s 2/2`.
    fn timeline_text(&self, until: f64) -> String {
        let mut out: Vec<String> = Vec::new();
        let mut last: Option<(i32, usize)> = None;
        for tick in self.timeline.iter().filter(|t| t.t <= until) {
            let now = (tick.pods.desired, tick.pods.ready);
            if last != Some(now) {
                out.push(format!("{:.0} s {}/{}", tick.t.max(0.0), now.0, now.1));
                last = Some(now);
            }
        }
        out.join(" · ")
    }
}

/// Everything one run needs from the cluster.
struct Apis {
    csvcs: Api<ClusteredService>,
    pods: Api<Pod>,
    hpas: Api<HorizontalPodAutoscaler>,
    services: Api<Service>,
}

/// Waits until `name` runs exactly one pod, ready, nothing terminating
/// (and in concurrency mode the autoscaler is calm).
async fn wait_idle(cluster: &Cluster, apis: &Apis, mode: Mode) -> anyhow::Result<()> {
    let name = mode.service();
    wait_for(BACK_TO_IDLE, &format!("{name} back to one idle pod"), || async {
        ensure_our_crd(cluster).await?;
        let counts = pod_counts(&apis.csvcs, &apis.pods, name).await?;
        let calm = match mode {
            // The HPA has measured the idle pod (a new pod has no figure for a minute or two).
            Mode::Cpu => apis
                .hpas
                .get_opt(name)
                .await?
                .and_then(|h| h.status?.current_metrics?.first()?.resource.as_ref()?.current.average_utilization)
                .is_some_and(|cpu| cpu < CPU_TARGET_PERCENT),
            Mode::Concurrency => apis
                .csvcs
                .get(name)
                .await?
                .status
                .and_then(|s| s.autoscaling)
                .is_some_and(|a| !a.panic && a.observed_concurrency_per_worker.is_some()),
        };
        Ok(counts.desired == MIN_REPLICAS && counts.ready == 1 && counts.existing == 1 && calm)
    })
    .await
}

async fn run_step(
    cluster: &Cluster,
    apis: &Apis,
    mode: Mode,
    rep: usize,
    rate: f64,
    step: Duration,
) -> anyhow::Result<Run> {
    let name = mode.service();
    wait_idle(cluster, apis, mode).await?;
    tokio::time::sleep(IDLE_BEFORE).await;
    let initial = pod_counts(&apis.csvcs, &apis.pods, name).await?;
    anyhow::ensure!(initial.ready == 1, "{name}: not idle at one pod before the step: {initial:?}");
    let ip = apis.services.get(name).await?.spec.and_then(|s| s.cluster_ip).context("cluster IP")?;
    let url = format!("http://{ip}:8080/?ms={REQUEST_CPU_MS}");
    let load_before = load_average();
    eprintln!(
        "[{name} #{rep}] step: {rate} req/s for {} s from {}; load average {load_before}",
        step.as_secs(),
        initial.ready_names.join(",")
    );

    let t0 = Instant::now() + Duration::from_millis(200);
    let cpu0 = process_cpu();
    let generator = step_load(url, rate, step, t0);
    let generator_done = Arc::new(AtomicBool::new(false));
    let waiter = {
        let done = generator_done.clone();
        tokio::task::spawn_blocking(move || {
            let result = generator.join();
            done.store(true, Ordering::Relaxed);
            result
        })
    };
    // The replica poller: during the step, then until one pod is left.
    let mut timeline = Vec::new();
    let mut step_ended_at = None;
    let mut back_to_one = None;
    let mut process_cpu_in_step = Duration::ZERO;
    loop {
        let t = Instant::now().saturating_duration_since(t0).as_secs_f64();
        match pod_counts(&apis.csvcs, &apis.pods, name).await {
            Ok(pods) => {
                let signal = signal(mode, &apis.csvcs, &apis.hpas, name).await.unwrap_or_else(|e| format!("{e}"));
                if step_ended_at.is_some() && back_to_one.is_none() && pods.desired == 1 && pods.existing == 1 {
                    back_to_one = Some(t - step.as_secs_f64());
                }
                timeline.push(Tick { t, pods, signal });
            }
            Err(e) => eprintln!("[{name} #{rep}] poll failed: {e:#}"),
        }
        if step_ended_at.is_none() && generator_done.load(Ordering::Relaxed) {
            step_ended_at = Some(t);
            process_cpu_in_step = process_cpu().saturating_sub(cpu0);
        }
        if back_to_one.is_some() || t > step.as_secs_f64() + BACK_TO_IDLE.as_secs_f64() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (sent, generator_cpu) = waiter.await?.map_err(|_| anyhow::anyhow!("the load generator panicked"))?;
    let busy_for = step_ended_at.unwrap_or(step.as_secs_f64()).max(1.0);
    let mut run = Run::from_requests(mode, rep, &initial.ready_names, &sent, step);
    let in_step = |t: &&Tick| t.t <= step.as_secs_f64();
    run.max_desired = timeline.iter().filter(in_step).map(|t| t.pods.desired).max().unwrap_or(0);
    run.ready_at_end = timeline.iter().rfind(in_step).map_or(0, |t| t.pods.ready);
    run.back_to_one = back_to_one;
    run.generator_cpu_percent = generator_cpu.as_secs_f64() / busy_for * 100.0;
    run.process_cpu_percent = process_cpu_in_step.as_secs_f64() / busy_for * 100.0;
    run.load_before = load_before;
    run.load_after = load_average();
    run.timeline = timeline;
    print_raw(&run, step);
    Ok(run)
}

/// Every figure of one run, and the autoscaler's signal over time, on stderr.
fn print_raw(run: &Run, step: Duration) {
    let name = run.mode.service();
    eprintln!(
        "[{name} #{}] first new pod {:?} s, {} pods {:?} s, p50 {:?} ms, p99 {:?} ms, p99 settled {:?} ms, failed {}/{} ({} settled) {:?}, most pods {}, ready at the end {}, back to 1 pod {:?} s after; CPU: generator {:.1} %, process {:.1} %; load {} → {}",
        run.rep,
        run.first_new_pod,
        STEP_FACTOR.ceil(),
        run.enough_pods,
        run.p50,
        run.p99,
        run.p99_settled,
        run.failed,
        run.sent,
        run.failed_settled,
        run.errors,
        run.max_desired,
        run.ready_at_end,
        run.back_to_one,
        run.generator_cpu_percent,
        run.process_cpu_percent,
        run.load_before,
        run.load_after
    );
    let mut last = String::new();
    for tick in &run.timeline {
        let line = format!("{}/{} ({} pods) {}", tick.pods.desired, tick.pods.ready, tick.pods.existing, tick.signal);
        if line != last {
            eprintln!("[{name} #{}]   {:7.1} s  {line}", run.rep, tick.t);
            last = line;
        }
    }
    eprintln!("[{name} #{}] timeline during the step: {}", run.rep, run.timeline_text(step.as_secs_f64()));
}

/// Closed loop against one pod without autoscaling: its real capacity.
async fn calibrate(apis: &Apis, image: &str) -> anyhow::Result<f64> {
    apis.csvcs.create(&PostParams::default(), &demo("calib", image, None)?).await?;
    wait_for(POD_START, "the calibration pod ready", || async {
        Ok(pod_counts(&apis.csvcs, &apis.pods, "calib").await?.ready == 1)
    })
    .await?;
    let ip = apis.services.get("calib").await?.spec.and_then(|s| s.cluster_ip).context("cluster IP")?;
    let url = format!("http://{ip}:8080/?ms={REQUEST_CPU_MS}");
    wait_for(Duration::from_secs(60), "the calibration Service answers", || async {
        Ok(load::get(&load::client(), &url).await.is_ok())
    })
    .await?;
    // 4 clients keep the one worker busy; 3 s warm-up, then 15 s measured.
    let never = Arc::new(AtomicBool::new(false));
    load::run(&url, 4, 1_000, Duration::from_secs(3), never.clone()).await;
    let started = Instant::now();
    let report = load::run(&url, 4, 2_000, Duration::from_secs(15), never).await;
    let capacity = report.ok as f64 / started.elapsed().as_secs_f64();
    eprintln!("calibration: one pod served {capacity:.1} req/s ({report:?})");
    apis.csvcs.delete("calib", &DeleteParams::default()).await?;
    Ok(capacity)
}

fn env_number(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}={v}: not a whole number")),
        Err(_) => Ok(default),
    }
}

/// The median (the mean of the middle two for an even count); None if any
/// repetition has no figure (e.g. the pods never answered within the step).
fn median(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().collect::<Option<_>>()?;
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len().is_multiple_of(2) { (v[mid - 1] + v[mid]) / 2.0 } else { v[mid] })
}

fn range(values: impl IntoIterator<Item = Option<f64>>, scale: f64, decimals: usize) -> String {
    let v: Vec<f64> = values.into_iter().map(|v| v.map_or(f64::NAN, |v| v * scale)).collect();
    v.iter()
        .map(|v| if v.is_nan() { "never".into() } else { format!("{v:.decimals$}") })
        .collect::<Vec<_>>()
        .join(" / ")
}

fn seconds(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.1}"))
}

fn millis(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.0}"))
}

fn report(
    runs: &[Run],
    calibrated: f64,
    rate: f64,
    step: Duration,
    repeats: usize,
    started: &str,
    load_start: &str,
) -> String {
    let mut md = String::new();
    let capacity = 1000.0 / f64::from(REQUEST_CPU_MS) * f64::from(POD_CPU_MILLIS) / 1000.0;
    let commit = std::process::Command::new("git")
        .args(["-C", &repo_root().to_string_lossy(), "describe", "--always", "--dirty"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let _ = writeln!(md, "Generated by `benches/autoscale` on {started}, repo at {commit}.\n");
    let _ = writeln!(md, "| | |\n| --- | --- |");
    let _ = writeln!(
        md,
        "| pod | 1 worker, CPU request = limit = {POD_CPU_MILLIS}m, `maxConcurrency: {MAX_CONCURRENCY}` (queue 100, 10 s); `GET /?ms={REQUEST_CPU_MS}` costs {REQUEST_CPU_MS} ms of CPU (`benches/cpu-clock.js` preloaded) |"
    );
    let _ = writeln!(
        md,
        "| one pod's capacity | {capacity:.0} req/s nominal; measured {calibrated:.1} req/s (closed loop, 4 connections, 15 s, a pod without autoscaling) |"
    );
    let _ = writeln!(
        md,
        "| step | idle → {rate:.1} req/s ({STEP_FACTOR}× the measured capacity) for {} s, open loop, a new connection per request, from this host to the Service's ClusterIP; a request unanswered after {} s counts as failed |",
        step.as_secs(),
        REQUEST_TIMEOUT.as_secs()
    );
    let _ = writeln!(
        md,
        "| bounds | minReplicas {MIN_REPLICAS}, maxReplicas {MAX_REPLICAS}, scaleDownStabilizationSeconds {SCALE_DOWN_STABILIZATION_SECONDS} (both modes) |"
    );
    let _ = writeln!(
        md,
        "| repetitions | {repeats} per mode, alternating ({}), each from one idle pod ({} s idle first) |",
        runs.iter().map(|r| r.mode.service()).collect::<Vec<_>>().join(", "),
        IDLE_BEFORE.as_secs()
    );
    let _ = writeln!(md, "| load average | {load_start} at the start (1, 5, 15 min); per run below |");
    let _ = writeln!(
        md,
        "| load generator | its own thread: {} % of a CPU during the steps (whole process, with the in-process operator: {} %) |\n",
        range(runs.iter().map(|r| Some(r.generator_cpu_percent)), 1.0, 1),
        range(runs.iter().map(|r| Some(r.process_cpu_percent)), 1.0, 1)
    );

    let _ = writeln!(
        md,
        "| scaling | first answer from a new pod (s) | answers from {} pods (s) | p99 during the step (ms) | p50 (ms) | p99 last {} s (ms) | failed / sent | most pods asked for | back to 1 pod after the step (s) |",
        STEP_FACTOR.ceil(),
        SETTLED.as_secs()
    );
    let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for mode in [Mode::Cpu, Mode::Concurrency] {
        let of: Vec<&Run> = runs.iter().filter(|r| r.mode == mode).collect();
        if of.is_empty() {
            continue;
        }
        let _ = writeln!(
            md,
            "| {} | **{}** ({}) | {} ({}) | **{}** ({}) | {} | {} ({}) | {} / {} | {} | {} |",
            mode.label(),
            seconds(median(of.iter().map(|r| r.first_new_pod))),
            range(of.iter().map(|r| r.first_new_pod), 1.0, 1),
            seconds(median(of.iter().map(|r| r.enough_pods))),
            range(of.iter().map(|r| r.enough_pods), 1.0, 1),
            millis(median(of.iter().map(|r| r.p99))),
            range(of.iter().map(|r| r.p99), 1.0, 0),
            millis(median(of.iter().map(|r| r.p50))),
            millis(median(of.iter().map(|r| r.p99_settled))),
            range(of.iter().map(|r| r.p99_settled), 1.0, 0),
            of.iter().map(|r| r.failed).sum::<usize>(),
            of.iter().map(|r| r.sent).sum::<usize>(),
            of.iter().map(|r| r.max_desired.to_string()).collect::<Vec<_>>().join(" / "),
            range(of.iter().map(|r| r.back_to_one), 1.0, 0),
        );
    }
    let _ = writeln!(
        md,
        "\nMedians over the repetitions (– when a repetition has no figure), each repetition's figure in parentheses (in run order; *never*: not within the step). Latencies are of the answered requests, from the moment each was due; failures are counted apart. *answers from {} pods*: the step needs {} pods, this is when the {}th distinct pod answered.\n",
        STEP_FACTOR.ceil(),
        STEP_FACTOR.ceil(),
        STEP_FACTOR.ceil()
    );
    let _ = writeln!(
        md,
        "Replica timeline of every run (seconds after the step began: pods asked for / pods ready), and what failed:\n"
    );
    let _ = writeln!(md, "| run | load average before → after | timeline during the step | failures |");
    let _ = writeln!(md, "| --- | --- | --- | --- |");
    for run in runs {
        let failures = if run.errors.is_empty() {
            "none".to_string()
        } else {
            run.errors.iter().map(|(e, n)| format!("{n} × {e}")).collect::<Vec<_>>().join("; ")
        };
        let _ = writeln!(
            md,
            "| {} #{} | {} → {} | {} | {} ({} in the last {} s) |",
            run.mode.service(),
            run.rep,
            run.load_before,
            run.load_after,
            run.timeline_text(step.as_secs_f64()),
            failures,
            run.failed_settled,
            SETTLED.as_secs()
        );
    }
    md
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let repeats = env_number("AUTOSCALE_REPEATS", 2)? as usize;
    let step = Duration::from_secs(env_number("AUTOSCALE_STEP_SECONDS", 150)?);
    anyhow::ensure!(repeats >= 1 && step >= SETTLED * 2, "AUTOSCALE_REPEATS ≥ 1 and AUTOSCALE_STEP_SECONDS ≥ 60");
    let started = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let load_start = load_average();
    let began = Instant::now();

    let cluster = Cluster::get().await?;
    let image = std::env::var("AUTOSCALE_IMAGE").unwrap_or_else(|_| "clustered.dev/demo-app:dev".into());
    // A tag just made takes the kubelet a few seconds to report.
    wait_for(Duration::from_secs(60), "the images on the node", || async {
        cluster.require_images(&["clustered.dev/clusterd:dev", &image]).await.map(|()| true)
    })
    .await?;
    let ns = cluster.namespace("bench-autoscale").await?;
    let operator = Operator::start(&cluster, &ns).await?;
    let apis = Apis {
        csvcs: Api::namespaced(cluster.client.clone(), &ns),
        pods: Api::namespaced(cluster.client.clone(), &ns),
        hpas: Api::namespaced(cluster.client.clone(), &ns),
        services: Api::namespaced(cluster.client.clone(), &ns),
    };
    let work = async {
        ensure_our_crd(&cluster).await?;
        let clock = std::fs::read_to_string(repo_root().join("benches/cpu-clock.js"))?;
        let config_map: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "cpu-clock" }, "data": { "cpu-clock.js": clock }
        }))?;
        Api::<ConfigMap>::namespaced(cluster.client.clone(), &ns).create(&PostParams::default(), &config_map).await?;
        let calibrated = calibrate(&apis, &image).await?;
        // 4× what one pod really serves here (nominal: 4 × 10 req/s).
        let rate = (STEP_FACTOR * calibrated * 10.0).round() / 10.0;
        for mode in [Mode::Cpu, Mode::Concurrency] {
            apis.csvcs.create(&PostParams::default(), &demo(mode.service(), &image, Some(mode.autoscaling()))?).await?;
        }
        let mut runs = Vec::new();
        for rep in 1..=repeats {
            for mode in [Mode::Cpu, Mode::Concurrency] {
                runs.push(run_step(&cluster, &apis, mode, rep, rate, step).await?);
            }
        }
        anyhow::Ok(report(&runs, calibrated, rate, step, repeats, &started, &load_start))
    };
    // Interrupted: the namespace (pods, operator) is removed all the same.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        result = work => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = term.recv() => Err(anyhow::anyhow!("terminated")),
    };
    operator.stop().await;
    cluster.delete_namespace(&ns).await?;
    let report = result?;
    eprintln!("done in {:.1} min", began.elapsed().as_secs_f64() / 60.0);
    match std::env::var("AUTOSCALE_REPORT") {
        Ok(path) => std::fs::write(&path, report).with_context(|| format!("writing {path}"))?,
        Err(_) => print!("{report}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! `cargo test -p clustered-e2e --features bench --example autoscale`
    use super::*;

    fn sent(at: f64, done: f64, outcome: Result<&str, &str>) -> Sent {
        Sent { at, done, outcome: outcome.map(str::to_string).map_err(str::to_string) }
    }

    #[test]
    fn a_run_times_new_pods_from_their_first_answers_and_counts_the_settled_window_apart() {
        let requests = [
            sent(0.0, 0.1, Ok("a")),
            sent(1.0, 5.0, Ok("b")),
            sent(1.5, 3.0, Ok("a")),
            sent(2.0, 12.0, Err("no answer in 10 s")),
            sent(3.0, 6.0, Ok("c")),
            sent(40.0, 40.2, Ok("d")),
            sent(45.0, 55.0, Err("no answer in 10 s")),
            sent(50.0, 50.5, Ok("b")),
        ];
        let run = Run::from_requests(Mode::Cpu, 1, &["a".to_string()], &requests, Duration::from_secs(60));
        assert_eq!(run.first_new_pod, Some(5.0), "b answered first of the new pods, at 5 s");
        assert_eq!(run.enough_pods, Some(40.2), "the fourth pod, d, answered at 40.2 s");
        assert_eq!((run.sent, run.failed, run.failed_settled), (8, 2, 1));
        assert_eq!(run.errors.get("no answer in 10 s"), Some(&2));
        // Answered latencies in ms: 100, 4000, 1500, 3000, 200, 500; the last 30 s hold 200 and 500.
        assert_eq!(run.p99.map(f64::round), Some(4000.0));
        assert_eq!(run.p50.map(f64::round), Some(500.0));
        assert_eq!(run.p99_settled.map(f64::round), Some(500.0));
    }

    #[test]
    fn the_timeline_lists_changes_only() {
        let tick = |t: f64, desired: i32, ready: usize| Tick {
            t,
            pods: PodCounts { desired, ready, existing: ready, ready_names: Vec::new() },
            signal: String::new(),
        };
        let mut run = Run::from_requests(Mode::Concurrency, 1, &[], &[], Duration::from_secs(60));
        run.timeline = vec![tick(0.0, 1, 1), tick(0.5, 1, 1), tick(4.2, 5, 1), tick(9.6, 5, 5), tick(70.0, 1, 1)];
        assert_eq!(run.timeline_text(60.0), "0 s 1/1 · 4 s 5/1 · 10 s 5/5");
    }

    #[test]
    fn failures_are_grouped_by_kind() {
        let busy = "http://10.96.0.7:8080/?ms=10: 503 Service Unavailable clusterd: every worker is busy and the queue is full (pool \"default\")\n";
        assert_eq!(short_error(busy), "503 Service Unavailable clusterd: every worker is busy and the queue is full");
        let refused = "client error (Connect): tcp connect error: Connection refused (os error 111)";
        assert_eq!(short_error(refused), "tcp connect error: Connection refused");
    }

    #[test]
    fn the_median_of_two_is_their_mean_and_a_missing_figure_has_none() {
        assert_eq!(median([Some(26.0), Some(34.0)]), Some(30.0));
        assert_eq!(median([Some(3.0), Some(1.0), Some(2.0)]), Some(2.0));
        assert_eq!(median([Some(102.0), None]), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 99.0), Some(198.0));
        assert_eq!(percentile(&mut v, 50.0), Some(100.0));
        assert_eq!(percentile(&mut [], 99.0), None);
    }
}
