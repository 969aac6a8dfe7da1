//! The sandbox's TCP ports: which ones listen (read from the kernel's
//! `/proc/net/tcp` and `tcp6` of the sandbox's network namespace), and
//! tunnels to them. A tunnel is one HTTP/2 stream: the request body is
//! written to a fresh TCP connection to `localhost:PORT` inside the
//! sandbox, and what that connection sends back is the response body. So
//! the supervisor reaches a sandbox's services through the agent channel,
//! with no network device needed. Owns nothing else; must not listen on
//! anything itself.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use sandforge_agent_proto::ListeningPort;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::reply::{self, ApiError, Body};

/// Listening TCP ports from `/proc/net/tcp`-format text (state `0A`).
pub fn parse_listening(text: &str) -> Vec<u16> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let local = f.nth(1)?;
            let state = f.nth(1)?;
            (state == "0A").then_some(())?;
            u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()
        })
        .collect()
}

/// `GET /v1/ports`.
pub fn list() -> Response<Body> {
    let mut ports = BTreeSet::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(f) {
            ports.extend(parse_listening(&text));
        }
    }
    let list: Vec<ListeningPort> = ports
        .into_iter()
        .map(|port| ListeningPort { port })
        .collect();
    reply::json(StatusCode::OK, &list)
}

/// `POST /v1/tcp?port=N`.
pub async fn tunnel(req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let port: u16 = req
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("port="))
        .and_then(|p| p.parse().ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| ApiError::bad_request("want ?port=1-65535"))?;
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let stream = match tokio::net::TcpStream::connect(v4).await {
        Ok(s) => s,
        Err(_) => tokio::net::TcpStream::connect(v6).await.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "connection_refused",
                format!("nothing accepts connections on port {port} in the sandbox: {e}"),
            )
        })?,
    };
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut incoming = req.into_body();
    tokio::spawn(async move {
        while let Some(Ok(frame)) = incoming.frame().await {
            if let Ok(data) = frame.into_data() {
                if wr.write_all(&data).await.is_err() {
                    return;
                }
            }
        }
        let _ = wr.shutdown().await;
    });
    let (tx, body) = reply::channel(16);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_ports_from_proc() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:A1B2 0100007F:1F40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(parse_listening(t), vec![8000]);
        assert_eq!(parse_listening(""), Vec::<u16>::new());
    }
}
