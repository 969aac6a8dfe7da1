//! Publish rules (seed 002): a sandbox port reachable without auth as
//! `http://{alias}.{publish_domain}` on the publish listener. The
//! controller's side: checking and generating aliases, storing rules,
//! finding the sandbox behind a host name. Rules vanish with their
//! sandbox. Must not forward traffic itself (`proxy` does).

use http::StatusCode;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::controller::Controller;
use crate::db::{PublishRule, Taken};
use crate::error::ApiError;

/// `POST /sandboxes/{id}/publish`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub port: u16,
    #[serde(default)]
    pub alias: Option<String>,
}

/// A rule as the API shows it.
#[derive(Debug, Serialize)]
pub struct Published {
    #[serde(flatten)]
    pub rule: PublishRule,
    pub url: String,
}

pub const MAX_ALIAS: usize = 63;

pub fn valid_alias(a: &str) -> bool {
    (1..=MAX_ALIAS).contains(&a.len())
        && a.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !a.starts_with('-')
        && !a.ends_with('-')
}

/// `<sandbox name, as a DNS label>-<6 random [a-z0-9]>`.
pub fn generate_alias(name: &str) -> String {
    let mut base: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    while base.contains("--") {
        base = base.replace("--", "-");
    }
    let mut base = base.trim_matches('-').to_string();
    base.truncate(MAX_ALIAS - 7);
    let base = base.trim_end_matches('-');
    let base = if base.is_empty() { "sandbox" } else { base };
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    let suffix: String = (0..6)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{base}-{suffix}")
}

impl Controller {
    fn published(&self, rule: PublishRule) -> Published {
        let listen_port = self
            .cfg
            .publish_listen
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .unwrap_or(80);
        let port = if listen_port == 80 {
            String::new()
        } else {
            format!(":{listen_port}")
        };
        let url = format!("http://{}.{}{port}", rule.alias, self.cfg.publish_domain);
        Published { rule, url }
    }

    pub fn publish(&self, org: &str, id: &str, req: PublishRequest) -> Result<Published, ApiError> {
        let row = self.get(org, id)?;
        if row.status == sandforge_api::SandboxStatus::Destroyed {
            return Err(crate::controller::not_running(&row));
        }
        if req.port == 0 {
            return Err(ApiError::bad_request("port", "must be 1-65535"));
        }
        let explicit = req.alias.is_some();
        let alias = match req.alias {
            Some(a) if !valid_alias(&a) => {
                return Err(ApiError::bad_request(
                    "alias",
                    "must be 1-63 characters of [a-z0-9-], not starting or ending with '-'",
                ))
            }
            Some(a) => a,
            None => generate_alias(&row.name),
        };
        let pid = format!("pub_{}", &generate_alias("x")[2..]);
        match self.db.insert_publish(&pid, id, req.port, &alias)? {
            Ok(rule) => Ok(self.published(rule)),
            Err(Taken::Port) => Err(ApiError::conflict(
                "already_published",
                format!("port {} of '{id}' is already published", req.port),
            )
            .field("port")),
            Err(Taken::Alias) if explicit => Err(ApiError::conflict(
                "alias_taken",
                format!("alias '{alias}' is taken"),
            )
            .field("alias")),
            // A generated alias collided (36^6 suffixes): one more try.
            Err(Taken::Alias) => {
                match self
                    .db
                    .insert_publish(&pid, id, req.port, &generate_alias(&row.name))?
                {
                    Ok(rule) => Ok(self.published(rule)),
                    Err(_) => Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "alias_taken",
                        "could not generate a free alias; pass one",
                    )),
                }
            }
        }
    }

    pub fn list_published(&self, org: &str, id: &str) -> Result<Vec<Published>, ApiError> {
        self.get(org, id)?;
        Ok(self
            .db
            .list_publish(id)?
            .into_iter()
            .map(|r| self.published(r))
            .collect())
    }

    pub fn unpublish(&self, org: &str, id: &str, port: u16) -> Result<(), ApiError> {
        self.get(org, id)?;
        if self.db.delete_publish(id, port)? {
            Ok(())
        } else {
            Err(ApiError::not_found("publish rule", &format!("{id}:{port}")))
        }
    }

    /// The rule behind a `Host` header of the publish listener.
    pub fn rule_for_host(&self, host: &str) -> Result<PublishRule, ApiError> {
        let host = host
            .rsplit_once(':')
            .map_or(host, |(h, _)| h)
            .to_ascii_lowercase();
        let alias = host
            .strip_suffix(&format!(".{}", self.cfg.publish_domain))
            .filter(|a| valid_alias(a))
            .ok_or_else(|| ApiError::not_found("published host", &host))?;
        self.db
            .publish_by_alias(alias)?
            .ok_or_else(|| ApiError::not_found("published host", &host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases() {
        let a = generate_alias("My Box_1");
        assert!(
            a.starts_with("my-box-1-") && a.len() == "my-box-1-".len() + 6,
            "{a}"
        );
        assert!(valid_alias(&a));
        assert!(valid_alias(&generate_alias("---")));
        assert!(valid_alias(&generate_alias(&"x".repeat(100))));
        assert!(
            !valid_alias("-x") && !valid_alias("UP") && !valid_alias("a.b") && !valid_alias("")
        );
    }
}
