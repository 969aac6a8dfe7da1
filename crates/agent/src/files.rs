//! `GET`/`HEAD` on `/v1/files`: read a file, list a directory, stat a path.
//!
//! Owns: turning a guest path into an open fd safely (path rules from the
//! protocol crate, then `openat2` from the fd of `/` with
//! `RESOLVE_NO_MAGICLINKS` so `/proc/*/root`-style links cannot be used to
//! escape), mapping errno to `AgentError` codes, streamed downloads with the
//! line/byte window of [`crate::lines`], and directory listings.
//!
//! Must not: read a whole file into memory, follow magic links, or block the
//! async runtime on file I/O (everything blocking runs in `spawn_blocking`).

use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use rustix::fs::{openat2, AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;
use sandforge_agent_proto::{
    format_mode, validate_guest_path, DirEntry, FileQuery, HDR_FILE_ISDIR, HDR_FILE_MODE,
    HDR_FILE_SIZE, HDR_TRUNCATED, MAX_LIST_ENTRIES,
};

use crate::lines::RangeScan;
use crate::reply::{self, ApiError, Body};
use crate::server::Agent;

/// Size of one read from disk (and of one body chunk).
const CHUNK: usize = 64 * 1024;

/// Check the protocol's path rules.
pub fn check_path(path: &str) -> Result<(), ApiError> {
    validate_guest_path(path).map_err(|e| ApiError::invalid_path(format!("{path:?}: {e}")))
}

/// Open a validated guest path relative to the agent's `/`, refusing magic links.
pub fn open_guest(root: &OwnedFd, path: &str, flags: OFlags) -> Result<OwnedFd, ApiError> {
    let rel = path.trim_start_matches('/');
    openat2(
        root,
        rel,
        flags | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| errno_error(e, path))
}

/// Map an errno from resolving or using `path` to an `AgentError`.
pub fn errno_error(e: Errno, path: &str) -> ApiError {
    match e {
        Errno::NOENT | Errno::NOTDIR => {
            ApiError::not_found(format!("{path}: no such file or directory"))
        }
        Errno::LOOP | Errno::XDEV => ApiError::path_escape(format!(
            "{path}: resolving the path crosses a magic link (or loops through symlinks)"
        )),
        Errno::ISDIR => ApiError::is_directory(format!("{path} is a directory")),
        Errno::NAMETOOLONG => ApiError::invalid_path(format!("{path}: name too long")),
        Errno::NOSPC | Errno::DQUOT => {
            ApiError::no_space(format!("{path}: no space left on the sandbox's disk"))
        }
        other => ApiError::io(format!("{path}: {}", io::Error::from(other))),
    }
}

/// Run blocking file work off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ApiError::io(format!("file task failed: {e}"))))
}

fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// `HEAD`: size, mode and directory flag of a path (symlinks followed).
pub async fn head(agent: Arc<Agent>, q: FileQuery) -> Result<Response<Body>, ApiError> {
    check_path(&q.path)?;
    let st = blocking(move || {
        let fd = open_guest(&agent.root, &q.path, OFlags::PATH)?;
        rustix::fs::fstat(&fd).map_err(|e| errno_error(e, &q.path))
    })
    .await?;
    let mut resp = reply::empty(StatusCode::OK);
    let h = resp.headers_mut();
    h.insert(HDR_FILE_SIZE, HeaderValue::from(st.st_size.max(0) as u64));
    h.insert(HDR_FILE_MODE, header_str(&format_mode(st.st_mode)));
    let is_dir = file_type(&st) == FileType::Directory;
    h.insert(
        HDR_FILE_ISDIR,
        HeaderValue::from_static(if is_dir { "true" } else { "false" }),
    );
    Ok(resp)
}

fn header_str(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("ascii header value")
}

/// What a `GET` turned out to be, decided off the async threads.
enum Get {
    Listing(Vec<DirEntry>),
    Range {
        file: File,
        size: u64,
        start: u64,
        end: u64,
    },
}

/// `GET`: a directory listing (`ls=true`) or a (windowed) file download.
pub async fn get(agent: Arc<Agent>, q: FileQuery) -> Result<Response<Body>, ApiError> {
    check_path(&q.path)?;
    let plan = blocking(move || {
        // O_NONBLOCK: opening a FIFO must not hang (it is refused below).
        let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY;
        let fd = open_guest(&agent.root, &q.path, flags)?;
        let st = rustix::fs::fstat(&fd).map_err(|e| errno_error(e, &q.path))?;
        let kind = file_type(&st);
        if q.ls.unwrap_or(false) {
            if kind != FileType::Directory {
                return Err(ApiError::not_directory(format!(
                    "{} is not a directory",
                    q.path
                )));
            }
            return list_dir(fd, &q.path).map(Get::Listing);
        }
        match kind {
            FileType::RegularFile => {}
            FileType::Directory => {
                return Err(ApiError::is_directory(format!(
                    "{} is a directory (use ls=true to list it)",
                    q.path
                )))
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "{} is not a regular file",
                    q.path
                )))
            }
        }
        let size = st.st_size.max(0) as u64;
        let mut file = File::from(fd);
        let (start, end) = scan_range(&mut file, size, &q).map_err(|e| io_error(e, &q.path))?;
        Ok(Get::Range {
            file,
            size,
            start,
            end,
        })
    })
    .await?;

    match plan {
        Get::Listing(entries) => Ok(reply::json(StatusCode::OK, &entries)),
        Get::Range {
            file,
            size,
            start,
            end,
        } => {
            let truncated = start > 0 || end < size;
            let (tx, body) = reply::channel(4);
            tokio::spawn(stream_range(Arc::new(file), start, end, tx));
            let mut resp = Response::new(body);
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(HDR_FILE_SIZE, HeaderValue::from(size));
            if truncated {
                h.insert(HDR_TRUNCATED, HeaderValue::from_static("true"));
            } else {
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
            }
            Ok(resp)
        }
    }
}

fn io_error(e: io::Error, path: &str) -> ApiError {
    match e.raw_os_error() {
        Some(n) => errno_error(Errno::from_raw_os_error(n), path),
        None => ApiError::io(format!("{path}: {e}")),
    }
}

/// Find the `[start, end)` window of a GET, reading only as far as needed.
fn scan_range(file: &mut File, size: u64, q: &FileQuery) -> io::Result<(u64, u64)> {
    let mut scan = RangeScan::new(q.offset, q.limit, q.max_bytes);
    if !scan.is_done() {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if scan.feed(&buf[..n]) {
                break;
            }
        }
    }
    Ok(scan.finish(size))
}

/// Send `[start, end)` of `file` as body chunks; an error (including the file
/// shrinking underneath us) aborts the stream rather than ending it short.
async fn stream_range(file: Arc<File>, start: u64, end: u64, tx: reply::BodySender) {
    let mut pos = start;
    while pos < end {
        let want = CHUNK.min((end - pos) as usize);
        let f = file.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; want];
            loop {
                match f.read_at(&mut buf, pos) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Ok(n) => {
                        buf.truncate(n);
                        return Ok(buf);
                    }
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        let item = match read {
            Ok(buf) if buf.is_empty() => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while reading",
            )),
            Ok(buf) => {
                pos += buf.len() as u64;
                Ok(Bytes::from(buf))
            }
            Err(e) => Err(e),
        };
        let failed = item.is_err();
        if tx.send(item).await.is_err() || failed {
            return;
        }
    }
}

/// List a directory: the first [`MAX_LIST_ENTRIES`] names in byte order
/// (bounded memory however big the directory), each `lstat`ed, plus a
/// truncation sentinel when there were more.
fn list_dir(fd: OwnedFd, path: &str) -> Result<Vec<DirEntry>, ApiError> {
    let mut dir = Dir::read_from(&fd).map_err(|e| errno_error(e, path))?;
    // Max-heap of the smallest names seen so far.
    let mut keep: BinaryHeap<Vec<u8>> = BinaryHeap::with_capacity(MAX_LIST_ENTRIES + 1);
    let mut total: u64 = 0;
    while let Some(entry) = dir.read() {
        let entry = entry.map_err(|e| errno_error(e, path))?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        total += 1;
        if keep.len() < MAX_LIST_ENTRIES {
            keep.push(name.to_vec());
        } else if keep.peek().is_some_and(|largest| name < largest.as_slice()) {
            keep.pop();
            keep.push(name.to_vec());
        }
    }
    let mut out = Vec::with_capacity(keep.len() + 1);
    for name in keep.into_sorted_vec() {
        let st = match rustix::fs::statat(&fd, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => continue, // removed while listing
            Err(e) => return Err(errno_error(e, path)),
        };
        out.push(DirEntry {
            name: String::from_utf8_lossy(&name).into_owned(),
            size: st.st_size.max(0) as u64,
            mode: format_mode(st.st_mode),
            is_dir: file_type(&st) == FileType::Directory,
            // The kernel's field type differs between architectures.
            #[allow(clippy::unnecessary_cast)]
            mtime: st.st_mtime as i64,
            truncated: false,
            total: None,
        });
    }
    if total > MAX_LIST_ENTRIES as u64 {
        out.push(DirEntry {
            name: "...".into(),
            size: total,
            mode: "0000".into(),
            is_dir: false,
            mtime: 0,
            truncated: true,
            total: Some(total),
        });
    }
    Ok(out)
}
