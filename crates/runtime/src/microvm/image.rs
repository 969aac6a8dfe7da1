//! The microVM root image of a template made through the API (issue 12):
//! `<template>/rootfs.ext4`, derived from the template's `rootfs/` the
//! first time a microVM needs it, then cached for every later VM (each
//! boots a qcow2 overlay over it). Built-in templates get theirs from
//! `scripts/build-guest.sh` and are never derived here.
//!
//! Owns: the image file, its lock `<template>/.rootfs.ext4.lock` (a
//! `flock`, held for a whole derivation and by a removal of the template,
//! so a template is never deleted or rebuilt under a derivation), its
//! temporary files `<template>/.rootfs.ext4.tmp-<rand>`, and the
//! process-wide table of derivations in flight (two creates that need the
//! same image share one derivation and both wait for it).
//!
//! How: the template's tree is owned by host uid/gid `uid_shift + n` (root
//! inside a container is 100000). It is cloned as a *detached* mount
//! (`open_tree(OPEN_TREE_CLONE)`, attached nowhere, gone with its last
//! descriptor, so a crash leaves no mount behind) made id-mapped, read-only,
//! nosuid and nodev with a user namespace that maps host `uid_shift + n` to
//! `n`; `mkfs.ext4 -d .` then runs with that mount as its working
//! directory. The image gets the ownership the guest needs (root = 0)
//! without copying or chowning anything: modes, setuid/setgid bits and
//! hard links are the tree's, and a `security.capability` whose root id
//! is `uid_shift` (a file capability that works in the container) reads
//! back, through the mapping, as a plain one that works in the guest. An
//! id below the shift (not from a pull) shows as the overflow id (65534). Size: as
//! `scripts/build-guest.sh` (1.4 times what the tree allocates, at least
//! 512 MiB more), with inodes enough for the tree. A `/.sandforge`
//! directory (where the guest's init mounts the agent) is put in the image
//! with `debugfs` when the tree has none (a non-directory there is
//! replaced).
//!
//! Must not: follow a symlink of the tree (it comes from a hostile image:
//! `mkfs.ext4 -d` only `lstat`s and `readlink`s, and the walk that sizes
//! the image does too); write the template's tree; derive from a template
//! that is not complete (`template.json` is checked under the lock: a
//! template being rebuilt or deleted has none); leave a half image
//! (temporary file, `fsync`, rename; a temporary file found under the lock
//! is a crashed derivation's and is removed); decide what a create does
//! while a derivation runs (the caller says how long it waits).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags};
use rustix::mount::{open_tree, OpenTreeFlags};
use tokio::sync::watch;

use crate::container::idmap::{
    setattr, userns_fd_map, MountAttr, MOUNT_ATTR_IDMAP, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID,
    MOUNT_ATTR_RDONLY,
};
use crate::error::{Result, RuntimeError};
use crate::template::{Template, OWN_PREFIX};

const LOCK: &str = ".rootfs.ext4.lock";
const TMP_PREFIX: &str = ".rootfs.ext4.tmp-";
/// How long `mkfs.ext4` may take: it copies every byte of the tree (about
/// a minute for 10 GB on a disk that writes 200 MB/s).
const MKFS_LIMIT: Duration = Duration::from_secs(3600);
const DEBUGFS_LIMIT: Duration = Duration::from_secs(60);
/// What an inode costs in the image besides its blocks.
const INODE_BYTES: u64 = 256;

/// What a derivation made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derived {
    /// Size of the image (sparse: it allocates about `tree_bytes`).
    pub image_bytes: u64,
    /// What the tree allocates.
    pub tree_bytes: u64,
    pub inodes: u64,
    pub took: Duration,
}

/// Whether the image is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    Ready,
    /// Still being derived after the caller's wait; it goes on.
    Pending,
}

/// Templates whose image is derived here: the API's own (`tmpl_...`).
pub fn derivable(t: &Template) -> bool {
    t.name.starts_with(OWN_PREFIX)
}

fn template_dir(t: &Template) -> Result<&Path> {
    t.rootfs
        .parent()
        .ok_or_else(|| RuntimeError::TemplateBroken {
            name: t.name.clone(),
            reason: "rootfs has no parent directory".into(),
        })
}

type Outcome = Option<std::result::Result<Derived, String>>;

/// Derivations in flight, by image path.
static INFLIGHT: LazyLock<Mutex<HashMap<PathBuf, watch::Receiver<Outcome>>>> =
    LazyLock::new(Default::default);

fn inflight() -> std::sync::MutexGuard<'static, HashMap<PathBuf, watch::Receiver<Outcome>>> {
    INFLIGHT.lock().unwrap_or_else(|p| p.into_inner())
}

/// Make sure the microVM image of `t` exists: at once when it does, else
/// derive it (or join the derivation already running) and wait at most
/// `wait` for it. The derivation runs on in the background after the wait;
/// `on_done` is called once with its outcome, by the caller that started it.
pub async fn ensure<F>(t: &Template, wait: Duration, on_done: F) -> Result<Ensured>
where
    F: FnOnce(std::result::Result<&Derived, &str>) + Send + 'static,
{
    let image = super::base_image(t);
    if image.is_file() {
        return Ok(Ensured::Ready);
    }
    if !derivable(t) {
        return Err(RuntimeError::TemplateBroken {
            name: t.name.clone(),
            reason: format!(
                "no VM image {} (run scripts/build-guest.sh {})",
                image.display(),
                t.name
            ),
        });
    }
    let mut rx = {
        let mut table = inflight();
        match table.get(&image) {
            Some(rx) => rx.clone(),
            None => {
                let (tx, rx) = watch::channel(None);
                table.insert(image.clone(), rx.clone());
                let (t, image) = (t.clone(), image.clone());
                tokio::spawn(async move {
                    // Out of the table however the task ends: whoever comes
                    // next finds the image, or starts again after a failure.
                    let _out = Leave(image);
                    let r = derive(&t).await.map_err(|e| e.to_string());
                    match &r {
                        Ok(d) => tracing::info!(
                            template = %t.name,
                            image_mb = d.image_bytes >> 20,
                            tree_mb = d.tree_bytes >> 20,
                            inodes = d.inodes,
                            took_ms = d.took.as_millis() as u64,
                            "microVM image derived"
                        ),
                        Err(e) => tracing::warn!(template = %t.name, "microVM image: {e}"),
                    }
                    on_done(r.as_ref().map_err(String::as_str));
                    let _ = tx.send(Some(r));
                });
                rx
            }
        }
    };
    let outcome = match tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await {
        Err(_) => return Ok(Ensured::Pending),
        Ok(Err(_)) => Err("the derivation ended without an outcome".to_string()),
        Ok(Ok(v)) => v.clone().unwrap_or_else(|| Err("no outcome".into())),
    };
    outcome
        .map(|_| Ensured::Ready)
        .map_err(|reason| RuntimeError::TemplateBroken {
            name: t.name.clone(),
            reason: format!("deriving its microVM image: {reason}"),
        })
}

/// Removes a derivation from the table when dropped.
struct Leave(PathBuf);

impl Drop for Leave {
    fn drop(&mut self) {
        inflight().remove(&self.0);
    }
}

/// The image lock of a template directory, held while its files are
/// removed: `None` while a derivation holds it (the caller refuses).
pub fn try_hold(template_dir: &Path) -> Result<Option<ImageLock>> {
    let f = match open_lock(template_dir) {
        Ok(f) => f,
        Err(RuntimeError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Some(ImageLock(None)))
        }
        Err(e) => return Err(e),
    };
    match rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(ImageLock(Some(f)))),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(RuntimeError::io("flock", template_dir.join(LOCK), e.into())),
    }
}

/// Held until dropped.
#[derive(Debug)]
pub struct ImageLock(#[allow(dead_code)] Option<File>);

/// Remove what crashed derivations left in a template directory (a
/// derivation does it too, under the lock). Only when nothing derives.
pub fn remove_stale(template_dir: &Path) {
    if let Ok(Some(_held)) = try_hold(template_dir) {
        remove_temps(template_dir);
    }
}

fn remove_temps(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn open_lock(dir: &Path) -> Result<File> {
    let p = dir.join(LOCK);
    let fd = rustix::fs::open(
        &p,
        OFlags::CREATE | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| RuntimeError::io("open", &p, e.into()))?;
    Ok(File::from(fd))
}

/// What the tree allocates (like `du`: blocks, hard links once) and its
/// inodes, without following a symlink; iterative (a hostile tree may be
/// deep).
fn usage(root: &Path) -> std::io::Result<(u64, u64)> {
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p)?;
        if !md.is_dir() && md.nlink() > 1 && !seen.insert((md.dev(), md.ino())) {
            continue;
        }
        inodes += 1;
        bytes = bytes.saturating_add(md.blocks().saturating_mul(512));
        if md.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// The image size in MiB and its inode count, from what the tree uses.
fn geometry(tree_bytes: u64, inodes: u64) -> (u64, u64) {
    let used_mb = (tree_bytes + inodes * INODE_BYTES).div_ceil(1 << 20);
    let size_mb = (used_mb * 14 / 10).max(used_mb + 512);
    // mke2fs's default (one inode per 16 KiB), or the tree's and room.
    let n = ((size_mb << 20) / 16384).max(inodes + inodes / 2 + 16384);
    (size_mb, n)
}

/// The tree of `t` as a detached, read-only, id-mapped mount (host
/// `uid_shift + n` shows as `n`).
fn mapped_tree(t: &Template) -> Result<OwnedFd> {
    let dir = rustix::fs::open(
        &t.rootfs,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| RuntimeError::io("open", &t.rootfs, e.into()))?;
    let tree = open_tree(
        dir.as_fd(),
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(|e| RuntimeError::io("open_tree", &t.rootfs, e.into()))?;
    // Every id from the shift up (an image may use ids past a container's
    // 65536: the guest sees them as the image has them; and root can read
    // only files whose owner is mapped).
    let range = u32::MAX - t.uid_shift;
    let ns = userns_fd_map(&format!("{} 0 {range}\n", t.uid_shift))?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: ns.as_raw_fd() as u64,
    };
    setattr(&tree, &attr).map_err(|e| {
        RuntimeError::Setup(format!(
            "an id-mapped view of {} (the filesystem must support id-mapped mounts): {e}",
            t.rootfs.display()
        ))
    })?;
    Ok(tree)
}

/// What `/.sandforge` is in the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentDir {
    Directory,
    Absent,
    Other,
}

fn agent_dir(tree: &OwnedFd) -> Result<AgentDir> {
    match rustix::fs::statat(tree, ".sandforge", AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            Ok(AgentDir::Directory)
        }
        Ok(_) => Ok(AgentDir::Other),
        Err(rustix::io::Errno::NOENT) => Ok(AgentDir::Absent),
        Err(e) => Err(RuntimeError::io("stat", "/.sandforge", e.into())),
    }
}

struct Prepared {
    lock: File,
    tree: OwnedFd,
    tmp: PathBuf,
    tree_bytes: u64,
    inodes: u64,
    agent_dir: AgentDir,
}

/// Under the lock: nothing to do (the image appeared), or what mkfs needs.
fn prepare(t: &Template) -> Result<Option<Prepared>> {
    let dir = template_dir(t)?;
    let lock = open_lock(dir)?;
    rustix::fs::flock(&lock, FlockOperation::LockExclusive)
        .map_err(|e| RuntimeError::io("flock", dir.join(LOCK), e.into()))?;
    if super::base_image(t).is_file() {
        return Ok(None);
    }
    if !dir.join("template.json").is_file() {
        return Err(RuntimeError::TemplateNotFound(t.name.clone()));
    }
    remove_temps(dir);
    let (tree_bytes, inodes) =
        usage(&t.rootfs).map_err(|e| RuntimeError::io("walk", &t.rootfs, e))?;
    let tree = mapped_tree(t)?;
    let agent_dir = agent_dir(&tree)?;
    let tmp = dir.join(format!("{TMP_PREFIX}{:016x}", rand::random::<u64>()));
    Ok(Some(Prepared {
        lock,
        tree,
        tmp,
        tree_bytes,
        inodes,
        agent_dir,
    }))
}

/// Run a tool to completion with a limit; its stdout.
async fn output(cmd: &mut tokio::process::Command, tool: &str, limit: Duration) -> Result<String> {
    let err = |message: String| RuntimeError::Command {
        tool: tool.into(),
        message,
    };
    let out = tokio::time::timeout(
        limit,
        cmd.stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| err(format!("timed out after {limit:?}")))?
    .map_err(|e| err(e.to_string()))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() {
        return Err(err(stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

async fn debugfs(image: &Path, request: &str, write: bool) -> Result<String> {
    let mut cmd = tokio::process::Command::new("debugfs");
    if write {
        cmd.arg("-w");
    }
    cmd.arg("-R").arg(request).arg(image);
    output(&mut cmd, "debugfs", DEBUGFS_LIMIT).await
}

/// `mkfs.ext4 -d` from the mapped tree into `p.tmp`, then `/.sandforge`.
async fn build(p: &Prepared) -> Result<u64> {
    let (size_mb, inodes) = geometry(p.tree_bytes, p.inodes);
    let mut cmd = tokio::process::Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", "sandforge-root", "-E", "root_owner=0:0"])
        .arg("-N")
        .arg(inodes.to_string())
        .args(["-d", "."])
        .arg(&p.tmp)
        .arg(format!("{size_mb}M"));
    let tree = p.tree.as_raw_fd();
    // SAFETY: the hook runs in the forked child before exec and only calls
    // fchdir(2) (async-signal-safe) on a descriptor the parent keeps open
    // until the child has exited.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fchdir(tree) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    output(&mut cmd, "mkfs.ext4", MKFS_LIMIT).await?;
    if p.agent_dir != AgentDir::Directory {
        if p.agent_dir == AgentDir::Other {
            debugfs(&p.tmp, "rm /.sandforge", true).await?;
        }
        debugfs(&p.tmp, "mkdir /.sandforge", true).await?;
        // debugfs answers 0 whatever its request did: look.
        let st = debugfs(&p.tmp, "stat /.sandforge", false).await?;
        if !st.contains("Type: directory") {
            return Err(RuntimeError::Setup(format!(
                "could not make /.sandforge a directory in the image: {}",
                st.lines().next().unwrap_or("")
            )));
        }
    }
    Ok(size_mb << 20)
}

/// Derive the image of `t` (under its lock; the image may also have
/// appeared meanwhile).
pub async fn derive(t: &Template) -> Result<Derived> {
    let t0 = Instant::now();
    let tc = t.clone();
    let prepared = tokio::task::spawn_blocking(move || prepare(&tc))
        .await
        .map_err(|e| RuntimeError::Setup(format!("deriving the image: {e}")))??;
    let Some(p) = prepared else {
        let image_bytes = std::fs::metadata(super::base_image(t)).map_or(0, |m| m.len());
        return Ok(Derived {
            image_bytes,
            tree_bytes: 0,
            inodes: 0,
            took: t0.elapsed(),
        });
    };
    let built = build(&p).await;
    let image = super::base_image(t);
    let Prepared {
        lock,
        tree,
        tmp,
        tree_bytes,
        inodes,
        ..
    } = p;
    drop(tree);
    let finished = tokio::task::spawn_blocking(move || -> Result<u64> {
        let finish = || -> Result<u64> {
            let image_bytes = built?;
            let f = File::open(&tmp).map_err(|e| RuntimeError::io("open", &tmp, e))?;
            f.sync_all()
                .map_err(|e| RuntimeError::io("fsync", &tmp, e))?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o400))
                .map_err(|e| RuntimeError::io("chmod", &tmp, e))?;
            std::fs::rename(&tmp, &image).map_err(|e| RuntimeError::io("rename", &image, e))?;
            if let Some(dir) = image.parent() {
                let _ = File::open(dir).and_then(|d| d.sync_all());
            }
            Ok(image_bytes)
        };
        let r = finish();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        drop(lock);
        r
    })
    .await
    .map_err(|e| RuntimeError::Setup(format!("deriving the image: {e}")))?;
    Ok(Derived {
        image_bytes: finished?,
        tree_bytes,
        inodes,
        took: t0.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{chown, lchown, symlink};
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn sh(cmd: &mut Command) -> String {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{cmd:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// A hostile tree as a pull leaves it (shifted by 100000): a file
    /// capability of the container's root, a setuid file of uid 1000 and
    /// a hard link to it, a link to a host path, a file owned by host root,
    /// `.sandforge` as a file; plus a crashed derivation's temp. Two
    /// creates at once derive it once; the image has it all unshifted.
    #[tokio::test]
    async fn derives_an_unshifted_image_once() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root (id-mapped mounts, mkfs, loop mount)");
            return;
        }
        let work = std::env::temp_dir().join(format!("sf-vmimage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        let dir = work.join("tmpl_test");
        let root = dir.join("rootfs");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("bin/ping"), "ping").unwrap();
        // chown clears capabilities: the owner first.
        chown(root.join("bin/ping"), Some(100000), Some(100000)).unwrap();
        sh(Command::new("setcap")
            .args(["-n", "100000", "cap_net_raw+ep"])
            .arg(root.join("bin/ping")));
        std::fs::write(root.join("bin/suid"), "suid").unwrap();
        chown(root.join("bin/suid"), Some(101000), Some(101000)).unwrap();
        std::fs::set_permissions(
            root.join("bin/suid"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        std::fs::hard_link(root.join("bin/suid"), root.join("bin/suid2")).unwrap();
        symlink("/etc/shadow", root.join("etc/link")).unwrap();
        lchown(root.join("etc/link"), Some(100000), Some(100000)).unwrap();
        std::fs::write(root.join("etc/hostroot"), "x").unwrap();
        // An image's uid past the container's 65536, in a private file.
        std::fs::write(root.join("etc/big"), "x").unwrap();
        std::fs::set_permissions(root.join("etc/big"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        chown(root.join("etc/big"), Some(170000), Some(170000)).unwrap();
        std::fs::write(root.join(".sandforge"), "not a directory").unwrap();
        for p in ["", "bin", "etc", ".sandforge"] {
            chown(root.join(p), Some(100000), Some(100000)).unwrap();
        }
        std::fs::write(dir.join("template.json"), r#"{"uid_shift":100000}"#).unwrap();
        std::fs::write(dir.join(".rootfs.ext4.tmp-crashed"), "half").unwrap();
        let t = Template {
            name: "tmpl_test".into(),
            rootfs: root.clone(),
            uid_shift: 100000,
            shell: "/bin/sh".into(),
            env: vec![],
            workdir: None,
            user: None,
        };

        let done = Arc::new(AtomicUsize::new(0));
        let counter = |done: &Arc<AtomicUsize>| {
            let done = done.clone();
            move |r: std::result::Result<&Derived, &str>| {
                r.expect("derived");
                done.fetch_add(1, Ordering::SeqCst);
            }
        };
        let wait = Duration::from_secs(120);
        let (a, b) = tokio::join!(
            ensure(&t, wait, counter(&done)),
            ensure(&t, wait, counter(&done))
        );
        assert_eq!((a.unwrap(), b.unwrap()), (Ensured::Ready, Ensured::Ready));
        assert_eq!(done.load(Ordering::SeqCst), 1, "one derivation");
        let image = dir.join("rootfs.ext4");
        let md = std::fs::metadata(&image).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o400);
        assert!(md.len() >= 512 << 20);
        assert!(
            !dir.join(".rootfs.ext4.tmp-crashed").exists(),
            "stale temp removed"
        );
        assert_eq!(
            ensure(&t, wait, counter(&done)).await.unwrap(),
            Ensured::Ready
        );
        assert_eq!(done.load(Ordering::SeqCst), 1, "cached");
        // The tree is untouched.
        assert_eq!(
            std::fs::metadata(root.join("bin/suid")).unwrap().uid(),
            101000
        );

        let mnt = work.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        sh(Command::new("mount")
            .args(["-o", "loop,ro"])
            .arg(&image)
            .arg(&mnt));
        let inspect = || -> Vec<String> {
            let m = |p: &str| std::fs::symlink_metadata(mnt.join(p)).unwrap();
            let caps = sh(Command::new("getcap").arg(mnt.join("bin/ping")));
            vec![
                format!("{} {}", m("").uid(), m("").permissions().mode() & 0o7777),
                format!(
                    "{} {:o}",
                    m("bin/suid").uid(),
                    m("bin/suid").permissions().mode() & 0o7777
                ),
                (m("bin/suid").ino() == m("bin/suid2").ino()).to_string(),
                std::fs::read_link(mnt.join("etc/link"))
                    .unwrap()
                    .display()
                    .to_string(),
                m("etc/link").uid().to_string(),
                m("etc/hostroot").uid().to_string(),
                m("etc/big").uid().to_string(),
                m(".sandforge").is_dir().to_string(),
                m("bin/ping").uid().to_string(),
                caps.trim().rsplit(' ').next().unwrap_or("").to_string(),
            ]
        };
        let seen = inspect();
        sh(Command::new("umount").arg(&mnt));
        assert_eq!(
            seen,
            [
                "0 493",
                "1000 4755",
                "true",
                "/etc/shadow",
                "0",
                "65534",
                "70000",
                "true",
                "0",
                "cap_net_raw=ep",
            ]
        );
        // Removal waits for no derivation and takes the lock.
        assert!(try_hold(&dir).unwrap().is_some());
        std::fs::remove_dir_all(&work).unwrap();
    }

    #[test]
    fn geometry_follows_build_guest() {
        // Small trees get 512 MiB of room, large ones 40 %.
        assert_eq!(geometry(100 << 20, 1000).0, 101 + 512);
        assert_eq!(geometry(10 << 30, 1000).0, 10240 * 14 / 10 + 1);
        // Inodes: the default ratio, or the tree's count and half again.
        let (size, n) = geometry(1 << 20, 10);
        assert_eq!(n, (size << 20) / 16384);
        assert_eq!(geometry(1 << 20, 1_000_000).1, 1_500_000 + 16384);
    }
}
