//! `logical` mode: reads every insert, update and delete from a logical
//! replication slot (Postgres' `pgoutput`), so nothing runs in the writers'
//! transactions: Postgres decodes its WAL in a process of its own.
//!
//! Delivery works as in `changelog` mode, with an LSN in place of the
//! change log's snapshots:
//!
//! - The slot is created before the initial snapshot is taken. Every
//!   transaction that commits after the slot's start is in the stream; the
//!   ones the snapshot already holds (visible in its `done` snapshot, or in a
//!   segment's snapshot for the key ranges read after a restart) are left
//!   out when rendering, so there is neither a gap nor an overlap.
//! - The stream sends whole transactions in commit order. A batch of them
//!   goes to Kafka in one transaction together with the position: the end
//!   LSN of the last transaction sent whole, and how many changes of the
//!   next one were sent when a large one is split over several batches.
//! - The slot is told a position only after Kafka committed it, so Postgres
//!   keeps the WAL a restart needs; after a crash the stream resumes at the
//!   stored LSN and skips the changes of a split transaction already sent.
//!   Any failure drops the stream and resumes it from the stored position.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::FutureExt as _;
use pgwire_replication::{
    Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig,
};
use sqlx::postgres::PgSslMode;
use sqlx::PgPool;
use tidemark_common::envelope::{now_us, Sequence};
use tidemark_common::offset::{position_key, LogicalPosition, SourcePosition};
use tidemark_common::pg::{publication_name, quote_ident, PgTarget, TableName};
use tokio_util::sync::CancellationToken;

use crate::catalog::TableInfo;
use crate::config::LogicalConfig;
use crate::errors::{stream_sqlstate, SourceError};
use crate::modes::{Batch, Capture, Committed};
use crate::pgoutput::{self, Message, Value};
use crate::producer::Record;
use crate::snapshot::{self, InitialSnapshot};
use crate::table::{CapturedTable, RenderedChange, Unit};

/// Microseconds between 1970-01-01 and 2000-01-01, Postgres' epoch.
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// How long a stream with nothing new waits before returning to the main
/// loop (which reports health and checks for a stop).
const IDLE_RETURN: Duration = Duration::from_secs(1);

/// With only changes of other tables (or of the snapshot's transactions)
/// passing, the position is still committed this often, so the slot can let
/// Postgres recycle its WAL.
const POSITION_ONLY_EVERY: Duration = Duration::from_secs(5);

/// The default slot name of a connector: `tidemark_` and the name in the
/// characters a slot name allows, shortened with a hash when needed.
pub fn default_slot_name(connector: &str) -> String {
    let clean: String = connector
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = format!("tidemark_{clean}");
    if name.len() <= 63 && clean == connector {
        return name;
    }
    let mut hash: u32 = 0x811c_9dc5;
    for b in connector.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("tidemark_{}_{hash:08x}", &clean[..clean.len().min(40)])
}

/// Checks the server and slot before reading: `wal_level`, and that the
/// slot is a `pgoutput` slot of this database. On a fresh start (no stored
/// position) the slot is created if missing, and its start LSN returned;
/// on a resume the slot must not have been confirmed past `stored`.
///
/// Fails with what to do when the server is not set up for logical capture
/// or the slot is missing, foreign, or ahead of the stored position.
pub async fn prepare_slot(pool: &PgPool, slot: &str, stored: Option<u64>) -> anyhow::Result<u64> {
    let wal_level: String = sqlx::query_scalar("select current_setting('wal_level')")
        .fetch_one(pool)
        .await?;
    if wal_level != "logical" {
        bail!("mode logical needs wal_level = logical, and the server has wal_level = {wal_level}: run `alter system set wal_level = logical` as a superuser and restart Postgres, or use mode changelog");
    }
    type SlotRow = (Option<String>, Option<String>, Option<String>, bool);
    let found: Option<SlotRow> = sqlx::query_as(
        "select confirmed_flush_lsn::text, plugin::text, database::text,
                database = current_database() and wal_status is distinct from 'lost'
         from pg_replication_slots where slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await?;
    match (found, stored) {
        (None, None) => {
            tracing::info!(slot, "creating the replication slot; Postgres first waits for the transactions open on the server to finish");
            let create = sqlx::query_scalar::<_, String>(
                "select lsn::text from pg_create_logical_replication_slot($1, 'pgoutput')",
            )
            .bind(slot)
            .fetch_one(pool);
            tokio::pin!(create);
            let created = loop {
                tokio::select! {
                    r = &mut create => break r,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {
                        let waiting: Vec<String> = sqlx::query_scalar(
                            "select format('pid %s (%s, %s, in a transaction since %s)', pid, usename, datname, xact_start)
                             from pg_stat_activity where backend_xid is not null and pid <> pg_backend_pid()
                             order by xact_start limit 5",
                        )
                        .fetch_all(pool)
                        .await
                        .unwrap_or_default();
                        tracing::warn!(slot, sessions = ?waiting, "still creating the replication slot: Postgres waits for these transactions to end");
                    }
                }
            };
            let lsn = created.map_err(|e| {
                anyhow::Error::new(e).context(format!(
                    "cannot create replication slot {slot}: the user needs the REPLICATION attribute (alter role <user> replication), and max_replication_slots a free slot"
                ))
            })?;
            tracing::info!(slot, lsn = %lsn, "replication slot created");
            parse_lsn(&lsn)
        }
        (None, Some(_)) => bail!(
            "replication slot {slot} is gone, so the changes since the stored position cannot be read: \
             start over with a new connector name (a new initial snapshot), or restore the slot"
        ),
        (Some((flushed, plugin, database, same_db)), stored) => {
            if plugin.as_deref() != Some("pgoutput") || !same_db {
                bail!(
                    "replication slot {slot} exists but is not a usable pgoutput slot of this database (plugin {}, database {}; or Postgres removed WAL it needed, max_slot_wal_keep_size): \
                     drop it (select pg_drop_replication_slot('{slot}')) and start over with a new connector name, or set slot.name to another name",
                    plugin.unwrap_or_default(),
                    database.unwrap_or_default()
                );
            }
            let flushed = parse_lsn(flushed.as_deref().unwrap_or("0/0"))?;
            match stored {
                Some(at) if flushed > at => bail!(
                    "replication slot {slot} was confirmed up to {} but the stored position is {}: something else reads this slot, and the changes between are lost to this connector; \
                     give each connector its own slot.name, drop this slot (select pg_drop_replication_slot('{slot}')) and start over with a new connector name",
                    Lsn(flushed),
                    Lsn(at)
                ),
                Some(at) => Ok(at),
                None => {
                    tracing::info!(slot, lsn = %Lsn(flushed), "using the existing replication slot");
                    Ok(flushed)
                }
            }
        }
    }
}

pub(crate) fn parse_lsn(text: &str) -> anyhow::Result<u64> {
    let (hi, lo) = text
        .split_once('/')
        .with_context(|| format!("`{text}` is not an LSN"))?;
    let hi = u64::from_str_radix(hi, 16).with_context(|| format!("`{text}` is not an LSN"))?;
    let lo = u64::from_str_radix(lo, 16).with_context(|| format!("`{text}` is not an LSN"))?;
    Ok(hi << 32 | lo)
}

/// One decoded change, before rendering.
struct Decoded {
    table: usize,
    op: &'static str,
    before: Option<String>,
    after: Option<String>,
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
}

/// A table as the stream describes it (`pgoutput` Relation message).
struct Relation {
    /// Index into the mode's tables; `None` for a table not read.
    table: Option<usize>,
    /// Column names, and whether each is `json`/`jsonb` (its text is put
    /// into the row image as JSON, not as a string).
    columns: Vec<(String, bool)>,
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

/// A captured table with what logical mode needs besides.
struct LogicalTable {
    table: CapturedTable,
    /// Renders decoded changes passed as arrays (row images as `jsonb` of
    /// each column's text), leaving out transactions the initial snapshot
    /// holds.
    sql_render: String,
    /// Its `json`/`jsonb` columns (domains over them included), whose text
    /// goes into row images as JSON.
    json_columns: std::collections::HashSet<String>,
}

impl AsRef<CapturedTable> for LogicalTable {
    fn as_ref(&self) -> &CapturedTable {
        &self.table
    }
}

/// Refuses a table without logical capture (its publication, replica
/// identity full) or with generated columns, saying what to do.
///
/// Fails on a database error too.
pub(crate) async fn check_capture(pool: &PgPool, name: &TableName) -> anyhow::Result<()> {
    let publication = publication_name(name);
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
    Ok(())
}

/// Checks a table's logical capture and prepares its render query.
///
/// Fails when the table has no publication or full replica identity, or
/// has generated columns.
async fn logical_table(pool: &PgPool, table: CapturedTable) -> anyhow::Result<LogicalTable> {
    let name = &table.info.name;
    check_capture(pool, name).await?;
    let json_columns: Vec<String> = sqlx::query_scalar(
        "select a.attname::text from pg_attribute a join pg_type t on t.oid = a.atttypid
         where a.attrelid = to_regclass($1) and a.attnum > 0 and not a.attisdropped
           and (case when t.typtype = 'd' then t.typbasetype else t.oid end)
               in ('json'::regtype, 'jsonb'::regtype)",
    )
    .bind(name.quoted())
    .fetch_all(pool)
    .await?;
    let sql = table.image_sql();
    let sql_render = format!(
        r#"select l.ord as seq, l.txid, l.op, l.changed_ms,
                  {images}
           from unnest($1::int8[], $2::int8[], $3::text[], $4::text[], $5::int8[], $6::text[]::jsonb[], $7::text[]::jsonb[])
                as l(ord, lsn, txid, op, changed_ms, before, after)
           {joins}
           where not pg_visible_in_snapshot(l.txid::xid8, $8::pg_snapshot)
             and {segments}
           order by l.ord"#,
        images = sql.images,
        joins = sql.joins,
        segments = table.outside_segments_sql("l.txid::xid8", "$9"),
    );
    Ok(LogicalTable {
        table,
        sql_render,
        json_columns: json_columns.into_iter().collect(),
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
    pending: Option<Decoded>,
    /// The connection that renders changes: the stream's own, so that when
    /// Postgres shuts down (and waits for this stream to confirm what it
    /// sent) a render fails at once instead of waiting for the pool to
    /// connect again, which would hold the shutdown up.
    conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
}

/// `logical` mode: the initial snapshot, then the replication stream.
pub struct LogicalMode {
    cfg: LogicalConfig,
    pool: PgPool,
    target: PgTarget,
    tables: Vec<LogicalTable>,
    position: LogicalPosition,
    snapshot: InitialSnapshot,
    stream: Option<LogicalStream>,
    /// When a batch last committed: with only other tables' changes
    /// passing, the position is committed every [`POSITION_ONLY_EVERY`].
    last_commit: Instant,
    position_key: Vec<u8>,
    offsets_topic: String,
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
        (drop_key_schemas, drop_value_schemas): (bool, bool),
    ) -> anyhow::Result<Self> {
        let mut tables = Vec::new();
        for (info, topic) in infos {
            let mut t = CapturedTable::new(pool, info, topic, connector, database).await?;
            t.drop_schemas(drop_key_schemas, drop_value_schemas);
            tables.push(logical_table(pool, t).await?);
        }
        // Logical positions live under their own key: a connector that
        // changes mode is told so instead of reading another mode's position.
        let position_key = position_key(connector, "tidemark.logical");
        let stored = stored
            .get(&position_key)
            .map(|b| SourcePosition::decode(b))
            .transpose()?;
        let (position, fresh) = match stored {
            Some(SourcePosition::Logical(p)) => {
                let lsn = prepare_slot(pool, &cfg.slot_name, Some(p.lsn)).await?;
                tracing::info!(slot = %cfg.slot_name, lsn = %Lsn(lsn), in_txn = p.in_txn, snapshot_running = p.snapshot.is_some(), "resuming from stored position");
                (p, false)
            }
            Some(other) => bail!(
                "the stored position of connector {connector} is for another mode ({other:?}): use a new connector name to change modes"
            ),
            None => {
                // The slot first: every transaction committed after it is in
                // its stream, every one before is in the snapshot taken next.
                let lsn = prepare_slot(pool, &cfg.slot_name, None).await?;
                let done: String = sqlx::query_scalar("select pg_current_snapshot()::text")
                    .fetch_one(pool)
                    .await?;
                let snapshot = cfg.initial_snapshot.then(|| snapshot::begin(&tables));
                tracing::info!(initial_snapshot = cfg.initial_snapshot, "no stored position, starting now");
                (
                    LogicalPosition {
                        lsn,
                        done,
                        snapshot,
                        ..Default::default()
                    },
                    true,
                )
            }
        };
        let mut mode = Self {
            cfg,
            pool: pool.clone(),
            target: target.clone(),
            tables,
            position,
            snapshot: InitialSnapshot::default(),
            stream: None,
            last_commit: Instant::now(),
            position_key,
            offsets_topic: offsets_topic.to_owned(),
        };
        mode.snapshot =
            InitialSnapshot::start(pool, &mode.tables, &mut mode.position, fresh).await?;
        Ok(mode)
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
            .map(|t| quote_ident(&publication_name(&t.table.info.name)))
            .collect();
        let config =
            ReplicationConfig::new(t.host, t.user, t.password, t.database, slot, publications)
                .with_port(t.port)
                .with_tls(tls)
                .with_start_lsn(Lsn(at))
                .with_ack_lsn(Lsn(at))
                .with_status_interval(Duration::from_secs(1))
                .with_buffer_size(1024)
                .with_application_name("tidemark-pg-source")
                // Tidemark's session settings: values as the reader's own sessions
                // print them, so they read back the same, and its search_path.
                .with_options(tidemark_common::pg::session_options());
        let pg = |e| SourceError::postgres("cannot prepare the replication stream", e);
        let mut conn = self.pool.acquire().await.map_err(pg)?;
        let xid_base: i64 =
            sqlx::query_scalar("select pg_snapshot_xmax(pg_current_snapshot())::text::int8")
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
            acked: at,
            last_commit: at,
            pending: None,
            conn,
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
                        "select exists (select 1 from pg_replication_slots where slot_name = $1)",
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

    /// Reads until a batch is ready: `batch.max.rows` changes, or every
    /// transaction the stream has sent so far. Returns `None` after
    /// [`IDLE_RETURN`] with nothing to send. Moves the position to what the
    /// batch covers.
    ///
    /// Fails on a stream, decoding or rendering error.
    async fn stream_step(&mut self) -> Result<Option<Batch>, SourceError> {
        if self.stream.is_none() {
            self.stream = Some(self.open_stream().await?);
        }
        let mut changes: Vec<Decoded> = Vec::new();
        let mut first_change = Instant::now();
        let started = Instant::now();
        // What the batch cut off last time starts this one.
        changes.extend(self.stream.as_mut().and_then(|s| s.pending.take()));
        let chunk = self.cfg.batch_max_rows;
        let linger = self.cfg.linger;
        let position_only = |what| Batch {
            what,
            ..Batch::default()
        };
        loop {
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
                // already here, and what comes within the linger of the
                // batch's first change, then send. Fewer, larger Kafka
                // transactions cost the machine less under many small
                // commits; the linger bounds what that adds to latency.
                let left = linger.saturating_sub(first_change.elapsed());
                match s.client.recv().now_or_never() {
                    Some(ev) => ev,
                    None if left.is_zero() => break,
                    None => match tokio::time::timeout(left, s.client.recv()).await {
                        Ok(ev) => ev,
                        Err(_) => break,
                    },
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
                }
                Some(ReplicationEvent::XLogData {
                    wal_start, data, ..
                }) => {
                    let decoded = s
                        .decode(&self.tables, &data, wal_start.0)
                        .map_err(SourceError::Definite)?;
                    if let Some(d) = decoded {
                        if changes.len() as i64 >= chunk {
                            // A large transaction goes in parts; the next
                            // start skips what this one sends. This change
                            // goes first in the next part.
                            let sent = changes.last().expect("a full batch");
                            self.position.in_txn_lsn = Some(sent.lsn);
                            self.position.in_txn = sent.at_last;
                            s.pending = Some(d);
                            break;
                        }
                        if changes.is_empty() {
                            first_change = Instant::now();
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
        let rows = changes.len();
        let newest_change_ms = changes.iter().map(|c| c.changed_ms).max();
        let s = self.stream.as_mut().expect("opened above");
        // The events of a transaction cut by the last batch, counted so far.
        let carried = std::mem::take(&mut self.position.in_txn_counts);
        let records = render(
            &mut s.conn,
            &self.tables,
            &mut self.position,
            carried,
            self.cfg.tombstones,
            changes,
        )
        .await
        .map_err(SourceError::from_anyhow)?;
        Ok(Some(Batch {
            records,
            rows,
            newest_change_ms,
            what: "changes committed",
        }))
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

    fn relation(&mut self, tables: &[LogicalTable], rel: pgoutput::Relation) {
        let table = tables.iter().position(|t| {
            t.table.info.name.schema == rel.schema && t.table.info.name.name == rel.name
        });
        let columns: Vec<(String, bool)> = rel
            .columns
            .into_iter()
            .map(|c| {
                let json = table.is_some_and(|i| tables[i].json_columns.contains(c.name.as_str()));
                (c.name, json)
            })
            .collect();
        if let Some(i) = table {
            let known = &tables[i].table.info.columns;
            if columns.len() != known.len()
                || columns
                    .iter()
                    .any(|(c, _)| !known.iter().any(|k| &k.name == c))
            {
                tracing::warn!(table = %tables[i].table.info.name, "the table's columns changed since pg-source started; restart pg-source to send the new shape");
            }
        }
        self.relations.insert(rel.id, Relation { table, columns });
    }

    /// Decodes one `pgoutput` message; `Some` for a change of a table read.
    fn decode(
        &mut self,
        tables: &[LogicalTable],
        data: &[u8],
        lsn: u64,
    ) -> anyhow::Result<Option<Decoded>> {
        let (kind, id, old, new) = match pgoutput::decode(data)? {
            Message::Relation(rel) => {
                self.relation(tables, rel);
                return Ok(None);
            }
            Message::Insert { relation, new } => ("c", relation, None, Some(new)),
            Message::Update { relation, old, new } => ("u", relation, old, Some(new)),
            Message::Delete { relation, old } => ("d", relation, old, None),
            Message::Truncate { .. } => {
                tracing::warn!("a TRUNCATE of a captured table is not sent: its rows' deletes are not in the stream");
                return Ok(None);
            }
            // Type, Origin and other messages carry nothing to send.
            Message::Type(_) | Message::Other(_) => return Ok(None),
        };
        let rel = self.relations.get(&id).with_context(|| {
            format!("a change of relation {id}, which the stream never described")
        })?;
        let Some(table) = rel.table else {
            return Ok(None);
        };
        let txn = self
            .txn
            .as_mut()
            .context("a change outside a transaction in the replication stream")?;
        if lsn == txn.last_lsn {
            txn.at_last += 1;
        } else {
            txn.last_lsn = lsn;
            txn.at_last = 1;
        }
        // Sent before a restart that cut this transaction.
        if let Some((cut, n)) = self.skip {
            if lsn < cut || (lsn == cut && txn.at_last <= n) {
                return Ok(None);
            }
        }
        let (txid, commit_us, commit_lsn, last_commit, at_last) = (
            txn.xid,
            txn.commit_us,
            txn.commit_lsn,
            txn.last_commit,
            txn.at_last,
        );
        if kind != "c" && old.is_none() {
            bail!(
                "table {} sends updates and deletes without the old row: run schema-init --capture logical --table {0} (replica identity full)",
                tables[table].table.info.name
            );
        }
        let before = match &old {
            Some(t) => Some(row_json(&rel.columns, t, None)?),
            None => None,
        };
        let after = match &new {
            Some(t) => Some(row_json(&rel.columns, t, old.as_deref())?),
            None => None,
        };
        Ok(Some(Decoded {
            table,
            op: kind,
            before,
            after,
            txid,
            changed_ms: commit_us.div_euclid(1000),
            lsn,
            at_last,
            commit_lsn,
            commit_us,
            last_commit,
            txn_last: false,
        }))
    }
}

impl Capture for LogicalMode {
    type Saved = LogicalPosition;

    fn save(&self) -> Self::Saved {
        self.position.clone()
    }

    fn restore(&mut self, saved: Self::Saved) {
        // The stream resumes from the stored position.
        self.stream = None;
        self.position = saved;
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
            return Ok(Some(batch));
        }
        let saved = self.position.clone();
        let step = tokio::select! {
            _ = shutdown.cancelled() => None,
            step = self.stream_step() => Some(step),
        };
        match step {
            Some(Err(e)) => {
                // The stream resumes from the stored position.
                self.stream = None;
                Err(e)
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
        if let Some(s) = self.stream.as_mut() {
            s.acked = lsn;
            s.client.update_applied_lsn(Lsn(lsn));
        }
        tracing::info!(records = done.records, rows = done.rows, lsn = %Lsn(lsn), commit = ?done.commit, "{}", done.what);
    }

    async fn wait(&mut self, _shutdown: &CancellationToken) {
        // The stream waits for changes itself.
    }
}

/// A row image as a JSON object of each column's text (or JSON for `json`
/// columns); an unchanged TOASTed value is taken from the old row.
fn row_json(
    columns: &[(String, bool)],
    tuple: &[Value<'_>],
    old: Option<&[Value<'_>]>,
) -> anyhow::Result<String> {
    if tuple.len() != columns.len() {
        bail!(
            "a row with {} columns for a table described with {}",
            tuple.len(),
            columns.len()
        );
    }
    let mut out = String::with_capacity(64 * columns.len());
    out.push('{');
    for (i, ((name, json), v)) in columns.iter().zip(tuple).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(name).expect("a string always serialises"));
        out.push(':');
        let v = match v {
            Value::Unchanged => match old.and_then(|o| o.get(i)) {
                Some(v @ (Value::Null | Value::Text(_))) => v,
                _ => bail!("column {name} was not sent (an unchanged TOASTed value) and the old row lacks it: set replica identity full (schema-init --capture logical)"),
            },
            v => v,
        };
        match v {
            Value::Null | Value::Unchanged => out.push_str("null"),
            Value::Text(bytes) => {
                let text = std::str::from_utf8(bytes)
                    .with_context(|| format!("column {name} is not UTF-8 text"))?;
                if *json {
                    out.push_str(text);
                } else {
                    out.push_str(&serde_json::to_string(text).expect("a string always serialises"));
                }
            }
        }
    }
    out.push('}');
    Ok(out)
}

/// What a rendered change needs from its decoded form.
struct Meta {
    table: usize,
    lsn: u64,
    commit_lsn: u64,
    commit_us: i64,
    last_commit: u64,
}

/// Renders decoded changes into records, a query per run of one table,
/// each transaction a unit: its events are counted (a transaction cut by
/// the last batch goes on from `carried`), and its last event carries the
/// totals once its Commit was read. The counts of a transaction this batch
/// cuts stay in the position.
async fn render(
    conn: &mut sqlx::PgConnection,
    tables: &[LogicalTable],
    position: &mut LogicalPosition,
    carried: Vec<(String, u64)>,
    tombstones: bool,
    mut changes: Vec<Decoded>,
) -> anyhow::Result<Vec<Record>> {
    let complete: std::collections::HashSet<u64> = changes
        .iter()
        .filter(|c| c.txn_last)
        .map(|c| c.commit_lsn)
        .collect();
    let first_txn = changes.first().map(|c| c.commit_lsn);
    // The transaction this batch cuts, if it does: the last one read.
    let cut_txn = position
        .in_txn_lsn
        .and(changes.last().map(|c| c.commit_lsn));
    let mut rendered: Vec<(Meta, RenderedChange)> = Vec::with_capacity(changes.len());
    // Front to back, at most RENDER_CHUNK at a time, each chunk's row images
    // freed once rendered.
    changes.reverse();
    while let Some(first) = changes.last().map(|c| c.table) {
        let mut run = Vec::with_capacity(RENDER_CHUNK.min(changes.len()));
        while run.len() < RENDER_CHUNK && changes.last().is_some_and(|c| c.table == first) {
            run.push(changes.pop().expect("checked above"));
        }
        changes.shrink_to(changes.len().max(RENDER_CHUNK));
        let table = &tables[first];
        let segments = serde_json::to_value(
            position
                .segments
                .get(&table.table.log_name)
                .cloned()
                .unwrap_or_default(),
        )
        .expect("segments always serialise");
        let ord: Vec<i64> = (0..run.len() as i64).collect();
        let lsn: Vec<i64> = run.iter().map(|c| c.lsn as i64).collect();
        let txid: Vec<String> = run.iter().map(|c| c.txid.to_string()).collect();
        let op: Vec<&'static str> = run.iter().map(|c| c.op).collect();
        let changed: Vec<i64> = run.iter().map(|c| c.changed_ms).collect();
        let before: Vec<Option<&str>> = run.iter().map(|c| c.before.as_deref()).collect();
        let after: Vec<Option<&str>> = run.iter().map(|c| c.after.as_deref()).collect();
        let rows: Vec<RenderedChange> = sqlx::query_as(&table.sql_render)
            .bind(&ord)
            .bind(&lsn)
            .bind(&txid)
            .bind(&op)
            .bind(&changed)
            .bind(&before)
            .bind(&after)
            .bind(&position.done)
            .bind(segments)
            .fetch_all(&mut *conn)
            .await
            .with_context(|| {
                format!(
                    "cannot render the changes of table {}",
                    table.table.info.name
                )
            })?;
        drop((ord, lsn, txid, op, changed, before, after));
        for r in rows {
            let c = &run[r.seq as usize];
            let meta = Meta {
                table: first,
                lsn: c.lsn,
                commit_lsn: c.commit_lsn,
                commit_us: c.commit_us,
                last_commit: c.last_commit,
            };
            rendered.push((meta, r));
        }
    }
    // The last rendered event of each transaction.
    let mut last_of_txn = vec![false; rendered.len()];
    let mut seen = std::collections::HashSet::new();
    for (k, (m, _)) in rendered.iter().enumerate().rev() {
        if seen.insert(m.commit_lsn) {
            last_of_txn[k] = complete.contains(&m.commit_lsn);
        }
    }
    let read_us = now_us();
    let mut records = Vec::with_capacity(rendered.len() + rendered.len() / 8);
    let mut counts = Vec::new();
    let mut current = None;
    for (k, (m, r)) in rendered.iter().enumerate() {
        if current != Some(m.commit_lsn) {
            current = Some(m.commit_lsn);
            counts = if Some(m.commit_lsn) == first_txn {
                carried.clone()
            } else {
                Vec::new()
            };
        }
        let mut unit = Unit {
            commit_order: m.commit_lsn,
            commit_us: m.commit_us,
            counts: &mut counts,
        };
        tables[m.table].table.render_change(
            r,
            Sequence::Logical {
                last_commit: m.last_commit,
                lsn: m.lsn,
            },
            &mut unit,
            last_of_txn[k],
            read_us,
            tombstones,
            &mut records,
        );
    }
    if let Some(cut) = cut_txn {
        // The batch cut a transaction: its counts go on in the next one.
        position.in_txn_counts = if current == Some(cut) {
            counts
        } else if first_txn == Some(cut) {
            carried
        } else {
            Vec::new()
        };
    }
    Ok(records)
}

/// Changes rendered per query.
const RENDER_CHUNK: usize = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_are_valid_and_distinct() {
        assert_eq!(default_slot_name("jdbc_source"), "tidemark_jdbc_source");
        let odd = default_slot_name("My-Connector");
        assert!(odd.starts_with("tidemark_my_connector_"), "{odd}");
        assert_ne!(odd, default_slot_name("my_connector"));
        let long = default_slot_name(&"x".repeat(100));
        assert!(long.len() <= 63, "{long}");
    }

    #[test]
    fn lsns_parse_as_postgres_prints_them() {
        assert_eq!(parse_lsn("0/16B3748").unwrap(), 0x16B_3748);
        assert_eq!(parse_lsn("1/0").unwrap(), 1 << 32);
        assert!(parse_lsn("nonsense").is_err());
    }

    #[test]
    fn row_images_keep_json_as_json_and_fill_unchanged_values_from_the_old_row() {
        let cols = vec![
            ("id".to_owned(), false),
            ("doc".to_owned(), true),
            ("big".to_owned(), false),
        ];
        let old = [
            Value::Text(b"1"),
            Value::Text(br#"{"a":1}"#),
            Value::Text(b"long \"text\""),
        ];
        let new = [Value::Text(b"1"), Value::Null, Value::Unchanged];
        assert_eq!(
            row_json(&cols, &new, Some(&old)).unwrap(),
            r#"{"id":"1","doc":null,"big":"long \"text\""}"#
        );
        assert_eq!(
            row_json(&cols, &old, None).unwrap(),
            r#"{"id":"1","doc":{"a":1},"big":"long \"text\""}"#
        );
        assert!(row_json(&cols, &new, None).is_err());
    }
}
