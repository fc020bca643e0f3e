//! The command line contract: exit codes and error messages.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().expect("run clusterd")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn missing_command_is_a_usage_error() {
    let output = run(&["--workers", "2"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("<command>"), "{}", stderr(&output));
}

#[test]
fn bad_values_are_usage_errors() {
    for (args, needle) in [
        (&["--workers", "lots", "--", "true"][..], "auto"),
        (&["--route", "report=1", "--", "true"][..], "must start with '/'"),
        (&["--min-workers", "4", "--max-workers", "2", "--", "true"][..], "greater than --max-workers"),
        (&["--health-period", "soon", "--", "true"][..], "health-period"),
        (&["--route", "/a=1", "--port-mode", "inherit", "--", "true"][..], "--port-mode proxy"),
        (&["--cpu-limit=0", "--", "true"][..], "cpu-limit"),
    ] {
        let output = run(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", stderr(&output));
        assert!(stderr(&output).contains(needle), "{args:?}: {}", stderr(&output));
    }
}

/// Settings that parse but could never work (issue 21): exit 2 with what
/// to fix, before any worker starts.
#[test]
fn impossible_settings_are_refused_with_what_to_fix() {
    for (args, needle) in [
        (&["--health-timeout", "0s"][..], "--health-timeout 0s fails every probe"),
        (&["--max-memory-mib", "0"][..], "--max-memory-mib 0 would recycle every worker"),
        (&["--crash-loop-threshold", "0"][..], "--crash-loop-threshold must be at least 1"),
        (&["--initial-backoff", "20s", "--max-backoff", "5s"][..], "lower --initial-backoff or raise --max-backoff"),
        (&["--route-exact", "/x?q=1"][..], "give the path alone (\"/x\")"),
        (&["--route", "/x#top=1"][..], "never its query or fragment"),
        (&["--admin-port", "0"][..], "--admin-port must not be 0"),
        (&["--workers", "-1"][..], "expected `auto` or a positive integer, got \"-1\""),
    ] {
        let mut argv = args.to_vec();
        argv.extend(["--", "true"]);
        let output = run(&argv);
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("tip:"), "{args:?}: clap's tip to pass it after `--`: {err}");
    }
}

#[test]
fn help_lists_the_contract_flags() {
    let output = run(&["--help"]);
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--workers",
        "--cpu-limit",
        "--port-mode",
        "--route",
        "--admin-port",
        "--hung-after",
        "--drain-timeout",
        "--min-ready",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn unknown_command_exits_127() {
    let (port, admin) = (free_port().to_string(), free_port().to_string());
    let output = run(&["--port", &port, "--admin-port", &admin, "--", "no-such-command-clusterd-test"]);
    assert_eq!(output.status.code(), Some(127));
    assert!(stderr(&output).contains("not found"), "{}", stderr(&output));
}

#[test]
fn non_executable_command_exits_126() {
    let (port, admin) = (free_port().to_string(), free_port().to_string());
    let output = run(&["--port", &port, "--admin-port", &admin, "--", &app("server.js")]);
    assert_eq!(output.status.code(), Some(126), "{}", stderr(&output));
}

#[test]
fn port_in_use_exits_3() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let admin = free_port().to_string();
    let output = run(&["--bind", "127.0.0.1", "--port", &port, "--admin-port", &admin, "--", "true"]);
    assert_eq!(output.status.code(), Some(3));
    assert!(stderr(&output).contains("cannot bind the shared port"), "{}", stderr(&output));
}

#[test]
fn sigquit_is_a_quick_shutdown_with_128_plus_signal() {
    let mut clusterd = Launch::node(&["--workers", "1"]).start();
    let workers = worker_pids(&clusterd.wait_ready(1));
    clusterd.signal(Signal::SIGQUIT);
    let exit = clusterd.wait_exit(SLOW);
    assert_eq!(exit.code(), Some(128 + 3));
    for pid in workers {
        wait_until("worker to stop", Duration::from_secs(10), || !process_alive(pid));
    }
}

#[test]
fn workers_get_their_identity_in_the_environment() {
    let script = "echo \"ENV id=$WORKER_ID app=$NODE_APP_INSTANCE n=$CLUSTERD_WORKERS mode=$CLUSTERD_PORT_MODE port=${PORT:+set}\"; exec sleep 30";
    let clusterd = Launch::new(&["--workers", "2", "--health-check", "none"], &["sh", "-c", script]).start();
    clusterd.wait_ready(2);
    wait_until("both workers to report", SLOW, || clusterd.logs().matches("ENV id=").count() >= 2);
    let logs = clusterd.logs();
    assert!(logs.contains("[worker 0] ENV id=0 app=0 n=2 mode=proxy port=set"), "{logs}");
    assert!(logs.contains("[worker 1] ENV id=1 app=1 n=2 mode=proxy port=set"), "{logs}");
}

#[test]
fn install_to_copies_the_binary() {
    let dir = std::env::temp_dir().join(format!("clusterd-install-{}", std::process::id()));
    let dest = dir.join("bin/clusterd");
    let output = run(&["--install-to", dest.to_str().expect("utf-8 path")]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let installed = Command::new(&dest).arg("--version").output().expect("run installed copy");
    assert!(String::from_utf8_lossy(&installed.stdout).starts_with("clusterd "));
    let _ = std::fs::remove_dir_all(dir);
}

/// Settings that cannot work are refused at once (exit 2) with a message
/// that names the flag, before anything is allocated or started.
#[test]
fn impossible_settings_are_refused_with_the_flag_named() {
    for (args, needle) in [
        (&["--cpu-limit", "1e9", "--", "true"][..], "--cpu-limit 1000000000 asks for 1000000000 workers"),
        (&["--route", "/api=99999999", "--", "true"][..], "above the worker cap of 1024"),
        (&["--workers", "100000", "--", "true"][..], "--workers 100000"),
        (&["--workers", "8", "--worker-cap", "4", "--", "true"][..], "--worker-cap"),
        (&["--min-workers", "2000", "--", "true"][..], "--min-workers 2000"),
        (&["--hung-after", "0s", "--", "true"][..], "--hung-after 0s"),
        (&["--workers", "2", "--min-ready", "3", "--", "true"][..], "--min-ready 3 is more than the 2 workers"),
        (
            &["--max-requests", "100", "--port-mode", "inherit", "--", "true"][..],
            "--max-requests needs --port-mode proxy",
        ),
        (&["--max-requests", "100", "--port-mode", "reuseport", "--", "true"][..], "--port-mode proxy"),
        (&["--route", "/a=1=2", "--", "true"][..], "positive integer"),
        (&["--route", "/a b=1", "--", "true"][..], "white space"),
        (&["--port", "8080", "--admin-port", "8080", "--", "true"][..], "--admin-port 8080 is the same as --port"),
        (&["--backlog", "0", "--", "true"][..], "--backlog"),
        (&["--max-queue", "10", "--", "true"][..], "--max-queue sizes the queue of --max-concurrency"),
        (&["--queue-timeout", "2s", "--", "true"][..], "--queue-timeout sizes the queue of --max-concurrency"),
        (
            &["--max-concurrency", "2", "--protocol", "tcp", "--", "true"][..],
            "--max-concurrency needs --port-mode proxy",
        ),
        (&["--max-concurrency", "2", "--port-mode", "inherit", "--", "true"][..], "--max-concurrency needs"),
        (&["--max-concurrency", "0", "--", "true"][..], "--max-concurrency"),
        (&["--sticky", "cookie", "--protocol", "tcp", "--", "true"][..], "--sticky needs --port-mode proxy"),
        (&["--upstream-protocol", "h2c", "--protocol", "tcp", "--", "true"][..], "--upstream-protocol needs"),
        (&["--sticky", "ip", "--", "true"][..], "expected `cookie`, `cookie=NAME` or `header=NAME`"),
        (
            &["--max-concurrency", "1", "--queue-timeout", "0s", "--", "true"][..],
            "--queue-timeout must be greater than 0",
        ),
    ] {
        let started = std::time::Instant::now();
        let output = run(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", stderr(&output));
        assert!(stderr(&output).contains(needle), "{args:?}: {}", stderr(&output));
        assert!(started.elapsed() < Duration::from_secs(5), "{args:?} took {:?}", started.elapsed());
    }
}

#[test]
fn more_than_four_workers_per_cpu_is_warned() {
    let clusterd =
        Launch::new(&["--cpu-limit", "1", "--workers", "5", "--health-check", "none"], &["sleep", "30"]).start();
    clusterd.wait_ready(5);
    wait_until("the warning", SLOW, || clusterd.logs().contains("more than 4 workers per CPU"));
}

/// The listen backlog (ss shows it as Send-Q of a listening socket).
fn backlog_of(port: u16) -> u32 {
    let out = Command::new("ss").args(["-ltnH", &format!("sport = :{port}")]).output().expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let columns: Vec<&str> = text.split_whitespace().collect();
    columns.get(2).and_then(|q| q.parse().ok()).unwrap_or_else(|| panic!("no listener on {port}: {text:?}"))
}

#[test]
fn shared_port_listens_with_the_system_backlog_or_the_one_given() {
    let somaxconn: u32 =
        std::fs::read_to_string("/proc/sys/net/core/somaxconn").expect("somaxconn").trim().parse().expect("a number");
    for (args, expected) in [
        (&["--port-mode", "proxy"][..], somaxconn),
        (&["--port-mode", "inherit"][..], somaxconn),
        (&["--port-mode", "proxy", "--backlog", "77"][..], 77),
    ] {
        let mut argv = args.to_vec();
        argv.extend(["--workers", "1", "--health-check", "none"]);
        let clusterd = Launch::new(&argv, &["sleep", "30"]).start();
        clusterd.wait_ready(1);
        assert_eq!(backlog_of(clusterd.port), expected, "{args:?}");
        // The admin port (kubelet probes, scrapes) gets the system's maximum too.
        assert_eq!(backlog_of(clusterd.admin), somaxconn, "admin port, {args:?}");
    }
}
