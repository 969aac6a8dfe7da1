//! The container backend: one runc container per sandbox, with the agent as
//! the container's PID 1 listening on a unix socket the supervisor bound in
//! the sandbox's directory (root's, not visible inside) and passed in as a
//! descriptor: nothing the sandbox can write lies on the path the
//! supervisor connects to.
//!
//! Owns, per sandbox, everything under `<state>/sandboxes/<id>/`:
//! `bundle/config.json` (the OCI spec), `rootfs/` (overlay mount point),
//! `upper/` + `work/` (the sandbox's writable layer; under `layer/`, the
//! loop-mounted `layer.ext4`, when it has a `disk_mb`: see [`disk`]),
//! `agent.sock`, `mounts/<n>` (staged id-mapped host mounts),
//! `container.pid`, `console.fifo` (the init's stdio, drained into the
//! capped `console.log`: see [`crate::console`]); plus runc's state under
//! `<state>/runc` and the cgroups `sandforge/<id>`. It must not touch other sandboxes'
//! directories or the template.

pub mod cgroup;
pub mod disk;
pub mod idmap;
pub mod rootfs;
pub mod runc;
pub mod seccomp;
pub mod spec;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use sandforge_api::Isolation;

use crate::agent::AgentClient;
use crate::backend::{Backend, Liveness, SandboxSpec, StopReport};
use crate::error::{Result, RuntimeError};
use runc::Runc;

/// Settings of the container backend.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    pub runc_binary: PathBuf,
    /// runc's state root (`<state>/runc`).
    pub runc_root: PathBuf,
    /// Host path of the static agent binary bound into every container.
    pub agent_binary: PathBuf,
    /// cgroup parent under every hierarchy (`sandforge`).
    pub cgroup_parent: String,
    /// How long the agent may take to answer after `runc run`.
    pub agent_timeout: Duration,
    /// Cap of each sandbox's `console.log` (bytes; one rotated file more).
    pub console_cap: u64,
}

pub struct ContainerBackend {
    runc: Runc,
    agent_binary: PathBuf,
    cgroup_parent: String,
    agent_timeout: Duration,
    console_cap: u64,
    drains: crate::console::Drains,
}

/// The files of one container sandbox.
struct Paths {
    rootfs: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    bundle: PathBuf,
    pid: PathBuf,
    fifo: PathBuf,
    socket: PathBuf,
}

impl Paths {
    fn of(spec: &SandboxSpec) -> Self {
        let dir = &spec.dir;
        // With a disk, the writable layer lives on it.
        let layer = match spec.disk_mb {
            Some(_) => disk::mount_point(dir),
            None => dir.clone(),
        };
        Paths {
            rootfs: dir.join("rootfs"),
            upper: layer.join("upper"),
            work: layer.join("work"),
            bundle: dir.join("bundle"),
            pid: dir.join("container.pid"),
            fifo: dir.join("console.fifo"),
            socket: dir.join("agent.sock"),
        }
    }

    /// The directory holding the writable layer (`upper/`, `work/`): the
    /// sandbox's disk when it has one, else its directory.
    fn layer(&self) -> &Path {
        self.upper.parent().unwrap_or(Path::new("/"))
    }
}

fn io<'a>(op: &'static str, p: &'a Path) -> impl FnOnce(std::io::Error) -> RuntimeError + 'a {
    move |e| RuntimeError::io(op, p, e)
}

fn chown_shift(p: &Path, shift: u32) -> Result<()> {
    std::os::unix::fs::chown(p, Some(shift), Some(shift)).map_err(io("chown", p))
}

impl ContainerBackend {
    pub fn new(cfg: ContainerConfig) -> Result<Self> {
        std::fs::create_dir_all(&cfg.runc_root).map_err(io("mkdir", &cfg.runc_root))?;
        if !cfg.agent_binary.is_file() {
            return Err(RuntimeError::Setup(format!(
                "agent binary {} not found",
                cfg.agent_binary.display()
            )));
        }
        Ok(Self {
            runc: Runc {
                binary: cfg.runc_binary,
                root: cfg.runc_root,
            },
            agent_binary: cfg.agent_binary,
            cgroup_parent: cfg.cgroup_parent,
            agent_timeout: cfg.agent_timeout,
            console_cap: cfg.console_cap,
            drains: Default::default(),
        })
    }

    fn cgroups_path(&self, id: &str) -> String {
        format!("/{}/{}", self.cgroup_parent, id)
    }

    /// Host resources of a sandbox that are still present (for leak checks).
    pub fn leftovers(&self, spec: &SandboxSpec) -> Vec<String> {
        let mut left: Vec<String> = cgroup::existing_dirs(&self.cgroup_parent, &spec.id)
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let p = Paths::of(spec);
        for m in [&p.rootfs, &disk::mount_point(&spec.dir)] {
            if rootfs::is_mount_point(m) {
                left.push(format!("mount {}", m.display()));
            }
        }
        left.extend(disk::loop_devices_of(&disk::image(&spec.dir)));
        if spec.dir.exists() {
            left.push(format!("dir {}", spec.dir.display()));
        }
        left
    }

    async fn setup(&self, spec: &SandboxSpec) -> Result<AgentClient> {
        let p = Paths::of(spec);
        let shift = spec.template.uid_shift;
        std::fs::create_dir_all(&spec.dir).map_err(io("mkdir", &spec.dir))?;
        if let Some(mb) = spec.disk_mb {
            disk::ensure_mounted(&spec.dir, mb).await?;
            let mnt = disk::mount_point(&spec.dir);
            std::fs::set_permissions(&mnt, std::fs::Permissions::from_mode(0o711))
                .map_err(io("chmod", &mnt))?;
        }
        // A rollback a crash interrupted: finished or discarded, never half
        // (staged beside the writable layer, on its filesystem).
        crate::snapshot::finish_load(p.layer())?;
        for d in [&p.rootfs, &p.upper, &p.work, &p.bundle] {
            std::fs::create_dir_all(d).map_err(io("mkdir", d))?;
        }
        // The container's root (host uid `shift`) must traverse the sandbox
        // directory and own its writable layer; nothing else here is its.
        std::fs::set_permissions(&spec.dir, std::fs::Permissions::from_mode(0o711))
            .map_err(io("chmod", &spec.dir))?;
        std::fs::set_permissions(&p.upper, std::fs::Permissions::from_mode(0o755))
            .map_err(io("chmod", &p.upper))?;
        chown_shift(&p.upper, shift)?;
        rootfs::mount_overlay(&spec.template.rootfs, &p.upper, &p.work, &p.rootfs)?;
        write_identity_files(&p.rootfs, &spec.hostname, shift)?;
        if let Some(lease) = &spec.net {
            let path = p.rootfs.join("etc/resolv.conf");
            let _ = std::fs::remove_file(&path);
            std::fs::write(&path, lease.resolv_conf()).map_err(io("write", &path))?;
            chown_shift(&path, shift)?;
        }

        let sources = idmap::stage(&spec.dir, &spec.mounts, shift, spec::ID_RANGE)?;
        let oci = spec::build(
            spec,
            &p.rootfs,
            &self.agent_binary,
            &sources,
            &self.cgroups_path(&spec.id),
        )?;
        let cfg_path = p.bundle.join("config.json");
        let tmp = p.bundle.join("config.json.tmp");
        let json =
            serde_json::to_vec_pretty(&oci).map_err(|e| RuntimeError::Setup(e.to_string()))?;
        std::fs::write(&tmp, json).map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, &cfg_path).map_err(io("rename", &cfg_path))?;

        let console = self.open_console(spec, &p)?;
        let listener = bind_agent_socket(&p.socket)?;
        if let Err(e) = self
            .runc
            .run_detached(&spec.id, &p.bundle, &p.pid, console, listener)
            .await
        {
            // runc is gone: its messages are in the FIFO, drained to the end.
            self.drains.settle(&spec.id, Duration::from_secs(2)).await;
            return Err(RuntimeError::Setup(format!(
                "{e}; console: {}",
                crate::console::tail(&spec.dir, 2048)
            )));
        }
        // runc writes it with the tools' umask: the daemon's files are 0600.
        let _ = std::fs::set_permissions(&p.pid, std::fs::Permissions::from_mode(0o600));
        let pid: Option<u32> = std::fs::read_to_string(&p.pid)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        // The OOM killer must pick the sandbox's commands, never its agent.
        if let Some(pid) = pid {
            let adj = format!("/proc/{pid}/oom_score_adj");
            if let Err(e) = std::fs::write(&adj, "-1000") {
                tracing::warn!(id = %spec.id, "setting {adj}: {e}");
            }
        }
        // Its link: the far end of a veth becomes eth0 in the container's
        // network namespace (runc made it; only lo is up in it so far).
        if let Some(lease) = &spec.net {
            let pid = pid.ok_or_else(|| RuntimeError::Setup("no container pid".into()))?;
            crate::network::links::veth_into(lease, pid).await?;
        }
        let client = AgentClient::new(&p.socket);
        client.wait_ready(self.agent_timeout).await.map_err(|e| {
            RuntimeError::AgentUnavailable(format!(
                "{e}; console: {}",
                crate::console::tail(&spec.dir, 1024)
            ))
        })?;
        Ok(client)
    }

    /// The write end of the sandbox's console FIFO (made when missing), for
    /// runc to hand the container as its stdio; the read end is drained
    /// into `console.log` from now on. Opened read-write, so the container
    /// never gets EPIPE while nobody reads (the supervisor is down): its
    /// writes fill the pipe and then wait.
    fn open_console(&self, spec: &SandboxSpec, p: &Paths) -> Result<std::fs::File> {
        if !p.fifo.exists() {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &p.fifo,
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::from_raw_mode(0o600),
                0,
            )
            .map_err(|e| RuntimeError::io("mkfifo", &p.fifo, e.into()))?;
        }
        let w = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p.fifo)
            .map_err(io("open", &p.fifo))?;
        self.attach_console(spec)?;
        Ok(w)
    }

    /// Drain the console FIFO (again: after a restart of the supervisor).
    fn attach_console(&self, spec: &SandboxSpec) -> Result<()> {
        let fifo = Paths::of(spec).fifo;
        let r = tokio::net::unix::pipe::OpenOptions::new()
            .open_receiver(&fifo)
            .map_err(io("open", &fifo))?;
        let (dir, cap) = (spec.dir.clone(), self.console_cap);
        self.drains.attach(&spec.id, async move {
            crate::console::drain(r, &dir, cap).await
        });
        Ok(())
    }
}

/// Bind the agent's socket at `path` (root's, 0600, in the sandbox's
/// root-owned directory), replacing a stale one, and return the listening
/// descriptor for the container's agent.
fn bind_agent_socket(path: &Path) -> Result<std::os::fd::OwnedFd> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(RuntimeError::io("remove", path, e))
        }
        _ => {}
    }
    // No umask games (the umask is per process): a new socket is at most
    // 0777 & !umask, never writable by others under any sane umask, and the
    // mode is narrowed before the container exists.
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(io("bind", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("chmod", path))?;
    Ok(listener.into())
}

/// How long emptying a container's cgroups may take before halt gives up.
const KILL_TIMEOUT: Duration = Duration::from_secs(30);

/// Wait (bounded) until a killed process has exited. A zombie counts as
/// gone: it holds no resource but its pid, and reaping it is the job of the
/// host's init, since runc re-parents the container's init there.
async fn wait_gone(pid: u32) {
    for _ in 0..100 {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|rest| rest.trim_start().starts_with('Z')) =>
            {
                return
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    tracing::warn!(pid, "container init still present after runc delete");
}

/// `/etc/hostname` and `/etc/hosts` for the sandbox, owned by its root.
fn write_identity_files(rootfs: &Path, hostname: &str, shift: u32) -> Result<()> {
    let etc = rootfs.join("etc");
    let files = [
        ("hostname", format!("{hostname}\n")),
        ("hosts", format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n")),
    ];
    for (name, content) in files {
        let path = etc.join(name);
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, content).map_err(io("write", &path))?;
        chown_shift(&path, shift)?;
    }
    Ok(())
}

#[async_trait]
impl Backend for ContainerBackend {
    fn isolation(&self) -> Isolation {
        Isolation::Container
    }

    async fn start(&self, spec: &SandboxSpec) -> Result<AgentClient> {
        match self.setup(spec).await {
            Ok(c) => Ok(c),
            Err(e) => {
                if let Err(cleanup) = self.destroy(spec).await {
                    tracing::error!(id = %spec.id, "cleanup after failed start: {cleanup}");
                }
                Err(e)
            }
        }
    }

    async fn probe(&self, spec: &SandboxSpec) -> Liveness {
        match self.runc.state(&spec.id).await {
            // Paused is alive: frozen by a snapshot's copy or a warm
            // pause that a crash cut short; reconcile thaws it.
            Ok(Some(s)) if s == "running" || s == "paused" => Liveness::Running,
            Ok(Some(s)) => Liveness::Dead(format!("container is {s}")),
            Ok(None) => Liveness::Dead("container no longer exists".into()),
            Err(e) => Liveness::Dead(e.to_string()),
        }
    }

    /// Also drains its console again (a re-attach after a restart).
    fn agent(&self, spec: &SandboxSpec) -> AgentClient {
        if let Err(e) = self.attach_console(spec) {
            tracing::warn!(id = %spec.id, "console: {e}");
        }
        AgentClient::new(Paths::of(spec).socket)
    }

    async fn destroy(&self, spec: &SandboxSpec) -> Result<()> {
        self.halt(spec).await?;
        self.drains.detach(&spec.id);
        rootfs::remove_sandbox_dir(&spec.dir)
    }

    async fn list(&self) -> Result<Vec<String>> {
        self.runc.list().await
    }

    async fn pause(&self, spec: &SandboxSpec) -> Result<()> {
        self.runc.freeze(&spec.id, true).await
    }

    async fn resume(&self, spec: &SandboxSpec) -> Result<()> {
        self.runc.freeze(&spec.id, false).await
    }

    /// The filesystem (the overlay's upper layer) stays; processes end.
    /// Memory is not saved: CRIU is not used (its checkpoints of user
    /// namespaced, seccomp-confined containers are not reliable enough on
    /// the runc and kernels we target).
    async fn stop(&self, spec: &SandboxSpec) -> Result<StopReport> {
        // Its filesystem is its state, durable already.
        crate::backend::mark_stopped(&spec.dir)?;
        self.halt(spec).await?;
        Ok(StopReport {
            kind: "filesystem",
            bytes: 0,
        })
    }

    async fn save_to(&self, spec: &SandboxSpec, dest: &Path) -> Result<()> {
        std::fs::create_dir_all(dest).map_err(io("mkdir", dest))?;
        // A stopped container's disk is not mounted: mount it for the copy.
        let mounted_here = self.mount_disk_for_copy(spec).await?;
        let frozen = self.runc.freeze(&spec.id, true).await.is_ok();
        let r = crate::snapshot::copy_tree(&Paths::of(spec).upper, &dest.join("upper")).await;
        if frozen {
            self.runc.freeze(&spec.id, false).await?;
        }
        if mounted_here {
            disk::unmount(&spec.dir).await?;
        }
        r
    }

    /// Staged: the layer is copied into `load.tmp/` beside an empty work
    /// directory, committed, then moved over the old ones
    /// ([`crate::snapshot::finish_load`]), so a crash leaves the old layer
    /// or the new one.
    async fn load_from(&self, spec: &SandboxSpec, src: &Path) -> Result<()> {
        let p = Paths::of(spec);
        std::fs::create_dir_all(&spec.dir).map_err(io("mkdir", &spec.dir))?;
        let mounted_here = self.mount_disk_for_copy(spec).await?;
        // Staged beside the writable layer (on the sandbox's disk when it
        // has one, so the commit is a rename on one filesystem): a crash
        // leaves the old layer or the new, never half of one.
        let layer = p.layer();
        let r = async {
            crate::snapshot::finish_load(layer)?;
            let stage = crate::snapshot::load_staging(layer);
            std::fs::create_dir_all(stage.join("work")).map_err(io("mkdir", &stage))?;
            crate::snapshot::copy_tree(&src.join("upper"), &stage.join("upper")).await?;
            crate::snapshot::commit_load(layer)?;
            crate::snapshot::finish_load(layer)?;
            Ok::<(), RuntimeError>(())
        }
        .await;
        if mounted_here {
            disk::unmount(&spec.dir).await?;
        }
        r?;
        crate::backend::mark_stopped(&spec.dir)
    }

    /// Its writable layer: what its disk holds (ext4 does not count its
    /// own metadata as used), or the upper directory's size.
    fn snapshot_estimate(&self, spec: &SandboxSpec) -> u64 {
        let mnt = disk::mount_point(&spec.dir);
        if spec.disk_mb.is_some() && rootfs::is_mount_point(&mnt) {
            return rustix::fs::statvfs(&mnt)
                .map(|s| s.f_blocks.saturating_sub(s.f_bfree) * s.f_frsize)
                .unwrap_or(0);
        }
        if spec.disk_mb.is_some() {
            // Not mounted (stopped): the image's allocated blocks.
            return crate::snapshot::disk_usage(&disk::image(&spec.dir));
        }
        crate::snapshot::disk_usage(&Paths::of(spec).upper)
    }

    async fn restart(&self, spec: &SandboxSpec) -> Result<AgentClient> {
        match self.setup(spec).await {
            Ok(c) => Ok(c),
            Err(e) => {
                let _ = self.halt(spec).await;
                Err(e)
            }
        }
    }
}

impl ContainerBackend {
    /// Mount the sandbox's disk if it has one and it is not mounted;
    /// whether this call mounted it (and so must unmount it).
    async fn mount_disk_for_copy(&self, spec: &SandboxSpec) -> Result<bool> {
        match spec.disk_mb {
            Some(mb) if !rootfs::is_mount_point(&disk::mount_point(&spec.dir)) => {
                disk::ensure_mounted(&spec.dir, mb).await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// End every process and release every host resource of the sandbox
    /// but its directory (so its writable layer survives).
    async fn halt(&self, spec: &SandboxSpec) -> Result<()> {
        let p = Paths::of(spec);
        let init_pid = std::fs::read_to_string(&p.pid)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        let t0 = std::time::Instant::now();
        if let Err(e) = self.runc.kill(&spec.id).await {
            tracing::debug!(id = %spec.id, "runc kill: {e}");
        }
        let t_runc_kill = t0.elapsed();
        // The init's death makes the kernel kill its pid namespace, but a
        // fork bomb (or a frozen container) can outlast that: empty every
        // cgroup of the container for certain before runc and rmdir.
        let (parent, id) = (self.cgroup_parent.clone(), spec.id.clone());
        let killed =
            tokio::task::spawn_blocking(move || cgroup::kill_all(&parent, &id, KILL_TIMEOUT))
                .await
                .map_err(|e| RuntimeError::Setup(format!("killing the cgroup: {e}")))?;
        if let Err(left) = killed {
            return Err(RuntimeError::Setup(format!(
                "{} processes still in the sandbox's cgroups after {KILL_TIMEOUT:?}",
                left.len()
            )));
        }
        let t_cgroup_kill = t0.elapsed();
        if let Some(pid) = init_pid {
            wait_gone(pid).await;
        }
        self.runc.delete_force(&spec.id).await?;
        tracing::info!(
            id = %spec.id,
            runc_kill_ms = t_runc_kill.as_millis() as u64,
            cgroup_kill_ms = (t_cgroup_kill - t_runc_kill).as_millis() as u64,
            delete_ms = (t0.elapsed() - t_cgroup_kill).as_millis() as u64,
            "container halted"
        );
        let left = cgroup::remove(&self.cgroup_parent, &spec.id);
        if !left.is_empty() {
            return Err(RuntimeError::Setup(format!(
                "cgroups still present: {left:?}"
            )));
        }
        if let Some(lease) = &spec.net {
            crate::network::links::delete(&lease.iface).await;
        }
        // Its last console output: the FIFO ends with the container.
        self.drains.settle(&spec.id, Duration::from_secs(1)).await;
        rootfs::unmount_all(&p.rootfs)?;
        // The disk whatever the spec says (a bare spec of an orphan has none).
        disk::unmount(&spec.dir).await?;
        idmap::unstage(&spec.dir)
    }
}
