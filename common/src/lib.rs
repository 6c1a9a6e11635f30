//! What every Tidemark program shares.
//!
//! Organised by topic: the [`codec`] (the one place Postgres types are
//! mapped, text to record JSON and back), the record [`envelope`] (how a Postgres row becomes a
//! Kafka Connect JSON record), source and sink positions ([`offset`]),
//! connector-config parsing ([`config`]), Postgres and Kafka client setup
//! ([`pg`], [`kafka`]), every name Tidemark creates in a user's database
//! ([`names`]), and process plumbing ([`shutdown`], [`telemetry`]).

pub mod archive;
pub mod check;
pub mod codec;
pub mod config;
pub mod envelope;
pub mod error;
pub mod health;
pub mod kafka;
pub mod names;
pub mod offset;
pub mod ops;
pub mod pg;
pub mod program;
pub mod secret;
pub mod shutdown;
pub mod telemetry;

pub use error::ConfigError;
