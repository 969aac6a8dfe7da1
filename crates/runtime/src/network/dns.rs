//! The resolver each networked sandbox talks to: a UDP DNS server on the
//! host end of the sandbox's link (its `/etc/resolv.conf` names it), one
//! task per sandbox, so the sandbox a query comes from is known without
//! trusting any address in the packet.
//!
//! Per query it applies the sandbox's current policy: a name matching
//! `blocked_domains`, or not matching a non-empty `allowed_domains`, gets
//! NXDOMAIN and is never resolved; names in the configured `dns_hosts`
//! are answered from there; everything else is forwarded to the upstream
//! resolver. With `allowed_domains`, the A records of an answer are
//! admitted into the sandbox's nftables set (for their TTL, at least a
//! minute) before the answer is sent, so the connection that follows gets
//! through while an address the sandbox hard-codes does not.
//!
//! Owns its socket and tasks; it must not reach the network on behalf of a
//! query the policy refuses. At most `MAX_INFLIGHT` queries per sandbox
//! are worked on at once; more are dropped (the client retries). TCP DNS
//! is not served.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use sandforge_api::network::domain_matches;
use sandforge_api::Egress;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use super::{nft, Lease, NetConfig};
use crate::error::{Result, RuntimeError};

pub const MAX_INFLIGHT: usize = 64;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
const MIN_ADMIT_SECS: u32 = 60;
const HOSTS_TTL: u32 = 60;

struct Ctx {
    cfg: NetConfig,
    lease: Lease,
    policy: Arc<RwLock<Egress>>,
}

/// Bind `ip:53` even before the address is configured (IP_FREEBIND): the
/// resolver is started before the sandbox's link exists.
fn bind(ip: Ipv4Addr) -> Result<UdpSocket> {
    use rustix::net::{sockopt, AddressFamily, SocketFlags, SocketType};
    let err = |e: std::io::Error| RuntimeError::Setup(format!("DNS socket on {ip}:53: {e}"));
    let fd = rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| err(e.into()))?;
    sockopt::set_ip_freebind(&fd, true).map_err(|e| err(e.into()))?;
    rustix::net::bind_v4(&fd, &SocketAddrV4::new(ip, 53)).map_err(|e| err(e.into()))?;
    UdpSocket::from_std(std::net::UdpSocket::from(fd)).map_err(err)
}

pub fn spawn(
    cfg: &NetConfig,
    lease: &Lease,
    policy: Arc<RwLock<Egress>>,
) -> Result<tokio::task::JoinHandle<()>> {
    let sock = Arc::new(bind(lease.host_ip)?);
    let ctx = Arc::new(Ctx {
        cfg: cfg.clone(),
        lease: lease.clone(),
        policy,
    });
    Ok(tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(MAX_INFLIGHT));
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let (q, sock, ctx) = (buf[..n].to_vec(), sock.clone(), ctx.clone());
            tokio::spawn(async move {
                if let Some(reply) = answer(&ctx, &q).await {
                    let _ = sock.send_to(&reply, peer).await;
                }
                drop(permit);
            });
        }
    }))
}

/// Whether the policy lets `name` be resolved.
pub fn name_allowed(p: &Egress, name: &str) -> bool {
    !domain_matches(&p.blocked_domains, name)
        && (p.allowed_domains.is_empty() || domain_matches(&p.allowed_domains, name))
}

fn reply(q: &Message, code: ResponseCode, answers: Vec<Record>) -> Option<Vec<u8>> {
    let mut r = Message::new();
    r.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(q.op_code())
        .set_recursion_desired(q.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    r.add_queries(q.queries().to_vec());
    r.add_answers(answers);
    r.to_vec().ok()
}

async fn admit(ctx: &Ctx, ips: &[(Ipv4Addr, u32)]) {
    if ips.is_empty() {
        return;
    }
    let ttl = ips
        .iter()
        .map(|(_, t)| *t)
        .max()
        .unwrap_or(0)
        .max(MIN_ADMIT_SECS);
    let addrs: Vec<Ipv4Addr> = ips.iter().map(|(ip, _)| *ip).collect();
    if let Err(e) = nft::apply(&nft::admit(&ctx.cfg, &ctx.lease, &addrs, ttl)).await {
        tracing::warn!(iface = %ctx.lease.iface, "admitting {addrs:?}: {e}");
    }
}

async fn answer(ctx: &Ctx, raw: &[u8]) -> Option<Vec<u8>> {
    let q = Message::from_vec(raw).ok()?;
    let query = q.queries().first()?.clone();
    let name = query
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let policy = ctx.policy.read().unwrap_or_else(|p| p.into_inner()).clone();
    if !name_allowed(&policy, &name) {
        tracing::debug!(iface = %ctx.lease.iface, %name, "DNS refused by policy");
        return reply(&q, ResponseCode::NXDomain, vec![]);
    }
    let filtering = !policy.allowed_domains.is_empty();
    if let Some(ip) = ctx.cfg.dns_hosts.get(&name) {
        let answers = if query.query_type() == RecordType::A {
            vec![Record::from_rdata(
                query.name().clone(),
                HOSTS_TTL,
                RData::A(A(*ip)),
            )]
        } else {
            vec![]
        };
        if filtering {
            admit(ctx, &[(*ip, HOSTS_TTL)]).await;
        }
        return reply(&q, ResponseCode::NoError, answers);
    }
    let Some(upstream) = ctx.cfg.dns_upstream else {
        return reply(&q, ResponseCode::ServFail, vec![]);
    };
    let resp = match forward(upstream, raw).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%name, "upstream DNS: {e}");
            return reply(&q, ResponseCode::ServFail, vec![]);
        }
    };
    if filtering {
        let parsed = Message::from_vec(&resp).ok()?;
        let ips: Vec<(Ipv4Addr, u32)> = parsed
            .answers()
            .iter()
            .filter_map(|r| match r.data() {
                Some(RData::A(a)) => Some((a.0, r.ttl())),
                _ => None,
            })
            .collect();
        admit(ctx, &ips).await;
    }
    Some(resp)
}

async fn forward(upstream: SocketAddr, raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let sock = UdpSocket::bind("0.0.0.0:0").await?;
    sock.connect(upstream).await?;
    sock.send(raw).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(UPSTREAM_TIMEOUT, sock.recv(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    buf.truncate(n);
    Ok(buf)
}

/// The first `nameserver` of a resolv.conf text, port 53.
pub fn upstream_from_resolv_conf(text: &str) -> Option<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_on_names() {
        let p = Egress {
            allowed_domains: vec!["allowed.test".into()],
            blocked_domains: vec!["bad.allowed.test".into()],
            ..Egress::default()
        };
        assert!(name_allowed(&p, "allowed.test"));
        assert!(name_allowed(&p, "www.allowed.test"));
        assert!(!name_allowed(&p, "bad.allowed.test"));
        assert!(!name_allowed(&p, "other.test"));
        assert!(name_allowed(&Egress::default(), "anything.example"));
    }

    #[test]
    fn resolv_conf() {
        let t = "# x\nsearch lan\nnameserver 10.255.255.53\nnameserver 1.1.1.1\n";
        assert_eq!(
            upstream_from_resolv_conf(t),
            Some("10.255.255.53:53".parse().unwrap())
        );
        assert_eq!(upstream_from_resolv_conf("search x\n"), None);
    }
}
