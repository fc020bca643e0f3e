//! The reconcile loop: desired children applied with server-side apply,
//! then the status from what every pod's clusterd reports.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clustered_api::v1alpha1::{ClusteredService, ClusteredServiceStatus, WorkerState};
use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
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

use crate::metrics::{ErrorLabel, Metrics, ResultLabel};
use crate::probe::Prober;
use crate::resources::{self, MANAGER, SERVICE_LABEL, Settings};
use crate::status::{self, DEGRADED, Observed};
use crate::watches::{self, WatchHealth};

/// Annotation holding a hash of what the operator last applied to a
/// child, so a reconcile that would change nothing makes no API call.
const APPLIED_HASH: &str = "clustered.dev/applied-hash";

/// A status write at most this often per ClusteredService.
const STATUS_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// How often a ClusteredService without running pods is looked at again.
/// Nothing needs asking then: its children's and pods' watch events trigger
/// every reconcile that matters, and this is only a resync.
const IDLE_RESYNC_INTERVAL: Duration = Duration::from_secs(300);

#[derive(Debug, Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("object has no namespace")]
    NoNamespace,
}

impl Error {
    fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::NoNamespace => "no_namespace",
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
    stores: Stores,
    memory: Arc<Bookkeeping>,
}

/// Reflector caches of the children, filled by the controller's watches.
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
    async fn synced(&self) -> bool {
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
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(client: Client, config: Config, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let Config { namespace, settings, prober, recorder, metrics, status_interval, watches } = config;
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

    let ctx = Arc::new(Context {
        client,
        settings,
        prober,
        recorder,
        metrics,
        status_interval,
        stores: Stores { pods, deployments, services, pdbs, hpas },
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
    (reader, watches::watch(api, config, health).reflect(writer).applied_objects())
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
    let result = reconcile_inner(&csvc, &ctx).await;
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
    if !ctx.stores.synced().await {
        return Ok(Action::await_change());
    }
    if csvc.metadata.deletion_timestamp.is_some() {
        // Children carry owner references: the garbage collector removes them.
        return Ok(Action::await_change());
    }
    let ns = csvc.namespace().ok_or(Error::NoNamespace)?;
    let name = csvc.name_any();
    let client = &ctx.client;
    let stores = &ctx.stores;

    let problem = match resources::deployment(csvc, &ctx.settings) {
        Ok(deployment) => {
            let previous = stores.deployments.get(&ObjectRef::new(&name).within(&ns));
            ensure(Api::namespaced(client.clone(), &ns), &stores.deployments, &ns, &name, Some(deployment)).await?;
            let scaled_from = previous.and_then(|d| d.spec.as_ref()?.replicas).filter(|&r| r != csvc.spec.replicas);
            if let Some(from) = scaled_from {
                ctx.event(csvc, EventType::Normal, "Scaled", format!("pods {from} → {}", csvc.spec.replicas)).await;
            }
            None
        }
        Err(e) => Some(e.to_string()),
    };
    ensure(Api::namespaced(client.clone(), &ns), &stores.services, &ns, &name, Some(resources::service(csvc))).await?;
    let pdb = resources::pod_disruption_budget(csvc);
    ensure(Api::namespaced(client.clone(), &ns), &stores.pdbs, &ns, &name, Some(pdb)).await?;
    ensure(Api::namespaced(client.clone(), &ns), &stores.hpas, &ns, &name, resources::hpa(csvc)).await?;

    let pods: Vec<Arc<Pod>> = stores
        .pods
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(&ns) && p.labels().get(SERVICE_LABEL) == Some(&name))
        .collect();
    let askable: Vec<&Pod> =
        pods.iter().map(AsRef::as_ref).filter(|p| p.metadata.deletion_timestamp.is_none() && has_started(p)).collect();
    let admin_port = u16::try_from(csvc.spec.admin_port).unwrap_or(9901);
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
    let new_status = status::compute(csvc, &observed, Timestamp::now());
    if let Some(wait) = write_status(csvc, &ns, new_status, ctx).await? {
        return Ok(Action::requeue(wait));
    }
    // Worker states change without any Kubernetes event: ask clusterd again.
    let next = if askable.is_empty() { IDLE_RESYNC_INTERVAL } else { ctx.status_interval };
    Ok(Action::requeue(next))
}

/// Writes `new` unless it equals the stored status. Returns how long to
/// wait when a write happened less than a second ago (writes are coalesced).
async fn write_status(
    csvc: &ClusteredService,
    ns: &str,
    new: ClusteredServiceStatus,
    ctx: &Context,
) -> Result<Option<Duration>, Error> {
    let old = csvc.status.as_ref();
    if !status::changed(old, &new) {
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

/// Events for what a person should hear about: degradation and recovery,
/// and workers entering a crash loop.
async fn publish_transitions(
    csvc: &ClusteredService,
    old: Option<&ClusteredServiceStatus>,
    new: &ClusteredServiceStatus,
    ctx: &Context,
) {
    let degraded = |s: Option<&ClusteredServiceStatus>| {
        s.and_then(|s| s.conditions.iter().find(|c| c.type_ == DEGRADED)).filter(|c| c.status == "True").cloned()
    };
    match (degraded(old), degraded(Some(new))) {
        (None, Some(now)) => ctx.event(csvc, EventType::Warning, &now.reason, now.message).await,
        (Some(_), None) => ctx.event(csvc, EventType::Normal, "Recovered", "no longer degraded".into()).await,
        _ => {}
    }
    let before = old.map(|s| status::workers_in(&s.instances, WorkerState::CrashLoop)).unwrap_or_default();
    for worker in status::workers_in(&new.instances, WorkerState::CrashLoop).into_iter().filter(|w| !before.contains(w))
    {
        let note = format!("worker {worker} (pod/id) keeps crashing; clusterd restarts it at the maximum backoff");
        ctx.event(csvc, EventType::Warning, "WorkerCrashLoop", note).await;
    }
}

/// Applies `desired` (or deletes the object when `None`), unless the
/// cached object already carries the hash of the same desired state.
async fn ensure<K>(api: Api<K>, store: &Store<K>, ns: &str, name: &str, desired: Option<K>) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let current = store.get(&ObjectRef::new(name).within(ns));
    let Some(mut desired) = desired else {
        if current.is_some() {
            match api.delete(name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(());
    };
    let hash = content_hash(&desired);
    if current.as_ref().and_then(|c| c.annotations().get(APPLIED_HASH)) == Some(&hash) {
        return Ok(());
    }
    desired.annotations_mut().insert(APPLIED_HASH.into(), hash);
    api.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&desired)).await?;
    info!(kind = %K::kind(&()), %ns, %name, "applied");
    Ok(())
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
    // 1 s, 2 s, 4 s, … up to 5 minutes.
    let backoff = Duration::from_secs(1 << failures.min(9).saturating_sub(1)).min(Duration::from_secs(300));
    warn!(name = %csvc.name_any(), error = %error, ?backoff, "reconcile failed, retrying");
    Action::requeue(backoff)
}

impl Context {
    async fn event(&self, csvc: &ClusteredService, type_: EventType, reason: &str, note: String) {
        let event =
            Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
        if let Err(e) = self.recorder.publish(&event, &csvc.object_ref(&())).await {
            warn!(error = %e, "could not publish event");
        }
    }
}
