//! `/sandboxes/{id}/files?path=`: GET (bytes, truncation, `ls=true`), HEAD
//! (size, mode, is-dir), PUT (atomic write, Content-Length required, at most
//! 100 MiB). Paths are checked here for an early 400 and again by the agent,
//! which also refuses magic links; bodies stream straight through.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use sandforge_agent_proto::{self as proto, AgentError, FileQuery};
use sandforge_runtime::agent::{self, BoxError, ReqBody};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;

type Params = Result<Query<HashMap<String, String>>, QueryRejection>;

fn num(q: &HashMap<String, String>, key: &str, min: u64) -> Result<Option<u64>, ApiError> {
    match q.get(key) {
        None => Ok(None),
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n >= min => Ok(Some(n)),
            _ => Err(ApiError::bad_request(
                key,
                format!("must be an integer >= {min}"),
            )),
        },
    }
}

fn parse_query(params: Params, method: &Method) -> Result<FileQuery, ApiError> {
    let Query(q) = params.map_err(|e| ApiError::bad_request("query", e.body_text()))?;
    let allowed: &[&str] = match *method {
        Method::PUT => &["path", "mode"],
        Method::HEAD => &["path"],
        _ => &["path", "offset", "limit", "max_bytes", "ls"],
    };
    if let Some(k) = q.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::bad_request(
            k,
            format!("unknown query parameter for {method}"),
        ));
    }
    let path = q
        .get("path")
        .cloned()
        .ok_or_else(|| ApiError::bad_request("path", "is required"))?;
    proto::validate_guest_path(&path).map_err(|e| ApiError::bad_request("path", e))?;
    let ls = match q.get("ls").map(String::as_str) {
        None | Some("false") | Some("0") => None,
        Some("true") | Some("1") => Some(true),
        Some(_) => return Err(ApiError::bad_request("ls", "must be true or false")),
    };
    if let Some(m) = q.get("mode") {
        if proto::parse_mode(m).is_none() {
            return Err(ApiError::bad_request(
                "mode",
                "must be octal permission bits such as 0644",
            ));
        }
    }
    Ok(FileQuery {
        path,
        offset: num(&q, "offset", 1)?,
        limit: num(&q, "limit", 1)?,
        max_bytes: num(&q, "max_bytes", 1)?,
        ls,
        mode: q.get("mode").cloned(),
    })
}

/// Turn an agent error answer into ours (same status and code; an agent
/// 5xx becomes 502 since the fault is past our edge).
async fn agent_error(resp: http::Response<hyper::body::Incoming>) -> ApiError {
    let status = resp.status();
    let body = tokio::time::timeout(
        agent::CALL_TIMEOUT,
        agent::read_answer(resp, agent::MAX_ERROR_ANSWER),
    )
    .await
    .ok()
    .and_then(|r| r.ok())
    .unwrap_or_default();
    let e: AgentError = serde_json::from_slice(&body).unwrap_or(AgentError {
        code: "io".into(),
        message: String::from_utf8_lossy(&body).into_owned(),
    });
    let code: &'static str = match e.code.as_str() {
        "invalid_path" => "invalid_path",
        "path_escape" => "path_escape",
        "not_found" => "not_found",
        "is_directory" => "is_directory",
        "not_directory" => "not_directory",
        "too_large" => "too_large",
        "permission_denied" => "permission_denied",
        "bad_request" => "invalid_request",
        // The sandbox's disk is full (its `disk_mb`).
        "no_space" => "limit",
        _ => "agent_io",
    };
    let status = if status.is_server_error() {
        StatusCode::BAD_GATEWAY
    } else {
        status
    };
    let field = matches!(
        code,
        "invalid_path" | "path_escape" | "is_directory" | "not_directory"
    )
    .then_some("path");
    let err = ApiError::new(status, code, e.message);
    match field {
        Some(f) => err.field(f),
        None => err,
    }
}

async fn call(
    st: &AppState,
    caller: &Caller,
    id: &str,
    method: Method,
    q: &FileQuery,
    body: Option<ReqBody>,
) -> Result<http::Response<hyper::body::Incoming>, ApiError> {
    let agent = st.controller.agent(&caller.org, id).await?;
    let resp = match agent.files(method, q, body).await {
        Ok(r) => r,
        Err(e) => return Err(st.controller.agent_failed(id, e).await),
    };
    if resp.status().is_success() {
        Ok(resp)
    } else {
        Err(agent_error(resp).await)
    }
}

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap, names: &[&'static str]) {
    for n in names {
        if let Some(v) = from.get(*n) {
            to.insert(*n, v.clone());
        }
    }
}

pub async fn get(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    params: Params,
) -> Result<Response, ApiError> {
    let q = parse_query(params, &Method::GET)?;
    let resp = call(&st, &caller, &id, Method::GET, &q, None).await?;
    let (parts, body) = resp.into_parts();
    let mut out = Response::new(Body::new(body));
    let ct = if q.ls == Some(true) {
        "application/json"
    } else {
        "application/octet-stream"
    };
    out.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    copy_headers(
        &parts.headers,
        out.headers_mut(),
        &[proto::HDR_FILE_SIZE, proto::HDR_TRUNCATED, "content-length"],
    );
    Ok(out)
}

pub async fn head(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    params: Params,
) -> Result<Response, ApiError> {
    let q = parse_query(params, &Method::HEAD)?;
    let resp = call(&st, &caller, &id, Method::HEAD, &q, None).await?;
    let mut out = StatusCode::OK.into_response();
    copy_headers(
        resp.headers(),
        out.headers_mut(),
        &[
            proto::HDR_FILE_SIZE,
            proto::HDR_FILE_MODE,
            proto::HDR_FILE_ISDIR,
        ],
    );
    Ok(out)
}

pub async fn put(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    params: Params,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let q = parse_query(params, &Method::PUT)?;
    let chunked = headers
        .get(header::TRANSFER_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let len = match (len, chunked) {
        (Some(l), false) => l,
        _ => {
            return Err(ApiError::new(
                StatusCode::LENGTH_REQUIRED,
                "length_required",
                "Content-Length header is required (chunked uploads are refused)",
            )
            .field("Content-Length"))
        }
    };
    if len > proto::MAX_FILE_BYTES {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "too_large",
            format!(
                "body: {len} bytes exceeds the {} byte (100 MiB) limit",
                proto::MAX_FILE_BYTES
            ),
        )
        .field("body"));
    }
    let body: ReqBody = body.map_err(|e| Box::new(e) as BoxError).boxed_unsync();
    call(&st, &caller, &id, Method::PUT, &q, Some(body)).await?;
    Ok(StatusCode::NO_CONTENT)
}
