//! Item 3: every state file and directory is private. Guest RAM, memory
//! snapshots, disks and sockets must not be readable by other local users,
//! and a file belongs either to the daemon (root) or to the one VM whose
//! directory it is in, never to a uid another VM could be given later.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use reqwest::{Method, StatusCode};
use sandforge_tests::{vm, Attempts, Daemon};
use serde_json::json;

/// Trees that hold the sandbox's own files (any mode the sandbox likes).
const SANDBOX_CONTENT: &[&str] = &["rootfs", "upper", "work", "mounts", "hostmounts"];

/// World-readable on purpose: the agent binary every container executes
/// and the VMs' initramfs (the same binary plus kernel modules).
fn public(rel: &Path) -> bool {
    rel == Path::new("bin")
        || rel == Path::new("bin/sandforge-agent")
        || rel == Path::new("vm")
        || rel == Path::new("vm/initramfs.cpio")
}

fn walk(root: &Path, out: &mut Vec<(PathBuf, std::fs::Metadata)>) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let name = e.file_name();
        let content = SANDBOX_CONTENT.iter().any(|c| name == *c);
        out.push((p.clone(), m.clone()));
        if m.is_dir() && !content {
            walk(&p, out);
        }
    }
}

/// The uid a path may be owned by besides root: the owner of the VM
/// sandbox directory component it lies in (`sandboxes/<id>/...`).
fn problems(state: &Path, shm: Option<&Path>, vm_uids: &[(String, u32)]) -> (usize, Vec<String>) {
    let mut bad = vec![];
    let mut checked = 0;
    let mut entries = vec![];
    walk(state, &mut entries);
    for (p, m) in &entries {
        checked += 1;
        let rel = p.strip_prefix(state).unwrap();
        let mode = m.mode() & 0o7777;
        let ft = m.file_type();
        let name = p.file_name().unwrap().to_string_lossy();
        let is_content = SANDBOX_CONTENT.iter().any(|c| name == *c);
        let ok_mode = if public(rel) {
            mode & 0o022 == 0
        } else if ft.is_dir() {
            // Traversable (0711) at most, never listable or writable.
            mode & 0o066 == 0
        } else if ft.is_socket() {
            mode & 0o022 == 0
        } else if ft.is_symlink() {
            true
        } else {
            mode & 0o077 == 0
        };
        // A content tree's own directory may be the sandbox's (its root).
        if !ok_mode && !is_content {
            bad.push(format!("{} mode {mode:o}", rel.display()));
        }
        let owner_ok = m.uid() == 0
            || is_content
            || vm_uids.iter().any(|(id, uid)| {
                *uid == m.uid() && rel.starts_with(Path::new("sandboxes").join(id))
            });
        if !owner_ok {
            bad.push(format!("{} owned by {}", rel.display(), m.uid()));
        }
    }
    if let Some(shm) = shm {
        let m = std::fs::metadata(shm).unwrap();
        if m.mode() & 0o066 != 0 || m.uid() != 0 {
            bad.push(format!(
                "{} mode {:o} uid {}",
                shm.display(),
                m.mode() & 0o7777,
                m.uid()
            ));
        }
        for e in std::fs::read_dir(shm).unwrap().flatten() {
            checked += 1;
            let m = e.metadata().unwrap();
            let id = e
                .file_name()
                .to_string_lossy()
                .trim_end_matches(".mem")
                .to_string();
            let owner_ok = m.uid() == 0 || vm_uids.iter().any(|(i, u)| *i == id && *u == m.uid());
            if m.mode() & 0o077 != 0 || !owner_ok {
                bad.push(format!(
                    "{} mode {:o} uid {}",
                    e.path().display(),
                    m.mode() & 0o7777,
                    m.uid()
                ));
            }
        }
    }
    (checked, bad)
}

/// The directory holding `<id>.mem` files of this daemon's VMs.
fn shm_dir_of(id: &str) -> Option<PathBuf> {
    std::fs::read_dir("/dev/shm").ok()?.flatten().find_map(|e| {
        let p = e.path().join(format!("{id}.mem"));
        p.exists().then(|| e.path())
    })
}

/// The VM uid of a sandbox: the owner of its agent socket's directory.
fn vm_uid(state: &Path, id: &str) -> u32 {
    let out = std::process::Command::new("find")
        .arg(state.join("sandboxes").join(id))
        .args(["-name", "agent.sock"])
        .output()
        .unwrap();
    let sock = String::from_utf8(out.stdout).unwrap();
    let sock = PathBuf::from(sock.lines().next().expect("agent.sock"));
    std::fs::metadata(sock.parent().unwrap()).unwrap().uid()
}

#[tokio::test]
async fn state_files_are_private() {
    let d = Daemon::start().await;
    let mut a = Attempts::new("state file modes and owners");
    let id = d.create_id(json!({"network": "offline"})).await;
    d.sh_ok(&id, "echo secret > /root/s.txt").await;
    let (s, v) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/snapshots"),
            Some(json!({"name": "one"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    if vm() {
        // A stop writes the memory chain; the start maps a fresh RAM file.
        for op in ["stop", "start"] {
            let (s, v) = d
                .call(Method::POST, &format!("/v1/sandboxes/{id}/{op}"), None)
                .await;
            assert_eq!(s, StatusCode::OK, "{op}: {v}");
        }
    }
    let state = d.state_dir();
    let vm_uids = if vm() {
        vec![(id.clone(), vm_uid(&state, &id))]
    } else {
        vec![]
    };
    let shm = if vm() { shm_dir_of(&id) } else { None };
    if vm() {
        let shm = shm.as_deref().expect("the VM's RAM file");
        // Per daemon, derived from its state directory: never the shared
        // /dev/shm/sandforge of another daemon.
        a.record(
            shm != Path::new("/dev/shm/sandforge"),
            "the RAM directory is shared by every daemon",
        );
    }
    // Each file and directory checked is one chance to find a leak.
    let (checked, bad) = problems(&state, shm.as_deref(), &vm_uids);
    for _ in bad.len()..checked {
        a.record(true, "");
    }
    for b in &bad {
        a.record(false, b.clone());
    }
    // The snapshot outlives the sandbox and belongs to root alone.
    d.destroy(&id).await;
    let (checked, bad) = problems(&state, None, &[]);
    for _ in bad.len()..checked {
        a.record(true, "");
    }
    for b in &bad {
        a.record(false, format!("after destroy: {b}"));
    }
    a.finish();
}
