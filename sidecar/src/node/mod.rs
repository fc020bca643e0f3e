//! Node apps without a hop (`--port-mode node`).
//!
//! PM2 and Node's own `cluster` module let an unmodified `server.listen(PORT)`
//! in a worker share one socket: the worker, started with `NODE_UNIQUE_ID`
//! and an IPC channel on `NODE_CHANNEL_FD`, asks its primary for the
//! listening handle (`queryServer`) instead of binding. clusterd plays that
//! primary: [`channel`] answers with clusterd's own listening socket, so the
//! kernel hands connections straight to the workers, and a worker's
//! `listening` message is a precise readiness signal. [`protocol`] is the
//! wire format; this module decides whether a command runs Node at all.

pub mod channel;
pub mod preload;
pub mod protocol;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The oldest Node release line clusterd speaks the cluster protocol with
/// (and tests: 18, 20, 22, 24).
pub const MIN_MAJOR: u32 = 18;
/// Bound on `node --version` at start-up.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a command runs Node, and one clusterd can share a port with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeCheck {
    NotNode,
    /// `version` as Node prints it (`v22.12.0`).
    Supported {
        version: String,
    },
    /// Node, but not one node mode can run: why.
    Unsupported(String),
}

/// Looks at the command (and the `#!` line of a script) and asks the Node it
/// runs for its version.
pub fn inspect(command: &[String]) -> NodeCheck {
    let Some(node) = node_interpreter(command, &shebang_of) else {
        return NodeCheck::NotNode;
    };
    if let Some(launcher) = launcher(command, &|p| resolve(p).and_then(|p| p.canonicalize().ok())) {
        return NodeCheck::Unsupported(format!(
            "`{launcher}` starts the app as a child process of its own, and being Node itself it would take the \
             cluster channel while the app binds the port on its own; run the app with node directly \
             (e.g. CMD [\"node\", \"app.js\"]) for node mode"
        ));
    }
    match run_version(&node) {
        Ok(output) => check_version(&output),
        Err(e) => NodeCheck::Unsupported(format!("cannot run `{node} --version`: {e}")),
    }
}

/// The Node binary a command starts, if it starts one: `node …` or `nodejs …`
/// (also behind the official images' `docker-entrypoint.sh`, which execs
/// its arguments), or a script whose `#!` line runs node.
fn node_interpreter(command: &[String], shebang_of: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let mut args = command.iter().map(String::as_str);
    let mut program = args.next()?;
    if basename(program) == "docker-entrypoint.sh" {
        program = args.next()?;
    }
    if is_node(program) {
        return Some(program.to_string());
    }
    let line = shebang_of(program)?;
    let mut words = line.split_whitespace();
    let interpreter = words.next()?;
    if basename(interpreter) == "env" {
        // `#!/usr/bin/env node` or `#!/usr/bin/env -S node --flag`.
        words.find(|w| !w.starts_with('-')).filter(|w| is_node(w)).map(str::to_string)
    } else {
        is_node(interpreter).then(|| interpreter.to_string())
    }
}

/// Node programs that run the app as a child process (package managers and
/// the like): Node drops `NODE_UNIQUE_ID` and `NODE_CHANNEL_FD` from the
/// environment of the first Node process, and the channel's descriptor is
/// not passed on to its children, so the app never becomes a cluster worker.
const LAUNCHERS: &[&str] = &["npm", "npx", "yarn", "yarnpkg", "pnpm", "pnpx", "corepack", "nodemon", "tsx"];

/// The launcher a Node command runs, if any: by the command's name, the
/// file it links to (`npm` → `…/npm/bin/npm-cli.js`), or the script given
/// to node (`node …/npm-cli.js start`).
fn launcher(command: &[String], real_path: &dyn Fn(&str) -> Option<PathBuf>) -> Option<&'static str> {
    let mut args = command.iter().map(String::as_str).skip_while(|a| basename(a) == "docker-entrypoint.sh");
    let program = args.next()?;
    let script = if is_node(program) { args.find(|a| !a.starts_with('-')) } else { None };
    let linked = real_path(program);
    let candidates = [Some(program), linked.as_deref().and_then(Path::to_str), script];
    candidates.into_iter().flatten().find_map(launcher_named)
}

fn launcher_named(file: &str) -> Option<&'static str> {
    let name = basename(file);
    let stem = name.strip_suffix(".js").or(name.strip_suffix(".cjs")).or(name.strip_suffix(".mjs")).unwrap_or(name);
    let stem = stem.strip_suffix("-cli").unwrap_or(stem);
    LAUNCHERS.iter().find(|l| **l == stem).copied()
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn is_node(program: &str) -> bool {
    matches!(basename(program), "node" | "nodejs")
}

/// The `#!` line of `program` (found through PATH), without the `#!`.
fn shebang_of(program: &str) -> Option<String> {
    use std::io::Read;
    let path = resolve(program)?;
    let mut head = [0u8; 256];
    let n = std::fs::File::open(path).ok()?.read(&mut head).ok()?;
    let head = head[..n].strip_prefix(b"#!")?;
    let line = head.split(|&b| b == b'\n').next()?;
    Some(String::from_utf8_lossy(line).trim().to_string())
}

fn resolve(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// `node --version`'s output, bounded in time.
fn run_version(node: &str) -> std::io::Result<String> {
    let mut child = Command::new(node)
        .arg("--version")
        .env_remove("NODE_OPTIONS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + VERSION_TIMEOUT;
    loop {
        if child.try_wait()?.is_some() {
            let mut out = String::new();
            if let Some(mut stdout) = child.stdout.take() {
                std::io::Read::read_to_string(&mut stdout, &mut out)?;
            }
            return Ok(out);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 5s"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Judges `node --version`'s output.
fn check_version(output: &str) -> NodeCheck {
    let version = output.trim();
    let major = version.strip_prefix('v').and_then(|v| v.split('.').next()).and_then(|m| m.parse::<u32>().ok());
    match major {
        Some(major) if major >= MIN_MAJOR => NodeCheck::Supported { version: version.to_string() },
        Some(_) => NodeCheck::Unsupported(format!(
            "Node {version} is older than {MIN_MAJOR}, the oldest Node whose cluster protocol clusterd speaks"
        )),
        None => NodeCheck::Unsupported(format!("`node --version` printed {version:?}, not a Node version")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(command: &[&str]) -> Vec<String> {
        command.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn node_commands_are_recognised() {
        let no_script = |_: &str| None;
        assert_eq!(node_interpreter(&args(&["node", "app.js"]), &no_script).as_deref(), Some("node"));
        assert_eq!(
            node_interpreter(&args(&["/opt/n/bin/nodejs", "a.js"]), &no_script).as_deref(),
            Some("/opt/n/bin/nodejs")
        );
        assert_eq!(
            node_interpreter(&args(&["docker-entrypoint.sh", "node", "server.js"]), &no_script).as_deref(),
            Some("node")
        );
        assert_eq!(node_interpreter(&args(&["npm", "start"]), &no_script), None, "npm starts node as a grandchild");
        assert_eq!(node_interpreter(&args(&["python3", "app.py"]), &no_script), None);
        assert_eq!(node_interpreter(&[], &no_script), None);
    }

    #[test]
    fn scripts_run_by_node_are_recognised_by_their_shebang() {
        let shebang = |line: &'static str| move |_: &str| Some(line.to_string());
        assert_eq!(node_interpreter(&args(&["./server.js"]), &shebang("/usr/bin/env node")).as_deref(), Some("node"));
        assert_eq!(
            node_interpreter(&args(&["./server.js"]), &shebang("/usr/bin/env -S node --max-old-space-size=100"))
                .as_deref(),
            Some("node")
        );
        assert_eq!(
            node_interpreter(&args(&["./s"]), &shebang("/usr/local/bin/node")).as_deref(),
            Some("/usr/local/bin/node")
        );
        assert_eq!(node_interpreter(&args(&["./start.sh"]), &shebang("/bin/sh")), None);
        assert_eq!(node_interpreter(&args(&["./x"]), &shebang("/usr/bin/env python3")), None);
    }

    #[test]
    fn package_managers_and_other_launchers_are_recognised() {
        let none = |_: &str| None;
        assert_eq!(launcher(&args(&["npm", "start"]), &none), Some("npm"));
        assert_eq!(launcher(&args(&["docker-entrypoint.sh", "yarn", "start"]), &none), Some("yarn"));
        assert_eq!(launcher(&args(&["npx", "serve"]), &none), Some("npx"));
        let corepack = |_: &str| Some(PathBuf::from("/usr/local/lib/node_modules/corepack/dist/pnpm.js"));
        assert_eq!(launcher(&args(&["/usr/local/bin/run"]), &corepack), Some("pnpm"));
        let npm_cli = |_: &str| Some(PathBuf::from("/usr/local/lib/node_modules/npm/bin/npm-cli.js"));
        assert_eq!(launcher(&args(&["/usr/local/bin/npm", "start"]), &npm_cli), Some("npm"));
        assert_eq!(
            launcher(&args(&["node", "--enable-source-maps", "/opt/node_modules/pnpm/bin/pnpm.cjs", "start"]), &none),
            Some("pnpm")
        );
        assert_eq!(launcher(&args(&["node", "server.js"]), &none), None);
        assert_eq!(launcher(&args(&["node", "npm.txt"]), &none), None);
        assert_eq!(launcher(&args(&["./server.js"]), &|_: &str| Some(PathBuf::from("/app/server.js"))), None);
    }

    #[test]
    fn versions_from_18_on_are_supported() {
        assert_eq!(check_version("v18.20.8\n"), NodeCheck::Supported { version: "v18.20.8".into() });
        assert_eq!(check_version("v24.21.0"), NodeCheck::Supported { version: "v24.21.0".into() });
        let NodeCheck::Unsupported(why) = check_version("v16.20.2\n") else { panic!("16 is too old") };
        assert!(why.contains("v16.20.2") && why.contains("18"), "{why}");
        assert!(matches!(check_version("hello"), NodeCheck::Unsupported(_)));
    }
}
