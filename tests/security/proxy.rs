//! Sandbox pages on the API origin (issue 11, item 6): a hostile web
//! server inside a sandbox, reached through `/sandboxes/{id}/proxy/{port}/`
//! on the API listener, tries to learn the caller's token (from the
//! forwarded URL, a `Referer` that carries it, the browser's cookies for
//! the API host) and to plant a cookie on the API origin, and its HTML must
//! be confined by `Content-Security-Policy: sandbox` (an opaque origin:
//! no access to the API origin's storage or cookies). The server echoes
//! everything it received (target and headers) and sets a cookie.

use reqwest::{Method, StatusCode};
use sandforge_tests::{Attempts, Daemon, TOKEN};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Echoes the request target and headers as JSON, as an HTML page that
/// sets a cookie.
const ECHO: &str = r#"import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"target": self.path, "headers": dict(self.headers.items())}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Set-Cookie", "planted=1; Path=/")
        self.send_header("Set-Cookie", "session=evil; Path=/; HttpOnly")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", 8123), H).serve_forever()
"#;

async fn serve(d: &Daemon, id: &str) {
    let r = d
        .req(
            Method::PUT,
            &format!("/v1/sandboxes/{id}/files?path=/srv/echo.py"),
        )
        .body(ECHO)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    d.sh_ok(id, "cd /srv && (nohup python3 echo.py >/dev/null 2>&1 &)")
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = d
            .req(Method::GET, &format!("/v1/sandboxes/{id}/proxy/8123/"))
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::OK {
            return;
        }
        assert!(Instant::now() < deadline, "echo server never answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether the request carries the bearer header (else `?token=`), the
/// path and query after the port, extra request headers, and the target
/// the sandbox must see.
type Case<'a> = (bool, String, Vec<(&'a str, String)>, &'a str);

#[tokio::test]
async fn sandbox_pages_on_the_api_origin_are_confined() {
    let d = Daemon::start().await;
    let id = d
        .create_id(super::with_iso(json!({"network": "offline"})))
        .await;
    serve(&d, &id).await;
    let mut a = Attempts::new("proxied pages on the API origin");

    let referer = format!("{}/v1/sandboxes/{id}/proxy/8123/?token={TOKEN}", d.url);
    let cases: Vec<Case> = vec![
        (
            false,
            format!("echo?a=1&token={TOKEN}&b=2"),
            vec![],
            "/echo?a=1&b=2",
        ),
        (
            false,
            format!("x?token={TOKEN}&token={TOKEN}"),
            vec![],
            "/x",
        ),
        (
            false,
            format!("page?token={TOKEN}"),
            vec![
                ("referer", referer.clone()),
                ("cookie", format!("api_session={TOKEN}")),
            ],
            "/page",
        ),
        (
            true,
            "deep/page?q=%20z".into(),
            vec![
                ("referer", referer.clone()),
                ("cookie", format!("api_session={TOKEN}")),
            ],
            "/deep/page?q=%20z",
        ),
    ];
    for prefix in ["/v1", ""] {
        for (bearer, rest, headers, want) in &cases {
            let path = format!("{prefix}/sandboxes/{id}/proxy/8123/{rest}");
            let url = format!("{}{path}", d.url);
            let mut rb = if *bearer {
                d.req(Method::GET, &path)
            } else {
                d.http.get(&url)
            };
            for (k, v) in headers {
                rb = rb.header(*k, v);
            }
            let r = rb.send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            let h = r.headers().clone();
            let text = r.text().await.unwrap();
            let seen: Value = serde_json::from_str(&text).unwrap();

            a.record(
                !text.contains(TOKEN),
                format!("{path}: the sandbox saw the token: {text}"),
            );
            a.record(
                seen["target"] == *want,
                format!(
                    "{path}: the sandbox got target {}, not {want}",
                    seen["target"]
                ),
            );
            a.record(
                !text.to_ascii_lowercase().contains("api_session"),
                format!("{path}: the API origin's cookies reached the sandbox: {text}"),
            );
            let set_cookie: Vec<_> = h.get_all("set-cookie").iter().collect();
            a.record(
                set_cookie.is_empty(),
                format!("{path}: Set-Cookie reached the client: {set_cookie:?}"),
            );
            let csp: Vec<String> = h
                .get_all("content-security-policy")
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect();
            a.record(
                csp.iter().any(|c| {
                    let d: Vec<&str> = c.split_whitespace().collect();
                    d.first() == Some(&"sandbox") && !d.contains(&"allow-same-origin")
                }),
                format!("{path}: no opaque-origin CSP sandbox: {csp:?}"),
            );
            if !*bearer {
                // The page's own URL holds the token: no script may read it.
                a.record(
                    csp.iter().any(|c| {
                        c.starts_with("sandbox")
                            && !c.split_whitespace().any(|d| d == "allow-scripts")
                    }),
                    format!("{path}: scripts may run in a page whose URL holds the token: {csp:?}"),
                );
            }
            a.record(
                h.get("x-content-type-options")
                    .is_some_and(|v| v == "nosniff"),
                format!("{path}: no X-Content-Type-Options: nosniff"),
            );
            a.record(
                h.get("referrer-policy").is_some_and(|v| v == "no-referrer"),
                format!("{path}: no Referrer-Policy: no-referrer"),
            );
        }
    }

    // The publish listener is the sandbox's own origin (one host name per
    // alias): its cookies are its own and pass unchanged.
    let (s, v) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/publish"),
            Some(json!({"port": 8123, "alias": "cookie-jar"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let r = d
        .http
        .get(format!("http://127.0.0.1:{}/p?token=kept", d.publish_port))
        .header("host", "cookie-jar.sandforge.localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers().get_all("set-cookie").iter().count(), 2);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["target"], "/p?token=kept");

    d.destroy(&id).await;
    a.finish();
}
