//! The unprivileged identity each QEMU runs as: its own uid from a range
//! (`vm_uid_base` + n, no passwd entry needed), with the sandbox directory
//! and its disk owned by that uid and mode 0700. A QEMU compromised by its
//! guest then holds no root privileges and cannot signal, trace or read
//! another sandbox's QEMU or files. The group is `kvm` where the host has
//! one (for `/dev/kvm`), else the uid's own number.
//!
//! Owns choosing a free uid and handing a sandbox's files to it. The uid in
//! use is recorded by nothing but the directory's owner, so a restart needs
//! no extra state. It must not change anything outside the sandbox's
//! directory.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;

use crate::error::{Result, RuntimeError};

/// How many uids the range holds (the most VMs that can run at once).
pub const RANGE: u32 = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmIdentity {
    pub uid: u32,
    pub gid: u32,
}

pub struct Identities {
    base: Option<u32>,
    kvm_gid: Option<u32>,
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
        let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
        Identities {
            base: (base != 0).then_some(base),
            kvm_gid: group_id(&groups, "kvm"),
            lock: Mutex::new(()),
        }
    }

    /// Create `dir` (a child of `sandboxes`) owned by the lowest uid of the
    /// range that no other sandbox directory is owned by.
    pub fn claim(&self, sandboxes: &Path, dir: &Path) -> Result<Option<VmIdentity>> {
        std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io("mkdir", dir, e))?;
        let Some(base) = self.base else {
            return Ok(None);
        };
        let _held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut used: Vec<u32> = std::fs::read_dir(sandboxes)
            .map_err(|e| RuntimeError::io("list", sandboxes, e))?
            .flatten()
            .filter(|e| e.path() != dir)
            .filter_map(|e| e.metadata().ok().map(|m| m.uid()))
            .filter(|uid| (base..base.saturating_add(RANGE)).contains(uid))
            .collect();
        used.sort_unstable();
        let uid = (base..base.saturating_add(RANGE))
            .find(|u| used.binary_search(u).is_err())
            .ok_or_else(|| RuntimeError::Setup("every VM uid is in use".into()))?;
        let id = VmIdentity {
            uid,
            gid: self.kvm_gid.unwrap_or(uid),
        };
        give(dir, id)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| RuntimeError::io("chmod", dir, e))?;
        Ok(Some(id))
    }
}

impl Identities {
    /// The identity a sandbox directory was claimed for.
    pub fn owner_of(&self, dir: &Path) -> Option<VmIdentity> {
        let base = self.base?;
        let uid = std::fs::metadata(dir).ok()?.uid();
        (base..base.saturating_add(RANGE))
            .contains(&uid)
            .then_some(VmIdentity {
                uid,
                gid: self.kvm_gid.unwrap_or(uid),
            })
    }
}

/// Hand `path` to the VM's identity (no-op without one).
pub fn give(path: &Path, id: VmIdentity) -> Result<()> {
    std::os::unix::fs::chown(path, Some(id.uid), Some(id.gid))
        .map_err(|e| RuntimeError::io("chown", path, e))
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
}
