//! Exec requests: seed 000's `/execute` (a shell command) and seed 002's
//! `/exec` (an argv array, buffered or streamed as ndjson). Both take a
//! `user` (also spelled `username`, as E2B's SDK does): a name, a uid as a
//! number or a numeric string, or `user:group`; only its syntax is checked
//! here, the sandbox's agent resolves it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{limits, validate_env, Invalid};

/// `POST /v1/sandboxes/{id}/execute` (seed 000/001).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ExecuteRequest {
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Run as this user; the template's default user (root for the
    /// built-in templates) when absent.
    #[serde(default, alias = "username", skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
}

/// `POST /v1/sandboxes/{id}/exec` (seed 002).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Text fed to the command's stdin (then closed).
    #[serde(default)]
    pub stdin: Option<String>,
    /// Run as this user; the template's default user (root for the
    /// built-in templates) when absent.
    #[serde(default, alias = "username", skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
}

/// A `user` as a request spells it: a name (or `user:group`, or a numeric
/// string) or a uid as a JSON number.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum User {
    Id(u64),
    Name(String),
}

/// Longest `user` accepted.
pub const MAX_USER_BYTES: usize = 256;

/// Check a `user` part: a uid/gid below 2^32-1, or a name without spaces,
/// colons or control characters.
fn user_part_ok(s: &str) -> bool {
    if s.is_empty() {
        return false;
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<u32>().is_ok_and(|n| n != u32::MAX);
    }
    !s.chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == ':')
}

impl User {
    /// The user as the agent takes it (`name`, `uid`, `user:group`), or
    /// why it is not one (`field` names it in the error).
    pub fn validate(&self, field: &str) -> Result<String, Invalid> {
        let bad = || {
            Invalid::new(
                field,
                "must be a user name, a uid (a number below 4294967295) or user:group",
            )
        };
        match self {
            User::Id(n) if *n < u64::from(u32::MAX) => Ok(n.to_string()),
            User::Id(_) => Err(bad()),
            User::Name(s) => {
                let ok = s.len() <= MAX_USER_BYTES
                    && match s.split_once(':') {
                        Some((u, g)) => user_part_ok(u) && user_part_ok(g),
                        None => user_part_ok(s),
                    };
                if ok {
                    Ok(s.clone())
                } else {
                    Err(bad())
                }
            }
        }
    }
}

/// What both exec flavours boil down to once validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidExec {
    pub argv: Vec<String>,
    pub timeout_seconds: u64,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub stdin: Option<String>,
    /// The request's user (validated syntax), `None` for the default.
    pub user: Option<String>,
}

fn validate_common(
    timeout: Option<u64>,
    env: &BTreeMap<String, String>,
    cwd: &Option<String>,
) -> Result<u64, Invalid> {
    let timeout = timeout.unwrap_or(limits::DEFAULT_EXEC_TIMEOUT_SECS);
    if timeout == 0 || timeout > limits::MAX_EXEC_TIMEOUT_SECS {
        return Err(Invalid::new(
            "timeout_seconds",
            format!(
                "must be between 1 and {} seconds",
                limits::MAX_EXEC_TIMEOUT_SECS
            ),
        ));
    }
    validate_env("env", env)?;
    if let Some(cwd) = cwd {
        if !cwd.starts_with('/') || cwd.contains('\0') || cwd.len() > 4096 {
            return Err(Invalid::new("cwd", "must be an absolute path"));
        }
    }
    Ok(timeout)
}

impl ExecuteRequest {
    pub fn validate(self) -> Result<ValidExec, Invalid> {
        let command = match self.command {
            Some(c) if !c.trim().is_empty() => c,
            _ => return Err(Invalid::new("command", "is required and must not be empty")),
        };
        if command.len() > limits::MAX_COMMAND_BYTES || command.contains('\0') {
            return Err(Invalid::new(
                "command",
                format!(
                    "must be at most {} bytes with no NUL",
                    limits::MAX_COMMAND_BYTES
                ),
            ));
        }
        let timeout_seconds = validate_common(self.timeout_seconds, &self.env, &self.cwd)?;
        let user = self.user.map(|u| u.validate("user")).transpose()?;
        Ok(ValidExec {
            argv: vec!["/bin/sh".into(), "-c".into(), command],
            timeout_seconds,
            env: self.env,
            cwd: self.cwd,
            stdin: None,
            user,
        })
    }
}

impl ExecRequest {
    pub fn validate(self) -> Result<ValidExec, Invalid> {
        let argv = match self.cmd {
            Some(a) if !a.is_empty() && !a[0].is_empty() => a,
            _ => {
                return Err(Invalid::new(
                    "cmd",
                    "is required: a non-empty array of strings",
                ))
            }
        };
        let total: usize = argv.iter().map(|a| a.len() + 1).sum();
        if argv.len() > limits::MAX_ARGV || total > limits::MAX_COMMAND_BYTES {
            return Err(Invalid::new("cmd", "argument list too long"));
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return Err(Invalid::new("cmd", "arguments must not contain NUL"));
        }
        if self
            .stdin
            .as_ref()
            .is_some_and(|s| s.len() > limits::MAX_STDIN_BYTES)
        {
            return Err(Invalid::new(
                "stdin",
                format!("at most {} bytes", limits::MAX_STDIN_BYTES),
            ));
        }
        let timeout_seconds = validate_common(self.timeout_seconds, &self.env, &self.cwd)?;
        let user = self.user.map(|u| u.validate("user")).transpose()?;
        Ok(ValidExec {
            argv,
            timeout_seconds,
            env: self.env,
            cwd: self.cwd,
            stdin: self.stdin,
            user,
        })
    }
}

/// Response of `/execute`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExecuteResponse {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    /// True when stdout or stderr was cut at the buffered-output limit.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// Buffered response of `/exec` (same fields as `/execute`).
pub type ExecResponse = ExecuteResponse;

/// One ndjson line of a streamed `/exec`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    Exit {
        exit_code: i32,
        #[serde(default)]
        timed_out: bool,
    },
    Error {
        code: String,
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn execute_validation() {
        let ok = ExecuteRequest {
            command: Some("echo hi".into()),
            ..Default::default()
        };
        let v = ok.validate().unwrap();
        assert_eq!(v.argv, vec!["/bin/sh", "-c", "echo hi"]);
        assert_eq!(v.timeout_seconds, 60);

        let missing = ExecuteRequest::default().validate().unwrap_err();
        assert_eq!(missing.field, "command");

        let too_long = ExecuteRequest {
            command: Some("true".into()),
            timeout_seconds: Some(301),
            ..Default::default()
        };
        assert_eq!(too_long.validate().unwrap_err().field, "timeout_seconds");

        let mut env = BTreeMap::new();
        env.insert("1BAD".into(), "x".into());
        let bad_env = ExecuteRequest {
            command: Some("true".into()),
            env,
            ..Default::default()
        };
        assert_eq!(bad_env.validate().unwrap_err().field, "env.1BAD");
    }

    #[test]
    fn exec_validation() {
        assert_eq!(ExecRequest::default().validate().unwrap_err().field, "cmd");
        let empty = ExecRequest {
            cmd: Some(vec![]),
            ..Default::default()
        };
        assert_eq!(empty.validate().unwrap_err().field, "cmd");
        let rel = ExecRequest {
            cmd: Some(vec!["ls".into()]),
            cwd: Some("tmp".into()),
            ..Default::default()
        };
        assert_eq!(rel.validate().unwrap_err().field, "cwd");
    }

    #[test]
    fn users() {
        let parse = |v: &str| {
            let body = format!(r#"{{"command":"id","user":{v}}}"#);
            serde_json::from_str::<ExecuteRequest>(&body)
                .map_err(|e| e.to_string())
                .and_then(|r| r.validate().map_err(|e| e.field))
                .map(|v| v.user)
        };
        assert_eq!(parse(r#""user""#), Ok(Some("user".into())));
        assert_eq!(parse("1000"), Ok(Some("1000".into())));
        assert_eq!(parse(r#""1000""#), Ok(Some("1000".into())));
        assert_eq!(parse(r#""user:staff""#), Ok(Some("user:staff".into())));
        for bad in [
            "\"\"",
            r#""a b""#,
            r#"":x""#,
            r#""a:b:c""#,
            "4294967295",
            r#""4294967295""#,
        ] {
            assert_eq!(parse(bad), Err("user".to_string()), "{bad}");
        }
        assert!(parse("-1").is_err() && parse("true").is_err());
        // E2B's SDK spells it `username`.
        let r: ExecRequest = serde_json::from_str(r#"{"cmd":["id"],"username":"user"}"#).unwrap();
        assert_eq!(r.validate().unwrap().user.as_deref(), Some("user"));
        assert_eq!(
            ExecuteRequest {
                command: Some("id".into()),
                ..Default::default()
            }
            .validate()
            .unwrap()
            .user,
            None
        );
    }

    #[test]
    fn event_shape() {
        let e = ExecEvent::Exit {
            exit_code: 0,
            timed_out: false,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"exit","exit_code":0,"timed_out":false}"#
        );
        let e = ExecEvent::Stdout {
            data: "hi\n".into(),
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"stdout","data":"hi\n"}"#
        );
    }
}
