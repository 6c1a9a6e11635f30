//! Errors at the boundary of the shared crate.

/// A configuration the programs cannot run with. Every variant names the key
/// the user has to change, because a config error is only useful when it says
/// where to look.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown config key `{key}`{hint}")]
    UnknownKey { key: String, hint: String },
    #[error("config key `{key}` is not supported by Tidemark: {why}")]
    Unsupported { key: String, why: String },
    #[error("config key `{key}` is required: {why}")]
    Missing { key: String, why: String },
    #[error("config key `{key}` has an invalid value `{value}`: {why}")]
    Invalid {
        key: String,
        value: String,
        why: String,
    },
    #[error("cannot read connector config {path}: {why}")]
    File { path: String, why: String },
}

impl ConfigError {
    /// Shorthand for [`ConfigError::Invalid`].
    pub fn invalid(key: &str, value: &str, why: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.to_owned(),
            value: value.to_owned(),
            why: why.into(),
        }
    }

    /// Shorthand for [`ConfigError::Missing`].
    pub fn missing(key: &str, why: impl Into<String>) -> Self {
        Self::Missing {
            key: key.to_owned(),
            why: why.into(),
        }
    }
}
