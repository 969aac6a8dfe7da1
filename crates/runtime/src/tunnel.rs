//! Client side of the agent's ports and TCP tunnels: which TCP ports
//! listen in a sandbox, and a byte stream to `localhost:PORT` inside it,
//! carried by one HTTP/2 stream of the sandbox's agent connection (so it
//! works for offline sandboxes and VMs without a NIC). The stream is a
//! plain `AsyncRead + AsyncWrite` for whatever speaks over it (the
//! supervisor's HTTP proxy). Must not interpret the bytes.

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use sandforge_agent_proto::{routes, ListeningPort};
use tokio::io::{AsyncWriteExt, DuplexStream};

use crate::agent::{build, full_body, AgentClient, BoxError, MAX_ANSWER};
use crate::error::{Result, RuntimeError};
use crate::terminal::{refused, refused_body};

/// Buffer between the caller and the HTTP/2 stream, each way.
const BUFFER: usize = 64 * 1024;

impl AgentClient {
    pub async fn ports(&self) -> Result<Vec<u16>> {
        let req = build(Method::GET, routes::PORTS, full_body(Bytes::new()))?;
        let (status, body) = self.call(req, MAX_ANSWER).await?;
        if status != StatusCode::OK {
            return Err(refused_body(status, &body));
        }
        let list: Vec<ListeningPort> = serde_json::from_slice(&body)
            .map_err(|e| RuntimeError::AgentProtocol(e.to_string()))?;
        Ok(list.into_iter().map(|p| p.port).collect())
    }

    /// A connection to `localhost:port` inside the sandbox. A refused
    /// connection is `AgentRefused` with status 502.
    pub async fn tcp(&self, port: u16) -> Result<DuplexStream> {
        let (near, far) = tokio::io::duplex(BUFFER);
        let (far_rd, mut far_wr) = tokio::io::split(far);
        let outgoing = tokio_util::io::ReaderStream::new(far_rd);
        let body = StreamBody::new(futures_util::StreamExt::map(outgoing, |chunk| {
            chunk
                .map(hyper::body::Frame::data)
                .map_err(|e| Box::new(e) as BoxError)
        }))
        .boxed_unsync();
        let uri = format!("{}?port={port}", routes::TCP);
        let resp = self.request(build(Method::POST, &uri, body)?).await?;
        if resp.status() != StatusCode::OK {
            return Err(refused(resp.status(), resp).await);
        }
        let mut incoming = resp.into_body();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = incoming.frame().await {
                if let Ok(data) = frame.into_data() {
                    if far_wr.write_all(&data).await.is_err() {
                        return;
                    }
                }
            }
            let _ = far_wr.shutdown().await;
        });
        Ok(near)
    }
}
