//! Templates as API objects (seeds 001/002/003 and issue 12): the shape of
//! a template, and a create request with its stateless validation.
//!
//! Owns: those JSON shapes and the checks that need no state (names, image
//! references' syntax). Must not know where templates live or how an image
//! is fetched.

use serde::{Deserialize, Serialize};

use crate::sandbox::{validate_cpus, validate_disk_mb, validate_memory_mb, validate_name};
use crate::{Egress, Invalid};

/// Where a template came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TemplateSource {
    /// Built on the host (`scripts/build-template.sh`), shared by every
    /// organization.
    Builtin,
    /// An OCI image pulled from a registry.
    Image { reference: String },
    /// A sandbox saved as a template (`POST /sandboxes/{id}/template`).
    Sandbox {
        sandbox_id: String,
        /// The template the sandbox was made from.
        template: String,
    },
    /// Built from a Dockerfile (`FROM` names `from`).
    Dockerfile { from: String },
    /// An image archive (`docker save` tar or OCI archive) uploaded to
    /// `POST /v1/templates/import`.
    Archive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateStatus {
    Building,
    Ready,
    Failed,
}

impl TemplateStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateStatus::Building => "building",
            TemplateStatus::Ready => "ready",
            TemplateStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "building" => Some(Self::Building),
            "ready" => Some(Self::Ready),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// A template as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Template {
    /// `tmpl_...`; a built-in one is `tmpl_<name>`.
    pub id: String,
    /// Unique in its organization; a built-in name is global.
    pub name: String,
    /// Other names that reach it (`base` for `default`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    pub source: TemplateSource,
    pub status: TemplateStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    /// Bytes of its root filesystem (0 while building).
    pub size_bytes: u64,
    pub created_at: String,
    /// True for the host's built-in templates (they cannot be deleted).
    pub builtin: bool,
    /// What a sandbox created from it gets when its create does not say.
    #[serde(flatten)]
    pub defaults: TemplateDefaults,
}

/// A template's defaults for the sandboxes created from it (seed 001: "if
/// omitted, the template's default egress policy is used"). Each one
/// applies only when the create request leaves it out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TemplateDefaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Egress>,
}

/// Credentials for a registry that wants them (HTTP basic). Used for the
/// pull they come with and never stored: a rebuild takes them again.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Longest registry user name and password accepted.
pub const MAX_CREDENTIAL_LEN: usize = 4096;

impl RegistryCredentials {
    pub fn validate(&self) -> Result<(), Invalid> {
        let ok = |s: &str| {
            !s.is_empty() && s.len() <= MAX_CREDENTIAL_LEN && !s.contains(['\0', '\n', '\r'])
        };
        if !ok(&self.username) || self.username.contains(':') {
            return Err(Invalid::new(
                "credentials.username",
                format!("must be 1-{MAX_CREDENTIAL_LEN} bytes without ':' or line breaks"),
            ));
        }
        if !ok(&self.password) {
            return Err(Invalid::new(
                "credentials.password",
                format!("must be 1-{MAX_CREDENTIAL_LEN} bytes without line breaks"),
            ));
        }
        Ok(())
    }
}

/// Body of seed 003's `build`/`pull` (optional): credentials for this pull.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebuildTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<RegistryCredentials>,
}

/// A create request with every field checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidTemplate {
    pub name: String,
    pub source: TemplateSource,
    pub defaults: TemplateDefaults,
    pub credentials: Option<RegistryCredentials>,
}

/// `POST /v1/templates`: `{"name", "image"}` (or `{"name", "source":
/// {"type": "image", "reference"}}`), or a build: `{"name", "dockerfile",
/// "context"}` (`context`: a base64 tar or tar.gz, at most
/// [`MAX_CONTEXT_BYTES`] decoded).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplate {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<TemplateSource>,
    /// Registry credentials for this pull (never stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<RegistryCredentials>,
    /// Defaults of the sandboxes created from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Egress>,
    /// The Dockerfile's text (see [`crate::dockerfile`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    /// The build context `COPY` takes files from: base64 of a tar (gzip
    /// or not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
}

/// Largest build context (decoded; the JSON body's limit comes first).
pub const MAX_CONTEXT_BYTES: usize = 1536 * 1024;

/// `POST /v1/sandboxes/{id}/template`: `{"name"}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaveTemplate {
    #[serde(default)]
    pub name: String,
}

/// The checks every new template's name passes (also an import's `name`
/// parameter).
pub fn validate_template_name(name: &str) -> Result<(), Invalid> {
    validate_name("name", name)?;
    if name.starts_with("tmpl_") || name == "base" {
        return Err(Invalid::new(
            "name",
            "'base' and names starting with 'tmpl_' are reserved",
        ));
    }
    Ok(())
}

/// Longest image reference accepted.
pub const MAX_REFERENCE_LEN: usize = 512;

impl CreateTemplate {
    /// The name, what to build it from, its defaults and credentials.
    pub fn validate(self) -> Result<ValidTemplate, Invalid> {
        validate_template_name(&self.name)?;
        if let Some(c) = &self.credentials {
            c.validate()?;
        }
        if let Some(e) = &self.egress {
            e.validate("egress")?;
        }
        let defaults = TemplateDefaults {
            cpus: validate_cpus(self.cpu, self.cpus)?,
            memory_mb: validate_memory_mb(self.memory_mb)?,
            disk_mb: validate_disk_mb(self.disk_mb)?,
            egress: self.egress.clone(),
        };
        if let Some(text) = &self.dockerfile {
            if self.image.is_some() || self.source.is_some() {
                return Err(Invalid::new(
                    "dockerfile",
                    "give either image/source or dockerfile",
                ));
            }
            if self.credentials.is_some() {
                return Err(Invalid::new(
                    "credentials",
                    "only with an image to pull (a build starts FROM a template)",
                ));
            }
            let d = crate::dockerfile::parse(text)?;
            if let Some(c) = &self.context {
                // base64 is 4 characters per 3 bytes.
                if c.len() / 4 * 3 > MAX_CONTEXT_BYTES + 3 {
                    return Err(Invalid::new(
                        "context",
                        format!("at most {MAX_CONTEXT_BYTES} bytes"),
                    ));
                }
            }
            return Ok(ValidTemplate {
                name: self.name,
                source: TemplateSource::Dockerfile { from: d.from },
                defaults,
                credentials: None,
            });
        }
        if self.context.is_some() {
            return Err(Invalid::new("context", "only with a dockerfile"));
        }
        let source =
            match (self.image, self.source) {
                (Some(r), None) => TemplateSource::Image { reference: r },
                (None, Some(s @ TemplateSource::Image { .. })) => s,
                (None, Some(TemplateSource::Archive)) => return Err(Invalid::new(
                    "source",
                    "an archive is uploaded as the body of POST /v1/templates/import?name=<name>",
                )),
                (None, Some(TemplateSource::Builtin)) => {
                    return Err(Invalid::new(
                        "source",
                        "built-in templates are made on the host (scripts/build-template.sh)",
                    ))
                }
                (None, Some(TemplateSource::Sandbox { .. })) => {
                    return Err(Invalid::new(
                        "source",
                        "a sandbox is saved with POST /v1/sandboxes/{id}/template",
                    ))
                }
                (None, Some(TemplateSource::Dockerfile { .. })) => {
                    return Err(Invalid::new("source", "give the build's dockerfile"))
                }
                (Some(_), Some(_)) => {
                    return Err(Invalid::new("source", "give either image or source"))
                }
                (None, None) => return Err(Invalid::new(
                    "image",
                    "required: the image reference to pull (e.g. localhost:5000/team/python:3.12), or a dockerfile",
                )),
            };
        let TemplateSource::Image { reference } = &source else {
            unreachable!("only image sources pass")
        };
        let field = "image";
        if reference.is_empty() || reference.len() > MAX_REFERENCE_LEN {
            return Err(Invalid::new(
                field,
                format!("must be 1-{MAX_REFERENCE_LEN} characters"),
            ));
        }
        if !reference
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c))
            || reference.starts_with(['/', ':', '@', '.', '-'])
        {
            return Err(Invalid::new(
                field,
                format!("'{reference}' is not an image reference ([registry/]repository[:tag][@sha256:digest])"),
            ));
        }
        Ok(ValidTemplate {
            name: self.name,
            source,
            defaults,
            credentials: self.credentials,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(json: &str) -> Result<(String, TemplateSource), Invalid> {
        serde_json::from_str::<CreateTemplate>(json)
            .unwrap()
            .validate()
            .map(|v| (v.name, v.source))
    }

    fn full(json: &str) -> Result<ValidTemplate, Invalid> {
        serde_json::from_str::<CreateTemplate>(json)
            .unwrap()
            .validate()
    }

    #[test]
    fn defaults_and_credentials() {
        let v = full(
            r#"{"name":"py","image":"r/p","cpu":2,"memory_mb":1024,"disk_mb":2048,
                "egress":{"mode":"deny_all","allow_cidrs":["10.0.0.0/8"]},
                "credentials":{"username":"u","password":"p:w"}}"#,
        )
        .unwrap();
        assert_eq!(v.defaults.cpus, Some(2));
        assert_eq!(v.defaults.memory_mb, Some(1024));
        assert_eq!(v.defaults.disk_mb, Some(2048));
        assert!(v.defaults.egress.is_some());
        assert!(
            !format!("{:?}", v.credentials).contains("p:w"),
            "never printed"
        );
        assert_eq!(
            full(r#"{"name":"py","image":"r/p"}"#).unwrap().defaults,
            TemplateDefaults::default()
        );
        for (bad, field) in [
            (r#""cpu":0"#, "cpu"),
            (r#""cpu":1,"cpus":2"#, "cpus"),
            (r#""memory_mb":1"#, "memory_mb"),
            (r#""disk_mb":1"#, "disk_mb"),
            (
                r#""egress":{"mode":"deny_all","allow_cidrs":["nope"]}"#,
                "egress",
            ),
            (
                r#""credentials":{"username":"","password":"p"}"#,
                "credentials.username",
            ),
            (
                r#""credentials":{"username":"a:b","password":"p"}"#,
                "credentials.username",
            ),
            (
                r#""credentials":{"username":"u","password":""}"#,
                "credentials.password",
            ),
        ] {
            let e = full(&format!(r#"{{"name":"py","image":"r/p",{bad}}}"#)).unwrap_err();
            assert!(e.field.starts_with(field), "{bad}: {e:?}");
        }
    }

    #[test]
    fn both_spellings_and_refusals() {
        let img = TemplateSource::Image {
            reference: "localhost:5000/team/py:3.12".into(),
        };
        assert_eq!(
            create(r#"{"name":"py","image":"localhost:5000/team/py:3.12"}"#).unwrap(),
            ("py".into(), img.clone())
        );
        assert_eq!(
            create(r#"{"name":"py","source":{"type":"image","reference":"localhost:5000/team/py:3.12"}}"#)
                .unwrap()
                .1,
            img
        );
        assert_eq!(create(r#"{"name":"py"}"#).unwrap_err().field, "image");
        assert_eq!(
            create(r#"{"name":"base","image":"x"}"#).unwrap_err().field,
            "name"
        );
        assert_eq!(
            create(r#"{"name":"tmpl_x","image":"x"}"#)
                .unwrap_err()
                .field,
            "name"
        );
        assert_eq!(
            create(r#"{"name":"a b","image":"x"}"#).unwrap_err().field,
            "name"
        );
        assert_eq!(
            create(r#"{"name":"x","image":"a b"}"#).unwrap_err().field,
            "image"
        );
        assert_eq!(
            create(r#"{"name":"x","image":"/etc"}"#).unwrap_err().field,
            "image"
        );
        assert_eq!(
            create(r#"{"name":"x","source":{"type":"builtin"}}"#)
                .unwrap_err()
                .field,
            "source"
        );
        assert!(serde_json::from_str::<CreateTemplate>(r#"{"name":"x","nope":1}"#).is_err());
    }
}
