//! Starting worker processes.
//!
//! Workers are started with `std::process::Command` (for the stdio pipes and
//! its error reporting) but exec'd by our own `pre_exec` hook: that lets the
//! child write its own pid into `LISTEN_PID` (socket activation wants the
//! receiver's pid, known only after fork) without calling anything that is
//! not async-signal-safe. The `Child` handle is dropped without waiting: the
//! single reaper in `reaper.rs` collects every exit status.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStderr, ChildStdout, Command, Stdio};

use nix::libc;

/// Room for `LISTEN_PID=` plus the digits of any pid and the NUL.
const LISTEN_PID_BUF: usize = 32;
const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
/// Variables clusterd sets itself; inherited values are dropped.
const OWN_VARS: &[&str] = &[
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "CLUSTERD_REUSEPORT",
    // A clusterd run under PM2 or Node's cluster module must not hand its
    // own primary's channel to its workers.
    "NODE_UNIQUE_ID",
    "NODE_CHANNEL_FD",
    "NODE_CHANNEL_SERIALIZATION_MODE",
];

/// The user's command, resolved once at startup.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    program: PathBuf,
    argv: Vec<CString>,
}

impl CommandSpec {
    /// Resolves `command[0]` through `PATH` like a shell would.
    pub fn resolve(command: &[String]) -> io::Result<CommandSpec> {
        let name = command.first().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
        let program = find_program(name)?;
        let argv = command.iter().map(|a| cstring(a.as_bytes())).collect::<io::Result<_>>()?;
        Ok(CommandSpec { program, argv })
    }
}

fn find_program(name: &str) -> io::Result<PathBuf> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{name}: command not found in PATH")))
}

fn is_executable(path: &Path) -> bool {
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in command or environment"))
}

/// What one worker process gets besides the command.
#[derive(Debug, Default)]
pub struct WorkerSetup {
    pub env: Vec<(String, String)>,
    /// Socket to hand over as fd 3 with `LISTEN_FDS=1` (inherit mode).
    pub listen_fd: Option<RawFd>,
    /// The worker's end of its Node IPC channel, as fd 3 (node mode).
    pub node_channel_fd: Option<RawFd>,
}

pub struct Spawned {
    pub pid: u32,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
}

/// Everything the child needs for `execve`, allocated before fork.
struct ExecImage {
    program: CString,
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    listen_pid: Option<Box<[u8; LISTEN_PID_BUF]>>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// Becomes the child's fd 3.
    fd3: Option<RawFd>,
    parent: libc::pid_t,
}

// SAFETY: the raw pointers point into heap buffers owned by the same struct,
// which are never mutated in the parent; the child gets its own copy.
#[allow(unsafe_code)]
unsafe impl Send for ExecImage {}
// SAFETY: as above; no shared mutation.
#[allow(unsafe_code)]
unsafe impl Sync for ExecImage {}

impl ExecImage {
    fn new(spec: &CommandSpec, setup: &WorkerSetup) -> io::Result<ExecImage> {
        let program = cstring(spec.program.as_os_str().as_bytes())?;
        let argv = spec.argv.clone();
        let envp = build_env(setup)?;
        let listen_pid = setup.listen_fd.map(|_| {
            let mut buf = Box::new([0u8; LISTEN_PID_BUF]);
            buf[..LISTEN_PID_PREFIX.len()].copy_from_slice(LISTEN_PID_PREFIX);
            buf
        });
        let mut argv_ptrs: Vec<_> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut envp_ptrs: Vec<_> = envp.iter().map(|e| e.as_ptr()).collect();
        if let Some(buf) = &listen_pid {
            envp_ptrs.push(buf.as_ptr().cast());
        }
        envp_ptrs.push(std::ptr::null());
        Ok(ExecImage {
            program,
            _argv: argv,
            _envp: envp,
            listen_pid,
            argv_ptrs,
            envp_ptrs,
            fd3: setup.listen_fd.or(setup.node_channel_fd),
            parent: nix::unistd::getpid().as_raw(),
        })
    }

    /// Runs in the forked child: only async-signal-safe calls, no allocation.
    #[allow(unsafe_code)]
    fn exec_in_child(&mut self) -> io::Result<()> {
        // SAFETY: prctl, getppid, getpid, fcntl, dup2 and execve are
        // async-signal-safe; all buffers were allocated before fork.
        unsafe {
            // Even a SIGKILLed clusterd takes its workers with it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // clusterd may have died between fork and prctl.
            if libc::getppid() != self.parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            if let Some(fd) = self.fd3 {
                let ok = if fd == 3 { libc::fcntl(3, libc::F_SETFD, 0) == 0 } else { libc::dup2(fd, 3) == 3 };
                if !ok {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(buf) = self.listen_pid.as_mut() {
                write_decimal(&mut buf[LISTEN_PID_PREFIX.len()..], libc::getpid() as u32);
            }
            libc::execve(self.program.as_ptr(), self.argv_ptrs.as_ptr(), self.envp_ptrs.as_ptr());
        }
        Err(io::Error::last_os_error())
    }
}

/// Writes `n` in decimal followed by NUL; `out` must hold 11 bytes.
fn write_decimal(out: &mut [u8], mut n: u32) {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        out[i] = digits[len - 1 - i];
    }
    out[len] = 0;
}

fn build_env(setup: &WorkerSetup) -> io::Result<Vec<CString>> {
    let own = |key: &OsStr| {
        OWN_VARS.iter().any(|v| OsStr::new(v) == key) || setup.env.iter().any(|(k, _)| OsStr::new(k) == key)
    };
    let mut envp = Vec::new();
    for (key, value) in std::env::vars_os().filter(|(k, _)| !own(k)) {
        envp.push(env_entry(key.as_bytes(), value.as_bytes())?);
    }
    for (key, value) in &setup.env {
        envp.push(env_entry(key.as_bytes(), value.as_bytes())?);
    }
    Ok(envp)
}

fn env_entry(key: &[u8], value: &[u8]) -> io::Result<CString> {
    let mut entry = Vec::with_capacity(key.len() + value.len() + 1);
    entry.extend_from_slice(key);
    entry.push(b'=');
    entry.extend_from_slice(value);
    cstring(&entry)
}

/// Forks and execs one worker in its own process group (so a terminal's
/// Ctrl-C reaches only clusterd, which then shuts the workers down in order).
#[allow(unsafe_code)]
pub fn spawn(spec: &CommandSpec, setup: &WorkerSetup) -> io::Result<Spawned> {
    let mut image = ExecImage::new(spec, setup)?;
    let mut command = Command::new(&spec.program);
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    // SAFETY: the hook only makes async-signal-safe calls (see exec_in_child).
    unsafe {
        command.pre_exec(move || image.exec_in_child());
    }
    let mut child = command.spawn()?;
    let spawned = Spawned { pid: child.id(), stdout: child.stdout.take(), stderr: child.stderr.take() };
    // Dropping `Child` neither waits nor kills; the reaper owns exit statuses.
    drop(child);
    Ok(spawned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_digits() {
        let mut buf = [0xffu8; 11];
        write_decimal(&mut buf, 4_194_304);
        assert_eq!(&buf[..8], b"4194304\0");
        write_decimal(&mut buf, 0);
        assert_eq!(&buf[..2], b"0\0");
        write_decimal(&mut buf, u32::MAX);
        assert_eq!(&buf[..11], b"4294967295\0");
    }

    #[test]
    fn programs_resolve_through_path() {
        assert!(find_program("sh").is_ok_and(|p| p.is_absolute()));
        assert!(find_program("definitely-not-a-command-xyz").is_err());
        assert_eq!(find_program("./x").ok(), Some(PathBuf::from("./x")));
    }
}
