//! Templates as API objects (seeds 001/002/003 and issue 12): the shape of
//! a template, and a create request with its stateless validation.
//!
//! Owns: those JSON shapes and the checks that need no state (names, image
//! references' syntax). Must not know where templates live or how an image
//! is fetched.

use serde::{Deserialize, Serialize};

use crate::sandbox::validate_name;
use crate::Invalid;

/// Where a template came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TemplateSource {
    /// Built on the host (`scripts/build-template.sh`), shared by every
    /// organization.
    Builtin,
    /// An OCI image pulled from a registry.
    Image { reference: String },
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
}

/// `POST /v1/templates`: `{"name", "image"}` (or `{"name", "source":
/// {"type": "image", "reference"}}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplate {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<TemplateSource>,
}

/// Longest image reference accepted.
pub const MAX_REFERENCE_LEN: usize = 512;

/// The name of a new template (also an import's `name` parameter).
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

impl CreateTemplate {
    /// The name and what to build it from.
    pub fn validate(self) -> Result<(String, TemplateSource), Invalid> {
        validate_template_name(&self.name)?;
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
                (Some(_), Some(_)) => {
                    return Err(Invalid::new("source", "give either image or source"))
                }
                (None, None) => return Err(Invalid::new(
                    "image",
                    "required: the image reference to pull (e.g. localhost:5000/team/python:3.12)",
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
        Ok((self.name, source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(json: &str) -> Result<(String, TemplateSource), Invalid> {
        serde_json::from_str::<CreateTemplate>(json)
            .unwrap()
            .validate()
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
