//! A minimal QMP client: one command per connection on the VM's QMP unix
//! socket (greeting, `qmp_capabilities`, the command). Owns nothing else.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::error::{Result, RuntimeError};

fn err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Command {
        tool: "qmp".into(),
        message: e.to_string(),
    }
}

type Lines = tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>;

/// The next reply, skipping asynchronous events.
async fn next(lines: &mut Lines) -> Result<Value> {
    loop {
        let line = lines
            .next_line()
            .await
            .map_err(err)?
            .ok_or_else(|| err("QMP closed"))?;
        let v: Value = serde_json::from_str(&line).map_err(err)?;
        if v.get("event").is_none() {
            return Ok(v);
        }
    }
}

/// Run `command` (with optional `arguments`) and return its `return` value.
pub async fn execute(socket: &Path, command: &str, arguments: Option<Value>) -> Result<Value> {
    tokio::time::timeout(Duration::from_secs(5), async {
        let stream = crate::sock::connect(socket).await.map_err(err)?;
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        next(&mut lines).await?; // greeting
        w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .await
            .map_err(err)?;
        next(&mut lines).await?;
        let mut cmd = json!({ "execute": command });
        if let Some(a) = arguments {
            cmd["arguments"] = a;
        }
        w.write_all(format!("{cmd}\n").as_bytes())
            .await
            .map_err(err)?;
        let v = next(&mut lines).await?;
        match v.get("return") {
            Some(r) => Ok(r.clone()),
            None => Err(err(format!("{command}: {v}"))),
        }
    })
    .await
    .map_err(|_| err(format!("{command}: no answer within 5s")))?
}
