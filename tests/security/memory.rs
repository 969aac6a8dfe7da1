//! Daemon memory under buffered execs (issue 11, item 10): many concurrent
//! `/execute` calls each print tens of MB while their clients read slowly
//! or not at all. With `exec_buffer_budget_mb` set, the daemon's peak
//! resident memory (VmHWM) stays within a bound derived from the budget,
//! and every call still gets a well-formed answer: 200 (its output
//! `truncated` when the budget ran out) or 429 `limit`, refused before the
//! command ran (and, once the budget is spent, a new call is refused
//! before its command runs).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use sandforge_tests::{vm, Attempts, Daemon, TOKEN};
use serde_json::{json, Value};

const BUDGET_MB: u64 = 64;

fn status_kb(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn buffered_execs_stay_within_the_output_budget() {
    let d = Daemon::start_with_config(&[], &format!("exec_buffer_budget_mb: {BUDGET_MB}")).await;
    let mut a = Attempts::new("buffered exec memory");
    let id = d.create_id(json!({"network": "offline"})).await;
    d.sh_ok(&id, "true").await;
    let pid = d.pid();
    let base = status_kb(pid, "VmRSS:");
    // Each command prints base64 of `mb` MB of zeros (4/3 as much).
    let (n, mb) = if vm() { (16, 8) } else { (40, 24) };
    let headers = Arc::new(AtomicUsize::new(0));
    let mut tasks = vec![];
    for i in 0..n {
        let (url, id, headers) = (d.url.clone(), id.clone(), headers.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(600))
                .build()
                .unwrap();
            let cmd = format!("head -c {mb}M /dev/zero | base64 -w 0; echo");
            let mut resp = http
                .post(format!("{url}/v1/sandboxes/{id}/execute"))
                .bearer_auth(TOKEN)
                .json(&json!({"command": cmd, "timeout_seconds": 280}))
                .send()
                .await
                .unwrap();
            headers.fetch_add(1, Ordering::SeqCst);
            let status = resp.status();
            // Half never read until every answer is waiting; half read
            // slowly.
            if i % 2 == 0 {
                while headers.load(Ordering::SeqCst) < n {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            let mut body = vec![];
            while let Some(c) = resp.chunk().await.unwrap() {
                body.extend_from_slice(&c);
                if i % 2 == 1 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            (status, v)
        }));
    }
    let mut answers = vec![];
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let peak = status_kb(pid, "VmHWM:");
    let rss = status_kb(pid, "VmRSS:");
    let (mut ok, mut truncated, mut refused) = (0, 0, 0);
    for (s, v) in &answers {
        let well_formed = if *s == StatusCode::OK {
            ok += 1;
            if v["truncated"] == true {
                truncated += 1;
            }
            v["exit_code"] == 0 && v["stdout"].is_string()
        } else {
            refused += 1;
            *s == StatusCode::TOO_MANY_REQUESTS && v["error"]["code"] == "limit"
        };
        a.record(well_formed, format!("an exec answered {s}: {v:.200}"));
    }
    println!(
        "{n} execs of {} MB output: {ok} answered ({truncated} truncated), {refused} refused; \
         daemon RSS {} MB before, peak {} MB, {} MB after (budget {BUDGET_MB} MB)",
        mb * 4 / 3,
        base / 1024,
        peak / 1024,
        rss / 1024
    );
    // The budget counts each buffered byte twice (the output, then its
    // JSON); allow the agent channel's windows and allocator slack.
    let bound_kb = base + 3 * BUDGET_MB * 1024 + 128 * 1024;
    a.record(
        peak <= bound_kb,
        format!(
            "peak RSS {} MB over the bound {} MB",
            peak / 1024,
            bound_kb / 1024
        ),
    );
    a.finish();
    d.destroy(&id).await;
}

/// A spent budget refuses a buffered exec before its command runs: two
/// execs that print far more than the budget and then sleep hold all of it,
/// and a third, whose command would leave a file behind, gets 429 `limit`
/// and leaves nothing.
#[tokio::test]
async fn a_spent_budget_refuses_execs_before_they_run() {
    let d = Daemon::start_with_config(&[], "exec_buffer_budget_mb: 16").await;
    let mut a = Attempts::new("buffered exec over a spent budget");
    let id = d.create_id(json!({"network": "offline"})).await;
    d.sh_ok(&id, "true").await;
    let mut fillers = vec![];
    for _ in 0..2 {
        let (url, id) = (d.url.clone(), id.clone());
        fillers.push(tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .post(format!("{url}/v1/sandboxes/{id}/execute"))
                .bearer_auth(TOKEN)
                .json(&json!({
                    "command": "head -c 12M /dev/zero | base64 -w 0; sleep 30",
                    "timeout_seconds": 120
                }))
                .send()
                .await
                .unwrap();
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }));
    }
    // Wait until the fillers hold the budget: a harmless exec is refused.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut spent = false;
    while !spent && tokio::time::Instant::now() < deadline {
        let (s, v) = d.execute(&id, json!({"command": "true"})).await;
        spent = s == StatusCode::TOO_MANY_REQUESTS;
        if !spent {
            assert_eq!(s, StatusCode::OK, "probe: {v}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    a.record(spent, "the fillers never spent the budget");
    let (s, v) = d
        .execute(&id, json!({"command": "echo ran > /tmp/refused-exec-ran"}))
        .await;
    a.record(
        s == StatusCode::TOO_MANY_REQUESTS
            && v["error"]["code"] == "limit"
            && v["error"]["field"].is_null(),
        format!("an exec over the spent budget answered {s}: {v}"),
    );
    for f in fillers {
        let (s, v) = f.await.unwrap();
        a.record(
            s == StatusCode::OK && v["exit_code"] == 0 && v["truncated"] == true,
            format!("a filler answered {s}: {v:.200}"),
        );
    }
    // The budget is free again; the refused command never ran.
    let ran = d
        .sh_ok(&id, "test -e /tmp/refused-exec-ran && echo ran || echo no")
        .await;
    a.record(ran.trim() == "no", "the refused exec's command ran");
    a.finish();
    d.destroy(&id).await;
}
