//! Test support for the tiers that need a real cluster: the local
//! single-node Kubernetes of `e2e/cluster` (built from source, started on
//! first use, left running for the next test binary).
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! let cluster = clustered_e2e::Cluster::get().await?;
//! let ns = cluster.namespace("my-test").await?;
//! # Ok(()) }
//! ```

pub mod fleet;
pub mod load;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clustered_api::v1alpha1::ClusteredService;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, CustomResourceExt, ResourceExt};
use tokio::sync::OnceCell;

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The running local cluster.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    pub kubeconfig: PathBuf,
    /// Directory of the cached kubectl and helm.
    pub bin_dir: PathBuf,
}

/// Where the cluster is, once it is up and has the CRD. Only paths are
/// shared between tests: a `Client` belongs to the runtime that made it,
/// and every `#[tokio::test]` has its own.
static STARTED: OnceCell<(PathBuf, PathBuf)> = OnceCell::const_new();

impl Cluster {
    /// The cluster, brought up (idempotently) on first use in this process,
    /// with the ClusteredService CRD installed.
    pub async fn get() -> anyhow::Result<Cluster> {
        let (kubeconfig, bin_dir) = STARTED.get_or_try_init(Self::start).await?.clone();
        Self::connect(kubeconfig, bin_dir).await
    }

    async fn start() -> anyhow::Result<(PathBuf, PathBuf)> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info,kube=warn".into()))
            .with_test_writer()
            .try_init();
        // Another API server than the local cluster's (`e2e/cluster/floor`:
        // the oldest Kubernetes supported, an API server without nodes).
        let kubeconfig = match std::env::var_os("CLUSTERED_E2E_KUBECONFIG") {
            Some(path) => PathBuf::from(path),
            None => PathBuf::from(last_line_of("e2e/cluster/up").await?),
        };
        let bin_dir = PathBuf::from(last_line_of("e2e/cluster/build").await?);
        let cluster = Self::connect(kubeconfig.clone(), bin_dir.clone()).await?;
        cluster.install_crd().await?;
        cluster.pause_installed_operators().await?;
        Ok((kubeconfig, bin_dir))
    }

    /// `make demo` leaves its operator installed, watching every namespace:
    /// beside each test's own operator it would be a second writer of the
    /// tests' objects. The tests pause it (scale it to 0 and wait until its
    /// pods are gone); `make demo` (its `helm upgrade --install`) or
    /// `kubectl scale` brings it back.
    async fn pause_installed_operators(&self) -> anyhow::Result<()> {
        use k8s_openapi::api::apps::v1::Deployment;
        use k8s_openapi::api::core::v1::Pod;
        use kube::api::ListParams;
        const OPERATOR: &str = "app.kubernetes.io/name=clustered-operator";
        let installed =
            Api::<Deployment>::all(self.client.clone()).list(&ListParams::default().labels(OPERATOR)).await?;
        for deployment in installed.items {
            let ns = deployment.namespace().unwrap_or_default();
            if deployment.spec.as_ref().and_then(|s| s.replicas) == Some(0) {
                continue;
            }
            eprintln!(
                "e2e: pausing the installed operator {ns}/{} for the tests (kubectl -n {ns} scale deployment/{} --replicas=1 restores it)",
                deployment.name_any(),
                deployment.name_any()
            );
            let api: Api<Deployment> = Api::namespaced(self.client.clone(), &ns);
            let patch = serde_json::json!({ "spec": { "replicas": 0 } });
            api.patch_scale(&deployment.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            wait_for(Duration::from_secs(60), "the installed operator's pods gone", || async {
                Ok(pods.list(&ListParams::default().labels(OPERATOR)).await?.items.is_empty())
            })
            .await?;
        }
        Ok(())
    }

    async fn connect(kubeconfig: PathBuf, bin_dir: PathBuf) -> anyhow::Result<Cluster> {
        let config = Self::config_of(&kubeconfig).await?;
        Ok(Cluster { client: Client::try_from(config)?, kubeconfig, bin_dir })
    }

    async fn config_of(kubeconfig: &Path) -> anyhow::Result<Config> {
        Ok(Config::from_custom_kubeconfig(Kubeconfig::read_from(kubeconfig)?, &KubeConfigOptions::default()).await?)
    }

    /// The client configuration of the admin kubeconfig.
    pub async fn config(&self) -> anyhow::Result<Config> {
        Self::config_of(&self.kubeconfig).await
    }

    /// Kills a control-plane component (`etcd`, `kube-apiserver`) with
    /// SIGKILL, leaves it down for `down_for`, then restarts it with
    /// `e2e/cluster/up`. Returns when the API server's `/readyz` answers
    /// again, with the instant it did; the returned [`Restore`] must be
    /// awaited to know that `up` finished (it runs on even if the test
    /// fails first, so the cluster is restored either way).
    pub async fn restart_component(
        &self,
        component: &str,
        down_for: Duration,
    ) -> anyhow::Result<(tokio::time::Instant, Restore)> {
        let state = PathBuf::from(std::env::var("CLUSTERED_STATE").unwrap_or_else(|_| "/var/lib/clustered".into()));
        let pid = std::fs::read_to_string(state.join(format!("pids/{component}.pid")))
            .with_context(|| format!("{component} has no pid file: is the cluster up?"))?;
        let pid = pid.trim();
        let exe = std::fs::read_to_string(state.join(format!("pids/{component}.exe")))?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(exe.trim()) {
            bail!("pid {pid} is not {component} ({exe})");
        }
        let killed = Command::new("kill").args(["-KILL", pid]).status()?;
        if !killed.success() {
            bail!("kill -KILL {pid} ({component}) failed");
        }
        tokio::time::sleep(down_for).await;
        // A process of its own: it finishes restoring the cluster even if
        // this test panics meanwhile.
        let up = Command::new(repo_root().join("e2e/cluster/up"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .context("running e2e/cluster/up")?;
        let restore = Restore(tokio::task::spawn_blocking(move || up.wait_with_output()));
        let mut config = self.config().await?;
        config.default_retry = false;
        let started = tokio::time::Instant::now();
        loop {
            // A new client each time: no connection of the killed server.
            let probe = async {
                let client = Client::try_from(config.clone())?;
                client.request_text(hyper::Request::get("/readyz").body(Vec::new())?).await?;
                anyhow::Ok(())
            };
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), probe).await {
                return Ok((tokio::time::Instant::now(), restore));
            }
            if started.elapsed() > Duration::from_secs(300) {
                bail!("the API server did not come back within 300 s after restarting {component}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Applies the checked-in CRD (the one users install) and waits until
    /// the API server serves it.
    pub async fn install_crd(&self) -> anyhow::Result<()> {
        self.apply_crd(&repo_root().join("crds/clusteredservice.yaml")).await?;
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let name = ClusteredService::crd_name();
        wait_for(Duration::from_secs(30), "CRD established", || async {
            let crd = api.get(name).await?;
            let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
            Ok(conditions.iter().any(|c| c.type_ == "Established" && c.status == "True"))
        })
        .await
    }

    /// Applies the CRD in the YAML file at `path` (server-side, forced).
    pub async fn apply_crd(&self, path: &Path) -> anyhow::Result<()> {
        let crd: CustomResourceDefinition = serde_yaml::from_str(&std::fs::read_to_string(path)?)?;
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        api.patch(&crd.name_any(), &PatchParams::apply("clustered-e2e").force(), &Patch::Apply(&crd)).await?;
        Ok(())
    }

    /// Re-installs this build's CRD if the served one lacks any of `fields`
    /// (another test binary installed an older CRD, whose schema would
    /// prune them).
    pub async fn ensure_crd_serves(&self, fields: &[&str]) -> anyhow::Result<()> {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let served = serde_json::to_string(&crds.get(ClusteredService::crd_name()).await?.spec)?;
        if let Some(missing) = fields.iter().find(|f| !served.contains(*f)) {
            eprintln!("the served CRD lacks {missing}: re-installing this build's");
            self.install_crd().await?;
        }
        Ok(())
    }

    /// Fails unless every one of `images` is on the node: tests that run
    /// pods say up front that `make images` is missing, rather than time out.
    /// The nodes' status lists an imported image only at the kubelet's next
    /// image-list refresh (up to ~40 s): right after `make images` a test
    /// waits for it, up to [`IMAGES_LISTED_WITHIN`].
    pub async fn require_images(&self, images: &[&str]) -> anyhow::Result<()> {
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.client.clone());
        wait_for(IMAGES_LISTED_WITHIN, "the images in the nodes' status", || async {
            let present: Vec<String> = nodes
                .list(&Default::default())
                .await?
                .items
                .into_iter()
                .flat_map(|n| n.status.and_then(|s| s.images).unwrap_or_default())
                .flat_map(|i| i.names.unwrap_or_default())
                .collect();
            let missing: Vec<&str> = images
                .iter()
                .copied()
                .filter(|i| !present.iter().any(|p| p.ends_with(&format!("/{i}")) || p == i))
                .collect();
            if !missing.is_empty() {
                bail!("images not on the node: {missing:?}; run `make images` (or e2e/cluster/images)");
            }
            Ok(true)
        })
        .await
    }

    /// A fresh namespace for one test, enforcing the `restricted` Pod
    /// Security Standard. Named after the test so leftovers are traceable.
    pub async fn namespace(&self, test: &str) -> anyhow::Result<String> {
        let name = format!("e2e-{test}-{}", std::process::id());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "labels": {
                    "clustered.dev/e2e": "true",
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                }
            }
        }))?;
        let api: Api<Namespace> = Api::all(self.client.clone());
        let _ = api.delete(&name, &DeleteParams::default()).await;
        wait_for(Duration::from_secs(120), "old namespace gone", || async { Ok(api.get_opt(&name).await?.is_none()) })
            .await?;
        api.create(&PostParams::default(), &ns).await?;
        Ok(name)
    }

    /// Deletes a test namespace and waits until everything in it is gone.
    pub async fn delete_namespace(&self, name: &str) -> anyhow::Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let _ = api.delete(name, &DeleteParams::foreground()).await;
        wait_for(Duration::from_secs(180), "namespace deleted", || async { Ok(api.get_opt(name).await?.is_none()) })
            .await
    }

    /// Runs the cluster's kubectl; fails with its stderr if it fails.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.tool("kubectl", args, None)
    }

    /// Runs kubectl with `stdin` as its input.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> anyhow::Result<String> {
        self.tool("kubectl", args, Some(stdin))
    }

    /// Runs `kubectl clustered ARGS`: kubectl finds the plugin built by
    /// `make build` (`$KUBECTL_CLUSTERED_BIN`) on its PATH, as a user's would.
    pub fn kubectl_clustered(&self, args: &[&str]) -> anyhow::Result<String> {
        let plugin = std::env::var_os("KUBECTL_CLUSTERED_BIN")
            .map(PathBuf::from)
            .context("KUBECTL_CLUSTERED_BIN is not set: run the tests with `make test`, which builds the plugin")?;
        let dir = plugin.parent().context("KUBECTL_CLUSTERED_BIN has no directory")?;
        anyhow::ensure!(plugin.is_file(), "{} is missing: `make build` builds it", plugin.display());
        let path = std::env::join_paths(
            std::iter::once(dir.to_path_buf())
                .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
        )?;
        let mut all = vec!["clustered"];
        all.extend_from_slice(args);
        self.tool_with("kubectl", &all, None, &[("PATH", &path)])
    }

    /// Runs the cluster's helm.
    pub fn helm(&self, args: &[&str]) -> anyhow::Result<String> {
        self.tool("helm", args, None)
    }

    fn tool(&self, tool: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        self.tool_with(tool, args, stdin, &[])
    }

    /// Runs one of the cluster's tools with `env` on top of this process's.
    fn tool_with(
        &self,
        tool: &str,
        args: &[&str],
        stdin: Option<&str>,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<String> {
        use std::io::Write;
        let mut child = Command::new(self.bin_dir.join(tool))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .envs(env.iter().copied())
            .stdin(if stdin.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {tool}"))?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("{tool} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// How long an image imported into the nodes may take to show in their
/// status (the kubelet refreshes its image list every 30 s, and reports it
/// at its next node status update).
const IMAGES_LISTED_WITHIN: Duration = Duration::from_secs(60);

/// How often the tests' operator asks a clusterd that tells it of changes:
/// longer than any test waits, so a worker's crash reaches the status by
/// clusterd's word or not in time.
pub const SETTLED_STATUS_INTERVAL: Duration = Duration::from_secs(600);

/// `e2e/cluster/up` restarting what [`Cluster::restart_component`] killed.
pub struct Restore(tokio::task::JoinHandle<std::io::Result<std::process::Output>>);

impl Restore {
    /// Waits until `up` has finished; fails if it failed.
    pub async fn finished(self) -> anyhow::Result<()> {
        let output = self.0.await??;
        if !output.status.success() {
            bail!("e2e/cluster/up failed ({}): the cluster is not restored", output.status);
        }
        Ok(())
    }
}

/// The operator, run in this process against the cluster and scoped to one
/// namespace, so tests running in parallel do not share it.
pub struct Operator {
    /// Its metrics, to check what it did (e.g. how many status writes).
    pub metrics: std::sync::Arc<clustered_operator::metrics::Metrics>,
    /// Which of its watches are failing.
    pub watches: std::sync::Arc<clustered_operator::watches::WatchHealth>,
    /// Its readiness: set once its caches are listed and it reconciles.
    pub ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Where it serves `/metrics`, `/healthz` and `/readyz` (loopback).
    pub admin_addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Operator {
    pub async fn start(cluster: &Cluster, namespace: &str) -> anyhow::Result<Operator> {
        Self::start_with(cluster, namespace, clustered_operator::resources::Settings::default()).await
    }

    /// An operator with its own settings (e.g. another clusterd image).
    pub async fn start_with(
        cluster: &Cluster,
        namespace: &str,
        settings: clustered_operator::resources::Settings,
    ) -> anyhow::Result<Operator> {
        use clustered_operator::{controller, metrics::Metrics, probe::Prober, server, watches};
        use kube::runtime::events::{Recorder, Reporter};
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;

        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let health = Arc::new(watches::WatchHealth::default());
        let ready = Arc::new(AtomicBool::new(false));
        // Every address: the pods' clusterd tell it of their changes at the
        // address it asks them from (this machine's, on the pods' network).
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
        let admin_addr = std::net::SocketAddr::from(([127, 0, 0, 1], listener.local_addr()?.port()));
        let (changed, changes) = tokio::sync::mpsc::channel(64);
        let admin = Arc::new(server::Health { ready: ready.clone(), live: Arc::new(AtomicBool::new(true)), changed });
        let server = tokio::spawn(server::serve_on(listener, Arc::new(registry), admin));
        // Its own client, built as the operator's main builds it: no
        // connection or retry policy shared with the test's client.
        let client = watches::client(cluster.config().await?)?;
        let reporter = Reporter { controller: "clustered-operator".into(), instance: Some(format!("e2e-{namespace}")) };
        let config = controller::Config {
            namespace: Some(namespace.to_string()),
            settings,
            prober: Prober::new(8, Duration::from_secs(2)).telling(admin_addr.port()),
            recorder: Recorder::new(client.clone(), reporter),
            metrics: metrics.clone(),
            status_interval: Duration::from_secs(2),
            settled_status_interval: SETTLED_STATUS_INTERVAL,
            changes,
            watches: health.clone(),
            images: std::sync::Arc::new(clustered_operator::image::registry::Resolver::new(
                registries(),
                clustered_operator::image::registry::RESOLVE_TIMEOUT,
            )),
            ready: ready.clone(),
            concurrency: 32,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            controller::run(client, config, async move {
                let _ = stopped.await;
            })
            .await;
        });
        Ok(Operator { metrics, watches: health, ready, admin_addr, stop: Some(stop), task, server })
    }

    /// Stops gracefully, letting running reconciles finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
        self.server.abort();
    }

    /// Stops at once, wherever a reconcile is: what a crash looks like to
    /// the API server.
    pub fn kill(self) {
        self.task.abort();
        self.server.abort();
    }
}

/// The local cluster's registries (`host:port`): the anonymous one, then the
/// one behind basic auth. Both plain HTTP; see `e2e/cluster/lib.sh`.
pub fn registries() -> Vec<String> {
    let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
    vec![var("CLUSTERED_REGISTRY", "10.201.0.1:5000"), var("CLUSTERED_AUTH_REGISTRY", "10.201.0.1:5001")]
}

/// The user:password of the registry behind basic auth (written by `up`).
pub fn auth_registry_credentials() -> anyhow::Result<(String, String)> {
    let path = std::env::var("CLUSTERED_AUTH_REGISTRY_CREDENTIALS")
        .unwrap_or_else(|_| "/var/lib/clustered/registry-auth/credentials".into());
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}: is the cluster up?"))?;
    let (user, password) = text.trim().split_once(':').with_context(|| format!("{path}: want user:password"))?;
    Ok((user.to_string(), password.to_string()))
}

/// Runs a cluster script (its log goes to stderr) and returns the last line
/// it printed: `up` prints the kubeconfig path, `build` the binaries' dir.
async fn last_line_of(script: &str) -> anyhow::Result<String> {
    let path = repo_root().join(script);
    let output = tokio::process::Command::new(&path)
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .with_context(|| format!("running {}", path.display()))?;
    if !output.status.success() {
        bail!("{script} failed ({}); its log above names the component that did not start", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    Ok(stdout.lines().last().with_context(|| format!("{script} printed nothing"))?.trim().to_string())
}

/// Polls `check` every 250 ms until it returns true; fails after `timeout`
/// with the last error, so a failing test says what it waited for.
pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            match last {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A ClusteredService of the demo image, one `app` container that passes
/// the test namespaces' `restricted` Pod Security: 1 replica of 1 worker,
/// requests 50m/32Mi, limits 1 CPU/128Mi, a 2 s drain, in proxy mode (the
/// tests were written for per-worker probes; node mode has its own test).
/// `edit` changes its JSON before it is parsed; [`app_container`] reaches
/// the container.
pub fn demo_service(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> ClusteredService {
    let mut value = serde_json::json!({
        "apiVersion": "clustered.dev/v1alpha1",
        "kind": "ClusteredService",
        "metadata": { "name": name },
        "spec": {
            "portMode": "proxy",
            "replicas": 1,
            "workers": { "count": 1 },
            "shutdown": { "drainTimeoutSeconds": 2 },
            "template": { "spec": {
                "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": { "type": "RuntimeDefault" } },
                "containers": [{
                    "name": "app",
                    "image": "clustered.dev/demo-app:dev",
                    "imagePullPolicy": "Never",
                    "command": ["node", "/app/server.js"],
                    "resources": { "requests": { "cpu": "50m", "memory": "32Mi" }, "limits": { "cpu": "1", "memory": "128Mi" } },
                    "securityContext": { "allowPrivilegeEscalation": false, "capabilities": { "drop": ["ALL"] } }
                }]
            }}
        }
    });
    edit(&mut value);
    serde_json::from_value(value).expect("a valid ClusteredService")
}

/// The app container in [`demo_service`]'s JSON.
pub fn app_container(value: &mut serde_json::Value) -> &mut serde_json::Value {
    &mut value["spec"]["template"]["spec"]["containers"][0]
}
