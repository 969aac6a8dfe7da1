//! Templates: root filesystems on disk. The host's built-in ones are built
//! by `scripts/build-template.sh` into a cache directory outside any state
//! directory (`<dir>/<name>`); the ones the API makes (issue 12: pulled
//! images, ...) live in the daemon's own `<state>/templates/<id>`, named by
//! their id (`tmpl_...`). Each template is `rootfs/` plus a
//! `template.json` manifest written last (so a half-built template is
//! never found).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Result, RuntimeError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub name: String,
    pub rootfs: PathBuf,
    /// Host uid/gid that is root inside (the ownership shift of the rootfs).
    pub uid_shift: u32,
    pub shell: String,
    /// Environment (`KEY=value`) from the image config; empty for a built
    /// template.
    pub env: Vec<String>,
    /// Working directory from the image config.
    pub workdir: Option<String>,
    /// Default user from the image config (`name`, `uid`, `uid:gid`).
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    #[serde(default)]
    uid_shift: u32,
    #[serde(default = "default_shell")]
    shell: String,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    workdir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

fn default_shell() -> String {
    "/bin/sh".into()
}

#[derive(Debug, Clone)]
pub struct TemplateStore {
    dir: PathBuf,
    /// Where the API's own templates (`tmpl_...`) live, when there is one.
    own: Option<PathBuf>,
}

/// The prefix of the API's own templates' names on disk (their ids).
pub const OWN_PREFIX: &str = "tmpl_";

impl TemplateStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            own: None,
        }
    }

    /// Also find `tmpl_...` templates under `own`.
    pub fn with_own(mut self, own: impl Into<PathBuf>) -> Self {
        self.own = Some(own.into());
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory of the template stored as `name` (built-in or own).
    pub fn path_of(&self, name: &str) -> Option<PathBuf> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return None;
        }
        match &self.own {
            Some(own) if name.starts_with(OWN_PREFIX) => Some(own.join(name)),
            _ if name.starts_with(OWN_PREFIX) => None,
            _ => Some(self.dir.join(name)),
        }
    }

    /// Look a template up by name (names are validated by the API layer).
    pub fn get(&self, name: &str) -> Result<Template> {
        let Some(base) = self.path_of(name) else {
            return Err(RuntimeError::TemplateNotFound(name.into()));
        };
        let manifest_path = base.join("template.json");
        let raw = match std::fs::read(&manifest_path) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RuntimeError::TemplateNotFound(name.into()))
            }
            Err(e) => return Err(RuntimeError::io("read", manifest_path, e)),
        };
        let m: Manifest =
            serde_json::from_slice(&raw).map_err(|e| RuntimeError::TemplateBroken {
                name: name.into(),
                reason: format!("template.json: {e}"),
            })?;
        let rootfs = base.join("rootfs");
        if !rootfs.join("bin").exists() {
            return Err(RuntimeError::TemplateBroken {
                name: name.into(),
                reason: "rootfs has no /bin".into(),
            });
        }
        Ok(Template {
            name: name.into(),
            rootfs,
            uid_shift: m.uid_shift,
            shell: m.shell,
            env: m.env,
            workdir: m.workdir,
            user: m.user,
        })
    }

    /// The size of a template's root filesystem as its manifest records
    /// it (`size_mb`, or `size_bytes`).
    pub fn size_bytes(&self, name: &str) -> Option<u64> {
        let raw = std::fs::read(self.path_of(name)?.join("template.json")).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&raw).ok()?;
        v.get("size_bytes")
            .and_then(serde_json::Value::as_u64)
            .or_else(|| {
                v.get("size_mb")
                    .and_then(serde_json::Value::as_u64)
                    .map(|m| m << 20)
            })
    }

    /// Names of the complete built-in templates.
    pub fn list(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return vec![];
        };
        let mut names: Vec<String> = rd
            .flatten()
            .filter(|e| e.path().join("template.json").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_only_complete_templates() {
        let d = tempfile_dir();
        std::fs::create_dir_all(d.join("good/rootfs/bin")).unwrap();
        std::fs::write(
            d.join("good/template.json"),
            r#"{"uid_shift":100000,"shell":"/bin/bash"}"#,
        )
        .unwrap();
        std::fs::create_dir_all(d.join("half/rootfs/bin")).unwrap();
        let store = TemplateStore::new(&d);
        let t = store.get("good").unwrap();
        assert_eq!((t.uid_shift, t.shell.as_str()), (100000, "/bin/bash"));
        assert!(t.env.is_empty() && t.workdir.is_none() && t.user.is_none());
        std::fs::create_dir_all(d.join("img/rootfs/bin")).unwrap();
        std::fs::write(
            d.join("img/template.json"),
            r#"{"uid_shift":100000,"shell":"/bin/sh","env":["A=1"],"workdir":"/app","user":"1000","image":{}}"#,
        )
        .unwrap();
        let t = store.get("img").unwrap();
        assert_eq!(
            (t.env, t.workdir.as_deref(), t.user.as_deref()),
            (vec!["A=1".to_string()], Some("/app"), Some("1000"))
        );
        assert!(matches!(
            store.get("half"),
            Err(RuntimeError::TemplateNotFound(_))
        ));
        assert!(matches!(
            store.get("../etc"),
            Err(RuntimeError::TemplateNotFound(_))
        ));
        assert_eq!(store.list(), vec!["good".to_string(), "img".to_string()]);
        std::fs::remove_dir_all(d).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("sf-tmpl-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
