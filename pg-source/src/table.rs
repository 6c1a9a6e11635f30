//! A table captured as change events (`changelog` and `logical` modes):
//! its topic, key and envelope, and how one rendered change becomes
//! records.

use std::sync::Arc;

use anyhow::bail;
use sqlx::PgPool;
use tidemark_common::codec::Oid;
use tidemark_common::envelope::{Change, Op, Sequence, SnapshotMark, TxPlace, UnitEnd};
use tidemark_common::offset::count_event;

use crate::catalog::TableInfo;
use crate::producer::Record;
use crate::shape::{Encoded, Origin, Shape};

/// One table captured as change events.
#[derive(Debug)]
pub struct CapturedTable {
    /// The table.
    pub info: TableInfo,
    /// Its OID when pg-source started.
    pub oid: Oid,
    /// Names and settings its events are rendered with.
    pub origin: Arc<Origin>,
    /// Its topic.
    pub topic: String,
    /// Its name as positions and the change log write it
    /// (`format('%I.%I')`).
    pub log_name: String,
}

impl AsRef<CapturedTable> for CapturedTable {
    fn as_ref(&self) -> &CapturedTable {
        self
    }
}

impl CapturedTable {
    /// Prepares a table's records.
    ///
    /// Fails when the table has no primary key.
    pub async fn new(
        pool: &PgPool,
        info: TableInfo,
        topic: String,
        connector: &str,
        database: &str,
        (key_schemas, value_schemas): (bool, bool),
    ) -> anyhow::Result<Self> {
        let name = info.name.clone();
        if info.key.is_empty() {
            bail!("table {name} has no primary key, so its changes cannot be keyed: add one, or use mode timestamp+incrementing");
        }
        let log_name: String = sqlx::query_scalar(
            "select pg_catalog.format('%I.%I', $1::pg_catalog.text, $2::pg_catalog.text)",
        )
        .bind(&name.schema)
        .bind(&name.name)
        .fetch_one(pool)
        .await?;
        let origin = Arc::new(Origin {
            connector: connector.to_owned(),
            database: database.to_owned(),
            table: name,
            key_schemas,
            value_schemas,
        });
        Ok(Self {
            oid: info.oid,
            origin,
            info,
            topic,
            log_name,
        })
    }
}

/// A change whose row images the codec encoded (or could not).
pub(crate) enum EncodedChange {
    /// Encoded, with the shape it was written with.
    Ok {
        shape: Arc<Shape>,
        op: Op,
        before: Option<Encoded>,
        after: Option<Encoded>,
        key_before: Option<Encoded>,
        key_after: Option<Encoded>,
    },
    /// A value the codec cannot carry exactly: it goes to the dead-letter
    /// topic, and still counts in its unit.
    Dead(DeadLetter),
    /// The table was truncated: an event of op `t` with neither image and
    /// a null Kafka key, in the table's shape at the time.
    Truncate { shape: Arc<Shape> },
}

/// What the dead-letter topic says of a change.
#[derive(Debug, Clone)]
pub(crate) struct DeadLetter {
    pub op: Op,
    pub column: Option<String>,
    pub key: String,
    pub error: String,
    pub raw: Option<String>,
}

impl CapturedTable {
    /// Turns an encoded change into its records, as
    /// [`CapturedTable::render_change`] does for rendered ones; a dead
    /// letter becomes a record of the dead-letter topic, counted in `unit`
    /// like the event it stands for.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn render_encoded(
        &self,
        c: &EncodedChange,
        txid: Option<u64>,
        sequence: Sequence,
        unit: &mut Unit<'_>,
        last: bool,
        read_us: i64,
        tombstones: bool,
        out: &mut Vec<Record>,
    ) {
        let collection = format!("{}.{}", self.info.name.schema, self.info.name.name);
        let (shape, op, before, after, key_before, key_after) = match c {
            EncodedChange::Truncate { shape } => {
                let (data_collection_order, total_order) = count_event(unit.counts, &collection);
                let end = last.then(|| UnitEnd {
                    event_count: total_order,
                    data_collections: unit.counts.clone(),
                });
                let value = shape.envelope(None, None).render(&Change {
                    op: Op::Truncate,
                    before: None,
                    after: None,
                    commit_us: unit.commit_us,
                    txid,
                    sequence,
                    snapshot: SnapshotMark::No,
                    read_us,
                    transaction: TxPlace {
                        commit_order: unit.commit_order,
                        prev_commit_order: unit.prev_commit_order,
                        total_order,
                        data_collection_order,
                        end: end.as_ref(),
                    },
                });
                // Debezium's convention: a null key (the producer sends an
                // empty one as null).
                out.push(Record {
                    topic: self.topic.clone(),
                    key: Vec::new(),
                    value: Some(value),
                });
                return;
            }
            EncodedChange::Dead(d) => {
                let (_, total_order) = count_event(unit.counts, &collection);
                out.push(self.dead_letter_record(
                    d,
                    txid,
                    sequence,
                    unit.commit_order,
                    total_order,
                ));
                return;
            }
            EncodedChange::Ok {
                shape,
                op,
                before,
                after,
                key_before,
                key_after,
            } => (shape, *op, before, after, key_before, key_after),
        };
        let mut event = |op, before: Option<&Encoded>, after: Option<&Encoded>, last: bool| {
            let (data_collection_order, total_order) = count_event(unit.counts, &collection);
            let end = last.then(|| UnitEnd {
                event_count: total_order,
                data_collections: unit.counts.clone(),
            });
            let envelope = shape.envelope(before.map(|e| &e.variants), after.map(|e| &e.variants));
            envelope.render(&Change {
                op,
                before: before.map(|e| e.json.as_str()),
                after: after.map(|e| e.json.as_str()),
                commit_us: unit.commit_us,
                txid,
                sequence,
                snapshot: SnapshotMark::No,
                read_us,
                transaction: TxPlace {
                    commit_order: unit.commit_order,
                    prev_commit_order: unit.prev_commit_order,
                    total_order,
                    data_collection_order,
                    end: end.as_ref(),
                },
            })
        };
        let record = |key: &Encoded, value: Option<Vec<u8>>| Record {
            topic: self.topic.clone(),
            key: shape.key_record(key),
            value,
        };
        match (op, key_before, key_after) {
            (Op::Create, _, Some(k)) => out.push(record(
                k,
                Some(event(Op::Create, None, after.as_ref(), last)),
            )),
            (Op::Update, Some(kb), Some(ka)) if kb.json != ka.json => {
                // The primary key changed: the old key is deleted, the new
                // one created, as Debezium does.
                out.push(record(
                    kb,
                    Some(event(Op::Delete, before.as_ref(), None, false)),
                ));
                if tombstones {
                    out.push(record(kb, None));
                }
                out.push(record(
                    ka,
                    Some(event(Op::Create, None, after.as_ref(), last)),
                ));
            }
            (Op::Update, _, Some(k)) => out.push(record(
                k,
                Some(event(Op::Update, before.as_ref(), after.as_ref(), last)),
            )),
            (Op::Delete, Some(k), _) => {
                out.push(record(
                    k,
                    Some(event(Op::Delete, before.as_ref(), None, last)),
                ));
                if tombstones {
                    out.push(record(k, None));
                }
            }
            (op, _, _) => {
                tracing::warn!(op = op.code(), table = %self.info.name, "skipping a change without the key it needs")
            }
        }
    }

    /// The dead-letter record of a change.
    fn dead_letter_record(
        &self,
        d: &DeadLetter,
        txid: Option<u64>,
        sequence: Sequence,
        commit_order: u64,
        total_order: u64,
    ) -> Record {
        let (lsn, seq) = match sequence {
            Sequence::Logical { lsn, .. } => (Some(lsn), None),
            Sequence::ChangeLog(seq) => (None, Some(seq)),
            Sequence::None => (None, None),
        };
        crate::dead_letter::DeadLetter {
            connector: &self.origin.connector,
            table: &self.log_name,
            column: d.column.as_deref(),
            key: Some(&d.key),
            error: &d.error,
            raw: d.raw.as_deref(),
            op: d.op.code(),
            position: serde_json::json!({
                "txId": txid, "lsn": lsn, "seq": seq,
                "commit_order": commit_order, "total_order": total_order,
            }),
        }
        .record()
    }
}

/// The unit (a source transaction, a change-log batch) that changes are
/// rendered in: its place in commit order, its commit time, and its events
/// counted so far per table.
pub(crate) struct Unit<'a> {
    pub commit_order: u64,
    /// The unit sent before it (`transaction.prev_commit_order`).
    pub prev_commit_order: Option<u64>,
    pub commit_us: i64,
    pub counts: &'a mut Vec<(String, u64)>,
}
