//! Admission control (`--max-concurrency`, `--max-queue`, `--queue-timeout`)
//! under a real overload: CPU-bound requests from more clients than the
//! workers can serve at once.

mod common;

use std::time::Duration;

use common::*;

/// The example app's `/` burns this much CPU per request.
const WORK: &str = "/?ms=100";

fn percentile(mut samples: Vec<Duration>, p: f64) -> Duration {
    assert!(!samples.is_empty(), "no samples");
    samples.sort_unstable();
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

/// One request's latency and status, sequentially on fresh connections.
fn timed(port: u16) -> (u16, Duration, Option<String>) {
    let started = std::time::Instant::now();
    let response = get(port, WORK, SLOW).expect("request");
    (response.status, started.elapsed(), response.header("retry-after").map(str::to_string))
}

#[test]
fn overload_at_3x_capacity_is_answered_503_quickly_and_admitted_requests_stay_fast() {
    let _serial = serial();
    let clusterd =
        Launch::node(&["--workers", "2", "--max-concurrency", "1", "--max-queue", "1", "--queue-timeout", "5s"])
            .start();
    clusterd.wait_ready(2);

    let unloaded: Vec<Duration> = (0..20)
        .map(|_| timed(clusterd.port))
        .map(|(s, d, _)| {
            assert_eq!(s, 200);
            d
        })
        .collect();
    let unloaded_p99 = percentile(unloaded, 0.99);

    // 6 clients, each sending one request after another: 3× the 2 workers.
    let load = Load::start(clusterd.port, WORK, 6, Duration::from_secs(6), 100);
    // While it runs: never more than 1 request on a worker, never more than 1 queued.
    let mut samples = 0;
    for _ in 0..30 {
        let status = clusterd.status().expect("status");
        for w in &status.workers {
            assert!(w.in_flight <= 1, "worker {} has {} requests in flight: {status:#?}", w.id, w.in_flight);
        }
        let default = status.pools.iter().find(|p| p.name == "default").expect("default pool");
        assert!(default.queued <= 1, "queue over --max-queue: {default:?}");
        samples += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let outcomes = load.finish_when_done();
    assert!(samples > 0);

    let errors: Vec<&Outcome> = outcomes.iter().filter(|o| !matches!(o.result, Ok((200 | 503, _)))).collect();
    assert!(
        errors.is_empty(),
        "{} connection errors or unexpected statuses: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let admitted = outcomes.iter().filter(|o| o.ok()).count();
    let rejected = outcomes.len() - admitted;
    assert!(admitted > 0 && rejected > 0, "admitted {admitted}, rejected {rejected}");

    let status = clusterd.status().expect("status");
    let default = status.pools.iter().find(|p| p.name == "default").expect("default pool");
    assert!(default.rejected > 0 && default.waited > 0, "{default:?}");
    let metrics = String::from_utf8_lossy(&get(clusterd.admin, "/metrics", SLOW).expect("metrics").body).into_owned();
    assert!(metrics.contains("clusterd_queue_wait_seconds_count{pool=\"default\"}"), "{metrics}");
    assert!(metrics.contains("clusterd_rejected_requests_total{pool=\"default\"}"), "{metrics}");

    // Both workers busy with a long request, a third one queued: the next is refused.
    let port = clusterd.port;
    let long: Vec<_> =
        (0..3).map(|_| std::thread::spawn(move || get(port, "/?ms=1500", SLOW).map(|r| r.status))).collect();
    clusterd.wait_status("2 busy, 1 queued", SLOW, |s| s.pools.iter().any(|p| p.name == "default" && p.queued == 1));
    let refused = get(port, WORK, SLOW).expect("request");
    assert_eq!((refused.status, refused.header("retry-after")), (503, Some("1")), "{refused:?}");
    let long: Vec<u16> = long.into_iter().map(|t| t.join().expect("thread").expect("long request")).collect();
    assert_eq!(long, [200, 200, 200], "the queued one is served once a worker is free");

    // Latencies, measured by the clients from request sent to response read.
    // Bounds are generous (a loaded 2-CPU machine); docs/benchmarks.md has no figures from here.
    let latencies = |status: u16| -> Vec<Duration> {
        outcomes.iter().filter(|o| matches!(o.result, Ok((s, _)) if s == status)).map(|o| o.latency).collect()
    };
    let admitted_p99 = percentile(latencies(200), 0.99);
    let rejected_p99 = percentile(latencies(503), 0.99);
    println!(
        "unloaded p99 {unloaded_p99:?}; under 3x load: admitted {admitted} (p99 {admitted_p99:?}), \
         rejected {rejected} (p99 {rejected_p99:?}); pool {default:?}"
    );
    assert!(
        admitted_p99 < unloaded_p99 * 3 + Duration::from_millis(300),
        "admitted p99 {admitted_p99:?} vs unloaded p99 {unloaded_p99:?}"
    );
    // Far below the 5 s queue timeout: refused at once, not after waiting.
    assert!(rejected_p99 < Duration::from_secs(1), "503 p99 {rejected_p99:?}");
}
