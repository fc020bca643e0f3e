//! What the operator remembers per ClusteredService, in this process only.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use clustered_api::v1alpha1::{ClusteredService, ClusteredServiceStatus};
use kube::runtime::reflector::ObjectRef;
use prometheus_client::metrics::gauge::Gauge;

use crate::image::ResolvedImage;

/// Per-object bookkeeping that lives only in this process.
#[derive(Default)]
pub(super) struct Memory {
    pub(super) last_status_write: Option<Instant>,
    pub(super) failures: u32,
    /// Per child kind: the hash of the desired object and the live
    /// `resourceVersion` the API server last confirmed it matches, so an
    /// unchanged child costs no API call.
    pub(super) verified: HashMap<String, (String, String)>,
    /// Per child kind: the hash of the desired object last written, so
    /// writing it again means someone changed the child in between.
    pub(super) written: HashMap<String, String>,
    /// Per child kind: when the operator last undid someone else's change
    /// to it (see `children::contested`).
    pub(super) repairs: HashMap<String, VecDeque<Instant>>,
    /// The concurrency autoscaler's samples and recommendations.
    pub(super) autoscaler: crate::autoscale::Autoscaler,
    /// The app image resolved for a generation of the spec: reused until
    /// the spec changes, so a moved tag never changes the pods by itself.
    pub(super) image: Option<(Option<i64>, String, ResolvedImage)>,
    /// The status last sent and the status the API server stored for it,
    /// kept only when the two differ: the cluster's CRD is older than this
    /// operator and drops the fields it does not know.
    pub(super) pruned_write: Option<Box<(ClusteredServiceStatus, ClusteredServiceStatus)>>,
}

/// The `Memory` of every ClusteredService seen, forgotten when it is deleted.
pub(super) struct Bookkeeping {
    pub(super) objects: Mutex<HashMap<ObjectRef<ClusteredService>, Memory>>,
    pub(super) tracked: Gauge,
}

impl Bookkeeping {
    pub(super) fn remember<T>(&self, csvc: &ClusteredService, f: impl FnOnce(&mut Memory) -> T) -> T {
        let mut objects = self.objects.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let result = f(objects.entry(ObjectRef::from(csvc)).or_default());
        self.tracked.set(objects.len() as i64);
        result
    }

    /// How many ClusteredServices are remembered: the fleet's size.
    pub(super) fn len(&self) -> usize {
        self.objects.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }

    pub(super) fn forget(&self, csvc: &ClusteredService) {
        let mut objects = self.objects.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        objects.remove(&ObjectRef::from(csvc));
        self.tracked.set(objects.len() as i64);
    }
}
