//! HTTP client for the Sandforge API: base URL, bearer token, error bodies.
//!
//! Every request goes through [`Client::send`], which turns connection
//! failures into a message naming the server URL and non-2xx responses into
//! an [`ApiError`] carrying the server's `code` and `message`.

use std::fmt;

use anyhow::{anyhow, bail, Context, Result};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use sandforge_api::ErrorBody;
use serde::de::DeserializeOwned;

/// Default server address (`SANDFORGE_URL`).
pub const DEFAULT_URL: &str = "http://127.0.0.1:8585";

/// Characters left as they are in a query value or path segment: RFC 3986
/// unreserved ones. `+` is escaped so form decoding never reads it as space.
const QUERY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes a query value (keeps `/` readable).
pub fn query_value(s: &str) -> String {
    utf8_percent_encode(s, QUERY).to_string()
}

/// The API path of one sandbox, `/v1/sandboxes/{id}`, plus `suffix`.
pub fn sandbox_path(id: &str, suffix: &str) -> String {
    format!("/v1/sandboxes/{}{suffix}", utf8_percent_encode(id, SEGMENT))
}

/// A non-2xx answer from the server.
#[derive(Debug)]
pub struct ApiError {
    pub code: String,
    pub message: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(url: &str, token: Option<String>) -> Result<Self> {
        let parsed =
            reqwest::Url::parse(url).with_context(|| format!("invalid server URL {url:?}"))?;
        if parsed.scheme() != "http" {
            bail!(
                "unsupported server URL {url:?}: sandforge speaks plain http (e.g. {DEFAULT_URL})"
            );
        }
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            base: url.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
        })
    }

    /// The server base URL, for messages.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The API token, when one is set.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// A request to `path` (which starts with `/`), with the bearer token.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let rb = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// Sends a request; `Ok` only for a 2xx response.
    pub async fn send(&self, rb: RequestBuilder) -> Result<Response> {
        let resp = rb.send().await.map_err(|e| self.transport_error(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(self.api_error(resp).await.into())
    }

    /// Sends a request and decodes its JSON body.
    pub async fn json<T: DeserializeOwned>(&self, rb: RequestBuilder) -> Result<T> {
        let resp = self.send(rb).await?;
        self.decode(resp).await
    }

    /// Decodes the JSON body of a successful response.
    pub async fn decode<T: DeserializeOwned>(&self, resp: Response) -> Result<T> {
        let bytes = resp.bytes().await.map_err(|e| self.transport_error(e))?;
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "unexpected response from {}: {}",
                self.base,
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            )
        })
    }

    /// Explains a failure to reach the server or to read its answer.
    pub fn transport_error(&self, e: reqwest::Error) -> anyhow::Error {
        let cause = root_cause(&e);
        if e.is_connect() {
            anyhow!(
                "cannot connect to the sandforge server at {}: {cause} \
                 (is `sandforge serve` running? set SANDFORGE_URL or --url)",
                self.base
            )
        } else if e.is_timeout() {
            anyhow!("request to {} timed out", self.base)
        } else if e.is_body() || e.is_decode() {
            anyhow!(
                "connection to {} lost while reading the response: {cause}",
                self.base
            )
        } else {
            anyhow!("request to {} failed: {cause}", self.base)
        }
    }

    async fn api_error(&self, resp: Response) -> ApiError {
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        let (code, mut message) = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(b) => (b.error.code, b.error.message),
            Err(_) => {
                let text = String::from_utf8_lossy(&body).trim().to_string();
                let reason = status.canonical_reason().unwrap_or("error").to_string();
                (
                    format!("http_{}", status.as_u16()),
                    if text.is_empty() { reason } else { text },
                )
            }
        };
        if status == StatusCode::UNAUTHORIZED && self.token.is_none() {
            message.push_str(" (no token given: set SANDFORGE_TOKEN or pass --token)");
        }
        ApiError { code, message }
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding() {
        assert_eq!(query_value("/a b/c+d&e=f"), "/a%20b/c%2Bd%26e%3Df");
        assert_eq!(sandbox_path("sb_1", "/exec"), "/v1/sandboxes/sb_1/exec");
        assert_eq!(sandbox_path("a/b", ""), "/v1/sandboxes/a%2Fb");
    }

    #[test]
    fn rejects_non_http_urls() {
        assert!(Client::new("https://x", None).is_err());
        assert!(Client::new("not a url", None).is_err());
        let c = Client::new("http://127.0.0.1:1/", Some(String::new())).unwrap();
        assert_eq!(c.base(), "http://127.0.0.1:1");
        assert!(c.token.is_none());
    }
}
