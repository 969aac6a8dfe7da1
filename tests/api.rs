//! The core API end to end: auth and organizations, the sandbox lifecycle,
//! both exec flavours (buffered and live ndjson), timeouts, concurrency and
//! the seed 000 example.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use sandforge_tests::{scratch_dir, Daemon, TOKEN};
use serde_json::{json, Value};

#[tokio::test]
async fn health_needs_no_auth_and_everything_else_does() {
    let d = Daemon::start().await;
    let r = d
        .http
        .get(format!("{}/health", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["sandboxes"], 0);
    assert!(v["uptime"].as_str().unwrap().ends_with('s'), "{v}");

    let r = d
        .http
        .get(format!("{}/v1/sandboxes", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unauthorized");
    let r = d
        .http
        .get(format!("{}/v1/sandboxes", d.url))
        .bearer_auth("sf_wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = d
        .http
        .get(format!("{}/v1/sandboxes", d.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn lifecycle_and_cross_org_isolation() {
    let d = Daemon::start().await;
    let sb = d
        .create(json!({"cpu": 1, "memory_mb": 256, "network": "offline", "metadata": {"team": "a"}, "env": {"GREETING": "hi"}}))
        .await;
    let id = sb["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("sb_"), "{sb}");
    assert_eq!(sb["status"], "running");
    assert_eq!(sb["cpu"], 1);
    assert_eq!(sb["memory_mb"], 256);
    assert_eq!(sb["network"], "offline");
    assert_eq!(sb["isolation"], sandforge_tests::isolation());
    assert!(sb["created_at"].as_str().unwrap().contains('T'));
    assert_eq!(sb["env_keys"], json!(["GREETING"]));

    // The sandbox env reaches commands; the request env adds to it.
    let v = d
        .execute(
            &id,
            json!({"command": "echo $GREETING $EXTRA", "env": {"EXTRA": "there"}}),
        )
        .await
        .1;
    assert_eq!(v["stdout"], "hi there\n");

    let (s, list) = d.call(Method::GET, "/v1/sandboxes", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(list.as_array().unwrap().iter().any(|x| x["id"] == id));
    let (_, running) = d
        .call(Method::GET, "/v1/sandboxes?status=running", None)
        .await;
    assert_eq!(running.as_array().unwrap().len(), 1);
    let (_, failed) = d
        .call(Method::GET, "/v1/sandboxes?status=failed", None)
        .await;
    assert_eq!(failed, json!([]));
    let (s, got) = d
        .call(Method::GET, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!((s, got["id"].clone()), (StatusCode::OK, json!(id)));
    // Seed 002 paths (no /v1) reach the same resource.
    let (s, _) = d.call(Method::GET, &format!("/sandboxes/{id}"), None).await;
    assert_eq!(s, StatusCode::OK);

    // Another organization sees nothing and touches nothing.
    let other = d.token_for("acme");
    let get = |m: Method, p: String| {
        d.http
            .request(m, format!("{}{}", d.url, p))
            .bearer_auth(&other)
    };
    let r = get(Method::GET, format!("/v1/sandboxes/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = get(Method::POST, format!("/v1/sandboxes/{id}/execute"))
        .json(&json!({"command": "true"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = get(Method::DELETE, format!("/v1/sandboxes/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = get(Method::GET, "/v1/sandboxes".into())
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!([]));

    // Destroy is idempotent; the sandbox is then listed only when asked for.
    let (s, v) = d
        .call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "terminated");
    let (s, _) = d
        .call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, got) = d
        .call(Method::GET, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(got["status"], "destroyed");
    let (_, list) = d.call(Method::GET, "/v1/sandboxes", None).await;
    assert_eq!(list, json!([]));
    let (_, gone) = d
        .call(Method::GET, "/v1/sandboxes?status=destroyed", None)
        .await;
    assert_eq!(gone.as_array().unwrap().len(), 1);
    let (s, v) = d.execute(&id, json!({"command": "true"})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "not_running");
    let (s, _) = d
        .call(Method::DELETE, "/v1/sandboxes/sb_doesnotexist", None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn execute_and_exec_buffered() {
    let d = Daemon::start().await;
    let id = d.create_id(json!({})).await;

    let v = d.sh(&id, "echo out; echo err >&2; exit 3").await;
    assert_eq!(
        v,
        json!({"exit_code": 3, "stdout": "out\n", "stderr": "err\n", "timed_out": false})
    );

    let (s, v) = d
        .execute(&id, json!({"command": "pwd", "cwd": "/tmp"}))
        .await;
    assert_eq!(
        (s, v["stdout"].as_str().unwrap()),
        (StatusCode::OK, "/tmp\n")
    );

    // Seed 002's exec: an argv, no shell involved.
    let (s, v) = d
        .call(
            Method::POST,
            &format!("/sandboxes/{id}/exec"),
            Some(json!({"cmd": ["echo", "hello", "$HOME"]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (v["exit_code"].clone(), v["stdout"].clone()),
        (json!(0), json!("hello $HOME\n"))
    );
    let (_, v) = d
        .call(Method::POST, &format!("/v1/sandboxes/{id}/exec"), Some(json!({"cmd": ["python3", "-c", "import sys; print(sys.stdin.read().upper())"], "stdin": "abc"})))
        .await;
    assert_eq!(v["stdout"], "ABC\n");
    let (_, v) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"cmd": ["/no/such/binary"]})),
        )
        .await;
    assert_eq!(v["exit_code"], 127, "{v}");
    d.destroy(&id).await;
}

#[tokio::test]
async fn exec_streams_ndjson_live() {
    let d = Daemon::start().await;
    let id = d.create_id(json!({})).await;
    // The command prints, then waits for a marker that we create only after
    // its first line reached us: without live streaming this never finishes.
    let resp = d
        .req(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
        .header("Accept", "application/x-ndjson")
        .json(&json!({"cmd": ["sh", "-c", "echo first; while [ ! -f /tmp/marker ]; do sleep 0.05; done; echo second >&2; exit 7"], "timeout_seconds": 60}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    let first_line = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                return serde_json::from_slice::<Value>(&line).unwrap();
            }
            buf.extend_from_slice(&body.next().await.unwrap().unwrap());
        }
    })
    .await
    .expect("first line must arrive while the command still runs");
    assert_eq!(first_line, json!({"type": "stdout", "data": "first\n"}));
    d.sh_ok(&id, "touch /tmp/marker").await;
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk.unwrap());
    }
    let rest: Vec<Value> = buf
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(
        rest,
        vec![
            json!({"type": "stderr", "data": "second\n"}),
            json!({"type": "exit", "exit_code": 7, "timed_out": false})
        ]
    );
    d.destroy(&id).await;
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group() {
    let d = Daemon::start().await;
    let id = d.create_id(json!({})).await;
    let (s, v) = d
        .execute(
            &id,
            json!({"command": "sleep 1000 & sleep 1001; echo never", "timeout_seconds": 1}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["timed_out"], true, "{v}");
    assert_eq!(v["exit_code"], 137);
    assert_eq!(v["stdout"], "");
    // Neither the command nor its background child survived.
    let left = d
        .sh(&id, "ps -eo args | grep -c '^sleep 100' || true")
        .await;
    assert_eq!(left["stdout"], "0\n", "{left}");
    // A command that leaves a background process behind (without timing out)
    // returns when its main process exits, and the background one lives on.
    let v = d.sh(&id, "sleep 300 >/dev/null 2>&1 & echo started").await;
    assert_eq!(
        (v["exit_code"].clone(), v["stdout"].clone()),
        (json!(0), json!("started\n"))
    );
    assert_eq!(
        d.sh_ok(&id, "ps -eo args | grep -c '^sleep 300'").await,
        "1\n"
    );
    d.destroy(&id).await;
}

#[tokio::test]
async fn many_concurrent_execs_on_one_sandbox() {
    let d = Daemon::start().await;
    let id = d.create_id(json!({"cpu": 2})).await;
    let runs = (0..24).map(|i| {
        let d = &d;
        let id = id.clone();
        async move {
            let v = d.sh(&id, &format!("sleep 0.2; echo n{i}")).await;
            assert_eq!(v["stdout"], format!("n{i}\n"));
        }
    });
    futures_util::future::join_all(runs).await;
    d.destroy(&id).await;
}

/// Seed 000: a project directory mounted at /workspace, `npm run test` with
/// NODE_ENV=test.
#[tokio::test]
async fn seed_000_npm_test_in_a_mounted_project() {
    let project = scratch_dir("sf-project-");
    std::fs::write(
        project.path().join("package.json"),
        r#"{"name":"app","version":"1.0.0","scripts":{"test":"node test.js"}}"#,
    )
    .unwrap();
    std::fs::write(
        project.path().join("test.js"),
        "if (process.env.NODE_ENV !== 'test') { console.error('NODE_ENV=' + process.env.NODE_ENV); process.exit(1); }\n\
         let n = 0; for (let i = 0; i < 12; i++) { if (i * 2 === i + i) n++; }\n\
         console.log(`\\u2713 All tests passed (${n} tests completed)`);\n",
    )
    .unwrap();
    let d = Daemon::start_with(&[project.path()]).await;
    let sb = d
        .create(json!({
            "cpu": 2, "memory_mb": 1024, "network": "offline",
            "mounts": [{"host_path": project.path(), "guest_path": "/workspace", "read_only": false}]
        }))
        .await;
    let id = sb["id"].as_str().unwrap();
    let (s, v) = d.execute(id, json!({"command": "cd /workspace && npm run test --silent", "timeout_seconds": 60, "env": {"NODE_ENV": "test"}})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["exit_code"], 0, "{v}");
    assert_eq!(
        v["stdout"], "✓ All tests passed (12 tests completed)\n",
        "{v}"
    );
    assert_eq!(v["timed_out"], false);
    d.destroy(id).await;
}
