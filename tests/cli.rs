//! The `sandforge` CLI against a real daemon: create, list, get, exec with
//! live output and exit codes, cp in and out, ls, rm, and `shell` driven
//! through a real pseudo-terminal (tmux).

use std::process::Command;

use sandforge_tests::{bin, scratch_dir, Daemon, TOKEN};

fn cli(d: &Daemon, args: &[&str]) -> std::process::Output {
    d.cli(args)
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

/// A tmux server of its own (socket `-L`), killed on drop.
struct Tmux(String);

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.0)
            .args(args)
            .output()
            .expect("tmux (scripts/deps.sh installs it)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Wait until the pane shows `needle` (30 s).
    fn wait_for(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let screen = self.run(&["capture-pane", "-p", "-t", "t"]);
            if screen.contains(needle) {
                return screen;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {needle:?} on screen:\n{screen}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.0, "kill-server"])
            .output();
    }
}

#[tokio::test]
async fn cli_shell_is_a_real_interactive_terminal() {
    let d = Daemon::start().await;
    let id = ok(&d, &["create", "--isolation", sandforge_tests::isolation()])
        .trim()
        .to_string();
    let out = scratch_dir("sf-shell-");
    let status = out.path().join("status");
    let tmux = Tmux(format!("sf-test-{}", d.port));
    let cmd = format!(
        "SANDFORGE_URL={} SANDFORGE_TOKEN={TOKEN} {} shell {id}; echo $? > {}; sleep 600",
        d.url,
        bin("sandforge").display(),
        status.display()
    );
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "t",
        "-x",
        "100",
        "-y",
        "30",
        &cmd,
    ]);
    // The window size reached the remote terminal, and keystrokes run.
    tmux.run(&[
        "send-keys",
        "-t",
        "t",
        "stty size; echo typed-$((6*7))",
        "Enter",
    ]);
    let screen = tmux.wait_for("typed-42");
    assert!(screen.contains("30 100"), "{screen}");
    // A resize of the local terminal follows (SIGWINCH).
    tmux.run(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    tmux.run(&["send-keys", "-t", "t", "clear; stty size", "Enter"]);
    tmux.wait_for("40 120");
    // The remote exit code is the CLI's.
    tmux.run(&["send-keys", "-t", "t", "exit 5", "Enter"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read_to_string(&status).unwrap_or_default().trim() != "5" {
        assert!(
            std::time::Instant::now() < deadline,
            "exit code not 5: {:?}",
            std::fs::read_to_string(&status)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ok(&d, &["rm", &id]);
}
