//! Sandforge supervisor library (placeholder surface; being implemented).
use std::path::{Path, PathBuf};

#[derive(Debug, Default, Clone)]
pub struct ServeOptions {
    pub listen: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Other(String),
}

pub async fn serve(_opts: ServeOptions) -> Result<(), ServerError> {
    Err(ServerError::Other("not yet".into()))
}

pub fn create_token(_state_dir: &Path, _org: &str) -> Result<String, ServerError> {
    Err(ServerError::Other("not yet".into()))
}
