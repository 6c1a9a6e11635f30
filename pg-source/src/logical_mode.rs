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
use tidemark_common::health::now_ms;
use tidemark_common::pg::{publication_name, PgTarget};

use crate::changelog_mode::{ChangeLogReader, ChangeRow, Chunk};

/// Microseconds between 1970-01-01 and 2000-01-01, Postgres' epoch.
const PG_EPOCH_MS: i64 = 946_684_800_000;

/// How long a stream with nothing new waits before returning to the main
/// loop (which reports health and checks for a stop).
const IDLE_RETURN: Duration = Duration::from_secs(1);

/// With only changes of other tables (or of the snapshot's transactions)
/// passing, the position is still committed this often, so the slot can let
/// Postgres recycle its WAL.
const POSITION_ONLY_EVERY: Duration = Duration::from_secs(5);

/// How long a logical-mode batch waits for more transactions after its
/// first change (`TIDEMARK_LINGER_MS`).
pub const DEFAULT_LINGER: Duration = Duration::from_millis(10);

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

fn parse_lsn(text: &str) -> anyhow::Result<u64> {
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
}

/// A table as the stream describes it (`pgoutput` Relation message).
struct Relation {
    /// Index into the reader's tables; `None` for a table not read.
    table: Option<usize>,
    /// Column names, and whether each is `json`/`jsonb` (its text is put
    /// into the row image as JSON, not as a string).
    columns: Vec<(String, bool)>,
}

/// A column value in a tuple.
enum Value<'a> {
    Null,
    /// A TOASTed value the update did not change: not sent.
    Unchanged,
    Text(&'a [u8]),
}

/// A transaction being read from the stream.
struct Txn {
    xid: u64,
    commit_ms: i64,
    /// The WAL position of its last change read, and how many changes were
    /// read at that position.
    last_lsn: u64,
    at_last: u64,
}

/// The stream ended without an error: the server closed it.
#[derive(Debug, thiserror::Error)]
#[error("the replication stream of slot {0} ended: the server closed it")]
pub struct StreamClosed(String);

/// The open replication stream and what decoding it needs.
pub struct LogicalStream {
    client: ReplicationClient,
    relations: HashMap<u32, Relation>,
    /// The open transaction.
    txn: Option<Txn>,
    /// Where the first transaction was cut before a restart: its changes up
    /// to this WAL position (and this many at it) were sent already.
    skip: Option<(u64, u64)>,
    /// Per table read, its `json`/`jsonb` columns (domains over them
    /// included), whose text goes into row images as JSON.
    json_columns: Vec<std::collections::HashSet<String>>,
    /// A recent full transaction id, to widen the stream's 32-bit xids.
    xid_base: u64,
    slot: String,
    /// The position last told to the slot.
    acked: Option<u64>,
    /// How long a batch waits for more transactions after its first change.
    linger: Duration,
    /// The connection that renders changes: the stream's own, so that when
    /// Postgres shuts down (and waits for this stream to confirm what it
    /// sent) a render fails at once instead of waiting for the pool to
    /// connect again, which would hold the shutdown up.
    conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
}

impl LogicalStream {
    /// Opens the stream at the reader's stored position.
    ///
    /// Fails when the replication connection cannot be made.
    pub async fn open(
        pool: &PgPool,
        target: &PgTarget,
        slot: &str,
        reader: &ChangeLogReader,
    ) -> anyhow::Result<Self> {
        let t = target.replication_target().context(
            "mode logical needs a TCP connection.url (host and port), not a Unix socket",
        )?;
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
        let at = reader.position.lsn.unwrap_or(0);
        let publications: Vec<String> = reader
            .tables
            .iter()
            .map(|t| publication_name(&t.info.name))
            .collect();
        let config = ReplicationConfig::new(
            t.host,
            t.user,
            t.password,
            t.database,
            slot,
            publications,
        )
        .with_port(t.port)
        .with_tls(tls)
        .with_start_lsn(Lsn(at))
        .with_ack_lsn(Lsn(at))
        .with_status_interval(Duration::from_secs(1))
        .with_buffer_size(1024)
        .with_application_name("tidemark-pg-source")
        // Values as the reader's own sessions print them, so they read back
        // the same.
        .with_options(
            "-c client_encoding=UTF8 -c datestyle=ISO -c intervalstyle=iso_8601 -c extra_float_digits=3 -c timezone=UTC",
        );
        let mut conn = pool.acquire().await?;
        let mut json_columns = Vec::new();
        for table in &reader.tables {
            let names: Vec<String> = sqlx::query_scalar(
                "select a.attname::text from pg_attribute a join pg_type t on t.oid = a.atttypid
                 where a.attrelid = to_regclass($1) and a.attnum > 0 and not a.attisdropped
                   and (case when t.typtype = 'd' then t.typbasetype else t.oid end)
                       in ('json'::regtype, 'jsonb'::regtype)",
            )
            .bind(table.info.name.quoted())
            .fetch_all(&mut *conn)
            .await?;
            json_columns.push(names.into_iter().collect());
        }
        let xid_base: i64 =
            sqlx::query_scalar("select pg_snapshot_xmax(pg_current_snapshot())::text::int8")
                .fetch_one(&mut *conn)
                .await?;
        let client = ReplicationClient::connect(config)
            .await
            .map_err(|e| stream_error(e, slot))?;
        let skip = reader
            .position
            .in_txn_lsn
            .map(|l| (l, reader.position.in_txn));
        tracing::info!(slot, lsn = %Lsn(at), resume_inside = ?skip.map(|(l, n)| (Lsn(l).to_string(), n)), "replication stream opened");
        Ok(Self {
            client,
            relations: HashMap::new(),
            txn: None,
            skip,
            json_columns,
            xid_base: xid_base as u64,
            slot: slot.to_owned(),
            acked: reader.position.lsn,
            linger: std::env::var("TIDEMARK_LINGER_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_LINGER),
            conn,
        })
    }

    /// Widens a 32-bit xid to the full id nearest the last one seen.
    fn full_xid(&mut self, xid: u32) -> u64 {
        let diff = i64::from(xid.wrapping_sub(self.xid_base as u32) as i32);
        let full = (self.xid_base as i64 + diff).max(0) as u64;
        self.xid_base = full;
        full
    }

    fn relation(&mut self, reader: &ChangeLogReader, mut b: &[u8]) -> anyhow::Result<()> {
        let id = take_u32(&mut b)?;
        let schema = take_cstr(&mut b)?;
        let name = take_cstr(&mut b)?;
        let _identity = take_u8(&mut b)?;
        let n = take_u16(&mut b)?;
        let mut columns = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let _flags = take_u8(&mut b)?;
            let column = take_cstr(&mut b)?;
            let _oid = take_u32(&mut b)?;
            let _typmod = take_u32(&mut b)?;
            columns.push((column, false));
        }
        let table = reader
            .tables
            .iter()
            .position(|t| t.info.name.schema == schema && t.info.name.name == name);
        if let Some(i) = table {
            for (column, json) in &mut columns {
                *json = self.json_columns[i].contains(column.as_str());
            }
        }
        if let Some(i) = table {
            let known = &reader.tables[i].info.columns;
            if columns.len() != known.len()
                || columns
                    .iter()
                    .any(|(c, _)| !known.iter().any(|k| &k.name == c))
            {
                tracing::warn!(table = %reader.tables[i].info.name, "the table's columns changed since pg-source started; restart pg-source to send the new shape");
            }
        }
        self.relations.insert(id, Relation { table, columns });
        Ok(())
    }

    /// Decodes one `pgoutput` message; `Some` for a change of a table read.
    fn decode(
        &mut self,
        reader: &ChangeLogReader,
        data: &[u8],
        lsn: u64,
    ) -> anyhow::Result<Option<Decoded>> {
        let Some((&kind, mut b)) = data.split_first() else {
            return Ok(None);
        };
        let op = match kind {
            b'R' => {
                self.relation(reader, b)?;
                return Ok(None);
            }
            b'I' => "c",
            b'U' => "u",
            b'D' => "d",
            b'T' => {
                tracing::warn!("a TRUNCATE of a captured table is not sent: its rows' deletes are not in the stream");
                return Ok(None);
            }
            // Type, Origin and other messages carry nothing to send.
            _ => return Ok(None),
        };
        let id = take_u32(&mut b)?;
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
        let (txid, changed_ms) = (txn.xid, txn.commit_ms);
        let mut old = None;
        let mut new = None;
        while let Some((&tag, rest)) = b.split_first() {
            b = rest;
            let tuple = take_tuple(&mut b)?;
            match tag {
                b'K' | b'O' => old = Some(tuple),
                b'N' => new = Some(tuple),
                other => bail!("unexpected tuple tag {other} in the replication stream"),
            }
        }
        if (kind == b'U' || kind == b'D') && old.is_none() {
            bail!(
                "table {} sends updates and deletes without the old row: run schema-init --capture logical --table {0} (replica identity full)",
                reader.tables[table].info.name
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
            op,
            before: if kind == b'I' { None } else { before },
            after,
            txid,
            changed_ms,
            lsn,
        }))
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

fn take_u8(b: &mut &[u8]) -> anyhow::Result<u8> {
    let (&v, rest) = b.split_first().context("a truncated replication message")?;
    *b = rest;
    Ok(v)
}

fn take_u16(b: &mut &[u8]) -> anyhow::Result<u16> {
    let v = b.get(..2).context("a truncated replication message")?;
    let v = u16::from_be_bytes([v[0], v[1]]);
    *b = &b[2..];
    Ok(v)
}

fn take_u32(b: &mut &[u8]) -> anyhow::Result<u32> {
    let v = b.get(..4).context("a truncated replication message")?;
    let v = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
    *b = &b[4..];
    Ok(v)
}

fn take_cstr(b: &mut &[u8]) -> anyhow::Result<String> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .context("a truncated replication message")?;
    let s = String::from_utf8_lossy(&b[..end]).into_owned();
    *b = &b[end + 1..];
    Ok(s)
}

fn take_tuple<'a>(b: &mut &'a [u8]) -> anyhow::Result<Vec<Value<'a>>> {
    let n = take_u16(b)?;
    let mut values = Vec::with_capacity(n as usize);
    for _ in 0..n {
        match take_u8(b)? {
            b'n' => values.push(Value::Null),
            b'u' => values.push(Value::Unchanged),
            b't' | b'b' => {
                let len = take_u32(b)? as usize;
                let v = b.get(..len).context("a truncated replication message")?;
                *b = &b[len..];
                values.push(Value::Text(v));
            }
            other => bail!("unexpected column kind {other} in the replication stream"),
        }
    }
    Ok(values)
}

/// What a stream failure means.
pub enum StreamError {
    /// Waiting and reconnecting may cure it (a restart, a dropped link, the
    /// slot still held by a dying session).
    Transient(anyhow::Error),
    /// It needs a person.
    Fatal(anyhow::Error),
}

fn stream_error(e: PgWireError, slot: &str) -> anyhow::Error {
    let hint = match &e {
        PgWireError::Auth(_) => "; check connection.user and connection.password".to_owned(),
        PgWireError::Server(m) if m.contains("SQLSTATE 42501") => {
            "; the user needs the REPLICATION attribute: alter role <user> replication".to_owned()
        }
        PgWireError::Server(m) if m.contains("SQLSTATE 42704") && m.contains("slot") => {
            "; the slot is gone, so the changes since the stored position cannot be read: start over with a new connector name (a new initial snapshot)".to_owned()
        }
        PgWireError::Server(m) if m.contains("SQLSTATE 42704") => {
            "; run schema-init --capture logical for every table read".to_owned()
        }
        PgWireError::Server(m) if m.contains("SQLSTATE 55006") => format!(
            "; another session is reading slot {slot}: a dying one lets go within seconds; if it is another connector, give each its own slot.name"
        ),
        _ => String::new(),
    };
    anyhow::anyhow!("replication stream of slot {slot}: {e}{hint}")
}

/// Whether a stream error may pass by waiting.
pub fn is_transient(e: &anyhow::Error) -> bool {
    if let Some(e) = e.downcast_ref::<sqlx::Error>() {
        return tidemark_common::pg::is_transient(e);
    }
    if e.downcast_ref::<StreamClosed>().is_some() {
        return true;
    }
    let text = format!("{e:#}");
    // A lost connection, a server restarting or shutting down, a slot still
    // held by a dying session, too many connections; not a protocol
    // violation (08P01) or a dropped database (57P04).
    let transient_code = [
        "SQLSTATE 08000",
        "SQLSTATE 08001",
        "SQLSTATE 08003",
        "SQLSTATE 08004",
        "SQLSTATE 08006",
        "SQLSTATE 57P01",
        "SQLSTATE 57P02",
        "SQLSTATE 57P03",
        "SQLSTATE 55006",
        "SQLSTATE 53300",
    ]
    .iter()
    .any(|c| text.contains(c));
    transient_code
        || text.contains("io error")
        || text.contains("task error")
        || text.contains("internal error")
}

/// A batch read from the stream, ready to commit with the reader's
/// position as [`LogicalStream::next`] left it.
pub struct Batch {
    pub chunk: Chunk,
    /// The position moved without records (other tables' changes, or the
    /// snapshot's own transactions).
    pub position_only: bool,
}

impl LogicalStream {
    /// Reads until a batch is ready: `chunk` changes, or every transaction
    /// the stream has sent so far. Returns `None` after [`IDLE_RETURN`]
    /// with nothing to send. Moves `reader.position` to what the batch
    /// covers; on any error the caller drops the stream and restores the
    /// position.
    ///
    /// Fails on a stream, decoding or rendering error.
    pub async fn next(
        &mut self,
        reader: &mut ChangeLogReader,
        last_commit: Instant,
    ) -> anyhow::Result<Option<Batch>> {
        let mut changes: Vec<Decoded> = Vec::new();
        let mut first_change = Instant::now();
        let started = Instant::now();
        loop {
            let caught_up = self.txn.is_none();
            let ev = if changes.is_empty() && caught_up {
                if reader.position.lsn != self.acked && last_commit.elapsed() >= POSITION_ONLY_EVERY
                {
                    return Ok(Some(Batch {
                        chunk: Chunk::default(),
                        position_only: true,
                    }));
                }
                let left = IDLE_RETURN.saturating_sub(started.elapsed());
                match tokio::time::timeout(left, self.client.recv()).await {
                    Ok(ev) => ev,
                    Err(_) => return Ok(None),
                }
            } else if caught_up {
                // Between transactions with changes in hand: take what is
                // already here, and what comes within the linger of the
                // batch's first change, then send. Fewer, larger Kafka
                // transactions cost the machine less under many small
                // commits; the linger bounds what that adds to latency.
                let left = self.linger.saturating_sub(first_change.elapsed());
                match self.client.recv().now_or_never() {
                    Some(ev) => ev,
                    None if left.is_zero() => break,
                    None => match tokio::time::timeout(left, self.client.recv()).await {
                        Ok(ev) => ev,
                        Err(_) => break,
                    },
                }
            } else {
                self.client.recv().await
            };
            let ev = ev.map_err(|e| stream_error(e, &self.slot))?;
            match ev {
                None => return Err(StreamClosed(self.slot.clone()).into()),
                Some(ReplicationEvent::Begin {
                    xid,
                    commit_time_micros,
                    ..
                }) => {
                    let full = self.full_xid(xid);
                    self.txn = Some(Txn {
                        xid: full,
                        commit_ms: commit_time_micros / 1000 + PG_EPOCH_MS,
                        last_lsn: 0,
                        at_last: 0,
                    });
                }
                Some(ReplicationEvent::XLogData {
                    wal_start, data, ..
                }) => {
                    if let Some(d) = self.decode(reader, &data, wal_start.0)? {
                        if changes.is_empty() {
                            first_change = Instant::now();
                        }
                        changes.push(d);
                        if changes.len() as i64 >= reader.chunk {
                            // A large transaction goes in parts; the next
                            // start skips what this one sends.
                            if let Some(txn) = &self.txn {
                                reader.position.in_txn_lsn = Some(txn.last_lsn);
                                reader.position.in_txn = txn.at_last;
                            }
                            break;
                        }
                    }
                }
                Some(ReplicationEvent::Commit { end_lsn, .. }) => {
                    self.txn = None;
                    self.skip = None;
                    reader.position.lsn = Some(end_lsn.0);
                    reader.position.in_txn_lsn = None;
                    reader.position.in_txn = 0;
                    if changes.len() as i64 >= reader.chunk {
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
                    if self.txn.is_none()
                        && changes.is_empty()
                        && Some(wal_end.0) > reader.position.lsn
                    {
                        reader.position.lsn = Some(wal_end.0);
                        reader.position.in_txn_lsn = None;
                        reader.position.in_txn = 0;
                        if reply_requested {
                            return Ok(Some(Batch {
                                chunk: Chunk::default(),
                                position_only: true,
                            }));
                        }
                    }
                }
                Some(ReplicationEvent::Message { .. }) => {}
                Some(ReplicationEvent::StoppedAt { .. }) => {
                    bail!("the replication stream of slot {} stopped", self.slot)
                }
            }
        }
        let rows = changes.len();
        let newest_change_ms = changes.iter().map(|c| c.changed_ms).max();
        let records = render(&mut self.conn, reader, changes).await?;
        Ok(Some(Batch {
            chunk: Chunk {
                records,
                rows,
                newest_change_ms,
                batch_done: false,
            },
            position_only: false,
        }))
    }

    /// Tells the slot that everything up to `lsn` is safe in Kafka.
    pub fn acknowledge(&mut self, lsn: u64) {
        self.acked = Some(lsn);
        self.client.update_applied_lsn(Lsn(lsn));
    }
}

/// Renders decoded changes into records, a query per run of one table.
async fn render(
    conn: &mut sqlx::PgConnection,
    reader: &ChangeLogReader,
    mut changes: Vec<Decoded>,
) -> anyhow::Result<Vec<crate::producer::Record>> {
    let mut records = Vec::with_capacity(changes.len() + changes.len() / 8);
    let read_ms = now_ms();
    // Front to back, at most RENDER_CHUNK at a time, each chunk's row images
    // freed once rendered: a large batch is not held three times over (as
    // row images, query rows and records).
    changes.reverse();
    while let Some(first) = changes.last().map(|c| c.table) {
        let mut run = Vec::with_capacity(RENDER_CHUNK.min(changes.len()));
        while run.len() < RENDER_CHUNK && changes.last().is_some_and(|c| c.table == first) {
            run.push(changes.pop().expect("checked above"));
        }
        changes.shrink_to(changes.len().max(RENDER_CHUNK));
        let table = &reader.tables[first];
        let segments = serde_json::to_value(
            reader
                .position
                .segments
                .get(&table.log_name)
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
        let rows: Vec<ChangeRow> = sqlx::query_as(&table.sql_render)
            .bind(&ord)
            .bind(&lsn)
            .bind(&txid)
            .bind(&op)
            .bind(&changed)
            .bind(&before)
            .bind(&after)
            .bind(&reader.position.done)
            .bind(segments)
            .fetch_all(&mut *conn)
            .await
            .with_context(|| format!("cannot render the changes of table {}", table.info.name))?;
        drop((ord, lsn, txid, op, changed, before, after));
        drop(run);
        for r in &rows {
            reader.render_change(table, r, read_ms, &mut records);
        }
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

    #[test]
    fn tuples_decode_every_column_kind() {
        let mut bytes: &[u8] = &[0, 3, b'n', b'u', b't', 0, 0, 0, 2, b'h', b'i'];
        let t = take_tuple(&mut bytes).unwrap();
        assert!(matches!(t[0], Value::Null));
        assert!(matches!(t[1], Value::Unchanged));
        assert!(matches!(t[2], Value::Text(b"hi")));
        assert!(bytes.is_empty());
        let mut short: &[u8] = &[0, 1, b't', 0, 0, 0, 9, b'x'];
        assert!(take_tuple(&mut short).is_err());
    }
}
