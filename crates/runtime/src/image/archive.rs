//! Image archives into the blob store: an OCI archive (`oci-layout`,
//! `index.json` → manifest → `blobs/sha256/<hex>`) or a `docker save` tar
//! (`manifest.json` with `Config` and `Layers` paths; layers plain or gzip
//! tars, verified against the config's `rootfs.diff_ids`).
//!
//! Owns reading the archive (one pass over its headers, then members read
//! by offset), choosing linux/amd64, verifying every blob it uses against
//! its digest, and copying the layers into the blob store (temporary file,
//! renamed when verified). Blocking; the caller runs it off the async
//! workers.
//!
//! Must not: trust a member's name, type or size (names are only looked up,
//! never written: a `..` or absolute name is refused, a referenced member
//! must be a regular file, JSON members are read only up to
//! [`MAX_JSON_BYTES`]); keep a blob that failed its digest; unpack anything
//! (the caller hands the stored layers to the same unpacker a pull uses).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path};

use sha2::{Digest as _, Sha256};

use super::{parse_config, sha256_hex, Cleanup, ImageError, PullEvent};

/// Largest JSON member read (index, manifests, config).
pub const MAX_JSON_BYTES: u64 = 8 << 20;
/// Most members an archive may have.
const MAX_MEMBERS: usize = 1 << 16;

/// What an archive held: the image's identity, its config, and its layers
/// (now in the blob store), bottom first.
pub(crate) struct Imported {
    /// The manifest's digest (OCI) or the config's (docker: the image id).
    pub digest: String,
    pub config_digest: String,
    pub config: oci_spec::image::ImageConfiguration,
    /// Blob digest and size of each layer.
    pub layers: Vec<(String, u64)>,
}

#[derive(Clone, Copy)]
struct Member {
    offset: u64,
    size: u64,
    regular: bool,
}

fn bad(msg: impl std::fmt::Display) -> ImageError {
    ImageError::Archive(msg.to_string())
}

/// A member name as looked up: `./` and empty parts dropped; `..` or an
/// absolute name refused.
fn member_name(p: &Path) -> Result<String, ImageError> {
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::Normal(s) => parts.push(
                s.to_str()
                    .ok_or_else(|| bad(format!("member {}: name is not UTF-8", p.display())))?,
            ),
            Component::RootDir | Component::ParentDir | Component::Prefix(_) => {
                return Err(bad(format!(
                    "member {} refused: not a relative path",
                    p.display()
                )))
            }
        }
    }
    Ok(parts.join("/"))
}

struct ArchiveFile {
    file: File,
    members: HashMap<String, Member>,
}

impl ArchiveFile {
    fn open(path: &Path) -> Result<Self, ImageError> {
        let io = |e: io::Error| ImageError::Io(format!("read {}: {e}", path.display()));
        let mut file = File::open(path).map_err(io)?;
        let mut members = HashMap::new();
        {
            let mut ar = tar::Archive::new(&mut file);
            let entries = ar
                .entries_with_seek()
                .map_err(|e| bad(format!("not a tar archive: {e}")))?;
            for e in entries {
                let e = e.map_err(|e| bad(format!("not a tar archive: {e}")))?;
                let kind = e.header().entry_type();
                if kind.is_dir() {
                    continue;
                }
                let path = e.path().map_err(|e| bad(format!("member name: {e}")))?;
                let name = member_name(&path)?;
                if members.len() >= MAX_MEMBERS {
                    return Err(bad(format!("more than {MAX_MEMBERS} members")));
                }
                let m = Member {
                    offset: e.raw_file_position(),
                    size: e.size(),
                    regular: matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous),
                };
                if members.insert(name.clone(), m).is_some() {
                    return Err(bad(format!("member {name} appears twice")));
                }
            }
        }
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        Ok(ArchiveFile { file, members })
    }

    fn member(&self, name: &str) -> Result<Member, ImageError> {
        let m = self
            .members
            .get(name)
            .ok_or_else(|| bad(format!("member {name} is missing")))?;
        if !m.regular {
            return Err(bad(format!(
                "member {name} is not a regular file (links are refused)"
            )));
        }
        Ok(*m)
    }

    fn has(&self, name: &str) -> bool {
        self.members.contains_key(name)
    }

    /// A small member, whole.
    fn read_small(&self, name: &str) -> Result<Vec<u8>, ImageError> {
        let m = self.member(name)?;
        if m.size > MAX_JSON_BYTES {
            return Err(bad(format!(
                "member {name} is {} bytes (at most {MAX_JSON_BYTES})",
                m.size
            )));
        }
        let mut buf = vec![0u8; m.size as usize];
        self.file
            .read_exact_at(&mut buf, m.offset)
            .map_err(|e| bad(format!("member {name}: {e}")))?;
        Ok(buf)
    }

    fn reader(&self, m: Member) -> impl Read + '_ {
        io::BufReader::with_capacity(
            256 << 10,
            AtReader {
                f: &self.file,
                at: m.offset,
            },
        )
        .take(m.size)
    }
}

struct AtReader<'a> {
    f: &'a File,
    at: u64,
}

impl Read for AtReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.f.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A small blob, checked against its digest.
fn verified(data: Vec<u8>, digest: &str, what: &str) -> Result<Vec<u8>, ImageError> {
    let actual = sha256(&data);
    if actual != digest {
        return Err(ImageError::Digest {
            digest: digest.to_string(),
            actual: format!("{actual} ({what})"),
        });
    }
    Ok(data)
}

fn json(raw: &[u8], what: &str) -> Result<serde_json::Value, ImageError> {
    serde_json::from_slice(raw).map_err(|e| bad(format!("{what}: {e}")))
}

/// `(digest, size, media type)` of a descriptor.
fn descriptor(v: &serde_json::Value, what: &str) -> Result<(String, u64, String), ImageError> {
    let digest = v["digest"]
        .as_str()
        .ok_or_else(|| bad(format!("{what}: no digest")))?
        .to_string();
    sha256_hex(&digest).map_err(|_| bad(format!("{what}: unsupported digest {digest:?}")))?;
    let size = v["size"]
        .as_u64()
        .ok_or_else(|| bad(format!("{what}: no size")))?;
    let media = v["mediaType"].as_str().unwrap_or("").to_string();
    Ok((digest, size, media))
}

fn is_amd64(v: &serde_json::Value) -> bool {
    v["platform"]["os"] == super::PLATFORM_OS
        && v["platform"]["architecture"] == super::PLATFORM_ARCH
}

/// Read the image in the archive at `path`, copying its layers into
/// `<blob_dir>/sha256/`.
pub(crate) fn read_archive(
    path: &Path,
    blob_dir: &Path,
    events: &dyn Fn(PullEvent),
) -> Result<Imported, ImageError> {
    let ar = ArchiveFile::open(path)?;
    let blobs = blob_dir.join("sha256");
    std::fs::create_dir_all(&blobs)
        .map_err(|e| ImageError::Io(format!("create {}: {e}", blobs.display())))?;
    if ar.has("index.json") {
        read_oci(&ar, &blobs, events)
    } else if ar.has("manifest.json") {
        read_docker(&ar, &blobs, events)
    } else {
        Err(bad(
            "neither an OCI archive (index.json) nor a docker save tar (manifest.json)",
        ))
    }
}

fn blob_member(digest: &str) -> Result<String, ImageError> {
    Ok(format!("blobs/sha256/{}", sha256_hex(digest)?))
}

fn read_oci(
    ar: &ArchiveFile,
    blobs: &Path,
    events: &dyn Fn(PullEvent),
) -> Result<Imported, ImageError> {
    let mut index = json(&ar.read_small("index.json")?, "index.json")?;
    // An index (index.json, or one it names) → the linux/amd64 manifest.
    let mut depth = 0;
    let (digest, manifest) = loop {
        let list = index["manifests"]
            .as_array()
            .ok_or_else(|| bad("index: no manifests"))?;
        let chosen = match list.iter().find(|m| is_amd64(m)) {
            Some(m) => m,
            None if list.len() == 1 && list[0]["platform"].is_null() => &list[0],
            None => {
                let have: Vec<String> = list
                    .iter()
                    .map(|m| {
                        format!(
                            "{}/{}",
                            m["platform"]["os"].as_str().unwrap_or("?"),
                            m["platform"]["architecture"].as_str().unwrap_or("?")
                        )
                    })
                    .collect();
                return Err(ImageError::Platform(format!(
                    "the archive offers [{}]",
                    have.join(", ")
                )));
            }
        };
        let (d, _, media) = descriptor(chosen, "index entry")?;
        let raw = verified(ar.read_small(&blob_member(&d)?)?, &d, "manifest")?;
        let v = json(&raw, "manifest")?;
        let nested =
            media.contains("index") || media.contains("manifest.list") || v["manifests"].is_array();
        if !nested {
            break (d, v);
        }
        depth += 1;
        if depth > 1 {
            return Err(bad("an index within an index within index.json"));
        }
        index = v;
    };
    let (config_digest, _, _) = descriptor(&manifest["config"], "config")?;
    let raw = verified(
        ar.read_small(&blob_member(&config_digest)?)?,
        &config_digest,
        "config",
    )?;
    let config = parse_config(&raw)?;
    let descs = manifest["layers"]
        .as_array()
        .ok_or_else(|| bad("manifest: no layers"))?;
    super::check_layer_count(descs.len())?;
    events(PullEvent::Resolved {
        digest: digest.clone(),
        layers: descs.len(),
    });
    let mut layers = Vec::new();
    for d in descs {
        let (ld, size, _) = descriptor(d, "layer")?;
        let m = ar.member(&blob_member(&ld)?)?;
        if m.size != size {
            return Err(ImageError::Digest {
                digest: ld,
                actual: format!("{} bytes instead of {size}", m.size),
            });
        }
        store_layer(ar, m, blobs, Some(&ld), None, events)?;
        layers.push((ld, size));
    }
    Ok(Imported {
        digest,
        config_digest,
        config,
        layers,
    })
}

fn read_docker(
    ar: &ArchiveFile,
    blobs: &Path,
    events: &dyn Fn(PullEvent),
) -> Result<Imported, ImageError> {
    let manifest = json(&ar.read_small("manifest.json")?, "manifest.json")?;
    let images = manifest
        .as_array()
        .ok_or_else(|| bad("manifest.json: not a list"))?;
    let [image] = images.as_slice() else {
        return Err(bad(format!(
            "manifest.json lists {} images (one expected)",
            images.len()
        )));
    };
    let config_path = image["Config"]
        .as_str()
        .ok_or_else(|| bad("manifest.json: no Config"))?;
    let raw = ar.read_small(&member_name(Path::new(config_path))?)?;
    let config_digest = sha256(&raw);
    let config = parse_config(&raw)?;
    let diff_ids = config.rootfs().diff_ids().clone();
    let paths: Vec<&str> = image["Layers"]
        .as_array()
        .ok_or_else(|| bad("manifest.json: no Layers"))?
        .iter()
        .map(|l| {
            l.as_str()
                .ok_or_else(|| bad("manifest.json: a layer is not a path"))
        })
        .collect::<Result<_, _>>()?;
    super::check_layer_count(paths.len())?;
    if paths.len() != diff_ids.len() {
        return Err(bad(format!(
            "{} layers for {} diff_ids in the config",
            paths.len(),
            diff_ids.len()
        )));
    }
    events(PullEvent::Resolved {
        digest: config_digest.clone(),
        layers: paths.len(),
    });
    let mut layers = Vec::new();
    for (p, diff_id) in paths.iter().zip(&diff_ids) {
        sha256_hex(diff_id).map_err(|_| bad(format!("diff_id {diff_id:?} unsupported")))?;
        let m = ar.member(&member_name(Path::new(p))?)?;
        let digest = store_layer(ar, m, blobs, None, Some(diff_id), events)?;
        layers.push((digest, m.size));
    }
    Ok(Imported {
        digest: config_digest.clone(),
        config_digest,
        config,
        layers,
    })
}

/// A writer that only hashes.
struct HashSink(Sha256);

impl Write for HashSink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Copy a layer member into the store, hashed on the way: its digest must
/// be `digest` (OCI), or its uncompressed content must hash to `diff_id`
/// (docker save). Returns the blob's digest.
fn store_layer(
    ar: &ArchiveFile,
    m: Member,
    blobs: &Path,
    digest: Option<&str>,
    diff_id: Option<&str>,
    events: &dyn Fn(PullEvent),
) -> Result<String, ImageError> {
    let name = digest.or(diff_id).unwrap_or("layer").to_string();
    if let Some(d) = digest {
        if blobs.join(sha256_hex(d)?).exists() {
            events(PullEvent::LayerCached {
                digest: d.to_string(),
                size: m.size,
            });
            return Ok(d.to_string());
        }
    }
    events(PullEvent::LayerDownloading {
        digest: name.clone(),
        size: m.size,
    });
    let tmp = blobs.join(format!(".tmp-import-{:016x}", rand::random::<u64>()));
    let io = |e: io::Error| ImageError::Io(format!("write {}: {e}", tmp.display()));
    let mut out = io::BufWriter::with_capacity(
        256 << 10,
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io)?,
    );
    let guard = Cleanup::file(&tmp);
    let mut raw = Sha256::new();
    let mut inflate: Option<flate2::write::MultiGzDecoder<HashSink>> = None;
    let mut first = true;
    let mut r = ar.reader(m);
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = r
            .read(&mut buf)
            .map_err(|e| bad(format!("read {name}: {e}")))?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        if first && diff_id.is_some() && chunk.starts_with(&[0x1f, 0x8b]) {
            inflate = Some(flate2::write::MultiGzDecoder::new(HashSink(Sha256::new())));
        }
        first = false;
        raw.update(chunk);
        if let Some(gz) = inflate.as_mut() {
            gz.write_all(chunk)
                .map_err(|e| bad(format!("layer {name}: bad gzip: {e}")))?;
        }
        out.write_all(chunk).map_err(io)?;
    }
    out.flush().map_err(io)?;
    drop(out);
    let raw = format!("sha256:{}", hex::encode(raw.finalize()));
    if let Some(d) = digest {
        if raw != d {
            return Err(ImageError::Digest {
                digest: d.to_string(),
                actual: raw,
            });
        }
    }
    if let Some(want) = diff_id {
        let content = match inflate {
            Some(gz) => {
                let sink = gz
                    .finish()
                    .map_err(|e| bad(format!("layer {name}: bad gzip: {e}")))?;
                format!("sha256:{}", hex::encode(sink.0.finalize()))
            }
            None => raw.clone(),
        };
        if content != want {
            return Err(ImageError::Digest {
                digest: want.to_string(),
                actual: format!("{content} (the layer's uncompressed content)"),
            });
        }
    }
    let dest = blobs.join(sha256_hex(&raw)?);
    std::fs::rename(&tmp, &dest)
        .map_err(|e| ImageError::Io(format!("rename {}: {e}", dest.display())))?;
    guard.keep();
    events(PullEvent::LayerDownloaded {
        digest: name,
        size: m.size,
    });
    Ok(raw)
}
