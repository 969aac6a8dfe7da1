//! `PUT` on `/v1/files`: atomically replace a file with the request body.
//!
//! Owns: creating missing parent directories (0755, each step resolved with
//! `openat2` + `RESOLVE_NO_MAGICLINKS`), streaming the body into a temporary
//! file next to the target, enforcing `MAX_FILE_BYTES`, then fsync, fchmod,
//! rename over the target and fsync of the directory, so that a reader sees
//! either the old or the complete new content, never a partial one.
//!
//! Must not: write to the target path directly, leave temporary files behind
//! (a guard removes them on every failure path, including a cancelled
//! request), or buffer the whole body in memory.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use rustix::fs::{openat2, AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use sandforge_agent_proto::{parse_mode, FileQuery, MAX_FILE_BYTES};
use tokio::sync::mpsc;

use crate::files::{blocking, check_path, errno_error, open_guest};
use crate::reply::{self, ApiError, Body};
use crate::server::Agent;

/// Mode of a file written without `mode`.
const DEFAULT_MODE: u32 = 0o644;
/// Mode of created parent directories (before umask).
const DIR_MODE: u32 = 0o755;
/// Longest part of the target name kept in the temporary file's name.
const TMP_NAME_KEEP: usize = 128;

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Handle `PUT /v1/files?path=..&mode=..`.
pub async fn put(
    agent: Arc<Agent>,
    q: FileQuery,
    content_length: Option<u64>,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    check_path(&q.path)?;
    let mode = match q.mode.as_deref() {
        None => DEFAULT_MODE,
        Some(m) => parse_mode(m).ok_or_else(|| {
            ApiError::bad_request(format!("bad mode {m:?}: want octal such as 0644"))
        })?,
    };
    if content_length.is_some_and(|n| n > MAX_FILE_BYTES) {
        return Err(too_large());
    }
    let path = q.path.clone();
    let temp = blocking(move || prepare(&agent.root, &path)).await?;
    let temp = Arc::new(temp);

    // A blocking writer drains a small queue; the async side enforces the limit.
    let (chunks_tx, chunks_rx) = mpsc::channel::<Bytes>(8);
    let writer = {
        let temp = temp.clone();
        tokio::task::spawn_blocking(move || write_chunks(&temp.file, chunks_rx))
    };
    let mut body = body;
    let mut total: u64 = 0;
    let mut failure = None;
    while let Some(frame) = body.frame().await {
        let data = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers
            },
            Err(e) => {
                failure = Some(ApiError::bad_request(format!("reading upload body: {e}")));
                break;
            }
        };
        total += data.len() as u64;
        if total > MAX_FILE_BYTES {
            failure = Some(too_large());
            break;
        }
        if chunks_tx.send(data).await.is_err() {
            break; // the writer failed; its error is reported below
        }
    }
    drop(chunks_tx);
    let written = writer.await.unwrap_or_else(|e| Err(io::Error::other(e)));
    if let Some(err) = failure {
        return Err(err); // `temp` is removed by its guard
    }
    written.map_err(|e| match e.raw_os_error() {
        Some(n) if n == libc::ENOSPC || n == libc::EDQUOT => {
            errno_error(Errno::from_raw_os_error(n), &q.path)
        }
        _ => ApiError::io(format!("{}: writing: {e}", q.path)),
    })?;
    let path = q.path.clone();
    blocking(move || {
        let temp = Arc::try_unwrap(temp).map_err(|_| ApiError::io("temp file still in use"))?;
        commit(temp, mode, &path)
    })
    .await?;
    Ok(reply::empty(StatusCode::NO_CONTENT))
}

fn too_large() -> ApiError {
    ApiError::too_large(format!("file exceeds the {MAX_FILE_BYTES} byte limit"))
}

/// A temporary file in the target's directory, unlinked on drop unless committed.
struct TempFile {
    dir: OwnedFd,
    name: String,
    target: String,
    file: File,
    committed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = rustix::fs::unlinkat(&self.dir, self.name.as_str(), AtFlags::empty());
        }
    }
}

/// Open (creating as needed) the parent directory, check the target is not a
/// directory, and create the temporary file.
fn prepare(root: &OwnedFd, path: &str) -> Result<TempFile, ApiError> {
    let comps: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    let (name, parents) = comps.split_last().expect("validated path has a component");
    let dir = open_parents(root, parents, path)?;
    match rustix::fs::statat(&dir, *name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            return Err(ApiError::is_directory(format!("{path} is a directory")))
        }
        Ok(_) | Err(Errno::NOENT) => {}
        Err(e) => return Err(errno_error(e, path)),
    }
    let keep = floor_char_boundary(name, TMP_NAME_KEEP);
    for _ in 0..16 {
        let nonce = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let tmp = format!(
            ".{}.sf-tmp-{}-{}-{nonce:x}",
            &name[..keep],
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed),
        );
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match openat2(
            &dir,
            tmp.as_str(),
            flags,
            Mode::from_raw_mode(0o600),
            ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => {
                return Ok(TempFile {
                    dir,
                    name: tmp,
                    target: (*name).to_string(),
                    file: File::from(fd),
                    committed: false,
                })
            }
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(errno_error(e, path)),
        }
    }
    Err(ApiError::io(format!(
        "{path}: could not create a temporary file"
    )))
}

/// Walk (and create) the parent directories one component at a time.
fn open_parents(root: &OwnedFd, parents: &[&str], path: &str) -> Result<OwnedFd, ApiError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY;
    let mut dir = open_guest(root, ".", flags)?;
    for comp in parents {
        let open = |dir: &OwnedFd| {
            openat2(
                dir,
                *comp,
                flags | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::NO_MAGICLINKS,
            )
        };
        let next = match open(&dir) {
            Err(Errno::NOENT) => {
                match rustix::fs::mkdirat(&dir, *comp, Mode::from_raw_mode(DIR_MODE)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(errno_error(e, path)),
                }
                open(&dir)
            }
            other => other,
        };
        dir = next.map_err(|e| match e {
            Errno::NOTDIR => {
                ApiError::not_directory(format!("{path}: {comp:?} is not a directory"))
            }
            e => errno_error(e, path),
        })?;
    }
    Ok(dir)
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    let mut i = s.len().min(max);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn write_chunks(mut file: &File, mut rx: mpsc::Receiver<Bytes>) -> io::Result<()> {
    while let Some(chunk) = rx.blocking_recv() {
        file.write_all(&chunk)?;
    }
    Ok(())
}

/// Make the temporary file durable, give it its mode, and rename it over the target.
fn commit(mut temp: TempFile, mode: u32, path: &str) -> Result<(), ApiError> {
    let fail = |e: Errno| match e {
        Errno::ISDIR => ApiError::is_directory(format!("{path} is a directory")),
        e => errno_error(e, path),
    };
    rustix::fs::fchmod(&temp.file, Mode::from_raw_mode(mode)).map_err(fail)?;
    rustix::fs::fsync(&temp.file).map_err(fail)?;
    rustix::fs::renameat(
        &temp.dir,
        temp.name.as_str(),
        &temp.dir,
        temp.target.as_str(),
    )
    .map_err(fail)?;
    temp.committed = true;
    rustix::fs::fsync(&temp.dir).map_err(fail)?;
    Ok(())
}
