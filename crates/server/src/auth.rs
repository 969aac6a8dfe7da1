//! Bearer-token authentication. Tokens (`sf_` + 40 hex digits) are shown
//! once and stored only as SHA-256 hashes; each belongs to one organization.
//! Owns token minting, hashing and the [`Caller`] extractor; must not decide
//! what a caller may touch beyond naming its organization.

use axum::extract::FromRequestParts;
use http::request::Parts;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::AppState;

pub const DEFAULT_ORG: &str = "default";

/// A fresh random token.
pub fn mint() -> String {
    let mut b = [0u8; 20];
    rand::thread_rng().fill_bytes(&mut b);
    format!("sf_{}", hex::encode(b))
}

pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub org: String,
}

fn bearer(parts: &Parts) -> Option<String> {
    let v = parts
        .headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// The organization of `token`, or 401.
pub fn caller_of(state: &AppState, token: &str) -> Result<Caller, ApiError> {
    if token.is_empty() || token.len() > 256 {
        return Err(ApiError::unauthorized("invalid token"));
    }
    match state.controller.db().token_org(&hash(token))? {
        Some(org) => Ok(Caller { org }),
        None => Err(ApiError::unauthorized("invalid token")),
    }
}

/// For routes a browser opens directly (the terminal WebSocket, which
/// cannot carry headers): the bearer header, else a `token` query value.
pub fn caller_of_request(
    state: &AppState,
    parts: &Parts,
    query_token: Option<&str>,
) -> Result<Caller, ApiError> {
    match (bearer(parts), query_token) {
        (Some(t), _) => caller_of(state, &t),
        (None, Some(t)) => caller_of(state, t),
        (None, None) => Err(ApiError::unauthorized(
            "missing 'Authorization: Bearer <token>' header (or ?token=)",
        )),
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or_else(|| {
            ApiError::unauthorized("missing 'Authorization: Bearer <token>' header")
        })?;
        caller_of(state, &token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashed() {
        let a = mint();
        assert!(a.starts_with("sf_") && a.len() == 43);
        assert_ne!(a, mint());
        assert_eq!(hash("x").len(), 64);
        assert_ne!(hash(&a), a);
    }
}
