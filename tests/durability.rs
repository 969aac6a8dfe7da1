//! Nothing lost, nothing left: sandboxes survive `kill -9` of the daemon,
//! a dead sandbox is reported as failed, and destroy reclaims every host
//! resource (processes, mounts, cgroups, directories, runc state).

use reqwest::{Method, StatusCode};
use sandforge_tests::{gone_or_zombie, sigkill, vm, Daemon};
use serde_json::json;

#[tokio::test]
async fn sandboxes_survive_a_daemon_kill9_and_restart() {
    let mut d = Daemon::start().await;
    let a = d.create_id(json!({"name": "keeper"})).await;
    let b = d.create_id(json!({})).await;
    d.sh_ok(
        &a,
        "echo precious > /root/data.txt; nohup sleep 1000 >/dev/null 2>&1 &",
    )
    .await;
    let pid_before = d.sandbox_pid(&a);

    d.kill9();
    // While the daemon is down the sandbox keeps running.
    assert!(std::path::Path::new(&format!("/proc/{pid_before}")).exists());
    d.restart().await;

    let (_, list) = d.call(Method::GET, "/v1/sandboxes", None).await;
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{list}");
    assert!(ids.contains(&a.as_str()) && ids.contains(&b.as_str()));
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "running"),
        "{list}"
    );
    // Same sandbox, same processes, same files; exec works.
    assert_eq!(d.sandbox_pid(&a), pid_before);
    assert_eq!(d.sh_ok(&a, "cat /root/data.txt").await, "precious\n");
    assert_eq!(
        d.sh_ok(&a, "ps -eo args | grep -c '^sleep 1000'").await,
        "1\n"
    );
    assert_eq!(d.sh_ok(&b, "echo b-ok").await, "b-ok\n");
    // Its name is still taken.
    let (s, _) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"name": "keeper"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    d.destroy(&a).await;
    d.destroy(&b).await;
}

#[tokio::test]
async fn destroy_reclaims_every_resource() {
    let d = Daemon::start().await;
    let id = d.create_id(json!({"memory_mb": 256})).await;
    // A duration no other test uses: the stray check below looks at the
    // whole host, where other tests run their own sleeps.
    d.sh_ok(&id, "nohup sleep 1017 >/dev/null 2>&1 & echo started")
        .await;
    let pid = d.sandbox_pid(&id);
    assert!(
        !d.leftovers(&id).is_empty(),
        "a live sandbox must hold resources (sanity check of the probe)"
    );
    d.destroy(&id).await;
    assert!(gone_or_zombie(pid), "init process {pid} survived");
    // No process of the shifted uid range is left running on the host.
    let stray: Vec<_> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("cmdline")).ok())
        .filter(|c| c.starts_with("sleep\u{0}1017"))
        .collect();
    assert!(stray.is_empty(), "stray processes: {stray:?}");
    assert_eq!(d.leftovers(&id), Vec::<String>::new());
}

#[tokio::test]
async fn a_sandbox_whose_agent_dies_is_failed_then_destroyable() {
    let d = Daemon::start().await;
    let id = d.create_id(json!({})).await;
    let pid = d.sandbox_pid(&id);
    // Kill the agent (the container's init) from the host.
    sigkill(pid);
    let sb = d.wait_status(&id, "failed").await;
    assert!(
        sb["status_reason"].as_str().unwrap_or_default().len() > 3,
        "{sb}"
    );
    let (s, v) = d.execute(&id, json!({"command": "true"})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    d.destroy(&id).await;
    assert_eq!(d.leftovers(&id), Vec::<String>::new());
}

#[tokio::test]
async fn state_is_in_one_sqlite_file() {
    let d = Daemon::start().await;
    let id = d.create_id(json!({})).await;
    let db = d.state_dir().join("sandforge.db");
    let out = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg(format!(
            "SELECT status FROM sandbox_events WHERE sandbox_id = '{id}' ORDER BY seq"
        ))
        .output()
        .expect("sqlite3 CLI");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "creating\nrunning\n");
    // Tokens are stored hashed, never in clear.
    let out = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg("SELECT hash FROM tokens")
        .output()
        .unwrap();
    let hashes = String::from_utf8_lossy(&out.stdout);
    assert!(
        !hashes.contains(sandforge_tests::TOKEN) && hashes.trim().len() == 64,
        "{hashes}"
    );
    d.destroy(&id).await;
}

/// Tasks in the container's pids cgroup (v1 or v2), from the host.
fn cgroup_pids(id: &str) -> u64 {
    [
        format!("/sys/fs/cgroup/pids/sandforge/{id}/pids.current"),
        format!("/sys/fs/cgroup/sandforge/{id}/pids.current"),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0)
}

/// Host processes whose command line holds `marker` (not zombies).
fn processes_named(marker: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            (String::from_utf8_lossy(&cmd).contains(marker) && !gone_or_zombie(pid)).then_some(pid)
        })
        .collect()
}

/// Start a fork bomb in a container: the classic one, bounded by the
/// sandbox's pids limit and churning at it.
async fn fork_bomb(d: &Daemon, id: &str, marker: &str) {
    let bomb = "b() { b | b & }; b";
    let cmd = format!("bash -c '{bomb}' {marker} >/dev/null 2>&1 & echo started");
    let (s, v) = d
        .execute(id, json!({"command": cmd, "timeout_seconds": 60}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // It fills the pids cgroup (1024 by default) within moments.
    for _ in 0..600 {
        if cgroup_pids(id) >= 500 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(cgroup_pids(id) >= 500, "the bomb never grew");
}

/// Item 12 of issue 11: a fork bomb then stop gave 503 "cgroups still
/// present", then start answered `running` for a container that was gone.
/// Stop must end the whole cgroup; start must only say running once the
/// agent answers; destroy after a bomb leaves no cgroup and no process.
#[tokio::test]
async fn a_fork_bomb_then_stop_start_and_destroy() {
    if vm() {
        // A VM's processes are bounded by its own kernel, not by a cgroup
        // of ours; under TCG on a loaded 2-core host a guest full of forked
        // processes made this test hang past 15 minutes (left for the
        // microVM work of issue 16). The container backend is what item 12
        // of issue 11 is about.
        eprintln!("skipped on microVMs: a fork bomb there is the guest kernel's");
        return;
    }
    let d = Daemon::start().await;
    let id = d
        .create_id(json!({"memory_mb": 256, "network": "offline"}))
        .await;
    d.sh_ok(&id, "echo kept > /root/f").await;
    let marker = "sf-bomb-4711";
    fork_bomb(&d, &id, marker).await;

    let pids = cgroup_pids(&id);
    let t0 = std::time::Instant::now();
    let (s, v) = d
        .call(Method::POST, &format!("/v1/sandboxes/{id}/stop"), None)
        .await;
    eprintln!(
        "stop with a fork bomb running ({pids} tasks in the pids cgroup): {} ms",
        t0.elapsed().as_millis()
    );
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::OK, Some("stopped")),
        "{v}"
    );
    if !vm() {
        assert_eq!(
            processes_named(marker),
            Vec::<u32>::new(),
            "bomb survived the stop"
        );
    }
    let (s, v) = d
        .call(Method::POST, &format!("/v1/sandboxes/{id}/start"), None)
        .await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::OK, Some("running")),
        "{v}"
    );
    assert_eq!(d.sh_ok(&id, "cat /root/f").await, "kept\n");

    // Again, then destroy: no cgroup, no process left.
    if !vm() {
        fork_bomb(&d, &id, marker).await;
    }
    let (pids, t0) = (cgroup_pids(&id), std::time::Instant::now());
    d.destroy(&id).await;
    eprintln!(
        "destroy with a fork bomb running ({pids} tasks): {} ms",
        t0.elapsed().as_millis()
    );
    assert_eq!(
        processes_named(marker),
        Vec::<u32>::new(),
        "bomb survived destroy"
    );
    assert_eq!(d.leftovers(&id), Vec::<String>::new());

    // Processes gone behind the daemon's back: start must not answer
    // `running` (whether the monitor or start itself notices first).
    let id = d
        .create_id(json!({"memory_mb": 256, "network": "offline"}))
        .await;
    sigkill(d.sandbox_pid(&id));
    let (s, v) = d
        .call(Method::POST, &format!("/v1/sandboxes/{id}/start"), None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    d.wait_status(&id, "failed").await;
    d.destroy(&id).await;
    assert_eq!(d.leftovers(&id), Vec::<String>::new());
}
