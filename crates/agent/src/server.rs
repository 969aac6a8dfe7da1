//! Request routing.
//!
//! Owns: the shared [`Agent`] state, the mapping of (method, route) to a
//! handler, `GET /v1/info`, and turning handler errors into `AgentError`
//! responses (404 for unknown routes, 405 for wrong methods).
//!
//! Must not: do the work of a route itself (exec, files) or know about the
//! byte stream the HTTP/2 connection runs on.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use sandforge_agent_proto::{routes, AgentInfo, FileQuery, FEATURE_USER, PROTOCOL_VERSION};

use crate::reaper::Reaper;
use crate::reply::{self, ApiError, Body};
use crate::{exec, files, ports, query, rootfs, sessions, upload};

/// State shared by every connection and request.
pub struct Agent {
    pub reaper: Reaper,
    /// `O_PATH` fd of the agent's `/`, the base of every file operation.
    pub root: OwnedFd,
    /// Terminal sessions.
    pub sessions: crate::sessions::Sessions,
}

/// Serve one request; never fails (errors become JSON error responses).
pub async fn handle(req: Request<Incoming>, agent: Arc<Agent>) -> Response<Body> {
    route(req, agent)
        .await
        .unwrap_or_else(ApiError::into_response)
}

async fn route(req: Request<Incoming>, agent: Arc<Agent>) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    match req.uri().path() {
        routes::INFO => {
            allow(&method, &[Method::GET])?;
            let info = AgentInfo {
                proto: PROTOCOL_VERSION,
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                pid: std::process::id(),
                features: vec![FEATURE_USER.to_string()],
            };
            Ok(reply::json(StatusCode::OK, &info))
        }
        routes::EXEC => {
            allow(&method, &[Method::POST])?;
            exec::handle(req, agent).await
        }
        routes::FILES => {
            allow(&method, &[Method::GET, Method::HEAD, Method::PUT])?;
            let q: FileQuery = query::parse(req.uri().query())
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            if method == Method::GET {
                files::get(agent, q).await
            } else if method == Method::HEAD {
                files::head(agent, q).await
            } else {
                let len = req
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                upload::put(agent, q, len, req.into_body()).await
            }
        }
        routes::PORTS => {
            allow(&method, &[Method::GET])?;
            Ok(ports::list())
        }
        routes::ROOTFS => {
            allow(&method, &[Method::GET])?;
            rootfs::get(agent, req.uri().query()).await
        }
        routes::TCP => {
            allow(&method, &[Method::POST])?;
            ports::tunnel(req).await
        }
        routes::SESSIONS => {
            allow(&method, &[Method::GET, Method::POST])?;
            if method == Method::GET {
                Ok(reply::json(StatusCode::OK, &agent.sessions.list()))
            } else {
                sessions::create(req, &agent.sessions, &agent.reaper).await
            }
        }
        other => match other
            .strip_prefix(routes::SESSIONS)
            .and_then(|rest| rest.strip_prefix('/'))
            .and_then(|rest| rest.strip_suffix("/attach"))
        {
            Some(id) => {
                allow(&method, &[Method::POST])?;
                let id = id.to_string();
                sessions::attach(req, &agent.sessions, &id).await
            }
            None => Err(ApiError::not_found(format!("no route {other}"))),
        },
    }
}

fn allow(method: &Method, allowed: &[Method]) -> Result<(), ApiError> {
    if allowed.contains(method) {
        Ok(())
    } else {
        let names: Vec<&str> = allowed.iter().map(Method::as_str).collect();
        Err(ApiError::method_not_allowed(format!(
            "method {method} not allowed here (allowed: {})",
            names.join(", ")
        )))
    }
}
