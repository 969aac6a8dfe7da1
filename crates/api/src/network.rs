//! Network shapes: the mode (`offline` | `nat`), the egress policy of seed
//! 001 with seed 003's domain lists, seed 003's `network_policy` spelling,
//! and their validation. Pure: knows nothing of interfaces or nftables.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::{limits, Invalid};

/// Network mode of a sandbox.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// Loopback only (a VM has no network device at all).
    Offline,
    /// Its own interface, a private address, NAT to the host's uplink, DNS
    /// through the supervisor's resolver, filtered by the egress policy.
    Nat,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum EgressMode {
    #[default]
    AllowAll,
    DenyAll,
}

/// Outbound policy (seed 001), plus seed 003's domain lists.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Egress {
    pub mode: EgressMode,
    /// With `deny_all`: destinations that are allowed.
    #[serde(default)]
    pub allow_cidrs: Vec<String>,
    /// Always blocked, evaluated before any allow.
    #[serde(default)]
    pub deny_cidrs: Vec<String>,
    /// Restrict `allow_cidrs` (and allowed domains) to these TCP ports.
    #[serde(default)]
    pub allow_ports: Vec<u16>,
    /// When not empty, only these names (and their subdomains) resolve, and
    /// only the addresses they resolved to are reachable (besides
    /// `allow_cidrs`), whatever `mode` says.
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    /// Names (and subdomains) the resolver refuses (DNS level only).
    #[serde(default)]
    pub blocked_domains: Vec<String>,
}

/// Seed 003's `network_policy`: `enabled: false` is no filtering.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    #[serde(default)]
    pub blocked_domains: Vec<String>,
}

impl From<NetworkPolicy> for Egress {
    fn from(p: NetworkPolicy) -> Self {
        if !p.enabled {
            return Egress::default();
        }
        Egress {
            mode: if p.allowed_domains.is_empty() {
                EgressMode::AllowAll
            } else {
                EgressMode::DenyAll
            },
            allowed_domains: p.allowed_domains,
            blocked_domains: p.blocked_domains,
            ..Egress::default()
        }
    }
}

/// The policy a body asks for through either spelling (`egress`, seed
/// 001; `network_policy`, seed 003), validated; both at once is an error.
pub fn chosen_egress(
    egress: Option<Egress>,
    network_policy: Option<NetworkPolicy>,
) -> Result<Option<Egress>, Invalid> {
    let e = match (egress, network_policy) {
        (Some(_), Some(_)) => {
            return Err(Invalid::new(
                "network_policy",
                "egress and network_policy are two spellings of one setting; give one",
            ))
        }
        (Some(e), None) => Some(e),
        (None, p) => p.map(Egress::from),
    };
    if let Some(e) = &e {
        e.validate("egress")?;
    }
    Ok(e)
}

/// An IPv4 network `a.b.c.d/len` (a bare address is a /32), normalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().ok()?),
            None => (s, 32),
        };
        if l > 32 || l.to_string() != s.split_once('/').map_or("32", |x| x.1) {
            return None;
        }
        let addr: Ipv4Addr = a.parse().ok()?;
        let mask = if l == 0 { 0 } else { u32::MAX << (32 - l) };
        Some(Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            len: l,
        })
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - self.len)
        };
        u32::from(ip) & mask == u32::from(self.addr)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A DNS name pattern: `example.com` (and its subdomains) or
/// `*.example.com` (subdomains only); lowercase, 1-253 bytes.
pub fn valid_domain(d: &str) -> bool {
    let name = d.strip_prefix("*.").unwrap_or(d);
    !name.is_empty()
        && d.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Whether `name` (a query name, any case, trailing dot allowed) matches
/// one of the patterns.
pub fn domain_matches(patterns: &[String], name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    patterns.iter().any(|p| match p.strip_prefix("*.") {
        Some(base) => name.ends_with(&format!(".{base}")),
        None => name == *p || name.ends_with(&format!(".{p}")),
    })
}

impl Egress {
    /// Check every field; `field` is the body's name for it (`egress`).
    pub fn validate(&self, field: &str) -> Result<(), Invalid> {
        let lists = [
            ("allow_cidrs", &self.allow_cidrs),
            ("deny_cidrs", &self.deny_cidrs),
        ];
        for (name, list) in lists {
            if list.len() > limits::MAX_EGRESS_ENTRIES {
                return Err(Invalid::new(
                    format!("{field}.{name}"),
                    format!("at most {} entries", limits::MAX_EGRESS_ENTRIES),
                ));
            }
            for (i, c) in list.iter().enumerate() {
                if Cidr::parse(c).is_none() {
                    return Err(Invalid::new(
                        format!("{field}.{name}[{i}]"),
                        format!("'{c}' is not an IPv4 address or CIDR (a.b.c.d/len)"),
                    ));
                }
            }
        }
        if self.allow_ports.len() > limits::MAX_EGRESS_ENTRIES {
            return Err(Invalid::new(
                format!("{field}.allow_ports"),
                format!("at most {} entries", limits::MAX_EGRESS_ENTRIES),
            ));
        }
        if let Some(i) = self.allow_ports.iter().position(|p| *p == 0) {
            return Err(Invalid::new(
                format!("{field}.allow_ports[{i}]"),
                "ports are 1-65535",
            ));
        }
        let domains = [
            ("allowed_domains", &self.allowed_domains),
            ("blocked_domains", &self.blocked_domains),
        ];
        for (name, list) in domains {
            if list.len() > limits::MAX_EGRESS_ENTRIES {
                return Err(Invalid::new(
                    format!("{field}.{name}"),
                    format!("at most {} entries", limits::MAX_EGRESS_ENTRIES),
                ));
            }
            for (i, d) in list.iter().enumerate() {
                if !valid_domain(d) {
                    return Err(Invalid::new(
                        format!("{field}.{name}[{i}]"),
                        format!("'{d}' is not a lowercase DNS name (or *.name)"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether addresses outside `allow_cidrs` and the resolved allowed
    /// domains are dropped.
    pub fn denies_by_default(&self) -> bool {
        self.mode == EgressMode::DenyAll || !self.allowed_domains.is_empty()
    }
}

/// `PATCH /v1/sandboxes/{id}`: the mutable properties.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PatchSandbox {
    #[serde(default)]
    pub egress: Option<Egress>,
    #[serde(default)]
    pub network_policy: Option<NetworkPolicy>,
    /// Exempt from (or again subject to) the thermal manager.
    #[serde(default)]
    pub keep_hot: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.1.2.3/8").unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains("10.9.9.9".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert_eq!(Cidr::parse("1.2.3.4").unwrap().to_string(), "1.2.3.4/32");
        assert_eq!(Cidr::parse("0.0.0.0/0").unwrap().len, 0);
        for bad in [
            "1.2.3.4/33",
            "1.2.3/24",
            "x",
            "1.2.3.4/",
            "1.2.3.4/08",
            "::1/128",
        ] {
            assert!(Cidr::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn policy_validation_names_the_field() {
        let e = Egress {
            allow_cidrs: vec!["10.0.0.0/8".into(), "nope".into()],
            ..Egress::default()
        };
        assert_eq!(
            e.validate("egress").unwrap_err().field,
            "egress.allow_cidrs[1]"
        );
        let e = Egress {
            allow_ports: vec![80, 0],
            ..Egress::default()
        };
        assert_eq!(
            e.validate("egress").unwrap_err().field,
            "egress.allow_ports[1]"
        );
        let e = Egress {
            allowed_domains: vec!["Bad_Name".into()],
            ..Egress::default()
        };
        assert_eq!(
            e.validate("egress").unwrap_err().field,
            "egress.allowed_domains[0]"
        );
        assert!(serde_json::from_str::<Egress>(r#"{"mode":"sometimes"}"#).is_err());
        assert!(serde_json::from_str::<Egress>(r#"{"allow_ports":[70000]}"#).is_err());
    }

    #[test]
    fn domains() {
        let p = vec!["example.com".to_string(), "*.corp.test".to_string()];
        assert!(domain_matches(&p, "example.com."));
        assert!(domain_matches(&p, "API.Example.com"));
        assert!(!domain_matches(&p, "badexample.com"));
        assert!(domain_matches(&p, "a.corp.test"));
        assert!(!domain_matches(&p, "corp.test"));
        assert!(valid_domain("*.x.y") && valid_domain("a-b.c") && !valid_domain("-a.b"));
        assert!(!valid_domain("") && !valid_domain("a..b"));
    }

    #[test]
    fn seed_003_policy_maps_to_egress() {
        let p = NetworkPolicy {
            enabled: true,
            allowed_domains: vec!["api.github.com".into()],
            blocked_domains: vec![],
        };
        let e = Egress::from(p);
        assert!(e.denies_by_default());
        assert_eq!(Egress::from(NetworkPolicy::default()), Egress::default());
    }
}
