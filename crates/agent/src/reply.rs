//! Response building shared by every route.
//!
//! Owns: the response body type ([`Body`]), the error type every handler
//! returns ([`ApiError`], rendered as a JSON `AgentError` body), JSON and empty
//! replies, and [`channel`], a body fed by a task through a bounded channel
//! (used for streamed exec output and file downloads, so that a slow client
//! applies back-pressure and a dropped stream is noticed by the producer).
//!
//! Must not: know about routes, processes or files.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use sandforge_agent_proto::AgentError;
use serde::Serialize;
use tokio::sync::mpsc;

/// The body type of every agent response.
pub type Body = BoxBody<Bytes, io::Error>;

/// Sending half of a [`channel`] body. An `Err` item aborts the stream (the
/// client sees a reset instead of a silently short body).
pub type BodySender = mpsc::Sender<io::Result<Bytes>>;

/// A failed request: HTTP status plus the stable `AgentError` code.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn invalid_path(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_path", message)
    }
    pub fn path_escape(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "path_escape", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn is_directory(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "is_directory", message)
    }
    pub fn not_directory(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "not_directory", message)
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "bad_request", message)
    }
    /// The sandbox's disk is full (ENOSPC, EDQUOT): its `disk_mb`.
    pub fn no_space(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "no_space", message)
    }
    pub fn io(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "io", message)
    }

    /// Render as a JSON `AgentError` response.
    pub fn into_response(self) -> Response<Body> {
        let body = AgentError {
            code: self.code.to_string(),
            message: self.message,
        };
        json(self.status, &body)
    }
}

/// A JSON response.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(value).expect("response types serialize");
    let mut resp = Response::new(full(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A response with no body.
pub fn empty(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp
}

/// A body holding `bytes`.
pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A body fed through a bounded channel of `capacity` chunks. The body ends
/// when every sender is dropped; the senders see `closed()` once the client
/// has gone (hyper drops the body when the stream is reset).
pub fn channel(capacity: usize) -> (BodySender, Body) {
    let (tx, rx) = mpsc::channel(capacity);
    (tx, ChannelBody { rx }.boxed())
}

struct ChannelBody {
    rx: mpsc::Receiver<io::Result<Bytes>>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|item| item.map(|r| r.map(http_body::Frame::data)))
    }
}
