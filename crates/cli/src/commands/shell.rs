//! `sandforge shell ID`: an interactive terminal in a sandbox, over the
//! API's WebSocket route. The local terminal goes to raw mode (restored on
//! every way out), keystrokes go out as they are typed, output is written
//! as it comes, the window size is sent at the start and on every
//! SIGWINCH, and the remote program's exit code becomes this process's.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use rustix::termios::{self, OptionalActions, Termios};
use serde_json::Value;
use tokio::signal::unix::{signal, SignalKind};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::client::{query_value, sandbox_path, Client};
use crate::parse;

#[derive(Debug, Args)]
pub struct ShellArgs {
    /// Sandbox id
    pub id: String,
    /// Attach to this existing session instead of starting a new one
    #[arg(long)]
    pub session: Option<String>,
    /// Working directory of a new session
    #[arg(long)]
    pub cwd: Option<String>,
    /// Environment variable of a new session (repeatable)
    #[arg(long, value_name = "K=V", value_parser = parse::key_value)]
    pub env: Vec<(String, String)>,
    /// Run a new session as this user (name, uid or user:group; default:
    /// the template's user, root for the built-in templates)
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Command to run instead of the login shell (after `--`)
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Puts stdin in raw mode while alive (when it is a terminal).
struct RawMode(Option<Termios>);

impl RawMode {
    fn enter() -> RawMode {
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = saved.clone();
        raw.make_raw();
        if termios::tcsetattr(&stdin, OptionalActions::Now, &raw).is_err() {
            return RawMode(None);
        }
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, saved);
        }
    }
}

/// Keystrokes from a plain thread: a read blocked in tokio's blocking pool
/// would hold the runtime (and the exit) until the next key press.
fn stdin_reader() -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = vec![0u8; 4096];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || tx.blocking_send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    rx
}

fn window_size() -> Option<(u16, u16)> {
    let ws = termios::tcgetwinsize(std::io::stdout()).ok()?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// One shell word per argument, so `-- ls -l 'a b'` runs as typed.
fn shell_command(argv: &[String]) -> String {
    if argv.len() == 1 {
        return argv[0].clone();
    }
    argv.iter()
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

fn ws_url(client: &Client, args: &ShellArgs) -> String {
    let base = client.base().replacen("http://", "ws://", 1);
    let mut q = vec![];
    if let Some((rows, cols)) = window_size() {
        q.push(format!("rows={rows}&cols={cols}"));
    }
    if let Some(s) = &args.session {
        q.push(format!("session={}", query_value(s)));
    }
    if let Some(c) = &args.cwd {
        q.push(format!("cwd={}", query_value(c)));
    }
    for (k, v) in &args.env {
        q.push(format!("env={}", query_value(&format!("{k}={v}"))));
    }
    if let Some(u) = &args.user {
        q.push(format!("user={}", query_value(u)));
    }
    if !args.command.is_empty() {
        q.push(format!(
            "cmd={}",
            query_value(&shell_command(&args.command))
        ));
    }
    format!("{base}{}?{}", sandbox_path(&args.id, "/ws"), q.join("&"))
}

pub async fn shell(client: &Client, args: ShellArgs) -> Result<ExitCode> {
    let mut req = ws_url(client, &args)
        .into_client_request()
        .context("building the WebSocket request")?;
    if let Some(t) = client.token() {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().context("token")?,
        );
    }
    let ws = match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => ws,
        Err(tungstenite::Error::Http(resp)) => {
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or(b"{}"))
                .unwrap_or(Value::Null);
            let e = &body["error"];
            return Err(crate::client::ApiError {
                code: e["code"].as_str().unwrap_or("http_error").to_string(),
                message: e["message"]
                    .as_str()
                    .map_or_else(|| format!("HTTP {}", resp.status()), str::to_string),
            }
            .into());
        }
        Err(e) => return Err(anyhow!("cannot open a terminal at {}: {e}", client.base())),
    };
    let (mut tx, mut rx) = ws.split();
    let _raw = RawMode::enter();
    let mut winch = signal(SignalKind::window_change()).context("SIGWINCH handler")?;
    let mut stdin = stdin_reader();
    let mut stdin_open = true;
    let mut exit_code: Option<i64> = None;
    loop {
        tokio::select! {
            chunk = stdin.recv(), if stdin_open => match chunk {
                None => stdin_open = false,
                Some(b) => tx.send(Message::Binary(b.into())).await?,
            },
            _ = winch.recv() => {
                if let Some((rows, cols)) = window_size() {
                    let m = format!(r#"{{"type":"resize","rows":{rows},"cols":{cols}}}"#);
                    tx.send(Message::Text(m.into())).await?;
                }
            }
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&b)?;
                    out.flush()?;
                }
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                    if v["type"] == "exit" {
                        exit_code = v["exit_code"].as_i64();
                    }
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(anyhow!("terminal connection lost: {e}")),
            },
        }
    }
    drop(_raw);
    match exit_code {
        Some(c) => Ok(ExitCode::from(c.clamp(0, 255) as u8)),
        None => Err(anyhow!("the terminal closed without an exit status")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_quoted_per_argument() {
        assert_eq!(shell_command(&["echo $HOME".into()]), "echo $HOME");
        assert_eq!(
            shell_command(&["ls".into(), "a b".into(), "it's".into()]),
            r"'ls' 'a b' 'it'\''s'"
        );
    }
}
