//! API errors: every failure leaves the server as a status plus
//! `{"error":{"code","message","field"?}}`. Owns the mapping from internal
//! errors (validation, runtime, database) to those responses.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use sandforge_api::{ErrorBody, ErrorDetail, Invalid};
use sandforge_runtime::RuntimeError;

use crate::ServerError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    pub fn field(mut self, f: impl Into<String>) -> Self {
        self.field = Some(f.into());
        self
    }

    pub fn bad_request(field: &str, message: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{field}: {message}"),
        )
        .field(field)
    }

    pub fn unauthorized(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} '{id}' not found"),
        )
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// The request asks for sandbox networking (`field`: `network`,
    /// `egress` or `network_policy`) on a daemon running without it.
    pub fn network_unavailable(field: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "network_unavailable",
            format!(
                "{field}: sandbox networking is not available on this host (see the supervisor's log); only offline sandboxes can be made"
            ),
        )
        .field(field)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::bad_request(&e.field, &e.message)
    }
}

impl From<ServerError> for ApiError {
    fn from(e: ServerError) -> Self {
        tracing::error!("server error: {e}");
        ApiError::internal(e.to_string())
    }
}

impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> Self {
        match e {
            RuntimeError::TemplateNotFound(name) => ApiError::new(
                StatusCode::NOT_FOUND,
                "template_not_found",
                format!("template: '{name}' not found"),
            )
            .field("template"),
            RuntimeError::AgentRefused {
                status,
                code,
                message,
            } => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
                // Codes the agent may send, as static strings for the body.
                let (code, field) = match code.as_str() {
                    "bad_request" => ("invalid_request", None),
                    "not_found" => ("not_found", None),
                    "session_exists" => ("session_exists", None),
                    "too_many_sessions" => ("too_many_sessions", None),
                    "connection_refused" => ("connection_refused", None),
                    // The sandbox's disk is full (its `disk_mb`).
                    "no_space" => ("limit", None),
                    // The `user` (the request's or the template's) is not
                    // in the sandbox's /etc/passwd or /etc/group.
                    "unknown_user" => ("invalid_request", Some("user")),
                    // A sandbox older than `user` was asked for one.
                    "agent_outdated" => ("agent_outdated", Some("user")),
                    _ => ("agent_refused", None),
                };
                match field {
                    Some(f) => ApiError::new(status, code, format!("{f}: {message}")).field(f),
                    None => ApiError::new(status, code, message),
                }
            }
            RuntimeError::HostPath(e) => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("mounts: {e}"))
                    .field("mounts")
            }
            RuntimeError::AgentUnavailable(_) | RuntimeError::AgentTimeout(_) => {
                ApiError::new(StatusCode::BAD_GATEWAY, "agent_unavailable", e.to_string())
            }
            other => {
                tracing::error!("runtime error: {other}");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "runtime_error",
                    other.to_string(),
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
                field: self.field,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// Fallback for unknown routes.
pub async fn not_found_route(uri: http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {}", uri.path()),
    )
}

/// Fallback for a known route with the wrong method.
pub async fn method_not_allowed(method: http::Method, uri: http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}
