//! What a sandbox may not do, on either backend: root inside is not root
//! outside (a container's shifted uid, capabilities, seccomp and
//! no-new-privileges; a microVM's own kernel under a QEMU that is itself
//! unprivileged and seccomp-confined), memory limits (hit = exit 137), the
//! pids cap (containers), offline network, and host mounts only where the
//! configuration allows, read-only when asked.

use std::os::unix::fs::MetadataExt;

use reqwest::{Method, StatusCode};
use sandforge_tests::{scratch_dir, vm, Daemon};
use serde_json::json;

fn host_status_field(pid: u32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_default()
        .to_string()
}

/// The second column of a /proc status line (`Uid:`, `Seccomp:`, ...).
fn host_status_value(pid: u32, field: &str) -> String {
    host_status_field(pid, field)
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// A microVM: a guest kernel of its own, and a QEMU that runs as a uid of
/// its own (not root), confined by seccomp, with no capabilities.
async fn vm_boundary(d: &Daemon, id: &str, other: &str) {
    let uname = d.sh_ok(id, "uname -r").await;
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_ne!(
        uname.trim(),
        host.trim(),
        "the guest runs the host's kernel"
    );
    let pid = d.sandbox_pid(id);
    let uid: u32 = host_status_value(pid, "Uid:").parse().unwrap();
    assert!(uid >= 1000, "QEMU runs as uid {uid}");
    let other_uid: u32 = host_status_value(d.sandbox_pid(other), "Uid:")
        .parse()
        .unwrap();
    assert_ne!(uid, other_uid, "two VMs share a uid");
    assert_eq!(host_status_value(pid, "Seccomp:"), "2");
    assert_eq!(host_status_value(pid, "NoNewPrivs:"), "1");
    assert_eq!(host_status_value(pid, "CapEff:"), "0000000000000000");
    // The disk it runs on is its own: owned by its uid, 0600-ish.
    let disk = d.state_dir().join("sandboxes").join(id).join("disk.qcow2");
    assert_eq!(std::fs::metadata(&disk).unwrap().uid(), uid);
}

#[tokio::test]
async fn root_inside_is_unprivileged_outside() {
    let d = Daemon::start().await;
    let sb = d.create(json!({"name": "iso-box"})).await;
    let id = sb["id"].as_str().unwrap();
    assert_eq!(d.sh_ok(id, "id -u").await, "0\n");
    assert_eq!(d.sh_ok(id, "hostname").await, "iso-box\n");
    // The agent's own binary cannot be replaced.
    let v = d.sh(id, "echo x > /.sandforge/sandforge-agent 2>&1").await;
    assert_ne!(v["exit_code"], 0, "{v}");
    if vm() {
        let other = d.create_id(json!({})).await;
        vm_boundary(&d, id, &other).await;
        d.destroy(&other).await;
        d.destroy(id).await;
        return;
    }
    // On the host, the sandbox's processes run as the shifted uid.
    let pid = d.sandbox_pid(id);
    let uid_line = host_status_field(pid, "Uid:");
    assert!(
        uid_line
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u32>()
            .unwrap()
            >= 100_000,
        "{uid_line}"
    );
    // Its own namespaces, not the host's.
    for ns in ["pid", "mnt", "net", "user", "ipc", "uts"] {
        let host = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let sbx = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(host, sbx, "{ns} namespace is shared with the host");
    }
    let status = d.sh_ok(id, "cat /proc/self/status").await;
    let field = |f: &str| {
        status
            .lines()
            .find(|l| l.starts_with(f))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2");
    // Capabilities: a reduced set (no CAP_SYS_ADMIN = bit 21, no NET_RAW = 13).
    let caps = u64::from_str_radix(&field("CapEff:"), 16).unwrap();
    assert_eq!(caps & (1 << 21), 0, "CAP_SYS_ADMIN present");
    assert_eq!(caps & (1 << 13), 0, "CAP_NET_RAW present");
    // Denied operations.
    let v = d.sh(id, "mount -t tmpfs none /mnt 2>&1").await;
    assert_ne!(v["exit_code"], 0, "{v}");
    let v = d.sh(id, "unshare -U true 2>&1").await;
    assert_ne!(v["exit_code"], 0, "{v}");
    let v = d.sh(id, "echo x > /proc/sysrq-trigger 2>&1").await;
    assert_ne!(v["exit_code"], 0, "{v}");
    d.destroy(id).await;
}

#[tokio::test]
async fn offline_means_loopback_only() {
    let d = Daemon::start().await;
    let id = d.create_id(json!({"network": "offline"})).await;
    let ifaces = d.sh_ok(&id, "ls /sys/class/net").await;
    assert_eq!(ifaces, "lo\n");
    let routes = d
        .sh_ok(&id, "cat /proc/net/route | tail -n +2 | wc -l")
        .await;
    assert_eq!(routes, "0\n");
    // Loopback itself works (a server and a client inside the sandbox).
    let out = d
        .sh_ok(
            &id,
            "python3 -c \"import socket;s=socket.socket();s.bind(('127.0.0.1',0));s.listen();c=socket.create_connection(s.getsockname());print('ok')\"",
        )
        .await;
    assert_eq!(out, "ok\n");
    // Nothing outside is reachable: not even the host's loopback API.
    let v = d
        .sh(&id, &format!("python3 -c \"import socket;socket.create_connection(('127.0.0.1',{}),timeout=2)\" 2>&1", d.port))
        .await;
    assert_ne!(v["exit_code"], 0, "{v}");
    d.destroy(&id).await;
}

#[tokio::test]
async fn memory_limit_kills_the_command_not_the_sandbox() {
    let d = Daemon::start().await;
    let id = d.create_id(json!({"memory_mb": 128})).await;
    let v = d
        .sh(
            &id,
            // 400 MB in 16 MB steps, each one written: a container hits its
            // cgroup limit, a VM runs out of RAM (one 400 MB request would
            // be refused up front by the guest kernel's overcommit check).
            "python3 -c 'x = [bytearray(16 << 20) for _ in range(25)]; print(len(x))'",
        )
        .await;
    assert_eq!(v["exit_code"], 137, "{v}");
    assert_eq!(v["timed_out"], false);
    // The sandbox lives on.
    assert_eq!(d.sh_ok(&id, "echo alive").await, "alive\n");
    let (_, sb) = d
        .call(Method::GET, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(sb["status"], "running");
    d.destroy(&id).await;
}

#[tokio::test]
async fn pids_are_capped() {
    if vm() {
        // A host cgroup limit: a microVM's processes are bounded by its
        // own kernel, its RAM and its vCPUs instead (README, Limits).
        eprintln!("pids_are_capped: container backend only");
        return;
    }
    let d = Daemon::start().await;
    let id = d.create_id(json!({})).await;
    // Fork until the kernel refuses: the cap (1024 per sandbox) stops it
    // with EAGAIN long before 2000.
    let probe = r#"import os, signal
pids = []
err = 0
try:
    for i in range(2000):
        p = os.fork()
        if p == 0:
            signal.pause()
            os._exit(0)
        pids.append(p)
except OSError as e:
    err = e.errno
for p in pids:
    os.kill(p, 9)
    os.waitpid(p, 0)
print(len(pids), err)
"#;
    d.put_file(&id, "/tmp/forks.py", probe).await;
    let out = d.sh_ok(&id, "python3 /tmp/forks.py").await;
    let mut it = out.split_whitespace().map(|x| x.parse::<u32>().unwrap());
    let (forked, errno) = (it.next().unwrap(), it.next().unwrap());
    assert!(forked < 1024, "{forked} processes under a 1024 cap");
    assert_eq!(errno, 11, "fork should fail with EAGAIN");
    assert_eq!(d.sh_ok(&id, "echo still-ok").await, "still-ok\n");
    d.destroy(&id).await;
}

#[tokio::test]
async fn host_mounts_read_only_and_read_write() {
    let shared = scratch_dir("sf-mount-");
    std::fs::write(shared.path().join("hello.txt"), "from host\n").unwrap();
    let rw = shared.path().join("rw");
    let ro = shared.path().join("ro");
    std::fs::create_dir(&rw).unwrap();
    std::fs::create_dir(&ro).unwrap();
    std::fs::write(ro.join("keep.txt"), "keep\n").unwrap();
    let d = Daemon::start_with(&[shared.path()]).await;
    let id = d
        .create_id(json!({"mounts": [
            {"host_path": rw, "guest_path": "/work", "read_only": false},
            {"host_path": ro, "guest_path": "/ref", "read_only": true},
        ]}))
        .await;
    assert_eq!(d.sh_ok(&id, "cat /ref/keep.txt").await, "keep\n");
    let v = d.sh(&id, "echo x > /ref/new.txt").await;
    assert_ne!(v["exit_code"], 0, "read-only mount was writable: {v}");
    // Enforced outside the sandbox: remounting it read-write from inside
    // (refused in a container, possible in a VM's own kernel) does not help.
    let v = d
        .sh(&id, "mount -o remount,rw /ref 2>&1; echo x > /ref/new.txt")
        .await;
    assert_ne!(v["exit_code"], 0, "read-only mount was writable: {v}");
    assert!(!ro.join("new.txt").exists());
    // Read-write: the sandbox's root writes, the file lands on the host owned
    // by the host directory's owner (an id-mapped mount), not by uid 100000.
    d.sh_ok(
        &id,
        "echo written > /work/out.txt && mkdir -p /work/d && ls -ln /work",
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(rw.join("out.txt")).unwrap(),
        "written\n"
    );
    let meta = std::fs::metadata(rw.join("out.txt")).unwrap();
    assert_eq!(meta.uid(), std::fs::metadata(&rw).unwrap().uid());
    // A path outside the allowed list, or a symlink leading out of it, is refused.
    std::os::unix::fs::symlink("/etc", shared.path().join("sneaky")).unwrap();
    for host in [
        "/etc".to_string(),
        shared.path().join("sneaky").display().to_string(),
    ] {
        let (s, v) = d
            .call(
                Method::POST,
                "/v1/sandboxes",
                Some(json!({"mounts": [{"host_path": host, "guest_path": "/x"}]})),
            )
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{host}: {v}");
        assert_eq!(v["error"]["field"], "mounts[0].host_path");
    }
    d.destroy(&id).await;
    // Destroy never touches the host directory's content.
    assert!(rw.join("out.txt").exists() && ro.join("keep.txt").exists());
}
