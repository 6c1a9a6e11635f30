//! `changelog` mode: reads the change log schema-init's triggers fill, and
//! sends every insert, update and delete as a Debezium-style change event.
//!
//! Commit-safe order without logical decoding: pg-source takes a snapshot
//! (`pg_current_snapshot()`) and sends the changes of the transactions that
//! became visible since the previous one, table by table in `seq` order. A
//! transaction still open is in neither snapshot's visible set, so it is sent
//! in a later batch, once it has committed: nothing is missed, however long
//! it runs, and a rolled-back transaction is never visible at all. Batches
//! follow commit order; inside a batch two changes of one row are in `seq`
//! order, which is their commit order too, since the second writer had to
//! wait for the first's row lock.
//!
//! The initial snapshot reads every row in one `repeatable read`
//! transaction whose snapshot is where streaming starts, so there is neither
//! a gap nor an overlap between the two. A snapshot interrupted by a crash
//! resumes after its last key in a new snapshot; the key ranges read in later
//! snapshots are kept as segments in the position, and a change already
//! contained in a segment's rows is skipped.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::TryStreamExt as _;
use sqlx::PgPool;
use tidemark_common::envelope::{
    either_payload_sql, out_of_range_sql, payload_and_wide_sql, payload_sql, wide_columns, Change,
    ChangeEnvelope, Op, RecordTemplates,
};
use tidemark_common::health::now_ms;
use tidemark_common::offset::{ChangeLogPosition, Segment, SnapshotProgress, SourcePosition};
use tidemark_common::pg::quote_ident;

use crate::catalog::TableInfo;
use crate::producer::Record;

/// One captured table.
#[derive(Debug)]
pub struct ChangeTable {
    /// The table.
    pub info: TableInfo,
    /// Its topic.
    pub topic: String,
    /// Its name as the triggers write it (`format('%I.%I')`).
    pub log_name: String,
    key_template: RecordTemplates,
    envelope: ChangeEnvelope,
    /// The envelope of wide changes, whose `timestamp` columns are ISO text
    /// because a value in `before` or `after` does not fit int64
    /// microseconds; `None` when the table has no `timestamp` column.
    wide_envelope: Option<ChangeEnvelope>,
    sql_changes: String,
    /// `logical` mode: renders decoded changes passed as arrays, with the
    /// same expressions as `sql_changes` (see [`crate::logical_mode`]).
    pub(crate) sql_render: String,
    sql_snapshot_first: String,
    sql_snapshot_after: String,
}

#[derive(sqlx::FromRow)]
pub(crate) struct ChangeRow {
    seq: i64,
    txid: String,
    op: String,
    changed_ms: i64,
    before: Option<String>,
    after: Option<String>,
    key_before: Option<String>,
    key_after: Option<String>,
    wide: bool,
    key_before_wide: bool,
    key_after_wide: bool,
}

#[derive(sqlx::FromRow)]
struct SnapshotRow {
    raw_key: serde_json::Value,
    key: String,
    key_wide: bool,
    after: String,
    wide: bool,
}

impl ChangeTable {
    /// Prepares the queries of a table.
    ///
    /// Fails when the table has no primary key or no capture (triggers, or
    /// with `logical` its publication and full replica identity).
    pub async fn new(
        pool: &PgPool,
        info: TableInfo,
        topic: String,
        connector: &str,
        database: &str,
        logical: bool,
    ) -> anyhow::Result<Self> {
        let name = info.name.clone();
        if info.key.is_empty() {
            bail!("table {name} has no primary key, so its changes cannot be keyed: add one, or use mode timestamp+incrementing");
        }
        let (log_name, has_trigger): (String, bool) = sqlx::query_as(
            "select format('%I.%I', $1::text, $2::text),
                    exists (select 1 from pg_trigger where tgrelid = to_regclass($3)
                            and tgname in ('tidemark_capture', 'tidemark_capture_insert'))",
        )
        .bind(&name.schema)
        .bind(&name.name)
        .bind(name.quoted())
        .fetch_one(pool)
        .await?;
        if logical {
            let publication = tidemark_common::pg::publication_name(&name);
            let (published, identity): (bool, String) = sqlx::query_as(
                "select exists (select 1 from pg_publication_tables
                                where pubname = $1 and schemaname = $2 and tablename = $3),
                        (select relreplident::text from pg_class where oid = to_regclass($4))",
            )
            .bind(&publication)
            .bind(&name.schema)
            .bind(&name.name)
            .bind(name.quoted())
            .fetch_one(pool)
            .await?;
            if !published || identity != "f" {
                bail!("table {name} has no logical capture (publication {publication} and replica identity full): run schema-init --capture logical --table {name}");
            }
            let generated: Option<String> = sqlx::query_scalar(
                "select string_agg(attname::text, ', ' order by attnum) from pg_attribute
                 where attrelid = to_regclass($1) and attnum > 0 and not attisdropped and attgenerated <> ''",
            )
            .bind(name.quoted())
            .fetch_one(pool)
            .await?;
            if let Some(columns) = generated {
                bail!("table {name} has generated columns ({columns}), whose values logical decoding does not send: capture it with --capture changelog and mode changelog");
            }
        } else if !has_trigger {
            bail!("table {name} has no change-log trigger: run schema-init --capture changelog --table {name}");
        }
        let t = name.quoted();
        let key_cols: Vec<String> = info.key.iter().map(|c| quote_ident(&c.name)).collect();
        let order = key_cols
            .iter()
            .map(|c| format!("t.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        // A key given as to_jsonb of the key columns, as typed values: each
        // field cast from its text to the column's type, so the comparison
        // uses the primary key's index.
        let typed_key = |param: &str| {
            info.key
                .iter()
                .map(|c| {
                    format!(
                        "({param}->>{})::{}",
                        quote_literal(&c.name),
                        info.sql_type(&c.name)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let raw_key = format!(
            "(select to_jsonb(\"tidemark.key\") from (select {}) \"tidemark.key\")",
            info.key
                .iter()
                .map(|c| format!("t.{}", quote_ident(&c.name)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let (key, key_wide) = payload_and_wide_sql(&info.key, "t");
        let (after, wide) = payload_and_wide_sql(&info.columns, "t");
        let snapshot = |filter: &str, limit: &str| {
            format!(
                "select {raw_key} as raw_key, {key} as key, {key_wide} as key_wide, \
                 {after} as after, {wide} as wide \
                 from (select * from {t} t {filter} order by {order} limit {limit}) t order by {order}"
            )
        };
        let sql_snapshot_first = snapshot("", "$1");
        let sql_snapshot_after = snapshot(
            &format!("where ({order}) > ({})", typed_key("$1::jsonb")),
            "$2",
        );
        // The key of a changed row, for the segment check.
        let changed_key = info
            .key
            .iter()
            .map(|c| {
                let q = quote_ident(&c.name);
                format!("coalesce(a.{q}, b.{q})")
            })
            .collect::<Vec<_>>()
            .join(", ");
        // One envelope schema covers `before` and `after`, so a change is
        // wide when either side is, and both sides are then rendered wide.
        // Keys are judged on their own: a key's bytes depend on its value
        // only, as partitioning and compaction need.
        let (wide, before, after, wide_join) = match (
            out_of_range_sql(&info.columns, "b"),
            out_of_range_sql(&info.columns, "a"),
        ) {
            (Some(wb), Some(wa)) => {
                let w = "\"tidemark.w\".wide";
                (
                    w.to_owned(),
                    either_payload_sql(&info.columns, "b", w),
                    either_payload_sql(&info.columns, "a", w),
                    format!("cross join lateral (select {wb} or {wa} as wide) \"tidemark.w\""),
                )
            }
            _ => (
                "false".to_owned(),
                payload_sql(&info.columns, "b"),
                payload_sql(&info.columns, "a"),
                String::new(),
            ),
        };
        let (key_before, key_before_wide) = payload_and_wide_sql(&info.key, "b");
        let (key_after, key_after_wide) = payload_and_wide_sql(&info.key, "a");
        // The columns of a change row, from its row images `b` and `a`.
        let images = format!(
            r#"case when l.before is not null then {before} end as before,
                      case when l.after is not null then {after} end as after,
                      case when l.before is not null then {key_before} end as key_before,
                      case when l.after is not null then {key_after} end as key_after,
                      {wide} as wide, {key_before_wide} as key_before_wide,
                      {key_after_wide} as key_after_wide"#
        );
        let joins = format!(
            r#"cross join lateral jsonb_populate_record(null::{t}, l.before) b
               cross join lateral jsonb_populate_record(null::{t}, l.after) a
               {wide_join}"#
        );
        // Not already in the rows of a snapshot segment (jsonb `param`).
        let outside_segments = |txid: &str, param: &str| {
            format!(
                r#"not exists (
                   select 1 from jsonb_array_elements({param}::jsonb) as "tidemark.seg"(seg)
                   where pg_visible_in_snapshot({txid}, ("tidemark.seg".seg->>'snapshot')::pg_snapshot)
                     and (jsonb_typeof("tidemark.seg".seg->'lo') is distinct from 'object' or ({changed_key}) > ({lo}))
                     and (jsonb_typeof("tidemark.seg".seg->'hi') is distinct from 'object' or ({changed_key}) <= ({hi})))"#,
                lo = typed_key("(\"tidemark.seg\".seg->'lo')"),
                hi = typed_key("(\"tidemark.seg\".seg->'hi')"),
            )
        };
        let sql_changes = format!(
            r#"select l.seq, l.txid::text as txid, l.op::text as op,
                      (extract(epoch from l.changed_at) * 1000)::int8 as changed_ms,
                      {images}
               from tidemark.change_log l
               {joins}
               where l.table_name = $1 and l.seq > $2
                 and l.txid >= pg_snapshot_xmin($3::pg_snapshot)
                 and l.txid < pg_snapshot_xmax($4::pg_snapshot)
                 and pg_visible_in_snapshot(l.txid, $4::pg_snapshot)
                 and not pg_visible_in_snapshot(l.txid, $3::pg_snapshot)
                 and {segments}
               order by l.seq
               limit $6"#,
            segments = outside_segments("l.txid", "$5"),
        );
        // Logical mode: the same expressions over decoded changes passed as
        // arrays (row images as jsonb of each column's text); transactions
        // the initial snapshot already holds are left out as above.
        let sql_render = format!(
            r#"select l.lsn as seq, l.txid, l.op, l.changed_ms,
                      {images}
               from unnest($1::int8[], $2::int8[], $3::text[], $4::text[], $5::int8[], $6::text[]::jsonb[], $7::text[]::jsonb[])
                    as l(ord, lsn, txid, op, changed_ms, before, after)
               {joins}
               where not pg_visible_in_snapshot(l.txid::xid8, $8::pg_snapshot)
                 and {segments}
               order by l.ord"#,
            segments = outside_segments("l.txid::xid8", "$9"),
        );
        let envelope = |columns: &[_]| {
            ChangeEnvelope::new(connector, database, &name.schema, &name.name, columns)
        };
        Ok(Self {
            key_template: RecordTemplates::new(
                &format!("{connector}.{}.{}.Key", name.schema, name.name),
                &info.key,
            ),
            envelope: envelope(&info.columns),
            wide_envelope: out_of_range_sql(&info.columns, "t")
                .map(|_| envelope(&wide_columns(&info.columns))),
            info,
            topic,
            log_name,
            sql_changes,
            sql_render,
            sql_snapshot_first,
            sql_snapshot_after,
        })
    }

    /// Leaves the Connect schema out of keys and/or values
    /// (`schemas.enable=false`).
    pub fn drop_schemas(&mut self, keys: bool, values: bool) {
        if keys {
            self.key_template = RecordTemplates::schemaless();
        }
        if values {
            self.envelope = self.envelope.clone().without_schema();
            // Without a schema a wide row needs no envelope of its own.
            self.wide_envelope = None;
        }
    }

    /// The envelope of a change, wide or not.
    fn envelope_for(&self, wide: bool) -> &ChangeEnvelope {
        match (&self.wide_envelope, wide) {
            (Some(e), true) => e,
            _ => &self.envelope,
        }
    }
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// What one read produced.
#[derive(Default)]
pub struct Chunk {
    /// Records for Kafka, in order.
    pub records: Vec<Record>,
    /// Rows (changes or snapshot rows) read.
    pub rows: usize,
    /// When the newest change in the chunk was made, ms since the epoch.
    pub newest_change_ms: Option<i64>,
    /// The chunk ends its batch: its position already says so, and the
    /// change log can be pruned once it is committed.
    pub batch_done: bool,
}

/// The change-log reader with its position.
pub struct ChangeLogReader {
    /// The tables, in the order they are read.
    pub tables: Vec<ChangeTable>,
    /// Where reading stands.
    pub position: ChangeLogPosition,
    /// Send a tombstone (null value) after each delete, for compaction.
    pub tombstones: bool,
    /// Rows per chunk (and per Kafka transaction).
    pub chunk: i64,
    /// Where the position is stored in the offsets topic.
    pub position_key: Vec<u8>,
    /// The offsets topic.
    pub offsets_topic: String,
    /// Sent log rows may remain after the last prune.
    pub prune_pending: bool,
    /// `logical` mode: the position is stored as [`SourcePosition::Logical`].
    pub logical: bool,
}

impl ChangeLogReader {
    /// The position as a record for the offsets topic.
    pub fn position_record(&self) -> Record {
        Record {
            topic: self.offsets_topic.clone(),
            key: self.position_key.clone(),
            value: Some(
                if self.logical {
                    SourcePosition::Logical(self.position.clone())
                } else {
                    SourcePosition::ChangeLog(self.position.clone())
                }
                .encode(),
            ),
        }
    }

    /// Starts from nothing: takes the snapshot streaming starts at. With
    /// `initial_snapshot`, every existing row is sent first.
    ///
    /// Fails on a database error.
    pub async fn start(&mut self, pool: &PgPool, initial_snapshot: bool) -> anyhow::Result<()> {
        let done: String = sqlx::query_scalar("select pg_current_snapshot()::text")
            .fetch_one(pool)
            .await?;
        self.position = ChangeLogPosition {
            done,
            ..Default::default()
        };
        if initial_snapshot {
            self.position.snapshot = Some(SnapshotProgress {
                tables: self.tables.iter().map(|t| t.log_name.clone()).collect(),
                last_key: None,
                rows: 0,
            });
        }
        Ok(())
    }

    /// Reads the next chunk of changes, or `None` when caught up. Advances
    /// the in-memory position; the caller commits the records together with
    /// [`Self::position_record`], or calls [`Self::rewind`] when that fails.
    ///
    /// Fails on a database error.
    pub async fn next_changes(&mut self, pool: &PgPool) -> Result<Option<Chunk>, sqlx::Error> {
        if self.position.batch.is_none() {
            let cur: String = sqlx::query_scalar("select pg_current_snapshot()::text")
                .fetch_one(pool)
                .await?;
            if cur == self.position.done {
                return Ok(None);
            }
            self.position.batch = Some(cur);
        }
        let cur = self.position.batch.clone().expect("set above");
        let last_table = self.tables.len().saturating_sub(1);
        for (i, table) in self.tables.iter().enumerate() {
            let after_seq = self
                .position
                .after_seq
                .get(&table.log_name)
                .copied()
                .unwrap_or(0);
            let segments = serde_json::to_value(
                self.position
                    .segments
                    .get(&table.log_name)
                    .cloned()
                    .unwrap_or_default(),
            )
            .expect("segments always serialise");
            let rows: Vec<ChangeRow> = sqlx::query_as(&table.sql_changes)
                .bind(&table.log_name)
                .bind(after_seq)
                .bind(&self.position.done)
                .bind(&cur)
                .bind(segments)
                .bind(self.chunk)
                .fetch_all(pool)
                .await?;
            let Some(last) = rows.last().map(|r| r.seq) else {
                continue;
            };
            let n = rows.len();
            let mut records = Vec::with_capacity(n + n / 8);
            let read_ms = now_ms();
            for r in &rows {
                self.render_change(table, r, read_ms, &mut records);
            }
            self.position.after_seq.insert(table.log_name.clone(), last);
            let newest_change_ms = rows.iter().map(|r| r.changed_ms).max();
            // Fewer rows than asked from the last table (the tables before
            // it had none left): the batch ends with this chunk, so the same
            // Kafka transaction records it, sparing one per batch.
            let batch_done = i == last_table && (n as i64) < self.chunk;
            if batch_done {
                self.finish_batch(pool, cur).await?;
            }
            return Ok(Some(Chunk {
                records,
                rows: n,
                newest_change_ms,
                batch_done,
            }));
        }
        // Every table has sent the batch: it is done.
        self.finish_batch(pool, cur).await?;
        Ok(None)
    }

    /// Marks the batch read up to snapshot `cur` as done.
    async fn finish_batch(&mut self, pool: &PgPool, cur: String) -> Result<(), sqlx::Error> {
        self.position.done = cur;
        self.position.batch = None;
        self.position.after_seq.clear();
        self.drop_old_segments(pool).await
    }

    pub(crate) fn render_change(
        &self,
        table: &ChangeTable,
        r: &ChangeRow,
        read_ms: i64,
        out: &mut Vec<Record>,
    ) {
        let txid = r.txid.parse::<u64>().ok();
        let envelope = table.envelope_for(r.wide);
        let change = |op, before: Option<&str>, after: Option<&str>| {
            envelope.render(&Change {
                op,
                before,
                after,
                changed_ms: r.changed_ms,
                txid,
                seq: Some(r.seq),
                snapshot: "false",
                read_ms,
            })
        };
        let record = |key: &str, key_wide: bool, value: Vec<u8>| Record {
            topic: table.topic.clone(),
            key: table.key_template.render(key, key_wide),
            value: Some(value),
        };
        let tombstone = |key: &str, key_wide: bool| Record {
            topic: table.topic.clone(),
            key: table.key_template.render(key, key_wide),
            value: None,
        };
        let (kbw, kaw) = (r.key_before_wide, r.key_after_wide);
        let (before, after) = (r.before.as_deref(), r.after.as_deref());
        match (
            r.op.as_str(),
            r.key_before.as_deref(),
            r.key_after.as_deref(),
        ) {
            ("c", _, Some(k)) => out.push(record(k, kaw, change(Op::Create, None, after))),
            ("u", Some(kb), Some(ka)) if kb != ka => {
                // The primary key changed: the old key is deleted, the new
                // one created, as Debezium does.
                out.push(record(kb, kbw, change(Op::Delete, before, None)));
                if self.tombstones {
                    out.push(tombstone(kb, kbw));
                }
                out.push(record(ka, kaw, change(Op::Create, None, after)));
            }
            ("u", _, Some(k)) => out.push(record(k, kaw, change(Op::Update, before, after))),
            ("d", Some(k), _) => {
                out.push(record(k, kbw, change(Op::Delete, before, None)));
                if self.tombstones {
                    out.push(tombstone(k, kbw));
                }
            }
            (op, _, _) => {
                tracing::warn!(seq = r.seq, op, table = %table.info.name, "skipping a change-log row that is not c, u or d")
            }
        }
    }

    /// Forgets segments whose snapshot lies wholly below `done`: their
    /// transactions are excluded as done already.
    async fn drop_old_segments(&mut self, pool: &PgPool) -> Result<(), sqlx::Error> {
        // Built aside and swapped in whole, so an error leaves the segments
        // as they were.
        let done = &self.position.done;
        let mut kept = std::collections::BTreeMap::new();
        for (table, segments) in &self.position.segments {
            let mut keep = Vec::new();
            for s in segments {
                let old: bool = sqlx::query_scalar(
                    "select pg_snapshot_xmax($1::pg_snapshot) <= pg_snapshot_xmin($2::pg_snapshot)",
                )
                .bind(&s.snapshot)
                .bind(done)
                .fetch_one(pool)
                .await?;
                if !old {
                    keep.push(s.clone());
                }
            }
            if !keep.is_empty() {
                kept.insert(table.clone(), keep);
            }
        }
        self.position.segments = kept.into_iter().collect();
        Ok(())
    }

    /// Deletes up to [`PRUNE_CHUNK`] change-log rows of this reader's tables
    /// that are sent and committed to Kafka (visible in `done`), and notes
    /// whether more are left. One chunk at a time, so a backlog (a bulk
    /// load, a long stop) is pruned over the next polls instead of holding
    /// up the stream: 100k rows took 270 ms in one go.
    ///
    /// Fails on a database error.
    pub async fn prune(&mut self, pool: &PgPool) -> Result<u64, sqlx::Error> {
        let names: Vec<String> = self.tables.iter().map(|t| t.log_name.clone()).collect();
        let n = sqlx::query(
            "delete from tidemark.change_log where seq in (
               select seq from tidemark.change_log
               where table_name = any($1) and txid < pg_snapshot_xmax($2::pg_snapshot)
                 and pg_visible_in_snapshot(txid, $2::pg_snapshot)
               limit $3)",
        )
        .bind(&names)
        .bind(&self.position.done)
        .bind(PRUNE_CHUNK)
        .execute(pool)
        .await?
        .rows_affected();
        self.prune_pending = n as i64 >= PRUNE_CHUNK;
        Ok(n)
    }
}

/// Log rows deleted per prune.
pub const PRUNE_CHUNK: i64 = 5000;

/// The initial snapshot: a `repeatable read` transaction and its progress.
pub struct SnapshotRun {
    /// Rolled back if dropped, so a stopped snapshot never leaves its
    /// snapshot on a pooled connection.
    tx: Option<sqlx::Transaction<'static, sqlx::Postgres>>,
    /// Rows in all tables at the start, for progress.
    pub total: i64,
    started: Instant,
    last_log: Instant,
    started_rows: u64,
}

impl SnapshotRun {
    /// Opens the snapshot transaction. On a fresh start its snapshot must be
    /// the reader's `done`; on a resume after a crash, the rest of the tables
    /// are read in this new snapshot and recorded as segments.
    ///
    /// Fails on a database error.
    pub async fn open(
        pool: &PgPool,
        reader: &mut ChangeLogReader,
        fresh: bool,
    ) -> anyhow::Result<Self> {
        let mut tx = pool.begin().await?;
        sqlx::query("set transaction isolation level repeatable read, read only")
            .execute(&mut *tx)
            .await?;
        let snap: String = sqlx::query_scalar("select pg_current_snapshot()::text")
            .fetch_one(&mut *tx)
            .await?;
        let progress = reader
            .position
            .snapshot
            .clone()
            .context("no snapshot to run")?;
        if fresh {
            // Streaming starts exactly where the snapshot's rows end.
            reader.position.done = snap;
        } else {
            for (i, name) in progress.tables.iter().enumerate() {
                let lo = if i == 0 {
                    progress.last_key.clone()
                } else {
                    None
                };
                let segments = reader.position.segments.entry(name.clone()).or_default();
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
        for name in &progress.tables {
            if let Some(t) = reader.tables.iter().find(|t| &t.log_name == name) {
                let n: i64 =
                    sqlx::query_scalar(&format!("select count(*) from {}", t.info.name.quoted()))
                        .fetch_one(&mut *tx)
                        .await?;
                total += n;
            }
        }
        tracing::info!(
            rows = total + progress.rows as i64,
            tables = progress.tables.len(),
            "initial snapshot started"
        );
        Ok(Self {
            tx: Some(tx),
            total: total + progress.rows as i64,
            started: Instant::now(),
            last_log: Instant::now(),
            started_rows: progress.rows,
        })
    }

    /// Reads the next chunk of snapshot rows as `op: r` events, or `None`
    /// when every table is read (the snapshot is then over).
    ///
    /// Fails on a database error.
    pub async fn next(&mut self, reader: &mut ChangeLogReader) -> anyhow::Result<Option<Chunk>> {
        loop {
            let Some(progress) = reader.position.snapshot.as_mut() else {
                return Ok(None);
            };
            let Some(name) = progress.tables.first().cloned() else {
                reader.position.snapshot = None;
                return Ok(None);
            };
            let table = reader
                .tables
                .iter()
                .find(|t| t.log_name == name)
                .with_context(|| {
                    format!("the stored position names table {name}, which is not configured")
                })?;
            let tx = self
                .tx
                .as_mut()
                .context("the snapshot transaction is closed")?;
            // Each row becomes its record as it arrives, so a chunk is held
            // once, as records, and not also as rows.
            let mut stream = match &progress.last_key {
                None => sqlx::query_as::<_, SnapshotRow>(&table.sql_snapshot_first)
                    .bind(reader.chunk)
                    .fetch(&mut **tx),
                Some(k) => sqlx::query_as::<_, SnapshotRow>(&table.sql_snapshot_after)
                    .bind(k)
                    .bind(reader.chunk)
                    .fetch(&mut **tx),
            };
            let read_ms = now_ms();
            let mut records = Vec::with_capacity(reader.chunk as usize);
            let mut last_key = None;
            while let Some(r) = stream.try_next().await? {
                records.push(Record {
                    topic: table.topic.clone(),
                    key: table.key_template.render(&r.key, r.key_wide),
                    value: Some(table.envelope_for(r.wide).render(&Change {
                        op: Op::Read,
                        before: None,
                        after: Some(&r.after),
                        changed_ms: read_ms,
                        txid: None,
                        seq: None,
                        snapshot: "true",
                        read_ms,
                    })),
                });
                last_key = Some(r.raw_key);
            }
            drop(stream);
            if records.is_empty() {
                progress.tables.remove(0);
                progress.last_key = None;
                tracing::info!(table = %table.info.name, "snapshot of table done");
                if progress.tables.is_empty() {
                    reader.position.snapshot = None;
                    if let Some(tx) = self.tx.take() {
                        tx.commit().await?;
                    }
                    tracing::info!(rows = self.total, elapsed = ?self.started.elapsed(), "initial snapshot done; streaming changes");
                    return Ok(None);
                }
                continue;
            }
            let n = records.len();
            progress.last_key = last_key;
            progress.rows += n as u64;
            if self.last_log.elapsed() >= Duration::from_secs(2) {
                self.log_progress(progress.rows);
                self.last_log = Instant::now();
            }
            return Ok(Some(Chunk {
                records,
                rows: n,
                newest_change_ms: None,
                batch_done: false,
            }));
        }
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
