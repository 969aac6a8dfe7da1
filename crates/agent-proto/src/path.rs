//! Rules for a path inside a sandbox, shared by the API edge (early 400) and
//! the agent (which enforces them again, and also refuses magic links).

/// Longest accepted guest path, in bytes.
pub const MAX_PATH_LEN: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PathError {
    #[error("path must not be empty")]
    Empty,
    #[error("path must be absolute (start with '/')")]
    Relative,
    #[error("path must not be the root directory '/'")]
    Root,
    #[error("path must not contain '..' components")]
    DotDot,
    #[error("path must not contain NUL bytes")]
    Nul,
    #[error("path is longer than {MAX_PATH_LEN} bytes")]
    TooLong,
}

/// Validate a guest path: absolute, not `/`, no `..` component, no NUL, bounded.
pub fn validate_guest_path(p: &str) -> Result<(), PathError> {
    if p.is_empty() {
        return Err(PathError::Empty);
    }
    if p.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    if p.contains('\0') {
        return Err(PathError::Nul);
    }
    if !p.starts_with('/') {
        return Err(PathError::Relative);
    }
    if p.split('/').any(|c| c == "..") {
        return Err(PathError::DotDot);
    }
    if p.split('/').all(|c| c.is_empty() || c == ".") {
        return Err(PathError::Root);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_rules() {
        assert_eq!(validate_guest_path("/etc/hosts"), Ok(()));
        assert_eq!(validate_guest_path("/a/b..c"), Ok(()));
        assert_eq!(validate_guest_path(""), Err(PathError::Empty));
        assert_eq!(validate_guest_path("etc"), Err(PathError::Relative));
        assert_eq!(validate_guest_path("/"), Err(PathError::Root));
        assert_eq!(validate_guest_path("//./"), Err(PathError::Root));
        assert_eq!(validate_guest_path("/a/../etc"), Err(PathError::DotDot));
        assert_eq!(validate_guest_path("/a/.."), Err(PathError::DotDot));
        assert_eq!(validate_guest_path("/a\0b"), Err(PathError::Nul));
        assert_eq!(
            validate_guest_path(&format!("/{}", "a".repeat(5000))),
            Err(PathError::TooLong)
        );
    }
}
