//! CPU limit detection against recorded /proc/self/cgroup + mountinfo
//! layouts, with fake cgroup trees on disk for the limit files.

use std::path::{Path, PathBuf};

use clusterd::cgroup::{LimitFiles, detect_from, parse_cfs, parse_cpu_max, v1_cpu_cgroup_dir, v2_cgroup_dir};

fn fixture(layout: &str) -> (String, String) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(layout);
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).expect("fixture");
    (read("cgroup"), read("mountinfo"))
}

/// A scratch directory standing in for `/`.
struct FakeRoot(PathBuf);

impl FakeRoot {
    fn new(name: &str) -> FakeRoot {
        let dir = std::env::temp_dir().join(format!("clusterd-fixture-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("fake root");
        FakeRoot(dir)
    }

    fn write(&self, path: &str, content: &str) {
        let path = self.0.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, content).expect("write");
    }
}

impl Drop for FakeRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn v1_in_runc_container_strips_the_mount_root() {
    let (cgroup, mountinfo) = fixture("v1-runc");
    // /proc/self/cgroup shows the host path, but that path is the mount's root.
    assert_eq!(v1_cpu_cgroup_dir(&cgroup, &mountinfo), Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")));
    let root = FakeRoot::new("v1-runc");
    root.write("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "250000\n");
    root.write("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n");
    let limit = detect_from(&cgroup, &mountinfo, &root.0).expect("limit");
    assert_eq!(limit.cores, Some(2.5));
    assert_eq!(limit.source, "cgroup-v1");
}

#[test]
fn v1_on_host_joins_the_path_and_takes_the_tightest_ancestor() {
    let (cgroup, mountinfo) = fixture("v1-host");
    assert_eq!(v1_cpu_cgroup_dir(&cgroup, &mountinfo), Some(PathBuf::from("/sys/fs/cgroup/cpu/clustered-test-1234")));
    let root = FakeRoot::new("v1-host");
    root.write("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1\n");
    root.write("/sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n");
    root.write("/sys/fs/cgroup/cpu/clustered-test-1234/cpu.cfs_quota_us", "300000\n");
    root.write("/sys/fs/cgroup/cpu/clustered-test-1234/cpu.cfs_period_us", "100000\n");
    assert_eq!(detect_from(&cgroup, &mountinfo, &root.0).and_then(|l| l.cores), Some(3.0));
    // The unified (v2) mount of a hybrid host has no cpu.max: v1 decides.
    root.write("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "150000\n");
    assert_eq!(detect_from(&cgroup, &mountinfo, &root.0).and_then(|l| l.cores), Some(1.5));
}

#[test]
fn v1_without_quota_is_no_limit() {
    let (cgroup, mountinfo) = fixture("v1-host");
    let root = FakeRoot::new("v1-unlimited");
    root.write("/sys/fs/cgroup/cpu/clustered-test-1234/cpu.cfs_quota_us", "-1\n");
    root.write("/sys/fs/cgroup/cpu/clustered-test-1234/cpu.cfs_period_us", "100000\n");
    assert_eq!(detect_from(&cgroup, &mountinfo, &root.0), None);
}

#[test]
fn v2_nested_path_and_parent_limits() {
    let (cgroup, mountinfo) = fixture("v2-nested");
    let leaf =
        "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7.slice/cri-containerd-abc.scope";
    assert_eq!(v2_cgroup_dir(&cgroup, &mountinfo), Some(PathBuf::from(leaf)));
    let root = FakeRoot::new("v2-nested");
    root.write(&format!("{leaf}/cpu.max"), "max 100000\n");
    root.write(
        "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7.slice/cpu.max",
        "200000 100000\n",
    );
    let limit = detect_from(&cgroup, &mountinfo, &root.0).expect("limit");
    assert_eq!(limit.cores, Some(2.0));
    assert_eq!(limit.source, "cgroup-v2");
}

#[test]
fn v2_container_sees_its_cgroup_as_root() {
    let (cgroup, mountinfo) = fixture("v2-container-root");
    assert_eq!(v2_cgroup_dir(&cgroup, &mountinfo), Some(PathBuf::from("/sys/fs/cgroup")));
    let root = FakeRoot::new("v2-root");
    // Missing period: the kernel default of 100000 applies.
    root.write("/sys/fs/cgroup/cpu.max", "150000\n");
    assert_eq!(detect_from(&cgroup, &mountinfo, &root.0).and_then(|l| l.cores), Some(1.5));
    root.write("/sys/fs/cgroup/cpu.max", "max 100000\n");
    assert_eq!(detect_from(&cgroup, &mountinfo, &root.0), None);
}

#[test]
fn hybrid_docker_layout_uses_v1_cpu_controller() {
    let (cgroup, mountinfo) = fixture("hybrid");
    assert_eq!(v2_cgroup_dir(&cgroup, &mountinfo), Some(PathBuf::from("/sys/fs/cgroup/unified")));
    assert_eq!(v1_cpu_cgroup_dir(&cgroup, &mountinfo), Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")));
    let root = FakeRoot::new("hybrid");
    root.write("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "100000\n");
    root.write("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "50000\n");
    let limit = detect_from(&cgroup, &mountinfo, &root.0).expect("limit");
    assert_eq!((limit.cores, limit.source.as_str()), (Some(2.0), "cgroup-v1"));
}

#[test]
fn limit_file_parsers() {
    assert_eq!(parse_cpu_max("max\n"), None);
    assert_eq!(parse_cpu_max("100000 100000\n"), Some(1.0));
    assert_eq!(parse_cfs("-1", Some("100000")), None);
    assert_eq!(parse_cfs("0", Some("100000")), None);
    assert_eq!(parse_cfs("50000", Some("100000")), Some(0.5));
}

/// The files opened once give what a full detection gives, in every
/// layout, and see each change the kubelet makes on the next read.
#[test]
fn opened_limit_files_follow_the_quota_as_detection_does() {
    // (layout, the files and their content, one file rewritten by a resize)
    type File<'a> = (&'a str, &'a str);
    let cases: [(&str, &[File], File); 4] = [
        (
            "v1-host",
            &[
                ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1\n"),
                ("/sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n"),
                ("/sys/fs/cgroup/cpu/clustered-test-1234/cpu.cfs_quota_us", "300000\n"),
                ("/sys/fs/cgroup/cpu/clustered-test-1234/cpu.cfs_period_us", "100000\n"),
            ],
            ("/sys/fs/cgroup/cpu/clustered-test-1234/cpu.cfs_quota_us", "150000\n"),
        ),
        (
            "v2-nested",
            &[
                (
                    "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7.slice/cri-containerd-abc.scope/cpu.max",
                    "max 100000\n",
                ),
                (
                    "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7.slice/cpu.max",
                    "200000 100000\n",
                ),
            ],
            (
                "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7.slice/cpu.max",
                "300000 100000\n",
            ),
        ),
        ("v2-container-root", &[("/sys/fs/cgroup/cpu.max", "150000\n")], ("/sys/fs/cgroup/cpu.max", "max 100000\n")),
        (
            "hybrid",
            &[
                ("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "100000\n"),
                ("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "50000\n"),
            ],
            ("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n"),
        ),
    ];
    for (layout, files, resize) in cases {
        let (cgroup, mountinfo) = fixture(layout);
        let root = FakeRoot::new(&format!("opened-{layout}"));
        for (path, content) in files {
            root.write(path, content);
        }
        let detected = || detect_from(&cgroup, &mountinfo, &root.0).map(|l| (l.cores, l.source));
        let opened = LimitFiles::open_from(&cgroup, &mountinfo, &root.0);
        let read = || Some(opened.read()).filter(|l| l.cores.is_some()).map(|l| (l.cores, l.source));
        assert!(detected().is_some(), "{layout}: a limit to start with");
        assert_eq!(read(), detected(), "{layout}");
        // The kubelet rewrites the file in place (same inode).
        root.write(resize.0, resize.1);
        assert_eq!(read(), detected(), "{layout} after the resize");
    }
}
