//! `ApiJson<T>`: the JSON body extractor of every endpoint. Unlike axum's
//! `Json`, its rejections are our JSON errors, they name the offending field
//! (via serde_path_to_error), an empty body means `{}` so that
//! `POST /v1/sandboxes` with no body creates a default sandbox, and curl's
//! default form content type is accepted (seed 002's examples rely on it).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest JSON body accepted (requests carry at most a 1 MiB stdin).
pub const MAX_JSON_BYTES: usize = 2 * 1024 * 1024;

pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let ct = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.to_ascii_lowercase());
        let req =
            req.map(|b| axum::body::Body::new(http_body_util::Limited::new(b, MAX_JSON_BYTES)));
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("body: {e} (max {MAX_JSON_BYTES} bytes)"),
            )
            .field("body")
        })?;
        let bytes = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            Bytes::from_static(b"{}")
        } else {
            bytes
        };
        if let Some(ct) = ct {
            // curl's `-d` labels a body form-urlencoded; seed 002's own
            // examples send JSON that way, so it is read as JSON too.
            let jsonish = ct.starts_with("application/json")
                || ct.contains("+json")
                || ct.starts_with("application/x-www-form-urlencoded");
            if !jsonish {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    format!("Content-Type must be application/json, got '{ct}'"),
                ));
            }
        }
        parse(&bytes).map(ApiJson)
    }
}

/// Parse a JSON object, naming the field at fault.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{')
        && serde_json::from_slice::<serde_json::Value>(bytes).is_ok()
    {
        return Err(ApiError::bad_request("body", "must be a JSON object"));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("body is not valid JSON: {inner}"),
            )
        } else if path == "." || path.is_empty() {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("body: {inner}"),
            )
        } else {
            ApiError::bad_request(&path, inner)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandforge_api::CreateSandbox;

    #[test]
    fn errors_name_the_field() {
        let e = parse::<CreateSandbox>(br#"{"memory_mb":"big"}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("memory_mb"));
        let e = parse::<CreateSandbox>(br#"{"mounts":[{"host_path":"/a","guest_path":1}]}"#)
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("mounts[0].guest_path"));
        let e = parse::<CreateSandbox>(br#"{"cpu": 1,"#).unwrap_err();
        assert_eq!(e.code, "invalid_json");
        let e = parse::<CreateSandbox>(br#"{"wat": 1}"#).unwrap_err();
        assert!(e.message.contains("wat"), "{}", e.message);
    }
}
