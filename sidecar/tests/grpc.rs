//! HTTP/2 cleartext through the proxy: a real `@grpc/grpc-js` server on
//! each worker and a real client, unary and server-streaming calls, a
//! route pool for one method, gRPC status and trailers passed unchanged.

mod common;

use std::process::Command;

use common::*;

const GRPC: &[&str] = &["@grpc/grpc-js@1.14.3"];

fn call(port: u16, modules: &std::path::Path, n: usize) -> serde_json::Value {
    let output = Command::new("node")
        .arg(test_app("grpc.js"))
        .args(["call", &port.to_string(), &n.to_string()])
        .env("NODE_PATH", modules)
        .output()
        .expect("run the gRPC client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("client output {stdout:?}, {output:?}"))
}

fn start(args: &[&str]) -> (Clusterd, std::path::PathBuf) {
    let modules = npm_modules(GRPC);
    let app = test_app("grpc.js");
    let mut all = vec!["--health-check", "tcp"];
    all.extend_from_slice(args);
    let clusterd = Launch::new(&all, &["node", &app, "serve"]).env("NODE_PATH", &modules.display().to_string()).start();
    (clusterd, modules)
}

#[test]
fn grpc_unary_and_streaming_calls_are_balanced_over_h2c() {
    let _serial = serial();
    let (clusterd, modules) = start(&["--workers", "2", "--upstream-protocol", "h2c"]);
    clusterd.wait_ready(2);
    let result = call(clusterd.port, &modules, 20);
    assert!(result.get("error").is_none(), "{result}\nlogs:\n{}", clusterd.logs());
    let unary: Vec<&str> = result["unary"].as_array().expect("unary").iter().filter_map(|v| v.as_str()).collect();
    assert_eq!(unary.len(), 20, "{result}");
    assert!(unary.contains(&"0") && unary.contains(&"1"), "calls spread over both workers: {result}");
    let stream = result["stream"].as_array().expect("stream");
    assert_eq!(stream.len(), 5, "every streamed message arrived: {result}");
    assert!(stream.iter().all(|w| w == &stream[0]), "one stream, one worker: {result}");
    assert_eq!(result["trailer"], stream[0], "the trailer comes through: {result}");
    assert_eq!(result["failed"]["code"], 8, "gRPC status RESOURCE_EXHAUSTED passes unchanged: {result}");
    assert!(result["failed"]["details"].as_str().is_some_and(|d| d.contains("says no")), "{result}");
}

/// The default health check (`http`) probes h2c workers over HTTP/2: a
/// grpc-js server, which answers no HTTP/1.1, is Ready and stays so.
#[test]
fn grpc_workers_pass_the_default_health_check() {
    let _serial = serial();
    let modules = npm_modules(GRPC);
    let app = test_app("grpc.js");
    let clusterd = Launch::new(&["--workers", "2", "--upstream-protocol", "h2c"], &["node", &app, "serve"])
        .env("NODE_PATH", &modules.display().to_string())
        .start();
    clusterd.wait_ready(2);
    let result = call(clusterd.port, &modules, 20);
    assert!(result.get("error").is_none(), "{result}\nlogs:\n{}", clusterd.logs());
    assert_eq!(result["unary"].as_array().map(Vec::len), Some(20), "{result}");
    // Past a periodic probe (--health-period 5s): still Ready, never restarted.
    std::thread::sleep(std::time::Duration::from_secs(6));
    let status = clusterd.wait_ready(2);
    assert!(status.workers.iter().all(|w| w.restarts == 0), "{status:#?}\nlogs:\n{}", clusterd.logs());
}

#[test]
fn a_grpc_method_gets_its_own_route_pool() {
    let _serial = serial();
    let (clusterd, modules) =
        start(&["--workers", "3", "--upstream-protocol", "auto", "--route-exact", "/test.Echo/Count=1"]);
    clusterd.wait_ready(3);
    let status = clusterd.status().expect("status");
    let pool_worker = status.workers.iter().find(|w| w.pool.as_deref() == Some("=/test.Echo/Count")).expect("pool");
    for _ in 0..3 {
        let result = call(clusterd.port, &modules, 6);
        assert!(result.get("error").is_none(), "{result}\nlogs:\n{}", clusterd.logs());
        let stream = result["stream"].as_array().expect("stream");
        assert_eq!(stream.len(), 5, "{result}");
        assert!(stream.iter().all(|w| w.as_str() == Some(&pool_worker.id.to_string())), "Count on its pool: {result}");
        let unary: Vec<&str> = result["unary"].as_array().expect("unary").iter().filter_map(|v| v.as_str()).collect();
        assert!(!unary.contains(&pool_worker.id.to_string().as_str()), "Echo not on Count's worker: {result}");
    }
}
