//! A layer blob as the unpacker reads it: while it downloads, or from the
//! blob store.
//!
//! Owns the hand-over between a download (async: it hashes the stream and
//! appends it to the blob's temporary file) and the unpacker (a blocking
//! thread reading that file behind the writer, so a layer is unpacked while
//! it arrives), and the re-verification of a blob already in the store as
//! it is read (a blob is never fsynced: one torn by a crash fails its digest
//! here, is removed, and the pull fetches it again).
//!
//! Must not: let a reader see the end of a blob before its digest and size
//! are verified ([`LayerReader::finish`] is the verdict; the unpacker works
//! in an invisible staging tree that it keeps only when every layer's
//! verdict is `Ok`); leave a reader waiting for a writer that is gone (a
//! writer dropped without a verdict ends the feed with an error); block an
//! async worker (a writer only takes a short lock).

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use super::ImageError;

/// The verdict of a feed whose writer went away without one (the pull was
/// cancelled, or another layer's download failed).
pub(crate) const STOPPED: &str = "download stopped";

#[derive(Default)]
struct State {
    /// Bytes the writer has put in the file.
    written: u64,
    /// Set once: `Ok` only when the whole blob matched its digest and size.
    verdict: Option<Result<(), ImageError>>,
}

/// The writer's side of a blob being downloaded.
#[derive(Default)]
pub(crate) struct Feed {
    state: Mutex<State>,
    cv: Condvar,
}

impl Feed {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `n` more bytes are in the file (written, not only buffered).
    pub(crate) fn advance(&self, n: u64) {
        self.lock().written += n;
        self.cv.notify_all();
    }

    /// The verdict (the first one given counts).
    pub(crate) fn end(&self, verdict: Result<(), ImageError>) {
        let mut st = self.lock();
        if st.verdict.is_none() {
            st.verdict = Some(verdict);
        }
        drop(st);
        self.cv.notify_all();
    }
}

/// Gives a feed the verdict [`STOPPED`] when dropped before its writer
/// gave one.
pub(crate) struct EndOnDrop(pub(crate) Arc<Feed>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.end(Err(ImageError::Io(STOPPED.into())));
    }
}

enum Source {
    /// A download in flight: read up to what the writer has written.
    Live(Arc<Feed>),
    /// A blob in the store: hashed as it is read.
    Stored {
        hasher: Sha256,
        digest: String,
        size: u64,
        path: PathBuf,
    },
}

/// One layer's bytes, in order, for the unpacker (a blocking thread).
pub(crate) struct LayerReader {
    file: Arc<File>,
    pos: u64,
    source: Source,
    cancel: Arc<AtomicBool>,
    /// Set when a stored blob turned out corrupt (and was removed).
    corrupt_stored: Arc<AtomicBool>,
}

/// How long a reader waits for its writer before it looks at `cancel`.
const POLL: Duration = Duration::from_millis(100);

impl LayerReader {
    /// A reader behind the writer of `feed`; `file` is the blob's temporary
    /// file (read with `pread`, so it may share the writer's descriptor).
    pub(crate) fn live(file: Arc<File>, feed: Arc<Feed>, cancel: Arc<AtomicBool>) -> Self {
        LayerReader {
            file,
            pos: 0,
            source: Source::Live(feed),
            cancel,
            corrupt_stored: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A reader of a blob in the store (`file` opened on `path`).
    pub(crate) fn stored(
        file: File,
        path: PathBuf,
        digest: String,
        size: u64,
        cancel: Arc<AtomicBool>,
        corrupt_stored: Arc<AtomicBool>,
    ) -> Self {
        LayerReader {
            file: Arc::new(file),
            pos: 0,
            source: Source::Stored {
                hasher: Sha256::new(),
                digest,
                size,
                path,
            },
            cancel,
            corrupt_stored,
        }
    }

    fn cancelled(&self) -> io::Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(io::Error::other("pull cancelled"))
        } else {
            Ok(())
        }
    }

    /// The verdict on the whole blob, read or not: waits for the download's
    /// (its digest and size checked by the writer), or hashes what was not
    /// read yet of a stored blob; a stored blob that does not match is
    /// removed from the store.
    pub(crate) fn finish(&mut self) -> Result<(), ImageError> {
        let cancelled = || ImageError::Io("pull cancelled".into());
        match &self.source {
            Source::Live(feed) => {
                let mut st = feed.lock();
                loop {
                    if let Some(v) = &st.verdict {
                        return v.clone();
                    }
                    if self.cancel.load(Ordering::Relaxed) {
                        return Err(cancelled());
                    }
                    st = feed
                        .cv
                        .wait_timeout(st, POLL)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
            Source::Stored { .. } => {
                let mut buf = vec![0u8; 256 << 10];
                loop {
                    match self.read(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(ImageError::Io(format!("read a stored blob: {e}"))),
                    }
                }
                let Source::Stored {
                    hasher,
                    digest,
                    size,
                    path,
                } = &mut self.source
                else {
                    unreachable!("matched above");
                };
                let actual = format!("sha256:{}", hex::encode(std::mem::take(hasher).finalize()));
                if actual == *digest && self.pos == *size {
                    return Ok(());
                }
                let _ = std::fs::remove_file(&*path);
                self.corrupt_stored.store(true, Ordering::Relaxed);
                Err(ImageError::Digest {
                    digest: digest.clone(),
                    actual: format!(
                        "{actual} ({} bytes) in the blob store: removed, to be fetched again",
                        self.pos
                    ),
                })
            }
        }
    }
}

impl Read for LayerReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.cancelled()?;
        if buf.is_empty() {
            return Ok(0);
        }
        match &mut self.source {
            Source::Live(feed) => {
                let avail = {
                    let mut st = feed.lock();
                    loop {
                        if st.written > self.pos {
                            break st.written - self.pos;
                        }
                        match &st.verdict {
                            Some(Ok(())) => return Ok(0),
                            Some(Err(e)) => return Err(io::Error::other(e.to_string())),
                            None => {}
                        }
                        if self.cancel.load(Ordering::Relaxed) {
                            return Err(io::Error::other("pull cancelled"));
                        }
                        st = feed
                            .cv
                            .wait_timeout(st, POLL)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                };
                let want = buf.len().min(usize::try_from(avail).unwrap_or(usize::MAX));
                let n = self.file.read_at(&mut buf[..want], self.pos)?;
                if n == 0 {
                    return Err(io::Error::other("blob file shorter than written"));
                }
                self.pos += n as u64;
                Ok(n)
            }
            Source::Stored { hasher, .. } => {
                let n = (&*self.file).read(buf)?;
                hasher.update(&buf[..n]);
                self.pos += n as u64;
                Ok(n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_reader_follows_its_writer_and_ends_only_with_the_verdict() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("blob");
        let mut w = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .unwrap();
        let file = Arc::new(w.try_clone().unwrap());
        let feed = Arc::new(Feed::default());
        let cancel = Arc::new(AtomicBool::new(false));
        let mut r = LayerReader::live(file, feed.clone(), cancel.clone());
        let writer = {
            let feed = feed.clone();
            std::thread::spawn(move || {
                for i in 0..50u8 {
                    w.write_all(&[i; 1000]).unwrap();
                    feed.advance(1000);
                }
                feed.end(Ok(()));
            })
        };
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        writer.join().unwrap();
        assert_eq!(all.len(), 50_000);
        assert!(all.chunks(1000).enumerate().all(|(i, c)| c[0] == i as u8));
        assert!(r.finish().is_ok());

        // A failed verdict reaches a reader that has read everything.
        let feed = Arc::new(Feed::default());
        let f = Arc::new(File::open(&p).unwrap());
        let mut r = LayerReader::live(f.clone(), feed.clone(), cancel.clone());
        feed.advance(10);
        let mut buf = [0u8; 10];
        r.read_exact(&mut buf).unwrap();
        feed.end(Err(ImageError::Digest {
            digest: "d".into(),
            actual: "x".into(),
        }));
        assert!(r.read(&mut buf).is_err());
        assert!(matches!(r.finish(), Err(ImageError::Digest { .. })));

        // A writer dropped without a verdict; a cancelled pull.
        let feed = Arc::new(Feed::default());
        let mut r = LayerReader::live(f.clone(), feed.clone(), cancel.clone());
        drop(EndOnDrop(feed));
        assert!(matches!(r.finish(), Err(ImageError::Io(m)) if m == STOPPED));
        let mut r = LayerReader::live(f, Arc::new(Feed::default()), cancel.clone());
        cancel.store(true, Ordering::Relaxed);
        assert!(r.read(&mut buf).is_err() && r.finish().is_err());
    }

    #[test]
    fn a_stored_blob_is_verified_and_removed_when_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("blob");
        std::fs::write(&p, b"hello").unwrap();
        let good = format!("sha256:{}", hex::encode(Sha256::digest(b"hello")));
        let cancel = Arc::new(AtomicBool::new(false));
        let corrupt = Arc::new(AtomicBool::new(false));
        let open = |digest: &str| {
            LayerReader::stored(
                File::open(&p).unwrap(),
                p.clone(),
                digest.to_string(),
                5,
                cancel.clone(),
                corrupt.clone(),
            )
        };
        let mut r = open(&good);
        let mut two = [0u8; 2];
        r.read_exact(&mut two).unwrap();
        assert!(r.finish().is_ok(), "the rest is hashed too");
        assert!(!corrupt.load(Ordering::Relaxed));
        let mut r = open(&format!("sha256:{}", "0".repeat(64)));
        assert!(matches!(r.finish(), Err(ImageError::Digest { .. })));
        assert!(corrupt.load(Ordering::Relaxed) && !p.exists());
    }
}
