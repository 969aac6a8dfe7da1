//! Connection exhaustion (issue 11, item 9): a client opens hundreds of
//! TCP connections to the API and the publish listener and sends nothing,
//! trickles half a request head, or leaves a keep-alive connection idle.
//! With a small `max_connections` and `header_timeout_secs`, a normal API
//! request still gets through while they are held, the daemon's open
//! descriptors stay bounded by the cap, and the server closes every one of
//! the idle connections itself.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use sandforge_tests::{Attempts, Daemon};

const CAP: usize = 64;

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn idle_connections_cannot_exhaust_the_daemon() {
    let d = Daemon::start_with_config(
        &[],
        &format!("max_connections: {CAP}\nheader_timeout_secs: 2"),
    )
    .await;
    let mut a = Attempts::new("idle connections");
    let pid = d.pid();
    let before = fds(pid);

    let mut held: Vec<(TcpStream, &str)> = vec![];
    for (port, n) in [(d.port, 400), (d.publish_port, 100)] {
        for _ in 0..n {
            if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
                held.push((s, "silent"));
            }
        }
    }
    for _ in 0..20 {
        let mut s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
        let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ");
        held.push((s, "half a head"));
    }
    for _ in 0..10 {
        let mut s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
        let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
        held.push((s, "idle keep-alive"));
    }

    // While they are held, a normal client (a new connection each time) is
    // served.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let get = |path: &str| {
        fresh
            .request(Method::GET, format!("{}{path}", d.url))
            .bearer_auth(sandforge_tests::TOKEN)
            .send()
    };
    let r = get("/v1/sandboxes").await;
    a.record(
        r.as_ref().is_ok_and(|r| r.status() == StatusCode::OK),
        format!("a normal request got {r:?} with the idle connections open"),
    );
    let r = get("/health").await;
    a.record(
        r.as_ref().is_ok_and(|r| r.status() == StatusCode::OK),
        format!("health got {r:?}"),
    );
    let during = fds(pid);
    println!(
        "daemon descriptors: {before} before, {during} with {} connections held",
        held.len()
    );
    // Two listeners, each at most CAP connections.
    a.record(
        during <= before + 2 * CAP + 16,
        format!("{during} descriptors open (from {before}, cap {CAP} per listener)"),
    );

    // The server closes every one of them (safety net: 60 s).
    for (s, _) in &held {
        s.set_nonblocking(true).unwrap();
    }
    let mut open: Vec<(TcpStream, &str)> = held;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 4096];
    while !open.is_empty() && Instant::now() < deadline {
        open.retain_mut(|(s, _)| loop {
            match s.read(&mut buf) {
                Ok(0) => return false,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut kinds: Vec<&str> = open.iter().map(|(_, k)| *k).collect();
    kinds.dedup();
    a.record(
        open.is_empty(),
        format!("{} connections never closed ({kinds:?})", open.len()),
    );
    drop(open);
    let r = get("/health").await;
    a.record(
        r.as_ref().is_ok_and(|r| r.status() == StatusCode::OK),
        format!("health after: {r:?}"),
    );
    a.finish();
}
