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
//!
//! Also owns what a sandbox's answer may do to the origin it is served on
//! ([`Origin`]). On the API origin (the proxy route) the sandbox is a
//! guest on the daemon's own host and port: the request loses the
//! browser's `Cookie` and the `token` query parameter (also inside a
//! `Referer`); the answer loses `Set-Cookie`, `Set-Cookie2` and
//! `Clear-Site-Data` and gains `Content-Security-Policy: sandbox ...`
//! (an opaque origin: no access to the API origin's cookies or storage;
//! scripts only when the URL holds no token, since a script can read
//! `location.href`), `X-Content-Type-Options: nosniff` and
//! `Referrer-Policy: no-referrer`. The publish listener is the sandbox's
//! own origin (one host name per alias): everything passes unchanged.

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

/// The origin a forwarded answer is served on, which decides how much of
/// it the browser may trust.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The API listener (`/sandboxes/{id}/proxy/{port}/...`). `token_in_url`:
    /// the request's query carried a `token`, so the page's own URL holds
    /// a secret and no script may run in it.
    Api { token_in_url: bool },
    /// The publish listener: the sandbox's own host name.
    Published,
}

/// The CSP of a page on the API origin whose URL holds no token: scripts
/// run, but in an opaque origin (no `allow-same-origin`), so they reach
/// neither the API origin's cookies and storage nor its responses.
pub const CSP_SCRIPTS: &str =
    "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads";
/// The CSP of a page on the API origin reached with `?token=`: no scripts
/// (they could read the token from `location.href`).
pub const CSP_NO_SCRIPTS: &str = "sandbox allow-forms allow-popups allow-modals allow-downloads";

/// Request headers a sandbox never sees on the API origin.
fn confine_request(origin: Origin, headers: &mut http::HeaderMap) {
    if origin == Origin::Published {
        return;
    }
    headers.remove(header::COOKIE);
    let referer = headers
        .get(header::REFERER)
        .and_then(|v| v.to_str().ok())
        .map(strip_token_from_url);
    match referer.and_then(|r| HeaderValue::from_str(&r).ok()) {
        Some(r) => {
            headers.insert(header::REFERER, r);
        }
        None => {
            headers.remove(header::REFERER);
        }
    }
}

/// What a sandbox's answer may not do on the API origin, and the headers
/// that confine its page there.
fn confine_response(origin: Origin, headers: &mut http::HeaderMap) {
    let Origin::Api { token_in_url } = origin else {
        return;
    };
    headers.remove(header::SET_COOKIE);
    headers.remove("set-cookie2");
    headers.remove("clear-site-data");
    // Appended: a page's own policy still applies, and the browser enforces
    // every policy it is given.
    headers.append(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(if token_in_url {
            CSP_NO_SCRIPTS
        } else {
            CSP_SCRIPTS
        }),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

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
    origin: Origin,
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
    confine_request(origin, &mut parts.headers);
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
            let (mut parts, body) = resp.into_parts();
            confine_response(origin, &mut parts.headers);
            return Ok(Response::from_parts(parts, Body::new(body)));
        }
    }
    let (mut parts, body) = resp.into_parts();
    confine_response(origin, &mut parts.headers);
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
    with_query(
        format!("/{}", path.trim_start_matches('/')),
        query.unwrap_or(""),
    )
}

/// The `token` value of a query (the first, as authentication reads it).
pub fn query_token(query: Option<&str>) -> Option<&str> {
    query?.split('&').find_map(|kv| kv.strip_prefix("token="))
}

/// `base` with the parameters of `query` but `token`, in their order.
fn with_query(base: String, query: &str) -> String {
    let rest: Vec<&str> = query
        .split('&')
        .filter(|kv| !kv.is_empty() && !kv.starts_with("token="))
        .collect();
    if rest.is_empty() {
        base
    } else {
        format!("{base}?{}", rest.join("&"))
    }
}

/// A URL (a `Referer`) without its `token` query parameter or fragment.
fn strip_token_from_url(url: &str) -> String {
    let url = url.split_once('#').map_or(url, |(u, _)| u);
    match url.split_once('?') {
        Some((base, query)) => with_query(base.to_string(), query),
        None => url.to_string(),
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
        assert_eq!(
            target("q", Some("token=a&x&token=b&tokens=c")),
            "/q?x&tokens=c"
        );
        assert_eq!(query_token(Some("a=1&token=t&token=u")), Some("t"));
        assert_eq!(query_token(Some("tokens=1")), None);
        assert_eq!(
            strip_token_from_url("http://h/p/?a=1&token=t&b#frag"),
            "http://h/p/?a=1&b"
        );
        assert_eq!(strip_token_from_url("http://h/p?token=t"), "http://h/p");
        assert_eq!(strip_token_from_url("http://h/p"), "http://h/p");
    }

    #[test]
    fn the_api_origin_confines_pages_and_the_publish_origin_does_not() {
        let mut req = http::HeaderMap::new();
        req.insert(header::COOKIE, HeaderValue::from_static("s=1"));
        req.insert(
            header::REFERER,
            HeaderValue::from_static("http://h/x?token=t"),
        );
        let mut published = req.clone();
        confine_request(Origin::Published, &mut published);
        assert_eq!(published, req);
        confine_request(Origin::Api { token_in_url: true }, &mut req);
        assert!(req.get(header::COOKIE).is_none());
        assert_eq!(req[header::REFERER], "http://h/x");

        let mut resp = http::HeaderMap::new();
        resp.append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
        resp.append(header::SET_COOKIE, HeaderValue::from_static("b=1"));
        resp.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("img-src *"),
        );
        let mut published = resp.clone();
        confine_response(Origin::Published, &mut published);
        assert_eq!(published, resp);
        let mut with_token = resp.clone();
        confine_response(Origin::Api { token_in_url: true }, &mut with_token);
        confine_response(
            Origin::Api {
                token_in_url: false,
            },
            &mut resp,
        );
        for (h, csp) in [(with_token, CSP_NO_SCRIPTS), (resp, CSP_SCRIPTS)] {
            assert!(h.get(header::SET_COOKIE).is_none());
            let csps: Vec<_> = h.get_all(header::CONTENT_SECURITY_POLICY).iter().collect();
            assert_eq!(csps, ["img-src *", csp]);
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
        }
        assert!(!CSP_SCRIPTS.contains("allow-same-origin"));
        assert!(!CSP_NO_SCRIPTS.contains("allow-scripts"));
    }
}
