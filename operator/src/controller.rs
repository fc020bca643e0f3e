//! The reconcile loop: desired children compared with the live ones (as
//! the API server renders them) and created or replaced when they differ,
//! then the status from the pods, the Deployment and what every pod's
//! clusterd reports.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clustered_api::v1alpha1::{ClusteredService, ClusteredServiceStatus, WorkerState};
use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{self as kube_controller, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::autoscale;
use crate::image::{self, Platform, ResolvedImage, credentials, registry::Resolver};
use crate::metrics::{ErrorLabel, Metrics, ResultLabel};
use crate::probe::Prober;
use crate::resources::{self, MANAGER, SERVICE_LABEL, Settings};
use crate::status::{self, DEGRADED, NO_CPU_LIMIT, Observed, Problem};
use crate::watches::{self, Synced, WatchHealth};

/// Annotation older operators kept their applied state in; dropped from
/// children as they are rewritten (the live object is compared instead).
const APPLIED_HASH: &str = "clustered.dev/applied-hash";

/// The longest wait before a failed reconcile is retried: a child someone
/// deleted or changed is restored within it, even while the API refuses.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How soon to look again when the cache was behind the API server.
const STALE_RETRY: Duration = Duration::from_secs(1);

/// Longest a reconcile may take: a few API requests and a probe of each
/// pod's clusterd (each bounded by the probe timeout).
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(30);

/// A status write at most this often per ClusteredService.
const STATUS_WRITE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("object has no namespace")]
    NoNamespace,
    #[error("cannot encode a child object: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("the reconcile took longer than {0:?} (an API request hung); retrying")]
    Timeout(Duration),
    #[error("{0}")]
    ImageConfig(String),
}

impl Error {
    fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::NoNamespace => "no_namespace",
            Error::Encode(_) => "encode",
            Error::Timeout(_) => "timeout",
            Error::ImageConfig(_) => "image_config",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub prober: Prober,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// How often clusterd is asked again when nothing else happens.
    pub status_interval: Duration,
    /// Reads the config of app images that set no command.
    pub images: Arc<Resolver>,
    /// The platform whose image is chosen from a multi-platform index.
    pub platform: Platform,
    stores: Stores,
    /// Open once every store has been listed.
    synced: Synced,
    memory: Arc<Bookkeeping>,
}

/// Reflector caches of the children, filled by the controller's watches.
#[derive(Clone)]
struct Stores {
    pods: Store<Pod>,
    deployments: Store<Deployment>,
    services: Store<Service>,
    pdbs: Store<PodDisruptionBudget>,
    hpas: Store<HorizontalPodAutoscaler>,
}

impl Stores {
    /// Waits until every store has been listed once. The controller keeps
    /// polling the watches meanwhile; it already holds reconciles until the
    /// ClusteredService store is listed, but not until the children's are.
    /// False only when a watch was dropped first (the controller stops).
    /// Awaited once, by [`Synced`]: each store wakes a single waiter.
    async fn listed(self) -> bool {
        futures::try_join!(
            self.pods.wait_until_ready(),
            self.deployments.wait_until_ready(),
            self.services.wait_until_ready(),
            self.pdbs.wait_until_ready(),
            self.hpas.wait_until_ready(),
        )
        .is_ok()
    }
}

/// Per-object bookkeeping that lives only in this process.
#[derive(Default)]
struct Memory {
    last_status_write: Option<Instant>,
    failures: u32,
    /// Per child kind: the hash of the desired object and the live
    /// `resourceVersion` the API server last confirmed it matches, so an
    /// unchanged child costs no API call.
    verified: HashMap<String, (String, String)>,
    /// The concurrency autoscaler's samples and recommendations.
    autoscaler: crate::autoscale::Autoscaler,
    /// The app image resolved for a generation of the spec: reused until
    /// the spec changes, so a moved tag never changes the pods by itself.
    image: Option<(Option<i64>, String, ResolvedImage)>,
}

/// The `Memory` of every ClusteredService seen, forgotten when it is deleted.
struct Bookkeeping {
    objects: Mutex<HashMap<ObjectRef<ClusteredService>, Memory>>,
    tracked: Gauge,
}

impl Bookkeeping {
    fn remember<T>(&self, csvc: &ClusteredService, f: impl FnOnce(&mut Memory) -> T) -> T {
        let mut objects = self.objects.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let result = f(objects.entry(ObjectRef::from(csvc)).or_default());
        self.tracked.set(objects.len() as i64);
        result
    }

    fn forget(&self, csvc: &ClusteredService) {
        let mut objects = self.objects.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        objects.remove(&ObjectRef::from(csvc));
        self.tracked.set(objects.len() as i64);
    }
}

/// How the controller is run.
pub struct Config {
    /// Watch one namespace only.
    pub namespace: Option<String>,
    pub settings: Settings,
    pub prober: Prober,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub status_interval: Duration,
    /// Where the watches report failures (read by the liveness probe).
    pub watches: Arc<WatchHealth>,
    /// Reads the config of app images that set no command.
    pub images: Arc<Resolver>,
    /// Set once the stores are listed and reconciles run (the readiness
    /// of the leader).
    pub ready: Arc<AtomicBool>,
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(client: Client, config: Config, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let Config { namespace, settings, prober, recorder, metrics, status_interval, watches, images, ready } = config;
    let ours = watcher::Config::default().labels(SERVICE_LABEL);

    // Status writes do not change the generation, so they do not trigger
    // reconciles of their own; the periodic requeue asks clusterd again.
    let memory = Arc::new(Bookkeeping { objects: Mutex::default(), tracked: metrics.tracked_objects.clone() });
    let forget = Arc::clone(&memory);
    let (csvc_reader, csvc_writer) = reflector::store();
    let csvcs = watches::watch(
        scoped::<ClusteredService>(&client, namespace.as_deref()),
        watcher::Config::default().any_semantic(),
        &watches,
    )
    .reflect(csvc_writer)
    .inspect_ok(move |event| {
        if let watcher::Event::Delete(csvc) = event {
            forget.forget(csvc);
        }
    })
    .applied_objects()
    .predicate_filter(predicates::generation, Default::default());

    let (pods, pod_events) = reflect(&watches, scoped::<Pod>(&client, namespace.as_deref()), ours.clone());
    let (deployments, deployment_events) =
        reflect(&watches, scoped::<Deployment>(&client, namespace.as_deref()), ours.clone());
    let (services, service_events) = reflect(&watches, scoped::<Service>(&client, namespace.as_deref()), ours.clone());
    let (pdbs, pdb_events) =
        reflect(&watches, scoped::<PodDisruptionBudget>(&client, namespace.as_deref()), ours.clone());
    let (hpas, hpa_events) = reflect(&watches, scoped::<HorizontalPodAutoscaler>(&client, namespace.as_deref()), ours);

    let stores = Stores { pods, deployments, services, pdbs, hpas };
    let synced = Synced::after(stores.clone().listed(), move || {
        info!("caches listed: reconciling");
        ready.store(true, Ordering::Relaxed);
    });
    let ctx = Arc::new(Context {
        client,
        settings,
        prober,
        recorder,
        metrics,
        status_interval,
        images,
        platform: image::own_platform(),
        stores,
        synced,
        memory,
    });

    Controller::for_stream(csvcs, csvc_reader)
        .owns_stream(deployment_events)
        .owns_stream(service_events)
        .owns_stream(pdb_events)
        .owns_stream(hpa_events)
        .watches_stream(pod_events, |pod: Pod| {
            let name = pod.labels().get(SERVICE_LABEL)?.clone();
            Some(ObjectRef::<ClusteredService>::new(&name).within(&pod.namespace()?))
        })
        .trigger_backoff(watches::trigger_backoff())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move { log_outcome(result) })
        .await;
}

/// `K`s in one namespace, or in all.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A store of `K` and the stream that fills it.
fn reflect<K>(
    health: &Arc<WatchHealth>,
    api: Api<K>,
    config: watcher::Config,
) -> (Store<K>, impl Stream<Item = Result<K, watcher::Error>> + Send + use<K>)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    // Deletions too: a deleted child is re-created, and a deleted pod
    // leaves the status, without waiting for a resync.
    (reader, watches::watch(api, config, health).reflect(writer).touched_objects())
}

type RunResult = Result<(ObjectRef<ClusteredService>, Action), kube_controller::Error<Error, watcher::Error>>;

/// Logs what the controller reports. Watch failures are logged (once per
/// episode) where they happen; a trigger for a ClusteredService that was
/// just deleted (its children's deletions) is expected.
fn log_outcome(result: RunResult) {
    match result {
        Ok(_) => {}
        Err(kube_controller::Error::ObjectNotFound(object)) => debug!(%object, "trigger for a deleted object"),
        Err(kube_controller::Error::QueueError(e)) => debug!(error = %e, "watch failed"),
        Err(e) => warn!(error = %e, "reconcile failed"),
    }
}

async fn reconcile(csvc: Arc<ClusteredService>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    // A hung request must not stall this object for good: the retry sends
    // new requests.
    let result = tokio::time::timeout(RECONCILE_TIMEOUT, reconcile_inner(&csvc, &ctx))
        .await
        .unwrap_or(Err(Error::Timeout(RECONCILE_TIMEOUT)));
    ctx.metrics.observe_duration(started.elapsed());
    let outcome = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics.reconciles.get_or_create(&ResultLabel { result: outcome }).inc();
    if result.is_ok() {
        ctx.memory.remember(&csvc, |m| m.failures = 0);
    }
    result
}

async fn reconcile_inner(csvc: &ClusteredService, ctx: &Context) -> Result<Action, Error> {
    // The status is computed from every store: one that has not been
    // listed yet would show pods or the Deployment as missing.
    if !ctx.synced.wait().await {
        return Ok(Action::await_change());
    }
    if csvc.metadata.deletion_timestamp.is_some() {
        // Children carry owner references: the garbage collector removes them.
        return Ok(Action::await_change());
    }
    let ns = csvc.namespace().ok_or(Error::NoNamespace)?;
    let name = csvc.name_any();
    let stores = &ctx.stores;

    let mut problem = None;
    let mut results = Vec::new();
    // An app container without command runs its image's ENTRYPOINT/CMD; if
    // they cannot be read, the Deployment stays as it is.
    let (image, image_failure) = match resolve_app_image(csvc, &ns, ctx).await {
        Ok(image) => (image, None),
        Err(why) => {
            warn!(%ns, %name, %why, "image config unavailable");
            problem = Some(Problem::ImageConfigUnavailable(why.clone()));
            (None, Some(why))
        }
    };
    match resources::deployment_for(csvc, &ctx.settings, image.as_ref()) {
        _ if image_failure.is_some() => {}
        Ok(deployment) => {
            let previous = stores.deployments.get(&ObjectRef::new(&name).within(&ns));
            let result = ensure(ctx, csvc, &stores.deployments, &ns, &name, Some(deployment)).await;
            if let (Ok(Ensured::Written), Some(previous)) = (&result, previous)
                && let Some(from) = scaled_from(&previous, csvc.spec.replicas)
            {
                ctx.event(csvc, EventType::Normal, "Scaled", format!("pods {from} → {}", csvc.spec.replicas)).await;
            }
            results.push(("Deployment", result));
        }
        Err(e) => problem = Some(Problem::InvalidSpec(e.to_string())),
    }
    let service = Some(resources::service(csvc));
    results.push(("Service", ensure(ctx, csvc, &stores.services, &ns, &name, service).await));
    let pdb = Some(resources::pod_disruption_budget(csvc));
    results.push(("PodDisruptionBudget", ensure(ctx, csvc, &stores.pdbs, &ns, &name, pdb).await));
    let hpa = resources::hpa(csvc);
    results.push(("HorizontalPodAutoscaler", ensure(ctx, csvc, &stores.hpas, &ns, &name, hpa).await));
    let stale = results.iter().any(|(_, r)| matches!(r, Ok(Ensured::Stale)));
    let refused = results.into_iter().find_map(|(kind, r)| Some((kind, r.err()?)));
    if let Some((kind, e)) = &refused {
        warn!(%ns, %name, %kind, error = %e, "could not apply a child");
        let why = format!("applying the {kind}: {}", api_message(e));
        problem = problem.or(Some(Problem::ReconcileError(why)));
    }

    let pods: Vec<Arc<Pod>> = stores
        .pods
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(&ns) && p.labels().get(SERVICE_LABEL) == Some(&name))
        .collect();
    let askable: Vec<&Pod> =
        pods.iter().map(AsRef::as_ref).filter(|p| p.metadata.deletion_timestamp.is_none() && has_started(p)).collect();
    let admin_port = u16::try_from(csvc.spec.admin_port).unwrap_or(clustered_api::clusterd::defaults::ADMIN_PORT);
    let reports = ctx.prober.reports(&askable, admin_port).await;
    let failed = reports.values().filter(|r| r.is_err()).count();
    ctx.metrics.status_probe_failures.inc_by(failed as u64);

    let deployment = stores.deployments.get(&ObjectRef::new(&name).within(&ns));
    let observed = Observed {
        deployment: deployment.as_deref(),
        pods: pods.iter().map(AsRef::as_ref).collect(),
        reports: &reports,
        problem,
    };
    let now = Timestamp::now();
    let mut new_status = status::compute(csvc, &observed, now);
    let hpa = stores.hpas.get(&ObjectRef::new(&name).within(&ns));
    new_status.autoscaling = autoscale::reconcile(ctx, csvc, &new_status, &reports, hpa.as_deref()).await;
    let wait = write_status(csvc, &ns, new_status, now, ctx).await?;
    // The failure is in the status now; the error drives the backoff.
    if let Some((_, e)) = refused {
        return Err(e);
    }
    if let Some(why) = image_failure {
        return Err(Error::ImageConfig(why));
    }
    if stale {
        return Ok(Action::requeue(STALE_RETRY));
    }
    if let Some(wait) = wait {
        return Ok(Action::requeue(wait));
    }
    // Worker states change without any Kubernetes event: ask clusterd again.
    // Without running pods, watch events trigger every reconcile that
    // matters; the heartbeat only keeps `observedAt` current.
    let next = if askable.is_empty() { status::HEARTBEAT } else { ctx.status_interval };
    // The concurrency autoscaler samples clusterd at its own pace.
    let next = if autoscale::scales_on_concurrency(csvc) { next.min(autoscale::SAMPLE_INTERVAL) } else { next };
    Ok(Action::requeue(next))
}

/// The app image's digest and config when the app container sets no
/// command (`None` when it does). Resolved once per generation of the spec:
/// the same spec keeps its digest (across operator restarts too, read back
/// from the Deployment), a changed spec looks the tag up again. The error
/// is the Degraded message.
async fn resolve_app_image(csvc: &ClusteredService, ns: &str, ctx: &Context) -> Result<Option<ResolvedImage>, String> {
    let Some(app) = resources::app_container(csvc) else { return Ok(None) };
    if app.command.as_ref().is_some_and(|c| !c.is_empty()) {
        return Ok(None);
    }
    let Some(image) = app.image.as_deref().filter(|i| !i.is_empty()) else {
        return Err(format!("the app container {:?} sets neither image nor command: set its image", app.name));
    };
    let generation = csvc.metadata.generation;
    let remembered = ctx.memory.remember(csvc, |m| m.image.clone());
    if let Some((g, i, resolved)) = remembered
        && g == generation
        && i == image
    {
        return Ok(Some(resolved));
    }
    // After a restart: the digest the live Deployment is pinned to, if it
    // was resolved for this very spec (the status says which spec it saw).
    let same_spec = csvc.status.as_ref().and_then(|s| s.observed_generation) == generation;
    let live = ctx.stores.deployments.get(&ObjectRef::new(&csvc.name_any()).within(ns));
    let live_image = live.as_ref().and_then(|d| {
        d.spec.as_ref()?.template.spec.as_ref()?.containers.iter().find(|c| c.name == app.name)?.image.clone()
    });
    let known = live_image.as_deref().filter(|_| same_spec).and_then(|live| image::pinned_digest(image, live));

    let registry = Resolver::registry_of(image)
        .map_err(|e| image::unavailable_message(&app.name, image, "its registry", &e, &[]))?;
    let pod = csvc.spec.template.spec.as_ref();
    let (secrets, names) = pull_secrets(ctx, ns, pod).await?;
    let credentials = credentials::for_registry(&secrets, &registry);
    let platform = image::platform_for(pod.and_then(|p| p.node_selector.as_ref()), &ctx.platform);
    match ctx.images.resolve(image, known, credentials, &platform).await {
        Ok(resolved) => {
            if known.is_none() {
                info!(%ns, name = %csvc.name_any(), image, digest = %resolved.digest, %platform, "resolved the app image");
            }
            ctx.memory.remember(csvc, |m| m.image = Some((generation, image.to_string(), resolved.clone())));
            Ok(Some(resolved))
        }
        Err(e) => Err(image::unavailable_message(&app.name, image, &registry, &e, &names)),
    }
}

/// The registry credentials of the pod's image pull secrets, then those of
/// its service account, as the kubelet uses them, with the secrets' names.
/// A secret that does not exist is skipped, as the kubelet does; one that
/// cannot be read or parsed is an error saying which.
async fn pull_secrets(
    ctx: &Context,
    ns: &str,
    pod: Option<&k8s_openapi::api::core::v1::PodSpec>,
) -> Result<(Vec<std::collections::BTreeMap<String, credentials::Credentials>>, Vec<String>), String> {
    let mut names: Vec<String> =
        pod.and_then(|p| p.image_pull_secrets.as_ref()).into_iter().flatten().map(|r| r.name.clone()).collect();
    let account = pod
        .and_then(|p| p.service_account_name.clone().or_else(|| p.service_account.clone()))
        .unwrap_or_else(|| "default".into());
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), ns);
    match accounts.get_opt(&account).await {
        Ok(sa) => names.extend(sa.and_then(|sa| sa.image_pull_secrets).into_iter().flatten().map(|r| r.name)),
        Err(e) => return Err(format!("cannot read the service account {account:?} for its image pull secrets: {e}")),
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut secrets = Vec::new();
    for name in &names {
        let secret = match api.get_opt(name).await {
            Ok(Some(secret)) => secret,
            Ok(None) => continue,
            Err(e) => return Err(format!("cannot read the image pull secret {name:?}: {e}")),
        };
        let data = secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
        let entries = credentials::from_secret(secret.type_.as_deref(), &data)
            .map_err(|why| format!("the image pull secret {name:?} cannot be used: {why}"))?;
        secrets.push(entries);
    }
    Ok((secrets, names))
}

/// Writes `new` unless it equals the stored status. Returns how long to
/// wait when a write happened less than a second ago (writes are coalesced).
async fn write_status(
    csvc: &ClusteredService,
    ns: &str,
    new: ClusteredServiceStatus,
    now: Timestamp,
    ctx: &Context,
) -> Result<Option<Duration>, Error> {
    let old = csvc.status.as_ref();
    if !status::changed(old, &new, now) {
        return Ok(None);
    }
    let since_last = ctx.memory.remember(csvc, |m| m.last_status_write.map(|t| t.elapsed()));
    if let Some(elapsed) = since_last.filter(|&e| e < STATUS_WRITE_INTERVAL) {
        return Ok(Some(STATUS_WRITE_INTERVAL - elapsed));
    }
    publish_transitions(csvc, old, &new, ctx).await;

    let api: Api<ClusteredService> = Api::namespaced(ctx.client.clone(), ns);
    let patch = serde_json::json!({
        "apiVersion": ClusteredService::api_version(&()),
        "kind": ClusteredService::kind(&()),
        "status": new,
    });
    api.patch_status(&csvc.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await?;
    ctx.metrics.status_writes.inc();
    ctx.memory.remember(csvc, |m| m.last_status_write = Some(Instant::now()));
    Ok(None)
}

/// Publishes the Events `transition_events` calls for.
async fn publish_transitions(
    csvc: &ClusteredService,
    old: Option<&ClusteredServiceStatus>,
    new: &ClusteredServiceStatus,
    ctx: &Context,
) {
    for (type_, reason, note) in transition_events(old, new) {
        ctx.event(csvc, type_, &reason, note).await;
    }
}

/// Events for what a person should hear about: each new reason for being
/// degraded (or for the missing CPU limit), recovery, and workers entering
/// a crash loop. One Event per transition, so a cause that persists is
/// announced once, however often it is retried.
fn transition_events(
    old: Option<&ClusteredServiceStatus>,
    new: &ClusteredServiceStatus,
) -> Vec<(EventType, String, String)> {
    let mut events = Vec::new();
    let degraded =
        |s: Option<&ClusteredServiceStatus>| s.and_then(|s| s.conditions.iter().find(|c| c.type_ == DEGRADED)).cloned();
    let (before, now) = (degraded(old), degraded(Some(new)));
    if let Some(now) = now.filter(|n| before.as_ref().map(|b| (&b.status, &b.reason)) != Some((&n.status, &n.reason))) {
        if now.status != "True" && before.is_some_and(|b| b.status == "True") {
            events.push((EventType::Normal, "Recovered".into(), "no longer degraded".into()));
        }
        if now.status == "True" || now.reason == NO_CPU_LIMIT {
            events.push((EventType::Warning, now.reason, now.message));
        }
    }
    let before = old.map(|s| status::workers_in(&s.instances, WorkerState::CrashLoop)).unwrap_or_default();
    for worker in status::workers_in(&new.instances, WorkerState::CrashLoop).into_iter().filter(|w| !before.contains(w))
    {
        let note = format!("worker {worker} (pod/id) keeps crashing; clusterd restarts it at the maximum backoff");
        events.push((EventType::Warning, "WorkerCrashLoop".into(), note));
    }
    events
}

/// What `ensure` did.
#[derive(Debug, PartialEq)]
enum Ensured {
    Unchanged,
    Written,
    /// The cache was behind the API server (a conflict): look again soon.
    Stale,
}

/// Makes the live child match `desired`, or deletes it when `None`.
///
/// Missing: created. Present: the API server renders `desired` onto the
/// live object (a dry-run replace, so defaults and normalisation are its
/// own) and the result is compared with the live object; any difference in
/// the spec, or in the labels and owner the operator sets, is drift and
/// the child is replaced. A replace, not an apply: fields someone else
/// added (an env var, a Service port) go as well. A child the API server
/// confirmed in sync is not asked about again until it or `desired` changes.
async fn ensure<K>(
    ctx: &Context,
    csvc: &ClusteredService,
    store: &Store<K>,
    ns: &str,
    name: &str,
    desired: Option<K>,
) -> Result<Ensured, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let current = store.get(&ObjectRef::new(name).within(ns));
    let Some(desired) = desired else {
        if current.is_some() {
            match api.delete(name, &DeleteParams::background()).await {
                Ok(_) => {
                    ctx.metrics.child_writes.inc();
                    return Ok(Ensured::Written);
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(Ensured::Unchanged);
    };
    let kind = K::kind(&()).into_owned();
    let params = |dry_run| PostParams { dry_run, field_manager: Some(MANAGER.into()) };
    let live = match current {
        Some(live) => live,
        None => match api.create(&params(false), &desired).await {
            Ok(_) => {
                ctx.metrics.child_writes.inc();
                info!(%kind, %ns, %name, "created");
                return Ok(Ensured::Written);
            }
            // Not in the cache but there: the cache is behind, or someone
            // removed the label the cache is selected by. Compare with it.
            Err(kube::Error::Api(e)) if e.code == 409 => Arc::new(api.get(name).await?),
            Err(e) => return Err(e.into()),
        },
    };
    let hash = content_hash(&desired);
    let version = live.resource_version().unwrap_or_default();
    let verified = (hash, version);
    if ctx.memory.remember(csvc, |m| m.verified.get(&kind) == Some(&verified)) {
        return Ok(Ensured::Unchanged);
    }
    let live_json = serde_json::to_value(&*live).map_err(Error::Encode)?;
    let body: K =
        serde_json::from_value(onto_live(&live_json, &serde_json::to_value(&desired).map_err(Error::Encode)?))
            .map_err(Error::Encode)?;
    let rendered = match api.replace(name, &params(true), &body).await {
        Ok(rendered) => rendered,
        Err(e) => return stale_or(e),
    };
    if !drifted(&serde_json::to_value(&rendered).map_err(Error::Encode)?, &live_json) {
        ctx.memory.remember(csvc, |m| m.verified.insert(kind, verified));
        return Ok(Ensured::Unchanged);
    }
    match api.replace(name, &params(false), &body).await {
        Ok(_) => {
            ctx.metrics.child_writes.inc();
            info!(%kind, %ns, %name, "replaced (desired state changed or drifted)");
            Ok(Ensured::Written)
        }
        Err(e) => stale_or(e),
    }
}

/// A conflict means the cache was behind: not a failure, look again soon.
fn stale_or(e: kube::Error) -> Result<Ensured, Error> {
    match e {
        kube::Error::Api(ref r) if r.code == 409 => Ok(Ensured::Stale),
        e => Err(e.into()),
    }
}

/// The body of a replace: the live object (its resourceVersion, server-set
/// metadata, others' labels) with the desired spec, the desired labels on
/// top and the desired owner references.
fn onto_live(live: &serde_json::Value, desired: &serde_json::Value) -> serde_json::Value {
    let mut body = live.clone();
    if let Some(object) = body.as_object_mut() {
        object.remove("status");
        match desired.get("spec") {
            Some(spec) => object.insert("spec".into(), spec.clone()),
            None => object.remove("spec"),
        };
    }
    let meta = &mut body["metadata"];
    if let Some(labels) = desired["metadata"]["labels"].as_object() {
        for (key, value) in labels {
            meta["labels"][key] = value.clone();
        }
    }
    if let Some(annotations) = meta.get_mut("annotations").and_then(|a| a.as_object_mut()) {
        annotations.remove(APPLIED_HASH);
    }
    meta["ownerReferences"] = desired["metadata"]["ownerReferences"].clone();
    body
}

/// True when `rendered` (the API server's rendering of the desired object)
/// and `live` differ in anything the operator owns: the whole spec, its
/// labels' values, the owner references.
fn drifted(rendered: &serde_json::Value, live: &serde_json::Value) -> bool {
    let labels_differ = rendered["metadata"]["labels"]
        .as_object()
        .is_some_and(|labels| labels.iter().any(|(k, v)| live["metadata"]["labels"].get(k) != Some(v)));
    rendered.get("spec") != live.get("spec")
        || labels_differ
        || rendered["metadata"]["ownerReferences"] != live["metadata"]["ownerReferences"]
}

/// The pod count before a scale the user asked for, or `None`. A scale is
/// the operator changing the Deployment's replicas it set itself; a count
/// someone else set on the Deployment (`kubectl scale deployment`) is
/// drift, and undoing it is not a scale.
fn scaled_from(previous: &Deployment, desired: i32) -> Option<i32> {
    let from = previous.spec.as_ref()?.replicas.filter(|&r| r != desired)?;
    let ours = previous.managed_fields().iter().any(|m| {
        m.manager.as_deref() == Some(MANAGER)
            && m.fields_v1.as_ref().is_some_and(|f| f.0.get("f:spec").and_then(|s| s.get("f:replicas")).is_some())
    });
    ours.then_some(from)
}

/// The API server's own message for a refused request.
fn api_message(e: &Error) -> String {
    match e {
        Error::Kube(kube::Error::Api(r)) => r.message.clone(),
        e => e.to_string(),
    }
}

fn content_hash(value: &impl Serialize) -> String {
    let mut hasher = DefaultHasher::new();
    serde_json::to_string(value).unwrap_or_default().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// A pod whose containers have started has an IP and, soon, a clusterd.
fn has_started(pod: &Pod) -> bool {
    pod.status.as_ref().is_some_and(|s| s.pod_ip.is_some() && s.phase.as_deref() == Some("Running"))
}

fn error_policy(csvc: Arc<ClusteredService>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_errors.get_or_create(&ErrorLabel { error: error.label() }).inc();
    let failures = ctx.memory.remember(&csvc, |m| {
        m.failures = m.failures.saturating_add(1);
        m.failures
    });
    let backoff = retry_backoff(failures);
    warn!(name = %csvc.name_any(), error = %error, ?backoff, "reconcile failed, retrying");
    Action::requeue(backoff)
}

/// Delay before retrying after the `failures`-th consecutive failed
/// reconcile: 1 s, 2 s, 4 s, … doubling up to [`MAX_BACKOFF`].
fn retry_backoff(failures: u32) -> Duration {
    Duration::from_secs(1 << (failures.clamp(1, 9) - 1)).min(MAX_BACKOFF)
}

impl Context {
    /// Runs `f` on the concurrency autoscaler of `csvc`.
    pub(crate) fn with_autoscaler<T>(
        &self,
        csvc: &ClusteredService,
        f: impl FnOnce(&mut crate::autoscale::Autoscaler) -> T,
    ) -> T {
        self.memory.remember(csvc, |m| f(&mut m.autoscaler))
    }

    pub(crate) async fn event(&self, csvc: &ClusteredService, type_: EventType, reason: &str, note: String) {
        self.event_of(csvc, type_, reason, "Reconcile", note).await;
    }

    /// An Event with its own `action`: the recorder folds Events of the same
    /// reason and action into one series, keeping the first note.
    pub(crate) async fn event_of(
        &self,
        csvc: &ClusteredService,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
        if let Err(e) = self.recorder.publish(&event, &csvc.object_ref(&())).await {
            warn!(error = %e, "could not publish event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DeploymentSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
    use serde_json::json;

    fn live_service() -> serde_json::Value {
        json!({
            "metadata": {
                "name": "web", "resourceVersion": "42",
                "labels": {"clustered.dev/service": "web", "team": "shop"},
                "annotations": {"clustered.dev/applied-hash": "00", "note": "keep"},
                "ownerReferences": [{"uid": "1234"}],
            },
            "spec": {"clusterIP": "10.96.0.7", "ports": [{"name": "http", "port": 9999}, {"name": "x", "port": 1}]},
            "status": {"loadBalancer": {}},
        })
    }

    fn desired_service() -> serde_json::Value {
        json!({
            "metadata": {"name": "web", "labels": {"clustered.dev/service": "web"}, "ownerReferences": [{"uid": "1234"}]},
            "spec": {"ports": [{"name": "http", "port": 8080}]},
        })
    }

    #[test]
    fn the_replace_body_keeps_the_live_metadata_and_takes_the_whole_desired_spec() {
        let body = onto_live(&live_service(), &desired_service());
        assert_eq!(body["spec"], json!({"ports": [{"name": "http", "port": 8080}]}), "ports replaced as a list");
        assert_eq!(body["metadata"]["resourceVersion"], "42", "the replace is conditional on what was compared");
        assert_eq!(body["metadata"]["labels"]["team"], "shop", "others' labels stay");
        assert_eq!(body["metadata"]["annotations"], json!({"note": "keep"}), "the old hash annotation goes");
        assert!(body.get("status").is_none());
    }

    #[test]
    fn drift_is_any_difference_in_spec_our_labels_or_owner() {
        let mut rendered = live_service();
        rendered["metadata"]["labels"] = json!({"clustered.dev/service": "web"});
        assert!(!drifted(&rendered, &live_service()), "others' labels and annotations are not drift");

        let mut live = live_service();
        live["spec"]["ports"][0]["port"] = json!(8080);
        assert!(drifted(&rendered, &live), "a changed port");
        let mut live = live_service();
        live["metadata"]["labels"]["clustered.dev/service"] = json!("other");
        assert!(drifted(&rendered, &live), "a changed label of ours");
        let mut live = live_service();
        live["metadata"]["ownerReferences"] = json!([]);
        assert!(drifted(&rendered, &live), "a removed owner");
        let mut live = live_service();
        live["spec"]["sessionAffinity"] = json!("ClientIP");
        assert!(drifted(&rendered, &live), "a field someone added");
    }

    fn deployment(replicas: i32, replicas_owner: &str) -> Deployment {
        Deployment {
            metadata: kube::api::ObjectMeta {
                managed_fields: Some(vec![
                    ManagedFieldsEntry {
                        manager: Some(replicas_owner.into()),
                        fields_v1: Some(FieldsV1(json!({"f:spec": {"f:replicas": {}}}))),
                        ..Default::default()
                    },
                    ManagedFieldsEntry {
                        manager: Some(MANAGER.into()),
                        fields_v1: Some(FieldsV1(json!({"f:spec": {"f:template": {}}}))),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            },
            spec: Some(DeploymentSpec { replicas: Some(replicas), ..Default::default() }),
            status: None,
        }
    }

    #[test]
    fn a_scale_is_the_operator_changing_its_own_replica_count() {
        assert_eq!(scaled_from(&deployment(1, MANAGER), 2), Some(1));
        assert_eq!(scaled_from(&deployment(2, MANAGER), 2), None, "no change");
        assert_eq!(scaled_from(&deployment(5, "kubectl"), 2), None, "undoing someone's scale is drift repair");
    }

    fn with_degraded(status: &str, reason: &str) -> ClusteredServiceStatus {
        ClusteredServiceStatus {
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: DEGRADED.into(),
                status: status.into(),
                reason: reason.into(),
                message: format!("because {reason}"),
                observed_generation: None,
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH),
            }],
            ..Default::default()
        }
    }

    fn reasons(old: Option<&ClusteredServiceStatus>, new: &ClusteredServiceStatus) -> Vec<(EventType, String)> {
        transition_events(old, new).into_iter().map(|(t, r, _)| (t, r)).collect()
    }

    #[test]
    fn one_event_per_transition_and_no_recovery_while_degraded() {
        let fine = with_degraded("False", "AsExpected");
        let pull = with_degraded("True", "ImagePullFailed");
        let crash = with_degraded("True", "ContainerCrashLoop");
        let no_limit = with_degraded("False", NO_CPU_LIMIT);
        assert_eq!(reasons(None, &fine), []);
        assert_eq!(reasons(Some(&fine), &pull), [(EventType::Warning, "ImagePullFailed".into())]);
        assert_eq!(reasons(Some(&pull), &pull), [], "a cause that persists is announced once");
        assert_eq!(reasons(Some(&pull), &crash), [(EventType::Warning, "ContainerCrashLoop".into())]);
        assert_eq!(reasons(Some(&crash), &fine), [(EventType::Normal, "Recovered".into())]);
        assert_eq!(
            reasons(Some(&crash), &no_limit),
            [(EventType::Normal, "Recovered".into()), (EventType::Warning, NO_CPU_LIMIT.into())]
        );
        assert_eq!(reasons(Some(&no_limit), &fine), []);
    }

    #[test]
    fn retry_backoff_doubles_up_to_the_maximum() {
        let secs: Vec<u64> = (0..=8).map(|n| retry_backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(retry_backoff(u32::MAX), MAX_BACKOFF);
    }
}
