//! Terminals (seed 002): `GET /sandboxes/{id}/ws` upgrades to a WebSocket
//! carrying a PTY session, and `GET /sandboxes/{id}/sessions` lists the
//! sandbox's sessions. Sessions live in the guest agent, so they outlive
//! the WebSocket (and the supervisor); this module only validates, starts
//! or finds the session, and pumps messages between the socket and the
//! agent attachment.
//!
//! WebSocket protocol: binary messages from the server are raw terminal
//! output; binary messages from the client are keystrokes; a text message
//! `{"type":"resize","rows":N,"cols":N}` resizes. When the program exits
//! the server sends `{"type":"exit","exit_code":N}` and closes normally
//! with the reason `exit N`. A client that closes only detaches.
//!
//! Query: `token` (when no `Authorization` header can be sent), `cmd` (a
//! shell command run by `/bin/sh -c`; default: the template's login
//! shell), `cwd`, `env=K=V` (repeatable), `rows`/`cols` (1-1000, default
//! 24x80), `user` (or `username`: a name, uid or `user:group`; default the
//! template's user, root for the built-in ones), `session` (attach to an
//! existing session instead).

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use axum::Json;
use futures_util::{SinkExt, StreamExt};
use http::request::Parts;
use sandforge_agent_proto::{valid_session_id, Frame, Resize, SessionRequest};
use sandforge_api::limits;
use sandforge_runtime::terminal::Attachment;
use serde::{Deserialize, Serialize};

use crate::auth::{caller_of_request, Caller};
use crate::error::ApiError;
use crate::AppState;

/// Largest terminal dimension accepted.
const MAX_DIM: u16 = 1000;

/// A session as the API shows it (seed 002's fields).
#[derive(Debug, Serialize)]
pub struct ApiSession {
    pub session_id: String,
    pub argv: String,
    pub tty: bool,
    pub running: bool,
    pub attached: bool,
    pub created_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// `GET /sandboxes/{id}/sessions`.
pub async fn sessions(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<ApiSession>>, ApiError> {
    let agent = st.controller.agent(&caller.org, &id).await?;
    let list = match agent.sessions().await {
        Ok(l) => l,
        Err(e) => return Err(st.controller.agent_failed(&id, e).await),
    };
    Ok(Json(
        list.into_iter()
            .map(|s| ApiSession {
                session_id: s.id,
                argv: s.argv.join(" "),
                tty: s.tty,
                running: s.running,
                attached: s.attached > 0,
                created_at: s.created_at,
                exit_code: s.exit_code,
            })
            .collect(),
    ))
}

/// The query of `/ws`, checked.
#[derive(Debug, Default, PartialEq)]
pub struct WsQuery {
    pub token: Option<String>,
    pub cmd: Option<String>,
    pub cwd: Option<String>,
    pub env: Vec<(String, String)>,
    pub rows: Option<u16>,
    pub cols: Option<u16>,
    pub session: Option<String>,
    pub user: Option<String>,
}

fn dim(field: &str, v: &str) -> Result<u16, ApiError> {
    v.parse::<u16>()
        .ok()
        .filter(|n| (1..=MAX_DIM).contains(n))
        .ok_or_else(|| ApiError::bad_request(field, format!("must be 1-{MAX_DIM}")))
}

pub fn parse_query(raw: Option<&str>) -> Result<WsQuery, ApiError> {
    let mut q = WsQuery::default();
    for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        let v = v.into_owned();
        match k.as_ref() {
            "token" => q.token = Some(v),
            "cmd" | "command" => {
                if v.is_empty() || v.len() > limits::MAX_COMMAND_BYTES {
                    return Err(ApiError::bad_request(
                        "cmd",
                        format!("must be 1-{} bytes", limits::MAX_COMMAND_BYTES),
                    ));
                }
                q.cmd = Some(v)
            }
            "cwd" => {
                if !v.starts_with('/') {
                    return Err(ApiError::bad_request("cwd", "must be an absolute path"));
                }
                q.cwd = Some(v)
            }
            "env" => {
                let (key, value) = v
                    .split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| ApiError::bad_request("env", "each env is KEY=VALUE"))?;
                q.env.push((key.to_string(), value.to_string()));
            }
            "user" | "username" => {
                q.user = Some(sandforge_api::User::Name(v).validate("user")?);
            }
            "rows" => q.rows = Some(dim("rows", &v)?),
            "cols" => q.cols = Some(dim("cols", &v)?),
            "session" => {
                if !valid_session_id(&v) {
                    return Err(ApiError::bad_request(
                        "session",
                        "session ids are 1-64 characters of [A-Za-z0-9_-]",
                    ));
                }
                q.session = Some(v)
            }
            other => {
                return Err(ApiError::bad_request(
                    other,
                    "unknown query parameter (token, cmd, cwd, env, rows, cols, session, user)",
                ))
            }
        }
    }
    if q.env.len() > limits::MAX_ENV_VARS {
        return Err(ApiError::bad_request(
            "env",
            format!("at most {} variables", limits::MAX_ENV_VARS),
        ));
    }
    Ok(q)
}

/// `GET /sandboxes/{id}/ws`.
pub async fn ws(
    State(st): State<AppState>,
    parts: Parts,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let q = parse_query(raw.as_deref())?;
    let caller = caller_of_request(&st, &parts, q.token.as_deref())?;
    let upgrade = upgrade.map_err(|e| {
        ApiError::new(
            http::StatusCode::UPGRADE_REQUIRED,
            "websocket_required",
            format!("this route is a WebSocket: {}", e.body_text()),
        )
    })?;
    let agent = st.controller.agent(&caller.org, &id).await?;
    let size = Resize {
        rows: q.rows.unwrap_or(24),
        cols: q.cols.unwrap_or(80),
    };
    let session = match &q.session {
        Some(s) => s.clone(),
        None => {
            let row = st.controller.get(&caller.org, &id)?;
            let argv = match &q.cmd {
                Some(c) => vec!["/bin/sh".into(), "-c".into(), c.clone()],
                None => st.controller.login_shell(&row),
            };
            let mut env = row.spec.env.clone();
            env.extend(q.env.iter().cloned());
            let req = SessionRequest {
                id: None,
                argv,
                env,
                cwd: q.cwd.clone(),
                size,
                user: q
                    .user
                    .clone()
                    .or_else(|| st.controller.template_user(&row.spec.template)),
            };
            match agent.create_session(&req).await {
                Ok(info) => info.id,
                Err(e @ sandforge_runtime::RuntimeError::AgentRefused { .. }) => {
                    return Err(e.into())
                }
                Err(e) => return Err(st.controller.agent_failed(&id, e).await),
            }
        }
    };
    let attachment = match agent.attach(&session).await {
        Ok(a) => a,
        Err(e @ sandforge_runtime::RuntimeError::AgentRefused { .. }) => {
            return Err(ApiError::from(e).field("session"))
        }
        Err(e) => return Err(st.controller.agent_failed(&id, e).await),
    };
    if q.session.is_some() && (q.rows.is_some() || q.cols.is_some()) {
        let _ = attachment.input.send(Frame::Resize(size)).await;
    }
    let busy = st.controller.busy(&id);
    Ok(upgrade.on_upgrade(move |socket| async move {
        let _busy = busy;
        pump(socket, attachment).await
    }))
}

#[derive(Deserialize)]
struct Control {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    rows: u16,
    #[serde(default)]
    cols: u16,
}

/// Move messages both ways until the program exits or the client leaves.
async fn pump(socket: WebSocket, mut a: Attachment) {
    let (mut tx, mut rx) = socket.split();
    loop {
        tokio::select! {
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if a.input.send(Frame::Input(b)).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    let resize = serde_json::from_str::<Control>(t.as_str())
                        .ok()
                        .filter(|c| c.kind == "resize")
                        .filter(|c| (1..=MAX_DIM).contains(&c.rows) && (1..=MAX_DIM).contains(&c.cols));
                    match resize {
                        Some(c) => {
                            let size = Resize { rows: c.rows, cols: c.cols };
                            if a.input.send(Frame::Resize(size)).await.is_err() {
                                break;
                            }
                        }
                        None => {
                            let err = r#"{"type":"error","message":"text messages are {\"type\":\"resize\",\"rows\":1-1000,\"cols\":1-1000}"}"#;
                            if tx.send(Message::Text(err.into())).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            frame = a.output.next() => match frame {
                Some(Ok(Frame::Stdout(b))) | Some(Ok(Frame::Stderr(b))) => {
                    if tx.send(Message::Binary(b)).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Frame::Exit(e))) => {
                    let msg = serde_json::json!({"type": "exit", "exit_code": e.exit_code});
                    let _ = tx.send(Message::Text(msg.to_string().into())).await;
                    let _ = tx
                        .send(Message::Close(Some(CloseFrame {
                            code: 1000,
                            reason: format!("exit {}", e.exit_code).into(),
                        })))
                        .await;
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let _ = tx
                        .send(Message::Close(Some(CloseFrame {
                            code: 1011,
                            reason: format!("sandbox terminal lost: {e}").chars().take(120).collect::<String>().into(),
                        })))
                        .await;
                    break;
                }
                None => break,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query() {
        let q = parse_query(Some(
            "cmd=python3%20-q&env=A=1&env=B=x%3Dy&rows=40&cols=100&session=s1&token=t",
        ))
        .unwrap();
        assert_eq!(q.cmd.as_deref(), Some("python3 -q"));
        assert_eq!(
            q.env,
            vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert_eq!((q.rows, q.cols), (Some(40), Some(100)));
        assert_eq!(q.session.as_deref(), Some("s1"));
        assert_eq!(q.user, None);
        assert_eq!(parse_query(None).unwrap(), WsQuery::default());
        let q = parse_query(Some("user=user")).unwrap();
        assert_eq!(q.user.as_deref(), Some("user"));
        let q = parse_query(Some("username=1000%3A1000")).unwrap();
        assert_eq!(q.user.as_deref(), Some("1000:1000"));
        for (bad, field) in [
            ("rows=0", "rows"),
            ("cols=5000", "cols"),
            ("env=novalue", "env"),
            ("session=a/b", "session"),
            ("cwd=rel", "cwd"),
            ("bogus=1", "bogus"),
            ("user=", "user"),
            ("user=a%20b", "user"),
            ("user=4294967295", "user"),
        ] {
            assert_eq!(
                parse_query(Some(bad)).unwrap_err().field.as_deref(),
                Some(field),
                "{bad}"
            );
        }
    }
}
