//! Client side of the agent's terminal sessions: create and list sessions,
//! and attach to one as a pair of frame streams (keystrokes and resizes
//! in, terminal output and the exit status out) over one HTTP/2 stream of
//! the sandbox's agent connection. Must not interpret what flows through.

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use sandforge_agent_proto::{
    routes, AgentError, Frame, FrameDecoder, SessionInfo, SessionRequest, FEATURE_USER,
};
use tokio::sync::mpsc;

use crate::agent::{
    build, full_body, read_answer, AgentClient, BoxError, ExecStream, CALL_TIMEOUT, MAX_ANSWER,
    MAX_ERROR_ANSWER,
};
use crate::error::{Result, RuntimeError};

/// How many input frames may wait for the agent.
const INPUT_QUEUE: usize = 64;

/// One attachment: send [`Frame::Input`] / [`Frame::Resize`] on `input`;
/// read output and, last, the exit status from `output`. Dropping both
/// detaches; the session goes on.
pub struct Attachment {
    pub input: mpsc::Sender<Frame>,
    pub output: ExecStream,
}

/// The error of a streaming call the agent refused: its error body, read
/// bounded in size and time.
pub(crate) async fn refused(
    status: StatusCode,
    resp: http::Response<hyper::body::Incoming>,
) -> RuntimeError {
    let body = tokio::time::timeout(CALL_TIMEOUT, read_answer(resp, MAX_ERROR_ANSWER))
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    refused_body(status, &body)
}

/// The error of a call the agent refused, from its (bounded) body.
pub(crate) fn refused_body(status: StatusCode, body: &[u8]) -> RuntimeError {
    match serde_json::from_slice::<AgentError>(body) {
        Ok(e) if status.is_client_error() || status == StatusCode::BAD_GATEWAY => {
            RuntimeError::AgentRefused {
                status: status.as_u16(),
                code: e.code,
                message: e.message,
            }
        }
        _ => RuntimeError::AgentProtocol(format!(
            "agent answered {status}: {}",
            String::from_utf8_lossy(body)
        )),
    }
}

impl AgentClient {
    /// Start a session. One with a `user` is refused (409
    /// `agent_outdated`) by an agent that does not list [`FEATURE_USER`]:
    /// an older agent would ignore the field and run it as root.
    pub async fn create_session(&self, req: &SessionRequest) -> Result<SessionInfo> {
        if req.user.is_some()
            && !self
                .info()
                .await?
                .features
                .iter()
                .any(|f| f == FEATURE_USER)
        {
            return Err(RuntimeError::AgentRefused {
                status: StatusCode::CONFLICT.as_u16(),
                code: "agent_outdated".into(),
                message: "this sandbox runs an agent older than `user` (a sandbox created by this version of the daemon takes it)".into(),
            });
        }
        let body =
            serde_json::to_vec(req).map_err(|e| RuntimeError::AgentProtocol(e.to_string()))?;
        let (status, body) = self
            .call(
                build(Method::POST, routes::SESSIONS, full_body(body))?,
                MAX_ANSWER,
            )
            .await?;
        if status != StatusCode::CREATED {
            return Err(refused_body(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| RuntimeError::AgentProtocol(e.to_string()))
    }

    pub async fn sessions(&self) -> Result<Vec<SessionInfo>> {
        let req = build(Method::GET, routes::SESSIONS, full_body(Bytes::new()))?;
        let (status, body) = self.call(req, MAX_ANSWER).await?;
        if status != StatusCode::OK {
            return Err(refused_body(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| RuntimeError::AgentProtocol(e.to_string()))
    }

    pub async fn attach(&self, id: &str) -> Result<Attachment> {
        let (tx, rx) = mpsc::channel::<Frame>(INPUT_QUEUE);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            let f = rx.recv().await?;
            Some((Ok::<_, BoxError>(hyper::body::Frame::data(f.encode())), rx))
        });
        let body = StreamBody::new(stream).boxed_unsync();
        let resp = self
            .request(build(Method::POST, &routes::attach(id), body)?)
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(refused(resp.status(), resp).await);
        }
        Ok(Attachment {
            input: tx,
            output: ExecStream::from_body(resp.into_body(), FrameDecoder::new()),
        })
    }
}
