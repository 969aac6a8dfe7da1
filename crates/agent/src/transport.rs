//! Byte streams the HTTP/2 connection runs on.
//!
//! Owns: the unix-socket listener (`--listen`: one HTTP/2 connection per
//! accepted stream, served concurrently) and the character device (`--device`:
//! one connection at a time over a virtio-serial port, kept open across host
//! reconnects, each connection delimited by the port's host hang-up state),
//! and serving an HTTP/2 (prior knowledge, no TLS) connection over any such
//! stream with [`crate::server::handle`].
//!
//! Must not: route or handle requests.

use std::convert::Infallible;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixListener;

use crate::server::{self, Agent};

/// Pause before accepting again after an error, or reopening the device.
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

/// `--device`: serve one host connection at a time over a character device
/// (a virtio-serial port), forever. See [`serve_port`] for how connections
/// are told apart; the device is only reopened if it fails.
pub async fn serve_device(path: &Path, agent: Arc<Agent>) -> io::Result<()> {
    // While the device cannot be opened the same failure repeats every
    // 100 ms: log a message only when it differs from the previous one.
    let mut last = String::new();
    let mut note = move |msg: String| {
        if msg != last {
            eprintln!("sandforge-agent: {msg}");
            last = msg;
        }
    };
    loop {
        let msg = match open_device(path) {
            Ok(file) => match serve_port(&file, &agent, &mut note).await {
                Ok(never) => match never {},
                Err(e) => format!("{}: {e}", path.display()),
            },
            Err(e) => format!("open {}: {e}", path.display()),
        };
        note(msg);
        tokio::time::sleep(REOPEN_DELAY).await;
    }
}

/// Open the device read/write and non-blocking.
fn open_device(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
}

/// How often the state of the host end is polled while waiting for it.
const HOST_POLL: Duration = Duration::from_millis(20);

/// Serve host connections on an open virtio-serial port until it fails.
///
/// The port stays open the whole time: closing it makes the guest kernel
/// discard whatever the host already sent, which could be the preface of
/// the next connection. A virtio-serial port reports `POLLHUP` while no host
/// is connected (and reads then return 0 once its buffer is empty), so each
/// HTTP/2 connection starts once `POLLHUP` clears, and ends at EOF after it
/// comes back. Bytes left over from a connection that ended are discarded
/// before the next one starts, so it begins with the host's preface.
async fn serve_port(
    file: &File,
    agent: &Arc<Agent>,
    note: &mut impl FnMut(String),
) -> io::Result<Infallible> {
    loop {
        while host_gone(file)? {
            tokio::time::sleep(HOST_POLL).await;
        }
        // A fresh reactor registration per connection: tokio keeps a seen
        // hang-up in a registration for good.
        let port = Port::new(file.try_clone()?)?;
        let hung_up = port.hung_up.clone();
        note(match serve_connection(port, agent.clone()).await {
            Ok(()) => "connection closed".to_string(),
            Err(e) => format!("connection ended: {e}"),
        });
        if host_gone(file)? {
            // What the old host sent but we never read.
            discard(file, false).await?;
        } else if !hung_up.load(Ordering::Relaxed) {
            // The connection failed while the host is still attached: its
            // stream is unusable until the host reconnects.
            discard(file, true).await?;
        }
        // Otherwise the host left and is already back: serve it.
    }
}

/// Whether the host end of the port is closed (`POLLHUP`).
fn host_gone(file: &File) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN | libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: `pfd` is one live, initialized pollfd and we pass a count of
    // 1; a zero timeout never blocks. The fd stays open during the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if pfd.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
        return Err(io::Error::other("port error (unplugged?)"));
    }
    Ok(pfd.revents & libc::POLLHUP != 0)
}

/// Read and drop bytes until EOF (the host end is closed and nothing is
/// left). With `wait`, also wait for the host to go away; without, stop when
/// nothing is left to read even though the host is attached.
async fn discard(mut file: &File, wait: bool) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !wait {
                    return Ok(());
                }
                tokio::time::sleep(HOST_POLL).await;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// One HTTP/2 connection's view of the port: a non-blocking fd registered
/// with the reactor, reading and writing at once. Once the host hangs up
/// (the reactor reports `POLLHUP` as read/write-closed, for good) a read
/// with nothing left is EOF and a write fails with `BrokenPipe`, instead of
/// `EAGAIN` forever (the port does not accept writes without a host).
struct Port {
    fd: AsyncFd<File>,
    hung_up: Arc<AtomicBool>,
}

impl Port {
    fn new(file: File) -> io::Result<Port> {
        // SAFETY: the `File` owns its fd and lives inside the `AsyncFd`
        // until it is dropped; nothing else closes or replaces that fd.
        let fd = unsafe { AsyncFd::register(file)? };
        Ok(Port {
            fd,
            hung_up: Arc::new(AtomicBool::new(false)),
        })
    }
}

impl AsyncRead for Port {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.fd.poll_read_ready(cx))?;
            if guard.ready().is_read_closed() {
                this.hung_up.store(true, Ordering::Relaxed);
            }
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| fd.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Hung up and drained (the host is back already): EOF.
                Err(_) if this.hung_up.load(Ordering::Relaxed) => return Poll::Ready(Ok(())),
                Err(_) => {}
            }
        }
    }
}

impl AsyncWrite for Port {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.fd.poll_write_ready(cx))?;
            if guard.ready().is_write_closed() {
                this.hung_up.store(true, Ordering::Relaxed);
            }
            match guard.try_io(|fd| fd.get_ref().write(data)) {
                Ok(r) => return Poll::Ready(r),
                Err(_) if this.hung_up.load(Ordering::Relaxed) => {
                    return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
                }
                Err(_) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
