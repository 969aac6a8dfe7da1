//! The Sandforge supervisor: HTTP API, authentication, the SQLite state
//! database and the controller that drives the runtime backends.
//!
//! Request path: `routes` (parse, authenticate) → `controller` (check
//! against state, record transitions in `db`) → `sandforge_runtime`
//! (backend for lifecycle, agent client for exec/files).
//!
//! On-disk layout under the state directory:
//! `sandforge.db` (+ WAL), `daemon.lock`, `bin/sandforge-agent`,
//! `runc/` (runc's state), `sandboxes/<id>/` (one per live sandbox).

pub mod auth;
mod builds;
pub mod config;
pub mod controller;
pub mod db;
pub mod error;
pub mod json;
mod lifecycle;
mod listener;
mod network;
mod output;
mod proxy;
mod publish;
mod reconcile;
mod routes;
mod sessions;
mod snapshots;
mod templates;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sandforge_runtime::container::{ContainerBackend, ContainerConfig};
use sandforge_runtime::microvm::{self, MicrovmBackend, MicrovmConfig};
use sandforge_runtime::Backend;

pub use config::Config;
pub use controller::Controller;

/// Shared state of every request handler.
#[derive(Clone)]
pub struct AppState {
    pub controller: Arc<Controller>,
}

#[derive(Debug, Default, Clone)]
pub struct ServeOptions {
    pub listen: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("config: {0}")]
    Config(String),
    #[error("database: {0}")]
    Db(String),
    #[error("{0}")]
    Startup(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ServerError + 'a {
    move |source| ServerError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The config file: `--config`, else `$SANDFORGE_CONFIG`, else
/// `/etc/sandforge/config.yaml` when it exists.
fn config_path(opt: Option<PathBuf>) -> Option<PathBuf> {
    opt.or_else(|| std::env::var_os("SANDFORGE_CONFIG").map(PathBuf::from))
        .or_else(|| {
            let p = PathBuf::from("/etc/sandforge/config.yaml");
            p.exists().then_some(p)
        })
}

/// Create the state directory tree. Directories are 0711: the containers'
/// mapped root must traverse them to reach its rootfs, but may not list them.
fn prepare_state_dir(state: &Path) -> Result<(), ServerError> {
    for d in [
        state.to_path_buf(),
        state.join("sandboxes"),
        state.join("bin"),
    ] {
        std::fs::create_dir_all(&d).map_err(io("mkdir", &d))?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711))
            .map_err(io("chmod", &d))?;
    }
    Ok(())
}

/// Hold an exclusive lock on the state directory for the daemon's lifetime.
fn lock_state_dir(state: &Path) -> Result<std::fs::File, ServerError> {
    let path = state.join("daemon.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io("open", &path))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|_| {
        ServerError::Startup(format!(
            "another sandforge daemon is using {}",
            state.display()
        ))
    })?;
    Ok(f)
}

/// Copy the agent into `<state>/bin` (atomically, only when it changed), so
/// the state directory is self-contained and rebuilding the project does
/// not swap the binary under running sandboxes.
fn install_agent(src: &Path, state: &Path) -> Result<PathBuf, ServerError> {
    let dest = state.join("bin/sandforge-agent");
    let new = std::fs::read(src).map_err(io("read", src))?;
    if std::fs::read(&dest).ok().as_deref() != Some(&new[..]) {
        let tmp = state.join("bin/.sandforge-agent.tmp");
        std::fs::write(&tmp, &new).map_err(io("write", &tmp))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .map_err(io("chmod", &tmp))?;
        std::fs::rename(&tmp, &dest).map_err(io("rename", &dest))?;
    }
    Ok(dest)
}

fn valid_org(org: &str) -> Result<(), ServerError> {
    sandforge_api::sandbox::validate_name("org", org)
        .map_err(|e| ServerError::Config(e.to_string()))
}

/// `sandforge token create`: a new token for `org`, stored hashed.
pub fn create_token(state_dir: &Path, org: &str) -> Result<String, ServerError> {
    valid_org(org)?;
    prepare_state_dir(state_dir)?;
    let db = db::Db::open(&state_dir.join("sandforge.db"))?;
    let token = auth::mint();
    db.insert_token(&auth::hash(&token), org)?;
    Ok(token)
}

/// First start: the admin token of the `default` org comes from
/// `$SANDFORGE_TOKEN`, or is generated and printed once.
fn bootstrap_token(db: &db::Db) -> Result<(), ServerError> {
    match std::env::var("SANDFORGE_TOKEN") {
        Ok(t) if !t.trim().is_empty() => db.insert_token(&auth::hash(t.trim()), auth::DEFAULT_ORG),
        _ if db.token_count()? == 0 => {
            let t = auth::mint();
            db.insert_token(&auth::hash(&t), auth::DEFAULT_ORG)?;
            println!(
                "admin token for org '{}' (shown once): {t}",
                auth::DEFAULT_ORG
            );
            Ok(())
        }
        _ => Ok(()),
    }
}

fn which(bin: &Path) -> Option<PathBuf> {
    if bin.components().count() > 1 {
        return bin.is_file().then(|| bin.to_path_buf());
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
}

/// The microVM backend, when QEMU and the guest kernel are installed. The
/// initramfs (this build's agent as `/init` plus the guest's modules) is
/// rebuilt at every start, so VMs always run the current agent.
fn microvm_backend(cfg: &Config, state: &Path, agent: &Path) -> Result<MicrovmBackend, String> {
    let qemu = which(&cfg.qemu).ok_or_else(|| {
        format!(
            "{} not found (apt-get install qemu-system-x86)",
            cfg.qemu.display()
        )
    })?;
    let qemu_img =
        which(&cfg.qemu_img).ok_or_else(|| format!("{} not found", cfg.qemu_img.display()))?;
    // The uncompressed kernel boots ~0.3 s faster under TCG; older caches
    // have only the compressed one.
    let kernel = ["vmlinux", "vmlinuz"]
        .iter()
        .map(|k| cfg.guest_dir.join(k))
        .find(|k| k.is_file())
        .unwrap_or_default();
    if !cfg.guest_dir.join("guest.json").is_file() || !kernel.is_file() {
        return Err(format!(
            "no guest kernel in {} (run scripts/build-guest.sh)",
            cfg.guest_dir.display()
        ));
    }
    let accel = microvm::accel::choose(&cfg.accel)?;
    let vm_dir = state.join("vm");
    std::fs::create_dir_all(&vm_dir).map_err(|e| format!("{}: {e}", vm_dir.display()))?;
    let initramfs = vm_dir.join("initramfs.cpio");
    microvm::initramfs::write_initramfs(agent, &cfg.guest_dir.join("modules"), &initramfs)
        .map_err(|e| format!("building {}: {e}", initramfs.display()))?;
    // Every QEMU uid reads it (the agent binary and the guest's modules:
    // nothing secret); nobody but root writes it.
    for (p, mode) in [(&vm_dir, 0o711), (&initramfs, 0o644)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("chmod {}: {e}", p.display()))?;
    }
    MicrovmBackend::new(MicrovmConfig {
        qemu_binary: qemu,
        qemu_img,
        kernel,
        initramfs,
        accel,
        sandboxes_dir: state.join("sandboxes"),
        boot_timeout: Duration::from_secs(cfg.vm_boot_timeout_secs),
        virtiofsd: cfg.virtiofsd.clone(),
        uid_base: cfg.vm_uid_base,
        mem_dir: mem_dir(state),
        console_cap: cfg.console_log_max_kb * 1024,
    })
    .map_err(|e| e.to_string())
}

/// Where this daemon keeps its VMs' RAM files: a tmpfs directory of its
/// own, named after its state directory, so two daemons never share one.
pub fn mem_dir(state: &Path) -> PathBuf {
    use sha2::Digest;
    let real = std::fs::canonicalize(state).unwrap_or_else(|_| state.to_path_buf());
    let hash = sha2::Sha256::digest(real.as_os_str().as_encoded_bytes());
    PathBuf::from(format!("/dev/shm/sandforge-{}", &hex::encode(hash)[..12]))
}

/// Why sandbox networking is off.
enum NetDown {
    /// The config asks for something the host contradicts (a subnet that
    /// overlaps a host route), or the database failed: the daemon refuses
    /// to start.
    Fatal(ServerError),
    /// The host cannot do it (no `nft` or `ip`, no permission, no
    /// nf_tables): a degraded mode, logged; creates asking for a network
    /// get 400 `network_unavailable`.
    Unavailable(String),
}

/// Sandbox networking: the host side brought to what the database says is
/// live (links, nftables, resolvers), or why it is off. `cfg` is
/// validated already.
async fn network(
    cfg: &Config,
    db: &db::Db,
) -> Result<Arc<sandforge_runtime::network::Network>, NetDown> {
    use sandforge_runtime::network::{dns, links, NetConfig, Network};
    use sandforge_runtime::RuntimeError;
    if let Ok(v) = std::env::var("SANDFORGE_NETWORK_UNAVAILABLE") {
        // For tests and operators: run as if the host had no networking.
        return Err(NetDown::Unavailable(format!(
            "SANDFORGE_NETWORK_UNAVAILABLE={v}"
        )));
    }
    let subnet = sandforge_api::Cidr::parse(&cfg.network_subnet)
        .ok_or_else(|| NetDown::Fatal(ServerError::Config("network_subnet: not a CIDR".into())))?;
    match links::overlapping_route(&subnet, &cfg.network_prefix).await {
        Ok(()) => {}
        Err(RuntimeError::Setup(m)) => {
            return Err(NetDown::Fatal(ServerError::Config(format!(
                "network_subnet: {m}"
            ))))
        }
        Err(e) => return Err(NetDown::Unavailable(e.to_string())),
    }
    let dns_upstream = match cfg.dns_upstream_addr().map_err(NetDown::Fatal)? {
        Some(a) => Some(a),
        None => dns::upstream_from_resolv_conf(
            &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        ),
    };
    let net_cfg = NetConfig {
        subnet,
        prefix: cfg.network_prefix.clone(),
        table: cfg.nft_table.clone(),
        dns_upstream,
        dns_hosts: cfg
            .dns_hosts
            .iter()
            .map(|(k, v)| (k.trim_end_matches('.').to_ascii_lowercase(), *v))
            .collect(),
    };
    net_cfg
        .validate()
        .map_err(|e| NetDown::Fatal(ServerError::Config(e.to_string())))?;
    let rows = db.list_sandboxes(None).map_err(NetDown::Fatal)?;
    let live = rows
        .iter()
        .filter(|r| r.status != sandforge_api::SandboxStatus::Destroyed)
        .filter_map(|r| {
            let slot = r.spec.net_slot?;
            Some((
                r.id.clone(),
                net_cfg.lease(&r.id, slot),
                r.spec.egress.clone().unwrap_or_default(),
            ))
        })
        .collect();
    Network::start(net_cfg, live)
        .await
        .map(Arc::new)
        .map_err(|e| NetDown::Unavailable(e.to_string()))
}

/// Build everything, reconcile with what is running, and serve until SIGINT
/// or SIGTERM. Sandboxes outlive the daemon; the next start re-attaches.
pub async fn serve(opts: ServeOptions) -> Result<(), ServerError> {
    let cfg = Config::load(
        config_path(opts.config).as_deref(),
        opts.listen,
        opts.state_dir,
    )?;
    // Everything the daemon creates is private unless it says otherwise
    // (state files 0600, directories 0700; the few that sandboxes must
    // traverse are set to 0711 explicitly). Tools that create files for a
    // sandbox get 022 back (`sandforge_runtime::tool::sandbox_umask`).
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let state = cfg.state_dir.clone();
    let nofile = listener::raise_nofile();
    if (nofile as u128) < 2 * cfg.max_connections as u128 + 256 {
        tracing::warn!(
            nofile,
            max_connections = cfg.max_connections,
            "RLIMIT_NOFILE is low for two listeners of max_connections each"
        );
    }
    prepare_state_dir(&state)?;
    let _lock = lock_state_dir(&state)?;
    let agent = install_agent(&cfg.resolve_agent_binary()?, &state)?;
    let db_path = state.join("sandforge.db");
    let db = db::Db::open(&db_path)?;
    std::fs::set_permissions(&db_path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("chmod", &db_path))?;
    bootstrap_token(&db)?;

    let runc = which(&cfg.runc).ok_or_else(|| {
        ServerError::Startup(format!(
            "OCI runtime '{}' not found (apt-get install runc)",
            cfg.runc.display()
        ))
    })?;
    let container = ContainerBackend::new(ContainerConfig {
        runc_binary: runc,
        runc_root: state.join("runc"),
        agent_binary: agent.clone(),
        cgroup_parent: "sandforge".into(),
        agent_timeout: Duration::from_secs(cfg.agent_timeout_secs),
        console_cap: cfg.console_log_max_kb * 1024,
    })
    .map_err(|e| ServerError::Startup(e.to_string()))?;
    let mut backends: Vec<Arc<dyn Backend>> = vec![Arc::new(container)];
    let mut accel = None;
    match microvm_backend(&cfg, &state, &agent) {
        Ok(vm) => {
            accel = Some(vm.accel().as_str());
            tracing::info!(accel = vm.accel().as_str(), "microvm backend ready");
            backends.push(Arc::new(vm));
        }
        Err(reason) if cfg.default_isolation == "microvm" => {
            return Err(ServerError::Startup(format!(
                "default_isolation is microvm but {reason}"
            )))
        }
        Err(reason) => tracing::warn!("microvm backend unavailable: {reason}"),
    }

    let templates = sandforge_runtime::TemplateStore::new(&cfg.template_dir);
    if templates.list().is_empty() {
        tracing::warn!(
            "no template in {}: build one with scripts/build-template.sh (creates will answer 404)",
            cfg.template_dir.display()
        );
    }

    let net = match network(&cfg, &db).await {
        Ok(n) => Some(n),
        Err(NetDown::Fatal(e)) => return Err(e),
        Err(NetDown::Unavailable(reason)) => {
            tracing::warn!("sandbox networking unavailable: sandboxes are offline, and a create or PATCH asking for 'nat', 'egress' or 'network_policy' gets 400 network_unavailable: {reason}");
            None
        }
    };
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| ServerError::Startup(format!("listen: {}: {e}", cfg.listen)))?;
    let controller = Arc::new(Controller::new(cfg.clone(), db, backends, accel, net));
    controller
        .register_builtin_templates()
        .map_err(|e| ServerError::Startup(format!("registering templates: {}", e.message)))?;
    let interrupted = controller
        .recover_templates()
        .map_err(|e| ServerError::Startup(format!("recovering templates: {}", e.message)))?;
    controller
        .reconcile()
        .await
        .map_err(|e| ServerError::Startup(e.message))?;
    controller.destroy_builders(&interrupted).await;
    tokio::spawn(controller.clone().monitor());
    tokio::spawn(controller.clone().lifecycle());

    let publish_listener = tokio::net::TcpListener::bind(&cfg.publish_listen)
        .await
        .map_err(|e| {
            ServerError::Startup(format!("publish_listen: {}: {e}", cfg.publish_listen))
        })?;
    let published = routes::publish_router(AppState {
        controller: controller.clone(),
    });
    let limits = listener::Limits {
        max_connections: cfg.max_connections,
        header_timeout: Duration::from_secs(cfg.header_timeout_secs),
    };
    tokio::spawn(listener::serve(
        publish_listener,
        published,
        limits,
        std::future::pending(),
    ));
    let app = routes::router(AppState { controller });
    tracing::info!(listen = %cfg.listen, state_dir = %state.display(), "sandforge supervisor ready");
    listener::serve(listener, app, limits, shutdown_signal()).await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down (sandboxes keep running)");
}
