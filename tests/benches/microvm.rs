//! MicroVM benchmark: what the microVM backend costs beside QEMU booting
//! the same guest on its own. One process, one real daemon (release build);
//! VM rows are measured `BENCH_VM_N` times (default 5; each boot takes
//! seconds under TCG) after one discarded warm-up, exec rows `BENCH_N`
//! times (default 20):
//!
//! 1. VM create → first exec: `POST /v1/sandboxes {"isolation":"microvm"}`
//!    then `/execute true`; floor: a raw QEMU started with the very command
//!    line the backend uses (same kernel, the daemon's initramfs, a fresh
//!    qcow2 overlay of the template image, virtio-serial port), timed from
//!    spawn to init's last console line before it becomes the agent.
//! 2. exec `true` round trip through the virtio-serial channel; beside the
//!    same through a container's unix socket, and host fork/exec.
//! 3. a `HEAD /files` round trip (the agent channel alone, no guest
//!    process), microVM beside container.
//! 4. memory of an idle VM: QEMU's RSS after the guest settled, split into
//!    guest RAM the guest touched (shared memfd) and QEMU's own.
//!
//! 5. stop and start of a VM with memory (its snapshot chain), `BENCH_VM_N`
//!    rounds after writing 1 MiB in the guest each time: stop time,
//!    start → first exec, beside a raw QEMU `-incoming` restore of the same
//!    snapshot (compose the memory file, start QEMU, feed the device state,
//!    running) as the floor; the full and the diff snapshot sizes.
//!
//! The accelerator is printed with the table. Timings are reported, never
//! asserted. Run as root: `scripts/bench.sh` runs this after the core one.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use sandforge_runtime::microvm::{accel, memsnap, persist, qemu};
use sandforge_tests::bench::print_table;
use sandforge_tests::{sample, scratch_dir, Daemon};
use serde_json::json;

const GUEST: &str = "/var/cache/sandforge/guest";
const IMAGE: &str = "/var/cache/sandforge/templates/default/rootfs.ext4";
const MEMORY_MB: u64 = 512;
/// What init prints right before it execs the agent.
const MARKER: &str = "starting the agent";

/// The guest kernel the daemon boots (uncompressed when there is one).
fn guest_kernel() -> std::path::PathBuf {
    ["vmlinux", "vmlinuz"]
        .iter()
        .map(|k| Path::new(GUEST).join(k))
        .find(|k| k.is_file())
        .expect("guest kernel")
}

fn spawn_qemu(args: &[String]) -> std::process::Child {
    Command::new("qemu-system-x86_64")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn exec_true(d: &Daemon, id: &str) {
    let (url, body) = (format!("/v1/sandboxes/{id}/exec"), json!({"cmd": ["true"]}));
    let (s, v) = d.call(Method::POST, &url, Some(body)).await;
    assert!(s == StatusCode::OK && v["exit_code"] == 0, "exec: {s} {v}");
}

async fn create_and_first_exec(d: &Daemon, isolation: &str) -> String {
    let body = json!({"isolation": isolation, "memory_mb": MEMORY_MB});
    let id = d.create_id(body).await;
    let (s, v) = d
        .execute(&id, json!({"command": "true", "timeout_seconds": 60}))
        .await;
    assert!(
        s == StatusCode::OK && v["exit_code"] == 0,
        "first exec: {v}"
    );
    id
}

/// Boot QEMU with the backend's own command line; return once init has
/// printed its marker to the serial console. The VM is killed after.
fn raw_boot(d: &Daemon, run: usize, accel: accel::Accel) {
    let dir = scratch_dir("sf-bench-vm-");
    let disk = dir.path().join("disk.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", IMAGE])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img");
    let kernel = guest_kernel();
    let args = qemu::args(&qemu::VmArgs {
        accel,
        cpus: 1,
        memory_mb: MEMORY_MB,
        kernel,
        initramfs: d.state_dir().join("vm/initramfs.cpio"),
        disk,
        dir: dir.path().to_path_buf(),
        hostname: format!("raw{run}"),
        tsc_khz: (accel == accel::Accel::Tcg)
            .then(qemu::host_tsc_khz)
            .flatten(),
        shares: vec![],
        net: None,
        mem_path: dir.path().join("mem"),
        incoming: false,
        base_fd: false,
    });
    // The serial console is a socket (QEMU drops output while nobody is
    // connected; the guest takes far longer than this to print anything).
    let console = qemu::console_socket(dir.path());
    let t = Instant::now();
    let mut child = spawn_qemu(&args);
    let mut stream = loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&console) {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no console socket");
        if let Ok(Some(st)) = child.try_wait() {
            panic!("QEMU exited ({st})");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut log = Vec::new();
    loop {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        if let Ok(n) = stream.read(&mut buf) {
            log.extend_from_slice(&buf[..n]);
        }
        if String::from_utf8_lossy(&log).contains(MARKER) {
            break;
        }
        let text = String::from_utf8_lossy(&log);
        assert!(t.elapsed() < Duration::from_secs(60), "no marker: {text}");
        if let Ok(Some(st)) = child.try_wait() {
            panic!("QEMU exited ({st}): {text}");
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Restore the sandbox's latest snapshot in a QEMU of our own (a copy of
/// its disk, its memory chain composed into a fresh file), timed until the
/// vCPUs run. The floor of `start`.
async fn raw_restore(d: &Daemon, id: &str, accel: accel::Accel) -> Duration {
    let sb = d.state_dir().join("sandboxes").join(id);
    let m = memsnap::load(&sb).unwrap().expect("a snapshot");
    let dir = scratch_dir("sf-bench-restore-");
    std::fs::copy(sb.join("disk.qcow2"), dir.path().join("disk.qcow2")).unwrap();
    let kernel = guest_kernel();
    let mem = dir.path().join("mem");
    let t = Instant::now();
    memsnap::restore(&sb, &m, &mem).unwrap();
    let args = qemu::args(&qemu::VmArgs {
        accel,
        cpus: 1,
        memory_mb: MEMORY_MB,
        kernel,
        initramfs: d.state_dir().join("vm/initramfs.cpio"),
        disk: dir.path().join("disk.qcow2"),
        dir: dir.path().to_path_buf(),
        hostname: "restore".into(),
        tsc_khz: (accel == accel::Accel::Tcg)
            .then(qemu::host_tsc_khz)
            .flatten(),
        shares: vec![],
        net: None,
        mem_path: mem.clone(),
        incoming: true,
        base_fd: false,
    });
    let mut child = spawn_qemu(&args);
    persist::load_device_state(&sb, &qemu::qmp_socket(dir.path()), &m)
        .await
        .expect("raw restore");
    let took = t.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    took
}

/// A `/proc/<pid>/status` memory field (`VmRSS`, `RssShmem`, ...) in MiB.
fn mem_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib as f64 / 1024.0
}

/// `HEAD /files` of a small file: one request over the agent channel with
/// no process started in the guest.
async fn head_file(d: &Daemon, id: &str) {
    let url = format!("/v1/sandboxes/{id}/files?path=/etc/hostname");
    let r = d.req(Method::HEAD, &url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "HEAD");
}

fn qemu_version() -> String {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("qemu ?")
        .to_string()
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_N").map_or(20, |v| v.parse().expect("BENCH_N"));
    let vm_n: usize = std::env::var("BENCH_VM_N").map_or(5, |v| v.parse().expect("BENCH_VM_N"));
    assert!(
        n >= 1 && vm_n >= 1,
        "BENCH_N and BENCH_VM_N must be at least 1"
    );
    let d = Daemon::start().await;
    let (_, h) = d.call(Method::GET, "/v1/sandboxes", None).await;
    assert!(h.is_array());

    // 1. create → first exec, against the raw boot floor.
    let mut accel_seen = String::new();
    let create = sample!(vm_n, {
        let id = create_and_first_exec(&d, "microvm").await;
        let (_, sb) = d
            .call(Method::GET, &format!("/v1/sandboxes/{id}"), None)
            .await;
        accel_seen = sb["accel"].as_str().unwrap_or("?").to_string();
        d.destroy(&id).await;
    });
    let accel = accel::choose(&accel_seen).expect("accel");
    let mut k = 0;
    let floor = sample!(vm_n, {
        k += 1;
        raw_boot(&d, k, accel)
    });

    // 2. exec round trips: VM, container, host.
    let vm = create_and_first_exec(&d, "microvm").await;
    let vm_exec = sample!(n, exec_true(&d, &vm).await);
    let vm_head = sample!(n, head_file(&d, &vm).await);
    let ct = create_and_first_exec(&d, "container").await;
    let ct_exec = sample!(n, exec_true(&d, &ct).await);
    let ct_head = sample!(n, head_file(&d, &ct).await);
    d.destroy(&ct).await;
    let mut true_cmd = Command::new("/bin/true");
    let fork = sample!(n, assert!(true_cmd.status().unwrap().success()));

    // 3. idle memory: let the guest settle, then read QEMU's RSS.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid: u32 = std::fs::read_to_string(d.state_dir().join(format!("sandboxes/{vm}/qemu.pid")))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let (rss, shmem, anon, file) = (
        mem_mib(pid, "VmRSS"),
        mem_mib(pid, "RssShmem"),
        mem_mib(pid, "RssAnon"),
        mem_mib(pid, "RssFile"),
    );
    d.destroy(&vm).await;

    // 5. stop / start with memory: a full snapshot, then diffs.
    let sb = d
        .create_id(json!({"isolation": "microvm", "memory_mb": MEMORY_MB, "network": "offline"}))
        .await;
    d.sh_ok(&sb, "mkdir -p /mnt/b && mount -t tmpfs none /mnt/b")
        .await;
    let (mut full_stop, mut stops, mut starts, mut floors) = (vec![], vec![], vec![], vec![]);
    let (mut full_bytes, mut diff_bytes) = (0u64, vec![]);
    for round in 0..=vm_n {
        d.sh_ok(
            &sb,
            &format!("head -c 1048576 /dev/urandom > /mnt/b/r{round}"),
        )
        .await;
        let t = Instant::now();
        let (s, v) = d
            .call(Method::POST, &format!("/v1/sandboxes/{sb}/stop"), None)
            .await;
        let took = t.elapsed();
        assert_eq!(s, StatusCode::OK, "stop: {v}");
        let bytes = v["snapshot_bytes"].as_u64().unwrap();
        if round == 0 {
            full_stop.push(took);
            full_bytes = bytes;
        } else {
            stops.push(took);
            diff_bytes.push(bytes);
            floors.push(raw_restore(&d, &sb, accel).await);
        }
        let t = Instant::now();
        let (s, v) = d
            .call(Method::POST, &format!("/v1/sandboxes/{sb}/start"), None)
            .await;
        assert_eq!(s, StatusCode::OK, "start: {v}");
        let (s, v) = d.execute(&sb, json!({"command": "true"})).await;
        assert!(
            s == StatusCode::OK && v["exit_code"] == 0,
            "first exec: {v}"
        );
        if round > 0 {
            starts.push(t.elapsed());
        }
    }
    d.destroy(&sb).await;
    diff_bytes.sort_unstable();
    let diff_median = diff_bytes[diff_bytes.len() / 2];

    let rows = [
        ("VM create → first exec `true`", create, Some(1)),
        (
            "↳ floor: raw QEMU, same guest, spawn → init's marker",
            floor,
            None,
        ),
        (
            "exec `true` round trip, microVM (virtio-serial)",
            vm_exec,
            Some(4),
        ),
        (
            "exec `true` round trip, container (unix socket)",
            ct_exec,
            Some(4),
        ),
        ("↳ baseline: host fork/exec/wait `/bin/true`", fork, None),
        (
            "file HEAD round trip, microVM (channel only)",
            vm_head,
            Some(6),
        ),
        ("↳ same, container", ct_head, None),
        (
            "stop, first (full memory snapshot; 1 sample)",
            full_stop,
            None,
        ),
        ("stop, later (diff after writing 1 MiB)", stops, None),
        (
            "start → first exec (restore from the chain)",
            starts,
            Some(10),
        ),
        (
            "↳ floor: raw QEMU `-incoming` restore of the same snapshot",
            floors,
            None,
        ),
    ];
    println!(
        "accelerator: {accel_seen}; {}; guest RAM {MEMORY_MB} MiB, 1 vCPU",
        qemu_version()
    );
    print_table(
        &format!("N = {vm_n} runs per VM boot row, {n} per exec row"),
        &rows,
    );
    println!(
        "\nidle microVM memory, 3 s after its first exec: QEMU RSS {rss:.1} MiB = guest RAM touched {shmem:.1} MiB (of {MEMORY_MB}) + QEMU's own heap {anon:.1} MiB + mapped files (binary, libraries; shared between VMs) {file:.1} MiB"
    );
    println!(
        "snapshot sizes ({MEMORY_MB} MiB guest): full {:.1} MiB, diff after writing 1 MiB {:.2} MiB (median of {})",
        full_bytes as f64 / 1048576.0,
        diff_median as f64 / 1048576.0,
        diff_bytes.len()
    );
}
