//! Item 7 of issue 11: disk limits. A sandbox fills its disk (a container's
//! writable layer, a VM's root disk) and must get ENOSPC inside while the
//! host loses at most its `disk_mb`; a sandbox floods its console and the
//! console log stays under `console_log_max_kb`; snapshots beyond the
//! organization's quota are refused with `limit` and leave nothing behind.
//! Plus the leak checks of the disk image (no loop device or mount left
//! after destroy, also after a daemon kill -9 and restart).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use sandforge_tests::{vm, Attempts, Daemon};
use serde_json::{json, Value};

const MB: u64 = 1 << 20;

/// Bytes allocated under `dir` on `dir`'s own filesystem (mount points,
/// such as the overlay or the loop-mounted layer, are not entered): what
/// the sandbox costs the host's filesystem.
fn footprint(dir: &Path) -> u64 {
    fn walk(p: &Path, dev: u64) -> u64 {
        let Ok(m) = std::fs::symlink_metadata(p) else {
            return 0;
        };
        if m.dev() != dev {
            return 0;
        }
        let mut n = m.blocks() * 512;
        if m.is_dir() {
            if let Ok(rd) = std::fs::read_dir(p) {
                n += rd.flatten().map(|e| walk(&e.path(), dev)).sum::<u64>();
            }
        }
        n
    }
    let dev = std::fs::metadata(dir).map(|m| m.dev()).unwrap_or(0);
    walk(dir, dev)
}

/// Free bytes of the filesystem holding `p` (for the report: other builds
/// share the host's disk, so it is printed, not asserted).
fn host_free(p: &Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}

/// Loop devices whose backing file lies under `dir`.
fn loops_under(dir: &Path) -> Vec<String> {
    let mut v = vec![];
    let needle = dir.to_string_lossy().to_string();
    if let Ok(rd) = std::fs::read_dir("/sys/block") {
        for e in rd.flatten() {
            let f = e.path().join("loop/backing_file");
            if let Ok(b) = std::fs::read_to_string(&f) {
                if b.contains(&needle) {
                    v.push(format!(
                        "{} -> {}",
                        e.file_name().to_string_lossy(),
                        b.trim()
                    ));
                }
            }
        }
    }
    v
}

/// The smallest `disk_mb` a VM of the default template takes (the create
/// answers it in its error), plus `extra`.
async fn vm_disk_mb(d: &Daemon, extra: u64) -> u64 {
    let (s, v) = d
        .call(Method::POST, "/v1/sandboxes", Some(json!({"disk_mb": 32})))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    let min: u64 = msg
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no size in {msg}"));
    min + extra
}

fn sandbox_dir(d: &Daemon, id: &str) -> PathBuf {
    d.state_dir().join("sandboxes").join(id)
}

#[tokio::test]
async fn filling_the_disk_gives_enospc_inside_and_costs_the_host_at_most_disk_mb() {
    let d = Daemon::start().await;
    let mut a = Attempts::new("disk: write past disk_mb");
    let disk_mb = if vm() { vm_disk_mb(&d, 64).await } else { 64 };
    let id = d
        .create_id(json!({"disk_mb": disk_mb, "network": "offline", "memory_mb": 256}))
        .await;
    let dir = sandbox_dir(&d, &id);
    let avail_mb: u64 = d
        .sh_ok(&id, "df -B1M --output=avail / | tail -1")
        .await
        .trim()
        .parse()
        .unwrap();
    println!("disk: disk_mb {disk_mb}, {avail_mb} MB free inside");
    let before = footprint(&dir);
    let free_before = host_free(&d.state_dir());
    // 200 MB, or more than a VM's guest has free (its template's image
    // has room of its own).
    let count = if vm() { avail_mb + 100 } else { 200 };
    let (s, v) = d
        .execute(
            &id,
            json!({"command": format!("dd if=/dev/zero of=/big bs=1M count={count} conv=fsync; r=$?; sync; exit $r"), "timeout_seconds": 300}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let stderr = v["stderr"].as_str().unwrap_or_default();
    a.record(
        v["exit_code"] != 0 && stderr.contains("No space left on device"),
        format!("dd of {count} MB into disk_mb {disk_mb}: {v}"),
    );
    let grown = footprint(&dir).saturating_sub(before);
    let free_drop = free_before.saturating_sub(host_free(&d.state_dir()));
    println!(
        "disk: the sandbox's files grew by {} MB; host free space dropped by {} MB (other builds share the disk)",
        grown / MB,
        free_drop / MB
    );
    // A container's image, like a VM's qcow2 overlay, holds at most its
    // disk_mb (the overlay also copies up the blocks the guest rewrites,
    // its journal's for one, so it grows by more than the data). Slack:
    // qcow2 metadata.
    let bound = disk_mb * MB + 16 * MB;
    a.record(
        grown <= bound,
        format!("the host paid {} MB for a {disk_mb} MB disk", grown / MB),
    );
    // An upload onto the full disk: a 4xx `limit`, not a 500.
    let r = d
        .req(
            Method::PUT,
            &format!("/v1/sandboxes/{id}/files?path=/root/up"),
        )
        .body(vec![7u8; 4 << 20])
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    a.record(
        status.is_client_error() && body["error"]["code"] == "limit",
        format!("an upload onto the full disk answered {status} {body}"),
    );
    // The sandbox lives on: removing the file frees its space.
    d.sh_ok(&id, "rm /big && echo ok > /small").await;
    d.destroy(&id).await;
    assert_eq!(d.leftovers(&id), Vec::<String>::new());
    assert_eq!(loops_under(&d.state_dir()), Vec::<String>::new());
    a.finish();
}

#[tokio::test]
async fn the_disk_survives_stop_start_restart_snapshot_and_fork_and_leaks_nothing() {
    let mut d = Daemon::start().await;
    let mut a = Attempts::new("disk: a loop device or mount left behind");
    let disk_mb = if vm() { vm_disk_mb(&d, 64).await } else { 64 };
    let id = d
        .create_id(json!({"disk_mb": disk_mb, "network": "offline", "memory_mb": 256}))
        .await;
    let size = |s: String| s.trim().parse::<u64>().unwrap();
    let total_mb = size(d.sh_ok(&id, "df -B1M --output=size / | tail -1").await);
    assert!(
        total_mb <= disk_mb,
        "/ is {total_mb} MB for disk_mb {disk_mb}"
    );
    d.sh_ok(&id, "echo kept > /root/f").await;

    let (s, v) = d
        .call(Method::POST, &format!("/v1/sandboxes/{id}/stop"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    if !vm() {
        a.record(
            loops_under(&sandbox_dir(&d, &id)).is_empty(),
            "a stopped container holds its loop device",
        );
    }
    let (s, v) = d
        .call(Method::POST, &format!("/v1/sandboxes/{id}/start"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(d.sh_ok(&id, "cat /root/f").await, "kept\n");
    assert_eq!(
        size(d.sh_ok(&id, "df -B1M --output=size / | tail -1").await),
        total_mb
    );

    let (s, snap) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/snapshots"),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{snap}");
    let fork = d
        .create_id(json!({"snapshot_id": snap["id"], "isolation": sandforge_tests::isolation()}))
        .await;
    assert_eq!(d.sh_ok(&fork, "cat /root/f").await, "kept\n");
    assert_eq!(
        size(d.sh_ok(&fork, "df -B1M --output=size / | tail -1").await),
        total_mb,
        "the fork has the same disk"
    );
    let avail_mb = size(d.sh_ok(&fork, "df -B1M --output=avail / | tail -1").await);
    let (_, v) = d
        .execute(
            &fork,
            json!({"command": format!("dd if=/dev/zero of=/big bs=1M count={}", avail_mb + 100), "timeout_seconds": 300}),
        )
        .await;
    a.record(
        v["exit_code"] != 0,
        format!("the fork's disk is not capped: {v}"),
    );

    // kill -9 the daemon: the disks stay mounted, the sandboxes re-attach.
    d.restart().await;
    assert_eq!(d.sh_ok(&id, "cat /root/f").await, "kept\n");
    assert_eq!(d.sh_ok(&fork, "cat /root/f").await, "kept\n");
    for sb in [&id, &fork] {
        d.destroy(sb).await;
        a.record(
            d.leftovers(sb).is_empty(),
            format!("leftovers of {sb}: {:?}", d.leftovers(sb)),
        );
    }
    let loops = loops_under(&d.state_dir());
    a.record(loops.is_empty(), format!("loop devices left: {loops:?}"));
    // The same for one destroyed while stopped.
    let id = d
        .create_id(json!({"disk_mb": disk_mb, "network": "offline", "memory_mb": 256}))
        .await;
    let (s, v) = d
        .call(Method::POST, &format!("/v1/sandboxes/{id}/stop"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    d.restart().await;
    d.destroy(&id).await;
    a.record(
        d.leftovers(&id).is_empty() && loops_under(&d.state_dir()).is_empty(),
        format!("leftovers of a stopped sandbox: {:?}", d.leftovers(&id)),
    );
    a.finish();
}

/// Poll the console route until it holds `marker` (bounded).
async fn console_until(d: &Daemon, id: &str, marker: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = d
            .req(Method::GET, &format!("/v1/sandboxes/{id}/console"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let t = r.text().await.unwrap();
        if t.contains(marker) {
            return t;
        }
        assert!(Instant::now() < deadline, "console never showed {marker}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_console_flood_leaves_the_console_log_under_its_cap() {
    let cap_kb = 64;
    let d = Daemon::start_with_config(&[], &format!("console_log_max_kb: {cap_kb}")).await;
    let mut a = Attempts::new("console: write 5 MB to the console");
    let id = d
        .create_id(json!({"network": "offline", "memory_mb": 256}))
        .await;
    let dir = sandbox_dir(&d, &id);
    let marker = "END-OF-FLOOD-7";
    if vm() {
        // Guest root writes straight to the serial port.
        let (s, v) = d
            .execute(
                &id,
                json!({"command": format!("head -c 5000000 /dev/zero | tr '\\0' x > /dev/ttyS0; echo {marker} > /dev/ttyS0"), "timeout_seconds": 300}),
            )
            .await;
        assert_eq!((s, &v["exit_code"]), (StatusCode::OK, &json!(0)), "{v}");
    } else {
        // A container's console is its init's stdout: write what a
        // compromised agent (PID 1) would, through its own descriptor.
        let pid = d.sandbox_pid(&id);
        let out = format!("/proc/{pid}/fd/1");
        let chunk = vec![b'x'; 1 << 20];
        let mut f = std::fs::OpenOptions::new().write(true).open(&out).unwrap();
        use std::io::Write;
        for _ in 0..5 {
            f.write_all(&chunk).unwrap();
        }
        writeln!(f, "\n{marker}").unwrap();
    }
    let tail = console_until(&d, &id, marker).await;
    let cap = cap_kb * 1024;
    let len = |p: PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let (cur, old) = (len(dir.join("console.log")), len(dir.join("console.log.1")));
    println!("console: console.log {cur} bytes, console.log.1 {old} bytes, cap {cap}");
    a.record(
        cur <= cap,
        format!("console.log is {cur} bytes (cap {cap})"),
    );
    a.record(
        old <= cap,
        format!("console.log.1 is {old} bytes (cap {cap})"),
    );
    a.record(
        tail.len() as u64 <= 64 * 1024 + 1,
        format!("the console route answered {} bytes", tail.len()),
    );
    d.destroy(&id).await;
    assert_eq!(d.leftovers(&id), Vec::<String>::new());
    a.finish();
}

/// Set `key: value` in the daemon's config file and restart it (kill -9).
async fn reconfigure(d: &mut Daemon, key: &str, value: u64) {
    let raw = std::fs::read_to_string(&d.config).unwrap();
    let mut lines: Vec<String> = raw
        .lines()
        .filter(|l| !l.starts_with(&format!("{key}:")))
        .map(str::to_string)
        .collect();
    lines.push(format!("{key}: {value}"));
    std::fs::write(&d.config, lines.join("\n") + "\n").unwrap();
    d.restart().await;
}

async fn snapshot(d: &Daemon, id: &str) -> (StatusCode, Value) {
    d.call(
        Method::POST,
        &format!("/v1/sandboxes/{id}/snapshots"),
        Some(json!({})),
    )
    .await
}

fn staged_snapshots(d: &Daemon) -> Vec<String> {
    std::fs::read_dir(d.state_dir().join("snapshots"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn snapshots_beyond_the_quota_are_refused_with_limit() {
    let mut d = Daemon::start_with_config(
        &[],
        "max_snapshots_per_sandbox: 2\nmax_snapshot_bytes_per_org: 100000000000",
    )
    .await;
    let mut a = Attempts::new("snapshots: beyond the quota");
    let id = d
        .create_id(json!({"network": "offline", "memory_mb": 256}))
        .await;
    d.sh_ok(&id, "head -c 8000000 /dev/urandom > /root/blob && sync")
        .await;
    let (s, first) = snapshot(&d, &id).await;
    assert_eq!(s, StatusCode::CREATED, "{first}");
    let size = first["size_bytes"].as_u64().unwrap();
    println!("snapshots: the first is {} KB", size / 1024);

    // Bytes: a second copy would exceed one and a half of the first.
    reconfigure(&mut d, "max_snapshot_bytes_per_org", size + size / 2).await;
    for n in 0..2 {
        let (s, v) = snapshot(&d, &id).await;
        a.record(
            s.is_client_error() && v["error"]["code"] == "limit",
            format!("snapshot over the org's bytes (try {n}): {s} {v}"),
        );
    }
    let (_, list) = d
        .call(Method::GET, &format!("/v1/sandboxes/{id}/snapshots"), None)
        .await;
    a.record(
        list.as_array().map(Vec::len) == Some(1),
        format!("a refused snapshot was listed: {list}"),
    );
    a.record(
        staged_snapshots(&d).is_empty(),
        format!("a refused snapshot left {:?}", staged_snapshots(&d)),
    );
    let dirs = std::fs::read_dir(d.state_dir().join("snapshots"))
        .unwrap()
        .count();
    a.record(
        dirs == 1,
        format!("{dirs} snapshot directories for one snapshot"),
    );
    // The sandbox still runs.
    assert_eq!(d.sh_ok(&id, "echo alive").await, "alive\n");

    // Count: two per sandbox.
    reconfigure(&mut d, "max_snapshot_bytes_per_org", 100_000_000_000).await;
    let (s, v) = snapshot(&d, &id).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = snapshot(&d, &id).await;
    a.record(
        s.is_client_error() && v["error"]["code"] == "limit",
        format!("a third snapshot of one sandbox: {s} {v}"),
    );
    a.record(staged_snapshots(&d).is_empty(), "staging left behind");
    d.destroy(&id).await;
    a.finish();
}

#[tokio::test]
async fn containers_get_container_disk_mb_by_default_and_0_keeps_the_host_layer() {
    if vm() {
        return; // a VM's disk is vm_disk_mb, covered by the microvm suite
    }
    let d = Daemon::start_with_config(&[], "container_disk_mb: 128").await;
    let sb = d.create(json!({"network": "offline"})).await;
    let id = sb["id"].as_str().unwrap().to_string();
    assert_eq!(sb["disk_mb"], 128, "{sb}");
    let total: u64 = d
        .sh_ok(&id, "df -B1M --output=size / | tail -1")
        .await
        .trim()
        .parse()
        .unwrap();
    assert!((64..=128).contains(&total), "/ is {total} MB");
    assert!(sandbox_dir(&d, &id).join("layer.ext4").is_file());
    d.destroy(&id).await;
    assert_eq!(d.leftovers(&id), Vec::<String>::new());

    let d = Daemon::start_with_config(&[], "container_disk_mb: 0").await;
    let sb = d.create(json!({"network": "offline"})).await;
    let id = sb["id"].as_str().unwrap().to_string();
    assert!(sb["disk_mb"].is_null(), "{sb}");
    d.sh_ok(&id, "echo x > /root/f").await;
    let dir = sandbox_dir(&d, &id);
    assert!(!dir.join("layer.ext4").exists());
    assert!(
        dir.join("upper/root/f").is_file(),
        "the layer is on the host"
    );
    d.destroy(&id).await;
    assert_eq!(d.leftovers(&id), Vec::<String>::new());
}

/// A host process that makes its own mount namespace while a container's
/// disk is mounted holds a copy of that mount (`ip netns exec` makes it a
/// slave; `unshare -m` a private copy that pins the loop device). Neither
/// may wedge stop or destroy, and a start meanwhile must not put a second
/// filesystem on the same image.
#[tokio::test]
async fn a_mount_namespace_copied_by_a_host_process_does_not_wedge_the_disk() {
    if vm() {
        return; // a VM's disk is a file QEMU opens, not a host mount
    }
    let d = Daemon::start().await;
    let mut a = Attempts::new("disk: a host mount namespace pins the image");
    let id = d
        .create_id(json!({"disk_mb": 64, "network": "offline"}))
        .await;
    d.sh_ok(&id, "echo one > /root/f && sync").await;
    let holders: Vec<std::process::Child> = ["slave", "private"]
        .iter()
        .map(|p| {
            std::process::Command::new("unshare")
                .args(["-m", "--propagation", p, "sleep", "600"])
                .spawn()
                .unwrap()
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for round in 0..2 {
        let (s, v) = d
            .call(Method::POST, &format!("/v1/sandboxes/{id}/stop"), None)
            .await;
        a.record(s == StatusCode::OK, format!("stop {round}: {s} {v}"));
        let (s, v) = d
            .call(Method::POST, &format!("/v1/sandboxes/{id}/start"), None)
            .await;
        a.record(s == StatusCode::OK, format!("start {round}: {s} {v}"));
        let loops = loops_under(&sandbox_dir(&d, &id));
        a.record(
            loops.len() == 1,
            format!("one image, one loop device: {loops:?}"),
        );
        d.sh_ok(&id, &format!("echo {round} >> /root/f && sync"))
            .await;
    }
    assert_eq!(d.sh_ok(&id, "cat /root/f").await, "one\n0\n1\n");
    let (s, v) = d
        .call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .await;
    a.record(s == StatusCode::OK, format!("destroy: {s} {v}"));
    for mut h in holders {
        let _ = h.kill();
        let _ = h.wait();
    }
    // The pinned device autoclears once its last namespace is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !loops_under(&d.state_dir()).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let loops = loops_under(&d.state_dir());
    a.record(loops.is_empty(), format!("loop devices left: {loops:?}"));
    a.finish();
}
