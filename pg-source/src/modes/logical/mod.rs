//! `logical` mode: reads every insert, update, delete and truncate from a
//! logical replication slot (Postgres' `pgoutput`), so nothing runs in the writers'
//! transactions: Postgres decodes its WAL in a process of its own, and
//! pg-source turns each change into its event itself, with the codec: no
//! query renders a row, and no Tidemark session runs per change.
//!
//! Delivery:
//!
//! - The slot is created before the initial snapshot is taken. Every
//!   transaction that commits after the slot's start is in the stream; the
//!   ones the snapshot already holds (visible in its `done` snapshot, read
//!   in Rust, or in a segment's snapshot for the key ranges read after a
//!   restart, checked with one query for those changes only) are left out,
//!   so there is neither a gap nor an overlap.
//! - The stream sends whole transactions in commit order. A batch of them
//!   goes to Kafka in one transaction together with the position: the end
//!   LSN of the last transaction sent whole, and how many changes of the
//!   next one were sent when a large one is split over several batches.
//! - The slot is told a position only after Kafka committed it, so Postgres
//!   keeps the WAL a restart needs; after a crash the stream resumes at the
//!   stored LSN and skips the changes of a split transaction already sent.
//!   Any failure drops the stream and resumes it from the stored position.
//!
//! Shapes: every change is typed by the shape it was written with. The
//! stream describes a table (a `Relation` message: column names, type OIDs,
//! typmods, as of that point in the WAL) before its first change and again
//! after any change to the table, so a change written before an `ALTER
//! TABLE` is decoded with the old columns and types, one written after with
//! the new, whenever pg-source reads them. The primary key and the NOT NULL
//! flags come from the catalog when a Relation arrives (replica identity
//! full flags every column as key); for a table dropped since, the last
//! ones known. A change read after a later DDL it was written before (as
//! after a restart) finds its key columns by attnum, not by a name that
//! may have changed since ([`attnums`]); one whose key column nothing
//! proves is a dead letter. A consumer sees the new shape in the event's schema from the
//! first change after the DDL: an added column (its values from the first
//! change after it), a dropped or renamed one, a new type (its
//! `tidemark.column.type` parameter), a new primary key (the record key's
//! fields).
//!
//! Tables that go and come back: a table is followed by its OID (a
//! Relation message's id), so a renamed table's changes keep coming, under
//! its configured name (a replay of that name has them all). The position
//! records the OID each table is read as. When the table of that name is
//! another one, published (the one read was dropped, or renamed away, and
//! a new one made and captured: schema-init adds it to the name's
//! publication, which holds tables by OID), that one takes its place: at
//! the first Relation of it, or at the look for dropped tables every 10 s,
//! whichever comes first, so a new table never written to is found too. A
//! WARN says the old one left, and the new one enters the set again, with
//! an incremental snapshot that begins with a TRUNCATE event ([`added`]):
//! the snapshot's chunks take their place after every transaction
//! committed before they are read, so after every change of the old table,
//! and the new one's changes before its chunks are left out (their
//! transactions hold the chunks back until a snapshot sees them end, and
//! the running ones are taken as a seed, as for a table that joins the
//! stream). A table created again but not captured is not in the
//! publication, so none of its changes are read: a WARN names the
//! schema-init run, and `tidemark_source_tables_uncaptured{table}` is 1,
//! until it is captured (at a start too: the other tables go on).
//!
//! TRUNCATE: a `Truncate` message names every published table it emptied
//! (`TRUNCATE a, b`, and those a cascade reached); each captured one is an
//! event of op `t` with `before` and `after` null and a null Kafka key, in
//! its place in its transaction and counted in its totals, as in `changelog`
//! mode. `skipped.operations=t` leaves them out. One that a resumed initial
//! snapshot's later segment already follows is a dead letter: the rows of
//! the segments read before it precede it, and no event could say which.

mod added;
mod attnums;
mod slot;

pub(crate) use slot::parse_lsn;
pub use slot::{default_slot_name, prepare_slot};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::FutureExt as _;
use pgwire_replication::{
    Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig,
};
use sqlx::postgres::PgSslMode;
use sqlx::PgPool;
use tidemark_common::codec::{CodecError, ColumnSpec, ColumnType, Oid, TypeCache};
use tidemark_common::envelope::{now_us, Op, Sequence};
use tidemark_common::offset::{position_key, LogicalPosition, SourcePosition};
use tidemark_common::ops::names;
use tidemark_common::pg::{publication_name, quote_ident, PgTarget, TableName};
use tokio_util::sync::CancellationToken;

use crate::catalog::TableInfo;
use crate::config::{LogicalConfig, SkippedOps};
use crate::errors::{stream_sqlstate, SourceError};
use crate::modes::{Batch, Capture, Committed};
use crate::pgoutput::{self, Message, Value};
use crate::producer::Record;
use crate::shape::{
    lexicographic_gt, literals, stored_key_texts, xid_after, CatalogShape, Encoded, KeyColumn,
    Shape,
};
use crate::snapshot::{self, key_display, InitialSnapshot};
use crate::table::{CapturedTable, DeadLetter, EncodedChange, Unit};
use crate::visibility::PgSnapshot;

/// Microseconds between 1970-01-01 and 2000-01-01, Postgres' epoch.
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// How long a stream with nothing new waits before returning to the main
/// loop (which reports health and checks for a stop).
const IDLE_RETURN: Duration = Duration::from_secs(1);

/// With only changes of other tables (or of the snapshot's transactions)
/// passing, the position is still committed this often, so the slot can let
/// Postgres recycle its WAL.
const POSITION_ONLY_EVERY: Duration = Duration::from_secs(5);

/// While a batch lingers, how long it sleeps before it takes what the
/// stream has buffered meanwhile (the buffer holds 1024 messages, a few ms
/// of the fastest stream).
const LINGER_SLICE: Duration = Duration::from_millis(5);

/// While idle, how often to look whether a captured table was dropped.
const GONE_CHECK_EVERY: Duration = Duration::from_secs(10);

/// How often the signal table is read (snapshots on demand): one cheap
/// query, between batches.
const SIGNALS_EVERY: Duration = Duration::from_secs(1);

/// Longest the look for tables a pattern came to match may hold the stream.
/// While Postgres refuses new connections (as during a shutdown) the pool
/// would wait its acquire timeout (10 s) at every look, and the stream
/// with it; a fast shutdown waits for the walsender, which waits for this
/// stream's replies, so it took more than pg_ctl's 60 s.
const DISCOVERY_PATIENCE: Duration = Duration::from_secs(2);

/// One decoded change, encoded, before it gets its place in its unit.
struct Decoded {
    table: usize,
    change: EncodedChange,
    /// The changed row's key column texts (the new row's, or a delete's
    /// old row's), for the segment check and the incremental snapshot.
    key_texts: Vec<Option<String>>,
    /// An update's old row's key column texts.
    old_key_texts: Option<Vec<Option<String>>>,
    txid: u64,
    changed_ms: i64,
    lsn: u64,
    /// How many changes of its transaction at `lsn` were read with it.
    at_last: u64,
    /// Its transaction's commit LSN (the unit's `commit_order`) and commit
    /// time in µs since the epoch.
    commit_lsn: u64,
    commit_us: i64,
    /// The end LSN of the last transaction before its own.
    last_commit: u64,
    /// The last change of its transaction: the Commit came after it.
    txn_last: bool,
    /// Filtered already: kept by the filters of the batch that read it,
    /// and held back to the next (see [`LogicalMode::hold_back`]).
    filtered: bool,
    /// A change of a table that a new table of its name took the place
    /// of in this batch, made after that (see [`relation`]): left out, as
    /// the new table's snapshot holds it.
    fresh: bool,
}

/// A table as the stream describes it.
struct Relation {
    /// Index into the mode's tables; `None` for a table not read.
    table: Option<usize>,
    /// The shape its changes are encoded with.
    shape: Option<Arc<Shape>>,
    /// Generated columns the table has and the stream does not send (as
    /// the catalog had them at the message): its changes cannot be carried
    /// whole and go to the dead-letter topic, naming them.
    unsent: Option<String>,
    /// Why its changes cannot be keyed (a key column that cannot be told
    /// among the columns sent, see [`attnums`]): they go to the dead-letter
    /// topic with their rows, until the table is described again.
    unkeyed: Option<String>,
}

/// A transaction being read from the stream.
struct Txn {
    xid: u64,
    commit_us: i64,
    /// The commit record's LSN (Begin's final LSN): it orders transactions
    /// by commit and is known before their first change.
    commit_lsn: u64,
    /// The end LSN of the transaction before.
    last_commit: u64,
    /// The WAL position of its last change read, and how many changes were
    /// read at that position.
    last_lsn: u64,
    at_last: u64,
}

/// A captured table with what logical mode knows of it besides.
struct LogicalTable {
    table: CapturedTable,
    /// The table's columns and key as the catalog had them when last
    /// looked at: the key and NOT NULL flags of its changes, and what
    /// stands in once the table is gone.
    known: CatalogShape,
    /// The table was dropped (and that was logged).
    gone: bool,
    /// The table's publication is younger than the WAL the stream reads
    /// (the table was captured while pg-source was stopped): it joins the
    /// stream once the position passes this LSN, read after the
    /// publication existed (see [`LogicalMode::join_later`]).
    join_at: Option<u64>,
    /// Dropped, and a table of its name exists without capture: said once.
    told_uncaptured: bool,
}

impl AsRef<CapturedTable> for LogicalTable {
    fn as_ref(&self) -> &CapturedTable {
        &self.table
    }
}

/// Refuses a table without logical capture (its publication, replica
/// identity full) or with generated columns, saying what to do (what
/// `--check` reports).
///
/// Fails on a database error too.
pub(crate) async fn check_capture(pool: &PgPool, name: &TableName) -> anyhow::Result<()> {
    if let Some(columns) = check_publication(pool, name).await? {
        bail!("table {name} has generated columns ({columns}), whose values logical decoding does not send: capture it with --capture changelog and mode changelog");
    }
    Ok(())
}

/// Refuses a table without logical capture (its publication, replica
/// identity full), saying what to do; returns its generated columns, if it
/// has any (a table's trouble, not the connector's: its changes become
/// dead letters, see [`Relation::unsent`]).
///
/// Fails on a database error too.
async fn check_publication(pool: &PgPool, name: &TableName) -> anyhow::Result<Option<String>> {
    let publication = publication_name(name);
    let (published, identity, generated, kind): (
        bool,
        Option<String>,
        Option<String>,
        Option<String>,
    ) = sqlx::query_as(
        "select exists (select 1 from pg_catalog.pg_publication_tables p
                        where p.pubname operator(pg_catalog.=) $1 and p.schemaname operator(pg_catalog.=) $2
                          and p.tablename operator(pg_catalog.=) $3),
                c.relreplident::pg_catalog.text,
                (select pg_catalog.string_agg(a.attname::pg_catalog.text, ', ' order by a.attnum)
                   from pg_catalog.pg_attribute a
                  where a.attrelid operator(pg_catalog.=) c.oid and a.attnum operator(pg_catalog.>) 0
                    and not a.attisdropped and a.attgenerated operator(pg_catalog.<>) ''),
                c.relkind::pg_catalog.text
         from (select 1) one
         left join pg_catalog.pg_namespace n on n.nspname operator(pg_catalog.=) $2
         left join pg_catalog.pg_class c
           on c.relnamespace operator(pg_catalog.=) n.oid and c.relname operator(pg_catalog.=) $3",
    )
    .bind(&publication)
    .bind(&name.schema)
    .bind(&name.name)
    .fetch_one(pool)
    .await?;
    if kind.as_deref() == Some("p") {
        bail!("table {name} is partitioned, which logical capture does not carry (the stream names its partitions, and drops a TRUNCATE of one partition unseen): capture it with schema-init --capture changelog --capture-trigger row and mode changelog");
    }
    if !published && kind.is_some() && made_again(pool, name).await? {
        bail!("table {name} is not in its publication {publication}, which holds the tables it was made for by their OIDs: the table was dropped and created again (or renamed away and another one given its name) since it was captured; run schema-init --capture logical --table {name} to capture this one (pg-source then sends its rows by an incremental snapshot)");
    }
    if !published || identity.as_deref() != Some("f") {
        bail!("table {name} has no logical capture (publication {publication} and replica identity full): run schema-init --capture logical --table {name}");
    }
    let truncates: bool = sqlx::query_scalar(
        "select coalesce(pg_catalog.bool_and(p.pubtruncate), false) from pg_catalog.pg_publication p
          where p.pubname operator(pg_catalog.=) $1",
    )
    .bind(&publication)
    .fetch_one(pool)
    .await?;
    if !truncates {
        tracing::warn!(table = %name, publication = %publication, "the table's publication does not publish TRUNCATE (made by an older schema-init): a TRUNCATE of it is not sent, and a restore would keep the rows it removed; run schema-init --capture logical --table {name} again");
    }
    Ok(generated)
}

/// Whether the table `name` exists and its publication does too, without
/// it: the publication holds tables by OID, and this one was made after it
/// (the table captured was dropped, or renamed away, and another one given
/// its name).
///
/// Fails on a database error.
async fn made_again(pool: &PgPool, name: &TableName) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar(
        "select exists (select 1 from pg_catalog.pg_publication p where p.pubname operator(pg_catalog.=) $1)
            and not exists (select 1 from pg_catalog.pg_publication_tables p
                            where p.pubname operator(pg_catalog.=) $1 and p.schemaname operator(pg_catalog.=) $2
                              and p.tablename operator(pg_catalog.=) $3)
            and exists (select 1 from pg_catalog.pg_class c
                          join pg_catalog.pg_namespace n on n.oid operator(pg_catalog.=) c.relnamespace
                         where n.nspname operator(pg_catalog.=) $2 and c.relname operator(pg_catalog.=) $3)",
    )
    .bind(publication_name(name))
    .bind(&name.schema)
    .bind(&name.name)
    .fetch_one(pool)
    .await?)
}

/// Checks a table's logical capture. With `at_start`, a table made again
/// under a captured one's name and not captured yet (see [`made_again`])
/// stops only itself: it is read as dropped, with a WARN naming the
/// schema-init run, and takes the old one's place once captured (see
/// [`LogicalMode::take_over_now`]).
///
/// Fails when the table has no publication or full replica identity, has
/// generated columns, or has no primary key.
async fn logical_table(
    pool: &PgPool,
    types: &TypeCache,
    table: CapturedTable,
    at_start: bool,
) -> anyhow::Result<LogicalTable> {
    let name = &table.info.name;
    let uncaptured = at_start && made_again(pool, name).await?;
    if uncaptured {
        tracing::warn!(table = %name, "the table was created again under the name of a captured table (or another one given its name), and has no logical capture, so none of its changes are read (the other tables go on): run schema-init --capture logical --table {name}; then it is read, and its rows are sent by an incremental snapshot");
        metrics::gauge!(names::SOURCE_TABLES_UNCAPTURED, "table" => name.to_string()).set(1.0);
    } else if let Some(columns) = check_publication(pool, name).await? {
        tracing::error!(table = %name, columns = %columns, "the table has generated columns, whose values logical decoding does not send: its changes go to the dead-letter topic (the other tables go on); capture it with schema-init --capture changelog and mode changelog");
    }
    let mut conn = pool.acquire().await?;
    let known = CatalogShape::load(&mut conn, types, table.oid)
        .await?
        .with_context(|| format!("table {name} is gone"))?;
    if known.key.is_empty() {
        bail!("table {name} has no primary key, so its changes cannot be keyed: add one, or use mode timestamp+incrementing");
    }
    Ok(LogicalTable {
        table,
        known,
        gone: uncaptured,
        join_at: None,
        told_uncaptured: uncaptured,
    })
}

/// The open replication stream and what decoding it needs.
pub struct LogicalStream {
    client: ReplicationClient,
    relations: HashMap<u32, Relation>,
    /// The open transaction.
    txn: Option<Txn>,
    /// Where the first transaction was cut before a restart: its changes up
    /// to this WAL position (and this many at it) were sent already.
    skip: Option<(u64, u64)>,
    /// A recent full transaction id, to widen the stream's 32-bit xids.
    xid_base: u64,
    slot: String,
    /// The position last told to the slot.
    acked: u64,
    /// The end LSN of the last transaction read: the next one's
    /// `source.sequence` starts with it.
    last_commit: u64,
    /// A change read after a full batch, in the transaction the batch cut:
    /// it starts the next batch. Holding it back tells, when the Commit
    /// comes first, that the batch's last change ends its transaction.
    /// A TRUNCATE of several tables is several changes at one position, so
    /// more than one may wait. First among them may be the cut
    /// transaction's last change kept, held back already filtered (see
    /// [`LogicalMode::hold_back`]).
    pending: Vec<Decoded>,
    /// The stream's own connection, for the catalog lookups a Relation
    /// needs and the segment check: when Postgres shuts down (and waits for
    /// this stream to confirm what it sent) a lookup fails at once instead
    /// of waiting for the pool to connect again, which would hold the
    /// shutdown up.
    conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
    /// Tables a new table of their name took the place of in the batch
    /// being read (index, and the OID followed before): each enters the set
    /// again once the batch is filtered (see [`relation`]).
    reentered: Vec<(usize, Oid)>,
}

/// `logical` mode: the initial snapshot, then the replication stream.
pub struct LogicalMode {
    cfg: LogicalConfig,
    pool: PgPool,
    target: PgTarget,
    types: Arc<TypeCache>,
    tables: Vec<LogicalTable>,
    position: LogicalPosition,
    /// `position.done`, parsed.
    done: PgSnapshot,
    snapshot: InitialSnapshot,
    stream: Option<LogicalStream>,
    /// The position last committed to Kafka (or the slot's own, before the
    /// first commit): all a reopened stream may confirm to the slot. The
    /// in-memory position can be ahead of it (a keepalive moves it between
    /// commits); confirming that would put the slot past the stored
    /// position, and a crash then would refuse every start.
    committed_lsn: u64,
    /// When the last batch of changes stopped reading: the next batch's
    /// linger runs from there.
    read_ended: Option<Instant>,
    /// When a batch last committed: with only other tables' changes
    /// passing, the position is committed every [`POSITION_ONLY_EVERY`].
    last_commit: Instant,
    /// When the tables were last looked for.
    last_gone_check: Instant,
    /// The server's WAL position when the current round of reading began:
    /// once the stream passed it (and [`IDLE_RETURN`] went by), the round
    /// ends (see [`LogicalMode::round_done`]).
    round: Option<(u64, Instant)>,
    /// The last round ended with the stream idle (so the lag is 0), not by
    /// [`LogicalMode::round_done`] under writes.
    idle_round: bool,
    position_key: Vec<u8>,
    /// How to find and add tables that come to match a pattern.
    pub discovery: Option<crate::modes::changelog::Discovery>,
    /// When tables were last looked for.
    last_discovery: Instant,
    /// Tables a pattern matches that cannot be read: said once each.
    told: std::collections::HashSet<TableName>,
    /// For the tables added while running.
    connector: String,
    database: String,
    schemas: (bool, bool),
    offsets_topic: String,
    /// The incremental snapshots' chunk waiting for its place, and what
    /// they keep of the stream (see [`added`]).
    added: added::Added,
    /// When the signal table was last read (see [`Self::read_signals`]).
    last_signals: Instant,
    /// The signal table cannot be read: said once, and not read again
    /// until pg-source restarts.
    signals_off: bool,
}

impl LogicalMode {
    /// Checks the server, the slot and every table, and reads the stored
    /// position; without one, creates the slot and starts now (with the
    /// initial snapshot when configured). Creating the slot waits for the
    /// transactions open on the server.
    ///
    /// Fails when the server, slot or a table is not set up for logical
    /// capture, or a stored position belongs to another mode.
    #[allow(clippy::too_many_arguments)]
    pub async fn new(
        cfg: LogicalConfig,
        connector: &str,
        database: &str,
        pool: &PgPool,
        target: &PgTarget,
        infos: Vec<(TableInfo, String)>,
        stored: &HashMap<Vec<u8>, Vec<u8>>,
        offsets_topic: &str,
        schemas: (bool, bool),
    ) -> anyhow::Result<Self> {
        let types = Arc::new(TypeCache::new());
        let mut tables = Vec::new();
        for (info, topic) in infos {
            let t = CapturedTable::new(pool, info, topic, connector, database, schemas).await?;
            tables.push(logical_table(pool, &types, t, true).await?);
        }
        // Logical positions live under their own key: a connector that
        // changes mode is told so instead of reading another mode's position.
        let position_key = position_key(connector, "tidemark.logical");
        let stored = stored
            .get(&position_key)
            .map(|b| SourcePosition::decode(b))
            .transpose()?;
        let (mut position, fresh) = match stored {
            Some(SourcePosition::Logical(p)) => {
                let lsn = prepare_slot(pool, &cfg.slot_name, Some(p.lsn)).await?;
                // The incremental snapshots' progress too: what a restart
                // goes on from is then in the log.
                let incremental: Vec<String> = p
                    .incremental
                    .iter()
                    .map(|i| format!("{} ({} rows sent)", i.table, i.rows))
                    .collect();
                tracing::info!(slot = %cfg.slot_name, lsn = %Lsn(lsn), in_txn = p.in_txn, snapshot_running = p.snapshot.is_some(), incremental = %incremental.join(", "), "resuming from stored position");
                (p, false)
            }
            Some(other) => bail!(
                "the stored position of connector {connector} is for another mode ({other:?}): use a new connector name to change modes"
            ),
            None => {
                // The slot first: every transaction committed after it is in
                // its stream, every one before is in the snapshot taken next.
                let lsn = prepare_slot(pool, &cfg.slot_name, None).await?;
                let done: String = sqlx::query_scalar(
                    "select pg_catalog.pg_current_snapshot()::pg_catalog.text",
                )
                .fetch_one(pool)
                .await?;
                let snapshot = cfg.initial_snapshot.then(|| snapshot::begin(&tables));
                tracing::info!(initial_snapshot = cfg.initial_snapshot, "no stored position, starting now");
                (
                    LogicalPosition {
                        lsn,
                        // Signals committed before the slot are not acted on.
                        signals: Some(done.clone()),
                        done,
                        snapshot,
                        ..Default::default()
                    },
                    true,
                )
            }
        };
        if fresh {
            // Every table read now is in the initial snapshot.
            position.tables = Some(tables.iter().map(|t| t.table.log_name.clone()).collect());
        }
        let snapshot = InitialSnapshot::start(pool, &types, &tables, &mut position, fresh).await?;
        let done = PgSnapshot::parse(&position.done)?;
        let committed_lsn = position.lsn;
        let mut mode = Self {
            cfg,
            committed_lsn,
            pool: pool.clone(),
            target: target.clone(),
            types,
            tables,
            position,
            done,
            snapshot,
            stream: None,
            read_ended: None,
            last_commit: Instant::now(),
            last_gone_check: Instant::now(),
            round: None,
            idle_round: true,
            position_key,
            discovery: None,
            // The first look (which names matching tables without
            // capture) comes at once.
            last_discovery: Instant::now()
                .checked_sub(GONE_CHECK_EVERY)
                .unwrap_or_else(Instant::now),
            told: std::collections::HashSet::new(),
            connector: connector.to_owned(),
            database: database.to_owned(),
            schemas,
            offsets_topic: offsets_topic.to_owned(),
            added: added::Added::default(),
            last_signals: Instant::now()
                .checked_sub(SIGNALS_EVERY)
                .unwrap_or_else(Instant::now),
            signals_off: false,
        };
        for t in &mut mode.tables {
            match mode.position.oids.get(&t.table.log_name) {
                Some(&o) if o != t.known.oid => {
                    // The table of the name now is not the one read before
                    // (dropped and made again while pg-source was stopped):
                    // the one read goes on until the new one takes its place
                    // (see `relation` and `take_over_now`).
                    t.known.oid = o;
                    t.table.oid = o;
                }
                Some(_) => {}
                None => {
                    mode.position
                        .oids
                        .insert(t.table.log_name.clone(), t.known.oid);
                }
            }
        }
        mode.reconcile_added(true);
        Ok(mode)
    }

    /// Whether the stream, between transactions with nothing held, has
    /// passed the server's WAL position of when this round of reading
    /// began, at least [`IDLE_RETURN`] ago: then the mode says it is caught
    /// up, so a stream that never idles (writers that never pause) still
    /// ends rounds, and pg-source reports itself ready and alive. Starts
    /// the next round.
    async fn round_done(&mut self) -> bool {
        let between = self
            .stream
            .as_ref()
            .is_some_and(|s| s.txn.is_none() && s.pending.is_empty());
        match self.round {
            Some((lsn, at))
                if between && self.position.lsn >= lsn && at.elapsed() >= IDLE_RETURN =>
            {
                self.round = None;
                true
            }
            Some(_) => false,
            None => {
                let now: Result<String, _> =
                    sqlx::query_scalar("select pg_catalog.pg_current_wal_lsn()::pg_catalog.text")
                        .fetch_one(&self.pool)
                        .await;
                // Unknown (a server in recovery): rounds end only when the
                // stream idles.
                let lsn = now
                    .ok()
                    .and_then(|l| parse_lsn(&l).ok())
                    .unwrap_or(u64::MAX);
                self.round = Some((lsn, Instant::now()));
                false
            }
        }
    }

    /// Opens the stream at the stored position.
    ///
    /// Fails when the replication connection cannot be made.
    async fn open_stream(&self) -> Result<LogicalStream, SourceError> {
        let slot = &self.cfg.slot_name;
        let t = self.target.replication_target().ok_or_else(|| {
            SourceError::Definite(anyhow::anyhow!(
                "mode logical needs a TCP connection.url (host and port), not a Unix socket"
            ))
        })?;
        let mut tls = match t.ssl_mode {
            PgSslMode::Disable | PgSslMode::Allow => TlsConfig::disabled(),
            PgSslMode::Prefer => TlsConfig {
                mode: pgwire_replication::SslMode::Prefer,
                ..TlsConfig::default()
            },
            PgSslMode::Require => TlsConfig::require(),
            PgSslMode::VerifyCa => TlsConfig::verify_ca(t.ssl_root_cert.clone().map(Into::into)),
            PgSslMode::VerifyFull => {
                TlsConfig::verify_full(t.ssl_root_cert.clone().map(Into::into))
            }
        };
        if let Some((cert, key)) = &t.ssl_cert_key {
            tls = tls.with_client_cert(cert, key);
        }
        let at = self.position.lsn;
        // Publication names are identifiers in START_REPLICATION's list:
        // quoted, so upper case and spaces survive.
        let publications: Vec<String> = self
            .tables
            .iter()
            .filter(|t| !t.gone && t.join_at.is_none())
            .map(|t| quote_ident(&publication_name(&t.table.info.name)))
            .collect();
        let config =
            ReplicationConfig::new(t.host, t.user, t.password, t.database, slot, publications)
                .with_port(t.port)
                .with_tls(tls)
                .with_start_lsn(Lsn(at))
                .with_ack_lsn(Lsn(at.min(self.committed_lsn)))
                .with_status_interval(Duration::from_secs(1))
                .with_buffer_size(1024)
                .with_application_name("tidemark-pg-source")
                // Tidemark's session settings: values as the reader's own sessions
                // print them, so they read back the same, and its search_path.
                .with_options(tidemark_common::pg::session_options());
        let pg = |e| SourceError::postgres("cannot prepare the replication stream", e);
        let mut conn = self.pool.acquire().await.map_err(pg)?;
        let xid_base: i64 =
            sqlx::query_scalar("select pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::pg_catalog.text::pg_catalog.int8")
                .fetch_one(&mut *conn)
                .await
                .map_err(pg)?;
        let client = match ReplicationClient::connect(config).await {
            Ok(client) => client,
            Err(e) => return Err(self.stream_error(e, Some(&mut conn)).await),
        };
        let skip = self.position.in_txn_lsn.map(|l| (l, self.position.in_txn));
        tracing::info!(slot, lsn = %Lsn(at), resume_inside = ?skip.map(|(l, n)| (Lsn(l).to_string(), n)), "replication stream opened");
        Ok(LogicalStream {
            client,
            relations: HashMap::new(),
            txn: None,
            skip,
            xid_base: xid_base as u64,
            slot: slot.to_owned(),
            // What the slot was told: a position ahead of it is committed
            // (position only) and confirmed like any other.
            acked: at.min(self.committed_lsn),
            last_commit: at,
            pending: Vec::new(),
            conn,
            reentered: Vec::new(),
        })
    }

    /// A stream error with what to do, when its SQLSTATE says; a missing
    /// object is told apart (the slot or a publication) by looking.
    async fn stream_error(
        &self,
        e: PgWireError,
        conn: Option<&mut sqlx::PgConnection>,
    ) -> SourceError {
        let slot = &self.cfg.slot_name;
        let hint = match (&e, stream_sqlstate(&e)) {
            (PgWireError::Auth(_), _) => {
                "; check connection.user and connection.password".to_owned()
            }
            (_, Some("42501")) => {
                "; the user needs the REPLICATION attribute: alter role <user> replication".to_owned()
            }
            (_, Some("42704")) => {
                let slot_exists = match conn {
                    Some(conn) => sqlx::query_scalar::<_, bool>(
                        "select exists (select 1 from pg_catalog.pg_replication_slots s where s.slot_name operator(pg_catalog.=) $1)",
                    )
                    .bind(slot)
                    .fetch_one(conn)
                    .await
                    .ok(),
                    None => None,
                };
                match slot_exists {
                    Some(false) => "; the slot is gone, so the changes since the stored position cannot be read: start over with a new connector name (a new initial snapshot)".to_owned(),
                    _ => "; run schema-init --capture logical for every table read".to_owned(),
                }
            }
            (_, Some("55006")) => format!(
                "; another session is reading slot {slot}: a dying one lets go within seconds; if it is another connector, give each its own slot.name"
            ),
            _ => String::new(),
        };
        SourceError::Stream {
            slot: slot.clone(),
            source: e,
            hint,
        }
    }

    /// Reads until a batch is ready: `batch.max.rows` changes, or the
    /// transactions read until `batch.linger.ms` after the last batch
    /// stopped reading (a change read later than that goes with what is
    /// already there, at once). Returns `None` after [`IDLE_RETURN`] with
    /// nothing to send. Moves the position to what the batch covers.
    ///
    /// While the linger runs, the step sleeps in slices of [`LINGER_SLICE`]
    /// and takes what the stream's buffer holds after each, rather than
    /// waking for every message: under many small commits that is most of
    /// what reading costs pg-source.
    ///
    /// Fails on a stream or decoding error.
    async fn stream_step(&mut self) -> Result<Option<Batch>, SourceError> {
        if self.stream.is_none() {
            self.stream = Some(self.open_stream().await?);
            self.added.stream_opened();
        }
        let mut changes: Vec<Decoded> = Vec::new();
        let started = Instant::now();
        let chunk = self.cfg.batch_max_rows;
        // The batch's linger: it began when the last batch stopped reading
        // (what came since has waited for that batch's commit already); a
        // first batch, or one after a pause longer than the linger, takes
        // what is there and goes.
        let deadline = self
            .read_ended
            .map_or(started, |t| t + self.cfg.batch_linger);
        let position_only = |what| Batch {
            what,
            ..Batch::default()
        };
        // What the batch cut off last time starts this one.
        if let Some(s) = self.stream.as_mut() {
            changes.append(&mut s.pending);
        }
        'read: loop {
            let s = self.stream.as_mut().expect("opened above");
            let caught_up = s.txn.is_none();
            let ev = if changes.is_empty() && caught_up {
                if self.position.lsn != s.acked && self.last_commit.elapsed() >= POSITION_ONLY_EVERY
                {
                    return Ok(Some(position_only("position committed")));
                }
                let left = IDLE_RETURN.saturating_sub(started.elapsed());
                match tokio::time::timeout(left, s.client.recv()).await {
                    Ok(ev) => ev,
                    Err(_) => return Ok(None),
                }
            } else if caught_up {
                // Between transactions with changes in hand: take what is
                // already here, and what comes until the linger is over,
                // then send. Fewer, larger Kafka transactions cost the
                // broker and pg-source less under many small commits; the
                // linger bounds what that adds to latency.
                match s.client.recv().now_or_never() {
                    Some(ev) => ev,
                    None => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        tokio::time::sleep(left.min(LINGER_SLICE)).await;
                        continue;
                    }
                }
            } else {
                s.client.recv().await
            };
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => return Err(self.stream_error(e, None).await),
            };
            let s = self.stream.as_mut().expect("opened above");
            match ev {
                None => return Err(SourceError::StreamClosed(s.slot.clone())),
                Some(ReplicationEvent::Begin {
                    xid,
                    commit_time_micros,
                    final_lsn,
                }) => {
                    let full = s.full_xid(xid);
                    s.txn = Some(Txn {
                        xid: full,
                        commit_us: commit_time_micros + PG_EPOCH_US,
                        commit_lsn: final_lsn.0,
                        last_commit: s.last_commit,
                        last_lsn: 0,
                        at_last: 0,
                    });
                    // An incremental snapshot's chunk goes before the
                    // first transaction committed at or after its WAL
                    // position: the batch ends here, and this transaction
                    // is read on after the chunk.
                    if self.added.reaches(final_lsn.0) {
                        break 'read;
                    }
                }
                Some(ReplicationEvent::XLogData {
                    wal_start, data, ..
                }) => {
                    let decoded = decode(
                        s,
                        &mut self.tables,
                        &self.types,
                        &self.done,
                        self.cfg.skipped,
                        &data,
                        wal_start.0,
                    )
                    .await?;
                    let mut decoded = decoded.into_iter();
                    while let Some(d) = decoded.next() {
                        if changes.len() as i64 >= chunk {
                            // A large transaction goes in parts; the next
                            // start skips what this one sends. This change
                            // goes first in the next part.
                            let sent = changes.last().expect("a full batch");
                            self.position.in_txn_lsn = Some(sent.lsn);
                            self.position.in_txn = sent.at_last;
                            s.pending.push(d);
                            s.pending.extend(decoded);
                            break 'read;
                        }
                        changes.push(d);
                    }
                }
                Some(ReplicationEvent::Commit { end_lsn, .. }) => {
                    if let Some(txn) = s.txn.take() {
                        if let Some(last) = changes
                            .last_mut()
                            .filter(|c| c.commit_lsn == txn.commit_lsn)
                        {
                            last.txn_last = true;
                        }
                    }
                    s.last_commit = end_lsn.0;
                    s.skip = None;
                    self.position.lsn = end_lsn.0;
                    self.position.in_txn_lsn = None;
                    self.position.in_txn = 0;
                    if changes.len() as i64 >= chunk {
                        break;
                    }
                }
                Some(ReplicationEvent::KeepAlive {
                    wal_end,
                    reply_requested,
                    ..
                }) => {
                    // Between transactions with nothing unsent, everything the
                    // server sent before `wal_end` is in Kafka: the position
                    // may move there. A server shutting down waits for its
                    // slot to be confirmed that far (it asks for a reply), so
                    // that position is committed and confirmed at once.
                    if s.txn.is_none() && changes.is_empty() && wal_end.0 > self.position.lsn {
                        self.position.lsn = wal_end.0;
                        self.position.in_txn_lsn = None;
                        self.position.in_txn = 0;
                        if reply_requested {
                            return Ok(Some(position_only("position committed")));
                        }
                    }
                    // Every transaction before `wal_end` was sent: a chunk
                    // placed before it is due.
                    if s.txn.is_none() && self.added.reaches(wal_end.0) {
                        break 'read;
                    }
                }
                Some(ReplicationEvent::Message {
                    transactional: false,
                    lsn,
                    ..
                }) => {
                    // A non-transactional message (the mark written after a
                    // chunk's read) comes after every transaction committed
                    // before it.
                    if s.txn.is_none() && self.added.reaches(lsn.0) {
                        break 'read;
                    }
                }
                Some(ReplicationEvent::Message { .. }) => {}
                Some(ReplicationEvent::StoppedAt { .. }) => {
                    return Err(SourceError::Definite(anyhow::anyhow!(
                        "the replication stream of slot {} stopped",
                        s.slot
                    )))
                }
            }
        }
        if changes.is_empty() && self.added.due() {
            return Ok(None);
        }
        let rows = changes.len();
        if rows > 0 {
            self.read_ended = Some(Instant::now());
        }
        let newest_change_ms = changes.iter().map(|c| c.changed_ms).max();
        let s = self.stream.as_mut().expect("opened above");
        let complete = changes
            .iter()
            .filter(|c| c.txn_last)
            .map(|c| c.commit_lsn)
            .collect();
        let first_txn = changes.first().map(|c| c.commit_lsn);
        // The transaction this batch cuts, if it does: the last one read.
        let cut_txn = self
            .position
            .in_txn_lsn
            .and(changes.last().map(|c| c.commit_lsn));
        // A change held back by the last batch was filtered by it (the
        // filters may rewrite a change, so never twice).
        let held = changes.iter().take_while(|c| c.filtered).count();
        let mut unfiltered = changes.split_off(held);
        drop_segment_rows(&mut s.conn, &self.tables, &self.position, &mut unfiltered).await?;
        // The changes of a table that a new one of its name replaced, made
        // after that: its snapshot holds them. Their transactions hold its
        // chunks back until a snapshot sees them end, as any left out.
        // With no snapshot to hold them (`no_data`), they are sent.
        if self.cfg.initial_snapshot {
            unfiltered.retain(|c| {
                if c.fresh {
                    self.added.left_out(c.txid);
                }
                !c.fresh
            });
        }
        let unfiltered = added::filter(
            &mut s.conn,
            &self.tables,
            &mut self.position.incremental,
            &mut self.added,
            unfiltered,
        )
        .await?;
        changes.extend(unfiltered);
        if let Some(cut) = cut_txn {
            Self::hold_back(&mut self.position, s, cut, &mut changes);
        }
        for (i, old) in std::mem::take(&mut s.reentered) {
            self.reentered(i, old);
        }
        // The events of a transaction cut by the last batch, counted so far.
        let carried = std::mem::take(&mut self.position.in_txn_counts);
        let records = render(
            &self.tables,
            &mut self.position,
            Txns {
                complete,
                first: first_txn,
                cut: cut_txn,
                carried,
            },
            self.cfg.tombstones,
            changes,
        );
        Ok(Some(Batch {
            records,
            rows,
            newest_change_ms,
            what: "changes committed",
            more: false,
        }))
    }

    /// The batch cuts transaction `cut` (its Commit is in a later batch):
    /// the last change of it the filters kept is held back, already
    /// filtered, to start the next batch, and the position says the
    /// transaction was sent up to just before that change (a restart reads
    /// it, and what the filters left out after it, again). So a later part
    /// of the transaction whose every change is left out (the incremental
    /// snapshot's filter, a resumed initial snapshot's segments, a table
    /// that entered the set again) still ends with an event of it that
    /// carries the unit's totals, and pg-replay finds no gap: without it,
    /// the unit's events already sent had no last one.
    fn hold_back(
        position: &mut LogicalPosition,
        s: &mut LogicalStream,
        cut: u64,
        changes: &mut Vec<Decoded>,
    ) {
        if changes.last().is_none_or(|c| c.commit_lsn != cut) {
            return;
        }
        let mut last = changes.pop().expect("looked at above");
        position.in_txn_lsn = Some(last.lsn);
        position.in_txn = last.at_last - 1;
        last.filtered = true;
        s.pending.insert(0, last);
    }

    /// A stream that failed because a table's publication did not exist yet
    /// at the WAL it decodes (`publication "…" does not exist`: the table
    /// was captured while pg-source was stopped, and pgoutput looks
    /// publications up as of each transaction it decodes) is opened again
    /// without that table, which joins once the stream has passed the WAL
    /// position read now, after its publication was made: from there every
    /// transaction decodes with it. Returns whether that was the failure.
    ///
    /// What the table holds, its changes before it joins included, comes
    /// by its incremental snapshot once it joined (see [`added`]); a table
    /// that was in the set already is snapshotted again from a TRUNCATE.
    async fn join_later(&mut self, e: &SourceError) -> bool {
        let SourceError::Stream { source, .. } = e else {
            return false;
        };
        if stream_sqlstate(source) != Some("42704") {
            return false;
        }
        let text = source.to_string();
        let Some(name) = text
            .split_once("publication \"")
            .and_then(|(_, rest)| rest.split_once("\" does not exist"))
            .map(|(name, _)| name.to_owned())
        else {
            return false;
        };
        let Some(i) = self
            .tables
            .iter()
            .position(|t| t.join_at.is_none() && publication_name(&t.table.info.name) == name)
        else {
            return false;
        };
        let now: Result<(bool, String), _> = sqlx::query_as(
            "select exists (select 1 from pg_catalog.pg_publication p where p.pubname operator(pg_catalog.=) $1),
                    pg_catalog.pg_current_wal_lsn()::pg_catalog.text",
        )
        .bind(&name)
        .fetch_one(&self.pool)
        .await;
        let Ok((true, lsn)) = now else { return false };
        let Ok(lsn) = parse_lsn(&lsn) else {
            return false;
        };
        if self
            .tables
            .iter()
            .filter(|t| !t.gone && t.join_at.is_none())
            .count()
            <= 1
        {
            // No table would be left to stream.
            return false;
        }
        let t = &mut self.tables[i];
        t.join_at = Some(lsn);
        tracing::warn!(table = %t.table.info.name, publication = %name, from = %Lsn(self.position.lsn), joins_at = %Lsn(lsn),
            "the table's publication is younger than the WAL still to read (it was captured while pg-source was stopped): the other tables stream on, and it joins once the stream passes joins_at; then an incremental snapshot sends its rows (its changes until then are in them, not sent one by one)");
        let log_name = t.table.log_name.clone();
        let shown = t.table.info.name.to_string();
        // A table that entered the set now has its snapshot queued; one
        // that was in the set lost its changes until it joins: what the
        // archive holds of it is stale, so it is snapshotted again from a
        // TRUNCATE.
        let fresh = self
            .position
            .incremental
            .iter()
            .any(|p| p.table == log_name && p.rows == 0 && p.last_key.is_none());
        if !fresh {
            self.position.left.insert(log_name.clone());
            self.push_snapshot(&log_name, &shown);
        }
        true
    }

    /// A new table of the name of table `i` took its place (the one read
    /// before, OID `old`, was dropped or renamed away): it enters the set
    /// again, with an incremental snapshot that begins with a TRUNCATE
    /// event (what the archive holds of the name is the old table's). Its
    /// transactions running now are taken as a seed, as for a table that
    /// joins the stream (see [`added`]).
    fn reentered(&mut self, i: usize, old: Oid) {
        let t = &self.tables[i];
        let (log_name, shown, new) = (
            t.table.log_name.clone(),
            t.table.info.name.to_string(),
            t.known.oid,
        );
        tracing::info!(table = %shown, old_oid = old, new_oid = new, "table created again under its name: it enters the set again");
        metrics::counter!(names::SOURCE_TABLES_ADDED, "table" => log_name.clone()).increment(1);
        metrics::gauge!(names::SOURCE_TABLES_DROPPED, "table" => shown.clone()).set(0.0);
        metrics::gauge!(names::SOURCE_TABLES_UNCAPTURED, "table" => shown.clone()).set(0.0);
        if let Some(w) = self.added.window.as_mut() {
            w.spoil_if(&log_name, "the table was replaced by a new one of its name");
        }
        self.added.seed = true;
        self.position.oids.insert(log_name.clone(), new);
        self.position.left.insert(log_name.clone());
        self.push_snapshot(&log_name, &shown);
    }

    /// Finds the published tables a `table.include.list` pattern has come
    /// to match (schema-init `--capture logical` made their publication)
    /// and adds them: each joins the stream once it has passed the WAL
    /// position read now, after its publication existed (as in
    /// [`Self::join_later`]), then gets an incremental snapshot (see
    /// [`added`]). Says once of each matching table without capture what to
    /// run.
    /// One table's trouble leaves the others alone.
    async fn discover(&mut self) {
        self.last_discovery = Instant::now();
        let Some(d) = &self.discovery else { return };
        let patterns = d.patterns.clone();
        let found = match tokio::time::timeout(
            DISCOVERY_PATIENCE,
            crate::catalog::discover_published(&self.pool),
        )
        .await
        {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot look for tables the patterns match; looking again later");
                return;
            }
            Err(_) => {
                tracing::warn!(waited = ?DISCOVERY_PATIENCE, "cannot look for tables the patterns match (no connection to Postgres in time); looking again later");
                return;
            }
        };
        for t in found {
            if !crate::config::matches_any(&patterns, &t)
                || self.tables.iter().any(|l| l.table.info.name == t)
            {
                continue;
            }
            if let Err(e) = self.add_table(&t).await {
                if self.told.insert(t.clone()) {
                    tracing::warn!(table = %t, error = %format!("{e:#}"), "a table table.include.list matches cannot be read; the other tables go on, and it is tried again");
                }
            }
        }
        match tokio::time::timeout(
            DISCOVERY_PATIENCE,
            crate::catalog::uncaptured_matching(
                &self.pool,
                &patterns,
                crate::config::Mode::Logical,
            ),
        )
        .await
        .unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "no connection to Postgres within {DISCOVERY_PATIENCE:?}"
            ))
        }) {
            Ok(tables) => {
                for t in tables {
                    if self.told.insert(t.clone()) {
                        tracing::warn!(table = %t, "table matches table.include.list but has no logical capture, so none of its changes are read: run schema-init --capture logical --table {t}");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot look for uncaptured tables the patterns match")
            }
        }
    }

    /// Adds a published table (its topic created); it joins the stream
    /// later (see [`Self::discover`]).
    ///
    /// Fails when it cannot be read: gone, not captured, a topic clash, or
    /// a database or Kafka error.
    async fn add_table(&mut self, t: &TableName) -> anyhow::Result<()> {
        let d = self.discovery.as_ref().expect("discovering");
        let Some(info) = TableInfo::load(&self.pool, t).await? else {
            return Ok(());
        };
        let topic = crate::topic_name(&d.prefix, &t.name);
        let mut named: Vec<(&TableName, String)> = self
            .tables
            .iter()
            .map(|l| (&l.table.info.name, l.table.topic.clone()))
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
            self.schemas,
        )
        .await?;
        let mut lt = logical_table(&self.pool, &self.types, table, false).await?;
        let lsn: String =
            sqlx::query_scalar("select pg_catalog.pg_current_wal_lsn()::pg_catalog.text")
                .fetch_one(&self.pool)
                .await?;
        let lsn = parse_lsn(&lsn)?;
        lt.join_at = Some(lsn);
        tracing::info!(table = %t, topic = %topic, joins_at = %Lsn(lsn), "a table.include.list pattern matches a new published table: it joins the stream once the stream passes joins_at, then gets an incremental snapshot");
        metrics::counter!(names::SOURCE_TABLES_ADDED, "table" => lt.table.log_name.clone())
            .increment(1);
        if let Some(known) = self.position.tables.as_mut() {
            known.insert(lt.table.log_name.clone());
        }
        self.position
            .oids
            .insert(lt.table.log_name.clone(), lt.known.oid);
        let (log_name, shown) = (lt.table.log_name.clone(), t.to_string());
        self.tables.push(lt);
        self.push_snapshot(&log_name, &shown);
        self.told.remove(t);
        Ok(())
    }

    /// Tables waiting to join (see [`Self::join_later`]) whose LSN the
    /// position has passed join the stream, which is opened again with them.
    fn rejoin(&mut self) {
        let at = self.position.lsn;
        let mut joined = false;
        for t in &mut self.tables {
            if t.join_at.is_some_and(|j| at >= j) {
                t.join_at = None;
                joined = true;
                // Its changes committed before the stream reads it may
                // still be running in a chunk's snapshot (see `added`).
                self.added.seed = true;
                tracing::info!(table = %t.table.info.name, lsn = %Lsn(at), "the table joins the stream");
            }
        }
        if joined {
            self.stream = None;
        }
    }

    /// Looks whether a captured table was dropped; each one found is logged
    /// and counted once, and the others go on. What the stream already
    /// brought of it was sent.
    async fn check_gone(&mut self) {
        self.last_gone_check = Instant::now();
        let oids: Vec<i64> = self
            .tables
            .iter()
            .filter(|t| !t.gone)
            .map(|t| i64::from(t.known.oid))
            .collect();
        if oids.is_empty() {
            return;
        }
        let missing: Result<Vec<i64>, _> = sqlx::query_scalar(
            "select o.oid from pg_catalog.unnest($1::pg_catalog.int8[]) as o(oid)
             where not exists (select 1 from pg_catalog.pg_class c
                               where c.oid operator(pg_catalog.=) o.oid::pg_catalog.oid)",
        )
        .bind(&oids)
        .fetch_all(&self.pool)
        .await;
        let Ok(missing) = missing else { return };
        for t in self.tables.iter_mut().filter(|t| !t.gone) {
            if missing.contains(&i64::from(t.known.oid)) {
                t.gone = true;
                tracing::warn!(table = %t.table.info.name, "a captured table was dropped: its changes up to the drop were sent, the other tables go on");
                metrics::gauge!(names::SOURCE_TABLES_DROPPED, "table" => t.table.info.name.to_string())
                    .set(1.0);
            }
        }
        // One made again and not captured yet is said once, with the fix
        // (bounded, as the look for pattern matches: Postgres may refuse
        // connections, shutting down); one captured takes the old one's
        // place.
        let pool = self.pool.clone();
        for t in self
            .tables
            .iter_mut()
            .filter(|t| t.gone && t.join_at.is_none())
        {
            let name = t.table.info.name.clone();
            let look = async {
                let published = check_publication(&pool, &name).await;
                let exists = TableInfo::load(&pool, &name).await;
                (published, exists)
            };
            let Ok((published, exists)) = tokio::time::timeout(DISCOVERY_PATIENCE, look).await
            else {
                break;
            };
            if published.is_err() && matches!(exists, Ok(Some(_))) && !t.told_uncaptured {
                tracing::warn!(table = %name, "a table was created again under the name of a dropped captured table, but has no logical capture (a publication holds tables, not names), so none of its changes are read: run schema-init --capture logical --table {name}; then it is read, and its rows are sent by an incremental snapshot");
                metrics::gauge!(names::SOURCE_TABLES_UNCAPTURED, "table" => name.to_string())
                    .set(1.0);
                t.told_uncaptured = true;
            }
        }
        self.take_over_now().await;
    }

    /// Each table whose name is now another table's, published (the one
    /// read was dropped or renamed away, and a new one made and captured),
    /// takes that one's place now, even if it is never written to (its
    /// rows are in no change): see [`Self::reentered`]. The stream is
    /// opened again with its publication. A change of it read first does
    /// the same in [`relation`].
    async fn take_over_now(&mut self) {
        let mut again = false;
        let (pool, types) = (self.pool.clone(), self.types.clone());
        for i in 0..self.tables.len() {
            let t = &self.tables[i];
            if t.join_at.is_some() {
                continue;
            }
            let (name, old, gone) = (t.table.info.name.clone(), t.known.oid, t.gone);
            let look = async {
                let mut conn = pool.acquire().await?;
                let Some(oid) = CatalogShape::oid_of(&mut conn, &name).await? else {
                    return Ok(None);
                };
                if oid == old && !gone {
                    return Ok(None);
                }
                if check_publication(&pool, &name).await.is_err() {
                    return Ok(Some(None));
                }
                let Some(now) = CatalogShape::load(&mut conn, &types, oid).await? else {
                    return Ok(None);
                };
                anyhow::Ok(Some(Some(now)))
            };
            match tokio::time::timeout(DISCOVERY_PATIENCE, look).await {
                Ok(Ok(Some(None))) => {
                    let t = &mut self.tables[i];
                    if !t.gone && !t.told_uncaptured {
                        // (A dropped one is said by `check_gone`.)
                        tracing::warn!(table = %name, "the table read was renamed away (its changes are still read, to its topic), and a new table has its name, without logical capture, so none of the new one's changes are read: run schema-init --capture logical --table {name} to read the new one instead (its rows are then sent by an incremental snapshot)");
                        metrics::gauge!(names::SOURCE_TABLES_UNCAPTURED, "table" => name.to_string())
                            .set(1.0);
                        t.told_uncaptured = true;
                    }
                }
                Ok(Ok(Some(Some(now)))) => {
                    tracing::warn!(table = %name, old_oid = old, new_oid = now.oid,
                        "the table read so far left the set (dropped, or renamed away: its changes up to here are sent), and a new table of its name is captured: that one is read from here on, and its rows are sent by an incremental snapshot");
                    let t = &mut self.tables[i];
                    t.table.oid = now.oid;
                    t.known = now;
                    t.gone = false;
                    t.told_uncaptured = false;
                    self.reentered(i, old);
                    again = true;
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(table = %name, error = %format!("{e:#}"), "cannot look whether a new table has the name of a table read; looking again later");
                }
                Err(_) => break,
            }
        }
        if again {
            self.stream = None;
        }
    }
}

impl LogicalStream {
    /// Widens a 32-bit xid to the full id nearest the last one seen.
    fn full_xid(&mut self, xid: u32) -> u64 {
        let diff = i64::from(xid.wrapping_sub(self.xid_base as u32) as i32);
        let full = (self.xid_base as i64 + diff).max(0) as u64;
        self.xid_base = full;
        full
    }
}

/// A Relation message: the shape the table's next changes were written
/// with. Its columns and types are the message's (as of that point in the
/// WAL); its key and NOT NULL flags the catalog's now, unless the catalog
/// was written after the change's transaction began writing (then the ones
/// known before), or the last known when the table is gone. What is left
/// uncertain: a transaction that overlaps an ALTER TABLE of the table but
/// writes it only after, or two ALTERs within pg-source's lag of each
/// other, may get the other side's flags (never other values).
///
/// The key columns are found among the message's by name while the
/// catalog is the one the change was written under (or an older shape
/// pg-source knows stands for it). When the catalog was written after the
/// change and pg-source knows nothing older (it was stopped across the
/// DDL), or names do not find the key, they are placed by attnum, as far as
/// the catalog proves (see [`attnums`]): a key column renamed, or names
/// swapped, keys the change by the column it was. A key column that cannot
/// be placed so refuses the relation: its changes, until the stream
/// describes the table again (at the first change after the DDL), are dead
/// letters with their rows and an error naming the table, the column and
/// the fix; the other tables go on.
async fn relation(
    s: &mut LogicalStream,
    tables: &mut [LogicalTable],
    types: &TypeCache,
    rel: pgoutput::Relation,
) -> Result<(), SourceError> {
    // A table is followed by its OID, whatever its name now; a relation of
    // another OID under a table's name is an older table of that name
    // (dropped, its WAL still being read: read as that table) or a new one
    // that took its place (see below).
    let table = tables
        .iter()
        .position(|t| t.known.oid == rel.id)
        .or_else(|| {
            tables.iter().position(|t| {
                t.table.info.name.schema == rel.schema && t.table.info.name.name == rel.name
            })
        });
    let Some(i) = table else {
        s.relations.insert(
            rel.id,
            Relation {
                table: None,
                shape: None,
                unsent: None,
                unkeyed: None,
            },
        );
        return Ok(());
    };
    let name = tables[i].table.info.name.clone();
    let catalog = |e: anyhow::Error| {
        SourceError::from_anyhow(e.context(format!("cannot read the shape of table {name}")))
    };
    let ids: Vec<(Oid, i32)> = rel.columns.iter().map(|c| (c.type_oid, c.typmod)).collect();
    let column_types = types
        .column_types_on(&mut s.conn, &ids)
        .await
        .map_err(|e| catalog(codec_error(e)))?;
    // The key and NOT NULL flags are not in the message: they come from the
    // catalog as it is now, which may be later than this change (pg-source
    // reads behind the writers, and the stream describes a table again
    // after any cache invalidation, autovacuum's too). Catalog rows written
    // by a transaction newer than this change's are a DDL after it (an
    // ALTER TABLE holds its lock on the table from before it has an id
    // until it commits): the flags known before stand for this change, and
    // the new ones are taken at a Relation of a change after the DDL.
    let xid = s.txn.as_ref().map(|t| t.xid as u32);
    // The catalog was written after this change, and pg-source knows no
    // older shape of the table (it was stopped across the DDL): the
    // catalog's names may not be the message's, and the message's columns
    // are placed by attnum as far as can be proven (see [`attnums`]).
    let mut after_ddl = false;
    let mut before_ddl = false;
    let now = CatalogShape::load(&mut s.conn, types, rel.id)
        .await
        .map_err(catalog)?;
    if rel.id != tables[i].known.oid {
        // Only to the table that has the name now: an older one's WAL (a
        // table renamed away, then another given its name) is read as the
        // table, as ever.
        let has_name = match &now {
            Some(_) => {
                CatalogShape::oid_of(&mut s.conn, &name)
                    .await
                    .map_err(|e| catalog(e.into()))?
                    == Some(rel.id)
            }
            None => false,
        };
        if let Some(now) = now.as_ref().filter(|_| has_name) {
            // The table followed was dropped or renamed away, and a table
            // created under its name is published: that one is the table
            // from here on (every change of the old one came before this
            // point of the WAL). It enters the set again: its rows come by
            // an incremental snapshot that begins with a TRUNCATE event.
            let old = tables[i].known.oid;
            tracing::warn!(table = %name, old_oid = old, new_oid = rel.id,
                "the table read so far left the set (dropped, or renamed away: its changes up to here were sent), and a new table of its name is published: that one is read from here on, and its rows are sent by an incremental snapshot");
            tables[i].known = now.clone();
            tables[i].table.oid = rel.id;
            tables[i].gone = false;
            tables[i].told_uncaptured = false;
            s.reentered.push((i, old));
            // A change of the one that left (renamed away, still there) is
            // no longer the table's.
            for r in s.relations.values_mut() {
                if r.table == Some(i) {
                    r.table = None;
                    r.shape = None;
                }
            }
        }
    }
    if let Some(now) = now {
        let newer = xid.is_some_and(|x| xid_after(now.changed_by, x));
        let known = &tables[i].known;
        if !newer {
            tables[i].known = now;
        } else if now.changed_by == known.changed_by {
            tracing::warn!(table = %name, ddl_xid = now.changed_by, "changes written before a later ALTER TABLE are read with the primary key and NOT NULL flags the catalog has now (pg-source did not see the table before it); their columns are placed by attnum where the catalog proves it, not by name");
            tables[i].known = now;
            after_ddl = true;
        } else {
            tracing::debug!(table = %name, ddl_xid = now.changed_by, "a change written before an ALTER TABLE: the key and NOT NULL flags known before stand for it; its columns' attnums are the ones the catalog proves");
            before_ddl = true;
        }
    }
    // A change written before the catalog's last ALTER TABLE, with the
    // table known from an earlier change: other ALTERs may lie between
    // the two (pg-source is behind), so the known names do not prove
    // attnums; only the catalog's settled rows do (a column added or
    // renamed between them is told, by its place, where they prove it).
    let proven = if before_ddl {
        let (catalog_xmin, attributes) = attnums::load(&mut s.conn, rel.id, &s.slot)
            .await
            .map_err(|e| catalog(e.into()))?;
        Some(attnums::sent_attnums(
            &rel.columns,
            &attributes,
            catalog_xmin,
        ))
    } else {
        None
    };
    let known = &tables[i].known;
    let previous = s.relations.get(&rel.id).and_then(|r| r.shape.clone());
    let by_name = if after_ddl {
        None
    } else {
        let columns: Vec<ColumnSpec> = rel
            .columns
            .iter()
            .zip(column_types.iter().cloned())
            .enumerate()
            .map(|(j, (c, ty))| {
                let catalog = known.columns.iter().find(|k| k.name == c.name);
                let attnum = match &proven {
                    Some(p) => p[j],
                    None => catalog.and_then(|k| k.attnum),
                };
                // A proven attnum finds the column known (names may have
                // moved since); else its name.
                let known_column = match (&proven, attnum) {
                    (Some(_), Some(n)) => known.columns.iter().find(|k| k.attnum == Some(n)),
                    _ => catalog,
                };
                ColumnSpec {
                    name: c.name.clone(),
                    ty,
                    not_null: known_column.is_some_and(|k| k.not_null),
                    attnum,
                    key_position: None,
                }
            })
            .collect();
        let has = |key: &[KeyColumn]| {
            !key.is_empty() && key.iter().all(|k| columns.iter().any(|c| c.name == k.name))
        };
        // Where the catalog proves the key's columns among those sent, they
        // are the key under the names sent (names known may have been
        // swapped since). Else the catalog's key by name; else, when that is
        // not among the columns sent (a key column dropped or renamed since
        // this change), the key it had, if known.
        let by_attnum = proven.as_ref().and_then(|p| {
            known
                .key
                .iter()
                .map(|k| {
                    let j = p.iter().position(|a| *a == Some(k.attnum))?;
                    Some(KeyColumn {
                        name: rel.columns[j].name.clone(),
                        ..k.clone()
                    })
                })
                .collect::<Option<Vec<_>>>()
                .filter(|key| !key.is_empty())
        });
        let key = if by_attnum.is_some() {
            by_attnum
        } else if has(&known.key) {
            Some(known.key.clone())
        } else {
            previous
                .as_ref()
                .filter(|p| has(&p.key))
                .map(|p| p.key.clone())
        };
        key.map(|key| (columns, key))
    };
    let (columns, key, unkeyed) = match by_name {
        Some((columns, key)) => (columns, key, None),
        None => {
            let (catalog_xmin, attributes) = attnums::load(&mut s.conn, rel.id, &s.slot)
                .await
                .map_err(|e| catalog(e.into()))?;
            placed_columns(&name, &rel, column_types, known, &attributes, catalog_xmin)
        }
    };
    if let Some(error) = &unkeyed {
        tracing::error!(table = %name, error = %error, "changes of the table written before a later ALTER TABLE cannot be keyed: they go to the dead-letter topic until the table is described again (the other tables go on)");
    }
    if let Some(p) = &previous {
        if !p.same_as(&columns, &key) {
            tracing::info!(
                table = %name,
                columns = %columns.iter().map(|c| format!("{} {}", c.name, c.ty.sql_type())).collect::<Vec<_>>().join(", "),
                key = %key.iter().map(|k| k.name.as_str()).collect::<Vec<_>>().join(", "),
                "the table's shape changed; its next events carry the new one"
            );
        }
    }
    let unsent: Vec<&str> = known
        .generated
        .iter()
        .filter(|g| !columns.iter().any(|c| &c.name == *g))
        .map(String::as_str)
        .collect();
    let unsent = (!unsent.is_empty()).then(|| unsent.join(", "));
    if let Some(columns) = &unsent {
        tracing::error!(table = %name, columns = %columns, "the table has generated columns, whose values logical decoding does not send: its changes go to the dead-letter topic from now on (the other tables go on); capture it with schema-init --capture changelog and mode changelog");
    }
    let shape = Shape::new(tables[i].table.origin.clone(), rel.id, columns, key)
        .map_err(SourceError::Definite)?;
    s.relations.insert(
        rel.id,
        Relation {
            table: Some(i),
            shape: Some(Arc::new(shape)),
            unsent,
            unkeyed,
        },
    );
    Ok(())
}

/// The columns of a Relation message placed by attnum, as far as the
/// catalog proves (see [`attnums`]), not by name, and the key `known` has
/// (by attnum) under the message's names; or, when a key column cannot be
/// placed, no key and the error that refuses the relation, naming the
/// table, the column and the fix.
fn placed_columns(
    name: &TableName,
    rel: &pgoutput::Relation,
    column_types: Vec<ColumnType>,
    known: &CatalogShape,
    attributes: &[attnums::Attribute],
    catalog_xmin: Option<attnums::Unsettled>,
) -> (Vec<ColumnSpec>, Vec<KeyColumn>, Option<String>) {
    use attnums::Place;
    let places = attnums::places(&rel.columns, attributes, catalog_xmin);
    let place_of = |attnum: i32| -> Place {
        places
            .as_ref()
            .and_then(|p| {
                attributes
                    .iter()
                    .zip(p)
                    .find(|(a, _)| a.attnum == attnum)
                    .map(|(_, p)| *p)
            })
            .unwrap_or(Place::Unknown)
    };
    let attnums = attnums::attnums_of_sent(rel.columns.len(), attributes, places.as_deref());
    let columns: Vec<ColumnSpec> = rel
        .columns
        .iter()
        .zip(column_types)
        .enumerate()
        .map(|(j, (c, ty))| {
            let attnum = attnums[j];
            let catalog = attnum.and_then(|n| known.columns.iter().find(|k| k.attnum == Some(n)));
            ColumnSpec {
                name: c.name.clone(),
                ty,
                not_null: catalog.is_some_and(|k| k.not_null),
                attnum,
                key_position: None,
            }
        })
        .collect();
    let sent = rel
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let refuse = |column: &str, why: &str| {
        format!(
            "table {name}: a change written before a later ALTER TABLE of the table cannot be keyed: the stream \
             sent its columns as ({sent}), and {column} {why}. The table's changes go to the dead-letter topic \
             with their rows until the stream describes the table again (the other tables go on). Fix: the rows \
             are in the dead-letter records; to give the archive a whole base again, leave the table out of \
             table.whitelist for one start of pg-source and put it back, so that it is snapshotted again from a \
             TRUNCATE"
        )
    };
    if known.key.is_empty() {
        let why = "the table has no primary key now";
        return (columns, Vec::new(), Some(refuse("no column", why)));
    }
    let mut key = Vec::with_capacity(known.key.len());
    for k in &known.key {
        let column = format!(
            "primary-key column {} (attnum {})",
            quote_ident(&k.name),
            k.attnum
        );
        let why = match place_of(k.attnum) {
            Place::Sent(j) => {
                key.push(KeyColumn {
                    name: rel.columns[j].name.clone(),
                    ..k.clone()
                });
                continue;
            }
            Place::NotSent => "was not among them (added since, or not sent)",
            Place::Unknown if attributes.is_empty() => "cannot be told among them: the table is gone",
            Place::Unknown if places.is_none() => {
                "cannot be told among them: the catalog contradicts the stream's description"
            }
            Place::Unknown => {
                "cannot be told among them: columns renamed, retyped, added or dropped since leave more than one \
                 place it could be, and neither a name nor a type of a column changed since proves which"
            }
        };
        return (columns, Vec::new(), Some(refuse(&column, why)));
    }
    (columns, key, None)
}

fn codec_error(e: CodecError) -> anyhow::Error {
    match e {
        CodecError::Catalog { source, oid } => anyhow::Error::new(source)
            .context(format!("cannot read type {oid} from pg_catalog.pg_type")),
        other => anyhow::Error::new(other),
    }
}

/// Decodes one `pgoutput` message: the changes of tables read whose
/// transaction the initial snapshot does not hold and whose op is not
/// skipped (`skipped.operations`). A row change is one; a Truncate is one
/// per captured table it names (`TRUNCATE a, b`, and the tables a cascade
/// reached, which the message names too), in the message's order.
///
/// Fails on a malformed message, a change the stream did not describe, or
/// a catalog error while reading a Relation.
async fn decode(
    s: &mut LogicalStream,
    tables: &mut [LogicalTable],
    types: &TypeCache,
    done: &PgSnapshot,
    skipped: SkippedOps,
    data: &[u8],
    lsn: u64,
) -> Result<Vec<Decoded>, SourceError> {
    let definite = |e: anyhow::Error| SourceError::Definite(e);
    let message = pgoutput::decode(data).map_err(|e| definite(e.into()))?;
    let (op, id, old, new) = match message {
        Message::Relation(rel) => {
            relation(s, tables, types, rel).await?;
            return Ok(Vec::new());
        }
        Message::Type(t) => {
            // Names a type a dropped relation may still use.
            types.note_type(t.oid, &t.schema, &t.name);
            return Ok(Vec::new());
        }
        Message::Insert { relation, new } => (Op::Create, relation, None, Some(new)),
        Message::Update { relation, old, new } => (Op::Update, relation, old, Some(new)),
        Message::Delete { relation, old } => (Op::Delete, relation, old, None),
        Message::Truncate { relations } => {
            let mut out = Vec::new();
            for id in relations {
                let Some((table, shape, place)) = change_place(s, done, id, lsn)? else {
                    continue;
                };
                if skipped.truncate {
                    continue;
                }
                out.push(Decoded {
                    table,
                    change: EncodedChange::Truncate { shape },
                    key_texts: Vec::new(),
                    ..place
                });
            }
            return Ok(out);
        }
        Message::Other(_) => return Ok(Vec::new()),
    };
    let Some((table, shape, place)) = change_place(s, done, id, lsn)? else {
        return Ok(Vec::new());
    };
    if skipped.skips(op.code()) {
        return Ok(Vec::new());
    }
    let name = &tables[table].table.info.name;
    if op != Op::Create && old.is_none() {
        return Err(definite(anyhow::anyhow!(
            "table {name} sends updates and deletes without the old row: run schema-init --capture logical --table {name} (replica identity full)"
        )));
    }
    let old_fields = match &old {
        Some(t) => Some(fields(&shape, t, None).map_err(definite)?),
        None => None,
    };
    let new_fields = match &new {
        Some(t) => Some(fields(&shape, t, old.as_deref()).map_err(definite)?),
        None => None,
    };
    let row_fields = new_fields
        .as_ref()
        .or(old_fields.as_ref())
        .expect("a change has a row");
    if let Some(error) = s.relations.get(&id).and_then(|r| r.unkeyed.clone()) {
        return Ok(vec![Decoded {
            table,
            change: EncodedChange::Dead(DeadLetter {
                op,
                column: None,
                key: String::new(),
                error,
                raw: Some(raw_row(
                    &shape,
                    old_fields.as_deref(),
                    new_fields.as_deref(),
                )),
            }),
            key_texts: Vec::new(),
            ..place
        }]);
    }
    let key_texts = shape.key_texts(row_fields);
    let old_key_texts = match (&old_fields, &new_fields) {
        (Some(old), Some(_)) => Some(shape.key_texts(old)),
        _ => None,
    };
    if let Some(columns) = s.relations.get(&id).and_then(|r| r.unsent.clone()) {
        let first = columns.split(", ").next().unwrap_or_default().to_owned();
        return Ok(vec![Decoded {
            table,
            change: EncodedChange::Dead(DeadLetter {
                op,
                column: Some(first),
                key: key_display(&shape, &key_texts),
                error: format!("table {name} has generated columns ({columns}), whose values logical decoding does not send: the change cannot be carried whole; capture the table with schema-init --capture changelog and mode changelog"),
                raw: None,
            }),
            key_texts,
            ..place
        }]);
    }
    let encode =
        |f: &Option<Vec<Option<&[u8]>>>| -> Result<(Option<Encoded>, Option<Encoded>), CodecError> {
            match f {
                Some(f) => Ok((Some(shape.encode_row(f)?), Some(shape.encode_key(f)?))),
                None => Ok((None, None)),
            }
        };
    let change = match encode(&old_fields).and_then(|b| Ok((b, encode(&new_fields)?))) {
        Ok(((before, key_before), (after, key_after))) => EncodedChange::Ok {
            shape: shape.clone(),
            op,
            before: if op == Op::Create { None } else { before },
            after,
            key_before,
            key_after,
        },
        Err(e) => {
            let column = match &e {
                CodecError::Value { column, .. } => Some(column.clone()),
                _ => None,
            };
            let raw = column.as_ref().and_then(|c| {
                let i = shape.columns.iter().position(|s| &s.name == c)?;
                let f = row_fields.get(i)?.as_ref()?;
                Some(String::from_utf8_lossy(f).into_owned())
            });
            EncodedChange::Dead(DeadLetter {
                op,
                column,
                key: key_display(&shape, &key_texts),
                error: e.to_string(),
                raw,
            })
        }
    };
    Ok(vec![Decoded {
        table,
        change,
        key_texts,
        old_key_texts,
        ..place
    }])
}

/// A change's rows as the stream sent them, for a dead letter that cannot
/// name a key: `{"before":{"col":"text",..},"after":..}`, each value its
/// text (or null).
fn raw_row(shape: &Shape, old: Option<&[Option<&[u8]>]>, new: Option<&[Option<&[u8]>]>) -> String {
    let image = |f: Option<&[Option<&[u8]>]>| -> serde_json::Value {
        let Some(f) = f else {
            return serde_json::Value::Null;
        };
        shape
            .columns
            .iter()
            .zip(f)
            .map(|(c, v)| {
                let v = v.map(|t| serde_json::Value::from(String::from_utf8_lossy(t)));
                (c.name.clone(), v.unwrap_or(serde_json::Value::Null))
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    serde_json::json!({"before": image(old), "after": image(new)}).to_string()
}

/// Where a change of relation `id` at `lsn` stands in its transaction: its
/// table, shape and place (a [`Decoded`] whose change is to be filled in);
/// `None` for a relation not read, a transaction the initial snapshot
/// holds, or a change sent before a restart that cut its transaction. Counts
/// the change at `lsn` either way, so that a resumed transaction skips
/// exactly what was sent.
///
/// Fails on a change of a relation the stream did not describe, or outside
/// a transaction.
fn change_place(
    s: &mut LogicalStream,
    done: &PgSnapshot,
    id: u32,
    lsn: u64,
) -> Result<Option<(usize, Arc<Shape>, Decoded)>, SourceError> {
    let definite = |e: anyhow::Error| SourceError::Definite(e);
    let rel = s.relations.get(&id).ok_or_else(|| {
        definite(anyhow::anyhow!(
            "a change of relation {id}, which the stream never described"
        ))
    })?;
    let (Some(table), Some(shape)) = (rel.table, rel.shape.clone()) else {
        return Ok(None);
    };
    let txn = s.txn.as_mut().ok_or_else(|| {
        definite(anyhow::anyhow!(
            "a change outside a transaction in the replication stream"
        ))
    })?;
    // The initial snapshot holds this transaction's changes already.
    if done.visible(txn.xid) {
        return Ok(None);
    }
    if lsn == txn.last_lsn {
        txn.at_last += 1;
    } else {
        txn.last_lsn = lsn;
        txn.at_last = 1;
    }
    // Sent before a restart that cut this transaction.
    if let Some((cut, n)) = s.skip {
        if lsn < cut || (lsn == cut && txn.at_last <= n) {
            return Ok(None);
        }
    }
    let place = Decoded {
        table,
        change: EncodedChange::Truncate {
            shape: shape.clone(),
        },
        key_texts: Vec::new(),
        old_key_texts: None,
        txid: txn.xid,
        changed_ms: txn.commit_us.div_euclid(1000),
        lsn,
        at_last: txn.at_last,
        commit_lsn: txn.commit_lsn,
        commit_us: txn.commit_us,
        last_commit: txn.last_commit,
        txn_last: false,
        filtered: false,
        fresh: s.reentered.iter().any(|(i, _)| *i == table),
    };
    Ok(Some((table, shape, place)))
}

/// A tuple's column texts for the shape; an unchanged TOASTed value is
/// taken from the old row.
///
/// Fails when the tuple does not fit the shape, or a value was not sent and
/// the old row lacks it.
fn fields<'a>(
    shape: &Shape,
    tuple: &[Value<'a>],
    old: Option<&[Value<'a>]>,
) -> anyhow::Result<Vec<Option<&'a [u8]>>> {
    if tuple.len() != shape.columns.len() {
        bail!(
            "table {}: a row with {} columns for a table described with {}",
            shape.table(),
            tuple.len(),
            shape.columns.len()
        );
    }
    tuple
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::Null => Ok(None),
            Value::Text(t) => Ok(Some(*t)),
            Value::Unchanged => match old.and_then(|o| o.get(i)) {
                Some(Value::Text(t)) => Ok(Some(*t)),
                Some(Value::Null) => Ok(None),
                _ => bail!(
                    "table {}: column {} was not sent (an unchanged TOASTed value) and the old row lacks it: set replica identity full (schema-init --capture logical)",
                    shape.table(),
                    shape.columns[i].name
                ),
            },
        })
        .collect()
}

/// Leaves out the changes already in the rows of a snapshot segment read
/// after a restart: a change whose transaction is visible in a segment's
/// snapshot and whose key lies in the segment's range. Only those changes
/// are checked, in one query, comparing keys as the key index does, with
/// the keys written in as literals of the key columns' base types.
///
/// Fails on a database error.
async fn drop_segment_rows(
    conn: &mut sqlx::PgConnection,
    tables: &[LogicalTable],
    position: &LogicalPosition,
    changes: &mut Vec<Decoded>,
) -> Result<(), SourceError> {
    if position.segments.is_empty() || changes.is_empty() {
        return Ok(());
    }
    let parsed: HashMap<&str, Vec<(PgSnapshot, &tidemark_common::offset::Segment)>> = position
        .segments
        .iter()
        .map(|(name, segs)| {
            let segs = segs
                .iter()
                .filter_map(|s| PgSnapshot::parse(&s.snapshot).ok().map(|p| (p, s)))
                .collect();
            (name.as_str(), segs)
        })
        .collect();
    // A TRUNCATE that a segment's rows already follow, while the rows of
    // the segments read before it precede it: no event could say which
    // rows it removed from the snapshot, so it is a dead letter (a replay
    // stops at it) rather than a silently wrong restore.
    for c in changes.iter_mut() {
        let EncodedChange::Truncate { shape } = &c.change else {
            continue;
        };
        let seen = parsed
            .get(tables[c.table].table.log_name.as_str())
            .is_some_and(|segs| segs.iter().any(|(snap, _)| snap.visible(c.txid)));
        if seen {
            let table = shape.table().to_string();
            c.change = EncodedChange::Dead(DeadLetter {
                op: Op::Truncate,
                column: None,
                key: String::new(),
                error: format!("TRUNCATE of {table} while its initial snapshot was resumed after a restart: the snapshot's rows read before and after it cannot be told apart; snapshot the table again (a new connector name)"),
                raw: None,
            });
        }
    }
    // One boolean per change that needs a look: inside some segment.
    let mut checked = Vec::new();
    let mut exprs = Vec::new();
    for (i, c) in changes.iter().enumerate() {
        let EncodedChange::Ok { shape, .. } = &c.change else {
            continue;
        };
        let Some(segs) = parsed.get(tables[c.table].table.log_name.as_str()) else {
            continue;
        };
        let Some(texts) = c.key_texts.iter().cloned().collect::<Option<Vec<String>>>() else {
            continue;
        };
        let key = literals(&shape.key, &texts);
        let mut inside = Vec::new();
        for (snap, seg) in segs.iter().filter(|(snap, _)| snap.visible(c.txid)) {
            let mut conds = vec!["true".to_owned()];
            let bound = |v: &Option<serde_json::Value>| {
                v.as_ref()
                    .and_then(|v| stored_key_texts(v, &shape.key))
                    .map(|t| literals(&shape.key, &t))
            };
            if let Some(lo) = bound(&seg.lo) {
                conds.push(lexicographic_gt(&shape.key, &key, &lo, false));
            }
            if let Some(hi) = bound(&seg.hi) {
                conds.push(format!(
                    "not {}",
                    lexicographic_gt(&shape.key, &key, &hi, false)
                ));
            }
            let _ = snap;
            inside.push(format!("({})", conds.join(" and ")));
        }
        if !inside.is_empty() {
            checked.push(i);
            exprs.push(format!("({})", inside.join(" or ")));
        }
    }
    if exprs.is_empty() {
        return Ok(());
    }
    let sql = format!("select array[{}]::pg_catalog.bool[]", exprs.join(", "));
    let inside: Vec<bool> = sqlx::query_scalar(&sql)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| {
            SourceError::postgres("cannot compare changes with the snapshot's segments", e)
        })?;
    let mut drop = vec![false; changes.len()];
    for (i, is_in) in checked.into_iter().zip(inside) {
        drop[i] = is_in;
    }
    let mut k = 0;
    changes.retain(|_| {
        let keep = !drop[k];
        k += 1;
        keep
    });
    Ok(())
}

/// How the batch's changes stand in their transactions.
struct Txns {
    /// Transactions whose Commit the batch read.
    complete: std::collections::HashSet<u64>,
    /// The batch's first transaction, which may go on from the last batch.
    first: Option<u64>,
    /// The transaction the batch cuts, if it does.
    cut: Option<u64>,
    /// The events of the first transaction counted before this batch.
    carried: Vec<(String, u64)>,
}

/// Renders decoded changes into records, each transaction a unit: its
/// events are counted (a transaction cut by the last batch goes on from
/// its carried counts), and its last event carries the totals once its
/// Commit was read. The counts of a transaction this batch cuts stay in
/// the position.
fn render(
    tables: &[LogicalTable],
    position: &mut LogicalPosition,
    txns: Txns,
    tombstones: bool,
    changes: Vec<Decoded>,
) -> Vec<Record> {
    // The last event of each transaction.
    let mut last_of_txn = vec![false; changes.len()];
    let mut seen = std::collections::HashSet::new();
    for (k, c) in changes.iter().enumerate().rev() {
        if seen.insert(c.commit_lsn) {
            last_of_txn[k] = txns.complete.contains(&c.commit_lsn);
        }
    }
    let read_us = now_us();
    let mut records = Vec::with_capacity(changes.len() + changes.len() / 8);
    let mut counts = Vec::new();
    let mut current = None;
    for (k, c) in changes.iter().enumerate() {
        if current != Some(c.commit_lsn) {
            current = Some(c.commit_lsn);
            counts = if Some(c.commit_lsn) == txns.first {
                txns.carried.clone()
            } else {
                Vec::new()
            };
        }
        let mut unit = Unit {
            commit_order: c.commit_lsn,
            prev_commit_order: position.chain.event_of(c.commit_lsn),
            commit_us: c.commit_us,
            counts: &mut counts,
        };
        tables[c.table].table.render_encoded(
            &c.change,
            Some(c.txid),
            Sequence::Logical {
                last_commit: c.last_commit,
                lsn: c.lsn,
            },
            &mut unit,
            last_of_txn[k],
            read_us,
            tombstones,
            &mut records,
        );
    }
    if let Some(cut) = txns.cut {
        // The batch cut a transaction: its counts go on in the next one.
        position.in_txn_counts = if current == Some(cut) {
            counts
        } else if txns.first == Some(cut) {
            txns.carried
        } else {
            Vec::new()
        };
    }
    records
}

impl Capture for LogicalMode {
    type Saved = LogicalPosition;

    fn save(&self) -> Self::Saved {
        self.position.clone()
    }

    fn restore(&mut self, saved: Self::Saved) {
        // The stream resumes from the stored position, and a chunk read
        // for it is read again.
        self.stream = None;
        self.position = saved;
        self.added.window = None;
        // A table a pattern came to match after `saved` is still read: its
        // snapshot is queued again on top of the position put back (see
        // "A failed step" in `added`).
        self.reconcile_added(false);
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
            return Ok(Some(batch));
        }
        if self.discovery.is_some() && self.last_discovery.elapsed() >= GONE_CHECK_EVERY {
            self.discover().await;
        }
        self.rejoin();
        if self.position.snapshot.is_none() && self.last_signals.elapsed() >= SIGNALS_EVERY {
            self.read_signals().await?;
        }
        if let Some(batch) = self.incremental_step().await? {
            return Ok(Some(batch));
        }
        if self.round_done().await {
            self.idle_round = false;
            return Ok(None);
        }
        self.settle_unsettled().await;
        let saved = self.position.clone();
        let step = tokio::select! {
            _ = shutdown.cancelled() => None,
            step = self.stream_step() => Some(step),
        };
        match step {
            Some(Err(e)) => {
                // The stream resumes from the stored position. What the
                // step read is dropped first, so that a snapshot
                // `join_later` queues stays in the position.
                self.stream = None;
                self.position = saved;
                if self.join_later(&e).await {
                    return Ok(None);
                }
                Err(e)
            }
            Some(Ok(None)) => {
                // A chunk whose place the stream just reached goes now.
                if self.added.due() {
                    return self.incremental_step().await;
                }
                self.idle_round = true;
                if self.last_gone_check.elapsed() >= GONE_CHECK_EVERY {
                    self.check_gone().await;
                }
                Ok(None)
            }
            Some(Ok(batch)) => Ok(batch),
            None => {
                // Stopped mid-read: nothing of it was sent.
                self.stream = None;
                self.position = saved;
                Ok(None)
            }
        }
    }

    fn position_record(&self) -> Record {
        Record {
            topic: self.offsets_topic.clone(),
            key: self.position_key.clone(),
            value: Some(SourcePosition::Logical(self.position.clone()).encode()),
        }
    }

    async fn committed(&mut self, done: &Committed) {
        self.last_commit = Instant::now();
        let lsn = self.position.lsn;
        self.committed_lsn = lsn;
        if let Some(s) = self.stream.as_mut() {
            s.acked = lsn;
            s.client.update_applied_lsn(Lsn(lsn));
        }
        tracing::info!(records = done.records, rows = done.rows, lsn = %Lsn(lsn), commit = ?done.commit, "{}", done.what);
    }

    async fn wait(&mut self, _shutdown: &CancellationToken) {
        // The stream waits for changes itself.
    }

    fn zero_lag_when_caught_up(&self) -> bool {
        // A round ended under writes is caught up only to the WAL position
        // of its start.
        self.idle_round
    }
}
