//! `sandforge`: runs the Sandforge supervisor (`serve`), mints API tokens
//! (`token create`) and drives the HTTP API (everything else).
//!
//! This file owns the top-level arguments and the dispatch; each group of
//! subcommands lives in `commands/`, the HTTP plumbing in `client.rs` and the
//! parsing of flag values in `parse.rs`.

mod client;
mod commands;
mod parse;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use client::{ApiError, Client, DEFAULT_URL};
use commands::{exec, files, sandbox, serve, shell, template};

#[derive(Debug, Parser)]
#[command(
    name = "sandforge",
    version,
    about = "Isolated Linux sandboxes behind a local HTTP API"
)]
struct Cli {
    /// Server URL
    #[arg(long, global = true, env = "SANDFORGE_URL", default_value = DEFAULT_URL)]
    url: String,
    /// API token, sent as `Authorization: Bearer`
    #[arg(long, global = true, env = "SANDFORGE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the supervisor daemon
    Serve(serve::ServeArgs),
    /// Manage API tokens
    #[command(subcommand)]
    Token(serve::TokenCommand),
    /// Check that the server is up
    Health(sandbox::HealthArgs),
    /// Create a sandbox and print its id
    Create(sandbox::CreateArgs),
    /// List sandboxes
    List(sandbox::ListArgs),
    /// Show one sandbox as JSON
    Get(sandbox::GetArgs),
    /// Destroy sandboxes
    Rm(sandbox::RmArgs),
    /// Run a command (argv) in a sandbox, streaming its output
    Exec(exec::ExecArgs),
    /// Run a shell command in a sandbox and print its output
    Execute(exec::ExecuteArgs),
    /// Copy a file into or out of a sandbox (one side is ID:/abs/path)
    Cp(files::CpArgs),
    /// List a directory inside a sandbox
    Ls(files::LsArgs),
    /// Open an interactive terminal in a sandbox (exit code = the remote one)
    Shell(shell::ShellArgs),
    /// Templates: ls, get, pull (with a progress bar), logs, rm
    #[command(subcommand)]
    Template(template::TemplateCommand),
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let api = match cli.command {
        Command::Serve(args) => return serve::serve(args).await,
        Command::Token(cmd) => return serve::token(cmd),
        api => api,
    };
    let client = Client::new(&cli.url, cli.token)?;
    match api {
        Command::Health(a) => sandbox::health(&client, a).await,
        Command::Create(a) => sandbox::create(&client, a).await,
        Command::List(a) => sandbox::list(&client, a).await,
        Command::Get(a) => sandbox::get(&client, a).await,
        Command::Rm(a) => sandbox::rm(&client, a).await,
        Command::Exec(a) => exec::exec(&client, a).await,
        Command::Execute(a) => exec::execute(&client, a).await,
        Command::Cp(a) => files::cp(&client, a).await,
        Command::Ls(a) => files::ls(&client, a).await,
        Command::Shell(a) => shell::shell(&client, a).await,
        Command::Template(c) => template::run(&client, c).await,
        Command::Serve(_) | Command::Token(_) => unreachable!("handled above"),
    }
}

/// Prints an error: `error: <code>: <message>` for API errors, the cause
/// chain otherwise. A closed stdout (`sandforge list | head`) is not reported.
fn report(e: &anyhow::Error) {
    let broken_pipe = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    });
    if broken_pipe {
        return;
    }
    match e.downcast_ref::<ApiError>() {
        Some(api) => eprintln!("error: {api}"),
        None => eprintln!("error: {e:#}"),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exec_takes_argv_after_id() {
        let cli = Cli::try_parse_from([
            "sandforge",
            "exec",
            "--timeout",
            "5",
            "sb1",
            "--",
            "ls",
            "-la",
        ])
        .unwrap();
        let Command::Exec(a) = cli.command else {
            panic!("not exec")
        };
        assert_eq!((a.id.as_str(), a.opts.timeout), ("sb1", Some(5)));
        assert_eq!(a.cmd, ["ls", "-la"]);
        let cli = Cli::try_parse_from(["sandforge", "exec", "sb1", "--", "sh", "-c", "echo --env"])
            .unwrap();
        let Command::Exec(a) = cli.command else {
            panic!("not exec")
        };
        assert_eq!(a.cmd, ["sh", "-c", "echo --env"]);
        assert!(a.opts.env.is_empty());
    }
}
