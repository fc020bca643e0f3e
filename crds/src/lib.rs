//! The `ClusteredService` API (`clustered.dev/v1alpha1`) shared by the
//! operator and clusterd.
//!
//! * [`clusterd`] is clusterd's command line, which the operator writes
//!   and clusterd parses; it needs nothing but `std`.
//! * [`wire`] is clusterd's `/status` document; it has no Kubernetes
//!   dependencies so clusterd stays small.
//! * [`table`] lays out the worker tables of `clusterd ls` and
//!   `kubectl clustered ls`.
//! * With the default `crd` feature, [`v1alpha1`] holds the custom resource
//!   itself, from which `crdgen` writes `crds/clusteredservice.yaml`.

pub mod clusterd;
pub mod table;
pub mod wire;

#[cfg(feature = "crd")]
pub mod v1alpha1;
