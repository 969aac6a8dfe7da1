//! `template ls|get|pull|import|build|save|logs|rm`: the template
//! registry. An import uploads an image archive with a byte progress bar.
//! A pull, an import, a Dockerfile build or a sandbox save follows the
//! build's ndjson log with a progress bar (`indicatif`, on stderr, hidden
//! when stderr is not a terminal; a build's step output goes to stderr) and
//! exits 0 once the template is `ready`, 1 when it `failed` (the reason on
//! stderr).

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Method;
use sandforge_api::{CreateTemplate, Template, TemplateStatus};
use serde_json::Value;

use super::{err, out};
use crate::client::{query_value, Client};

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// List the templates (built-in and the organization's)
    Ls {
        /// Print the JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show one template (id, name or alias) as JSON
    Get { id: String },
    /// Make a template of an OCI image pulled from a registry
    Pull(PullArgs),
    /// Build a template from a Dockerfile (FROM, RUN, COPY, ENV, WORKDIR,
    /// USER) in a builder sandbox
    Build(BuildArgs),
    /// Save a sandbox's filesystem (running or stopped) as a template
    Save(SaveArgs),
    /// Make a template of an image archive (`docker save` tar or OCI archive)
    Import(ImportArgs),
    /// Print a template's build log (ndjson), following a running build
    Logs { id: String },
    /// Delete templates (id or name)
    #[command(alias = "delete")]
    Rm {
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Image reference, e.g. localhost:5000/team/python:3.12
    pub image: String,
    /// Template name (unique in the organization)
    #[arg(long)]
    pub name: String,
    /// Return once the pull has started, without waiting for it
    #[arg(long)]
    pub no_wait: bool,
    /// Print the template as JSON at the end instead of its id
    #[arg(long)]
    pub json: bool,
    /// Registry user name (the password comes from --password-stdin or
    /// SANDFORGE_REGISTRY_PASSWORD; it is used for this pull only)
    #[arg(long)]
    pub username: Option<String>,
    /// Read the registry password from the first line of stdin
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
    /// Default vCPUs of the sandboxes made from it
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Default memory (MiB) of the sandboxes made from it
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// Default root disk size (MiB) of the sandboxes made from it
    #[arg(long)]
    pub disk_mb: Option<u64>,
}

/// The credentials a pull was given on the command line.
fn credentials(a: &PullArgs) -> Result<Option<sandforge_api::RegistryCredentials>> {
    let Some(username) = a.username.clone() else {
        return Ok(None);
    };
    let password = if a.password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        line.trim_end_matches(['\r', '\n']).to_string()
    } else {
        std::env::var("SANDFORGE_REGISTRY_PASSWORD").context(
            "--username needs a password: --password-stdin or SANDFORGE_REGISTRY_PASSWORD",
        )?
    };
    Ok(Some(sandforge_api::RegistryCredentials {
        username,
        password,
    }))
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The build context: a directory COPY takes files from (sent as a
    /// tar.gz; symlinks are not followed)
    #[arg(default_value = ".")]
    pub context: std::path::PathBuf,
    /// Template name (unique in the organization)
    #[arg(long)]
    pub name: String,
    /// The Dockerfile (default: CONTEXT/Dockerfile)
    #[arg(long, short = 'f')]
    pub file: Option<std::path::PathBuf>,
    /// Return once the build has started, without waiting for it
    #[arg(long)]
    pub no_wait: bool,
    /// Print the template as JSON at the end instead of its id
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SaveArgs {
    /// The sandbox to save
    pub sandbox: String,
    /// Template name (unique in the organization)
    #[arg(long)]
    pub name: String,
    /// Return once the save has started, without waiting for it
    #[arg(long)]
    pub no_wait: bool,
    /// Print the template as JSON at the end instead of its id
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The archive file (`docker save` output, or an OCI archive)
    pub file: std::path::PathBuf,
    /// Template name (unique in the organization)
    #[arg(long)]
    pub name: String,
    /// Return once the upload is done, without waiting for the import
    #[arg(long)]
    pub no_wait: bool,
    /// Print the template as JSON at the end instead of its id
    #[arg(long)]
    pub json: bool,
}

fn path(id: &str, suffix: &str) -> String {
    format!("/v1/templates/{}{suffix}", query_value(id))
}

pub async fn run(client: &Client, cmd: TemplateCommand) -> Result<ExitCode> {
    match cmd {
        TemplateCommand::Ls { json } => {
            let v: Value = client
                .json(client.request(Method::GET, "/v1/templates"))
                .await?;
            if json {
                out(&format!("{}\n", serde_json::to_string_pretty(&v)?))?;
            } else {
                let list: Vec<Template> =
                    serde_json::from_value(v).context("unexpected template list")?;
                out(&table(&list))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        TemplateCommand::Get { id } => {
            let v: Value = client
                .json(client.request(Method::GET, &path(&id, "")))
                .await?;
            out(&format!("{}\n", serde_json::to_string_pretty(&v)?))?;
            Ok(ExitCode::SUCCESS)
        }
        TemplateCommand::Pull(a) => pull(client, a).await,
        TemplateCommand::Build(a) => build(client, a).await,
        TemplateCommand::Save(a) => {
            let t: Template = client
                .json(
                    client
                        .request(
                            Method::POST,
                            &format!("/v1/sandboxes/{}/template", query_value(&a.sandbox)),
                        )
                        .json(&serde_json::json!({ "name": a.name })),
                )
                .await?;
            conclude(client, t, a.no_wait, a.json).await
        }
        TemplateCommand::Import(a) => import(client, a).await,
        TemplateCommand::Logs { id } => {
            let resp = client
                .send(client.request(Method::GET, &path(&id, "/logs")))
                .await?;
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                out(&String::from_utf8_lossy(&chunk.context("reading the log")?))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        TemplateCommand::Rm { ids } => super::delete_each(client, &ids, |id| path(id, "")).await,
    }
}

async fn pull(client: &Client, a: PullArgs) -> Result<ExitCode> {
    let body = CreateTemplate {
        credentials: credentials(&a)?,
        name: a.name,
        image: Some(a.image),
        source: None,
        cpu: None,
        cpus: a.cpus,
        memory_mb: a.memory_mb,
        disk_mb: a.disk_mb,
        egress: None,
        ..Default::default()
    };
    let t: Template = client
        .json(client.request(Method::POST, "/v1/templates").json(&body))
        .await?;
    conclude(client, t, a.no_wait, a.json).await
}

/// A tar.gz of `dir` (symlinks kept as links, which the build ignores).
fn context_archive(dir: &std::path::Path) -> Result<Vec<u8>> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    b.follow_symlinks(false);
    b.append_dir_all(".", dir)
        .with_context(|| format!("archiving {}", dir.display()))?;
    Ok(b.into_inner()?.finish()?)
}

async fn build(client: &Client, a: BuildArgs) -> Result<ExitCode> {
    use base64::Engine;
    let file = a
        .file
        .clone()
        .unwrap_or_else(|| a.context.join("Dockerfile"));
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let archive = context_archive(&a.context)?;
    let body = CreateTemplate {
        name: a.name,
        image: None,
        source: None,
        dockerfile: Some(text),
        context: Some(base64::engine::general_purpose::STANDARD.encode(archive)),
        ..Default::default()
    };
    let t: Template = client
        .json(client.request(Method::POST, "/v1/templates").json(&body))
        .await?;
    conclude(client, t, a.no_wait, a.json).await
}

/// Follow a new template's build (unless `no_wait`), print it, exit 1 if
/// it failed.
async fn conclude(client: &Client, t: Template, no_wait: bool, json: bool) -> Result<ExitCode> {
    if !no_wait {
        follow(client, &t.id).await?;
    }
    let t: Template = client
        .json(client.request(Method::GET, &path(&t.id, "")))
        .await?;
    if json {
        out(&format!("{}\n", serde_json::to_string_pretty(&t)?))?;
    } else {
        out(&format!("{}\n", t.id))?;
    }
    match t.status {
        TemplateStatus::Failed => {
            err(&format!(
                "error: template {} failed: {}\n",
                t.name,
                t.status_reason.as_deref().unwrap_or("no reason given")
            ))?;
            Ok(ExitCode::FAILURE)
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// Upload the archive (streamed, a progress bar over its bytes), then as a
/// pull.
async fn import(client: &Client, a: ImportArgs) -> Result<ExitCode> {
    let f = tokio::fs::File::open(&a.file)
        .await
        .with_context(|| format!("opening {}", a.file.display()))?;
    let len = f
        .metadata()
        .await
        .with_context(|| format!("reading {}", a.file.display()))?
        .len();
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} uploading [{bar:30}] {bytes}/{total_bytes}")
            .context("progress style")?
            .progress_chars("=> "),
    );
    let counter = bar.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(f, 256 << 10).inspect(move |c| {
        if let Ok(c) = c {
            counter.inc(c.len() as u64);
        }
    });
    let rb = client
        .request(
            Method::POST,
            &format!("/v1/templates/import?name={}", query_value(&a.name)),
        )
        .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
        .body(reqwest::Body::wrap_stream(stream));
    let t: Result<Template> = client.json(rb).await;
    bar.finish_and_clear();
    conclude(client, t?, a.no_wait, a.json).await
}

/// Follow the build log, drawing a byte progress bar over the layers.
async fn follow(client: &Client, id: &str) -> Result<()> {
    let resp = client
        .send(client.request(Method::GET, &path(id, "/logs")))
        .await?;
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {bytes}/{total_bytes}")
            .context("progress style")?
            .progress_chars("=> "),
    );
    let mut sizes = std::collections::HashMap::<String, (u64, u64)>::new();
    let (mut steps, mut step) = (0u64, 0u64);
    let mut pending = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        pending.extend_from_slice(&chunk.context("reading the build log")?);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let Ok(ev) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            let digest = ev["digest"].as_str().unwrap_or("").to_string();
            let short = digest
                .trim_start_matches("sha256:")
                .chars()
                .take(12)
                .collect::<String>();
            match ev["event"].as_str().unwrap_or("") {
                "resolved" => bar.set_message(format!("resolved, {} layers", ev["layers"])),
                "layer_downloading" | "layer_cached" => {
                    let size = ev["size"].as_u64().unwrap_or(0);
                    let done = if ev["event"] == "layer_cached" {
                        size
                    } else {
                        0
                    };
                    sizes.insert(digest, (done, size));
                    bar.set_message(format!("layer {short}"));
                }
                "layer_progress" => {
                    if let Some(s) = sizes.get_mut(&digest) {
                        s.0 = ev["done"].as_u64().unwrap_or(s.0);
                    }
                }
                "layer_downloaded" => {
                    if let Some(s) = sizes.get_mut(&digest) {
                        s.0 = s.1;
                    }
                }
                "layer_unpacking" => bar.set_message(format!("unpacking {short}")),
                "build" => {
                    steps = ev["steps"].as_u64().unwrap_or(0);
                    bar.set_message(format!("FROM {}", ev["from"].as_str().unwrap_or("")));
                }
                "step" => {
                    step = ev["step"].as_u64().unwrap_or(step);
                    bar.set_message(format!(
                        "step {step}/{steps}: {}",
                        ev["text"].as_str().unwrap_or("")
                    ));
                }
                "output" => {
                    let text = ev["text"].as_str().unwrap_or("").to_string();
                    bar.suspend(|| eprint!("{text}"));
                }
                "save" | "commit" => bar.set_message("saving the filesystem"),
                "ready" => bar.set_message("ready"),
                "failed" => bar.set_message("failed"),
                _ => {}
            }
            if steps > 0 {
                bar.set_length(steps);
                bar.set_position(step.saturating_sub(1));
            } else {
                bar.set_length(sizes.values().map(|s| s.1).sum());
                bar.set_position(sizes.values().map(|s| s.0).sum());
            }
        }
    }
    bar.finish_and_clear();
    Ok(())
}

fn table(list: &[Template]) -> String {
    let mut s = format!(
        "{:<20} {:<20} {:<9} {:>10}  {}\n",
        "ID", "NAME", "STATUS", "SIZE", "SOURCE"
    );
    for t in list {
        let source = match &t.source {
            sandforge_api::TemplateSource::Builtin => "builtin".to_string(),
            sandforge_api::TemplateSource::Image { reference } => reference.clone(),
            sandforge_api::TemplateSource::Sandbox { sandbox_id, .. } => {
                format!("sandbox {sandbox_id}")
            }
            sandforge_api::TemplateSource::Dockerfile { from } => format!("dockerfile FROM {from}"),
            sandforge_api::TemplateSource::Archive => "archive".to_string(),
        };
        s.push_str(&format!(
            "{:<20} {:<20} {:<9} {:>9}M  {}\n",
            t.id,
            t.name,
            t.status.as_str(),
            t.size_bytes >> 20,
            source
        ));
    }
    s
}
