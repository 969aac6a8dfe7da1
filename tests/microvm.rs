//! What only the microVM backend has, through the real API: a real QEMU
//! `-M microvm` guest (KVM on hardware-virtualization hosts, TCG elsewhere)
//! booted from the Debian cloud kernel, `disk_mb`, the serial console, and
//! the failed state when QEMU dies. Everything else (exec, files, mounts,
//! restart, destroy) is the shared suite run with
//! `SANDFORGE_TEST_ISOLATION=microvm`.

use reqwest::{Method, StatusCode};
use sandforge_tests::{gone_or_zombie, sigkill, Daemon};
use serde_json::json;

/// What the product should pick on this host: KVM only with a hardware
/// virtualization module loaded.
fn expected_accel() -> &'static str {
    let hw = ["kvm_intel", "kvm_amd"]
        .iter()
        .any(|m| std::path::Path::new("/sys/module").join(m).exists());
    if hw && std::path::Path::new("/dev/kvm").exists() {
        "kvm"
    } else {
        "tcg"
    }
}

fn qemu_pid(d: &Daemon, id: &str) -> u32 {
    let p = d
        .state_dir()
        .join("sandboxes")
        .join(id)
        .join("qemu/qemu.pid");
    std::fs::read_to_string(&p).unwrap().trim().parse().unwrap()
}

#[tokio::test]
async fn a_vm_runs_commands_and_files_then_fails_cleanly_when_qemu_dies() {
    let d = Daemon::start().await;
    let sb = d
        .create(json!({"isolation": "microvm", "cpu": 2, "memory_mb": 384, "name": "vm-box", "disk_mb": 3072, "network": "offline"}))
        .await;
    let id = sb["id"].as_str().unwrap().to_string();
    assert_eq!(sb["isolation"], "microvm");
    assert_eq!(sb["accel"], expected_accel());
    assert_eq!(sb["status"], "running");

    // Its own kernel, not the host's.
    let uname = d.sh_ok(&id, "uname -r").await;
    assert!(uname.contains("cloud-amd64"), "{uname}");
    assert_ne!(
        uname.trim(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap()
            .trim()
    );
    assert_eq!(d.sh_ok(&id, "hostname").await, "vm-box\n");
    // cpu and memory_mb are the guest's vCPUs and RAM; disk_mb its root disk.
    assert_eq!(d.sh_ok(&id, "nproc").await, "2\n");
    let mem_kb: u64 = d
        .sh_ok(&id, "awk '/MemTotal/ {print $2}' /proc/meminfo")
        .await
        .trim()
        .parse()
        .unwrap();
    assert!((300_000..=384 * 1024).contains(&mem_kb), "{mem_kb} kB");
    assert_eq!(sb["disk_mb"], 3072);
    let root_mb: u64 = d
        .sh_ok(&id, "df -m --output=size / | tail -1")
        .await
        .trim()
        .parse()
        .unwrap();
    assert!((2900..=3072).contains(&root_mb), "root is {root_mb} MB");
    assert_eq!(d.sh_ok(&id, "id -u").await, "0\n");
    assert!(d
        .sh_ok(&id, "cat /proc/1/cmdline")
        .await
        .contains("sandforge-agent"));
    // Offline: no network device at all.
    assert_eq!(d.sh_ok(&id, "ls /sys/class/net").await, "lo\n");
    let v = d
        .sh(&id, "node -e 'console.log(6*7)'; python3 -c 'print(7*6)'")
        .await;
    assert_eq!(v["stdout"], "42\n42\n", "{v}");

    // Files over the same channel.
    d.put_file(&id, "/root/in.txt", "vm data\n").await;
    assert_eq!(d.sh_ok(&id, "cat /root/in.txt").await, "vm data\n");
    let r = d
        .req(
            Method::GET,
            &format!("/v1/sandboxes/{id}/files?path=/etc/hostname"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "vm-box\n");

    // Timeouts kill in the guest too.
    let (_, v) = d
        .execute(&id, json!({"command": "sleep 100", "timeout_seconds": 1}))
        .await;
    assert_eq!(v["timed_out"], true, "{v}");

    // Kill QEMU under the running sandbox: failed, with a reason; exec 409;
    // the console stays readable; destroy cleans everything.
    let pid = qemu_pid(&d, &id);
    sigkill(pid);
    let sb = d.wait_status(&id, "failed").await;
    assert!(
        sb["status_reason"].as_str().unwrap().contains("QEMU"),
        "{sb}"
    );
    let (s, _) = d.execute(&id, json!({"command": "true"})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let r = d
        .req(Method::GET, &format!("/v1/sandboxes/{id}/console"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.text().await.unwrap().contains("sandforge-init"),
        "console log should hold the boot"
    );
    d.destroy(&id).await;
    assert!(!d.state_dir().join("sandboxes").join(&id).exists());
    assert!(gone_or_zombie(pid), "QEMU {pid} survived destroy");
}

#[tokio::test]
async fn a_vm_whose_agent_never_answers_fails_its_create_in_bounded_time() {
    // One second is far too short for any boot: the create must give up,
    // say why, and leave nothing behind.
    let d = Daemon::start_with_config(&[], "vm_boot_timeout_secs: 1").await;
    let (s, v) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"isolation": "microvm"})),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "start_failed", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("did not answer within 1s"), "{msg}");
    let (_, list) = d
        .call(Method::GET, "/v1/sandboxes?status=failed", None)
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert!(d.leftovers(&id).is_empty(), "{:?}", d.leftovers(&id));
    d.destroy(&id).await;
}
