//! The unprivileged identity each QEMU runs as: its own uid from a range
//! (`vm_uid_base` + n, no passwd entry needed). A QEMU compromised by its
//! guest then holds no root privileges and cannot signal, trace or read
//! another sandbox's QEMU or files. The group is `kvm` where the host has
//! one (for `/dev/kvm`), else the uid's own number.
//!
//! Layout: the sandbox directory is root's (0711); only its `qemu/`
//! subdirectory (sockets, pid file, console log: what QEMU itself creates)
//! is the VM's (0700), plus the files handed to it (its disk, its RAM
//! file). So the supervisor never writes where the VM's uid could have put
//! a symlink.
//!
//! A uid is never shared, not even by two daemons on one host: the
//! host-wide registry [`REGISTRY`] holds one entry per uid in use, a
//! symlink to the `qemu/` directory that owns it, created under an
//! exclusive `flock`. An entry whose directory is gone (or no longer owned
//! by that uid) is stale and may be taken again.
//!
//! Owns choosing a free uid, the registry, and handing a sandbox's files
//! to its uid. It must not change anything outside the sandbox's directory
//! and the registry.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Result, RuntimeError};

/// How many uids the range holds (the most VMs that can run at once).
pub const RANGE: u32 = 65_536;

/// The host-wide registry of VM uids in use (shared by every daemon).
pub const REGISTRY: &str = "/var/lib/sandforge-vm-uids";

/// The VM's own directory inside a sandbox directory.
pub fn qemu_dir(dir: &Path) -> PathBuf {
    dir.join("qemu")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmIdentity {
    pub uid: u32,
    pub gid: u32,
}

pub struct Identities {
    base: Option<u32>,
    kvm_gid: Option<u32>,
    registry: PathBuf,
    lock: Mutex<()>,
}

/// The gid of group `name` in an `/etc/group`-format text.
pub fn group_id(group_file: &str, name: &str) -> Option<u32> {
    group_file.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.next()?;
        f.next()?.parse().ok()
    })
}

impl Identities {
    /// `base` 0 disables the feature (QEMU runs as the daemon's user).
    pub fn new(base: u32) -> Self {
        Self::with_registry(base, PathBuf::from(REGISTRY))
    }

    pub fn with_registry(base: u32, registry: PathBuf) -> Self {
        let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
        Identities {
            base: (base != 0).then_some(base),
            kvm_gid: group_id(&groups, "kvm"),
            registry,
            lock: Mutex::new(()),
        }
    }

    /// Create `dir` (root's, 0711) and its `qemu/` directory owned by the
    /// lowest uid of the range that no VM on this host holds.
    pub fn claim(&self, _sandboxes: &Path, dir: &Path) -> Result<Option<VmIdentity>> {
        std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io("mkdir", dir, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| RuntimeError::io("chmod", dir, e))?;
        let Some(base) = self.base else {
            return Ok(None);
        };
        let q = qemu_dir(dir);
        let _held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let _host = self.lock_registry()?;
        let uid = (base..base.saturating_add(RANGE))
            .find(|&uid| self.take(uid, &q))
            .ok_or_else(|| RuntimeError::Setup("every VM uid is in use".into()))?;
        let id = VmIdentity {
            uid,
            gid: self.kvm_gid.unwrap_or(uid),
        };
        match std::fs::create_dir(&q) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(RuntimeError::io("mkdir", &q, e))
            }
            _ => {}
        }
        give(&q, id)?;
        std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| RuntimeError::io("chmod", &q, e))?;
        Ok(Some(id))
    }

    /// Give up the uid of `dir` in the registry (at destroy; idempotent).
    pub fn release(&self, dir: &Path) {
        let Some(id) = self.owner_of(dir) else { return };
        let entry = self.registry.join(id.uid.to_string());
        if std::fs::read_link(&entry).ok().as_deref() == Some(&qemu_dir(dir)) {
            let _ = std::fs::remove_file(&entry);
        }
    }

    fn lock_registry(&self) -> Result<std::fs::File> {
        let reg = &self.registry;
        std::fs::create_dir_all(reg).map_err(|e| RuntimeError::io("mkdir", reg, e))?;
        std::fs::set_permissions(reg, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| RuntimeError::io("chmod", reg, e))?;
        let lock = reg.join(".lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .map_err(|e| RuntimeError::io("open", &lock, e))?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| RuntimeError::io("flock", &lock, e.into()))?;
        Ok(f)
    }

    /// Take `uid` for the VM directory `q` if nobody holds it (under the
    /// registry lock): a free entry, our own, or a stale one.
    fn take(&self, uid: u32, q: &Path) -> bool {
        let entry = self.registry.join(uid.to_string());
        match std::fs::read_link(&entry) {
            Ok(target) if target == q => return true,
            Ok(target) => {
                let held =
                    std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir() && m.uid() == uid);
                if held {
                    return false;
                }
                let _ = std::fs::remove_file(&entry);
            }
            Err(_) => {}
        }
        std::os::unix::fs::symlink(q, &entry).is_ok()
    }
}

impl Identities {
    /// The identity a sandbox directory was claimed for.
    pub fn owner_of(&self, dir: &Path) -> Option<VmIdentity> {
        let base = self.base?;
        let uid = std::fs::symlink_metadata(qemu_dir(dir)).ok()?.uid();
        (base..base.saturating_add(RANGE))
            .contains(&uid)
            .then_some(VmIdentity {
                uid,
                gid: self.kvm_gid.unwrap_or(uid),
            })
    }
}

/// Hand `path` to the VM's identity (no-op without one). Never follows a
/// symlink: `path` is a file the supervisor just made.
pub fn give(path: &Path, id: VmIdentity) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(id.uid), Some(id.gid))
        .map_err(|e| RuntimeError::io("chown", path, e))
}

/// Take a file back from a VM's identity: root's, 0600 (a snapshot's copy
/// of a disk must not stay readable by a uid a later VM may be given).
pub fn take_back(path: &Path) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(0), Some(0))
        .map_err(|e| RuntimeError::io("chown", path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| RuntimeError::io("chmod", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_lookup() {
        let g = "root:x:0:\nkvm:x:993:alice\nkvmx:x:5:\n";
        assert_eq!(group_id(g, "kvm"), Some(993));
        assert_eq!(group_id(g, "root"), Some(0));
        assert_eq!(group_id(g, "nope"), None);
        assert_eq!(group_id("kvm:x:notanumber:\n", "kvm"), None);
    }

    #[test]
    fn uids_are_never_shared_and_stale_entries_are_reused() {
        let t = tempfile::tempdir().unwrap();
        let reg = t.path().join("reg");
        // Two daemons (two state directories) sharing one host registry.
        let (a, b) = (
            Identities::with_registry(3_000_000, reg.clone()),
            Identities::with_registry(3_000_000, reg.clone()),
        );
        let sa = t.path().join("a/sandboxes");
        let sb = t.path().join("b/sandboxes");
        let ia = a.claim(&sa, &sa.join("sb_1")).unwrap().unwrap();
        let ib = b.claim(&sb, &sb.join("sb_1")).unwrap().unwrap();
        assert_ne!(ia.uid, ib.uid);
        assert_eq!(a.owner_of(&sa.join("sb_1")), Some(ia));
        // Claiming again for the same directory keeps its uid.
        assert_eq!(a.claim(&sa, &sa.join("sb_1")).unwrap(), Some(ia));
        // A directory that vanished without a release (a crash) is stale.
        std::fs::remove_dir_all(t.path().join("a")).unwrap();
        let ic = b.claim(&sb, &sb.join("sb_2")).unwrap().unwrap();
        assert_eq!(ic.uid, ia.uid);
        b.release(&sb.join("sb_2"));
        assert!(!reg.join(ic.uid.to_string()).exists());
    }
}
