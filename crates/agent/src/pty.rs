//! Starting a program on a new pseudo-terminal: the PTY pair, the child as
//! a session leader with the PTY as its controlling terminal (so job
//! control, `stty` and SIGWINCH work), and window-size changes.
//!
//! Owns the master side's setup; the session module owns what is read
//! from and written to it. Must not be used for plain exec (no PTY there).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use rustix::fs::{Mode, OFlags};
use rustix::pty::OpenptFlags;
use rustix::termios::Winsize;
use sandforge_agent_proto::Resize;

use crate::exec::{child_setup, working_dir, BASE_ENV};
use crate::users::User;

/// A running program and the master side of its terminal (non-blocking).
pub struct Spawned {
    pub child: Child,
    pub master: OwnedFd,
}

pub fn set_size(master: &impl AsFd, size: Resize) -> io::Result<()> {
    rustix::termios::tcsetwinsize(
        master,
        Winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )?;
    Ok(())
}

/// Spawn `argv` on a new PTY of `size`, as `user` (else as the agent's
/// root). `Err` is a message for the client.
pub fn spawn(
    argv: &[String],
    env: &BTreeMap<String, String>,
    cwd: Option<&str>,
    size: Resize,
    user: Option<&User>,
) -> Result<Spawned, String> {
    let cwd = working_dir(cwd, user)?;
    let io_err = |what: &str, e: io::Error| format!("{what}: {e}");
    let master =
        rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
            .map_err(|e| io_err("opening a pty", e.into()))?;
    rustix::pty::grantpt(&master).map_err(|e| io_err("grantpt", e.into()))?;
    rustix::pty::unlockpt(&master).map_err(|e| io_err("unlockpt", e.into()))?;
    let name =
        rustix::pty::ptsname(&master, Vec::new()).map_err(|e| io_err("ptsname", e.into()))?;
    let slave = rustix::fs::open(
        OsStr::from_bytes(name.as_bytes()),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("opening the pty's terminal side", e.into()))?;
    set_size(&master, size).map_err(|e| io_err("setting the window size", e))?;
    if let Some(u) = user {
        // The terminal is the user's, as `login` makes it (grantpt gave it
        // to the agent's root).
        // SAFETY: ids other than -1, see `User::creds`.
        let (uid, gid) = unsafe {
            (
                rustix::process::Uid::from_raw(u.uid),
                rustix::process::Gid::from_raw(u.gid),
            )
        };
        rustix::fs::fchown(&slave, Some(uid), Some(gid))
            .map_err(|e| io_err("giving the terminal to the user", e.into()))?;
    }
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| io_err("dup", e));
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(BASE_ENV)
        .envs(user.map(User::env).unwrap_or_default())
        .envs(env)
        .current_dir(cwd)
        .stdin(Stdio::from(dup(&slave)?))
        .stdout(Stdio::from(dup(&slave)?))
        .stderr(Stdio::from(slave));
    let creds = user.map(User::creds);
    // SAFETY: runs in the forked child before exec, where only
    // async-signal-safe work is allowed: `child_setup` (see its note in
    // exec.rs), one ioctl on fd 0, which std has already made the
    // terminal side of the pty, and the credential calls (built before the
    // fork). No locks, no allocation.
    unsafe {
        cmd.pre_exec(move || {
            child_setup()?;
            rustix::process::ioctl_tiocsctty(std::io::stdin())?;
            if let Some(creds) = &creds {
                creds.apply()?;
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            format!("{}: command not found ({e})", argv[0])
        } else {
            format!("failed to start {}: {e}", argv[0])
        }
    })?;
    rustix::io::ioctl_fionbio(&master, true).map_err(|e| io_err("non-blocking pty", e.into()))?;
    Ok(Spawned { child, master })
}
