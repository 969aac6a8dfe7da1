//! The `sandforge` CLI against a real daemon: create, list, get, exec with
//! live output and exit codes, cp in and out, ls, rm.

use std::process::Command;

use sandforge_tests::{bin, scratch_dir, Daemon, TOKEN};

fn cli(d: &Daemon, args: &[&str]) -> std::process::Output {
    Command::new(bin("sandforge"))
        .args(args)
        .env("SANDFORGE_URL", &d.url)
        .env("SANDFORGE_TOKEN", TOKEN)
        .output()
        .unwrap()
}

fn ok(d: &Daemon, args: &[&str]) -> String {
    let out = cli(d, args);
    assert!(
        out.status.success(),
        "sandforge {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn cli_covers_the_core_operations() {
    let d = Daemon::start().await;
    let id = ok(
        &d,
        &[
            "create",
            "--name",
            "cli-box",
            "--cpu",
            "1",
            "--memory-mb",
            "256",
            "--env",
            "A=1",
            "--isolation",
            sandforge_tests::isolation(),
        ],
    )
    .trim()
    .to_string();
    assert!(id.starts_with("sb_"), "{id}");
    assert!(ok(&d, &["list"]).contains(&id));
    assert!(ok(&d, &["get", &id]).contains("cli-box"));

    // exec streams and returns the command's exit code.
    let out = cli(
        &d,
        &[
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "echo $A; echo oops >&2; exit 5",
        ],
    );
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");

    // cp in, then out, then ls.
    let tmp = scratch_dir("sf-cli-");
    let src = tmp.path().join("in.txt");
    std::fs::write(&src, "payload\n").unwrap();
    ok(
        &d,
        &["cp", src.to_str().unwrap(), &format!("{id}:/tmp/in.txt")],
    );
    assert_eq!(
        ok(&d, &["exec", &id, "--", "cat", "/tmp/in.txt"]),
        "payload\n"
    );
    let dst = tmp.path().join("out.txt");
    ok(
        &d,
        &["cp", &format!("{id}:/tmp/in.txt"), dst.to_str().unwrap()],
    );
    assert_eq!(std::fs::read_to_string(&dst).unwrap(), "payload\n");
    assert!(ok(&d, &["ls", &id, "/tmp"]).contains("in.txt"));

    // Errors are reported with the API's code, and exit non-zero.
    let out = cli(&d, &["get", "sb_missing"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not_found"));

    ok(&d, &["rm", &id]);
    assert!(!ok(&d, &["list"]).contains(&id));
}
