//! Applying layer tarballs to a rootfs, treating every entry as hostile.
//!
//! Nothing here resolves a path by name from the host's `/`: the rootfs is
//! one directory descriptor, and every parent directory is opened with
//! `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)` from
//! it, so `..`, absolute symlinks and symlinks planted by an earlier entry or
//! layer all resolve *inside* the rootfs (as they would for a process
//! chrooted there). Entry names themselves must be plain relative paths: a
//! `..` component is refused outright, a leading `/` is dropped. The last
//! component is always created/removed with `*at` calls on the parent's
//! descriptor without following it. Hard links resolve their target the same
//! way (so they can only point at files inside), device nodes are skipped,
//! ownership is shifted with `fchown` on a new file's descriptor or
//! `fchownat(AT_SYMLINK_NOFOLLOW)`. Consecutive entries of one directory
//! reuse its descriptor until anything is removed.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Component, Path};

use rustix::fs::{
    chmodat, chownat, linkat, mkdirat, mknodat, openat, openat2, statat, symlinkat, unlinkat,
    utimensat, AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps, CWD,
};
use rustix::process::{Gid, Uid};

use super::ImageError;

/// Prefix of a whiteout file (deletes `name` from lower layers).
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// An opaque whiteout: hides every lower-layer entry of its directory.
pub const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";

/// Split a tar entry path into safe components: `.` and empty parts dropped,
/// a leading `/` ignored (the path is taken relative to the rootfs), `..`
/// refused.
pub fn entry_components(path: &Path) -> Result<Vec<String>, ImageError> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(s) => {
                let s = s.to_str().ok_or_else(|| {
                    ImageError::Layer(format!("entry {}: name is not UTF-8", path.display()))
                })?;
                out.push(s.to_string());
            }
            Component::ParentDir | Component::Prefix(_) => {
                return Err(ImageError::Layer(format!(
                    "entry {} refused: `..` would leave the rootfs",
                    path.display()
                )))
            }
        }
    }
    Ok(out)
}

fn io_err(what: &str, path: &[String], e: impl Into<io::Error>) -> ImageError {
    ImageError::Layer(format!("{what} /{}: {}", path.join("/"), e.into()))
}

fn uid_of(id: u32) -> Uid {
    assert_ne!(id, u32::MAX);
    // SAFETY: not -1 (checked above), which chown would read as "unchanged".
    unsafe { Uid::from_raw(id) }
}

fn gid_of(id: u32) -> Gid {
    assert_ne!(id, u32::MAX);
    // SAFETY: as for `uid_of`.
    unsafe { Gid::from_raw(id) }
}

const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// Open a directory of the rootfs (symlinks resolved inside `root`).
fn open_dir_in_root(root: &OwnedFd, comps: &[String]) -> io::Result<OwnedFd> {
    let p = if comps.is_empty() {
        ".".to_string()
    } else {
        comps.join("/")
    };
    Ok(openat2(
        root,
        p.as_str(),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE,
    )?)
}

/// Open (creating missing directories, owned by the shifted root) the parent
/// of an entry.
fn ensure_dir(root: &OwnedFd, comps: &[String], shift: Option<u32>) -> Result<OwnedFd, ImageError> {
    match open_dir_in_root(root, comps) {
        Ok(fd) => return Ok(fd),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("open", comps, e)),
    }
    let mut cur = open_dir_in_root(root, &[]).map_err(|e| io_err("open", &[], e))?;
    for i in 0..comps.len() {
        match open_dir_in_root(root, &comps[..=i]) {
            Ok(fd) => cur = fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let name = comps[i].as_str();
                match mkdirat(&cur, name, Mode::from_raw_mode(0o755)) {
                    Ok(()) => {}
                    // A dangling symlink: its target is not created for it.
                    Err(rustix::io::Errno::EXIST) => {
                        return Err(ImageError::Layer(format!(
                            "/{} is a link that leads to no directory inside the rootfs",
                            comps[..=i].join("/")
                        )))
                    }
                    Err(e) => return Err(io_err("mkdir", &comps[..=i], e)),
                }
                if let Some(s) = shift {
                    chownat(
                        &cur,
                        name,
                        Some(uid_of(s)),
                        Some(gid_of(s)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| io_err("chown", &comps[..=i], e))?;
                }
                cur = openat(
                    &cur,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| io_err("open", &comps[..=i], e))?;
            }
            Err(e) => return Err(io_err("open", &comps[..=i], e)),
        }
    }
    Ok(cur)
}

/// `rm -rf` of `name` in `dir`, never following a symlink.
fn remove_all_at(dir: &OwnedFd, name: &str) -> io::Result<()> {
    let st = match statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        let sub = openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        clear_dir(&sub, &HashSet::new())?;
        unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    } else {
        unlinkat(dir, name, AtFlags::empty())?;
    }
    Ok(())
}

/// Remove every entry of `dir` except the names in `keep`.
fn clear_dir(dir: &OwnedFd, keep: &HashSet<String>) -> io::Result<()> {
    let mut names = Vec::new();
    let listing = openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for ent in rustix::fs::Dir::read_from(&listing)? {
        let ent = ent?;
        let n = ent.file_name().to_string_lossy().into_owned();
        if n != "." && n != ".." && !keep.contains(&n) {
            names.push(n);
        }
    }
    for n in names {
        remove_all_at(dir, &n)?;
    }
    Ok(())
}

/// Bytes copied per read/write of a file's data.
const COPY_BUF: usize = 256 << 10;

/// Most entries one rootfs may get from its layers (each is an inode of
/// the host's state filesystem; the default template has about 42,000).
pub const MAX_ENTRIES: u64 = 4_000_000;

/// Applies layers, in order, to one rootfs.
pub struct Unpacker {
    root: OwnedFd,
    shift: Option<u32>,
    /// Bytes of file data written so far, over every layer: a gzip bomb
    /// stops at `max_bytes` instead of filling the host's disk.
    data: std::cell::Cell<u64>,
    max_bytes: u64,
    /// Entries taken so far, over every layer (at most [`MAX_ENTRIES`]).
    entries: u64,
}

impl Unpacker {
    /// `rootfs` must exist and be a directory; `shift` is added to every
    /// entry's uid/gid (None: ownership left to the caller's uid, for tests).
    pub fn new(rootfs: &Path, shift: Option<u32>) -> Result<Self, ImageError> {
        let root = openat(
            CWD,
            rootfs,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ImageError::Io(format!("open {}: {e}", rootfs.display())))?;
        if let Some(s) = shift {
            rustix::fs::fchown(&root, Some(uid_of(s)), Some(gid_of(s)))
                .map_err(|e| ImageError::Io(format!("chown {}: {e}", rootfs.display())))?;
        }
        Ok(Self {
            root,
            shift,
            data: std::cell::Cell::new(0),
            max_bytes: u64::MAX,
            entries: 0,
        })
    }

    /// Refuse (a `Layer` error) once the layers' file data pass `max`
    /// bytes in all.
    pub fn with_max_bytes(mut self, max: u64) -> Self {
        self.max_bytes = max;
        self
    }

    /// Apply one (uncompressed) layer tarball.
    pub fn apply<R: Read>(&mut self, layer: R) -> Result<(), ImageError> {
        let mut ar = tar::Archive::new(layer);
        // Paths this layer wrote: an opaque whiteout hides only lower layers.
        let mut written: HashSet<Vec<String>> = HashSet::new();
        // The parent directory of the last entry (entries come grouped by
        // directory): opened once, resolved again only for another parent.
        // Anything that removes an entry (whiteouts, replacements) may have
        // removed a directory on the way to it, so it clears the cache.
        let mut parent_cache: Option<(Vec<String>, OwnedFd)> = None;
        let mut buf = vec![0u8; COPY_BUF];
        let entries = ar
            .entries()
            .map_err(|e| ImageError::Layer(format!("read tar: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| ImageError::Layer(format!("read tar: {e}")))?;
            self.entries += 1;
            if self.entries > MAX_ENTRIES {
                return Err(ImageError::Layer(format!(
                    "more than {MAX_ENTRIES} entries in all"
                )));
            }
            let path = entry
                .path()
                .map_err(|e| ImageError::Layer(format!("entry name: {e}")))?
                .into_owned();
            let comps = entry_components(&path)?;
            let Some((name, parent)) = comps.split_last() else {
                continue; // the rootfs itself ("./")
            };
            if name == WHITEOUT_OPAQUE {
                parent_cache = None;
                let dir = ensure_dir(&self.root, parent, self.shift)?;
                let keep: HashSet<String> = written
                    .iter()
                    .filter(|p| p.len() == parent.len() + 1 && p.starts_with(parent))
                    .map(|p| p[parent.len()].clone())
                    .collect();
                clear_dir(&dir, &keep).map_err(|e| io_err("opaque whiteout", parent, e))?;
                continue;
            }
            if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
                if target.is_empty() || target == "." || target == ".." {
                    return Err(ImageError::Layer(format!(
                        "entry {} refused: bad whiteout",
                        path.display()
                    )));
                }
                parent_cache = None;
                match open_dir_in_root(&self.root, parent) {
                    Ok(dir) => {
                        remove_all_at(&dir, target).map_err(|e| io_err("whiteout", &comps, e))?
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("open", parent, e)),
                }
                continue;
            }
            let dir = match parent_cache.take() {
                Some((p, fd)) if p == parent => fd,
                _ => ensure_dir(&self.root, parent, self.shift)?,
            };
            let replaced = self.write_entry(&dir, name, &comps, &mut entry, &mut buf)?;
            if !replaced {
                parent_cache = Some((parent.to_vec(), dir));
            }
            written.insert(comps);
        }
        Ok(())
    }

    /// Create one entry in `dir` (the parent). Returns whether something
    /// that was there was removed for it.
    fn write_entry<R: Read>(
        &self,
        dir: &OwnedFd,
        name: &str,
        comps: &[String],
        entry: &mut tar::Entry<R>,
        buf: &mut [u8],
    ) -> Result<bool, ImageError> {
        let h = entry.header();
        let kind = h.entry_type();
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        let uid = h.uid().unwrap_or(0);
        let gid = h.gid().unwrap_or(0);
        let mtime = h.mtime().unwrap_or(0);
        use tar::EntryType as E;
        if matches!(kind, E::Char | E::Block) {
            return Ok(false); // device nodes are never created
        }
        let owner = match self.shift {
            None => None,
            Some(s) => {
                let shifted = |id: u64| {
                    u32::try_from(id)
                        .ok()
                        .and_then(|id| id.checked_add(s))
                        .filter(|id| *id != u32::MAX)
                        .ok_or_else(|| {
                            io_err(
                                "chown",
                                comps,
                                io::Error::other(format!("id {id} out of range")),
                            )
                        })
                };
                Some((uid_of(shifted(uid)?), gid_of(shifted(gid)?)))
            }
        };
        let t = Timespec {
            tv_sec: mtime as i64,
            tv_nsec: 0,
        };
        let times = Timestamps {
            last_access: t,
            last_modification: t,
        };
        // Made without looking first; what is in the way (anything but a
        // directory where a directory goes) is removed and the call made
        // again, never followed.
        let mut replaced = false;
        let mut make =
            |f: &mut dyn FnMut() -> rustix::io::Result<()>, what: &str| -> Result<(), ImageError> {
                match f() {
                    Err(rustix::io::Errno::EXIST) => {
                        remove_all_at(dir, name).map_err(|e| io_err("replace", comps, e))?;
                        replaced = true;
                        f().map_err(|e| io_err(what, comps, e))
                    }
                    r => r.map_err(|e| io_err(what, comps, e)),
                }
            };
        match kind {
            E::Directory => {
                let made = mkdirat(dir, name, Mode::from_raw_mode(0o755));
                if made == Err(rustix::io::Errno::EXIST) {
                    let st = statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| io_err("stat", comps, e))?;
                    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                        make(
                            &mut || mkdirat(dir, name, Mode::from_raw_mode(0o755)),
                            "mkdir",
                        )?;
                    }
                } else {
                    made.map_err(|e| io_err("mkdir", comps, e))?;
                }
                self.own_and_mode(dir, name, comps, owner, Some(mode))?;
            }
            E::Regular | E::Continuous | E::GNUSparse => {
                let mut fd = None;
                make(
                    &mut || {
                        fd = Some(openat(
                            dir,
                            name,
                            OFlags::WRONLY
                                | OFlags::CREATE
                                | OFlags::EXCL
                                | OFlags::NOFOLLOW
                                | OFlags::CLOEXEC,
                            Mode::from_raw_mode(0o600),
                        )?);
                        Ok(())
                    },
                    "create",
                )?;
                let fd = fd.ok_or_else(|| io_err("create", comps, io::Error::other("no fd")))?;
                let mut f = File::from(fd);
                loop {
                    let n = match entry.read(buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(io_err("write", comps, e)),
                    };
                    let total = self.data.get().saturating_add(n as u64);
                    if total > self.max_bytes {
                        return Err(ImageError::Layer(format!(
                            "the image's files come to more than {} MiB (the limit, template_max_mb)",
                            self.max_bytes >> 20
                        )));
                    }
                    self.data.set(total);
                    f.write_all(&buf[..n])
                        .map_err(|e| io_err("write", comps, e))?;
                }
                // On the descriptor: chown (which clears set-id bits), then
                // the mode, then the times (after the last write).
                if let Some((u, g)) = owner {
                    rustix::fs::fchown(&f, Some(u), Some(g))
                        .map_err(|e| io_err("chown", comps, e))?;
                }
                rustix::fs::fchmod(&f, Mode::from_raw_mode(mode))
                    .map_err(|e| io_err("chmod", comps, e))?;
                let _ = rustix::fs::futimens(&f, &times);
            }
            E::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| io_err("symlink", comps, e))?
                    .ok_or_else(|| {
                        ImageError::Layer(format!("symlink /{} has no target", comps.join("/")))
                    })?
                    .into_owned();
                make(&mut || symlinkat(&target, dir, name), "symlink")?;
                self.own_and_mode(dir, name, comps, owner, None)?;
                let _ = utimensat(dir, name, &times, AtFlags::SYMLINK_NOFOLLOW);
            }
            E::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| io_err("link", comps, e))?
                    .ok_or_else(|| {
                        ImageError::Layer(format!("hard link /{} has no target", comps.join("/")))
                    })?
                    .into_owned();
                let tcomps = entry_components(&target)?;
                let Some((tname, tparent)) = tcomps.split_last() else {
                    return Err(ImageError::Layer(format!(
                        "hard link /{} to the rootfs itself refused",
                        comps.join("/")
                    )));
                };
                let tdir = open_dir_in_root(&self.root, tparent)
                    .map_err(|e| io_err("link target", &tcomps, e))?;
                // Shares the target's inode, owner and mode.
                make(
                    &mut || linkat(&tdir, tname.as_str(), dir, name, AtFlags::empty()),
                    "link",
                )?;
            }
            E::Fifo => {
                make(
                    &mut || mknodat(dir, name, FileType::Fifo, Mode::from_raw_mode(0o600), 0),
                    "mkfifo",
                )?;
                self.own_and_mode(dir, name, comps, owner, Some(mode))?;
                let _ = utimensat(dir, name, &times, AtFlags::SYMLINK_NOFOLLOW);
            }
            // pax/GNU headers are consumed by the tar crate; others ignored.
            _ => {}
        }
        Ok(replaced)
    }

    /// chown (never following), then chmod (chown clears set-id bits) of
    /// the entry `name` just made in `dir`.
    fn own_and_mode(
        &self,
        dir: &OwnedFd,
        name: &str,
        comps: &[String],
        owner: Option<(Uid, Gid)>,
        mode: Option<u32>,
    ) -> Result<(), ImageError> {
        if let Some((u, g)) = owner {
            chownat(dir, name, Some(u), Some(g), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| io_err("chown", comps, e))?;
        }
        if let Some(m) = mode {
            chmodat(dir, name, Mode::from_raw_mode(m), AtFlags::empty())
                .map_err(|e| io_err("chmod", comps, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    enum T<'a> {
        Dir(&'a str),
        File(&'a str, &'a str),
        Symlink(&'a str, &'a str),
        Hardlink(&'a str, &'a str),
        Char(&'a str),
    }

    /// A tar whose names are written raw (the tar crate's setters refuse
    /// `..`, which is the point here).
    fn tar_of(entries: &[T]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_ustar();
            let (name, kind, data, link): (&str, tar::EntryType, &[u8], Option<&str>) = match e {
                T::Dir(n) => (n, tar::EntryType::Directory, b"", None),
                T::File(n, d) => (n, tar::EntryType::Regular, d.as_bytes(), None),
                T::Symlink(n, l) => (n, tar::EntryType::Symlink, b"", Some(l)),
                T::Hardlink(n, l) => (n, tar::EntryType::Link, b"", Some(l)),
                T::Char(n) => (n, tar::EntryType::Char, b"", None),
            };
            let raw = &mut h.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(l) = link {
                h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(if kind == tar::EntryType::Directory {
                0o755
            } else {
                0o4755
            });
            h.set_uid(1000);
            h.set_gid(1000);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    struct Env {
        _tmp: tempfile::TempDir,
        outside: std::path::PathBuf,
        rootfs: std::path::PathBuf,
    }

    /// `<tmp>/outside/` (must stay untouched) and `<tmp>/a/b/rootfs`.
    fn env() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        let rootfs = tmp.path().join("a/b/rootfs");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::create_dir_all(&rootfs).unwrap();
        Env {
            _tmp: tmp,
            outside,
            rootfs,
        }
    }

    fn apply(e: &Env, layer: &[T]) -> Result<(), ImageError> {
        Unpacker::new(&e.rootfs, None)?.apply(&tar_of(layer)[..])
    }

    fn outside_empty(e: &Env) -> bool {
        std::fs::read_dir(&e.outside).unwrap().next().is_none()
            && !e.rootfs.parent().unwrap().join("x").exists()
            && !e
                .rootfs
                .parent()
                .unwrap()
                .parent()
                .unwrap()
                .join("x")
                .exists()
    }

    #[test]
    fn files_dirs_links_and_modes() {
        let e = env();
        apply(
            &e,
            &[
                T::Dir("etc/"),
                T::File("etc/hostname", "box\n"),
                T::File("usr/bin/tool", "#!/bin/sh\n"), // parents made on the way
                T::Symlink("bin", "usr/bin"),
                T::Hardlink("etc/hn2", "etc/hostname"),
                T::Char("dev/null"),
            ],
        )
        .unwrap();
        let r = &e.rootfs;
        assert_eq!(
            std::fs::read_to_string(r.join("etc/hostname")).unwrap(),
            "box\n"
        );
        assert_eq!(
            std::fs::read_link(r.join("bin")).unwrap(),
            Path::new("usr/bin")
        );
        let md = std::fs::metadata(r.join("usr/bin/tool")).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o4755, "setuid kept as data");
        assert_eq!(
            std::fs::metadata(r.join("etc/hn2")).unwrap().ino(),
            std::fs::metadata(r.join("etc/hostname")).unwrap().ino()
        );
        assert!(!r.join("dev/null").exists(), "device nodes are skipped");
    }

    #[test]
    fn dotdot_is_refused() {
        let e = env();
        for name in ["../x", "../../x", "etc/../../x", "./../outside/x"] {
            let err = apply(&e, &[T::File(name, "pwn")]).unwrap_err();
            assert!(matches!(err, ImageError::Layer(_)), "{name}: {err}");
        }
        assert!(outside_empty(&e));
    }

    #[test]
    fn absolute_paths_land_inside() {
        let e = env();
        let abs = format!("{}/x", e.outside.display());
        apply(&e, &[T::File("/etc/x", "in"), T::File(&abs, "in")]).unwrap();
        assert_eq!(
            std::fs::read_to_string(e.rootfs.join("etc/x")).unwrap(),
            "in"
        );
        assert!(e.rootfs.join(abs.trim_start_matches('/')).exists());
        assert!(outside_empty(&e));
    }

    #[test]
    fn writes_through_symlinks_stay_inside() {
        let e = env();
        let out = e.outside.display().to_string();
        // Same layer: symlinks out of the rootfs, then files through them.
        apply(
            &e,
            &[
                T::Dir("etc/"),
                T::Symlink("evil", "/etc"),
                T::File("evil/x", "pwn"),
                T::Symlink("up", "../../.."),
                T::File("up/x", "pwn"),
            ],
        )
        .unwrap();
        // They resolved as if the rootfs were `/`.
        assert!(e.rootfs.join("etc/x").exists());
        assert!(e.rootfs.join("x").exists());
        // Next layer: through a symlink planted by the previous one.
        apply(&e, &[T::Dir("evil/sub/"), T::File("evil/sub/y", "pwn")]).unwrap();
        assert!(e.rootfs.join("etc/sub/y").exists());
        // A link to the host's directory leads nowhere inside: refused.
        apply(&e, &[T::Symlink("host", &out)]).unwrap();
        assert!(apply(&e, &[T::File("host/x", "pwn")]).is_err());
        assert!(apply(&e, &[T::File("host/sub/x", "pwn")]).is_err());
        assert!(outside_empty(&e));
        // A symlink as the last component is replaced, never written through.
        apply(
            &e,
            &[
                T::Symlink("link", &format!("{out}/z")),
                T::File("link", "data"),
            ],
        )
        .unwrap();
        assert!(outside_empty(&e));
        assert!(std::fs::symlink_metadata(e.rootfs.join("link"))
            .unwrap()
            .is_file());
    }

    #[test]
    fn hardlinks_only_to_files_inside() {
        let e = env();
        std::fs::write(e.outside.join("secret"), "s").unwrap();
        let secret = format!("{}/secret", e.outside.display());
        // `..` in the target: refused.
        assert!(apply(&e, &[T::Hardlink("h1", "../../../outside/secret")]).is_err());
        // Absolute or through a symlink: resolved inside, where nothing is.
        assert!(apply(&e, &[T::Hardlink("h2", &secret)]).is_err());
        assert!(apply(
            &e,
            &[
                T::Symlink("o", &e.outside.display().to_string()),
                T::Hardlink("h3", "o/secret")
            ]
        )
        .is_err());
        for h in ["h1", "h2", "h3"] {
            assert!(!e.rootfs.join(h).exists(), "{h}");
        }
        assert_eq!(
            std::fs::metadata(e.outside.join("secret")).unwrap().nlink(),
            1
        );
    }

    #[test]
    fn whiteouts() {
        let e = env();
        apply(
            &e,
            &[
                T::File("a/keep", "1"),
                T::File("a/gone", "1"),
                T::File("d/old1", "1"),
                T::File("d/sub/old2", "1"),
                T::File("f", "1"),
            ],
        )
        .unwrap();
        apply(
            &e,
            &[
                T::File("a/.wh.gone", ""),
                T::File(".wh.f", ""),
                T::File("d/new", "2"), // same layer as the opaque marker: kept
                T::File("d/.wh..wh..opq", ""),
                T::File(".wh.nothing-there", ""),
            ],
        )
        .unwrap();
        let r = &e.rootfs;
        assert!(r.join("a/keep").exists() && !r.join("a/gone").exists());
        assert!(!r.join("f").exists());
        assert!(r.join("d/new").exists());
        assert!(!r.join("d/old1").exists() && !r.join("d/sub").exists());
        assert!(!r.join("a/.wh.gone").exists() && !r.join("d/.wh..wh..opq").exists());
        // A whiteout through a symlink removes nothing outside.
        std::fs::write(e.outside.join("keepme"), "k").unwrap();
        let out = e.outside.display().to_string();
        apply(&e, &[T::Symlink("o", &out), T::File("o/.wh.keepme", "")]).unwrap();
        assert!(apply(&e, &[T::File("o/.wh..wh..opq", "")]).is_err());
        assert!(e.outside.join("keepme").exists());
        assert!(apply(&e, &[T::File("a/.wh...", "")]).is_err());
    }

    #[test]
    fn a_file_replaces_a_directory_and_back() {
        let e = env();
        apply(&e, &[T::File("p/q/r", "1")]).unwrap();
        apply(&e, &[T::File("p", "file")]).unwrap();
        assert!(std::fs::symlink_metadata(e.rootfs.join("p"))
            .unwrap()
            .is_file());
        apply(&e, &[T::Dir("p/")]).unwrap();
        assert!(e.rootfs.join("p").is_dir());
    }
}
