//! The resolver each networked sandbox talks to: a UDP DNS server on the
//! host end of the sandbox's link (its `/etc/resolv.conf` names it), one
//! task per sandbox, so the sandbox a query comes from is known without
//! trusting any address in the packet.
//!
//! Per query it applies the sandbox's current policy: a name matching
//! `blocked_domains`, or not matching a non-empty `allowed_domains`, gets
//! NXDOMAIN and is never resolved; names in the configured `dns_hosts`
//! are answered from there; under `deny_all` without `allowed_domains`
//! nothing else is resolved (REFUSED); everything else is forwarded to the
//! upstream resolver. With `allowed_domains`, the A records of an answer
//! are admitted into the sandbox's nftables set (for their TTL, at least a
//! minute; batched with every other sandbox's by `admit`, and skipped for
//! addresses still admitted for a while) before the answer is sent, so the
//! connection that follows gets through while an address the sandbox
//! hard-codes does not.
//!
//! A query is a standard query with exactly one question, or it is refused
//! (FORMERR, NOTIMP) and nothing is forwarded; what goes upstream is a
//! fresh query built from that one question (and the EDNS payload size),
//! never the sandbox's bytes, so no other section carries anything out.
//!
//! Owns its socket and tasks; it must not reach the network on behalf of a
//! query the policy refuses. Each sandbox's resolver takes [`RATE_PER_SEC`]
//! queries a second (bursts of [`BURST`]) and works on at most
//! [`MAX_INFLIGHT`] at once; beyond either, queries are dropped unanswered
//! (the client retries). TCP DNS is not served.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use sandforge_api::network::domain_matches;
use sandforge_api::{Egress, EgressMode};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use super::admit::Admitter;
use super::{nft, Lease, NetConfig};
use crate::error::{Result, RuntimeError};

pub const MAX_INFLIGHT: usize = 64;
/// Sustained queries a second per sandbox.
pub const RATE_PER_SEC: f64 = 50.0;
/// Queries a sandbox may send at once after a quiet spell.
pub const BURST: f64 = 100.0;
/// An address still admitted for at least this long is not admitted again.
const READMIT_MARGIN: Duration = Duration::from_secs(30);
/// Admitted addresses remembered per sandbox (expired ones are forgotten
/// first).
const MAX_REMEMBERED: usize = 4096;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
const MIN_ADMIT_SECS: u32 = 60;
const HOSTS_TTL: u32 = 60;

struct Ctx {
    cfg: NetConfig,
    lease: Lease,
    policy: Arc<RwLock<Egress>>,
    admitter: Admitter,
    /// Addresses in the sandbox's set and when they expire there.
    admitted: Mutex<HashMap<Ipv4Addr, Instant>>,
}

/// A token bucket: `rate` tokens a second, at most `burst` saved.
struct Bucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Bucket {
        Bucket {
            tokens: burst,
            last: Instant::now(),
            rate,
            burst,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
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
    admitter: Admitter,
) -> Result<tokio::task::JoinHandle<()>> {
    let sock = Arc::new(bind(lease.host_ip)?);
    let ctx = Arc::new(Ctx {
        cfg: cfg.clone(),
        lease: lease.clone(),
        policy,
        admitter,
        admitted: Mutex::new(HashMap::new()),
    });
    Ok(tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(MAX_INFLIGHT));
        let mut bucket = Bucket::new(RATE_PER_SEC, BURST);
        let (mut dropped, mut told) = (0u64, Instant::now());
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let now = Instant::now();
            let permit = match slots.clone().try_acquire_owned() {
                Ok(p) if bucket.take(now) => Some(p),
                _ => None,
            };
            let Some(permit) = permit else {
                dropped += 1;
                if now.duration_since(told) >= Duration::from_secs(10) {
                    tracing::warn!(iface = %ctx.lease.iface, dropped, "DNS queries over the rate limit dropped");
                    (dropped, told) = (0, now);
                }
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

/// A refusal that echoes no question (a malformed query's are not sent
/// back).
fn reply_without_questions(q: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut r = Message::new();
    r.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(q.op_code())
        .set_response_code(code);
    r.to_vec().ok()
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

/// Admit `ips` into the sandbox's set before the answer naming them is
/// sent; addresses admitted for a while yet are skipped.
async fn admit(ctx: &Ctx, ips: &[(Ipv4Addr, u32)]) {
    let now = Instant::now();
    let (fresh, ttl) = {
        let admitted = ctx.admitted.lock().unwrap_or_else(|p| p.into_inner());
        let fresh: Vec<Ipv4Addr> = ips
            .iter()
            .filter(|(ip, _)| {
                admitted
                    .get(ip)
                    .is_none_or(|until| until.saturating_duration_since(now) < READMIT_MARGIN)
            })
            .map(|(ip, _)| *ip)
            .collect();
        let ttl = ips
            .iter()
            .map(|(_, t)| *t)
            .max()
            .unwrap_or(0)
            .max(MIN_ADMIT_SECS);
        (fresh, ttl)
    };
    if fresh.is_empty() {
        return;
    }
    let set = nft::dns_set(&ctx.lease);
    if ctx.admitter.admit(set, fresh.clone(), ttl).await {
        let until = now + Duration::from_secs(ttl.into());
        let mut admitted = ctx.admitted.lock().unwrap_or_else(|p| p.into_inner());
        if admitted.len() + fresh.len() > MAX_REMEMBERED {
            admitted.retain(|_, t| *t > now);
        }
        if admitted.len() + fresh.len() <= MAX_REMEMBERED {
            for ip in fresh {
                admitted.insert(ip, until);
            }
        }
    } else {
        tracing::warn!(iface = %ctx.lease.iface, "admitting {fresh:?} failed");
    }
}

/// Whether the policy resolves anything beyond `dns_hosts`: not under
/// `deny_all` without allowed domains.
pub fn forwards(p: &Egress) -> bool {
    !(p.mode == EgressMode::DenyAll && p.allowed_domains.is_empty())
}

/// The query sent upstream: the one question, the client's id and RD bit,
/// and its EDNS payload size; nothing else of the client's packet.
fn upstream_query(q: &Message) -> Option<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(q.id())
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(q.recursion_desired())
        .set_checking_disabled(q.checking_disabled());
    m.add_query(q.queries().first()?.clone());
    if let Some(e) = q.extensions() {
        let mut edns = Edns::new();
        edns.set_max_payload(e.max_payload().clamp(512, 4096));
        m.set_edns(edns);
    }
    m.to_vec().ok()
}

async fn answer(ctx: &Ctx, raw: &[u8]) -> Option<Vec<u8>> {
    let q = Message::from_vec(raw).ok()?;
    if q.message_type() != MessageType::Query {
        return None;
    }
    if q.op_code() != OpCode::Query {
        return reply(&q, ResponseCode::NotImp, vec![]);
    }
    if q.queries().len() != 1 {
        tracing::debug!(iface = %ctx.lease.iface, n = q.queries().len(), "DNS query refused: not one question");
        return reply_without_questions(&q, ResponseCode::FormErr);
    }
    let query = q.queries()[0].clone();
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
    if !forwards(&policy) {
        tracing::debug!(iface = %ctx.lease.iface, %name, "DNS refused: deny_all without domains");
        return reply(&q, ResponseCode::Refused, vec![]);
    }
    let Some(upstream) = ctx.cfg.dns_upstream else {
        return reply(&q, ResponseCode::ServFail, vec![]);
    };
    let clean = upstream_query(&q)?;
    let resp = match forward(upstream, &clean).await {
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
    fn bucket_bursts_then_paces() {
        let t0 = Instant::now();
        let mut b = Bucket::new(50.0, 100.0);
        let taken = (0..1000).filter(|_| b.take(t0)).count();
        assert_eq!(taken, 100);
        let t1 = t0 + Duration::from_secs(1);
        let taken = (0..1000).filter(|_| b.take(t1)).count();
        assert_eq!(taken, 50);
    }

    #[test]
    fn deny_all_without_domains_forwards_nothing() {
        let mut p = Egress {
            mode: EgressMode::DenyAll,
            ..Egress::default()
        };
        assert!(!forwards(&p));
        p.allowed_domains = vec!["a.test".into()];
        assert!(forwards(&p));
        assert!(forwards(&Egress::default()));
    }

    #[test]
    fn only_the_question_goes_upstream() {
        use hickory_proto::op::Query;
        use hickory_proto::rr::Name;
        let mut q = Message::new();
        q.set_id(7).set_recursion_desired(true);
        q.add_query(Query::query(
            Name::from_ascii("a.allowed.test.").unwrap(),
            RecordType::A,
        ));
        q.add_additional(Record::from_rdata(
            Name::from_ascii("exfil.evil.test.").unwrap(),
            1,
            RData::A(A(Ipv4Addr::LOCALHOST)),
        ));
        let out = upstream_query(&q).unwrap();
        assert!(!String::from_utf8_lossy(&out).contains("exfil"));
        let m = Message::from_vec(&out).unwrap();
        assert_eq!((m.id(), m.queries().len()), (7, 1));
        assert!(m.additionals().is_empty());
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
