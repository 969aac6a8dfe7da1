//! Named snapshots (seed 003) on disk: a directory per snapshot,
//! `<state>/snapshots/<sid>/`, holding what it takes to bring a sandbox
//! back to that point: a VM's disk overlay (`disk.qcow2`, copied) and its
//! memory chain (`snap/`: layers hard-linked, since they never change once
//! written, plus the manifest, hashes and device state), or a container's
//! writable layer (`upper/`, copied with ownership). Written to
//! `<sid>.tmp` and renamed when complete (with a final fsync), so a crash
//! never leaves a half-written snapshot under its real name. Owns those
//! directories; the backends decide what goes in.

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

/// The temporary name a snapshot is built under.
pub fn staging(dest: &Path) -> PathBuf {
    dest.with_extension("tmp")
}

/// Make a staged snapshot final: fsync its files, rename.
pub fn publish(dest: &Path) -> Result<()> {
    let tmp = staging(dest);
    let out = std::process::Command::new("sync")
        .arg("-f")
        .arg(&tmp)
        .status()
        .map_err(|e| RuntimeError::io("sync", &tmp, e))?;
    if !out.success() {
        return Err(RuntimeError::Setup(format!(
            "sync {} failed",
            tmp.display()
        )));
    }
    std::fs::rename(&tmp, dest).map_err(|e| RuntimeError::io("rename", dest, e))
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
}
