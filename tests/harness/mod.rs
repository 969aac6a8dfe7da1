//! Test harness: starts the real `sandforge` daemon on a free loopback port
//! with a fresh state directory and drives it over HTTP. Nothing here is a
//! mock: the daemon runs real runc containers from the real template and
//! keeps its state in a real SQLite file.
//!
//! Needs the workspace built first (`scripts/test.sh` does it): the debug
//! `sandforge` binary beside the test executable and the static agent in
//! `target/x86_64-unknown-linux-gnu/release/`.

pub mod bench;

pub mod attempts;
pub mod oci;
pub use attempts::Attempts;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// The admin token of the `default` org in every test daemon.
pub const TOKEN: &str = "sf_test_admin_token";

/// Path of a workspace binary built next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} not built: run scripts/test.sh (or cargo build --workspace)",
        p.display()
    );
    p
}

/// The backend this run of the suite targets: `SANDFORGE_TEST_ISOLATION`
/// (`container`, the default, or `microvm`). Every create the harness sends
/// without an `isolation` gets this one, so the same tests run against
/// both backends (scripts/test.sh runs the suite once per backend).
pub fn isolation() -> &'static str {
    match std::env::var("SANDFORGE_TEST_ISOLATION").as_deref() {
        Ok("microvm") => "microvm",
        Ok("container") | Err(_) => "container",
        Ok(other) => panic!("SANDFORGE_TEST_ISOLATION={other}: want container or microvm"),
    }
}

/// The built-in templates' directory the test daemons use:
/// `SANDFORGE_TEST_TEMPLATE_DIR` when set (e.g. a cache built by
/// `SANDFORGE_CACHE_DIR=... scripts/build-template.sh`, with its
/// `rootfs.ext4` by `scripts/build-guest.sh`), else the daemon's default
/// (`/var/cache/sandforge/templates`).
pub fn template_dir() -> Option<PathBuf> {
    std::env::var_os("SANDFORGE_TEST_TEMPLATE_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Whether this run targets microVMs.
pub fn vm() -> bool {
    isolation() == "microvm"
}

/// Add the run's `isolation` to a create body that does not choose one.
fn with_isolation(mut body: Value) -> Value {
    if let Some(o) = body.as_object_mut() {
        o.entry("isolation").or_insert_with(|| json!(isolation()));
    }
    body
}

/// The network prefix and nftables table of the test daemon on `port`.
pub fn net_names(port: u16) -> (String, String) {
    let p = port as u32;
    let letters: String = [p / 676 % 26, p / 26 % 26, p % 26]
        .iter()
        .map(|n| (b'a' + *n as u8) as char)
        .collect();
    (format!("z{letters}"), format!("sft{port}"))
}

/// The sandbox subnet of the test daemon on `port`.
pub fn test_subnet(port: u16) -> String {
    format!("10.{}.{}.0/24", 200 + (port / 256) % 50, port % 256)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A scratch directory under /var/tmp that the containers' mapped root can
/// traverse (0711), removed on drop.
pub fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    d
}

/// SIGKILL a host process (a sandbox's init or QEMU) from outside.
pub fn sigkill(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).output();
}

/// A killed sandbox process is re-parented to the host's init, which reaps
/// it; until then it is a zombie holding nothing but its pid.
pub fn gone_or_zombie(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z')),
    }
}

pub struct Daemon {
    pub url: String,
    pub port: u16,
    /// The publish listener (`{alias}.sandforge.localhost` by `Host`).
    pub publish_port: u16,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    child: Option<Child>,
    /// Extra environment of the daemon process (e.g. a `PATH` that puts a
    /// counting wrapper in front of a host tool).
    env: Vec<(String, String)>,
    pub http: reqwest::Client,
}

impl Daemon {
    /// Start a daemon whose config allows host mounts under `allowed`.
    pub async fn start_with(allowed: &[&Path]) -> Daemon {
        Self::start_with_config(allowed, "").await
    }

    /// Start a daemon with `extra` YAML lines appended to its config.
    pub async fn start_with_config(allowed: &[&Path], extra: &str) -> Daemon {
        Self::start_with_env(allowed, extra, &[]).await
    }

    /// Start a daemon with `extra` config lines and `env` added to its
    /// environment.
    pub async fn start_with_env(allowed: &[&Path], extra: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = scratch_dir("sf-test-");
        let port = free_port();
        let config = dir.path().join("config.yaml");
        let mut f = std::fs::File::create(&config).unwrap();
        writeln!(f, "listen: 127.0.0.1:{port}").unwrap();
        let publish_port = free_port();
        writeln!(f, "publish_listen: 127.0.0.1:{publish_port}").unwrap();
        writeln!(f, "state_dir: {}", dir.path().join("state").display()).unwrap();
        writeln!(f, "monitor_interval_secs: 1").unwrap();
        if let Some(dir) = template_dir() {
            if !extra.contains("template_dir:") {
                writeln!(f, "template_dir: \"{}\"", dir.display()).unwrap();
            }
        }
        let list: Vec<String> = allowed
            .iter()
            .map(|p| format!("\"{}\"", p.display()))
            .collect();
        writeln!(f, "allowed_host_paths: [{}]", list.join(", ")).unwrap();
        // Its own network names and subnet, so that test daemons running
        // side by side never touch each other's links and rules.
        let (net_prefix, nft_table) = net_names(port);
        let subnet = test_subnet(port);
        for (key, value) in [
            ("network_prefix", net_prefix),
            ("nft_table", nft_table),
            ("network_subnet", subnet),
        ] {
            if !extra.contains(&format!("{key}:")) {
                writeln!(f, "{key}: {value}").unwrap();
            }
        }
        writeln!(f, "{extra}").unwrap();
        drop(f);
        let mut d = Daemon {
            url: format!("http://127.0.0.1:{port}"),
            port,
            publish_port,
            dir,
            config,
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            // An idle pooled connection is dropped well before the daemon
            // closes it (`header_timeout_secs`, 15 s by default), so a
            // request never goes out on a connection the daemon is closing.
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .pool_idle_timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
        };
        d.spawn().await;
        d
    }

    pub async fn start() -> Daemon {
        Self::start_with(&[]).await
    }

    /// Run `sandforge serve` with a test daemon's config plus `extra` YAML
    /// lines, expecting it to refuse to start: its exit status and stderr,
    /// once it exits (within 20 s). Panics if it ever answers on its port.
    pub fn refused(extra: &str) -> (std::process::ExitStatus, String) {
        let dir = scratch_dir("sf-refused-");
        let port = free_port();
        let config = dir.path().join("config.yaml");
        let (net_prefix, nft_table) = net_names(port);
        let mut text = String::new();
        for (key, value) in [
            ("listen", format!("127.0.0.1:{port}")),
            ("publish_listen", format!("127.0.0.1:{}", free_port())),
            ("state_dir", dir.path().join("state").display().to_string()),
            ("network_prefix", net_prefix),
            ("nft_table", nft_table),
            ("network_subnet", test_subnet(port)),
        ] {
            if !extra.lines().any(|l| l.starts_with(&format!("{key}:"))) {
                text.push_str(&format!("{key}: {value}\n"));
            }
        }
        text.push_str(extra);
        text.push('\n');
        std::fs::write(&config, text).unwrap();
        let mut child = Command::new(bin("sandforge"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("SANDFORGE_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sandforge serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                || Instant::now() > deadline
            {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{extra}: the daemon started");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        (status, stderr)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Where this daemon keeps its VMs' RAM files (as the daemon derives it).
    pub fn mem_dir(&self) -> PathBuf {
        use sha2::Digest;
        let state = self.state_dir();
        let real = std::fs::canonicalize(&state).unwrap_or(state);
        let hash = sha2::Sha256::digest(real.as_os_str().as_encoded_bytes());
        PathBuf::from(format!("/dev/shm/sandforge-{}", &hex::encode(hash)[..12]))
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let child = Command::new(bin("sandforge"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("SANDFORGE_TOKEN", TOKEN)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("SANDFORGE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn sandforge serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.http.get(format!("{}/health", self.url)).send().await {
                if r.status() == StatusCode::OK {
                    return;
                }
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("daemon exited with {st}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not become healthy: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The daemon's pid (while it runs).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// SIGKILL the daemon (no chance to clean up), leaving sandboxes running.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Start again on the same port and state directory.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    /// Mint a token for another organization with the CLI.
    pub fn token_for(&self, org: &str) -> String {
        let out = Command::new(bin("sandforge"))
            .args(["token", "create", "--org", org, "--state-dir"])
            .arg(self.state_dir())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{}", self.url, path))
            .bearer_auth(TOKEN)
    }

    /// Send JSON as `TOKEN`; returns status and parsed body (Null if empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call_as(TOKEN, method, path, body).await
    }

    /// [`Daemon::call`] with another bearer token.
    pub async fn call_as(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let body = match body {
            Some(b) if method == Method::POST && path.trim_end_matches('/') == "/v1/sandboxes" => {
                Some(with_isolation(b))
            }
            other => other,
        };
        let mut r = self
            .http
            .request(method, format!("{}{}", self.url, path))
            .bearer_auth(token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("non-JSON body ({status}): {text}"))
        };
        (status, v)
    }

    /// Poll a template until it is no longer `building` (at most
    /// `secs`); returns its JSON.
    pub async fn wait_template(&self, id: &str, secs: u64) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let (s, t) = self
                .call(Method::GET, &format!("/v1/templates/{id}"), None)
                .await;
            assert_eq!(s, StatusCode::OK, "{t}");
            if t["status"] != "building" {
                return t;
            }
            assert!(std::time::Instant::now() < deadline, "still building: {t}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Create a sandbox, asserting 201; returns its JSON.
    pub async fn create(&self, body: Value) -> Value {
        let (s, v) = self.call(Method::POST, "/v1/sandboxes", Some(body)).await;
        assert_eq!(s, StatusCode::CREATED, "create failed: {v}\n{}", self.log());
        v
    }

    /// `POST /v1/sandboxes/{id}/execute` with `body`: status and JSON.
    pub async fn execute(&self, id: &str, body: Value) -> (StatusCode, Value) {
        self.call(
            Method::POST,
            &format!("/v1/sandboxes/{id}/execute"),
            Some(body),
        )
        .await
    }

    /// Create a sandbox, asserting 201; returns its id.
    pub async fn create_id(&self, body: Value) -> String {
        self.create(body).await["id"]
            .as_str()
            .expect("id")
            .to_string()
    }

    /// Run a shell command through `/execute`, asserting 200.
    pub async fn sh(&self, id: &str, command: &str) -> Value {
        let (s, v) = self
            .call(
                Method::POST,
                &format!("/v1/sandboxes/{id}/execute"),
                Some(json!({ "command": command })),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "execute failed: {v}");
        v
    }

    /// stdout of a command that must exit 0.
    /// Run the `sandforge` CLI against this daemon (URL and token from the
    /// environment).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("sandforge"))
            .args(args)
            .env("SANDFORGE_URL", &self.url)
            .env("SANDFORGE_TOKEN", TOKEN)
            .output()
            .unwrap()
    }

    /// Write `body` to `path` in the sandbox through the files API (204).
    pub async fn put_file(&self, id: &str, path: &str, body: impl Into<reqwest::Body>) {
        let r = self
            .req(
                Method::PUT,
                &format!("/v1/sandboxes/{id}/files?path={path}"),
            )
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT, "PUT {path}");
    }

    pub async fn sh_ok(&self, id: &str, command: &str) -> String {
        let v = self.sh(id, command).await;
        assert_eq!(v["exit_code"], 0, "`{command}` failed: {v}");
        v["stdout"].as_str().unwrap().to_string()
    }

    /// Poll `GET /v1/sandboxes/{id}` until it reports `status` (20 s max).
    pub async fn wait_status(&self, id: &str, status: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, sb) = self
                .call(Method::GET, &format!("/v1/sandboxes/{id}"), None)
                .await;
            if sb["status"] == status {
                return sb;
            }
            assert!(Instant::now() < deadline, "never became {status}: {sb}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn destroy(&self, id: &str) {
        let (s, v) = self
            .call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
            .await;
        assert_eq!(s, StatusCode::OK, "destroy failed: {v}");
    }

    /// The host process that holds a sandbox: a container's init (its
    /// agent) or a microVM's QEMU.
    pub fn sandbox_pid(&self, id: &str) -> u32 {
        let dir = self.state_dir().join("sandboxes").join(id);
        let file = if dir.join("qemu/qemu.pid").exists() {
            "qemu/qemu.pid"
        } else {
            "container.pid"
        };
        std::fs::read_to_string(dir.join(file))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Host processes whose command line names the sandbox's directory
    /// (QEMU, virtiofsd): none after a proper destroy.
    pub fn processes_of(&self, id: &str) -> Vec<u32> {
        let dir = self.state_dir().join("sandboxes").join(id);
        let needle = format!("{}/", dir.display());
        let mut pids = vec![];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains(&needle) && !gone_or_zombie(pid) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Host resources a sandbox still holds: processes, cgroups, mounts, its
    /// directory, runc state. Empty after a proper destroy.
    pub fn leftovers(&self, id: &str) -> Vec<String> {
        let mut left: Vec<String> = self
            .processes_of(id)
            .iter()
            .map(|p| format!("process {p}"))
            .collect();
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for e in rd.flatten() {
                for p in [
                    e.path().join("sandforge").join(id),
                    PathBuf::from("/sys/fs/cgroup/sandforge").join(id),
                ] {
                    if p.exists() {
                        left.push(p.display().to_string());
                    }
                }
            }
        }
        let dir = self.state_dir().join("sandboxes").join(id);
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        if mounts.contains(&*dir.to_string_lossy()) {
            left.push(format!("mount under {}", dir.display()));
        }
        if dir.exists() {
            left.push(format!("dir {}", dir.display()));
        }
        // A container's disk image is loop-mounted: its loop device must go
        // with it (the backing file's path survives its deletion).
        if let Ok(rd) = std::fs::read_dir("/sys/block") {
            for e in rd.flatten() {
                let backing =
                    std::fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
                if backing.contains(&format!("{}/", dir.display())) {
                    left.push(format!(
                        "loop device {} -> {}",
                        e.file_name().to_string_lossy(),
                        backing.trim()
                    ));
                }
            }
        }
        if self.state_dir().join("runc").join(id).exists() {
            left.push("runc state".into());
        }
        left.sort();
        left.dedup();
        left
    }
}

impl Daemon {
    /// The host network state of this daemon (its nftables table, its
    /// links), which a killed daemon leaves for its next start to
    /// reconcile: a test daemon has no next start.
    fn remove_network_state(&self) {
        let (prefix, table) = net_names(self.port);
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &table])
            .output();
        if let Ok(rd) = std::fs::read_dir("/sys/class/net") {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with(&prefix) {
                    let _ = Command::new("ip").args(["link", "del", &name]).output();
                }
            }
        }
        // VM memory files of this daemon's sandboxes, in its own
        // /dev/shm/sandforge-<hash of the state directory>, and that
        // directory (the daemon's `mem_dir`).
        let shm = self.mem_dir();
        if let Ok(rd) = std::fs::read_dir(&shm) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&shm);
    }
}

impl Drop for Daemon {
    /// Kill the daemon, then reclaim whatever sandboxes a failed test left
    /// behind, so one failure does not leak into the machine.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail = &log[log.len().saturating_sub(6000)..];
            eprintln!("---- daemon log (tail) ----\n{tail}");
            if let Ok(rd) = std::fs::read_dir(self.state_dir().join("sandboxes")) {
                for e in rd.flatten() {
                    let c = std::fs::read_to_string(e.path().join("console.log"))
                        .or_else(|_| std::fs::read_to_string(e.path().join("qemu/console.log")))
                        .unwrap_or_default();
                    let tail = &c[c.len().saturating_sub(3000)..];
                    eprintln!(
                        "---- console of {} (tail) ----\n{tail}",
                        e.file_name().to_string_lossy()
                    );
                }
            }
        }
        self.kill9();
        self.remove_network_state();
        let state = self.state_dir();
        let Ok(rd) = std::fs::read_dir(state.join("sandboxes")) else {
            return;
        };
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().to_string();
            // A VM: kill its QEMU (it outlives the daemon by design).
            if let Some(pid) = std::fs::read_to_string(e.path().join("qemu/qemu.pid"))
                .ok()
                .and_then(|p| p.trim().parse().ok())
            {
                sigkill(pid);
            }
            let _ = Command::new("runc")
                .arg("--root")
                .arg(state.join("runc"))
                .args(["delete", "--force", &id])
                .output();
            // The overlay, then the container's disk image under it (its
            // loop device goes with the last reference: autoclear).
            for mnt in ["rootfs", "layer"] {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(e.path().join(mnt))
                    .output();
            }
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
