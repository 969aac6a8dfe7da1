//! Image references and the plain-HTTP rule.

use oci_client::Reference;

use super::ImageError;

/// Parse `registry/repo[:tag][@sha256:<hex>]` (Docker's rules: no registry
/// means `docker.io`, no tag means `latest`). Only sha256 digests.
pub fn parse_reference(s: &str) -> Result<Reference, ImageError> {
    let s = s.trim();
    if s.is_empty() || s.len() > 1024 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ImageError::Reference(format!("{s:?}")));
    }
    let r: Reference = s
        .parse()
        .map_err(|e| ImageError::Reference(format!("{s:?}: {e}")))?;
    if let Some(d) = r.digest() {
        if !d.starts_with("sha256:") {
            return Err(ImageError::Reference(format!(
                "{s:?}: only sha256 digests are supported"
            )));
        }
    }
    Ok(r)
}

/// Whether a registry (`host[:port]`) is on the loopback interface: the only
/// registries spoken to over plain HTTP.
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        // [::1]:5000
        match rest.split_once(']') {
            Some((h, tail)) if tail.is_empty() || tail.starts_with(':') => h,
            _ => return false,
        }
    } else {
        match registry.rsplit_once(':') {
            Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
            Some(_) => registry, // a bare IPv6 address
            None => registry,
        }
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = parse_reference("localhost:5000/team/python:3.12").unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("localhost:5000", "team/python", Some("3.12"))
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let r = parse_reference(&format!("127.0.0.1:5000/x/y@{d}")).unwrap();
        assert_eq!((r.repository(), r.digest()), ("x/y", Some(d.as_str())));
        let r = parse_reference("debian").unwrap();
        assert_eq!(
            (r.resolve_registry(), r.repository(), r.tag()),
            ("index.docker.io", "library/debian", Some("latest"))
        );
        for bad in ["", "a b", "x/Y:1", "x@sha256:zz", "x:"] {
            assert!(parse_reference(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn only_loopback_is_plain_http() {
        for yes in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
            "::1",
            "LOCALHOST:1",
        ] {
            assert!(is_loopback_registry(yes), "{yes}");
        }
        for no in [
            "docker.io",
            "index.docker.io",
            "10.0.0.1:5000",
            "localhost.evil.com:5000",
            "127.0.0.1.nip.io",
            "[::2]:5000",
            "[::1]x",
            "ghcr.io",
        ] {
            assert!(!is_loopback_registry(no), "{no}");
        }
    }
}
