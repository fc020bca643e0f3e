//! Processes clusterd adopted: as PID 1, or as a child subreaper, it
//! becomes the parent of a worker's descendants that outlive the worker
//! (a daemon it started with `setsid`, say). They are left running while
//! clusterd runs, like under tini, and stopped when it shuts down, so none
//! outlives it.

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, getpgid};

/// The live (not zombie) processes whose parent is `parent`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| parent_if_alive(&stat))
                .is_some_and(|ppid| ppid == parent)
        })
        .collect()
}

/// The worker `root` and every live process it started: its descendants by
/// parent, and whatever stayed in its process group (each worker leads
/// one). A wrapper (`sh -c 'python3 app.py'`) or a pre-fork server serves
/// from such a process, not from the worker itself.
pub fn process_tree(root: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![root];
    };
    let procs: Vec<(u32, u32, u32)> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (ppid, group) = parent_and_group_if_alive(&stat)?;
            Some((pid, ppid, group))
        })
        .collect();
    tree_of(root, &procs)
}

/// `root` and the processes of `procs` (pid, parent, group) below it or in
/// its group.
pub(super) fn tree_of(root: u32, procs: &[(u32, u32, u32)]) -> Vec<u32> {
    let mut tree = vec![root];
    tree.extend(procs.iter().filter(|&&(pid, _, group)| group == root && pid != root).map(|&(pid, _, _)| pid));
    // Parents before children is not guaranteed: repeat until nothing joins.
    loop {
        let joining: Vec<u32> = procs
            .iter()
            .filter(|&&(pid, ppid, _)| tree.contains(&ppid) && !tree.contains(&pid))
            .map(|&(pid, _, _)| pid)
            .collect();
        if joining.is_empty() {
            return tree;
        }
        tree.extend(joining);
    }
}

/// The parent pid and process group in a `/proc/<pid>/stat` line, unless
/// the process is a zombie.
fn parent_and_group_if_alive(stat: &str) -> Option<(u32, u32)> {
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let group = fields.next()?.parse().ok()?;
    (state != "Z").then_some((ppid, group))
}

/// The parent pid in a `/proc/<pid>/stat` line, unless the process is a
/// zombie (already dead, waiting to be reaped). The command name may hold
/// spaces and parentheses, so fields are counted after its last `)`.
fn parent_if_alive(stat: &str) -> Option<u32> {
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    (state != "Z").then_some(ppid)
}

/// Signals each process, and the process group it leads if it leads one.
pub fn signal(pids: &[u32], signal: Signal) {
    for &pid in pids {
        let pid = Pid::from_raw(pid as i32);
        if getpgid(Some(pid)).is_ok_and(|group| group == pid) {
            let _ = killpg(pid, signal);
        }
        let _ = kill(pid, signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_is_read_after_the_command_name() {
        assert_eq!(parent_if_alive("4242 (sleep) S 17 4242 4242 0 -1 4194560"), Some(17));
        assert_eq!(parent_if_alive("4242 (my (odd) name) R 1 4242 4242 0"), Some(1));
        assert_eq!(parent_if_alive("4242 (sleep) Z 17 4242 4242 0"), None);
        assert_eq!(parent_if_alive("garbage"), None);
    }

    #[test]
    fn the_tree_holds_descendants_and_the_group() {
        // 10 is the worker; 11 its child, 12 a grandchild that left the
        // group, 13 in its group re-parented to clusterd (1), 20 another's.
        let procs = [(10, 1, 10), (12, 11, 12), (11, 10, 10), (13, 1, 10), (20, 1, 20), (21, 20, 20)];
        let mut tree = tree_of(10, &procs);
        tree.sort_unstable();
        assert_eq!(tree, vec![10, 11, 12, 13]);
        assert_eq!(parent_and_group_if_alive("4242 (sh) S 17 4200 4200 0"), Some((17, 4200)));
        assert_eq!(parent_and_group_if_alive("4242 (sh) Z 17 4200 4200 0"), None);
    }

    #[test]
    fn this_process_is_a_child_of_its_parent() {
        let me = std::process::id();
        let parent = nix::unistd::getppid().as_raw() as u32;
        assert!(children_of(parent).contains(&me));
    }
}
