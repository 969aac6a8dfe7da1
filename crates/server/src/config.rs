//! Supervisor configuration: defaults, the YAML file (`serde_yaml_ng`), and
//! command-line overrides (flag > file > default), and the check of every
//! key (types, ranges, formats) before the daemon does anything: an invalid
//! config is an error naming the key. Owns no state and does no I/O beyond
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
    /// Seconds a microVM create waits for its template's image when it is
    /// the template's first (the image is derived from the tree, then
    /// cached); past that the create answers 409 `template_not_ready` and
    /// the derivation goes on.
    pub vm_image_wait_secs: u64,
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
    /// Largest root filesystem a sandbox save or a Dockerfile build may
    /// commit as a template, in MiB (the tar stream: contents + headers).
    pub template_max_mb: u64,
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
    /// MiB an image archive uploaded to `POST /v1/templates/import` may
    /// have (it is spooled to the state dir; beyond it: 413).
    pub template_import_max_mb: u64,
}

/// The YAML text as a config: a wrong type or unknown key is an error that
/// starts with the key's path.
fn parse(raw: &str) -> Result<Config, String> {
    let de = serde_yaml_ng::Deserializer::from_str(raw);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." || inner.starts_with(&format!("{path}: ")) {
            inner
        } else {
            format!("{path}: {inner}")
        }
    })
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
            vm_image_wait_secs: 120,
            vm_disk_mb: 2048,
            container_disk_mb: 4096,
            console_log_max_kb: 1024,
            max_snapshot_bytes_per_org: 20 << 30,
            max_snapshots_per_sandbox: 32,
            template_max_mb: 8192,
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
            template_import_max_mb: 4096,
        }
    }
}

/// An invalid value of `key`: the message starts with the key.
fn invalid(key: &str, message: impl std::fmt::Display) -> ServerError {
    ServerError::Config(format!("{key}: {message}"))
}

fn invalid_more(e: ServerError, more: &str) -> ServerError {
    match e {
        ServerError::Config(m) => ServerError::Config(format!("{m} {more}")),
        other => other,
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
                    parse(&raw)
                        .map_err(|e| ServerError::Config(format!("{e} (in {})", p.display())))?
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

    /// Every key checked (types are checked by the parser): an invalid
    /// value stops the daemon before it listens, with a message that starts
    /// with the key. Whether the host can do networking is not checked
    /// here: that is a degraded mode, not an invalid config.
    fn validate(&self) -> Result<(), ServerError> {
        use sandforge_api::limits::{MAX_DISK_MB, MIN_DISK_MB};
        let addr = |key: &str, v: &str| {
            v.parse::<std::net::SocketAddr>()
                .map_err(|_| invalid(key, format!("'{v}' is not an address:port")))
        };
        let listen = addr("listen", &self.listen)?;
        let publish = addr("publish_listen", &self.publish_listen)?;
        if listen == publish {
            return Err(invalid(
                "publish_listen",
                format!("'{publish}' is also `listen`: the two listeners need their own addresses"),
            ));
        }
        for (key, p) in [
            ("state_dir", &self.state_dir),
            ("template_dir", &self.template_dir),
            ("guest_dir", &self.guest_dir),
            ("virtiofsd", &self.virtiofsd),
        ] {
            if !p.is_absolute() {
                return Err(invalid(
                    key,
                    format!("'{}' is not an absolute path", p.display()),
                ));
            }
        }
        for (i, p) in self.allowed_host_paths.iter().enumerate() {
            if !p.is_absolute() {
                return Err(invalid(
                    &format!("allowed_host_paths[{i}]"),
                    format!("'{}' is not an absolute path", p.display()),
                ));
            }
        }
        // Binaries: an absolute path, or a bare name looked up in PATH.
        for (key, p) in [
            ("runc", Some(&self.runc)),
            ("qemu", Some(&self.qemu)),
            ("qemu_img", Some(&self.qemu_img)),
            ("agent_binary", self.agent_binary.as_ref()),
        ] {
            let Some(p) = p else { continue };
            let bare = p.components().count() == 1 && !p.as_os_str().is_empty();
            if !(p.is_absolute() || bare && key != "agent_binary") {
                return Err(invalid(
                    key,
                    format!(
                        "'{}' is neither an absolute path nor a bare program name",
                        p.display()
                    ),
                ));
            }
        }
        let one_of = |key: &str, v: &str, allowed: &[&str]| {
            if allowed.contains(&v) {
                Ok(())
            } else {
                Err(invalid(
                    key,
                    format!("'{v}' is not one of {}", allowed.join(", ")),
                ))
            }
        };
        one_of(
            "default_isolation",
            &self.default_isolation,
            &["auto", "container", "microvm"],
        )?;
        one_of("accel", &self.accel, &["auto", "kvm", "tcg"])?;
        one_of(
            "default_network",
            &self.default_network,
            &["nat", "offline"],
        )?;
        let range = |key: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(invalid(key, format!("{v} is not between {lo} and {hi}")))
            }
        };
        range(
            "max_sandboxes_per_org",
            self.max_sandboxes_per_org,
            1,
            1_000_000,
        )?;
        range("pids_limit", self.pids_limit, 16, 4_194_304)?;
        range("agent_timeout_secs", self.agent_timeout_secs, 1, 3600)?;
        range("monitor_interval_secs", self.monitor_interval_secs, 1, 3600)?;
        range("vm_boot_timeout_secs", self.vm_boot_timeout_secs, 1, 3600)?;
        range("vm_image_wait_secs", self.vm_image_wait_secs, 1, 3600)?;
        range("vm_disk_mb", self.vm_disk_mb, MIN_DISK_MB, MAX_DISK_MB)?;
        if self.container_disk_mb != 0 {
            range(
                "container_disk_mb",
                self.container_disk_mb,
                MIN_DISK_MB,
                MAX_DISK_MB,
            )
            .map_err(|e| invalid_more(e, "(or 0: no disk image)"))?;
        }
        range("console_log_max_kb", self.console_log_max_kb, 1, 1 << 20)?;
        range(
            "exec_buffer_budget_mb",
            self.exec_buffer_budget_mb,
            1,
            1 << 20,
        )?;
        range("template_max_mb", self.template_max_mb, 16, MAX_DISK_MB)?;
        range(
            "template_import_max_mb",
            self.template_import_max_mb,
            1,
            1 << 20,
        )?;
        range(
            "max_snapshots_per_sandbox",
            self.max_snapshots_per_sandbox,
            0,
            100_000,
        )?;
        range(
            "lifecycle_interval_ms",
            self.lifecycle_interval_ms,
            100,
            3_600_000,
        )?;
        const TEN_YEARS: u64 = 10 * 365 * 86_400;
        range(
            "thermal_warm_after_secs",
            self.thermal_warm_after_secs,
            0,
            TEN_YEARS,
        )?;
        range(
            "thermal_cold_after_secs",
            self.thermal_cold_after_secs,
            0,
            TEN_YEARS,
        )?;
        range("max_connections", self.max_connections as u64, 1, 1_000_000)?;
        range("header_timeout_secs", self.header_timeout_secs, 1, 3600)?;
        let uid_range = sandforge_runtime::microvm::identity::RANGE;
        if self.vm_uid_base != 0 {
            range(
                "vm_uid_base",
                self.vm_uid_base.into(),
                1000,
                (u32::MAX - uid_range - 1).into(),
            )
            .map_err(|e| invalid_more(e, "(or 0: QEMU runs as the daemon's user)"))?;
        }
        if self.publish_domain.is_empty()
            || self.publish_domain.starts_with('*')
            || !sandforge_api::network::valid_domain(&self.publish_domain)
        {
            return Err(invalid(
                "publish_domain",
                format!("'{}' is not a lowercase DNS name", self.publish_domain),
            ));
        }
        match sandforge_api::Cidr::parse(&self.network_subnet) {
            None => {
                return Err(invalid(
                    "network_subnet",
                    format!("'{}' is not an IPv4 CIDR", self.network_subnet),
                ))
            }
            Some(c) if !(8..=28).contains(&c.len) => {
                return Err(invalid(
                    "network_subnet",
                    format!("'{}': the prefix length must be 8-28", self.network_subnet),
                ))
            }
            Some(_) => {}
        }
        if !(1..=4).contains(&self.network_prefix.len())
            || !self.network_prefix.bytes().all(|b| b.is_ascii_lowercase())
        {
            return Err(invalid(
                "network_prefix",
                format!("'{}' is not 1-4 lowercase letters", self.network_prefix),
            ));
        }
        let t = self.nft_table.as_bytes();
        if !(1..=28).contains(&t.len())
            || !t[0].is_ascii_lowercase()
            || !t
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
        {
            return Err(invalid(
                "nft_table",
                format!(
                    "'{}' is not 1-28 characters of [a-z0-9_] starting with a letter",
                    self.nft_table
                ),
            ));
        }
        self.dns_upstream_addr()?;
        for name in self.dns_hosts.keys() {
            let n = name.trim_end_matches('.').to_ascii_lowercase();
            if n.is_empty() || n.starts_with('*') || !sandforge_api::network::valid_domain(&n) {
                return Err(invalid(&format!("dns_hosts.{name}"), "is not a DNS name"));
            }
        }
        Ok(())
    }

    /// `dns_upstream` as a socket address (port 53 when it has none).
    pub fn dns_upstream_addr(&self) -> Result<Option<std::net::SocketAddr>, ServerError> {
        let Some(u) = &self.dns_upstream else {
            return Ok(None);
        };
        u.parse::<std::net::SocketAddr>()
            .or_else(|_| u.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
            .map(Some)
            .map_err(|_| invalid("dns_upstream", format!("'{u}' is not an ip or ip:port")))
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

    fn error_of(yaml: &str) -> String {
        match parse(yaml).map_err(ServerError::Config).and_then(|c| {
            c.validate()?;
            Ok(c)
        }) {
            Ok(_) => panic!("{yaml:?} was accepted"),
            Err(ServerError::Config(m)) => m,
            Err(e) => panic!("{yaml:?}: {e}"),
        }
    }

    #[test]
    fn every_invalid_key_is_named() {
        for (yaml, key) in [
            ("network_prefix: q163", "network_prefix"),
            ("network_prefix: abcde", "network_prefix"),
            ("network_subnet: 10.0.0.0/30", "network_subnet"),
            ("network_subnet: 10.0.0.0", "network_subnet"),
            ("nft_table: \"x; flush ruleset\"", "nft_table"),
            ("nft_table: 9abc", "nft_table"),
            ("dns_upstream: resolver", "dns_upstream"),
            ("dns_hosts: {\"bad name\": 10.0.0.1}", "dns_hosts.bad name"),
            ("dns_hosts: {a.b: nope}", "dns_hosts"),
            ("pids_limit: lots", "pids_limit"),
            ("pids_limit: -1", "pids_limit"),
            ("pids_limit: 8", "pids_limit"),
            ("max_sandboxes_per_org: 0", "max_sandboxes_per_org"),
            ("monitor_interval_secs: 0", "monitor_interval_secs"),
            ("agent_timeout_secs: 0", "agent_timeout_secs"),
            ("vm_boot_timeout_secs: 0", "vm_boot_timeout_secs"),
            ("vm_image_wait_secs: 0", "vm_image_wait_secs"),
            ("lifecycle_interval_ms: 5", "lifecycle_interval_ms"),
            (
                "thermal_warm_after_secs: 999999999999",
                "thermal_warm_after_secs",
            ),
            ("vm_disk_mb: 1", "vm_disk_mb"),
            ("container_disk_mb: 1", "container_disk_mb"),
            ("vm_uid_base: 5", "vm_uid_base"),
            ("vm_uid_base: 4294967295", "vm_uid_base"),
            ("max_connections: 0", "max_connections"),
            ("header_timeout_secs: 0", "header_timeout_secs"),
            ("console_log_max_kb: 0", "console_log_max_kb"),
            ("listen: 127.0.0.1", "listen"),
            ("publish_listen: 127.0.0.1:8585", "publish_listen"),
            ("publish_domain: Upper.Case", "publish_domain"),
            ("default_network: wifi", "default_network"),
            ("default_isolation: jail", "default_isolation"),
            ("accel: hvf", "accel"),
            ("state_dir: relative/dir", "state_dir"),
            ("template_dir: t", "template_dir"),
            ("guest_dir: g", "guest_dir"),
            ("virtiofsd: bin/virtiofsd", "virtiofsd"),
            ("runc: ./runc", "runc"),
            ("qemu: \"\"", "qemu"),
            ("agent_binary: sandforge-agent", "agent_binary"),
            ("allowed_host_paths: [/ok, rel]", "allowed_host_paths[1]"),
            ("allowed_host_paths: /srv", "allowed_host_paths"),
            ("lisen: x", "lisen"),
        ] {
            let m = error_of(yaml);
            assert!(
                m.starts_with(key) || m.contains(&format!("`{key}`")),
                "{yaml}: {m}"
            );
        }
        // Fine as they are.
        for yaml in [
            "runc: runc\nqemu: /usr/bin/qemu-system-x86_64",
            "vm_uid_base: 0\ncontainer_disk_mb: 0\nthermal_warm_after_secs: 0",
            "dns_upstream: 10.0.0.1\ndns_hosts: {Db.Local.: 10.0.0.2}",
            "dns_upstream: 10.0.0.1:5353\nnetwork_prefix: z\nnft_table: sft_1",
        ] {
            let c = parse(yaml).unwrap();
            c.validate().unwrap_or_else(|e| panic!("{yaml}: {e}"));
        }
    }
}
