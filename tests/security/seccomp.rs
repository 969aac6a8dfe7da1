//! Item 4: the container seccomp profile is an allow-list with the
//! semantics of Docker's default one. From inside, with python ctypes,
//! the calls that reach kernel surface a sandbox never needs must fail
//! with the expected errno (EPERM; `clone3` ENOSYS so libc falls back to
//! `clone`), `clone` with any namespace flag must fail, and ordinary work
//! (fork, threads, exec, a plain `clone`) must still work. A microVM has
//! its own kernel: there only QEMU's own confinement is checked.

use std::collections::HashMap;

use sandforge_tests::{vm, Attempts, Daemon};
use serde_json::json;

/// Runs each attack through `syscall(2)` and prints `name ret errno`.
const PROBE: &str = r#"import ctypes, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sc(*args):
    ctypes.set_errno(0)
    r = libc.syscall(*[ctypes.c_long(a) for a in args])
    return r, ctypes.get_errno()
def report(name, r, e):
    print(name, r, e, flush=True)
SIGCHLD = 17
def try_clone(name, flags):
    r, e = sc(56, flags | SIGCHLD, 0, 0, 0, 0)
    if r == 0:
        libc.syscall(ctypes.c_long(231), ctypes.c_long(0))
    if r > 0:
        os.waitpid(r, 0)
    report(name, r, e)
try_clone("clone_newuser", 0x10000000)
try_clone("clone_newns", 0x00020000)
try_clone("clone_newpid", 0x20000000)
try_clone("clone_newnet", 0x40000000)
try_clone("clone_newcgroup", 0x02000000)
try_clone("clone_plain", 0)
report("unshare_newuser", *sc(272, 0x10000000))
report("unshare_newns", *sc(272, 0x00020000))
params = ctypes.create_string_buffer(120)
report("io_uring_setup", *sc(425, 1, ctypes.addressof(params)))
report("io_uring_enter", *sc(426, 0, 0, 0, 0, 0, 0))
report("io_uring_register", *sc(427, 0, 0, 0, 0))
report("keyctl", *sc(250, 0, -3, 0))
report("add_key", *sc(248, 0, 0, 0, 0, -3))
report("request_key", *sc(249, 0, 0, 0, 0))
attr = ctypes.create_string_buffer(128)
report("bpf", *sc(321, 0, ctypes.addressof(attr), 128))
report("userfaultfd", *sc(323, 0))
pattr = ctypes.create_string_buffer(128)
report("perf_event_open", *sc(298, ctypes.addressof(pattr), 0, -1, -1, 0))
report("mount", *sc(165, 0, 0, 0, 0, 0))
report("umount2", *sc(166, 0, 0))
report("setns", *sc(308, 0, 0))
child = subprocess.Popen(["sleep", "30"])
report("ptrace_attach", *sc(101, 16, child.pid, 0, 0))
child.kill(); child.wait()
report("kexec_load", *sc(246, 0, 0, 0, 0))
report("init_module", *sc(175, 0, 0, 0))
report("clone3", *sc(435, 0, 0))
pid = os.fork()
if pid == 0:
    os._exit(7)
report("fork", 0 if os.waitpid(pid, 0)[1] >> 8 == 7 else -1, 0)
out = []
t = threading.Thread(target=lambda: out.append(1)); t.start(); t.join()
report("thread", 0 if out == [1] else -1, 0)
report("exec", subprocess.run(["/bin/true"]).returncode, 0)
"#;

const EPERM: i64 = 1;
const ENOSYS: i64 = 38;

/// The second column of a /proc status line.
fn host_status_value(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn seccomp_allow_list_refuses_kernel_surface() {
    let d = Daemon::start().await;
    let id = d.create_id(json!({"network": "offline"})).await;
    let mut a = Attempts::new("seccomp");
    if vm() {
        // The guest has its own kernel; the host surface is QEMU's, which
        // must run confined.
        let pid = d.sandbox_pid(&id);
        a.record(
            host_status_value(pid, "Seccomp:") == "2",
            "QEMU runs without seccomp",
        );
        a.finish();
        d.destroy(&id).await;
        return;
    }
    d.put_file(&id, "/tmp/probe.py", PROBE).await;
    let out = d.sh_ok(&id, "python3 /tmp/probe.py 2>&1").await;
    let results: HashMap<&str, (i64, i64)> = out
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?;
            let r = it.next()?.parse().ok()?;
            let e = it.next()?.parse().ok()?;
            Some((name, (r, e)))
        })
        .collect();
    let denied = [
        ("clone_newuser", EPERM),
        ("clone_newns", EPERM),
        ("clone_newpid", EPERM),
        ("clone_newnet", EPERM),
        ("clone_newcgroup", EPERM),
        ("unshare_newuser", EPERM),
        ("unshare_newns", EPERM),
        ("io_uring_setup", EPERM),
        ("io_uring_enter", EPERM),
        ("io_uring_register", EPERM),
        ("keyctl", EPERM),
        ("add_key", EPERM),
        ("request_key", EPERM),
        ("bpf", EPERM),
        ("userfaultfd", EPERM),
        ("perf_event_open", EPERM),
        ("mount", EPERM),
        ("umount2", EPERM),
        ("setns", EPERM),
        ("ptrace_attach", EPERM),
        ("kexec_load", EPERM),
        ("init_module", EPERM),
        ("clone3", ENOSYS),
    ];
    for (name, want) in denied {
        let got = results.get(name).copied();
        a.record(
            got == Some((-1, want)),
            format!("{name}: got {got:?} (ret, errno), want (-1, {want})"),
        );
    }
    a.finish();
    // Ordinary work still runs.
    for name in ["fork", "thread", "exec"] {
        assert_eq!(results.get(name), Some(&(0, 0)), "{name}: {out}");
    }
    let plain = results.get("clone_plain").copied().unwrap_or((-1, 0));
    assert!(plain.0 > 0, "a clone without namespace flags failed: {out}");
    d.destroy(&id).await;
}
