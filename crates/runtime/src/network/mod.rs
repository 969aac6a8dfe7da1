//! Sandbox networking (`network: "nat"`), for both backends.
//!
//! Each networked sandbox gets one point-to-point link of its own (a veth
//! whose far end is the container's `eth0`, or the tap of a VM's
//! virtio-net), a /30 from the configured subnet (host end `.1`, sandbox
//! `.2`), a default route to the host end, NAT to the host's uplink, and
//! DNS through a resolver the supervisor runs on the host end. Links are
//! routed, not bridged: sandboxes share no layer-2 segment, and every
//! packet a sandbox sends passes the host's netfilter hooks keyed by the
//! interface it came in on, which the sandbox cannot forge.
//!
//! Owns: the links (`links`), the nftables tables (`nft`), and the
//! per-sandbox resolvers (`dns`), plus the reconciliation after a crash.
//! It must not touch interfaces or tables that do not carry its prefix or
//! table names, so several supervisors (tests) can share a host.

pub mod admit;
pub mod dns;
pub mod links;
pub mod nft;
pub mod tap;

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use sandforge_api::{Cidr, Egress};

use crate::error::{Result, RuntimeError};

/// Settings of the sandbox network.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Sandbox addresses come from here, a /30 each.
    pub subnet: Cidr,
    /// Interface name prefix (at most 4 characters).
    pub prefix: String,
    /// nftables table names: `inet <table>` and `ip <table>_nat`.
    pub table: String,
    /// Where the resolver forwards allowed queries.
    pub dns_upstream: Option<SocketAddr>,
    /// Names the resolver answers itself (lowercase, no trailing dot).
    pub dns_hosts: BTreeMap<String, Ipv4Addr>,
}

/// A sandbox's place on the network, derived from its slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub slot: u32,
    /// Host end of the link (`<prefix><11 chars of the id>`).
    pub iface: String,
    pub host_ip: Ipv4Addr,
    pub guest_ip: Ipv4Addr,
}

impl Lease {
    pub const PREFIX_LEN: u8 = 30;

    /// The guest's `/etc/resolv.conf`.
    pub fn resolv_conf(&self) -> String {
        format!(
            "nameserver {}\noptions timeout:2 attempts:2\n",
            self.host_ip
        )
    }
}

impl NetConfig {
    /// How many /30 slots the subnet holds.
    pub fn slots(&self) -> u32 {
        1u32 << (32 - self.subnet.len as u32).saturating_sub(2)
    }

    pub fn lease(&self, id: &str, slot: u32) -> Lease {
        let base = u32::from(self.subnet.addr) + slot * 4;
        let id: String = id.chars().filter(|c| *c != '_').collect();
        let keep = 12.min(15 - self.prefix.len());
        let tail = &id[id.len().saturating_sub(keep)..];
        Lease {
            slot,
            iface: format!("{}{}", self.prefix, tail),
            host_ip: Ipv4Addr::from(base + 1),
            guest_ip: Ipv4Addr::from(base + 2),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.prefix.is_empty()
            || self.prefix.len() > 4
            || !self.prefix.bytes().all(|b| b.is_ascii_lowercase())
        {
            return Err(RuntimeError::Setup(format!(
                "network prefix '{}': 1-4 lowercase letters",
                self.prefix
            )));
        }
        if !(8..=28).contains(&self.subnet.len) {
            return Err(RuntimeError::Setup(format!(
                "network subnet {}: the prefix length must be 8-28",
                self.subnet
            )));
        }
        Ok(())
    }
}

/// One attached sandbox.
struct Attached {
    lease: Lease,
    policy: Arc<RwLock<Egress>>,
    resolver: tokio::task::JoinHandle<()>,
}

/// The live network state of every networked sandbox.
pub struct Network {
    cfg: NetConfig,
    admitter: admit::Admitter,
    attached: Mutex<HashMap<String, Attached>>,
}

impl Network {
    /// Bring the host side to exactly `live` (after a start or a crash):
    /// rebuild the nftables tables, delete links of this prefix that no
    /// live sandbox owns, enable forwarding, and start the resolvers.
    pub async fn start(cfg: NetConfig, live: Vec<(String, Lease, Egress)>) -> Result<Self> {
        cfg.validate()?;
        links::overlapping_route(&cfg.subnet, &cfg.prefix).await?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| RuntimeError::io("write", "/proc/sys/net/ipv4/ip_forward", e))?;
        let entries: Vec<(Lease, Egress)> = live
            .iter()
            .map(|(_, l, e)| (l.clone(), e.clone()))
            .collect();
        nft::apply(&nft::rebuild(&cfg, &entries)).await?;
        let keep: Vec<&str> = live.iter().map(|(_, l, _)| l.iface.as_str()).collect();
        for stale in links::list(&cfg.prefix)? {
            if !keep.contains(&stale.as_str()) {
                tracing::info!(iface = %stale, "removing a link no sandbox owns");
                links::delete(&stale).await;
            }
        }
        let net = Network {
            admitter: admit::Admitter::spawn(cfg.table.clone()),
            cfg,
            attached: Mutex::new(HashMap::new()),
        };
        for (id, lease, egress) in live {
            net.start_resolver(&id, lease, egress)?;
        }
        Ok(net)
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    fn start_resolver(&self, id: &str, lease: Lease, egress: Egress) -> Result<()> {
        let policy = Arc::new(RwLock::new(egress));
        let resolver = dns::spawn(&self.cfg, &lease, policy.clone(), self.admitter.clone())?;
        let old = self
            .attached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id.to_string(),
                Attached {
                    lease,
                    policy,
                    resolver,
                },
            );
        if let Some(old) = old {
            old.resolver.abort();
        }
        Ok(())
    }

    /// Filter rules and resolver for a new sandbox, before its link exists
    /// (until then, and if this fails, its traffic is dropped).
    pub async fn attach(&self, id: &str, lease: &Lease, egress: &Egress) -> Result<()> {
        nft::apply(&nft::attach(&self.cfg, lease, egress)).await?;
        self.start_resolver(id, lease.clone(), egress.clone())
    }

    /// Replace a running sandbox's policy (atomically, in one transaction).
    pub async fn update(&self, id: &str, egress: &Egress) -> Result<()> {
        let (lease, policy) = {
            let map = self.attached.lock().unwrap_or_else(|p| p.into_inner());
            let a = map
                .get(id)
                .ok_or_else(|| RuntimeError::Setup(format!("{id} has no network")))?;
            (a.lease.clone(), a.policy.clone())
        };
        nft::apply(&nft::update(&self.cfg, &lease, egress)).await?;
        *policy.write().unwrap_or_else(|p| p.into_inner()) = egress.clone();
        Ok(())
    }

    /// Remove everything of a sandbox: resolver, rules, set, link.
    /// Idempotent.
    pub async fn detach(&self, id: &str, lease: &Lease) -> Result<()> {
        if let Some(a) = self
            .attached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
        {
            a.resolver.abort();
        }
        links::delete(&lease.iface).await;
        nft::apply(&nft::detach(&self.cfg, lease)).await
    }

    /// Host resources of a sandbox that are still present (leak checks).
    pub fn leftovers(&self, lease: &Lease) -> Vec<String> {
        let mut left = vec![];
        if PathBuf::from("/sys/class/net").join(&lease.iface).exists() {
            left.push(format!("link {}", lease.iface));
        }
        left
    }
}

/// The defaults, for unit tests of this module's pure parts.
#[cfg(test)]
pub(crate) fn test_config() -> NetConfig {
    NetConfig {
        subnet: Cidr::parse("10.213.0.0/16").unwrap(),
        prefix: "sf".into(),
        table: "sandforge".into(),
        dns_upstream: None,
        dns_hosts: BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NetConfig {
        test_config()
    }

    #[test]
    fn leases_are_disjoint_slash_30s() {
        let c = cfg();
        assert_eq!(c.slots(), 16384);
        let a = c.lease("sb_5qj9nhdpv3q8", 0);
        assert_eq!(a.iface, "sf5qj9nhdpv3q8");
        assert!(a.iface.len() <= 15);
        assert_eq!(a.host_ip, Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(a.guest_ip, Ipv4Addr::new(10, 213, 0, 2));
        let b = c.lease("sb_x", 70);
        assert_eq!(b.host_ip, Ipv4Addr::new(10, 213, 1, 25));
        assert!(a.resolv_conf().contains("nameserver 10.213.0.1"));
        let mut bad = cfg();
        bad.prefix = "toolong".into();
        assert!(bad.validate().is_err());
    }
}
