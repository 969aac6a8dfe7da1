//! `GET /v1/rootfs?max_bytes=N`: the sandbox's own root filesystem as one
//! tar stream (saving a sandbox as a template, issue 12).
//!
//! Owns: walking `/` from the agent's root descriptor with `openat`
//! (`O_NOFOLLOW`) and `statat(AT_SYMLINK_NOFOLLOW)`, one filesystem only
//! (a mount point of `/proc/self/mountinfo`, or a directory on another
//! device, is sent empty, a file mounted over another left out: `/proc`,
//! `/sys`, `/dev`, host mounts, the agent's own `/.sandforge`; a regular
//! file's `st_dev` is not compared, since overlayfs reports the lower
//! layer's device for files),
//! with `/run` sent empty too; regular files (their size at `stat` time,
//! padded with zeros or cut if they change while read), directories,
//! symlinks (as links, never followed), hard links (as tar links to the
//! first name seen). Device nodes, FIFOs and sockets are left out, and so
//! are names that are not UTF-8. The sum of the files' sizes is bounded by
//! `max_bytes`: past it the stream is aborted (a reset, not a short tar).
//!
//! Must not: follow a symlink, open a FIFO or device, or be trusted: the
//! host treats this stream as hostile (a command running as root in the
//! sandbox can replace this process) and checks every entry and byte count
//! itself.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use rustix::fs::{openat, statat, AtFlags, Dir, FileType, Mode, OFlags, Stat};

use crate::reply::{self, ApiError, Body, BodySender};
use crate::server::Agent;

/// Top-level directories sent without their contents.
const EMPTY_DIRS: &[&str] = &["proc", "sys", "dev", "run", ".sandforge"];
/// Deepest directory nesting walked (deeper trees abort the stream).
const MAX_DEPTH: usize = 512;

/// `GET /v1/rootfs`: answer 200 at once and stream the tar from a blocking
/// task; an error mid-way aborts the body.
pub async fn get(agent: Arc<Agent>, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let mut max_bytes = u64::MAX;
    for (k, v) in crate::query::decode_pairs(query.unwrap_or(""))
        .map_err(|e| ApiError::bad_request(e.to_string()))?
    {
        if k == "max_bytes" {
            max_bytes = v
                .parse()
                .map_err(|_| ApiError::bad_request("max_bytes: not a number"))?;
        }
    }
    let root = rustix::io::dup(&agent.root).map_err(|e| ApiError::io(format!("dup /: {e}")))?;
    // A first pass (stat only) refuses a tree over the limit with a clear
    // answer before any byte is sent.
    let root =
        crate::files::blocking(
            move || match write_tar(&root, io::sink(), max_bytes, true) {
                Ok(()) => Ok(root),
                Err(e) if e.kind() == io::ErrorKind::FileTooLarge => {
                    Err(ApiError::too_large(e.to_string()))
                }
                Err(e) => Err(ApiError::io(format!("reading the root filesystem: {e}"))),
            },
        )
        .await?;
    let (tx, body) = reply::channel(8);
    tokio::task::spawn_blocking(move || {
        let writer = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
        };
        if let Err(e) = write_tar(&root, writer, max_bytes, false) {
            let _ = tx.blocking_send(Err(e));
        }
    });
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-tar"),
    );
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}

const CHUNK: usize = 256 * 1024;

/// A `Write` that sends 256 KiB pieces down the body channel (blocking:
/// back-pressure from a slow host).
struct ChannelWriter {
    tx: BodySender,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(Ok(Bytes::from(piece)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "host went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Mount points below `/` (relative paths), from `/proc/self/mountinfo`.
fn mount_points() -> HashSet<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return HashSet::new();
    };
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| {
            // Octal escapes: \040 space, \011 tab, \012 newline, \134 backslash.
            let b = m.as_bytes();
            let mut out = Vec::with_capacity(b.len());
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'\\'
                    && i + 3 < b.len()
                    && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
                {
                    let v = (b[i + 1] - b'0') as u32 * 64
                        + (b[i + 2] - b'0') as u32 * 8
                        + (b[i + 3] - b'0') as u32;
                    out.push(v as u8);
                    i += 4;
                } else {
                    out.push(b[i]);
                    i += 1;
                }
            }
            PathBuf::from(OsStr::from_bytes(&out).to_owned())
                .strip_prefix("/")
                .map(PathBuf::from)
                .unwrap_or_default()
        })
        .filter(|p| !p.as_os_str().is_empty())
        .collect()
}

struct Walk<W: Write> {
    tar: tar::Builder<W>,
    mounts: HashSet<PathBuf>,
    root_dev: u64,
    /// (dev, ino) of multiply linked files already sent → their name.
    links: HashMap<(u64, u64), PathBuf>,
    budget: u64,
    /// Only sum the sizes (nothing read, nothing written).
    measure: bool,
}

fn errno(e: rustix::io::Errno) -> io::Error {
    e.into()
}

fn write_tar<W: Write>(root: &OwnedFd, out: W, max_bytes: u64, measure: bool) -> io::Result<()> {
    let dir = openat(
        root,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno)?;
    let st = rustix::fs::fstat(&dir).map_err(errno)?;
    let mut tar = tar::Builder::new(out);
    tar.mode(tar::HeaderMode::Complete);
    let mut w = Walk {
        tar,
        mounts: mount_points(),
        root_dev: st.st_dev,
        links: HashMap::new(),
        budget: max_bytes,
        measure,
    };
    w.dir_contents(&dir, Path::new(""), 0)?;
    let mut out = w.tar.into_inner()?;
    out.flush()
}

fn header_for(st: &Stat, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(st.st_mode & 0o7777);
    h.set_uid(u64::from(st.st_uid));
    h.set_gid(u64::from(st.st_gid));
    #[allow(clippy::unnecessary_cast)]
    h.set_mtime((st.st_mtime as i64).max(0) as u64);
    h.set_size(0);
    h
}

impl<W: Write> Walk<W> {
    fn dir_contents(&mut self, dir: &OwnedFd, path: &Path, depth: usize) -> io::Result<()> {
        if depth > MAX_DEPTH {
            return Err(io::Error::other(format!(
                "{} is nested deeper than {MAX_DEPTH} directories",
                path.display()
            )));
        }
        let listing = openat(
            dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        let mut names: Vec<Vec<u8>> = Vec::new();
        for ent in Dir::read_from(&listing).map_err(errno)? {
            let ent = ent.map_err(errno)?;
            let n = ent.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(n.to_vec());
            }
        }
        names.sort();
        for name in names {
            if std::str::from_utf8(&name).is_err() {
                continue;
            }
            let os = OsStr::from_bytes(&name);
            let child = path.join(os);
            let st = match statat(dir, os, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(rustix::io::Errno::NOENT) => continue, // removed meanwhile
                Err(e) => return Err(errno(e)),
            };
            self.entry(dir, os, &child, &st, depth)?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        dir: &OwnedFd,
        name: &OsStr,
        path: &Path,
        st: &Stat,
        depth: usize,
    ) -> io::Result<()> {
        let mounted = self.mounts.contains(path);
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                if !self.measure {
                    let mut h = header_for(st, tar::EntryType::Directory);
                    self.tar.append_data(&mut h, path, io::empty())?;
                }
                let top_skip = depth == 0 && EMPTY_DIRS.iter().any(|d| OsStr::new(d) == name);
                if top_skip || mounted || st.st_dev != self.root_dev {
                    return Ok(());
                }
                let sub = match openat(
                    dir,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(rustix::io::Errno::NOENT) => return Ok(()),
                    Err(e) => return Err(errno(e)),
                };
                // Replaced by another directory (or a mount) meanwhile.
                let now = rustix::fs::fstat(&sub).map_err(errno)?;
                if now.st_dev != self.root_dev {
                    return Ok(());
                }
                self.dir_contents(&sub, path, depth + 1)
            }
            _ if mounted => Ok(()), // a file mounted over the rootfs
            FileType::Symlink if self.measure => Ok(()),
            FileType::Symlink => {
                let target = match rustix::fs::readlinkat(dir, name, Vec::new()) {
                    Ok(t) => t,
                    Err(rustix::io::Errno::NOENT) => return Ok(()),
                    Err(e) => return Err(errno(e)),
                };
                let target = OsStr::from_bytes(target.as_bytes()).to_owned();
                let mut h = header_for(st, tar::EntryType::Symlink);
                self.tar.append_link(&mut h, path, target)
            }
            FileType::RegularFile => {
                let key = (st.st_dev, st.st_ino);
                if st.st_nlink > 1 {
                    if let Some(first) = self.links.get(&key) {
                        let mut h = header_for(st, tar::EntryType::Link);
                        let first = first.clone();
                        return self.tar.append_link(&mut h, path, first);
                    }
                }
                let size = st.st_size.max(0) as u64;
                if size > self.budget {
                    return Err(io::Error::new(
                        io::ErrorKind::FileTooLarge,
                        format!(
                            "the root filesystem is larger than the limit ({} is {size} bytes)",
                            path.display()
                        ),
                    ));
                }
                self.budget -= size;
                if self.measure {
                    if st.st_nlink > 1 {
                        self.links.insert(key, path.to_path_buf());
                    }
                    return Ok(());
                }
                let fd = match openat(
                    dir,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(rustix::io::Errno::NOENT) => return Ok(()),
                    Err(e) => return Err(errno(e)),
                };
                let now = rustix::fs::fstat(&fd).map_err(errno)?;
                if FileType::from_raw_mode(now.st_mode) != FileType::RegularFile {
                    return Ok(()); // swapped for something else meanwhile
                }
                let mut h = header_for(st, tar::EntryType::Regular);
                h.set_size(size);
                // Exactly `size` bytes: cut if it grew, zeros if it shrank.
                let data = File::from(fd).take(size).chain(io::repeat(0)).take(size);
                self.tar.append_data(&mut h, path, data)?;
                if st.st_nlink > 1 {
                    self.links.insert(key, path.to_path_buf());
                }
                Ok(())
            }
            // Devices, FIFOs, sockets: not part of a template.
            _ => Ok(()),
        }
    }
}
