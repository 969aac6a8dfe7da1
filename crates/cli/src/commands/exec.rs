//! `sandforge exec` (argv, output streamed live as ndjson) and
//! `sandforge execute` (one shell command, buffered answer).
//!
//! Both exit with the command's exit code, or 124 when it timed out.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use futures_util::StreamExt;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::Method;
use sandforge_api::{ExecEvent, ExecRequest, ExecResponse, ExecuteRequest, User};

use super::{err, out};
use crate::client::{sandbox_path, ApiError, Client};
use crate::parse;

const NDJSON: &str = "application/x-ndjson";

/// Exit code reported when the command hit its timeout (as coreutils `timeout`).
const TIMED_OUT_EXIT: u8 = 124;

/// Options shared by `exec` and `execute`.
#[derive(Debug, Args)]
pub struct ExecOptions {
    /// Timeout in seconds (server default when omitted)
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Environment variable for this command (repeatable)
    #[arg(long, value_name = "K=V", value_parser = parse::key_value)]
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Run as this user (name, uid or user:group; default: the template's
    /// user, root for the built-in templates)
    #[arg(long, short = 'u')]
    pub user: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub opts: ExecOptions,
    /// Sandbox id
    pub id: String,
    /// Command and arguments (after `--`)
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub cmd: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ExecuteArgs {
    #[command(flatten)]
    pub opts: ExecOptions,
    /// Sandbox id
    pub id: String,
    /// Shell command, run with /bin/sh -c
    pub command: String,
}

pub async fn exec(client: &Client, args: ExecArgs) -> Result<ExitCode> {
    let timeout = args.opts.timeout;
    let body = ExecRequest {
        cmd: Some(args.cmd),
        timeout_seconds: timeout,
        env: parse::into_map(args.opts.env),
        cwd: args.opts.cwd,
        stdin: None,
        user: args.opts.user.map(User::Name),
    };
    let rb = client
        .request(Method::POST, &sandbox_path(&args.id, "/exec"))
        .header(ACCEPT, NDJSON)
        .json(&body);
    let resp = client.send(rb).await?;
    let streamed = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(NDJSON));
    if !streamed {
        // A server that ignores Accept answers with the buffered shape.
        let r: ExecResponse = client.decode(resp).await?;
        return print_buffered(r, timeout);
    }

    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut exit = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| client.transport_error(e))?;
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            if let Some(status) = handle_line(&line)? {
                exit = Some(status);
            }
        }
    }
    if let Some(status) = handle_line(&buf)? {
        exit = Some(status);
    }
    match exit {
        Some((code, timed_out)) => Ok(finish(code, timed_out, timeout)),
        None => bail!(
            "the output stream from {} ended without an exit status",
            client.base()
        ),
    }
}

pub async fn execute(client: &Client, args: ExecuteArgs) -> Result<ExitCode> {
    let timeout = args.opts.timeout;
    let body = ExecuteRequest {
        command: Some(args.command),
        timeout_seconds: timeout,
        env: parse::into_map(args.opts.env),
        cwd: args.opts.cwd,
        user: args.opts.user.map(User::Name),
    };
    let rb = client
        .request(Method::POST, &sandbox_path(&args.id, "/execute"))
        .json(&body);
    let r: ExecResponse = client.json(rb).await?;
    print_buffered(r, timeout)
}

/// Acts on one ndjson line; returns `(exit_code, timed_out)` for the exit
/// event. Blank lines and events of unknown type are skipped.
fn handle_line(line: &[u8]) -> Result<Option<(i32, bool)>> {
    let line = line.trim_ascii();
    if line.is_empty() {
        return Ok(None);
    }
    let event = match serde_json::from_slice::<ExecEvent>(line) {
        Ok(e) => e,
        Err(e) => {
            let v: serde_json::Value = serde_json::from_slice(line).with_context(|| {
                format!(
                    "bad line in the exec stream: {}",
                    String::from_utf8_lossy(line)
                )
            })?;
            if v.get("type").is_some_and(|t| t.is_string()) {
                return Ok(None);
            }
            return Err(e).context("bad event in the exec stream");
        }
    };
    match event {
        ExecEvent::Stdout { data } => out(&data)?,
        ExecEvent::Stderr { data } => err(&data)?,
        ExecEvent::Exit {
            exit_code,
            timed_out,
        } => return Ok(Some((exit_code, timed_out))),
        ExecEvent::Error { code, message } => return Err(ApiError { code, message }.into()),
    }
    Ok(None)
}

fn print_buffered(r: ExecResponse, timeout: Option<u64>) -> Result<ExitCode> {
    out(&r.stdout)?;
    err(&r.stderr)?;
    if r.truncated {
        err("sandforge: output was truncated by the server\n")?;
    }
    Ok(finish(r.exit_code, r.timed_out, timeout))
}

/// The process exit code for a finished command.
fn finish(code: i32, timed_out: bool, timeout: Option<u64>) -> ExitCode {
    if timed_out {
        let after = timeout.map(|t| format!(" after {t}s")).unwrap_or_default();
        let _ = err(&format!("sandforge: command timed out{after}\n"));
        return ExitCode::from(TIMED_OUT_EXIT);
    }
    ExitCode::from(exit_status(code))
}

/// Maps a remote exit code onto 0–255, never turning a failure into 0.
fn exit_status(code: i32) -> u8 {
    u8::try_from(code).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(exit_status(0), 0);
        assert_eq!(exit_status(137), 137);
        assert_eq!(exit_status(256), 1);
        assert_eq!(exit_status(-1), 1);
    }

    #[test]
    fn lines() {
        assert_eq!(handle_line(b"").unwrap(), None);
        assert_eq!(handle_line(b"  \r").unwrap(), None);
        assert_eq!(
            handle_line(br#"{"type":"exit","exit_code":3,"timed_out":true}"#).unwrap(),
            Some((3, true))
        );
        assert_eq!(
            handle_line(br#"{"type":"exit","exit_code":0}"#).unwrap(),
            Some((0, false))
        );
        assert_eq!(handle_line(br#"{"type":"progress","n":1}"#).unwrap(), None);
        let e = handle_line(br#"{"type":"error","code":"not_running","message":"m"}"#).unwrap_err();
        assert_eq!(e.to_string(), "not_running: m");
        assert!(handle_line(b"not json").is_err());
    }
}
