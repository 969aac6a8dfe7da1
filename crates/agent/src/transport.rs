//! Byte streams the HTTP/2 connection runs on.
//!
//! Owns: the unix-socket listener (`--listen`: one HTTP/2 connection per
//! accepted stream, served concurrently) and the character device (`--device`:
//! one connection at a time over e.g. a virtio-serial port, reopened 100 ms
//! after it ends), and serving an HTTP/2 (prior knowledge, no TLS) connection
//! over any such stream with [`crate::server::handle`].
//!
//! Must not: route or handle requests.

use std::convert::Infallible;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::unix::pipe;
use tokio::net::UnixListener;

use crate::server::{self, Agent};

/// Pause before reopening the device after a connection ended.
const REOPEN_DELAY: Duration = Duration::from_millis(100);

/// Serve one HTTP/2 connection until the peer goes away.
pub async fn serve_connection<IO>(io: IO, agent: Arc<Agent>) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let agent = agent.clone();
        async move { Ok::<_, Infallible>(server::handle(req, agent).await) }
    });
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .max_concurrent_streams(1024)
        .initial_stream_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024);
    builder.serve_connection(TokioIo::new(io), service).await
}

/// `--listen`: bind `path` (replacing a stale socket), mode 0600, and serve
/// every accepted connection concurrently. Only returns on a bind error.
pub async fn listen_unix(path: &Path, agent: Arc<Agent>) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    // Bind under a restrictive umask so the socket is never briefly 0777.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(stream, agent).await {
                        eprintln!("sandforge-agent: connection ended: {e}");
                    }
                });
            }
            Err(e) => {
                // E.g. EMFILE: back off instead of spinning.
                eprintln!("sandforge-agent: accept: {e}");
                tokio::time::sleep(REOPEN_DELAY).await;
            }
        }
    }
}

/// `--device`: serve one connection at a time over a character device,
/// forever (reopening it 100 ms after each connection ends).
pub async fn serve_device(path: &Path, agent: Arc<Agent>) -> io::Result<()> {
    // While no host is attached, the same failure repeats every 100 ms:
    // log a message only when it differs from the previous one.
    let mut last = String::new();
    loop {
        let msg = match open_device(path) {
            Ok(io) => match serve_connection(io, agent.clone()).await {
                Ok(()) => "connection closed".to_string(),
                Err(e) => format!("connection ended: {e}"),
            },
            Err(e) => format!("open {}: {e}", path.display()),
        };
        if msg != last {
            eprintln!("sandforge-agent: {msg}");
            last = msg;
        }
        tokio::time::sleep(REOPEN_DELAY).await;
    }
}

/// Open the device read/write and non-blocking, as one async stream: two fds
/// of the same open file, registered with the reactor for reading and writing
/// respectively (tokio's pipe types are thin wrappers over a non-blocking fd,
/// which is exactly what a virtio-serial port is; `tokio::fs::File` would not
/// do, it cannot read and write at the same time).
fn open_device(path: &Path) -> io::Result<tokio::io::Join<pipe::Receiver, pipe::Sender>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    let writer = file.try_clone()?;
    let rx = pipe::Receiver::from_file_unchecked(file)?;
    let tx = pipe::Sender::from_file_unchecked(writer)?;
    Ok(tokio::io::join(rx, tx))
}
