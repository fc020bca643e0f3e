//! The one place that calls `waitpid`.
//!
//! A single `waitpid(-1, WNOHANG)` loop, woken by SIGCHLD, collects every
//! exit: workers' statuses go to the supervisor, and unknown pids (orphans
//! re-parented to clusterd as PID 1 or subreaper) are simply reaped. Nothing
//! else may wait on children, or it would steal these statuses.

use std::fmt;
use std::time::Duration;

use clustered_api::wire::OOM_KILLED;
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use tokio::signal::unix::Signal as SignalStream;
use tokio::sync::mpsc::UnboundedSender;

use crate::cgroup::OomKills;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    Code(i32),
    Signal(Signal),
    /// SIGKILL from the kernel's OOM killer at the memory cgroup's limit.
    OomKilled,
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitInfo::Code(code) => write!(f, "exit code {code}"),
            ExitInfo::Signal(signal) => write!(f, "killed by {}", signal.as_str()),
            ExitInfo::OomKilled => {
                write!(f, "{OOM_KILLED} (SIGKILL from the kernel: the container reached its memory limit)")
            }
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
    let mut oom_kills = OomKills::open();
    loop {
        tokio::select! {
            _ = sigchld.recv() => {}
            _ = safety.tick() => {}
        }
        let mut exits = reap_exited();
        if let Some(oom_kills) = &mut oom_kills
            && exits.iter().any(|(_, exit)| *exit == ExitInfo::Signal(Signal::SIGKILL))
        {
            attribute_oom_kills(&mut exits, oom_kills.new_kills());
        }
        for exit in exits {
            if report.send(exit).is_err() {
                return;
            }
        }
    }
}

/// Marks up to `oom_kills` of the `SIGKILL` exits as OOM kills: the kernel
/// counts a kill before its victim dies, so the kills counted by the time
/// a `SIGKILL`ed process is reaped include its own. (A kill of a process
/// that clusterd does not reap, e.g. a worker's child, is counted too and
/// may be blamed on a worker killed by clusterd in the same moment.)
fn attribute_oom_kills(exits: &mut [(u32, ExitInfo)], mut oom_kills: u64) {
    for (_, exit) in exits.iter_mut() {
        if oom_kills == 0 {
            return;
        }
        if *exit == ExitInfo::Signal(Signal::SIGKILL) {
            *exit = ExitInfo::OomKilled;
            oom_kills -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kills_are_blamed_on_sigkilled_processes_only() {
        let mut exits = vec![
            (1, ExitInfo::Code(1)),
            (2, ExitInfo::Signal(Signal::SIGKILL)),
            (3, ExitInfo::Signal(Signal::SIGTERM)),
            (4, ExitInfo::Signal(Signal::SIGKILL)),
        ];
        attribute_oom_kills(&mut exits, 1);
        assert_eq!(exits[1].1, ExitInfo::OomKilled);
        assert_eq!(exits[3].1, ExitInfo::Signal(Signal::SIGKILL), "one kill counted, one blamed");
        assert_eq!((exits[0].1, exits[2].1), (ExitInfo::Code(1), ExitInfo::Signal(Signal::SIGTERM)));

        let mut exits = vec![(2, ExitInfo::Signal(Signal::SIGKILL))];
        attribute_oom_kills(&mut exits, 0);
        assert_eq!(exits[0].1, ExitInfo::Signal(Signal::SIGKILL), "no new kill counted: clusterd's own SIGKILL");
        assert!(ExitInfo::OomKilled.to_string().starts_with(OOM_KILLED));
    }
}
