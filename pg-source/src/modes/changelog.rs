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
//! The initial snapshot ([`crate::snapshot`]) is read in one `repeatable
//! read` transaction whose snapshot becomes the first `done`, so there is
//! neither a gap nor an overlap between the two; a change already contained
//! in the rows of a segment read after a restart is skipped.

use std::collections::HashMap;

use anyhow::bail;
use sqlx::PgPool;
use tidemark_common::envelope::{now_us, Sequence};
use tidemark_common::offset::{position_key, ChangeLogPosition, SourcePosition};
use tokio_util::sync::CancellationToken;

use crate::catalog::TableInfo;
use crate::config::ChangeLogConfig;
use crate::errors::SourceError;
use crate::modes::{Batch, Capture, Committed, Wakeup};
use crate::producer::Record;
use crate::snapshot::{self, InitialSnapshot};
use crate::table::{CapturedTable, RenderedChange, Unit};

/// Log rows deleted per prune.
pub const PRUNE_CHUNK: i64 = 5000;

/// A table's change query: its changes after a `seq` between two
/// snapshots, left out what a snapshot segment holds.
///
/// Fails when the table has no change-log trigger.
async fn change_query(pool: &PgPool, table: &CapturedTable) -> anyhow::Result<String> {
    let name = &table.info.name;
    let has_trigger: bool = sqlx::query_scalar(
        "select exists (select 1 from pg_trigger where tgrelid = to_regclass($1)
                        and tgname in ('tidemark_capture', 'tidemark_capture_insert'))",
    )
    .bind(name.quoted())
    .fetch_one(pool)
    .await?;
    if !has_trigger {
        bail!("table {name} has no change-log trigger: run schema-init --capture changelog --table {name}");
    }
    let sql = table.image_sql();
    Ok(format!(
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
        images = sql.images,
        joins = sql.joins,
        segments = table.outside_segments_sql("l.txid", "$5"),
    ))
}

/// `changelog` mode: the change log read batch by batch, with the initial
/// snapshot first.
pub struct ChangeLogMode {
    cfg: ChangeLogConfig,
    pool: PgPool,
    /// The tables, in the order they are read.
    tables: Vec<CapturedTable>,
    /// Each table's [`change_query`].
    sql_changes: Vec<String>,
    /// Where reading stands.
    position: ChangeLogPosition,
    /// The initial snapshot's transaction, while it runs.
    snapshot: InitialSnapshot,
    /// Where the position is stored in the offsets topic.
    position_key: Vec<u8>,
    offsets_topic: String,
    /// Sent log rows may remain after the last prune.
    prune_pending: bool,
    /// The last batch ended its snapshot-difference batch, so the change
    /// log can be pruned once it is committed.
    prune_after_commit: bool,
    wakeup: Wakeup,
}

impl ChangeLogMode {
    /// Prepares every table and reads the stored position; without one,
    /// starts now (with the initial snapshot when configured).
    ///
    /// Fails when a table is not captured, or a stored position belongs to
    /// another mode.
    #[allow(clippy::too_many_arguments)]
    pub async fn new(
        cfg: ChangeLogConfig,
        connector: &str,
        database: &str,
        pool: &PgPool,
        infos: Vec<(TableInfo, String)>,
        stored: &HashMap<Vec<u8>, Vec<u8>>,
        offsets_topic: &str,
        (drop_key_schemas, drop_value_schemas): (bool, bool),
    ) -> anyhow::Result<Self> {
        let mut tables = Vec::new();
        let mut sql_changes = Vec::new();
        for (info, topic) in infos {
            let mut table = CapturedTable::new(pool, info, topic, connector, database).await?;
            table.drop_schemas(drop_key_schemas, drop_value_schemas);
            sql_changes.push(change_query(pool, &table).await?);
            tables.push(table);
        }
        let position_key = position_key(connector, "tidemark.change_log");
        let stored = stored
            .get(&position_key)
            .map(|b| SourcePosition::decode(b))
            .transpose()?;
        let (position, fresh) = match stored {
            Some(SourcePosition::ChangeLog(p)) => {
                tracing::info!(done = %p.done, snapshot_running = p.snapshot.is_some(), "resuming from stored position");
                (p, false)
            }
            Some(other) => bail!(
                "the stored position of connector {connector} is for another mode ({other:?}): use a new connector name to change modes"
            ),
            None => {
                let done: String = sqlx::query_scalar("select pg_current_snapshot()::text")
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
        let mut mode = Self {
            wakeup: Wakeup::new(pool, cfg.listen).await,
            cfg,
            pool: pool.clone(),
            tables,
            sql_changes,
            position,
            snapshot: InitialSnapshot::default(),
            position_key,
            offsets_topic: offsets_topic.to_owned(),
            // Rows sent before a stop may be left: prune them from the start.
            prune_pending: true,
            prune_after_commit: false,
        };
        mode.snapshot =
            InitialSnapshot::start(pool, &mode.tables, &mut mode.position, fresh).await?;
        Ok(mode)
    }

    /// Reads the next chunk of changes, or `None` when caught up. Advances
    /// the in-memory position. A chunk takes up to `batch.max.rows` changes
    /// of the batch, table after table, and one more is asked for to know
    /// whether the chunk ends the batch: then the chunk's last event
    /// carries the batch's totals, and the same Kafka transaction records
    /// the batch as done.
    ///
    /// Fails on a database error.
    async fn next_changes(&mut self) -> Result<Option<Batch>, sqlx::Error> {
        let had_rows = !self.position.after_seq.is_empty();
        if self.position.batch.is_none() {
            let (cur, at_us): (String, i64) = sqlx::query_as(
                "select pg_current_snapshot()::text,
                        (extract(epoch from clock_timestamp()) * 1000000)::int8",
            )
            .fetch_one(&self.pool)
            .await?;
            if cur == self.position.done {
                return Ok(None);
            }
            self.position.batch = Some(cur);
            self.position.batch_us = Some(at_us);
        }
        let cur = self.position.batch.clone().expect("set above");
        let mut remaining = self.cfg.batch_max_rows;
        let mut more = false;
        let mut read: Vec<(usize, RenderedChange)> = Vec::new();
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
            let mut rows: Vec<RenderedChange> = sqlx::query_as(&self.sql_changes[i])
                .bind(&table.log_name)
                .bind(after_seq)
                .bind(&self.position.done)
                .bind(&cur)
                .bind(segments)
                .bind(remaining + 1)
                .fetch_all(&self.pool)
                .await?;
            if rows.len() as i64 > remaining {
                rows.truncate(remaining as usize);
                more = true;
            }
            if let Some(last) = rows.last().map(|r| r.seq) {
                self.position.after_seq.insert(table.log_name.clone(), last);
            }
            remaining -= rows.len() as i64;
            read.extend(rows.into_iter().map(|r| (i, r)));
            if more {
                break;
            }
        }
        if read.is_empty() {
            // Every table has sent the batch: it is done.
            self.finish_batch(cur).await?;
            if had_rows {
                // Record it, then prune.
                self.prune_after_commit = true;
                return Ok(Some(Batch {
                    what: "batch done",
                    ..Batch::default()
                }));
            }
            return Ok(None);
        }
        if self.position.unit_counts.is_empty() {
            // The batch's first events: its place in commit order.
            self.position.commit_order += 1;
        }
        let n = read.len();
        let mut records = Vec::with_capacity(n + n / 8);
        let read_us = now_us();
        let newest_change_ms = read.iter().map(|(_, r)| r.changed_ms).max();
        let mut unit = Unit {
            commit_order: self.position.commit_order,
            commit_us: self.position.batch_us.unwrap_or(read_us),
            counts: &mut self.position.unit_counts,
        };
        for (k, (i, r)) in read.iter().enumerate() {
            let last = !more && k + 1 == n;
            self.tables[*i].render_change(
                r,
                Sequence::ChangeLog(r.seq),
                &mut unit,
                last,
                read_us,
                self.cfg.tombstones,
                &mut records,
            );
        }
        drop(read);
        if !more {
            self.finish_batch(cur).await?;
        }
        self.prune_after_commit = !more;
        Ok(Some(Batch {
            records,
            rows: n,
            newest_change_ms,
            what: "changes committed",
        }))
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
                    "select pg_snapshot_xmax($1::pg_snapshot) <= pg_snapshot_xmin($2::pg_snapshot)",
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
        let names: Vec<String> = self.tables.iter().map(|t| t.log_name.clone()).collect();
        let result = sqlx::query(
            "delete from tidemark.change_log where seq in (
               select seq from tidemark.change_log
               where table_name = any($1) and txid < pg_snapshot_xmax($2::pg_snapshot)
                 and pg_visible_in_snapshot(txid, $2::pg_snapshot)
               limit $3)",
        )
        .bind(&names)
        .bind(&self.position.done)
        .bind(PRUNE_CHUNK)
        .execute(&self.pool)
        .await;
        match result {
            Ok(r) => {
                let n = r.rows_affected();
                self.prune_pending = n as i64 >= PRUNE_CHUNK;
                tracing::debug!(rows = n, more = self.prune_pending, "change log pruned");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot prune the change log; will retry after the next batch")
            }
        }
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
        self.prune_after_commit = false;
    }

    async fn next(&mut self, shutdown: &CancellationToken) -> Result<Option<Batch>, SourceError> {
        if shutdown.is_cancelled() {
            return Ok(None);
        }
        if let Some(batch) = self
            .snapshot
            .step(
                &self.pool,
                &self.tables,
                &mut self.position,
                self.cfg.batch_max_rows,
            )
            .await?
        {
            self.prune_after_commit = false;
            return Ok(Some(batch));
        }
        match self
            .next_changes()
            .await
            .map_err(|e| SourceError::postgres("cannot read the change log", e))?
        {
            Some(batch) => Ok(Some(batch)),
            None => {
                if self.prune_pending {
                    // Caught up: a good moment for the rest of a backlog.
                    self.prune().await;
                }
                Ok(None)
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
