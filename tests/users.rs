//! Users in sandboxes, on the backend the run targets: the default
//! template's `user` (uid 1000) by name and by uid on `/execute`, `/exec`
//! and the terminal, root by default, what uid 1000 may not do, a uid
//! without a passwd entry, unknown and malformed users (400 naming
//! `user`), and a pulled image whose config says `User: 1000`.
//!
//! The default template must be of the format that has `user`
//! (scripts/build-template.sh; `SANDFORGE_TEST_TEMPLATE_DIR` points the
//! test daemons at another cache).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::{header, Method, StatusCode};
use sandforge_tests::oci::{layer_from_dir, push_image, Registry};
use sandforge_tests::{Daemon, TOKEN};
use serde_json::{json, Value};
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::{self, Message};

/// What the identity probe prints: uid, gid, groups, HOME, name, cwd,
/// USER, LOGNAME.
const WHO: &str =
    "id -u; id -g; id -G; echo \"$HOME\"; whoami; pwd; echo \"${USER-unset}\"; echo \"${LOGNAME-unset}\"";

async fn who(d: &Daemon, id: &str, extra: Value) -> Vec<String> {
    let mut body = json!({ "command": WHO });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (s, v) = d.execute(id, body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{body}: {v}");
    assert_eq!(v["exit_code"], 0, "{body}: {v}");
    v["stdout"]
        .as_str()
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A sandbox of the default template, which must have the user `user`.
async fn default_sandbox(d: &Daemon) -> String {
    let id = d.create_id(json!({})).await;
    let v = d.sh(&id, "getent passwd user").await;
    assert_eq!(
        v["stdout"].as_str().unwrap().trim(),
        "user:x:1000:1000::/home/user:/bin/bash",
        "the default template has no user `user`: rebuild it with scripts/build-template.sh \
         (or set SANDFORGE_TEST_TEMPLATE_DIR to a cache that has it): {v}"
    );
    id
}

#[tokio::test]
async fn exec_runs_as_the_asked_user_and_as_root_by_default() {
    let d = Daemon::start().await;
    let id = default_sandbox(&d).await;

    let as_user = [
        "1000",
        "1000",
        "1000",
        "/home/user",
        "user",
        "/home/user",
        "user",
        "user",
    ];
    assert_eq!(who(&d, &id, json!({"user": "user"})).await, as_user);
    assert_eq!(who(&d, &id, json!({"user": 1000})).await, as_user);
    assert_eq!(who(&d, &id, json!({"user": "1000"})).await, as_user);
    // E2B's SDK spells it `username`.
    assert_eq!(who(&d, &id, json!({"username": "user"})).await, as_user);
    assert_eq!(who(&d, &id, json!({"user": "user:user"})).await, as_user);

    // No user: root, in /root, exactly as before users existed.
    let root = who(&d, &id, json!({})).await;
    assert_eq!(
        root,
        ["0", "0", "0", "/root", "root", "/root", "unset", "unset"]
    );
    let root = who(&d, &id, json!({"user": "root"})).await;
    assert_eq!(&root[..6], ["0", "0", "0", "/root", "root", "/root"]);

    // A cwd and env of the request still win.
    let v = who(
        &d,
        &id,
        json!({"user": "user", "cwd": "/tmp", "env": {"HOME": "/elsewhere"}}),
    )
    .await;
    assert_eq!((v[3].as_str(), v[5].as_str()), ("/elsewhere", "/tmp"));

    // A uid without a passwd entry: gid = uid, HOME=/, started in /.
    let (s, v) = d
        .execute(
            &id,
            json!({"command": "id -u; id -g; id -G; echo $HOME; pwd; echo ${USER-unset}", "user": 4242}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["stdout"], "4242\n4242\n4242\n/\n/\nunset\n", "{v}");

    // uid 1000 is not root: it cannot write /root, read /etc/shadow, or
    // become root again; what it writes is its own.
    for (cmd, what) in [
        ("touch /root/x", "write /root"),
        ("cat /etc/shadow", "read /etc/shadow"),
        ("python3 -c 'import os; os.setuid(0)'", "setuid(0)"),
        ("chown root /home/user", "chown to root"),
    ] {
        let (s, v) = d
            .execute(&id, json!({"command": cmd, "user": "user"}))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_ne!(v["exit_code"], 0, "uid 1000 could {what}: {v}");
    }
    let (_, v) = d
        .execute(
            &id,
            json!({"command": "echo hi > f && stat -c '%u:%g %n' f $HOME", "user": "user"}),
        )
        .await;
    assert_eq!(v["stdout"], "1000:1000 f\n1000:1000 /home/user\n", "{v}");
    // Root still can, and sees the file as the user's.
    assert_eq!(
        d.sh_ok(&id, "touch /root/x && stat -c %u /home/user/f")
            .await,
        "1000\n"
    );

    // `/exec` (argv), buffered and streamed.
    let (s, v) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"cmd": ["id", "-un"], "user": "user"})),
        )
        .await;
    assert_eq!((s, &v["stdout"]), (StatusCode::OK, &json!("user\n")), "{v}");
    let r = d
        .req(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
        .header(header::ACCEPT, "application/x-ndjson")
        .json(&json!({"cmd": ["id", "-u"], "user": 1000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert!(
        text.contains(r#"{"type":"stdout","data":"1000\n"}"#),
        "{text}"
    );

    // The CLI's `--user`/`-u`.
    for args in [
        ["exec", "--user", "user", id.as_str(), "--", "id", "-u"],
        ["execute", "-u", "1000", id.as_str(), "id -u", "", ""],
    ] {
        let args: Vec<&str> = args.into_iter().filter(|a| !a.is_empty()).collect();
        let out = d.cli(&args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "1000\n", "{args:?}");
    }

    // An unknown user (by name or group) and a malformed one: 400 naming
    // `user`, before anything runs.
    for (user, route) in [
        (json!("nosuchuser"), "execute"),
        (json!("user:nosuchgroup"), "execute"),
        (json!("nosuchuser"), "exec"),
        (json!("a b"), "execute"),
        (json!(""), "exec"),
        (json!(4294967295u64), "execute"),
        (json!(-1), "execute"),
        (json!(true), "exec"),
    ] {
        let body = if route == "exec" {
            json!({"cmd": ["touch", "/tmp/ran"], "user": user})
        } else {
            json!({"command": "touch /tmp/ran", "user": user})
        };
        let (s, v) = d
            .call(
                Method::POST,
                &format!("/v1/sandboxes/{id}/{route}"),
                Some(body.clone()),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["error"]["field"], "user", "{body}: {v}");
    }
    let (s, v) = d.execute(&id, json!({"command": "test -e /tmp/ran"})).await;
    assert_eq!((s, &v["exit_code"]), (StatusCode::OK, &json!(1)), "{v}");

    // A sandbox's own /etc/passwd is hostile only to itself, and bounded:
    // a FIFO there cannot hang the agent, a huge file is refused.
    d.sh_ok(
        &id,
        "cp /etc/passwd /tmp/p && rm /etc/passwd && mkfifo /etc/passwd",
    )
    .await;
    let (s, v) = d
        .execute(&id, json!({"command": "id -u", "user": "user"}))
        .await;
    assert_eq!(
        (s, &v["error"]["field"]),
        (StatusCode::BAD_REQUEST, &json!("user")),
        "{v}"
    );
    let (s, v) = d
        .execute(&id, json!({"command": "id -u", "user": 1000}))
        .await;
    assert_eq!((s, &v["stdout"]), (StatusCode::OK, &json!("1000\n")), "{v}");
    d.sh_ok(
        &id,
        "rm /etc/passwd && cp /tmp/p /etc/passwd && head -c 5M /dev/zero | tr '\\0' '#' >> /etc/passwd",
    )
    .await;
    let (s, v) = d
        .execute(&id, json!({"command": "id -u", "user": "user"}))
        .await;
    assert_eq!(
        (s, &v["error"]["field"]),
        (StatusCode::BAD_REQUEST, &json!("user")),
        "{v}"
    );
    assert!(
        v["error"]["message"].as_str().unwrap().contains("larger"),
        "{v}"
    );
    d.sh_ok(&id, "cp /tmp/p /etc/passwd").await;
    assert_eq!(who(&d, &id, json!({"user": "user"})).await, as_user);
    d.destroy(&id).await;
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Everything a terminal prints until it exits: (output, exit code).
async fn terminal(d: &Daemon, id: &str, query: &str) -> (String, i64) {
    let url = format!(
        "ws://127.0.0.1:{}/v1/sandboxes/{id}/ws?token={TOKEN}&{query}",
        d.port
    );
    let mut ws: Ws = connect_async(url).await.expect("websocket").0;
    let mut out = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next())
            .await
            .unwrap_or_else(|_| panic!("the terminal did not exit: {out:?}"))
        {
            Some(Ok(Message::Binary(b))) => out.push_str(&String::from_utf8_lossy(&b)),
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(v["type"], "exit", "{v}");
                return (out, v["exit_code"].as_i64().unwrap());
            }
            Some(Ok(_)) => {}
            other => panic!("socket ended ({other:?}) before the exit: {out:?}"),
        }
    }
}

/// The HTTP status and JSON error of a WebSocket request refused before
/// the upgrade.
async fn ws_refused(d: &Daemon, id: &str, query: &str) -> (u16, Value) {
    let url = format!(
        "ws://127.0.0.1:{}/v1/sandboxes/{id}/ws?token={TOKEN}&{query}",
        d.port
    );
    match connect_async(&url).await {
        Err(tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            serde_json::from_slice(resp.body().as_deref().unwrap_or(b"{}")).unwrap(),
        ),
        other => panic!("{url}: expected an HTTP error, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn the_terminal_runs_as_the_asked_user() {
    let d = Daemon::start().await;
    let id = default_sandbox(&d).await;
    let cmd = "cmd=echo%20id=$(id%20-u):$(id%20-g)%20home=$HOME%20pwd=$(pwd)%20tty=$(stat%20-c%20%25u%20$(tty))";
    let (out, code) = terminal(&d, &id, &format!("user=user&{cmd}")).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("id=1000:1000 home=/home/user pwd=/home/user tty=1000"),
        "{out:?}"
    );
    let (out, _) = terminal(&d, &id, &format!("username=1000&{cmd}")).await;
    assert!(out.contains("id=1000:1000 home=/home/user"), "{out:?}");
    // The login shell (no cmd) as the user: its prompt, then `id -u`.
    let url = format!(
        "ws://127.0.0.1:{}/v1/sandboxes/{id}/ws?token={TOKEN}&user=user",
        d.port
    );
    let mut ws: Ws = connect_async(url).await.expect("websocket").0;
    futures_util::SinkExt::send(
        &mut ws,
        Message::Binary(b"echo uid=$(id -u)\nexit\n".to_vec().into()),
    )
    .await
    .unwrap();
    let mut out = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !out.contains("uid=1000") {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => out.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(_))) => {}
            other => panic!("no uid=1000 from the login shell ({other:?}): {out:?}"),
        }
    }
    drop(ws);
    // Root by default.
    let (out, _) = terminal(&d, &id, cmd).await;
    assert!(out.contains("id=0:0 home=/root pwd=/root"), "{out:?}");
    // Unknown and malformed: refused before the upgrade, naming `user`.
    for q in ["user=nosuchuser", "user=a%20b", "user="] {
        let (status, v) = ws_refused(&d, &id, q).await;
        assert_eq!(
            (status, &v["error"]["field"]),
            (400, &json!("user")),
            "{q}: {v}"
        );
    }
    d.destroy(&id).await;
}

/// A busybox image whose config says `User: 1000`, with that user in its
/// /etc/passwd and a home it owns.
fn image_with_user(reg: &Registry, work: &std::path::Path, name: &str) {
    let root = work.join(format!("rootfs-{name}"));
    for d in [
        "bin", "etc", "tmp", "root", "proc", "dev", "sys", "home/app",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    for applet in ["sh", "echo", "id", "pwd", "touch", "test", "cat", "sleep"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
    std::os::unix::fs::chown(root.join("home/app"), Some(1000), Some(1000)).unwrap();
    std::fs::set_permissions(
        root.join("root"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let base = layer_from_dir(&root);
    push_image(
        reg,
        work,
        name,
        "amd64",
        &[&base],
        json!({"Env": ["PATH=/bin"], "User": "1000"}),
    );
}

#[tokio::test]
async fn a_template_whose_image_names_a_user_runs_as_it_by_default() {
    let reg = Registry::start(false);
    let work = tempfile::tempdir().unwrap();
    image_with_user(&reg, work.path(), "appuser");
    let d = Daemon::start().await;
    let image = format!("{}/test/appuser:latest", reg.host());
    let (s, t) = d
        .call(
            Method::POST,
            "/v1/templates",
            Some(json!({"name": "appuser", "image": image})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    let tid = t["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (_, t) = d
            .call(Method::GET, &format!("/v1/templates/{tid}"), None)
            .await;
        if t["status"] != "building" {
            assert_eq!(t["status"], "ready", "{t}");
            break;
        }
        assert!(Instant::now() < deadline, "still building: {t}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (s, sb) = d
        .call(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"template": "appuser", "isolation": sandforge_tests::isolation()})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{sb}\n{}", d.log());
    let id = sb["id"].as_str().unwrap().to_string();

    // The image's user by default: its uid, its home, and not root's rights.
    let (s, v) = d
        .execute(
            &id,
            json!({"command": "id -u; id -g; echo $HOME; pwd; touch /root/x"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["stdout"], "1000\n1000\n/home/app\n/home/app\n", "{v}");
    assert_ne!(v["exit_code"], 0, "{v}");
    // `root` (and uid 0) override it.
    for user in [json!("root"), json!(0)] {
        let (s, v) = d
            .execute(
                &id,
                json!({"command": "id -u; touch /root/x", "user": user}),
            )
            .await;
        assert_eq!(
            (s, &v["stdout"], &v["exit_code"]),
            (StatusCode::OK, &json!("0\n"), &json!(0)),
            "{v}"
        );
    }
    // The terminal too.
    let (out, code) = terminal(&d, &id, "cmd=echo%20uid=$(id%20-u)").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("uid=1000"), "{out:?}");
    let (out, _) = terminal(&d, &id, "user=root&cmd=echo%20uid=$(id%20-u)").await;
    assert!(out.contains("uid=0"), "{out:?}");
    d.destroy(&id).await;
}
