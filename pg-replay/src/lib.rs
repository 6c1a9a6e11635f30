//! pg-replay: plays a Tidemark archive back into Postgres, to any point in
//! time, exactly once.
//!
//! Input: the file file-sink writes (`--input`, one or more; with or without
//! the Connect schema) or its segmented archive folder (a stream per
//! partition, [`segmented`]), or the Kafka topics pg-source writes (`--topic`,
//! read `read_committed`). Output: tables of a target database
//! (`--target-url`), by default the archive's tables under the same names,
//! or others with `--table SOURCE=TARGET`.
//!
//! Delivery contract:
//!
//! - **Whole source transactions, in commit order.** pg-source's envelope
//!   groups events into *units* (a source transaction in `logical` mode, a
//!   batch of transactions between two snapshots in `changelog` mode, the
//!   initial snapshot); a unit is applied only once the archive holds all of
//!   it, and units are applied in commit order ([`units`]). Each target
//!   transaction holds one or more whole units, so the target only passes
//!   through states the source had, and foreign keys between replayed tables
//!   hold. A missing event (a gap, a dead-lettered change) stops the replay
//!   before the unit it belongs to, naming it.
//! - **Exactly once.** The replay position (the last unit applied, and where
//!   each input may resume) is a row of `tidemark.replay_position` in the
//!   target, written in the same transaction as the changes it covers
//!   ([`position`]). A restart resumes after it; a SIGKILL at any instant and
//!   a restart end in the same target as an uninterrupted run; replaying the
//!   same archive again changes nothing.
//! - **A target that disagrees stops the replay.** A row to update or delete
//!   that is not there, a key to create that is, is reported with table, key
//!   and archive position, and the unit is not applied (`--on-conflict
//!   upsert` lets the archive win instead) ([`apply`]).
//! - **Point in time.** `--until` (the unit's commit time, `source.ts_us`),
//!   `--until-txid`, `--until-lsn` (logical archives): the replay stops
//!   before the first unit past the point, in commit order.
//! - **Row states** (`timestamp+incrementing` archives) hold no transactions
//!   and no deletes: each record is upserted in archive order, and the
//!   position is where each input was read to.
//! - **Bounded memory.** Records are read through a bounded channel, changes
//!   are streamed into `COPY` in chunks (one chunk in flight on a task of
//!   its own while the next is written), and the target holds what waits for
//!   the rest of its unit (temporary staging tables), not pg-replay; a unit
//!   known ready waits for its run in a compact record ([`units`]).
//!
//! Every session runs with `search_path = pg_catalog, pg_temp`, every name in
//! generated SQL is schema-qualified, staging tables live in `pg_temp` with
//! generated column names, and key comparisons use the primary key's
//! operator classes. Statements on a target table run as the table's owner
//! (`SET LOCAL ROLE`) when pg-replay connects as another role that may
//! become it (a superuser), so what the owner attached to the table
//! (triggers, constraints, its domains' checks) never runs with more
//! privilege than the owner has; a table whose owner pg-replay's role may
//! not become is refused, unless a superuser owns it.

pub mod apply;
pub mod archive;
pub mod check;
pub mod cli;
pub mod position;
pub mod record;
pub mod segmented;
pub mod snapshots;
pub mod target;
pub mod units;
pub mod values;
pub mod verify;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tidemark_common::health::Health;
use tidemark_common::kafka::KafkaSettings;
use tidemark_common::pg::{PgTarget, TableName};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::apply::{
    Applier, ApplyError, OnConflict, RowMeta, RunInfo, SchemaChanges, UserTriggers,
};
use crate::archive::{Item, StreamKind, StreamPos, Streams};
use crate::record::{Op, Record};
use crate::snapshots::{FromSnapshot, Starts, Treat, Windows};
use crate::units::{Disposition, EventInfo, UnitError, Units, Until};

/// Metric names: pg-replay's share of [`tidemark_common::ops::names`],
/// under the short names this crate uses.
pub mod names {
    pub use tidemark_common::ops::names::{
        REPLAY as EXPORTS, REPLAY_APPLIED_COMMIT_TIME as APPLIED_COMMIT_TIME,
        REPLAY_CHANGES_APPLIED as CHANGES_APPLIED, REPLAY_LAG_SECONDS as LAG_SECONDS,
        REPLAY_PENDING_UNITS as PENDING_UNITS, REPLAY_POSITION as POSITION,
        REPLAY_READ_RATIO as READ_RATIO, REPLAY_SLOW_RUNS as SLOW_RUNS,
        REPLAY_UNITS_APPLIED as UNITS_APPLIED, REPLAY_UNIT_LAG as UNIT_LAG,
    };
}

/// Where the replay stops, as the user asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UntilArg {
    /// Everything.
    #[default]
    End,
    /// Commit time, µs since the epoch.
    Time(i64),
    /// Through the unit holding this transaction.
    Txid(i64),
    /// Units with commit LSN at most this.
    Lsn(u64),
}

/// Everything pg-replay needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The replay's name: keys its position in the target.
    pub name: String,
    /// Archive files, read in full (each its own stream).
    pub inputs: Vec<PathBuf>,
    /// Archive topics (every partition its own stream).
    pub topics: Vec<String>,
    /// The brokers, for `topics`.
    pub kafka: KafkaSettings,
    /// The target database.
    pub target: PgTarget,
    /// Source → target tables; empty: every table to itself.
    pub tables: Vec<(TableName, TableName)>,
    /// With `tables`, skip other tables' events instead of stopping.
    pub ignore_unmapped: bool,
    /// Where to stop.
    pub until: UntilArg,
    /// Keep applying as the archive grows.
    pub follow: bool,
    /// What a disagreeing target row leads to.
    pub on_conflict: OnConflict,
    /// Where each table's replay starts.
    pub from_snapshot: FromSnapshot,
    /// What to do with the target tables' own triggers.
    pub user_triggers: UserTriggers,
    /// What a schema change recorded in the archive leads to.
    pub schema_changes: SchemaChanges,
    /// Changes read after which ready units are applied.
    pub batch_changes: u64,
    /// Longest time changes wait for their apply while the archive is read.
    pub max_delay: Duration,
    /// Longest line (record) accepted.
    pub max_line_bytes: usize,
    /// Most units that may wait behind an incomplete one.
    pub max_pending_units: usize,
    /// How often progress is logged on long replays.
    pub progress_interval: Duration,
    /// Readiness for `/healthz` and tests.
    pub health: Health,
    /// Where to serve `/healthz` and `/metrics`.
    pub http_addr: Option<SocketAddr>,
}

impl Config {
    /// A config with the defaults for everything but the inputs and target.
    pub fn new(target: PgTarget) -> Self {
        Self {
            name: "default".into(),
            inputs: Vec::new(),
            topics: Vec::new(),
            kafka: KafkaSettings::default(),
            target,
            tables: Vec::new(),
            ignore_unmapped: false,
            until: UntilArg::End,
            follow: false,
            on_conflict: OnConflict::Stop,
            from_snapshot: FromSnapshot::Beginning,
            user_triggers: UserTriggers::Disable,
            schema_changes: SchemaChanges::Stop,
            batch_changes: 1_000_000,
            max_delay: Duration::from_millis(200),
            max_line_bytes: 64 * 1024 * 1024,
            max_pending_units: 200_000,
            progress_interval: Duration::from_secs(2),
            health: Health::new(),
            http_addr: None,
        }
    }
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Changes applied by this run.
    pub changes: u64,
    /// Units applied by this run.
    pub units: u64,
    /// The last unit applied (this run or before).
    pub position: Option<i64>,
    /// Its commit time, µs.
    pub ts_us: Option<i64>,
    /// Runs that needed the event-by-event apply.
    pub slow_runs: u64,
}

/// Replays until the archive is applied (or the point in time reached), or,
/// following, until `shutdown`.
///
/// Fails with an error naming the place in the archive when a record cannot
/// be replayed or a unit is incomplete, naming table and key when the target
/// disagrees, and saying what to change when the target cannot be used.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<Summary> {
    if cfg.inputs.is_empty() && cfg.topics.is_empty() {
        bail!("nothing to replay: give the archive with --input FILE (file-sink's file) or --topic TOPIC");
    }
    if !cfg.inputs.is_empty() && !cfg.topics.is_empty() {
        bail!("give the archive as files (--input) or as topics (--topic), not both: they hold the same records");
    }
    if let Some(addr) = cfg.http_addr {
        tidemark_common::ops::serve(addr, names::EXPORTS, cfg.health.clone(), shutdown.clone())
            .await?;
    }
    let mut delay = Duration::from_millis(500);
    let mut total = Summary::default();
    loop {
        match run_once(&cfg, &shutdown, &mut total).await {
            Err(e) if cfg.follow && is_transient(&e) && !shutdown.is_cancelled() => {
                cfg.health.set_ready(false);
                cfg.health.progress();
                tracing::warn!(error = %format!("{e:#}"), "lost the target connection; resuming from the stored position");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(total),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e),
            Ok(()) => return Ok(total),
        }
    }
}

fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<sqlx::Error>()
            .is_some_and(tidemark_common::pg::is_transient)
    })
}

/// Opens one connection to the target for the whole replay: the staging
/// tables and the replay's lock live in its session.
async fn connect(target: &PgTarget) -> anyhow::Result<sqlx::PgConnection> {
    let pool = target.connect(1, Duration::from_secs(30)).await?;
    let mut conn = pool
        .acquire()
        .await
        .with_context(|| format!("cannot connect to the target at {target}"))?
        .detach();
    pool.close().await;
    for setting in APPLY_SESSION {
        sqlx::query(setting).execute(&mut conn).await?;
    }
    Ok(conn)
}

/// Settings of the apply session, on top of every Tidemark session's.
///
/// - Sorting a run's changes by key (the net effect) in memory, and
///   keeping the staging tables in memory, before the first temporary
///   table is touched.
/// - `synchronous_commit = off`: the position commits with the changes it
///   covers, so a commit lost to a server crash loses both and the replay
///   applies them again: the target and its position never disagree. The
///   end of a replay waits for the last commit to be flushed
///   ([`flush_commits`]).
/// - `row_security = off`: a target table whose row-level security policies
///   apply to the role pg-replay writes as is an error, rather than a
///   replay that cannot see (or write) some rows and runs the policies'
///   expressions.
const APPLY_SESSION: &[&str] = &[
    "set work_mem = '64MB'",
    "set temp_buffers = '32MB'",
    "set synchronous_commit = off",
    "set row_security = off",
];

/// Waits until every commit of the session is durable: a transaction with a
/// commit record, committed synchronously, flushes the WAL up to it.
async fn flush_commits(conn: &mut sqlx::PgConnection) -> anyhow::Result<()> {
    sqlx::query("set synchronous_commit = on")
        .execute(&mut *conn)
        .await?;
    sqlx::query("begin").execute(&mut *conn).await?;
    sqlx::query("select pg_catalog.txid_current()")
        .execute(&mut *conn)
        .await?;
    sqlx::query("commit").execute(&mut *conn).await?;
    Ok(())
}

/// What kind of records the archive holds, decided by its first record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Changes,
    RowStates,
}

/// The streams of the archive, where each starts, and their total size
/// (bytes of files, offsets of partitions) for progress.
struct Inputs {
    streams: Streams,
    starts: Vec<StreamPos>,
    total: u64,
    /// The last unit applied before this run.
    applied: Option<i64>,
    /// Where the replay stops, once known: readers of a segmented archive
    /// read a partition no further than its first record past it.
    until: Until,
    /// The segmented archives' folders: following, they are listed again
    /// on every poll for partitions and topics added since.
    roots: Vec<PathBuf>,
    /// The stored resume points, by stream key.
    hints: BTreeMap<String, StreamPos>,
    /// How far the segmented archives' partition readers may read ahead
    /// ([`segmented::Gate`]).
    gate: Arc<segmented::Gate>,
}

async fn open_inputs(cfg: &Config, pos: &position::Position) -> anyhow::Result<Inputs> {
    let hints = &pos.streams;
    let mut streams = Streams::default();
    let mut starts = Vec::new();
    let mut total = 0;
    let mut roots = Vec::new();
    for given in &cfg.inputs {
        // The absolute path keys the resume point, whatever directory
        // pg-replay is started from.
        let path = &std::fs::canonicalize(given).unwrap_or_else(|_| given.clone());
        if path.is_dir() {
            // A segmented archive: a stream per partition, keyed by topic
            // and partition (not the folder, which may move).
            let parts = segmented::partitions(path)?;
            if parts.is_empty() {
                bail!(
                    "the segmented archive {} holds no topic yet: start pg-replay once file-sink has run on it \
                     (it writes each topic's <topic>/topic.json)",
                    path.display()
                );
            }
            for (topic, partition, dir) in parts {
                let kind = StreamKind::Segments {
                    dir: dir.clone(),
                    topic,
                    partition,
                };
                if (0..streams.len() as u32).any(|i| streams.kind(i).hint_key() == kind.hint_key())
                {
                    bail!(
                        "{} holds {kind}, which another --input holds too: give each archive once",
                        path.display()
                    );
                }
                starts.push(hints.get(&kind.hint_key()).copied().unwrap_or_default());
                total += segmented::last_offset(&dir);
                streams.add(kind);
            }
            roots.push(path.clone());
            continue;
        }
        let kind = StreamKind::File(path.clone());
        let first = StreamPos { offset: 0, line: 1 };
        let start = match hints.get(&kind.hint_key()) {
            Some(h) if archive::file_hint_is_valid(path, *h) => *h,
            Some(h) => {
                tracing::warn!(file = %path.display(), offset = h.offset,
                    "the stored resume point is not a line start of this file (it was replaced?); reading it from the start");
                first
            }
            None => first,
        };
        total += std::fs::metadata(path)
            .with_context(|| {
                format!(
                    "cannot read the archive file {} (--input): check the path",
                    path.display()
                )
            })?
            .len();
        streams.add(kind);
        starts.push(start);
    }
    if !cfg.topics.is_empty() {
        let kafka = cfg.kafka.clone();
        let topics = cfg.topics.clone();
        let parts = tokio::task::spawn_blocking(move || {
            archive::topic_partitions(&kafka, &topics, Duration::from_secs(30))
        })
        .await??;
        for (topic, partition) in parts {
            let kind = StreamKind::Partition { topic, partition };
            let start = hints.get(&kind.hint_key()).copied().unwrap_or_default();
            streams.add(kind);
            starts.push(start);
        }
    }
    Ok(Inputs {
        streams,
        starts,
        total,
        applied: pos.commit_order,
        until: Until::End,
        roots,
        hints: hints.clone(),
        gate: Arc::default(),
    })
}

/// Starts a reader per file and one for all partitions, handing over
/// through one bounded channel. Returns its receiving end and a weak
/// sender, for readers of streams added later ([`Loop::pick_up_partitions`]):
/// the channel closes once every reader is gone, as if there were none.
fn start_readers(
    cfg: &Config,
    inputs: &Inputs,
    follow: bool,
    stop: &CancellationToken,
) -> (mpsc::Receiver<Item>, mpsc::WeakSender<Item>) {
    let (tx, rx) = mpsc::channel(archive::CHANNEL_BATCHES);
    let weak = tx.downgrade();
    let mut partitions = Vec::new();
    for id in 0..inputs.streams.len() as u32 {
        match &**inputs.streams.kind(id) {
            StreamKind::File(path) => {
                let (tx, stop, path) = (tx.clone(), stop.clone(), path.clone());
                let start = inputs.starts[id as usize];
                let max_line = cfg.max_line_bytes;
                std::thread::spawn(move || {
                    archive::read_file(id, path, start, follow, max_line, tx, stop)
                });
            }
            StreamKind::Partition { topic, partition } => {
                partitions.push((id, topic.clone(), *partition, inputs.starts[id as usize]));
            }
            StreamKind::Segments { dir, .. } => {
                let p = segmented::Partition {
                    id,
                    dir: dir.clone(),
                    start: inputs.starts[id as usize],
                    applied: inputs.applied,
                    until: inputs.until,
                    gate: inputs.gate.clone(),
                };
                start_segments(cfg, p, follow, tx.clone(), stop.clone());
            }
        }
    }
    if !partitions.is_empty() {
        let (tx, stop, kafka) = (tx.clone(), stop.clone(), cfg.kafka.clone());
        let group = format!("tidemark-replay-{}", cfg.name);
        std::thread::spawn(move || {
            archive::read_partitions(kafka, group, partitions, follow, tx, stop)
        });
    }
    (rx, weak)
}

/// Starts the reader of one partition of a segmented archive.
fn start_segments(
    cfg: &Config,
    p: segmented::Partition,
    follow: bool,
    tx: mpsc::Sender<Item>,
    stop: CancellationToken,
) {
    let max_line = cfg.max_line_bytes;
    std::thread::spawn(move || segmented::read_partition(p, follow, max_line, tx, stop));
}

/// Reads the archive once from its start, handing each batch of records to
/// `see` until it says `Break`: the first pass that `--until-txid` and
/// `--from-snapshot` need before anything is applied. Returns `false` when
/// a shutdown cut it short, `true` when every input ended, `see` stopped
/// it, or the readers closed.
///
/// Fails when an input cannot be read.
async fn first_pass(
    cfg: &Config,
    inputs: &Inputs,
    follow: bool,
    shutdown: &CancellationToken,
    mut see: impl FnMut(&[archive::Decoded]) -> std::ops::ControlFlow<()>,
) -> anyhow::Result<bool> {
    let stop = shutdown.child_token();
    let (mut rx, _) = start_readers(cfg, inputs, follow, &stop);
    let mut ended = 0;
    let done = loop {
        let item = tokio::select! {
            _ = shutdown.cancelled() => break false,
            item = rx.recv() => item,
        };
        match item {
            None => break true,
            Some(Item::Records(batch)) => {
                if see(&batch).is_break() {
                    break true;
                }
            }
            Some(Item::End(_)) => {
                ended += 1;
                if ended == inputs.streams.len() {
                    break true;
                }
            }
            Some(Item::CaughtUp(_)) | Some(Item::CompleteBefore(..)) => {}
            Some(Item::Failed(e)) => {
                stop.cancel();
                return Err(e);
            }
        }
    };
    stop.cancel();
    Ok(done)
}

/// Finds the unit that holds transaction `txid` (`--until-txid`): a first
/// pass over the archive, so nothing is applied before it is known where
/// to stop.
async fn locate_txid(
    cfg: &Config,
    inputs: &Inputs,
    txid: i64,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<i64>> {
    tracing::info!(txid, "looking for the transaction in the archive");
    let mut found = None;
    first_pass(cfg, inputs, cfg.follow, shutdown, |batch| {
        found = batch.iter().find_map(|d| match &d.record {
            Ok(Record::Change(c)) if c.tx_id == Some(txid) => c.tx.as_ref().map(|t| t.commit_order),
            _ => None,
        });
        if found.is_some() {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    })
    .await?;
    Ok(found)
}

/// Finds each table's newest incremental snapshot complete within `until`
/// (`--from-snapshot newest`): a first pass over the archive as it is now.
async fn locate_snapshots(
    cfg: &Config,
    inputs: &Inputs,
    until: Until,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Windows>> {
    tracing::info!("looking for incremental snapshots in the archive (--from-snapshot newest)");
    let mut windows = Windows::default();
    let done = first_pass(cfg, inputs, false, shutdown, |batch| {
        for d in batch {
            if let Ok(Record::Change(c)) = &d.record {
                let Some(tx) = &c.tx else { continue };
                let co = tx.commit_order;
                if snapshots::within(until, co, c.ts_us) {
                    let table = TableName {
                        schema: c.schema_name.to_string(),
                        name: c.table.to_string(),
                    };
                    windows.see(&table, co, c.op == Op::Truncate, c.chunk);
                }
            }
        }
        std::ops::ControlFlow::Continue(())
    })
    .await?;
    Ok(done.then_some(windows))
}

/// Progress on long replays.
struct Progress {
    every: Duration,
    last: Instant,
    last_read: u64,
    last_changes: u64,
    total: u64,
}

impl Progress {
    fn log(&mut self, summary: &Summary, units: &Units, read: u64, force: bool) {
        if self.total > 0 {
            metrics::gauge!(names::READ_RATIO).set((read as f64 / self.total as f64).min(1.0));
        }
        let now = Instant::now();
        let elapsed = now.duration_since(self.last);
        if !force && elapsed < self.every {
            return;
        }
        // Nothing read or applied since the last line (a follower waiting
        // for the archive to grow): nothing to say.
        if !force && read == self.last_read && summary.changes == self.last_changes {
            self.last = now;
            return;
        }
        let secs = elapsed.as_secs_f64().max(1e-3);
        let rate = (summary.changes - self.last_changes) as f64 / secs;
        let read_rate = (read.saturating_sub(self.last_read)) as f64 / secs;
        let left = if self.total > read && read_rate > 0.0 {
            format!("{:.0}s", (self.total - read) as f64 / read_rate)
        } else {
            "-".to_owned()
        };
        let pct = if self.total > 0 {
            format!("{:.1}%", 100.0 * read as f64 / self.total as f64)
        } else {
            "-".to_owned()
        };
        tracing::info!(
            changes = summary.changes,
            changes_per_s = rate as u64,
            position = ?summary.position,
            commit_time = %summary.ts_us.map(format_us).unwrap_or_default(),
            pending_units = units.waiting(),
            read = %pct,
            time_left = %left,
            "replaying"
        );
        self.last = now;
        self.last_read = read;
        self.last_changes = summary.changes;
    }
}

/// µs since the epoch as RFC 3339.
pub fn format_us(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_else(|| us.to_string())
}

async fn run_once(
    cfg: &Config,
    shutdown: &CancellationToken,
    total: &mut Summary,
) -> anyhow::Result<()> {
    let mut conn = connect(&cfg.target).await?;
    let pos = position::open(&mut conn, &cfg.name).await?;
    let mut inputs = open_inputs(cfg, &pos).await?;
    let until = match cfg.until {
        UntilArg::End => Until::End,
        UntilArg::Time(t) => Until::Time(t),
        UntilArg::Lsn(l) => Until::CommitOrder(l as i64),
        UntilArg::Txid(x) => match locate_txid(cfg, &inputs, x, shutdown).await? {
            Some(co) => {
                tracing::info!(txid = x, unit = co, "found the transaction; replaying through its unit");
                Until::CommitOrder(co)
            }
            None if shutdown.is_cancelled() => return Ok(()),
            None => bail!(
                "transaction {x} (--until-txid) is not in the archive: nothing was applied. It may have rolled back, \
                 touched no captured table, or be beyond what the archive holds"
            ),
        },
    };
    inputs.until = until;
    let starts = match cfg.from_snapshot {
        FromSnapshot::Beginning => Starts::default(),
        FromSnapshot::Newest => match locate_snapshots(cfg, &inputs, until, shutdown).await? {
            None => return Ok(()),
            Some(w) => {
                let newest = w.newest_complete();
                for (table, (first, last)) in &newest {
                    tracing::info!(table = %table, first_unit = first, last_unit = last,
                        "the table starts from its newest incremental snapshot complete before the replay's end: its earlier events are left out, and it is emptied where the snapshot begins");
                }
                if newest.is_empty() {
                    tracing::info!("no incremental snapshot is complete before the replay's end: every table starts from the archive's beginning");
                }
                Starts::new(newest)
            }
        },
    };
    // Issue 16.5: one line that says what this run is and will do.
    let upto = match until {
        Until::End => "the archive's end".to_owned(),
        Until::Time(t) => format!("the last unit committed by {}", format_us(t)),
        Until::CommitOrder(co) => format!("unit {co}"),
    };
    tracing::info!(
        replay = %cfg.name,
        mode = if cfg.follow { "follow" } else { "replay" },
        archive = %cfg
            .inputs
            .iter()
            .map(|p| p.display().to_string())
            .chain(cfg.topics.iter().cloned())
            .collect::<Vec<_>>()
            .join(", "),
        tables = %if cfg.tables.is_empty() {
            "every table of the archive to the same name".to_owned()
        } else {
            cfg.tables
                .iter()
                .map(|(s, t)| format!("{s}={t}"))
                .collect::<Vec<_>>()
                .join(", ")
        },
        target = %cfg.target,
        position = %match pos.commit_order {
            Some(co) => format!("unit {co}"),
            None => "none".to_owned(),
        },
        commit_time = %pos.ts_us.map(format_us).unwrap_or_default(),
        plan = %match (pos.commit_order, cfg.follow) {
            (Some(_), false) => format!("resume after the stored unit, up to {upto}"),
            (None, false) => format!("apply from the archive's start, up to {upto}"),
            (Some(_), true) => "resume after the stored unit and follow the archive".to_owned(),
            (None, true) => "apply from the archive's start and follow it".to_owned(),
        },
        streams = inputs.streams.len(),
        follow = cfg.follow,
        "pg-replay started"
    );
    let mut applier = Applier::new(
        conn,
        &cfg.name,
        cfg.tables.clone(),
        cfg.on_conflict,
        cfg.user_triggers,
        inputs.streams.clone(),
    );
    let stop = shutdown.child_token();
    let (mut rx, tx) = start_readers(cfg, &inputs, cfg.follow, &stop);
    // Following a segmented archive: partitions and topics added to it are
    // picked up as it grows.
    let grow = (cfg.follow && !inputs.roots.is_empty()).then(|| Grow {
        tx,
        stop: stop.clone(),
        last: Instant::now(),
        known: (0..inputs.streams.len() as u32)
            .map(|id| inputs.streams.kind(id).hint_key())
            .collect(),
    });
    let mut result = replay_loop(
        cfg,
        shutdown,
        &mut inputs,
        pos,
        (until, starts),
        &mut applier,
        (&mut rx, grow),
        total,
    )
    .await;
    if result.is_ok() {
        result = match applier.conn().await {
            Ok(conn) => flush_commits(conn).await,
            Err(e) => Err(e),
        };
    }
    stop.cancel();
    // Let the readers see the closed channel.
    drop(rx);
    applier.close().await;
    cfg.health.set_ready(false);
    result
}

/// Units waiting behind one not ready after which the ready ones are
/// applied, whatever --batch-changes says: each holds a few hundred bytes.
const BATCH_UNITS: usize = 30_000;

/// Ready units after which they are applied, whatever --batch-changes
/// says: each waits in 40 bytes ([`Units::fold`]), so an archive of many
/// one-change transactions stays in bounded memory.
const BATCH_READY_UNITS: usize = 200_000;

/// How often a follower lists a segmented archive's partitions for ones
/// added since it started (a few folders and `topic.json` files).
const PARTITION_POLL: Duration = Duration::from_millis(200);

/// How often at most it lists them while many units wait for the
/// partitions' marks to count ([`Loop::pick_up_partitions`]): a follower
/// reading a backlog of units that do not name the one before them reads
/// many in 200 ms.
const PARTITION_POLL_PRESSED: Duration = Duration::from_millis(10);

/// What a follower of a segmented archive needs to pick up partitions and
/// topics added to it.
struct Grow {
    /// For the readers of the streams added: weak, so that the channel
    /// still closes when every reader is gone.
    tx: mpsc::WeakSender<Item>,
    /// Stops them with the others.
    stop: CancellationToken,
    /// When the partitions were last listed.
    last: Instant,
    /// The streams there are, by key.
    known: std::collections::HashSet<String>,
}

/// The state of one replay run.
struct Loop<'a> {
    cfg: &'a Config,
    inputs: &'a mut Inputs,
    /// Following a segmented archive: how to pick up its new partitions.
    grow: Option<Grow>,
    units: Units,
    kind: Option<Kind>,
    connector: Option<String>,
    /// Row states: their synthetic unit numbers.
    seq: i64,
    /// The table of the last change and its stage (`None`: not mapped).
    last_table: Option<(Arc<str>, Arc<str>, Option<usize>)>,
    staged_since_apply: u64,
    last_apply: Instant,
    stored_from: Option<i64>,
    /// Where the replay ends.
    until: Until,
    /// The tables that start from a snapshot (`--from-snapshot newest`).
    starts: Starts,
    /// The incremental snapshots seen within the replay's end.
    windows: Windows,
    /// A schema change waiting for the units before it, and the records
    /// set aside meanwhile.
    deferred: Option<Deferred>,
    /// The partition readers read ahead are held back ([`Loop::gate_readers`]).
    gated: bool,
}

/// Records set aside while a change of a table's columns waits for the
/// units before it: an event of one of them may be on a stream not read
/// that far yet (a unit of two tables, whose topics are read side by side),
/// or later in the same file (file-sink's single file holds the topics in
/// the order it read them). Everything before the change is applied first,
/// then the change is made, then these records are taken up in the order
/// they were read: from the change's unit on, nothing is staged meanwhile.
/// A unit before it that never comes is a gap, reported as such.
struct Deferred {
    /// The unit of the change.
    co: i64,
    /// The record that changes the columns: its unit has it already.
    trigger: archive::Decoded,
    /// What the table's snapshot start made of the trigger.
    treat: Treat,
    /// The records of units from `co` on read since, in the order read.
    queue: Vec<archive::Decoded>,
}

/// Records set aside for a waiting schema change ([`Deferred`]) after
/// which the replay stops: they wait in memory.
const MAX_DEFERRED: usize = 100_000;

#[allow(clippy::too_many_arguments)]
async fn replay_loop(
    cfg: &Config,
    shutdown: &CancellationToken,
    inputs: &mut Inputs,
    pos: position::Position,
    (until, starts): (Until, Starts),
    applier: &mut Applier,
    (rx, grow): (&mut mpsc::Receiver<Item>, Option<Grow>),
    total: &mut Summary,
) -> anyhow::Result<()> {
    total.position = pos.commit_order;
    total.ts_us = pos.ts_us;
    let mut units = Units::new(
        pos.commit_order,
        &inputs.starts,
        until,
        cfg.max_pending_units,
    );
    if grow.is_some() {
        units
            .follow_listing(|id| matches!(&**inputs.streams.kind(id), StreamKind::Segments { .. }));
    }
    let input_total = inputs.total;
    let mut st = Loop {
        cfg,
        inputs,
        grow,
        units,
        kind: None,
        connector: None,
        seq: 0,
        last_table: None,
        staged_since_apply: 0,
        last_apply: Instant::now(),
        stored_from: pos.commit_order,
        until,
        starts,
        windows: Windows::default(),
        deferred: None,
        gated: false,
    };
    let mut progress = Progress {
        every: cfg.progress_interval,
        last: Instant::now(),
        last_read: 0,
        last_changes: 0,
        total: input_total,
    };
    cfg.health.set_ready(true);
    let mut tick = tokio::time::interval(cfg.max_delay.max(Duration::from_millis(10)));
    loop {
        let item = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                tracing::info!(position = ?total.position, "stopping at a unit boundary");
                return Ok(());
            }
            item = rx.recv() => item,
            _ = tick.tick() => {
                cfg.health.progress();
                st.pick_up_partitions(applier)?;
                st.units.fold().map_err(|e| anyhow::anyhow!("{e}"))?;
                st.gate_readers();
                // Not following, the archive is there to read: a batch is
                // applied when full or when the archive has nothing more,
                // so fewer, larger runs apply each key's changes once.
                if cfg.follow && st.staged_since_apply > 0 && st.last_apply.elapsed() >= cfg.max_delay {
                    st.try_apply(applier, total).await?;
                }
                report_lag(total);
                progress.log(total, &st.units, read_bytes(&st), false);
                st.take_up_deferred(applier, total).await?;
                if st.done() {
                    break;
                }
                continue;
            }
        };
        let mut idle = false;
        match item {
            None => bail!("the archive readers stopped unexpectedly"),
            Some(Item::Failed(e)) => return Err(e),
            Some(Item::End(s)) => {
                st.units.end_stream(s);
                idle = true;
            }
            Some(Item::CaughtUp(s)) => {
                if matches!(&**st.inputs.streams.kind(s), StreamKind::Partition { .. }) {
                    st.units.partition_caught_up(s);
                }
                idle = true;
            }
            Some(Item::CompleteBefore(s, co)) => st.units.stream_complete_before(s, co),
            Some(Item::Records(batch)) => {
                for d in batch {
                    st.record(applier, d, total, None).await?;
                }
                // The units made whole by the batch wait in little memory.
                st.units.fold().map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }
        // After the item: what it brought was read before this listing.
        st.pick_up_partitions(applier)?;
        // The units the marks listed made ready wait in little memory.
        st.units.fold().map_err(|e| anyhow::anyhow!("{e}"))?;
        st.gate_readers();
        if st.staged_since_apply >= cfg.batch_changes
            || st.units.pending().len() >= BATCH_UNITS
            || st.units.ready_units() >= BATCH_READY_UNITS
            || (idle && st.staged_since_apply > 0)
            || (idle && st.units.all_ended())
        {
            st.try_apply(applier, total).await?;
            progress.log(total, &st.units, read_bytes(&st), false);
        }
        st.take_up_deferred(applier, total).await?;
        if st.done() {
            break;
        }
    }
    st.try_apply(applier, total).await?;
    progress.log(total, &st.units, read_bytes(&st), true);
    st.check_complete()?;
    st.warn_unfinished_snapshots();
    tracing::info!(
        changes = total.changes,
        units = total.units,
        position = ?total.position,
        commit_time = %total.ts_us.map(format_us).unwrap_or_default(),
        "replay complete"
    );
    Ok(())
}

fn read_bytes(st: &Loop<'_>) -> u64 {
    st.units.resume_points().iter().map(|p| p.offset).sum()
}

fn report_lag(total: &Summary) {
    if let Some(ts) = total.ts_us {
        let now = tidemark_common::health::now_ms() * 1000;
        metrics::gauge!(names::LAG_SECONDS).set((now - ts).max(0) as f64 / 1e6);
    }
}

impl Loop<'_> {
    /// Following a segmented archive, at most every [`PARTITION_POLL`]:
    /// lists its partitions (folders and `topic.json` counts) and starts a
    /// stream for each that appeared since (a partition added to a topic,
    /// a topic added), read from its start (or its stored resume point).
    /// Then the marks the partitions had read before the listing count
    /// ([`Units::follow_listing`], [`Units::partitions_listed`]): no unit
    /// whose place in the order rests on them is applied while a partition
    /// listed has no stream, and a new stream's events are merged by
    /// commit order like the others'.
    ///
    /// Fails when the archive's folder cannot be listed or a `topic.json`
    /// is damaged.
    fn pick_up_partitions(&mut self, applier: &mut Applier) -> anyhow::Result<()> {
        let Some(grow) = &mut self.grow else {
            return Ok(());
        };
        // Units waiting for the marks fill the pending ones between two
        // listings: past a quarter of --max-pending-units, the marks read
        // count sooner.
        let every = if self.units.pending().len() >= self.cfg.max_pending_units / 4 {
            PARTITION_POLL_PRESSED
        } else {
            PARTITION_POLL
        };
        if grow.last.elapsed() < every {
            return Ok(());
        }
        grow.last = Instant::now();
        let Some(tx) = grow.tx.upgrade() else {
            // Every reader is gone: the replay is ending.
            return Ok(());
        };
        let inputs = &mut *self.inputs;
        for root in &inputs.roots {
            for (topic, partition, dir) in segmented::partitions_now(root)? {
                let kind = StreamKind::Segments {
                    dir: dir.clone(),
                    topic: topic.clone(),
                    partition,
                };
                let key = kind.hint_key();
                if grow.known.contains(&key) {
                    continue;
                }
                // Its start, unless a position stored before holds it.
                let start = inputs.hints.get(&key).copied().unwrap_or_default();
                tracing::info!(%topic, partition, archive = %root.display(),
                    "reading a partition that appeared in the archive");
                grow.known.insert(key);
                let id = inputs.streams.add(kind.clone());
                applier.add_stream(kind);
                inputs.starts.push(start);
                self.units.add_stream(start);
                let p = segmented::Partition {
                    id,
                    dir,
                    start,
                    applied: inputs.applied,
                    until: inputs.until,
                    gate: inputs.gate.clone(),
                };
                start_segments(self.cfg, p, true, tx.clone(), grow.stop.clone());
            }
        }
        self.units.partitions_listed();
        Ok(())
    }

    /// Holds back the segmented archives' partition readers that read
    /// past the first quarter of the units waiting once half of
    /// --max-pending-units wait ([`segmented::Gate`]), and lets them go
    /// again below a quarter: the units waiting stay below the bound
    /// however unevenly the readers run. A reader that holds the first
    /// unit back has not read past it (or, following, has, and waits for
    /// its mark, which it takes while it waits), so it is never held.
    fn gate_readers(&mut self) {
        let waiting = self.units.pending().len();
        let max = self.cfg.max_pending_units;
        if waiting >= max / 2 || (self.gated && waiting > max / 4) {
            // Readers past the quarter of the waiting units wait: those
            // behind it (the one the first unit waits for among them) read
            // on in large batches.
            let upto = self.units.pending().keys().nth(max / 4).copied();
            if !self.gated {
                tracing::debug!(waiting, upto = ?upto,
                    "many units wait for the one before them: the partitions read ahead of them pause");
            }
            self.gated = true;
            self.inputs.gate.hold_above(upto);
        } else if self.gated {
            self.gated = false;
            self.inputs.gate.hold_above(None);
        }
    }

    /// Whether there is nothing more to do.
    fn done(&self) -> bool {
        self.units.reached_end() || (!self.cfg.follow && self.units.all_ended())
    }

    /// Takes one record: tracks its unit, stages its change. `added`: the
    /// record was tracked already, and set aside before its change was
    /// staged (a [`Deferred`] trigger), with what its table's snapshot
    /// start made of it.
    async fn record(
        &mut self,
        applier: &mut Applier,
        r: archive::Decoded,
        total: &mut Summary,
        added: Option<Treat>,
    ) -> anyhow::Result<()> {
        let origin = self.inputs.streams.origin(r.stream, r.pos);
        if matches!(
            &**self.inputs.streams.kind(r.stream),
            StreamKind::Partition { .. }
        ) {
            self.units.partition_active(r.stream);
        }
        if let Some(d) = &mut self.deferred {
            let co = match &r.record {
                Ok(Record::Change(c)) => c.tx.as_ref().map(|t| t.commit_order),
                _ => None,
            };
            if let Some(co) = co.filter(|co| *co >= d.co) {
                // After the schema change that waits: taken up once it is
                // made.
                if d.queue.len() >= MAX_DEFERRED {
                    let first = self
                        .units
                        .first_pending()
                        .map(|(c, u)| format!("unit {c} ({} events read)", u.events()));
                    bail!(
                        "{origin}: the archive changes a table's columns at unit {}, and {} records of later units \
                         were read while {} before it is still incomplete: an event of it is missing from the \
                         archive, or one stream of the archive is far behind the others; nothing after unit {} \
                         was applied",
                        d.co,
                        d.queue.len(),
                        first.unwrap_or_else(|| "a unit".into()),
                        self.units.applied().map_or("(none)".into(), |a| a.to_string())
                    );
                }
                self.units.hold(r.stream, co, r.pos);
                d.queue.push(r);
                return Ok(());
            }
        }
        let record = r.record.map_err(|e| {
            anyhow::anyhow!("{origin}: {e}; nothing of this record's unit was applied")
        })?;
        let kind = match &record {
            Record::Change(_) => Kind::Changes,
            Record::RowState(_) => Kind::RowStates,
        };
        match self.kind {
            None => {
                if kind == Kind::RowStates {
                    if self.cfg.until != UntilArg::End {
                        bail!(
                            "{origin}: the archive holds timestamp+incrementing row states, which carry no commit \
                             times or transactions: --until, --until-txid and --until-lsn need a logical or changelog archive"
                        );
                    }
                    tracing::info!("the archive holds timestamp+incrementing row states: each is upserted; such an archive holds no deletes");
                    applier.set_upsert();
                }
                self.kind = Some(kind);
            }
            Some(k) if k != kind => bail!(
                "{origin}: the archive mixes change events and timestamp+incrementing row states; replay them separately"
            ),
            _ => {}
        }
        match record {
            Record::Change(c) => {
                let Some(tx) = c.tx.clone() else {
                    bail!(
                        "{origin}: the change event has no transaction block (it was written by Tidemark 0.1's pg-source), \
                         so the archive does not say where source transactions end; pg-replay needs events of \
                         Tidemark 0.2 or later"
                    );
                };
                match &self.connector {
                    None => self.connector = Some(c.connector.to_string()),
                    Some(name) if **name != *c.connector => bail!(
                        "{origin}: the archive mixes events of connectors {name:?} and {:?}, whose transactions \
                         cannot be ordered against each other; replay each connector's topics or file on its own",
                        c.connector
                    ),
                    _ => {}
                }
                if let UntilArg::Lsn(_) = self.cfg.until {
                    if c.lsn.is_none() && !matches!(c.op, Op::Read | Op::IncrementalRead) {
                        bail!("{origin}: --until-lsn needs an archive of logical mode, whose events carry their WAL position; use --until or --until-txid");
                    }
                }
                let info = EventInfo {
                    commit_order: tx.commit_order,
                    total_order: tx.total_order,
                    event_count: tx.event_count,
                    prev: tx.prev_commit_order,
                    ts_us: c.ts_us,
                    tx_id: c.tx_id,
                    lsn: c.lsn,
                    stream: r.stream,
                    pos: r.pos,
                    truncate: c.op == Op::Truncate,
                };
                // The table by name, where incremental snapshots need it:
                // on its events, the first of each run of its events, and
                // every event when tables start from snapshots.
                let same_table = matches!(&self.last_table, Some((s, t, _))
                    if Arc::ptr_eq(s, &c.schema_name) && Arc::ptr_eq(t, &c.table));
                let table =
                    (c.chunk.is_some() || !same_table || !self.starts.is_empty()).then(|| {
                        TableName {
                            schema: c.schema_name.to_string(),
                            name: c.table.to_string(),
                        }
                    });
                if added.is_none() {
                    if let Some(t) = &table {
                        if snapshots::within(self.until, tx.commit_order, c.ts_us) {
                            self.windows
                                .see(t, tx.commit_order, c.op == Op::Truncate, c.chunk);
                        }
                    }
                    let disposition = self
                        .units
                        .add(&info, r.next)
                        .map_err(|e| unit_error(e, &origin, &self.inputs.streams))?;
                    if disposition == Disposition::Skip {
                        return Ok(());
                    }
                }
                let treat = match (added, &table) {
                    (Some(treat), _) => treat,
                    (None, Some(t)) if !self.starts.is_empty() => {
                        self.starts.treat(t, tx.commit_order)
                    }
                    _ => Treat::Apply,
                };
                if treat == Treat::Skip {
                    // Before the snapshot the table starts from.
                    return Ok(());
                }
                let row_schema = c
                    .schema
                    .as_ref()
                    .and_then(|s| s.row.clone().map(|r| (s.id, r)));
                // Consecutive events are mostly of one table: its stage is
                // looked up again only when the table's names change.
                let idx = match &self.last_table {
                    Some((schema, table, idx))
                        if Arc::ptr_eq(schema, &c.schema_name) && Arc::ptr_eq(table, &c.table) =>
                    {
                        *idx
                    }
                    _ => {
                        let source = TableName {
                            schema: c.schema_name.to_string(),
                            name: c.table.to_string(),
                        };
                        let idx = applier
                            .stage_for(&source, row_schema.as_ref().map(|(_, r)| &**r))
                            .await
                            .with_context(|| format!("at {origin}"))?;
                        self.last_table = Some((c.schema_name.clone(), c.table.clone(), idx));
                        idx
                    }
                };
                let Some(idx) = idx else {
                    let source = format!("{}.{}", c.schema_name, c.table);
                    if self.cfg.ignore_unmapped {
                        return Ok(());
                    }
                    bail!(
                        "{origin}: a change of table {source}, which no --table maps; add --table {source}=SCHEMA.TABLE, \
                         or --ignore-unmapped to replay only the tables named"
                    );
                };
                if let Some((id, rs)) = &row_schema {
                    if let Some(steps) = applier.schema_change(idx, *id, rs) {
                        let again = applier.created_again(idx, rs);
                        let made = self
                            .schema_change(
                                applier,
                                total,
                                idx,
                                (&steps, again),
                                tx.commit_order,
                                &origin,
                            )
                            .await?;
                        if !made {
                            if let Some(d) = &self.deferred {
                                // One change waits already, for a unit before
                                // this one's: replacing it would lose it and the
                                // records set aside with it.
                                let first = self
                                    .units
                                    .first_pending()
                                    .map(|(c, u)| format!("unit {c} ({} events read)", u.events()));
                                bail!(
                                    "{origin}: the archive changes the columns of table {}.{} at unit {}, and of another \
                                     table at unit {}, while {} before them is still incomplete: pg-replay lets one \
                                     such change wait for the units before it, not two. Nothing after unit {} was \
                                     applied. If an event is missing, the archive has a gap; if one stream of the \
                                     archive is behind, replay from here with --until-txid or --until at unit {}'s \
                                     commit and then the rest",
                                    c.schema_name,
                                    c.table,
                                    tx.commit_order,
                                    d.co,
                                    first.unwrap_or_else(|| "a unit".into()),
                                    self.units.applied().map_or("(none)".into(), |a| a.to_string()),
                                    tx.commit_order.min(d.co),
                                );
                            }
                            // A unit before it is still to come: this
                            // record, and every record of a unit from its
                            // own on, wait aside until it is here.
                            self.units.hold(r.stream, tx.commit_order, r.pos);
                            self.deferred = Some(Deferred {
                                co: tx.commit_order,
                                treat,
                                trigger: archive::Decoded {
                                    stream: r.stream,
                                    pos: r.pos,
                                    next: r.next,
                                    record: Ok(Record::Change(c)),
                                },
                                queue: Vec::new(),
                            });
                            return Ok(());
                        }
                    }
                }
                if treat == Treat::ResetThenUpsert {
                    // The table starts here: emptied before the unit's first
                    // event, as a TRUNCATE event there would.
                    let reset = RowMeta {
                        commit_order: tx.commit_order,
                        total_order: 0,
                        op: Op::Truncate,
                        stream: r.stream,
                        pos: r.pos,
                    };
                    applier
                        .push(
                            idx,
                            reset,
                            None,
                            row_schema.as_ref().map(|(id, r)| (*id, &**r)),
                            &origin,
                        )
                        .await?;
                }
                if matches!(treat, Treat::ResetThenUpsert | Treat::Upsert) {
                    applier.set_lenient(idx, tx.commit_order);
                }
                let row = match c.op {
                    Op::Delete => c.before.as_ref(),
                    Op::Truncate => None,
                    _ => c.after.as_ref(),
                };
                let meta = RowMeta {
                    commit_order: tx.commit_order,
                    total_order: tx.total_order,
                    op: c.op,
                    stream: r.stream,
                    pos: r.pos,
                };
                applier
                    .push(
                        idx,
                        meta,
                        row,
                        row_schema.as_ref().map(|(id, r)| (*id, &**r)),
                        &origin,
                    )
                    .await?;
                self.units.count_staged(tx.commit_order);
                self.staged_since_apply += 1;
            }
            Record::RowState(rs) => {
                let name = rs.schema.as_ref().and_then(|s| s.name.clone());
                let source = match (&name, self.cfg.tables.as_slice()) {
                    (_, [(only, _)]) => only.clone(),
                    (Some(n), tables) => tables
                        .iter()
                        .map(|(s, _)| s.clone())
                        .find(|s| s.name == *n)
                        .unwrap_or(TableName {
                            schema: "public".into(),
                            name: n.clone(),
                        }),
                    (None, _) => bail!(
                        "{origin}: a row state without a schema does not say its table; name it with one --table SOURCE=TARGET"
                    ),
                };
                self.seq += 1;
                let info = EventInfo {
                    commit_order: self.seq,
                    total_order: 1,
                    event_count: Some(1),
                    prev: None,
                    ts_us: 0,
                    tx_id: None,
                    lsn: None,
                    stream: r.stream,
                    pos: r.pos,
                    truncate: false,
                };
                self.units
                    .add(&info, r.next)
                    .map_err(|e| unit_error(e, &origin, &self.inputs.streams))?;
                let row_schema = rs
                    .schema
                    .as_ref()
                    .and_then(|s| s.row.clone().map(|r| (s.id, r)));
                let Some(idx) = applier
                    .stage_for(&source, row_schema.as_ref().map(|(_, r)| &**r))
                    .await
                    .with_context(|| format!("at {origin}"))?
                else {
                    bail!("{origin}: a row state of table {source}, which no --table maps");
                };
                let meta = RowMeta {
                    commit_order: self.seq,
                    total_order: 1,
                    op: Op::Update,
                    stream: r.stream,
                    pos: r.pos,
                };
                applier
                    .push(
                        idx,
                        meta,
                        Some(&rs.row),
                        row_schema.as_ref().map(|(id, r)| (*id, &**r)),
                        &origin,
                    )
                    .await?;
                self.units.count_staged(self.seq);
                self.staged_since_apply += 1;
            }
        }
        Ok(())
    }

    /// A record of unit `co` changes the columns of table `idx`: applies
    /// every unit before it, then makes the change (`--schema-changes
    /// apply`, `true`) or stops, saying what changed. `false` when a unit
    /// before it is not all read yet (its events on a stream not read that
    /// far, or in a single file after this record): the change waits.
    /// `again` is the old and new OID of a source table created again under
    /// its name, whose columns `steps` pair by name.
    async fn schema_change(
        &mut self,
        applier: &mut Applier,
        total: &mut Summary,
        idx: usize,
        (steps, again): (&[apply::DdlStep], Option<(u32, u32)>),
        co: i64,
        origin: &archive::Origin,
    ) -> anyhow::Result<bool> {
        let table = applier.stage(idx).target.name.clone();
        let what: Vec<String> = steps.iter().map(apply::DdlStep::describe).collect();
        let mut what = what.join(", ");
        if let Some((old, new)) = again {
            what = format!(
                "source table {} was created again (OID {old}, now {new}), so its columns are told by name: {what}",
                applier.stage(idx).source
            );
        }
        if applier.stages_unit(idx, co) {
            bail!(
                "{origin}: table {table}'s columns change inside source transaction {co} ({what}), between its \
                 changes; pg-replay applies units whole and stopped before it. Apply that transaction to the \
                 target by hand, then run pg-replay again"
            );
        }
        // Everything before the change, first, once all of it is read.
        if !self
            .units
            .before_is_ready(co)
            .map_err(|e| anyhow::anyhow!("{e}"))?
        {
            return Ok(false);
        }
        if let Some(upto) = self.units.ready_before(co) {
            self.apply_run(applier, total, upto).await?;
        }
        match self.cfg.schema_changes {
            SchemaChanges::Apply => applier
                .apply_schema_change(idx, steps)
                .await
                .with_context(|| {
                    format!(
                        "{origin}: the archive changes table {table} at unit {co} ({what}); pg-replay stopped before \
                         that unit. Make the change to the target by hand, then run pg-replay again"
                    )
                })
                .map(|()| true),
            SchemaChanges::Stop => bail!(
                "{origin}: the archive changes the columns of table {table} at unit {co}: {what}. pg-replay applied \
                 every unit before it and stopped. Make the same change to the target table (with the DEFAULT or \
                 USING the source used: the archive holds no values for rows that did not change after it), then \
                 run pg-replay again; or pass --schema-changes apply to let pg-replay add, drop and rename columns \
                 and widen types (an added column is then NULL in those rows)"
            ),
        }
    }

    /// Applies the units that are ready, if any: those before a schema
    /// change that waits ([`Deferred`]), whose own unit is not staged whole.
    async fn try_apply(
        &mut self,
        applier: &mut Applier,
        total: &mut Summary,
    ) -> anyhow::Result<()> {
        let Some(run) = self.units.ready().map_err(|e| anyhow::anyhow!("{e}"))? else {
            return Ok(());
        };
        let upto = match &self.deferred {
            Some(d) if run.last >= d.co => match self.units.ready_before(d.co) {
                Some(u) => u,
                None => return Ok(()),
            },
            _ => run.last,
        };
        self.apply_run(applier, total, upto).await
    }

    /// Once every unit before a waiting schema change is here: applies
    /// them, makes the change (or stops, as `--schema-changes` says), and
    /// takes up the records set aside, in the order read (one of them may
    /// be a schema change that waits in turn).
    async fn take_up_deferred(
        &mut self,
        applier: &mut Applier,
        total: &mut Summary,
    ) -> anyhow::Result<()> {
        while let Some(d) = &self.deferred {
            if !self
                .units
                .before_is_ready(d.co)
                .map_err(|e| anyhow::anyhow!("{e}"))?
            {
                return Ok(());
            }
            let d = self.deferred.take().expect("just seen");
            tracing::debug!(
                unit = d.co,
                records = d.queue.len(),
                "the units before a schema change are here; taking up the records set aside"
            );
            // The holds stay while the records are taken up: a run stored
            // meanwhile (the units before the change, or the replay stopping
            // at it) must resume no later than the records not added yet.
            // Then they are what is set aside anew, if anything.
            self.record(applier, d.trigger, total, Some(d.treat))
                .await?;
            for r in d.queue {
                self.record(applier, r, total, None).await?;
            }
            self.units.release_holds();
            if let Some(n) = &self.deferred {
                self.units.hold(n.trigger.stream, n.co, n.trigger.pos);
                for r in &n.queue {
                    if let Ok(Record::Change(c)) = &r.record {
                        if let Some(t) = &c.tx {
                            self.units.hold(r.stream, t.commit_order, r.pos);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn apply_run(
        &mut self,
        applier: &mut Applier,
        total: &mut Summary,
        upto: i64,
    ) -> anyhow::Result<()> {
        let row_states = self.kind == Some(Kind::RowStates);
        let units::RunSummary {
            units,
            staged: changes,
            ts_us,
            tx_id,
            lsn,
        } = self.units.summary_upto(upto);
        let streams = self.resume_after(upto);
        let info = RunInfo {
            upto,
            units,
            changes,
            from: self.stored_from,
            commit_order: if row_states { None } else { Some(upto) },
            ts_us: if row_states { None } else { ts_us },
            tx_id,
            lsn,
            streams,
        };
        match applier.apply(&info).await {
            Ok(applied) => {
                self.units.applied_run(upto);
                self.stored_from = info.commit_order;
                self.staged_since_apply = self.units.staged();
                self.last_apply = Instant::now();
                total.changes += applied.changes;
                total.units += units;
                if !row_states {
                    total.position = Some(upto);
                    total.ts_us = ts_us;
                    metrics::gauge!(names::POSITION).set(upto as f64);
                    if let Some(ts) = ts_us {
                        metrics::gauge!(names::APPLIED_COMMIT_TIME).set(ts as f64 / 1e6);
                        // Every unit of the run committed at or before it.
                        let now = tidemark_common::health::now_ms() * 1000;
                        metrics::histogram!(names::UNIT_LAG)
                            .record_many((now - ts).max(0) as f64 / 1e6, units as usize);
                    }
                }
                if applied.slow {
                    total.slow_runs += 1;
                    metrics::counter!(names::SLOW_RUNS).increment(1);
                }
                metrics::counter!(names::CHANGES_APPLIED).increment(applied.changes);
                metrics::counter!(names::UNITS_APPLIED).increment(units);
                metrics::gauge!(names::PENDING_UNITS).set(self.units.waiting() as f64);
                report_lag(total);
                tracing::debug!(units, changes = applied.changes, upto, "applied");
                Ok(())
            }
            Err(ApplyError::AtUnit {
                commit_order,
                message,
            }) => {
                // Apply the units before the one that cannot be, then stop.
                let before = self.units.ready_before(commit_order);
                if let Some(prev) = before {
                    if prev <= upto && Some(prev) != self.units.applied() {
                        Box::pin(self.apply_run(applier, total, prev)).await?;
                    }
                }
                bail!("{message}")
            }
            Err(ApplyError::Other(e)) => Err(e),
        }
    }

    /// Where each stream resumes once units up to `upto` are applied.
    fn resume_after(&self, upto: i64) -> BTreeMap<String, StreamPos> {
        // Units up to `upto` are about to be applied, so their positions do
        // not hold a stream back.
        let points = self.units.resume_points_after(upto);
        (0..self.inputs.streams.len() as u32)
            .map(|id| (self.inputs.streams.kind(id).hint_key(), points[id as usize]))
            .collect()
    }

    /// After the last apply of a run that read everything: an incomplete
    /// unit left before the point in time is a gap.
    /// Warns of each table whose incremental snapshot the replay ended
    /// inside of (see [`snapshots`]).
    fn warn_unfinished_snapshots(&self) {
        if self.cfg.follow {
            return;
        }
        for u in self.windows.unfinished() {
            if u.partial {
                tracing::warn!(table = %u.table, first_unit = u.first,
                    "the replay ends inside the table's incremental snapshot, which began at unit {} and is the table's first in the archive (a table that entered the capture, or entered it again): the target holds only the rows read so far. Replay to a later point (the snapshot's last chunk) for the whole table", u.first);
            } else {
                tracing::info!(table = %u.table, first_unit = u.first,
                    "the replay ends inside an incremental snapshot on demand of the table (from unit {}), which re-reads rows the archive holds: the table is whole", u.first);
            }
        }
    }

    fn check_complete(&self) -> anyhow::Result<()> {
        if self.cfg.follow || self.units.reached_end() {
            return Ok(());
        }
        if let Some(d) = &self.deferred {
            if self.units.pending().range(..d.co).next().is_none() {
                bail!(
                    "{}: the archive changes a table's columns at unit {}, but the unit before it is not in the \
                     archive; nothing after unit {} was applied",
                    self.inputs.streams.origin(d.trigger.stream, d.trigger.pos),
                    d.co,
                    self.units.applied().map_or("(none)".into(), |a| a.to_string())
                );
            }
            // Else the first unit pending is before it: that is the gap.
        }
        let Some((co, unit)) = self.units.first_pending() else {
            return Ok(());
        };
        let origin = unit
            .first_pos
            .first()
            .map(|(s, p)| self.inputs.streams.origin(*s, *p).to_string())
            .unwrap_or_default();
        let what = match unit.count {
            Some(_) if unit.is_complete() => {
                return Err(anyhow::anyhow!(
                    "unit {co} (first event at {origin}) is complete but a unit before it is missing from the archive \
                     (it names unit {} before it); nothing after the gap was applied",
                    unit.prev.flatten().map_or("?".into(), |p| p.to_string())
                ))
            }
            Some(n) => format!(
                "holds {} of its {n} events (total_order {} is the first missing)",
                unit.events(),
                unit.first_missing()
            ),
            None => format!(
                "holds {} events but not its last one (the one with event_count)",
                unit.events()
            ),
        };
        bail!(
            "a gap in the archive: unit {co} (transaction {}, first event at {origin}) {what}; nothing of it or after \
             it was applied. An event pg-source could not encode is in the dead-letter topic tidemark.dead-letter; \
             one file-sink could not write is in the file's .dead-letter file",
            unit.tx_id.map_or("?".into(), |t| t.to_string())
        )
    }
}

fn unit_error(e: UnitError, origin: &archive::Origin, streams: &Streams) -> anyhow::Error {
    let e = e.name_streams(|id| streams.kind(id).to_string());
    anyhow::anyhow!("{origin}: {e}; nothing of that unit was applied")
}
