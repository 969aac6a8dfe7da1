//! Templates made from sandboxes (issue 12), on the backend the run
//! targets: a running or stopped sandbox saved as a template
//! (`POST /v1/sandboxes/{id}/template`) has the sandbox's files and leaves
//! the sandbox as it was; a hostile tree (a symlink to the host's
//! `/etc/shadow`, hard links, a FIFO, a name with a newline, a setuid
//! file, a huge sparse file) is saved safely or refused cleanly; a
//! Dockerfile build (FROM, RUN, COPY, ENV, WORKDIR, USER) makes a template
//! a sandbox sees all of, a failing step fails it with the step's reason,
//! bad Dockerfiles are 400 naming the line, and no builder sandbox is ever
//! left behind (a daemon killed mid-build included); seed 003's `/build`
//! runs a Dockerfile template again; the CLI's `template save` and
//! `template build` follow the log and exit 1 on a failure.
//!
//! A `FROM` an image reference pulls it first as an ordinary template.
//!
//! The templates made here are checked in containers (quicker under TCG;
//! microVM creates from API templates are tested in tests/templates.rs),
//! so the microVM run saves VMs and checks the result in a container.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use sandforge_tests::oci::{layer_from_dir, push_image, Registry};
use sandforge_tests::{vm, Daemon};
use serde_json::{json, Value};

async fn wait_built(d: &Daemon, id: &str) -> Value {
    d.wait_template(id, if vm() { 900 } else { 300 }).await
}

/// `POST /v1/sandboxes/{sb}/template {"name"}`: 202 `building`, then the
/// final template.
async fn save(d: &Daemon, sb: &str, name: &str) -> Value {
    let (s, t) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{sb}/template"),
            Some(json!({ "name": name })),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    assert_eq!(t["status"], "building", "{t}");
    assert_eq!(
        t["source"],
        json!({"type": "sandbox", "sandbox_id": sb, "template": "default"})
    );
    wait_built(d, t["id"].as_str().unwrap()).await
}

/// A container from template `t`.
async fn container_from(d: &Daemon, t: &str) -> String {
    d.create_id(json!({"template": t, "isolation": "container"}))
        .await
}

async fn live_sandboxes(d: &Daemon) -> Vec<Value> {
    let (s, v) = d.call(Method::GET, "/v1/sandboxes", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v.as_array().unwrap().clone()
}

const WRITE: &str = "mkdir -p /srv/data && echo saved > /srv/data/a.txt \
    && chown 1000:1000 /srv/data/a.txt && rm /etc/issue \
    && dd if=/dev/urandom of=/srv/data/blob bs=1M count=3 2>/dev/null \
    && sha256sum /srv/data/blob | cut -d' ' -f1";

#[tokio::test]
async fn a_running_sandbox_saved_as_a_template_has_its_files_and_stays_as_it_was() {
    let d = Daemon::start().await;
    let sb = d.create_id(json!({})).await;
    let sum = d.sh_ok(&sb, WRITE).await;
    // Something runs in it meanwhile.
    d.sh_ok(&sb, "nohup sleep 300 >/dev/null 2>&1 & echo started")
        .await;
    let t0 = Instant::now();
    let t = save(&d, &sb, "saved").await;
    eprintln!("saved in {:?}", t0.elapsed());
    assert_eq!(t["status"], "ready", "{t}");
    assert!(t["size_bytes"].as_u64().unwrap() > 3 << 20, "{t}");
    let tid = t["id"].as_str().unwrap().to_string();

    // The original: running, unchanged, its process still there.
    let (_, v) = d
        .call(Method::GET, &format!("/v1/sandboxes/{sb}"), None)
        .await;
    assert_eq!(v["status"], "running", "{v}");
    assert_eq!(d.sh_ok(&sb, "cat /srv/data/a.txt").await, "saved\n");
    assert_eq!(
        d.sh_ok(&sb, "pgrep -x sleep >/dev/null && echo yes").await,
        "yes\n"
    );

    // A sandbox from it (by name and by id) sees the files, the deletion,
    // the ownership.
    for name in ["saved", tid.as_str()] {
        let c = container_from(&d, name).await;
        assert_eq!(d.sh_ok(&c, "cat /srv/data/a.txt").await, "saved\n");
        assert_eq!(
            d.sh_ok(&c, "stat -c %u:%g /srv/data/a.txt").await,
            "1000:1000\n"
        );
        assert_eq!(
            d.sh_ok(&c, "sha256sum /srv/data/blob | cut -d' ' -f1")
                .await,
            sum
        );
        assert_eq!(
            d.sh_ok(&c, "test -e /etc/issue || echo gone").await,
            "gone\n"
        );
        assert_eq!(d.sh_ok(&c, "stat -c %u /usr/bin/env").await, "0\n");
        // Writes there do not reach the original.
        d.sh_ok(&c, "echo other > /srv/data/a.txt").await;
        d.destroy(&c).await;
    }
    assert_eq!(d.sh_ok(&sb, "cat /srv/data/a.txt").await, "saved\n");

    // On the host: an ordinary API template, owned by the shifted ids.
    let dir = d.state_dir().join("templates").join(&tid);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("template.json")).unwrap()).unwrap();
    assert_eq!(manifest["source"], "sandbox");
    assert_eq!(manifest["sandbox_id"], sb.as_str());
    let md = std::fs::symlink_metadata(dir.join("rootfs/srv/data/a.txt")).unwrap();
    assert_eq!((md.uid(), md.gid()), (101_000, 101_000));
    // The log ends ready; a name is unique; the template is in use.
    let log = d
        .req(Method::GET, &format!("/v1/templates/{tid}/logs"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(log.contains(r#""event":"ready""#), "{log}");
    let (s, v) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{sb}/template"),
            Some(json!({"name": "saved"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    for (body, field) in [(json!({"name": "a b"}), "name"), (json!({}), "name")] {
        let (s, v) = d
            .call(
                Method::POST,
                &format!("/v1/sandboxes/{sb}/template"),
                Some(body),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["field"], field, "{v}");
    }
    let (s, _) = d
        .call(
            Method::POST,
            "/v1/sandboxes/sb_nope/template",
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    d.destroy(&sb).await;
    let (s, v) = d
        .call(Method::DELETE, &format!("/v1/templates/{tid}"), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    assert!(!dir.exists());
}

#[tokio::test]
async fn a_stopped_sandbox_is_saved_and_stays_stopped() {
    let d = Daemon::start().await;
    let sb = d.create_id(json!({})).await;
    d.sh_ok(&sb, "echo cold > /root/cold.txt").await;
    let (s, v) = d
        .call(Method::POST, &format!("/v1/sandboxes/{sb}/stop"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let t = save(&d, &sb, "cold").await;
    assert_eq!(t["status"], "ready", "{t}");
    let (_, v) = d
        .call(Method::GET, &format!("/v1/sandboxes/{sb}"), None)
        .await;
    assert_eq!(v["status"], "stopped", "{v}");
    let c = container_from(&d, "cold").await;
    assert_eq!(d.sh_ok(&c, "cat /root/cold.txt").await, "cold\n");
    d.destroy(&c).await;
    // The original starts again with its file.
    assert_eq!(d.sh_ok(&sb, "cat /root/cold.txt").await, "cold\n");
    d.destroy(&sb).await;
}

#[tokio::test]
async fn a_hostile_tree_is_saved_safely() {
    let d = Daemon::start().await;
    let sb = d.create_id(json!({})).await;
    d.sh_ok(
        &sb,
        "cd /root && ln -s /etc/shadow shadow && ln -s ../../../../../etc/shadow up \
         && echo inside > f && ln f hard && mkfifo fifo \
         && printf x > \"$(printf 'new\\nline')\" \
         && cp /bin/true suid && chmod 4755 suid \
         && mkdir -p deep && cd deep && for i in $(seq 60); do mkdir d && cd d; done && echo bottom > b \
         && echo ok",
    )
    .await;
    let t = save(&d, &sb, "hostile").await;
    assert_eq!(t["status"], "ready", "{t}");
    let tid = t["id"].as_str().unwrap();
    let root = d
        .state_dir()
        .join("templates")
        .join(tid)
        .join("rootfs/root");
    // Links stay links (never the host's file), the hard link one inode,
    // the FIFO is not kept, the setuid file belongs to the sandbox's root.
    assert_eq!(
        std::fs::read_link(root.join("shadow")).unwrap(),
        std::path::Path::new("/etc/shadow")
    );
    assert!(std::fs::symlink_metadata(root.join("up"))
        .unwrap()
        .is_symlink());
    let (a, b) = (
        std::fs::metadata(root.join("f")).unwrap(),
        std::fs::metadata(root.join("hard")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino());
    assert!(std::fs::symlink_metadata(root.join("fifo")).is_err());
    let suid = std::fs::metadata(root.join("suid")).unwrap();
    assert_eq!(suid.uid(), 100_000);
    assert!(std::fs::read(root.join("new\nline")).unwrap() == b"x");
    let c = container_from(&d, "hostile").await;
    // Inside, /root/shadow is the sandbox's own (the template's) file.
    let host_shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    let v = d.sh(&c, "cat /root/shadow").await;
    assert_ne!(v["stdout"].as_str().unwrap(), host_shadow);
    assert_eq!(
        d.sh_ok(&c, "stat -c %i /root/f /root/hard | uniq | wc -l")
            .await,
        "1\n"
    );
    assert_eq!(
        d.sh_ok(&c, "cat /root/deep/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d/b").await,
        "bottom\n"
    );
    d.destroy(&c).await;
    d.destroy(&sb).await;
}

#[tokio::test]
async fn a_filesystem_over_the_limit_fails_the_save_cleanly() {
    let d = Daemon::start_with_config(&[], "template_max_mb: 64").await;
    let sb = d.create_id(json!({})).await;
    d.sh_ok(&sb, "truncate -s 20G /root/sparse && echo ok")
        .await;
    let t = save(&d, &sb, "huge").await;
    assert_eq!(t["status"], "failed", "{t}");
    let reason = t["status_reason"].as_str().unwrap();
    assert!(reason.contains("limit"), "{reason}");
    // Nothing half-made on disk; the sandbox lives on.
    let tid = t["id"].as_str().unwrap();
    let dir = d.state_dir().join("templates");
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(tid) && !n.ends_with(".log"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(d.sh_ok(&sb, "echo alive").await, "alive\n");
    let (s, v) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"template": "huge", "isolation": "container"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    d.destroy(&sb).await;
}

/// A tar.gz of `files` (path, contents), base64.
fn context(files: &[(&str, &str)]) -> String {
    use base64::Engine;
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    for (p, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, p, data.as_bytes()).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "app/shadow", "/etc/shadow").unwrap();
    let bytes = b.into_inner().unwrap().finish().unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn build(d: &Daemon, name: &str, dockerfile: &str, ctx: &str) -> (StatusCode, Value) {
    d.call(
        Method::POST,
        "/v1/templates",
        Some(json!({"name": name, "dockerfile": dockerfile, "context": ctx})),
    )
    .await
}

const DOCKERFILE: &str = "# a build
FROM default
RUN echo built > /built.txt && echo to-the-log
COPY app/hello.txt /srv/app/
COPY app /srv/copy
ENV GREETING=hi \\
    OTHER=\"two words\"
WORKDIR /srv/app
RUN useradd -m -u 1234 builder && chown builder /srv/app
USER builder
RUN id -un > whoami && touch mine
";

#[tokio::test]
async fn a_dockerfile_build_makes_a_template_that_has_every_step() {
    let d = Daemon::start().await;
    let ctx = context(&[
        ("app/hello.txt", "hello from the context\n"),
        ("app/sub/x", "x"),
    ]);
    let (s, t) = build(&d, "built", DOCKERFILE, &ctx).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    assert_eq!(
        t["source"],
        json!({"type": "dockerfile", "from": "default"})
    );
    let tid = t["id"].as_str().unwrap().to_string();
    let t = wait_built(&d, &tid).await;
    assert_eq!(t["status"], "ready", "{t}\n{}", d.log());
    assert!(live_sandboxes(&d).await.is_empty(), "the builder is left");

    let c = container_from(&d, "built").await;
    assert_eq!(d.sh_ok(&c, "cat /built.txt").await, "built\n");
    assert_eq!(
        d.sh_ok(&c, "cat /srv/app/hello.txt").await,
        "hello from the context\n"
    );
    assert_eq!(d.sh_ok(&c, "cat /srv/copy/sub/x").await, "x");
    assert_eq!(
        d.sh_ok(&c, "test -e /srv/copy/shadow || echo no-link")
            .await,
        "no-link\n"
    );
    assert_eq!(d.sh_ok(&c, "echo $GREETING/$OTHER").await, "hi/two words\n");
    assert_eq!(d.sh_ok(&c, "pwd").await, "/srv/app\n");
    assert_eq!(d.sh_ok(&c, "cat /srv/app/whoami").await, "builder\n");
    assert_eq!(d.sh_ok(&c, "stat -c %U /srv/app/mine").await, "builder\n");
    d.destroy(&c).await;
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(
            d.state_dir()
                .join("templates")
                .join(&tid)
                .join("template.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["user"], "builder", "{manifest}");
    assert_eq!(manifest["workdir"], "/srv/app", "{manifest}");
    assert!(
        manifest["env"]
            .as_array()
            .unwrap()
            .contains(&json!("GREETING=hi")),
        "{manifest}"
    );
    // The log: each step, its output, ready.
    let log = d
        .req(Method::GET, &format!("/v1/templates/{tid}/logs"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "output" && e["text"] == "to-the-log\n"),
        "{log}"
    );
    assert_eq!(
        events.iter().filter(|e| e["event"] == "step").count(),
        8,
        "{log}"
    );
    assert_eq!(events.last().unwrap()["event"], "ready", "{log}");
}

#[tokio::test]
async fn seed_003_build_runs_a_dockerfile_template_again() {
    let d = Daemon::start().await;
    let (s, t) = build(&d, "again", "FROM default\nRUN date +%s%N > /stamp\n", "").await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    let tid = t["id"].as_str().unwrap().to_string();
    assert_eq!(wait_built(&d, &tid).await["status"], "ready");
    let c = container_from(&d, "again").await;
    let first = d.sh_ok(&c, "cat /stamp").await;
    // In use: 409.
    let path = format!("/api/sandbox/templates/{tid}/build");
    let (s, v) = d.call(Method::POST, &path, None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    d.destroy(&c).await;
    let (s, v) = d.call(Method::POST, &path, None).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["status"], "building", "{v}");
    assert_eq!(wait_built(&d, &tid).await["status"], "ready");
    let c = container_from(&d, "again").await;
    assert_ne!(d.sh_ok(&c, "cat /stamp").await, first);
    d.destroy(&c).await;
    assert!(live_sandboxes(&d).await.is_empty());
}

#[tokio::test]
async fn a_failing_step_fails_the_build_and_leaves_no_builder() {
    let d = Daemon::start().await;
    let (s, t) = build(
        &d,
        "broken",
        "FROM base\nRUN echo fine\nRUN echo failing >&2; exit 3\nRUN echo never\n",
        "",
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    let t = wait_built(&d, t["id"].as_str().unwrap()).await;
    assert_eq!(t["status"], "failed", "{t}");
    assert_eq!(
        t["status_reason"], "step 2 (RUN echo failing >&2; exit 3) exited 3",
        "{t}"
    );
    assert!(live_sandboxes(&d).await.is_empty(), "the builder is left");
    let (s, v) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"template": "broken"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    // FROM an unknown template fails too, with no sandbox.
    let (s, t) = build(&d, "orphan", "FROM nope\nRUN true\n", "").await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    let t = wait_built(&d, t["id"].as_str().unwrap()).await;
    assert_eq!(t["status"], "failed", "{t}");
    assert!(
        t["status_reason"].as_str().unwrap().contains("FROM nope"),
        "{t}"
    );
    assert!(live_sandboxes(&d).await.is_empty());
}

#[tokio::test]
async fn bad_dockerfiles_are_refused_naming_the_line() {
    let d = Daemon::start().await;
    for (text, ctx, field, needle) in [
        ("FROM default\nEXPOSE 80\n", "", "dockerfile", "line 2"),
        ("RUN true\n", "", "dockerfile", "line 1"),
        ("FROM a\nFROM b\n", "", "dockerfile", "line 2"),
        (
            "FROM default\nCOPY --chown=1 a b\n",
            "",
            "dockerfile",
            "line 2",
        ),
        (
            "FROM default\n\nCOPY missing /x\n",
            "",
            "dockerfile",
            "line 3",
        ),
        (
            "FROM default\nCOPY ../etc/passwd /x\n",
            "",
            "dockerfile",
            "line 2",
        ),
        ("FROM default\nRUN true\n", "!!notbase64", "context", ""),
        ("FROM default\nRUN true\n", "aGVsbG8=", "context", ""),
    ] {
        let (s, v) = build(&d, "bad", text, ctx).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{text}: {v}");
        assert_eq!(v["error"]["field"], field, "{text}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{text}: {v}"
        );
    }
    let (s, v) = d
        .call(
            Method::POST,
            "/v1/templates",
            Some(json!({"name": "x", "image": "a/b", "dockerfile": "FROM default\n"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (_, list) = d.call(Method::GET, "/v1/templates", None).await;
    assert!(
        list.as_array().unwrap().iter().all(|t| t["name"] != "bad"),
        "{list}"
    );
}

#[tokio::test]
async fn a_daemon_killed_mid_build_fails_the_template_and_destroys_its_builder() {
    let mut d = Daemon::start().await;
    let (s, t) = build(&d, "slow", "FROM default\nRUN sleep 600\n", "").await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    let tid = t["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    let builder = loop {
        if let Some(sb) = live_sandboxes(&d).await.first() {
            if sb["status"] == "running" {
                break sb["id"].as_str().unwrap().to_string();
            }
        }
        assert!(Instant::now() < deadline, "no builder sandbox");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Let the step start.
    tokio::time::sleep(Duration::from_secs(2)).await;
    d.restart().await;
    let t = wait_built(&d, &tid).await;
    assert_eq!(t["status"], "failed", "{t}");
    assert!(
        live_sandboxes(&d).await.is_empty(),
        "builder {builder} left"
    );
    assert!(
        d.leftovers(&builder).is_empty(),
        "{:?}",
        d.leftovers(&builder)
    );
}

#[tokio::test]
async fn the_cli_saves_and_builds_following_the_log() {
    let d = Daemon::start().await;
    let sb = d.create_id(json!({})).await;
    d.sh_ok(&sb, "echo from-cli > /root/cli.txt").await;
    let out = d.cli(&["template", "save", &sb, "--name", "clisave", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let t: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(t["status"], "ready", "{t}");
    d.destroy(&sb).await;

    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM clisave\nCOPY note.txt /root/\nRUN cat /root/cli.txt /root/note.txt > /root/both\n",
    )
    .unwrap();
    std::fs::write(ctx.path().join("note.txt"), "note\n").unwrap();
    let dir = ctx.path().to_str().unwrap();
    let out = d.cli(&["template", "build", "--name", "clibuild", dir]);
    assert!(out.status.success(), "{out:?}");
    let c = container_from(&d, "clibuild").await;
    assert_eq!(d.sh_ok(&c, "cat /root/both").await, "from-cli\nnote\n");
    d.destroy(&c).await;
    // A failing build: exit 1, the reason on stderr.
    std::fs::write(ctx.path().join("Dockerfile"), "FROM clisave\nRUN exit 7\n").unwrap();
    let out = d.cli(&["template", "build", "--name", "clifail", dir]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("step 1 (RUN exit 7) exited 7"),
        "{out:?}"
    );
}

/// `FROM` an image reference: the image is pulled first as an ordinary
/// template (`<name>-from`), reused by the next build from the same
/// reference; an image that does not exist fails the build with the
/// pull's reason, and no builder is left.
#[tokio::test]
async fn a_dockerfile_build_from_an_image_pulls_it_first() {
    let reg = Registry::start(false);
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("rootfs");
    for d in ["bin", "etc", "tmp", "root", "proc", "dev", "sys"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    for applet in ["sh", "echo", "cat", "mkdir", "base64", "tar", "id", "true"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    push_image(
        &reg,
        work.path(),
        "bb",
        "amd64",
        &[&layer_from_dir(&root)],
        json!({"Env": ["PATH=/bin"]}),
    );
    let image = format!("{}/test/bb:latest", reg.host());
    let d = Daemon::start().await;

    let dockerfile = format!("FROM {image}\nRUN echo built on busybox > /built.txt\n");
    let (s, t) = build(&d, "fromimg", &dockerfile, &context(&[])).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    let t = wait_built(&d, t["id"].as_str().unwrap()).await;
    assert_eq!(t["status"], "ready", "{t}");
    let sb = container_from(&d, "fromimg").await;
    assert_eq!(d.sh_ok(&sb, "cat /built.txt").await, "built on busybox\n");
    d.destroy(&sb).await;

    let (s, t) = build(&d, "again", &dockerfile, &context(&[])).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    assert_eq!(
        wait_built(&d, t["id"].as_str().unwrap()).await["status"],
        "ready"
    );
    let (_, list) = d.call(Method::GET, "/v1/templates", None).await;
    let bases: Vec<&Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["source"]["reference"] == json!(image))
        .collect();
    assert_eq!(bases.len(), 1, "pulled once, reused: {list}");
    assert_eq!(bases[0]["name"], "fromimg-from", "{list}");

    let missing = format!("FROM {}/test/nope:1\nRUN true\n", reg.host());
    let (s, t) = build(&d, "nope", &missing, &context(&[])).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    let t = wait_built(&d, t["id"].as_str().unwrap()).await;
    assert_eq!(t["status"], "failed", "{t}");
    let reason = t["status_reason"].as_str().unwrap();
    assert!(reason.contains("not found"), "{t}");
    assert_eq!(
        live_sandboxes(&d).await,
        Vec::<Value>::new(),
        "no builder left"
    );
}
