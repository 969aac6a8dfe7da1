//! Named snapshots (seed 003) on disk: a directory per snapshot,
//! `<state>/snapshots/<sid>/`, holding what it takes to bring a sandbox
//! back to that point: a VM's disk overlay (`disk.qcow2`, copied) and its
//! memory chain (`snap/`: layers hard-linked, since they never change once
//! written, plus the manifest, hashes and device state), or a container's
//! writable layer (`upper/`, copied with ownership). Owns those
//! directories and the staging that makes both directions crash-safe:
//!
//! - taking: built in `<sid>@<sandbox id>.tmp` (the sandbox named so that
//!   its destroy can find it) and renamed when complete (after a final
//!   fsync), so a crash never leaves a half-written snapshot under its real
//!   name; [`sweep`] discards every staging directory at daemon start,
//!   after killing any copy a killed daemon left running into one;
//! - loading (rollback, fork): the new state is staged in the sandbox's
//!   `load.tmp/`, renamed to `load/` once complete (the commit point), then
//!   moved over the old state entry by entry; [`finish_load`], run before
//!   every start, completes a committed load and discards an uncommitted
//!   one, so a crash leaves either the old state or the new, never half.
//!
//! The backends decide what goes in.

use std::path::{Path, PathBuf};

use crate::error::{Result, RuntimeError};

/// `cp -a --reflink=auto src dest` (ownership, modes, links, sparse).
pub async fn copy_tree(src: &Path, dest: &Path) -> Result<()> {
    let mut cmd = tokio::process::Command::new("cp");
    cmd.args(["-a", "--reflink=auto", "--sparse=always"])
        .arg(src)
        .arg(dest);
    crate::tool::run(&mut cmd, "cp", std::time::Duration::from_secs(600)).await
}

/// Copy the files of `src` into `dest` (created), hard-linking those for
/// which `link` says so.
pub fn link_or_copy_dir(src: &Path, dest: &Path, link: impl Fn(&str) -> bool) -> Result<()> {
    std::fs::create_dir_all(dest).map_err(|e| RuntimeError::io("mkdir", dest, e))?;
    let rd = std::fs::read_dir(src).map_err(|e| RuntimeError::io("list", src, e))?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.ends_with(".tmp") || name == "STOPPED" {
            continue;
        }
        let to = dest.join(&name);
        let _ = std::fs::remove_file(&to);
        let r = if link(&name) {
            std::fs::hard_link(e.path(), &to).or_else(|_| std::fs::copy(e.path(), &to).map(|_| ()))
        } else {
            std::fs::copy(e.path(), &to).map(|_| ())
        };
        r.map_err(|err| RuntimeError::io("copy", &to, err))?;
    }
    Ok(())
}

/// Whether a memory-chain file never changes once written (a layer or a
/// device state), so it can be shared by hard link.
pub fn immutable(name: &str) -> bool {
    name.starts_with("mem.") || name.starts_with("state.")
}

/// Bytes under `p` (allocated, like `du`).
pub fn disk_usage(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if m.is_dir() {
        std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| disk_usage(&e.path())).sum())
            .unwrap_or(0)
    } else {
        m.blocks() * 512
    }
}

/// Suffix of every staging directory.
const STAGING_SUFFIX: &str = ".tmp";

/// The temporary name a snapshot of `sandbox` is built under.
pub fn staging(dest: &Path, sandbox: &str) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    dest.with_file_name(format!("{name}@{sandbox}{STAGING_SUFFIX}"))
}

/// fsync everything under `p` (`sync -f`: the whole filesystem's dirty
/// data, which includes the tree).
fn sync_tree(p: &Path) -> Result<()> {
    let out = std::process::Command::new("sync")
        .arg("-f")
        .arg(p)
        .status()
        .map_err(|e| RuntimeError::io("sync", p, e))?;
    if !out.success() {
        return Err(RuntimeError::Setup(format!("sync {} failed", p.display())));
    }
    Ok(())
}

/// Make a staged snapshot final: fsync its files, rename.
pub fn publish(tmp: &Path, dest: &Path) -> Result<()> {
    sync_tree(tmp)?;
    std::fs::rename(tmp, dest).map_err(|e| RuntimeError::io("rename", dest, e))?;
    if let Some(parent) = dest.parent() {
        sync_dir(parent);
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Whether a directory entry of `snapshots/` is a staging directory.
fn is_staging(name: &str) -> bool {
    name.ends_with(STAGING_SUFFIX)
}

/// Staging directories of `sandbox`'s snapshots (for its destroy).
pub fn staging_of(snapshots: &Path, sandbox: &str) -> Vec<PathBuf> {
    let suffix = format!("@{sandbox}{STAGING_SUFFIX}");
    std::fs::read_dir(snapshots)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(&suffix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// The sandbox a staging directory name belongs to.
pub fn staging_sandbox(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(STAGING_SUFFIX)?;
    Some(stem.split_once('@')?.1.to_string())
}

/// Remove staging directories, killing first any copy still writing into
/// them (a `cp` a killed daemon left running: it would go on filling the
/// disk, or recreate what is being removed).
pub fn discard(dirs: &[PathBuf]) -> Result<()> {
    let dirs: Vec<PathBuf> = dirs
        .iter()
        .filter(|d| std::fs::symlink_metadata(d).is_ok())
        .cloned()
        .collect();
    if dirs.is_empty() {
        return Ok(());
    }
    kill_writers(&dirs);
    for d in &dirs {
        let r = match std::fs::symlink_metadata(d) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(d),
            Ok(_) => std::fs::remove_file(d),
            Err(_) => Ok(()),
        };
        r.map_err(|e| RuntimeError::io("remove", d, e))?;
    }
    Ok(())
}

/// At daemon start: every staging directory under `snapshots` (returned,
/// so the caller can tell which sandboxes were being snapshotted) is
/// discarded, and so is every snapshot directory `known` does not own (a
/// crash between the rename and the database insert).
pub fn sweep(snapshots: &Path, known: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let Ok(rd) = std::fs::read_dir(snapshots) else {
        return Ok(vec![]);
    };
    let (mut staged, mut orphans) = (vec![], vec![]);
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if is_staging(&name) {
            staged.push(e.path());
        } else if !known(&name) {
            orphans.push(e.path());
        }
    }
    discard(&staged)?;
    discard(&orphans)?;
    Ok(staged)
}

/// SIGKILL the daemon's own (uid 0) `cp` processes whose arguments name a
/// path under one of `dirs`, and wait (bounded) until they are gone. A
/// sandbox's processes never run as uid 0 on the host, so no argument
/// they choose can make the daemon signal them.
fn kill_writers(dirs: &[PathBuf]) {
    use std::os::unix::fs::MetadataExt;
    let prefixes: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    let mut killed = vec![];
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if std::fs::metadata(e.path()).map(|m| m.uid()).unwrap_or(1) != 0 {
            continue;
        }
        let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
        if exe.file_name().and_then(|n| n.to_str()) != Some("cp") {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let names_staging = cmd.split(|b| *b == 0).any(|arg| {
            let arg = String::from_utf8_lossy(arg);
            prefixes.iter().any(|p| arg.starts_with(p.as_str()))
        });
        if names_staging {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::Kill);
                killed.push(pid);
            }
        }
    }
    for pid in killed {
        for _ in 0..500 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let gone = stat.is_empty()
                || stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'));
            if gone {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// Where a load is staged in a sandbox directory, and where it is once
/// committed.
pub fn load_staging(dir: &Path) -> PathBuf {
    dir.join("load.tmp")
}

fn load_ready(dir: &Path) -> PathBuf {
    dir.join("load")
}

/// Commit a load staged in [`load_staging`]: fsync it, then rename it to
/// `load/`. From here on the load happens even across a crash.
pub fn commit_load(dir: &Path) -> Result<()> {
    let tmp = load_staging(dir);
    sync_tree(&tmp)?;
    let ready = load_ready(dir);
    std::fs::rename(&tmp, &ready).map_err(|e| RuntimeError::io("rename", &ready, e))?;
    sync_dir(dir);
    Ok(())
}

/// Complete a committed load (move every entry of `load/` over the
/// sandbox's own, then remove `load/`) and discard an uncommitted one.
/// Idempotent: after a crash in the middle it finishes what is left.
/// Returns whether a load was completed.
pub fn finish_load(dir: &Path) -> Result<bool> {
    discard(&[load_staging(dir)])?;
    let ready = load_ready(dir);
    let Ok(rd) = std::fs::read_dir(&ready) else {
        return Ok(false);
    };
    for e in rd.flatten() {
        let target = dir.join(e.file_name());
        match std::fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&target),
            Ok(_) => std::fs::remove_file(&target),
            Err(_) => Ok(()),
        }
        .map_err(|err| RuntimeError::io("remove", &target, err))?;
        std::fs::rename(e.path(), &target)
            .map_err(|err| RuntimeError::io("rename", &target, err))?;
    }
    sync_dir(dir);
    std::fs::remove_dir(&ready).map_err(|e| RuntimeError::io("remove", &ready, e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_immutable_files_and_copies_the_rest() {
        let t = tempfile::tempdir().unwrap();
        let (src, dest) = (t.path().join("a"), t.path().join("b"));
        std::fs::create_dir(&src).unwrap();
        for f in ["mem.0", "state.0", "manifest.json", "x.tmp"] {
            std::fs::write(src.join(f), f).unwrap();
        }
        link_or_copy_dir(&src, &dest, immutable).unwrap();
        use std::os::unix::fs::MetadataExt;
        let ino = |p: PathBuf| std::fs::metadata(p).unwrap().ino();
        assert_eq!(ino(src.join("mem.0")), ino(dest.join("mem.0")));
        assert_ne!(
            ino(src.join("manifest.json")),
            ino(dest.join("manifest.json"))
        );
        assert!(!dest.join("x.tmp").exists());
        assert!(disk_usage(&dest) > 0);
    }

    #[test]
    fn staging_names_its_sandbox_and_is_swept() {
        let t = tempfile::tempdir().unwrap();
        let snaps = t.path();
        let tmp = staging(&snaps.join("snap_a"), "sb_x");
        assert_eq!(staging_sandbox(&tmp).as_deref(), Some("sb_x"));
        std::fs::create_dir_all(tmp.join("upper")).unwrap();
        std::fs::create_dir_all(snaps.join("snap_known")).unwrap();
        std::fs::create_dir_all(snaps.join("snap_orphan")).unwrap();
        assert_eq!(staging_of(snaps, "sb_x"), vec![tmp.clone()]);
        assert!(staging_of(snaps, "sb_y").is_empty());
        let swept = sweep(snaps, |n| n == "snap_known").unwrap();
        assert_eq!(swept, vec![tmp.clone()]);
        assert!(!tmp.exists() && !snaps.join("snap_orphan").exists());
        assert!(snaps.join("snap_known").exists());
    }

    /// A crash before the commit leaves the old state; after it, the new
    /// one, even when it struck in the middle of the move.
    #[test]
    fn a_load_is_all_or_nothing() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        std::fs::create_dir_all(dir.join("upper")).unwrap();
        std::fs::write(dir.join("upper/f"), "old").unwrap();
        std::fs::write(dir.join("disk"), "old").unwrap();
        // Staged, not committed: discarded.
        std::fs::create_dir_all(load_staging(dir).join("upper")).unwrap();
        std::fs::write(load_staging(dir).join("upper/f"), "new").unwrap();
        assert!(!finish_load(dir).unwrap());
        assert!(!load_staging(dir).exists());
        assert_eq!(std::fs::read_to_string(dir.join("upper/f")).unwrap(), "old");
        // Committed, then half moved (the disk went, the layer did not).
        std::fs::create_dir_all(load_staging(dir).join("upper")).unwrap();
        std::fs::write(load_staging(dir).join("upper/f"), "new").unwrap();
        std::fs::write(load_staging(dir).join("disk"), "new").unwrap();
        commit_load(dir).unwrap();
        std::fs::rename(dir.join("load/disk"), dir.join("disk")).unwrap();
        assert!(finish_load(dir).unwrap());
        assert_eq!(std::fs::read_to_string(dir.join("upper/f")).unwrap(), "new");
        assert_eq!(std::fs::read_to_string(dir.join("disk")).unwrap(), "new");
        assert!(!dir.join("load").exists());
        assert!(!finish_load(dir).unwrap());
    }
}
