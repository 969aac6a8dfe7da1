//! Item 1: host mounts must not escape `allowed_host_paths`. A sandbox with
//! a read-write mount of an allowed directory swaps a child directory for a
//! symlink to a host directory outside the list; a second sandbox mounting
//! that child must never see the outside directory: not at create, not
//! after stop/start, not by racing the swap against its create.

use reqwest::{Method, StatusCode};
use sandforge_tests::{scratch_dir, vm, Attempts, Daemon};
use serde_json::json;

/// Python run in the attacking sandbox: exchange `/all/child` (a real
/// directory) and `/all/swap` (a symlink to the secret) with
/// renameat2(RENAME_EXCHANGE), as fast as it can, for `secs` seconds.
fn swapper(secs: u32) -> String {
    format!(
        "python3 -c '
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
end = time.time() + {secs}
while time.time() < end:
    libc.renameat2(-100, b\"/all/child\", -100, b\"/all/swap\", 2)
' >/dev/null 2>&1 &"
    )
}

#[tokio::test]
async fn symlink_swaps_never_reach_outside_the_allowed_paths() {
    let allowed = scratch_dir("sf-allowed-");
    let secret = scratch_dir("sf-secret-");
    std::fs::write(secret.path().join("secret.txt"), "host secret\n").unwrap();
    let child = allowed.path().join("child");
    std::fs::create_dir(&child).unwrap();
    std::fs::write(child.join("legit.txt"), "legit\n").unwrap();
    let d = Daemon::start_with(&[allowed.path()]).await;
    let mut a = Attempts::new("host mount symlink swap");

    // The attacker: the allowed parent, read-write.
    let attacker = d
        .create_id(json!({"mounts": [{"host_path": allowed.path(), "guest_path": "/all", "read_only": false}]}))
        .await;
    // The victim: the child, mounted while it is still a real directory.
    let mount_child =
        json!({"mounts": [{"host_path": child, "guest_path": "/c", "read_only": false}]});
    let victim = d.create_id(mount_child.clone()).await;
    assert_eq!(d.sh_ok(&victim, "cat /c/legit.txt").await, "legit\n");

    // Swap the child for a symlink to the secret directory.
    let secret_path = secret.path().display().to_string();
    d.sh_ok(
        &attacker,
        &format!("mv /all/child /all/real && ln -s {secret_path} /all/child && ls -l /all"),
    )
    .await;

    // 1. A create that names the child now.
    let (s, v) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(crate::attacks::with_iso(mount_child.clone())),
        )
        .await;
    let refused = if s == StatusCode::CREATED {
        let id = v["id"].as_str().unwrap().to_string();
        let leaked = d.sh(&id, "cat /c/secret.txt").await["exit_code"] == 0;
        d.destroy(&id).await;
        !leaked
    } else {
        assert!(s.is_client_error(), "create: {s} {v}");
        true
    };
    a.record(refused, "create after the swap");

    // 2. Stop/start of the victim after the swap (containers; a VM with
    // host mounts cannot be stopped at all, which the API refuses).
    let (s, v) = d
        .call(Method::POST, &format!("/v1/sandboxes/{victim}/stop"), None)
        .await;
    if s == StatusCode::OK {
        let (s, v) = d
            .call(Method::POST, &format!("/v1/sandboxes/{victim}/start"), None)
            .await;
        let leaked =
            s == StatusCode::OK && d.sh(&victim, "cat /c/secret.txt").await["exit_code"] == 0;
        a.record(!leaked, format!("stop/start after the swap: {s} {v}"));
    } else {
        assert!(vm(), "stop of a container refused: {s} {v}");
        assert_eq!(s, StatusCode::CONFLICT, "{v}");
    }

    // 3. Race: the attacker exchanges the real directory and the symlink
    // while creates name the child.
    d.sh_ok(
        &attacker,
        "rm /all/child && mv /all/real /all/child && ln -s /nonexistent /all/swap",
    )
    .await;
    d.sh_ok(
        &attacker,
        &format!(
            "rm /all/swap && ln -s {secret_path} /all/swap && {}",
            swapper(600)
        ),
    )
    .await;
    let rounds = if vm() { 8 } else { 30 };
    for i in 0..rounds {
        let (s, v) = d
            .call(
                Method::POST,
                "/v1/sandboxes",
                Some(crate::attacks::with_iso(mount_child.clone())),
            )
            .await;
        if s == StatusCode::CREATED {
            let id = v["id"].as_str().unwrap().to_string();
            let leaked = d.sh(&id, "cat /c/secret.txt 2>/dev/null").await["exit_code"] == 0;
            a.record(!leaked, format!("race round {i}: the secret was mounted"));
            d.destroy(&id).await;
        } else {
            assert!(s.is_client_error(), "create: {s} {v}");
            a.record(true, format!("race round {i}"));
        }
    }
    d.sh(&attacker, "pkill -f renameat2").await;
    d.destroy(&attacker).await;
    d.destroy(&victim).await;
    a.finish();
}
