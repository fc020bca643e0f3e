//! The drain preload ([`SOURCE`], `drain.js`) that node-mode workers load
//! through `NODE_OPTIONS`: once clusterd asks a worker to disconnect, its
//! responses say `Connection: close`, so kept-alive connections close after
//! their in-flight request instead of being cut by the SIGTERM that follows.

use std::io;
use std::path::{Path, PathBuf};

/// The script, as clusterd writes it.
pub const SOURCE: &str = include_str!("drain.js");
/// Its file name beside clusterd's executable (`--install-to` puts it there).
pub const FILE_NAME: &str = "clusterd-node-drain.cjs";

/// The preload file for this run; a directory clusterd created for it is
/// removed on drop.
#[derive(Debug)]
pub struct Preload {
    path: PathBuf,
    own_dir: Option<PathBuf>,
}

impl Preload {
    /// Uses the copy beside clusterd's executable when it is this version's,
    /// else writes one into a private directory under the temp dir.
    pub fn install() -> io::Result<Preload> {
        let beside = std::env::current_exe()?.with_file_name(FILE_NAME);
        if std::fs::read_to_string(&beside).is_ok_and(|s| s == SOURCE) {
            return Preload::checked(beside, None);
        }
        let dir = std::env::temp_dir().join(format!("clusterd-{}-{}", std::process::id(), nonce()));
        // 0700 and created new: nobody else can have put a script there.
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700).create(&dir)?;
        let path = dir.join(FILE_NAME);
        let written = std::fs::write(&path, SOURCE);
        let preload = Preload::checked(path, Some(dir));
        written.and(preload)
    }

    fn checked(path: PathBuf, own_dir: Option<PathBuf>) -> io::Result<Preload> {
        let preload = Preload { path, own_dir };
        // NODE_OPTIONS is split at spaces; quoting is not worth it for a path we choose.
        let plain = preload.path.to_str().is_some_and(|p| !p.contains(|c: char| c.is_whitespace() || c == '"'));
        if plain {
            Ok(preload)
        } else {
            Err(io::Error::other(format!("{} cannot go into NODE_OPTIONS", preload.path.display())))
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A worker's `NODE_OPTIONS`: the user's (`existing`), then the preload.
    pub fn node_options(&self, existing: Option<&str>) -> String {
        node_options(existing, &self.path)
    }
}

impl Drop for Preload {
    fn drop(&mut self) {
        if let Some(dir) = &self.own_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Writes the preload beside an installed clusterd (`--install-to`), where
/// [`Preload::install`] finds it without writing anything at run time.
pub fn install_beside(binary: &Path) -> io::Result<()> {
    std::fs::write(binary.with_file_name(FILE_NAME), SOURCE)
}

fn node_options(existing: Option<&str>, path: &Path) -> String {
    let ours = format!("--require={}", path.display());
    match existing.map(str::trim).filter(|e| !e.is_empty()) {
        Some(existing) => format!("{existing} {ours}"),
        None => ours,
    }
}

/// Distinguishes directories of clusterds that reused a pid.
fn nonce() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preload_follows_the_users_node_options() {
        let path = Path::new("/clustered/bin/clusterd-node-drain.cjs");
        assert_eq!(node_options(None, path), "--require=/clustered/bin/clusterd-node-drain.cjs");
        assert_eq!(node_options(Some("  "), path), "--require=/clustered/bin/clusterd-node-drain.cjs");
        assert_eq!(
            node_options(Some("--max-old-space-size=200"), path),
            "--max-old-space-size=200 --require=/clustered/bin/clusterd-node-drain.cjs"
        );
    }

    #[test]
    fn installed_in_a_private_directory_removed_on_drop() {
        let preload = Preload::install().expect("temp dir writable");
        assert_eq!(std::fs::read_to_string(preload.path()).expect("written"), SOURCE);
        let dir = preload.own_dir.clone().expect("not beside the test binary");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&dir).expect("dir").permissions().mode() & 0o777, 0o700);
        drop(preload);
        assert!(!dir.exists());
    }
}
