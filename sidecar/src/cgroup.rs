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
    let entry = parse_proc_cgroup(proc_cgroup).into_iter().find(|e| e.controllers.iter().any(|c| c == "cpu"))?;
    let mount = parse_mountinfo(mountinfo)
        .into_iter()
        .find(|m| m.fs_type == "cgroup" && m.super_options.iter().any(|o| o == "cpu"))?;
    Some(join_cgroup_path(&mount, &entry.path))
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
