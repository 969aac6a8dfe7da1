//! One module per group of subcommands. Each owns its clap argument structs
//! and an async `run`-style function returning the process exit code.

pub mod exec;
pub mod files;
pub mod sandbox;
pub mod serve;
pub mod shell;
pub mod template;

use std::io::{self, Write};
use std::process::ExitCode;

use reqwest::Method;

use crate::client::Client;

/// Writes `text` to stdout and flushes it.
pub fn out(text: &str) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()
}

/// Writes `text` to stderr and flushes it.
pub fn err(text: &str) -> io::Result<()> {
    let mut stderr = io::stderr().lock();
    stderr.write_all(text.as_bytes())?;
    stderr.flush()
}

/// `DELETE`s each path in turn (`path(id)`): a failure is reported and the
/// rest still go; the exit code is 1 if any failed.
pub async fn delete_each(
    client: &Client,
    ids: &[String],
    path: impl Fn(&str) -> String,
) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for id in ids {
        match client.send(client.request(Method::DELETE, &path(id))).await {
            Ok(_) => out(&format!("{id}\n"))?,
            Err(e) => {
                failed = true;
                err(&format!("error: {id}: {e:#}\n"))?;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
