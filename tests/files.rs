//! Files API: raw bytes in and out, atomic writes, metadata, listings,
//! server-side truncation and path validation.

use rand::RngCore;
use reqwest::{Method, StatusCode};
use sandforge_tests::Daemon;
use serde_json::{json, Value};

fn files(id: &str, query: &str) -> String {
    format!("/v1/sandboxes/{id}/files?{query}")
}

#[tokio::test]
async fn put_get_head_ls_and_truncation() {
    let d = Daemon::start().await;
    let id = d.create_id(json!({})).await;

    // 1 MiB of random bytes round-trips exactly, into a new directory.
    let mut data = vec![0u8; 1 << 20];
    rand::thread_rng().fill_bytes(&mut data);
    let r = d
        .req(Method::PUT, &files(&id, "path=/data/sub/blob.bin"))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = d
        .req(Method::GET, &files(&id, "path=/data/sub/blob.bin"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(r.headers()["x-file-size"], "1048576");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);
    // The sandbox sees the same bytes.
    let sum = d
        .sh_ok(&id, "sha256sum < /data/sub/blob.bin | cut -d' ' -f1")
        .await;
    assert_eq!(sum.trim().len(), 64);

    // Mode and metadata.
    let r = d
        .req(Method::PUT, &files(&id, "path=/data/run.sh&mode=0755"))
        .body("#!/bin/sh\necho ran\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(d.sh_ok(&id, "/data/run.sh").await, "ran\n");
    let r = d
        .req(Method::HEAD, &files(&id, "path=/data/run.sh"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-file-size"], "19");
    assert_eq!(r.headers()["x-file-mode"], "0755");
    assert_eq!(r.headers()["x-file-isdir"], "false");
    let r = d
        .req(Method::HEAD, &files(&id, "path=/data/sub"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-file-isdir"], "true");

    // Overwrite is atomic: a reader sees old or new content, never a mix.
    let r = d
        .req(Method::PUT, &files(&id, "path=/data/run.sh"))
        .body("v2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = d
        .req(Method::GET, &files(&id, "path=/data/run.sh"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "v2");
    assert_eq!(
        d.sh_ok(&id, "ls -A /data | grep -c sf-tmp || true").await,
        "0\n"
    );

    // Listing.
    let (s, v) = d
        .call(Method::GET, &files(&id, "path=/data&ls=true"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["run.sh", "sub"]);
    assert_eq!(v[1]["is_dir"], true);
    assert_eq!(v[0]["size"], 2);
    assert!(v[0]["mtime"].as_i64().unwrap() > 1_600_000_000);

    // A listing is capped at 10,000 entries with a sentinel giving the total.
    d.sh_ok(&id, "mkdir /many && cd /many && seq 1 10005 | xargs touch")
        .await;
    let (_, v) = d
        .call(Method::GET, &files(&id, "path=/many&ls=true"), None)
        .await;
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 10_001);
    assert_eq!(arr[10_000]["truncated"], true, "{}", arr[10_000]);
    assert_eq!(arr[10_000]["total"], 10_005);

    // Truncation by lines and bytes; X-File-Size always tells the real size.
    let log: String = (1..=100).map(|i| format!("line {i}\n")).collect();
    d.req(Method::PUT, &files(&id, "path=/app.log"))
        .body(log.clone())
        .send()
        .await
        .unwrap();
    let get = |q: &str| d.req(Method::GET, &files(&id, q)).send();
    let r = get("path=/app.log&offset=3&limit=2").await.unwrap();
    assert_eq!(r.headers()["x-file-size"], log.len().to_string().as_str());
    assert!(r.headers().get("content-length").is_none());
    assert_eq!(r.text().await.unwrap(), "line 3\nline 4\n");
    let r = get("path=/app.log&offset=99").await.unwrap();
    assert_eq!(r.text().await.unwrap(), "line 99\nline 100\n");
    let r = get("path=/app.log&offset=1&limit=2000&max_bytes=10")
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "line 1\nlin");
    let r = get("path=/app.log").await.unwrap();
    assert_eq!(
        r.headers()["content-length"],
        log.len().to_string().as_str()
    );
    assert_eq!(r.text().await.unwrap(), log);
    d.destroy(&id).await;
}

#[tokio::test]
async fn paths_are_validated() {
    let d = Daemon::start().await;
    let id = d.create_id(json!({})).await;
    for (q, code) in [
        ("path=etc/passwd", "invalid_request"),
        ("path=/", "invalid_request"),
        ("path=/tmp/../etc/passwd", "invalid_request"),
        ("path=", "invalid_request"),
        ("nopath=1", "invalid_request"),
        ("path=/x&offset=0", "invalid_request"),
        ("path=/x&limit=abc", "invalid_request"),
        ("path=/x&ls=maybe", "invalid_request"),
    ] {
        let (s, v) = d.call(Method::GET, &files(&id, q), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
        assert_eq!(v["error"]["code"], code, "{q}: {v}");
        assert!(v["error"]["field"].is_string(), "{q}: {v}");
    }
    let r = d
        .req(Method::PUT, &files(&id, "path=/tmp/x&mode=999"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // A symlink through a magic link (/proc/<pid>/root) escapes the sandbox's
    // view of its own root: refused, for reads and for writes.
    d.sh_ok(
        &id,
        "ln -s /proc/1/root /tmp/escape && ln -s /proc/self/cwd /tmp/cwd",
    )
    .await;
    for q in ["path=/tmp/escape/etc/hostname", "path=/tmp/cwd/x"] {
        let (s, v) = d.call(Method::GET, &files(&id, q), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
        assert_eq!(v["error"]["code"], "path_escape", "{v}");
    }
    let r = d
        .req(Method::PUT, &files(&id, "path=/tmp/escape/tmp/planted"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Ordinary symlinks inside the sandbox work.
    d.sh_ok(&id, "echo inside > /tmp/real && ln -s /tmp/real /tmp/link")
        .await;
    let r = d
        .req(Method::GET, &files(&id, "path=/tmp/link"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "inside\n");

    // Missing files and directories-as-files.
    let (s, v) = d
        .call(Method::GET, &files(&id, "path=/no/such/file"), None)
        .await;
    assert_eq!(
        (s, v["error"]["code"].clone()),
        (StatusCode::NOT_FOUND, json!("not_found"))
    );
    let r = d
        .req(Method::HEAD, &files(&id, "path=/no/such/file"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let (s, _) = d.call(Method::GET, &files(&id, "path=/etc"), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = d
        .call(Method::GET, &files(&id, "path=/etc/hostname&ls=true"), None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // A destroyed sandbox's files answer 409.
    d.destroy(&id).await;
    let (s, v): (StatusCode, Value) = d
        .call(Method::GET, &files(&id, "path=/etc/hostname"), None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
}
