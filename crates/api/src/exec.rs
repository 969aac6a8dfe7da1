//! Exec requests: seed 000's `/execute` (a shell command) and seed 002's
//! `/exec` (an argv array, buffered or streamed as ndjson).

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
}

/// What both exec flavours boil down to once validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidExec {
    pub argv: Vec<String>,
    pub timeout_seconds: u64,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub stdin: Option<String>,
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
        Ok(ValidExec {
            argv: vec!["/bin/sh".into(), "-c".into(), command],
            timeout_seconds,
            env: self.env,
            cwd: self.cwd,
            stdin: None,
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
        Ok(ValidExec {
            argv,
            timeout_seconds,
            env: self.env,
            cwd: self.cwd,
            stdin: self.stdin,
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
