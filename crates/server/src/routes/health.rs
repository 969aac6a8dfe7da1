//! `GET /health`: unauthenticated liveness with the sandbox count and uptime.

use axum::extract::State;
use axum::Json;
use sandforge_api::sandbox::format_uptime;
use sandforge_api::Health;

use crate::error::ApiError;
use crate::AppState;

pub async fn health(State(st): State<AppState>) -> Result<Json<Health>, ApiError> {
    Ok(Json(Health {
        status: "ok".into(),
        sandboxes: st.controller.count_live()?,
        uptime: format_uptime(st.controller.uptime().as_secs()),
    }))
}
