//! Memory snapshots of a stopped VM as a chain of layers, in
//! `<sandbox>/snap/`:
//!
//! - `mem.<n>`: records of `page index: u64 LE | PAGE bytes`. Layer 0 is
//!   the full snapshot (every page that is not all zeros); each later layer
//!   holds only the pages that changed since the state the previous layers
//!   compose to (a diff).
//! - `hashes`: one u64 per page of that composed state, so the next stop
//!   finds changed pages without reading the older layers back.
//! - `manifest.json`: the page size, the memory size and the layers in
//!   order. Written last, through a temporary file, an fsync and a rename
//!   (and an fsync of the directory): a layer that is not in the manifest
//!   does not exist, so a stop killed half-way leaves the previous,
//!   complete snapshot.
//!
//! Restoring writes the layers in order over a sparse file. Owns those
//! files only; knows nothing of QEMU.

use std::collections::hash_map::DefaultHasher;
use std::fs::{File, OpenOptions};
use std::hash::Hasher;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const PAGE: usize = 4096;
/// Pages read and compared per batch.
const BATCH: usize = 256;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Layer {
    pub file: String,
    pub pages: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Manifest {
    pub page_size: usize,
    pub mem_bytes: u64,
    pub layers: Vec<Layer>,
    /// The device state (migration stream) of the latest stop.
    pub device_state: Option<String>,
}

pub fn dir(sandbox: &Path) -> PathBuf {
    sandbox.join("snap")
}

fn manifest_path(sandbox: &Path) -> PathBuf {
    dir(sandbox).join("manifest.json")
}

pub fn load(sandbox: &Path) -> std::io::Result<Option<Manifest>> {
    match std::fs::read(manifest_path(sandbox)) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Write `bytes` to `path` durably: temporary file, fsync, rename, fsync of
/// the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

pub fn save_manifest(sandbox: &Path, m: &Manifest) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(m).map_err(std::io::Error::other)?;
    write_atomic(&manifest_path(sandbox), &bytes)
}

fn page_hash(p: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(p);
    h.finish()
}

/// Add a layer for the guest memory in `mem`: every non-zero page when
/// there is no snapshot yet, else the pages whose hash changed. Returns
/// the new manifest (not yet saved: the caller saves it after the device
/// state, so both appear together).
pub fn add_layer(
    sandbox: &Path,
    mem: &Path,
    previous: Option<&Manifest>,
) -> std::io::Result<Manifest> {
    let d = dir(sandbox);
    std::fs::create_dir_all(&d)?;
    let src = File::open(mem)?;
    let mem_bytes = src.metadata()?.len();
    let pages = (mem_bytes as usize).div_ceil(PAGE);
    let hashes_path = d.join("hashes");
    let old: Option<Vec<u64>> = match previous {
        Some(_) => {
            let raw = std::fs::read(&hashes_path)?;
            Some(
                raw.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            )
        }
        None => None,
    };
    let n = previous.map_or(0, |m| m.layers.len());
    let name = format!("mem.{n}");
    let mut out = BufWriter::new(File::create(d.join(&name))?);
    let mut new_hashes = Vec::with_capacity(pages);
    let zero_hash = page_hash(&[0u8; PAGE]);
    let mut buf = vec![0u8; PAGE * BATCH];
    let (mut written, mut count) = (0u64, 0u64);
    let mut reader = BufReader::with_capacity(PAGE * BATCH, src);
    let mut index = 0usize;
    while index < pages {
        let want = (pages - index).min(BATCH) * PAGE;
        let got = read_full(&mut reader, &mut buf[..want])?;
        buf[got..want].fill(0);
        for (k, page) in buf[..want].chunks_exact(PAGE).enumerate() {
            let h = page_hash(page);
            let changed = match &old {
                Some(o) => o.get(index + k) != Some(&h),
                None => h != zero_hash || page.iter().any(|b| *b != 0),
            };
            // A full snapshot skips zero pages (the restore file is sparse).
            let keep = changed && (old.is_some() || page.iter().any(|b| *b != 0));
            if keep {
                out.write_all(&((index + k) as u64).to_le_bytes())?;
                out.write_all(page)?;
                written += (8 + PAGE) as u64;
                count += 1;
            }
            new_hashes.push(h);
        }
        index += want / PAGE;
    }
    let f = out.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    let raw: Vec<u8> = new_hashes.iter().flat_map(|h| h.to_le_bytes()).collect();
    write_atomic(&hashes_path, &raw)?;
    let mut m = previous.cloned().unwrap_or(Manifest {
        page_size: PAGE,
        mem_bytes,
        ..Manifest::default()
    });
    m.layers.push(Layer {
        file: name,
        pages: count,
        bytes: written,
    });
    Ok(m)
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// Compose the chain into `mem` (created sparse, `mem_bytes` long).
pub fn restore(sandbox: &Path, m: &Manifest, mem: &Path) -> std::io::Result<()> {
    let out = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(mem)?;
    out.set_len(m.mem_bytes)?;
    let mut rec = vec![0u8; 8 + m.page_size];
    for layer in &m.layers {
        let mut r = BufReader::with_capacity(1 << 20, File::open(dir(sandbox).join(&layer.file))?);
        for _ in 0..layer.pages {
            r.read_exact(&mut rec)?;
            let idx = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
            out.write_all_at(&rec[8..], idx * m.page_size as u64)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_then_diff_then_restore() {
        let t = tempfile::tempdir().unwrap();
        let sb = t.path();
        let mem = sb.join("mem");
        let mut data = vec![0u8; PAGE * 600];
        data[PAGE * 3] = 7;
        data[PAGE * 500 + 9] = 1;
        std::fs::write(&mem, &data).unwrap();
        let m = add_layer(sb, &mem, None).unwrap();
        assert_eq!(m.layers[0].pages, 2, "zero pages are not stored");
        save_manifest(sb, &m).unwrap();
        // Change one page and zero another.
        data[PAGE * 3] = 0;
        data[PAGE * 10] = 5;
        std::fs::write(&mem, &data).unwrap();
        let m = add_layer(sb, &mem, Some(&m)).unwrap();
        assert_eq!(m.layers[1].pages, 2);
        save_manifest(sb, &m).unwrap();
        let loaded = load(sb).unwrap().unwrap();
        assert_eq!(loaded, m);
        let back = sb.join("back");
        restore(sb, &loaded, &back).unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), data);
    }
}
