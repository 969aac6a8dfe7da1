//! `sandforge-agent`: the guest agent of a Sandforge sandbox.
//!
//! Owns: command-line parsing, process start-up (runtime, reaper, the fd of
//! `/`, own OOM score, termination signals) and choosing the transport.
//!
//! Must not: handle requests (see [`server`]) or know how a byte stream is
//! obtained (see [`transport`]).
//!
//! Usage: `sandforge-agent --listen-fd 3` (a listening unix socket the
//! supervisor made and passed in, for containers: the sandbox never sees
//! its path), `sandforge-agent --listen /path/agent.sock` (bind it itself,
//! for tests) or `sandforge-agent --device /dev/vport0p1` (character device,
//! for microVMs); `--version` prints the version. Run as `/init` (or with
//! `--init`) as PID 1 of a microVM's initramfs, it boots the guest first and
//! then execs its own `--device` mode (see [`init`]).

mod exec;
mod files;
mod init;
mod lines;
mod netconf;
mod ports;
mod pty;
mod query;
mod reaper;
mod reply;
mod rootfs;
mod server;
mod sessions;
mod transport;
mod upload;
mod users;

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use rustix::fs::{Mode, OFlags};
use tokio::signal::unix::{signal, SignalKind};

const USAGE: &str = "usage: sandforge-agent (--listen-fd <fd> | --listen <unix socket path> | --device <char device>)
       sandforge-agent --version";

/// What the command line asks for.
#[derive(Debug, PartialEq)]
enum Cmd {
    Listen(PathBuf),
    ListenFd(i32),
    Device(PathBuf),
    Version,
    Help,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Cmd, String> {
    let mut cmd = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg, None),
        };
        let next =
            match flag.as_str() {
                "--version" | "-V" => Cmd::Version,
                "--help" | "-h" => Cmd::Help,
                "--listen" | "--device" | "--listen-fd" => {
                    let value = inline
                        .or_else(|| args.next())
                        .filter(|v| !v.is_empty())
                        .ok_or_else(|| format!("{flag} needs a value"))?;
                    match flag.as_str() {
                        "--listen" => Cmd::Listen(value.into()),
                        "--device" => Cmd::Device(value.into()),
                        _ => Cmd::ListenFd(value.parse().ok().filter(|fd| *fd > 2).ok_or_else(
                            || format!("--listen-fd: {value:?} is not a descriptor above 2"),
                        )?),
                    }
                }
                other => return Err(format!("unknown argument {other:?}")),
            };
        match (&cmd, &next) {
            (
                Some(Cmd::Listen(_) | Cmd::Device(_) | Cmd::ListenFd(_)),
                Cmd::Listen(_) | Cmd::Device(_) | Cmd::ListenFd(_),
            ) => return Err("give exactly one of --listen-fd, --listen and --device".into()),
            (Some(Cmd::Version | Cmd::Help), _) => {}
            _ => cmd = Some(next),
        }
    }
    cmd.ok_or_else(|| "missing --listen-fd, --listen or --device".into())
}

fn main() -> ExitCode {
    let mut args = std::env::args();
    let argv0 = args.next().unwrap_or_default();
    let args: Vec<String> = args.collect();
    // Before any thread exists: init mode ends in exec or power-off.
    if init::requested(&argv0, &args) {
        init::run();
    }
    let cmd = match parse_args(args) {
        Ok(cmd) => cmd,
        Err(msg) => {
            eprintln!("sandforge-agent: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match cmd {
        Cmd::Version => {
            println!("sandforge-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Cmd::Help => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Cmd::Listen(_) | Cmd::ListenFd(_) | Cmd::Device(_) => {}
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandforge-agent: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandforge-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> io::Result<()> {
    // Before anything can spawn a child.
    let reaper = reaper::Reaper::start()?;
    let root = rustix::fs::open(
        "/",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    protect_from_oom();
    let agent = Arc::new(server::Agent {
        reaper,
        root,
        sessions: Default::default(),
    });

    // As PID 1 the kernel ignores signals we do not handle: exit on them.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let serve = async {
        match &cmd {
            Cmd::Listen(path) => transport::listen_unix(path, agent).await,
            Cmd::ListenFd(fd) => transport::listen_inherited(*fd, agent).await,
            Cmd::Device(path) => transport::serve_device(path, agent).await,
            Cmd::Version | Cmd::Help => Ok(()),
        }
    };
    tokio::select! {
        r = serve => r,
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
    }
}

/// Best effort: the agent should be the OOM killer's last choice (commands
/// are reset to 0). Needs CAP_SYS_RESOURCE; the supervisor may have set it.
fn protect_from_oom() {
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cmd, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn args() {
        assert_eq!(
            parse(&["--listen", "/a.sock"]),
            Ok(Cmd::Listen("/a.sock".into()))
        );
        assert_eq!(
            parse(&["--listen=/a.sock"]),
            Ok(Cmd::Listen("/a.sock".into()))
        );
        assert_eq!(
            parse(&["--device", "/dev/vport0p1"]),
            Ok(Cmd::Device("/dev/vport0p1".into()))
        );
        assert_eq!(parse(&["--version"]), Ok(Cmd::Version));
        assert_eq!(parse(&["--listen", "/a", "--version"]), Ok(Cmd::Version));
        assert_eq!(parse(&["--version", "--listen", "/a"]), Ok(Cmd::Version));
        assert!(parse(&[]).is_err());
        assert!(parse(&["--listen"]).is_err());
        assert!(parse(&["--listen="]).is_err());
        assert!(parse(&["--listen", "/a", "--device", "/b"]).is_err());
        assert_eq!(parse(&["--listen-fd", "3"]), Ok(Cmd::ListenFd(3)));
        assert!(parse(&["--listen-fd", "1"]).is_err());
        assert!(parse(&["--listen-fd", "x"]).is_err());
        assert!(parse(&["--listen-fd", "3", "--listen", "/a"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
        assert!(parse(&["positional"]).is_err());
    }
}
