//! Lifecycle shapes (seeds 001 and 002): ephemeral sandboxes with a
//! `timeout` after which they are destroyed, persistent ones with an
//! `idle_timeout` after which they are suspended, `keep_hot`, keepalive,
//! and the duration syntax (`30s`, `5m`, `1h`, `1h30m`; at most 24 h).
//! Pure: no clocks beyond what callers pass in.

use serde::{Deserialize, Serialize};

use crate::Invalid;

/// The longest `timeout` / `idle_timeout`.
pub const MAX_DURATION_SECS: u64 = 24 * 3600;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Ephemeral,
    #[default]
    Persistent,
}

/// `30s`, `5m`, `1h`, `1h30m`, `90` (seconds): 1 s to 24 h.
pub fn parse_duration(field: &str, s: &str) -> Result<u64, Invalid> {
    let bad = || {
        Invalid::new(
            field,
            format!("'{s}' is not a duration like 30s, 5m, 1h or 1h30m (1s to 24h)"),
        )
    };
    if s.is_empty() || s.len() > 32 {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut saw_unit = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let mult = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(bad()),
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        total = total.saturating_add(n.saturating_mul(mult));
        num.clear();
        saw_unit = true;
    }
    if !num.is_empty() {
        if saw_unit {
            return Err(bad());
        }
        total = num.parse().map_err(|_| bad())?;
    }
    if total == 0 || total > MAX_DURATION_SECS {
        return Err(bad());
    }
    Ok(total)
}

/// The lifecycle part of a create, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Lifecycle {
    pub mode: Mode,
    /// Ephemeral: seconds from create (or the last keepalive) to destroy.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Persistent: seconds of idleness before it is suspended.
    #[serde(default)]
    pub idle_timeout_secs: Option<u64>,
    /// Exempt from suspension by the thermal manager.
    #[serde(default)]
    pub keep_hot: bool,
}

impl Lifecycle {
    pub fn validate(
        mode: Option<Mode>,
        timeout: Option<&str>,
        idle_timeout: Option<&str>,
        keep_hot: Option<bool>,
    ) -> Result<Lifecycle, Invalid> {
        let mode = mode.unwrap_or(if timeout.is_some() {
            Mode::Ephemeral
        } else {
            Mode::Persistent
        });
        let timeout_secs = timeout.map(|t| parse_duration("timeout", t)).transpose()?;
        let idle_timeout_secs = idle_timeout
            .map(|t| parse_duration("idle_timeout", t))
            .transpose()?;
        match mode {
            Mode::Ephemeral if idle_timeout_secs.is_some() => Err(Invalid::new(
                "idle_timeout",
                "applies to persistent sandboxes (an ephemeral one has a timeout)",
            )),
            Mode::Ephemeral if timeout_secs.is_none() => Err(Invalid::new(
                "timeout",
                "an ephemeral sandbox needs a timeout (e.g. \"30m\")",
            )),
            Mode::Persistent if timeout_secs.is_some() => Err(Invalid::new(
                "timeout",
                "applies to ephemeral sandboxes (a persistent one may have an idle_timeout)",
            )),
            _ => Ok(Lifecycle {
                mode,
                timeout_secs,
                idle_timeout_secs,
                keep_hot: keep_hot.unwrap_or(false),
            }),
        }
    }
}

/// `POST /v1/sandboxes/{id}/keepalive`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Keepalive {
    /// A new timeout from now; default: the sandbox's own.
    #[serde(default)]
    pub timeout: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (s, secs) in [
            ("30s", 30),
            ("5m", 300),
            ("1h", 3600),
            ("1h30m", 5400),
            ("90", 90),
            ("24h", 86400),
        ] {
            assert_eq!(parse_duration("t", s).unwrap(), secs, "{s}");
        }
        for bad in ["", "0s", "25h", "5x", "m", "1h30", "-5m", "1.5h"] {
            assert!(parse_duration("t", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn modes_and_their_fields() {
        let l = Lifecycle::validate(None, Some("5m"), None, None).unwrap();
        assert_eq!((l.mode, l.timeout_secs), (Mode::Ephemeral, Some(300)));
        let l = Lifecycle::validate(Some(Mode::Persistent), None, Some("1h"), Some(true)).unwrap();
        assert_eq!((l.idle_timeout_secs, l.keep_hot), (Some(3600), true));
        let e = Lifecycle::validate(Some(Mode::Ephemeral), None, None, None).unwrap_err();
        assert_eq!(e.field, "timeout");
        let e = Lifecycle::validate(Some(Mode::Persistent), Some("5m"), None, None).unwrap_err();
        assert_eq!(e.field, "timeout");
        let e =
            Lifecycle::validate(Some(Mode::Ephemeral), Some("5m"), Some("1m"), None).unwrap_err();
        assert_eq!(e.field, "idle_timeout");
        assert_eq!(
            Lifecycle::validate(None, None, None, None).unwrap(),
            Lifecycle::default()
        );
    }
}
