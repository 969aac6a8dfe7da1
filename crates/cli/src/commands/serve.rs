//! `sandforge serve` (runs the supervisor in-process) and
//! `sandforge token create` (mints an API token in the state directory).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use sandforge_server::ServeOptions;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (default from the config file, else 127.0.0.1:8585)
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Directory holding the state database, tokens and sandbox files
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// YAML configuration file
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an API token for an organization; prints only the token
    Create {
        /// Organization the token belongs to
        #[arg(long, value_name = "NAME")]
        org: String,
        /// The server's state directory
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
    },
}

pub async fn serve(args: ServeArgs) -> Result<ExitCode> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    sandforge_server::serve(ServeOptions {
        listen: args.listen,
        state_dir: args.state_dir,
        config: args.config,
    })
    .await
    .context("server failed")?;
    Ok(ExitCode::SUCCESS)
}

pub fn token(cmd: TokenCommand) -> Result<ExitCode> {
    match cmd {
        TokenCommand::Create { org, state_dir } => {
            let token = sandforge_server::create_token(&state_dir, &org).with_context(|| {
                format!("creating a token for {org:?} in {}", state_dir.display())
            })?;
            super::out(&format!("{token}\n"))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
