//! Finding, emptying and removing a container's cgroups on cgroup v1, v2
//! and the hybrid layout (v1 controllers plus a v2 `unified` tree).
//!
//! runc's own kill only signals the container's init and its delete gives
//! up on a cgroup that a fork bomb keeps full; [`kill_all`] is what ends a
//! sandbox for certain: freeze every freezer of the container (v1
//! `freezer.state`, v2 `cgroup.freeze`) so nothing forks any more, write
//! `cgroup.kill` where the kernel has it (v2, 5.14+), SIGKILL every task
//! listed in any of its cgroups, thaw so the kills land, and repeat until
//! every cgroup is empty; [`remove`] then removes the directories, deepest
//! first. Must only ever signal processes listed in this container's own
//! cgroups, never search for processes any other way.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ROOT: &str = "/sys/fs/cgroup";

/// Every directory that could hold the container's cgroup, existing or not.
pub fn candidate_dirs(parent: &str, id: &str) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from(ROOT).join(parent).join(id)];
    if let Ok(rd) = std::fs::read_dir(ROOT) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.push(e.path().join(parent).join(id));
            }
        }
    }
    out
}

/// Existing cgroup directories of the container.
pub fn existing_dirs(parent: &str, id: &str) -> Vec<PathBuf> {
    candidate_dirs(parent, id)
        .into_iter()
        .filter(|p| p.is_dir())
        .collect()
}

/// `dir` and every cgroup below it, parents before children.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(rd) = std::fs::read_dir(&out[i]) {
            for e in rd.flatten() {
                // Not following symlinks: cgroupfs has none, and a
                // directory entry is all a child cgroup can be.
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// Every cgroup of the container in every hierarchy, parents first.
fn all_cgroups(parent: &str, id: &str) -> Vec<PathBuf> {
    existing_dirs(parent, id)
        .iter()
        .flat_map(|d| tree(d))
        .collect()
}

/// The pids listed in the cgroups (as seen from the host's pid namespace).
fn listed_pids(cgroups: &[PathBuf]) -> Vec<i32> {
    let mut pids: Vec<i32> = cgroups
        .iter()
        .flat_map(|d| {
            // v1 lists threads in `tasks`; both list processes in `cgroup.procs`.
            ["cgroup.procs", "tasks"]
                .map(|f| std::fs::read_to_string(d.join(f)).unwrap_or_default())
        })
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .filter(|p| *p > 1)
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Freeze (`true`) or thaw every freezer among the cgroups; best effort.
fn set_frozen(cgroups: &[PathBuf], frozen: bool) {
    for d in cgroups {
        let v1 = d.join("freezer.state");
        if v1.exists() {
            let _ = std::fs::write(&v1, if frozen { "FROZEN" } else { "THAWED" });
        }
        let v2 = d.join("cgroup.freeze");
        if v2.exists() {
            let _ = std::fs::write(&v2, if frozen { "1" } else { "0" });
        }
    }
}

/// Wait (bounded) until every freezer reports frozen, so the task lists
/// read next are final: a frozen task neither forks nor exits.
fn wait_frozen(cgroups: &[PathBuf], limit: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        let settled = cgroups.iter().all(|d| {
            let v1 = std::fs::read_to_string(d.join("freezer.state"));
            let v2 = std::fs::read_to_string(d.join("cgroup.events"));
            let v1_ok = v1.map(|s| s.trim() != "FREEZING").unwrap_or(true);
            let v2_ok = v2
                .map(|s| !s.lines().any(|l| l.trim() == "frozen 0"))
                .unwrap_or(true);
            v1_ok && v2_ok
        });
        if settled {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Wait (bounded) until the cgroups list no task; whether they emptied.
fn wait_empty(cgroups: &[PathBuf], limit: Duration) -> bool {
    let t0 = Instant::now();
    loop {
        if listed_pids(cgroups).is_empty() {
            return true;
        }
        if t0.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// End every process in the container's cgroups and wait until they are
/// all empty; `Err` with the pids still listed after `limit`. Blocking:
/// call it off the async workers.
pub fn kill_all(parent: &str, id: &str, limit: Duration) -> Result<(), Vec<i32>> {
    let t0 = Instant::now();
    loop {
        let cgroups = all_cgroups(parent, id);
        if listed_pids(&cgroups).is_empty() {
            // Leave nothing frozen behind (a later rmdir does not care,
            // but a still-running container being stopped might).
            set_frozen(&cgroups, false);
            return Ok(());
        }
        // cgroup.kill (v2) is atomic against forks: where the kernel has it
        // it does the whole job; the freezer round makes v1 (and older v2)
        // just as certain.
        let mut has_kill = false;
        for d in &cgroups {
            let kill = d.join("cgroup.kill");
            if kill.exists() {
                has_kill |= std::fs::write(&kill, "1").is_ok();
            }
        }
        if has_kill && wait_empty(&cgroups, Duration::from_millis(500)) {
            continue;
        }
        set_frozen(&cgroups, true);
        wait_frozen(&cgroups, Duration::from_millis(500));
        for pid in listed_pids(&cgroups) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                // ESRCH (already gone) is what we want anyway.
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::Kill);
            }
        }
        set_frozen(&cgroups, false);
        let left = listed_pids(&cgroups);
        if left.is_empty() {
            continue;
        }
        if t0.elapsed() >= limit {
            return Err(left);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// rmdir every leftover (empty) cgroup directory, deepest first; returns
/// those that remain.
pub fn remove(parent: &str, id: &str) -> Vec<PathBuf> {
    let mut left = vec![];
    let mut dirs = all_cgroups(parent, id);
    dirs.reverse();
    for d in dirs {
        if std::fs::remove_dir(&d).is_err() && d.is_dir() {
            left.push(d);
        }
    }
    left
}
