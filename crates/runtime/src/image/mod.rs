//! OCI images from a registry into a template directory.
//!
//! Owns: resolving a reference (`localhost:5000/team/python:3.12`,
//! `...@sha256:<hex>`) against a distribution registry with `oci-client`,
//! choosing the linux/amd64 manifest, the content-addressed blob store
//! `<blob_dir>/sha256/<hex>` (shared by every template; a blob is verified
//! while it streams and renamed into place only when its digest matches, and
//! never fetched twice), and unpacking the layers into
//! `<dest>/rootfs` (whiteouts applied, ownership shifted, see [`unpack`])
//! with a `template.json` that [`crate::TemplateStore::get`] reads.
//!
//! Must not: trust anything in an image (names, links, sizes, digests the
//! registry sends); talk plain HTTP to anything but a loopback registry;
//! leave a half-made template behind (the tree is built in
//! `<dest>.tmp-<rand>`, renamed, and `template.json` is written last); know
//! about the database, template ids or HTTP routes (the caller owns those,
//! and the garbage collection of blobs no template uses any more).

mod archive;
mod feed;
pub mod reference;
pub mod unpack;

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

pub use reference::{is_loopback_registry, parse_reference};

/// What a pull may use.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The shared blob store: blobs live at `<blob_dir>/sha256/<hex>`.
    pub blob_dir: PathBuf,
    /// Added to every uid/gid of the image (100000: root inside a
    /// user-namespaced container).
    pub uid_shift: u32,
    /// HTTP basic credentials (`user`, `password`), if the registry wants them.
    pub credentials: Option<(String, String)>,
    /// Most bytes of file data the image may unpack to (all layers): past
    /// it the pull fails (`Layer`) and nothing is kept.
    pub max_bytes: u64,
}

/// Progress of a pull, reported as it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// The reference resolved to this manifest (digest) with these layers.
    Resolved { digest: String, layers: usize },
    /// A layer already in the blob store: not fetched.
    LayerCached { digest: String, size: u64 },
    /// A layer download started (`size` from the manifest).
    LayerDownloading { digest: String, size: u64 },
    /// Bytes of a layer downloaded so far (about every MiB).
    LayerProgress {
        digest: String,
        done: u64,
        size: u64,
    },
    /// A layer was fetched and verified.
    LayerDownloaded { digest: String, size: u64 },
    /// A layer is being applied to the rootfs (in order).
    LayerUnpacking { digest: String },
    /// The template is complete.
    Done { size_bytes: u64 },
}

/// What was pulled: the image's identity and the config a sandbox honours.
/// Also the `image` part of `template.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The reference as given.
    pub reference: String,
    /// Digest of the (platform) image manifest, `sha256:<hex>`.
    pub digest: String,
    /// Digest of the image config blob.
    pub config_digest: String,
    /// Layer digests, bottom first.
    pub layers: Vec<String>,
    /// Sum of the layers' (compressed) sizes: what the blob store holds.
    pub layers_bytes: u64,
    /// Apparent size of the unpacked rootfs.
    pub size_bytes: u64,
    /// Config `Env` (`KEY=value`).
    pub env: Vec<String>,
    /// Config `WorkingDir` (absent or empty: `/`).
    pub workdir: Option<String>,
    /// Config `User` (`name`, `uid`, `uid:gid`...), absent for root.
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ImageError {
    /// The reference does not parse, or asks for something not supported.
    #[error("bad image reference: {0}")]
    Reference(String),
    /// No such repository, tag or digest.
    #[error("image not found: {0}")]
    NotFound(String),
    /// The registry wants credentials (none given, or refused).
    #[error("registry refused access: {0}")]
    Unauthorized(String),
    /// No linux/amd64 image behind the reference.
    #[error("no linux/amd64 image: {0}")]
    Platform(String),
    /// A blob's content does not match its digest.
    #[error("digest mismatch for {digest}: got {actual}")]
    Digest { digest: String, actual: String },
    /// A layer could not be applied (hostile entry, unsupported format...).
    #[error("bad layer: {0}")]
    Layer(String),
    /// The destination already exists.
    #[error("destination exists: {0}")]
    Exists(PathBuf),
    /// Talking to the registry failed.
    #[error("registry: {0}")]
    Registry(String),
    /// An image archive is malformed or hostile (missing or non-file
    /// members, names leaving the archive, oversized JSON...).
    #[error("bad archive: {0}")]
    Archive(String),
    #[error("{0}")]
    Io(String),
}

fn map_registry(reference: &str, e: OciDistributionError) -> ImageError {
    use OciDistributionError as E;
    match e {
        E::UnauthorizedError { url } => ImageError::Unauthorized(url),
        E::AuthenticationFailure(r) => ImageError::Unauthorized(r),
        E::RegistryError { envelope, url } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                ImageError::Unauthorized(format!("{reference}: {envelope}"))
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::ManifestBlobUnknown
                )
            }) {
                ImageError::NotFound(reference.to_string())
            } else {
                ImageError::Registry(format!("{url}: {envelope}"))
            }
        }
        E::DigestError(d) => ImageError::Digest {
            digest: reference.to_string(),
            actual: d.to_string(),
        },
        E::RequestError(r) => match r.status().map(|s| s.as_u16()) {
            Some(401) | Some(403) => ImageError::Unauthorized(format!("{reference}: {r}")),
            Some(404) => ImageError::NotFound(reference.to_string()),
            _ => ImageError::Registry(r.to_string()),
        },
        other => ImageError::Registry(other.to_string()),
    }
}

/// The registry client for a reference: plain HTTP only to a loopback
/// registry, HTTPS (rustls, webpki roots) otherwise.
fn client_for(r: &Reference) -> Client {
    let registry = r.resolve_registry().to_string();
    let protocol = if is_loopback_registry(&registry) {
        ClientProtocol::HttpsExcept(vec![registry])
    } else {
        ClientProtocol::Https
    };
    Client::new(ClientConfig {
        protocol,
        platform_resolver: None,
        connect_timeout: Some(std::time::Duration::from_secs(15)),
        read_timeout: Some(std::time::Duration::from_secs(120)),
        ..Default::default()
    })
}

const PLATFORM_OS: &str = "linux";
/// An image config is a small JSON document; it is read into memory.
const MAX_CONFIG_BYTES: i64 = 8 << 20;
const PLATFORM_ARCH: &str = "amd64";
/// Most layers an image may have (Docker's own limit is 127).
pub const MAX_LAYERS: usize = 256;

fn check_layer_count(n: usize) -> Result<(), ImageError> {
    if n > MAX_LAYERS {
        return Err(ImageError::Layer(format!(
            "{n} layers (at most {MAX_LAYERS})"
        )));
    }
    Ok(())
}

/// The manifest for linux/amd64 (from an index, or the image itself).
async fn resolve_manifest(
    client: &Client,
    r: &Reference,
    auth: &RegistryAuth,
    reference: &str,
) -> Result<(OciImageManifest, String), ImageError> {
    let (m, digest) = client
        .pull_manifest(r, auth)
        .await
        .map_err(|e| map_registry(reference, e))?;
    match m {
        OciManifest::Image(m) => Ok((m, digest)),
        OciManifest::ImageIndex(idx) => {
            let entry = idx.manifests.iter().find(|e| {
                e.platform
                    .as_ref()
                    .is_some_and(|p| p.os == PLATFORM_OS && p.architecture == PLATFORM_ARCH)
            });
            let Some(entry) = entry else {
                let have: Vec<String> = idx
                    .manifests
                    .iter()
                    .filter_map(|e| e.platform.as_ref())
                    .map(|p| format!("{}/{}", p.os, p.architecture))
                    .collect();
                return Err(ImageError::Platform(format!(
                    "{reference} offers [{}]",
                    have.join(", ")
                )));
            };
            let pinned = r.clone_with_digest(entry.digest.clone());
            let (m, digest) = client
                .pull_manifest(&pinned, auth)
                .await
                .map_err(|e| map_registry(reference, e))?;
            match m {
                OciManifest::Image(m) => Ok((m, digest)),
                OciManifest::ImageIndex(_) => Err(ImageError::Registry(format!(
                    "{reference}: index entry {} is another index",
                    entry.digest
                ))),
            }
        }
    }
}

/// Hex of a `sha256:<hex>` digest, checked (it becomes a file name).
fn sha256_hex(digest: &str) -> Result<&str, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) => {
            Ok(h)
        }
        _ => Err(ImageError::Registry(format!(
            "unsupported digest {digest:?} (only sha256)"
        ))),
    }
}

/// Where a blob lives in the store.
pub fn blob_path(blob_dir: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    Ok(blob_dir.join("sha256").join(sha256_hex(digest)?))
}

/// Remove the blobs of `blob_dir` whose digest (`sha256:<hex>`) is not in
/// `in_use`; returns the bytes freed. Temporary files of downloads in flight
/// are left alone, but a pull may just have found a blob it is about to
/// unpack: the caller runs this when no pull runs (or under the same lock).
pub fn remove_unused_blobs(
    blob_dir: &Path,
    in_use: &std::collections::HashSet<String>,
) -> Result<u64, ImageError> {
    let dir = blob_dir.join("sha256");
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(ImageError::Io(format!("read {}: {e}", dir.display()))),
    };
    let mut freed = 0;
    for ent in rd.flatten() {
        let Some(name) = ent.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let digest = format!("sha256:{name}");
        if sha256_hex(&digest).is_err() || in_use.contains(&digest) {
            continue;
        }
        let len = ent.metadata().map(|m| m.len()).unwrap_or(0);
        match std::fs::remove_file(ent.path()) {
            Ok(()) => freed += len,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ImageError::Io(format!(
                    "remove {}: {e}",
                    ent.path().display()
                )))
            }
        }
    }
    Ok(freed)
}

/// A path removed on drop unless kept: a download or staging tree that a
/// failed (or cancelled: the future dropped) pull leaves behind.
struct Cleanup {
    path: Option<PathBuf>,
    dir: bool,
}

impl Cleanup {
    fn file(p: &Path) -> Self {
        Cleanup {
            path: Some(p.to_path_buf()),
            dir: false,
        }
    }
    fn dir(p: &Path) -> Self {
        Cleanup {
            path: Some(p.to_path_buf()),
            dir: true,
        }
    }
    fn keep(mut self) {
        self.path = None;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = if self.dir {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// How often (bytes) a download reports `LayerProgress`.
const PROGRESS_STEP: u64 = 1 << 20;
/// A download hands its bytes to the file (and so to the unpacker) in
/// batches of this size (one blocking write each).
const WRITE_BATCH: usize = 512 << 10;
/// Layers downloaded at once.
const PARALLEL_DOWNLOADS: usize = 3;

/// A blob to download: its temporary file in the store (read by the
/// unpacker as it grows) and the feed that tells the unpacker how far it
/// is and, at the end, whether the digest matched.
struct Fetch {
    desc: OciDescriptor,
    size: u64,
    tmp: PathBuf,
    dest: PathBuf,
    file: std::fs::File,
    guard: Cleanup,
    end: feed::EndOnDrop,
}

/// Download a blob into its temporary file, hashed while it streams;
/// renamed into the store if (and only if) the digest and the size the
/// manifest gives match, and only then the feed's verdict is `Ok`. Not
/// fsynced: a blob torn by a crash fails its digest when it is next read
/// (see [`feed`]) and is fetched again.
async fn fetch_blob(
    client: &Client,
    r: &Reference,
    f: Fetch,
    progress: &(dyn Fn(PullEvent) + Send + Sync),
) -> Result<(), ImageError> {
    let Fetch {
        desc,
        size,
        tmp,
        dest,
        file,
        guard,
        end,
    } = f;
    let digest = desc.digest.clone();
    progress(PullEvent::LayerDownloading {
        digest: digest.clone(),
        size,
    });
    let feed = end.0.clone();
    let mut file = tokio::fs::File::from_std(file);
    let downloaded = async {
        let mut stream = client
            .pull_blob_stream(r, &desc)
            .await
            .map_err(|e| map_registry(&digest, e))?
            .stream;
        let mut hasher = Sha256::new();
        let mut got: u64 = 0;
        let mut reported: u64 = 0;
        let mut batch: Vec<u8> = Vec::with_capacity(WRITE_BATCH);
        use futures_util::StreamExt;
        loop {
            let chunk = match stream.next().await {
                None => None,
                Some(Ok(c)) => Some(c),
                // oci-client verifies too and fails at the end on a
                // mismatch: our own hash below names the digest.
                Some(Err(e))
                    if e.get_ref()
                        .is_some_and(|i| i.is::<oci_client::errors::DigestError>()) =>
                {
                    None
                }
                Some(Err(e)) => return Err(ImageError::Registry(format!("{digest}: {e}"))),
            };
            if let Some(chunk) = &chunk {
                got += chunk.len() as u64;
                if got > size {
                    return Err(ImageError::Digest {
                        digest: digest.clone(),
                        actual: format!("more than the {size} bytes the manifest gives"),
                    });
                }
                hasher.update(chunk);
                batch.extend_from_slice(chunk);
            }
            if !batch.is_empty() && (batch.len() >= WRITE_BATCH || chunk.is_none()) {
                // Written and flushed (tokio writes in the background)
                // before the unpacker may read it.
                file.write_all(&batch)
                    .await
                    .map_err(|e| ImageError::Io(format!("write {}: {e}", tmp.display())))?;
                file.flush()
                    .await
                    .map_err(|e| ImageError::Io(format!("write {}: {e}", tmp.display())))?;
                feed.advance(batch.len() as u64);
                batch.clear();
            }
            if chunk.is_none() {
                break;
            }
            if got - reported >= PROGRESS_STEP {
                reported = got;
                progress(PullEvent::LayerProgress {
                    digest: digest.clone(),
                    done: got,
                    size,
                });
            }
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest {
            return Err(ImageError::Digest {
                digest: digest.clone(),
                actual,
            });
        }
        if got != size {
            return Err(ImageError::Digest {
                digest: digest.clone(),
                actual: format!("{got} bytes instead of {size}"),
            });
        }
        drop(file);
        tokio::fs::rename(&tmp, &dest)
            .await
            .map_err(|e| ImageError::Io(format!("rename {}: {e}", dest.display())))?;
        Ok(())
    }
    .await;
    match downloaded {
        Ok(()) => {
            guard.keep();
            feed.end(Ok(()));
            progress(PullEvent::LayerDownloaded { digest, size });
            Ok(())
        }
        Err(e) => {
            feed.end(Err(e.clone()));
            Err(e)
        }
    }
}

/// A layer blob as a tar stream: gzip, zstd or plain tar, told by its
/// first bytes (media types lie).
fn layer_decoder<'a>(r: &'a mut feed::LayerReader) -> Result<Box<dyn Read + 'a>, ImageError> {
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < magic.len() {
        match r.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ImageError::Layer(format!("read: {e}"))),
        }
    }
    let head = std::io::Cursor::new(magic[..n].to_vec());
    let f = BufReader::with_capacity(256 << 10, head.chain(r));
    if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(f)))
    } else if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        let d = zstd::stream::read::Decoder::with_buffer(f)
            .map_err(|e| ImageError::Layer(format!("zstd: {e}")))?;
        Ok(Box::new(d))
    } else {
        Ok(Box::new(f))
    }
}

/// Apparent size of a tree (never following symlinks).
fn tree_size(p: &Path) -> u64 {
    let Ok(md) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    let mut n = md.len();
    if md.is_dir() {
        if let Ok(rd) = std::fs::read_dir(p) {
            n += rd.flatten().map(|e| tree_size(&e.path())).sum::<u64>();
        }
    }
    n
}

/// The image config. oci-spec 0.7 insists on `history`, which the image spec
/// makes optional (and which images built by some tools lack): an absent one
/// is read as empty.
fn parse_config(raw: &[u8]) -> Result<oci_spec::image::ImageConfiguration, ImageError> {
    let bad = |e: &dyn std::fmt::Display| ImageError::Registry(format!("image config: {e}"));
    let mut v: serde_json::Value = serde_json::from_slice(raw).map_err(|e| bad(&e))?;
    let obj = v.as_object_mut().ok_or_else(|| bad(&"not an object"))?;
    if obj
        .get("history")
        .unwrap_or(&serde_json::Value::Null)
        .is_null()
    {
        obj.insert("history".into(), serde_json::Value::Array(vec![]));
    }
    serde_json::from_value(v).map_err(|e| bad(&e))
}

/// The manifest `TemplateStore::get` reads, plus what the image says.
#[derive(Debug, Serialize)]
struct TemplateManifest<'a> {
    name: &'a str,
    source: &'static str,
    uid_shift: u32,
    shell: &'a str,
    size_mb: u64,
    env: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    workdir: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    image: &'a ImageInfo,
}

/// Pull `reference` and make a template of it at `dest` (which must not
/// exist; its file name becomes the template's name). Blobs go to
/// `opts.blob_dir` and are reused by later pulls. On any error nothing is
/// left at `dest` and no unverified blob is kept.
///
/// Layers are downloaded concurrently ([`PARALLEL_DOWNLOADS`] at once) and
/// applied in order by one blocking thread that reads each blob as it
/// arrives ([`feed`]); the staging tree is kept only if every layer's digest
/// matched. A stored blob found corrupt is removed and the pull made once
/// more (fetching it again).
pub async fn pull(
    opts: &PullOptions,
    reference: &str,
    dest: &Path,
    progress: &(dyn Fn(PullEvent) + Send + Sync),
) -> Result<ImageInfo, ImageError> {
    let corrupt_stored = Arc::new(AtomicBool::new(false));
    match pull_once(opts, reference, dest, progress, &corrupt_stored).await {
        Err(_) if corrupt_stored.load(Ordering::Relaxed) => {
            pull_once(
                opts,
                reference,
                dest,
                progress,
                &Arc::new(AtomicBool::new(false)),
            )
            .await
        }
        r => r,
    }
}

/// What a template records of an image; refuses one that is not
/// linux/amd64.
fn image_info(
    reference: &str,
    digest: String,
    config_digest: String,
    layers: &[(String, u64)],
    config: &oci_spec::image::ImageConfiguration,
) -> Result<ImageInfo, ImageError> {
    let (os, arch) = (config.os().to_string(), config.architecture().to_string());
    if os != PLATFORM_OS || arch != PLATFORM_ARCH {
        return Err(ImageError::Platform(format!("{reference} is {os}/{arch}")));
    }
    let cfg = config.config().clone().unwrap_or_default();
    Ok(ImageInfo {
        reference: reference.to_string(),
        digest,
        config_digest,
        layers: layers.iter().map(|l| l.0.clone()).collect(),
        layers_bytes: layers.iter().map(|l| l.1).sum(),
        size_bytes: 0,
        env: cfg.env().clone().unwrap_or_default(),
        workdir: cfg.working_dir().clone().filter(|w| !w.is_empty()),
        user: cfg.user().clone().filter(|u| !u.is_empty()),
        entrypoint: cfg.entrypoint().clone().unwrap_or_default(),
        cmd: cfg.cmd().clone().unwrap_or_default(),
    })
}

/// Await a blocking half, passing on its events as they come.
async fn forwarding<T>(
    mut job: tokio::task::JoinHandle<Result<T, ImageError>>,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<PullEvent>,
    progress: &(dyn Fn(PullEvent) + Send + Sync),
) -> Result<T, ImageError> {
    let r = loop {
        tokio::select! {
            biased;
            Some(ev) = rx.recv() => progress(ev),
            r = &mut job => break r,
        }
    };
    while let Ok(ev) = rx.try_recv() {
        progress(ev);
    }
    r.unwrap_or_else(|e| Err(ImageError::Io(format!("blocking task: {e}"))))
}

/// The template's name (`dest`'s file name) once `dest` is free and the
/// options make sense: what a pull and an import check first.
fn check_destination(opts: &PullOptions, dest: &Path) -> Result<String, ImageError> {
    let name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ImageError::Io(format!("bad destination {}", dest.display())))?
        .to_string();
    if opts.uid_shift.checked_add(u32::from(u16::MAX)).is_none() {
        return Err(ImageError::Io(format!(
            "uid_shift {} out of range",
            opts.uid_shift
        )));
    }
    if dest.symlink_metadata().is_ok() {
        return Err(ImageError::Exists(dest.to_path_buf()));
    }
    Ok(name)
}

/// Make a template at `dest` (as [`pull`] does) of the image in an archive
/// file: an OCI archive or a `docker save` tar (see [`archive`]). Its
/// layers are verified and put in the blob store, then unpacked by the
/// same unpacker; `label` becomes the image's `reference`. On any error
/// nothing is left at `dest`.
pub async fn import(
    opts: &PullOptions,
    archive_path: &Path,
    label: &str,
    dest: &Path,
    progress: &(dyn Fn(PullEvent) + Send + Sync),
) -> Result<ImageInfo, ImageError> {
    let name = check_destination(opts, dest)?;
    let parent = dest
        .parent()
        .ok_or_else(|| ImageError::Io(format!("bad destination {}", dest.display())))?
        .to_path_buf();
    tokio::fs::create_dir_all(&parent)
        .await
        .map_err(|e| ImageError::Io(format!("create {}: {e}", parent.display())))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (path, blob_dir) = (archive_path.to_path_buf(), opts.blob_dir.clone());
    let events = tx.clone();
    let read = tokio::task::spawn_blocking(move || {
        archive::read_archive(&path, &blob_dir, &|e| {
            let _ = events.send(e);
        })
    });
    let imported = forwarding(read, &mut rx, progress).await?;
    let mut info = image_info(
        label,
        imported.digest,
        imported.config_digest,
        &imported.layers,
        &imported.config,
    )?;
    info.reference = label.to_string();
    let cancel = Arc::new(AtomicBool::new(false));
    let _cancel = SetOnDrop(cancel.clone());
    let corrupt = Arc::new(AtomicBool::new(false));
    let mut layers = Vec::new();
    for (digest, size) in &imported.layers {
        let p = blob_path(&opts.blob_dir, digest)?;
        let f = std::fs::File::open(&p)
            .map_err(|e| ImageError::Io(format!("open {}: {e}", p.display())))?;
        let rd =
            feed::LayerReader::stored(f, p, digest.clone(), *size, cancel.clone(), corrupt.clone());
        layers.push((digest.clone(), rd));
    }
    let job = UnpackJob {
        staging: parent.join(format!(".{name}.tmp-{:016x}", rand::random::<u64>())),
        dest: dest.to_path_buf(),
        name,
        uid_shift: opts.uid_shift,
        max_bytes: opts.max_bytes,
        layers,
        info,
        events: tx,
        cancel,
    };
    let info = forwarding(
        tokio::task::spawn_blocking(move || job.run()),
        &mut rx,
        progress,
    )
    .await?;
    progress(PullEvent::Done {
        size_bytes: info.size_bytes,
    });
    Ok(info)
}

/// Sets its flag when dropped: tells the unpacking thread that the pull is
/// over (cancelled, or failed elsewhere).
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

async fn pull_once(
    opts: &PullOptions,
    reference: &str,
    dest: &Path,
    progress: &(dyn Fn(PullEvent) + Send + Sync),
    corrupt_stored: &Arc<AtomicBool>,
) -> Result<ImageInfo, ImageError> {
    let r = parse_reference(reference)?;
    let name = check_destination(opts, dest)?;
    let auth = match &opts.credentials {
        Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
        None => RegistryAuth::Anonymous,
    };
    let client = client_for(&r);
    let (manifest, digest) = resolve_manifest(&client, &r, &auth, reference).await?;
    check_layer_count(manifest.layers.len())?;
    progress(PullEvent::Resolved {
        digest: digest.clone(),
        layers: manifest.layers.len(),
    });

    // The config: small, verified by oci-client against its digest.
    sha256_hex(&manifest.config.digest)?;
    if !(0..=MAX_CONFIG_BYTES).contains(&manifest.config.size) {
        return Err(ImageError::Registry(format!(
            "image config of {} bytes (at most {MAX_CONFIG_BYTES})",
            manifest.config.size
        )));
    }
    let mut raw = Vec::new();
    client
        .pull_blob(&r, &manifest.config, &mut raw)
        .await
        .map_err(|e| map_registry(&manifest.config.digest, e))?;
    let config = parse_config(&raw)?;
    let layer_sizes: Vec<(String, u64)> = manifest
        .layers
        .iter()
        .map(|l| (l.digest.clone(), l.size.max(0) as u64))
        .collect();
    let info = image_info(
        reference,
        digest,
        manifest.config.digest.clone(),
        &layer_sizes,
        &config,
    )?;

    let parent = dest
        .parent()
        .ok_or_else(|| ImageError::Io(format!("bad destination {}", dest.display())))?;
    let blobs = opts.blob_dir.join("sha256");
    for d in [parent, blobs.as_path()] {
        tokio::fs::create_dir_all(d)
            .await
            .map_err(|e| ImageError::Io(format!("create {}: {e}", d.display())))?;
    }

    // Every layer gets a reader: on its stored blob, or behind its download
    // (one per distinct digest).
    let cancel = Arc::new(AtomicBool::new(false));
    let _cancel = SetOnDrop(cancel.clone());
    let mut layers = Vec::new();
    let mut fetches = Vec::new();
    let mut live: std::collections::HashMap<String, (Arc<std::fs::File>, Arc<feed::Feed>)> =
        Default::default();
    for desc in &manifest.layers {
        let hex = sha256_hex(&desc.digest)?;
        let digest = desc.digest.clone();
        let size = u64::try_from(desc.size)
            .map_err(|_| ImageError::Registry(format!("{digest}: negative size")))?;
        if let Some((file, feed)) = live.get(&digest) {
            let rd = feed::LayerReader::live(file.clone(), feed.clone(), cancel.clone());
            layers.push((digest, rd));
            continue;
        }
        let path = blobs.join(hex);
        match std::fs::File::open(&path) {
            Ok(f) => {
                progress(PullEvent::LayerCached {
                    digest: digest.clone(),
                    size,
                });
                let rd = feed::LayerReader::stored(
                    f,
                    path,
                    digest.clone(),
                    size,
                    cancel.clone(),
                    corrupt_stored.clone(),
                );
                layers.push((digest, rd));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let tmp = blobs.join(format!(".tmp-{hex}-{:016x}", rand::random::<u64>()));
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&tmp)
                    .map_err(|e| ImageError::Io(format!("create {}: {e}", tmp.display())))?;
                let guard = Cleanup::file(&tmp);
                let reader = Arc::new(
                    file.try_clone()
                        .map_err(|e| ImageError::Io(format!("dup {}: {e}", tmp.display())))?,
                );
                let feed = Arc::new(feed::Feed::default());
                live.insert(digest.clone(), (reader.clone(), feed.clone()));
                layers.push((
                    digest.clone(),
                    feed::LayerReader::live(reader, feed.clone(), cancel.clone()),
                ));
                fetches.push(Fetch {
                    desc: desc.clone(),
                    size,
                    tmp,
                    dest: path,
                    file,
                    guard,
                    end: feed::EndOnDrop(feed),
                });
            }
            Err(e) => return Err(ImageError::Io(format!("open {}: {e}", path.display()))),
        }
    }

    let staging = parent.join(format!(".{name}.tmp-{:016x}", rand::random::<u64>()));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let job = UnpackJob {
        staging,
        dest: dest.to_path_buf(),
        name,
        uid_shift: opts.uid_shift,
        max_bytes: opts.max_bytes,
        layers,
        info,
        events: tx,
        cancel: cancel.clone(),
    };
    let mut unpack = tokio::task::spawn_blocking(move || job.run());
    use futures_util::{StreamExt, TryStreamExt};
    let mut downloads = Some(Box::pin(
        futures_util::stream::iter(fetches)
            .map(|f| fetch_blob(&client, &r, f, progress))
            .buffer_unordered(PARALLEL_DOWNLOADS)
            .try_collect::<()>(),
    ));
    let mut download_err = None;
    let unpacked = loop {
        tokio::select! {
            biased;
            Some(ev) = rx.recv() => progress(ev),
            // The first failed download ends the others (their feeds end
            // with `STOPPED`, which stops the unpacker).
            d = async { downloads.as_mut().expect("guarded").await }, if downloads.is_some() => {
                downloads = None;
                if let Err(e) = d {
                    download_err = Some(e);
                }
            }
            u = &mut unpack => break u,
        }
    };
    let unpacked = unpacked.unwrap_or_else(|e| Err(ImageError::Io(format!("unpacking: {e}"))));
    if unpacked.is_ok() {
        // Every feed's verdict was `Ok`: the downloads are ending.
        if let Some(d) = downloads.take() {
            d.await?;
        }
    }
    while let Ok(ev) = rx.try_recv() {
        progress(ev);
    }
    match (unpacked, download_err) {
        (Ok(info), _) => {
            progress(PullEvent::Done {
                size_bytes: info.size_bytes,
            });
            Ok(info)
        }
        (Err(ImageError::Io(m)), Some(d)) if m == feed::STOPPED => Err(d),
        (Err(e), _) => Err(e),
    }
}

/// Decompressed bytes handed from the inflating thread to the unpacker at
/// a time, and how many such pieces may wait.
const INFLATE_PIECE: usize = 1 << 20;
const INFLATE_QUEUE: usize = 8;

/// Apply one layer: one thread inflates the blob as it arrives while this
/// one writes the files (two cores: gunzip and file creation overlap).
/// Returns what applying it gave and the verdict on the blob's digest.
fn apply_layer(
    u: &mut unpack::Unpacker,
    mut reader: feed::LayerReader,
) -> (Result<(), ImageError>, Result<(), ImageError>) {
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<Vec<u8>>>(INFLATE_QUEUE);
        let inflater = s.spawn(move || {
            let inflated = (|| -> std::io::Result<()> {
                let mut dec = layer_decoder(&mut reader).map_err(std::io::Error::other)?;
                loop {
                    let mut piece = vec![0u8; INFLATE_PIECE];
                    let mut n = 0;
                    while n < piece.len() {
                        match dec.read(&mut piece[n..]) {
                            Ok(0) => break,
                            Ok(k) => n += k,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e),
                        }
                    }
                    if n == 0 {
                        return Ok(());
                    }
                    piece.truncate(n);
                    if tx.send(Ok(piece)).is_err() {
                        return Ok(()); // the unpacker is done with this layer
                    }
                }
            })();
            if let Err(e) = inflated {
                let _ = tx.send(Err(e));
            }
            drop(tx);
            reader.finish()
        });
        let applied = u.apply(PieceReader {
            rx,
            piece: Vec::new(),
            at: 0,
        });
        let verdict = inflater
            .join()
            .unwrap_or_else(|_| Err(ImageError::Io("the inflating thread panicked".into())));
        (applied, verdict)
    })
}

/// The unpacker's end of the inflating thread's queue (dropped: the
/// inflater stops).
struct PieceReader {
    rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    piece: Vec<u8>,
    at: usize,
}

impl Read for PieceReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.piece.len() {
            match self.rx.recv() {
                Ok(Ok(p)) => {
                    self.piece = p;
                    self.at = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.piece.len() - self.at);
        buf[..n].copy_from_slice(&self.piece[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The blocking half of a pull: applies the layers in order to a staging
/// tree as their bytes arrive, then (every digest verified) makes it the
/// template. Owns the staging tree: removed on any failure, also when the
/// pull is cancelled (its readers fail, `cancel` is checked before the
/// rename).
struct UnpackJob {
    staging: PathBuf,
    dest: PathBuf,
    name: String,
    uid_shift: u32,
    max_bytes: u64,
    layers: Vec<(String, feed::LayerReader)>,
    info: ImageInfo,
    events: tokio::sync::mpsc::UnboundedSender<PullEvent>,
    cancel: Arc<AtomicBool>,
}

impl UnpackJob {
    fn run(self) -> Result<ImageInfo, ImageError> {
        let UnpackJob {
            staging,
            dest,
            name,
            uid_shift,
            max_bytes,
            layers,
            mut info,
            events,
            cancel,
        } = self;
        let io = |what: &str, p: &Path, e: std::io::Error| {
            ImageError::Io(format!("{what} {}: {e}", p.display()))
        };
        std::fs::create_dir(&staging).map_err(|e| io("create", &staging, e))?;
        let staging_guard = Cleanup::dir(&staging);
        let rootfs = staging.join("rootfs");
        std::fs::create_dir(&rootfs).map_err(|e| io("create", &rootfs, e))?;
        let mut u = unpack::Unpacker::new(&rootfs, Some(uid_shift))?.with_max_bytes(max_bytes);
        for (digest, reader) in layers {
            let _ = events.send(PullEvent::LayerUnpacking {
                digest: digest.clone(),
            });
            let (applied, verdict) = apply_layer(&mut u, reader);
            // The verdict on the blob comes first: a layer that fails to
            // unpack because its bytes are not the image's is a digest error.
            verdict?;
            applied.map_err(|e| ImageError::Layer(format!("{digest}: {e}")))?;
        }
        drop(u);
        let shell = if std::fs::symlink_metadata(rootfs.join("bin/bash")).is_ok()
            || std::fs::symlink_metadata(rootfs.join("usr/bin/bash")).is_ok()
        {
            "/bin/bash"
        } else {
            "/bin/sh"
        };
        info.size_bytes = tree_size(&rootfs);
        std::fs::set_permissions(
            &staging,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .map_err(|e| io("chmod", &staging, e))?;
        if cancel.load(Ordering::Relaxed) {
            return Err(ImageError::Io("pull cancelled".into()));
        }
        // NOREPLACE: a destination that appeared meanwhile is not replaced
        // (a plain rename would replace an empty directory).
        match rustix::fs::renameat_with(
            rustix::fs::CWD,
            &staging,
            rustix::fs::CWD,
            &dest,
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => staging_guard.keep(),
            Err(rustix::io::Errno::EXIST) => return Err(ImageError::Exists(dest.to_path_buf())),
            Err(e) => return Err(io("rename", &dest, e.into())),
        }
        let dest_guard = Cleanup::dir(&dest);
        let m = TemplateManifest {
            name: &name,
            source: "oci",
            uid_shift,
            shell,
            size_mb: info.size_bytes.div_ceil(1 << 20),
            env: &info.env,
            workdir: info.workdir.as_deref(),
            user: info.user.as_deref(),
            image: &info,
        };
        let json = serde_json::to_vec_pretty(&m).map_err(|e| ImageError::Io(e.to_string()))?;
        let tmp = dest.join(".template.json.tmp");
        std::fs::write(&tmp, json).map_err(|e| io("write", &tmp, e))?;
        let manifest_path = dest.join("template.json");
        std::fs::rename(&tmp, &manifest_path).map_err(|e| io("rename", &manifest_path, e))?;
        dest_guard.keep();
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_without_history_parses() {
        let c = parse_config(
            br#"{"architecture":"amd64","os":"linux","config":{"Env":["A=1"],"WorkingDir":"/w","User":"u"},"rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap();
        let cfg = c.config().clone().unwrap();
        assert_eq!(cfg.env().clone().unwrap(), vec!["A=1".to_string()]);
        assert_eq!(cfg.working_dir().as_deref(), Some("/w"));
        assert!(parse_config(b"[]").is_err());
    }

    #[test]
    fn unused_blobs_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("sha256");
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        for n in [a.as_str(), b.as_str(), ".tmp-x", "notes"] {
            std::fs::write(dir.join(n), "12345").unwrap();
        }
        let keep = [format!("sha256:{a}")].into_iter().collect();
        assert_eq!(remove_unused_blobs(d.path(), &keep).unwrap(), 5);
        assert!(dir.join(&a).exists() && !dir.join(&b).exists());
        assert!(dir.join(".tmp-x").exists() && dir.join("notes").exists());
        assert_eq!(
            remove_unused_blobs(&d.path().join("none"), &keep).unwrap(),
            0
        );
    }

    #[test]
    fn blob_paths_are_checked_digests() {
        let hex = "0".repeat(64);
        assert_eq!(
            blob_path(Path::new("/b"), &format!("sha256:{hex}")).unwrap(),
            Path::new("/b/sha256").join(&hex)
        );
        for bad in [
            "sha256:../../etc/passwd".to_string(),
            format!("sha512:{hex}"),
            format!("sha256:{}", "A".repeat(64)),
            "sha256:abc".to_string(),
        ] {
            assert!(blob_path(Path::new("/b"), &bad).is_err(), "{bad}");
        }
    }
}
