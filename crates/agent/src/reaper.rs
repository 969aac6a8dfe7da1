//! Child reaping (the agent may be PID 1 of a container).
//!
//! Owns: the only `waitpid` calls of the agent. One task wakes on `SIGCHLD`
//! (and once a second, in case a signal was coalesced away), reaps every
//! exited child with `waitpid(-1, WNOHANG)`, hands the status of a registered
//! child to its waiter and discards the status of anything else (orphans
//! re-parented to us when we are PID 1).
//!
//! Race-freedom: spawning and registering a child happens while holding a
//! shared [`SpawnPermit`]; reaping holds the same gate exclusively. So a child
//! can never be reaped between `fork` and registration (no "exited before
//! registration" case exists), and std's own `waitpid` inside
//! `Command::spawn` (done when `exec` fails) never races with ours.
//!
//! Must not: spawn processes, kill anything, or be bypassed: nothing else in
//! the agent may call `wait*` or use `tokio::process` (it would steal or lose
//! statuses).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::io::Errno;
use rustix::process::{Pid, WaitOptions, WaitStatus};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{oneshot, OwnedRwLockReadGuard, RwLock};

/// Handle to the reaper task; cheap to clone.
#[derive(Clone)]
pub struct Reaper {
    gate: Arc<RwLock<()>>,
    waiters: Arc<Mutex<HashMap<i32, oneshot::Sender<WaitStatus>>>>,
}

/// Held while spawning a child; register the child's pid before dropping it.
pub struct SpawnPermit {
    _gate: OwnedRwLockReadGuard<()>,
    reaper: Reaper,
}

impl SpawnPermit {
    /// Ask for `pid`'s exit status. Must be called before this permit drops.
    pub fn register(&self, pid: Pid) -> oneshot::Receiver<WaitStatus> {
        let (tx, rx) = oneshot::channel();
        self.reaper
            .waiters
            .lock()
            .expect("reaper map")
            .insert(pid.as_raw_nonzero().get(), tx);
        rx
    }
}

impl Reaper {
    /// Install the `SIGCHLD` handler and start the reaper task. Call from
    /// inside the runtime, before the first child is spawned.
    pub fn start() -> io::Result<Reaper> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Reaper {
            gate: Arc::new(RwLock::new(())),
            waiters: Arc::new(Mutex::new(HashMap::new())),
        };
        let task = reaper.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = sigchld.recv() => {}
                    _ = tick.tick() => {}
                }
                let _exclusive = task.gate.write().await;
                task.reap_all();
            }
        });
        Ok(reaper)
    }

    /// Wait for the right to spawn a child (blocks reaping until dropped).
    pub async fn permit(&self) -> SpawnPermit {
        SpawnPermit {
            _gate: self.gate.clone().read_owned().await,
            reaper: self.clone(),
        }
    }

    fn reap_all(&self) {
        loop {
            match rustix::process::wait(WaitOptions::NOHANG) {
                Ok(Some((pid, status))) => {
                    let waiter = self
                        .waiters
                        .lock()
                        .expect("reaper map")
                        .remove(&pid.as_raw_nonzero().get());
                    if let Some(tx) = waiter {
                        // The exec may have gone away (client cancelled): fine.
                        let _ = tx.send(status);
                    }
                }
                Ok(None) | Err(Errno::CHILD) => return,
                Err(Errno::INTR) => continue,
                Err(e) => {
                    eprintln!("sandforge-agent: waitpid: {e}");
                    return;
                }
            }
        }
    }
}
