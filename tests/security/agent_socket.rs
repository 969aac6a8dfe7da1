//! Item 2: a sandbox must not redirect the supervisor's connection to its
//! agent towards another sandbox (another organization's). The supervisor
//! never connects through a path the sandbox can write, and checks who
//! listens on the other end.

use std::path::{Path, PathBuf};

use reqwest::{Method, StatusCode};
use sandforge_tests::{vm, Attempts, Daemon};
use serde_json::json;

/// The agent socket somewhere under a sandbox's directory.
fn agent_socket(dir: &Path) -> PathBuf {
    let out = std::process::Command::new("find")
        .arg(dir)
        .args(["-name", "agent.sock", "-type", "s"])
        .output()
        .unwrap();
    let s = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(
        s.lines()
            .next()
            .unwrap_or_else(|| panic!("no agent.sock under {}", dir.display())),
    )
}

#[tokio::test]
async fn a_sandbox_cannot_point_the_supervisor_at_another_sandbox() {
    let mut d = Daemon::start().await;
    let mut a = Attempts::new("agent socket redirect");
    let victim_token = d.token_for("victim");
    let (s, v) = d
        .call_as(
            &victim_token,
            Method::POST,
            "/v1/sandboxes",
            Some(crate::attacks::with_iso(
                json!({"name": "victim-box", "network": "offline"}),
            )),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let victim = v["id"].as_str().unwrap().to_string();
    let attacker = d
        .create_id(json!({"name": "attacker-box", "network": "offline"}))
        .await;
    let sandboxes = d.state_dir().join("sandboxes");
    let victim_sock = agent_socket(&sandboxes.join(&victim));

    if vm() {
        // A guest cannot reach its QEMU's files. Play a QEMU its guest took
        // over: as the VM's uid, swap its agent socket for a link to the
        // victim's.
        let sock = agent_socket(&sandboxes.join(&attacker));
        let uid = std::os::unix::fs::MetadataExt::uid(
            &std::fs::metadata(sock.parent().unwrap()).unwrap(),
        );
        std::fs::remove_file(&sock).unwrap();
        std::os::unix::fs::symlink(&victim_sock, &sock).unwrap();
        std::os::unix::fs::lchown(&sock, Some(uid), None).unwrap();
    } else {
        // The socket's old place inside the sandbox is gone, and planting
        // links there (or anywhere the sandbox can write) changes nothing.
        let v = d.sh(&attacker, "test -e /.sandforge/run").await;
        a.record(
            v["exit_code"] != 0,
            "the agent's run directory is visible inside",
        );
        d.sh_ok(
            &attacker,
            &format!(
                "mkdir -p /.sandforge/run && ln -sf {} /.sandforge/run/agent.sock && ln -sf {} /agent.sock; true",
                victim_sock.display(),
                victim_sock.display()
            ),
        )
        .await;
    }
    // The supervisor reconnects to every agent after a restart.
    d.restart().await;
    let (s, v) = d
        .execute(
            &attacker,
            json!({"command": "hostname", "timeout_seconds": 30}),
        )
        .await;
    let ran_in_victim = s == StatusCode::OK && v["stdout"] == "victim-box\n";
    a.record(
        !ran_in_victim,
        format!("the attacker's exec ran in the victim: {v}"),
    );
    if vm() {
        assert_ne!(s, StatusCode::OK, "the swapped socket was used: {v}");
    } else {
        assert_eq!(v["stdout"], "attacker-box\n", "{s} {v}");
    }
    // The victim is untouched and still its own.
    let (s, v) = d
        .call_as(
            &victim_token,
            Method::POST,
            &format!("/v1/sandboxes/{victim}/execute"),
            Some(json!({"command": "hostname", "timeout_seconds": 30})),
        )
        .await;
    assert_eq!(
        (s, v["stdout"].as_str()),
        (StatusCode::OK, Some("victim-box\n")),
        "{v}"
    );
    d.destroy(&attacker).await;
    a.finish();
}
