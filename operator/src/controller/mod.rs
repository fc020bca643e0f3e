//! The reconcile loop: desired children compared with the live ones (as
//! the API server renders them) and created or replaced when they differ,
//! then the status from the pods, the Deployment and what every pod's
//! clusterd reports.
//!
//! * [`reconcile`]: one pass, observe → decide → act.
//! * [`children`]: the children made to match the desired ones (drift).
//! * [`app_image`]: the app image's config, for a container without command.
//! * [`status_writes`], [`events`]: the status written, transitions announced.
//! * [`memory`]: what the operator remembers per ClusteredService.
//! * [`trim`]: what of the many cached pods and EndpointSlices is kept.

mod app_image;
mod children;
mod events;
mod memory;
mod reconcile;
mod status_writes;
mod trim;

use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clustered_api::v1alpha1::ClusteredService;
use futures::{Stream, StreamExt, TryStreamExt, stream};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::runtime::controller::{self as kube_controller, Action, Controller};
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::autoscale;
use crate::endpoints;
use crate::image::{self, Platform, registry::Resolver};
use crate::index::{Index, KeyOf};
use crate::metrics::{ErrorLabel, Metrics};
use crate::probe::Prober;
use crate::resources::{SERVICE_LABEL, Settings};
use crate::status;
use crate::updates;
use crate::watches::{self, Synced, WatchHealth};
use memory::Bookkeeping;

/// The longest wait before a failed reconcile is retried: a child someone
/// deleted or changed is restored within it, even while the API refuses.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

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
    /// How often a clusterd that tells of its changes is asked again.
    pub settled_status_interval: Duration,
    /// Reads the config of app images that set no command.
    pub images: Arc<Resolver>,
    /// The platform whose image is chosen from a multi-platform index.
    pub platform: Platform,
    stores: Stores,
    /// Open once every store has been listed.
    synced: Synced,
    memory: Arc<Bookkeeping>,
    /// Set once a status write lost fields: the cluster's CRD is older.
    crd_outdated: AtomicBool,
}

/// Reflector caches of the children, filled by the controller's watches.
/// Pods and EndpointSlices, several per ClusteredService, are indexed by
/// it and trimmed to what the status reads.
#[derive(Clone)]
struct Stores {
    pods: Index<Pod, ObjectRef<ClusteredService>>,
    deployments: Store<Deployment>,
    services: Store<Service>,
    /// The Services' EndpointSlices (they carry the Service's labels).
    endpoint_slices: Index<EndpointSlice, ObjectRef<ClusteredService>>,
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
            self.pods.store().wait_until_ready(),
            self.deployments.wait_until_ready(),
            self.services.wait_until_ready(),
            self.endpoint_slices.store().wait_until_ready(),
            self.pdbs.wait_until_ready(),
            self.hpas.wait_until_ready(),
        )
        .is_ok()
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
    /// How often a clusterd that tells of its changes is asked again.
    pub settled_status_interval: Duration,
    /// The addresses of pods whose clusterd said its status changed.
    pub changes: mpsc::Receiver<IpAddr>,
    /// Where the watches report failures (read by the liveness probe).
    pub watches: Arc<WatchHealth>,
    /// Reads the config of app images that set no command.
    pub images: Arc<Resolver>,
    /// Set once the stores are listed and reconciles run (the readiness
    /// of the leader).
    pub ready: Arc<AtomicBool>,
    /// Reconciles at once; the rest wait in the queue.
    pub concurrency: u16,
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(client: Client, config: Config, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let Config {
        namespace,
        settings,
        prober,
        recorder,
        metrics,
        status_interval,
        settled_status_interval,
        changes,
        watches,
        images,
        ready,
        concurrency,
    } = config;
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
    .modify(trim::whole_but_field_sets)
    .reflect(csvc_writer)
    .inspect_ok(move |event| {
        if let watcher::Event::Delete(csvc) = event {
            forget.forget(csvc);
        }
    })
    .applied_objects()
    .predicate_filter(predicates::generation, Default::default());

    let (pod_reader, pod_writer) = reflector::store();
    let pods = Index::new(pod_reader.clone(), service_of as KeyOf<_, _>);
    // Who said its status changed: the pod at that address.
    let addresses = Index::new(pod_reader, address_of as KeyOf<_, _>);
    let (by_service, by_address) = (pods.clone(), addresses.clone());
    let pod_events = reflect_indexed(
        &watches,
        scoped::<Pod>(&client, namespace.as_deref()),
        ours.clone(),
        pod_writer,
        trim::pod,
        move |event| {
            by_service.apply(event);
            by_address.apply(event);
        },
    );
    let told = told(changes, addresses, Arc::clone(&metrics));
    let (deployments, deployment_events) =
        reflect(&watches, scoped::<Deployment>(&client, namespace.as_deref()), ours.clone());
    let (services, service_events) = reflect(&watches, scoped::<Service>(&client, namespace.as_deref()), ours.clone());
    let (slice_reader, slice_writer) = reflector::store();
    let endpoint_slices = Index::new(slice_reader, service_of_slice as KeyOf<_, _>);
    let by_service = endpoint_slices.clone();
    let endpoint_slice_events = reflect_indexed(
        &watches,
        scoped::<EndpointSlice>(&client, namespace.as_deref()),
        ours.clone(),
        slice_writer,
        trim::endpoint_slice,
        move |event| by_service.apply(event),
    );
    let (pdbs, pdb_events) =
        reflect(&watches, scoped::<PodDisruptionBudget>(&client, namespace.as_deref()), ours.clone());
    let (hpas, hpa_events) = reflect(&watches, scoped::<HorizontalPodAutoscaler>(&client, namespace.as_deref()), ours);

    let stores = Stores { pods, deployments, services, endpoint_slices, pdbs, hpas };
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
        settled_status_interval,
        images,
        platform: image::own_platform(),
        stores,
        synced,
        memory,
        crd_outdated: AtomicBool::new(false),
    });

    let wave = tokio::spawn(publish_wave(Arc::clone(&ctx)));
    Controller::for_stream(csvcs, csvc_reader)
        // Unbounded, a fleet's first pass starts every reconcile at once:
        // their API requests queue in the API server's fairness queues
        // past the reconcile timeout, and the retries add to the queue
        // (1,000 ClusteredServices never converged). Bounded, the queue
        // stays here, where a deduplicated key waits at no cost.
        .with_config(kube_controller::Config::default().concurrency(concurrency))
        .owns_stream(deployment_events)
        .owns_stream(service_events)
        .owns_stream(pdb_events)
        .owns_stream(hpa_events)
        .watches_stream(pod_events, |pod: Pod| service_of(&pod))
        .watches_stream(endpoint_slice_events, |slice: EndpointSlice| service_of_slice(&slice))
        .reconcile_on(told)
        .trigger_backoff(watches::trigger_backoff())
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile, error_policy, ctx)
        .for_each(|result| async move { log_outcome(result) })
        .await;
    wave.abort();
}

/// How often the clusterd update's metrics are refreshed.
const WAVE_METRICS_INTERVAL: Duration = Duration::from_secs(10);

/// Keeps the clusterd update's metrics current, from the listed caches.
async fn publish_wave(ctx: Arc<Context>) {
    if !ctx.synced.wait().await {
        return;
    }
    let mut tick = tokio::time::interval(WAVE_METRICS_INTERVAL);
    loop {
        tick.tick().await;
        let deployments = ctx.stores.deployments.state();
        let wave = updates::Wave::observe(deployments.iter().map(AsRef::as_ref), &ctx.settings.clusterd_image);
        ctx.metrics.observe_wave(&wave);
    }
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

/// A store of `K` (trimmed: [`trim::whole_but_field_sets`]) and the stream that fills it.
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
    let events = watches::watch(api, config, health).modify(trim::whole_but_field_sets).reflect(writer);
    (reader, events.touched_objects())
}

/// As [`reflect`], for a kind with several objects per ClusteredService:
/// trimmed before it is cached in `writer`'s store, each event then
/// followed by that store's indexes.
fn reflect_indexed<K, F>(
    health: &Arc<WatchHealth>,
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    trim: fn(&mut K),
    follow: F,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + use<K, F>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    F: Fn(&watcher::Event<K>) + Send + 'static,
{
    watches::watch(api, config, health).modify(trim).reflect(writer).inspect_ok(follow).touched_objects()
}

/// The ClusteredServices whose pods said their status changed (a pod is
/// known by its address; a host-network address may be several pods').
fn told(
    changes: mpsc::Receiver<IpAddr>,
    addresses: Index<Pod, IpAddr>,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = ObjectRef<ClusteredService>> + Send {
    let changes = stream::unfold(changes, |mut changes| async move { Some((changes.recv().await?, changes)) });
    changes.flat_map(move |address| {
        metrics.status_changes_told.inc();
        stream::iter(addresses.get(&address).iter().filter_map(|pod| service_of(pod)).collect::<Vec<_>>())
    })
}

/// The address a pod's clusterd tells of its changes from.
fn address_of(pod: &Pod) -> Option<IpAddr> {
    pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()
}

/// The ClusteredService a pod belongs to (its label).
fn service_of(pod: &Pod) -> Option<ObjectRef<ClusteredService>> {
    let name = pod.labels().get(SERVICE_LABEL)?;
    Some(ObjectRef::new(name).within(&pod.namespace()?))
}

/// The ClusteredService whose Service an EndpointSlice lists (the
/// Service has the ClusteredService's name).
fn service_of_slice(slice: &EndpointSlice) -> Option<ObjectRef<ClusteredService>> {
    let name = slice.labels().get(endpoints::SERVICE_NAME_LABEL)?;
    Some(ObjectRef::new(name).within(&slice.namespace()?))
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
    /// When `csvc`'s unchanged status is written again, in this fleet.
    fn heartbeat(&self, csvc: &ClusteredService) -> status::Heartbeat {
        status::Heartbeat::of(self.memory.len(), csvc.metadata.uid.as_deref().unwrap_or_default())
    }
}

/// The autoscaler runs on the controller's memory, client and recorder.
impl autoscale::Host for Context {
    fn client(&self) -> &Client {
        &self.client
    }

    fn with_autoscaler<T>(&self, csvc: &ClusteredService, f: impl FnOnce(&mut autoscale::Autoscaler) -> T) -> T {
        self.memory.remember(csvc, |m| f(&mut m.autoscaler))
    }

    async fn publish(&self, csvc: &ClusteredService, type_: EventType, reason: &str, action: &str, note: String) {
        self.event_of(csvc, type_, reason, action, note).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_backoff_doubles_up_to_the_maximum() {
        let secs: Vec<u64> = (0..=8).map(|n| retry_backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(retry_backoff(u32::MAX), MAX_BACKOFF);
    }
}
