//! OCI test fixtures shared by the runtime's image tests and the API's
//! template tests: Debian's `docker-registry` (distribution 2.x) started on
//! a free loopback port, layers and OCI layouts built here, pushed with
//! `skopeo`. Included by path from `crates/runtime/tests/image_pull.rs`.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// A registry process, killed (and its storage removed) on drop.
pub struct Registry {
    child: Child,
    pub port: u16,
    pub storage: PathBuf,
    /// The user and password a registry started with `htpasswd` accepts.
    pub creds: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// `htpasswd`: require basic auth, with one user (`creds`).
    pub fn start(htpasswd: bool) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let creds = htpasswd.then(|| {
            let password = format!("{:016x}", rand_u64());
            // bcrypt, the only scheme the registry's htpasswd takes
            // (glibc's crypt does it; python3 is on every test machine).
            let out = Command::new("python3")
                .args([
                    "-W",
                    "ignore",
                    "-c",
                    "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
                    &password,
                ])
                .output()
                .expect("python3");
            assert!(out.status.success(), "bcrypt: {out:?}");
            let hash = String::from_utf8(out.stdout).unwrap();
            std::fs::write(
                dir.path().join("htpasswd"),
                format!("tester:{}\n", hash.trim()),
            )
            .unwrap();
            ("tester".to_string(), password)
        });
        let auth = if htpasswd {
            format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            )
        } else {
            String::new()
        };
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
                storage.display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (scripts/deps.sh installs it)");
        let reg = Registry {
            child,
            port,
            storage,
            creds,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "registry did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        reg
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's own copy of a blob.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

pub fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

pub enum E<'a> {
    Dir(&'a str, u64),
    File(&'a str, &'a str, u64),
    Symlink(&'a str, &'a str),
    /// A file whose name is written raw (the tar crate refuses `..`).
    Raw(&'a str, &'a str),
}

/// A gzip layer: (blob, diff_id).
pub fn layer(entries: &[E]) -> (Vec<u8>, String) {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        match e {
            E::Dir(p, uid) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_uid(*uid);
                h.set_gid(*uid);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            E::File(p, d, uid) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o755);
                h.set_uid(*uid);
                h.set_gid(*uid);
                h.set_size(d.len() as u64);
                b.append_data(&mut h, p, d.as_bytes()).unwrap();
            }
            E::Symlink(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, t).unwrap();
            }
            E::Raw(p, d) => {
                let mut h = tar::Header::new_ustar();
                h.as_old_mut().name[..p.len()].copy_from_slice(p.as_bytes());
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(d.len() as u64);
                h.set_cksum();
                b.append(&h, d.as_bytes()).unwrap();
            }
        }
    }
    let tar = b.into_inner().unwrap();
    let diff_id = sha(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    (gz.finish().unwrap(), diff_id)
}

/// An OCI layout under construction.
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(work: &Path, name: &str) -> Layout {
        let dir = work.join(format!("layout-{}", name.replace([':', '/'], "-")));
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout { dir }
    }

    pub fn put(&self, data: &[u8]) -> String {
        let d = sha(data);
        let hex = d.strip_prefix("sha256:").unwrap();
        std::fs::write(self.dir.join("blobs/sha256").join(hex), data).unwrap();
        d
    }

    /// An image manifest: its descriptor (for an index or index.json).
    pub fn image(
        &self,
        arch: &str,
        layers: &[&(Vec<u8>, String)],
        config_extra: serde_json::Value,
    ) -> serde_json::Value {
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": config_extra,
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.1.clone()).collect::<Vec<_>>()},
        }))
        .unwrap();
        let config_digest = self.put(&config);
        let descs: Vec<_> = layers
            .iter()
            .map(|l| {
                let media = if l.0.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                    "application/vnd.oci.image.layer.v1.tar+zstd"
                } else {
                    "application/vnd.oci.image.layer.v1.tar+gzip"
                };
                serde_json::json!({
                    "mediaType": media,
                    "digest": self.put(&l.0), "size": l.0.len(),
                })
            })
            .collect();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": descs,
        }))
        .unwrap();
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": self.put(&manifest), "size": manifest.len(),
            "platform": {"os": "linux", "architecture": arch},
        })
    }

    /// An image index over manifests: its descriptor.
    pub fn index(&self, manifests: Vec<serde_json::Value>) -> serde_json::Value {
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }))
        .unwrap();
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": self.put(&index), "size": index.len(),
        })
    }

    /// Tags `desc` (as `t`) in index.json, making the layout complete.
    pub fn tag(&self, mut desc: serde_json::Value) {
        desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "t"});
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [desc]}))
                .unwrap(),
        )
        .unwrap();
    }

    /// The layout (tagged with [`Layout::tag`]) as an archive file, with
    /// `skopeo copy`: `format` is `docker-archive` or `oci-archive`.
    pub fn archive(&self, format: &str, file: &Path) {
        let dest = if format == "docker-archive" {
            format!("{format}:{}:test/img:t", file.display())
        } else {
            format!("{format}:{}:t", file.display())
        };
        let out = Command::new("skopeo")
            .args(["--insecure-policy", "copy", "-q"])
            .arg(format!("oci:{}:t", self.dir.display()))
            .arg(dest)
            .output()
            .expect("skopeo (scripts/deps.sh installs it)");
        assert!(
            out.status.success(),
            "skopeo copy to {format}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Tags `desc` in index.json and pushes it (all of an index) as `test/<name>`.
    pub fn push(&self, reg: &Registry, mut desc: serde_json::Value, name: &str) {
        desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "t"});
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [desc]}))
                .unwrap(),
        )
        .unwrap();
        let out = Command::new("skopeo")
            .args([
                "--insecure-policy",
                "copy",
                "-q",
                "--all",
                "--dest-tls-verify=false",
            ])
            .args(
                reg.creds
                    .iter()
                    .flat_map(|(u, p)| ["--dest-creds".to_string(), format!("{u}:{p}")]),
            )
            .arg(format!("oci:{}:t", self.dir.display()))
            .arg(format!("docker://{}/test/{name}", reg.host()))
            .output()
            .expect("skopeo (scripts/deps.sh installs it)");
        assert!(
            out.status.success(),
            "skopeo copy {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Pushes a one-image layout as `test/<name>`; returns its layer digests.
pub fn push_image(
    reg: &Registry,
    work: &Path,
    name: &str,
    arch: &str,
    layers: &[&(Vec<u8>, String)],
    config_extra: serde_json::Value,
) -> Vec<String> {
    let l = Layout::new(work, name);
    let desc = l.image(arch, layers, config_extra);
    l.push(reg, desc, name);
    layers.iter().map(|l| sha(&l.0)).collect()
}

/// The same layer compressed with zstd instead of gzip: (blob, diff_id).
pub fn zstd_layer(entries: &[E]) -> (Vec<u8>, String) {
    let (gz, diff_id) = layer(entries);
    let mut tar = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut tar).unwrap();
    (zstd::encode_all(&tar[..], 3).unwrap(), diff_id)
}

/// A gzip layer of the tree at `dir` (ownership as on disk): (blob,
/// diff_id).
pub fn layer_from_dir(dir: &Path) -> (Vec<u8>, String) {
    layer_of(dir, tar::HeaderMode::Complete)
}

/// The same with every entry owned by root (uid/gid 0), as an image of a
/// tree that is already shifted for the user namespace must be.
pub fn layer_from_dir_as_root(dir: &Path) -> (Vec<u8>, String) {
    layer_of(dir, tar::HeaderMode::Deterministic)
}

fn layer_of(dir: &Path, mode: tar::HeaderMode) -> (Vec<u8>, String) {
    let mut b = tar::Builder::new(Vec::new());
    b.mode(mode);
    b.follow_symlinks(false);
    b.append_dir_all(".", dir).unwrap();
    let tar = b.into_inner().unwrap();
    let diff_id = sha(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    (gz.finish().unwrap(), diff_id)
}
