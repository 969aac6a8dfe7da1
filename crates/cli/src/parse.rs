//! Pure parsing of command-line values: `K=V` pairs, `HOST:GUEST[:ro]`
//! mounts, `ID:/path` copy locations, octal modes and isolation names.
//!
//! Every function here is a plain `&str -> Result<T, String>` so clap can use
//! it as a value parser and tests need no I/O.

use std::collections::BTreeMap;

use sandforge_api::{Isolation, Mount};

/// `KEY=VALUE`; the value may be empty and may itself contain `=`.
pub fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Collects repeated `K=V` flags into a map; a later key wins.
pub fn into_map(pairs: Vec<(String, String)>) -> BTreeMap<String, String> {
    pairs.into_iter().collect()
}

/// `HOST:GUEST[:ro|:rw]`, split docker-style at the first `:`.
pub fn mount(s: &str) -> Result<Mount, String> {
    let (rest, read_only) = if let Some(r) = s.strip_suffix(":ro") {
        (r, true)
    } else if let Some(r) = s.strip_suffix(":rw") {
        (r, false)
    } else {
        (s, false)
    };
    match rest.split_once(':') {
        Some((host, guest)) if !host.is_empty() && !guest.is_empty() => Ok(Mount {
            host_path: host.to_string(),
            guest_path: guest.to_string(),
            read_only,
        }),
        _ => Err(format!("expected HOST:GUEST[:ro], got {s:?}")),
    }
}

/// `container` or `microvm`.
pub fn isolation(s: &str) -> Result<Isolation, String> {
    match s {
        "container" => Ok(Isolation::Container),
        "microvm" => Ok(Isolation::Microvm),
        _ => Err(format!("expected container or microvm, got {s:?}")),
    }
}

/// An octal file mode such as `0755` or `644` (at most `07777`).
pub fn mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if !digits.is_empty() && m <= 0o7777 => Ok(m),
        _ => Err(format!("expected an octal mode such as 0755, got {s:?}")),
    }
}

/// One side of `sandforge cp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `-`: stdin when it is the source, stdout when it is the destination.
    Stdio,
    Local(String),
    Remote {
        id: String,
        path: String,
    },
}

/// Splits a `cp` operand. `ID:/abs/path` is remote when ID is made of
/// `[A-Za-z0-9._-]`; anything else (`./a:/b`, `/tmp/x`) is a local path.
pub fn location(s: &str) -> Location {
    if s == "-" {
        return Location::Stdio;
    }
    if let Some((id, path)) = s.split_once(':') {
        let id_ok = !id.is_empty()
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if id_ok && path.starts_with('/') {
            return Location::Remote {
                id: id.to_string(),
                path: path.to_string(),
            };
        }
    }
    Location::Local(s.to_string())
}

/// The last component of a `/`-separated path, if it has one.
pub fn basename(path: &str) -> Option<&str> {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|b| !b.is_empty() && *b != "." && *b != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values() {
        assert_eq!(key_value("A=1").unwrap(), ("A".into(), "1".into()));
        assert_eq!(key_value("A=").unwrap(), ("A".into(), "".into()));
        assert_eq!(key_value("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(key_value("A").is_err());
        assert!(key_value("=x").is_err());
        let m = into_map(vec![("A".into(), "1".into()), ("A".into(), "2".into())]);
        assert_eq!(m["A"], "2");
    }

    #[test]
    fn mounts() {
        let m = mount("/src:/work").unwrap();
        assert_eq!(
            (m.host_path.as_str(), m.guest_path.as_str(), m.read_only),
            ("/src", "/work", false)
        );
        assert!(mount("/src:/work:ro").unwrap().read_only);
        assert!(!mount("/src:/work:rw").unwrap().read_only);
        assert_eq!(mount("./rel:/w").unwrap().host_path, "./rel");
        assert!(mount("/src").is_err());
        assert!(mount(":/w").is_err());
        assert!(mount("/src:").is_err());
        assert!(mount("/src:ro").is_err());
    }

    #[test]
    fn locations() {
        assert_eq!(location("-"), Location::Stdio);
        assert_eq!(
            location("sb_1a:/etc/hosts"),
            Location::Remote {
                id: "sb_1a".into(),
                path: "/etc/hosts".into()
            }
        );
        assert_eq!(
            location("dev.box-1:/a:b"),
            Location::Remote {
                id: "dev.box-1".into(),
                path: "/a:b".into()
            }
        );
        assert_eq!(location("/tmp/x"), Location::Local("/tmp/x".into()));
        assert_eq!(location("./a:/b"), Location::Local("./a:/b".into()));
        assert_eq!(location("a:b"), Location::Local("a:b".into()));
        assert_eq!(location(":/b"), Location::Local(":/b".into()));
    }

    #[test]
    fn modes_isolation_basename() {
        assert_eq!(mode("0755").unwrap(), 0o755);
        assert_eq!(mode("644").unwrap(), 0o644);
        assert_eq!(mode("0o600").unwrap(), 0o600);
        assert!(mode("0800").is_err());
        assert!(mode("17777").is_err());
        assert!(mode("").is_err());
        assert_eq!(isolation("microvm").unwrap(), Isolation::Microvm);
        assert!(isolation("vm").is_err());
        assert_eq!(basename("/a/b.txt"), Some("b.txt"));
        assert_eq!(basename("/a/dir/"), Some("dir"));
        assert_eq!(basename("/"), None);
    }
}
