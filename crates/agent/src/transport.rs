//! Byte streams the HTTP/2 connection runs on.
//!
//! Owns: the unix-socket listener (`--listen`: one HTTP/2 connection per
//! accepted stream, served concurrently) and the character device (`--device`:
//! one connection at a time over a virtio-serial port, kept open across host
//! reconnects, connections told apart by the port's hang-up state, the
//! HTTP/2 preface and an optional sync line: see [`serve_port`]),
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
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
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
    serve_listener(listener, agent).await
}

/// `--listen-fd`: serve on a listening unix socket inherited as `fd` (the
/// supervisor bound it in a directory the sandbox cannot see or write, and
/// runc passed it in with `--preserve-fds`). Only returns on an error.
pub async fn listen_inherited(fd: i32, agent: Arc<Agent>) -> io::Result<()> {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` is the descriptor runc's `--preserve-fds` placed in this
    // process before it started; nothing else in the agent opened or owns
    // it (descriptors the runtime opens get numbers above it), and this is
    // called once, so the listener below is its only owner.
    let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    // Not a listening unix socket (a wrong descriptor): fail loudly.
    std_listener.local_addr()?;
    std_listener.set_nonblocking(true)?;
    serve_listener(UnixListener::from_std(std_listener)?, agent).await
}

async fn serve_listener(listener: UnixListener, agent: Arc<Agent>) -> io::Result<()> {
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

/// The HTTP/2 client connection preface: where a connection's bytes start.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// `SANDFORGE-SYNC <nonce>\n` from the host, answered with
/// `SANDFORGE-ACK <nonce>\n`: see [`serve_port`].
const SYNC: &[u8] = sandforge_agent_proto::SYNC_PREFIX;
const ACK: &[u8] = sandforge_agent_proto::ACK_PREFIX;
/// Nonces are 1 to 64 of `[A-Za-z0-9_-]`.
const MAX_NONCE: usize = 64;

/// Serve host connections on an open virtio-serial port until it fails.
///
/// A virtio-serial port is one byte stream for the VM's whole life; host
/// (re)connections are only visible as the port's `POLLHUP` state, which the
/// guest learns asynchronously: bytes of the next connection can arrive
/// before the hang-up of the previous one is seen, and bytes the previous
/// host sent may still be unread. So:
///
/// - The port stays open (closing it would make the kernel drop what the
///   host already sent).
/// - A connection starts once no `POLLHUP` is seen, and its first bytes are
///   found by scanning: anything before the HTTP/2 preface is discarded.
/// - A host may prefix a connection with `SANDFORGE-SYNC <nonce>\n`; every
///   such line seen before the preface is answered with
///   `SANDFORGE-ACK <nonce>\n`, so the host can skip whatever a previous
///   connection left in its direction until its own nonce comes back, then
///   send the preface. Plain HTTP/2 clients (curl) work without it.
/// - A connection ends when the port hangs up (see [`Port`]) or on any error.
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
        let mut port = Port::new(file.try_clone()?)?;
        let Some(start) = await_preface(&mut port).await? else {
            continue;
        };
        let (rx, tx) = tokio::io::split(port);
        let io = tokio::io::join(AsyncReadExt::chain(io::Cursor::new(start), rx), tx);
        note(match serve_connection(io, agent.clone()).await {
            Ok(()) => "connection closed".to_string(),
            Err(e) if hung_up(&e) => "connection closed".to_string(),
            Err(e) => format!("connection ended: {e}"),
        });
    }
}

/// Whether a connection failed only because the host went away (a write
/// after the hang-up, see [`Port`]).
fn hung_up(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return io.kind() == io::ErrorKind::BrokenPipe;
        }
        source = err.source();
    }
    false
}

/// Read until the HTTP/2 preface, answering sync lines and dropping anything
/// else. Returns the bytes from the preface on, or `None` if the host hung
/// up first.
async fn await_preface(port: &mut Port) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        match scan(&buf) {
            Scan::Preface => return Ok(Some(buf)),
            Scan::Sync(len) => {
                let nonce = &buf[SYNC.len()..len - 1];
                let ack = [ACK, nonce, b"\n"].concat();
                match port.write_all(&ack).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(None),
                    Err(e) => return Err(e),
                }
                buf.drain(..len);
            }
            Scan::Skip(n) => {
                buf.drain(..n);
            }
            Scan::NeedMore => {
                let n = port.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(None);
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

/// What the start of the bytes before a connection holds.
#[derive(Debug, PartialEq)]
enum Scan {
    /// The HTTP/2 preface.
    Preface,
    /// A complete, valid sync line of this many bytes (newline included).
    Sync(usize),
    /// This many bytes that start neither.
    Skip(usize),
    /// A prefix of either, or nothing.
    NeedMore,
}

fn scan(buf: &[u8]) -> Scan {
    let nonce_byte = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_';
    if buf.is_empty() {
        return Scan::NeedMore;
    }
    let n = buf.len().min(PREFACE.len());
    if buf[..n] == PREFACE[..n] {
        return if n == PREFACE.len() {
            Scan::Preface
        } else {
            Scan::NeedMore
        };
    }
    let n = buf.len().min(SYNC.len());
    if buf[..n] == SYNC[..n] {
        if n < SYNC.len() {
            return Scan::NeedMore;
        }
        let rest = &buf[SYNC.len()..];
        let nonce_len = rest.iter().take_while(|b| nonce_byte(b)).count();
        return match rest.get(nonce_len) {
            Some(b'\n') if (1..=MAX_NONCE).contains(&nonce_len) => {
                Scan::Sync(SYNC.len() + nonce_len + 1)
            }
            None if nonce_len <= MAX_NONCE => Scan::NeedMore,
            _ => Scan::Skip(1),
        };
    }
    // Up to the next byte that could start either.
    let next = buf[1..]
        .iter()
        .position(|&b| b == PREFACE[0] || b == SYNC[0])
        .map_or(buf.len(), |i| i + 1);
    Scan::Skip(next)
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

/// One HTTP/2 connection's view of the port: a non-blocking fd registered
/// with the reactor, reading and writing at once. Once the host hangs up
/// (the reactor reports `POLLHUP` as read/write-closed, for good) a read
/// with nothing left is EOF and a write fails with `BrokenPipe`, instead of
/// `EAGAIN` forever (the port does not accept writes without a host).
struct Port {
    fd: AsyncFd<File>,
    hung_up: bool,
}

impl Port {
    fn new(file: File) -> io::Result<Port> {
        // SAFETY: the `File` owns its fd and lives inside the `AsyncFd`
        // until it is dropped; nothing else closes or replaces that fd.
        let fd = unsafe { AsyncFd::register(file)? };
        Ok(Port { fd, hung_up: false })
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
                this.hung_up = true;
            }
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| fd.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Hung up and drained (the host is back already): EOF.
                Err(_) if this.hung_up => return Poll::Ready(Ok(())),
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
                this.hung_up = true;
            }
            match guard.try_io(|fd| fd.get_ref().write(data)) {
                Ok(r) => return Poll::Ready(r),
                Err(_) if this.hung_up => {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_connection_starts() {
        assert_eq!(scan(b""), Scan::NeedMore);
        assert_eq!(scan(PREFACE), Scan::Preface);
        assert_eq!(scan(&[PREFACE, b"\0\0\x12\x04"].concat()), Scan::Preface);
        assert_eq!(scan(&PREFACE[..10]), Scan::NeedMore);
        assert_eq!(scan(b"SANDFORGE-SY"), Scan::NeedMore);
        assert_eq!(scan(b"SANDFORGE-SYNC ab-C_9"), Scan::NeedMore);
        assert_eq!(scan(b"SANDFORGE-SYNC ab-C_9\nPRI"), Scan::Sync(22));
        // Not a valid sync line: skip its first byte, then look again.
        assert_eq!(scan(b"SANDFORGE-SYNC \n"), Scan::Skip(1));
        assert_eq!(scan(b"SANDFORGE-SYNC a b\n"), Scan::Skip(1));
        let long = [SYNC, &[b'a'; MAX_NONCE + 1]].concat();
        assert_eq!(scan(&long), Scan::Skip(1));
        // Old bytes: up to the next candidate.
        assert_eq!(scan(b"\0\0\x04\x08xyzPRI"), Scan::Skip(7));
        assert_eq!(scan(b"PRX"), Scan::Skip(3));
        assert_eq!(scan(b"\x01\x02"), Scan::Skip(2));
        assert_eq!(scan(b"PRI * HTTP/1.1"), Scan::Skip(9)); // the P of HTTP
    }
}
