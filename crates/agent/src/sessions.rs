//! Terminal sessions: programs on a PTY that outlive the connections
//! attached to them.
//!
//! Each session has one reader task that drains the PTY into a bounded
//! scrollback ring ([`SCROLLBACK`] bytes) and a bounded broadcast channel
//! ([`BROADCAST`] chunks). Attached clients subscribe to the broadcast; a
//! client that falls behind loses chunks (it is told so in-band) instead
//! of slowing the reader, so a slow or stalled client never blocks the
//! program, the sandbox, or the other clients, and memory stays bounded.
//! Attaching takes the scrollback and subscribes under one lock, so a
//! client sees every byte once, in order. When the program exits, the
//! exit status is kept and sent to attached and later clients.
//!
//! Owns the session registry and the attach protocol (frames of
//! agent-proto). Limits: [`MAX_LIVE`] running sessions; the most recent
//! [`MAX_ENDED`] ended ones are kept for their exit codes. `unsafe` only
//! to register the master fd with tokio.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use rustix::process::{Pid, WaitStatus};
use sandforge_agent_proto::{
    valid_session_id, ExitStatus, Frame, FrameDecoder, Resize, SessionInfo, SessionRequest,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::broadcast;

use crate::pty;
use crate::reaper::Reaper;
use crate::reply::{self, ApiError, Body};

pub const SCROLLBACK: usize = 64 * 1024;
pub const BROADCAST: usize = 256;
pub const MAX_LIVE: usize = 32;
pub const MAX_ENDED: usize = 32;
const READ_CHUNK: usize = 16 * 1024;
const MAX_CREATE_BODY: usize = 256 * 1024;

#[derive(Clone)]
enum Event {
    Output(Bytes),
    Exit(ExitStatus),
}

struct State {
    ring: VecDeque<u8>,
    exit: Option<ExitStatus>,
}

pub struct Session {
    id: String,
    argv: Vec<String>,
    created_at: u64,
    seq: u64,
    master: AsyncFd<OwnedFd>,
    state: Mutex<State>,
    tx: broadcast::Sender<Event>,
    attached: AtomicU32,
}

#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<Session>>>,
    /// Ids of sessions being spawned: reserved with the check, under the
    /// `map` lock (always taken first), so two concurrent creates of one id
    /// cannot both pass it, nor can creates run past [`MAX_LIVE`].
    pending: Mutex<HashSet<String>>,
    next: AtomicU64,
}

/// A reserved session id, released when the create ends either way.
struct Reservation<'a> {
    pending: &'a Mutex<HashSet<String>>,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.pending.lock().expect("pending").remove(&self.id);
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Session {
    fn info(&self) -> SessionInfo {
        let st = self.state.lock().expect("session state");
        SessionInfo {
            id: self.id.clone(),
            argv: self.argv.clone(),
            tty: true,
            running: st.exit.is_none(),
            attached: self.attached.load(Ordering::SeqCst),
            created_at: self.created_at,
            exit_code: st.exit.as_ref().map(|e| e.exit_code),
        }
    }

    fn running(&self) -> bool {
        self.state.lock().expect("session state").exit.is_none()
    }

    /// Record output: into the ring (oldest bytes dropped) and to clients.
    fn output(&self, data: Bytes) {
        let mut st = self.state.lock().expect("session state");
        st.ring.extend(data.iter());
        let excess = st.ring.len().saturating_sub(SCROLLBACK);
        st.ring.drain(..excess);
        let _ = self.tx.send(Event::Output(data));
    }

    fn exited(&self, status: ExitStatus) {
        let mut st = self.state.lock().expect("session state");
        st.exit = Some(status.clone());
        let _ = self.tx.send(Event::Exit(status));
    }

    /// The scrollback, the exit status if any, and a live subscription,
    /// taken atomically.
    fn subscribe(&self) -> (Bytes, Option<ExitStatus>, broadcast::Receiver<Event>) {
        let st = self.state.lock().expect("session state");
        let (a, b) = st.ring.as_slices();
        let mut snap = Vec::with_capacity(st.ring.len());
        snap.extend_from_slice(a);
        snap.extend_from_slice(b);
        (Bytes::from(snap), st.exit.clone(), self.tx.subscribe())
    }

    async fn write_input(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.master.writable().await?;
            match guard.try_io(|fd| Ok(rustix::io::write(fd.get_ref(), data)?)) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

/// Drain the PTY until the program (and every holder of the terminal) is
/// gone, then wait for the exit status.
async fn read_loop(s: Arc<Session>, status: tokio::sync::oneshot::Receiver<WaitStatus>) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let Ok(mut guard) = s.master.readable().await else {
            break;
        };
        match guard.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut buf)?)) {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => s.output(Bytes::copy_from_slice(&buf[..n])),
            // EIO: the terminal side is closed (the program exited).
            Ok(Err(_)) => break,
            Err(_would_block) => continue,
        }
    }
    let st = status.await.ok();
    let (exit_code, signal) = match st {
        Some(w) => match (w.exit_status(), w.terminating_signal()) {
            (Some(c), _) => (c as i32, None),
            (None, Some(sig)) => (128 + sig as i32, Some(sig as i32)),
            _ => (-1, None),
        },
        None => (-1, None),
    };
    s.exited(ExitStatus {
        exit_code,
        signal,
        timed_out: false,
        error: None,
    });
}

impl Sessions {
    pub fn list(&self) -> Vec<SessionInfo> {
        let map = self.map.lock().expect("sessions");
        let mut v: Vec<(u64, SessionInfo)> = map.values().map(|s| (s.seq, s.info())).collect();
        v.sort_by_key(|(seq, _)| *seq);
        v.into_iter().map(|(_, i)| i).collect()
    }

    fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.map.lock().expect("sessions").get(id).cloned()
    }

    /// Forget the oldest ended sessions beyond [`MAX_ENDED`].
    fn prune(map: &mut HashMap<String, Arc<Session>>) {
        let mut ended: Vec<(u64, String)> = map
            .values()
            .filter(|s| !s.running())
            .map(|s| (s.seq, s.id.clone()))
            .collect();
        ended.sort();
        let extra = ended.len().saturating_sub(MAX_ENDED);
        for (_, id) in ended.into_iter().take(extra) {
            map.remove(&id);
        }
    }

    pub async fn create(
        &self,
        req: SessionRequest,
        reaper: &Reaper,
    ) -> Result<SessionInfo, ApiError> {
        if req.argv.is_empty() {
            return Err(ApiError::bad_request("argv must not be empty"));
        }
        if req.size.rows == 0 || req.size.cols == 0 {
            return Err(ApiError::bad_request("rows and cols must be at least 1"));
        }
        let seq = self.next.fetch_add(1, Ordering::SeqCst);
        let id = match req.id.clone() {
            Some(id) if !valid_session_id(&id) => {
                return Err(ApiError::bad_request(
                    "session ids are 1-64 characters of [A-Za-z0-9_-]",
                ))
            }
            Some(id) => id,
            None => format!("s{}", seq + 1),
        };
        let _reserved = {
            let mut map = self.map.lock().expect("sessions");
            let mut pending = self.pending.lock().expect("pending");
            Self::prune(&mut map);
            if map.get(&id).is_some_and(|s| s.running()) || pending.contains(&id) {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "session_exists",
                    format!("session {id} is running"),
                ));
            }
            if map.values().filter(|s| s.running()).count() + pending.len() >= MAX_LIVE {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_sessions",
                    format!("at most {MAX_LIVE} running sessions per sandbox"),
                ));
            }
            pending.insert(id.clone());
            Reservation {
                pending: &self.pending,
                id: id.clone(),
            }
        };
        let user = crate::exec::resolve_user(req.user.as_deref()).await?;
        let permit = reaper.permit().await;
        let spawned = pty::spawn(
            &req.argv,
            &req.env,
            req.cwd.as_deref(),
            req.size,
            user.as_ref(),
        )
        .map_err(ApiError::bad_request)?;
        let status = permit.register(Pid::from_child(&spawned.child));
        drop(permit);
        // SAFETY: the `OwnedFd` owns the master fd and lives inside the
        // `AsyncFd` until the session is dropped; nothing else closes or
        // replaces that fd.
        let master = unsafe { AsyncFd::register(spawned.master) }
            .map_err(|e| ApiError::io(e.to_string()))?;
        let (tx, _) = broadcast::channel(BROADCAST);
        let s = Arc::new(Session {
            id: id.clone(),
            argv: req.argv,
            created_at: now_secs(),
            seq,
            master,
            state: Mutex::new(State {
                ring: VecDeque::new(),
                exit: None,
            }),
            tx,
            attached: AtomicU32::new(0),
        });
        self.map.lock().expect("sessions").insert(id, s.clone());
        tokio::spawn(read_loop(s.clone(), status));
        Ok(s.info())
    }
}

/// `POST /v1/sessions`.
pub async fn create(
    req: Request<Incoming>,
    sessions: &Sessions,
    reaper: &Reaper,
) -> Result<Response<Body>, ApiError> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_CREATE_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the session request: {e}")))?
        .to_bytes();
    let r: SessionRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("bad session request: {e}")))?;
    let info = sessions.create(r, reaper).await?;
    Ok(reply::json(StatusCode::CREATED, &info))
}

/// Counts a client as attached for as long as it lives.
struct Attached(Arc<Session>);

impl Drop for Attached {
    fn drop(&mut self) {
        self.0.attached.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `POST /v1/sessions/{id}/attach`.
pub async fn attach(
    req: Request<Incoming>,
    sessions: &Sessions,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    let s = sessions
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("no session {id}")))?;
    s.attached.fetch_add(1, Ordering::SeqCst);
    let guard = Attached(s.clone());
    let (tx, body) = reply::channel(64);
    let (snapshot, exit, mut rx) = s.subscribe();
    // Input: keystrokes and resizes, until the client hangs up.
    let input = {
        let s = s.clone();
        let mut incoming = req.into_body();
        tokio::spawn(async move {
            let mut dec = FrameDecoder::new();
            while let Some(Ok(frame)) = incoming.frame().await {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                dec.push(&data);
                while let Ok(Some(f)) = dec.next_frame() {
                    let r = match f {
                        Frame::Input(b) => s.write_input(&b).await,
                        Frame::Resize(Resize { rows, cols }) if rows > 0 && cols > 0 => {
                            pty::set_size(&s.master, Resize { rows, cols })
                        }
                        _ => Ok(()),
                    };
                    if r.is_err() {
                        return;
                    }
                }
            }
        })
    };
    tokio::spawn(async move {
        let _guard = guard;
        let send = |f: Frame| tx.send(Ok(f.encode()));
        if !snapshot.is_empty() && send(Frame::Stdout(snapshot)).await.is_err() {
            input.abort();
            return;
        }
        if let Some(e) = exit {
            let _ = send(Frame::Exit(e)).await;
            input.abort();
            return;
        }
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                () = tx.closed() => break,
            };
            let frame = match ev {
                Ok(Event::Output(b)) => Frame::Stdout(b),
                Ok(Event::Exit(e)) => {
                    let _ = send(Frame::Exit(e)).await;
                    break;
                }
                Err(broadcast::error::RecvError::Lagged(n)) => Frame::Stdout(Bytes::from(format!(
                    "\r\n[sandforge: {n} output chunks dropped: this client reads too slowly]\r\n"
                ))),
                Err(broadcast::error::RecvError::Closed) => break,
            };
            if send(frame).await.is_err() {
                break;
            }
        }
        input.abort();
    });
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}
