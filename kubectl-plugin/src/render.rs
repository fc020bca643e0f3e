//! What `kubectl clustered ls` prints for a set of ClusteredServices: pure,
//! so the tests read the output itself.

use clustered_api::table::{Output, Row, age, layout, mebibytes, percent};
use clustered_api::v1alpha1::{ClusteredService, ClusteredServiceStatus, Instance, InstanceWorker};
use jiff::Timestamp;
use kube::ResourceExt;
use serde_json::json;

const HEADERS: [&str; 10] = ["POD", "NODE", "WORKER", "STATE", "PID", "RESTARTS", "AGE", "CPU", "MEMORY", "LAST EXIT"];

/// The text `-o output` prints for `services`, at `now`. JSON and YAML are a
/// list of `{name, namespace, status}`: what the table is made from.
pub(crate) fn render(
    services: &[ClusteredService],
    output: Output,
    now: Timestamp,
    colour: bool,
) -> anyhow::Result<String> {
    let documents = || {
        let items: Vec<_> = services
            .iter()
            .map(|s| json!({ "name": s.name_any(), "namespace": s.namespace(), "status": s.status }))
            .collect();
        json!({ "items": items })
    };
    Ok(match output {
        Output::Table => services.iter().map(|s| table(s, now, colour)).collect::<Vec<_>>().join("\n"),
        Output::Json => serde_json::to_string_pretty(&documents())? + "\n",
        Output::Yaml => serde_yaml::to_string(&documents())?,
    })
}

/// A summary line, then a row per worker of every pod (a pod whose workers
/// are not known yet gets one row saying why).
pub(crate) fn table(service: &ClusteredService, now: Timestamp, colour: bool) -> String {
    let name = service.name_any();
    let Some(status) = &service.status else {
        return format!("{name}: no status yet (is the clustered operator running?)\n");
    };
    let rows: Vec<Row> = status.instances.iter().flat_map(|pod| pod_rows(pod, now)).collect();
    summary(&name, status, now) + &layout(&HEADERS, &rows, colour)
}

fn summary(name: &str, status: &ClusteredServiceStatus, now: Timestamp) -> String {
    let mut line = format!(
        "{name}: {}/{} pods ready, {}/{} workers ready",
        status.ready_replicas, status.replicas, status.workers.ready, status.workers.desired
    );
    if let Some(mode) = &status.port_mode {
        line += &format!(", {mode} mode");
    }
    if let Some(version) = status.clusterd.as_ref().and_then(|c| c.version.as_deref()) {
        line += &format!(", clusterd {version}");
    }
    if let Some(observed) = &status.observed_at {
        line += &format!(", observed {} ago", age(now.as_second() - observed.0.as_second()));
    }
    line + "\n"
}

fn pod_rows(pod: &Instance, now: Timestamp) -> Vec<Row> {
    let node = pod.node.clone().unwrap_or_else(dash);
    if pod.workers.is_empty() {
        let why = pod.message.clone().unwrap_or_else(|| "no workers reported".into());
        let mut cells = vec![pod.pod.clone(), node];
        cells.extend(std::iter::repeat_with(dash).take(HEADERS.len() - 3));
        cells.push(why);
        return vec![Row { cells, state: None }];
    }
    pod.workers.iter().map(|w| Row { cells: worker_cells(pod, &node, w, now), state: Some(w.state) }).collect()
}

fn worker_cells(pod: &Instance, node: &str, w: &InstanceWorker, now: Timestamp) -> Vec<String> {
    vec![
        pod.pod.clone(),
        node.to_string(),
        w.id.to_string(),
        format!("{:?}", w.state),
        w.pid.map_or_else(dash, |p| p.to_string()),
        w.restarts.to_string(),
        w.since
            .as_deref()
            .and_then(|t| t.parse::<Timestamp>().ok())
            .map_or_else(dash, |t| age(now.as_second() - t.as_second())),
        w.cpu_cores.map_or_else(dash, percent),
        w.memory_bytes.map_or_else(dash, |b| mebibytes(b.max(0) as u64)),
        w.last_exit.clone().unwrap_or_else(dash),
    ]
}

fn dash() -> String {
    "-".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustered_api::v1alpha1::{WorkerState, WorkerTotals};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn at(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn service() -> ClusteredService {
        let mut csvc: ClusteredService = serde_json::from_value(json!({
            "apiVersion": "clustered.dev/v1alpha1",
            "kind": "ClusteredService",
            "metadata": { "name": "demo", "namespace": "shop" },
            "spec": { "template": { "spec": { "containers": [{ "name": "app", "image": "app:1" }] } } }
        }))
        .expect("csvc");
        csvc.status = Some(ClusteredServiceStatus {
            replicas: 2,
            ready_replicas: 1,
            workers: WorkerTotals { desired: 3, ready: 2 },
            port_mode: Some("node".into()),
            observed_at: Some(Time(at("2026-12-07T08:03:00Z"))),
            instances: vec![
                Instance {
                    pod: "demo-7d9-abcde".into(),
                    node: Some("node-1".into()),
                    workers: vec![
                        InstanceWorker {
                            id: 0,
                            pid: Some(101),
                            state: WorkerState::Ready,
                            restarts: 1,
                            last_exit: Some("killed by SIGKILL".into()),
                            since: Some("2026-12-07T08:00:00Z".into()),
                            cpu_cores: Some(0.5),
                            memory_bytes: Some(52 << 20),
                        },
                        InstanceWorker {
                            id: 1,
                            pid: Some(102),
                            state: WorkerState::Ready,
                            since: Some("2026-12-07T07:00:00Z".into()),
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                },
                Instance {
                    pod: "demo-7d9-fghij".into(),
                    message: Some("clusterd not reachable yet".into()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        csvc
    }

    #[test]
    fn a_row_per_worker_of_every_pod_and_one_for_a_pod_not_known_yet() {
        let text = table(&service(), at("2026-12-07T08:03:12Z"), false);
        let expected = "\
demo: 1/2 pods ready, 2/3 workers ready, node mode, observed 12s ago
POD              NODE     WORKER   STATE   PID   RESTARTS   AGE     CPU   MEMORY   LAST EXIT
demo-7d9-abcde   node-1   0        Ready   101   1          3m12s   50%   52Mi     killed by SIGKILL
demo-7d9-abcde   node-1   1        Ready   102   0          63m     -     -        -
demo-7d9-fghij   -        -        -       -     -          -       -     -        clusterd not reachable yet
";
        assert_eq!(text, expected);
    }

    #[test]
    fn colour_only_when_asked_and_only_on_the_state() {
        let now = at("2026-12-07T08:03:12Z");
        let coloured = table(&service(), now, true);
        assert!(coloured.contains("\x1b[32mReady   \x1b[0m101"), "{coloured}");
        assert_eq!(coloured.replace("\x1b[32m", "").replace("\x1b[0m", ""), table(&service(), now, false));
    }

    #[test]
    fn a_service_without_status_says_so() {
        let mut csvc = service();
        csvc.status = None;
        assert_eq!(
            table(&csvc, at("2026-12-07T08:03:12Z"), false),
            "demo: no status yet (is the clustered operator running?)\n"
        );
    }

    #[test]
    fn json_and_yaml_hold_the_status_the_table_is_made_from() {
        let now = at("2026-12-07T08:03:12Z");
        let json: serde_json::Value =
            serde_json::from_str(&render(&[service()], Output::Json, now, true).expect("json")).expect("parse");
        assert_eq!(json["items"][0]["name"], "demo");
        assert_eq!(json["items"][0]["namespace"], "shop");
        let status: ClusteredServiceStatus =
            serde_json::from_value(json["items"][0]["status"].clone()).expect("a status");
        assert_eq!(Some(status), service().status);
        let yaml: serde_json::Value =
            serde_yaml::from_str(&render(&[service()], Output::Yaml, now, true).expect("yaml")).expect("parse");
        assert_eq!(yaml, json);
    }
}
