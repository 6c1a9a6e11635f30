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

use std::collections::HashMap;
use std::time::Duration;

use std::sync::Arc;

use anyhow::{bail, Context as _};
use sqlx::PgPool;
use tidemark_common::codec::{parse_record, CodecError, Field, RowCodec, TypeCache, TypeKind};
use tidemark_common::offset::{position_key, SourcePosition, TimestampPosition};
use tidemark_common::pg::quote_ident;
use tokio_util::sync::CancellationToken;

use crate::catalog::TableInfo;
use crate::config::TimestampConfig;
use crate::errors::SourceError;
use crate::modes::{Batch, Capture, Committed, Wakeup};
use crate::producer::Record;
use crate::shape::{CatalogShape, Templates};

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
    row: Arc<RowCodec>,
    key: Arc<RowCodec>,
    /// Where the key's columns are in the row.
    key_index: Vec<usize>,
    keys: Templates,
    values: Templates,
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
    /// `pg_catalog.textin(pg_catalog.record_out(t.*))`.
    row: String,
}

/// Why a poll failed.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// The query failed.
    #[error(transparent)]
    Postgres(#[from] sqlx::Error),
    /// A value the codec cannot carry exactly.
    #[error("table {table}, row at {position:?}: {source}")]
    Value {
        /// The table.
        table: String,
        /// The row's (timestamp, incrementing).
        position: (String, i64),
        /// What is wrong.
        #[source]
        source: Box<CodecError>,
    },
}

impl TimestampReader {
    /// Prepares the queries for a table whose live columns are `columns`
    /// (from the catalog) and whose primary key is `key` (names, in key
    /// order; the incrementing column when empty).
    ///
    /// Fails when the timestamp or incrementing column is missing or of the
    /// wrong type, naming the config key.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        table: TableInfo,
        shape: CatalogShape,
        topic: String,
        position_key: Vec<u8>,
        ts_col: &str,
        inc_col: &str,
        timezone: &str,
        (key_schemas, value_schemas): (bool, bool),
    ) -> anyhow::Result<Self> {
        let name = table.name.clone();
        let column = |c: &str| shape.columns.iter().position(|s| s.name == c);
        let Some(ts) = column(ts_col) else {
            bail!("table {name} has no column `{ts_col}`: fix timestamp.column.name");
        };
        let ts_type = &shape.columns[ts].ty;
        let zoned = match ts_type.ty.base().kind {
            TypeKind::Timestamp => false,
            TypeKind::Timestamptz => true,
            _ => bail!(
                "column {name}.{ts_col} is {}, not a timestamp: fix timestamp.column.name",
                ts_type.sql_type()
            ),
        };
        let Some(inc) = column(inc_col) else {
            bail!("table {name} has no column `{inc_col}`: fix incrementing.column.name");
        };
        let inc_type = &shape.columns[inc].ty;
        let inc_min = match inc_type.ty.base().kind {
            TypeKind::Int2 => i16::MIN as i64,
            TypeKind::Int4 => i32::MIN as i64,
            TypeKind::Int8 => i64::MIN,
            _ => bail!(
                "column {name}.{inc_col} is {}, not an integer: fix incrementing.column.name",
                inc_type.sql_type()
            ),
        };
        let mut key_index: Vec<usize> = shape.key.iter().filter_map(|k| column(&k.name)).collect();
        // `tidemark.column.key` marks primary-key columns only: a table
        // keyed by its incrementing column has none (playback must not
        // create it with a primary key it never had).
        let primary_key = key_index.clone();
        if key_index.is_empty() {
            tracing::warn!(table = %name, column = inc_col, "table has no primary key; records are keyed by the incrementing column");
            key_index = vec![inc];
        }
        // Bounds are compared as the columns' base types (a domain's CHECK
        // never runs), with built-in operators.
        let ts_base = ts_type.ty.base().sql_name.clone();
        let inc_base = inc_type.ty.base().sql_name.clone();
        let ts_q = format!("t.{}", quote_ident(ts_col));
        let inc_q = format!("t.{}", quote_ident(inc_col));
        // The inner query picks the batch by the (timestamp, id) index; the
        // outer one prints only those rows, so a planner misled by stale
        // statistics after a bulk load sorts keys, not whole rows.
        let select = |filter: &str, limit: &str| {
            format!(
                "select {ts_q}::pg_catalog.text as ts, {inc_q}::pg_catalog.int8 as inc, \
                 pg_catalog.textin(pg_catalog.record_out(t.*)) as row \
                 from (select * from {} t where {filter} order by {ts_q}, {inc_q} limit {limit}) t \
                 order by {ts_q}, {inc_q}",
                table.name.quoted()
            )
        };
        let sql_first = select(
            &format!("{ts_q} operator(pg_catalog.<) $1::{ts_base}"),
            "$2",
        );
        let sql_after = select(
            &format!(
                "({ts_q}, {inc_q}) operator(pg_catalog.>) ($1::{ts_base}, $2::{inc_base}) and {ts_q} operator(pg_catalog.<) $3::{ts_base}"
            ),
            "$4",
        );
        // A `timestamp` column holds wall-clock time in the writers' zone; a
        // `timestamptz` column is compared as it is.
        let in_zone = if zoned { "" } else { " at time zone $3" };
        let sql_bound = format!(
            r#"with oldest as (
                 select pg_catalog.min(a.xact_start) as t from pg_catalog.pg_stat_activity a
                 where a.datname operator(pg_catalog.=) pg_catalog.current_database()
                   and a.pid operator(pg_catalog.<>) pg_catalog.pg_backend_pid()
                   and a.xact_start is not null
               )
               select ((least(pg_catalog.clock_timestamp() operator(pg_catalog.-) pg_catalog.make_interval(secs => $1::pg_catalog.int8 operator(pg_catalog./) 1000.0),
                              (select o.t from oldest o))
                        operator(pg_catalog.-) pg_catalog.make_interval(secs => $2::pg_catalog.int8 operator(pg_catalog./) 1000.0)){in_zone})::pg_catalog.text"#
        );
        let sql_initial = if zoned {
            "select (case when $1::pg_catalog.int8 operator(pg_catalog.<) 0 then pg_catalog.clock_timestamp() else pg_catalog.to_timestamp($1::pg_catalog.int8 operator(pg_catalog./) 1000.0) end)::pg_catalog.text where $2::pg_catalog.text is not null".to_owned()
        } else {
            "select (case when $1::pg_catalog.int8 operator(pg_catalog.<) 0 then pg_catalog.clock_timestamp() else pg_catalog.to_timestamp($1::pg_catalog.int8 operator(pg_catalog./) 1000.0) end at time zone $2)::pg_catalog.text".to_owned()
        };
        let (row, key) = if primary_key.is_empty() {
            let key = key_index
                .iter()
                .map(|&i| shape.columns[i].clone())
                .collect();
            (RowCodec::new(shape.columns), RowCodec::new(key))
        } else {
            RowCodec::keyed(shape.columns, &key_index)
        };
        // A row state's schema says its table's OID, as a change event's
        // `after` does: the attnums are that table's.
        let (row, key) = (Arc::new(row.with_table_oid(shape.oid)), Arc::new(key));
        Ok(Self {
            keys: Templates::new(
                key.clone(),
                &format!("{}.{}.Key", name.schema, name.name),
                key_schemas,
            ),
            values: Templates::new(row.clone(), &name.name, value_schemas),
            row,
            key,
            key_index,
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
    /// (timestamp, id) order, each encoded by the codec.
    ///
    /// Fails on a database error, or a value that cannot be carried
    /// exactly (naming table, column and the row).
    pub async fn poll(
        &self,
        pool: &PgPool,
        bound: &str,
        limit: i64,
    ) -> Result<Vec<Row>, PollError> {
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
        rows.into_iter().map(|r| self.encode(r)).collect()
    }

    fn encode(&self, r: RawRow) -> Result<Row, PollError> {
        let position = (r.ts, r.inc);
        let err = |source| PollError::Value {
            table: self.table.name.to_string(),
            position: position.clone(),
            source: Box::new(source),
        };
        let fields = parse_record(&r.row).map_err(err)?;
        let key_fields: Vec<Option<&str>> = self
            .key_index
            .iter()
            .map(|&i| fields.get(i).and_then(|f| f.as_deref()))
            .collect();
        let mut value = Vec::with_capacity(r.row.len() + 64);
        let variants = self
            .row
            .encode(&fields_bytes(&fields), &mut value)
            .map_err(err)?;
        let mut key = Vec::with_capacity(32);
        let key_variants = self
            .key
            .encode(
                &key_fields
                    .iter()
                    .map(|f| f.map(str::as_bytes))
                    .collect::<Vec<_>>(),
                &mut key,
            )
            .map_err(err)?;
        let key = String::from_utf8(key).expect("the codec writes UTF-8");
        let value = String::from_utf8(value).expect("the codec writes UTF-8");
        Ok(Row {
            key: self.keys.get(&key_variants).render(&key),
            value: self.values.get(&variants).render(&value),
            position,
        })
    }

    /// The stored form of a position.
    pub fn encode_position(position: &(String, i64)) -> Vec<u8> {
        SourcePosition::TimestampIncrementing(TimestampPosition {
            timestamp: position.0.clone(),
            incrementing: position.1,
        })
        .encode()
    }
}

fn fields_bytes<'a>(fields: &'a [Field<'a>]) -> Vec<Option<&'a [u8]>> {
    fields
        .iter()
        .map(|f| f.as_deref().map(str::as_bytes))
        .collect()
}

/// `timestamp+incrementing` mode: every table polled in turn until it is
/// caught up, a batch per Kafka transaction with that table's position.
pub struct TimestampMode {
    cfg: TimestampConfig,
    pool: PgPool,
    offsets_topic: String,
    readers: Vec<TimestampReader>,
    /// The round in progress: the table polled next and its bound, read
    /// before the poll's own snapshot (a separate statement), which is what
    /// makes it safe.
    round: Option<(usize, String)>,
    /// The table the last batch came from.
    last: usize,
    wakeup: Wakeup,
    /// A NOTIFY woke the last wait: rows committed just then may sit inside
    /// the clock guard, so the next wait only lasts until it has passed.
    follow_up: bool,
}

impl TimestampMode {
    /// Prepares every table and reads their stored positions.
    ///
    /// Fails when a table's columns do not suit the mode, or a stored
    /// position belongs to another mode.
    pub async fn new(
        cfg: TimestampConfig,
        connector: &str,
        pool: &PgPool,
        tables: Vec<(TableInfo, String)>,
        stored: &HashMap<Vec<u8>, Vec<u8>>,
        offsets_topic: &str,
        schemas: (bool, bool),
    ) -> anyhow::Result<Self> {
        let mut readers = Vec::new();
        let types = TypeCache::new();
        let mut conn = pool.acquire().await?;
        for (info, topic) in tables {
            let key = position_key(connector, &info.name.to_string());
            let shape = CatalogShape::load(&mut conn, &types, info.oid)
                .await?
                .with_context(|| format!("table {} is gone", info.name))?;
            let mut r = TimestampReader::new(
                info,
                shape,
                topic,
                key,
                &cfg.timestamp_column,
                &cfg.incrementing_column,
                &cfg.db_timezone,
                schemas,
            )?;
            match stored.get(&r.position_key).map(|b| SourcePosition::decode(b)).transpose()? {
                Some(SourcePosition::TimestampIncrementing(p)) => {
                    tracing::info!(table = %r.table.name, timestamp = %p.timestamp, incrementing = p.incrementing, "resuming from stored position");
                    r.position = Some((p.timestamp, p.incrementing));
                }
                Some(other) => bail!(
                    "the stored position of connector {connector} is for another mode ({other:?}): use a new connector name to change modes"
                ),
                None => match cfg.initial {
                    Some(ms) => {
                        r.start_at(pool, ms).await?;
                        tracing::info!(table = %r.table.name, position = ?r.position, "no stored position, starting at timestamp.initial");
                    }
                    None => {
                        tracing::info!(table = %r.table.name, "no stored position, reading the table from the beginning")
                    }
                },
            }
            readers.push(r);
        }
        Ok(Self {
            wakeup: Wakeup::new(pool, cfg.listen).await,
            cfg,
            pool: pool.clone(),
            offsets_topic: offsets_topic.to_owned(),
            readers,
            round: None,
            last: 0,
            follow_up: false,
        })
    }
}

impl Capture for TimestampMode {
    type Saved = (Vec<Option<(String, i64)>>, Option<(usize, String)>);

    fn save(&self) -> Self::Saved {
        (
            self.readers.iter().map(|r| r.position.clone()).collect(),
            self.round.clone(),
        )
    }

    fn restore(&mut self, (positions, _): Self::Saved) {
        for (r, p) in self.readers.iter_mut().zip(positions) {
            r.position = p;
        }
        // The next round starts over with fresh bounds.
        self.round = None;
    }

    async fn next(&mut self, shutdown: &CancellationToken) -> Result<Option<Batch>, SourceError> {
        loop {
            let (i, bound) = match self.round.take() {
                Some(round) => round,
                None if shutdown.is_cancelled() => return Ok(None),
                None => (0, String::new()),
            };
            let Some(r) = self.readers.get_mut(i) else {
                // Every table is caught up: the round is over.
                return Ok(None);
            };
            let bound = if bound.is_empty() {
                r.bound(&self.pool, self.cfg.delay_ms)
                    .await
                    .map_err(|e| SourceError::postgres("cannot read the poll's bound", e))?
            } else {
                bound
            };
            let started = std::time::Instant::now();
            let rows = r
                .poll(&self.pool, &bound, self.cfg.batch_max_rows)
                .await
                .map_err(|e| match e {
                    PollError::Postgres(e) => {
                        SourceError::postgres("cannot read the source table", e)
                    }
                    value => SourceError::Definite(value.into()),
                })?;
            let n = rows.len();
            tracing::debug!(table = %r.table.name, rows = n, bound = %bound, read = ?started.elapsed(), "polled");
            let Some(last) = rows.last().map(|row| row.position.clone()) else {
                self.round = Some((i + 1, String::new()));
                continue;
            };
            // A full batch may have more behind it: the same table again,
            // with the same bound, unless stopping.
            self.round = if (n as i64) < self.cfg.batch_max_rows || shutdown.is_cancelled() {
                Some((i + 1, String::new()))
            } else {
                Some((i, bound))
            };
            let records = rows
                .into_iter()
                .map(|row| Record {
                    topic: r.topic.clone(),
                    key: row.key,
                    value: Some(row.value),
                })
                .collect();
            r.position = Some(last);
            self.last = i;
            return Ok(Some(Batch {
                records,
                rows: n,
                newest_change_ms: None,
                what: "batch committed",
                more: false,
            }));
        }
    }

    fn position_record(&self) -> Record {
        let r = &self.readers[self.last];
        Record {
            topic: self.offsets_topic.clone(),
            key: r.position_key.clone(),
            value: r.position.as_ref().map(TimestampReader::encode_position),
        }
    }

    async fn committed(&mut self, done: &Committed) {
        let r = &self.readers[self.last];
        let (timestamp, incrementing) = r.position.clone().unwrap_or_default();
        tracing::info!(
            table = %r.table.name,
            topic = %r.topic,
            rows = done.rows,
            timestamp = %timestamp,
            incrementing,
            commit = ?done.commit,
            "{}", done.what
        );
    }

    async fn wait(&mut self, shutdown: &CancellationToken) {
        // Rows committed just as a NOTIFY came may sit inside the clock
        // guard; look again once it has passed, then fall back to the poll
        // interval.
        let wait = if std::mem::take(&mut self.follow_up) {
            Duration::from_millis(CLOCK_GUARD_MS as u64 + 10)
        } else {
            self.cfg.poll_interval
        };
        self.follow_up = self.wakeup.wait(wait, shutdown).await;
    }

    fn zero_lag_when_caught_up(&self) -> bool {
        false
    }
}
