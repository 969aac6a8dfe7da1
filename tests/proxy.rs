//! Ports, proxy and publish through the real API, on the backend the run
//! targets, with an offline sandbox (so all of it goes through the agent
//! channel, not a network): a python3 web server and a WebSocket echo
//! server inside, reached through `/proxy/{port}/...` with auth and
//! through the publish listener by `Host` without, plus the publish rules'
//! lifecycle and errors.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use sandforge_tests::{Daemon, TOKEN};
use serde_json::{json, Value};
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket echo server on 127.0.0.1:8765 with only python3's standard
/// library (the template has no pip packages): answers `echo:<message>`.
const WS_ECHO: &str = r#"import asyncio, base64, hashlib, struct
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
async def handle(r, w):
    head = await r.readuntil(b"\r\n\r\n")
    key = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key")][0]
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    await w.drain()
    while True:
        h = await r.readexactly(2)
        op, n = h[0] & 0x0F, h[1] & 0x7F
        if n == 126:
            n = struct.unpack(">H", await r.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", await r.readexactly(8))[0]
        mask = await r.readexactly(4)
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(await r.readexactly(n)))
        if op == 8:
            w.write(b"\x88\x00")
            await w.drain()
            break
        data = b"echo:" + data
        n = len(data)
        head = bytes([0x80 | op]) + (bytes([n]) if n < 126 else bytes([126]) + struct.pack(">H", n))
        w.write(head + data)
        await w.drain()
    w.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 8765)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"#;

async fn put(d: &Daemon, id: &str, path: &str, body: &str) {
    let r = d
        .req(
            Method::PUT,
            &format!("/v1/sandboxes/{id}/files?path={path}"),
        )
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
}

/// Start the two servers and wait until the agent lists both ports.
async fn serve(d: &Daemon, id: &str) {
    put(d, id, "/srv/hello.txt", "hello through the tunnel\n").await;
    put(d, id, "/srv/ws_echo.py", WS_ECHO).await;
    d.sh_ok(
        id,
        "cd /srv && (nohup python3 -m http.server 8000 >/dev/null 2>&1 &) && (nohup python3 ws_echo.py >/dev/null 2>&1 &)",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, v) = d
            .call(Method::GET, &format!("/v1/sandboxes/{id}/ports"), None)
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let ports: Vec<u64> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["container_port"].as_u64().unwrap())
            .collect();
        if ports.contains(&8000) && ports.contains(&8765) {
            let p = v
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["container_port"] == 8000)
                .unwrap();
            assert_eq!(p["proxy_url"], format!("/sandboxes/{id}/proxy/8000/"));
            return;
        }
        assert!(Instant::now() < deadline, "ports never listed: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Send `text` over a WebSocket opened with `req`; the echo.
async fn echo(
    req: tokio_tungstenite::tungstenite::handshake::client::Request,
    text: &str,
) -> String {
    let (mut ws, _) = connect_async(req)
        .await
        .expect("websocket through the tunnel");
    ws.send(Message::Text(text.into())).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("no echo")
        {
            Some(Ok(Message::Text(t))) => return t.to_string(),
            Some(Ok(_)) => {}
            other => panic!("websocket ended: {other:?}"),
        }
    }
}

#[tokio::test]
async fn proxy_and_publish_reach_servers_inside_an_offline_sandbox() {
    let d = Daemon::start().await;
    let id = d
        .create_id(json!({"network": "offline", "name": "web-box"}))
        .await;
    serve(&d, &id).await;
    let (_, all) = d.call(Method::GET, "/v1/ports", None).await;
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .any(|p| p["sandbox_id"] == id.as_str() && p["container_port"] == 8000),
        "{all}"
    );

    // HTTP through the proxy (auth required; the caller's token is not
    // passed on), and its errors.
    let r = d
        .req(
            Method::GET,
            &format!("/v1/sandboxes/{id}/proxy/8000/hello.txt"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap(), "hello through the tunnel\n");
    let r = d
        .http
        .get(format!("{}/v1/sandboxes/{id}/proxy/8000/hello.txt", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (s, v) = d
        .call(Method::GET, &format!("/v1/sandboxes/{id}/proxy/9/"), None)
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_GATEWAY, Some("connection_refused")),
        "{v}"
    );
    let (s, v) = d
        .call(
            Method::GET,
            &format!("/v1/sandboxes/{id}/proxy/99999/"),
            None,
        )
        .await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("port")),
        "{v}"
    );

    // A WebSocket through the proxy.
    let mut req = format!("ws://127.0.0.1:{}/v1/sandboxes/{id}/proxy/8765/", d.port)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    assert_eq!(echo(req, "ping").await, "echo:ping");

    // Publish: a generated alias, served without auth by Host.
    let (s, web) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/publish"),
            Some(json!({"port": 8000})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{web}");
    let alias = web["alias"].as_str().unwrap().to_string();
    assert!(
        alias.starts_with("web-box-") && alias.len() == "web-box-".len() + 6,
        "{web}"
    );
    assert!(web["id"].as_str().unwrap().starts_with("pub_"));
    assert_eq!(web["sandbox_id"], id.as_str());
    assert_eq!(
        web["url"],
        format!("http://{alias}.sandforge.localhost:{}", d.publish_port)
    );
    let public = |host: String, path: &str| {
        d.http
            .get(format!("http://127.0.0.1:{}{path}", d.publish_port))
            .header("host", host)
            .send()
    };
    let r = public(format!("{alias}.sandforge.localhost"), "/hello.txt")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap(), "hello through the tunnel\n");

    // A chosen alias, and a WebSocket through the publish listener.
    let (s, v) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/publish"),
            Some(json!({"port": 8765, "alias": "echo-app"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let mut req = format!("ws://127.0.0.1:{}/", d.publish_port)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("host", "echo-app.sandforge.localhost".parse().unwrap());
    assert_eq!(echo(req, "hi").await, "echo:hi");

    // Rules are validated and unique.
    for (body, status, field) in [
        (json!({"port": 8000}), StatusCode::CONFLICT, "port"),
        (
            json!({"port": 9000, "alias": "echo-app"}),
            StatusCode::CONFLICT,
            "alias",
        ),
        (
            json!({"port": 9000, "alias": "Bad!"}),
            StatusCode::BAD_REQUEST,
            "alias",
        ),
        (json!({"port": 0}), StatusCode::BAD_REQUEST, "port"),
        (json!({"port": 70000}), StatusCode::BAD_REQUEST, "port"),
    ] {
        let (s, v) = d
            .call(
                Method::POST,
                &format!("/v1/sandboxes/{id}/publish"),
                Some(body.clone()),
            )
            .await;
        assert_eq!(
            (s, v["error"]["field"].as_str()),
            (status, Some(field)),
            "{body}: {v}"
        );
    }
    let (_, list) = d
        .call(Method::GET, &format!("/v1/sandboxes/{id}/publish"), None)
        .await;
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");

    // Unpublish, and destroy: the hosts stop answering.
    let (s, _) = d
        .call(
            Method::DELETE,
            &format!("/v1/sandboxes/{id}/publish/8000"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = d
        .call(
            Method::DELETE,
            &format!("/v1/sandboxes/{id}/publish/8000"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let r = public(format!("{alias}.sandforge.localhost"), "/hello.txt")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    d.destroy(&id).await;
    let r = public("echo-app.sandforge.localhost".into(), "/")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
}
