//! Ports, proxy and publish (seed 002): `GET /sandboxes/{id}/ports`,
//! `GET /ports`, `ANY /sandboxes/{id}/proxy/{port}/{*path}`,
//! `POST/GET /sandboxes/{id}/publish`, `DELETE .../publish/{port}`, and the
//! publish listener's one handler (routing by `Host`, no auth). Thin: the
//! controller decides, `proxy` forwards (and confines answers on the API
//! origin, see [`crate::proxy::Origin`]).

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::StatusCode;
use serde::Serialize;

use crate::auth::{caller_of_request, Caller};
use crate::error::ApiError;
use crate::json::ApiJson;
use crate::proxy::{self, Origin};
use crate::publish::{PublishRequest, Published};
use crate::AppState;

/// One listening port (seed 002's shape).
#[derive(Debug, Serialize)]
pub struct PortEntry {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    pub container_port: u16,
    pub proxy_url: String,
    /// Sandforge maps no host ports: a port is reached through
    /// `proxy_url` or a publish rule. Always null.
    pub host_port: Option<u16>,
}

fn entries(id: &str, ports: Vec<u16>, with_id: bool) -> Vec<PortEntry> {
    ports
        .into_iter()
        .map(|p| PortEntry {
            sandbox_id: with_id.then(|| id.to_string()),
            container_port: p,
            proxy_url: format!("/sandboxes/{id}/proxy/{p}/"),
            host_port: None,
        })
        .collect()
}

pub async fn ports(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<PortEntry>>, ApiError> {
    let agent = st.controller.agent(&caller.org, &id).await?;
    match agent.ports().await {
        Ok(p) => Ok(Json(entries(&id, p, false))),
        Err(e) => Err(st.controller.agent_failed(&id, e).await),
    }
}

/// `GET /ports`: every running sandbox of the caller's organization.
pub async fn all_ports(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<PortEntry>>, ApiError> {
    let mut out = vec![];
    for sb in st
        .controller
        .list(&caller.org, Some(sandforge_api::SandboxStatus::Running))?
    {
        if let Ok(agent) = st.controller.running_agent(&caller.org, &sb.id) {
            if let Ok(p) = agent.ports().await {
                out.extend(entries(&sb.id, p, true));
            }
        }
    }
    Ok(Json(out))
}

fn parse_port(p: &str) -> Result<u16, ApiError> {
    p.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ApiError::bad_request("port", "must be 1-65535"))
}

/// `ANY /sandboxes/{id}/proxy/{port}[/{*path}]`.
pub async fn proxy(
    State(st): State<AppState>,
    Path(params): Path<Vec<(String, String)>>,
    req: Request,
) -> Result<Response, ApiError> {
    let get = |k: &str| {
        params
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let (id, port, path) = (get("id"), parse_port(&get("port"))?, get("path"));
    let token = proxy::query_token(req.uri().query()).map(str::to_string);
    let (parts, body) = req.into_parts();
    let caller = caller_of_request(&st, &parts, token.as_deref())?;
    // Busy from before the wake until the response (or the upgraded
    // connection) ends: a long stream keeps the sandbox hot.
    st.controller.get(&caller.org, &id)?;
    let busy = st.controller.busy(&id);
    let agent = st.controller.agent(&caller.org, &id).await?;
    let target = proxy::target(&path, parts.uri.query());
    let origin = Origin::Api {
        token_in_url: token.is_some(),
    };
    proxy::forward(
        &agent,
        port,
        Request::from_parts(parts, body),
        &target,
        origin,
        busy,
    )
    .await
}

pub async fn publish(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<PublishRequest>,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(st.controller.publish(&caller.org, &id, req)?),
    ))
}

pub async fn list_published(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<Published>>, ApiError> {
    Ok(Json(st.controller.list_published(&caller.org, &id)?))
}

pub async fn unpublish(
    State(st): State<AppState>,
    caller: Caller,
    Path((id, port)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    st.controller
        .unpublish(&caller.org, &id, parse_port(&port)?)?;
    Ok(StatusCode::NO_CONTENT)
}

/// The publish listener: `{alias}.{publish_domain}` → the published port,
/// any path, no auth.
pub async fn published(State(st): State<AppState>, req: Request<Body>) -> Response {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let result = async {
        let rule = st.controller.rule_for_host(&host)?;
        let busy = st.controller.busy(&rule.sandbox_id);
        let agent = st.controller.agent_of(&rule.sandbox_id).await?;
        let target = req
            .uri()
            .path_and_query()
            .map_or("/".to_string(), |pq| pq.as_str().to_string());
        proxy::forward(&agent, rule.port, req, &target, Origin::Published, busy).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
