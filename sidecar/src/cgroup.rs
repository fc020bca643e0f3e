//! CPU limit detection: cgroup v2 `cpu.max`, cgroup v1 CFS quota, else the
//! CPU affinity mask. The parsers take file contents so they can be tested
//! against fixtures; [`detect`] is the thin layer that reads /proc and /sys.

use std::path::{Path, PathBuf};

use clustered_api::wire::CpuLimit;

/// CFS period the kernel uses when `cpu.max` gives none.
const DEFAULT_PERIOD_US: f64 = 100_000.0;

/// One line of /proc/self/cgroup: `hierarchy-id:controller,list:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupEntry {
    pub hierarchy: u32,
    pub controllers: Vec<String>,
    pub path: String,
}

pub fn parse_proc_cgroup(content: &str) -> Vec<CgroupEntry> {
    content
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let hierarchy = parts.next()?.parse().ok()?;
            let controllers = parts.next()?;
            let path = parts.next()?.to_string();
            let controllers = controllers.split(',').filter(|c| !c.is_empty()).map(str::to_string).collect();
            Some(CgroupEntry { hierarchy, controllers, path })
        })
        .collect()
}

/// The fields of a /proc/self/mountinfo line that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The path inside the filesystem that is mounted (4th field).
    pub root: String,
    pub mount_point: String,
    pub fs_type: String,
    pub super_options: Vec<String>,
}

pub fn parse_mountinfo(content: &str) -> Vec<Mount> {
    content.lines().filter_map(parse_mountinfo_line).collect()
}

fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    // id parent major:minor root mount-point options [optional...] - fstype source super-options
    let (left, right) = line.split_once(" - ")?;
    let mut left = left.split(' ');
    let root = unescape_octal(left.nth(3)?);
    let mount_point = unescape_octal(left.next()?);
    let mut right = right.split(' ');
    let fs_type = right.next()?.to_string();
    let _source = right.next();
    let super_options = right.next().unwrap_or("").split(',').map(str::to_string).collect();
    Some(Mount { root, mount_point, fs_type, super_options })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = s.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Maps a cgroup path from /proc/self/cgroup onto the mount of its hierarchy.
///
/// The mount's root field is the cgroup directory that is mounted: `/` on a
/// host or in a private cgroup namespace, the container's own cgroup (e.g.
/// `/kubepods/pod1/abc`) in a runc container without one. There
/// /proc/self/cgroup still shows the full path, so the root is stripped.
pub fn join_cgroup_path(mount: &Mount, cgroup_path: &str) -> PathBuf {
    let mount_point = PathBuf::from(&mount.mount_point);
    let relative = if mount.root == "/" {
        Some(cgroup_path)
    } else {
        cgroup_path.strip_prefix(mount.root.as_str()).filter(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    match relative {
        Some(rest) => mount_point.join(rest.trim_start_matches('/')),
        // The process sits outside the mounted subtree (it was moved after the
        // mount); the mounted directory is the best guess.
        None => mount_point,
    }
}

/// Directory of this process's cgroup v2, if cgroup v2 is mounted.
pub fn v2_cgroup_dir(proc_cgroup: &str, mountinfo: &str) -> Option<PathBuf> {
    let entry = parse_proc_cgroup(proc_cgroup).into_iter().find(|e| e.hierarchy == 0 && e.controllers.is_empty())?;
    let mount = parse_mountinfo(mountinfo).into_iter().find(|m| m.fs_type == "cgroup2")?;
    Some(join_cgroup_path(&mount, &entry.path))
}

/// Directory of this process's cgroup v1 `cpu` controller, if mounted.
pub fn v1_cpu_cgroup_dir(proc_cgroup: &str, mountinfo: &str) -> Option<PathBuf> {
    v1_cgroup_dir(proc_cgroup, mountinfo, "cpu")
}

/// Directory of this process's cgroup v1 `controller`, if mounted.
fn v1_cgroup_dir(proc_cgroup: &str, mountinfo: &str, controller: &str) -> Option<PathBuf> {
    let entry = parse_proc_cgroup(proc_cgroup).into_iter().find(|e| e.controllers.iter().any(|c| c == controller))?;
    let mount = parse_mountinfo(mountinfo)
        .into_iter()
        .find(|m| m.fs_type == "cgroup" && m.super_options.iter().any(|o| o == controller))?;
    Some(join_cgroup_path(&mount, &entry.path))
}

/// The file where the kernel counts the OOM kills in this process's memory
/// cgroup, each file with an `oom_kill N` line: `memory.events` (v2,
/// counting the cgroup and those below it) or `memory.oom_control` (v1).
pub fn oom_kill_file_from(proc_cgroup: &str, mountinfo: &str, root: &Path) -> Option<PathBuf> {
    let v2 = v2_cgroup_dir(proc_cgroup, mountinfo).map(|dir| under(root, &dir).join("memory.events"));
    let v1 = v1_cgroup_dir(proc_cgroup, mountinfo, "memory").map(|dir| under(root, &dir).join("memory.oom_control"));
    [v2, v1].into_iter().flatten().find(|file| read(file).and_then(|c| parse_oom_kills(&c)).is_some())
}

/// The `oom_kill N` count of a `memory.events` or `memory.oom_control`.
pub fn parse_oom_kills(content: &str) -> Option<u64> {
    content.lines().find_map(|line| line.strip_prefix("oom_kill ")?.trim().parse().ok())
}

/// The kernel's count of OOM kills in clusterd's memory cgroup, to tell a
/// worker the kernel killed at the memory limit from other `SIGKILL`s.
pub struct OomKills {
    file: PathBuf,
    seen: u64,
}

impl OomKills {
    /// `None` where the kernel keeps no such count (no memory cgroup, or a
    /// kernel before 4.13 on cgroup v1).
    pub fn open() -> Option<OomKills> {
        let proc_cgroup = read(Path::new("/proc/self/cgroup"))?;
        let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
        let file = oom_kill_file_from(&proc_cgroup, &mountinfo, Path::new("/"))?;
        let seen = parse_oom_kills(&read(&file)?)?;
        Some(OomKills { file, seen })
    }

    /// OOM kills since the last call.
    pub fn new_kills(&mut self) -> u64 {
        let now = read(&self.file).and_then(|c| parse_oom_kills(&c)).unwrap_or(self.seen);
        let new = now.saturating_sub(self.seen);
        self.seen = now;
        new
    }
}

/// Cores allowed by a cgroup v2 `cpu.max` (`$MAX $PERIOD`); `None` = no limit.
pub fn parse_cpu_max(content: &str) -> Option<f64> {
    let mut fields = content.split_whitespace();
    let quota = fields.next()?;
    if quota == "max" {
        return None;
    }
    let quota: f64 = quota.parse().ok()?;
    let period = fields.next().and_then(|p| p.parse::<f64>().ok()).unwrap_or(DEFAULT_PERIOD_US);
    cores(quota, period)
}

/// Cores allowed by cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`;
/// a quota of -1 (or any value ≤ 0) means no limit.
pub fn parse_cfs(quota: &str, period: Option<&str>) -> Option<f64> {
    let quota: f64 = quota.trim().parse().ok()?;
    let period = period.and_then(|p| p.trim().parse::<f64>().ok()).unwrap_or(DEFAULT_PERIOD_US);
    cores(quota, period)
}

fn cores(quota: f64, period: f64) -> Option<f64> {
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// `dir` and its parents up to and including `stop`, leaf first.
fn dir_and_parents(dir: &Path, stop: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![dir.to_path_buf()];
    let mut current = dir;
    while current != stop {
        match current.parent() {
            Some(parent) if parent.starts_with(stop) => {
                dirs.push(parent.to_path_buf());
                current = parent;
            }
            _ => break,
        }
    }
    dirs
}

/// The tightest limit along the hierarchy: a parent's quota caps its children.
fn tightest(dirs: &[PathBuf], read: impl Fn(&Path) -> Option<f64>) -> Option<f64> {
    dirs.iter().filter_map(|d| read(d)).reduce(f64::min)
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn mount_point_of(mountinfo: &str, fs_type: &str, option: Option<&str>) -> Option<PathBuf> {
    parse_mountinfo(mountinfo)
        .into_iter()
        .find(|m| m.fs_type == fs_type && option.is_none_or(|o| m.super_options.iter().any(|s| s == o)))
        .map(|m| PathBuf::from(m.mount_point))
}

/// `path` as seen under `root` (`/` in production, a fixture tree in tests).
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn detect_v2(proc_cgroup: &str, mountinfo: &str, root: &Path) -> Option<f64> {
    let dir = v2_cgroup_dir(proc_cgroup, mountinfo)?;
    let stop = mount_point_of(mountinfo, "cgroup2", None)?;
    tightest(&dir_and_parents(&dir, &stop), |d| parse_cpu_max(&read(&under(root, d).join("cpu.max"))?))
}

fn detect_v1(proc_cgroup: &str, mountinfo: &str, root: &Path) -> Option<f64> {
    let dir = v1_cpu_cgroup_dir(proc_cgroup, mountinfo)?;
    let stop = mount_point_of(mountinfo, "cgroup", Some("cpu"))?;
    tightest(&dir_and_parents(&dir, &stop), |d| {
        let d = under(root, d);
        let quota = read(&d.join("cpu.cfs_quota_us"))?;
        parse_cfs(&quota, read(&d.join("cpu.cfs_period_us")).as_deref())
    })
}

/// The cgroup CPU limit given the contents of /proc/self/cgroup and
/// /proc/self/mountinfo, reading the cgroup files under `root`. cgroup v2
/// wins when it has a limit; on hybrid hosts the cpu controller is on v1.
pub fn detect_from(proc_cgroup: &str, mountinfo: &str, root: &Path) -> Option<CpuLimit> {
    if let Some(cores) = detect_v2(proc_cgroup, mountinfo, root) {
        return Some(limit(Some(cores), "cgroup-v2"));
    }
    detect_v1(proc_cgroup, mountinfo, root).map(|cores| limit(Some(cores), "cgroup-v1"))
}

/// The files this process's CPU limit is read from, found and opened once,
/// so that polling reads each again at offset 0 (cgroupfs renders a file
/// afresh on every read from the start) instead of walking /proc and the
/// hierarchy: 5 syscalls a poll instead of ~45.
pub struct LimitFiles {
    /// `cpu.max` of the cgroup v2 directory and its parents.
    v2: Vec<std::fs::File>,
    /// `cpu.cfs_quota_us` and `cpu.cfs_period_us` of the v1 cpu cgroup
    /// directory and its parents.
    v1: Vec<(std::fs::File, Option<std::fs::File>)>,
}

impl LimitFiles {
    pub fn open() -> LimitFiles {
        let proc_cgroup = read(Path::new("/proc/self/cgroup")).unwrap_or_default();
        let mountinfo = read(Path::new("/proc/self/mountinfo")).unwrap_or_default();
        Self::open_from(&proc_cgroup, &mountinfo, Path::new("/"))
    }

    /// As [`detect_from`], for the files it would read.
    pub fn open_from(proc_cgroup: &str, mountinfo: &str, root: &Path) -> LimitFiles {
        let open = |path: PathBuf| std::fs::File::open(path).ok();
        let hierarchy = |dir: Option<PathBuf>, stop: Option<PathBuf>| match (dir, stop) {
            (Some(dir), Some(stop)) => dir_and_parents(&dir, &stop).into_iter().map(|d| under(root, &d)).collect(),
            _ => Vec::new(),
        };
        let v2 = hierarchy(v2_cgroup_dir(proc_cgroup, mountinfo), mount_point_of(mountinfo, "cgroup2", None));
        let v1 = hierarchy(v1_cpu_cgroup_dir(proc_cgroup, mountinfo), mount_point_of(mountinfo, "cgroup", Some("cpu")));
        LimitFiles {
            v2: v2.into_iter().filter_map(|d: PathBuf| open(d.join("cpu.max"))).collect(),
            v1: v1
                .into_iter()
                .filter_map(|d: PathBuf| Some((open(d.join("cpu.cfs_quota_us"))?, open(d.join("cpu.cfs_period_us")))))
                .collect(),
        }
    }

    /// The limit now; the same answer as [`detect`] without an override.
    pub fn read(&self) -> CpuLimit {
        let v2 = self.v2.iter().filter_map(|f| parse_cpu_max(&read_again(f)?)).reduce(f64::min);
        if let Some(cores) = v2 {
            return limit(Some(cores), "cgroup-v2");
        }
        let v1 = self
            .v1
            .iter()
            .filter_map(|(quota, period)| {
                parse_cfs(&read_again(quota)?, period.as_ref().and_then(read_again).as_deref())
            })
            .reduce(f64::min);
        match v1 {
            Some(cores) => limit(Some(cores), "cgroup-v1"),
            None => limit(None, "affinity"),
        }
    }
}

/// A small file's whole content, read from offset 0.
fn read_again(file: &std::fs::File) -> Option<String> {
    let mut buf = [0u8; 128];
    let n = std::os::unix::fs::FileExt::read_at(file, &mut buf, 0).ok()?;
    String::from_utf8(buf[..n].to_vec()).ok()
}

/// CPUs this process may run on.
pub fn affinity_count() -> usize {
    nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| (0..nix::sched::CpuSet::count()).filter(|&i| set.is_set(i).unwrap_or(false)).count())
        .ok()
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// The CPU limit of this process's container.
pub fn detect(override_cores: Option<f64>) -> CpuLimit {
    if let Some(cores) = override_cores {
        return limit(Some(cores), "override");
    }
    let proc_cgroup = read(Path::new("/proc/self/cgroup")).unwrap_or_default();
    let mountinfo = read(Path::new("/proc/self/mountinfo")).unwrap_or_default();
    detect_from(&proc_cgroup, &mountinfo, Path::new("/"))
        // No quota: `cores` stays empty (the wire contract's "unlimited") and
        // the policy uses the CPUs this process may run on.
        .unwrap_or_else(|| limit(None, "affinity"))
}

fn limit(cores: Option<f64>, source: &str) -> CpuLimit {
    CpuLimit { cores, source: source.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kill_counts_of_v1_and_v2() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(v2), Some(2));
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 7\n";
        assert_eq!(parse_oom_kills(v1), Some(7));
        // Kernels before 4.13 have no count on v1.
        assert_eq!(parse_oom_kills("oom_kill_disable 0\nunder_oom 0\n"), None);
        assert_eq!(parse_oom_kills("oom_group_kill 4\n"), None);
    }

    #[test]
    fn cpu_max_values() {
        assert_eq!(parse_cpu_max("200000 100000\n"), Some(2.0));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000\n"), Some(1.5));
        assert_eq!(parse_cpu_max("50000 100000"), Some(0.5));
        assert_eq!(parse_cpu_max(""), None);
    }

    #[test]
    fn cfs_values() {
        assert_eq!(parse_cfs("-1\n", Some("100000\n")), None);
        assert_eq!(parse_cfs("300000\n", Some("100000\n")), Some(3.0));
        assert_eq!(parse_cfs("250000", None), Some(2.5));
        assert_eq!(parse_cfs("garbage", Some("100000")), None);
    }

    #[test]
    fn octal_escapes_in_mount_points() {
        assert_eq!(unescape_octal(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape_octal("/plain"), "/plain");
    }

    #[test]
    fn parents_stop_at_the_mount_point() {
        let dirs = dir_and_parents(Path::new("/sys/fs/cgroup/a/b"), Path::new("/sys/fs/cgroup"));
        assert_eq!(
            dirs,
            vec![
                PathBuf::from("/sys/fs/cgroup/a/b"),
                PathBuf::from("/sys/fs/cgroup/a"),
                PathBuf::from("/sys/fs/cgroup")
            ]
        );
    }
}
