//! A sandbox's host processes (QEMU, virtiofsd): starting them detached
//! from the daemon, and finding them again after the fact by their command
//! lines (every one of them names a socket inside the sandbox's own
//! directory, which no other sandbox's processes do).

use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::error::{Result, RuntimeError};

/// Spawn `cmd` with no stdin, stdout and stderr into a new `log` file, in
/// its own process group, so that neither a signal to the daemon's group
/// nor the daemon's death takes it down.
pub fn spawn_detached(cmd: &mut Command, log: &Path, tool: &str) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log).map_err(|e| RuntimeError::io("create", log, e))?;
    let err = out
        .try_clone()
        .map_err(|e| RuntimeError::io("dup", log, e))?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| RuntimeError::Command {
            tool: tool.into(),
            message: e.to_string(),
        })
}

/// Pids of the processes whose command line contains `needle` as one
/// argument or part of one.
pub fn with_arg(needle: &str) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    c.split(|b| *b == 0)
                        .any(|arg| contains(arg, needle.as_bytes()))
                })
                .unwrap_or(false)
        })
        .collect()
}

/// Whether `pid` is alive and its command line mentions `needle`.
pub fn is(pid: u32, needle: &Path) -> bool {
    let needle = needle.to_string_lossy();
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| contains(&c, needle.as_bytes()) && !is_zombie(pid))
        .unwrap_or(false)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// SIGKILL every process named `comm` whose command line mentions
/// `needle`; returns how many were signalled.
pub fn kill_all(comm: &str, needle: &str) -> usize {
    let pids: Vec<u32> = with_arg(needle)
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == comm)
        })
        .collect();
    for pid in &pids {
        if let Some(p) = rustix::process::Pid::from_raw(*pid as i32) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::Kill);
        }
    }
    pids.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_itself_by_an_argument() {
        let me = std::process::id();
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_string_lossy().to_string();
        assert!(with_arg(&name).contains(&me));
        assert!(is(me, Path::new(&name)));
        assert!(!with_arg("no-such-argument-anywhere-\u{1}").contains(&me));
        assert!(!contains(b"abc", b""));
    }
}
