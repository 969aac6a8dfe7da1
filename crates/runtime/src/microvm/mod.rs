//! The microVM backend: one QEMU `-M microvm` process per sandbox, its own
//! guest kernel, the agent as the guest's PID 1 reached through a
//! virtio-serial port whose host end is a unix socket.
//!
//! Owns, per sandbox, everything under `<state>/sandboxes/<id>/`:
//! `disk.qcow2` (copy-on-write overlay of the template's read-only
//! `rootfs.ext4`), `agent.sock`, `qmp.sock`, `console.sock` (serial
//! console, drained into the capped `console.log` and `console.log.1`),
//! `qemu.log`, `qemu.pid`; and the QEMU process, started in its own process
//! group so that it outlives a restart of the daemon. It must not touch the
//! base image or other sandboxes' directories.

pub mod accel;
pub mod identity;
pub mod image;
pub mod initramfs;
pub mod memsnap;
pub mod persist;
pub mod procs;
pub mod qemu;
pub mod qmp;
pub mod virtiofs;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sandforge_api::Isolation;

use crate::agent::AgentClient;
use crate::backend::{Backend, Liveness, SandboxSpec, StopReport};
use crate::container::{rootfs::remove_sandbox_dir, runc::tail_of};
use crate::error::{Result, RuntimeError};
use crate::template::Template;
pub use accel::Accel;

#[derive(Debug, Clone)]
pub struct MicrovmConfig {
    pub qemu_binary: PathBuf,
    pub qemu_img: PathBuf,
    pub kernel: PathBuf,
    /// Built by the daemon at start (agent + modules), shared by all VMs.
    pub initramfs: PathBuf,
    pub accel: Accel,
    /// `<state>/sandboxes`, to find VMs after a restart.
    pub sandboxes_dir: PathBuf,
    /// How long a VM may take from QEMU start to its agent answering.
    pub boot_timeout: Duration,
    /// The rust virtiofsd, for host mounts.
    pub virtiofsd: PathBuf,
    /// First uid of the range QEMU processes run as (0: as the daemon).
    pub uid_base: u32,
    /// Where running VMs' RAM files live (a tmpfs, e.g. /dev/shm/sandforge).
    pub mem_dir: PathBuf,
    /// Cap of each sandbox's `console.log` (bytes; one rotated file more).
    pub console_cap: u64,
}

pub struct MicrovmBackend {
    cfg: MicrovmConfig,
    tsc_khz: Option<u64>,
    ids: identity::Identities,
    drains: crate::console::Drains,
}

/// The read-only ext4 image of a template (built by scripts/build-guest.sh
/// for a built-in one, derived on first use by [`image`] for the API's).
pub fn base_image(t: &Template) -> PathBuf {
    t.rootfs.with_file_name("rootfs.ext4")
}

/// The pid of the sandbox's QEMU if it is alive and really ours.
fn live_qemu(dir: &Path) -> Option<u32> {
    let pid: u32 = tail_of(&qemu::pid_file(dir), 32).parse().ok()?;
    procs::is(pid, &qemu::agent_socket(dir)).then_some(pid)
}

fn console_tail(dir: &Path) -> String {
    let t = crate::console::tail(dir, 600);
    let q = tail_of(&dir.join("qemu.log"), 300);
    match (t.is_empty(), q.is_empty()) {
        (_, false) => format!("{q} | console: {t}"),
        _ => format!("console: {t}"),
    }
}

impl MicrovmBackend {
    pub fn new(cfg: MicrovmConfig) -> Result<Self> {
        for p in [&cfg.kernel, &cfg.initramfs] {
            if !p.is_file() {
                return Err(RuntimeError::Setup(format!(
                    "{} not found (run scripts/build-guest.sh)",
                    p.display()
                )));
            }
        }
        let tsc_khz = if cfg.accel == Accel::Tcg {
            qemu::host_tsc_khz()
        } else {
            None
        };
        std::fs::create_dir_all(&cfg.mem_dir)
            .map_err(|e| RuntimeError::io("mkdir", &cfg.mem_dir, e))?;
        // Root's; QEMU's uid only traverses it to open its own RAM file.
        std::fs::set_permissions(
            &cfg.mem_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .map_err(|e| RuntimeError::io("chmod", &cfg.mem_dir, e))?;
        let ids = identity::Identities::new(cfg.uid_base);
        Ok(Self {
            cfg,
            tsc_khz,
            ids,
            drains: Default::default(),
        })
    }

    pub fn accel(&self) -> Accel {
        self.cfg.accel
    }

    /// Read the VM's serial console into its capped log (from QEMU's
    /// start, or again after a restart of the supervisor).
    fn attach_console(&self, spec: &SandboxSpec) {
        let (sock, dir) = (qemu::console_socket(&spec.dir), spec.dir.clone());
        let (cap, patience) = (self.cfg.console_cap, self.cfg.boot_timeout);
        self.drains.attach(
            &spec.id,
            crate::console::drain_socket(sock, dir, cap, patience),
        );
    }

    /// The guest RAM file of a VM (on tmpfs while it runs).
    fn mem_file(&self, spec: &SandboxSpec) -> PathBuf {
        self.cfg.mem_dir.join(format!("{}.mem", spec.id))
    }

    /// An empty RAM file of the VM's size, owned by its QEMU's uid.
    fn fresh_mem_file(
        &self,
        spec: &SandboxSpec,
        owner: Option<identity::VmIdentity>,
    ) -> Result<PathBuf> {
        let p = self.mem_file(spec);
        // The directory may have been cleaned away under a running daemon.
        if !self.cfg.mem_dir.is_dir() {
            std::fs::create_dir_all(&self.cfg.mem_dir)
                .map_err(|e| RuntimeError::io("mkdir", &self.cfg.mem_dir, e))?;
            std::fs::set_permissions(
                &self.cfg.mem_dir,
                std::os::unix::fs::PermissionsExt::from_mode(0o711),
            )
            .map_err(|e| RuntimeError::io("chmod", &self.cfg.mem_dir, e))?;
        }
        let f = std::fs::File::create(&p).map_err(|e| RuntimeError::io("create", &p, e))?;
        f.set_len(spec.memory_mb << 20)
            .map_err(|e| RuntimeError::io("truncate", &p, e))?;
        if let Some(id) = owner {
            identity::give(&p, id)?;
        }
        Ok(p)
    }

    /// A qcow2 overlay over the read-only base image; `size_mb` larger than
    /// the base grows the virtual disk (the guest's init then grows ext4).
    async fn create_disk(&self, base: &Path, disk: &Path, size_mb: Option<u64>) -> Result<()> {
        let mut cmd = tokio::process::Command::new(&self.cfg.qemu_img);
        cmd.args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(base)
            .arg(disk);
        if let Some(mb) = size_mb {
            cmd.arg(format!("{mb}M"));
        }
        crate::tool::run(&mut cmd, "qemu-img", Duration::from_secs(30)).await
    }

    fn spawn_qemu(
        &self,
        spec: &SandboxSpec,
        disk: &Path,
        shares: Vec<virtiofs::Share>,
        owner: Option<identity::VmIdentity>,
        incoming: bool,
    ) -> Result<std::process::Child> {
        let args = qemu::args(&qemu::VmArgs {
            accel: self.cfg.accel,
            cpus: spec.cpus,
            memory_mb: spec.memory_mb,
            kernel: self.cfg.kernel.clone(),
            initramfs: self.cfg.initramfs.clone(),
            disk: disk.to_path_buf(),
            dir: spec.dir.clone(),
            hostname: spec.hostname.clone(),
            tsc_khz: self.tsc_khz,
            shares,
            net: spec.net.clone(),
            mem_path: self.mem_file(spec),
            incoming,
            base_fd: true,
        });
        let cmdline_len = args
            .iter()
            .position(|a| a == "-append")
            .and_then(|i| args.get(i + 1))
            .map_or(0, |c| c.len());
        if cmdline_len > qemu::MAX_CMDLINE {
            return Err(RuntimeError::Setup(format!(
                "the guest kernel command line would be {cmdline_len} bytes (at most {}): shorten the mounts' guest paths",
                qemu::MAX_CMDLINE
            )));
        }
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(&self.cfg.qemu_binary);
        if let Some(id) = owner {
            // Not root: its own uid (std also drops supplementary groups).
            cmd.uid(id.uid).gid(id.gid);
        }
        use command_fds::{CommandFdExt, FdMapping};
        // The base image, opened read-only by the supervisor: QEMU's uid
        // cannot open the template's directory (an organization's template
        // is private), and gets only its own template's image.
        let base = base_image(&spec.template);
        let base_fd = std::fs::File::open(&base).map_err(|e| RuntimeError::io("open", &base, e))?;
        let mut fds = vec![FdMapping {
            parent_fd: base_fd.into(),
            child_fd: qemu::BASE_FD,
        }];
        if let Some(lease) = &spec.net {
            let tap = crate::network::tap::open(&lease.iface)
                .map_err(|e| RuntimeError::Setup(format!("opening tap {}: {e}", lease.iface)))?;
            fds.push(FdMapping {
                parent_fd: tap,
                child_fd: qemu::TAP_FD,
            });
        }
        cmd.fd_mappings(fds)
            .map_err(|e| RuntimeError::Setup(format!("passing descriptors to QEMU: {e}")))?;
        cmd.args(&args);
        let child = procs::spawn_detached(&mut cmd, &spec.dir.join("qemu.log"), "qemu")?;
        Ok(child)
    }

    async fn boot(&self, spec: &SandboxSpec) -> Result<AgentClient> {
        let base = base_image(&spec.template);
        if !base.is_file() {
            return Err(RuntimeError::TemplateBroken {
                name: spec.template.name.clone(),
                reason: format!(
                    "no VM image {} (run scripts/build-guest.sh)",
                    base.display()
                ),
            });
        }
        let owner = self.ids.claim(&self.cfg.sandboxes_dir, &spec.dir)?;
        let disk = spec.dir.join("disk.qcow2");
        self.create_disk(&base, &disk, spec.disk_mb).await?;
        if let Some(id) = owner {
            identity::give(&disk, id)?;
        }
        let sources = if spec.mounts.is_empty() {
            vec![]
        } else {
            let staging = crate::backend::host_mount_staging(spec);
            crate::container::idmap::unstage_plain(&staging)?;
            crate::container::idmap::stage_plain(&staging, &spec.mounts)?
        };
        let shares = virtiofs::start(
            &self.cfg.virtiofsd,
            &spec.dir,
            &spec.mounts,
            &sources,
            owner,
        )
        .await?;
        if let Some(lease) = &spec.net {
            crate::network::links::tap(lease, owner.map(|o| o.uid)).await?;
        }
        self.fresh_mem_file(spec, owner)?;
        let child = self.spawn_qemu(spec, &disk, shares, owner, false)?;
        self.attach_console(spec);
        self.wait_agent(spec, child, self.cfg.boot_timeout).await
    }

    /// Wait for the agent of a just started QEMU, for at most `timeout`.
    async fn wait_agent(
        &self,
        spec: &SandboxSpec,
        mut child: std::process::Child,
        timeout: Duration,
    ) -> Result<AgentClient> {
        let client = AgentClient::serial(qemu::agent_socket(&spec.dir));
        let deadline = Instant::now() + timeout;
        let ready = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break Err(RuntimeError::AgentUnavailable(format!(
                    "QEMU exited ({status}) during boot; {}",
                    console_tail(&spec.dir)
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(RuntimeError::AgentTimeout(timeout));
            }
            // One attempt for the whole boot window: the connection to QEMU's
            // socket succeeds at once and the request waits in the socket
            // until the guest agent opens the port. Reconnecting on a timer
            // would hand the guest a second HTTP/2 preface mid-stream. Only
            // an error (socket not there yet, connection broken) retries.
            match tokio::time::timeout(left, client.info()).await {
                Ok(Ok(_)) => break Ok(()),
                Ok(Err(_)) => {
                    client.reset().await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(_) => break Err(RuntimeError::AgentTimeout(timeout)),
            }
        };
        if ready.is_err() {
            // A boot that failed ends its QEMU here, by its own handle: its
            // pid file (what destroy goes by) may not be written yet on a
            // loaded host.
            let _ = child.kill();
        }
        // Reap QEMU whenever it exits, so it never lingers as a zombie.
        let reaper = std::thread::spawn(move || {
            let _ = child.wait();
        });
        if ready.is_err() {
            let _ = tokio::task::spawn_blocking(move || reaper.join()).await;
        }
        ready.map(|_| client)
    }
}

#[async_trait]
impl Backend for MicrovmBackend {
    fn isolation(&self) -> Isolation {
        Isolation::Microvm
    }

    async fn start(&self, spec: &SandboxSpec) -> Result<AgentClient> {
        match self.boot(spec).await {
            Ok(c) => Ok(c),
            Err(e) => {
                let e = match e {
                    RuntimeError::AgentTimeout(t) => RuntimeError::AgentUnavailable(format!(
                        "the VM's agent did not answer within {t:?}; {}",
                        console_tail(&spec.dir)
                    )),
                    other => other,
                };
                if let Err(cleanup) = self.destroy(spec).await {
                    tracing::error!(id = %spec.id, "cleanup after failed boot: {cleanup}");
                }
                Err(e)
            }
        }
    }

    async fn probe(&self, spec: &SandboxSpec) -> Liveness {
        match live_qemu(&spec.dir) {
            Some(_) => Liveness::Running,
            None => Liveness::Dead(format!("QEMU is gone; {}", console_tail(&spec.dir))),
        }
    }

    /// Also reads its console again (a re-attach after a restart).
    fn agent(&self, spec: &SandboxSpec) -> AgentClient {
        self.attach_console(spec);
        AgentClient::serial(qemu::agent_socket(&spec.dir))
    }

    async fn destroy(&self, spec: &SandboxSpec) -> Result<()> {
        kill_qemu(&spec.dir).await?;
        if let Some(lease) = &spec.net {
            crate::network::links::delete(&lease.iface).await;
        }
        // virtiofsd exits when its QEMU hangs up; make sure of it.
        for _ in 0..100 {
            if virtiofs::stop_all(&spec.dir) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = std::fs::remove_file(self.mem_file(spec));
        crate::container::idmap::unstage_plain(&crate::backend::host_mount_staging(spec))?;
        self.ids.release(&spec.dir);
        self.drains.detach(&spec.id);
        remove_sandbox_dir(&spec.dir)
    }

    async fn list(&self) -> Result<Vec<String>> {
        let Ok(rd) = std::fs::read_dir(&self.cfg.sandboxes_dir) else {
            return Ok(vec![]);
        };
        Ok(rd
            .flatten()
            .filter(|e| live_qemu(&e.path()).is_some())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect())
    }

    async fn pause(&self, spec: &SandboxSpec) -> Result<()> {
        qmp::execute(&qemu::qmp_socket(&spec.dir), "stop", None)
            .await
            .map(|_| ())
    }

    /// Also undoes a stop cut short by a supervisor crash: a migration
    /// still winding down is cancelled, and `cont` is retried until the
    /// vCPUs run.
    async fn resume(&self, spec: &SandboxSpec) -> Result<()> {
        let sock = qemu::qmp_socket(&spec.dir);
        let _ = qmp::execute(&sock, "migrate_cancel", None).await;
        let st = qmp::execute(&sock, "query-status", None).await?;
        if st["status"] == "postmigrate" {
            // Its state went out completely: resuming this QEMU leaves the
            // serial channel unusable, so the stop must be finished instead.
            return Err(RuntimeError::Unsupported(
                "the VM's state was migrated out; finish the stop".into(),
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = qmp::execute(&sock, "query-status", None).await?;
            if st["status"] == "running" {
                return Ok(());
            }
            let _ = qmp::execute(&sock, "cont", None).await;
            if Instant::now() > deadline {
                return Err(RuntimeError::Setup(format!("the VM does not resume: {st}")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(&self, spec: &SandboxSpec) -> Result<StopReport> {
        if !spec.mounts.is_empty() {
            return Err(RuntimeError::Unsupported(
                "a microVM with host mounts cannot be stopped (QEMU cannot migrate virtio-fs)"
                    .into(),
            ));
        }
        let owner = self.ids.owner_of(&spec.dir);
        let previous =
            memsnap::load(&spec.dir).map_err(|e| RuntimeError::io("read", &spec.dir, e))?;
        let n = previous.as_ref().map_or(0, |m| m.layers.len());
        let qmp_sock = qemu::qmp_socket(&spec.dir);
        let status = qmp::execute(&qmp_sock, "query-status", None).await?;
        let state = if status["status"] == "postmigrate" {
            // A stop cut short after its migration: that device state is
            // on disk already (QEMU refuses to migrate twice), and the RAM
            // file has not changed since.
            let name = format!("state.{n}");
            if !memsnap::dir(&spec.dir).join(&name).is_file() {
                return Err(RuntimeError::Setup(
                    "an interrupted stop left no device state".into(),
                ));
            }
            name
        } else {
            persist::save_device_state(&spec.dir, &qmp_sock, owner, n).await?
        };
        // QEMU stays (paused) until the snapshot is durable: a crash before
        // that leaves a VM the next start simply resumes.
        let mem = self.mem_file(spec);
        let mut m = memsnap::add_layer(&spec.dir, &mem, previous.as_ref())
            .map_err(|e| RuntimeError::io("snapshot", &mem, e))?;
        let old_state = m.device_state.replace(state);
        memsnap::save_manifest(&spec.dir, &m)
            .map_err(|e| RuntimeError::io("write", &spec.dir, e))?;
        crate::backend::mark_stopped(&spec.dir)?;
        kill_qemu(&spec.dir).await?;
        if let Some(old) = old_state {
            let _ = std::fs::remove_file(memsnap::dir(&spec.dir).join(old));
        }
        let _ = std::fs::remove_file(&mem);
        let layer = m.layers.last().map_or(0, |l| l.bytes);
        Ok(StopReport {
            kind: if n == 0 { "memory-full" } else { "memory-diff" },
            bytes: layer,
        })
    }

    async fn save_to(&self, spec: &SandboxSpec, dest: &Path) -> Result<()> {
        if live_qemu(&spec.dir).is_some() {
            return Err(RuntimeError::Setup("stop the VM before copying it".into()));
        }
        std::fs::create_dir_all(dest).map_err(|e| RuntimeError::io("mkdir", dest, e))?;
        crate::snapshot::copy_tree(&spec.dir.join("disk.qcow2"), &dest.join("disk.qcow2")).await?;
        // The copy is the daemon's alone: the VM's uid may go to another VM.
        identity::take_back(&dest.join("disk.qcow2"))?;
        crate::snapshot::link_or_copy_dir(
            &memsnap::dir(&spec.dir),
            &dest.join("snap"),
            crate::snapshot::immutable,
        )
    }

    async fn load_from(&self, spec: &SandboxSpec, src: &Path) -> Result<()> {
        if live_qemu(&spec.dir).is_some() {
            return Err(RuntimeError::Setup(
                "stop the VM before replacing its state".into(),
            ));
        }
        let owner = match self.ids.owner_of(&spec.dir) {
            Some(o) => Some(o),
            None => self.ids.claim(&self.cfg.sandboxes_dir, &spec.dir)?,
        };
        // Staged: disk and memory chain must change together, so both are
        // built in `load.tmp/`, committed, then moved over the old ones
        // ([`crate::snapshot::finish_load`]): a crash leaves the old pair
        // or the new one.
        crate::snapshot::finish_load(&spec.dir)?;
        let stage = crate::snapshot::load_staging(&spec.dir);
        std::fs::create_dir_all(&stage).map_err(|e| RuntimeError::io("mkdir", &stage, e))?;
        let disk = stage.join("disk.qcow2");
        crate::snapshot::copy_tree(&src.join("disk.qcow2"), &disk).await?;
        if let Some(id) = owner {
            identity::give(&disk, id)?;
        }
        let snap_name = memsnap::dir(&spec.dir)
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "snap".into());
        crate::snapshot::link_or_copy_dir(
            &src.join("snap"),
            &stage.join(snap_name),
            crate::snapshot::immutable,
        )?;
        crate::snapshot::commit_load(&spec.dir)?;
        crate::snapshot::finish_load(&spec.dir)?;
        if let Some(lease) = &spec.net {
            if !std::path::Path::new("/sys/class/net")
                .join(&lease.iface)
                .exists()
            {
                crate::network::links::tap(lease, owner.map(|o| o.uid)).await?;
            }
        }
        crate::backend::mark_stopped(&spec.dir)
    }

    /// Its disk overlay and memory chain as they are now.
    fn snapshot_estimate(&self, spec: &SandboxSpec) -> u64 {
        crate::snapshot::disk_usage(&spec.dir.join("disk.qcow2"))
            + crate::snapshot::disk_usage(&memsnap::dir(&spec.dir))
    }

    async fn restart(&self, spec: &SandboxSpec) -> Result<AgentClient> {
        // A rollback a crash interrupted: finished or discarded, never half.
        crate::snapshot::finish_load(&spec.dir)?;
        let m = memsnap::load(&spec.dir)
            .map_err(|e| RuntimeError::io("read", &spec.dir, e))?
            .ok_or_else(|| RuntimeError::Setup("no snapshot to start from".into()))?;
        let owner = self.ids.owner_of(&spec.dir);
        let mem = self.mem_file(spec);
        memsnap::restore(&spec.dir, &m, &mem).map_err(|e| RuntimeError::io("restore", &mem, e))?;
        if let Some(id) = owner {
            identity::give(&mem, id)?;
        }
        let disk = spec.dir.join("disk.qcow2");
        let child = self.spawn_qemu(spec, &disk, vec![], owner, true)?;
        self.attach_console(spec);
        if let Err(e) =
            persist::load_device_state(&spec.dir, &qemu::qmp_socket(&spec.dir), &m).await
        {
            let _ = kill_qemu(&spec.dir).await;
            return Err(e);
        }
        self.wait_agent(spec, child, Duration::from_secs(30)).await
    }
}

/// End the sandbox's QEMU: QMP `quit`, then SIGKILL if it is still there.
async fn kill_qemu(dir: &Path) -> Result<()> {
    let Some(pid) = live_qemu(dir) else {
        return Ok(());
    };
    // Ask politely, then make sure.
    let _ = qmp::execute(&qemu::qmp_socket(dir), "quit", None).await;
    for _ in 0..50 {
        if live_qemu(dir).is_none() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::Kill);
    }
    for _ in 0..250 {
        if live_qemu(dir).is_none() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(RuntimeError::Setup(format!("QEMU {pid} survived SIGKILL")))
}
