//! One module per group of subcommands. Each owns its clap argument structs
//! and an async `run`-style function returning the process exit code.

pub mod exec;
pub mod files;
pub mod sandbox;
pub mod serve;
pub mod shell;
pub mod template;

use std::io::{self, Write};

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
