//! The nftables rules of the sandbox network, as `nft -f` scripts (built
//! by pure functions, unit-tested) applied atomically: each script is one
//! transaction, so a policy change never leaves a half-updated chain.
//!
//! One table, `inet <table>`. Sandbox links are the members of its set
//! `links` (added before a link exists, removed after it is gone), so the
//! rules never match an interface of the host's that merely looks alike:
//! - `input` (hook input): from a sandbox link only DNS to the sandbox's
//!   own resolver address (set `dns_ok` of interface . address) and replies
//!   to connections it made; everything else addressed to the host (the
//!   supervisor's API, every host address, other services) is dropped.
//! - `forward` (hook forward): nothing may open a connection into a
//!   sandbox (so sandboxes cannot reach each other); a sandbox's packets
//!   jump to its own chain `sb_<slot>` through the map `dispatch`; links
//!   in `links` without a chain are dropped.
//! - `sb_<slot>`: anti-spoofing (its own source address only), no IPv6,
//!   the always-denied destinations (link-local/metadata, loopback, the
//!   sandbox subnet, multicast, 0.0.0.0/8), `deny_cidrs`, then the policy:
//!   allow everything, or only `allow_cidrs` and the addresses its resolver
//!   admitted for allowed domains (set `dns_<slot>`, entries time out),
//!   restricted to `allow_ports` (TCP) when given.
//!
//! - `postrouting` (nat): masquerade the subnet towards every non-sandbox
//!   link.
//!
//! Owns this table only (and removes the `ip <table>_nat` of older layouts).
//! The resolvers' admissions into `dns_<slot>` are batched by `admit`.

use std::fmt::Write as _;
use std::process::Stdio;

use sandforge_api::{Cidr, Egress, EgressMode};
use tokio::io::AsyncWriteExt;

use super::{Lease, NetConfig};
use crate::error::{Result, RuntimeError};

/// Destinations no sandbox may reach, whatever its policy.
const ALWAYS_DENIED: [&str; 5] = [
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "255.255.255.255/32",
];

fn set_of<T: std::fmt::Display>(items: &[T]) -> String {
    let v: Vec<String> = items.iter().map(|i| i.to_string()).collect();
    format!("{{ {} }}", v.join(", "))
}

fn chain(lease: &Lease) -> String {
    format!("sb_{}", lease.slot)
}

pub(crate) fn dns_set(lease: &Lease) -> String {
    format!("dns_{}", lease.slot)
}

/// The rules of a sandbox's chain (without the chain header).
pub fn policy_rules(cfg: &NetConfig, lease: &Lease, e: &Egress) -> Vec<String> {
    let mut r = vec![
        format!("ip saddr != {} drop", lease.guest_ip),
        "meta nfproto ipv6 drop".to_string(),
        "ct state established,related accept".to_string(),
    ];
    let mut always: Vec<String> = ALWAYS_DENIED.iter().map(|s| s.to_string()).collect();
    always.push(cfg.subnet.to_string());
    r.push(format!("ip daddr {} drop", set_of(&always)));
    let deny: Vec<Cidr> = e.deny_cidrs.iter().filter_map(|c| Cidr::parse(c)).collect();
    if !deny.is_empty() {
        r.push(format!("ip daddr {} drop", set_of(&deny)));
    }
    if !e.denies_by_default() && e.mode == EgressMode::AllowAll {
        r.push("accept".into());
        return r;
    }
    let ports = if e.allow_ports.is_empty() {
        String::new()
    } else {
        format!(" tcp dport {}", set_of(&e.allow_ports))
    };
    let allow: Vec<Cidr> = e
        .allow_cidrs
        .iter()
        .filter_map(|c| Cidr::parse(c))
        .collect();
    if !allow.is_empty() {
        r.push(format!("ip daddr {}{ports} accept", set_of(&allow)));
    }
    if !e.allowed_domains.is_empty() {
        r.push(format!("ip daddr @{}{ports} accept", dns_set(lease)));
    }
    r.push("drop".into());
    r
}

fn sandbox_objects(cfg: &NetConfig, lease: &Lease, e: &Egress, out: &mut String) {
    let t = &cfg.table;
    let (c, s) = (chain(lease), dns_set(lease));
    let _ = writeln!(
        out,
        "add set inet {t} {s} {{ type ipv4_addr; flags timeout; }}"
    );
    let _ = writeln!(out, "add chain inet {t} {c}");
    let _ = writeln!(out, "flush chain inet {t} {c}");
    for rule in policy_rules(cfg, lease, e) {
        let _ = writeln!(out, "add rule inet {t} {c} {rule}");
    }
    let _ = writeln!(out, "add element inet {t} links {{ \"{}\" }}", lease.iface);
    let _ = writeln!(
        out,
        "add element inet {t} dispatch {{ \"{}\" : jump {c} }}",
        lease.iface
    );
    let _ = writeln!(
        out,
        "add element inet {t} dns_ok {{ \"{}\" . {} }}",
        lease.iface, lease.host_ip
    );
}

/// The whole configuration from scratch (daemon start, crash recovery):
/// whatever the tables held is replaced in the same transaction.
pub fn rebuild(cfg: &NetConfig, live: &[(Lease, Egress)]) -> String {
    let t = &cfg.table;
    let mut s = String::new();
    let _ = writeln!(s, "add table inet {t}");
    let _ = writeln!(s, "delete table inet {t}");
    // Tables of older versions of this layout.
    let _ = writeln!(s, "add table ip {t}_nat");
    let _ = writeln!(s, "delete table ip {t}_nat");
    let _ = writeln!(
        s,
        r#"table inet {t} {{
  set links {{ type ifname; }}
  map dispatch {{ type ifname : verdict; }}
  set dns_ok {{ type ifname . ipv4_addr; }}
  chain input {{
    type filter hook input priority filter - 10; policy accept;
    iifname @links ct state established,related accept
    iifname @links udp dport 53 iifname . ip daddr @dns_ok accept
    iifname @links drop
  }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    oifname @links ct state established,related accept
    oifname @links drop
    iifname @links iifname vmap @dispatch
    iifname @links drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {subnet} oifname != @links masquerade
  }}
}}"#,
        subnet = cfg.subnet
    );
    for (lease, e) in live {
        sandbox_objects(cfg, lease, e, &mut s);
    }
    s
}

/// A new sandbox's chain, set and map entries.
pub fn attach(cfg: &NetConfig, lease: &Lease, e: &Egress) -> String {
    let mut s = String::new();
    sandbox_objects(cfg, lease, e, &mut s);
    s
}

/// Replace a sandbox's rules; its admitted addresses stay.
pub fn update(cfg: &NetConfig, lease: &Lease, e: &Egress) -> String {
    let t = &cfg.table;
    let c = chain(lease);
    let mut s = format!("flush chain inet {t} {c}\n");
    for rule in policy_rules(cfg, lease, e) {
        let _ = writeln!(s, "add rule inet {t} {c} {rule}");
    }
    s
}

/// Remove a sandbox's objects. Each is first re-added (a no-op when it
/// exists) so that the deletes cannot fail on a half-attached sandbox.
pub fn detach(cfg: &NetConfig, lease: &Lease) -> String {
    let t = &cfg.table;
    let (c, set) = (chain(lease), dns_set(lease));
    let i = &lease.iface;
    format!(
        "add chain inet {t} {c}\n\
         add set inet {t} {set} {{ type ipv4_addr; flags timeout; }}\n\
         add element inet {t} links {{ \"{i}\" }}\n\
         add element inet {t} dispatch {{ \"{i}\" : jump {c} }}\n\
         add element inet {t} dns_ok {{ \"{i}\" . {h} }}\n\
         delete element inet {t} links {{ \"{i}\" }}\n\
         delete element inet {t} dispatch {{ \"{i}\" }}\n\
         delete element inet {t} dns_ok {{ \"{i}\" . {h} }}\n\
         delete chain inet {t} {c}\n\
         delete set inet {t} {set}\n",
        h = lease.host_ip
    )
}

/// Run one script as one transaction.
pub async fn apply(script: &str) -> Result<()> {
    let err = |m: String| RuntimeError::Command {
        tool: "nft".into(),
        message: m,
    };
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| err(format!("{e} (is the nftables package installed?)")))?;
    if let Some(mut w) = child.stdin.take() {
        w.write_all(script.as_bytes())
            .await
            .map_err(|e| err(e.to_string()))?;
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait_with_output())
        .await
        .map_err(|_| err("timed out".into()))?
        .map_err(|e| err(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NetConfig {
        super::super::test_config()
    }

    #[test]
    fn allow_all_accepts_after_the_fixed_denials() {
        let c = cfg();
        let l = c.lease("sb_abc", 3);
        let r = policy_rules(&c, &l, &Egress::default());
        assert_eq!(r[0], "ip saddr != 10.213.0.14 drop");
        assert!(r
            .iter()
            .any(|x| x.contains("169.254.0.0/16") && x.contains("10.213.0.0/16")));
        assert_eq!(r.last().unwrap(), "accept");
    }

    #[test]
    fn deny_all_with_cidrs_ports_and_domains() {
        let c = cfg();
        let l = c.lease("sb_abc", 0);
        let e = Egress {
            mode: EgressMode::DenyAll,
            allow_cidrs: vec!["203.0.113.0/24".into()],
            deny_cidrs: vec!["203.0.113.66".into()],
            allow_ports: vec![80, 443],
            allowed_domains: vec!["example.com".into()],
            ..Egress::default()
        };
        let r = policy_rules(&c, &l, &e);
        let deny = r
            .iter()
            .position(|x| x.contains("203.0.113.66/32"))
            .unwrap();
        let allow = r
            .iter()
            .position(|x| x == "ip daddr { 203.0.113.0/24 } tcp dport { 80, 443 } accept")
            .unwrap();
        assert!(deny < allow, "deny_cidrs must come first: {r:?}");
        assert!(r.contains(&"ip daddr @dns_0 tcp dport { 80, 443 } accept".to_string()));
        assert_eq!(r.last().unwrap(), "drop");
        // Allowed domains turn an allow_all policy into deny-by-default.
        let e = Egress {
            allowed_domains: vec!["example.com".into()],
            ..Egress::default()
        };
        assert_eq!(policy_rules(&c, &l, &e).last().unwrap(), "drop");
    }

    #[test]
    fn scripts_name_only_our_objects() {
        let c = cfg();
        let l = c.lease("sb_abc", 1);
        let full = rebuild(&c, &[(l.clone(), Egress::default())]);
        assert!(full.contains("delete table inet sandforge"));
        assert!(full.contains("oifname != @links masquerade"));
        assert!(!full.contains("sf*"), "no wildcard over host interfaces");
        assert!(full.contains("links { \"sfsbabc\" }"));
        assert!(full.contains("dispatch { \"sfsbabc\" : jump sb_1 }"));
        let d = detach(&c, &l);
        assert!(d.contains("delete chain inet sandforge sb_1"));
    }
}
