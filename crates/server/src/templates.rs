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

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use http::StatusCode;
use sandforge_api::{
    CreateTemplate, RebuildTemplate, RegistryCredentials, Template, TemplateDefaults,
    TemplateSource, TemplateStatus,
};
use sandforge_runtime::image::{ImageError, ImageInfo, PullEvent, PullOptions};

use crate::controller::{random_id, Controller};
use crate::db::{now, TemplateRefused, TemplateRow};
use crate::error::ApiError;

/// Host uid that is root inside a container (the templates' ownership
/// shift, as `scripts/build-template.sh` does it).
pub(crate) const UID_SHIFT: u32 = 100_000;

/// Serializes pulls against the blob garbage collection (a pull may have
/// just found a blob that a collection would remove).
static BLOBS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

    /// The API's own templates' directory, `<state>/templates`.
    pub(crate) fn own_templates_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("templates")
    }

    /// The shared, content-addressed blob store of pulled images.
    fn blob_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("images").join("blobs")
    }

    pub(crate) fn build_log(&self, id: &str) -> PathBuf {
        self.own_templates_dir().join(format!("{id}.log"))
    }

    /// At start: a template a stopped daemon left `building` failed (its
    /// staging trees are removed), and staging left by a crash goes.
    pub(crate) fn recover_templates(&self) -> Result<Vec<String>, ApiError> {
        let mut interrupted = Vec::new();
        let dir = self.own_templates_dir();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.contains(".tmp-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        // What a crashed derivation of a microVM image left.
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("tmpl_") {
                    sandforge_runtime::microvm::image::remove_stale(&e.path());
                }
            }
        }
        for t in self.db.building_templates()? {
            interrupted.push(t.id.clone());
            if let Some(p) = self.templates.path_of(&t.id) {
                let _ = std::fs::remove_dir_all(p);
            }
            self.db.set_template_status(
                &t.id,
                TemplateStatus::Failed,
                Some("interrupted: the daemon stopped while it was building"),
                0,
            )?;
        }
        Ok(interrupted)
    }

    /// `POST /templates`: register the template (`building`) and build it
    /// in the background; its status and `GET /templates/{id}/logs` tell
    /// how it goes.
    pub fn create_template(
        self: &Arc<Self>,
        org: &str,
        req: CreateTemplate,
    ) -> Result<Template, ApiError> {
        let (dockerfile, context) = (req.dockerfile.clone(), req.context.clone());
        let v = req.validate()?;
        let (name, source, defaults) = (v.name, v.source, v.defaults);
        if let (TemplateSource::Dockerfile { .. }, Some(text)) = (&source, dockerfile) {
            return self.start_build(org, name, defaults, &text, context.as_deref());
        }
        let TemplateSource::Image { reference } = source.clone() else {
            return Err(ApiError::bad_request(
                "source",
                "only image sources can be built",
            ));
        };
        sandforge_runtime::image::parse_reference(&reference)
            .map_err(|e| ApiError::bad_request("image", e))?;
        let row = self.insert_building(org, name, source, defaults)?;
        let this = self.clone();
        let id = row.id.clone();
        let creds = v.credentials;
        tokio::spawn(async move { this.build_template(&id, &reference, creds).await });
        Ok(self.template_to_api(&row))
    }

    /// Register a new template of `org` as `building` (409 for a name in
    /// use).
    pub(crate) fn insert_building(
        &self,
        org: &str,
        name: String,
        source: TemplateSource,
        defaults: TemplateDefaults,
    ) -> Result<TemplateRow, ApiError> {
        let row = TemplateRow {
            id: random_id("tmpl"),
            org: Some(org.to_string()),
            name,
            source,
            status: TemplateStatus::Building,
            status_reason: None,
            size_bytes: 0,
            created_at: now(),
            defaults,
        };
        std::fs::create_dir_all(self.own_templates_dir())
            .map_err(|e| ApiError::internal(format!("templates dir: {e}")))?;
        self.db.insert_template(&row).map_err(|e| match e {
            TemplateRefused::NameInUse(_) => {
                ApiError::conflict("name_in_use", format!("name: {e}")).field("name")
            }
            TemplateRefused::Db(e) => e.into(),
        })?;
        Ok(row)
    }

    /// 409 while a live sandbox or a snapshot uses the template.
    pub(crate) fn refuse_in_use(&self, row: &TemplateRow) -> Result<(), ApiError> {
        let (sandboxes, snapshots) = self.db.template_users(&stored_name(row))?;
        if sandboxes + snapshots > 0 {
            return Err(ApiError::conflict(
                "template_in_use",
                format!(
                    "template '{}' is used by {sandboxes} sandboxes and {snapshots} snapshots",
                    row.name
                ),
            ));
        }
        Ok(())
    }

    /// The lock of a template's microVM image, held while its files go:
    /// 409 while that image is being derived.
    fn hold_vm_image(
        &self,
        row: &TemplateRow,
    ) -> Result<sandforge_runtime::microvm::image::ImageLock, ApiError> {
        let Some(dir) = self.templates.path_of(&row.id) else {
            return Err(ApiError::internal("template without a directory"));
        };
        sandforge_runtime::microvm::image::try_hold(&dir)?.ok_or_else(|| {
            ApiError::conflict(
                "template_in_use",
                format!(
                    "template '{}': its microVM image is being made for a create",
                    row.name
                ),
            )
        })
    }

    /// Remove a template's files (its microVM image with them), the
    /// manifest first (a template without it is never used); a missing
    /// directory is fine.
    fn remove_template_files(&self, id: &str) -> Result<Doomed, String> {
        let _ = std::fs::remove_file(self.build_log(id));
        let Some(dir) = self.templates.path_of(id) else {
            return Ok(Doomed(vec![]));
        };
        let _ = std::fs::remove_file(dir.join("template.json"));
        // Renamed away at once (a rebuild makes the directory again right
        // after); the caller removes them on the blocking pool (a tree of
        // hundreds of MB takes seconds). `.tmp-` names go at start too.
        let mut doomed = vec![];
        for p in [self.build_source_dir(id), dir] {
            let Some(name) = p.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            let away = p.with_file_name(format!(
                ".{}.tmp-del-{:016x}",
                name.trim_start_matches('.'),
                rand::random::<u64>()
            ));
            match std::fs::rename(&p, &away) {
                Ok(()) => doomed.push(away),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("removing {}: {e}", p.display())),
            }
        }
        Ok(Doomed(doomed))
    }

    /// Seed 003's `build` and `pull`: make the template again from its
    /// source (a newer image behind the same tag). 409 while it builds or
    /// while a sandbox or snapshot uses it; 403 for a built-in one.
    pub fn rebuild_template(
        self: &Arc<Self>,
        org: &str,
        given: &str,
        req: RebuildTemplate,
    ) -> Result<Template, ApiError> {
        if let Some(c) = &req.credentials {
            c.validate()?;
        }
        let row = self.template_row(org, given)?;
        let reference = match row.source.clone() {
            TemplateSource::Image { reference } => reference,
            TemplateSource::Builtin => {
                return Err(ApiError::forbidden(format!(
                    "template '{}' is built into this host; rebuild it with scripts/build-template.sh",
                    row.name
                )))
            }
            TemplateSource::Dockerfile { .. } => {
                return self.rebuild_dockerfile(org, row);
            }
            TemplateSource::Archive => {
                return Err(ApiError::conflict(
                    "template_from_archive",
                    format!(
                        "template '{}' was made from an uploaded archive: import it again under a new name",
                        row.name
                    ),
                ))
            }
            TemplateSource::Sandbox { sandbox_id, .. } => {
                return Err(ApiError::conflict(
                    "cannot_rebuild",
                    format!(
                        "template '{}' was saved from sandbox {sandbox_id}: save it again with POST /v1/sandboxes/{{id}}/template",
                        row.name
                    ),
                ))
            }
        };
        // `building` first (atomically: one build at a time), so no new
        // create resolves it; then the users.
        if !self.db.claim_template_build(&row.id)? {
            return Err(ApiError::conflict(
                "template_building",
                format!("template '{}' is already building", row.name),
            ));
        }
        let held = self
            .refuse_in_use(&row)
            .and_then(|()| self.hold_vm_image(&row));
        let _held = match held {
            Ok(h) => h,
            Err(e) => {
                self.db.set_template_status(
                    &row.id,
                    row.status,
                    row.status_reason.as_deref(),
                    row.size_bytes,
                )?;
                return Err(e);
            }
        };
        match self.remove_template_files(&row.id) {
            Ok(doomed) => drop(tokio::task::spawn_blocking(move || doomed.remove())),
            Err(reason) => {
                self.db
                    .set_template_status(&row.id, TemplateStatus::Failed, Some(&reason), 0)?;
                return Err(ApiError::internal(reason));
            }
        }
        let this = self.clone();
        let id = row.id.clone();
        let creds = req.credentials;
        tokio::spawn(async move { this.build_template(&id, &reference, creds).await });
        Ok(self.template_to_api(&self.template_row(org, given)?))
    }

    /// Where an upload to `POST /templates/import` is spooled (removed at
    /// start like every staging path, `.tmp-` in its name).
    pub fn import_spool_path(&self) -> PathBuf {
        self.own_templates_dir()
            .join(format!(".import-{:016x}.tmp-upload", rand::random::<u64>()))
    }

    /// Spool an upload (the archive, as the request body) to a new file
    /// under the state dir, at most `template_import_max_mb` (413 beyond;
    /// 400 when empty or cut short). The file is removed on any error.
    pub async fn spool_import<S, E>(&self, mut body: S) -> Result<PathBuf, ApiError>
    where
        S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let limit = self.cfg.template_import_max_mb << 20;
        tokio::fs::create_dir_all(self.own_templates_dir())
            .await
            .map_err(|e| ApiError::internal(format!("templates dir: {e}")))?;
        let path = self.import_spool_path();
        let spool = SpoolFile(path.clone());
        let mut f = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .await
            .map_err(|e| ApiError::internal(format!("spooling the upload: {e}")))?;
        let mut total: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk
                .map_err(|e| ApiError::bad_request("body", format!("reading the upload: {e}")))?;
            total += chunk.len() as u64;
            if total > limit {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "archive_too_large",
                    format!(
                        "the archive is larger than template_import_max_mb ({} MiB)",
                        limit >> 20
                    ),
                )
                .field("body"));
            }
            f.write_all(&chunk)
                .await
                .map_err(|e| ApiError::internal(format!("spooling the upload: {e}")))?;
        }
        f.flush()
            .await
            .map_err(|e| ApiError::internal(format!("spooling the upload: {e}")))?;
        if total == 0 {
            return Err(ApiError::bad_request(
                "body",
                "empty: the request body is the image archive (docker save tar or OCI archive)",
            ));
        }
        std::mem::forget(spool);
        Ok(path)
    }

    /// `POST /templates/import`: register the template (`building`) and
    /// import the spooled archive at `archive` in the background (the
    /// file is removed when done, whatever happens).
    pub fn import_template(
        self: &Arc<Self>,
        org: &str,
        name: &str,
        archive: PathBuf,
    ) -> Result<Template, ApiError> {
        let spool = SpoolFile(archive);
        sandforge_api::validate_template_name(name)?;
        let row = self.insert_building(
            org,
            name.to_string(),
            TemplateSource::Archive,
            TemplateDefaults::default(),
        )?;
        let this = self.clone();
        let id = row.id.clone();
        let label = format!("archive:{name}");
        tokio::spawn(async move {
            let spool = spool;
            this.run_image_build(&id, &label, Build::Archive(&spool.0))
                .await;
        });
        Ok(self.template_to_api(&row))
    }

    /// Pull `reference` into the template `id`; `credentials` are used for
    /// this pull only (never written anywhere, not even the build log).
    pub(crate) async fn build_template(
        &self,
        id: &str,
        reference: &str,
        credentials: Option<RegistryCredentials>,
    ) {
        self.run_image_build(id, reference, Build::Pull(credentials))
            .await
    }

    async fn run_image_build(&self, id: &str, reference: &str, how: Build<'_>) {
        let log_path = self.build_log(id);
        let log = std::sync::Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .ok(),
        );
        let write = |line: serde_json::Value| {
            use std::io::Write;
            if let Some(f) = log.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                let _ = writeln!(f, "{line}");
            }
        };
        let (event, authenticated) = match &how {
            Build::Pull(c) => ("pull", c.is_some()),
            Build::Archive(_) => ("import", false),
        };
        write(serde_json::json!({
            "event": event,
            "reference": reference,
            "authenticated": authenticated,
            "at": now(),
        }));
        let progress = |e: PullEvent| write(event_json(&e));
        let opts = PullOptions {
            blob_dir: self.blob_dir(),
            uid_shift: UID_SHIFT,
            max_bytes: self.cfg.template_max_mb << 20,
            credentials: match &how {
                Build::Pull(Some(c)) => Some((c.username.clone(), c.password.clone())),
                _ => None,
            },
        };
        let dest = self.own_templates_dir().join(id);
        let result = {
            let _blobs = BLOBS.lock().await;
            match how {
                Build::Pull(_) => {
                    sandforge_runtime::image::pull(&opts, reference, &dest, &progress).await
                }
                Build::Archive(path) => {
                    sandforge_runtime::image::import(&opts, path, reference, &dest, &progress).await
                }
            }
        };
        let outcome = match result {
            Ok(info) => {
                write(
                    serde_json::json!({"event": "ready", "size_bytes": info.size_bytes, "digest": info.digest}),
                );
                self.db
                    .set_template_status(id, TemplateStatus::Ready, None, info.size_bytes)
            }
            Err(e) => {
                let reason = pull_reason(&e);
                write(serde_json::json!({"event": "failed", "reason": reason}));
                tracing::warn!(%id, reference, "template build failed: {reason}");
                self.db
                    .set_template_status(id, TemplateStatus::Failed, Some(&reason), 0)
            }
        };
        if let Err(e) = outcome {
            tracing::error!(%id, "recording a template build: {e}");
        }
    }

    /// The microVM image of a template a create is about to boot: there, or
    /// derived now from the template's tree (its first microVM; cached for
    /// the next), the create waiting at most `vm_image_wait_secs` before a
    /// 409 `template_not_ready` while the derivation goes on. Its outcome
    /// goes into the template's build log. A built-in template without an
    /// image (scripts/build-guest.sh makes those) is refused with 409.
    pub(crate) async fn vm_image(
        &self,
        given: &str,
        template: &sandforge_runtime::Template,
    ) -> Result<(), ApiError> {
        use sandforge_runtime::microvm::image::{self, Ensured};
        if !image::derivable(template)
            && !sandforge_runtime::microvm::base_image(template).is_file()
        {
            return Err(ApiError::conflict(
                "template_unsupported",
                format!(
                    "template '{given}' has no microVM image (run scripts/build-guest.sh {})",
                    template.name
                ),
            )
            .field("isolation"));
        }
        let log = self.build_log(&template.name);
        let on_done = move |r: Result<&image::Derived, &str>| {
            let line = match r {
                Ok(d) => serde_json::json!({
                    "event": "vm_image",
                    "image_bytes": d.image_bytes,
                    "tree_bytes": d.tree_bytes,
                    "inodes": d.inodes,
                    "took_ms": d.took.as_millis() as u64,
                    "at": now(),
                }),
                Err(reason) => {
                    serde_json::json!({"event": "vm_image_failed", "reason": reason, "at": now()})
                }
            };
            append_log(&log, &line);
        };
        let wait = std::time::Duration::from_secs(self.cfg.vm_image_wait_secs);
        match image::ensure(template, wait, on_done).await? {
            Ensured::Ready => Ok(()),
            Ensured::Pending => Err(ApiError::conflict(
                "template_not_ready",
                format!(
                    "template '{given}': its microVM image is still being made (its first microVM); try again shortly"
                ),
            )
            .field("template")),
        }
    }

    /// The build log of a template of `org` (ndjson lines) and whether it
    /// is still building.
    pub fn template_log(
        &self,
        org: &str,
        given: &str,
    ) -> Result<(String, Vec<u8>, bool), ApiError> {
        let row = self.template_row(org, given)?;
        let log = std::fs::read(self.build_log(&row.id)).unwrap_or_default();
        Ok((row.id.clone(), log, row.status == TemplateStatus::Building))
    }

    /// Blobs no template refers to any more are removed (after a delete).
    async fn collect_blobs(&self) {
        let _blobs = BLOBS.lock().await;
        let mut in_use = HashSet::new();
        if let Ok(rd) = std::fs::read_dir(self.own_templates_dir()) {
            for e in rd.flatten() {
                if let Some(info) = image_of(&e.path()) {
                    in_use.insert(info.config_digest);
                    in_use.extend(info.layers);
                }
            }
        }
        match sandforge_runtime::image::remove_unused_blobs(&self.blob_dir(), &in_use) {
            Ok(freed) if freed > 0 => tracing::info!(freed, "unused image blobs removed"),
            Ok(_) => {}
            Err(e) => tracing::warn!("removing unused image blobs: {e}"),
        }
    }

    /// The name on disk of the template `given` (an id, a name, or `base`)
    /// that `org` may use: 404 when there is none, 409 while it is not
    /// `ready`.
    /// Also returns the template's defaults for a new sandbox.
    pub(crate) fn resolve_template_with_defaults(
        &self,
        org: &str,
        given: &str,
    ) -> Result<(String, TemplateDefaults), ApiError> {
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
                return Ok((given_name.to_string(), TemplateDefaults::default()));
            }
            return Err(not_found(given));
        };
        match row.status {
            TemplateStatus::Ready => Ok((stored_name(&row), row.defaults)),
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
    /// The files are renamed away; what it returns removes them.
    fn delete_template(&self, org: &str, given: &str) -> Result<Doomed, ApiError> {
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
        self.refuse_in_use(&row)?;
        let _held = self.hold_vm_image(&row)?;
        let doomed = self
            .remove_template_files(&row.id)
            .map_err(ApiError::internal)?;
        self.db.delete_template(&row.id)?;
        Ok(doomed)
    }

    /// `DELETE` then the blobs' garbage collection.
    pub async fn delete_template_and_collect(
        &self,
        org: &str,
        given: &str,
    ) -> Result<(), ApiError> {
        let doomed = self.delete_template(org, given)?;
        // Gone when the DELETE answers, without holding an async worker.
        let _ = tokio::task::spawn_blocking(move || doomed.remove()).await;
        self.collect_blobs().await;
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
            defaults: t.defaults.clone(),
        }
    }
}

/// Append one ndjson line to a build log (best effort).
fn append_log(path: &std::path::Path, line: &serde_json::Value) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

/// A deleted template's files, renamed away; `remove` deletes them
/// (blocking: call it on the blocking pool).
struct Doomed(Vec<PathBuf>);

impl Doomed {
    fn remove(self) {
        for p in self.0 {
            if let Err(e) = std::fs::remove_dir_all(&p) {
                tracing::warn!("removing {}: {e}", p.display());
            }
        }
    }
}

/// What a build makes its template of.
enum Build<'a> {
    /// The row's image reference, from its registry (with these
    /// credentials, if any).
    Pull(Option<RegistryCredentials>),
    /// An uploaded archive spooled at this path.
    Archive(&'a std::path::Path),
}

/// An uploaded archive's spool file, removed when dropped.
struct SpoolFile(PathBuf);

impl Drop for SpoolFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The directory name a sandbox's spec records for a template row.
fn stored_name(t: &TemplateRow) -> String {
    match t.source {
        TemplateSource::Builtin => t.name.clone(),
        _ => t.id.clone(),
    }
}

/// The `image` part of a pulled template's manifest.
fn image_of(dir: &std::path::Path) -> Option<ImageInfo> {
    let raw = std::fs::read(dir.join("template.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    serde_json::from_value(v.get("image")?.clone()).ok()
}

/// A failed pull's reason as the template shows it.
fn pull_reason(e: &ImageError) -> String {
    let kind = match e {
        ImageError::Reference(_) => "bad reference",
        ImageError::NotFound(_) => "not found",
        ImageError::Unauthorized(_) => "unauthorized",
        ImageError::Platform(_) => "wrong platform",
        ImageError::Digest { .. } => "corrupt layer",
        ImageError::Layer(_) => "bad layer",
        ImageError::Exists(_) | ImageError::Io(_) => "io",
        ImageError::Registry(_) => "registry",
        ImageError::Archive(_) => "bad archive",
    };
    format!("{kind}: {e}")
}

fn event_json(e: &PullEvent) -> serde_json::Value {
    use serde_json::json;
    match e {
        PullEvent::Resolved { digest, layers } => {
            json!({"event": "resolved", "digest": digest, "layers": layers})
        }
        PullEvent::LayerCached { digest, size } => {
            json!({"event": "layer_cached", "digest": digest, "size": size})
        }
        PullEvent::LayerDownloading { digest, size } => {
            json!({"event": "layer_downloading", "digest": digest, "size": size})
        }
        PullEvent::LayerProgress { digest, done, size } => {
            json!({"event": "layer_progress", "digest": digest, "done": done, "size": size})
        }
        PullEvent::LayerDownloaded { digest, size } => {
            json!({"event": "layer_downloaded", "digest": digest, "size": size})
        }
        PullEvent::LayerUnpacking { digest } => {
            json!({"event": "layer_unpacking", "digest": digest})
        }
        PullEvent::Done { size_bytes } => json!({"event": "done", "size_bytes": size_bytes}),
    }
}
