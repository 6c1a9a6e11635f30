//! Incremental snapshots in `logical` mode: the rows of a table that entered
//! the set while the stream runs (a `table.include.list` pattern came to
//! match a published table, a longer list at a restart, a table captured
//! while pg-source was stopped), sent in key order, one chunk of
//! `batch.max.rows` rows per unit (`op: r`, `source.snapshot:
//! "incremental"`), between the transactions of the replication stream,
//! which goes on for every table. The events, progress, metrics and logs are
//! [`crate::incremental`]'s, as in `changelog` mode; what differs is how a
//! chunk, read in a Postgres snapshot, is given its place in a stream ordered
//! by WAL position.
//!
//! # The stream's rule
//!
//! Say the table's snapshot has sent its rows up to key `K` (none yet: no
//! key). A change of the table is sent only when it touches keys at or below
//! `K` (by the key index's operators and collations, as the chunks are
//! ordered); one above `K` is left out, as a later chunk reads that key. An
//! update that moves a row across `K` keeps its side at or below: the delete
//! of the old key, or the create of the new one. A TRUNCATE is sent once a
//! chunk was. The claim below is that, at every boundary between units, the
//! archive holds exactly the table's rows with keys up to `K` as the
//! transactions before that boundary left them.
//!
//! A snapshot on demand (a signal, [`crate::signal`]) re-reads a table the
//! archive already holds whole, so its stream is left alone: every change
//! is sent, and the claim is that at every boundary the archive holds the
//! whole table as the transactions before it left it. Everything below
//! holds for it as written, with "left out" read as "sent above `K`": a
//! chunk is the rows of `(K, K']` as they are at its place (repaired the
//! same way), placed after every change before it, so it overwrites those
//! keys with the state they already have there. Its first chunk takes the
//! seed too, since the stream sent changes before the signal was read.
//!
//! # A chunk's place
//!
//! A chunk is read in a `repeatable read` transaction that first locks the
//! table (`access share`, before the snapshot is taken), then takes its
//! snapshot `S` and, in the same statement, after it, reads the WAL insert
//! position `H`. It reads the rows after `K` up to `K'` (its last row; no
//! bound when it is the table's last chunk). Postgres facts used:
//!
//! 1. A transaction ends (leaves the running-transactions array, so that
//!    snapshots see it) only after its commit record was inserted in the
//!    WAL, and it releases its locks only after it ended
//!    (`RecordTransactionCommit`, then `ProcArrayEndTransaction`, then the
//!    lock release, in `CommitTransaction`; `COMMIT PREPARED` likewise).
//! 2. `pgoutput` sends whole transactions in the order of their commit
//!    records; `Begin` carries the commit record's LSN. A non-transactional
//!    logical message and a keepalive's WAL end, between transactions, say
//!    that every transaction whose commit record lies before them was sent.
//!
//! From 1: every transaction visible in `S` committed before `H` (its
//! commit record's LSN is below `H`). So no transaction at or after `H`
//! is in the chunk, and the chunk is placed just before the first
//! transaction whose commit LSN is at or after `H` (or when a keepalive or
//! the logical message pg-source writes after each read says the stream
//! passed `H`). Its unit's `commit_order` is `H - 1`: WAL records start on
//! 8-byte boundaries, so it falls strictly between the transactions before
//! and after it.
//!
//! The converse does not hold, and this is the race that made a plain
//! "read at a WAL position" wrong: a transaction whose commit record is
//! below `H` may still be running in `S` (it wrote its commit record and
//! was flushing it, waiting for a synchronous standby, or not yet
//! scheduled), and a transaction that started after `S` may commit before
//! `H`. Call the transactions that commit before `H` and are not visible
//! in `S` the chunk's *window transactions*. The chunk misses exactly
//! their changes.
//!
//! **Per key, the chunk misses a suffix.** Fix a key `k`. Every
//! transaction that writes `k` (inserts, updates or deletes a row with that
//! primary key value) either saw the previous writer's row version or
//! waited on its lock (a row lock, or the unique index's check) until that
//! writer ended; by 1, it committed after the previous writer ended. So the
//! writers of `k` visible in `S` are a prefix, in commit order, of its
//! writers before `H`, and the window transactions that wrote `k` are the
//! rest of them. The table's TRUNCATE or DDL is never in a window: it needs
//! a lock that conflicts with the chunk's, so it either ended before the
//! chunk's lock was granted (visible in `S`) or committed after the chunk's
//! transaction ended (after `H`).
//!
//! **Repairs.** While the chunk waits for its place, the stream's changes of
//! the table by transactions not visible in `S` whose images have keys in
//! `(K, K']` (left out by the rule: above `K`) are kept, in stream order, as
//! *repairs*: a delete's or an update's old key is *gone*, an insert's or
//! an update's new row is the key's row (replica identity full gives whole
//! rows; an unchanged TOASTed value comes from the old row). At the place,
//! each key a repair names takes the last repair's state instead of the
//! chunk's row: by the suffix argument that is the key's state after every
//! writer before `H`. Keys no window transaction wrote have the chunk's row,
//! the state after their last writer, who is visible in `S`. So the chunk
//! as rendered is the table's rows in `(K, K']` exactly as the transactions
//! before its place left them; `K` becomes `K'`, and the claim holds after
//! it. A streamed unit keeps the claim by the rule (its changes up to `K`
//! sent, those above left out).
//!
//! **What the stream saw before the chunk was read.** Repairs are only kept
//! for changes the stream decodes after the read. A window transaction
//! whose changes of the table the stream left out *before* the read
//! (decoded and still running in `S`: the same race), or before pg-source
//! read the table at all (its changes committed before the stream's start,
//! or before the table joined the stream), cannot be repaired. So pg-source
//! keeps the ids of the transactions whose changes of a table under snapshot
//! it left out, and, when the stream starts or a table under snapshot joins
//! it, the ids running then (`pg_current_snapshot()`: every transaction
//! committed before the stream's position is running in it or visible in
//! it; a snapshot lists as running only ids below its xmax, the newest ended
//! id plus one, so a transaction of pg-source's own takes an id and ends
//! first, which puts every id given out before the position below xmax). No chunk is read while one of them runs (looked at in a snapshot
//! before the read), and a chunk whose own snapshot still has one running
//! is not used: it is read again later (in 50 ms, then up to every second).
//! The ids
//! visible in a chunk's snapshot are forgotten (visible in every later
//! one), so the set holds at most the transactions running at once plus
//! those of one chunk's wait.
//!
//! **Crashes.** `K`, the rows sent and the tables still to do are in the
//! stored position, committed with the chunk's unit in its Kafka
//! transaction. The chunk's place is between transactions and the stored
//! LSN is at or after the end of every transaction before it, so a restart
//! resumes the stream after the chunk with `K'`. A chunk not yet committed
//! (a crash, a failed batch, a stream opened again) is dropped and read
//! again in a new snapshot; the stream then left out the same changes it
//! would have. So a kill at any instant neither loses nor repeats a row.
//!
//! **A failed step.** A step that fails (the stream lost, a database
//! error, a Kafka batch aborted) puts back the position from before it, and
//! the stream reads again from there. The tables read are not put back: a
//! table a `table.include.list` pattern came to match during that step is
//! still read, and joins the stream. So after the position is put back, a
//! table read that its set of tables lacks enters it again, as at a start,
//! and its snapshot is queued again: otherwise its changes would stream as
//! if its snapshot had ended (every change of it sent, an update of a row
//! the archive never got included) and its existing rows would never come.
//! Likewise a snapshot queued because a table's publication turned out
//! younger than the WAL to read is queued on the position put back, not
//! under it.
//!
//! **The key changes.** (A snapshot on demand starts again the same way
//! but without the TRUNCATE, and its changes are all still sent.) As in
//! [`crate::incremental`]: `K` names its key
//! by index OID and attnums, so a renamed key column goes on; a replaced
//! key (found by a chunk's read, by the filter at the first change of the
//! new key's shape, or at a start) starts the table's snapshot again from
//! a TRUNCATE, leaving out every change of the table until that first
//! chunk. One more thing differs here: a change the stream *sent* before
//! the restart is undone by the TRUNCATE, so its transaction must be one
//! the new first chunk sees, exactly like a transaction whose change was
//! left out. So the restart takes the seed again (`seed`: a transaction of
//! pg-source's own, then the running transactions of a snapshot of now):
//! every transaction whose change the stream decoded before the restart
//! committed before the stream's position, so it is visible there or
//! running in it, and no chunk is used before a snapshot sees it end. A
//! chunk waiting when the filter finds the new key was read in the old
//! key's order and is not used (spoiled); a chunk read when the key is
//! found changed is not used either: it is read again after the seed.
//!
//! # Limits
//!
//! - A transaction running when pg-source starts, when a table under
//!   snapshot joins the stream, or when a snapshot on demand's first chunk
//!   is read, holds the table's first chunk until it ends
//!   (the other tables stream on; a WARN names it after 10 s). So does a
//!   transaction that the stream sent but that is not yet visible (one
//!   waiting for a synchronous standby).
//! - The table needs replica identity full (schema-init sets it) for whole
//!   old rows; a table whose changes are dead letters (generated columns)
//!   has its dead letters sent as they come, whatever their key.
//! - Changes `skipped.operations` leaves out are left out of the repairs
//!   too (the chunk shows a row as the snapshot saw it).
//! - One table's chunk that cannot be read (a definite error) stops only
//!   that table: an ERROR names it, it goes to the back of the list and is
//!   tried again after 5 s, and each table's changes follow its own `K`.
//! - It needs a primary: a server in recovery has no WAL insert position.
//! - The mark written after each read is a non-transactional logical
//!   message with the prefix `tidemark.incremental` and no content; other
//!   readers of the database's slots that ask for messages see it too.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pgwire_replication::Lsn;
use tidemark_common::envelope::{now_us, Op};
use tidemark_common::offset::IncrementalProgress;
use tidemark_common::ops::names;

use super::{Decoded, LogicalMode, LogicalTable, SIGNALS_EVERY};
use crate::errors::{Class, SourceError};
use crate::incremental::{self, Chunk, Incremental, Repair};
use crate::modes::Batch;
use crate::shape::{lexicographic_gt, literal, KeyColumn};
use crate::signal;
use crate::table::EncodedChange;
use crate::visibility::PgSnapshot;

/// After the signal table could not be read: the next look.
const SIGNALS_RETRY: Duration = Duration::from_secs(10);

/// After a table's chunk cannot be read: the others' turn first.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(5);

/// A chunk not used because a transaction it may miss still runs is read
/// again after this, doubling up to [`WAIT_MAX`].
const WAIT_FIRST: Duration = Duration::from_millis(50);
const WAIT_MAX: Duration = Duration::from_secs(1);

/// The left-out transactions kept before they are checked against a new
/// snapshot without waiting for a chunk.
const UNSETTLED_MAX: usize = 10_000;

/// A chunk waiting for the stream to reach its place.
pub(super) struct Window {
    chunk: Chunk,
    /// The chunk's snapshot `S`.
    snapshot: PgSnapshot,
    /// `H`: the chunk goes before the first transaction committed here or
    /// later.
    pub(super) wal: u64,
    /// `K'`: the chunk's last key (its columns' texts); `None` when the
    /// chunk is the table's last (no upper bound).
    upper: Option<Vec<Option<String>>>,
    /// Kept changes of transactions the chunk's snapshot does not see.
    repairs: Vec<Repair>,
    /// Why the chunk cannot be used, when something it cannot repair came.
    spoiled: Option<String>,
    /// The stream passed `H`: the chunk goes next.
    pub(super) reached: bool,
    /// The stream it was read against (see [`Added::stream_gen`]).
    stream_gen: u64,
}

/// What logical mode keeps of its incremental snapshots between steps.
pub(super) struct Added {
    pub(super) window: Option<Window>,
    /// Transactions whose changes of a table under snapshot were left out
    /// (or that ran when the stream started or such a table joined), not
    /// yet seen ended in a snapshot.
    unsettled: BTreeSet<u64>,
    /// The running transactions are to be added to `unsettled` before the
    /// next chunk (the stream started, or a table under snapshot joined).
    pub(super) seed: bool,
    retry_at: Option<Instant>,
    wait: Duration,
    waiting_since: Option<Instant>,
    /// Counts the streams opened: a window belongs to one.
    pub(super) stream_gen: u64,
    render: Incremental,
}

impl Default for Added {
    fn default() -> Self {
        Self {
            window: None,
            unsettled: BTreeSet::new(),
            seed: true,
            retry_at: None,
            wait: WAIT_FIRST,
            waiting_since: None,
            stream_gen: 0,
            render: Incremental::default(),
        }
    }
}

impl Window {
    /// Spoils the chunk when it is of `table` (`format('%I.%I')`): it is
    /// not used, and read again.
    pub(super) fn spoil_if(&mut self, table: &str, why: &str) {
        if self.chunk.table == table {
            self.spoiled = Some(why.to_owned());
        }
    }
}

impl Added {
    /// The changes of transaction `txid` of a table under snapshot were
    /// left out: its chunks wait until a snapshot sees it end.
    pub(super) fn left_out(&mut self, txid: u64) {
        self.unsettled.insert(txid);
    }

    /// The stream was opened again: a chunk waiting on the old one is read
    /// again.
    pub(super) fn stream_opened(&mut self) {
        self.stream_gen += 1;
        if self
            .window
            .as_ref()
            .is_some_and(|w| w.stream_gen != self.stream_gen)
        {
            self.window = None;
        }
    }

    /// Whether the stream should stop before a transaction committed at
    /// `lsn` (or, `between`, at a point every transaction before `lsn` was
    /// sent): a chunk's place. Marks the chunk as due.
    pub(super) fn reaches(&mut self, lsn: u64) -> bool {
        match self.window.as_mut() {
            Some(w) if !w.reached && lsn >= w.wal => {
                w.reached = true;
                true
            }
            _ => false,
        }
    }

    /// Whether a chunk waits for its place.
    pub(super) fn due(&self) -> bool {
        self.window.as_ref().is_some_and(|w| w.reached)
    }
}

impl LogicalMode {
    /// Brings the stored set of tables up to the tables read (at the
    /// start, and after a failed step put an older position back): a table
    /// read that the set lacks entered it and gets an incremental snapshot
    /// (`snapshot.mode` `initial`); a table no longer read leaves it.
    /// `count`: a table entering counts in the tables-added metric (not
    /// when a failed step only undid its entry).
    pub(super) fn reconcile_added(&mut self, count: bool) {
        let reading: BTreeSet<String> = self
            .tables
            .iter()
            .map(|t| t.table.log_name.clone())
            .collect();
        let known = self
            .position
            .tables
            .get_or_insert_with(|| reading.clone())
            .clone();
        let entered: Vec<(String, String)> = self
            .tables
            .iter()
            .filter(|t| !known.contains(&t.table.log_name))
            .map(|t| (t.table.log_name.clone(), t.table.info.name.to_string()))
            .collect();
        for (log_name, shown) in entered {
            if count {
                metrics::counter!(names::SOURCE_TABLES_ADDED, "table" => log_name.clone())
                    .increment(1);
            }
            self.push_snapshot(&log_name, &shown);
        }
        for t in known.difference(&reading) {
            tracing::info!(table = %t, "table left the set: it is no longer read");
            self.position.left.insert(t.clone());
        }
        self.position
            .incremental
            .retain(|p| reading.contains(&p.table));
        self.position.tables = Some(reading);
        metrics::gauge!(names::SOURCE_INCREMENTAL_TABLES_LEFT)
            .set(self.position.incremental.len() as f64);
    }

    /// Queues an incremental snapshot of a table that entered the set
    /// (again, when it left before: its snapshot begins with a TRUNCATE).
    pub(super) fn push_snapshot(&mut self, log_name: &str, shown: &str) {
        let again = self.position.left.remove(log_name);
        if !self.cfg.initial_snapshot {
            tracing::info!(table = %shown, "table entered the set: its changes from now on are sent (snapshot.mode no_data: its existing rows are not)");
            return;
        }
        self.position.incremental.retain(|p| p.table != log_name);
        tracing::info!(table = %shown, again, "table entered the set: its existing rows are sent by an incremental snapshot while every table streams");
        self.position.incremental.push(IncrementalProgress {
            table: log_name.to_owned(),
            reason: if again { "re-entered" } else { "added" }.to_owned(),
            since_us: now_us(),
            ..Default::default()
        });
        metrics::gauge!(names::SOURCE_INCREMENTAL_TABLES_LEFT)
            .set(self.position.incremental.len() as f64);
    }

    /// The next step of the incremental snapshot, between batches: a chunk
    /// whose place the stream reached, as its own unit; else, with no chunk
    /// waiting, a new chunk is read and waits for the stream (see the
    /// module doc).
    ///
    /// Fails on a database error other than the table's own trouble.
    pub(super) async fn incremental_step(&mut self) -> Result<Option<Batch>, SourceError> {
        if self.position.snapshot.is_some() || self.position.incremental.is_empty() {
            self.added.window = None;
            return Ok(None);
        }
        if self.added.window.is_some() {
            if !self.added.due() {
                return Ok(None);
            }
            let w = self.added.window.take().expect("checked");
            return Ok(self.emit(w));
        }
        if self.added.retry_at.is_some_and(|at| Instant::now() < at) {
            return Ok(None);
        }
        let progress = self.position.incremental[0].clone();
        let Some(ti) = self
            .tables
            .iter()
            .position(|t| t.table.log_name == progress.table)
        else {
            self.position.incremental.remove(0);
            return Ok(None);
        };
        if self.tables[ti].join_at.is_some() {
            // Not in the stream yet: its changes cannot be followed.
            return Ok(None);
        }
        if self.tables[ti].gone {
            tracing::warn!(table = %progress.table, "table gone before its incremental snapshot ended; the other tables go on");
            self.position.incremental.remove(0);
            return Ok(Some(Batch {
                what: "incremental snapshot of a dropped table given up",
                ..Batch::default()
            }));
        }
        let pg = |what| move |e| SourceError::postgres(what, e);
        if self.stream.is_none() {
            // A chunk waits on the stream it is read against: the stream is
            // opened first (by the stream's step, which knows its errors).
            return Ok(None);
        }
        // Cleared only once taken: a failure on the way keeps it for the
        // next try.
        let seed = self.added.seed;
        if seed || !self.added.unsettled.is_empty() {
            // A snapshot of now: its running transactions are the seed, and
            // a chunk is not read while one it may miss still runs (the
            // chunk's own snapshot is checked again below).
            if seed {
                // A snapshot lists as running only transactions below its
                // xmax, the newest ended one plus 1: a transaction that
                // wrote its commit record but has not ended (waiting for a
                // synchronous standby), with the newest xid, is in no list.
                // A transaction of our own, given an xid after the stream's
                // position was fixed and ended before the snapshot, moves
                // xmax past every transaction that committed before that
                // position (each got its xid before its commit record).
                // It writes nothing and does not wait for a standby.
                let mut tx = self
                    .pool
                    .begin()
                    .await
                    .map_err(pg("cannot begin the seed's transaction"))?;
                sqlx::query("set local synchronous_commit = local")
                    .execute(&mut *tx)
                    .await
                    .map_err(pg("cannot set up the seed's transaction"))?;
                sqlx::query("select pg_catalog.pg_current_xact_id()")
                    .execute(&mut *tx)
                    .await
                    .map_err(pg("cannot take a transaction id for the seed"))?;
                tx.commit()
                    .await
                    .map_err(pg("cannot commit the seed's transaction"))?;
            }
            let now: String =
                sqlx::query_scalar("select pg_catalog.pg_current_snapshot()::pg_catalog.text")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(pg("cannot take a snapshot"))?;
            let now = PgSnapshot::parse(&now).map_err(|e| SourceError::Definite(e.into()))?;
            if seed {
                self.added.unsettled.extend(now.in_progress());
                self.added.seed = false;
            } else {
                self.added.unsettled.retain(|x| !now.visible(*x));
                if !self.added.unsettled.is_empty() {
                    self.wait_for_unsettled(&progress.table);
                    return Ok(None);
                }
            }
        }
        let read = incremental::read_chunk_at(
            &self.pool,
            &self.types,
            &self.tables[ti].table,
            &progress,
            self.cfg.batch_max_rows,
            true,
        )
        .await
        .map_err(SourceError::from_anyhow);
        let chunk = match read {
            Ok(incremental::Read::Chunk(chunk)) => chunk,
            Ok(incremental::Read::KeyChanged(why)) => {
                // From the first key of the new one, with a TRUNCATE: the
                // stream's changes of the table sent so far are undone by
                // it, so a transaction whose change was sent and that a
                // chunk's snapshot might not see yet is one such a chunk
                // may miss too: the running transactions are taken again.
                incremental::restart(&mut self.position.incremental[0], &why);
                self.added.seed = true;
                return Ok(None);
            }
            Ok(incremental::Read::Gone) => {
                tracing::warn!(table = %progress.table, "table gone before its incremental snapshot ended; the other tables go on");
                self.position.incremental.remove(0);
                return Ok(Some(Batch {
                    what: "incremental snapshot of a dropped table given up",
                    ..Batch::default()
                }));
            }
            Err(e) if e.class() == Class::Definite => {
                tracing::error!(table = %progress.table, error = %format!("{e:#}"), "cannot read the incremental snapshot of the table; the other tables go on, and it is tried again");
                let p = self.position.incremental.remove(0);
                self.position.incremental.push(p);
                self.added.retry_at = Some(Instant::now() + RETRY_AFTER_ERROR);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let snapshot =
            PgSnapshot::parse(&chunk.snapshot).map_err(|e| SourceError::Definite(e.into()))?;
        let wal = chunk.wal_lsn.expect("asked for");
        // Transactions left out before the read, or older than the stream,
        // that this snapshot does not see yet: it may miss them.
        self.added.unsettled.retain(|x| !snapshot.visible(*x));
        if !self.added.unsettled.is_empty() {
            self.wait_for_unsettled(&progress.table);
            return Ok(None);
        }
        self.added.waiting_since = None;
        self.added.wait = WAIT_FIRST;
        self.added.retry_at = None;
        if progress.last_key.is_none() && progress.rows == 0 {
            tracing::info!(table = %progress.table, reason = %progress.reason, "incremental snapshot started");
        }
        // A WAL record after H, so an idle stream still says it passed H
        // (pgoutput sends it as a logical message). Without it, the next
        // transaction or keepalive does.
        if let Err(e) = sqlx::query(
            "select pg_catalog.pg_logical_emit_message(false, 'tidemark.incremental', '')",
        )
        .execute(&self.pool)
        .await
        {
            tracing::debug!(error = %e, "cannot write the incremental snapshot's WAL mark; the stream's next transaction places the chunk");
        }
        let upper = match (chunk.more_after(), chunk.last_key()) {
            (false, _) => None,
            (true, Some(k)) if k.iter().all(Option::is_some) => Some(k),
            (true, _) => {
                tracing::error!(table = %progress.table, "the last row of an incremental snapshot chunk has no readable key; the other tables go on, and it is tried again");
                let p = self.position.incremental.remove(0);
                self.position.incremental.push(p);
                self.added.retry_at = Some(Instant::now() + RETRY_AFTER_ERROR);
                return Ok(None);
            }
        };
        tracing::debug!(table = %progress.table, wal = %Lsn(wal), "incremental snapshot chunk read; it waits for its place in the stream");
        self.added.window = Some(Window {
            chunk,
            snapshot,
            wal,
            upper,
            repairs: Vec::new(),
            spoiled: None,
            reached: false,
            stream_gen: self.added.stream_gen,
        });
        Ok(None)
    }

    /// No chunk is read for now: a transaction it may miss still runs
    /// (see the module doc). Says so after 10 s of it.
    fn wait_for_unsettled(&mut self, table: &str) {
        let x = self.added.unsettled.first().copied().unwrap_or_default();
        let since = *self.added.waiting_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= Duration::from_secs(10) {
            tracing::warn!(table = %table, xid = x, running = self.added.unsettled.len(), "the incremental snapshot of the table waits for a transaction that was running when the stream started or the table joined it (or whose changes the stream left out) to end; the other tables stream on");
            self.added.waiting_since = Some(Instant::now());
        } else {
            tracing::debug!(table = %table, xid = x, "a transaction a chunk may miss still runs; the chunk is read later");
        }
        self.added.retry_at = Some(Instant::now() + self.added.wait);
        self.added.wait = (self.added.wait * 2).min(WAIT_MAX);
    }

    /// The chunk, repaired, as its own unit at its place; moves its table's
    /// progress, which leaves the list when the chunk is its last.
    fn emit(&mut self, w: Window) -> Option<Batch> {
        if let Some(why) = w.spoiled {
            tracing::warn!(table = %w.chunk.table, reason = %why, "an incremental snapshot chunk cannot be placed in the stream; it is read again");
            self.added.retry_at = Some(Instant::now() + WAIT_FIRST);
            return None;
        }
        let pi = self
            .position
            .incremental
            .iter()
            .position(|p| p.table == w.chunk.table)?;
        let ti = self
            .tables
            .iter()
            .position(|t| t.table.log_name == w.chunk.table)?;
        let last = incremental::last_of_table(&w.chunk);
        // Between the transactions before H and those from H on (record
        // starts are 8-byte aligned), after the last unit sent.
        let commit_order = (w.wal - 1).max(self.position.chain.last_sent.map_or(0, |l| l + 1));
        let chain = self.position.chain;
        let prev = self.position.chain.event_of(commit_order);
        let rendered = self.added.render.render_with(
            &self.connector,
            &self.tables[ti].table,
            w.chunk,
            w.repairs,
            &mut self.position.incremental[pi],
            (commit_order, prev),
        );
        if rendered.records.is_empty() {
            // No unit.
            self.position.chain = chain;
        }
        if last {
            self.position.incremental.remove(pi);
            metrics::gauge!(names::SOURCE_INCREMENTAL_TABLES_LEFT)
                .set(self.position.incremental.len() as f64);
        }
        Some(Batch {
            what: if rendered.records.is_empty() {
                "incremental snapshot done"
            } else {
                "incremental snapshot chunk committed"
            },
            records: rendered.records,
            rows: rendered.rows,
            newest_change_ms: None,
            more: false,
        })
    }

    /// Reads the signal table (see [`crate::signal`]): the signals whose
    /// transactions became visible since the snapshot in the position, which
    /// then moves to a snapshot of now. Each snapshot asked for is queued in
    /// the position, with the signal's id, and runs as the added tables'
    /// do, except that it leaves the table's stream alone (see
    /// [`filter`]): every change is still sent, and the chunks are the rows
    /// as they are at their places. Its first chunk waits, as after a
    /// start, for the transactions running now: the stream may have sent
    /// changes of theirs that a chunk's snapshot would not see yet.
    ///
    /// Fails on a database error other than the signal table being absent,
    /// unreadable or untrusted (then a WARN says so, once per start).
    pub(super) async fn read_signals(&mut self) -> Result<(), SourceError> {
        self.last_signals = Instant::now();
        if self.signals_off {
            return Ok(());
        }
        let cur: String =
            sqlx::query_scalar("select pg_catalog.pg_current_snapshot()::pg_catalog.text")
                .fetch_one(&self.pool)
                .await
                .map_err(|e| SourceError::postgres("cannot take a snapshot", e))?;
        let Some(done) = self.position.signals.clone() else {
            tracing::info!("the stored position is from a release that read no signals in logical mode: signals are acted on from now on, not those written before");
            self.position.signals = Some(cur);
            return Ok(());
        };
        let read = match signal::read(&self.pool, &done, &cur).await {
            Ok(read) => read,
            Err(e) => {
                // Snapshots on demand are optional: the stream goes on, and
                // the same signals are read at the next look.
                tracing::warn!(error = %format!("{e:#}"), "cannot read the signal table {} now; the stream goes on, and it is read again in {}s", tidemark_common::names::SIGNAL, SIGNALS_RETRY.as_secs());
                self.last_signals = Instant::now() + SIGNALS_RETRY - SIGNALS_EVERY;
                return Ok(());
            }
        };
        match read {
            signal::Read::Signals(signals) => {
                let mut queued = 0;
                for s in &signals {
                    let tables = self.tables.iter().map(|t| signal::Readable {
                        name: &t.table.info.name,
                        log_name: &t.table.log_name,
                    });
                    queued += signal::act(s, tables, &mut self.position.incremental);
                }
                if queued > 0 {
                    self.added.seed = true;
                }
                self.position.signals = Some(cur);
            }
            signal::Read::Off(why) => {
                self.signals_off = true;
                tracing::warn!(error = %why, "cannot read the signal table {}: snapshots on demand are off until pg-source restarts (run schema-init --capture logical of this release as a superuser to create it, and grant select on it to pg-source's user)", tidemark_common::names::SIGNAL);
            }
        }
        Ok(())
    }

    /// Checks the left-out transactions against a new snapshot when there
    /// are many (no chunk was read for a while).
    pub(super) async fn settle_unsettled(&mut self) {
        if self.added.unsettled.len() < UNSETTLED_MAX {
            return;
        }
        let now: Result<String, _> =
            sqlx::query_scalar("select pg_catalog.pg_current_snapshot()::pg_catalog.text")
                .fetch_one(&self.pool)
                .await;
        if let Ok(Ok(now)) = now.map(|n| PgSnapshot::parse(&n)) {
            self.added.unsettled.retain(|x| !now.visible(*x));
        }
    }
}

/// How one image of a change stands against the table's progress.
#[derive(Clone, Copy)]
enum Check {
    Known(bool),
    Sql(usize),
}

/// The key `texts` as literals of the key columns' types, in the key
/// index's collations; `None` when a column is null.
fn key_sql(key: &[KeyColumn], texts: &[Option<String>]) -> Option<Vec<String>> {
    key.iter()
        .zip(texts)
        .map(|(k, t)| {
            let lit = literal(t.as_deref()?, &k.literal_type);
            Some(match &k.collation {
                Some(c) => format!("({lit} collate {c})"),
                None => lit,
            })
        })
        .collect()
}

/// Applies the stream's rule (see the module doc) to a batch's changes of
/// tables under incremental snapshot, keeps the repairs of the waiting
/// chunk, and notes the transactions whose changes it leaves out. One query
/// compares the keys, with the key index's operators and collations.
///
/// Fails on a database error, or a key that cannot be compared.
pub(super) async fn filter(
    conn: &mut sqlx::PgConnection,
    tables: &[LogicalTable],
    progress: &mut [IncrementalProgress],
    added: &mut Added,
    changes: Vec<Decoded>,
) -> Result<Vec<Decoded>, SourceError> {
    if progress.is_empty() || changes.is_empty() {
        return Ok(changes);
    }
    let definite = |m: String| SourceError::Definite(anyhow::anyhow!(m));
    let mut sql: Vec<String> = Vec::new();
    // Per change: its progress entry, whether it is a window transaction's,
    // and per image (before, after): above K, and inside (K, K'].
    type Image = Option<(Check, Check)>;
    let mut plan: Vec<Option<(usize, bool, Image, Image)>> = Vec::with_capacity(changes.len());
    for c in &changes {
        let name = &tables[c.table].table.log_name;
        let Some(pi) = progress.iter().position(|p| &p.table == name) else {
            plan.push(None);
            continue;
        };
        // A window reached by this batch still takes its changes: they all
        // come before the place (the batch ends there).
        let window = added.window.as_ref().filter(|w| &w.chunk.table == name);
        let in_window = window.is_some_and(|w| !w.snapshot.visible(c.txid));
        let EncodedChange::Ok { shape, op, .. } = &c.change else {
            plan.push(Some((pi, in_window, None, None)));
            continue;
        };
        let key = &shape.key;
        let mut key_changed = false;
        let lower = match incremental::resume_point(&progress[pi], key) {
            incremental::Resume::Start => None,
            incremental::Resume::After(t) => Some(
                key_sql(key, &t.into_iter().map(Some).collect::<Vec<_>>())
                    .expect("no null among the texts"),
            ),
            incremental::Resume::KeyChanged(why) => {
                // A change of another primary key than the one the chunks
                // were read in (replaced): the snapshot starts again from a
                // TRUNCATE, and from here every change of the table is left
                // out until its first chunk. A chunk waiting was read in the
                // old order: it is not used. The running transactions are
                // taken again (see the restart in `incremental_step`).
                incremental::restart(&mut progress[pi], &why);
                added.seed = true;
                key_changed = true;
                None
            }
        };
        let upper = match window.and_then(|w| w.upper.as_ref()) {
            Some(u) => Some(key_sql(key, u).ok_or_else(|| {
                definite(format!(
                    "table {name}: a chunk's last key has a null column"
                ))
            })?),
            None => None,
        };
        if key_changed {
            if let Some(w) = added.window.as_mut().filter(|w| &w.chunk.table == name) {
                w.spoiled = Some("the table's primary key changed".into());
            }
        }
        let mut image = |texts: Option<&Vec<Option<String>>>| -> Result<Image, SourceError> {
            let Some(texts) = texts else { return Ok(None) };
            let k = key_sql(key, texts).ok_or_else(|| {
                definite(format!(
                    "table {name}: a change's primary key has a null column"
                ))
            })?;
            let above = match &lower {
                None => Check::Known(true),
                Some(l) => {
                    sql.push(lexicographic_gt(key, &k, l, false));
                    Check::Sql(sql.len() - 1)
                }
            };
            let inside = match (&upper, in_window) {
                (_, false) => Check::Known(false),
                (None, true) => Check::Known(true),
                (Some(u), true) => {
                    sql.push(format!("not {}", lexicographic_gt(key, &k, u, false)));
                    Check::Sql(sql.len() - 1)
                }
            };
            Ok(Some((above, inside)))
        };
        let (before, after) = match op {
            Op::Create => (None, image(Some(&c.key_texts))?),
            Op::Delete => (image(Some(&c.key_texts))?, None),
            _ => (image(c.old_key_texts.as_ref())?, image(Some(&c.key_texts))?),
        };
        plan.push(Some((pi, in_window, before, after)));
    }
    let answers: Vec<bool> = if sql.is_empty() {
        Vec::new()
    } else {
        sqlx::query_scalar(&format!(
            "select array[{}]::pg_catalog.bool[]",
            sql.join(", ")
        ))
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| {
            SourceError::postgres(
                "cannot compare keys with the incremental snapshot's progress",
                e,
            )
        })?
    };
    let get = |c: Check| match c {
        Check::Known(b) => b,
        Check::Sql(i) => answers[i],
    };
    let mut out = Vec::with_capacity(changes.len());
    for (mut c, p) in changes.into_iter().zip(plan) {
        let Some((pi, in_window, before, after)) = p else {
            out.push(c);
            continue;
        };
        // A snapshot on demand re-reads a table the archive holds whole:
        // every change of it is sent. What the rule takes from the chunks
        // (the repairs, the transactions they wait for) is the same.
        let whole = progress[pi].reason == incremental::SIGNAL_REASON;
        let keep = match &mut c.change {
            EncodedChange::Dead(_) => true,
            EncodedChange::Truncate { .. } => {
                if in_window {
                    // Cannot happen (a TRUNCATE's lock conflicts with the
                    // chunk's); never guessed at.
                    if let Some(w) = added.window.as_mut() {
                        w.spoiled =
                            Some("a TRUNCATE by a transaction its snapshot does not see".into());
                    }
                }
                if progress[pi].last_key.is_none() {
                    added.unsettled.insert(c.txid);
                }
                whole || progress[pi].last_key.is_some()
            }
            EncodedChange::Ok {
                shape,
                op,
                before: b_image,
                after: a_image,
                key_before,
                key_after,
            } => {
                let b = before.map(|(a, i)| (get(a), get(i)));
                let a = after.map(|(a, i)| (get(a), get(i)));
                if in_window {
                    let w = added.window.as_mut().expect("in a window");
                    if let Some((true, true)) = b {
                        let texts = if *op == Op::Update {
                            c.old_key_texts.clone().unwrap_or_default()
                        } else {
                            c.key_texts.clone()
                        };
                        w.repairs.push(Repair::Gone(texts));
                    }
                    if let Some((true, true)) = a {
                        match (a_image.clone(), key_after.clone()) {
                            (Some(after), Some(key_record)) => w.repairs.push(Repair::Row {
                                key: c.key_texts.clone(),
                                shape: shape.clone(),
                                after,
                                key_record,
                            }),
                            _ => {
                                w.spoiled = Some("a change of the table without its new row".into())
                            }
                        }
                    }
                }
                let b_above = b.map(|(above, _)| above);
                let a_above = a.map(|(above, _)| above);
                if b_above == Some(true) || a_above == Some(true) {
                    added.unsettled.insert(c.txid);
                }
                match (*op, b_above, a_above) {
                    _ if whole => true,
                    (Op::Update, Some(false), Some(true)) => {
                        // Moves above K: the old key's delete only.
                        *op = Op::Delete;
                        *a_image = None;
                        *key_after = None;
                        true
                    }
                    (Op::Update, Some(true), Some(false)) => {
                        // Moves from above K: the new key's create only.
                        *op = Op::Create;
                        *b_image = None;
                        *key_before = None;
                        true
                    }
                    (_, b, a) => b != Some(true) && a != Some(true),
                }
            }
        };
        if keep {
            out.push(c);
        }
    }
    Ok(out)
}
