//! `changelog` mode: reads the change log schema-init's triggers fill, and
//! sends every insert, update, delete and truncate as a Debezium-style
//! change event.
//!
//! Commit-safe order without logical decoding: pg-source takes a snapshot
//! (`pg_current_snapshot()`) and sends the changes of the transactions that
//! became visible since the previous one, as one unit (a batch), in `seq`
//! order across all its tables. A transaction still open is in neither
//! snapshot's visible set, so it is sent in a later batch, once it has
//! committed: nothing is missed, however long it runs, and a rolled-back
//! transaction is never visible at all. Batches follow commit order; inside
//! a batch two changes of one row are in `seq` order, which is their commit
//! order too, since the second writer had to wait for the first's row lock;
//! so a batch applied whole ends in a state the database had.
//!
//! **Shapes.** Each change-log row holds its row images as the `record_out`
//! text the trigger logged and the id of the shape it was written with
//! (`tidemark.shapes`, see [`crate::shapes`]). pg-source decodes it with the
//! codec by that shape, so a row logged before an `ALTER TABLE` is read with
//! the columns and types it had then, and Postgres renders nothing: no
//! `jsonb_populate_record`, no `row_to_json`, no cast. A schema change shows
//! in the events at once: the first change written after it carries the new
//! columns, and its schema says so (the event schema is the one of its
//! shape and of its values' variants). A change of the primary key's
//! columns is a new key schema from that change on.
//!
//! **TRUNCATE.** A table's truncate trigger logs one row of op `t`; it is
//! sent as Debezium's truncate event: op `t`, `before` and `after` null, a
//! null Kafka key, on the table's topic, in its place among the unit's
//! other changes (`seq` order) and counted in the unit's `total_order`,
//! `data_collection_order`, `event_count` and `data_collections` like any
//! other. `TRUNCATE a, b` (and a cascade) is one event per captured table.
//! `skipped.operations=t` leaves them out. A TRUNCATE that a resumed initial
//! snapshot's later segment already follows goes to the dead-letter topic:
//! its earlier segments' rows precede it, and no event could say which.
//!
//! **Tables that go.** A table is followed by its OID, so a renamed table's
//! changes keep going to its topic (its events name the new table). A
//! dropped table's changes logged before the drop are sent; then a log line
//! and `tidemark_source_tables_dropped` say it left, and the other tables
//! go on; the change log is pruned of it; a restart with it still
//! configured neither refuses nor stops. A table whose owner dropped or
//! disabled its change-log triggers stops only itself: an ERROR log and
//! `tidemark_source_tables_uncaptured` say so, and a restart goes on.
//!
//! **Tables that come back.** The position records the OID each table is
//! read as. A change logged under the table's name by another table that is
//! the table of that name now (the one read was dropped, or renamed away,
//! and a new one made and captured) means that one took its place: a WARN
//! says the old one left, and the new one enters the set again, with an
//! incremental snapshot that begins with a TRUNCATE event (its rows from
//! before its capture are in no change log), as a table that left the set
//! and came back. The changes of the old one come before that point (its
//! writers ended before the DDL that freed the name), so they are all sent.
//! A table renamed away whose changes were logged under the other name
//! (sent under it) and that comes back to its name is snapshotted again the
//! same way: a replay of its name lacks those changes. Both are found from
//! the change log itself, so after a crash the same row finds them again,
//! and by a look between batches every 5 s, so a new table never written
//! to (and a table renamed back that logs nothing) gets its snapshot too.
//! A new table of the name without capture logs nothing: a WARN names the
//! schema-init run. When pg-source is behind, the old table's last changes
//! may still be unread at that look: they are then left out with the new
//! table's (the TRUNCATE that begins the snapshot supersedes them).
//!
//! **A value that cannot be carried** (a text its type's codec refuses)
//! goes to the dead-letter topic `tidemark.dead-letter` ([`crate::dead_letter`]) with the table,
//! column, key, error, raw text and position, with an ERROR log and
//! `tidemark_source_dead_letters_total{table}`; it still counts in the
//! unit's `total_order`/`event_count`, so pg-replay sees the gap.
//!
//! The initial snapshot ([`crate::snapshot`]) is read in one `repeatable
//! read` transaction whose snapshot becomes the first `done`, so there is
//! neither a gap nor an overlap between the two; a change already contained
//! in the rows of a segment read after a restart is skipped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::Value;
use sqlx::PgPool;
use tidemark_common::codec::{TypeCache, Variants};
use tidemark_common::envelope::{
    now_us, Change, ChangeEnvelope, Op, RecordTemplate, Sequence, SnapshotMark, TxPlace, UnitEnd,
};
use tidemark_common::names::{self, quote_literal};
use tidemark_common::offset::{
    count_event, position_key, ChangeLogPosition, IncrementalProgress, SourcePosition,
};
use tidemark_common::ops::names as metric;
use tidemark_common::pg::TableName;
use tokio_util::sync::CancellationToken;

use crate::catalog::TableInfo;
use crate::config::ChangeLogConfig;
use crate::errors::SourceError;
use crate::incremental::{self, Incremental};
use crate::log::{self, LogRow, Tables};
use crate::modes::{Batch, Capture, Committed, Wakeup};
use crate::producer::Record;
use crate::shape::{lexicographic_gt, CatalogShape, KeyColumn};
use crate::shapes::{Image, Shape, Shapes};
use crate::signal;
use crate::snapshot::{self, InitialSnapshot};
use crate::table::CapturedTable;
use crate::visibility::PgSnapshot;

/// Log rows deleted per prune.
pub const PRUNE_CHUNK: i64 = 5000;

/// How often to look whether a table was dropped.
const GONE_CHECK: Duration = Duration::from_secs(5);

/// At most this many envelopes and key templates are kept per table; a
/// table whose rows vary more is rendered from fresh ones.
const MAX_TEMPLATES: usize = 512;

/// The snapshot that begins a batch, its time, and the shapes recorded by
/// transactions that ended since `done` ($1): each as `txid snapshot us`,
/// its DDL's transaction, the snapshot the DDL saw, and when.
const SNAPSHOT_AND_SHAPES_SQL: &str = "select c.s::pg_catalog.text, c.us,
  (select pg_catalog.array_agg(pg_catalog.concat_ws(' ', h.txid::pg_catalog.text, h.snapshot::pg_catalog.text,
            (extract(epoch from h.created_at) operator(pg_catalog.*) 1000000)::pg_catalog.int8::pg_catalog.text)
            order by h.id)
     from tidemark.shapes h
    where h.txid is not null and h.snapshot is not null
      and h.txid operator(pg_catalog.>=) pg_catalog.pg_snapshot_xmin($1::pg_catalog.pg_snapshot)
      and pg_catalog.pg_visible_in_snapshot(h.txid, c.s)
      and not pg_catalog.pg_visible_in_snapshot(h.txid, $1::pg_catalog.pg_snapshot))
  from (select pg_catalog.pg_current_snapshot() s,
               (extract(epoch from pg_catalog.clock_timestamp()) operator(pg_catalog.*) 1000000)::pg_catalog.int8 us) c";

/// The shapes recorded by transactions visible in snapshot $2 and not in
/// `done` ($1), as [`SNAPSHOT_AND_SHAPES_SQL`] gives them.
const SHAPES_BETWEEN_SQL: &str = "select pg_catalog.array_agg(pg_catalog.concat_ws(' ', h.txid::pg_catalog.text,
            h.snapshot::pg_catalog.text,
            (extract(epoch from h.created_at) operator(pg_catalog.*) 1000000)::pg_catalog.int8::pg_catalog.text)
            order by h.id)
     from tidemark.shapes h
    where h.txid is not null and h.snapshot is not null
      and h.txid operator(pg_catalog.>=) pg_catalog.pg_snapshot_xmin($1::pg_catalog.pg_snapshot)
      and pg_catalog.pg_visible_in_snapshot(h.txid, $2::pg_catalog.pg_snapshot)
      and not pg_catalog.pg_visible_in_snapshot(h.txid, $1::pg_catalog.pg_snapshot)";

/// Where a batch beginning after `done` ends when a schema change
/// committed in it: at the snapshot its DDL saw (without the DDL's own
/// transaction), joined with `done`. `shapes` are the new shapes'
/// `txid snapshot us` ([`SNAPSHOT_AND_SHAPES_SQL`]). Of several, the
/// earliest: one whose snapshot shows none of the others' DDL. `None`
/// when no snapshot shows a transaction `done` does not (the batch ends
/// where it was taken).
///
/// Why it holds: the DDL held its table's ACCESS EXCLUSIVE lock when its
/// snapshot was taken, so every change written with the old shape belongs
/// to a transaction that ended before (visible in it), and every change
/// with the new one to a transaction that wrote after the DDL committed
/// (not visible). Every transaction the snapshot shows ended before any
/// it does not, so the two batches stay in commit order.
///
/// Fails when a text is not a snapshot.
fn shape_split(done: &str, shapes: Vec<String>) -> anyhow::Result<Option<(String, i64)>> {
    if shapes.is_empty() {
        return Ok(None);
    }
    let done = PgSnapshot::parse(done)?;
    let mut ends = Vec::new();
    for line in &shapes {
        let mut parts = line.split(' ');
        let (Some(txid), Some(snapshot), Some(us)) = (parts.next(), parts.next(), parts.next())
        else {
            bail!("tidemark.shapes gave `{line}`, not a transaction, snapshot and time");
        };
        let txid: u64 = txid
            .parse()
            .with_context(|| format!("tidemark.shapes gave transaction `{txid}`"))?;
        let us: i64 = us
            .parse()
            .with_context(|| format!("tidemark.shapes gave time `{us}`"))?;
        let seen = PgSnapshot::parse(snapshot)?.hiding(txid);
        if seen.shows_more_than(&done) {
            ends.push((txid, seen, us));
        }
    }
    let earliest = ends
        .iter()
        .position(|(_, seen, _)| !ends.iter().any(|(other, _, _)| seen.visible(*other)))
        .unwrap_or(0);
    Ok(ends
        .get(earliest)
        .map(|(_, seen, us)| (done.union(seen).to_string(), *us)))
}

/// One configured table, as the change log knows it.
struct LogTable {
    /// The table as configured.
    name: TableName,
    /// Its name as the change log and positions write it
    /// (`format('%I.%I')`).
    log_name: String,
    topic: String,
    /// Its OIDs: the table now and any it was before (dropped and created
    /// again, captured again).
    relids: Vec<i64>,
    /// It no longer exists: said once.
    gone: bool,
    /// It exists, but no enabled change-log trigger captures it: said once
    /// per change.
    uncaptured: bool,
    /// The name its last change was logged under, when not `log_name`
    /// (renamed): said once per name.
    renamed_to: Option<String>,
    /// OIDs its rows were logged with that are an older table of its name
    /// than the one read (dropped before it was made): read as the table.
    older: Vec<i64>,
    /// Value envelopes by (shape, before variants, after variants).
    envelopes: HashMap<(i32, Variants, Variants), Arc<ChangeEnvelope>>,
    /// Key templates by (shape, key variants).
    keys: HashMap<(i32, Variants), Arc<RecordTemplate>>,
}

/// `changelog` mode: the change log read batch by batch, with the initial
/// snapshot first.
pub struct ChangeLogMode {
    cfg: ChangeLogConfig,
    pool: PgPool,
    connector: String,
    database: String,
    /// Leave the Connect schema out of keys, values.
    drop_schemas: (bool, bool),
    /// The tables that exist, for the initial snapshot.
    tables: Vec<CapturedTable>,
    /// Every configured table.
    log_tables: Vec<LogTable>,
    /// What the change-log query reads.
    reading: Tables,
    shapes: Shapes,
    /// Where reading stands.
    position: ChangeLogPosition,
    /// The initial snapshot's transaction, while it runs.
    snapshot: InitialSnapshot,
    /// Types, for the shapes and the snapshot.
    types: Arc<TypeCache>,
    /// Where the position is stored in the offsets topic.
    position_key: Vec<u8>,
    offsets_topic: String,
    /// Sent log rows may remain after the last prune.
    prune_pending: bool,
    /// The last batch ended its snapshot-difference batch, so the change
    /// log can be pruned once it is committed.
    prune_after_commit: bool,
    last_gone_check: Instant,
    /// When [`Self::take_over_now`] last looked.
    last_takeover_check: Instant,
    wakeup: Wakeup,
    /// Incremental snapshots of tables that entered the set.
    incremental: Incremental,
    /// The key index's columns (operators, collations) of the tables whose
    /// initial snapshot was resumed (`format('%I.%I')`): the stream compares
    /// changes' keys with the snapshot segments' bounds as the snapshot
    /// ordered its rows.
    segment_keys: HashMap<String, Vec<KeyColumn>>,
    /// How to find and add tables that come to match a pattern.
    pub discovery: Option<Discovery>,
    /// Tables a pattern matches that cannot be read (no capture, a topic
    /// clash): said once each.
    told: std::collections::HashSet<TableName>,
    /// Where heartbeats go (`None`: they are off).
    heartbeat_topic: Option<String>,
    /// The signal table cannot be read (absent, no privilege): said once,
    /// not asked again until a restart.
    signals_unreadable: bool,
    /// `tidemark.shapes` records each DDL's transaction and snapshot, so a
    /// batch ends at a schema change (a schema-init before this release
    /// made it without them).
    shape_snapshots: bool,
    /// When the last batch was committed (or pg-source started).
    last_sent: Instant,
    /// The time of the last snapshot that showed nothing left to send:
    /// every batch taken before it is sent.
    caught_up_us: Option<i64>,
    /// Tables (`log_tables` indexes) that enter the set again in the chunk
    /// being read: a new table took the name of the one read, or the one
    /// read came back to its name after it was renamed away. Each gets its
    /// snapshot once the chunk's rows before that point are filtered.
    reentries: Vec<usize>,
    /// When the last snapshot that began a batch was taken: the next is
    /// taken `batch.linger.ms` after it at the soonest.
    batch_taken: Option<Instant>,
    /// A chunk of the last batch was full (`batch.max.rows`): the next
    /// snapshot is taken at once.
    batch_full: bool,
    /// The last changes kept of a chunk that did not end its batch, held
    /// back (decoded and filtered) to go with the next chunk, and the
    /// `seq` that chunk read up to: see [`ChangeLogMode::next_changes`].
    held: Vec<Result<Decoded, Box<DeadLetter>>>,
    held_to: Option<i64>,
}

/// What finding tables while running needs: the patterns of
/// `table.include.list`, and how to name and create their topics.
pub struct Discovery {
    /// The patterns.
    pub patterns: Vec<crate::config::TablePattern>,
    /// `topic.prefix`.
    pub prefix: String,
    /// Creates topics.
    pub admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>,
    /// How a new topic looks.
    pub topic: tidemark_common::kafka::TopicSpec,
    /// Tidemark's own topics, which no table may write to: (what, name).
    pub reserved: Vec<(String, String)>,
}

/// [`Batch::what`] of a heartbeat.
const HEARTBEAT: &str = "heartbeat";

/// One change-log row decoded with its shape.
struct Decoded {
    row: LogRow,
    shape: Arc<Shape>,
    /// Index into `log_tables`.
    table: usize,
    before: Option<Image>,
    after: Option<Image>,
    /// Logged after its table entered the set again in this batch (see
    /// [`ChangeLogMode::reentries`]): left out, as the table's snapshot
    /// holds it.
    fresh: bool,
}

/// Why a change-log row cannot be sent.
struct DeadLetter {
    row: LogRow,
    table: usize,
    column: Option<String>,
    error: String,
}

impl ChangeLogMode {
    /// Prepares every table and reads the stored position; without one,
    /// starts now (with the initial snapshot when configured).
    ///
    /// `infos` are the configured tables that exist, `gone` those that no
    /// longer do (their changes in the change log are still sent).
    ///
    /// Fails when a table is not captured, the change log is not version 2,
    /// or a stored position belongs to another mode.
    #[allow(clippy::too_many_arguments)]
    pub async fn new(
        cfg: ChangeLogConfig,
        connector: &str,
        database: &str,
        pool: &PgPool,
        infos: Vec<(TableInfo, String)>,
        gone: Vec<(TableName, String)>,
        stored: &HashMap<Vec<u8>, Vec<u8>>,
        offsets_topic: &str,
        (key_schemas, value_schemas): (bool, bool),
    ) -> anyhow::Result<Self> {
        check_change_log(pool).await?;
        let mut tables = Vec::new();
        let mut log_tables = Vec::new();
        for (info, topic) in infos {
            let name = info.name.clone();
            let trigger = check_trigger(pool, &name).await;
            let table = CapturedTable::new(
                pool,
                info,
                topic.clone(),
                connector,
                database,
                (key_schemas, value_schemas),
            )
            .await?;
            let t = LogTable::new(pool, name, topic).await?;
            // A table captured once whose triggers its owner dropped stops
            // only itself (said by check_gone below); one never captured is
            // a configuration error.
            if let Err(e) = trigger {
                if t.relids.is_empty() {
                    return Err(e);
                }
            }
            log_tables.push(t);
            tables.push(table);
        }
        for (name, topic) in gone {
            log_tables.push(LogTable::new(pool, name, topic).await?);
        }
        for t in &log_tables {
            if t.relids.is_empty() {
                bail!(
                    "table {} has no shape in {}: run schema-init --capture changelog --table {}",
                    t.name,
                    names::SHAPES,
                    t.name
                );
            }
        }
        let reading = reading(&log_tables);
        let position_key = position_key(connector, names::CHANGE_LOG);
        let stored = stored
            .get(&position_key)
            .map(|b| SourcePosition::decode(b))
            .transpose()?;
        let (mut position, fresh) = match stored {
            Some(SourcePosition::ChangeLog(p)) => {
                tracing::info!(done = %p.done, snapshot_running = p.snapshot.is_some(), "resuming from stored position");
                (p, false)
            }
            Some(other) => bail!(
                "the stored position of connector {connector} is for another mode ({other:?}): use a new connector name to change modes"
            ),
            None => {
                let done: String =
                    sqlx::query_scalar("select pg_catalog.pg_current_snapshot()::pg_catalog.text")
                        .fetch_one(pool)
                        .await?;
                let snapshot = cfg.initial_snapshot.then(|| snapshot::begin(&tables));
                tracing::info!(initial_snapshot = cfg.initial_snapshot, "no stored position, starting now");
                (
                    ChangeLogPosition {
                        done,
                        snapshot,
                        ..Default::default()
                    },
                    true,
                )
            }
        };
        // A table dropped while its snapshot was pending has nothing left
        // to read there.
        if let Some(progress) = position.snapshot.as_mut() {
            let exists: Vec<&str> = tables.iter().map(|t| t.log_name.as_str()).collect();
            if progress
                .tables
                .first()
                .is_some_and(|t| !exists.contains(&t.as_str()))
            {
                progress.last_key = None;
            }
            progress.tables.retain(|t| exists.contains(&t.as_str()));
        }
        let shape_snapshots: bool = sqlx::query_scalar(
            "select pg_catalog.count(*) operator(pg_catalog.=) 2 from pg_catalog.pg_attribute a
              where a.attrelid operator(pg_catalog.=) pg_catalog.to_regclass('tidemark.shapes')
                and a.attname operator(pg_catalog.=) any (array['txid', 'snapshot']::pg_catalog.name[])
                and not a.attisdropped",
        )
        .fetch_one(pool)
        .await?;
        if !shape_snapshots {
            tracing::warn!(
                "tidemark.shapes was made by an older schema-init and records no DDL's snapshot: run schema-init \
                 again. Until then a schema change can fall inside a batch, and pg-replay --schema-changes apply \
                 stops there"
            );
        }
        let types = Arc::new(TypeCache::new());
        let mut mode = Self {
            wakeup: Wakeup::new(pool, cfg.listen).await,
            cfg,
            pool: pool.clone(),
            connector: connector.to_owned(),
            database: database.to_owned(),
            drop_schemas: (!key_schemas, !value_schemas),
            tables,
            log_tables,
            reading,
            shapes: Shapes::new(types.clone()),
            position,
            snapshot: InitialSnapshot::default(),
            types,
            position_key,
            offsets_topic: offsets_topic.to_owned(),
            // Rows sent before a stop may be left: prune them from the start.
            prune_pending: true,
            prune_after_commit: false,
            last_gone_check: Instant::now(),
            last_takeover_check: Instant::now(),
            incremental: Incremental::default(),
            segment_keys: HashMap::new(),
            discovery: None,
            told: std::collections::HashSet::new(),
            heartbeat_topic: None,
            signals_unreadable: false,
            shape_snapshots,
            last_sent: Instant::now(),
            caught_up_us: None,
            batch_taken: None,
            batch_full: false,
            held: Vec::new(),
            held_to: None,
            reentries: Vec::new(),
        };
        mode.heartbeat_topic = mode.cfg.heartbeat_topic(connector);
        mode.reconcile();
        mode.check_gone().await?;
        mode.snapshot =
            InitialSnapshot::start(pool, &mode.types, &mode.tables, &mut mode.position, fresh)
                .await?;
        Ok(mode)
    }

    /// Batching by time: before a new snapshot of the change log, waits
    /// until `batch.linger.ms` has passed since the last one that began a
    /// batch, so under a steady stream of commits one batch (and one Kafka
    /// transaction, unless it fills a chunk) holds every commit of a
    /// linger. No wait inside a batch, after a batch that filled a chunk
    /// (pg-source is behind), or when the last batch began longer ago than
    /// the linger (the first commits after a pause go at once). Returns
    /// `false` when stopped meanwhile.
    async fn linger(&self, shutdown: &CancellationToken) -> bool {
        if self.position.batch.is_some() || self.batch_full {
            return true;
        }
        let Some(left) = self
            .batch_taken
            .map(|t| (t + self.cfg.batch_linger).saturating_duration_since(Instant::now()))
            .filter(|left| !left.is_zero())
        else {
            return true;
        };
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(left) => true,
        }
    }

    /// Reads the next chunk of changes, or `None` when caught up. Advances
    /// the in-memory position. A chunk takes up to `batch.max.rows` changes
    /// of the batch in `seq` order across the tables, and one more is asked
    /// for to know whether the chunk ends the batch: then the chunk's last
    /// event carries the batch's totals, and the same Kafka transaction
    /// records the batch as done.
    ///
    /// Fails on a database error, or when a row's shape cannot be read.
    async fn next_changes(&mut self) -> Result<Option<Batch>, SourceError> {
        let pg = |what: &'static str| move |e: sqlx::Error| SourceError::postgres(what, e);
        let had_rows = !self.position.after_seq.is_empty();
        if self.position.batch.is_none() {
            let taken = Instant::now();
            let (cur, at_us, shapes): (String, i64, Option<Vec<String>>) = if self.shape_snapshots {
                sqlx::query_as(SNAPSHOT_AND_SHAPES_SQL)
                    .bind(&self.position.done)
                    .fetch_one(&self.pool)
                    .await
            } else {
                sqlx::query_as(
                    "select pg_catalog.pg_current_snapshot()::pg_catalog.text,
                            (extract(epoch from pg_catalog.clock_timestamp()) operator(pg_catalog.*) 1000000)::pg_catalog.int8,
                            null::pg_catalog.text[]",
                )
                .fetch_one(&self.pool)
                .await
            }
            .map_err(pg("cannot take a snapshot"))?;
            if cur == self.position.done {
                self.caught_up_us = Some(at_us);
                return Ok(None);
            }
            let (batch, batch_us, split) = self.batch_end(shapes, cur, at_us)?;
            let done = self.position.done.clone();
            self.read_signals(&done, &batch).await?;
            self.position.batch = Some(batch);
            self.position.batch_us = Some(batch_us);
            self.batch_taken = Some(taken);
            // The rest follows at once.
            self.batch_full = split;
        }
        let cur = self.position.batch.clone().expect("set above");
        // Every table's changes up to the same seq are read (a 0.1 position
        // may have them apart: rows up to a table's own are skipped).
        let after_seq = self
            .log_tables
            .iter()
            .map(|t| {
                self.position
                    .after_seq
                    .get(&t.log_name)
                    .copied()
                    .unwrap_or(0)
            })
            .min()
            .unwrap_or(0);
        // Past what is held back, the log was read already.
        let after_seq = self.held_to.map_or(after_seq, |h| h.max(after_seq));
        let chunk = self.cfg.batch_max_rows;
        let mut rows = log::read(
            &self.pool,
            &self.reading,
            after_seq,
            &self.position.done,
            &cur,
            chunk + 1,
        )
        .await
        .map_err(pg("cannot read the change log"))?;
        let more = rows.len() as i64 > chunk;
        self.batch_full |= more;
        rows.truncate(chunk as usize);
        let Some(last_seq) = rows
            .last()
            .map(|r| r.seq)
            .or(self.held_to.filter(|_| !self.held.is_empty()))
        else {
            // Every change of the batch is sent: it is done.
            let taken_us = self.position.batch_us;
            self.finish_batch(cur)
                .await
                .map_err(pg("cannot finish the batch"))?;
            if had_rows {
                // Record it, then prune.
                self.prune_after_commit = true;
                return Ok(Some(Batch {
                    what: "batch done",
                    ..Batch::default()
                }));
            }
            self.caught_up_us = taken_us;
            return Ok(None);
        };
        let n = rows.len();
        let newest_change_ms = rows.iter().map(|r| r.changed_us.div_euclid(1000)).max();
        let mut decoded = self.decode(rows).await?;
        decoded.retain(|d| !matches!(d, Ok(d) if d.fresh));
        self.load_segment_keys().await?;
        let decoded = self.outside_segments(decoded).await?;
        self.load_incremental_key().await?;
        let decoded = self.before_incremental(decoded).await?;
        for i in std::mem::take(&mut self.reentries) {
            self.reenter(i);
        }
        let mut decoded = {
            let mut d = std::mem::take(&mut self.held);
            d.extend(decoded);
            d
        };
        self.held_to = None;
        for t in &self.log_tables {
            self.position.after_seq.insert(t.log_name.clone(), last_seq);
        }
        // The batch goes on in the next chunk, whose changes the filters
        // may all leave out (the incremental snapshot's, a resumed initial
        // snapshot's segments, skipped.operations): the unit's totals then
        // have no event of that chunk to go on. So the last change kept
        // (and any dead letters after it) waits for the next chunk, which
        // sends it, with the totals if that chunk ends the batch; the
        // position has the batch read up to just before it, so a restart
        // reads it, and what the filters left out after it, again.
        if more {
            if let Some(k) = decoded.iter().rposition(|d| d.is_ok()) {
                self.held = decoded.split_off(k);
                self.held_to = Some(last_seq);
                let first = match &self.held[0] {
                    Ok(d) => d.row.seq,
                    Err(d) => d.row.seq,
                };
                for t in &self.log_tables {
                    self.position
                        .after_seq
                        .insert(t.log_name.clone(), first - 1);
                }
            }
        }
        if decoded.is_empty() {
            if !more {
                self.finish_batch(cur)
                    .await
                    .map_err(pg("cannot finish the batch"))?;
                self.prune_after_commit = true;
            }
            return Ok(Some(Batch {
                rows: n,
                what: "changes committed",
                ..Batch::default()
            }));
        }
        if self.position.unit_counts.is_empty() {
            // The batch's first events: its place in commit order.
            self.position.commit_order += 1;
        }
        let read_us = now_us();
        let commit_us = self.position.batch_us.unwrap_or(read_us);
        let mut records = Vec::with_capacity(decoded.len() + decoded.len() / 8);
        // The unit's totals go on its last event; dead letters after it
        // still count in them.
        let last_event = decoded.iter().rposition(|d| d.is_ok());
        let mut counts = std::mem::take(&mut self.position.unit_counts);
        let end_counts = (!more).then(|| {
            let mut c = counts.clone();
            for d in &decoded {
                let table = match d {
                    Ok(d) => d.table,
                    Err(d) => d.table,
                };
                let collection = self.data_collection(table);
                count_event(&mut c, &collection);
                if let Ok(d) = d {
                    if self.key_changed(d) {
                        count_event(&mut c, &collection);
                    }
                }
            }
            c
        });
        for (k, d) in decoded.into_iter().enumerate() {
            match d {
                Ok(d) => {
                    let end = end_counts.as_ref().filter(|_| Some(k) == last_event);
                    self.render(&d, commit_us, read_us, &mut counts, end, &mut records);
                }
                Err(dead) => {
                    // A unit of dead letters only is a unit sent too.
                    self.position.chain.event_of(self.position.commit_order);
                    let collection = self.data_collection(dead.table);
                    let (_, total_order) = count_event(&mut counts, &collection);
                    records.push(self.dead_letter(&dead, total_order));
                }
            }
        }
        self.position.unit_counts = counts;
        if !more {
            self.finish_batch(cur)
                .await
                .map_err(pg("cannot finish the batch"))?;
        }
        self.prune_after_commit = !more;
        Ok(Some(Batch {
            records,
            rows: n,
            newest_change_ms,
            what: "changes committed",
            more: false,
        }))
    }

    /// Decodes `rows` with their shapes (read once per shape id). A row of
    /// a table not configured under this OID but under its name (dropped
    /// and created again) adds the OID.
    async fn decode(
        &mut self,
        rows: Vec<LogRow>,
    ) -> Result<Vec<Result<Decoded, Box<DeadLetter>>>, SourceError> {
        let ids: Vec<i32> = rows.iter().map(|r| r.shape).collect();
        self.shapes
            .load(&self.pool, &ids)
            .await
            .map_err(SourceError::from_anyhow)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let Some(table) = self.table_of(&row) else {
                continue;
            };
            if self.enters_again(table, &row).await && !self.reentries.contains(&table) {
                self.reentries.push(table);
            }
            // With no snapshot to hold them (`no_data`), they are sent.
            let fresh = self.cfg.initial_snapshot && self.reentries.contains(&table);
            if self.cfg.skipped.skips(&row.op) {
                // skipped.operations: not sent, not counted.
                continue;
            }
            if row.seq
                <= self
                    .position
                    .after_seq
                    .get(&self.log_tables[table].log_name)
                    .copied()
                    .unwrap_or(0)
            {
                // Sent before a 0.1 position was stored.
                continue;
            }
            let shape = self.shapes.get(row.shape).expect("loaded above");
            let t = &mut self.log_tables[table];
            if row.table_name != t.log_name
                && t.renamed_to.as_deref() != Some(row.table_name.as_str())
            {
                tracing::warn!(table = %t.name, now = %row.table_name, topic = %t.topic, "table renamed; its changes keep going to its topic: name the new table in table.whitelist");
                t.renamed_to = Some(row.table_name.clone());
            }
            let image = |text: &Option<String>| -> Result<Option<Image>, tidemark_common::codec::CodecError> {
                text.as_deref().map(|t| shape.decode(t)).transpose()
            };
            let decoded = image(&row.before).and_then(|b| Ok((b, image(&row.after)?)));
            out.push(match decoded {
                Ok((before, after)) => {
                    let missing = match row.op.as_str() {
                        "d" => before.is_none(),
                        // A TRUNCATE has no row image.
                        "t" => false,
                        _ => after.is_none(),
                    };
                    if missing {
                        Err(Box::new(DeadLetter {
                            error: format!(
                                "a change-log row of op {:?} without its row image",
                                row.op
                            ),
                            column: None,
                            table,
                            row,
                        }))
                    } else {
                        Ok(Decoded {
                            row,
                            shape,
                            table,
                            before,
                            after,
                            fresh,
                        })
                    }
                }
                Err(e) => Err(Box::new(DeadLetter {
                    column: match &e {
                        tidemark_common::codec::CodecError::Value { column, .. } => {
                            Some(column.clone())
                        }
                        _ => None,
                    },
                    error: e.to_string(),
                    table,
                    row,
                })),
            });
        }
        Ok(out)
    }

    /// The configured table a row belongs to, by its shape's OID, else by
    /// its name (then the OID is added).
    fn table_of(&mut self, row: &LogRow) -> Option<usize> {
        if let Some(i) = self
            .log_tables
            .iter()
            .position(|t| t.relids.contains(&row.relid))
        {
            return Some(i);
        }
        let i = self
            .log_tables
            .iter()
            .position(|t| t.log_name == row.table_name)?;
        self.log_tables[i].relids.push(row.relid);
        self.reading = reading(&self.log_tables);
        Some(i)
    }

    /// Whether the row of `table` means that the table enters the set again
    /// here: its OID is a table logged under the configured name that is
    /// not the one read ([`ChangeLogPosition::oids`]) and is the table of
    /// that name now: it takes the place of the one read (dropped or
    /// renamed away); or the table read logs under its configured name
    /// again after it was renamed away ([`ChangeLogPosition::away`]). Either way the
    /// archive's rows of the name are stale from here: its snapshot begins
    /// with a TRUNCATE event. Says which in the log.
    async fn enters_again(&mut self, table: usize, row: &LogRow) -> bool {
        let t = &self.log_tables[table];
        let at_name = row.table_name == t.log_name;
        let log_name = t.log_name.clone();
        let read = self.tables.iter().position(|c| c.log_name == log_name);
        let followed = self
            .position
            .oids
            .get(&log_name)
            .map(|o| i64::from(*o))
            .or(read.map(|j| i64::from(self.tables[j].oid)));
        if followed == Some(row.relid) {
            if !at_name {
                self.position.away.insert(log_name);
                return false;
            }
            if !self.position.away.remove(&log_name) {
                return false;
            }
            tracing::warn!(table = %t.name, "the table was renamed away and is back under its name: what the archive holds of it under this name lacks its changes logged under the other one, so it enters the set again");
            return true;
        }
        if !at_name || t.older.contains(&row.relid) {
            return false;
        }
        let name = t.name.clone();
        match TableInfo::load(&self.pool, &name).await {
            Ok(Some(info)) if i64::from(info.oid) == row.relid => {
                self.take_place(table, info).await
            }
            // An older table of the name (dropped, its rows logged before
            // the one read was made), or gone again since: read as the
            // table, as ever.
            Ok(_) => {
                self.log_tables[table].older.push(row.relid);
                false
            }
            Err(e) => {
                tracing::error!(table = %name, error = %format!("{e:#}"), "a new table of the name of a table read is logged, but cannot be read; its changes are sent as they come, without a snapshot");
                false
            }
        }
    }

    /// The table `info`, the one of the name of table `table` now, takes
    /// the place of the one read (dropped, or renamed away): it is read from
    /// here on. Returns whether it could be read; the caller has it enter
    /// the set again ([`Self::reenter`]).
    async fn take_place(&mut self, table: usize, info: TableInfo) -> bool {
        let t = &self.log_tables[table];
        let (name, topic, log_name) = (t.name.clone(), t.topic.clone(), t.log_name.clone());
        let oid = info.oid;
        let captured = match CapturedTable::new(
            &self.pool,
            info,
            topic,
            &self.connector,
            &self.database,
            (!self.drop_schemas.0, !self.drop_schemas.1),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(table = %name, error = %format!("{e:#}"), "a new table of the name of a table read is captured, but cannot be read; its changes are sent as they come, without a snapshot");
                return false;
            }
        };
        let old = match self.tables.iter().position(|c| c.log_name == log_name) {
            Some(j) => std::mem::replace(&mut self.tables[j], captured).oid,
            None => {
                self.tables.push(captured);
                0
            }
        };
        let t = &mut self.log_tables[table];
        if !t.relids.contains(&i64::from(oid)) {
            t.relids.push(i64::from(oid));
            self.reading = reading(&self.log_tables);
        }
        self.position.away.remove(&log_name);
        self.position.oids.insert(log_name, oid);
        tracing::warn!(table = %name, old_oid = old, new_oid = oid,
            "the table read so far left the set (dropped, or renamed away: its changes logged before are sent), and a new table of its name is captured: that one is read from here on, and its rows are sent by an incremental snapshot");
        true
    }

    /// Between batches, each table whose name is now another table's,
    /// captured (the one read was dropped, or renamed away, and a new one
    /// made and captured), or that came back to its name after it was
    /// renamed away, enters the set again now, even if it is never written
    /// to (its rows are in no change log row); a change logged does the
    /// same in [`Self::enters_again`]. A table of the name without capture
    /// is said once, with the schema-init run.
    async fn take_over_now(&mut self) {
        if self.position.batch.is_some() {
            return;
        }
        for i in 0..self.log_tables.len() {
            let t = &self.log_tables[i];
            let (name, log_name) = (t.name.clone(), t.log_name.clone());
            let followed = self.position.oids.get(&log_name).copied().or_else(|| {
                self.tables
                    .iter()
                    .find(|c| c.log_name == log_name)
                    .map(|c| c.oid)
            });
            let Ok(Some(info)) = TableInfo::load(&self.pool, &name).await else {
                continue;
            };
            if Some(info.oid) == followed {
                if self.position.away.remove(&log_name) {
                    tracing::warn!(table = %name, "the table was renamed away and is back under its name: what the archive holds of it under this name lacks its changes logged under the other one, so it enters the set again");
                    self.reenter(i);
                }
                continue;
            }
            if check_trigger(&self.pool, &name).await.is_err() {
                if self.told.insert(name.clone()) {
                    tracing::warn!(table = %name, "a new table has the name of a table read (which was dropped or renamed away), without change-log capture, so none of its changes are read: run schema-init --capture changelog --table {name}; then it is read, and its rows are sent by an incremental snapshot");
                }
                continue;
            }
            self.told.remove(&name);
            if self.take_place(i, info).await {
                self.reenter(i);
            }
        }
    }

    /// Table `i` enters the set again (see [`Self::enters_again`]): its
    /// incremental snapshot, queued in place of any it had, begins with a
    /// TRUNCATE event; with `snapshot.mode` `no_data`, its changes are sent
    /// from here on.
    fn reenter(&mut self, i: usize) {
        let t = &self.log_tables[i];
        let log_name = t.log_name.clone();
        metrics::counter!(metric::SOURCE_TABLES_ADDED, "table" => log_name.clone()).increment(1);
        self.position.incremental.retain(|p| p.table != log_name);
        if self
            .incremental
            .pending
            .as_ref()
            .is_some_and(|c| c.table == log_name)
        {
            self.incremental.pending = None;
        }
        if self.cfg.initial_snapshot {
            tracing::info!(table = %t.name, topic = %t.topic, "table entered the set again: its rows are sent by an incremental snapshot, which begins with a TRUNCATE event, while every table streams");
            self.position.incremental.push(IncrementalProgress {
                table: log_name,
                reason: "re-entered".to_owned(),
                since_us: now_us(),
                ..Default::default()
            });
        } else {
            tracing::info!(table = %t.name, topic = %t.topic, "table entered the set again: its changes from now on are sent (snapshot.mode no_data: its existing rows are not)");
        }
        metrics::gauge!(metric::SOURCE_INCREMENTAL_TABLES_LEFT)
            .set(self.position.incremental.len() as f64);
    }

    /// Whether a change moves its row to another key (its key's text
    /// changed): it is then a delete of the old key and a create of the new.
    fn key_changed(&self, d: &Decoded) -> bool {
        d.row.op == "u" && matches!((&d.before, &d.after), (Some(b), Some(a)) if b.key != a.key)
    }

    /// `schema.table` as `data_collections` names the table.
    fn data_collection(&self, table: usize) -> String {
        let t = &self.log_tables[table].name;
        format!("{}.{}", t.schema, t.name)
    }

    /// Leaves out the changes a snapshot segment's rows already hold: of a
    /// transaction visible in the segment's snapshot, with a key in its
    /// range. Key ranges are compared in Postgres with the key's literals,
    /// written as the columns' base types (no cast, no domain check runs).
    async fn outside_segments(
        &self,
        decoded: Vec<Result<Decoded, Box<DeadLetter>>>,
    ) -> Result<Vec<Result<Decoded, Box<DeadLetter>>>, SourceError> {
        if self.position.segments.is_empty() {
            return Ok(decoded);
        }
        let mut checks = Vec::new();
        let mut truncated_under_segment = std::collections::HashSet::new();
        for (i, d) in decoded.iter().enumerate() {
            let Ok(d) = d else { continue };
            let t = &self.log_tables[d.table];
            let Some(segments) = self.position.segments.get(&t.log_name) else {
                continue;
            };
            for s in segments {
                let visible = PgSnapshot::parse(&s.snapshot)
                    .is_ok_and(|snap| u64::try_from(d.row.txid).is_ok_and(|x| snap.visible(x)));
                if d.row.op == "t" {
                    // A TRUNCATE some segment's rows already follow while
                    // earlier segments' rows precede it: no event says
                    // exactly which rows it removed from the snapshot.
                    if visible {
                        truncated_under_segment.insert(i);
                    }
                    continue;
                }
                if visible {
                    // The key of the row the change leaves (a delete's), else
                    // the one it makes.
                    let image = d.after.as_ref().or(d.before.as_ref()).expect("an image");
                    checks.push((
                        i,
                        in_range_sql(
                            &d.shape,
                            &image.key_text,
                            s.lo.as_ref(),
                            s.hi.as_ref(),
                            self.segment_keys.get(&t.log_name).map(Vec::as_slice),
                        ),
                    ));
                }
            }
        }
        let decoded = if truncated_under_segment.is_empty() {
            decoded
        } else {
            decoded
                .into_iter()
                .enumerate()
                .map(|(i, d)| match d {
                    Ok(d) if truncated_under_segment.contains(&i) => Err(Box::new(DeadLetter {
                        error: "TRUNCATE while the initial snapshot of the table was resumed after a restart: the snapshot's rows read before and after it cannot be told apart; snapshot the table again (a new connector name)".into(),
                        column: None,
                        table: d.table,
                        row: d.row,
                    })),
                    other => other,
                })
                .collect()
        };
        if checks.is_empty() {
            return Ok(decoded);
        }
        let sql = format!(
            "select array[{}]::pg_catalog.bool[]",
            checks
                .iter()
                .map(|(_, c)| c.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let contained: Vec<bool> = sqlx::query_scalar(&sql)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| {
                SourceError::postgres("cannot compare keys with the snapshot's segments", e)
            })?;
        let skip: std::collections::HashSet<usize> = checks
            .iter()
            .zip(contained)
            .filter(|(_, c)| *c)
            .map(|((i, _), _)| *i)
            .collect();
        Ok(decoded
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !skip.contains(i))
            .map(|(_, d)| d)
            .collect())
    }

    /// Renders a decoded change: an event, or for a key change a delete
    /// (and tombstone) of the old key and a create of the new one; a
    /// tombstone after each delete when configured. Each event counts in the
    /// unit; the unit's last event carries `end`.
    fn render(
        &mut self,
        d: &Decoded,
        commit_us: i64,
        read_us: i64,
        counts: &mut Vec<(String, u64)>,
        end: Option<&Vec<(String, u64)>>,
        out: &mut Vec<Record>,
    ) {
        let collection = self.data_collection(d.table);
        let tombstones = self.cfg.tombstones;
        let commit_order = self.position.commit_order;
        let prev_commit_order = self.position.chain.event_of(commit_order);
        let before = d.before.as_ref();
        let after = d.after.as_ref();
        let mut event =
            |mode: &mut Self, op: Op, before: Option<&Image>, after: Option<&Image>, last: bool| {
                let (data_collection_order, total_order) = count_event(counts, &collection);
                let end = end.filter(|_| last).map(|c| UnitEnd {
                    event_count: c.iter().map(|(_, n)| n).sum(),
                    data_collections: c.clone(),
                });
                let envelope = mode.envelope(d, before, after);
                envelope.render(&Change {
                    op,
                    before: before.map(|i| std::str::from_utf8(&i.row).expect("JSON is UTF-8")),
                    after: after.map(|i| std::str::from_utf8(&i.row).expect("JSON is UTF-8")),
                    commit_us,
                    txid: u64::try_from(d.row.txid).ok(),
                    sequence: Sequence::ChangeLog(d.row.seq),
                    snapshot: SnapshotMark::No,
                    read_us,
                    transaction: TxPlace {
                        commit_order,
                        prev_commit_order,
                        total_order,
                        data_collection_order,
                        end: end.as_ref(),
                    },
                })
            };
        let topic = self.log_tables[d.table].topic.clone();
        match (d.row.op.as_str(), before, after) {
            ("u", Some(b), Some(a)) if b.key != a.key => {
                // The primary key changed: the old key is deleted, the new
                // one created, as Debezium does.
                let value = event(self, Op::Delete, Some(b), None, false);
                let key = self.key(d, b);
                out.push(Record {
                    topic: topic.clone(),
                    key: key.clone(),
                    value: Some(value),
                });
                if tombstones {
                    out.push(Record {
                        topic: topic.clone(),
                        key,
                        value: None,
                    });
                }
                let value = event(self, Op::Create, None, Some(a), true);
                out.push(Record {
                    topic,
                    key: self.key(d, a),
                    value: Some(value),
                });
            }
            ("c", _, Some(a)) => {
                let value = event(self, Op::Create, None, Some(a), true);
                out.push(Record {
                    topic,
                    key: self.key(d, a),
                    value: Some(value),
                });
            }
            ("u", b, Some(a)) => {
                let value = event(self, Op::Update, b, Some(a), true);
                out.push(Record {
                    topic,
                    key: self.key(d, a),
                    value: Some(value),
                });
            }
            ("d", Some(b), _) => {
                let value = event(self, Op::Delete, Some(b), None, true);
                let key = self.key(d, b);
                out.push(Record {
                    topic: topic.clone(),
                    key: key.clone(),
                    value: Some(value),
                });
                if tombstones {
                    out.push(Record {
                        topic,
                        key,
                        value: None,
                    });
                }
            }
            ("t", _, _) => {
                // Debezium's convention: a null key (nothing for
                // compaction to keep or forget), before and after null.
                let value = event(self, Op::Truncate, None, None, true);
                out.push(Record {
                    topic,
                    key: Vec::new(),
                    value: Some(value),
                });
            }
            (op, _, _) => {
                tracing::warn!(seq = d.row.seq, op, table = %self.log_tables[d.table].name, "skipping a change-log row that is not c, u, d or t")
            }
        }
    }

    /// The value envelope of a change of `d`'s shape with these images.
    fn envelope(
        &mut self,
        d: &Decoded,
        before: Option<&Image>,
        after: Option<&Image>,
    ) -> Arc<ChangeEnvelope> {
        let variants = |i: Option<&Image>| i.map(|i| i.row_variants.clone()).unwrap_or_default();
        let key = (d.shape.id, variants(before), variants(after));
        let (connector, database, drop_values) =
            (&self.connector, &self.database, self.drop_schemas.1);
        let t = &mut self.log_tables[d.table];
        if let Some(e) = t.envelopes.get(&key) {
            return e.clone();
        }
        let (schema, table) = source_name(&d.shape.table_name, &t.name);
        let mut e = ChangeEnvelope::for_rows(
            connector,
            database,
            &schema,
            &table,
            &d.shape.row.fields(&key.1),
            &d.shape.row.fields(&key.2),
            d.shape.row.table_oid(),
        );
        if drop_values {
            e = e.without_schema();
        }
        let e = Arc::new(e);
        if t.envelopes.len() >= MAX_TEMPLATES {
            t.envelopes.clear();
        }
        t.envelopes.insert(key, e.clone());
        e
    }

    /// The record key of `image`.
    fn key(&mut self, d: &Decoded, image: &Image) -> Vec<u8> {
        let key = (d.shape.id, image.key_variants.clone());
        let (connector, drop_keys) = (&self.connector, self.drop_schemas.0);
        let t = &mut self.log_tables[d.table];
        let template = match t.keys.get(&key) {
            Some(k) => k.clone(),
            None => {
                let template = if drop_keys {
                    RecordTemplate::schemaless()
                } else {
                    let (schema, table) = source_name(&d.shape.table_name, &t.name);
                    RecordTemplate::new(&d.shape.key_codec.struct_schema(
                        &format!("{connector}.{schema}.{table}.Key"),
                        false,
                        &key.1,
                    ))
                };
                let template = Arc::new(template);
                if t.keys.len() >= MAX_TEMPLATES {
                    t.keys.clear();
                }
                t.keys.insert(key, template.clone());
                template
            }
        };
        template.render(std::str::from_utf8(&image.key).expect("JSON is UTF-8"))
    }

    /// The dead-letter record of a change that cannot be sent, logged and
    /// counted.
    fn dead_letter(&self, dead: &DeadLetter, total_order: u64) -> Record {
        let t = &self.log_tables[dead.table];
        crate::dead_letter::DeadLetter {
            connector: &self.connector,
            table: &t.log_name,
            column: dead.column.as_deref(),
            key: None,
            error: &dead.error,
            raw: dead.row.after.as_deref().or(dead.row.before.as_deref()),
            op: &dead.row.op,
            position: serde_json::json!({
                "seq": dead.row.seq,
                "txid": dead.row.txid,
                "shape": dead.row.shape,
                "commit_order": self.position.commit_order,
                "total_order": total_order,
            }),
        }
        .record()
    }

    /// Brings the stored set of tables up to the tables read: a table read
    /// that the set lacks entered it (a longer `table.whitelist`, a table a
    /// pattern came to match) and gets an incremental snapshot when
    /// `snapshot.mode` is `initial`; a table no longer read leaves it (and
    /// its snapshot, if one was to come). A position stored before tables
    /// could enter takes every table read now as in the set.
    fn reconcile(&mut self) {
        let reading: Vec<&str> = self
            .log_tables
            .iter()
            .map(|t| t.log_name.as_str())
            .collect();
        let known = self
            .position
            .tables
            .get_or_insert_with(|| reading.iter().map(|t| (*t).to_owned()).collect());
        for t in &self.tables {
            if known.insert(t.log_name.clone()) {
                metrics::counter!(metric::SOURCE_TABLES_ADDED, "table" => t.log_name.clone())
                    .increment(1);
                let again = self.position.left.remove(&t.log_name);
                if self.cfg.initial_snapshot {
                    tracing::info!(table = %t.info.name, topic = %t.topic, again, "table entered the set: its existing rows are sent by an incremental snapshot while every table streams");
                    self.position.incremental.push(IncrementalProgress {
                        table: t.log_name.clone(),
                        reason: if again { "re-entered" } else { "added" }.to_owned(),
                        since_us: now_us(),
                        ..Default::default()
                    });
                } else {
                    tracing::info!(table = %t.info.name, topic = %t.topic, "table entered the set: its changes from now on are sent (snapshot.mode no_data: its existing rows are not)");
                }
            }
        }
        let left = &mut self.position.left;
        known.retain(|t| {
            let stays = reading.contains(&t.as_str());
            if !stays {
                tracing::info!(table = %t, "table left the set: it is no longer read");
                left.insert(t.clone());
            }
            stays
        });
        let existing: Vec<&str> = self.tables.iter().map(|t| t.log_name.as_str()).collect();
        self.position
            .incremental
            .retain(|p| existing.contains(&p.table.as_str()));
        // The OID each table is read as, from when it is first read.
        for t in &self.tables {
            self.position
                .oids
                .entry(t.log_name.clone())
                .or_insert(t.oid);
        }
        metrics::gauge!(metric::SOURCE_INCREMENTAL_TABLES_LEFT)
            .set(self.position.incremental.len() as f64);
    }

    /// The next step of the incremental snapshot, at a batch boundary (see
    /// [`crate::incremental`]): a chunk read earlier whose snapshot the
    /// stream has now reached, as its own unit; else, when the stream is
    /// between batches, a new chunk is read, and the batch up to its
    /// snapshot is sent first (unless there is none: then the chunk at once).
    ///
    /// Fails on a database error reading the chunk.
    async fn incremental_step(&mut self) -> Result<Option<Batch>, SourceError> {
        if self.position.snapshot.is_some() || self.position.incremental.is_empty() {
            self.incremental.pending = None;
            return Ok(None);
        }
        if self.position.batch.is_some() {
            return Ok(None);
        }
        if let Some(chunk) = self.incremental.pending.take() {
            if self.position.incremental[0].table == chunk.table {
                if chunk.snapshot == self.position.done {
                    return Ok(Some(self.emit_chunk(chunk)));
                }
                // A schema change ended the batch before the chunk's
                // snapshot: the stream goes on towards it.
                if self.shape_snapshots {
                    let end = chunk.snapshot.clone();
                    let at_us = chunk.at_us;
                    self.incremental.pending = Some(chunk);
                    self.begin_batch_towards(&end, at_us).await?;
                    return Ok(None);
                }
            }
        }
        if self
            .incremental
            .retry_at
            .is_some_and(|at| Instant::now() < at)
        {
            return Ok(None);
        }
        let progress = self.position.incremental[0].clone();
        let table = self.tables.iter().find(|t| t.log_name == progress.table);
        let chunk = match table {
            Some(t) => match incremental::read_chunk(
                &self.pool,
                &self.types,
                t,
                &progress,
                self.cfg.batch_max_rows,
            )
            .await
            .map_err(SourceError::from_anyhow)
            {
                Ok(incremental::Read::Chunk(chunk)) => Some(chunk),
                Ok(incremental::Read::Gone) => None,
                Ok(incremental::Read::KeyChanged(why)) => {
                    // From the first key: the stream leaves out every
                    // change of the table until the first chunk, which
                    // begins with a TRUNCATE event.
                    incremental::restart(&mut self.position.incremental[0], &why);
                    self.incremental.key = None;
                    self.incremental.retry_at = None;
                    return Ok(None);
                }
                Err(e) if e.class() == crate::errors::Class::Definite => {
                    // One table's trouble stops only its snapshot (and its
                    // changes above what it sent): the others go on, it is
                    // tried again after the others' turn.
                    tracing::error!(table = %progress.table, error = %format!("{e:#}"), "cannot read the incremental snapshot of the table; the other tables go on, and it is tried again");
                    let p = self.position.incremental.remove(0);
                    self.position.incremental.push(p);
                    self.incremental.retry_at = Some(Instant::now() + GONE_CHECK);
                    return Ok(None);
                }
                Err(e) => return Err(e),
            },
            None => None,
        };
        self.incremental.retry_at = None;
        let Some(chunk) = chunk else {
            tracing::warn!(table = %progress.table, "table gone before its incremental snapshot ended; the other tables go on");
            self.position.incremental.remove(0);
            return Ok(Some(Batch {
                what: "incremental snapshot of a dropped table given up",
                ..Batch::default()
            }));
        };
        self.incremental.key = Some((chunk.table.clone(), chunk.key().to_vec()));
        if progress.last_key.is_none() && progress.rows == 0 {
            tracing::info!(table = %progress.table, reason = %progress.reason, "incremental snapshot started");
        }
        if chunk.snapshot == self.position.done {
            return Ok(Some(self.emit_chunk(chunk)));
        }
        // The stream first sends every change up to the chunk's snapshot
        // (and acts on the signals that came meanwhile).
        let (end, at_us) = (chunk.snapshot.clone(), chunk.at_us);
        self.incremental.pending = Some(chunk);
        self.begin_batch_towards(&end, at_us).await?;
        Ok(None)
    }

    /// Begins the batch that ends at snapshot `end` (taken at `at_us`), or
    /// earlier, at a schema change that committed before it (see
    /// [`shape_split`]).
    ///
    /// Fails on a database error.
    async fn begin_batch_towards(&mut self, end: &str, at_us: i64) -> Result<(), SourceError> {
        let shapes: Option<Vec<String>> = if self.shape_snapshots {
            sqlx::query_scalar(SHAPES_BETWEEN_SQL)
                .bind(&self.position.done)
                .bind(end)
                .fetch_one(&self.pool)
                .await
                .map_err(|e| SourceError::postgres("cannot read tidemark.shapes", e))?
        } else {
            None
        };
        let (batch, batch_us, split) = self.batch_end(shapes, end.to_owned(), at_us)?;
        // The signals that came meanwhile.
        let done = self.position.done.clone();
        self.read_signals(&done, &batch).await?;
        self.position.batch = Some(batch);
        self.position.batch_us = Some(batch_us);
        self.batch_full |= split;
        Ok(())
    }

    /// Where the batch after `done` ends: at snapshot `end` (taken at
    /// `at_us`), or at the first schema change of `shapes` before it
    /// ([`shape_split`]); the snapshot, its time, and whether it is the
    /// latter.
    ///
    /// Fails when a snapshot text is not one.
    fn batch_end(
        &self,
        shapes: Option<Vec<String>>,
        end: String,
        at_us: i64,
    ) -> Result<(String, i64, bool), SourceError> {
        let split = shape_split(&self.position.done, shapes.unwrap_or_default())
            .map_err(SourceError::Definite)?;
        Ok(match split {
            Some((snapshot, us)) => {
                tracing::debug!(done = %self.position.done, batch = %snapshot, "a schema change ends this batch");
                (snapshot, us.min(at_us), true)
            }
            None => (end, at_us, false),
        })
    }

    /// The chunk as its own unit, moving its table's progress; the table
    /// leaves the list when the chunk is its last.
    fn emit_chunk(&mut self, chunk: incremental::Chunk) -> Batch {
        let last = incremental::last_of_table(&chunk);
        let table = self
            .tables
            .iter()
            .find(|t| t.log_name == chunk.table)
            .expect("a chunk is read of a table read");
        let mut rendered = None;
        let reset = incremental::opens_with_truncate(&self.position.incremental[0], &chunk);
        if !chunk.rows_is_empty() || reset {
            self.position.commit_order += 1;
            let co = self.position.commit_order;
            let prev = self.position.chain.event_of(co);
            rendered = Some(self.incremental.render(
                &self.connector,
                table,
                chunk,
                &mut self.position.incremental[0],
                (co, prev),
            ));
        } else {
            tracing::info!(table = %table.info.name, rows = self.position.incremental[0].rows, "incremental snapshot of table done; its changes stream from here");
        }
        if last {
            self.position.incremental.remove(0);
            metrics::gauge!(metric::SOURCE_INCREMENTAL_TABLES_LEFT)
                .set(self.position.incremental.len() as f64);
        }
        match rendered {
            Some(r) => Batch {
                records: r.records,
                rows: r.rows,
                newest_change_ms: None,
                what: "incremental snapshot chunk committed",
                more: false,
            },
            None => Batch {
                what: "incremental snapshot done",
                ..Batch::default()
            },
        }
    }

    /// Acts on the signals (rows of `tidemark.signal`) whose transactions
    /// became visible between snapshots `done` and `cur`: the batch that
    /// begins here. As `done` is in the stored position, each signal is
    /// acted on once, by the first batch whose snapshot shows it, however
    /// often pg-source restarts (an action not yet committed with a batch is
    /// read again). A snapshot asked for is queued in the position (with the
    /// signal's id) and runs as an incremental snapshot of the table, which
    /// keeps streaming; see [`crate::incremental`]. A malformed signal, or
    /// one naming a table this connector does not read, is a WARN saying
    /// what is wrong; the stream goes on.
    ///
    /// Fails on a database error other than the signal table being absent
    /// or unreadable (then a WARN says so, once per start).
    async fn read_signals(&mut self, done: &str, cur: &str) -> Result<(), SourceError> {
        if self.signals_unreadable {
            return Ok(());
        }
        match signal::read(&self.pool, done, cur).await? {
            signal::Read::Signals(signals) => {
                for s in &signals {
                    let tables = self.tables.iter().map(|t| signal::Readable {
                        name: &t.info.name,
                        log_name: &t.log_name,
                    });
                    signal::act(s, tables, &mut self.position.incremental);
                }
            }
            signal::Read::Off(why) => {
                self.signals_unreadable = true;
                tracing::warn!(error = %why, "cannot read the signal table {}: snapshots on demand are off until pg-source restarts (run schema-init --capture changelog of this release to create it, and grant select on it to pg-source's user)", names::SIGNAL);
            }
        }
        Ok(())
    }

    /// Reads the key index's columns (operators, collations) of each table
    /// that has initial snapshot segments, once: the stream leaves out the
    /// changes a segment holds by comparing keys as the snapshot ordered
    /// them (a text key with a collation unlike the database's, citext).
    async fn load_segment_keys(&mut self) -> Result<(), SourceError> {
        let missing: Vec<(String, tidemark_common::codec::Oid)> = self
            .position
            .segments
            .keys()
            .filter(|name| !self.segment_keys.contains_key(*name))
            .filter_map(|name| {
                self.tables
                    .iter()
                    .find(|t| &t.log_name == name)
                    .map(|t| (name.clone(), t.oid))
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| SourceError::postgres("cannot read a table's key", e))?;
        for (name, oid) in missing {
            let shape = CatalogShape::load(&mut conn, &self.types, oid)
                .await
                .map_err(SourceError::from_anyhow)?;
            if let Some(shape) = shape {
                self.segment_keys.insert(name, shape.key);
            }
        }
        Ok(())
    }

    /// Reads the key index's columns (operators, collations) of the table
    /// whose incremental snapshot runs, when no chunk of it was read since
    /// the start: the stream's key filter compares keys as its chunks do.
    async fn load_incremental_key(&mut self) -> Result<(), SourceError> {
        let Some(p) = self.position.incremental.first() else {
            return Ok(());
        };
        if p.last_key.is_none() || self.incremental.key_of(&p.table).is_some() {
            return Ok(());
        }
        let progress = p.clone();
        let Some(t) = self.tables.iter().find(|t| t.log_name == p.table) else {
            return Ok(());
        };
        let name = p.table.clone();
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| SourceError::postgres("cannot read a table's key", e))?;
        let shape = CatalogShape::load(&mut conn, &self.types, t.oid)
            .await
            .map_err(SourceError::from_anyhow)?;
        if let Some(shape) = shape {
            // Never a filter that runs the owner's code: the chunks refuse
            // such a key too, so the table's snapshot stops with this error.
            shape
                .literal_safe_key(&name)
                .map_err(SourceError::from_anyhow)?;
            // A key replaced while pg-source was stopped: the progress is
            // of the old key's order, which the filter cannot compare in.
            if let incremental::Resume::KeyChanged(why) =
                incremental::resume_point(&progress, &shape.key)
            {
                incremental::restart(&mut self.position.incremental[0], &why);
                return Ok(());
            }
            self.incremental.key = Some((name, shape.key));
        }
        Ok(())
    }

    /// Leaves out the changes of tables under an incremental snapshot that
    /// touch keys above its last key sent (a later chunk reads them); see
    /// [`crate::incremental`]. A change moving a row between the two sides
    /// keeps only its side at or below: a delete of the old key, or a
    /// create of the new.
    async fn before_incremental(
        &mut self,
        decoded: Vec<Result<Decoded, Box<DeadLetter>>>,
    ) -> Result<Vec<Result<Decoded, Box<DeadLetter>>>, SourceError> {
        if self.position.incremental.is_empty() {
            return Ok(decoded);
        }
        // Per change: whether its before and after keys are above the last
        // key sent (`None`: no image, or no chunk yet: above).
        let mut checks: Vec<String> = Vec::new();
        let mut plan: Vec<Option<(Option<usize>, Option<usize>)>> =
            Vec::with_capacity(decoded.len());
        let mut drop_all = std::collections::HashSet::new();
        for d in &decoded {
            let Ok(d) = d else {
                plan.push(None);
                continue;
            };
            let name = &self.log_tables[d.table].log_name;
            // A snapshot on demand re-reads a table the archive already
            // holds whole: every change of it is sent, and its chunks are
            // the rows as they are at their place in the stream.
            let Some(i) = self
                .position
                .incremental
                .iter()
                .position(|p| &p.table == name && p.reason != incremental::SIGNAL_REASON)
            else {
                plan.push(None);
                continue;
            };
            // A change of another primary key than the one the chunks were
            // read in (replaced: other columns): the snapshot starts again,
            // and from here every change of the table is left out until
            // its first chunk.
            if let Some(why) = key_changed(&self.position.incremental[i], &d.shape) {
                incremental::restart(&mut self.position.incremental[i], &why);
                // The loaded key order is the table's whose chunks are
                // read now: another table's (one set aside) keeps it.
                if self.incremental.key_of(name).is_some() {
                    self.incremental.key = None;
                }
                // A chunk read for the batch was read in the old order.
                if self
                    .incremental
                    .pending
                    .as_ref()
                    .is_some_and(|c| &c.table == name)
                {
                    self.incremental.pending = None;
                }
            }
            // Each table by its own progress: one set aside after an error
            // keeps the keys it has sent.
            let Some(last_key) = self.position.incremental[i].last_key.as_ref() else {
                drop_all.insert(plan.len());
                plan.push(None);
                continue;
            };
            let order = self.incremental.key_of(name);
            let mut check = |image: Option<&Image>| {
                image.map(|im| {
                    checks.push(in_range_sql(
                        &d.shape,
                        &im.key_text,
                        Some(last_key),
                        None,
                        order,
                    ));
                    checks.len() - 1
                })
            };
            let b = check(d.before.as_ref());
            let a = check(d.after.as_ref());
            plan.push(Some((b, a)));
        }
        let above: Vec<bool> = if checks.is_empty() {
            Vec::new()
        } else {
            sqlx::query_scalar(&format!(
                "select array[{}]::pg_catalog.bool[]",
                checks.join(", ")
            ))
            .fetch_one(&self.pool)
            .await
            .map_err(|e| {
                SourceError::postgres(
                    "cannot compare keys with the incremental snapshot's progress",
                    e,
                )
            })?
        };
        let mut out = Vec::with_capacity(decoded.len());
        for (k, d) in decoded.into_iter().enumerate() {
            let mut d = match d {
                Ok(d) => d,
                Err(dead) => {
                    out.push(Err(dead));
                    continue;
                }
            };
            if drop_all.contains(&k) {
                continue;
            }
            let Some((b, a)) = plan[k] else {
                out.push(Ok(d));
                continue;
            };
            let b_above = b.map(|i| above[i]);
            let a_above = a.map(|i| above[i]);
            match (d.row.op.as_str(), b_above, a_above) {
                // A TRUNCATE empties what was sent.
                ("t", _, _) => out.push(Ok(d)),
                ("u", Some(false), Some(true)) => {
                    // Moves above: the old key's delete only.
                    d.row.op = "d".to_owned();
                    d.after = None;
                    out.push(Ok(d));
                }
                ("u", Some(true), Some(false)) => {
                    // Moves from above: the new key's create only.
                    d.row.op = "c".to_owned();
                    d.before = None;
                    out.push(Ok(d));
                }
                (_, b, a) if b != Some(true) && a != Some(true) => out.push(Ok(d)),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Finds the tables a `table.include.list` pattern has come to match
    /// and adds those captured; says once of each matching table that
    /// cannot be read why, and what to run. One table's trouble leaves the
    /// others alone.
    async fn discover(&mut self) {
        let Some(d) = &self.discovery else { return };
        if d.patterns.is_empty() {
            return;
        }
        let patterns = d.patterns.clone();
        let reading: Vec<TableName> = self.log_tables.iter().map(|t| t.name.clone()).collect();
        let found = match crate::catalog::discover_captured(&self.pool).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot look for tables the patterns match; looking again later");
                return;
            }
        };
        for t in found {
            if !crate::config::matches_any(&patterns, &t) || reading.contains(&t) {
                continue;
            }
            if let Err(e) = self.add_table(&t).await {
                if self.told.insert(t.clone()) {
                    tracing::warn!(table = %t, error = %format!("{e:#}"), "a table table.include.list matches cannot be read; the other tables go on, and it is tried again");
                }
            }
        }
        match crate::catalog::uncaptured_matching(
            &self.pool,
            &patterns,
            crate::config::Mode::ChangeLog,
        )
        .await
        {
            Ok(tables) => {
                for t in tables {
                    if self.told.insert(t.clone()) {
                        tracing::warn!(table = %t, "table matches table.include.list but has no change-log capture, so none of its changes are read: run schema-init --capture changelog --table {t}");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot look for uncaptured tables the patterns match")
            }
        }
    }

    /// Adds a captured table to those read (its topic created), from the
    /// next batch on; [`Self::reconcile`] gives it its snapshot.
    ///
    /// Fails when it cannot be read: gone, not captured, a topic clash, or
    /// a database or Kafka error.
    async fn add_table(&mut self, t: &TableName) -> anyhow::Result<()> {
        let d = self.discovery.as_ref().expect("discovering");
        let Some(info) = TableInfo::load(&self.pool, t).await? else {
            return Ok(());
        };
        check_trigger(&self.pool, t).await?;
        let topic = crate::topic_name(&d.prefix, &t.name);
        let mut named: Vec<(&TableName, String)> = self
            .log_tables
            .iter()
            .map(|l| (&l.name, l.topic.clone()))
            .collect();
        named.push((t, topic.clone()));
        let reserved: Vec<(&str, &str)> = d
            .reserved
            .iter()
            .map(|(w, n)| (w.as_str(), n.as_str()))
            .collect();
        crate::check_topics(&named, &reserved)?;
        tidemark_common::kafka::ensure_topic(&d.admin, &topic, &d.topic).await?;
        let table = CapturedTable::new(
            &self.pool,
            info,
            topic.clone(),
            &self.connector,
            &self.database,
            (!self.drop_schemas.0, !self.drop_schemas.1),
        )
        .await?;
        let lt = LogTable::new(&self.pool, t.clone(), topic.clone()).await?;
        if lt.relids.is_empty() {
            bail!(
                "table {t} has no shape in {}: run schema-init --capture changelog --table {t}",
                names::SHAPES
            );
        }
        tracing::info!(table = %t, topic = %topic, "a table.include.list pattern matches a new table: reading it");
        self.tables.push(table);
        self.log_tables.push(lt);
        self.reading = reading(&self.log_tables);
        self.told.remove(t);
        Ok(())
    }

    /// Says once of each table that it was dropped; refreshes what the
    /// change-log query reads.
    async fn check_gone(&mut self) -> Result<(), SourceError> {
        self.last_gone_check = Instant::now();
        let relids: Vec<i64> = self
            .log_tables
            .iter()
            .flat_map(|t| t.relids.clone())
            .collect();
        let existing: Vec<i64> = sqlx::query_scalar(
            "select c.oid::pg_catalog.int8 from pg_catalog.pg_class c
              where c.oid operator(pg_catalog.=) any ($1::pg_catalog.int8[]::pg_catalog.oid[])",
        )
        .bind(&relids)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| SourceError::postgres("cannot look whether the tables still exist", e))?;
        // Existing tables without an enabled change-log trigger: its owner
        // dropped or disabled them.
        let uncaptured: Vec<i64> = sqlx::query_scalar(
            "select c.oid::pg_catalog.int8 from pg_catalog.pg_class c
              where c.oid operator(pg_catalog.=) any ($1::pg_catalog.int8[]::pg_catalog.oid[])
                and not exists (select 1 from pg_catalog.pg_trigger t
                                 where t.tgrelid operator(pg_catalog.=) c.oid
                                   and t.tgname operator(pg_catalog.=) any ($2)
                                   and t.tgenabled operator(pg_catalog.=) any (array['A', 'O']::pg_catalog.\"char\"[]))",
        )
        .bind(&existing)
        .bind([names::ROW_TRIGGER, names::INSERT_TRIGGER])
        .fetch_all(&self.pool)
        .await
        .map_err(|e| SourceError::postgres("cannot look whether the tables are still captured", e))?;
        for t in &mut self.log_tables {
            let gone = !t.relids.iter().any(|r| existing.contains(r));
            if gone && !t.gone {
                tracing::warn!(table = %t.name, topic = %t.topic, "table dropped: its changes logged before the drop are sent, the other tables go on");
            }
            if gone != t.gone || gone {
                metrics::gauge!(metric::SOURCE_TABLES_DROPPED, "table" => t.log_name.clone())
                    .set(if gone { 1.0 } else { 0.0 });
            }
            t.gone = gone;
            let off = !gone && t.relids.iter().any(|r| uncaptured.contains(r));
            if off && !t.uncaptured {
                tracing::error!(table = %t.name, topic = %t.topic,
                    "table no longer captured: its change-log triggers were dropped or disabled, so its new changes are not logged (those logged before are sent, the other tables go on); run schema-init --capture changelog --table {} to capture it again", t.name);
            } else if !off && t.uncaptured {
                tracing::info!(table = %t.name, "table captured again");
            }
            if off != t.uncaptured || off {
                metrics::gauge!(metric::SOURCE_TABLES_UNCAPTURED, "table" => t.log_name.clone())
                    .set(if off { 1.0 } else { 0.0 });
            }
            t.uncaptured = off;
        }
        Ok(())
    }

    /// A heartbeat, when one is due: caught up (every batch taken before
    /// [`Self::caught_up_us`] is sent), and nothing committed for
    /// `heartbeat.interval.ms`. Its record on the heartbeat topic says that
    /// every unit before the next one (`commit_order` below
    /// `complete_before.commit_order`) and every change committed before
    /// `complete_before.ts_us` (in this mode's time: units carry the time
    /// their batch's snapshot was taken, and every later batch's snapshot is
    /// taken later) is committed in Kafka before it. file-sink moves the
    /// archive's completeness mark by it (common::archive's heartbeat), and
    /// the position goes with it, as with every batch.
    fn heartbeat(&mut self) -> Option<Batch> {
        let topic = self.heartbeat_topic.as_ref()?;
        if self.last_sent.elapsed() < self.cfg.heartbeat_interval
            || self.position.batch.is_some()
            || self.position.snapshot.is_some()
        {
            return None;
        }
        let ts_us = self.caught_up_us?;
        let commit_order = self.position.commit_order as i64 + 1;
        let value = tidemark_common::archive::heartbeat_value(
            &self.connector,
            tidemark_common::archive::Mark {
                commit_order: Some(commit_order),
                ts_us: Some(ts_us),
            },
            now_us().div_euclid(1000),
        );
        Some(Batch {
            records: vec![Record {
                topic: topic.clone(),
                key: serde_json::json!({ "connector": self.connector })
                    .to_string()
                    .into_bytes(),
                value: Some(value),
            }],
            what: HEARTBEAT,
            ..Batch::default()
        })
    }

    /// Marks the batch read up to snapshot `cur` as done.
    async fn finish_batch(&mut self, cur: String) -> Result<(), sqlx::Error> {
        self.position.done = cur;
        self.position.batch = None;
        self.position.batch_us = None;
        self.position.after_seq.clear();
        self.position.unit_counts.clear();
        self.drop_old_segments().await
    }

    /// Forgets segments whose snapshot lies wholly below `done`: their
    /// transactions are excluded as done already.
    async fn drop_old_segments(&mut self) -> Result<(), sqlx::Error> {
        // Built aside and swapped in whole, so an error leaves the segments
        // as they were.
        let done = &self.position.done;
        let mut kept = std::collections::BTreeMap::new();
        for (table, segments) in &self.position.segments {
            let mut keep = Vec::new();
            for s in segments {
                let old: bool = sqlx::query_scalar(
                    "select pg_catalog.pg_snapshot_xmax($1::pg_catalog.pg_snapshot) operator(pg_catalog.<=) pg_catalog.pg_snapshot_xmin($2::pg_catalog.pg_snapshot)",
                )
                .bind(&s.snapshot)
                .bind(done)
                .fetch_one(&self.pool)
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

    /// Deletes up to [`PRUNE_CHUNK`] change-log rows of this mode's tables
    /// that are sent and committed to Kafka (visible in `done`), and notes
    /// whether more are left. One chunk at a time, so a backlog (a bulk
    /// load, a long stop) is pruned over the next polls instead of holding
    /// up the stream: 100k rows took 270 ms in one go. A failure only
    /// delays it.
    async fn prune(&mut self) {
        match log::prune(&self.pool, &self.reading, &self.position.done, PRUNE_CHUNK).await {
            Ok(n) => {
                self.prune_pending = n as i64 >= PRUNE_CHUNK;
                tracing::debug!(rows = n, more = self.prune_pending, "change log pruned");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot prune the change log; will retry after the next batch")
            }
        }
    }
}

impl LogTable {
    /// A configured table: its log name and every OID the shapes know it
    /// by (and its OID now, when it exists).
    async fn new(pool: &PgPool, name: TableName, topic: String) -> anyhow::Result<Self> {
        let (log_name, relids): (String, Vec<i64>) = sqlx::query_as(&format!(
            "select n.log_name, array(
                 select distinct s.relid::pg_catalog.int8 from {shapes} s
                  where s.table_name operator(pg_catalog.=) n.log_name
                 union
                 select c.oid::pg_catalog.int8 from pg_catalog.pg_class c
                  where c.oid operator(pg_catalog.=) pg_catalog.to_regclass(n.log_name)
                    and exists (select 1 from {shapes} s where s.relid operator(pg_catalog.=) c.oid))
               from (select pg_catalog.format('%I.%I', $1::pg_catalog.text, $2::pg_catalog.text) as log_name) n",
            shapes = names::SHAPES
        ))
        .bind(&name.schema)
        .bind(&name.name)
        .fetch_one(pool)
        .await
        .with_context(|| format!("cannot read the shapes of {name}"))?;
        Ok(Self {
            name,
            log_name,
            topic,
            relids,
            // Found by the first check, which says so.
            gone: false,
            uncaptured: false,
            renamed_to: None,
            older: Vec::new(),
            envelopes: HashMap::new(),
            keys: HashMap::new(),
        })
    }
}

/// What the change-log query reads for `tables`.
fn reading(tables: &[LogTable]) -> Tables {
    Tables {
        names: tables.iter().map(|t| t.log_name.clone()).collect(),
        relids: tables
            .iter()
            .flat_map(|t| t.relids.iter().copied())
            .collect(),
    }
}

/// The source `schema` and `table` events name: the table as its shape
/// names it (after a rename, the new name), else as configured.
fn source_name(shape_table: &str, configured: &TableName) -> (String, String) {
    match TableName::parse(shape_table) {
        Ok(t) => (t.schema, t.name),
        Err(_) => (configured.schema.clone(), configured.name.clone()),
    }
}

/// Refuses a change log that is not version 2, saying what to do.
///
/// Fails on a database error too.
pub(crate) async fn check_change_log(pool: &PgPool) -> anyhow::Result<()> {
    let (log, shapes, before): (bool, bool, Option<String>) = sqlx::query_as(
        "select pg_catalog.to_regclass($1) is not null, pg_catalog.to_regclass($2) is not null,
                (select pg_catalog.format_type(a.atttypid, null) from pg_catalog.pg_attribute a
                  where a.attrelid operator(pg_catalog.=) pg_catalog.to_regclass($1)
                    and a.attname operator(pg_catalog.=) 'before' and not a.attisdropped)",
    )
    .bind(names::CHANGE_LOG)
    .bind(names::SHAPES)
    .fetch_one(pool)
    .await
    .context("cannot look at the change log")?;
    if !log {
        bail!(
            "there is no {}: run schema-init --capture changelog --table <table>",
            names::CHANGE_LOG
        );
    }
    if !shapes || before.as_deref() != Some("text") {
        bail!(
            "{} was made by Tidemark 0.1 (row images as jsonb, no shapes): run this version's schema-init --capture changelog, which converts it (or says what to do first)",
            names::CHANGE_LOG
        );
    }
    Ok(())
}

/// Refuses a table without change-log triggers.
///
/// Fails on a database error too.
pub(crate) async fn check_trigger(pool: &PgPool, name: &TableName) -> anyhow::Result<()> {
    let has_trigger: bool = sqlx::query_scalar(
        "select exists (select 1 from pg_catalog.pg_trigger
                         where tgrelid operator(pg_catalog.=) pg_catalog.to_regclass($1)
                           and tgname operator(pg_catalog.=) any ($2))",
    )
    .bind(name.quoted())
    .bind([names::ROW_TRIGGER, names::INSERT_TRIGGER])
    .fetch_one(pool)
    .await?;
    if !has_trigger {
        bail!("table {name} has no change-log trigger: run schema-init --capture changelog --table {name}");
    }
    let has_truncate_trigger: bool = sqlx::query_scalar(
        "select exists (select 1 from pg_catalog.pg_trigger
                         where tgrelid operator(pg_catalog.=) pg_catalog.to_regclass($1)
                           and tgname operator(pg_catalog.=) $2)",
    )
    .bind(name.quoted())
    .bind(names::TRUNCATE_TRIGGER)
    .fetch_one(pool)
    .await?;
    if !has_truncate_trigger {
        tracing::warn!(table = %name, "the table was captured by an older schema-init, without a TRUNCATE trigger: a TRUNCATE of it is not sent, and a restore would keep the rows it removed; run schema-init --capture changelog --table {name} again");
    }
    Ok(())
}

/// Why a change of `shape` cannot be compared with the last key of
/// `progress`: its primary key is not the one the chunks were read in
/// (other columns, by attnum; by name for a progress an older pg-source
/// stored). `None` when it can be, or when no chunk was read yet. A key
/// column renamed is the same column: its texts are in the stored order.
fn key_changed(progress: &IncrementalProgress, shape: &Shape) -> Option<String> {
    let stored = progress.last_key.as_ref()?;
    let attnums: Option<Vec<i32>> = shape
        .key
        .iter()
        .map(|n| {
            shape
                .columns
                .iter()
                .find(|c| &c.name == n)
                .map(|c| c.attnum)
        })
        .collect();
    let fits = match (&progress.key, stored.as_object()) {
        (Some(id), _) => attnums.as_ref() == Some(&id.attnums),
        (None, Some(o)) => {
            o.len() == shape.key.len() && shape.key.iter().all(|k| o.contains_key(k))
        }
        (None, None) => true,
    };
    (!fits).then(|| {
        format!(
            "a change of it has the primary key ({}), columns {:?}, not the key its chunks so far were read in the order of ({})",
            shape.key.join(", "),
            attnums.unwrap_or_default(),
            match &progress.key {
                Some(id) => format!("columns {:?}", id.attnums),
                None => format!("by name: {stored}"),
            }
        )
    })
}

/// SQL that is true when the key `key` (its columns' texts) lies in a
/// snapshot segment's range (after `lo`, up to `hi`; a bound that is not a
/// JSON object is open), compared as the snapshot compared keys. Every
/// value is a literal of its column's base type, read by the type's input
/// function: no cast and no domain check runs.
///
/// With `order` (the key index's columns, as the chunks read them), keys
/// compare with the index's operators and its collation, as the chunks are
/// ordered (a text key with a collation unlike the database's, citext);
/// without it, or when its columns are not the shape's key, with
/// `pg_catalog`'s operators in the database's collation.
fn in_range_sql(
    shape: &Shape,
    key: &[Option<String>],
    lo: Option<&Value>,
    hi: Option<&Value>,
    order: Option<&[KeyColumn]>,
) -> String {
    let columns: Vec<_> = shape.key_codec.columns().collect();
    // By attnum: a key column renamed since the order was read is the same
    // column.
    let order: Option<Vec<&KeyColumn>> = order.and_then(|order| {
        columns
            .iter()
            .map(|c| order.iter().find(|k| Some(k.attnum) == c.attnum))
            .collect()
    });
    let literal = |text: Option<&str>, i: usize| match text {
        None => "null".to_owned(),
        Some(t) => {
            let lit = format!("{}::{}", quote_literal(t), columns[i].ty.ty.base().sql_name);
            match order.as_ref().and_then(|o| o[i].collation.as_ref()) {
                Some(c) => format!("({lit} collate {c})"),
                None => lit,
            }
        }
    };
    let literals = |texts: &[Option<String>]| -> Vec<String> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| literal(t.as_deref(), i))
            .collect()
    };
    let text = |v: &Value| match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    };
    let bound = |b: Option<&Value>| -> Option<Vec<String>> {
        // An array holds the texts in key order (see `key_changed`).
        if let Some(a) = b?.as_array() {
            return Some(literals(&a.iter().map(text).collect::<Vec<_>>()));
        }
        let o = b?.as_object()?;
        Some(literals(
            &columns
                .iter()
                .map(|c| match o.get(&c.name) {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(other) => Some(other.to_string()),
                })
                .collect::<Vec<_>>(),
        ))
    };
    let row = |l: &[String]| format!("row({})", l.join(", "));
    let k = literals(key);
    let mut cond = Vec::new();
    if let Some(lo) = bound(lo) {
        cond.push(match &order {
            Some(o) => {
                let o: Vec<KeyColumn> = o.iter().map(|c| (*c).clone()).collect();
                lexicographic_gt(&o, &k, &lo, false)
            }
            None => format!("{} operator(pg_catalog.>) {}", row(&k), row(&lo)),
        });
    }
    if let Some(hi) = bound(hi) {
        cond.push(match &order {
            Some(o) => {
                let o: Vec<KeyColumn> = o.iter().map(|c| (*c).clone()).collect();
                lexicographic_gt(&o, &hi, &k, true)
            }
            None => format!("{} operator(pg_catalog.<=) {}", row(&k), row(&hi)),
        });
    }
    if cond.is_empty() {
        "true".to_owned()
    } else {
        format!("({})", cond.join(" and "))
    }
}

impl Capture for ChangeLogMode {
    type Saved = ChangeLogPosition;

    fn save(&self) -> Self::Saved {
        self.position.clone()
    }

    fn restore(&mut self, saved: Self::Saved) {
        // A snapshot finished in memory is reopened from the stored progress.
        self.position = saved;
        // What was held back is read again from the position.
        self.held.clear();
        self.held_to = None;
        self.prune_after_commit = false;
        // A chunk read for a batch that did not commit is read again.
        self.incremental.pending = None;
    }

    async fn next(&mut self, shutdown: &CancellationToken) -> Result<Option<Batch>, SourceError> {
        if shutdown.is_cancelled() {
            return Ok(None);
        }
        if let Some(batch) = self
            .snapshot
            .step(
                &self.pool,
                &self.types,
                &self.tables,
                &mut self.position,
                (
                    self.cfg.snapshot_fetch_size,
                    self.cfg.snapshot_transaction_rows,
                ),
            )
            .await?
        {
            self.prune_after_commit = false;
            return Ok(Some(batch));
        }
        if self.last_gone_check.elapsed() >= GONE_CHECK {
            self.check_gone().await?;
            // Tables join at a batch boundary, so a batch is read whole
            // for the same tables.
            if self.position.batch.is_none() {
                self.discover().await;
            }
        }
        self.reconcile();
        if self.last_takeover_check.elapsed() >= GONE_CHECK {
            self.last_takeover_check = Instant::now();
            self.take_over_now().await;
        }
        if let Some(batch) = self.incremental_step().await? {
            return Ok(Some(batch));
        }
        if !self.linger(shutdown).await {
            return Ok(None);
        }
        match self.next_changes().await? {
            Some(batch) => Ok(Some(batch)),
            None => {
                // The batch a chunk waited for may just have ended.
                if let Some(batch) = self.incremental_step().await? {
                    return Ok(Some(batch));
                }
                if self.prune_pending {
                    // Caught up: a good moment for the rest of a backlog.
                    self.prune().await;
                }
                Ok(self.heartbeat())
            }
        }
    }

    fn position_record(&self) -> Record {
        Record {
            topic: self.offsets_topic.clone(),
            key: self.position_key.clone(),
            value: Some(SourcePosition::ChangeLog(self.position.clone()).encode()),
        }
    }

    async fn committed(&mut self, done: &Committed) {
        self.last_sent = Instant::now();
        if done.what == HEARTBEAT {
            tracing::debug!(commit = ?done.commit, "{}", done.what);
            return;
        }
        tracing::info!(records = done.records, rows = done.rows, commit = ?done.commit, "{}", done.what);
        if std::mem::take(&mut self.prune_after_commit) || self.prune_pending {
            self.prune().await;
        }
    }

    async fn wait(&mut self, shutdown: &CancellationToken) {
        let wait = self.cfg.poll_interval.min(self.cfg.probe_interval);
        self.wakeup.wait(wait, shutdown).await;
    }
}
