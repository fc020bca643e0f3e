//! `clustered.dev/v1alpha1`, kind `ClusteredService`.
//!
//! Field docs become `kubectl explain` text; the CEL rules next to the fields
//! they constrain are enforced by the API server, so every message says what
//! to change.

use std::borrow::Cow;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::clusterd::{self, defaults};
pub use crate::clusterd::{PortMode, Protocol, Rounding, UpstreamProtocol, WorkerCount};
pub use crate::wire::WorkerState;

/// A service whose pods each run a cluster of workers of a single-threaded
/// app, one per CPU of the container's limit, sharing one port.
// Each printcolumn repeats `type_`/`priority`, which clippy mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "clustered.dev",
    version = "v1alpha1",
    kind = "ClusteredService",
    plural = "clusteredservices",
    shortname = "csvc",
    category = "all",
    namespaced,
    status = "ClusteredServiceStatus",
    derive = "PartialEq",
    doc = "ClusteredService runs a single-threaded server as a cluster of workers in every pod: clusterd forks one worker per CPU of the container's limit on one shared port, supervises them, and reports per-worker health here.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.summary.pods",
        description = "Ready pods / desired pods"
    ),
    printcolumn(
        name = "Workers",
        type_ = "string",
        json_path = ".status.summary.workers",
        description = "Ready workers / desired workers, over all pods"
    ),
    printcolumn(name = "Port Mode", type_ = "string", json_path = ".status.portMode"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "Observed",
        type_ = "date",
        json_path = ".status.observedAt",
        description = "When the operator last confirmed the status (at least every minute while it runs): older means stale figures"
    ),
    printcolumn(name = "Port", type_ = "integer", json_path = ".spec.port", priority = "1"),
    printcolumn(
        name = "CPU",
        type_ = "string",
        json_path = ".status.summary.cpu",
        description = "CPU the workers of all pods use, in cores (as kubectl top writes it)",
        priority = "1"
    ),
    printcolumn(
        name = "Memory",
        type_ = "string",
        json_path = ".status.summary.memory",
        description = "Resident memory of the workers of all pods",
        priority = "1"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.autoscaling.desiredReplicas",
        description = "Pods the autoscaler wants",
        priority = "1"
    ),
    printcolumn(
        name = "Available",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Available\")].status",
        priority = "1"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Degraded\")].reason",
        priority = "1"
    ),
    printcolumn(
        name = "Clusterd",
        type_ = "string",
        json_path = ".status.clusterd.version",
        description = "The version the pods' clusterd report",
        priority = "1"
    ),
    printcolumn(
        name = "Update",
        type_ = "string",
        json_path = ".status.clusterd.pending.reason",
        description = "Why the operator's newer clusterd has not reached the pods yet (Queued, Stopped, Manual)",
        priority = "1"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.appContainer) ? self.template.spec.containers.exists(c, c.name == self.appContainer) : true",
        "message": "spec.appContainer must name one of spec.template.spec.containers",
        "fieldPath": ".appContainer",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.routes) || size(self.routes) == 0 || self.portMode in ['proxy', 'auto']",
        "message": "spec.routes (route pools) need spec.portMode: proxy, because only the proxy routes requests by path; remove routes or set portMode: proxy or auto",
        "fieldPath": ".routes"
    },
    {
        "rule": "!has(self.routes) || size(self.routes) == 0 || !has(self.workers) || !has(self.workers.max) || self.routes.map(r, r.workers).sum() < self.workers.max",
        "message": "route pools take all the workers spec.workers.max allows, but at least one more must serve the other routes: raise spec.workers.max or lower spec.routes[].workers",
        "fieldPath": ".routes"
    },
    {
        "rule": "!has(self.routes) || size(self.routes) == 0 || !has(self.workers) || !has(self.workers.count) || type(self.workers.count) == string || self.routes.map(r, r.workers).sum() < int(self.workers.count)",
        "message": "route pools take all of spec.workers.count, but at least one more worker must serve the other routes: raise spec.workers.count or lower spec.routes[].workers",
        "fieldPath": ".routes"
    },
    {
        "rule": "self.adminPort != self.port",
        "message": "spec.adminPort must differ from spec.port: clusterd serves health and status on its own port",
        "fieldPath": ".adminPort"
    },
    {
        "rule": "!has(self.autoscaling) || self.autoscaling.metric != 'concurrency' || self.portMode in ['proxy', 'auto']",
        "message": "spec.autoscaling.metric: concurrency needs spec.portMode: proxy, because only the proxy counts in-flight requests; set portMode: proxy or auto or use metric: cpu",
        "fieldPath": ".autoscaling.metric"
    },
    {
        "rule": "!has(self.restart) || !has(self.restart.maxRequests) || self.portMode in ['proxy', 'auto']",
        "message": "spec.restart.maxRequests needs spec.portMode: proxy, because only the proxy sees the requests it counts; use restart.maxMemoryMib or set portMode: proxy or auto",
        "fieldPath": ".restart.maxRequests"
    },
    {
        "rule": "!has(self.workers) || !has(self.workers.maxConcurrency) || (self.portMode in ['proxy', 'auto'] && self.protocol == 'HTTP')",
        "message": "spec.workers.maxConcurrency needs spec.portMode: proxy and protocol: HTTP, because only the HTTP proxy sees each request; remove maxConcurrency or use the proxy",
        "fieldPath": ".workers.maxConcurrency"
    },
    {
        "rule": "!has(self.sticky) || (self.portMode in ['proxy', 'auto'] && self.protocol == 'HTTP')",
        "message": "spec.sticky needs spec.portMode: proxy and protocol: HTTP, because only the HTTP proxy sees cookies and headers; remove sticky or use the proxy",
        "fieldPath": ".sticky"
    },
    {
        "rule": "!has(self.upstreamProtocol) || self.upstreamProtocol == 'http1' || (self.portMode in ['proxy', 'auto'] && self.protocol == 'HTTP')",
        "message": "spec.upstreamProtocol needs spec.portMode: proxy and protocol: HTTP, because only the HTTP proxy speaks to the workers; remove upstreamProtocol or use the proxy",
        "fieldPath": ".upstreamProtocol"
    },
    {
        "rule": "!has(self.autoscaling) || self.replicas <= self.autoscaling.maxReplicas",
        "message": "spec.replicas is above spec.autoscaling.maxReplicas, which the autoscaler would never allow: lower replicas or raise maxReplicas",
        "fieldPath": ".replicas"
    },
    {
        "rule": "self.portMode != 'node' || !self.template.spec.containers.exists(c, c.name == (has(self.appContainer) ? self.appContainer : self.template.spec.containers[0].name) && has(c.command) && size(c.command) > 0 && ['python', 'python3', 'python3.9', 'python3.10', 'python3.11', 'python3.12', 'python3.13', 'python3.14', 'ruby', 'java', 'php', 'perl', 'gunicorn', 'uvicorn', 'hypercorn', 'bundle', 'rails', 'puma', 'unicorn', 'dotnet', 'deno', 'bun'].exists(runtime, c.command[0] == runtime || c.command[0].endsWith('/' + runtime)))",
        "message": "spec.portMode: node speaks Node.js's cluster protocol, and the app container's command runs another runtime: set portMode: proxy (or auto, which chooses by the command)",
        "fieldPath": ".portMode"
    }
]))]
pub struct ClusteredServiceSpec {
    /// Number of pods. Scaled by `kubectl scale`, and by the HPA (metric
    /// `cpu`) or the operator (metric `concurrency`) when `autoscaling` is set.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 10000))]
    pub replicas: i32,

    /// The pod template. One container is the app (see `appContainer`); its
    /// process is what every worker runs: its `command` and `args`, or, where
    /// it sets no `command`, its image's ENTRYPOINT and CMD, which the
    /// operator reads from the registry (with the pod's image pull secrets).
    #[schemars(schema_with = "pod_template_schema")]
    pub template: PodTemplateSpec,

    /// Name of the app container in `template`. Default: the first container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_container: Option<String>,

    /// How many workers each pod runs.
    #[serde(default)]
    pub workers: WorkerPolicy,

    /// The port the service is reached on; all workers of a pod share it.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// How the workers share `port`.
    #[serde(default)]
    pub port_mode: PortMode,

    /// Protocol spoken on `port`. `HTTP` lets the proxy balance per request
    /// and route by path; `TCP` balances per connection.
    #[serde(default)]
    pub protocol: Protocol,

    /// What the proxy speaks to the workers (proxy mode, HTTP): `http1`,
    /// `h2c` (HTTP/2 cleartext, e.g. gRPC servers) or `auto` (the client's
    /// version: HTTP/2 clients over h2c, others over HTTP/1.1).
    #[serde(default)]
    pub upstream_protocol: UpstreamProtocol,

    /// Sticky sessions (proxy mode, HTTP): `cookie` or `cookie=NAME`
    /// (clusterd sets a cookie naming the worker) or `header=NAME` (the
    /// client's header value is hashed to a worker). A client stays on one
    /// worker of its pool while that worker lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(cookie|cookie=[A-Za-z0-9!#$%&'*+.^_`|~-]+|header=[A-Za-z0-9!#$%&'*+.^_`|~-]+)$"))]
    pub sticky: Option<String>,

    /// Route pools: the requests of a route (an exact `path` or a
    /// `pathPrefix`) go to workers of their own, so a heavy route cannot
    /// starve the others. Proxy mode and `HTTP` only.
    #[serde(default)]
    #[schemars(
        extend(
            "x-kubernetes-list-type" = "atomic",
            "x-kubernetes-validations" = [{
                "rule": "self.all(r, self.exists_one(s, has(r.path) ? (has(s.path) && s.path == r.path) : (has(s.pathPrefix) && s.pathPrefix == r.pathPrefix)))",
                "message": "each route pool needs its own path or pathPrefix; merge the duplicates"
            }]
        ),
        length(max = 16)
    )]
    pub routes: Vec<RoutePool>,

    /// clusterd's admin port: `/healthz`, `/readyz`, `/status`, `/metrics`.
    #[serde(default = "default_admin_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub admin_port: i32,

    /// Per-worker health checking.
    #[serde(default)]
    pub health_check: HealthCheck,

    /// How crashed workers are restarted.
    #[serde(default)]
    pub restart: RestartPolicy,

    /// How pods stop.
    #[serde(default)]
    pub shutdown: ShutdownPolicy,

    /// How long a pod stays bound to a node that is not ready or
    /// unreachable before Kubernetes evicts it and a replacement starts
    /// elsewhere (the pods' `tolerationSeconds` for the
    /// `node.kubernetes.io/not-ready` and `unreachable` taints, unless the
    /// template sets its own). Kubernetes' default is 300. Shorter brings
    /// the service back to full strength sooner after a node dies, but a
    /// node that only flaps (a network blip, a kubelet restart) loses its
    /// pods too; an app that keeps state in its pods should tolerate
    /// longer.
    #[serde(default = "default_node_loss_toleration_seconds")]
    #[schemars(range(min = 0, max = 86400))]
    pub node_loss_toleration_seconds: i64,

    /// Scale pods horizontally through this resource's scale subresource:
    /// on CPU with a HorizontalPodAutoscaler, or on in-flight requests per
    /// worker by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
}

/// How many workers a pod runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.min) || !has(self.max) || self.min <= self.max",
        "message": "spec.workers.min must not exceed spec.workers.max"
    },
    {
        "rule": "type(self.count) == string ? self.count == 'auto' : int(self.count) >= 1",
        "message": "spec.workers.count must be \"auto\" (one per CPU of the container's limit) or a whole number of at least 1",
        "fieldPath": ".count"
    },
    {
        "rule": "type(self.count) == string || int(self.count) <= 256",
        "message": "spec.workers.count must be at most 256 workers per pod (each is a process of the app, sharing the pod's CPU limit): for more capacity raise replicas, or use count: auto with a larger CPU limit",
        "fieldPath": ".count"
    },
    {
        "rule": "type(self.count) == string || ((!has(self.min) || int(self.count) >= self.min) && (!has(self.max) || int(self.count) <= self.max))",
        "message": "spec.workers.count is outside spec.workers.min..spec.workers.max; change the count or the bounds",
        "fieldPath": ".count"
    },
    {
        "rule": "has(self.maxConcurrency) || (!has(self.maxQueue) && !has(self.queueTimeoutSeconds))",
        "message": "spec.workers.maxQueue and queueTimeoutSeconds size the queue of spec.workers.maxConcurrency: set maxConcurrency or remove them",
        "fieldPath": ".maxConcurrency"
    }
]))]
pub struct WorkerPolicy {
    /// `auto` (one worker per CPU of the container's CPU limit, re-read
    /// live so an in-place resize changes it) or a fixed number.
    #[serde(default)]
    pub count: WorkerCount,
    /// Never fewer workers than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub min: Option<i32>,
    /// Never more workers than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub max: Option<i32>,
    /// How a fractional CPU limit becomes a worker count under `auto`
    /// (always at least 1).
    #[serde(default)]
    pub rounding: Rounding,
    /// Admission control (proxy mode, HTTP): at most this many requests in
    /// flight per worker; others wait in a bounded queue per route pool
    /// and get `503` with `Retry-After` when it is full or they waited too
    /// long. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_concurrency: Option<i32>,
    /// Requests that may wait per pool when every worker is at
    /// `maxConcurrency` (default 100; 0: answer `503` at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000000))]
    pub max_queue: Option<i32>,
    /// How long a request may wait in that queue (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub queue_timeout_seconds: Option<i32>,
}

impl Default for WorkerPolicy {
    fn default() -> Self {
        Self {
            count: WorkerCount::Auto,
            min: None,
            max: None,
            rounding: Rounding::Floor,
            max_concurrency: None,
            max_queue: None,
            queue_timeout_seconds: None,
        }
    }
}

impl Serialize for WorkerCount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            WorkerCount::Auto => s.serialize_str("auto"),
            WorkerCount::Fixed(n) => s.serialize_u32(*n),
        }
    }
}

impl<'de> Deserialize<'de> for WorkerCount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u32),
            Text(String),
        }
        // The generated schema lets `count: null` through; it means the
        // default, so no stored object can fail to parse here.
        match Option::<Raw>::deserialize(d)? {
            None => Ok(WorkerCount::Auto),
            Some(Raw::Number(n)) => Ok(WorkerCount::Fixed(n)),
            Some(Raw::Text(t)) if t == "auto" => Ok(WorkerCount::Auto),
            Some(Raw::Text(t)) => t.parse().map(WorkerCount::Fixed).map_err(|_| {
                serde::de::Error::custom(format!("workers.count must be \"auto\" or a number, not {t:?}"))
            }),
        }
    }
}

impl JsonSchema for WorkerCount {
    fn schema_name() -> Cow<'static, str> {
        "WorkerCount".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "x-kubernetes-int-or-string": true,
            "default": "auto",
        })
    }
}

/// A route pool: dedicated workers for the requests of one route.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.path) != has(self.pathPrefix)",
        "message": "a route pool sets exactly one of path (exact match) or pathPrefix"
    }
]))]
pub struct RoutePool {
    /// Requests whose path starts with this prefix use this pool (the
    /// longest matching prefix wins). No `=`, white space, `?` or `#`
    /// (a route matches the path, never the query).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/[^=\s?#]*$"), length(min = 1, max = 256))]
    pub path_prefix: Option<String>,
    /// Requests for exactly this path use this pool; an exact match wins
    /// over any prefix. `/` here means the root page only. No `=`, white
    /// space, `?` or `#` (the query is ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/[^=\s?#]*$"), length(min = 1, max = 256))]
    pub path: Option<String>,
    /// Workers dedicated to this pool; the rest serve everything else.
    #[schemars(range(min = 1, max = 1024))]
    pub workers: i32,
}

/// How clusterd checks each worker (on the worker's private port, so only
/// in proxy mode; in the other modes a worker is healthy while it runs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.timeoutSeconds <= self.periodSeconds",
        "message": "spec.healthCheck.timeoutSeconds must not exceed periodSeconds",
        "fieldPath": ".timeoutSeconds"
    },
    {
        "rule": "self.type != 'HTTP' || self.path.startsWith('/')",
        "message": "spec.healthCheck.path must start with /",
        "fieldPath": ".path"
    }
]))]
pub struct HealthCheck {
    /// `HTTP` (GET `path`, any 2xx/3xx is healthy) or `TCP` (connect).
    #[serde(default, rename = "type")]
    pub kind: HealthCheckKind,
    /// Path for `HTTP` checks.
    #[serde(default = "default_health_path")]
    #[schemars(length(max = 1024))]
    pub path: String,
    #[serde(default = "default_health_period")]
    #[schemars(range(min = 1, max = 3600))]
    pub period_seconds: i32,
    #[serde(default = "default_health_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: i32,
    /// Consecutive failures before a worker leaves rotation.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_threshold: i32,
    /// A worker that has failed every check for this long is hung: it is
    /// killed and restarted.
    #[serde(default = "default_hung_after")]
    #[schemars(range(min = 1, max = 86400))]
    pub hung_after_seconds: i32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            kind: HealthCheckKind::default(),
            path: default_health_path(),
            period_seconds: default_health_period(),
            timeout_seconds: default_health_timeout(),
            failure_threshold: default_failure_threshold(),
            hung_after_seconds: default_hung_after(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum HealthCheckKind {
    #[default]
    #[serde(rename = "HTTP")]
    Http,
    #[serde(rename = "TCP")]
    Tcp,
}

impl From<HealthCheckKind> for clusterd::HealthCheck {
    fn from(kind: HealthCheckKind) -> Self {
        match kind {
            HealthCheckKind::Http => clusterd::HealthCheck::Http,
            HealthCheckKind::Tcp => clusterd::HealthCheck::Tcp,
        }
    }
}

/// Restart of crashed workers with exponential backoff.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.initialBackoffMillis <= self.maxBackoffMillis",
        "message": "spec.restart.initialBackoffMillis must not exceed maxBackoffMillis"
    }
]))]
pub struct RestartPolicy {
    /// First delay before restarting a crashed worker; doubles per crash.
    #[serde(default = "default_initial_backoff")]
    #[schemars(range(min = 0, max = 3_600_000))]
    pub initial_backoff_millis: i32,
    /// Upper bound of the delay.
    #[serde(default = "default_max_backoff")]
    #[schemars(range(min = 0, max = 3_600_000))]
    pub max_backoff_millis: i32,
    /// A worker up this long has its backoff reset.
    #[serde(default = "default_stable_after")]
    #[schemars(range(min = 1, max = 86400))]
    pub stable_after_seconds: i32,
    /// This many crashes without a stable run marks the worker CrashLoop
    /// (and the resource Degraded).
    #[serde(default = "default_crash_loop_threshold")]
    #[schemars(range(min = 1, max = 1000))]
    pub crash_loop_threshold: i32,
    /// Recycle a worker after it served this many requests (proxy mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_requests: Option<i64>,
    /// Recycle a worker whose resident memory exceeds this many MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_memory_mib: Option<i64>,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            initial_backoff_millis: default_initial_backoff(),
            max_backoff_millis: default_max_backoff(),
            stable_after_seconds: default_stable_after(),
            crash_loop_threshold: default_crash_loop_threshold(),
            max_requests: None,
            max_memory_mib: None,
        }
    }
}

/// Graceful shutdown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShutdownPolicy {
    /// On SIGTERM clusterd stops accepting and lets in-flight requests
    /// finish for up to this long before it kills the workers. The pod's
    /// termination grace period is set to cover it.
    #[serde(default = "default_drain_timeout")]
    #[schemars(range(min = 0, max = 3600))]
    pub drain_timeout_seconds: i32,
}

impl Default for ShutdownPolicy {
    fn default() -> Self {
        Self { drain_timeout_seconds: default_drain_timeout() }
    }
}

/// Horizontal autoscaling of pods, on CPU (a HorizontalPodAutoscaler) or on
/// the in-flight requests clusterd counts per worker (the operator itself).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.minReplicas <= self.maxReplicas",
        "message": "spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas: lower minReplicas or raise maxReplicas",
        "fieldPath": ".minReplicas"
    },
    {
        "rule": "!has(self.targetPerWorker) || self.targetPerWorker > 0.0",
        "message": "spec.autoscaling.targetPerWorker must be above 0 (in-flight requests per worker the autoscaler aims for, e.g. 0.7)",
        "fieldPath": ".targetPerWorker"
    },
    {
        "rule": "!has(self.targetPerWorker) || self.metric == 'concurrency'",
        "message": "spec.autoscaling.targetPerWorker is only used with metric: concurrency; set metric: concurrency or use targetCpuUtilizationPercentage",
        "fieldPath": ".targetPerWorker"
    }
]))]
pub struct Autoscaling {
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1))]
    pub min_replicas: i32,
    #[schemars(range(min = 1))]
    pub max_replicas: i32,
    /// What the pod count follows: `cpu` (a HorizontalPodAutoscaler on the
    /// pods' CPU use, needs metrics-server) or `concurrency` (the operator
    /// scales on the in-flight requests each pod's clusterd reports per
    /// worker; proxy mode only, needs nothing else).
    #[serde(default)]
    pub metric: AutoscalingMetric,
    /// `cpu`: average CPU utilisation (percent of requests) the HPA aims for.
    #[serde(default = "default_target_cpu")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization_percentage: i32,
    /// `concurrency`: in-flight requests per worker the autoscaler aims for
    /// (default 0.7: a worker busy 70% of the time on average).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_per_worker: Option<f64>,
    /// How long the recommendation must have stayed lower before pods are
    /// removed (the highest recommendation of this window wins). Default
    /// 300 (the HPA's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: Option<i32>,
}

/// The signal `spec.autoscaling` scales on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AutoscalingMetric {
    #[default]
    Cpu,
    Concurrency,
}

/// Default `targetPerWorker`.
pub const DEFAULT_TARGET_PER_WORKER: f64 = 0.7;
/// Default `scaleDownStabilizationSeconds`.
pub const DEFAULT_SCALE_DOWN_STABILIZATION_SECONDS: i32 = 300;

impl Autoscaling {
    pub fn target_per_worker(&self) -> f64 {
        self.target_per_worker.unwrap_or(DEFAULT_TARGET_PER_WORKER)
    }

    pub fn scale_down_stabilization_seconds(&self) -> i32 {
        self.scale_down_stabilization_seconds.unwrap_or(DEFAULT_SCALE_DOWN_STABILIZATION_SECONDS)
    }
}

/// What the autoscaler last saw and decided.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// `cpu` or `concurrency`.
    pub metric: AutoscalingMetric,
    /// Pods `spec.replicas` asks for now.
    pub current_replicas: i32,
    /// Pods the load asks for (within minReplicas..maxReplicas). A lower
    /// count than `currentReplicas` is applied once the scale-down
    /// stabilisation window agrees and no pod is starting; `reason` says
    /// what holds it.
    pub desired_replicas: i32,
    /// `concurrency`: average in-flight requests per ready worker over the
    /// stable window (60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_concurrency_per_worker: Option<f64>,
    /// `concurrency`: true while bursts drive scaling (the 6 s panic
    /// window wants at least twice the pods there are); no pod is removed.
    #[serde(default)]
    pub panic: bool,
    /// When the autoscaler last changed the pod count (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<String>,
    /// Why `desiredReplicas` is what it is, as a CamelCase word.
    #[serde(default)]
    pub reason: String,
    /// The same for humans.
    #[serde(default)]
    pub message: String,
}

/// Observed state, written only by the operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusteredServiceStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods that exist (for the scale subresource).
    #[serde(default)]
    pub replicas: i32,
    /// Pods whose clusterd is ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the pods, as a string (for the scale subresource
    /// and the HPA).
    #[serde(default)]
    pub selector: String,
    /// Worker totals over all pods.
    #[serde(default)]
    pub workers: WorkerTotals,
    /// Human-readable totals for `kubectl get`.
    #[serde(default)]
    pub summary: Summary,
    /// One entry per pod, as its clusterd reports it.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["pod"]))]
    pub instances: Vec<Instance>,
    /// `Available`, `Progressing` and `Degraded`.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// When the operator last confirmed this status against the cluster and
    /// the pods' clusterd. Refreshed at least every minute while the
    /// operator runs: an older time means the operator is down or cut off
    /// and the figures above may be stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<Time>,
    /// The autoscaler's view, when `spec.autoscaling` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
    /// How the pods' workers share the port, as their clusterd reports it
    /// (`auto` resolved: `node` or `proxy`); several, comma-separated,
    /// while pods of different specs run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_mode: Option<String>,
    /// The clusterd the pods run, and a newer one waiting to reach them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clusterd: Option<ClusterdState>,
}

/// The clusterd the pods run. A new operator brings a new clusterd image;
/// services roll onto it a few at a time (chart value `clusterdUpdates`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterdState {
    /// The clusterd image the pods are made with (the Deployment's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The version the pods' clusterd report; several, comma-separated,
    /// while pods of two versions run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Set while the operator's clusterd waits to reach these pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingClusterdUpdate>,
}

/// A clusterd update that has not reached a service's pods yet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingClusterdUpdate {
    /// The image the pods will get.
    pub image: String,
    /// `Queued` (its turn has not come), `Stopped` (another service's
    /// update failed) or `Manual` (automatic updates are off).
    pub reason: String,
    /// The same for humans, with what to do.
    pub message: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerTotals {
    /// Workers the pods' policies ask for at their CPU limits.
    pub desired: i32,
    /// Workers ready to serve.
    pub ready: i32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// `ready/desired` pods.
    pub pods: String,
    /// `ready/desired` workers.
    pub workers: String,
    /// CPU the workers of all pods use, as `kubectl top` writes it
    /// (`1250m`: one and a quarter cores); absent while no pod reports it.
    /// Refreshed with the status' other changes and at least every minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Their resident memory (`312Mi`); absent while no pod reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
}

/// One pod and its workers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    /// Pod name.
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// CPU limit clusterd sees in the container's cgroup, in cores; absent
    /// when unlimited or not yet known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<f64>,
    /// Workers clusterd wants at that limit.
    #[serde(default)]
    pub desired_workers: i32,
    /// Workers ready to serve.
    #[serde(default)]
    pub ready_workers: i32,
    /// Why the pod's workers are unknown, e.g. clusterd not reachable yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The port mode clusterd runs in (`auto` resolved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_mode: Option<String>,
    /// Why that mode: the spec's choice, or what `auto` saw in the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_mode_reason: Option<String>,
    /// CPU the pod's workers use, in cores (the sum of theirs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_cores: Option<f64>,
    /// Resident memory of the pod's workers, in bytes (the sum of theirs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<i64>,
    /// The version of the pod's clusterd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clusterd_version: Option<String>,
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"]))]
    pub workers: Vec<InstanceWorker>,
}

/// One worker slot of a pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceWorker {
    /// Stable id of the slot (`WORKER_ID`), kept across restarts.
    pub id: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i64>,
    pub state: WorkerState,
    #[serde(default)]
    pub restarts: i32,
    /// How the previous process of the slot ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// When the worker entered its state (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// CPU the worker and the processes it started use, in cores, over
    /// clusterd's last sample (2 s); absent from a clusterd without the figure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_cores: Option<f64>,
    /// Their resident memory (RSS) in bytes: what `restart.maxMemoryMib`
    /// recycles on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<i64>,
}

/// The schema of `spec.template`: the fields the operator and the CEL rules
/// read are declared (so `kubectl explain` shows them and CEL can see them);
/// everything else of a PodTemplateSpec is kept as is and validated by the
/// API server when the Deployment is created.
fn pod_template_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Pod template, as in a Deployment. The app container's command is wrapped by clusterd.",
        "type": "object",
        "required": ["spec"],
        "properties": {
            "metadata": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true
            },
            "spec": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true,
                "required": ["containers"],
                "properties": {
                    "containers": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 32,
                        "items": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": true,
                            "required": ["name"],
                            "properties": {
                                "name": { "type": "string", "maxLength": 63 },
                                "image": { "type": "string" },
                                "command": {
                                    "description": "The app's command (clusterd runs it once per worker). Optional: without it, the image's ENTRYPOINT (and CMD, unless args are set) is read from the registry and the image pinned to its digest.",
                                    "type": "array",
                                    "maxItems": 256,
                                    "items": { "type": "string" }
                                }
                            }
                        }
                    }
                }
            }
        }
    })
}

// Defaults clusterd shares are taken from its contract, so a spec that
// leaves a field out means what clusterd does without the flag.
fn default_replicas() -> i32 {
    1
}
fn default_node_loss_toleration_seconds() -> i64 {
    30
}
fn default_port() -> i32 {
    defaults::PORT.into()
}
fn default_admin_port() -> i32 {
    defaults::ADMIN_PORT.into()
}
fn default_health_path() -> String {
    defaults::HEALTH_PATH.into()
}
fn default_health_period() -> i32 {
    whole_seconds(defaults::HEALTH_PERIOD)
}
fn default_health_timeout() -> i32 {
    whole_seconds(defaults::HEALTH_TIMEOUT)
}
fn default_failure_threshold() -> i32 {
    defaults::HEALTH_FAILURE_THRESHOLD as i32
}
fn default_hung_after() -> i32 {
    whole_seconds(defaults::HUNG_AFTER)
}
fn default_initial_backoff() -> i32 {
    defaults::INITIAL_BACKOFF.as_millis() as i32
}
fn default_max_backoff() -> i32 {
    defaults::MAX_BACKOFF.as_millis() as i32
}
fn default_stable_after() -> i32 {
    whole_seconds(defaults::STABLE_AFTER)
}
fn default_crash_loop_threshold() -> i32 {
    defaults::CRASH_LOOP_THRESHOLD as i32
}
fn default_drain_timeout() -> i32 {
    whole_seconds(defaults::DRAIN_TIMEOUT)
}
fn default_min_replicas() -> i32 {
    1
}
fn default_target_cpu() -> i32 {
    80
}

/// The contract's defaults are small constants, so the casts are exact.
fn whole_seconds(d: std::time::Duration) -> i32 {
    d.as_secs() as i32
}

impl ClusteredServiceSpec {
    /// The app container's name: `appContainer`, or the first container's.
    pub fn app_container_name(&self) -> Option<&str> {
        match &self.app_container {
            Some(name) => Some(name),
            None => self.template.spec.as_ref()?.containers.first().map(|c| c.name.as_str()),
        }
    }
}

/// The CRD as YAML, exactly as checked in at `crds/clusteredservice.yaml`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    Ok(format!(
        "# Generated by `cargo run -p clustered-api --bin crdgen`; do not edit.\n{}",
        serde_yaml::to_string(&ClusteredService::crd())?
    ))
}
