//! Image archives uploaded as templates (issue 12, source 2): a `docker
//! save` tar and an OCI archive (both made by `skopeo copy` from an OCI
//! layout) become templates a sandbox runs, with the image's Env and
//! WorkingDir, through the API and the CLI; hostile archives (names leaving
//! the archive, links, missing blobs, digests and diff_ids that do not
//! match, not a tar, too large) leave a `failed` template with the reason
//! or a 4xx, and nothing behind: no spool file, staging tree or blob
//! temporary.

use std::path::Path;

use reqwest::{Method, StatusCode};
use sandforge_tests::oci::{layer, layer_from_dir, sha, Layout, E};
use sandforge_tests::Daemon;
use serde_json::{json, Value};

/// busybox's static shell as the root filesystem, a second layer that adds
/// a file and whites one out; Env and WorkingDir in the config.
fn busybox_layout(work: &Path) -> Layout {
    let root = work.join("rootfs");
    for d in ["bin", "etc", "tmp", "root", "app", "proc", "dev", "sys"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    for applet in ["sh", "echo", "cat", "pwd", "test", "true"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/motd"), "whited out above\n").unwrap();
    let base = layer_from_dir(&root);
    let top = layer(&[
        E::Dir("app", 0),
        E::File("app/hello.txt", "hello from an archive\n", 0),
        E::File("etc/.wh.motd", "", 0),
    ]);
    let l = Layout::new(work, "bb");
    let desc = l.image(
        "amd64",
        &[&base, &top],
        json!({"Env": ["PATH=/bin", "GREETING=imported"], "WorkingDir": "/app"}),
    );
    l.tag(desc);
    l
}

async fn upload(d: &Daemon, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
    let r = d.req(Method::POST, path).body(body).send().await.unwrap();
    let s = r.status();
    let text = r.text().await.unwrap();
    (
        s,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("{s}: {text}")),
    )
}

async fn wait_built(d: &Daemon, id: &str) -> Value {
    d.wait_template(id, 180).await
}

/// Import `body` as `name`: the finished template.
async fn import(d: &Daemon, name: &str, body: Vec<u8>) -> Value {
    let (s, t) = upload(d, &format!("/v1/templates/import?name={name}"), body).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    assert_eq!(t["status"], "building", "{t}");
    assert_eq!(t["source"], json!({"type": "archive"}));
    wait_built(d, t["id"].as_str().unwrap()).await
}

/// Nothing an import leaves behind when it is over.
fn assert_no_leftovers(d: &Daemon) {
    let mut left = vec![];
    for dir in ["templates", "images/blobs/sha256"] {
        if let Ok(rd) = std::fs::read_dir(d.state_dir().join(dir)) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with('.') {
                    left.push(format!("{dir}/{n}"));
                }
            }
        }
    }
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test]
async fn docker_save_and_oci_archives_become_templates() {
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path());
    let docker = work.path().join("bb.docker.tar");
    let oci = work.path().join("bb.oci.tar");
    layout.archive("docker-archive", &docker);
    layout.archive("oci-archive", &oci);
    let d = Daemon::start().await;

    for (name, file) in [("from-docker", &docker), ("from-oci", &oci)] {
        let t = import(&d, name, std::fs::read(file).unwrap()).await;
        assert_eq!(t["status"], "ready", "{name}: {t}");
        assert!(t["size_bytes"].as_u64().unwrap() > 1 << 20, "{t}");
        let sb = d
            .create_id(json!({"template": name, "network": "offline"}))
            .await;
        assert_eq!(
            d.sh_ok(
                &sb,
                "cat hello.txt; echo $GREETING; pwd; test -e /etc/motd || echo gone"
            )
            .await,
            "hello from an archive\nimported\n/app\ngone\n",
            "{name}"
        );
        d.destroy(&sb).await;
    }
    // The build log tells it was an import.
    let (_, t) = d.call(Method::GET, "/v1/templates/from-oci", None).await;
    let log = d
        .req(
            Method::GET,
            &format!("/v1/templates/{}/logs", t["id"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        log.contains(r#""event":"import""#) && log.contains(r#""event":"ready""#),
        "{log}"
    );
    // A name in use: 409 (the upload is not kept).
    let (s, v) = upload(
        &d,
        "/v1/templates/import?name=from-oci",
        std::fs::read(&oci).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    // A template made from an archive cannot be rebuilt from its source.
    let (s, v) = d
        .call(Method::POST, "/api/sandbox/templates/from-oci/build", None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");

    // The CLI, and seed 002's path.
    let out = d.cli(&[
        "template",
        "import",
        oci.to_str().unwrap(),
        "--name",
        "from-cli",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(id.starts_with("tmpl_"), "{id}");
    let (_, t) = d
        .call(Method::GET, &format!("/v1/templates/{id}"), None)
        .await;
    assert_eq!(t["status"], "ready", "{t}");
    let (s, t) = upload(
        &d,
        "/templates/import?name=seed2",
        std::fs::read(&docker).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    assert_eq!(
        wait_built(&d, t["id"].as_str().unwrap()).await["status"],
        "ready"
    );
    assert_no_leftovers(&d);
}

/// A tar of `(name, content)` members, names written raw; `Err(target)`
/// makes a symlink.
fn tar_of(members: &[(&str, Result<&[u8], &str>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, m) in members {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_mode(0o644);
        match m {
            Ok(data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                h.set_cksum();
                b.append(&h, *data).unwrap();
            }
            Err(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// An OCI archive of a one-layer image; `tamper` changes the members
/// (name → content) before they are packed.
fn oci_archive(tamper: impl FnOnce(&mut Vec<(String, Result<Vec<u8>, String>)>, &str)) -> Vec<u8> {
    let work = tempfile::tempdir().unwrap();
    let l = Layout::new(work.path(), "h");
    let top = layer(&[E::File("f", "data\n", 0)]);
    let desc = l.image("amd64", &[&top], json!({}));
    l.tag(desc);
    let mut members: Vec<(String, Result<Vec<u8>, String>)> = vec![
        (
            "oci-layout".into(),
            Ok(std::fs::read(l.dir.join("oci-layout")).unwrap()),
        ),
        (
            "index.json".into(),
            Ok(std::fs::read(l.dir.join("index.json")).unwrap()),
        ),
    ];
    for e in std::fs::read_dir(l.dir.join("blobs/sha256"))
        .unwrap()
        .flatten()
    {
        members.push((
            format!("blobs/sha256/{}", e.file_name().to_string_lossy()),
            Ok(std::fs::read(e.path()).unwrap()),
        ));
    }
    let layer_member = format!("blobs/sha256/{}", sha(&top.0).trim_start_matches("sha256:"));
    tamper(&mut members, &layer_member);
    let refs: Vec<(&str, Result<&[u8], &str>)> = members
        .iter()
        .map(|(n, m)| {
            (
                n.as_str(),
                m.as_ref().map(|v| v.as_slice()).map_err(|s| s.as_str()),
            )
        })
        .collect();
    tar_of(&refs)
}

#[tokio::test]
async fn hostile_archives_fail_with_the_reason_and_leave_nothing() {
    let d = Daemon::start_with_config(&[], "template_import_max_mb: 1\n").await;
    // Synchronous refusals: 4xx with the field.
    let (s, v) = upload(&d, "/v1/templates/import", b"x".to_vec()).await;
    assert_eq!(
        (s, &v["error"]["field"]),
        (StatusCode::BAD_REQUEST, &json!("name")),
        "{v}"
    );
    let (s, v) = upload(&d, "/v1/templates/import?name=tmpl_x", b"x".to_vec()).await;
    assert_eq!(
        (s, &v["error"]["field"]),
        (StatusCode::BAD_REQUEST, &json!("name")),
        "{v}"
    );
    let (s, v) = upload(&d, "/v1/templates/import?name=empty", vec![]).await;
    assert_eq!(
        (s, &v["error"]["field"]),
        (StatusCode::BAD_REQUEST, &json!("body")),
        "{v}"
    );
    // On a connection of its own: the daemon answers before it has read
    // the whole body, then closes that connection.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/templates/import?name=big", d.url))
        .bearer_auth(sandforge_tests::TOKEN)
        .body(vec![0u8; 3 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "archive_too_large", "{v}");
    let (s, v) = d
        .call(
            Method::POST,
            "/v1/templates",
            Some(json!({"name": "x", "source": {"type": "archive"}})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    // Asynchronous: `failed` with the reason.
    let docker_bad_diff = {
        let inner = tar_of(&[("etc/x", Ok(b"x\n"))]);
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", "0".repeat(64))]},
        }))
        .unwrap();
        let manifest =
            serde_json::to_vec(&json!([{"Config": "c.json", "RepoTags": [], "Layers": ["l.tar"]}]))
                .unwrap();
        tar_of(&[
            ("manifest.json", Ok(&manifest)),
            ("c.json", Ok(&config)),
            ("l.tar", Ok(&inner)),
        ])
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "not-a-tar",
            b"this is not an archive at all".repeat(100),
            "bad archive",
        ),
        (
            "escape",
            tar_of(&[("../../evil", Ok(b"x")), ("index.json", Ok(b"{}"))]),
            "refused",
        ),
        (
            "neither",
            tar_of(&[("hello", Ok(b"x"))]),
            "neither an OCI archive",
        ),
        (
            "corrupt",
            oci_archive(|m, layer| {
                let data = m.iter_mut().find(|(n, _)| n == layer).unwrap();
                if let Ok(v) = &mut data.1 {
                    let i = v.len() / 2;
                    v[i] ^= 0xff;
                }
            }),
            "corrupt layer",
        ),
        (
            "missing",
            oci_archive(|m, layer| m.retain(|(n, _)| n != layer)),
            "is missing",
        ),
        (
            "linked",
            oci_archive(|m, layer| {
                let data = m.iter_mut().find(|(n, _)| n == layer).unwrap();
                data.1 = Err("../../../etc/passwd".into());
            }),
            "not a regular file",
        ),
        ("bad-diff-id", docker_bad_diff, "uncompressed content"),
    ];
    for (name, body, reason) in cases {
        let t = import(&d, name, body).await;
        assert_eq!(t["status"], "failed", "{name}: {t}");
        let got = t["status_reason"].as_str().unwrap_or("");
        assert!(got.contains(reason), "{name}: {got}");
        assert!(
            !d.state_dir()
                .join("templates")
                .join(t["id"].as_str().unwrap())
                .exists(),
            "{name}: a failed import's directory"
        );
    }
    // The daemon is fine and nothing is left.
    let (s, _) = d.call(Method::GET, "/v1/templates", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_no_leftovers(&d);
}
