//! Templates as API objects (issue 12), on the backend the run targets:
//! the built-in template is registered (global, `tmpl_default`, also
//! reachable as `base`), a create names a template by id or name, and the
//! registry's errors (unknown, built-in delete) are clear; an OCI image
//! pulled from a real registry (Debian's `docker-registry` on loopback,
//! images pushed with `skopeo`) becomes a template a sandbox runs, its
//! failures (unknown tag, corrupt layer) leave a `failed` template with
//! the reason and nothing half-made, and a delete collects its blobs. On
//! a microVM the template's ext4 image is derived at its first create
//! (once for two creates at once, then reused; a create waits for it a
//! bounded time) and removed with the template.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use sandforge_tests::oci::{layer, layer_from_dir, push_image, Registry, E};
use sandforge_tests::{vm, Daemon};
use serde_json::{json, Value};

#[tokio::test]
async fn the_builtin_template_is_listed_and_reachable_by_id_name_and_alias() {
    let d = Daemon::start().await;
    let (s, list) = d.call(Method::GET, "/v1/templates", None).await;
    assert_eq!(s, StatusCode::OK, "{list}");
    let default = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "default")
        .cloned()
        .unwrap_or_else(|| panic!("no default template in {list}"));
    assert_eq!(default["id"], "tmpl_default");
    assert_eq!(default["status"], "ready");
    assert_eq!(default["builtin"], true);
    assert_eq!(default["aliases"], json!(["base"]));
    assert_eq!(default["source"]["type"], "builtin");
    assert!(
        default["size_bytes"].as_u64().unwrap() > 100 << 20,
        "{default}"
    );
    // Seed 002's paths too.
    for path in [
        "/templates/tmpl_default",
        "/v1/templates/default",
        "/v1/templates/base",
    ] {
        let (s, t) = d.call(Method::GET, path, None).await;
        assert_eq!(
            (s, &t["id"]),
            (StatusCode::OK, &json!("tmpl_default")),
            "{path}: {t}"
        );
    }
    // Another organization sees the built-in one too.
    let other = d.token_for("other-org");
    let (s, t) = d
        .call_as(&other, Method::GET, "/v1/templates/base", None)
        .await;
    assert_eq!((s, &t["id"]), (StatusCode::OK, &json!("tmpl_default")));

    // A create by id, by name and by alias: all the default template.
    for body in [
        json!({"template_id": "tmpl_default"}),
        json!({"template": "base"}),
        json!({"template": "default"}),
    ] {
        let sb: Value = d.create(body.clone()).await;
        let id = sb["id"].as_str().unwrap();
        assert_eq!(sb["template"], "default", "{body}: {sb}");
        assert_eq!(d.sh_ok(id, "test -x /bin/bash && echo ok").await, "ok\n");
        d.destroy(id).await;
    }

    // Errors.
    let (s, v) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"template": "nope"})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"]["field"], "template");
    let (s, v) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"template_id": "tmpl_nope"})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = d.call(Method::GET, "/v1/templates/tmpl_nope", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = d.call(Method::DELETE, "/v1/templates/default", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = d.call(Method::GET, "/v1/templates", None).await;
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == "tmpl_default"),
        "{s} {v}"
    );
}

/// A small image: busybox's static shell as the root filesystem, a second
/// layer that adds a file and whites one out; its config sets Env and
/// WorkingDir.
fn busybox_image(reg: &Registry, work: &std::path::Path, name: &str) {
    let root = work.join(format!("rootfs-{name}"));
    for d in ["bin", "etc", "tmp", "root", "app", "proc", "dev", "sys"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    for applet in [
        "sh", "echo", "cat", "pwd", "ls", "env", "test", "true", "sleep", "id", "stat",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    // A setuid file of uid 1000, and a link to a host path: it must stay a
    // link (nothing on the host follows it).
    let suid = root.join("bin/suid");
    std::fs::write(&suid, "#!/bin/sh\n").unwrap();
    std::os::unix::fs::chown(&suid, Some(1000), Some(1000)).unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", root.join("etc/host-shadow")).unwrap();
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/motd"), "whited out above\n").unwrap();
    let base = layer_from_dir(&root);
    let top = layer(&[
        E::Dir("app", 0),
        E::File("app/hello.txt", "hello from layer two\n", 0),
        E::File("etc/.wh.motd", "", 0),
    ]);
    push_image(
        reg,
        work,
        name,
        "amd64",
        &[&base, &top],
        json!({"Env": ["PATH=/bin", "GREETING=hello from the image"], "WorkingDir": "/app"}),
    );
}

async fn wait_built(d: &Daemon, id: &str) -> Value {
    d.wait_template(id, 180).await
}

fn files_under(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn an_image_pulled_from_a_registry_becomes_a_template() {
    let reg = Registry::start(false);
    let work = tempfile::tempdir().unwrap();
    busybox_image(&reg, work.path(), "bb");
    let d = Daemon::start().await;
    let image = format!("{}/test/bb:latest", reg.host());

    let (s, t) = d
        .call(
            Method::POST,
            "/v1/templates",
            Some(json!({"name": "bb", "image": image})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    assert_eq!(t["status"], "building");
    let id = t["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("tmpl_"), "{t}");
    let t = wait_built(&d, &id).await;
    assert_eq!(t["status"], "ready", "{t}");
    assert_eq!(t["source"], json!({"type": "image", "reference": image}));
    assert!(t["size_bytes"].as_u64().unwrap() > 1 << 20, "{t}");
    // The build log: ndjson events, ending with ready.
    let r = d
        .req(Method::GET, &format!("/v1/templates/{id}/logs"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let log = r.text().await.unwrap();
    let events: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(events.iter().any(|e| e["event"] == "resolved"), "{log}");
    assert_eq!(events.last().unwrap()["event"], "ready", "{log}");

    // A name is unique in the organization.
    let (s, v) = d
        .call(
            Method::POST,
            "/v1/templates",
            Some(json!({"name": "bb", "image": image})),
        )
        .await;
    assert_eq!(
        (s, &v["error"]["field"]),
        (StatusCode::CONFLICT, &json!("name")),
        "{v}"
    );

    // A sandbox of it, by name: the image's files, whiteout, Env,
    // WorkingDir, ownership (uid 1000 stays 1000 inside, root's files are
    // root's), the setuid bit, a link to a host path left a link. On a
    // microVM the first create derives the template's ext4 image: two
    // creates at once share one derivation.
    let body = json!({"template": "bb", "network": "offline"});
    let (sb, other) = tokio::join!(d.create_id(body.clone()), d.create_id(body.clone()));
    let check = "echo $GREETING; pwd; cat hello.txt; test -e /etc/motd || echo gone; \
                 stat -c '%A %u %g' /bin/suid /app/hello.txt /app; \
                 test -L /etc/host-shadow && ! test -e /etc/host-shadow && echo link";
    let expected = "hello from the image\n/app\nhello from layer two\ngone\n\
                    -rwsr-xr-x 1000 1000\n-rwxr-xr-x 0 0\ndrwxr-xr-x 0 0\nlink\n";
    for id in [&sb, &other] {
        assert_eq!(d.sh_ok(id, check).await, expected, "{id}");
    }
    let vm_image = d
        .state_dir()
        .join("templates")
        .join(&id)
        .join("rootfs.ext4");
    let log_events = |kind: &str| {
        let log = std::fs::read_to_string(d.state_dir().join(format!("templates/{id}.log")))
            .unwrap_or_default();
        log.lines()
            .filter(|l| serde_json::from_str::<Value>(l).unwrap()["event"] == kind)
            .count()
    };
    if vm() {
        let ino = std::fs::metadata(&vm_image)
            .expect("the derived image")
            .ino();
        assert_eq!(log_events("vm_image"), 1, "one derivation for two creates");
        // A later VM reuses the cached image.
        d.destroy(&other).await;
        let third = d.create_id(body.clone()).await;
        assert_eq!(d.sh_ok(&third, check).await, expected);
        assert_eq!(std::fs::metadata(&vm_image).unwrap().ino(), ino);
        assert_eq!(log_events("vm_image"), 1, "the cached image reused");
        d.destroy(&third).await;
    } else {
        assert!(!vm_image.exists(), "containers need no image");
        d.destroy(&other).await;
    }
    // In use: no delete.
    let (s, v) = d
        .call(Method::DELETE, &format!("/v1/templates/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, v) = d
        .call(
            Method::POST,
            &format!("/api/sandbox/templates/{id}/pull"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(
        d.sh_ok(&sb, "cat hello.txt").await,
        "hello from layer two\n"
    );
    d.destroy(&sb).await;
    // Seed 003's routes: the list, and a pull again from the same source.
    let (s, list) = d.call(Method::GET, "/api/sandbox/templates", None).await;
    assert_eq!(s, StatusCode::OK, "{list}");
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["id"] == id.as_str()));
    let (s, t) = d
        .call(
            Method::POST,
            &format!("/api/sandbox/templates/{id}/pull"),
            None,
        )
        .await;
    assert_eq!(
        (s, &t["status"]),
        (StatusCode::ACCEPTED, &json!("building")),
        "{t}"
    );
    let (s, v) = d
        .call(
            Method::POST,
            &format!("/api/sandbox/templates/{id}/build"),
            None,
        )
        .await;
    assert!(
        s == StatusCode::CONFLICT || s == StatusCode::ACCEPTED,
        "a second build while one runs: {s} {v}"
    );
    assert_eq!(wait_built(&d, &id).await["status"], "ready");
    assert!(!vm_image.exists(), "a rebuild removes the microVM image");
    let (s, v) = d
        .call(Method::POST, "/api/sandbox/templates/default/pull", None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");

    // The CLI: a pull with its progress, the list, a delete.
    let out = d.cli(&["template", "pull", "--name", "bb-cli", &image]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli_id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(cli_id.starts_with("tmpl_"), "{cli_id}");
    let out = d.cli(&["template", "ls"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        table.contains("bb-cli") && table.contains("ready"),
        "{table}"
    );
    let out = d.cli(&["template", "pull", "--name", "bad", "127.0.0.1:1/none:1"]);
    assert_eq!(out.status.code(), Some(1), "a failed pull exits 1");
    assert!(String::from_utf8_lossy(&out.stderr).contains("failed"));
    let out = d.cli(&["template", "rm", "bb-cli", "bad"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let blobs = d.state_dir().join("images/blobs/sha256");
    assert!(!files_under(&blobs).is_empty());
    let (s, v) = d
        .call(Method::DELETE, &format!("/v1/templates/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    assert_eq!(files_under(&blobs), Vec::<String>::new(), "blobs collected");
    assert_eq!(
        files_under(&d.state_dir().join("templates")),
        Vec::<String>::new()
    );
    let (s, _) = d
        .call(Method::GET, &format!("/v1/templates/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_images_fail_clearly_and_leave_nothing() {
    let reg = Registry::start(false);
    let work = tempfile::tempdir().unwrap();
    busybox_image(&reg, work.path(), "corrupt");
    let d = Daemon::start().await;

    // Syntax: 400 naming the field, nothing registered.
    let (s, v) = d
        .call(
            Method::POST,
            "/v1/templates",
            Some(json!({"name": "x", "image": "a b"})),
        )
        .await;
    assert_eq!(
        (s, &v["error"]["field"]),
        (StatusCode::BAD_REQUEST, &json!("image")),
        "{v}"
    );

    // An unknown tag: failed, with the reason.
    let (s, t) = d
        .call(
            Method::POST,
            "/v1/templates",
            Some(json!({"name": "missing", "image": format!("{}/test/nope:1", reg.host())})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    let t = wait_built(&d, t["id"].as_str().unwrap()).await;
    assert_eq!(t["status"], "failed", "{t}");
    assert!(
        t["status_reason"]
            .as_str()
            .unwrap()
            .starts_with("not found"),
        "{t}"
    );
    // A sandbox of a failed template: 409 naming it.
    let (s, v) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"template": "missing"})),
        )
        .await;
    assert_eq!(
        (s, &v["error"]["field"]),
        (StatusCode::CONFLICT, &json!("template")),
        "{v}"
    );

    // A layer whose bytes do not match their digest.
    let manifest_layers: Vec<std::path::PathBuf> =
        std::fs::read_dir(reg.storage.join("docker/registry/v2/blobs/sha256"))
            .unwrap()
            .flatten()
            .flat_map(|d| {
                std::fs::read_dir(d.path())
                    .unwrap()
                    .flatten()
                    .map(|e| e.path().join("data"))
            })
            .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 100_000))
            .collect();
    assert_eq!(manifest_layers.len(), 1, "the busybox layer");
    let mut raw = std::fs::read(&manifest_layers[0]).unwrap();
    let mid = raw.len() / 2;
    raw[mid] ^= 0xff;
    std::fs::write(&manifest_layers[0], raw).unwrap();
    let (s, t) = d
        .call(
            Method::POST,
            "/v1/templates",
            Some(
                json!({"name": "corrupt", "image": format!("{}/test/corrupt:latest", reg.host())}),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    let t = wait_built(&d, t["id"].as_str().unwrap()).await;
    assert_eq!(t["status"], "failed", "{t}");
    assert!(
        t["status_reason"]
            .as_str()
            .unwrap()
            .starts_with("corrupt layer"),
        "{t}"
    );
    let left: Vec<String> = files_under(&d.state_dir().join("templates"))
        .into_iter()
        .filter(|f| !f.ends_with(".log"))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "nothing half-made");
    let blobs: Vec<String> = files_under(&d.state_dir().join("images/blobs/sha256"))
        .into_iter()
        .filter(|f| {
            std::fs::metadata(d.state_dir().join("images/blobs/sha256").join(f))
                .is_ok_and(|m| m.len() > 100_000)
        })
        .collect();
    assert_eq!(blobs, Vec::<String>::new(), "no unverified blob kept");
}

/// A private registry (basic auth): without credentials or with wrong ones
/// the template fails `unauthorized`; with them it is pulled, and the
/// password is written nowhere (template, build log, database). A
/// template's defaults (cpus, memory, egress) apply to the sandboxes made
/// from it unless their create says otherwise. An image for another
/// architecture fails `wrong platform`.
#[tokio::test]
async fn private_registries_template_defaults_and_platforms() {
    let locked = Registry::start(true);
    let (user, password) = locked.creds.clone().unwrap();
    let open = Registry::start(false);
    let work = tempfile::tempdir().unwrap();
    busybox_image(&locked, work.path(), "private");
    push_image(
        &open,
        work.path(),
        "arm",
        "arm64",
        &[&layer(&[E::Dir("bin", 0), E::File("bin/sh", "not x86", 0)])],
        json!({}),
    );
    let d = Daemon::start().await;
    let image = format!("{}/test/private:latest", locked.host());
    let post = |body: Value| {
        let d = &d;
        async move {
            let (s, t) = d.call(Method::POST, "/v1/templates", Some(body)).await;
            assert_eq!(s, StatusCode::ACCEPTED, "{t}");
            wait_built(d, t["id"].as_str().unwrap()).await
        }
    };

    // Credentials that do not fit: 400 naming the field.
    let (s, v) = d
        .call(
            Method::POST,
            "/v1/templates",
            Some(json!({"name": "p", "image": image, "credentials": {"username": "a:b", "password": "x"}})),
        )
        .await;
    assert_eq!(
        (s, &v["error"]["field"]),
        (StatusCode::BAD_REQUEST, &json!("credentials.username")),
        "{v}"
    );

    for (name, creds) in [
        ("anonymous", Value::Null),
        ("wrong", json!({"username": user, "password": "not-it"})),
    ] {
        let mut body = json!({"name": name, "image": image});
        if !creds.is_null() {
            body["credentials"] = creds;
        }
        let t = post(body).await;
        assert_eq!(t["status"], "failed", "{t}");
        assert!(
            t["status_reason"]
                .as_str()
                .unwrap()
                .starts_with("unauthorized"),
            "{t}"
        );
    }

    let t = post(json!({
        "name": "private",
        "image": image,
        "credentials": {"username": user, "password": password},
        "cpus": 2,
        "memory_mb": 768,
        "egress": {"mode": "deny_all", "allow_cidrs": ["10.0.0.0/8"]},
    }))
    .await;
    assert_eq!(t["status"], "ready", "{t}");
    assert_eq!(
        (&t["cpus"], &t["memory_mb"]),
        (&json!(2), &json!(768)),
        "{t}"
    );
    assert_eq!(t["egress"]["mode"], "deny_all", "{t}");
    assert!(!t.to_string().contains(&password), "{t}");
    let id = t["id"].as_str().unwrap().to_string();
    let log = d
        .req(Method::GET, &format!("/v1/templates/{id}/logs"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(log.contains("\"authenticated\":true"), "{log}");
    let db = std::fs::read(d.state_dir().join("sandforge.db")).unwrap();
    let logs: Vec<u8> = std::fs::read_dir(d.state_dir().join("templates"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .flat_map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    for (what, bytes) in [("database", &db), ("build logs", &logs)] {
        assert!(
            !bytes
                .windows(password.len())
                .any(|w| w == password.as_bytes()),
            "the password is in the {what}"
        );
    }

    // The template's defaults, unless the create says otherwise.
    let sb = d.create(json!({"template": "private"})).await;
    assert_eq!(
        (&sb["cpus"], &sb["memory_mb"]),
        (&json!(2), &json!(768)),
        "{sb}"
    );
    assert_eq!(
        (&sb["network"], &sb["egress"]["mode"]),
        (&json!("nat"), &json!("deny_all")),
        "{sb}"
    );
    let own = d
        .create(json!({"template": "private", "cpus": 1, "network": "offline"}))
        .await;
    assert_eq!(
        (&own["cpus"], &own["memory_mb"]),
        (&json!(1), &json!(768)),
        "{own}"
    );
    assert_eq!(
        (&own["network"], own.get("egress")),
        (&json!("offline"), None),
        "{own}"
    );
    let sb_id = sb["id"].as_str().unwrap().to_string();
    assert_eq!(
        d.sh_ok(&sb_id, "cat /app/hello.txt").await,
        "hello from layer two\n"
    );
    for s in [&sb, &own] {
        d.destroy(s["id"].as_str().unwrap()).await;
    }

    // Seed 003's pull again: the credentials come with it, or it fails.
    for (creds, status) in [
        (json!({}), "failed"),
        (
            json!({"credentials": {"username": user, "password": password}}),
            "ready",
        ),
    ] {
        let (s, t) = d
            .call(
                Method::POST,
                &format!("/api/sandbox/templates/{id}/pull"),
                Some(creds),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{t}");
        let t = wait_built(&d, &id).await;
        assert_eq!(t["status"], status, "{t}");
    }

    // Another architecture: failed, saying which.
    let t = post(json!({"name": "arm", "image": format!("{}/test/arm:latest", open.host())})).await;
    assert_eq!(t["status"], "failed", "{t}");
    let reason = t["status_reason"].as_str().unwrap();
    assert!(
        reason.starts_with("wrong platform") && reason.contains("arm64"),
        "{t}"
    );
}

/// A microVM create waits a bounded time for its template's image: while
/// the derivation cannot go on (the test holds the image's lock, as a slow
/// 10 GB derivation would keep it), the create answers 409
/// `template_not_ready` after `vm_image_wait_secs` and the derivation
/// goes on; a delete meanwhile is refused; once the lock is free the image
/// is made once and the next create boots from it.
#[tokio::test]
async fn a_microvm_create_waits_for_its_image_a_bounded_time() {
    if !vm() {
        return;
    }
    let reg = Registry::start(false);
    let work = tempfile::tempdir().unwrap();
    busybox_image(&reg, work.path(), "slow");
    let d = Daemon::start_with_config(&[], "vm_image_wait_secs: 2").await;
    let (s, t) = d
        .call(
            Method::POST,
            "/v1/templates",
            Some(json!({"name": "slow", "image": format!("{}/test/slow:latest", reg.host())})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    let id = t["id"].as_str().unwrap().to_string();
    assert_eq!(wait_built(&d, &id).await["status"], "ready");
    let dir = d.state_dir().join("templates").join(&id);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".rootfs.ext4.lock"))
        .unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();

    let body = json!({"template": "slow", "network": "offline"});
    let t0 = Instant::now();
    let (s, v) = d
        .call(Method::POST, "/v1/sandboxes", Some(body.clone()))
        .await;
    assert_eq!(
        (s, &v["error"]["code"], &v["error"]["field"]),
        (
            StatusCode::CONFLICT,
            &json!("template_not_ready"),
            &json!("template")
        ),
        "{v}"
    );
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    let (s, v) = d
        .call(Method::DELETE, &format!("/v1/templates/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(!dir.join("rootfs.ext4").exists());

    drop(lock);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !dir.join("rootfs.ext4").exists() {
        assert!(Instant::now() < deadline, "the derivation did not go on");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sb = d.create_id(body).await;
    assert_eq!(
        d.sh_ok(&sb, "cat hello.txt").await,
        "hello from layer two\n"
    );
    let log = std::fs::read_to_string(d.state_dir().join(format!("templates/{id}.log"))).unwrap();
    assert_eq!(log.matches("\"event\":\"vm_image\"").count(), 1, "{log}");
    d.destroy(&sb).await;
    let (s, v) = d
        .call(Method::DELETE, &format!("/v1/templates/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    assert!(!dir.exists(), "the image goes with the template");
}
