//! Core latency benchmark: what Sandforge adds on top of doing the same work
//! directly on the host. One process, one real daemon (release build), each
//! row measured `BENCH_N` times (default 20) after one discarded warm-up:
//!
//! 1. create → first exec (offline, and with a NAT'd network): `POST /v1/sandboxes` then `POST .../execute true`
//!    (with the default `container_disk_mb`: the writable layer on a fresh
//!    loop-mounted ext4 image; a row without it, from a second daemon with
//!    `container_disk_mb: 0`, shows what the image costs)
//!    until it answers; baseline: a bare `runc run /bin/true` with the same
//!    isolation (user namespace 0→100000/65536; pid, mount, ipc, uts, cgroup
//!    and net namespaces; memory/cpu/pids limits; capabilities, masked paths
//!    and a small seccomp filter) on the read-only template rootfs. Destroy
//!    (`DELETE`, not in the create time) is its own row.
//! 2. exec round trip of `true` on a warm sandbox; baseline: fork/exec/wait
//!    of `/bin/true` on the host.
//! 3. file PUT + GET of 1 MiB; baseline: write + fsync + rename + fsync of
//!    the directory (what the agent does) and read back, on the host.
//! 4. 20 concurrent `exec true` on one sandbox (batch wall time) against 20
//!    sequential ones.
//!
//! Timings are reported, never asserted. Run as root: `BENCH_N=10 scripts/bench.sh`
//! builds the agent and the release workspace (the bench profile runs the
//! daemon from `target/release`) and runs `cargo bench -p sandforge-tests --bench core`.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::RngCore;
use reqwest::{Method, StatusCode};
use sandforge_tests::bench::print_table;
use sandforge_tests::{sample, scratch_dir, Daemon};
use serde_json::{json, Value};

const TEMPLATE_ROOTFS: &str = "/var/cache/sandforge/templates/default/rootfs";
const BATCH: usize = 20;

async fn exec_true(d: &Daemon, id: &str) {
    let (url, body) = (format!("/v1/sandboxes/{id}/exec"), json!({"cmd": ["true"]}));
    let (s, v) = d.call(Method::POST, &url, Some(body)).await;
    assert!(s == StatusCode::OK && v["exit_code"] == 0, "exec: {s} {v}");
}

/// Create a sandbox and run `true` through `/execute` until it answers.
async fn create_and_first_exec(d: &Daemon, network: &str) -> String {
    let v = d.create(json!({ "network": network })).await;
    let id = v["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let path = format!("/v1/sandboxes/{id}/execute");
        let body = json!({"command": "true"});
        let (s, v) = d.call(Method::POST, &path, Some(body)).await;
        if s == StatusCode::OK {
            assert_eq!(v["exit_code"], 0, "first exec: {v}");
            return id;
        }
        assert!(Instant::now() < deadline, "no first exec: {s} {v}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn put_get(d: &Daemon, url: &str, data: &Bytes) -> Bytes {
    let put = d.req(Method::PUT, url).body(data.clone());
    let r = put.send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT, "PUT");
    let r = d.req(Method::GET, url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "GET");
    r.bytes().await.unwrap()
}

fn host_put_get(dir: &Path, data: &[u8]) -> Vec<u8> {
    let (tmp, dst) = (dir.join("bench.bin.tmp"), dir.join("bench.bin"));
    let mut f = File::create(&tmp).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, &dst).unwrap();
    File::open(dir).unwrap().sync_all().unwrap();
    std::fs::read(&dst).unwrap()
}

/// OCI config of the baseline container: the daemon's isolation (see
/// crates/runtime/src/container/spec.rs) minus the agent and overlay.
fn runc_config(cgroup: &str) -> Value {
    let map = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    let caps: Vec<&str> = "CAP_CHOWN CAP_DAC_OVERRIDE CAP_FOWNER CAP_FSETID CAP_KILL CAP_SETGID \
        CAP_SETUID CAP_SETPCAP CAP_NET_BIND_SERVICE CAP_SYS_CHROOT"
        .split_whitespace()
        .collect();
    let ns: Vec<Value> = ["user", "pid", "mount", "ipc", "uts", "cgroup", "network"]
        .iter()
        .map(|t| json!({"type": t}))
        .collect();
    let (nosuid, noexec, nodev) = ("nosuid", "noexec", "nodev");
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": TEMPLATE_ROOTFS, "readonly": true},
        "hostname": "bench",
        "process": {
            "terminal": false, "user": {"uid": 0, "gid": 0}, "args": ["/bin/true"], "cwd": "/",
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "noNewPrivileges": true,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": [nosuid, "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": [nosuid, noexec, "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": [nosuid, noexec, nodev, "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": [nosuid, noexec, nodev]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": [nosuid, noexec, nodev, "ro"]},
        ],
        "linux": {
            "uidMappings": map.clone(), "gidMappings": map, "namespaces": ns, "cgroupsPath": cgroup,
            "resources": {
                "devices": [{"allow": false, "access": "rwm"}],
                "memory": {"limit": 512i64 << 20},
                "cpu": {"quota": 100000, "period": 100000},
                "pids": {"limit": 1024},
            },
            "seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                "syscalls": [{"names": ["bpf", "keyctl", "mount", "perf_event_open", "ptrace",
                    "setns", "umount2", "unshare"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
            },
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi"],
            "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq",
                "/proc/sys", "/proc/sysrq-trigger"],
        },
    })
}

fn runc(root: &Path) -> Command {
    let mut c = Command::new("runc");
    c.arg("--root").arg(root);
    c
}

/// `runc run` of the bundle in the foreground; runc deletes it on exit.
/// stderr is piped only to report a failure (empty on success).
fn runc_true(root: &Path, bundle: &Path, id: &str) {
    let mut run = runc(root);
    run.args(["run", "--bundle"]).arg(bundle).arg(id);
    let out = run.stdin(Stdio::null()).stdout(Stdio::null()).output();
    if !out.as_ref().is_ok_and(|o| o.status.success()) {
        let _ = runc(root).args(["delete", "--force", id]).output();
        panic!("runc run: {out:?}");
    }
}

/// Force-delete whatever runc still holds and rmdir the baseline's cgroups.
fn runc_cleanup(root: &Path, cgroup: &str) {
    let out = runc(root).args(["list", "-q"]).output().unwrap();
    for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        eprintln!("note: removing leftover runc container {id}");
        let _ = runc(root).args(["delete", "--force", id]).output();
    }
    let cg = cgroup.trim_start_matches('/');
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(cg));
    for e in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let _ = std::fs::remove_dir(e.path().join(cg));
    }
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_N").map_or(20, |v| v.parse().expect("BENCH_N"));
    assert!(n >= 1, "BENCH_N must be at least 1");
    let d = Daemon::start().await;

    // 1. create → first exec, destroy (offline, then with a NAT'd
    // network); baseline: bare runc.
    let (mut create, mut destroy, mut create_nat, mut destroy_nat) =
        (vec![], vec![], vec![], vec![]);
    for (network, c_out, d_out) in [
        ("offline", &mut create, &mut destroy),
        ("nat", &mut create_nat, &mut destroy_nat),
    ] {
        for i in 0..=n {
            let t = Instant::now();
            let id = create_and_first_exec(&d, network).await;
            let c = t.elapsed();
            let t = Instant::now();
            d.destroy(&id).await;
            if i > 0 {
                c_out.push(c);
                d_out.push(t.elapsed());
            }
        }
    }
    let bundle = scratch_dir("sf-bench-bundle-");
    let runc_root = scratch_dir("sf-bench-runc-");
    let cgroup = format!("/sandforge-bench-{}", std::process::id());
    let cfg = serde_json::to_vec_pretty(&runc_config(&cgroup)).unwrap();
    std::fs::write(bundle.path().join("config.json"), cfg).unwrap();
    let mut k = 0;
    let raw = sample!(n, {
        k += 1;
        runc_true(runc_root.path(), bundle.path(), &format!("sfbench-{k}"))
    });
    runc_cleanup(runc_root.path(), &cgroup);

    // 1b. the same without a disk image (the writable layer on the host's
    // filesystem): a daemon with `container_disk_mb: 0`.
    let plain = Daemon::start_with_config(&[], "container_disk_mb: 0").await;
    let mut create_plain = vec![];
    for i in 0..=n {
        let t = Instant::now();
        let id = create_and_first_exec(&plain, "offline").await;
        if i > 0 {
            create_plain.push(t.elapsed());
        }
        plain.destroy(&id).await;
    }
    drop(plain);

    // 2. exec round trip on a warm sandbox; baseline: host fork/exec.
    let id = create_and_first_exec(&d, "offline").await;
    let exec = sample!(n, exec_true(&d, &id).await);
    let mut true_cmd = Command::new("/bin/true");
    let fork = sample!(n, assert!(true_cmd.status().unwrap().success()));

    // 3. 1 MiB put + get; baseline: durable write + read on the host.
    let mut data = vec![0u8; 1 << 20];
    rand::thread_rng().fill_bytes(&mut data);
    let data = Bytes::from(data);
    let url = format!("/v1/sandboxes/{id}/files?path=/tmp/bench.bin");
    assert!(put_get(&d, &url, &data).await == data, "GET != PUT");
    let files = sample!(n, put_get(&d, &url, &data).await);
    let host = scratch_dir("sf-bench-file-");
    assert!(host_put_get(host.path(), &data) == data);
    let host_files = sample!(n, host_put_get(host.path(), &data));

    // 4. a batch of concurrent execs against the same number in sequence.
    let conc = sample!(n, {
        futures_util::future::join_all((0..BATCH).map(|_| exec_true(&d, &id))).await
    });
    let seq = sample!(n, {
        for _ in 0..BATCH {
            exec_true(&d, &id).await
        }
    });
    d.destroy(&id).await;

    // (label, samples, index of its baseline row)
    let rows = [
        (
            "create → first exec `true`, offline (4 GiB disk image)",
            create,
            Some(1),
        ),
        ("↳ baseline: bare `runc run /bin/true`", raw, None),
        ("destroy (DELETE, not in the row above)", destroy, None),
        (
            "create → first exec `true`, offline, no disk image",
            create_plain,
            Some(1),
        ),
        (
            "create → first exec `true`, network nat",
            create_nat,
            Some(1),
        ),
        ("destroy, network nat", destroy_nat, None),
        ("exec `true` round trip", exec, Some(7)),
        ("↳ baseline: host fork/exec/wait `/bin/true`", fork, None),
        ("file PUT + GET 1 MiB", files, Some(9)),
        ("↳ baseline: host fsync'd write + read", host_files, None),
        ("20 concurrent exec `true` (batch)", conc, Some(11)),
        ("↳ vs 20 sequential exec `true`", seq, None),
    ];
    print_table(&format!("N = {n} measured runs per row"), &rows);
}
