//! Finding and removing a container's cgroups on cgroup v1, v2 and the
//! hybrid layout. runc removes them on `delete`; this is the safety net for
//! a crash between runc's steps, and the check tests use.

use std::path::PathBuf;

const ROOT: &str = "/sys/fs/cgroup";

/// Every directory that could hold the container's cgroup, existing or not.
pub fn candidate_dirs(parent: &str, id: &str) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from(ROOT).join(parent).join(id)];
    if let Ok(rd) = std::fs::read_dir(ROOT) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.push(e.path().join(parent).join(id));
            }
        }
    }
    out
}

/// Existing cgroup directories of the container.
pub fn existing_dirs(parent: &str, id: &str) -> Vec<PathBuf> {
    candidate_dirs(parent, id)
        .into_iter()
        .filter(|p| p.is_dir())
        .collect()
}

/// rmdir every leftover (empty) cgroup directory; returns those that remain.
pub fn remove(parent: &str, id: &str) -> Vec<PathBuf> {
    let mut left = vec![];
    for d in existing_dirs(parent, id) {
        if std::fs::remove_dir(&d).is_err() && d.is_dir() {
            left.push(d);
        }
    }
    left
}
