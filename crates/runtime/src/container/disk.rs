//! A container's disk (`disk_mb`): its writable layer on a filesystem of
//! its own, a sparse ext4 image `layer.ext4` in the sandbox directory,
//! loop-mounted on `layer/` (which then holds the overlay's `upper/` and
//! `work/`). A sandbox that fills it gets ENOSPC inside; the host pays at
//! most the image's size, and only for the blocks written. The image is
//! mounted while the container exists (running or suspended), and
//! unmounted (its loop device released: `mount -o loop` sets autoclear)
//! when it is stopped or destroyed.
//!
//! Another process on the host that makes a mount namespace while the image
//! is mounted (`ip netns exec`, a systemd unit with `PrivateTmp`, another
//! runtime) holds a copy of the mount. The mount is made shared, so copies
//! made as slaves (what those tools do) follow the unmount; a private copy
//! pins the loop device until its namespace ends. Then stop and destroy do
//! not fail (the image's blocks are freed when the holder exits), and the
//! next mount reuses that loop device (one superblock, never two
//! filesystems on one image).
//!
//! Owns the image file, its mount and its loop device; must not touch the
//! overlay, the template or other sandboxes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Result, RuntimeError};

/// The image file of the sandbox in `dir`.
pub fn image(dir: &Path) -> PathBuf {
    dir.join("layer.ext4")
}

/// Where the image is mounted.
pub fn mount_point(dir: &Path) -> PathBuf {
    dir.join("layer")
}

/// Create the image (`mb` MiB, sparse) when missing and mount it, unless
/// it is mounted already (a re-attach).
pub async fn ensure_mounted(dir: &Path, mb: u64) -> Result<()> {
    let (img, mnt) = (image(dir), mount_point(dir));
    if super::rootfs::is_mount_point(&mnt) {
        return Ok(());
    }
    std::fs::create_dir_all(&mnt).map_err(|e| RuntimeError::io("mkdir", &mnt, e))?;
    if !img.exists() {
        create(&img, mb).await?;
    }
    // nosuid/nodev: nothing in a sandbox's files is honoured as such by the
    // host. noinit_itable: no background zeroing of inode tables, which
    // would allocate the image's blocks (a sparse file reads as zeros).
    const OPTS: &str = "nosuid,nodev,noinit_itable";
    // A loop device still backing the image (its filesystem pinned by a
    // copy of the mount in another namespace): mount that device, which
    // yields the same superblock. A second loop device would be a second
    // filesystem on one image.
    let mut mounted = false;
    for dev in loop_devices_of(&img) {
        let mut cmd = tokio::process::Command::new("mount");
        cmd.args(["-t", "ext4", "-o", OPTS]).arg(&dev).arg(&mnt);
        match crate::tool::run(&mut cmd, "mount", Duration::from_secs(30)).await {
            Ok(()) => {
                tracing::info!(dev, image = %img.display(), "reused the loop device still backing the image");
                mounted = true;
                break;
            }
            // Released meanwhile (autoclear): a fresh loop device below.
            Err(e) => tracing::debug!(dev, error = %e, "loop device not reusable"),
        }
    }
    if !mounted {
        let mut cmd = tokio::process::Command::new("mount");
        cmd.args(["-t", "ext4", "-o"])
            .arg(format!("loop,{OPTS}"))
            .arg(&img)
            .arg(&mnt);
        crate::tool::run(&mut cmd, "mount", Duration::from_secs(30)).await?;
    }
    // Shared: namespaces copied from the host's from now on get a slave of
    // it (ip netns exec, systemd), which our unmount reaches.
    rustix::mount::mount_change(&mnt, rustix::mount::MountPropagationFlags::SHARED)
        .map_err(|e| RuntimeError::io("make-shared", &mnt, e.into()))
}

/// A sparse file of `mb` MiB made an ext4 filesystem, written to a
/// temporary name and renamed, so an image that exists is complete.
async fn create(img: &Path, mb: u64) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = img.with_extension("ext4.tmp");
    let _ = std::fs::remove_file(&tmp);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| RuntimeError::io("create", &tmp, e))?;
    f.set_len(mb << 20)
        .map_err(|e| RuntimeError::io("truncate", &tmp, e))?;
    drop(f);
    // -m 0: no blocks reserved for (host) root, which the sandbox is not.
    // Lazy init and no discard: created in milliseconds, blocks allocated
    // only when written.
    let mut cmd = tokio::process::Command::new("mkfs.ext4");
    cmd.args([
        "-q",
        "-F",
        "-m",
        "0",
        "-E",
        "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
    ])
    .arg(&tmp);
    if let Err(e) = crate::tool::run(&mut cmd, "mkfs.ext4", Duration::from_secs(60)).await {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, img).map_err(|e| RuntimeError::io("rename", img, e))
}

/// Unmount the image (idempotent) and wait, bounded, until its loop
/// device is released. A device still held after that (a private copy of
/// the mount in another process's namespace) is left to autoclear when the
/// holder exits, with a warning: it is not the sandbox's to release.
pub async fn unmount(dir: &Path) -> Result<()> {
    let mnt = mount_point(dir);
    if super::rootfs::is_mount_point(&mnt) {
        // A plain unmount first: synchronous, so the loop device is free
        // when it returns. Busy (something still holds a file): detach.
        if rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::empty()).is_err() {
            super::rootfs::unmount_all(&mnt)?;
        }
    }
    let img = image(dir);
    for _ in 0..100 {
        if loop_devices_of(&img).is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!(
        image = %img.display(),
        devices = ?loop_devices_of(&img),
        "the disk image is unmounted here but another mount namespace still holds it; its loop device is released when that namespace ends"
    );
    Ok(())
}

/// Loop devices backed by `img` (from sysfs; a deleted backing file is
/// reported with " (deleted)" after its path).
pub fn loop_devices_of(img: &Path) -> Vec<String> {
    let want = img.to_string_lossy().to_string();
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return vec![];
    };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("loop/backing_file")).is_ok_and(|b| {
                let b = b.trim_end();
                b == want || b.strip_suffix(" (deleted)") == Some(&want)
            })
        })
        .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
        .collect()
}
