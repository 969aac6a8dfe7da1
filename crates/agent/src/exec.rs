//! `POST /v1/exec`: run one command and stream its output as frames.
//!
//! Owns: building the child (clean environment, cwd, stdin, own session and
//! process group, OOM score +500, the request's user via [`crate::users`]),
//! pumping stdout/stderr into `Frame`s, the
//! timeout, killing the process group on timeout or when the client cancels
//! the stream, and the final `Frame::Exit`.
//!
//! Must not: wait for children itself (only the [`crate::reaper`] does), use
//! `tokio::process`, or kill anything after the main process exited normally
//! (background children such as `sleep 100 &` are left alone).

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::pin::pin;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use rustix::process::{Pid, Signal, WaitStatus};
use sandforge_agent_proto::{ExecRequest, ExitStatus, Frame, MAX_FILE_BYTES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::reaper::Reaper;
use crate::reply::{self, ApiError, Body, BodySender};
use crate::server::Agent;
use crate::users::{self, User};

/// Environment every command starts from (the request's `env` goes on top).
pub(crate) const BASE_ENV: [(&str, &str); 4] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
    ("TERM", "xterm-256color"),
];
/// Largest output chunk put in one frame.
const CHUNK: usize = 64 * 1024;
/// How long output is still drained after the main process exited.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(250);
/// Largest accepted request body (the JSON, including `stdin`).
const MAX_REQUEST_BYTES: usize = MAX_FILE_BYTES as usize + 1024 * 1024;
/// Frames buffered between the pumps and the HTTP/2 stream.
const FRAME_QUEUE: usize = 16;

/// Handle `POST /v1/exec`: parse the request, then stream frames from a task.
pub async fn handle(req: Request<Incoming>, agent: Arc<Agent>) -> Result<Response<Body>, ApiError> {
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::too_large("exec request body is too large"))
        }
        Err(e) => return Err(ApiError::bad_request(format!("reading exec request: {e}"))),
    };
    let request: ExecRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("bad exec request: {e}")))?;
    if request.argv.is_empty() {
        return Err(ApiError::bad_request("argv must not be empty"));
    }
    let user = resolve_user(request.user.as_deref()).await?;
    let (tx, body) = reply::channel(FRAME_QUEUE);
    tokio::spawn(run(request, user, agent.reaper.clone(), tx));
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    Ok(resp)
}

/// The request's user, resolved (before any answer is sent, so an unknown
/// one is a 400 `unknown_user`); `None` runs as the agent's own root.
pub(crate) async fn resolve_user(spec: Option<&str>) -> Result<Option<User>, ApiError> {
    match spec {
        None => Ok(None),
        Some(spec) => users::resolve_async(spec.to_string())
            .await
            .map(Some)
            .map_err(|msg| ApiError::new(StatusCode::BAD_REQUEST, "unknown_user", msg)),
    }
}

/// Run the command; every outcome ends with exactly one exit frame (unless the
/// client is gone, in which case the process group is killed).
async fn run(req: ExecRequest, user: Option<User>, reaper: Reaper, tx: BodySender) {
    let mut cmd = match build_command(&req, user.as_ref()) {
        Ok(cmd) => cmd,
        Err(msg) => return spawn_failed(&tx, msg).await,
    };
    let permit = reaper.permit().await;
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            drop(permit);
            let msg = if e.kind() == io::ErrorKind::NotFound {
                format!("{}: command not found ({e})", req.argv[0])
            } else {
                format!("failed to start {}: {e}", req.argv[0])
            };
            return spawn_failed(&tx, msg).await;
        }
    };
    let pid = Pid::from_child(&child);
    let mut status_rx = permit.register(pid);
    drop(permit);
    // setsid() in the child made it the leader of a process group numbered pid.
    let mut group = KillGuard(Some(pid));

    let mut tasks = AbortOnDrop(Vec::new());
    if let (Some(stdin), Some(data)) = (child.stdin.take(), req.stdin) {
        tasks.0.push(tokio::spawn(feed_stdin(
            OwnedFd::from(stdin),
            data.into_bytes(),
        )));
    }
    let (deadline_tx, deadline_rx) = watch::channel(None);
    let stdout = child.stdout.take().map(OwnedFd::from);
    let stderr = child.stderr.take().map(OwnedFd::from);
    let pumps = AbortOnDrop(vec![
        tokio::spawn(pump(stdout, Frame::Stdout, tx.clone(), deadline_rx.clone())),
        tokio::spawn(pump(stderr, Frame::Stderr, tx.clone(), deadline_rx)),
    ]);

    let timeout_ms = req.timeout_ms;
    let mut timer = pin!(async move {
        match timeout_ms {
            0 => std::future::pending().await,
            ms => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
    });
    let mut timed_out = false;
    let status = loop {
        tokio::select! {
            st = &mut status_rx => break st.ok(),
            () = &mut timer, if !timed_out => {
                timed_out = true;
                group.kill();
            }
            // The client reset the stream: `group` kills everything on return.
            () = tx.closed() => return,
        }
    };
    // The main process is gone: from here on background children survive.
    group.disarm();

    let _ = deadline_tx.send(Some(Instant::now() + DRAIN_AFTER_EXIT));
    for pump in pumps.take() {
        let _ = pump.await;
    }
    drop(tasks);
    let exit = exit_status(status, timed_out);
    let _ = tx.send(Ok(Frame::Exit(exit).encode())).await;
}

/// Build the `Command` (without spawning). `Err` is a message for the client.
fn build_command(req: &ExecRequest, user: Option<&User>) -> Result<Command, String> {
    let cwd = working_dir(req.cwd.as_deref(), user)?;
    let mut cmd = Command::new(&req.argv[0]);
    cmd.args(&req.argv[1..])
        .env_clear()
        .envs(BASE_ENV)
        .envs(user.map(User::env).unwrap_or_default())
        .envs(&req.env)
        .current_dir(cwd)
        .stdin(if req.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let creds = user.map(User::creds);
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe operations are allowed. It only issues raw syscalls
    // through rustix (setsid, open, write, close, setgroups, setresgid,
    // setresuid), touches no locks and does not allocate (the path is a
    // static C string, the credentials were built before the fork;
    // `io::Error::from(Errno)` is a plain OS error code). std has already
    // reset the signal mask and SIGPIPE to defaults; the agent changes no
    // other disposition (tokio's handlers are reset to default by exec
    // itself).
    unsafe {
        cmd.pre_exec(move || {
            child_setup()?;
            if let Some(creds) = &creds {
                creds.apply()?;
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// The directory a command starts in: the asked one (which must exist),
/// else for a user other than root their home (`/` when it is missing),
/// else `/root`, else `/`.
pub(crate) fn working_dir<'a>(
    asked: Option<&'a str>,
    user: Option<&'a User>,
) -> Result<&'a str, String> {
    match (asked, user) {
        (Some(cwd), _) if !Path::new(cwd).is_dir() => Err(format!(
            "working directory {cwd:?} does not exist or is not a directory"
        )),
        (Some(cwd), _) => Ok(cwd),
        (None, Some(u)) if u.uid != 0 => Ok(u.default_dir()),
        (None, _) if Path::new("/root").is_dir() => Ok("/root"),
        (None, _) => Ok("/"),
    }
}

/// Runs in the child between fork and exec; see the SAFETY note above.
/// Before any credential change: a process that changed its uid is no
/// longer dumpable, and its `/proc/self` files are root's.
pub(crate) fn child_setup() -> io::Result<()> {
    rustix::process::setsid()?;
    // Make the command the OOM killer's choice, never the agent: the agent
    // asks for -1000, but hosts without CAP_SYS_RESOURCE cannot lower a score,
    // so commands are raised to +500 instead (raising is always allowed).
    if let Ok(fd) = rustix::fs::open(
        c"/proc/self/oom_score_adj",
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) {
        let _ = rustix::io::write(&fd, b"500");
    }
    Ok(())
}

/// Report a command that could not be started: a stderr frame plus exit 127.
async fn spawn_failed(tx: &BodySender, msg: String) {
    let line = Bytes::from(format!("sandforge-agent: {msg}\n"));
    let _ = tx.send(Ok(Frame::Stderr(line).encode())).await;
    let exit = ExitStatus {
        exit_code: 127,
        signal: None,
        timed_out: false,
        error: Some(msg),
    };
    let _ = tx.send(Ok(Frame::Exit(exit).encode())).await;
}

/// The exit frame for a wait status.
fn exit_status(status: Option<WaitStatus>, timed_out: bool) -> ExitStatus {
    let (exit_code, signal) = match status {
        _ if timed_out => (128 + 9, Some(9)),
        Some(st) => match (st.exit_status(), st.terminating_signal()) {
            (Some(code), _) => (code as i32, None),
            (None, Some(sig)) => (128 + sig as i32, Some(sig as i32)),
            (None, None) => (-1, None),
        },
        None => (-1, None),
    };
    let error = status
        .is_none()
        .then(|| "lost track of the process".to_string());
    ExitStatus {
        exit_code,
        signal,
        timed_out,
        error,
    }
}

/// Write `data` to the child's stdin, then close it (EPIPE is not an error).
async fn feed_stdin(fd: OwnedFd, data: Vec<u8>) {
    if let Ok(mut w) = pipe::Sender::from_owned_fd(fd) {
        let _ = w.write_all(&data).await;
    }
}

/// Copy one output pipe into frames until EOF, or until the drain deadline
/// (set once the main process exited) passes while the pipe has nothing more.
async fn pump(
    fd: Option<OwnedFd>,
    frame: fn(Bytes) -> Frame,
    tx: BodySender,
    mut deadline: watch::Receiver<Option<Instant>>,
) {
    let Some(fd) = fd else { return };
    let mut rx = match pipe::Receiver::from_owned_fd(fd) {
        Ok(rx) => rx,
        Err(e) => {
            eprintln!("sandforge-agent: output pipe: {e}");
            return;
        }
    };
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = tokio::select! {
            biased;
            () = drain_deadline(&mut deadline) => return,
            r = rx.read(&mut buf) => match r {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            },
        };
        let chunk = Bytes::copy_from_slice(&buf[..n]);
        if tx.send(Ok(frame(chunk).encode())).await.is_err() {
            return;
        }
    }
}

/// Resolves when the drain deadline is set and has passed.
async fn drain_deadline(rx: &mut watch::Receiver<Option<Instant>>) {
    loop {
        let current = *rx.borrow_and_update();
        if let Some(at) = current {
            return tokio::time::sleep_until(at).await;
        }
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// SIGKILLs a process group when dropped, unless disarmed.
struct KillGuard(Option<Pid>);

impl KillGuard {
    fn kill(&self) {
        if let Some(pgid) = self.0 {
            let _ = rustix::process::kill_process_group(pgid, Signal::Kill);
        }
    }
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for KillGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Aborts its tasks when dropped (the exec task ended or was cancelled).
struct AbortOnDrop(Vec<JoinHandle<()>>);

impl AbortOnDrop {
    fn take(mut self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}
