//! Terminals through the real API with a real WebSocket client, on the
//! backend the run targets: resize then `stty size`, a python3 REPL driven
//! by keystrokes, detach and re-attach with the scrollback, Ctrl-C, the
//! exit code on close, the `init` session, a stalled client that must not
//! hold up anything else, and the errors before the upgrade.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use sandforge_tests::{Daemon, TOKEN};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(d: &Daemon, id: &str, query: &str) -> Ws {
    let url = format!(
        "ws://127.0.0.1:{}/v1/sandboxes/{id}/ws?token={TOKEN}&{query}",
        d.port
    );
    connect_async(url).await.expect("websocket").0
}

/// Read terminal output until it contains `needle` (30 s), returning all
/// of it. Panics on close or exit before that.
async fn read_until(ws: &mut Ws, needle: &str) -> String {
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in terminal output: {seen:?}"));
        match msg {
            Some(Ok(Message::Binary(b))) => seen.push_str(&String::from_utf8_lossy(&b)),
            Some(Ok(Message::Text(t))) => {
                panic!("unexpected {t} while waiting for {needle:?}: {seen:?}")
            }
            other => panic!("socket ended ({other:?}) while waiting for {needle:?}: {seen:?}"),
        }
    }
    seen
}

async fn keys(ws: &mut Ws, s: &str) {
    ws.send(Message::Binary(s.as_bytes().to_vec().into()))
        .await
        .unwrap();
}

/// Read to the exit message and the close frame: (exit code, close reason).
async fn read_exit(ws: &mut Ws) -> (i64, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut code = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next())
            .await
            .expect("no exit")
        {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(v["type"], "exit", "{v}");
                code = v["exit_code"].as_i64();
            }
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(f.code, CloseCode::Normal);
                return (
                    code.expect("exit message before close"),
                    f.reason.to_string(),
                );
            }
            Some(Ok(_)) => {}
            other => panic!("socket ended without a close frame: {other:?}"),
        }
    }
}

async fn sessions(d: &Daemon, id: &str) -> Vec<Value> {
    let (s, v) = d
        .call(Method::GET, &format!("/v1/sandboxes/{id}/sessions"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v.as_array().unwrap().clone()
}

async fn session(d: &Daemon, id: &str, sid: &str) -> Value {
    sessions(d, id)
        .await
        .into_iter()
        .find(|s| s["session_id"] == sid)
        .unwrap_or_else(|| panic!("no session {sid}"))
}

#[tokio::test]
async fn a_terminal_resizes_runs_a_repl_detaches_and_reattaches() {
    let d = Daemon::start().await;
    let id = d.create_id(json!({})).await;
    let mut ws = open(&d, &id, "rows=24&cols=80").await;
    ws.send(Message::Text(
        r#"{"type":"resize","rows":40,"cols":100}"#.into(),
    ))
    .await
    .unwrap();
    keys(&mut ws, "stty size\r").await;
    read_until(&mut ws, "40 100").await;

    keys(&mut ws, "python3 -q\r").await;
    read_until(&mut ws, ">>> ").await;
    keys(&mut ws, "6*7\r").await;
    read_until(&mut ws, "42").await;
    keys(&mut ws, "exit()\r").await;
    keys(&mut ws, "echo back-in-$((40+2))-shell\r").await;
    read_until(&mut ws, "back-in-42-shell").await;

    let list = sessions(&d, &id).await;
    assert_eq!(list.len(), 1, "{list:?}");
    let sid = list[0]["session_id"].as_str().unwrap().to_string();
    assert_eq!(list[0]["tty"], true);
    assert_eq!(list[0]["running"], true);
    assert_eq!(list[0]["attached"], true);
    assert!(list[0]["created_at"].as_u64().unwrap() > 1_700_000_000);

    // Drop the socket: the session lives on, detached.
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(10);
    while session(&d, &id, &sid).await["attached"] != false {
        assert!(
            Instant::now() < deadline,
            "still attached after the socket closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(session(&d, &id, &sid).await["running"], true);

    // Re-attach: the earlier output comes first, then it is live again.
    let mut ws = open(&d, &id, &format!("session={sid}")).await;
    let replay = read_until(&mut ws, "back-in-42-shell").await;
    assert!(
        replay.contains("40 100") && replay.contains("42"),
        "{replay:?}"
    );
    keys(&mut ws, "sleep 1000\r").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    keys(&mut ws, "\x03").await; // Ctrl-C reaches the foreground job
    keys(&mut ws, "echo interrupted-$?\r").await;
    read_until(&mut ws, "interrupted-130").await;
    keys(&mut ws, "exit 3\r").await;
    let (code, reason) = read_exit(&mut ws).await;
    assert_eq!((code, reason.as_str()), (3, "exit 3"));
    let s = session(&d, &id, &sid).await;
    assert_eq!(
        (s["running"].clone(), s["exit_code"].clone()),
        (json!(false), json!(3))
    );
    d.destroy(&id).await;
}

#[tokio::test]
async fn init_runs_as_an_attachable_session_and_errors_come_before_the_upgrade() {
    let d = Daemon::start().await;
    let sb = d
        .create(json!({"init": "echo init-ran; exec sleep 600"}))
        .await;
    let id = sb["id"].as_str().unwrap();
    let init = session(&d, id, "init").await;
    assert_eq!(init["running"], true, "{init}");
    assert!(init["argv"].as_str().unwrap().contains("echo init-ran"));
    let mut ws = open(&d, id, "session=init").await;
    read_until(&mut ws, "init-ran").await;
    drop(ws);

    // A command of our own, with env and cwd, and its exit code.
    let mut ws = open(
        &d,
        id,
        "cmd=echo%20$GREETING%20from%20$(pwd);%20exit%207&env=GREETING=hello&cwd=/tmp",
    )
    .await;
    read_until(&mut ws, "hello from /tmp").await;
    assert_eq!(read_exit(&mut ws).await.0, 7);

    // Refused before any upgrade, with a JSON error naming the problem.
    let base = format!("ws://127.0.0.1:{}/v1/sandboxes/{id}/ws", d.port);
    for (url, status, field) in [
        (
            format!("{base}?token={TOKEN}&session=nope"),
            404,
            Some("session"),
        ),
        (format!("{base}?token={TOKEN}&rows=0"), 400, Some("rows")),
        (
            format!("{base}?token={TOKEN}&frobnicate=1"),
            400,
            Some("frobnicate"),
        ),
        (format!("{base}?token=wrong"), 401, None),
        (base.clone(), 401, None),
    ] {
        match connect_async(&url).await {
            Err(tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), status, "{url}");
                let body: Value =
                    serde_json::from_slice(resp.body().as_deref().unwrap_or(b"{}")).unwrap();
                if let Some(f) = field {
                    assert_eq!(body["error"]["field"], f, "{url}: {body}");
                }
            }
            other => panic!("{url}: expected an HTTP error, got {:?}", other.map(|_| ())),
        }
    }
    // Not a WebSocket request at all.
    let (s, v) = d
        .call(Method::GET, &format!("/v1/sandboxes/{id}/ws"), None)
        .await;
    assert_eq!(s, StatusCode::UPGRADE_REQUIRED, "{v}");
    d.destroy(id).await;
}

#[tokio::test]
async fn a_stalled_client_holds_up_nothing_else() {
    let d = Daemon::start().await;
    let id = d.create_id(json!({})).await;
    // A flood nobody reads: `yes` into a socket we never read from.
    let mut flood = open(&d, &id, "cmd=yes%20sandforge-flood").await;
    // Other terminals and plain exec stay prompt meanwhile.
    let mut others = vec![];
    for i in 0..3 {
        let mut ws = open(&d, &id, "").await;
        keys(&mut ws, &format!("echo term-$((100+{i}))\r")).await;
        read_until(&mut ws, &format!("term-{}", 100 + i)).await;
        others.push(ws);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(d.sh_ok(&id, "echo alive").await, "alive\n");
    // The agent's memory stays bounded however much the flood produced.
    let rss: u64 = d
        .sh_ok(&id, "awk '/VmRSS/ {print $2}' /proc/1/status")
        .await
        .trim()
        .parse()
        .unwrap();
    assert!(rss < 64 * 1024, "agent RSS {rss} kB under a stalled client");
    // The flood's socket still works once read: Ctrl-C ends it (130).
    keys(&mut flood, "\x03").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        assert!(Instant::now() < deadline, "flood did not end");
        match tokio::time::timeout(Duration::from_secs(30), flood.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                break v["exit_code"].as_i64().unwrap();
            }
            Some(Ok(_)) => {}
            other => panic!("flood socket ended: {other:?}"),
        }
    };
    assert_eq!(code, 130);
    let running = sessions(&d, &id)
        .await
        .iter()
        .filter(|s| s["running"] == true)
        .count();
    assert_eq!(running, 3);
    d.destroy(&id).await;
}
