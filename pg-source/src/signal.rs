//! Snapshots on demand: the rows of `tidemark.signal` (Debezium's signal
//! table, as a Tidemark table) that ask a running pg-source for an
//! incremental snapshot of tables it reads, in `changelog` and `logical`
//! modes alike.
//!
//! A signal is acted on once: each mode reads the signals whose
//! transactions became visible between two snapshots (`pg_snapshot`s), the
//! first of which is in its stored position, committed to Kafka with the
//! units it sends. What a signal asks for is queued in the same position
//! (an [`IncrementalProgress`] of reason [`incremental::SIGNAL_REASON`],
//! carrying the signal's id), so a restart neither loses nor repeats it.

use serde_json::Value;
use sqlx::PgPool;
use tidemark_common::envelope::now_us;
use tidemark_common::names;
use tidemark_common::offset::IncrementalProgress;
use tidemark_common::ops::names as metric;
use tidemark_common::pg::TableName;

use crate::errors::SourceError;
use crate::incremental;

/// Whether table $2 in schema $1 is one pg-source trusts (a plain table a
/// superuser owns, in a schema a superuser owns), and whether this session
/// may read it (SELECT on it, USAGE on its schema). No row: no such table.
pub(crate) const TRUST_SQL: &str =
    "select c.relkind operator(pg_catalog.=) 'r' and o.rolsuper and so.rolsuper,
        pg_catalog.has_table_privilege(c.oid, 'SELECT')
          and pg_catalog.has_schema_privilege(n.oid, 'USAGE')
   from pg_catalog.pg_class c
   join pg_catalog.pg_namespace n on n.oid operator(pg_catalog.=) c.relnamespace
   join pg_catalog.pg_roles o on o.oid operator(pg_catalog.=) c.relowner
   join pg_catalog.pg_roles so on so.oid operator(pg_catalog.=) n.nspowner
  where n.nspname operator(pg_catalog.=) $1 and c.relname operator(pg_catalog.=) $2";
/// One row of the signal table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    pub id: i64,
    pub kind: String,
    /// `data` as text (jsonb's own output).
    pub data: String,
}

/// What reading the signals found.
pub enum Read {
    /// The signals whose transactions became visible, in id order.
    Signals(Vec<Signal>),
    /// The signal table cannot be read, or is not one pg-source trusts;
    /// the reason, for a WARN.
    Off(String),
}

/// Reads the signals whose transactions are visible in snapshot `cur` and
/// not in `done` (`pg_snapshot` texts).
///
/// Before reading, checks that `tidemark.signal` is a plain table owned by
/// a superuser in a schema a superuser owns (what schema-init makes), so
/// that nothing a less privileged role created (a view, a table of its
/// own, a type with its own output function) runs in pg-source's session.
///
/// Fails on a database error other than the table being absent,
/// unreadable or untrusted (those are [`Read::Off`]).
pub async fn read(pool: &PgPool, done: &str, cur: &str) -> Result<Read, SourceError> {
    let (schema, table) = names::SIGNAL.split_once('.').expect("schema.table");
    let pg = |what| move |e| SourceError::postgres(what, e);
    // One short transaction: the check and the read see the same table,
    // and a lock held on it (or a slow server) costs a second, not the
    // stream.
    let mut tx = pool
        .begin()
        .await
        .map_err(pg("cannot read the signal table"))?;
    sqlx::query("set local lock_timeout = '1s'")
        .execute(&mut *tx)
        .await
        .map_err(pg("cannot read the signal table"))?;
    sqlx::query("set local statement_timeout = '10s'")
        .execute(&mut *tx)
        .await
        .map_err(pg("cannot read the signal table"))?;
    let trusted: Option<(bool, bool)> = sqlx::query_as(TRUST_SQL)
        .bind(schema)
        .bind(table)
        .fetch_optional(&mut *tx)
        .await
        .map_err(pg("cannot look up the signal table"))?;
    let trusted = trusted.map(|(trusted, _)| trusted);
    match trusted {
        None => return Ok(Read::Off(format!("there is no table {}", names::SIGNAL))),
        Some(false) => {
            return Ok(Read::Off(format!(
                "{} is not a table owned by a superuser in a schema a superuser owns, as schema-init makes it, so pg-source does not read it",
                names::SIGNAL
            )))
        }
        Some(true) => {}
    }
    let rows: Result<Vec<(i64, String, String)>, sqlx::Error> = sqlx::query_as(&format!(
        "select s.id, s.kind, s.data::pg_catalog.text from only {} s
          where pg_catalog.pg_visible_in_snapshot(s.txid, $2::pg_catalog.pg_snapshot)
            and not pg_catalog.pg_visible_in_snapshot(s.txid, $1::pg_catalog.pg_snapshot)
          order by s.id",
        names::SIGNAL
    ))
    .bind(done)
    .bind(cur)
    .fetch_all(&mut *tx)
    .await;
    match rows {
        Ok(rows) => Ok(Read::Signals(
            rows.into_iter()
                .map(|(id, kind, data)| Signal { id, kind, data })
                .collect(),
        )),
        Err(sqlx::Error::Database(e))
            if matches!(e.code().as_deref(), Some("42P01" | "42501" | "42703")) =>
        {
            Ok(Read::Off(e.to_string()))
        }
        Err(e) => Err(SourceError::postgres("cannot read the signal table", e)),
    }
}

/// A table a signal may name: how it is shown and its name in the stored
/// position (`format('%I.%I')`).
#[derive(Clone, Copy)]
pub struct Readable<'a> {
    pub name: &'a TableName,
    pub log_name: &'a str,
}

/// Acts on one signal: queues an incremental snapshot of each table it
/// names that this connector reads, in `queue` (the stored position's).
/// A signal of another kind, malformed data or a table not read is a WARN
/// saying so; a table whose incremental snapshot is already queued or
/// running is an INFO (that one goes on). Returns how many were queued.
pub fn act<'a>(
    signal: &Signal,
    tables: impl Iterator<Item = Readable<'a>> + Clone,
    queue: &mut Vec<IncrementalProgress>,
) -> usize {
    let id = signal.id;
    if signal.kind != names::SIGNAL_EXECUTE_SNAPSHOT {
        tracing::warn!(
            signal = id,
            kind = %signal.kind,
            "signal ignored: its kind is not one pg-source knows (it knows {:?})",
            names::SIGNAL_EXECUTE_SNAPSHOT
        );
        return 0;
    }
    let names = match signal_tables(&signal.data) {
        Ok(names) => names,
        Err(why) => {
            tracing::warn!(signal = id, data = %signal.data, "signal ignored: {why}");
            return 0;
        }
    };
    let mut queued = 0;
    for name in names {
        let table = TableName::parse(&name)
            .ok()
            .and_then(|n| tables.clone().find(|t| *t.name == n));
        let Some(table) = table else {
            tracing::warn!(signal = id, table = %name, "signal names a table this connector does not read (not in table.whitelist / table.include.list, or not captured); nothing is snapshotted for it");
            continue;
        };
        if queue.iter().any(|p| p.table == table.log_name) {
            tracing::info!(signal = id, table = %table.name, "signal asks for a snapshot of a table whose incremental snapshot is already running; that one goes on, no second is queued");
            continue;
        }
        tracing::info!(signal = id, table = %table.name, "signal: incremental snapshot of the table queued; every table keeps streaming meanwhile");
        queue.push(IncrementalProgress {
            table: table.log_name.to_owned(),
            reason: incremental::SIGNAL_REASON.to_owned(),
            since_us: now_us(),
            signal: Some(id),
            ..Default::default()
        });
        queued += 1;
    }
    metrics::gauge!(metric::SOURCE_INCREMENTAL_TABLES_LEFT).set(queue.len() as f64);
    queued
}

/// The tables a signal's `data` names: Debezium's
/// `{"data-collections": ["schema.table", ...], "type": "incremental"}`
/// (`type` optional).
///
/// Fails, saying what is wrong, when `data` is not such an object.
pub fn signal_tables(data: &str) -> Result<Vec<String>, String> {
    let v: Value = serde_json::from_str(data).map_err(|e| format!("its data is not JSON: {e}"))?;
    let Value::Object(o) = v else {
        return Err(
            "its data is not a JSON object like {\"data-collections\": [\"public.t\"]}".into(),
        );
    };
    match o.get("type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t.eq_ignore_ascii_case("incremental") => {}
        Some(other) => {
            return Err(format!(
                "its snapshot type {other} is not one pg-source runs (only \"incremental\")"
            ))
        }
    }
    let Some(list) = o.get("data-collections") else {
        return Err(
            "its data has no \"data-collections\": a list of tables like [\"public.t\"]".into(),
        );
    };
    let Value::Array(list) = list else {
        return Err(format!(
            "its \"data-collections\" is {list}, not a list of tables like [\"public.t\"]"
        ));
    };
    if list.is_empty() {
        return Err("its \"data-collections\" is empty".into());
    }
    list.iter()
        .map(|t| match t {
            Value::String(s) => TableName::parse(s)
                .map(|_| s.clone())
                .map_err(|e| format!("its \"data-collections\" holds {e}")),
            other => Err(format!(
                "its \"data-collections\" holds {other}, not a table name like \"public.t\""
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal(kind: &str, data: &str) -> Signal {
        Signal {
            id: 7,
            kind: kind.into(),
            data: data.into(),
        }
    }

    #[test]
    fn a_signal_queues_each_table_read_once() {
        let a = TableName::parse("public.a").unwrap();
        let b = TableName::parse("s.b").unwrap();
        let tables = [(&a, "public.a"), (&b, "s.b")];
        let readable = || {
            tables
                .iter()
                .map(|(name, log_name)| Readable { name, log_name })
        };
        let mut queue = Vec::new();
        let s = signal(
            names::SIGNAL_EXECUTE_SNAPSHOT,
            r#"{"data-collections": ["a", "s.b", "public.missing"], "type": "INCREMENTAL"}"#,
        );
        assert_eq!(act(&s, readable(), &mut queue), 2);
        assert_eq!(
            queue.iter().map(|p| p.table.as_str()).collect::<Vec<_>>(),
            ["public.a", "s.b"]
        );
        assert!(queue
            .iter()
            .all(|p| p.signal == Some(7) && p.reason == incremental::SIGNAL_REASON));
        // Already queued: not twice.
        assert_eq!(act(&s, readable(), &mut queue), 0);
        assert_eq!(queue.len(), 2);
    }

    #[test]
    fn malformed_signals_queue_nothing() {
        let a = TableName::parse("public.a").unwrap();
        let readable = || {
            std::iter::once(Readable {
                name: &a,
                log_name: "public.a",
            })
        };
        let mut queue = Vec::new();
        for (kind, data) in [
            ("stop-snapshot", r#"{"data-collections": ["a"]}"#),
            (names::SIGNAL_EXECUTE_SNAPSHOT, "{}"),
            (
                names::SIGNAL_EXECUTE_SNAPSHOT,
                r#"{"data-collections": []}"#,
            ),
            (
                names::SIGNAL_EXECUTE_SNAPSHOT,
                r#"{"data-collections": "a"}"#,
            ),
            (
                names::SIGNAL_EXECUTE_SNAPSHOT,
                r#"{"data-collections": [1]}"#,
            ),
            (
                names::SIGNAL_EXECUTE_SNAPSHOT,
                r#"{"data-collections": ["a"], "type": "blocking"}"#,
            ),
            (names::SIGNAL_EXECUTE_SNAPSHOT, "[]"),
        ] {
            assert_eq!(
                act(&signal(kind, data), readable(), &mut queue),
                0,
                "{data}"
            );
        }
        assert!(queue.is_empty());
    }
}
