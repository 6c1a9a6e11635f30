//! Reading `tidemark.change_log` (version 2): one query per chunk over all
//! of a connector's tables, in global `seq` order, returning each change's
//! row images as the `record_out` text the capture trigger logged, with the
//! id of the shape they were written with. Postgres renders nothing: the
//! rows are decoded in Rust by [`crate::shapes`].

use sqlx::PgPool;
use tidemark_common::names;

/// One change-log row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LogRow {
    /// The change log's sequence.
    pub seq: i64,
    /// The writing transaction (`xid8`).
    pub txid: i64,
    /// The table, as `format('%I.%I')` wrote it when the change was logged.
    pub table_name: String,
    /// The shape `before` and `after` were written with.
    pub shape: i32,
    /// The table's OID, from the shape.
    pub relid: i64,
    /// `c`, `u`, `d` or `t` (a TRUNCATE, with neither image).
    pub op: String,
    /// When the change was made, µs since the epoch.
    pub changed_us: i64,
    /// The row before (updates with `--update-before full`, deletes).
    pub before: Option<String>,
    /// The row after (creates, updates).
    pub after: Option<String>,
}

/// The tables a reader reads: by name as logged, and by OID, so that a
/// renamed table is followed and a table recreated under a configured name
/// is found.
#[derive(Debug, Clone, Default)]
pub struct Tables {
    /// `format('%I.%I')` names.
    pub names: Vec<String>,
    /// OIDs.
    pub relids: Vec<i64>,
}

/// The changes of `tables` after `after_seq` of the transactions that
/// became visible between snapshots `done` and `cur`, in `seq` order, at
/// most `limit`.
///
/// `seq` order is commit order for two changes of one row (the second
/// writer waited for the first's row lock), and the changes of a batch as a
/// whole end in a state the database had (see [`crate::modes::changelog`]).
///
/// Fails on a database error.
pub async fn read(
    pool: &PgPool,
    tables: &Tables,
    after_seq: i64,
    done: &str,
    cur: &str,
    limit: i64,
) -> Result<Vec<LogRow>, sqlx::Error> {
    sqlx::query_as(&query())
        .bind(&tables.names)
        .bind(&tables.relids)
        .bind(after_seq)
        .bind(done)
        .bind(cur)
        .bind(limit)
        .fetch_all(pool)
        .await
}

/// The query of [`read`]. The primary key on `seq` gives the order and the
/// start; the snapshot bounds and the tables filter.
fn query() -> String {
    format!(
        r#"select l.seq, (l.txid::pg_catalog.text)::pg_catalog.int8 as txid, l.table_name, l.shape,
       s.relid::pg_catalog.int8 as relid, l.op::pg_catalog.text as op,
       (extract(epoch from l.changed_at) operator(pg_catalog.*) 1000000)::pg_catalog.int8 as changed_us,
       l.before, l.after
  from {log} l
  join {shapes} s on s.id operator(pg_catalog.=) l.shape
 where l.seq operator(pg_catalog.>) $3
   and (l.table_name operator(pg_catalog.=) any ($1::pg_catalog.text[])
        or s.relid operator(pg_catalog.=) any ($2::pg_catalog.int8[]::pg_catalog.oid[]))
   and l.txid operator(pg_catalog.>=) pg_catalog.pg_snapshot_xmin($4::pg_catalog.pg_snapshot)
   and l.txid operator(pg_catalog.<) pg_catalog.pg_snapshot_xmax($5::pg_catalog.pg_snapshot)
   and pg_catalog.pg_visible_in_snapshot(l.txid, $5::pg_catalog.pg_snapshot)
   and not pg_catalog.pg_visible_in_snapshot(l.txid, $4::pg_catalog.pg_snapshot)
 order by l.seq
 limit $6"#,
        log = names::CHANGE_LOG,
        shapes = names::SHAPES,
    )
}

/// Deletes up to `limit` rows of `tables` that are sent and committed to
/// Kafka (their transaction is visible in `done`); returns how many.
///
/// Fails on a database error.
pub async fn prune(
    pool: &PgPool,
    tables: &Tables,
    done: &str,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let sql = format!(
        r#"delete from {log} where seq operator(pg_catalog.=) any (array(
             select l.seq from {log} l
               join {shapes} s on s.id operator(pg_catalog.=) l.shape
              where (l.table_name operator(pg_catalog.=) any ($1::pg_catalog.text[])
                     or s.relid operator(pg_catalog.=) any ($2::pg_catalog.int8[]::pg_catalog.oid[]))
                and l.txid operator(pg_catalog.<) pg_catalog.pg_snapshot_xmax($3::pg_catalog.pg_snapshot)
                and pg_catalog.pg_visible_in_snapshot(l.txid, $3::pg_catalog.pg_snapshot)
              order by l.seq
              limit $4))"#,
        log = names::CHANGE_LOG,
        shapes = names::SHAPES,
    );
    Ok(sqlx::query(&sql)
        .bind(&tables.names)
        .bind(&tables.relids)
        .bind(done)
        .bind(limit)
        .execute(pool)
        .await?
        .rows_affected())
}
