//! `/templates`: list, create (an image pulled in the background), get,
//! delete, and the build log. Thin: parse, call the controller, shape the
//! answer.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use http::{header, StatusCode};
use sandforge_api::{CreateTemplate, RebuildTemplate, SaveTemplate, Template};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::json::ApiJson;
use crate::AppState;

pub async fn list(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Template>>, ApiError> {
    Ok(Json(st.controller.list_templates(&caller.org)?))
}

/// 202: registered as `building`; poll it or follow its logs.
pub async fn create(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateTemplate>,
) -> Result<(StatusCode, Json<Template>), ApiError> {
    let t = st.controller.create_template(&caller.org, req)?;
    Ok((StatusCode::ACCEPTED, Json(t)))
}

/// `POST /sandboxes/{id}/template` `{"name"}`: 202 with the new template
/// `building`; the sandbox's filesystem is saved in the background.
pub async fn save(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<SaveTemplate>,
) -> Result<(StatusCode, Json<Template>), ApiError> {
    let t = st.controller.save_sandbox(&caller.org, &id, req).await?;
    Ok((StatusCode::ACCEPTED, Json(t)))
}

/// `POST /v1/templates/import?name=<name>`: the body is an image archive
/// (`docker save` tar or OCI archive), spooled, then imported in the
/// background; 202 `building`.
pub async fn import(
    State(st): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Result<(StatusCode, Json<Template>), ApiError> {
    let name = form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "name")
        .map(|(_, v)| v.into_owned())
        .ok_or_else(|| ApiError::bad_request("name", "required: ?name=<template name>"))?;
    sandforge_api::validate_template_name(&name)?;
    let path = st.controller.spool_import(body.into_data_stream()).await?;
    let t = st.controller.import_template(&caller.org, &name, path)?;
    Ok((StatusCode::ACCEPTED, Json(t)))
}

/// Seed 003's `POST /api/sandbox/templates/{id}/build` and `/pull`: make
/// the template again from its source; 202 `building`. The body is
/// optional: `{"credentials": {"username", "password"}}` for this pull.
pub async fn rebuild(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<RebuildTemplate>,
) -> Result<(StatusCode, Json<Template>), ApiError> {
    let t = st.controller.rebuild_template(&caller.org, &id, req)?;
    Ok((StatusCode::ACCEPTED, Json(t)))
}

pub async fn get_one(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Template>, ApiError> {
    Ok(Json(st.controller.get_template(&caller.org, &id)?))
}

pub async fn delete(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    st.controller
        .delete_template_and_collect(&caller.org, &id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /templates/{id}/logs`: the build's events as ndjson, followed
/// until the build ends.
pub async fn logs(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (_, first, building) = st.controller.template_log(&caller.org, &id)?;
    let org = caller.org.clone();
    let state = (st, org, id, first.len(), building, Some(first));
    let stream =
        futures_util::stream::unfold(state, |(st, org, id, sent, building, pending)| async move {
            if let Some(p) = pending {
                return Some((
                    Ok::<_, std::io::Error>(Bytes::from(p)),
                    (st, org, id, sent, building, None),
                ));
            }
            if !building {
                return None;
            }
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let Ok((_, log, still)) = st.controller.template_log(&org, &id) else {
                    return None;
                };
                if log.len() > sent {
                    let new = Bytes::copy_from_slice(&log[sent..]);
                    let len = log.len();
                    return Some((Ok(new), (st, org, id, len, still, None)));
                }
                if !still {
                    return None;
                }
            }
        });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
