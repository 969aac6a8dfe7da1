//! Item 13 of issue 11: races found by reading the code. Each test makes
//! the two sides meet as often as it can and checks that neither wins
//! wrongly: the thermal manager against a stream that is still flowing
//! (proxied and published requests keep the sandbox busy for their whole
//! life), concurrent terminal creates against the per-sandbox session
//! limit, keepalive against a PATCH (read-modify-write under the op lock),
//! and an ephemeral sandbox's clock (counted from `running`).

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use reqwest::{Method, StatusCode};
use sandforge_tests::{vm, Attempts, Daemon, TOKEN};
use serde_json::{json, Value};
use tokio_tungstenite::connect_async;

/// An HTTP server on 127.0.0.1:8001 whose answer trickles: a line every
/// 0.6 s for 6 s.
const TRICKLE: &str = r#"import http.server, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        for i in range(10):
            self.wfile.write(b"tick\n")
            self.wfile.flush()
            time.sleep(0.6)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", 8001), H).serve_forever()
"#;

async fn status(d: &Daemon, id: &str) -> String {
    let (s, v) = d
        .call(Method::GET, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["status"].as_str().unwrap_or("").to_string()
}

/// Read `resp` to its end, checking between chunks that the sandbox is
/// still running; false when a chunk stalls (the sandbox was paused) or the
/// status is not `running`.
async fn stream_stays_hot(
    d: &Daemon,
    id: &str,
    mut resp: reqwest::Response,
    what: &str,
) -> Result<(), String> {
    let mut ticks = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(4), resp.chunk()).await {
            Err(_) => return Err(format!("{what}: the stream stalled after {ticks} ticks")),
            Ok(Err(e)) => return Err(format!("{what}: {e}")),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(c))) => ticks += c.iter().filter(|b| **b == b'\n').count(),
        }
        let st = status(d, id).await;
        if st != "running" {
            return Err(format!(
                "{what}: {st} while its stream flows ({ticks} ticks)"
            ));
        }
    }
    if ticks == 10 {
        Ok(())
    } else {
        Err(format!("{what}: {ticks} of 10 ticks"))
    }
}

#[tokio::test]
async fn a_flowing_proxied_or_published_stream_keeps_the_sandbox_hot() {
    let d = Daemon::start_with_config(&[], "lifecycle_interval_ms: 200").await;
    let mut a = Attempts::new("races: thermal pause under a flowing stream");
    let id = d
        .create_id(json!({"mode": "persistent", "idle_timeout": "2s", "network": "offline"}))
        .await;
    d.put_file(&id, "/srv/trickle.py", TRICKLE).await;
    d.sh_ok(
        &id,
        "cd /srv && (nohup python3 trickle.py >/dev/null 2>&1 &)",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while d
        .sh(
            &id,
            "python3 -c \"import socket; socket.create_connection(('127.0.0.1', 8001), 1)\"",
        )
        .await["exit_code"]
        .as_i64()
        .is_none_or(|c| c != 0)
    {
        assert!(
            Instant::now() < deadline,
            "the trickle server never listened"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let resp = d
        .req(Method::GET, &format!("/v1/sandboxes/{id}/proxy/8001/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let r = stream_stays_hot(&d, &id, resp, "proxy").await;
    a.record(r.is_ok(), r.err().unwrap_or_default());

    let (s, web) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/publish"),
            Some(json!({"port": 8001})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{web}");
    let host = format!("{}.sandforge.localhost", web["alias"].as_str().unwrap());
    let resp = d
        .http
        .get(format!("http://127.0.0.1:{}/", d.publish_port))
        .header("host", host)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let r = stream_stays_hot(&d, &id, resp, "publish").await;
    a.record(r.is_ok(), r.err().unwrap_or_default());
    // Once nothing flows, it does go warm.
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&d, &id).await != "suspended" {
        assert!(Instant::now() < deadline, "never suspended when idle");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    d.destroy(&id).await;
    a.finish();
}

#[tokio::test]
async fn concurrent_terminals_never_run_past_the_session_limit() {
    const MAX_LIVE: usize = 32; // the agent's limit (crates/agent/src/sessions.rs)
    let d = Daemon::start().await;
    let mut a = Attempts::new("races: terminals beyond the session limit");
    let id = d.create_id(json!({"network": "offline"})).await;
    let url = format!(
        "ws://127.0.0.1:{}/v1/sandboxes/{id}/ws?token={TOKEN}&cmd=sleep%20600",
        d.port
    );
    let opens = join_all((0..48).map(|_| connect_async(url.clone()))).await;
    let mut sockets = vec![];
    for o in opens {
        match o {
            Ok((ws, _)) => sockets.push(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => a.record(
                r.status() == StatusCode::TOO_MANY_REQUESTS,
                format!("a refused terminal answered {}", r.status()),
            ),
            Err(e) => a.record(false, format!("a terminal failed oddly: {e}")),
        }
    }
    let (s, v) = d
        .call(Method::GET, &format!("/v1/sandboxes/{id}/sessions"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let running = v
        .as_array()
        .or_else(|| v["sessions"].as_array())
        .map_or(0, |l| l.iter().filter(|s| s["running"] == true).count());
    a.record(
        sockets.len() <= MAX_LIVE && running <= MAX_LIVE,
        format!(
            "{} terminals opened, {running} sessions running",
            sockets.len()
        ),
    );
    let sleepers: usize = d
        .sh_ok(&id, "ps -eo args | grep -c '^sleep 600' || true")
        .await
        .trim()
        .parse()
        .unwrap_or(0);
    a.record(
        sleepers <= MAX_LIVE,
        format!("{sleepers} session processes in the sandbox"),
    );
    assert!(!sockets.is_empty(), "no terminal opened at all");
    drop(sockets);
    d.destroy(&id).await;
    a.finish();
}

#[tokio::test]
async fn keepalive_and_patch_do_not_lose_each_others_write() {
    let d = Daemon::start().await;
    let mut a = Attempts::new("races: keepalive against PATCH");
    let id = d
        .create_id(json!({"mode": "ephemeral", "timeout": "10m", "network": "nat"}))
        .await;
    for round in 0..8u32 {
        let keep_hot = round % 2 == 0;
        let mode = if keep_hot { "allow_all" } else { "deny_all" };
        let (path, kpath) = (
            format!("/v1/sandboxes/{id}"),
            format!("/v1/sandboxes/{id}/keepalive"),
        );
        let patch = d.call(
            Method::PATCH,
            &path,
            Some(json!({"keep_hot": keep_hot, "egress": {"mode": mode}})),
        );
        let keep = d.call(
            Method::POST,
            &kpath,
            Some(json!({"timeout": format!("{}s", 3600 + round * 60)})),
        );
        let ((ps, pv), (ks, kv)) = tokio::join!(patch, keep);
        assert_eq!(ps, StatusCode::OK, "{pv}");
        assert_eq!(ks, StatusCode::OK, "{kv}");
        let (_, now) = d
            .call(Method::GET, &format!("/v1/sandboxes/{id}"), None)
            .await;
        a.record(
            now["expires_at"] == kv["expires_at"],
            format!(
                "round {round}: keepalive set {} but {} stuck",
                kv["expires_at"], now["expires_at"]
            ),
        );
        a.record(
            now["keep_hot"] == keep_hot,
            format!(
                "round {round}: PATCH set keep_hot {keep_hot} but {} stuck",
                now["keep_hot"]
            ),
        );
    }
    d.destroy(&id).await;
    a.finish();
}

/// Seconds since the epoch of an RFC 3339 UTC time (`...Z`).
fn epoch(t: &str) -> f64 {
    let p = |r: std::ops::Range<usize>| t[r].parse::<i64>().unwrap();
    let (y, m, dd) = (p(0..4), p(5..7), p(8..10));
    let (hh, mm) = (p(11..13), p(14..16));
    let ss: f64 = t[17..].trim_end_matches('Z').parse().unwrap();
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    (days * 86_400 + hh * 3600 + mm * 60) as f64 + ss
}

#[tokio::test]
async fn an_ephemeral_sandbox_counts_its_timeout_from_running() {
    let d = Daemon::start().await;
    let mut a = Attempts::new("races: ephemeral clock started before running");
    let sb: Value = d
        .create(json!({"mode": "ephemeral", "timeout": "10m", "network": "offline"}))
        .await;
    let id = sb["id"].as_str().unwrap().to_string();
    let (s, ev) = d
        .call(Method::GET, &format!("/v1/sandboxes/{id}/events"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{ev}");
    let list = ev
        .as_array()
        .or_else(|| ev["events"].as_array())
        .cloned()
        .unwrap_or_default();
    let running = list
        .iter()
        .find(|e| e["status"] == "running")
        .and_then(|e| e["at"].as_str())
        .map(epoch)
        .expect("a running event");
    let expires = epoch(sb["expires_at"].as_str().expect("expires_at"));
    let lead = expires - running - 600.0;
    // expires_at has whole seconds: within 1.5 s of running + timeout
    // (a VM boots for seconds under TCG, which must not count).
    a.record(
        lead.abs() <= 1.5,
        format!(
            "expires_at is running + timeout {lead:+.1} s ({})",
            if vm() { "microvm" } else { "container" }
        ),
    );
    d.destroy(&id).await;
    a.finish();
}
