//! Serving one TCP listener (the API's, the publish listener's) within
//! bounds, so that idle or slow clients cannot exhaust the daemon's file
//! descriptors or stall other clients:
//! - at most `max_connections` open connections; each holds a slot for its
//!   whole life, an upgraded one (WebSocket, proxied upgrade) too;
//! - a complete request head within `header_timeout` of the connection's
//!   opening or of its previous response: a client that sends nothing, or
//!   trickles a head, is closed after that long, and so is an idle
//!   keep-alive connection;
//! - at the cap, a connection with no request in flight is closed to make
//!   room for the new one (one that never sent a request first, the oldest
//!   first: keep-alive connections of working clients go last); when every connection is busy, the new
//!   one gets `503 too_many_connections` and is closed at once (counted,
//!   and logged at most every 10 s);
//! - HTTP/1.1 (upgrades included), `TCP_NODELAY` (streamed answers do not
//!   wait for delayed ACKs).
//!
//! Owns the accept loop and the connections' tasks; it must not look into
//! requests beyond counting those in flight.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

/// Bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// How long a new connection at the cap waits for an evicted one's slot.
const EVICT_WAIT: Duration = Duration::from_millis(500);

const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nconnection: close\r\ncontent-length: 116\r\n\r\n\
{\"error\":{\"code\":\"too_many_connections\",\"message\":\"the supervisor has reached max_connections; retry\",\"field\":null}}";

/// A live connection, as the accept loop sees it.
struct Entry {
    opened: Instant,
    /// Whether a request ever came on it.
    served: Arc<AtomicBool>,
    inflight: Arc<AtomicUsize>,
    evicting: Arc<AtomicBool>,
    close: Arc<Notify>,
}

#[derive(Default)]
struct Registry {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Entry>>,
}

impl Registry {
    /// Ask a connection with no request in flight to close: one that never
    /// sent a request before one that did, the oldest first.
    fn evict_one(&self) -> bool {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let victim = conns
            .values()
            .filter(|e| {
                e.inflight.load(Ordering::SeqCst) == 0 && !e.evicting.load(Ordering::SeqCst)
            })
            .min_by_key(|e| (e.served.load(Ordering::SeqCst), e.opened));
        match victim {
            Some(v) => {
                v.evicting.store(true, Ordering::SeqCst);
                v.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// The socket with its slot: the slot is released when the socket is
/// closed, also after an upgrade handed it to a WebSocket or tunnel.
struct Slotted {
    io: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Slotted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Slotted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Counts a request as in flight until its response body is done.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(n: &Arc<AtomicUsize>) -> InFlight {
        n.fetch_add(1, Ordering::SeqCst);
        InFlight(n.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request in flight.
struct Tracked {
    body: Body,
    _inflight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Accept and serve until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let registry = Arc::new(Registry::default());
    let (mut refused, mut told) = (0u64, Instant::now());
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: give descriptors a moment to free.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(s) => Some(s),
            Err(_) if registry.evict_one() => {
                tokio::time::timeout(EVICT_WAIT, slots.clone().acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            Err(_) => None,
        };
        let Some(slot) = slot else {
            let _ = stream.try_write(REFUSAL);
            drop(stream);
            refused += 1;
            if told.elapsed() >= Duration::from_secs(10) {
                tracing::warn!(
                    refused,
                    max_connections = limits.max_connections,
                    "connections refused at the cap"
                );
                (refused, told) = (0, Instant::now());
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            Slotted {
                io: stream,
                _slot: slot,
            },
            app.clone(),
            limits,
            registry.clone(),
        ));
    }
}

async fn connection(io: Slotted, app: Router, limits: Limits, registry: Arc<Registry>) {
    let id = registry.next.fetch_add(1, Ordering::SeqCst);
    let inflight = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicBool::new(false));
    let close = Arc::new(Notify::new());
    registry
        .conns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            id,
            Entry {
                opened: Instant::now(),
                served: served.clone(),
                inflight: inflight.clone(),
                evicting: Arc::new(AtomicBool::new(false)),
                close: close.clone(),
            },
        );
    let counter = inflight.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let guard = InFlight::new(&counter);
        served.store(true, Ordering::SeqCst);
        let app = app.clone();
        async move {
            let resp = app
                .oneshot(req.map(Body::new))
                .await
                .unwrap_or_else(|never: Infallible| match never {});
            Ok::<_, Infallible>(resp.map(|body| {
                Body::new(Tracked {
                    body,
                    _inflight: guard,
                })
            }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!("connection: {e}");
            }
        }
        _ = close.notified() => {
            // Evicted at the cap: close now unless a request just arrived,
            // which is then finished first.
            if inflight.load(Ordering::SeqCst) > 0 {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }
    registry
        .conns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
}

/// Raise the soft limit of open files to the hard limit (the daemon holds
/// two descriptors per proxied request, one per connection, per sandbox
/// socket...). Returns the limit now in force.
pub fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        let new = Rlimit {
            current: l.maximum,
            maximum: l.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, new) {
            tracing::warn!("raising RLIMIT_NOFILE: {e}");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_is_well_formed() {
        let text = std::str::from_utf8(REFUSAL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "too_many_connections");
    }

    #[test]
    fn eviction_picks_idle_never_served_oldest_first() {
        let r = Registry::default();
        let mk = |age: u64, busy: usize| Entry {
            opened: Instant::now() - Duration::from_secs(age),
            served: Arc::new(AtomicBool::new(age == 40)),
            inflight: Arc::new(AtomicUsize::new(busy)),
            evicting: Arc::new(AtomicBool::new(false)),
            close: Arc::new(Notify::new()),
        };
        {
            let mut c = r.conns.lock().unwrap();
            c.insert(1, mk(30, 1));
            c.insert(2, mk(20, 0));
            c.insert(3, mk(10, 0));
            c.insert(4, mk(40, 0));
        }
        assert!(r.evict_one());
        assert!(r.conns.lock().unwrap()[&2].evicting.load(Ordering::SeqCst));
        assert!(r.evict_one());
        assert!(r.conns.lock().unwrap()[&3].evicting.load(Ordering::SeqCst));
        assert!(r.evict_one(), "then one that served requests");
        assert!(r.conns.lock().unwrap()[&4].evicting.load(Ordering::SeqCst));
        assert!(!r.evict_one(), "the busy one is never evicted");
    }
}
