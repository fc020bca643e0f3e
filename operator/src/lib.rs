//! clustered-operator: reconciles ClusteredServices into Deployments with
//! clusterd injected, and their pods' per-worker health into status.
//!
//! * [`resources`]: desired children, pure functions of the CR.
//! * [`status`]: observed state, a pure function of pods and clusterd reports.
//! * [`probe`]: asks each pod's clusterd for its `/status`.
//! * [`image`]: an app container without `command` runs its image's
//!   ENTRYPOINT/CMD, read from the registry.
//! * [`autoscale`]: `spec.autoscaling` in concurrency mode, and its status.
//! * [`controller`]: the kube-runtime Controller that ties them together.
//! * [`watches`]: the API client and watches that survive API server restarts.
//! * [`leader`], [`server`], [`metrics`]: running it as a service.

pub mod autoscale;
pub mod controller;
pub mod image;
pub mod leader;
pub mod metrics;
pub mod probe;
pub mod resources;
pub mod server;
pub mod status;
pub mod watches;
