//! The `user` of an exec or a terminal session, as the supervisor passes it
//! on: `name`, `uid`, `name:group`, `uid:gid` (and the mixed forms), the
//! shapes of an OCI image config's `User`. Only the syntax lives here; the
//! agent resolves names against the sandbox's own `/etc/passwd` and
//! `/etc/group`.

/// Longest accepted user spec (both parts and the colon).
pub const MAX_USER_SPEC: usize = 256;

/// A user or a group: a numeric id or a name to look up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ident {
    Id(u32),
    Name(String),
}

/// A parsed user spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    pub user: Ident,
    /// The primary group, when the spec names one (`user:group`).
    pub group: Option<Ident>,
}

fn ident(s: &str) -> Result<Ident, &'static str> {
    if s.is_empty() {
        return Err("a user or group must not be empty");
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        // -1 (u32::MAX) means "unchanged" to the set*id calls: never an id.
        return match s.parse::<u32>() {
            Ok(id) if id != u32::MAX => Ok(Ident::Id(id)),
            _ => Err("a numeric id must be below 4294967295"),
        };
    }
    if s.chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == ':')
    {
        return Err("a name must not contain spaces, colons or control characters");
    }
    Ok(Ident::Name(s.to_string()))
}

impl UserSpec {
    /// Parse `user` or `user:group`; `Err` says why not.
    pub fn parse(s: &str) -> Result<UserSpec, &'static str> {
        if s.len() > MAX_USER_SPEC {
            return Err("at most 256 bytes");
        }
        let (user, group) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        Ok(UserSpec {
            user: ident(user)?,
            group: group.map(ident).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_image_config_shapes() {
        let p = |s| UserSpec::parse(s);
        assert_eq!(
            p("user"),
            Ok(UserSpec {
                user: Ident::Name("user".into()),
                group: None
            })
        );
        assert_eq!(
            p("1000:1000"),
            Ok(UserSpec {
                user: Ident::Id(1000),
                group: Some(Ident::Id(1000))
            })
        );
        assert_eq!(
            p("1000:staff"),
            Ok(UserSpec {
                user: Ident::Id(1000),
                group: Some(Ident::Name("staff".into()))
            })
        );
        assert_eq!(
            p("0"),
            Ok(UserSpec {
                user: Ident::Id(0),
                group: None
            })
        );
        for bad in [
            "",
            ":",
            "user:",
            ":grp",
            "4294967295",
            "99999999999",
            "a b",
            "a\nb",
            "a:b:c",
        ] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
        assert!(p(&"x".repeat(257)).is_err());
    }
}
