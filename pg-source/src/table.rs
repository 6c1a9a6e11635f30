//! A table captured as change events (`changelog` and `logical` modes):
//! its topic, key and envelope, and how one rendered change becomes
//! records.

use anyhow::bail;
use sqlx::PgPool;
use tidemark_common::envelope::{
    either_payload_sql, out_of_range_sql, payload_and_wide_sql, payload_sql, wide_columns, Change,
    ChangeEnvelope, Op, RecordTemplates, Sequence, SnapshotMark, TxPlace, UnitEnd,
};
use tidemark_common::offset::count_event;
use tidemark_common::pg::quote_ident;

use crate::catalog::TableInfo;
use crate::producer::Record;

/// One table captured as change events.
#[derive(Debug)]
pub struct CapturedTable {
    /// The table.
    pub info: TableInfo,
    /// Its topic.
    pub topic: String,
    /// Its name as positions and the change log write it
    /// (`format('%I.%I')`).
    pub log_name: String,
    pub(crate) key_template: RecordTemplates,
    envelope: ChangeEnvelope,
    /// The envelope of wide changes, whose `timestamp` columns are ISO text
    /// because a value in `before` or `after` does not fit int64
    /// microseconds; `None` when the table has no `timestamp` column.
    wide_envelope: Option<ChangeEnvelope>,
}

impl AsRef<CapturedTable> for CapturedTable {
    fn as_ref(&self) -> &CapturedTable {
        self
    }
}

/// A change as rendered by Postgres: row images and keys as payload JSON.
#[derive(sqlx::FromRow)]
pub(crate) struct RenderedChange {
    pub seq: i64,
    pub txid: String,
    pub op: String,
    pub before: Option<String>,
    pub after: Option<String>,
    pub key_before: Option<String>,
    pub key_after: Option<String>,
    pub wide: bool,
    pub key_before_wide: bool,
    pub key_after_wide: bool,
}

/// The SQL that renders a change's row images `b` and `a` (rows of the
/// table's type built from `jsonb` images `l.before`, `l.after`).
pub(crate) struct ImageSql {
    /// The select list of a [`RenderedChange`] but for seq, txid, op and
    /// changed_ms.
    pub images: String,
    /// The lateral joins that build `b` and `a`.
    pub joins: String,
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
    ) -> anyhow::Result<Self> {
        let name = info.name.clone();
        if info.key.is_empty() {
            bail!("table {name} has no primary key, so its changes cannot be keyed: add one, or use mode timestamp+incrementing");
        }
        let log_name: String = sqlx::query_scalar("select format('%I.%I', $1::text, $2::text)")
            .bind(&name.schema)
            .bind(&name.name)
            .fetch_one(pool)
            .await?;
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
    pub(crate) fn envelope_for(&self, wide: bool) -> &ChangeEnvelope {
        match (&self.wide_envelope, wide) {
            (Some(e), true) => e,
            _ => &self.envelope,
        }
    }

    /// A key given as `to_jsonb` of the key columns (in `param`), as typed
    /// values: each field cast from its text to the column's type, so a
    /// comparison uses the primary key's index.
    pub(crate) fn typed_key(&self, param: &str) -> String {
        typed_key(&self.info, param)
    }

    /// The SQL that renders row images of this table.
    pub(crate) fn image_sql(&self) -> ImageSql {
        let info = &self.info;
        let t = info.name.quoted();
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
        ImageSql { images, joins }
    }

    /// A condition that the change (row images `b`, `a`) of transaction
    /// `txid` is not already in the rows of a snapshot segment (a `jsonb`
    /// array in `param`).
    pub(crate) fn outside_segments_sql(&self, txid: &str, param: &str) -> String {
        // The key of a changed row.
        let changed_key = self
            .info
            .key
            .iter()
            .map(|c| {
                let q = quote_ident(&c.name);
                format!("coalesce(a.{q}, b.{q})")
            })
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            r#"not exists (
                   select 1 from jsonb_array_elements({param}::jsonb) as "tidemark.seg"(seg)
                   where pg_visible_in_snapshot({txid}, ("tidemark.seg".seg->>'snapshot')::pg_snapshot)
                     and (jsonb_typeof("tidemark.seg".seg->'lo') is distinct from 'object' or ({changed_key}) > ({lo}))
                     and (jsonb_typeof("tidemark.seg".seg->'hi') is distinct from 'object' or ({changed_key}) <= ({hi})))"#,
            lo = self.typed_key("(\"tidemark.seg\".seg->'lo')"),
            hi = self.typed_key("(\"tidemark.seg\".seg->'hi')"),
        )
    }

    /// Turns a rendered change into its records: an event, or for a
    /// primary-key change a delete (and tombstone) of the old key and a
    /// create of the new one; a tombstone after each delete when
    /// `tombstones`. Each event is counted in `unit`; when the change is
    /// the unit's `last`, its last event carries the unit's totals.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn render_change(
        &self,
        r: &RenderedChange,
        sequence: Sequence,
        unit: &mut Unit<'_>,
        last: bool,
        read_us: i64,
        tombstones: bool,
        out: &mut Vec<Record>,
    ) {
        let txid = r.txid.parse::<u64>().ok();
        let envelope = self.envelope_for(r.wide);
        let collection = envelope.data_collection();
        let mut change = |op, before: Option<&str>, after: Option<&str>, last: bool| {
            let (data_collection_order, total_order) = count_event(unit.counts, collection);
            let end = last.then(|| UnitEnd {
                event_count: total_order,
                data_collections: unit.counts.clone(),
            });
            envelope.render(&Change {
                op,
                before,
                after,
                commit_us: unit.commit_us,
                txid,
                sequence,
                snapshot: SnapshotMark::No,
                read_us,
                transaction: TxPlace {
                    commit_order: unit.commit_order,
                    total_order,
                    data_collection_order,
                    end: end.as_ref(),
                },
            })
        };
        let record = |key: &str, key_wide: bool, value: Vec<u8>| Record {
            topic: self.topic.clone(),
            key: self.key_template.render(key, key_wide),
            value: Some(value),
        };
        let tombstone = |key: &str, key_wide: bool| Record {
            topic: self.topic.clone(),
            key: self.key_template.render(key, key_wide),
            value: None,
        };
        let (kbw, kaw) = (r.key_before_wide, r.key_after_wide);
        let (before, after) = (r.before.as_deref(), r.after.as_deref());
        match (
            r.op.as_str(),
            r.key_before.as_deref(),
            r.key_after.as_deref(),
        ) {
            ("c", _, Some(k)) => out.push(record(k, kaw, change(Op::Create, None, after, last))),
            ("u", Some(kb), Some(ka)) if kb != ka => {
                // The primary key changed: the old key is deleted, the new
                // one created, as Debezium does.
                out.push(record(kb, kbw, change(Op::Delete, before, None, false)));
                if tombstones {
                    out.push(tombstone(kb, kbw));
                }
                out.push(record(ka, kaw, change(Op::Create, None, after, last)));
            }
            ("u", _, Some(k)) => out.push(record(k, kaw, change(Op::Update, before, after, last))),
            ("d", Some(k), _) => {
                out.push(record(k, kbw, change(Op::Delete, before, None, last)));
                if tombstones {
                    out.push(tombstone(k, kbw));
                }
            }
            (op, _, _) => {
                tracing::warn!(seq = r.seq, op, table = %self.info.name, "skipping a change row that is not c, u or d")
            }
        }
    }
}

/// The unit (a source transaction, a change-log batch) that changes are
/// rendered in: its place in commit order, its commit time, and its events
/// counted so far per table.
pub(crate) struct Unit<'a> {
    pub commit_order: u64,
    pub commit_us: i64,
    pub counts: &'a mut Vec<(String, u64)>,
}

fn typed_key(info: &TableInfo, param: &str) -> String {
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
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
