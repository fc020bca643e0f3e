//! The lifeline: when clusterd is not PID 1 and dies without shutting down
//! (`kill -9`, OOM kill), nothing its workers started may outlive it.
//!
//! The workers die with clusterd (`PR_SET_PDEATHSIG`), but their own
//! children do not: they are re-parented to init, whether they stayed in
//! the worker's process group or left it with `setsid`. As PID 1 of a
//! container the kernel kills the whole PID namespace with clusterd, so the
//! lifeline is only needed outside one.
//!
//! Why this mechanism: a PID namespace or a cgroup would need privileges
//! clusterd usually lacks, and a signal to a process group (`F_SETOWN` on a
//! pipe, or `killpg` from a watchdog) misses a `setsid` daemon. So, like
//! Jenkins' process tree killer, every worker gets an environment cookie
//! (`CLUSTERD_LIFELINE=<token>`) that its descendants inherit whatever group
//! or session they move to, and a tiny process forked before anything else
//! (single-threaded, so it may allocate) blocks reading a pipe whose only write
//! end clusterd holds. The kernel closes that end however clusterd dies;
//! the lifeline then SIGKILLs every process whose environment holds the
//! cookie, until none is left, and exits. Not found: processes that cleared
//! their environment or run as another user (their `/proc/<pid>/environ`
//! cannot be read).

use std::io;
use std::os::fd::OwnedFd;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::signal::{SigHandler, Signal, kill};
use nix::unistd::{ForkResult, Pid};

/// The variable every worker gets; its descendants inherit it.
pub const COOKIE_VAR: &str = "CLUSTERD_LIFELINE";
/// How long the lifeline keeps looking for processes to kill.
const SWEEP_FOR: Duration = Duration::from_secs(5);
const SWEEP_PAUSE: Duration = Duration::from_millis(50);

struct Lifeline {
    pid: u32,
    token: String,
    /// The write end: closed by the kernel when clusterd exits.
    _write_end: OwnedFd,
}

static LIFELINE: OnceLock<Lifeline> = OnceLock::new();

/// Forks the lifeline. Must run while clusterd has a single thread (before
/// the logger and the runtime start). Does nothing as PID 1.
pub fn start() -> io::Result<()> {
    if std::process::id() == 1 {
        return Ok(());
    }
    let token = format!("{}-{}", std::process::id(), jiff::Timestamp::now().as_nanosecond());
    // CLOEXEC: no worker may hold the write end, or it would never close.
    let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    // SAFETY: clusterd has one thread here (see above), so the child may
    // allocate and do anything a fresh process may.
    #[allow(unsafe_code)]
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Child => {
            drop(write_end);
            watch(read_end, &token);
        }
        ForkResult::Parent { child } => {
            drop(read_end);
            let pid = child.as_raw() as u32;
            let _ = LIFELINE.set(Lifeline { pid, token, _write_end: write_end });
            Ok(())
        }
    }
}

/// The lifeline's pid, if it runs (it is clusterd's child, not an orphan).
pub fn pid() -> Option<u32> {
    LIFELINE.get().map(|l| l.pid)
}

/// The cookie for the workers' environment, if the lifeline runs.
pub fn cookie() -> Option<(&'static str, &'static str)> {
    LIFELINE.get().map(|l| (COOKIE_VAR, l.token.as_str()))
}

/// The lifeline process: waits for clusterd to be gone, sweeps, exits.
fn watch(read_end: OwnedFd, token: &str) -> ! {
    // What ps shows (the kernel keeps 15 bytes of it).
    let _ = nix::sys::prctl::set_name(c"clusterd-lifeln");
    // Signals meant for clusterd (a terminal's Ctrl-C reaches the whole
    // foreground group) must not take the lifeline before it is needed.
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGPIPE] {
        // SAFETY: SIG_IGN installs no handler code.
        #[allow(unsafe_code)]
        let _ = unsafe { nix::sys::signal::signal(signal, SigHandler::SigIgn) };
    }
    let mut buf = [0u8; 64];
    loop {
        match nix::unistd::read(&read_end, &mut buf) {
            Ok(0) => break,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    let entry = format!("{COOKIE_VAR}={token}");
    let deadline = Instant::now() + SWEEP_FOR;
    let mut killed = 0usize;
    // Repeat: a process may fork while it is being looked for.
    loop {
        let marked = marked_processes(entry.as_bytes());
        if marked.is_empty() || Instant::now() >= deadline {
            break;
        }
        for pid in marked {
            if kill(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok() {
                killed += 1;
            }
        }
        std::thread::sleep(SWEEP_PAUSE);
    }
    if killed > 0 {
        eprintln!("clusterd-lifeline: clusterd is gone; killed {killed} processes its workers left behind");
    }
    // SAFETY: _exit skips the parent's atexit work, which is not ours to do.
    #[allow(unsafe_code)]
    unsafe {
        nix::libc::_exit(0)
    }
}

/// Live processes whose environment holds `entry` (zombies have none).
fn marked_processes(entry: &[u8]) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| has_entry(&env, entry)))
        .collect()
}

/// Whether a NUL-separated environment block holds exactly `entry`.
fn has_entry(environ: &[u8], entry: &[u8]) -> bool {
    environ.split(|&b| b == 0).any(|e| e == entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_must_match_a_whole_entry() {
        let env = b"PATH=/bin\0CLUSTERD_LIFELINE=42-7\0HOME=/\0";
        assert!(has_entry(env, b"CLUSTERD_LIFELINE=42-7"));
        assert!(!has_entry(env, b"CLUSTERD_LIFELINE=42-"));
        assert!(!has_entry(env, b"CLUSTERD_LIFELINE=42-70"));
        assert!(!has_entry(b"", b"CLUSTERD_LIFELINE=42-7"));
    }
}
