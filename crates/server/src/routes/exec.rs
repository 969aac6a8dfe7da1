//! `/execute` (seed 000: a shell command, buffered JSON) and `/exec` (seed
//! 002: an argv, buffered JSON or, with `Accept: application/x-ndjson`, one
//! JSON line per output chunk flushed as it arrives). Both run through the
//! agent's streamed exec; a dropped client cancels the stream, and the agent
//! then kills the command's process group.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use http::{header, HeaderMap};
use sandforge_agent_proto::{ExecRequest as AgentExec, Frame};
use sandforge_api::exec::ValidExec;
use sandforge_api::{limits, ExecEvent, ExecRequest, ExecuteRequest, ExecuteResponse};
use sandforge_runtime::agent::ExecStream;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::json::ApiJson;
use crate::AppState;

/// Extra time the supervisor waits beyond a command's own timeout before it
/// gives up on the agent (the agent enforces the timeout itself).
const GRACE: Duration = Duration::from_secs(15);

async fn start(st: &AppState, org: &str, id: &str, v: &ValidExec) -> Result<ExecStream, ApiError> {
    let agent = st.controller.agent(org, id).await?;
    let row = st.controller.get(org, id)?;
    let mut env = row.spec.env.clone();
    env.extend(v.env.clone());
    let req = AgentExec {
        argv: v.argv.clone(),
        env,
        cwd: v.cwd.clone(),
        timeout_ms: v.timeout_seconds * 1000,
        stdin: v.stdin.clone(),
    };
    match agent.exec(&req).await {
        Ok(s) => Ok(s),
        Err(e) => Err(st.controller.agent_failed(id, e).await),
    }
}

/// Run to completion, keeping at most [`limits::MAX_BUFFERED_OUTPUT`] bytes
/// of each stream.
async fn buffered(
    st: &AppState,
    id: &str,
    mut stream: ExecStream,
    timeout: u64,
) -> Result<ExecuteResponse, ApiError> {
    let (mut out, mut err, mut truncated) = (Vec::new(), Vec::new(), false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout) + GRACE;
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| {
                ApiError::new(
                    http::StatusCode::GATEWAY_TIMEOUT,
                    "agent_timeout",
                    "the agent did not finish the command in time",
                )
            })?;
        match next {
            Some(Ok(Frame::Stdout(b))) => truncated |= append_capped(&mut out, &b),
            Some(Ok(Frame::Stderr(b))) => truncated |= append_capped(&mut err, &b),
            Some(Ok(Frame::Exit(status))) => {
                return Ok(ExecuteResponse {
                    exit_code: status.exit_code,
                    stdout: String::from_utf8_lossy(&out).into_owned(),
                    stderr: String::from_utf8_lossy(&err).into_owned(),
                    timed_out: status.timed_out,
                    truncated,
                })
            }
            // Terminal input frames never come from an exec.
            Some(Ok(Frame::Resize(_) | Frame::Input(_))) => {}
            Some(Err(e)) => return Err(st.controller.agent_failed(id, e).await),
            None => {
                return Err(st
                    .controller
                    .agent_failed(id, "exec stream ended early")
                    .await)
            }
        }
    }
}

fn append_capped(buf: &mut Vec<u8>, data: &[u8]) -> bool {
    let room = limits::MAX_BUFFERED_OUTPUT.saturating_sub(buf.len());
    buf.extend_from_slice(&data[..data.len().min(room)]);
    data.len() > room
}

pub async fn execute(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecuteRequest>,
) -> Result<Json<ExecuteResponse>, ApiError> {
    let v = req.validate()?;
    let stream = start(&st, &caller.org, &id, &v).await?;
    let _busy = st.controller.busy(&id);
    Ok(Json(buffered(&st, &id, stream, v.timeout_seconds).await?))
}

pub async fn exec(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<ExecRequest>,
) -> Result<Response, ApiError> {
    let v = req.validate()?;
    let ndjson = headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("application/x-ndjson"));
    let stream = start(&st, &caller.org, &id, &v).await?;
    let busy = st.controller.busy(&id);
    if !ndjson {
        return Ok(Json(buffered(&st, &id, stream, v.timeout_seconds).await?).into_response());
    }
    let body = Body::from_stream(ndjson_lines(stream, busy));
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response())
}

/// Turn agent frames into ndjson lines, one per frame, as they arrive.
fn ndjson_lines(
    stream: ExecStream,
    busy: crate::lifecycle::Busy,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    struct S {
        _busy: crate::lifecycle::Busy,
        stream: ExecStream,
        out: Utf8Carry,
        err: Utf8Carry,
        done: bool,
    }
    let init = S {
        _busy: busy,
        stream,
        out: Utf8Carry::default(),
        err: Utf8Carry::default(),
        done: false,
    };
    futures_util::stream::unfold(init, |mut s| async move {
        if s.done {
            return None;
        }
        let event = match s.stream.next().await {
            Some(Ok(Frame::Stdout(b))) => ExecEvent::Stdout {
                data: s.out.push(&b),
            },
            Some(Ok(Frame::Stderr(b))) => ExecEvent::Stderr {
                data: s.err.push(&b),
            },
            Some(Ok(Frame::Exit(st))) => {
                s.done = true;
                ExecEvent::Exit {
                    exit_code: st.exit_code,
                    timed_out: st.timed_out,
                }
            }
            Some(Ok(Frame::Resize(_) | Frame::Input(_))) => {
                return Some((Ok(Bytes::new()), s));
            }
            Some(Err(e)) => {
                s.done = true;
                ExecEvent::Error {
                    code: "agent_unavailable".into(),
                    message: e.to_string(),
                }
            }
            None => return None,
        };
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Some((Ok(Bytes::from(line)), s))
    })
}

/// Decodes UTF-8 across chunk boundaries: an incomplete trailing sequence is
/// held back until the next chunk instead of becoming U+FFFD.
#[derive(Default)]
struct Utf8Carry(Vec<u8>);

impl Utf8Carry {
    fn push(&mut self, data: &[u8]) -> String {
        self.0.extend_from_slice(data);
        let keep_from = match std::str::from_utf8(&self.0) {
            Ok(_) => self.0.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.0.len(),
        };
        let rest = self.0.split_off(keep_from);
        let s = String::from_utf8_lossy(&self.0).into_owned();
        self.0 = rest;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_chunks() {
        let mut c = Utf8Carry::default();
        let snow = "☃".as_bytes();
        assert_eq!(c.push(&[b'a', snow[0]]), "a");
        assert_eq!(c.push(&snow[1..]), "☃");
        assert_eq!(c.push(&[0xff, b'b']), "\u{fffd}b");
    }

    #[test]
    fn capped_append() {
        let mut b = vec![0u8; limits::MAX_BUFFERED_OUTPUT - 2];
        assert!(append_capped(&mut b, b"abcd"));
        assert_eq!(b.len(), limits::MAX_BUFFERED_OUTPUT);
        assert!(!append_capped(&mut Vec::new(), b"ab"));
    }
}
