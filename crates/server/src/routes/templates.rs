//! `/templates`: list, get, delete (and create, when a source can be
//! built). Thin: parse, call the controller, shape the answer.

use axum::extract::{Path, State};
use axum::Json;
use http::StatusCode;
use sandforge_api::Template;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;

pub async fn list(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Template>>, ApiError> {
    Ok(Json(st.controller.list_templates(&caller.org)?))
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
    st.controller.delete_template(&caller.org, &id)?;
    Ok(StatusCode::NO_CONTENT)
}
