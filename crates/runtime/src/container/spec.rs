//! The OCI runtime spec (`config.json`) of a sandbox container: what isolates
//! it. Pure: builds a value from a [`SandboxSpec`], writes nothing.
//!
//! - namespaces: user (root inside = `uid_shift` outside), pid, mount, ipc,
//!   uts, cgroup, network (a fresh one with only loopback when offline);
//! - cgroup limits: memory = `memory_mb` (no swap), CPU quota = `cpus`
//!   cores, a pids cap, all devices denied but runc's defaults;
//! - `noNewPrivileges`, a reduced capability set (Docker's default minus
//!   `NET_RAW`, `MKNOD`, `AUDIT_WRITE`, `SETFCAP`), the seccomp allow-list of
//!   [`super::seccomp`], masked /proc paths, read-only /sys.

use std::path::Path;

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder,
    LinuxIdMappingBuilder, LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder, ProcessBuilder, RootBuilder,
    Spec, SpecBuilder, UserBuilder,
};

use crate::backend::SandboxSpec;
use crate::error::{Result, RuntimeError};

/// Where the agent binary and its socket directory appear inside.
pub const GUEST_AGENT_PATH: &str = "/.sandforge/sandforge-agent";
/// The descriptor the agent's listening socket arrives on (runc's
/// `--preserve-fds 1`: the first preserved descriptor is 3).
pub const AGENT_LISTEN_FD: i32 = 3;
/// Size of the uid/gid range mapped into each container.
pub const ID_RANGE: u32 = 65_536;

const CAPS: [Capability; 10] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::Kill,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
];

fn err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Setup(format!("building OCI spec: {e}"))
}

fn bind(dest: &str, src: &Path, ro: bool, extra: &[&str]) -> Result<Mount> {
    let mut opts = vec![
        "rbind".to_string(),
        if ro { "ro" } else { "rw" }.to_string(),
    ];
    opts.extend(extra.iter().map(|s| s.to_string()));
    MountBuilder::default()
        .destination(dest)
        .typ("bind")
        .source(src)
        .options(opts)
        .build()
        .map_err(err)
}

/// Build the spec. `rootfs` is the mounted overlay; `agent_binary` is bound
/// read-only into `/.sandforge`. The agent's socket is not in the
/// container's filesystem at all: it listens on an inherited descriptor.
/// `mount_sources[i]` is where `spec.mounts[i]` is bound from (its staged,
/// id-mapped copy, or the host path itself).
pub fn build(
    spec: &SandboxSpec,
    rootfs: &Path,
    agent_binary: &Path,
    mount_sources: &[std::path::PathBuf],
    cgroups_path: &str,
) -> Result<Spec> {
    let shift = spec.template.uid_shift;
    let caps: std::collections::HashSet<Capability> = CAPS.into_iter().collect();
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(0u32)
                .gid(0u32)
                .build()
                .map_err(err)?,
        )
        .args(vec![
            GUEST_AGENT_PATH.to_string(),
            "--listen-fd".into(),
            AGENT_LISTEN_FD.to_string(),
        ])
        .env(vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        ])
        .cwd("/")
        .no_new_privileges(true)
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .permitted(caps)
                .inheritable(std::collections::HashSet::new())
                .ambient(std::collections::HashSet::new())
                .build()
                .map_err(err)?,
        )
        .build()
        .map_err(err)?;

    let mut mounts: Vec<Mount> = oci_spec::runtime::get_default_mounts()
        .into_iter()
        .filter(|m| m.destination() != Path::new("/sys/fs/cgroup"))
        .collect();
    mounts.push(bind(
        GUEST_AGENT_PATH,
        agent_binary,
        true,
        &["nosuid", "nodev"],
    )?);
    for (m, src) in spec.mounts.iter().zip(mount_sources) {
        mounts.push(bind(&m.guest_path, src, m.read_only, &["nosuid", "nodev"])?);
    }

    let ns = |t| LinuxNamespaceBuilder::default().typ(t).build().map_err(err);
    let namespaces = vec![
        ns(LinuxNamespaceType::User)?,
        ns(LinuxNamespaceType::Pid)?,
        ns(LinuxNamespaceType::Mount)?,
        ns(LinuxNamespaceType::Ipc)?,
        ns(LinuxNamespaceType::Uts)?,
        ns(LinuxNamespaceType::Cgroup)?,
        ns(LinuxNamespaceType::Network)?,
    ];
    let map = LinuxIdMappingBuilder::default()
        .container_id(0u32)
        .host_id(shift)
        .size(ID_RANGE)
        .build()
        .map_err(err)?;

    let memory_bytes = (spec.memory_mb * 1024 * 1024) as i64;
    let resources = LinuxResourcesBuilder::default()
        .devices(vec![LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()
            .map_err(err)?])
        .memory(
            LinuxMemoryBuilder::default()
                .limit(memory_bytes)
                .build()
                .map_err(err)?,
        )
        .cpu(
            LinuxCpuBuilder::default()
                .quota(spec.cpus as i64 * 100_000)
                .period(100_000u64)
                .build()
                .map_err(err)?,
        )
        .pids(
            LinuxPidsBuilder::default()
                .limit(spec.pids_limit as i64)
                .build()
                .map_err(err)?,
        )
        .build()
        .map_err(err)?;

    let seccomp = super::seccomp::profile()?;

    let defaults = oci_spec::runtime::Linux::default();
    let linux = LinuxBuilder::default()
        .uid_mappings(vec![map])
        .gid_mappings(vec![map])
        .namespaces(namespaces)
        .resources(resources)
        .cgroups_path(cgroups_path)
        .seccomp(seccomp)
        .masked_paths(defaults.masked_paths().clone().unwrap_or_default())
        .readonly_paths(defaults.readonly_paths().clone().unwrap_or_default())
        .build()
        .map_err(err)?;

    SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path(rootfs)
                .readonly(false)
                .build()
                .map_err(err)?,
        )
        .hostname(spec.hostname.clone())
        .process(process)
        .mounts(mounts)
        .linux(linux)
        .build()
        .map_err(err)
}
