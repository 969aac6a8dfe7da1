//! Supervisor configuration: defaults, the YAML file, and command-line
//! overrides (flag > file > default). Owns no state and does no I/O beyond
//! reading the file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ServerError;

/// `config.yaml`. Every key is optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the HTTP API.
    pub listen: String,
    /// Everything the daemon owns lives here (database, sandboxes, runc state).
    pub state_dir: PathBuf,
    /// Where templates are built and cached (outside any state directory).
    pub template_dir: PathBuf,
    /// Host directories (and their subdirectories) that `mounts` may bind.
    pub allowed_host_paths: Vec<PathBuf>,
    /// The OCI runtime binary.
    pub runc: PathBuf,
    /// The static guest agent; found next to the `sandforge` binary if unset.
    pub agent_binary: Option<PathBuf>,
    /// Live (not destroyed) sandboxes one organization may have.
    pub max_sandboxes_per_org: u64,
    /// Process cap of each sandbox (cgroup pids limit).
    pub pids_limit: u64,
    /// Seconds a new sandbox's agent has to answer before create fails.
    pub agent_timeout_secs: u64,
    /// Seconds between liveness checks of running sandboxes.
    pub monitor_interval_secs: u64,
    /// Isolation when a create does not say: `auto` (microvm where the host
    /// has hardware KVM, container otherwise), `container` or `microvm`.
    pub default_isolation: String,
    /// QEMU accelerator: `auto` (KVM with hardware virtualization, else TCG),
    /// `kvm` or `tcg`.
    pub accel: String,
    /// QEMU and qemu-img binaries.
    pub qemu: PathBuf,
    pub qemu_img: PathBuf,
    /// Guest kernel and modules (built by scripts/build-guest.sh).
    pub guest_dir: PathBuf,
    /// Seconds a VM has from QEMU start to its agent answering.
    pub vm_boot_timeout_secs: u64,
    /// Root disk of a microVM when the create does not set `disk_mb`.
    pub vm_disk_mb: u64,
    /// Disk (writable layer) of a container when the create does not set
    /// `disk_mb`; 0: none, the layer is on the host's filesystem unbounded.
    pub container_disk_mb: u64,
    /// Cap of each sandbox's console log in KiB (one rotated file more).
    pub console_log_max_kb: u64,
    /// Bytes all of one organization's named snapshots may hold.
    pub max_snapshot_bytes_per_org: u64,
    /// Named snapshots one sandbox may have.
    pub max_snapshots_per_sandbox: u64,
    /// Each QEMU runs as its own uid from `vm_uid_base` up (no passwd entry
    /// needed); 0 runs QEMU as the daemon's user.
    pub vm_uid_base: u32,
    /// The rust virtiofsd (host mounts in microVMs).
    pub virtiofsd: PathBuf,
    /// Network of a create that does not say: `nat` or `offline`.
    pub default_network: String,
    /// Private IPv4 subnet the sandboxes' /30 links come from.
    pub network_subnet: String,
    /// Name prefix of the sandboxes' host links (1-4 lowercase letters).
    pub network_prefix: String,
    /// nftables tables: `inet <nft_table>` and `ip <nft_table>_nat`.
    pub nft_table: String,
    /// Where the sandboxes' resolver forwards (`ip` or `ip:port`); default:
    /// the host's first `nameserver`.
    pub dns_upstream: Option<String>,
    /// Names the sandboxes' resolver answers itself, like /etc/hosts.
    pub dns_hosts: std::collections::BTreeMap<String, std::net::Ipv4Addr>,
    /// How often the thermal manager and expiry look (milliseconds).
    pub lifecycle_interval_ms: u64,
    /// Idle seconds before a running sandbox is suspended (warm); 0: never.
    /// A persistent sandbox's `idle_timeout` overrides it.
    pub thermal_warm_after_secs: u64,
    /// Further idle seconds before a suspended sandbox is stopped (cold,
    /// memory released); 0: never.
    pub thermal_cold_after_secs: u64,
    /// Address of the publish listener (published ports, no auth).
    pub publish_listen: String,
    /// Published ports answer as `{alias}.{publish_domain}`.
    pub publish_domain: String,
    /// Open connections per listener (API, publish); at the cap the oldest
    /// idle one is closed for a new one, or the new one gets a 503.
    pub max_connections: usize,
    /// Seconds a connection has to send a complete request head, from its
    /// opening or its previous response (so also the keep-alive idle
    /// timeout).
    pub header_timeout_secs: u64,
    /// MiB all buffered exec output of the daemon may hold at once (the
    /// text and its JSON answers until sent); beyond it a new buffered exec
    /// gets 429 `limit` and a running one is cut (`truncated`).
    pub exec_buffer_budget_mb: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8585".into(),
            state_dir: PathBuf::from("/var/lib/sandforge"),
            template_dir: PathBuf::from("/var/cache/sandforge/templates"),
            allowed_host_paths: vec![],
            runc: PathBuf::from("runc"),
            agent_binary: None,
            max_sandboxes_per_org: 64,
            pids_limit: 1024,
            agent_timeout_secs: 15,
            monitor_interval_secs: 3,
            default_isolation: "auto".into(),
            accel: "auto".into(),
            qemu: PathBuf::from("qemu-system-x86_64"),
            qemu_img: PathBuf::from("qemu-img"),
            guest_dir: PathBuf::from("/var/cache/sandforge/guest"),
            vm_boot_timeout_secs: 60,
            vm_disk_mb: 2048,
            container_disk_mb: 4096,
            console_log_max_kb: 1024,
            max_snapshot_bytes_per_org: 20 << 30,
            max_snapshots_per_sandbox: 32,
            vm_uid_base: 2_000_000,
            virtiofsd: PathBuf::from("/var/cache/sandforge/virtiofsd/bin/virtiofsd"),
            default_network: "nat".into(),
            network_subnet: "10.213.0.0/16".into(),
            network_prefix: "sf".into(),
            nft_table: "sandforge".into(),
            dns_upstream: None,
            dns_hosts: Default::default(),
            lifecycle_interval_ms: 1000,
            thermal_warm_after_secs: 600,
            thermal_cold_after_secs: 3600,
            publish_listen: "127.0.0.1:8586".into(),
            publish_domain: "sandforge.localhost".into(),
            max_connections: 1024,
            header_timeout_secs: 15,
            exec_buffer_budget_mb: 256,
        }
    }
}

impl Config {
    /// Load `path` (YAML) or the defaults, then apply overrides.
    pub fn load(
        path: Option<&Path>,
        listen: Option<String>,
        state_dir: Option<PathBuf>,
    ) -> Result<Self, ServerError> {
        let mut cfg = match path {
            Some(p) => {
                let raw = std::fs::read_to_string(p)
                    .map_err(|e| ServerError::Config(format!("reading {}: {e}", p.display())))?;
                if raw.trim().is_empty() {
                    Config::default()
                } else {
                    serde_yaml::from_str(&raw)
                        .map_err(|e| ServerError::Config(format!("{}: {e}", p.display())))?
                }
            }
            None => Config::default(),
        };
        if let Some(l) = listen {
            cfg.listen = l;
        }
        if let Some(s) = state_dir {
            cfg.state_dir = s;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ServerError> {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ServerError::Config(format!(
                "listen: '{}' is not an address:port",
                self.listen
            )));
        }
        for p in &self.allowed_host_paths {
            if !p.is_absolute() {
                return Err(ServerError::Config(format!(
                    "allowed_host_paths: {} is not absolute",
                    p.display()
                )));
            }
        }
        if self.publish_listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ServerError::Config(format!(
                "publish_listen: '{}' is not an address:port",
                self.publish_listen
            )));
        }
        if self.publish_domain.is_empty()
            || !sandforge_api::network::valid_domain(&self.publish_domain)
        {
            return Err(ServerError::Config(format!(
                "publish_domain: '{}' is not a lowercase DNS name",
                self.publish_domain
            )));
        }
        if !["nat", "offline"].contains(&self.default_network.as_str()) {
            return Err(ServerError::Config(format!(
                "default_network: '{}' is not one of nat, offline",
                self.default_network
            )));
        }
        if sandforge_api::Cidr::parse(&self.network_subnet).is_none() {
            return Err(ServerError::Config(format!(
                "network_subnet: '{}' is not an IPv4 CIDR",
                self.network_subnet
            )));
        }
        if !["auto", "container", "microvm"].contains(&self.default_isolation.as_str()) {
            return Err(ServerError::Config(format!(
                "default_isolation: '{}' is not one of auto, container, microvm",
                self.default_isolation
            )));
        }
        if !["auto", "kvm", "tcg"].contains(&self.accel.as_str()) {
            return Err(ServerError::Config(format!(
                "accel: '{}' is not one of auto, kvm, tcg",
                self.accel
            )));
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Err(ServerError::Config(
                "max_connections: must be 1-1000000".into(),
            ));
        }
        if !(1..=3600).contains(&self.header_timeout_secs) {
            return Err(ServerError::Config(
                "header_timeout_secs: must be 1-3600".into(),
            ));
        }
        if !(1..=1 << 20).contains(&self.exec_buffer_budget_mb) {
            return Err(ServerError::Config(
                "exec_buffer_budget_mb: must be between 1 and 1048576".into(),
            ));
        }
        use sandforge_api::limits::{MAX_DISK_MB, MIN_DISK_MB};
        if self.container_disk_mb != 0
            && !(MIN_DISK_MB..=MAX_DISK_MB).contains(&self.container_disk_mb)
        {
            return Err(ServerError::Config(format!(
                "container_disk_mb: must be 0 (unlimited) or between {MIN_DISK_MB} and {MAX_DISK_MB}"
            )));
        }
        if !(1..=1 << 20).contains(&self.console_log_max_kb) {
            return Err(ServerError::Config(
                "console_log_max_kb: must be between 1 and 1048576".into(),
            ));
        }
        if self.pids_limit < 16 {
            return Err(ServerError::Config(
                "pids_limit: must be at least 16".into(),
            ));
        }
        Ok(())
    }

    /// The agent binary to install into the state directory.
    pub fn resolve_agent_binary(&self) -> Result<PathBuf, ServerError> {
        let mut candidates = vec![];
        if let Some(p) = &self.agent_binary {
            candidates.push(p.clone());
        }
        if let Some(p) = std::env::var_os("SANDFORGE_AGENT") {
            candidates.push(PathBuf::from(p));
        }
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
        {
            // In a cargo target dir, the static build sits in the target
            // triple's directory; an installed agent sits beside us.
            for up in [dir.join(".."), dir.join("../..")] {
                candidates.push(up.join("x86_64-unknown-linux-gnu/release/sandforge-agent"));
            }
            candidates.push(dir.join("sandforge-agent"));
        }
        candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
            ServerError::Config(
                "no sandforge-agent binary found: set agent_binary, SANDFORGE_AGENT, or run scripts/setup.sh".into(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_overrides_and_rejects_unknown_keys() {
        let dir = std::env::temp_dir().join(format!("sf-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.yaml");
        std::fs::write(&f, "listen: 127.0.0.1:9999\nallowed_host_paths: [/srv]\n").unwrap();
        let c = Config::load(Some(&f), None, None).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9999");
        assert_eq!(c.allowed_host_paths, vec![PathBuf::from("/srv")]);
        let c = Config::load(Some(&f), Some("127.0.0.1:1".into()), Some("/x".into())).unwrap();
        assert_eq!(
            (c.listen.as_str(), c.state_dir.as_path()),
            ("127.0.0.1:1", Path::new("/x"))
        );
        std::fs::write(&f, "lisen: x\n").unwrap();
        assert!(Config::load(Some(&f), None, None).is_err());
        std::fs::write(&f, "listen: nope\n").unwrap();
        assert!(Config::load(Some(&f), None, None).is_err());
        std::fs::write(&f, "exec_buffer_budget_mb: 64\n").unwrap();
        let c = Config::load(Some(&f), None, None).unwrap();
        assert_eq!(c.exec_buffer_budget_mb, 64);
        for bad in ["0", "-1", "lots", "1048577"] {
            std::fs::write(&f, format!("exec_buffer_budget_mb: {bad}\n")).unwrap();
            let e = Config::load(Some(&f), None, None).unwrap_err().to_string();
            assert!(e.contains("exec_buffer_budget_mb"), "{e}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
