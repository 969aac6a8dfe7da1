//! Id-mapped bind mounts for host directories (`mounts` of a create).
//!
//! Root inside a sandbox is host uid `shift`; through a plain bind mount it
//! would see host-owned files as "nobody" and could not write them. An
//! id-mapped mount (Linux ≥ 5.12, `mount_setattr(MOUNT_ATTR_IDMAP)`) shows
//! host uid N as container uid N instead, so the sandbox's root writes the
//! mounted directory as its owner, and files it creates land on the host
//! owned by the matching host uid (root's files by root).
//!
//! Owns: making the user-namespace fd that describes the mapping and the
//! staged mounts under `<sandbox>/mounts/<n>`. Where the host filesystem
//! cannot be id-mapped it falls back to a plain bind (read-only still holds).
//!
//! `unsafe` here is limited to the raw `mount_setattr` syscall (no libc
//! wrapper exists) and to the `pre_exec` hook that unshares a user namespace.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use rustix::fs::CWD;
use rustix::mount::{move_mount, open_tree, MoveMountFlags, OpenTreeFlags};

use crate::backend::ResolvedMount;
use crate::error::{Result, RuntimeError};

pub(crate) const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
pub(crate) const MOUNT_ATTR_NOSUID: u64 = 0x0000_0002;
pub(crate) const MOUNT_ATTR_NODEV: u64 = 0x0000_0004;
pub(crate) const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// `struct mount_attr` of `<linux/mount.h>` (MOUNT_ATTR_SIZE_VER0 = 32).
#[repr(C)]
pub(crate) struct MountAttr {
    pub attr_set: u64,
    pub attr_clr: u64,
    pub propagation: u64,
    pub userns_fd: u64,
}

pub(crate) fn setattr(fd: &OwnedFd, attr: &MountAttr) -> std::io::Result<()> {
    // SAFETY: `fd` is a valid open_tree fd for the lifetime of the call, the
    // path is a NUL-terminated empty string (used with AT_EMPTY_PATH), and
    // `attr` points to a live, correctly laid out mount_attr of the size we
    // pass. The kernel only reads from it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A user namespace mapping 0..range inside to shift..shift+range outside,
/// held open by fd (the helper process that made it is gone).
fn userns_fd(shift: u32, range: u32) -> Result<File> {
    userns_fd_map(&format!("0 {shift} {range}\n"))
}

/// A user namespace with `map` (uid_map/gid_map lines: `inside outside
/// count`) for both uids and gids, held open by fd.
pub(crate) fn userns_fd_map(map: &str) -> Result<File> {
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("30").stdin(std::process::Stdio::null());
    // SAFETY: the hook runs in the forked child before exec and only calls
    // unshare(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            rustix::thread::unshare(rustix::thread::UnshareFlags::NEWUSER).map_err(Into::into)
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| RuntimeError::Setup(format!("spawning userns helper: {e}")))?;
    let pid = child.id();
    let result = (|| {
        std::fs::write(format!("/proc/{pid}/uid_map"), map)?;
        std::fs::write(format!("/proc/{pid}/gid_map"), map)?;
        File::open(format!("/proc/{pid}/ns/user"))
    })();
    let _ = child.kill();
    let _ = child.wait();
    result.map_err(|e| RuntimeError::Setup(format!("building id-map user namespace: {e}")))
}

/// Stage each mount under `<dir>/mounts/<n>` (id-mapped when possible) and
/// return the host paths the OCI spec should bind from. Each host path is
/// opened once, below its allowed root with no symlink followed, and the
/// mount is cloned from that descriptor: nothing is resolved by name twice.
pub fn stage(dir: &Path, mounts: &[ResolvedMount], shift: u32, range: u32) -> Result<Vec<PathBuf>> {
    if mounts.is_empty() {
        return Ok(vec![]);
    }
    let staging = dir.join("mounts");
    std::fs::create_dir_all(&staging).map_err(|e| RuntimeError::io("mkdir", &staging, e))?;
    let ns = userns_fd(shift, range)?;
    let mut out = vec![];
    for (i, m) in mounts.iter().enumerate() {
        let target = staging.join(i.to_string());
        let mut attr = MountAttr {
            attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            attr_clr: 0,
            propagation: 0,
            userns_fd: ns.as_raw_fd() as u64,
        };
        if m.read_only {
            attr.attr_set |= MOUNT_ATTR_RDONLY;
        }
        let tree = clone_tree(m, &target)?;
        if let Err(e) = setattr(&tree, &attr) {
            tracing::warn!(host = %m.host_path.display(), "id-mapped mount unsupported here ({e}); using a plain bind");
            attr.attr_set &= !MOUNT_ATTR_IDMAP;
            attr.userns_fd = 0;
            setattr(&tree, &attr)
                .map_err(|e| RuntimeError::io("mount_setattr", &m.host_path, e))?;
        }
        attach(&tree, &target)?;
        out.push(target);
    }
    Ok(out)
}

/// Open the host path of `m` safely and clone its mount tree, creating the
/// mount point `target` (a directory or a file, like the source).
pub fn clone_tree(m: &ResolvedMount, target: &Path) -> Result<OwnedFd> {
    let src = m.open()?;
    if crate::hostpath::is_dir(&src) {
        std::fs::create_dir_all(target).map_err(|e| RuntimeError::io("mkdir", target, e))?;
    } else {
        File::create(target).map_err(|e| RuntimeError::io("create", target, e))?;
    }
    open_tree(
        src.as_fd(),
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(|e| RuntimeError::io("open_tree", &m.host_path, e.into()))
}

/// Attach a cloned tree at `target`.
pub fn attach(tree: &OwnedFd, target: &Path) -> Result<()> {
    move_mount(
        tree.as_fd(),
        "",
        CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| RuntimeError::io("move_mount", target, e.into()))
}

/// A read-only (when asked), nosuid, nodev bind of each host mount at
/// `<staging>/<n>`, made from a descriptor opened without following
/// symlinks (for virtiofsd, which takes a path). `staging` must not be
/// writable by anything the sandbox controls.
pub fn stage_plain(staging: &Path, mounts: &[ResolvedMount]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(staging).map_err(|e| RuntimeError::io("mkdir", staging, e))?;
    std::fs::set_permissions(staging, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(|e| RuntimeError::io("chmod", staging, e))?;
    let mut out = vec![];
    for (i, m) in mounts.iter().enumerate() {
        let target = staging.join(i.to_string());
        let tree = clone_tree(m, &target)?;
        let mut attr = MountAttr {
            attr_set: MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        if m.read_only {
            attr.attr_set |= MOUNT_ATTR_RDONLY;
        }
        setattr(&tree, &attr).map_err(|e| RuntimeError::io("mount_setattr", &m.host_path, e))?;
        attach(&tree, &target)?;
        out.push(target);
    }
    Ok(out)
}

/// Unmount and remove what [`stage_plain`] made (idempotent). Only empty
/// directories are removed (`rmdir`), so a mount that could not be undone
/// keeps its files untouched.
pub fn unstage_plain(staging: &Path) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(staging) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let p = e.path();
        super::rootfs::unmount_all(&p)?;
        let removed = if p.is_dir() {
            std::fs::remove_dir(&p)
        } else {
            std::fs::remove_file(&p)
        };
        removed.map_err(|e| RuntimeError::io("remove", &p, e))?;
    }
    std::fs::remove_dir(staging).map_err(|e| RuntimeError::io("rmdir", staging, e))
}

/// Unmount every staged mount (idempotent).
pub fn unstage(dir: &Path) -> Result<()> {
    let staging = dir.join("mounts");
    let Ok(rd) = std::fs::read_dir(&staging) else {
        return Ok(());
    };
    for e in rd.flatten() {
        super::rootfs::unmount_all(&e.path())?;
    }
    Ok(())
}
