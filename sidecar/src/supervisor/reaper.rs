//! The one place that calls `waitpid`.
//!
//! A single `waitpid(-1, WNOHANG)` loop, woken by SIGCHLD, collects every
//! exit: workers' statuses go to the supervisor, and unknown pids (orphans
//! re-parented to clusterd as PID 1 or subreaper) are simply reaped. Nothing
//! else may wait on children, or it would steal these statuses.

use std::fmt;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use tokio::signal::unix::Signal as SignalStream;
use tokio::sync::mpsc::UnboundedSender;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    Code(i32),
    Signal(Signal),
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitInfo::Code(code) => write!(f, "exit code {code}"),
            ExitInfo::Signal(signal) => write!(f, "killed by {}", signal.as_str()),
        }
    }
}

/// Collects every exited child without blocking.
pub fn reap_exited() -> Vec<(u32, ExitInfo)> {
    let mut exited = Vec::new();
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => exited.push((pid.as_raw() as u32, ExitInfo::Code(code))),
            Ok(WaitStatus::Signaled(pid, signal, _)) => exited.push((pid.as_raw() as u32, ExitInfo::Signal(signal))),
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return exited,
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "waitpid failed");
                return exited;
            }
        }
    }
}

/// Reaps on every SIGCHLD (and once a second, in case one was coalesced
/// away while the loop was busy) and reports each exit.
pub async fn run(mut sigchld: SignalStream, report: UnboundedSender<(u32, ExitInfo)>) {
    let mut safety = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = sigchld.recv() => {}
            _ = safety.tick() => {}
        }
        for exit in reap_exited() {
            if report.send(exit).is_err() {
                return;
            }
        }
    }
}
