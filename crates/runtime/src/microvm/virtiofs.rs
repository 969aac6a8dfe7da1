//! Host directories in microVMs: one `virtiofsd` (the reference
//! vhost-user-fs daemon, from crates.io) per mount, serving the host path
//! to the guest's virtio-fs driver over a unix socket in the sandbox
//! directory. virtiofsd runs as root in its own namespace sandbox (it must
//! act as the files' owners), with `--readonly` when the mount asks for it
//! (enforced on the host: the guest cannot remount its way around it), and
//! without the capabilities to create device nodes or file capabilities.
//! Guest uid 0 acts as host uid 0 inside the shared tree, as with the
//! container backend's id-mapped mounts: `allowed_host_paths` is the
//! boundary.
//!
//! Owns the virtiofsd processes of a sandbox (started in their own process
//! group so they outlive a daemon restart; they exit when their QEMU
//! disconnects, and destroy kills any left) and their `vfs-<n>.sock` and
//! `vfs-<n>.log` files. It must not open or change the shared files itself.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};

use super::identity::{self, VmIdentity};
use super::procs;
use crate::backend::ResolvedMount;
use crate::error::{Result, RuntimeError};

/// One mount as QEMU and the guest see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    pub socket: PathBuf,
    pub guest_path: String,
    pub read_only: bool,
}

/// Characters the guest's `sandforge.mounts=` parser splits on or cannot
/// see on a kernel command line.
const CMDLINE_UNSAFE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b',')
    .add(b':')
    .add(b'%')
    .add(b'"')
    .add(b'=');

pub fn shares(dir: &Path, mounts: &[ResolvedMount]) -> Vec<Share> {
    mounts
        .iter()
        .enumerate()
        .map(|(i, m)| Share {
            tag: format!("sf{i}"),
            socket: dir.join(format!("vfs-{i}.sock")),
            guest_path: m.guest_path.clone(),
            read_only: m.read_only,
        })
        .collect()
}

/// The guest's `sandforge.mounts=` value (empty without mounts).
pub fn cmdline_value(shares: &[Share]) -> String {
    shares
        .iter()
        .map(|s| {
            format!(
                "{}:{}:{}",
                s.tag,
                utf8_percent_encode(&s.guest_path, CMDLINE_UNSAFE),
                if s.read_only { "ro" } else { "rw" }
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Start one virtiofsd per mount and wait for each socket; the sockets are
/// then handed to the VM's identity so its QEMU can connect.
pub async fn start(
    binary: &Path,
    dir: &Path,
    mounts: &[ResolvedMount],
    sources: &[PathBuf],
    owner: Option<VmIdentity>,
) -> Result<Vec<Share>> {
    let shares = shares(dir, mounts);
    if shares.is_empty() {
        return Ok(shares);
    }
    if !binary.is_file() {
        return Err(RuntimeError::Setup(format!(
            "host mounts in microVMs need virtiofsd at {} (scripts/deps.sh installs it)",
            binary.display()
        )));
    }
    for ((share, m), source) in shares.iter().zip(mounts).zip(sources) {
        let log_path = dir.join(format!("vfs-{}.log", &share.tag[2..]));
        let mut cmd = std::process::Command::new(binary);
        cmd.arg("--shared-dir")
            .arg(source)
            .arg("--socket-path")
            .arg(&share.socket)
            .args([
                "--sandbox",
                "namespace",
                "--cache",
                "auto",
                "--modcaps=-mknod:-setfcap",
                "--log-level",
                "warn",
            ]);
        if share.read_only {
            cmd.arg("--readonly");
        }
        crate::tool::sandbox_umask_std(&mut cmd);
        let mut child = procs::spawn_detached(&mut cmd, &log_path, "virtiofsd")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !share.socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(RuntimeError::Command {
                    tool: "virtiofsd".into(),
                    message: format!(
                        "exited ({status}) for {}: {}",
                        m.host_path.display(),
                        crate::container::runc::tail_of(&log_path, 400)
                    ),
                });
            }
            if Instant::now() > deadline {
                return Err(RuntimeError::Command {
                    tool: "virtiofsd".into(),
                    message: "its socket did not appear within 10 s".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(id) = owner {
            identity::give(&share.socket, id)?;
        }
        // Reap it whenever it exits (after its QEMU), so it never lingers
        // as a zombie of the daemon.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
    }
    Ok(shares)
}

/// Kill whatever virtiofsd of this sandbox is still running.
pub fn stop_all(dir: &Path) -> usize {
    procs::kill_all("virtiofsd", &format!("{}/vfs-", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_escapes_separators() {
        let m = |p: &str, ro| ResolvedMount {
            host_path: "/h".into(),
            root: None,
            guest_path: p.into(),
            read_only: ro,
        };
        let s = shares(
            Path::new("/s/sb"),
            &[m("/work", false), m("/a b,c:d", true)],
        );
        assert_eq!(s[1].socket, PathBuf::from("/s/sb/vfs-1.sock"));
        assert_eq!(cmdline_value(&s), "sf0:/work:rw,sf1:/a%20b%2Cc%3Ad:ro");
        assert_eq!(cmdline_value(&[]), "");
    }
}
