//! End-to-end tests: start the real `sandforge-agent` binary on a unix socket
//! in a temporary directory and drive it over one HTTP/2 connection, the way
//! the supervisor does. Linux only; file tests expect to run as root.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sandforge_agent_proto::{
    AgentError, AgentInfo, DirEntry, ExitStatus, Frame, FrameDecoder, HDR_FILE_ISDIR,
    HDR_FILE_MODE, HDR_FILE_SIZE, HDR_TRUNCATED, MAX_FILE_BYTES, MAX_LIST_ENTRIES,
    PROTOCOL_VERSION,
};
use serde_json::json;

#[path = "agent/exec.rs"]
mod exec;
#[path = "agent/files.rs"]
mod files;

type ReqBody = BoxBody<Bytes, io::Error>;

/// A running agent plus its scratch directory; both cleaned up on drop.
struct Harness {
    child: Child,
    dir: PathBuf,
    client: SendRequest<ReqBody>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn scratch_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "sf-agent-test-{}-{}-{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn start() -> Harness {
    let dir = scratch_dir();
    let sock = dir.join("agent.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_sandforge-agent"))
        .arg("--listen")
        .arg(&sock)
        .spawn()
        .expect("start agent");
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match tokio::net::UnixStream::connect(&sock).await {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("agent socket never came up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let (client, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    Harness { child, dir, client }
}

fn empty() -> ReqBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn full(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// Percent-encode a query value (enough for the paths used here).
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Harness {
    fn path(&self, rel: &str) -> String {
        self.dir.join(rel).to_str().unwrap().to_string()
    }

    async fn send(&self, method: Method, uri: &str, body: ReqBody) -> Response<Incoming> {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://agent{uri}"))
            .body(body)
            .unwrap();
        self.client
            .clone()
            .send_request(req)
            .await
            .expect("request")
    }

    async fn files(&self, method: Method, query: &str, body: ReqBody) -> Response<Incoming> {
        self.send(method, &format!("/v1/files?{query}"), body).await
    }

    async fn exec(&self, req: serde_json::Value) -> ExecResult {
        let resp = self
            .send(Method::POST, "/v1/exec", full(req.to_string()))
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        collect_frames(resp).await
    }
}

async fn body_bytes(resp: Response<Incoming>) -> Bytes {
    resp.into_body().collect().await.expect("body").to_bytes()
}

async fn error_of(resp: Response<Incoming>) -> (StatusCode, String) {
    let status = resp.status();
    let err: AgentError = serde_json::from_slice(&body_bytes(resp).await).expect("AgentError");
    (status, err.code)
}

#[derive(Debug, Default)]
struct ExecResult {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<ExitStatus>,
    largest_chunk: usize,
}

impl ExecResult {
    fn exit(&self) -> &ExitStatus {
        self.exit.as_ref().expect("exit frame")
    }
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

async fn collect_frames(resp: Response<Incoming>) -> ExecResult {
    let mut body = resp.into_body();
    let mut dec = FrameDecoder::new();
    let mut res = ExecResult::default();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.expect("exec body").into_data() else {
            continue;
        };
        dec.push(&data);
        while let Some(f) = dec.next_frame().expect("valid frame") {
            assert!(res.exit.is_none(), "frame after the exit frame");
            match f {
                Frame::Stdout(b) => {
                    res.largest_chunk = res.largest_chunk.max(b.len());
                    res.stdout.extend_from_slice(&b);
                }
                Frame::Stderr(b) => res.stderr.extend_from_slice(&b),
                Frame::Exit(st) => res.exit = Some(st),
                other => panic!("an exec stream sent a terminal frame: {other:?}"),
            }
        }
    }
    dec.finish().expect("no partial frame");
    res
}

fn alive(pid: u32) -> bool {
    // A zombie (state Z) counts as dead.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .ok()
        .flatten()
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread")]
async fn info_and_routing() {
    let h = start().await;
    let resp = h.send(Method::GET, "/v1/info", empty()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let info: AgentInfo = serde_json::from_slice(&body_bytes(resp).await).unwrap();
    assert_eq!(info.proto, PROTOCOL_VERSION);
    assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(info.pid, h.child.id());

    let resp = h.send(Method::GET, "/v1/nope", empty()).await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::NOT_FOUND, "not_found".into())
    );
    let resp = h.send(Method::POST, "/v1/info", empty()).await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::METHOD_NOT_ALLOWED, "bad_request".into())
    );
    let resp = h.send(Method::GET, "/v1/exec", empty()).await;
    assert_eq!(error_of(resp).await.0, StatusCode::METHOD_NOT_ALLOWED);
    let resp = h.send(Method::POST, "/v1/exec", full("{not json")).await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "bad_request".into())
    );
    let resp = h
        .send(
            Method::POST,
            "/v1/exec",
            full(r#"{"argv":[],"timeout_ms":1}"#),
        )
        .await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "bad_request".into())
    );
    let resp = h.files(Method::GET, "offset=1", empty()).await;
    assert_eq!(
        error_of(resp).await,
        (StatusCode::BAD_REQUEST, "bad_request".into())
    );
}

/// `--device`: serve HTTP/2 over a character device. A pty in raw mode
/// stands in for a virtio-serial port.
#[tokio::test(flavor = "multi_thread")]
async fn device_mode_over_pty() {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    use rustix::termios::{tcgetattr, tcsetattr, OptionalActions};

    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let slave_path = ptsname(&master, Vec::new()).unwrap().into_string().unwrap();
    // Keep one slave fd open: raw mode persists, and the master never sees EOF.
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&slave_path)
        .unwrap();
    let mut tio = tcgetattr(&slave).unwrap();
    tio.make_raw();
    tcsetattr(&slave, OptionalActions::Now, &tio).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_sandforge-agent"))
        .arg("--device")
        .arg(&slave_path)
        .spawn()
        .unwrap();
    rustix::fs::fcntl_setfl(
        &master,
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NONBLOCK,
    )
    .unwrap();
    let master = std::fs::File::from(master);
    let writer = master.try_clone().unwrap();
    let io = tokio::io::join(
        tokio::net::unix::pipe::Receiver::from_file_unchecked(master).unwrap(),
        tokio::net::unix::pipe::Sender::from_file_unchecked(writer).unwrap(),
    );
    let (client, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let dir = scratch_dir();
    let h = Harness {
        child: Command::new("true").spawn().unwrap(),
        dir,
        client,
    };

    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        h.send(Method::GET, "/v1/info", empty()),
    )
    .await
    .expect("info over the device");
    let info: AgentInfo = serde_json::from_slice(&body_bytes(resp).await).unwrap();
    assert_eq!(info.pid, child.id());
    let r = h
        .exec(json!({"argv": ["head", "-c", "200000", "/dev/urandom"], "timeout_ms": 10000}))
        .await;
    assert_eq!((r.stdout.len(), r.exit().exit_code), (200_000, 0));
    drop(h);
    drop(slave);
    let _ = child.kill();
    let _ = child.wait();
}
