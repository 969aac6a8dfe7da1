//! Templates made from sandboxes (issue 12): a sandbox saved as a template
//! (`POST /sandboxes/{id}/template`) and a Dockerfile build (`POST
//! /templates` with a `dockerfile`), which runs its steps in a builder
//! sandbox and saves that.
//!
//! Owns: the save (the sandbox woken if it must be, then under its op lock
//! and marked busy while its agent streams its root filesystem into the
//! new template through `sandforge_runtime::commit`; a stopped sandbox is
//! stopped again afterwards), the build's steps and its builder sandbox
//! (a container from the `FROM` template, metadata `sandforge_builder` =
//! the template's id, destroyed in every case, and at daemon start when a
//! build was interrupted), the build context (a tar in memory, bounded;
//! only regular files and directories are copied) and the build log lines.
//!
//! Must not: read a sandbox's files on the host (only the commit's checked
//! stream does), or let a build's output grow the log without bound.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use sandforge_agent_proto::{ExecRequest, Frame};
use sandforge_api::dockerfile::{self, Dockerfile, Step};
use sandforge_api::{
    CreateSandbox, Isolation, SandboxStatus, SaveTemplate, Template, TemplateDefaults,
    TemplateSource, TemplateStatus,
};
use sandforge_runtime::commit::CommitConfig;

use crate::controller::{not_running, Controller};
use crate::db::now;
use crate::error::ApiError;

/// Metadata key naming the build a builder sandbox belongs to.
pub const BUILDER_KEY: &str = "sandforge_builder";
/// Longest one `RUN` may take.
const RUN_TIMEOUT_MS: u64 = 30 * 60 * 1000;
/// Largest build context once decompressed.
const MAX_CONTEXT_UNPACKED: u64 = 16 << 20;
/// Step output kept in the build log; past it only a note.
const MAX_LOG_OUTPUT: usize = 8 << 20;

/// A build log (ndjson), appended line by line.
pub(crate) struct BuildLog {
    file: std::sync::Mutex<Option<std::fs::File>>,
    output: std::sync::atomic::AtomicUsize,
}

impl BuildLog {
    fn open(path: &std::path::Path) -> Self {
        Self {
            file: std::sync::Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .ok(),
            ),
            output: Default::default(),
        }
    }

    fn write(&self, line: serde_json::Value) {
        use std::io::Write;
        if let Some(f) = self.file.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            let _ = writeln!(f, "{line}");
        }
    }

    /// A step's output, within [`MAX_LOG_OUTPUT`] for the whole build.
    fn output(&self, step: usize, stream: &str, data: &[u8]) {
        use std::sync::atomic::Ordering;
        let before = self.output.fetch_add(data.len(), Ordering::Relaxed);
        if before >= MAX_LOG_OUTPUT {
            return;
        }
        if before + data.len() > MAX_LOG_OUTPUT {
            self.write(serde_json::json!({"event": "output_truncated", "step": step}));
            return;
        }
        self.write(serde_json::json!({
            "event": "output", "step": step, "stream": stream,
            "text": String::from_utf8_lossy(data),
        }));
    }
}

/// A build context: regular files and directories by normalized path.
#[derive(Default)]
struct Context {
    /// path (no leading `/`, no `.`/`..`) → (mode, contents; None: a directory)
    entries: BTreeMap<String, (u32, Option<Vec<u8>>)>,
}

fn normalize(p: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => out.push(c),
        }
    }
    Some(out.join("/"))
}

impl Context {
    fn parse(raw: &[u8]) -> Result<Self, String> {
        let mut ctx = Context::default();
        if raw.is_empty() {
            return Ok(ctx);
        }
        let reader: Box<dyn Read> = if raw.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::GzDecoder::new(raw))
        } else {
            Box::new(raw)
        };
        let mut limited = reader.take(MAX_CONTEXT_UNPACKED + 1);
        let mut data = Vec::new();
        limited
            .read_to_end(&mut data)
            .map_err(|e| format!("not a tar or tar.gz: {e}"))?;
        if data.len() as u64 > MAX_CONTEXT_UNPACKED {
            return Err(format!(
                "larger than {MAX_CONTEXT_UNPACKED} bytes once decompressed"
            ));
        }
        let mut ar = tar::Archive::new(data.as_slice());
        for entry in ar.entries().map_err(|e| format!("not a tar: {e}"))? {
            let mut entry = entry.map_err(|e| format!("not a tar: {e}"))?;
            let raw_path = entry.path_bytes().into_owned();
            let path = String::from_utf8(raw_path)
                .map_err(|_| "a name in the context is not UTF-8".to_string())?;
            let Some(norm) = normalize(&path) else {
                return Err(format!("'{path}' leaves the context (..)"));
            };
            let mode = entry.header().mode().unwrap_or(0o644) & 0o7777;
            match entry.header().entry_type() {
                tar::EntryType::Directory if !norm.is_empty() => {
                    ctx.entries.insert(norm, (mode, None));
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let mut buf = Vec::new();
                    entry
                        .read_to_end(&mut buf)
                        .map_err(|e| format!("reading '{path}': {e}"))?;
                    ctx.entries.insert(norm, (mode, Some(buf)));
                }
                // Links, devices, FIFOs: never followed, never copied.
                _ => {}
            }
        }
        Ok(ctx)
    }

    /// The entries one `COPY src... dst` makes: (absolute destination, mode,
    /// contents or None for a directory).
    #[allow(clippy::type_complexity)]
    fn select(
        &self,
        src: &[String],
        dst: &str,
        workdir: &str,
    ) -> Result<Vec<(String, u32, Option<Vec<u8>>)>, String> {
        let abs = if dst.starts_with('/') {
            dst.to_string()
        } else {
            format!("{workdir}/{dst}")
        };
        let dst_dir_given = dst.ends_with('/') || src.len() > 1;
        let dst_norm = normalize(&abs).ok_or_else(|| format!("'{dst}': no .. in a destination"))?;
        let mut out = Vec::new();
        for s in src {
            let s_norm = normalize(s).ok_or_else(|| format!("'{s}' leaves the context (..)"))?;
            let join = |rel: &str| {
                let mut p = format!("/{dst_norm}");
                if !rel.is_empty() {
                    if !p.ends_with('/') {
                        p.push('/');
                    }
                    p.push_str(rel);
                }
                p
            };
            match self.entries.get(&s_norm) {
                Some((mode, Some(data))) => {
                    let base = s_norm.rsplit('/').next().unwrap_or(&s_norm);
                    let to = if dst_dir_given { join(base) } else { join("") };
                    out.push((to, *mode, Some(data.clone())));
                }
                _ => {
                    // A directory (explicit, or implied by entries below it).
                    let prefix = if s_norm.is_empty() {
                        String::new()
                    } else {
                        format!("{s_norm}/")
                    };
                    let mut any = self.entries.contains_key(&s_norm) || s_norm.is_empty();
                    for (p, (mode, data)) in self.entries.range(prefix.clone()..) {
                        let Some(rel) = p.strip_prefix(&prefix) else {
                            break;
                        };
                        any = true;
                        out.push((join(rel), *mode, data.clone()));
                    }
                    if !any {
                        return Err(format!("'{s}' is not in the build context"));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// A tar of `entries` (owned by root), for `tar -x` inside the builder.
fn copy_tar(entries: &[(String, u32, Option<Vec<u8>>)]) -> Result<Vec<u8>, String> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, mode, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(*mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        let rel = path.trim_start_matches('/');
        match data {
            Some(d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(d.len() as u64);
                b.append_data(&mut h, rel, d.as_slice())
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, rel, std::io::empty())
            }
        }
        .map_err(|e| format!("COPY {path}: {e}"))?;
    }
    b.into_inner().map_err(|e| e.to_string())
}

fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let cleaned: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(cleaned)
        .map_err(|e| format!("not base64: {e}"))
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// What the template so far has: the inherited config and the Dockerfile's.
struct BuildState {
    env: BTreeMap<String, String>,
    workdir: Option<String>,
    user: Option<String>,
}

impl Controller {
    /// Where a Dockerfile template keeps its source (for seed 003's
    /// `/build`): `<state>/templates/.<id>.src/{Dockerfile,context}`.
    pub(crate) fn build_source_dir(&self, id: &str) -> std::path::PathBuf {
        self.own_templates_dir().join(format!(".{id}.src"))
    }

    /// `POST /sandboxes/{id}/template`: 202 with the template `building`;
    /// the save runs in the background.
    pub async fn save_sandbox(
        self: &Arc<Self>,
        org: &str,
        id: &str,
        req: SaveTemplate,
    ) -> Result<Template, ApiError> {
        sandforge_api::template::validate_template_name(&req.name)?;
        let row = self.get(org, id)?;
        if !matches!(
            row.status,
            SandboxStatus::Running | SandboxStatus::Suspended | SandboxStatus::Stopped
        ) {
            return Err(not_running(&row));
        }
        let t = self.insert_building(
            org,
            req.name,
            TemplateSource::Sandbox {
                sandbox_id: id.to_string(),
                template: row.spec.template.clone(),
            },
            TemplateDefaults::default(),
        )?;
        let (this, org, sid, tid) = (self.clone(), org.to_string(), id.to_string(), t.id.clone());
        tokio::spawn(async move {
            let log = BuildLog::open(&this.build_log(&tid));
            log.write(serde_json::json!({"event": "save", "sandbox_id": sid, "at": now()}));
            let r = this.commit_sandbox(&org, &sid, &tid, None, &log).await;
            this.finish(&tid, r, &log);
        });
        Ok(self.template_to_api(&t))
    }

    fn finish(&self, tid: &str, r: Result<u64, String>, log: &BuildLog) {
        let outcome = match r {
            Ok(size) => {
                log.write(serde_json::json!({"event": "ready", "size_bytes": size}));
                self.db
                    .set_template_status(tid, TemplateStatus::Ready, None, size)
            }
            Err(reason) => {
                log.write(serde_json::json!({"event": "failed", "reason": reason}));
                tracing::warn!(%tid, "template build failed: {reason}");
                if let Some(p) = self.templates.path_of(tid) {
                    tokio::task::spawn_blocking(move || std::fs::remove_dir_all(p));
                }
                self.db
                    .set_template_status(tid, TemplateStatus::Failed, Some(&reason), 0)
            }
        };
        if let Err(e) = outcome {
            tracing::error!(%tid, "recording a template build: {e}");
        }
    }

    /// Save sandbox `sid`'s root filesystem as template `tid`, its config
    /// the sandbox's template's (or `state`'s, for a build). A stopped or
    /// suspended sandbox runs for the save; a stopped one is stopped again.
    async fn commit_sandbox(
        self: &Arc<Self>,
        org: &str,
        sid: &str,
        tid: &str,
        state: Option<&BuildState>,
        log: &BuildLog,
    ) -> Result<u64, String> {
        let msg = |e: ApiError| e.message;
        let before = self.get(org, sid).map_err(msg)?;
        let was_stopped = before.status == SandboxStatus::Stopped;
        self.wake(org, sid).await.map_err(msg)?;
        let _busy = self.busy(sid);
        let result = async {
            let lock = self.op_lock(sid);
            let _guard = lock.lock().await;
            let row = self.get(org, sid).map_err(msg)?;
            if row.status != SandboxStatus::Running {
                return Err(not_running(&row).message);
            }
            let client = self.running_agent(org, sid).map_err(msg)?;
            let cfg = match state {
                Some(s) => CommitConfig {
                    env: s.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                    workdir: s.workdir.clone(),
                    user: s.user.clone(),
                    ..Default::default()
                },
                None => match self.templates.get(&row.spec.template) {
                    Ok(t) => CommitConfig {
                        env: t.env,
                        workdir: t.workdir,
                        user: t.user,
                        ..Default::default()
                    },
                    Err(_) => CommitConfig::default(),
                },
            };
            let cfg = CommitConfig {
                source: if state.is_some() {
                    "dockerfile"
                } else {
                    "sandbox"
                }
                .into(),
                parent: row.spec.template.clone(),
                sandbox_id: sid.to_string(),
                ..cfg
            };
            log.write(serde_json::json!({"event": "commit", "sandbox_id": sid}));
            let dest = self.own_templates_dir().join(tid);
            sandforge_runtime::commit::commit(
                &client,
                &dest,
                crate::templates::UID_SHIFT,
                self.cfg.template_max_mb << 20,
                &cfg,
            )
            .await
            .map_err(|e| format!("save failed: {e}"))
        }
        .await;
        if was_stopped {
            if let Err(e) = self.stop(org, sid).await {
                tracing::warn!(%sid, "stopping again after a save: {}", e.message);
            }
        }
        result
    }

    /// `POST /templates` with a `dockerfile`: checked (400 naming the line,
    /// or `context`), registered `building`, built in the background.
    pub(crate) fn start_build(
        self: &Arc<Self>,
        org: &str,
        name: String,
        defaults: TemplateDefaults,
        text: &str,
        context: Option<&str>,
    ) -> Result<Template, ApiError> {
        let d = dockerfile::parse(text)?;
        let raw = match context {
            Some(c) => base64_decode(c).map_err(|e| ApiError::bad_request("context", e))?,
            None => Vec::new(),
        };
        let ctx = Context::parse(&raw).map_err(|e| ApiError::bad_request("context", e))?;
        for i in &d.steps {
            if let Step::Copy { src, .. } = &i.step {
                ctx.select(src, "/", "/").map_err(|e| {
                    ApiError::bad_request("dockerfile", format!("line {}: COPY: {e}", i.line))
                })?;
            }
        }
        let t = self.insert_building(
            org,
            name,
            TemplateSource::Dockerfile {
                from: d.from.clone(),
            },
            defaults,
        )?;
        let src = self.build_source_dir(&t.id);
        let saved = std::fs::create_dir_all(&src)
            .and_then(|_| std::fs::write(src.join("Dockerfile"), text))
            .and_then(|_| std::fs::write(src.join("context"), &raw));
        if let Err(e) = saved {
            tracing::warn!(id = %t.id, "keeping the build's source: {e}");
        }
        let (this, org, tid) = (self.clone(), org.to_string(), t.id.clone());
        tokio::spawn(async move {
            let log = BuildLog::open(&this.build_log(&tid));
            let r = this.run_build(&org, &tid, &d, &ctx, &log).await;
            this.finish(&tid, r, &log);
        });
        Ok(self.template_to_api(&t))
    }

    /// Seed 003's `/build` of a Dockerfile template: the same build again
    /// from its kept source.
    pub(crate) fn rebuild_dockerfile(
        self: &Arc<Self>,
        org: &str,
        row: crate::db::TemplateRow,
    ) -> Result<Template, ApiError> {
        let src = self.build_source_dir(&row.id);
        let (Ok(text), Ok(raw)) = (
            std::fs::read_to_string(src.join("Dockerfile")),
            std::fs::read(src.join("context")),
        ) else {
            return Err(ApiError::conflict(
                "cannot_rebuild",
                format!("template '{}' has no kept build source", row.name),
            ));
        };
        if !self.db.claim_template_build(&row.id)? {
            return Err(ApiError::conflict(
                "template_building",
                format!("template '{}' is already building", row.name),
            ));
        }
        let restore = |this: &Self| {
            this.db.set_template_status(
                &row.id,
                row.status,
                row.status_reason.as_deref(),
                row.size_bytes,
            )
        };
        let d = match dockerfile::parse(&text) {
            Ok(d) => d,
            Err(e) => {
                restore(self)?;
                return Err(e.into());
            }
        };
        let ctx = match Context::parse(&raw) {
            Ok(c) => c,
            Err(e) => {
                restore(self)?;
                return Err(ApiError::bad_request("context", e));
            }
        };
        if let Err(e) = self.refuse_in_use(&row) {
            restore(self)?;
            return Err(e);
        }
        let _ = std::fs::remove_file(self.build_log(&row.id));
        // The old tree leaves at once (a rename into a staging name, which
        // a start sweeps too) and is removed off the request's path.
        let old = self.templates.path_of(&row.id).and_then(|p| {
            let _ = std::fs::remove_file(p.join("template.json"));
            let trash = self.own_templates_dir().join(format!(
                ".{}.tmp-old{:08x}",
                row.id,
                rand::random::<u32>()
            ));
            std::fs::rename(&p, &trash).ok().map(|_| trash)
        });
        let (this, org, tid) = (self.clone(), org.to_string(), row.id.clone());
        tokio::spawn(async move {
            if let Some(old) = old {
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(old)).await;
            }
            let log = BuildLog::open(&this.build_log(&tid));
            let r = this.run_build(&org, &tid, &d, &ctx, &log).await;
            this.finish(&tid, r, &log);
        });
        self.get_template(org_of(&row), &row.id)
    }

    /// `FROM <image>`: the image becomes an ordinary template of the
    /// organization first (one already pulled from that reference and
    /// `ready` is reused), named `<build's name>-from`; the build's log
    /// says which. Returns its stored name.
    async fn pull_base(
        self: &Arc<Self>,
        org: &str,
        tid: &str,
        reference: &str,
        log: &BuildLog,
    ) -> Result<String, String> {
        let source = TemplateSource::Image {
            reference: reference.to_string(),
        };
        let known = self.db.list_templates(org).map_err(|e| e.to_string())?;
        if let Some(t) = known
            .iter()
            .find(|t| t.org.is_some() && t.status == TemplateStatus::Ready && t.source == source)
        {
            log.write(serde_json::json!({"event": "from_image", "template_id": t.id, "reference": reference, "pulled": false}));
            return Ok(t.id.clone());
        }
        let name = match self.db.get_template(tid) {
            Ok(Some(t)) => format!("{}-from", t.name),
            _ => format!("{tid}-from"),
        };
        let row = self
            .insert_building(org, name, source, TemplateDefaults::default())
            .map_err(|e| format!("FROM {reference}: {}", e.message))?;
        log.write(serde_json::json!({"event": "from_image", "template_id": row.id, "reference": reference, "pulled": true}));
        self.build_template(&row.id, reference, None).await;
        match self.db.get_template(&row.id) {
            Ok(Some(t)) if t.status == TemplateStatus::Ready => Ok(row.id),
            Ok(Some(t)) => Err(format!(
                "FROM {reference}: {}",
                t.status_reason.unwrap_or_else(|| "the pull failed".into())
            )),
            _ => Err(format!("FROM {reference}: the pulled template vanished")),
        }
    }

    async fn run_build(
        self: &Arc<Self>,
        org: &str,
        tid: &str,
        d: &Dockerfile,
        ctx: &Context,
        log: &BuildLog,
    ) -> Result<u64, String> {
        log.write(serde_json::json!({"event": "build", "from": d.from, "steps": d.steps.len(), "at": now()}));
        let stored = match self.resolve_template_with_defaults(org, &d.from) {
            Ok((s, _)) => s,
            Err(e) if e.code == "template_not_found" && looks_like_image(&d.from) => {
                self.pull_base(org, tid, &d.from, log).await?
            }
            Err(e) if e.code == "template_not_found" => {
                return Err(format!(
                    "FROM {}: no such template (nor an image reference: registry/repository[:tag])",
                    d.from
                ))
            }
            Err(e) => return Err(format!("FROM {}: {}", d.from, e.message)),
        };
        let base = self
            .templates
            .get(&stored)
            .map_err(|e| format!("FROM {}: {e}", d.from))?;
        let mut state = BuildState {
            env: base
                .env
                .iter()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            workdir: base.workdir.clone(),
            user: base.user.clone(),
        };
        let req = CreateSandbox {
            template: Some(stored),
            isolation: Some(Isolation::Container),
            metadata: [(BUILDER_KEY.to_string(), tid.to_string())]
                .into_iter()
                .collect(),
            name: Some(format!("build-{}", tid.replace('_', "-"))),
            ..Default::default()
        };
        let sb = self
            .create(org, req)
            .await
            .map_err(|e| format!("builder sandbox: {}", e.message))?;
        log.write(serde_json::json!({"event": "builder", "sandbox_id": sb.id}));
        let result = async {
            for (n, i) in d.steps.iter().enumerate() {
                let n = n + 1;
                log.write(
                    serde_json::json!({"event": "step", "step": n, "line": i.line, "text": i.text}),
                );
                self.run_step(org, &sb.id, n, i, ctx, &mut state, log)
                    .await
                    .map_err(|e| format!("step {n} ({}) {e}", i.text))?;
            }
            self.commit_sandbox(org, &sb.id, tid, Some(&state), log)
                .await
        }
        .await;
        self.destroy_builder(org, &sb.id).await;
        result
    }

    /// Destroy a builder sandbox, retrying a few times.
    async fn destroy_builder(&self, org: &str, id: &str) {
        for attempt in 0..5 {
            match self.destroy(org, id).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(%id, attempt, "destroying a builder sandbox: {}", e.message);
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_step(
        &self,
        org: &str,
        sid: &str,
        n: usize,
        i: &dockerfile::Instruction,
        ctx: &Context,
        state: &mut BuildState,
        log: &BuildLog,
    ) -> Result<(), String> {
        let cwd = state.workdir.clone().unwrap_or_else(|| "/".into());
        match &i.step {
            Step::Run(argv) => {
                // USER: the agent runs the step as that user (resolved in
                // the builder's own passwd/group; root when unset).
                let argv = argv.clone();
                self.exec_step(org, sid, n, argv, &cwd, None, state, log, true)
                    .await
            }
            Step::Copy { src, dst } => {
                let entries = ctx.select(src, dst, &cwd)?;
                let tar = copy_tar(&entries)?;
                let argv = vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "base64 -d | tar -xpf - -C /".into(),
                ];
                self.exec_step(
                    org,
                    sid,
                    n,
                    argv,
                    "/",
                    Some(base64_encode(&tar)),
                    state,
                    log,
                    false,
                )
                .await
            }
            Step::Env(vars) => {
                for (k, v) in vars {
                    state.env.insert(k.clone(), v.clone());
                }
                Ok(())
            }
            Step::Workdir(w) => {
                let abs = if w.starts_with('/') {
                    w.clone()
                } else {
                    format!("{cwd}/{w}")
                };
                let norm = format!(
                    "/{}",
                    normalize(&abs).ok_or_else(|| "no .. in WORKDIR".to_string())?
                );
                let argv = vec!["mkdir".into(), "-p".into(), "--".into(), norm.clone()];
                self.exec_step(org, sid, n, argv, "/", None, state, log, false)
                    .await?;
                state.workdir = Some(norm);
                Ok(())
            }
            Step::User(u) => {
                state.user = Some(u.clone());
                Ok(())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn exec_step(
        &self,
        org: &str,
        sid: &str,
        n: usize,
        argv: Vec<String>,
        cwd: &str,
        stdin: Option<String>,
        state: &BuildState,
        log: &BuildLog,
        as_user: bool,
    ) -> Result<(), String> {
        let client = self
            .running_agent(org, sid)
            .map_err(|e| format!("failed: {}", e.message))?;
        let req = ExecRequest {
            argv,
            env: state.env.clone(),
            cwd: Some(cwd.to_string()),
            timeout_ms: RUN_TIMEOUT_MS,
            stdin,
            user: if as_user { state.user.clone() } else { None },
        };
        let mut stream = client
            .exec(&req)
            .await
            .map_err(|e| format!("failed: {e}"))?;
        while let Some(frame) = stream.next().await {
            match frame.map_err(|e| format!("failed: {e}"))? {
                Frame::Stdout(b) => log.output(n, "stdout", &b),
                Frame::Stderr(b) => log.output(n, "stderr", &b),
                Frame::Exit(x) => {
                    log.write(serde_json::json!({"event": "step_done", "step": n, "exit_code": x.exit_code}));
                    if x.timed_out {
                        return Err(format!("timed out after {} s", RUN_TIMEOUT_MS / 1000));
                    }
                    if x.exit_code != 0 {
                        return Err(format!("exited {}", x.exit_code));
                    }
                    return Ok(());
                }
                _ => {}
            }
        }
        Err("failed: the agent's stream ended without an exit status".into())
    }

    /// At daemon start (after reconcile): the builder sandboxes of builds a
    /// stop interrupted are destroyed.
    pub(crate) async fn destroy_builders(&self, interrupted: &[String]) {
        if interrupted.is_empty() {
            return;
        }
        let Ok(rows) = self.db.list_sandboxes(None) else {
            return;
        };
        for row in rows {
            if row.status == SandboxStatus::Destroyed {
                continue;
            }
            if let Some(t) = row.spec.metadata.get(BUILDER_KEY) {
                if interrupted.contains(t) {
                    tracing::info!(id = %row.id, template = %t, "destroying an interrupted build's sandbox");
                    self.destroy_builder(&row.org, &row.id).await;
                }
            }
        }
    }
}

fn org_of(row: &crate::db::TemplateRow) -> &str {
    row.org.as_deref().unwrap_or("")
}

/// Whether a `FROM` that names no template is meant as an image reference
/// (`registry/repository[:tag]`, `repository:tag`, `...@sha256:`): a bare
/// word is a template name.
fn looks_like_image(from: &str) -> bool {
    from.contains(['/', ':', '@']) && sandforge_runtime::image::parse_reference(from).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        let mut b = tar::Builder::new(Vec::new());
        for (p, d) in [
            ("app.py", "print(1)"),
            ("lib/a.txt", "a"),
            ("lib/sub/b.txt", "b"),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(d.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, p, d.as_bytes()).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "shadow", "/etc/shadow").unwrap();
        Context::parse(&b.into_inner().unwrap()).unwrap()
    }

    #[test]
    fn copy_selects_inside_the_context() {
        let c = ctx();
        let names =
            |v: Vec<(String, u32, Option<Vec<u8>>)>| v.into_iter().map(|e| e.0).collect::<Vec<_>>();
        assert_eq!(
            names(c.select(&["app.py".into()], "/app/", "/").unwrap()),
            ["/app/app.py"]
        );
        assert_eq!(
            names(c.select(&["app.py".into()], "x.py", "/w").unwrap()),
            ["/w/x.py"]
        );
        assert_eq!(
            names(c.select(&["lib".into()], "/l", "/").unwrap()),
            ["/l/a.txt", "/l/sub/b.txt"]
        );
        assert!(c.select(&["../etc/passwd".into()], "/x", "/").is_err());
        assert!(c.select(&["shadow".into()], "/x", "/").is_err());
        assert!(c.select(&["nope".into()], "/x", "/").is_err());
        assert!(normalize("a/../../b").is_none());
    }
}
