//! clustered-operator: reconciles ClusteredServices into Deployments with
//! clusterd injected, and their pods' per-worker health into status.
//!
//! * [`resources`]: desired children, pure functions of the CR.
//! * [`status`]: observed state, a pure function of pods and clusterd reports.
//! * [`endpoints`]: which pods the Service routes to (its EndpointSlices).
//! * [`probe`]: asks each pod's clusterd for its `/status`.
//! * [`image`]: an app container without `command` runs its image's
//!   ENTRYPOINT/CMD, read from the registry.
//! * [`updates`]: a new clusterd paced across the fleet, a few services at a time.
//! * [`autoscale`]: `spec.autoscaling` in concurrency mode, and its status.
//! * [`controller`]: the kube-runtime Controller that ties them together.
//! * [`watches`]: the API client and watches that survive API server restarts.
//! * [`index`]: the cached objects of each ClusteredService, without a scan.
//! * [`leader`], [`server`], [`metrics`]: running it as a service.

pub mod autoscale;
pub mod controller;
pub mod endpoints;
pub mod image;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod probe;
pub mod resources;
pub mod server;
pub mod status;
pub mod updates;
pub mod watches;

/// FNV-1a of `bytes`: stable across processes, builds and Rust versions,
/// unlike std's hasher, for hashes that are stored or shared.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}
