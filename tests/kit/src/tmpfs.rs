//! A small tmpfs mounted over a directory (root only): a filesystem that fills up.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::is_root;

/// A mounted tmpfs, unmounted on drop.
pub struct TmpfsMount {
    /// The mount point.
    pub path: PathBuf,
}

impl TmpfsMount {
    /// Mount a tmpfs of `size_mb` MiB on `path` (created if missing).
    pub fn mount(path: &Path, size_mb: u64) -> Result<TmpfsMount> {
        if !is_root() {
            bail!("mounting a small filesystem needs root");
        }
        std::fs::create_dir_all(path)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(path)
            .output()
            .context("mount")?;
        if !out.status.success() {
            bail!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(TmpfsMount {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
