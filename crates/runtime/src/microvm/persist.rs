//! Stopping a VM to disk and starting it again where it was.
//!
//! Guest RAM is a shared file (`memory-backend-file,share=on`) on tmpfs,
//! and migration runs with `x-ignore-shared`, so the migration stream
//! carries only device state (tens of KB) while RAM is taken from, and
//! restored into, that file.
//!
//! Stop: QMP `stop`, migrate the device state to a unix socket the daemon
//! reads into `snap/state.<n>`, `quit`; then the RAM file becomes a layer
//! of the snapshot chain (`memsnap`: full the first time, the changed
//! pages after), the manifest is saved last, and the RAM file is deleted
//! (memory released).
//!
//! Start: compose the chain into a new RAM file, start QEMU with the same
//! command line plus `-incoming defer`, feed it the device state through
//! `migrate-incoming`, `cont`, and reconnect the agent (the serial
//! channel's SYNC/ACK handshake makes a fresh HTTP/2 session safe).
//!
//! QEMU 7.2 cannot migrate vhost-user-fs, so a VM with host mounts cannot
//! be stopped. Owns the `snap/` files and the `migrate.sock` socket.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::memsnap::{self, Manifest};
use super::{identity, qmp};
use crate::error::{Result, RuntimeError};

fn io<'a>(op: &'static str, p: &'a Path) -> impl FnOnce(std::io::Error) -> RuntimeError + 'a {
    move |e| RuntimeError::io(op, p, e)
}

/// In the VM's own directory: on restore QEMU creates it (`-incoming`).
pub fn migrate_socket(dir: &Path) -> PathBuf {
    super::identity::qemu_dir(dir).join("migrate.sock")
}

async fn set_ignore_shared(qmp_sock: &Path) -> Result<()> {
    qmp::execute(
        qmp_sock,
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
    )
    .await
    .map(|_| ())
}

/// Poll `query-migrate` until it completes (or fails).
async fn wait_migrated(qmp_sock: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = qmp::execute(qmp_sock, "query-migrate", None).await?;
        match v["status"].as_str() {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                return Err(RuntimeError::Setup(format!("migration {}", v)))
            }
            _ if Instant::now() > deadline => {
                return Err(RuntimeError::Setup(
                    "migration did not complete in 60 s".into(),
                ))
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Save the device state of the (running) VM into `snap/state.<n>` and
/// leave QEMU paused. Returns the file name.
pub async fn save_device_state(
    dir: &Path,
    qmp_sock: &Path,
    owner: Option<identity::VmIdentity>,
    n: usize,
) -> Result<String> {
    let snap = memsnap::dir(dir);
    std::fs::create_dir_all(&snap).map_err(io("mkdir", &snap))?;
    qmp::execute(qmp_sock, "stop", None).await?;
    set_ignore_shared(qmp_sock).await?;
    let sock = migrate_socket(dir);
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock).map_err(io("bind", &sock))?;
    if let Some(id) = owner {
        identity::give(&sock, id)?;
    }
    let uri = format!("unix:{}", sock.display());
    qmp::execute(qmp_sock, "migrate", Some(json!({ "uri": uri }))).await?;
    let (mut stream, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .map_err(|_| RuntimeError::Setup("QEMU did not connect to migrate".into()))?
        .map_err(io("accept", &sock))?;
    let name = format!("state.{n}");
    let path = snap.join(&name);
    let mut data = Vec::new();
    stream
        .read_to_end(&mut data)
        .await
        .map_err(io("read", &sock))?;
    wait_migrated(qmp_sock).await?;
    memsnap::write_atomic(&path, &data).map_err(io("write", &path))?;
    let _ = std::fs::remove_file(&sock);
    Ok(name)
}

/// After QEMU was started with `-incoming defer` on the composed RAM
/// file: feed it the device state and let it run.
pub async fn load_device_state(dir: &Path, qmp_sock: &Path, m: &Manifest) -> Result<()> {
    let state = m
        .device_state
        .as_ref()
        .ok_or_else(|| RuntimeError::Setup("the snapshot has no device state".into()))?;
    let data = std::fs::read(memsnap::dir(dir).join(state)).map_err(io("read", dir))?;
    // QMP is up once the socket answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    while set_ignore_shared(qmp_sock).await.is_err() {
        if Instant::now() > deadline {
            return Err(RuntimeError::Setup(
                "the restored QEMU never answered QMP".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sock = migrate_socket(dir);
    let _ = std::fs::remove_file(&sock);
    let uri = format!("unix:{}", sock.display());
    qmp::execute(qmp_sock, "migrate-incoming", Some(json!({ "uri": uri }))).await?;
    let mut stream = loop {
        match crate::sock::connect(&sock).await {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e) => return Err(RuntimeError::io("connect", &sock, e)),
        }
    };
    stream.write_all(&data).await.map_err(io("write", &sock))?;
    stream.shutdown().await.map_err(io("shutdown", &sock))?;
    drop(stream);
    loop {
        let st = qmp::execute(qmp_sock, "query-status", None).await?;
        match st["status"].as_str() {
            Some("running") => break,
            Some("paused") | Some("postmigrate") => {
                qmp::execute(qmp_sock, "cont", None).await?;
                break;
            }
            _ if Instant::now() > deadline => {
                return Err(RuntimeError::Setup(format!("restore stuck in {st}")))
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let _ = std::fs::remove_file(&sock);
    Ok(())
}
