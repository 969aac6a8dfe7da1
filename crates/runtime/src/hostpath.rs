//! Host directories that sandboxes mount, resolved without ever following a
//! symbolic link below an allowed root.
//!
//! A sandbox with a read-write mount of an allowed directory can replace
//! any path component below it with a symlink (or exchange one atomically
//! with `renameat2`). So a host path is never resolved by name twice: it is
//! checked lexically against the allowed roots, then opened once, from the
//! root's descriptor, with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)`, and every later step (the id-mapped clone for a
//! container, the staged bind for virtiofsd) works from that descriptor.
//! This runs at create and again at every start, against the configuration
//! in force then.
//!
//! Owns: locating a host path under the allowed roots and opening it. The
//! allowed roots themselves are the operator's (their own symlinks are
//! resolved once, from the configuration). It must not mount anything.

use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};

#[derive(Debug, thiserror::Error)]
pub enum HostPathError {
    #[error("'{0}' is outside the allowed host paths")]
    Outside(PathBuf),
    #[error("'{0}' must be an absolute path without '.', '..' or empty components")]
    NotPlain(PathBuf),
    #[error("'{0}' goes through a symbolic link; host paths are never followed through links")]
    Symlink(PathBuf),
    #[error("'{path}': {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One allowed root: as configured, and with its own symlinks resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedRoot {
    pub configured: PathBuf,
    pub canonical: PathBuf,
}

/// The configured roots that exist, each with its canonical spelling.
pub fn allowed_roots(configured: &[PathBuf]) -> Vec<AllowedRoot> {
    configured
        .iter()
        .filter_map(|c| {
            std::fs::canonicalize(c).ok().map(|canonical| AllowedRoot {
                configured: c.clone(),
                canonical,
            })
        })
        .collect()
}

/// A host path split into the canonical allowed root it lies under and the
/// relative rest. Purely lexical: nothing on disk is looked at.
pub fn locate(roots: &[AllowedRoot], path: &Path) -> Result<(PathBuf, PathBuf), HostPathError> {
    let mut comps = path.components();
    if comps.next() != Some(Component::RootDir)
        || !comps.all(|c| matches!(c, Component::Normal(_)))
        || path
            .as_os_str()
            .as_encoded_bytes()
            .windows(2)
            .any(|w| w == b"//")
    {
        return Err(HostPathError::NotPlain(path.to_path_buf()));
    }
    // The deepest root that contains the path, in either spelling.
    roots
        .iter()
        .flat_map(|r| {
            [&r.canonical, &r.configured]
                .into_iter()
                .filter_map(move |spelling| {
                    path.strip_prefix(spelling)
                        .ok()
                        .map(|rel| (spelling.components().count(), r.canonical.clone(), rel))
                })
        })
        .max_by_key(|(depth, _, _)| *depth)
        .map(|(_, root, rel)| (root, rel.to_path_buf()))
        .ok_or_else(|| HostPathError::Outside(path.to_path_buf()))
}

/// Open `rel` below `root` as an `O_PATH` descriptor without following any
/// symlink (the last component included) and without leaving `root`.
pub fn open_beneath(root: &Path, rel: &Path) -> Result<OwnedFd, HostPathError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e: rustix::io::Errno| HostPathError::Io {
            path,
            source: e.into(),
        }
    };
    let root_fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io(root))?;
    if rel.as_os_str().is_empty() {
        return Ok(root_fd);
    }
    let full = root.join(rel);
    openat2(
        &root_fd,
        rel,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => HostPathError::Symlink(full.clone()),
        e => io(&full)(e),
    })
    .and_then(|fd| {
        // O_PATH|O_NOFOLLOW opens a final symlink itself instead of failing.
        let st = rustix::fs::fstat(&fd).map_err(io(&full))?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Symlink {
            return Err(HostPathError::Symlink(full.clone()));
        }
        Ok(fd)
    })
}

/// Locate and open in one step.
pub fn open(roots: &[AllowedRoot], path: &Path) -> Result<OwnedFd, HostPathError> {
    let (root, rel) = locate(roots, path)?;
    open_beneath(&root, &rel)
}

/// Whether an open host path is a directory.
pub fn is_dir(fd: &OwnedFd) -> bool {
    rustix::fs::fstat(fd)
        .map(|st| {
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots(dir: &Path) -> Vec<AllowedRoot> {
        allowed_roots(&[dir.to_path_buf()])
    }

    #[test]
    fn lexical_rules() {
        let d = tempfile::tempdir().unwrap();
        let r = roots(d.path());
        let root = r[0].canonical.clone();
        assert!(matches!(
            locate(&r, Path::new("relative")),
            Err(HostPathError::NotPlain(_))
        ));
        assert!(matches!(
            locate(&r, &root.join("a/../../etc")),
            Err(HostPathError::NotPlain(_))
        ));
        assert!(matches!(
            locate(&r, Path::new("/etc")),
            Err(HostPathError::Outside(_))
        ));
        assert_eq!(
            locate(&r, &root.join("a/b")).unwrap(),
            (root.clone(), "a/b".into())
        );
        assert_eq!(locate(&r, &root).unwrap(), (root, PathBuf::new()));
    }

    #[test]
    fn symlinks_are_never_followed() {
        let d = tempfile::tempdir().unwrap();
        let r = roots(d.path());
        let root = &r[0].canonical;
        std::fs::create_dir_all(root.join("real/sub")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("out")).unwrap();
        std::os::unix::fs::symlink("real", root.join("inner")).unwrap();
        assert!(is_dir(&open(&r, &root.join("real/sub")).unwrap()));
        for p in ["out", "inner", "inner/sub", "out/ssl"] {
            assert!(
                matches!(open(&r, &root.join(p)), Err(HostPathError::Symlink(_))),
                "{p} was followed"
            );
        }
        assert!(matches!(
            open(&r, &root.join("missing")),
            Err(HostPathError::Io { .. })
        ));
    }
}
