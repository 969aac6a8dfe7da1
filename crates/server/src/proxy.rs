//! Forwarding one HTTP request to a port inside a sandbox, through an
//! agent TCP tunnel (see `sandforge_runtime::tunnel`), for the proxy route
//! and the publish listener. The request is rewritten to target
//! `localhost:{port}` inside the sandbox: the path and query become the
//! request target, `Host` becomes `localhost:{port}`, and the caller's
//! `Authorization` header is never passed on. Bodies stream both ways;
//! `Upgrade` requests (WebSocket) are spliced byte for byte after the
//! `101`. One tunnel per request (no pooling). The caller's `hold` guard
//! (the sandbox's busy mark) lives as long as the response body or the
//! spliced connection, so a long stream or a WebSocket keeps the sandbox
//! busy for its whole life. Limits: request bodies up to
//! [`MAX_BODY`], and [`RESPONSE_TIMEOUT`] for the answer to start. Must not decide who may
//! reach what: callers check that first.

use axum::body::Body;
use axum::response::Response;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use sandforge_runtime::{AgentClient, RuntimeError};

use crate::error::ApiError;

fn is_upgrade(h: &http::HeaderMap) -> bool {
    h.get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"))
        && h.contains_key(header::UPGRADE)
}

/// Largest request body passed on (larger ones are cut, and fail).
pub const MAX_BODY: usize = 100 * 1024 * 1024;
/// How long the sandbox's server may take to start answering.
pub const RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

fn bad_gateway(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, "upstream_failed", message)
}

/// Send `req` to `localhost:{port}` in the sandbox as `target` (path and
/// query) and return the sandbox's answer; `hold` is dropped when the
/// answer's body (or the upgraded connection) ends.
pub async fn forward<G: Send + Sync + 'static>(
    agent: &AgentClient,
    port: u16,
    mut req: Request<Body>,
    target: &str,
    hold: G,
) -> Result<Response, ApiError> {
    let client_upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let io = agent.tcp(port).await.map_err(|e| match e {
        RuntimeError::AgentRefused { message, .. } => {
            ApiError::new(StatusCode::BAD_GATEWAY, "connection_refused", message)
        }
        other => ApiError::from(other),
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| bad_gateway(format!("talking HTTP to port {port}: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let (mut parts, body) = req.into_parts();
    parts.uri = target
        .parse()
        .map_err(|_| ApiError::bad_request("path", "not a valid request target"))?;
    parts.version = http::Version::HTTP_11;
    parts.headers.remove(header::AUTHORIZATION);
    parts.headers.insert(
        header::HOST,
        HeaderValue::from_str(&format!("localhost:{port}")).expect("valid header"),
    );
    let body = Body::new(http_body_util::Limited::new(body, MAX_BODY));
    let mut resp = tokio::time::timeout(
        RESPONSE_TIMEOUT,
        sender.send_request(Request::from_parts(parts, body)),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            format!("port {port} did not start answering within {RESPONSE_TIMEOUT:?}"),
        )
    })?
    .map_err(|e| bad_gateway(format!("port {port} did not answer: {e}")))?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client) = client_upgrade {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let _hold = hold;
                if let (Ok(c), Ok(u)) = (client.await, upstream.await) {
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                }
            });
            let (parts, body) = resp.into_parts();
            return Ok(Response::from_parts(parts, Body::new(body)));
        }
    }
    let (parts, body) = resp.into_parts();
    // The guard moves into the body: dropped with it, when the response is
    // sent or the client goes away.
    let body = body.map_frame(move |f| {
        let _ = &hold;
        f
    });
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// The path and query to send upstream: `path` (without its leading `/`)
/// and the query without our `token` parameter.
pub fn target(path: &str, query: Option<&str>) -> String {
    let rest: Vec<&str> = query
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty() && !kv.starts_with("token="))
        .collect();
    let path = format!("/{}", path.trim_start_matches('/'));
    if rest.is_empty() {
        path
    } else {
        format!("{path}?{}", rest.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_drop_only_our_token() {
        assert_eq!(target("a/b.txt", None), "/a/b.txt");
        assert_eq!(target("", Some("token=x")), "/");
        assert_eq!(target("/q", Some("a=1&token=t&b=2")), "/q?a=1&b=2");
    }
}
