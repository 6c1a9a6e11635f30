//! Incremental snapshots (`changelog` mode): the rows of a table that
//! entered the connector's set while it streams (a longer `table.whitelist`
//! at a restart, or a table a `table.include.list` pattern came to match),
//! sent in primary-key order, one chunk of `batch.max.rows` rows per unit,
//! between the units of the stream, which goes on for every table.
//!
//! **The technique** is an equivalent of DBLog's watermarks (Netflix,
//! arXiv:2010.12597) that needs no write to the source: the watermark is a
//! Postgres snapshot, which the change-log stream already uses as its
//! position. A chunk is read in a `repeatable read` transaction whose
//! snapshot `S` becomes the end of the stream's next batch: the stream first
//! sends every change of the transactions between its position `done` and
//! `S` (exactly those visible in `S` and not in `done`), then the chunk, as
//! its own unit, then goes on from `S`. So the chunk's rows are the table as
//! it was at the very point of the stream where they are placed.
//!
//! **No gap, no duplicate.** Say the table's snapshot has sent the rows up
//! to key `K` (`None`: none yet). The stream sends a change of the table
//! only when the key it touches is at or below `K`; a change of a key above
//! `K` is left out, because a later chunk reads that key in a later
//! snapshot, which holds the change. (A change that moves a row to another
//! key is a delete of the old key and a create of the new one, each sent or
//! left out by its own key; a TRUNCATE is sent once a chunk was.) By
//! induction over the stream, at every unit boundary the archive holds
//! exactly the table's rows with a key up to `K` as they were at that
//! point: a chunk read in `S` and placed at `S` adds the rows after `K` up
//! to its last key `K'` as they were at `S`, and moves `K` to `K'`; a
//! streamed unit carries every change to keys up to `K` and none above. When
//! a chunk comes back short, `K` is the end: the archive holds the whole
//! table, and from then on every change is sent. Each key's first event is
//! therefore its snapshot read (`op: r`, `source.snapshot: incremental`) or,
//! for a row created after its range was read, its create: never an update
//! of a row the archive lacks, and no row twice.
//!
//! **Crashes.** `K`, the rows sent and the tables still to do are in the
//! stored position, committed in the chunk's Kafka transaction; a chunk
//! read but not yet committed is read again, in a new snapshot, after a
//! restart (or after a failed batch), so a crash at any instant neither
//! loses nor repeats a row.
//!
//! **The key changes.** `K` is stored as its columns' texts in key order,
//! with the key named by its index's OID and its columns' attnums (a
//! position stored before names the columns). A key column renamed is the
//! same column of the same index: the chunks and the stream's filter go on
//! from `K`, comparing by attnum. A key replaced (other columns, or another
//! index: `K` says nothing in its order) is found by the next chunk's read
//! (its shape is read after the table's lock, so after the DDL), by the
//! stream's filter at the first change of the new key's shape, or at a
//! start: the table's snapshot then starts again from its first key (a
//! WARN says why), and every change of the table is left out until its
//! first chunk, which begins with a TRUNCATE event (unless the snapshot is
//! one on demand, whose table the archive holds whole and whose stream is
//! not filtered). The argument above holds from that chunk as from the
//! first chunk of a table that entered the set again: the TRUNCATE takes
//! away what the archive held of the table, the chunk adds its rows up to
//! its last key as they are at its place. Before it, the archive holds
//! events of the table that each apply to the row it had (the changes left
//! out since the restart are later than any event sent), so a replay never
//! meets an update of a row it lacks. The DDL that replaced the key
//! conflicts with the chunks' lock, so no chunk straddles it; a change of
//! the old key's shape is a transaction that ended before it, so every such
//! change comes before the new first chunk. Other tables are not touched.
//!
//! Progress: an INFO line per table begun and done (and every few seconds
//! while one runs), `tidemark_source_incremental_snapshot_rows_total{table}`
//! and `tidemark_source_incremental_snapshot_tables_left`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use futures::TryStreamExt as _;
use serde_json::Value;
use sqlx::PgPool;
use tidemark_common::codec::{parse_record, CodecError, TypeCache};
use tidemark_common::envelope::{
    now_us, Change, ChunkPlace, Op, Sequence, SnapshotMark, TxPlace, UnitEnd,
};
use tidemark_common::offset::IncrementalProgress;
use tidemark_common::ops::names;

use crate::producer::Record;
use crate::shape::{key_identity, stored_key_texts, CatalogShape, Encoded, KeyColumn, Shape};
use crate::snapshot::{key_display, rows_query_of};
use crate::table::CapturedTable;

/// A chunk read in its snapshot, waiting for the stream to reach it.
pub struct Chunk {
    /// The table (`format('%I.%I')`).
    pub table: String,
    /// The snapshot it was read in (`pg_snapshot` text): the stream
    /// position it belongs at.
    pub snapshot: String,
    /// When that snapshot was taken, µs since the epoch.
    pub at_us: i64,
    /// `logical` mode: the WAL insert position read just after the
    /// snapshot was taken (see [`crate::modes::logical`]'s `added`).
    pub wal_lsn: Option<u64>,
    shape: Arc<Shape>,
    /// Each row's `record_out` text, in key order.
    rows: Vec<String>,
    /// The table has rows after these.
    more: bool,
}

/// What the mode keeps of its incremental snapshots between steps.
pub struct Incremental {
    /// The chunk read for the batch being sent.
    pub pending: Option<Chunk>,
    /// After a table's snapshot failed: no chunk is read before this.
    pub retry_at: Option<Instant>,
    /// The key index's columns of the table last read (`format('%I.%I')`):
    /// the stream's key filter compares keys with its operators and
    /// collations, as the chunks are ordered.
    pub key: Option<(String, Vec<KeyColumn>)>,
    last_log: Instant,
}

impl Default for Incremental {
    fn default() -> Self {
        Self {
            pending: None,
            retry_at: None,
            key: None,
            last_log: Instant::now(),
        }
    }
}

impl Chunk {
    /// The key index's columns the chunk was read in the order of.
    pub fn key(&self) -> &[KeyColumn] {
        &self.shape.key
    }
}

/// What a chunk read found.
pub enum Read {
    /// The chunk.
    Chunk(Chunk),
    /// The table is gone.
    Gone,
    /// The table's primary key is not the one the snapshot's progress was
    /// read in (replaced: other columns, another index); why. Nothing was
    /// read: the snapshot is to start again (see [`restart`]).
    KeyChanged(String),
}

/// Where a table's snapshot goes on from, against its primary key now.
#[derive(Debug, PartialEq, Eq)]
pub enum Resume {
    /// From its first key.
    Start,
    /// After this key (its columns' texts, in the key's order).
    After(Vec<String>),
    /// The stored progress is of another key; why.
    KeyChanged(String),
}

/// Where `progress` goes on from when the table's key is `key`. The stored
/// key names its index and columns by OID and attnum, so a renamed key
/// column goes on; a key of other columns, or of another index (whose
/// order may differ), is [`Resume::KeyChanged`]. A position stored before
/// names its key columns: it goes on while the key has exactly those names.
pub fn resume_point(progress: &IncrementalProgress, key: &[KeyColumn]) -> Resume {
    let Some(stored) = &progress.last_key else {
        return Resume::Start;
    };
    let names = |k: &[KeyColumn]| {
        k.iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let now = key_identity(key);
    match &progress.key {
        Some(id) if *id != now => Resume::KeyChanged(format!(
            "its primary key is now ({}), columns {:?} of index {}, while its chunks so far were read in the order of columns {:?} of index {}",
            names(key),
            now.attnums,
            now.index,
            id.attnums,
            id.index
        )),
        Some(_) => match stored_key_texts(stored, key) {
            Some(t) if t.len() == key.len() && stored.is_array() => Resume::After(t),
            _ => Resume::KeyChanged(format!(
                "its stored last key {stored} does not fit its primary key ({})",
                names(key)
            )),
        },
        None => {
            let same_names = stored
                .as_object()
                .is_some_and(|o| o.len() == key.len() && key.iter().all(|k| o.contains_key(&k.name)));
            match stored_key_texts(stored, key) {
                Some(t) if same_names || stored.is_array() => Resume::After(t),
                _ => Resume::KeyChanged(format!(
                    "its stored last key {stored} (kept by column name by an older pg-source) names other columns than its primary key ({}): a key column renamed, or the key replaced",
                    names(key)
                )),
            }
        }
    }
}

/// Starts a table's snapshot again from its first key, because its primary
/// key changed (`why`) while it ran: the rows sent were read in the old
/// key's order, which says nothing of the new one's. The first chunk then
/// begins with a TRUNCATE event (the stream left out the table's changes
/// above the old key, so what the archive holds of it would go stale),
/// unless the snapshot is one on demand, whose table the archive holds
/// whole. Said in a WARN line.
pub fn restart(progress: &mut IncrementalProgress, why: &str) {
    tracing::warn!(table = %progress.table, reason = %why, rows_sent = progress.rows,
        "the primary key of the table changed while its incremental snapshot ran: the snapshot starts again from the first key of the new one (with a TRUNCATE event, unless it is a snapshot on demand); the other tables go on");
    progress.last_key = None;
    progress.key = None;
    progress.rows = 0;
    if progress.reason != SIGNAL_REASON {
        progress.reason = RESTARTED_REASON.to_owned();
    }
}

/// [`IncrementalProgress::reason`] of a snapshot started again after its
/// table's primary key changed (see [`restart`]).
pub const RESTARTED_REASON: &str = "key-changed";

/// Reads the next chunk of `table` after `progress`'s key, up to `chunk`
/// rows, in a new `repeatable read` snapshot.
///
/// Fails on a database error, or when the table has no primary key.
pub async fn read_chunk(
    pool: &PgPool,
    types: &TypeCache,
    table: &CapturedTable,
    progress: &IncrementalProgress,
    chunk: i64,
) -> anyhow::Result<Read> {
    read_chunk_at(pool, types, table, progress, chunk, false).await
}

/// [`read_chunk`], and (`wal`) the WAL insert position read in the same
/// statement that takes the snapshot, after it: every transaction the
/// snapshot sees wrote its commit record before that position.
///
/// Fails like [`read_chunk`].
pub async fn read_chunk_at(
    pool: &PgPool,
    types: &TypeCache,
    table: &CapturedTable,
    progress: &IncrementalProgress,
    chunk: i64,
    wal: bool,
) -> anyhow::Result<Read> {
    // The table's lock comes first, before any statement that takes the
    // transaction's snapshot (a LOCK takes none): a DDL in progress (a
    // rewrite, ADD COLUMN, TRUNCATE, RENAME) commits before the snapshot is
    // taken, so the rows and the shape read are the table's after it. A
    // rewrite read in a snapshot older than it would show the table empty.
    // The table is locked by its current name, found from its OID (it may
    // have been renamed); a rename between the lookup and the lock is seen
    // after it, and the chunk tried again.
    let mut tries = 0;
    let (mut tx, name, snapshot, at_us, wal_lsn) = loop {
        tries += 1;
        let name: Option<String> = sqlx::query_scalar(
            "select pg_catalog.format('%I.%I', n.nspname, c.relname) from pg_catalog.pg_class c
             join pg_catalog.pg_namespace n on n.oid operator(pg_catalog.=) c.relnamespace
             where c.oid operator(pg_catalog.=) $1::pg_catalog.oid",
        )
        .bind(i64::from(table.oid))
        .fetch_optional(pool)
        .await?;
        let Some(name) = name else {
            return Ok(Read::Gone);
        };
        let mut tx = pool.begin().await?;
        sqlx::query("set transaction isolation level repeatable read, read only")
            .execute(&mut *tx)
            .await?;
        let lock = format!("lock table {name} in access share mode");
        let locked = sqlx::query(&lock).execute(&mut *tx).await;
        match locked {
            Ok(_) => {}
            // Renamed or dropped since its name was read.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") && tries < 5 => {
                continue
            }
            Err(e) => {
                return Err(anyhow::Error::from(e).context(format!(
                    "cannot lock table {name} to read its incremental snapshot"
                )))
            }
        }
        // The snapshot is taken before the statement runs (at its parse),
        // so the WAL position is read after it.
        let (snapshot, at_us, now, wal_lsn): (String, i64, Option<String>, Option<String>) =
            sqlx::query_as(
                "select pg_catalog.pg_current_snapshot()::pg_catalog.text,
                    (extract(epoch from pg_catalog.clock_timestamp()) operator(pg_catalog.*) 1000000)::pg_catalog.int8,
                    (select pg_catalog.format('%I.%I', n.nspname, c.relname) from pg_catalog.pg_class c
                       join pg_catalog.pg_namespace n on n.oid operator(pg_catalog.=) c.relnamespace
                      where c.oid operator(pg_catalog.=) $1::pg_catalog.oid),
                    case when $2 then pg_catalog.pg_current_wal_insert_lsn()::pg_catalog.text end",
            )
            .bind(i64::from(table.oid))
            .bind(wal)
            .fetch_one(&mut *tx)
            .await?;
        let wal_lsn = wal_lsn
            .map(|l| crate::modes::logical::parse_lsn(&l))
            .transpose()?;
        match now {
            Some(now) if now == name => break (tx, name, snapshot, at_us, wal_lsn),
            // Dropped after the lock's name was resolved.
            None => return Ok(Read::Gone),
            Some(now) if tries >= 5 => bail!(
                "table {} (now {now}) keeps being renamed while its incremental snapshot reads a chunk",
                table.info.name
            ),
            Some(_) => continue,
        }
    };
    let Some(shape) = CatalogShape::load(&mut tx, types, table.oid).await? else {
        return Ok(Read::Gone);
    };
    if shape.key.is_empty() {
        bail!(
            "table {} has no primary key, so its rows cannot be keyed: add one",
            table.info.name
        );
    }
    shape.literal_safe_key(&table.info.name)?;
    let shape = Arc::new(Shape::new(
        table.origin.clone(),
        shape.oid,
        shape.columns,
        shape.key,
    )?);
    let after = match resume_point(progress, &shape.key) {
        Resume::Start => None,
        Resume::After(texts) => Some(texts),
        Resume::KeyChanged(why) => return Ok(Read::KeyChanged(why)),
    };
    let sql = rows_query_of(&name, &shape, after.as_deref());
    let mut rows: Vec<String> = sqlx::query_scalar(&sql)
        .bind(chunk + 1)
        .fetch(&mut *tx)
        .try_collect()
        .await?;
    tx.commit().await?;
    let more = rows.len() as i64 > chunk;
    rows.truncate(chunk as usize);
    Ok(Read::Chunk(Chunk {
        table: progress.table.clone(),
        snapshot,
        at_us,
        wal_lsn,
        shape,
        rows,
        more,
    }))
}

/// A chunk rendered as one unit.
pub struct Rendered {
    /// Its records: `op: r` events, and dead letters for rows that cannot
    /// be carried.
    pub records: Vec<Record>,
    /// Rows read.
    pub rows: usize,
}

impl Incremental {
    /// The key index's columns of `table` (`format('%I.%I')`), when read.
    pub fn key_of(&self, table: &str) -> Option<&[KeyColumn]> {
        self.key
            .as_ref()
            .filter(|(t, _)| t == table)
            .map(|(_, k)| k.as_slice())
    }

    /// Renders `chunk` as the unit `commit_order` (after `prev`) and moves
    /// `progress` past it. A row whose value the codec refuses goes to the
    /// dead-letter topic (counted in the unit, so a replay sees the gap);
    /// the other rows and tables go on.
    pub fn render(
        &mut self,
        connector: &str,
        table: &CapturedTable,
        chunk: Chunk,
        progress: &mut IncrementalProgress,
        order: (u64, Option<u64>),
    ) -> Rendered {
        self.render_with(connector, table, chunk, Vec::new(), progress, order)
    }

    /// [`Self::render`], with the chunk's rows corrected by `repairs` (in
    /// the order they happened): a key a repair names is rendered as the
    /// repair's row, or not at all when its row is gone; a repair's row
    /// whose key the chunk lacks is added. The progress moves to the last
    /// key the chunk read either way.
    pub fn render_with(
        &mut self,
        connector: &str,
        table: &CapturedTable,
        chunk: Chunk,
        repairs: Vec<Repair>,
        progress: &mut IncrementalProgress,
        (commit_order, prev_commit_order): (u64, Option<u64>),
    ) -> Rendered {
        let collection = format!("{}.{}", table.info.name.schema, table.info.name.name);
        let shape = &chunk.shape;
        let read_us = now_us();
        let reset = opens_with_truncate(progress, &chunk);
        let first = u64::from(reset);
        // Every event says where its chunk stands in the snapshot, so a
        // replay can tell where the snapshot begins and where it is whole.
        let mark = SnapshotMark::IncrementalChunk(ChunkPlace::of(
            progress.rows == 0 && progress.last_key.is_none(),
            !chunk.more,
        ));
        // Each key's net repair: its row, or gone. Later repairs win.
        type KeyState = (Vec<Option<String>>, Option<(Arc<Shape>, Encoded, Encoded)>);
        let mut net: Vec<KeyState> = Vec::new();
        for r in repairs {
            let (key, row) = match r {
                Repair::Gone(key) => (key, None),
                Repair::Row {
                    key,
                    shape,
                    after,
                    key_record,
                } => (key, Some((shape, after, key_record))),
            };
            match net.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 = row,
                None => net.push((key, row)),
            }
        }
        let mut used = vec![false; net.len()];
        // What is rendered, in order: chunk rows (or their repairs), then
        // the repairs of keys the chunk lacks.
        type Item<'a> = (
            &'a Shape,
            Result<(Encoded, Encoded), (Option<String>, Vec<Option<String>>, String)>,
            Option<usize>,
        );
        let mut items: Vec<Item<'_>> = Vec::with_capacity(chunk.rows.len());
        let mut last_key_texts = None;
        for (i, row) in chunk.rows.iter().enumerate() {
            let fields = match parse_record(row) {
                Ok(f) => f,
                Err(e) => {
                    items.push((shape, Err((None, Vec::new(), e.to_string())), Some(i)));
                    continue;
                }
            };
            let fields: Vec<Option<&[u8]>> = fields
                .iter()
                .map(|f| f.as_deref().map(str::as_bytes))
                .collect();
            let key_texts = shape.key_texts(&fields);
            if i + 1 == chunk.rows.len() {
                last_key_texts = Some(key_texts.clone());
            }
            if let Some(j) = net.iter().position(|(k, _)| *k == key_texts) {
                used[j] = true;
                if let Some((s, after, key)) = &net[j].1 {
                    items.push((s, Ok((after.clone(), key.clone())), None));
                }
                continue;
            }
            let e = shape
                .encode_row(&fields)
                .and_then(|after| Ok((after, shape.encode_key(&fields)?)));
            items.push(match e {
                Ok(ok) => (shape, Ok(ok), Some(i)),
                Err(e) => {
                    let column = match &e {
                        CodecError::Value { column, .. } => Some(column.clone()),
                        _ => None,
                    };
                    (shape, Err((column, key_texts, e.to_string())), Some(i))
                }
            });
        }
        for (j, (_, row)) in net.iter().enumerate() {
            if let (false, Some((s, after, key))) = (used[j], row) {
                items.push((s, Ok((after.clone(), key.clone())), None));
            }
        }
        let n = items.len() as u64 + first;
        let last_event = items.iter().rposition(|(_, r, _)| r.is_ok());
        let mut records = Vec::with_capacity(items.len() + 1);
        if reset {
            let end = last_event.is_none().then(|| UnitEnd {
                event_count: n,
                data_collections: vec![(collection.clone(), n)],
            });
            if progress.reason == "re-entered" {
                tracing::info!(table = %table.info.name, "the table entered the set again: its snapshot begins with a TRUNCATE event, as what the archive holds of it is stale");
            } else if progress.reason == RESTARTED_REASON {
                tracing::info!(table = %table.info.name, "the table's snapshot starts again after its primary key changed: it begins with a TRUNCATE event, as what the archive holds of it is stale");
            }
            records.push(Record {
                topic: table.topic.clone(),
                // Debezium's convention for a TRUNCATE: a null key.
                key: Vec::new(),
                value: Some(shape.envelope(None, None).render(&Change {
                    op: Op::Truncate,
                    before: None,
                    after: None,
                    commit_us: chunk.at_us,
                    txid: None,
                    sequence: Sequence::None,
                    snapshot: mark,
                    read_us,
                    transaction: TxPlace {
                        commit_order,
                        prev_commit_order,
                        total_order: 1,
                        data_collection_order: 1,
                        end: end.as_ref(),
                    },
                })),
            });
        }
        for (i, (s, e, raw)) in items.into_iter().enumerate() {
            let order = i as u64 + 1 + first;
            match e {
                Ok((after, key)) => {
                    let end = (Some(i) == last_event).then(|| UnitEnd {
                        event_count: n,
                        data_collections: vec![(collection.clone(), n)],
                    });
                    let envelope = s.envelope(None, Some(&after.variants));
                    records.push(Record {
                        topic: table.topic.clone(),
                        key: s.key_record(&key),
                        value: Some(envelope.render(&Change {
                            op: Op::Read,
                            before: None,
                            after: Some(&after.json),
                            commit_us: chunk.at_us,
                            txid: None,
                            sequence: Sequence::None,
                            snapshot: mark,
                            read_us,
                            transaction: TxPlace {
                                commit_order,
                                prev_commit_order,
                                total_order: order,
                                data_collection_order: order,
                                end: end.as_ref(),
                            },
                        })),
                    });
                }
                Err((column, key_texts, error)) => {
                    let key = key_display(s, &key_texts);
                    records.push(
                        crate::dead_letter::DeadLetter {
                            connector,
                            table: &chunk.table,
                            column: column.as_deref(),
                            key: Some(&key),
                            error: &error,
                            raw: raw.map(|i| chunk.rows[i].as_str()),
                            op: "r",
                            position: serde_json::json!({
                                "incremental_snapshot": chunk.snapshot,
                                "commit_order": commit_order,
                                "total_order": order,
                            }),
                        }
                        .record(),
                    );
                    if raw == Some(chunk.rows.len().wrapping_sub(1)) && last_key_texts.is_none() {
                        last_key_texts = Some(key_texts);
                    }
                }
            }
        }
        if let Some(key_texts) = last_key_texts {
            // The key columns' texts in key order, with the key named by
            // its index and attnums: a key column renamed since still
            // reads it.
            progress.last_key = Some(Value::Array(
                key_texts
                    .into_iter()
                    .map(|t| t.map_or(Value::Null, Value::String))
                    .collect(),
            ));
            progress.key = Some(key_identity(&shape.key));
        }
        let rows = n - first;
        progress.rows += rows;
        metrics::counter!(names::SOURCE_INCREMENTAL_ROWS, "table" => chunk.table.clone())
            .increment(rows);
        if !chunk.more {
            tracing::info!(table = %table.info.name, rows = progress.rows, "incremental snapshot of table done; its changes stream from here");
        } else if self.last_log.elapsed() >= Duration::from_secs(2) {
            self.last_log = Instant::now();
            tracing::info!(table = %table.info.name, rows_done = progress.rows, "incremental snapshot progress");
        }
        Rendered {
            records,
            rows: rows as usize,
        }
    }
}

/// A correction of a chunk's rows (see [`Incremental::render_with`]).
pub enum Repair {
    /// The key (its columns' texts) has no row where the chunk is placed.
    Gone(Vec<Option<String>>),
    /// The key's row where the chunk is placed, as the stream encoded it.
    Row {
        key: Vec<Option<String>>,
        shape: Arc<Shape>,
        after: Encoded,
        key_record: Encoded,
    },
}

/// Whether the chunk's unit begins with a TRUNCATE event of its table: the
/// first chunk of a table that entered the set again (what the archive
/// holds of it is stale: its changes while it was out are not there), and
/// the only chunk of an empty table's snapshot on demand (the table is
/// empty at the chunk's place in the stream, so the event changes nothing
/// in a replay from the beginning, and gives a replay that starts the table
/// from this snapshot its point to start).
pub fn opens_with_truncate(progress: &IncrementalProgress, chunk: &Chunk) -> bool {
    let first = progress.rows == 0 && progress.last_key.is_none();
    first
        && (progress.reason == "re-entered"
            || progress.reason == RESTARTED_REASON
            || (progress.reason == SIGNAL_REASON && chunk.rows.is_empty() && !chunk.more))
}

/// [`IncrementalProgress::reason`] of a snapshot on demand (a signal).
pub const SIGNAL_REASON: &str = "signal";

/// Whether the chunk ends its table's snapshot.
pub fn last_of_table(chunk: &Chunk) -> bool {
    !chunk.more
}

impl Chunk {
    /// Whether the chunk holds no row (the table was read to its end).
    pub fn rows_is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Whether the table has rows after the chunk's.
    pub fn more_after(&self) -> bool {
        self.more
    }

    /// The key column texts of the chunk's last row; `None` without rows
    /// (or when its text cannot be read).
    pub fn last_key(&self) -> Option<Vec<Option<String>>> {
        let fields = parse_record(self.rows.last()?).ok()?;
        let fields: Vec<Option<&[u8]>> = fields
            .iter()
            .map(|f| f.as_deref().map(str::as_bytes))
            .collect();
        Some(self.shape.key_texts(&fields))
    }
}
