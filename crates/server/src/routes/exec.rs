//! `/execute` (seed 000: a shell command, buffered JSON) and `/exec` (seed
//! 002: an argv, buffered JSON or, with `Accept: application/x-ndjson`, one
//! JSON line per output chunk flushed as it arrives). Both run through the
//! agent's streamed exec; a dropped client cancels the stream, and the agent
//! then kills the command's process group. Buffering, within the daemon's
//! output budget, is `crate::output`'s; a streamed call reads the agent only
//! as fast as its client takes the lines. A request without a `user` runs
//! as its template's default user (root unless an image config names one).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderMap};
use sandforge_agent_proto::{ExecRequest as AgentExec, Frame};
use sandforge_api::exec::ValidExec;
use sandforge_api::{ExecEvent, ExecRequest, ExecuteRequest};
use sandforge_runtime::agent::ExecStream;
use sandforge_runtime::AgentClient;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::json::ApiJson;
use crate::lifecycle::Busy;
use crate::output::{self, BufferedAnswer, Utf8Carry};
use crate::AppState;

/// The controller's checks (404/403/409) and the agent request. The
/// sandbox is busy from before it is woken until the returned guard drops
/// (the thermal manager never pauses it in between).
async fn prepare(
    st: &AppState,
    org: &str,
    id: &str,
    v: &ValidExec,
) -> Result<((AgentClient, AgentExec), Busy), ApiError> {
    st.controller.get(org, id)?;
    let busy = st.controller.busy(id);
    let agent = st.controller.agent(org, id).await?;
    let row = st.controller.get(org, id)?;
    let mut env = row.spec.env.clone();
    env.extend(v.env.clone());
    let req = AgentExec {
        argv: v.argv.clone(),
        env,
        cwd: v
            .cwd
            .clone()
            .or_else(|| st.controller.template_workdir(&row.spec.template)),
        timeout_ms: v.timeout_seconds * 1000,
        stdin: v.stdin.clone(),
        user: v
            .user
            .clone()
            .or_else(|| st.controller.template_user(&row.spec.template)),
    };
    Ok(((agent, req), busy))
}

/// Start the command in the sandbox.
async fn start(
    st: &AppState,
    id: &str,
    (agent, req): (AgentClient, AgentExec),
) -> Result<ExecStream, ApiError> {
    match agent.exec(&req).await {
        Ok(s) => Ok(s),
        // The agent read the request and said no (e.g. an unknown `user`).
        Err(e @ sandforge_runtime::RuntimeError::AgentRefused { .. }) => Err(e.into()),
        Err(e) => Err(st.controller.agent_failed(id, e).await),
    }
}

/// A buffered call: admitted to the output budget (429 `limit` before
/// anything runs), then run to completion.
async fn buffered(
    st: &AppState,
    id: &str,
    (prepared, _busy): ((AgentClient, AgentExec), Busy),
    timeout: u64,
) -> Result<BufferedAnswer, ApiError> {
    let held = st.controller.admit_buffered()?;
    let stream = start(st, id, prepared).await?;
    output::collect(&st.controller, id, stream, timeout, held).await
}

pub async fn execute(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecuteRequest>,
) -> Result<BufferedAnswer, ApiError> {
    let v = req.validate()?;
    let prepared = prepare(&st, &caller.org, &id, &v).await?;
    buffered(&st, &id, prepared, v.timeout_seconds).await
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
    let prepared = prepare(&st, &caller.org, &id, &v).await?;
    if !ndjson {
        let answer = buffered(&st, &id, prepared, v.timeout_seconds).await?;
        return Ok(answer.into_response());
    }
    let (prepared, busy) = prepared;
    let stream = start(&st, &id, prepared).await?;
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
