//! The controller's side of templates (issue 12): the registry in SQLite
//! (built-in templates registered at start, global; an organization's own
//! ones), resolving what a create names (an id or a name; `base` is
//! `default`) to the template stored on disk, and deleting a template no
//! sandbox or snapshot uses.
//!
//! A built-in template `<name>` is the row `tmpl_<name>` (no org) and the
//! directory `<template_dir>/<name>`; an organization's template is the
//! row and the directory `<state>/templates/<id>`, and a sandbox's stored
//! spec names that directory. Must not fetch or unpack images itself
//! (`sandforge_runtime::image` does).

use http::StatusCode;
use sandforge_api::{Template, TemplateSource, TemplateStatus};

use crate::controller::Controller;
use crate::db::TemplateRow;
use crate::error::ApiError;

/// The built-in template every create without one gets.
pub const DEFAULT: &str = sandforge_api::sandbox::DEFAULT_TEMPLATE;
/// Another name of [`DEFAULT`] (E2B's and seed 003's).
pub const BASE: &str = "base";

pub(crate) fn builtin_id(name: &str) -> String {
    format!("tmpl_{name}")
}

fn not_found(given: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "template_not_found",
        format!("template: '{given}' not found"),
    )
    .field("template")
}

impl Controller {
    /// Record every complete built-in template of the host (idempotent;
    /// at start).
    pub(crate) fn register_builtin_templates(&self) -> Result<(), ApiError> {
        for name in self.templates.list() {
            self.db.ensure_builtin_template(&builtin_id(&name), &name)?;
        }
        Ok(())
    }

    /// The name on disk of the template `given` (an id, a name, or `base`)
    /// that `org` may use: 404 when there is none, 409 while it is not
    /// `ready`.
    pub(crate) fn resolve_template(&self, org: &str, given: &str) -> Result<String, ApiError> {
        let given_name = if given == BASE { DEFAULT } else { given };
        let row = if given_name.starts_with("tmpl_") {
            self.db
                .get_template(given_name)?
                .filter(|t| t.org.as_deref().is_none_or(|o| o == org))
        } else {
            self.db.template_by_name(org, given_name)?
        };
        let Some(row) = row else {
            // A built-in template that appeared on the host since start.
            if !given_name.starts_with("tmpl_") && self.templates.get(given_name).is_ok() {
                self.db
                    .ensure_builtin_template(&builtin_id(given_name), given_name)?;
                return Ok(given_name.to_string());
            }
            return Err(not_found(given));
        };
        match row.status {
            TemplateStatus::Ready => Ok(stored_name(&row)),
            TemplateStatus::Building => Err(ApiError::conflict(
                "template_not_ready",
                format!("template '{given}' is still building"),
            )
            .field("template")),
            TemplateStatus::Failed => Err(ApiError::conflict(
                "template_failed",
                format!(
                    "template '{given}' failed to build: {}",
                    row.status_reason.as_deref().unwrap_or("unknown reason")
                ),
            )
            .field("template")),
        }
    }

    fn template_row(&self, org: &str, given: &str) -> Result<TemplateRow, ApiError> {
        let given_name = if given == BASE { DEFAULT } else { given };
        let row = if given_name.starts_with("tmpl_") {
            self.db.get_template(given_name)?
        } else {
            self.db.template_by_name(org, given_name)?
        };
        let row = row.ok_or_else(|| ApiError::not_found("template", given))?;
        match &row.org {
            Some(o) if o != org => Err(ApiError::forbidden(format!(
                "template '{given}' belongs to another organization"
            ))),
            _ => Ok(row),
        }
    }

    pub fn list_templates(&self, org: &str) -> Result<Vec<Template>, ApiError> {
        Ok(self
            .db
            .list_templates(org)?
            .iter()
            .map(|t| self.template_to_api(t))
            .collect())
    }

    pub fn get_template(&self, org: &str, given: &str) -> Result<Template, ApiError> {
        Ok(self.template_to_api(&self.template_row(org, given)?))
    }

    /// `DELETE /templates/{id}`: 409 while a sandbox or snapshot uses it or
    /// it is still building; a built-in one cannot be deleted (403).
    pub fn delete_template(&self, org: &str, given: &str) -> Result<(), ApiError> {
        let row = self.template_row(org, given)?;
        if row.org.is_none() {
            return Err(ApiError::forbidden(format!(
                "template '{}' is built into this host; it cannot be deleted through the API",
                row.name
            )));
        }
        if row.status == TemplateStatus::Building {
            return Err(ApiError::conflict(
                "template_building",
                format!("template '{}' is still building", row.name),
            ));
        }
        let (sandboxes, snapshots) = self.db.template_users(&stored_name(&row))?;
        if sandboxes + snapshots > 0 {
            return Err(ApiError::conflict(
                "template_in_use",
                format!(
                    "template '{}' is used by {sandboxes} sandboxes and {snapshots} snapshots",
                    row.name
                ),
            ));
        }
        if let Some(dir) = self.templates.path_of(&row.id) {
            // The manifest first: a template without it is never used.
            let _ = std::fs::remove_file(dir.join("template.json"));
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(ApiError::internal(format!(
                        "removing {}: {e}",
                        dir.display()
                    )));
                }
            }
        }
        self.db.delete_template(&row.id)?;
        Ok(())
    }

    pub(crate) fn template_to_api(&self, t: &TemplateRow) -> Template {
        let builtin = t.source == TemplateSource::Builtin;
        let size_bytes = if builtin {
            self.templates.size_bytes(&t.name).unwrap_or(0)
        } else {
            t.size_bytes
        };
        Template {
            id: t.id.clone(),
            name: t.name.clone(),
            aliases: if builtin && t.name == DEFAULT {
                vec![BASE.to_string()]
            } else {
                vec![]
            },
            source: t.source.clone(),
            status: t.status,
            status_reason: t.status_reason.clone(),
            size_bytes,
            created_at: t.created_at.clone(),
            builtin,
        }
    }
}

/// The directory name a sandbox's spec records for a template row.
fn stored_name(t: &TemplateRow) -> String {
    match t.source {
        TemplateSource::Builtin => t.name.clone(),
        _ => t.id.clone(),
    }
}
