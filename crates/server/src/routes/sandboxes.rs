//! `/sandboxes`: create, list, get, patch, destroy.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::Json;
use http::StatusCode;
use sandforge_api::{CreateSandbox, DeleteResponse, PatchSandbox, Sandbox, SandboxStatus};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::json::ApiJson;
use crate::AppState;

pub async fn create(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateSandbox>,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    let sb = st.controller.create(&caller.org, req).await?;
    Ok((StatusCode::CREATED, Json(sb)))
}

pub async fn list(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<Sandbox>>, ApiError> {
    if let Some(k) = q.keys().find(|k| k.as_str() != "status") {
        return Err(ApiError::bad_request(k, "unknown query parameter"));
    }
    let status = match q.get("status") {
        None => None,
        Some(s) => Some(SandboxStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "status",
                format!("'{s}' is not one of creating, starting, running, suspended, stopped, failed, destroyed"),
            )
        })?),
    };
    Ok(Json(st.controller.list(&caller.org, status)?))
}

pub async fn get_one(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    let row = st.controller.get(&caller.org, &id)?;
    Ok(Json(st.controller.to_api(&row)))
}

/// `POST /sandboxes/{id}/wake`: 200 when it runs (also if it already did).
pub async fn wake(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(st.controller.wake(&caller.org, &id).await?))
}

pub async fn keepalive(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<sandforge_api::Keepalive>,
) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(st.controller.keepalive(&caller.org, &id, req).await?))
}

pub async fn stop(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<crate::lifecycle::StopResult>, ApiError> {
    Ok(Json(st.controller.stop(&caller.org, &id).await?))
}

pub async fn start(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(st.controller.start(&caller.org, &id).await?))
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    #[serde(default)]
    name: Option<String>,
}

pub async fn take_snapshot(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<SnapshotRequest>,
) -> Result<(StatusCode, Json<crate::db::SnapshotRow>), ApiError> {
    let s = st
        .controller
        .take_snapshot(&caller.org, &id, req.name)
        .await?;
    Ok((StatusCode::CREATED, Json(s)))
}

pub async fn snapshots(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<crate::db::SnapshotRow>>, ApiError> {
    Ok(Json(st.controller.snapshots(&caller.org, &id)?))
}

pub async fn rollback(
    State(st): State<AppState>,
    caller: Caller,
    Path((id, sid)): Path<(String, String)>,
) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(st.controller.rollback(&caller.org, &id, &sid).await?))
}

pub async fn delete_snapshot(
    State(st): State<AppState>,
    caller: Caller,
    Path((id, sid)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    st.controller.delete_snapshot(&caller.org, &id, &sid)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /sandboxes/{id}/events`: every status change, oldest first.
pub async fn events(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<crate::lifecycle::Transition>>, ApiError> {
    Ok(Json(st.controller.transitions(&caller.org, &id)?))
}

/// `PATCH /sandboxes/{id}`: change mutable properties (the egress policy).
pub async fn patch(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<PatchSandbox>,
) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(st.controller.patch(&caller.org, &id, req).await?))
}

pub async fn destroy(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeleteResponse>, ApiError> {
    st.controller.destroy(&caller.org, &id).await?;
    Ok(Json(DeleteResponse {
        id,
        status: "terminated".into(),
        message: "Sandbox resources reclaimed successfully.".into(),
    }))
}

/// `GET /sandboxes/{id}/console`: the tail (64 KiB) of the serial console of
/// a VM, or of a container's init output, as text.
pub async fn console(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<String, ApiError> {
    st.controller.console(&caller.org, &id, 64 * 1024)
}
