//! The container's root filesystem: an overlay of the template (read-only,
//! shared by every sandbox) and a per-sandbox upper directory. Owns mounting
//! and unmounting it; must not touch the template itself.

use std::path::Path;

use rustix::mount::{mount, unmount, MountFlags, UnmountFlags};

use crate::error::{Result, RuntimeError};

/// Mount `lower` + `upper`/`work` as an overlay on `target`.
pub fn mount_overlay(lower: &Path, upper: &Path, work: &Path, target: &Path) -> Result<()> {
    for p in [lower, upper, work, target] {
        let s = p.to_string_lossy();
        if s.contains(',') || s.contains(':') {
            return Err(RuntimeError::Setup(format!(
                "overlay path {s} contains ',' or ':'"
            )));
        }
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount(
        "overlay",
        target,
        "overlay",
        MountFlags::NOSUID | MountFlags::NODEV,
        data.as_str(),
    )
    .map_err(|e| RuntimeError::io("mount overlay", target, e.into()))
}

/// Mount points at or below `dir` (from /proc/self/mountinfo).
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return vec![];
    };
    let base = dir.to_string_lossy().to_string();
    let prefix = format!("{base}/");
    info.lines()
        .filter_map(|l| l.split(' ').nth(4).map(unescape))
        .filter(|mp| *mp == base || mp.starts_with(&prefix))
        .collect()
}

/// Whether `path` is a mount point (its device differs from its parent's, or
/// it is listed as one). Used to make unmounting idempotent.
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|mp| unescape(mp) == want))
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Detach-unmount `path` while it is a mount point (idempotent).
pub fn unmount_all(path: &Path) -> Result<()> {
    for _ in 0..8 {
        if !is_mount_point(path) {
            return Ok(());
        }
        unmount(path, UnmountFlags::DETACH)
            .map_err(|e| RuntimeError::io("unmount", path, e.into()))?;
    }
    Ok(())
}

/// Remove a sandbox directory, refusing while anything is still mounted at
/// or below it: recursing into a staged host mount would delete the host's
/// files. Idempotent.
pub fn remove_sandbox_dir(dir: &Path) -> Result<()> {
    let still = mounts_under(dir);
    if !still.is_empty() {
        return Err(RuntimeError::Setup(format!(
            "refusing to delete {}: still mounted: {still:?}",
            dir.display()
        )));
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| RuntimeError::io("remove", dir, e))?;
    }
    Ok(())
}
