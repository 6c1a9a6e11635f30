//! `timestamp+incrementing` mode: polls a table by `(timestamp, id)`, like
//! the JDBC connector, but never misses a row whose transaction commits late.
//!
//! The JDBC connector reads every row with a timestamp below "now". A
//! transaction that is still open has already stamped its rows with its start
//! time (`now()` in the seed's trigger), so when it commits after a poll its
//! rows fall behind the stored position and are never read (kafka-connect-jdbc
//! issue #172). Tidemark caps the poll's upper bound at the start time of the
//! oldest transaction still open in the database, read from
//! `pg_stat_activity` *before* the poll's own snapshot is taken: every row
//! below that bound belongs to a transaction that had already finished, so no
//! row can later appear below the position. Seeing other roles' transactions
//! needs the `pg_read_all_stats` role (superusers have it).

use anyhow::bail;
use sqlx::PgPool;
use tidemark_common::envelope::{payload_and_wide_sql, RecordTemplates};
use tidemark_common::offset::SourcePosition;
use tidemark_common::pg::quote_ident;

use crate::catalog::TableInfo;

/// How far below the server clock the bound stays, to cover the instant
/// between a transaction taking its start time and showing in
/// `pg_stat_activity`.
pub const CLOCK_GUARD_MS: i64 = 50;

/// Reads one table in `timestamp+incrementing` mode.
#[derive(Debug)]
pub struct TimestampReader {
    /// The table.
    pub table: TableInfo,
    /// The topic its records go to.
    pub topic: String,
    /// Where the position is stored in the offsets topic.
    pub position_key: Vec<u8>,
    /// The last row sent and committed; `None` reads from the beginning.
    pub position: Option<(String, i64)>,
    key_template: RecordTemplates,
    value_template: RecordTemplates,
    sql_first: String,
    sql_after: String,
    sql_bound: String,
    sql_initial: String,
    timezone: String,
    inc_min: i64,
}

/// One row read.
#[derive(Debug, Clone)]
pub struct Row {
    /// The record key (Connect JSON).
    pub key: Vec<u8>,
    /// The record value (Connect JSON).
    pub value: Vec<u8>,
    /// The row's position.
    pub position: (String, i64),
}

#[derive(sqlx::FromRow)]
struct RawRow {
    ts: String,
    inc: i64,
    key: String,
    key_wide: bool,
    value: String,
    wide: bool,
}

impl TimestampReader {
    /// Leaves the Connect schema out of keys and/or values
    /// (`schemas.enable=false`).
    pub fn drop_schemas(&mut self, keys: bool, values: bool) {
        if keys {
            self.key_template = RecordTemplates::schemaless();
        }
        if values {
            self.value_template = RecordTemplates::schemaless();
        }
    }

    /// Prepares the queries for a table.
    ///
    /// Fails when the timestamp or incrementing column is missing or of the
    /// wrong type, naming the config key.
    pub fn new(
        table: TableInfo,
        topic: String,
        position_key: Vec<u8>,
        ts_col: &str,
        inc_col: &str,
        timezone: &str,
    ) -> anyhow::Result<Self> {
        let name = table.name.clone();
        let Some(ts) = table.column(ts_col) else {
            bail!("table {name} has no column `{ts_col}`: fix timestamp.column.name");
        };
        let ts_type = ts.pg_type.clone();
        if !matches!(ts_type.as_str(), "timestamp" | "timestamptz") {
            bail!(
                "column {name}.{ts_col} is {ts_type}, not a timestamp: fix timestamp.column.name"
            );
        }
        let Some(inc) = table.column(inc_col).cloned() else {
            bail!("table {name} has no column `{inc_col}`: fix incrementing.column.name");
        };
        let inc_min = match inc.pg_type.as_str() {
            "int2" => i16::MIN as i64,
            "int4" => i32::MIN as i64,
            "int8" => i64::MIN,
            other => bail!(
                "column {name}.{inc_col} is {other}, not an integer: fix incrementing.column.name"
            ),
        };
        let mut table = table;
        if table.key.is_empty() {
            tracing::warn!(table = %name, column = inc_col, "table has no primary key; records are keyed by the incrementing column");
            table.key = vec![inc];
        }
        let ts_sql_type = table.sql_type(ts_col).to_owned();
        let inc_sql_type = table.sql_type(inc_col).to_owned();
        let ts_q = format!("t.{}", quote_ident(ts_col));
        let inc_q = format!("t.{}", quote_ident(inc_col));
        // The inner query picks the batch by the (timestamp, id) index; the
        // outer one converts only those rows, so a planner misled by stale
        // statistics after a bulk load sorts keys, not whole JSON rows.
        let (key, key_wide) = payload_and_wide_sql(&table.key, "t");
        let (value, wide) = payload_and_wide_sql(&table.columns, "t");
        let select = |filter: &str, limit: &str| {
            format!(
                "select {ts_q}::text as ts, {inc_q}::int8 as inc, {key} as key, {key_wide} as key_wide, \
                 {value} as value, {wide} as wide \
                 from (select * from {} t where {filter} order by {ts_q}, {inc_q} limit {limit}) t \
                 order by {ts_q}, {inc_q}",
                table.name.quoted()
            )
        };
        let sql_first = select(&format!("{ts_q} < $1::{ts_sql_type}"), "$2");
        let sql_after = select(
            &format!(
                "({ts_q}, {inc_q}) > ($1::{ts_sql_type}, $2::{inc_sql_type}) and {ts_q} < $3::{ts_sql_type}"
            ),
            "$4",
        );
        // A `timestamp` column holds wall-clock time in the writers' zone; a
        // `timestamptz` column is compared as it is.
        let in_zone = if ts_type == "timestamp" {
            " at time zone $3"
        } else {
            ""
        };
        let sql_bound = format!(
            r#"with oldest as (
                 select min(xact_start) as t from pg_stat_activity
                 where datname = current_database() and pid <> pg_backend_pid()
                   and xact_start is not null
               )
               select ((least(clock_timestamp() - $1::int8 * interval '1 millisecond', (select t from oldest))
                        - $2::int8 * interval '1 millisecond'){in_zone})::text"#
        );
        let sql_initial = if ts_type == "timestamp" {
            "select (case when $1::int8 < 0 then clock_timestamp() else to_timestamp($1::int8 / 1000.0) end at time zone $2)::text".to_owned()
        } else {
            "select (case when $1::int8 < 0 then clock_timestamp() else to_timestamp($1::int8 / 1000.0) end)::text where $2::text is not null".to_owned()
        };
        Ok(Self {
            key_template: RecordTemplates::new(
                &format!("{}.{}.Key", name.schema, name.name),
                &table.key,
            ),
            value_template: RecordTemplates::new(&name.name, &table.columns),
            table,
            topic,
            position_key,
            position: None,
            sql_first,
            sql_after,
            sql_bound,
            sql_initial,
            timezone: timezone.to_owned(),
            inc_min,
        })
    }

    /// Sets the position from `timestamp.initial` (epoch milliseconds, or -1
    /// for now) when none was stored.
    ///
    /// Fails on a database error.
    pub async fn start_at(&mut self, pool: &PgPool, initial_ms: i64) -> Result<(), sqlx::Error> {
        let ts: String = sqlx::query_scalar(&self.sql_initial)
            .bind(initial_ms)
            .bind(&self.timezone)
            .fetch_one(pool)
            .await?;
        self.position = Some((ts, self.inc_min));
        Ok(())
    }

    /// The upper bound for the next poll: below every open transaction's
    /// start, and `delay_ms` below the clock.
    ///
    /// Fails on a database error.
    pub async fn bound(&self, pool: &PgPool, delay_ms: i64) -> Result<String, sqlx::Error> {
        sqlx::query_scalar(&self.sql_bound)
            .bind(CLOCK_GUARD_MS)
            .bind(delay_ms)
            .bind(&self.timezone)
            .fetch_one(pool)
            .await
    }

    /// Reads up to `limit` rows after the position and below `bound`, in
    /// (timestamp, id) order.
    ///
    /// Fails on a database error.
    pub async fn poll(
        &self,
        pool: &PgPool,
        bound: &str,
        limit: i64,
    ) -> Result<Vec<Row>, sqlx::Error> {
        let rows: Vec<RawRow> = match &self.position {
            None => {
                sqlx::query_as(&self.sql_first)
                    .bind(bound)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?
            }
            Some((ts, inc)) => {
                sqlx::query_as(&self.sql_after)
                    .bind(ts)
                    .bind(inc)
                    .bind(bound)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|r| Row {
                key: self.key_template.render(&r.key, r.key_wide),
                value: self.value_template.render(&r.value, r.wide),
                position: (r.ts, r.inc),
            })
            .collect())
    }

    /// The stored form of a position.
    pub fn encode_position(position: &(String, i64)) -> Vec<u8> {
        SourcePosition::TimestampIncrementing {
            timestamp: position.0.clone(),
            incrementing: position.1,
        }
        .encode()
    }
}
