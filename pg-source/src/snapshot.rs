//! The initial snapshot of `changelog` and `logical` modes: every existing
//! row as an `op: r` event, read in one `repeatable read` transaction whose
//! snapshot is where streaming starts, so there is neither a gap nor an
//! overlap between the two.
//!
//! Rows are read in primary-key order, `snapshot.fetch.size` rows a chunk
//! (2,048), and a Kafka transaction holds chunks until it has
//! [`SNAPSHOT_TXN_ROWS`] rows or has been open [`SNAPSHOT_TXN_TIME`]: each
//! chunk goes to the producer as it is read, and the next is read once
//! Kafka has acknowledged all but 4,096 of the records sent, so memory holds
//! about what one 5,000-row batch did, and the position, the last key sent,
//! is committed with the transaction's last chunk. A snapshot interrupted by a crash
//! resumes after its last key in a new snapshot; the key ranges read in
//! later snapshots are kept as segments in the position, and a change
//! already contained in a segment's rows is left out by the mode that
//! streams.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::TryStreamExt as _;
use sqlx::PgPool;
use std::sync::Arc;

use anyhow::bail;
use serde_json::Value;
use tidemark_common::codec::{parse_record, TypeCache};
use tidemark_common::envelope::{now_us, Change, Op, Sequence, SnapshotMark, TxPlace, UnitEnd};
use tidemark_common::offset::{count_event, Segment, SnapshotProgress, SnapshotState};

use crate::errors::SourceError;
use crate::modes::Batch;
use crate::producer::Record;
use crate::shape::{key_after_sql, key_order_sql, stored_key_texts, CatalogShape, Shape};
use crate::table::CapturedTable;

/// A position that holds an initial snapshot's part.
pub trait SnapshotPosition {
    /// The initial snapshot's part of the position.
    fn snapshot_state(&mut self) -> SnapshotState<'_>;
}

impl SnapshotPosition for tidemark_common::offset::ChangeLogPosition {
    fn snapshot_state(&mut self) -> SnapshotState<'_> {
        self.snapshot_state()
    }
}

impl SnapshotPosition for tidemark_common::offset::LogicalPosition {
    fn snapshot_state(&mut self) -> SnapshotState<'_> {
        self.snapshot_state()
    }
}

/// The initial snapshot as a mode runs it: its transaction while it is
/// open, reopened after a lost connection.
#[derive(Default)]
pub struct InitialSnapshot {
    run: Option<SnapshotRun>,
    /// The Kafka transaction the chunks go into: when its first chunk was
    /// read, and the rows it holds.
    txn: Option<(Instant, usize)>,
}

/// An initial snapshot's Kafka transaction commits once it holds this many
/// rows (`snapshot.transaction.max.rows`): a commit costs the broker about 10 ms, whatever it holds, so
/// chunk-sized transactions (1,000 rows) spent half a snapshot's time in
/// commits. Memory does not grow with it: each chunk is handed to the
/// producer's bounded queue as it is read (`TxProducer::send_part`).
pub const SNAPSHOT_TXN_ROWS: usize = 100_000;

/// ... or once it has been open this long, so progress is committed often
/// and a transaction stays far below Kafka's transaction timeout.
pub const SNAPSHOT_TXN_TIME: Duration = Duration::from_secs(2);

impl InitialSnapshot {
    /// Opens the snapshot when the position says one is in progress:
    /// `fresh` when it begins now (its snapshot becomes where streaming
    /// starts), else it resumes in a new snapshot.
    ///
    /// Fails on a database error.
    pub async fn start<T: AsRef<CapturedTable>, P: SnapshotPosition>(
        pool: &PgPool,
        types: &TypeCache,
        tables: &[T],
        position: &mut P,
        fresh: bool,
    ) -> anyhow::Result<Self> {
        let state = position.snapshot_state();
        if state.progress.is_none() {
            return Ok(Self::default());
        }
        Ok(Self {
            run: Some(SnapshotRun::open(pool, types, tables, state, fresh).await?),
            txn: None,
        })
    }

    /// The next chunk of the initial snapshot as a batch (an empty one
    /// records its end), or `None` when no snapshot runs. A snapshot
    /// transaction lost with its connection (or after a failed batch) is
    /// reopened first: the rest is read in a new one and recorded as
    /// segments.
    ///
    /// Fails on a database error; whatever the failed read moved is read
    /// again after the caller restores the position.
    pub async fn step<T: AsRef<CapturedTable>, P: SnapshotPosition>(
        &mut self,
        pool: &PgPool,
        types: &TypeCache,
        tables: &[T],
        position: &mut P,
        (chunk, txn_rows): (i64, usize),
    ) -> Result<Option<Batch>, SourceError> {
        if position.snapshot_state().progress.is_none() {
            return Ok(None);
        }
        if self.run.is_none() {
            let run = SnapshotRun::open(pool, types, tables, position.snapshot_state(), false)
                .await
                .map_err(SourceError::from_anyhow)?;
            self.run = Some(run);
        }
        let run = self.run.as_mut().expect("opened above");
        match run.next(tables, position.snapshot_state(), chunk).await {
            Ok(Some(chunk)) => {
                let over = position.snapshot_state().progress.is_none();
                if over {
                    self.run = None;
                }
                let (began, rows) = self.txn.unwrap_or((Instant::now(), 0));
                let rows = rows + chunk.rows;
                let more = !over && rows < txn_rows && began.elapsed() < SNAPSHOT_TXN_TIME;
                self.txn = more.then_some((began, rows));
                Ok(Some(Batch {
                    records: chunk.records,
                    rows: chunk.rows,
                    newest_change_ms: None,
                    what: if over {
                        "initial snapshot committed"
                    } else {
                        "snapshot chunk committed"
                    },
                    more,
                }))
            }
            Ok(None) => {
                self.run = None;
                self.txn = None;
                // The snapshot's end is a position too.
                Ok(Some(Batch {
                    what: "initial snapshot committed",
                    ..Batch::default()
                }))
            }
            Err(e) => {
                self.run = None;
                self.txn = None;
                Err(SourceError::from_anyhow(e))
            }
        }
    }
}

/// The progress to store when a snapshot of `tables` begins.
pub fn begin<T: AsRef<CapturedTable>>(tables: &[T]) -> SnapshotProgress {
    SnapshotProgress {
        tables: tables.iter().map(|t| t.as_ref().log_name.clone()).collect(),
        last_key: None,
        rows: 0,
        counts: Vec::new(),
        started_us: now_us(),
    }
}

/// One table of the snapshot: its shape as the snapshot transaction sees
/// it.
struct SnapshotTable {
    shape: Arc<Shape>,
}

#[derive(sqlx::FromRow)]
struct SnapshotRow {
    /// `pg_catalog.textin(pg_catalog.record_out(t.*))`: each column by its
    /// type's output function, nothing else.
    row: String,
}

/// Rows read by one step of the snapshot.
pub struct SnapshotChunk {
    /// Records for Kafka, in order.
    pub records: Vec<Record>,
    /// Rows read.
    pub rows: usize,
}

/// The initial snapshot: a `repeatable read` transaction and its progress.
pub struct SnapshotRun {
    /// Rolled back if dropped, so a stopped snapshot never leaves its
    /// snapshot on a pooled connection.
    tx: Option<sqlx::Transaction<'static, sqlx::Postgres>>,
    tables: HashMap<String, SnapshotTable>,
    /// Rows per table in this snapshot: a table with none after the one
    /// being read leaves that one's last row the snapshot's last.
    rows_in: HashMap<String, i64>,
    /// Rows in all tables at the start, for progress.
    pub total: i64,
    started: Instant,
    last_log: Instant,
    started_rows: u64,
}

impl SnapshotRun {
    /// Opens the snapshot transaction. On a fresh start its snapshot becomes
    /// `state.done`, where streaming starts; on a resume after a crash, the
    /// rest of the tables are read in this new snapshot and recorded as
    /// segments. Each table's shape is read inside the transaction, after
    /// its lock: DDL waits until the snapshot is over, so the shape is the
    /// rows' shape.
    ///
    /// Fails on a database error, a table without a primary key, or when no
    /// snapshot is in progress.
    pub async fn open<T: AsRef<CapturedTable>>(
        pool: &PgPool,
        types: &TypeCache,
        tables: &[T],
        state: SnapshotState<'_>,
        fresh: bool,
    ) -> anyhow::Result<Self> {
        let mut tx = pool.begin().await?;
        sqlx::query("set transaction isolation level repeatable read, read only")
            .execute(&mut *tx)
            .await?;
        let snap: String =
            sqlx::query_scalar("select pg_catalog.pg_current_snapshot()::pg_catalog.text")
                .fetch_one(&mut *tx)
                .await?;
        let progress = state.progress.as_mut().context("no snapshot to run")?;
        if progress.started_us == 0 {
            // A snapshot begun by 0.1, which did not record when.
            progress.started_us = now_us();
        }
        let progress = progress.clone();
        if fresh {
            // Streaming starts exactly where the snapshot's rows end.
            *state.done = snap;
        } else {
            for (i, name) in progress.tables.iter().enumerate() {
                let lo = if i == 0 {
                    progress.last_key.clone()
                } else {
                    None
                };
                let segments = state.segments.entry(name.clone()).or_default();
                if let Some(open) = segments.last_mut().filter(|s| s.hi.is_none()) {
                    open.hi = lo.clone();
                }
                segments.push(Segment {
                    snapshot: snap.clone(),
                    lo,
                    hi: None,
                });
            }
            tracing::info!(
                tables = progress.tables.len(),
                rows_done = progress.rows,
                "resuming the initial snapshot in a new snapshot"
            );
        }
        let mut total = 0i64;
        let mut shapes = HashMap::new();
        let mut rows_in = HashMap::new();
        for name in &progress.tables {
            let Some(t) = tables
                .iter()
                .map(AsRef::as_ref)
                .find(|t| &t.log_name == name)
            else {
                continue;
            };
            let n: i64 = sqlx::query_scalar(&format!(
                "select pg_catalog.count(*) from {}",
                t.info.name.quoted()
            ))
            .fetch_one(&mut *tx)
            .await?;
            total += n;
            rows_in.insert(name.clone(), n);
            let shape = CatalogShape::load(&mut tx, types, t.oid)
                .await?
                .with_context(|| format!("table {} is gone", t.info.name))?;
            if shape.key.is_empty() {
                bail!(
                    "table {} has no primary key, so its rows cannot be keyed: add one, or use mode timestamp+incrementing",
                    t.info.name
                );
            }
            shape.literal_safe_key(&t.info.name)?;
            let shape = Shape::new(t.origin.clone(), shape.oid, shape.columns, shape.key)?;
            shapes.insert(
                name.clone(),
                SnapshotTable {
                    shape: Arc::new(shape),
                },
            );
        }
        tracing::info!(
            rows = total + progress.rows as i64,
            tables = progress.tables.len(),
            "initial snapshot started"
        );
        tidemark_common::ops::snapshot_progress(
            progress.rows,
            (total + progress.rows as i64).max(0) as u64,
            progress.tables.len(),
        );
        Ok(Self {
            tx: Some(tx),
            tables: shapes,
            rows_in,
            total: total + progress.rows as i64,
            started: Instant::now(),
            last_log: Instant::now(),
            started_rows: progress.rows,
        })
    }

    /// Reads the next chunk of up to `chunk` snapshot rows as `op: r`
    /// events, or `None` when every table is read (the snapshot is then
    /// over, and `state.progress` is `None`). The chunk that reads the
    /// snapshot's last row also ends the snapshot, and that row carries
    /// `snapshot: last` and the unit's totals.
    ///
    /// Fails on a database error, or a value the codec cannot carry (naming
    /// table, column and key); the caller then drops the run and reopens it
    /// from the stored position.
    pub async fn next<T: AsRef<CapturedTable>>(
        &mut self,
        tables: &[T],
        state: SnapshotState<'_>,
        chunk: i64,
    ) -> anyhow::Result<Option<SnapshotChunk>> {
        let mut records = Vec::new();
        let mut n = 0usize;
        loop {
            let Some(progress) = state.progress.as_mut() else {
                return Ok(None);
            };
            let Some(name) = progress.tables.first().cloned() else {
                *state.progress = None;
                return Ok(None);
            };
            let (table, st) = tables
                .iter()
                .map(AsRef::as_ref)
                .find(|t| t.log_name == name)
                .zip(self.tables.get(&name))
                .with_context(|| {
                    format!("the stored position names table {name}, which is not configured")
                })?;
            let shape = st.shape.clone();
            let tx = self
                .tx
                .as_mut()
                .context("the snapshot transaction is closed")?;
            // One row more than the chunk tells whether the table ends with
            // it. Each row becomes its record as the next arrives, so a
            // chunk is held once, as records, and not also as rows.
            let limit = chunk - n as i64 + 1;
            let after = match &progress.last_key {
                None => None,
                Some(k) => Some(stored_key_texts(k, &shape.key).with_context(|| {
                    format!(
                        "the stored snapshot position of table {name} has an unreadable key: {k}"
                    )
                })?),
            };
            let sql = rows_query(table, &shape, after.as_deref());
            let mut stream = sqlx::query_as::<_, SnapshotRow>(&sql)
                .bind(limit)
                .fetch(&mut **tx);
            let read_us = now_us();
            let later_empty = progress.tables[1..]
                .iter()
                .all(|t| self.rows_in.get(t).copied().unwrap_or(0) == 0);
            let collection = format!("{}.{}", table.info.name.schema, table.info.name.name);
            let render = |r: SnapshotRow,
                          progress: &mut SnapshotProgress,
                          last_of_table: bool|
             -> anyhow::Result<Record> {
                let fields = parse_record(&r.row).with_context(|| {
                    format!(
                        "table {}: a row that is not a composite literal",
                        table.info.name
                    )
                })?;
                let fields: Vec<Option<&[u8]>> = fields
                    .iter()
                    .map(|f| f.as_deref().map(str::as_bytes))
                    .collect();
                let key_texts = shape.key_texts(&fields);
                let encoded = shape
                    .encode_row(&fields)
                    .and_then(|after| Ok((after, shape.encode_key(&fields)?)));
                let (after, key) = encoded.with_context(|| {
                    format!(
                        "table {}, key {}: cannot carry a value exactly",
                        table.info.name,
                        key_display(&shape, &key_texts)
                    )
                })?;
                let first_of_table = !progress.counts.iter().any(|(t, _)| *t == collection);
                let (in_table, total) = count_event(&mut progress.counts, &collection);
                progress.rows = total;
                let last = last_of_table && later_empty;
                let end = last.then(|| UnitEnd {
                    event_count: total,
                    data_collections: progress.counts.clone(),
                });
                let envelope = shape.envelope(None, Some(&after.variants));
                let record = Record {
                    topic: table.topic.clone(),
                    key: shape.key_record(&key),
                    value: Some(envelope.render(&Change {
                        op: Op::Read,
                        before: None,
                        after: Some(&after.json),
                        commit_us: progress.started_us,
                        txid: None,
                        sequence: Sequence::None,
                        snapshot: SnapshotMark::of_row(
                            total == 1,
                            first_of_table,
                            last_of_table,
                            last,
                        ),
                        read_us,
                        transaction: TxPlace {
                            commit_order: 0,
                            // The first unit a connector sends.
                            prev_commit_order: None,
                            total_order: total,
                            data_collection_order: in_table,
                            end: end.as_ref(),
                        },
                    })),
                };
                // The key columns' texts by name: what 0.1 stored (`to_jsonb`
                // of the key columns) reads the same way.
                progress.last_key = Some(Value::Object(
                    shape
                        .key
                        .iter()
                        .zip(key_texts)
                        .map(|(k, t)| (k.name.clone(), t.map_or(Value::Null, Value::String)))
                        .collect(),
                ));
                Ok(record)
            };
            let mut pending: Option<SnapshotRow> = None;
            let mut more = false;
            while let Some(r) = stream.try_next().await? {
                if n as i64 == chunk {
                    more = true;
                    break;
                }
                if let Some(p) = pending.replace(r) {
                    records.push(render(p, progress, false)?);
                }
                n += 1;
            }
            drop(stream);
            if let Some(p) = pending {
                records.push(render(p, progress, !more)?);
            }
            if more {
                break;
            }
            // The table is read: it leaves the position with this chunk.
            progress.tables.remove(0);
            progress.last_key = None;
            tracing::info!(table = %table.info.name, "snapshot of table done");
            if progress.tables.is_empty() {
                let done = progress.rows;
                *state.progress = None;
                if let Some(tx) = self.tx.take() {
                    tx.commit().await?;
                }
                tracing::info!(rows = self.total, elapsed = ?self.started.elapsed(), "initial snapshot done; streaming changes");
                tidemark_common::ops::snapshot_progress(done, self.total.max(0) as u64, 0);
                if records.is_empty() {
                    return Ok(None);
                }
                break;
            }
            if n as i64 == chunk {
                break;
            }
        }
        if !records.is_empty() {
            // Unit 0 is sent: the first streamed unit comes after it.
            state.chain.event_of(0);
        }
        if let Some(progress) = state.progress.as_ref() {
            tidemark_common::ops::snapshot_progress(
                progress.rows,
                self.total.max(0) as u64,
                progress.tables.len(),
            );
            if self.last_log.elapsed() >= Duration::from_secs(2) {
                self.log_progress(progress.rows);
                self.last_log = Instant::now();
            }
        }
        Ok(Some(SnapshotChunk { records, rows: n }))
    }

    fn log_progress(&self, done: u64) {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = (done - self.started_rows) as f64 / secs;
        let left = (self.total as f64 - done as f64).max(0.0);
        let eta = if rate > 0.0 {
            Duration::from_secs_f64(left / rate)
        } else {
            Duration::ZERO
        };
        tracing::info!(
            rows_done = done,
            rows_total = self.total,
            rows_per_sec = rate as u64,
            time_left = %humantime::format_duration(Duration::from_secs(eta.as_secs())),
            "initial snapshot progress"
        );
    }
}

/// A table's rows in key order after the key `after` (all rows without
/// one), up to `$1`, each as its `record_out` text. The bound is written in
/// as literals of the key columns' base types and compared with the key
/// index's own operators, so no cast and no user-resolvable operator runs.
pub(crate) fn rows_query(table: &CapturedTable, shape: &Shape, after: Option<&[String]>) -> String {
    rows_query_of(&table.info.name.quoted(), shape, after)
}

/// [`rows_query`] of the table named `name` (quoted, schema-qualified).
///
/// Only the table's own rows, and its partitions' (the leaves of its
/// partition tree):
/// not those of inheritance children, which its triggers never capture
/// (`only` would read none of a partitioned table's).
pub(crate) fn rows_query_of(name: &str, shape: &Shape, after: Option<&[String]>) -> String {
    let regclass = format!(
        "{}::pg_catalog.regclass",
        tidemark_common::names::quote_literal(name)
    );
    // pg_partition_tree has no row for a table that is not partitioned.
    let own = format!(
        "(t.tableoid operator(pg_catalog.=) {regclass} or t.tableoid operator(pg_catalog.=) any (array(select p.relid from pg_catalog.pg_partition_tree({regclass}) p where p.isleaf)))"
    );
    let filter = match after {
        Some(texts) => format!(
            "where {own} and {}",
            key_after_sql(&shape.key, "t", texts, false)
        ),
        None => format!("where {own}"),
    };
    format!(
        "select pg_catalog.textin(pg_catalog.record_out(t.*)) as row from {} t {filter} order by {} limit $1",
        name,
        key_order_sql(&shape.key, "t"),
    )
}

/// A key for messages: `(7, abc)`.
pub fn key_display(shape: &Shape, texts: &[Option<String>]) -> String {
    let parts: Vec<String> = shape
        .key
        .iter()
        .zip(texts)
        .map(|(k, t)| format!("{}={}", k.name, t.as_deref().unwrap_or("NULL")))
        .collect();
    format!("({})", parts.join(", "))
}
