//! File transfer and listing: `sandforge cp` (docker-cp style, one side is
//! `ID:/abs/path`, `-` for stdin/stdout) and `sandforge ls`.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use futures_util::StreamExt;
use reqwest::header::CONTENT_LENGTH;
use reqwest::{Body, Method, Response};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;

use super::out;
use crate::client::{query_value, sandbox_path, Client};
use crate::parse::{self, Location};

#[derive(Debug, Args)]
pub struct CpArgs {
    /// Source: a local path, `-` (stdin) or ID:/abs/path
    pub src: String,
    /// Destination: a local path, `-` (stdout) or ID:/abs/path
    pub dst: String,
    /// Mode of an uploaded file, octal (default: the local file's mode)
    #[arg(long, value_name = "MODE", value_parser = parse::mode)]
    pub mode: Option<u32>,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Sandbox id
    pub id: String,
    /// Absolute directory path inside the sandbox
    pub path: String,
    /// Print the JSON array instead of a listing
    #[arg(long)]
    pub json: bool,
}

/// One entry of `GET .../files?ls=true` (seed 002's shape; every field is
/// optional so a sentinel or newer entry still parses).
#[derive(Debug, Deserialize)]
struct LsEntry {
    #[serde(default)]
    name: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    is_dir: bool,
    #[serde(default)]
    mtime: Option<i64>,
}

pub async fn cp(client: &Client, args: CpArgs) -> Result<ExitCode> {
    match (parse::location(&args.src), parse::location(&args.dst)) {
        (Location::Remote { .. }, Location::Remote { .. }) => {
            bail!("copying between two sandboxes is not supported; one side must be local")
        }
        (src, Location::Remote { id, path }) => upload(client, src, &id, &path, args.mode).await?,
        (Location::Remote { id, path }, dst) => {
            if args.mode.is_some() {
                bail!("--mode applies to uploads only");
            }
            download(client, &id, &path, dst).await?
        }
        _ => bail!("one of SRC and DST must be a sandbox path, ID:/abs/path"),
    }
    Ok(ExitCode::SUCCESS)
}

fn files_path(id: &str, path: &str) -> String {
    sandbox_path(id, &format!("/files?path={}", query_value(path)))
}

async fn upload(
    client: &Client,
    src: Location,
    id: &str,
    path: &str,
    mode: Option<u32>,
) -> Result<()> {
    let (body, len, local_mode, name) = match &src {
        Location::Local(p) => {
            let file = tokio::fs::File::open(p)
                .await
                .with_context(|| format!("opening {p}"))?;
            let meta = file
                .metadata()
                .await
                .with_context(|| format!("reading {p}"))?;
            if !meta.is_file() {
                bail!("{p}: not a regular file (only single files can be copied)");
            }
            let body = Body::wrap_stream(ReaderStream::new(file));
            (
                body,
                meta.len(),
                Some(meta.permissions().mode() & 0o777),
                parse::basename(p),
            )
        }
        _ => {
            let mut data = Vec::new();
            tokio::io::stdin()
                .read_to_end(&mut data)
                .await
                .context("reading stdin")?;
            let len = data.len() as u64;
            (Body::from(data), len, None, None)
        }
    };
    let target = if path.ends_with('/') {
        let name = name.context("cannot copy stdin into a directory; name the file")?;
        format!("{path}{name}")
    } else {
        path.to_string()
    };
    let mut url = files_path(id, &target);
    if let Some(m) = mode.or(local_mode) {
        url.push_str(&format!("&mode={m:04o}"));
    }
    let rb = client
        .request(Method::PUT, &url)
        .header(CONTENT_LENGTH, len)
        .body(body);
    client.send(rb).await?;
    Ok(())
}

async fn download(client: &Client, id: &str, path: &str, dst: Location) -> Result<()> {
    let dst = match dst {
        Location::Local(p) => Some(local_target(PathBuf::from(p), path)?),
        _ => None,
    };
    let resp = client
        .send(client.request(Method::GET, &files_path(id, path)))
        .await?;
    let expected = header_u64(&resp, "x-file-size", 10);
    let remote_mode = header_u64(&resp, "x-file-mode", 8);
    let Some(dst) = dst else {
        let written = write_body(client, resp, &mut tokio::io::stdout()).await?;
        return check_size(written, expected);
    };
    let tmp = temp_beside(&dst)?;
    let result = async {
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .await
            .with_context(|| format!("creating {}", tmp.display()))?;
        let written = write_body(client, resp, &mut file).await?;
        file.sync_all()
            .await
            .with_context(|| format!("writing {}", tmp.display()))?;
        check_size(written, expected)?;
        if let Some(m) = remote_mode.filter(|m| *m <= 0o7777) {
            let perms = std::fs::Permissions::from_mode(m as u32);
            tokio::fs::set_permissions(&tmp, perms).await?;
        }
        tokio::fs::rename(&tmp, &dst)
            .await
            .with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Where a download lands: into `dst` when it is a directory (keeping the
/// remote file name), else at `dst` itself.
fn local_target(dst: PathBuf, remote: &str) -> Result<PathBuf> {
    if dst.is_dir() {
        let name = parse::basename(remote).with_context(|| format!("{remote} names no file"))?;
        return Ok(dst.join(name));
    }
    if dst.as_os_str().to_string_lossy().ends_with('/') {
        bail!("{}: no such directory", dst.display());
    }
    Ok(dst)
}

/// A hidden temporary name in the destination's directory, so the final
/// rename stays on one filesystem.
fn temp_beside(dst: &Path) -> Result<PathBuf> {
    let name = dst
        .file_name()
        .with_context(|| format!("{} names no file", dst.display()))?
        .to_string_lossy();
    let dir = dst
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(dir.join(format!(".{name}.sandforge-{}.tmp", std::process::id())))
}

async fn write_body<W: tokio::io::AsyncWrite + Unpin>(
    client: &Client,
    resp: Response,
    w: &mut W,
) -> Result<u64> {
    let mut stream = resp.bytes_stream();
    let mut written = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| client.transport_error(e))?;
        w.write_all(&chunk)
            .await
            .context("writing the downloaded file")?;
        written += chunk.len() as u64;
    }
    w.flush().await.context("writing the downloaded file")?;
    Ok(written)
}

fn check_size(written: u64, expected: Option<u64>) -> Result<()> {
    match expected {
        Some(size) if size != written => {
            bail!("short download: got {written} of {size} bytes")
        }
        _ => Ok(()),
    }
}

fn header_u64(resp: &Response, name: &str, radix: u32) -> Option<u64> {
    let v = resp.headers().get(name)?.to_str().ok()?;
    u64::from_str_radix(v.trim(), radix).ok()
}

pub async fn ls(client: &Client, args: LsArgs) -> Result<ExitCode> {
    let url = format!("{}&ls=true", files_path(&args.id, &args.path));
    let v: serde_json::Value = client.json(client.request(Method::GET, &url)).await?;
    if args.json {
        out(&format!("{}\n", serde_json::to_string_pretty(&v)?))?;
        return Ok(ExitCode::SUCCESS);
    }
    let entries: Vec<LsEntry> =
        serde_json::from_value(v).context("unexpected directory listing from the server")?;
    let mut text = Vec::new();
    let width = entries
        .iter()
        .map(|e| e.size.to_string().len())
        .max()
        .unwrap_or(1);
    for e in &entries {
        let suffix = if e.is_dir { "/" } else { "" };
        writeln!(
            text,
            "{} {:>width$} {} {}{suffix}",
            mode_string(e.is_dir, e.mode.as_deref()),
            e.size,
            mtime_string(e.mtime),
            e.name,
        )?;
    }
    out(&String::from_utf8_lossy(&text))?;
    Ok(ExitCode::SUCCESS)
}

/// `0755` + directory → `drwxr-xr-x`; an unparsable mode prints as given.
fn mode_string(is_dir: bool, mode: Option<&str>) -> String {
    let kind = if is_dir { 'd' } else { '-' };
    let Some(bits) = mode.and_then(|m| u32::from_str_radix(m, 8).ok()) else {
        return format!("{kind}{:<9}", mode.unwrap_or("?"));
    };
    let mut s = String::from(kind);
    for shift in [6, 3, 0] {
        let b = (bits >> shift) & 7;
        s.push(if b & 4 != 0 { 'r' } else { '-' });
        s.push(if b & 2 != 0 { 'w' } else { '-' });
        s.push(if b & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn mtime_string(mtime: Option<i64>) -> String {
    mtime
        .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_else(|| "-".repeat(16))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_times() {
        assert_eq!(mode_string(true, Some("0755")), "drwxr-xr-x");
        assert_eq!(mode_string(false, Some("0640")), "-rw-r-----");
        assert_eq!(mode_string(false, None), "-?        ");
        assert_eq!(mtime_string(Some(0)), "1970-01-01 00:00");
        assert_eq!(mtime_string(None).len(), 16);
    }

    #[test]
    fn temp_names() {
        let t = temp_beside(Path::new("out.txt")).unwrap();
        assert_eq!(t.parent(), Some(Path::new(".")));
        assert!(t
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(".out.txt.sandforge-"));
        let t = temp_beside(Path::new("/a/b")).unwrap();
        assert_eq!(t.parent(), Some(Path::new("/a")));
        assert_eq!(files_path("x", "/a b"), "/v1/sandboxes/x/files?path=/a%20b");
    }
}
