//! Client side of the agent protocol: one HTTP/2 connection per sandbox over
//! the sandbox's unix socket (the container's bound socket, or QEMU's
//! virtio-serial chardev socket), shared by every concurrent request and
//! re-established when it breaks (e.g. after a supervisor restart).
//!
//! Owns: connecting, the readiness wait, and typed helpers for the routes.
//! It must not interpret results for the API: the server maps agent answers
//! to HTTP responses.
//!
//! The agent is untrusted (a sandbox's root can replace it), so nothing it
//! sends is waited for or buffered without bound: the connect and HTTP/2
//! handshake get [`HANDSHAKE_TIMEOUT`], a non-streaming call (request and
//! whole answer) [`CALL_TIMEOUT`], a streaming call's answer head
//! [`HEAD_TIMEOUT`], and every answer body read whole is cut off at
//! [`MAX_ANSWER`] ([`MAX_ERROR_ANSWER`] for error answers). Streams (exec
//! output, terminals, tunnels, file bodies) run as long as they run, but
//! are read only as fast as their consumer takes them (HTTP/2 flow control).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sandforge_agent_proto::{
    routes, AgentInfo, ExecRequest, FileQuery, FrameDecoder, PROTOCOL_VERSION,
};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

use crate::error::{Result, RuntimeError};

/// Connecting to the agent's socket, the SYNC/ACK exchange and the HTTP/2
/// handshake together.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// A non-streaming call: sending the request and reading the whole answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// A streaming call (exec, attach, tunnel, files): until the answer's head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer body read whole (JSON answers: info, sessions, ports).
pub const MAX_ANSWER: usize = 8 << 20;
/// The largest error answer body read (its JSON `{code, message}`).
pub const MAX_ERROR_ANSWER: usize = 64 << 10;

/// Boxed error of a streamed request body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Request body type accepted by [`AgentClient::request`].
pub type ReqBody = UnsyncBoxBody<Bytes, BoxError>;

/// Wrap bytes as a request body.
pub fn full_body(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn empty_body() -> ReqBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

/// How long an agent gets (the constants above; shorter in tests).
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    handshake: Duration,
    call: Duration,
    head: Duration,
}

const TIMEOUTS: Timeouts = Timeouts {
    handshake: HANDSHAKE_TIMEOUT,
    call: CALL_TIMEOUT,
    head: HEAD_TIMEOUT,
};

struct Inner {
    socket: PathBuf,
    timeouts: Timeouts,
    /// Serial-port transport: resynchronise before every HTTP/2 handshake.
    sync: bool,
    conn: Mutex<Option<SendRequest<ReqBody>>>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("socket", &self.inner.socket)
            .finish()
    }
}

impl AgentClient {
    /// A client for an agent behind a unix socket it listens on (a container).
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self::with_sync(socket.into(), false)
    }

    /// A client for an agent behind a virtio-serial port (a microVM): each
    /// connection starts with the SYNC/ACK exchange of the agent protocol.
    pub fn serial(socket: impl Into<PathBuf>) -> Self {
        Self::with_sync(socket.into(), true)
    }

    fn with_sync(socket: PathBuf, sync: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                socket,
                timeouts: TIMEOUTS,
                sync,
                conn: Mutex::new(None),
            }),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.inner.socket
    }

    async fn connect(&self) -> Result<SendRequest<ReqBody>> {
        let limit = self.inner.timeouts.handshake;
        tokio::time::timeout(limit, self.connect_inner())
            .await
            .map_err(|_| {
                RuntimeError::AgentUnavailable(format!(
                    "{}: no HTTP/2 connection within {limit:?}",
                    self.inner.socket.display()
                ))
            })?
    }

    async fn connect_inner(&self) -> Result<SendRequest<ReqBody>> {
        let open = || async {
            crate::sock::connect(&self.inner.socket).await.map_err(|e| {
                RuntimeError::AgentUnavailable(format!("{}: {e}", self.inner.socket.display()))
            })
        };
        let mut stream = open().await?;
        if self.inner.sync {
            // A sync line can be eaten by a session the guest has not yet
            // seen end (e.g. one a snapshot froze mid-flight): retry on a
            // fresh connection with growing patience rather than waiting
            // long on the first.
            let mut last = None;
            for wait in SYNC_WAITS {
                match resync(&mut stream, wait).await {
                    Ok(()) => {
                        last = None;
                        break;
                    }
                    Err(e) => {
                        last = Some(e);
                        stream = open().await?;
                    }
                }
            }
            if let Some(e) = last {
                return Err(e);
            }
        }
        // No HTTP/2 keep-alive pings: over a virtio-serial port a slow boot
        // would trip the ping timeout, and the reconnect that follows leaves
        // the first connection's bytes queued in the guest's port buffers,
        // ahead of the new preface. Liveness is the monitor's job (it probes
        // the VM or container process), not the connection's.
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| RuntimeError::AgentUnavailable(format!("http/2 handshake: {e}")))?;
        let socket = self.inner.socket.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(socket = %socket.display(), "agent connection ended: {e}");
            }
        });
        Ok(sender)
    }

    async fn sender(&self) -> Result<SendRequest<ReqBody>> {
        let mut guard = self.inner.conn.lock().await;
        if let Some(s) = guard.as_ref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        let s = self.connect().await?;
        *guard = Some(s.clone());
        Ok(s)
    }

    /// Drop the cached connection (the next request reconnects).
    pub async fn reset(&self) {
        self.inner.conn.lock().await.take();
    }

    /// Send one request over the shared connection, reconnecting once if the
    /// cached connection turns out to be dead before the request was sent;
    /// fails with [`RuntimeError::AgentTimeout`] when the answer's head has
    /// not come within [`HEAD_TIMEOUT`].
    pub async fn request(&self, req: Request<ReqBody>) -> Result<Response<Incoming>> {
        let limit = self.inner.timeouts.head;
        tokio::time::timeout(limit, self.request_unbounded(req))
            .await
            .map_err(|_| RuntimeError::AgentTimeout(limit))?
    }

    /// A non-streaming call: the request and its whole answer body (at most
    /// `max` bytes) within [`CALL_TIMEOUT`]. Returns the status and body.
    pub(crate) async fn call(
        &self,
        req: Request<ReqBody>,
        max: usize,
    ) -> Result<(StatusCode, Bytes)> {
        let exchange = async {
            let resp = self.request_unbounded(req).await?;
            let status = resp.status();
            let limit = if status.is_success() {
                max
            } else {
                MAX_ERROR_ANSWER
            };
            Ok((status, read_answer(resp, limit).await?))
        };
        let limit = self.inner.timeouts.call;
        tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| RuntimeError::AgentTimeout(limit))?
    }

    async fn request_unbounded(&self, req: Request<ReqBody>) -> Result<Response<Incoming>> {
        let mut sender = self.sender().await?;
        if sender.ready().await.is_err() {
            self.reset().await;
            sender = self.sender().await?;
            sender
                .ready()
                .await
                .map_err(|e| RuntimeError::AgentUnavailable(e.to_string()))?;
        }
        sender
            .send_request(req)
            .await
            .map_err(|e| RuntimeError::AgentUnavailable(format!("request failed: {e}")))
    }

    /// `GET /v1/info`, checking the protocol version.
    pub async fn info(&self) -> Result<AgentInfo> {
        let req = build(Method::GET, routes::INFO, empty_body())?;
        let (status, body) = self.call(req, MAX_ERROR_ANSWER).await?;
        if status != StatusCode::OK {
            return Err(RuntimeError::AgentProtocol(format!(
                "info answered {status}"
            )));
        }
        let info: AgentInfo = serde_json::from_slice(&body)
            .map_err(|e| RuntimeError::AgentProtocol(format!("info: {e}")))?;
        if info.proto != PROTOCOL_VERSION {
            return Err(RuntimeError::AgentProtocol(format!(
                "agent speaks protocol {}, supervisor {}",
                info.proto, PROTOCOL_VERSION
            )));
        }
        Ok(info)
    }

    /// Poll until the agent answers `info`, or fail after `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<AgentInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match tokio::time::timeout(Duration::from_secs(2), self.info()).await {
                Ok(Ok(info)) => return Ok(info),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "info timed out".to_string(),
            };
            self.reset().await;
            if Instant::now() >= deadline {
                return Err(RuntimeError::AgentUnavailable(format!(
                    "no answer within {timeout:?} (last error: {last})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    }

    /// Start an exec; the returned stream yields frames as the agent sends them.
    pub async fn exec(&self, req: &ExecRequest) -> Result<ExecStream> {
        let body =
            serde_json::to_vec(req).map_err(|e| RuntimeError::AgentProtocol(e.to_string()))?;
        let resp = self
            .request(build(Method::POST, routes::EXEC, full_body(body))?)
            .await?;
        if resp.status() != StatusCode::OK {
            // A refusal (4xx with the agent's JSON error, e.g. an unknown
            // `user`) is `AgentRefused`; anything else `AgentProtocol`.
            return Err(crate::terminal::refused(resp.status(), resp).await);
        }
        Ok(ExecStream {
            body: resp.into_body(),
            decoder: FrameDecoder::new(),
            done: false,
        })
    }

    /// `GET /v1/rootfs`: the sandbox's root filesystem as a tar stream (the
    /// agent stops past `max_bytes` of file contents; the caller counts
    /// too). Waits at most [`HEAD_TIMEOUT`] for the head; the body is the
    /// caller's to bound. A refusal is `Ok(Err((status, message)))`.
    pub async fn rootfs(
        &self,
        max_bytes: u64,
    ) -> Result<std::result::Result<Incoming, (StatusCode, String)>> {
        let uri = format!("{}?max_bytes={max_bytes}", routes::ROOTFS);
        // The agent measures the tree before it answers: no head timeout
        // beyond the call's own.
        let resp = tokio::time::timeout(
            Duration::from_secs(600),
            self.request_unbounded(build(Method::GET, &uri, empty_body())?),
        )
        .await
        .map_err(|_| RuntimeError::AgentTimeout(Duration::from_secs(600)))??;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let body = read_answer(resp, MAX_ERROR_ANSWER)
                .await
                .unwrap_or_default();
            let message = serde_json::from_slice::<sandforge_agent_proto::AgentError>(&body)
                .map(|e| e.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Ok(Err((status, message)));
        }
        Ok(Ok(resp.into_body()))
    }

    /// A files request (`GET`, `HEAD`, `PUT`), returned as the agent answered
    /// it: the caller maps statuses and streams bodies (an error body with
    /// [`read_answer`]). A `PUT` streams its upload first, as slowly as the
    /// client sends it, so only `GET` and `HEAD` wait at most
    /// [`HEAD_TIMEOUT`] for the head.
    pub async fn files(
        &self,
        method: Method,
        q: &FileQuery,
        body: Option<ReqBody>,
    ) -> Result<Response<Incoming>> {
        let uri = format!("{}?{}", routes::FILES, encode_query(q));
        let upload = method == Method::PUT;
        let req = build(method, &uri, body.unwrap_or_else(empty_body))?;
        if upload {
            self.request_unbounded(req).await
        } else {
            self.request(req).await
        }
    }
}

/// How long each successive SYNC attempt waits for its ACK.
const SYNC_WAITS: [Duration; 4] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// The SYNC/ACK exchange (see `sandforge_agent_proto::SYNC_PREFIX`): send a
/// fresh nonce and skip every byte up to its ACK line. Fails after `wait`
/// so the caller reconnects (the sync line may have gone to a connection
/// the guest had not yet seen close).
async fn resync(stream: &mut UnixStream, wait: Duration) -> Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let nonce = format!(
        "{:x}-{:x}-{}",
        nanos,
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let mut line = sandforge_agent_proto::SYNC_PREFIX.to_vec();
    line.extend_from_slice(nonce.as_bytes());
    line.push(b'\n');
    let mut want = sandforge_agent_proto::ACK_PREFIX.to_vec();
    want.extend_from_slice(nonce.as_bytes());
    want.push(b'\n');
    let exchange = async {
        stream.write_all(&line).await?;
        let mut seen: Vec<u8> = Vec::new();
        let mut byte = [0u8; 1];
        // One byte at a time: the agent sends nothing after the ACK until
        // our preface, so nothing of the HTTP/2 session is consumed here.
        while !seen.ends_with(&want) {
            if stream.read(&mut byte).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed before ACK",
                ));
            }
            seen.push(byte[0]);
            if seen.len() > 64 * 1024 {
                seen.drain(..32 * 1024);
            }
        }
        Ok(())
    };
    match tokio::time::timeout(wait, exchange).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(RuntimeError::AgentUnavailable(format!(
            "serial resync: {e}"
        ))),
        Err(_) => Err(RuntimeError::AgentUnavailable(format!(
            "serial resync: no ACK within {wait:?}"
        ))),
    }
}

pub(crate) fn build(method: Method, uri: &str, body: ReqBody) -> Result<Request<ReqBody>> {
    // HTTP/2 needs an authority; the agent ignores it.
    Request::builder()
        .method(method)
        .uri(format!("http://agent{uri}"))
        .body(body)
        .map_err(|e| RuntimeError::AgentProtocol(e.to_string()))
}

/// Read an answer's whole body, at most `max` bytes: a longer one is an
/// [`RuntimeError::AgentProtocol`] error, and nothing past `max` is kept.
/// No timeout of its own: callers bound it ([`AgentClient::call`], or the
/// client whose request this serves).
pub async fn read_answer(resp: Response<Incoming>, max: usize) -> Result<Bytes> {
    http_body_util::Limited::new(resp.into_body(), max)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                RuntimeError::AgentProtocol(format!("agent answer longer than {max} bytes"))
            } else {
                RuntimeError::AgentUnavailable(format!("reading response: {e}"))
            }
        })
}

fn encode_query(q: &FileQuery) -> String {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    let mut parts = vec![format!(
        "path={}",
        utf8_percent_encode(&q.path, NON_ALPHANUMERIC)
    )];
    for (k, v) in [
        ("offset", q.offset),
        ("limit", q.limit),
        ("max_bytes", q.max_bytes),
    ] {
        if let Some(v) = v {
            parts.push(format!("{k}={v}"));
        }
    }
    if q.ls == Some(true) {
        parts.push("ls=true".into());
    }
    if let Some(m) = &q.mode {
        parts.push(format!("mode={}", utf8_percent_encode(m, NON_ALPHANUMERIC)));
    }
    parts.join("&")
}

/// Frames of one running exec or terminal attachment, in order; the last
/// is `Frame::Exit`.
pub struct ExecStream {
    body: Incoming,
    decoder: FrameDecoder,
    done: bool,
}

impl ExecStream {
    pub(crate) fn from_body(body: Incoming, decoder: FrameDecoder) -> Self {
        ExecStream {
            body,
            decoder,
            done: false,
        }
    }

    /// After the exit frame, read the stream to its end (bounded) so that it
    /// closes normally instead of being reset by dropping it: a completed
    /// exec should never look like a cancelled one to the agent.
    async fn drain(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.body.frame().await {}
        })
        .await;
    }

    /// The next frame; `None` after the exit frame. An error when the stream
    /// breaks before the exit frame (agent or sandbox gone).
    pub async fn next(&mut self) -> Option<Result<sandforge_agent_proto::Frame>> {
        use sandforge_agent_proto::Frame;
        if self.done {
            return None;
        }
        loop {
            match self.decoder.next_frame() {
                Ok(Some(f)) => {
                    if matches!(f, Frame::Exit(_)) {
                        self.done = true;
                        self.drain().await;
                    }
                    return Some(Ok(f));
                }
                Ok(None) => {}
                Err(e) => {
                    self.done = true;
                    return Some(Err(RuntimeError::AgentProtocol(e.to_string())));
                }
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.decoder.push(&data);
                    }
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(RuntimeError::AgentUnavailable(format!(
                        "exec stream broke: {e}"
                    ))));
                }
                None => {
                    self.done = true;
                    return Some(Err(RuntimeError::AgentUnavailable(
                        "exec stream ended without an exit status".into(),
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client with short timeouts for an agent at `socket`.
    fn impatient(socket: &Path) -> AgentClient {
        let inner = Inner {
            socket: socket.to_path_buf(),
            timeouts: Timeouts {
                handshake: Duration::from_millis(500),
                call: Duration::from_millis(500),
                head: Duration::from_millis(500),
            },
            sync: false,
            conn: Mutex::new(None),
        };
        AgentClient {
            inner: Arc::new(inner),
        }
    }

    /// A hostile agent: every request is answered by `answer` over HTTP/2.
    async fn agent<F, Fut>(dir: &Path, answer: F) -> PathBuf
    where
        F: Fn() -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let path = dir.join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let answer = answer.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer().await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        path
    }

    #[tokio::test]
    async fn an_oversized_answer_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let sock = agent(dir.path(), || async {
            Response::new(Full::new(Bytes::from(vec![b' '; MAX_ANSWER + 1])))
        })
        .await;
        let c = impatient(&sock);
        match c.sessions().await {
            Err(RuntimeError::AgentProtocol(m)) => assert!(m.contains("longer than"), "{m}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        match c.info().await {
            Err(RuntimeError::AgentProtocol(m)) => assert!(m.contains("longer than"), "{m}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn an_agent_that_never_answers_times_out() {
        let dir = tempfile::tempdir().unwrap();
        // Takes every request and never answers it.
        let sock = agent(dir.path(), || async {
            std::future::pending::<()>().await;
            Response::new(Full::new(Bytes::new()))
        })
        .await;
        let c = impatient(&sock);
        let started = Instant::now();
        assert!(matches!(c.info().await, Err(RuntimeError::AgentTimeout(_))));
        assert!(matches!(
            c.ports().await,
            Err(RuntimeError::AgentTimeout(_))
        ));
        let req = ExecRequest {
            argv: vec!["true".into()],
            env: Default::default(),
            cwd: None,
            timeout_ms: 1000,
            stdin: None,
            user: None,
        };
        assert!(matches!(
            c.exec(&req).await,
            Err(RuntimeError::AgentTimeout(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        // Accepts the connection and never says a word, HTTP/2 or other.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let _held = tokio::spawn(async move {
            let mut held = vec![];
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let c = impatient(&path);
        let started = Instant::now();
        assert!(c.info().await.is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn query_encoding() {
        let q = FileQuery {
            path: "/a b/c&d".into(),
            offset: Some(2),
            ls: Some(true),
            mode: Some("0755".into()),
            ..Default::default()
        };
        assert_eq!(
            encode_query(&q),
            "path=%2Fa%20b%2Fc%26d&offset=2&ls=true&mode=0755"
        );
    }
}
