//! Why a step of pg-source failed, sorted into what waiting may cure and
//! what needs a person.
//!
//! The sorting happens where the cause is known: sqlx errors by their kind
//! and SQLSTATE ([`tidemark_common::pg::is_transient`]), replication-stream
//! errors by their [`PgWireError`] variant and SQLSTATE, Kafka errors by
//! their `RDKafkaErrorCode` (in [`crate::producer`]). Nothing decides by
//! searching an error's message.

use pgwire_replication::PgWireError;

use crate::producer::BatchError;

/// A failed step of a capture mode.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A Postgres query failed.
    #[error("{context}: {source}")]
    Postgres {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: sqlx::Error,
    },
    /// The replication stream failed.
    #[error("replication stream of slot {slot}: {source}{hint}")]
    Stream {
        /// The slot read.
        slot: String,
        /// The error.
        #[source]
        source: PgWireError,
        /// What to do, when the cause is known (starts with `; `).
        hint: String,
    },
    /// The replication stream ended without an error: the server closed it
    /// (it is shutting down, or the walsender was terminated).
    #[error("the replication stream of slot {0} ended: the server closed it")]
    StreamClosed(String),
    /// Kafka did not commit the batch.
    #[error(transparent)]
    Kafka(#[from] BatchError),
    /// Anything else: a bad table, a refused setting, a value that cannot be
    /// carried. It needs a person.
    #[error("{0:#}")]
    Definite(anyhow::Error),
}

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Waiting and reading again from the stored position may cure it.
    Transient,
    /// It needs a person: pg-source stops with the message.
    Definite,
}

impl SourceError {
    /// A Postgres error with what was being done.
    pub fn postgres(context: impl Into<String>, source: sqlx::Error) -> Self {
        Self::Postgres {
            context: context.into(),
            source,
        }
    }

    /// Sorts an error built deeper down: a sqlx or replication error inside
    /// it keeps its class (found by type, through any context added), any
    /// other error is definite.
    pub fn from_anyhow(e: anyhow::Error) -> Self {
        let e = match e.downcast::<SourceError>() {
            Ok(e) => return e,
            Err(e) => e,
        };
        if let Some(sql) = e.downcast_ref::<sqlx::Error>() {
            if tidemark_common::pg::is_transient(sql) {
                let context = e.to_string();
                let source = e.downcast::<sqlx::Error>().expect("checked above");
                return Self::postgres(context_only(&context, &source), source);
            }
        }
        Self::Definite(e)
    }

    /// Whether waiting may cure it.
    pub fn class(&self) -> Class {
        match self {
            Self::Postgres { source, .. } if tidemark_common::pg::is_transient(source) => {
                Class::Transient
            }
            Self::Postgres { .. } => Class::Definite,
            Self::Stream { source, .. } => stream_class(source),
            Self::StreamClosed(_) => Class::Transient,
            Self::Kafka(BatchError::Retry(_)) => Class::Transient,
            Self::Kafka(_) => Class::Definite,
            Self::Definite(_) => Class::Definite,
        }
    }

    /// The `kind` label of the error counter.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Kafka(_) => "kafka",
            _ => "postgres",
        }
    }
}

/// An anyhow error's outer message without its sqlx cause, which the
/// [`SourceError::Postgres`] message adds back.
fn context_only(message: &str, source: &sqlx::Error) -> String {
    let cause = source.to_string();
    if message == cause {
        "postgres error".to_owned()
    } else {
        message.to_owned()
    }
}

/// The SQLSTATE of a server error of the replication stream.
///
/// pgwire-replication hands a server's ErrorResponse over as text only,
/// which it builds as `<message> (SQLSTATE <code>)`; the code is read from
/// that fixed suffix (pinned by a test), never from the message.
pub fn stream_sqlstate(e: &PgWireError) -> Option<&str> {
    let PgWireError::Server(text) = e else {
        return None;
    };
    let code = text.strip_suffix(')')?.rsplit_once("(SQLSTATE ")?.1;
    (code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(code)
}

/// A replication-stream error's class: a lost connection, a server
/// restarting or shutting down, a slot still held by a dying session, too
/// many connections are transient; a protocol violation (08P01), a dropped
/// database (57P04), authentication, TLS and every other server error are
/// definite.
fn stream_class(e: &PgWireError) -> Class {
    match e {
        PgWireError::Io(_) | PgWireError::Task(_) | PgWireError::Internal(_) => Class::Transient,
        PgWireError::Server(_) => match stream_sqlstate(e) {
            Some(
                "08000" | "08001" | "08003" | "08004" | "08006" | "57P01" | "57P02" | "57P03"
                | "55006" | "53300",
            ) => Class::Transient,
            _ => Class::Definite,
        },
        _ => Class::Definite,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_errors_are_sorted_by_variant_and_sqlstate() {
        let server = |text: &str| SourceError::Stream {
            slot: "s".into(),
            source: PgWireError::Server(text.into()),
            hint: String::new(),
        };
        // The format pgwire-replication writes a server error in.
        assert_eq!(
            stream_sqlstate(&PgWireError::Server(
                "terminating connection due to administrator command (SQLSTATE 57P01)".into()
            )),
            Some("57P01")
        );
        assert_eq!(
            server("terminating connection (SQLSTATE 57P01)").class(),
            Class::Transient
        );
        assert_eq!(
            server("replication slot \"s\" is active for PID 7 (SQLSTATE 55006)").class(),
            Class::Transient
        );
        // A message that merely mentions a code is not that code.
        assert_eq!(
            server("publication \"SQLSTATE 57P01\" does not exist (SQLSTATE 42704)").class(),
            Class::Definite
        );
        assert_eq!(server("no code at all").class(), Class::Definite);
        let io = SourceError::Stream {
            slot: "s".into(),
            source: PgWireError::from(std::io::Error::other("reset")),
            hint: String::new(),
        };
        assert_eq!(io.class(), Class::Transient);
        let auth = SourceError::Stream {
            slot: "s".into(),
            source: PgWireError::Auth("bad password".into()),
            hint: String::new(),
        };
        assert_eq!(auth.class(), Class::Definite);
        assert_eq!(
            SourceError::StreamClosed("s".into()).class(),
            Class::Transient
        );
    }

    #[test]
    fn errors_built_deeper_down_keep_their_class() {
        let io =
            anyhow::Error::new(sqlx::Error::PoolTimedOut).context("cannot read the change log");
        let e = SourceError::from_anyhow(io);
        assert_eq!(e.class(), Class::Transient);
        assert!(e.to_string().contains("cannot read the change log"), "{e}");
        let bad = anyhow::anyhow!("table public.t has no primary key");
        assert_eq!(SourceError::from_anyhow(bad).class(), Class::Definite);
        let wrapped = anyhow::Error::new(SourceError::StreamClosed("s".into())).context("reading");
        assert_eq!(SourceError::from_anyhow(wrapped).class(), Class::Transient);
    }
}
