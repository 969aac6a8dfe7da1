//! Exec tests: output frames, exit codes, timeouts, cancellation, concurrency.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn exec_basics() {
    let h = start().await;
    let r = h
        .exec(json!({"argv": ["echo", "hello", "world"], "timeout_ms": 10000}))
        .await;
    assert_eq!(r.out(), "hello world\n");
    assert_eq!(
        r.exit(),
        &ExitStatus {
            exit_code: 0,
            signal: None,
            timed_out: false,
            error: None
        }
    );

    let r = h
        .exec(json!({"argv": ["sh", "-c", "exit 3"], "timeout_ms": 10000}))
        .await;
    assert_eq!(r.exit().exit_code, 3);

    let r = h
        .exec(json!({"argv": ["sh", "-c", "echo oops >&2"], "timeout_ms": 10000}))
        .await;
    assert_eq!(
        (r.stdout.as_slice(), r.stderr.as_slice()),
        (&b""[..], &b"oops\n"[..])
    );

    let r = h
        .exec(json!({"argv": ["sh", "-c", "kill -TERM $$"], "timeout_ms": 10000}))
        .await;
    assert_eq!((r.exit().exit_code, r.exit().signal), (143, Some(15)));

    let r = h
        .exec(json!({
            "argv": ["sh", "-c", "echo \"$HOME|$FOO|$LANG|$PATH\"; pwd"],
            "env": {"FOO": "bar", "LANG": "C"},
            "cwd": "/tmp",
            "timeout_ms": 10000,
        }))
        .await;
    let path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    assert_eq!(r.out(), format!("/root|bar|C|{path}\n/tmp\n"));

    // The whole environment is replaced, not inherited from the agent.
    let r = h.exec(json!({"argv": ["env"], "timeout_ms": 10000})).await;
    let mut vars: Vec<_> = r
        .out()
        .lines()
        .map(|l| l.split('=').next().unwrap().to_string())
        .collect();
    vars.sort();
    assert_eq!(vars, ["HOME", "LANG", "PATH", "TERM"]);

    let r = h
        .exec(json!({"argv": ["cat"], "stdin": "from stdin", "timeout_ms": 10000}))
        .await;
    assert_eq!(r.out(), "from stdin");
    // Without stdin the command reads /dev/null (no hang).
    let r = h.exec(json!({"argv": ["cat"], "timeout_ms": 10000})).await;
    assert_eq!((r.out().as_str(), r.exit().exit_code), ("", 0));

    // Own session and process group; OOM score reset to 0.
    let r = h
        .exec(json!({"argv": ["sh", "-c", "cut -d' ' -f5,6 /proc/$$/stat; echo $$; cat /proc/self/oom_score_adj"], "timeout_ms": 10000}))
        .await;
    let out = r.out();
    let lines: Vec<&str> = out.lines().collect();
    let ids: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        ids,
        [lines[1], lines[1]],
        "sid and pgid are the shell's pid: {out}"
    );
    assert_eq!(lines[2], "500");

    let r = h
        .exec(json!({"argv": ["/no/such/program"], "timeout_ms": 10000}))
        .await;
    assert_eq!(r.exit().exit_code, 127);
    assert!(r.exit().error.is_some());
    assert!(String::from_utf8_lossy(&r.stderr).contains("/no/such/program"));
    let r = h
        .exec(json!({"argv": ["true"], "cwd": "/no/such/dir", "timeout_ms": 10000}))
        .await;
    assert_eq!(r.exit().exit_code, 127);

    // Large output arrives complete, in chunks of at most 64 KiB.
    let r = h
        .exec(json!({"argv": ["head", "-c", "3000000", "/dev/zero"], "timeout_ms": 10000}))
        .await;
    assert_eq!(r.stdout.len(), 3_000_000);
    assert!(r.largest_chunk <= 64 * 1024, "chunk of {}", r.largest_chunk);
    assert_eq!(r.exit().exit_code, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_timeout_kills_the_group() {
    let h = start().await;
    let t = Instant::now();
    let r = h
        .exec(json!({"argv": ["sleep", "30"], "timeout_ms": 300}))
        .await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(
        r.exit(),
        &ExitStatus {
            exit_code: 137,
            signal: Some(9),
            timed_out: true,
            error: None
        }
    );

    // Children of the command die with it.
    let r = h
        .exec(json!({"argv": ["sh", "-c", "sleep 30 & echo $!; wait"], "timeout_ms": 500}))
        .await;
    assert!(r.exit().timed_out);
    let pid: u32 = r.out().trim().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !alive(pid),
        "background child of a timed-out command survived"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_background_process_does_not_hang() {
    let h = start().await;
    let t = Instant::now();
    let r = h
        .exec(json!({"argv": ["sh", "-c", "sleep 100 & echo $!"], "timeout_ms": 10000}))
        .await;
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(r.exit().exit_code, 0);
    assert!(!r.exit().timed_out);
    let pid: u32 = r.out().trim().parse().unwrap();
    assert!(alive(pid), "the background process must not be killed");
    let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_concurrent() {
    let h = start().await;
    let t = Instant::now();
    let runs = (0..10).map(|i| {
        let h = &h;
        async move {
            let cmd = format!("sleep 0.5; echo {i}");
            let r = h
                .exec(json!({"argv": ["sh", "-c", cmd], "timeout_ms": 10000}))
                .await;
            (i, r)
        }
    });
    for (i, r) in futures_util::future::join_all(runs).await {
        assert_eq!(r.out(), format!("{i}\n"));
        assert_eq!(r.exit().exit_code, 0);
    }
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "not concurrent: {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_cancel_kills_the_group() {
    let h = start().await;
    let req = json!({"argv": ["sh", "-c", "echo $$; sleep 30; echo done"], "timeout_ms": 60000});
    let resp = h
        .send(Method::POST, "/v1/exec", full(req.to_string()))
        .await;
    let mut body = resp.into_body();
    let mut dec = FrameDecoder::new();
    let pid: u32 = loop {
        let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
        dec.push(&data);
        if let Some(Frame::Stdout(b)) = dec.next_frame().unwrap() {
            break String::from_utf8_lossy(&b).trim().parse().unwrap();
        }
    };
    assert!(alive(pid));
    drop(body); // RST_STREAM
    let deadline = Instant::now() + Duration::from_secs(3);
    while alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!alive(pid), "cancelled command still running");
    // The connection is still usable.
    let r = h.exec(json!({"argv": ["true"], "timeout_ms": 10000})).await;
    assert_eq!(r.exit().exit_code, 0);
}

/// Many spawns that fail in `exec` (std then waits for the child itself)
/// racing with many exits: exercises the reaper's spawn gate.
#[tokio::test(flavor = "multi_thread")]
async fn exec_stress_mixed_failures() {
    let h = start().await;
    let runs = (0..120).map(|i| {
        let h = &h;
        async move {
            let argv = if i % 2 == 0 {
                json!(["/no/such/program"])
            } else {
                json!(["true"])
            };
            (i, h.exec(json!({"argv": argv, "timeout_ms": 20000})).await)
        }
    });
    for (i, r) in futures_util::future::join_all(runs).await {
        assert_eq!(
            r.exit().exit_code,
            if i % 2 == 0 { 127 } else { 0 },
            "run {i}"
        );
    }
    let resp = h.send(Method::GET, "/v1/info", empty()).await;
    assert_eq!(resp.status(), StatusCode::OK, "agent survived");
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_as_a_user() {
    let h = start().await;
    let probe = "id -u; id -g; id -G; echo \"$HOME|${USER-}|${LOGNAME-}\"; pwd";
    // The host's `nobody` (the agent reads the /etc/passwd of its root):
    // its home does not exist, so the command starts in /.
    let r = h
        .exec(json!({"argv": ["sh", "-c", probe], "user": "nobody", "timeout_ms": 10000}))
        .await;
    assert_eq!(
        r.out(),
        "65534\n65534\n65534\n/nonexistent|nobody|nobody\n/\n",
        "{:?}",
        r.exit()
    );
    // A uid without an entry: gid = uid, HOME=/.
    let r = h
        .exec(json!({"argv": ["sh", "-c", probe], "user": "4242", "timeout_ms": 10000}))
        .await;
    assert_eq!(r.out(), "4242\n4242\n4242\n/||\n/\n");
    // It cannot get root back.
    let r = h
        .exec(
            json!({"argv": ["sh", "-c", "touch /root/.sf-x"], "user": "4242", "timeout_ms": 10000}),
        )
        .await;
    assert_ne!(r.exit().exit_code, 0);
    // Unknown: refused before anything starts.
    for user in [
        "sandforge-no-such-user",
        "nobody:sandforge-no-such-group",
        "a b",
    ] {
        let resp = h
            .send(
                Method::POST,
                "/v1/exec",
                full(json!({"argv": ["true"], "user": user, "timeout_ms": 1000}).to_string()),
            )
            .await;
        assert_eq!(
            error_of(resp).await,
            (StatusCode::BAD_REQUEST, "unknown_user".to_string()),
            "{user}"
        );
    }
}
