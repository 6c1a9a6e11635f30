//! The record envelope: how a Postgres row becomes a Kafka record, and how a
//! record is read back.
//!
//! Records use Kafka Connect's JsonConverter format with schemas enabled,
//! `{"schema": {...}, "payload": {...}}`, so existing Connect sinks read them.
//! Unlike the JDBC connector's records they lose nothing:
//!
//! - `timestamp` is int64 microseconds (`io.debezium.time.MicroTimestamp`),
//!   `timestamptz` an ISO-8601 string in UTC (`io.debezium.time.ZonedTimestamp`);
//! - a row with a `timestamp` that int64 microseconds cannot hold (from
//!   [`MICROS_LIMIT`] to 294276 AD) is a *wide* record: its own schema carries
//!   its `timestamp` columns as ISO-8601 strings (`io.debezium.time.IsoTimestamp`),
//!   see [`wide_columns`];
//! - `numeric` is its exact decimal text, never base64 bytes;
//! - NULL stays JSON `null`.
//!
//! The conversion happens in SQL ([`Column::select_expr`]) and Postgres'
//! `row_to_json` writes the payload, so a row is never decoded and re-encoded
//! in Rust: the payload text goes from the server to Kafka as it is.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::pg::quote_ident;

/// A Kafka Connect schema type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectType {
    /// `int16`
    Int16,
    /// `int32`
    Int32,
    /// `int64`
    Int64,
    /// `float`
    Float32,
    /// `double`
    Float64,
    /// `boolean`
    Boolean,
    /// `string`
    String,
    /// `bytes` (base64 in JSON)
    Bytes,
    /// `array` of an element type
    Array(Box<ConnectType>),
}

impl ConnectType {
    fn name(&self) -> &'static str {
        match self {
            Self::Int16 => "int16",
            Self::Int32 => "int32",
            Self::Int64 => "int64",
            Self::Float32 => "float",
            Self::Float64 => "double",
            Self::Boolean => "boolean",
            Self::String => "string",
            Self::Bytes => "bytes",
            Self::Array(_) => "array",
        }
    }
}

/// How one Postgres type is carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// The Connect type.
    pub connect: ConnectType,
    /// The logical type name (`io.debezium.time.MicroTimestamp`, ...), if any.
    pub logical: Option<&'static str>,
    /// How to turn the column into that JSON value, with `{c}` for the column.
    pub sql: &'static str,
}

impl Mapping {
    const fn new(connect: ConnectType, logical: Option<&'static str>, sql: &'static str) -> Self {
        Self {
            connect,
            logical,
            sql,
        }
    }
}

/// The logical type of `timestamp` columns in ordinary records.
const MICRO_TIMESTAMP: &str = "io.debezium.time.MicroTimestamp";

/// The logical type of `timestamp` columns in wide records.
const ISO_TIMESTAMP: &str = "io.debezium.time.IsoTimestamp";

/// The first `timestamp` that `io.debezium.time.MicroTimestamp` cannot carry:
/// its microseconds since 1970 are `i64::MAX`, which already stands for
/// `infinity`, and every later value overflows `int8`. Postgres' own
/// `timestamp` goes on to 294276-12-31 23:59:59.999999.
pub const MICROS_LIMIT: &str = "294247-01-10 04:00:54.775807";

/// How wide records carry a `timestamp`: its exact ISO-8601 text without a
/// zone, with ` BC` after years before 1 AD as the `timestamptz` mapping
/// writes them, and `infinity`/`-infinity` as they are.
fn iso_timestamp() -> Mapping {
    Mapping::new(
        ConnectType::String,
        Some(ISO_TIMESTAMP),
        "case when not isfinite({c}) then {c}::text \
         when {c} < '0001-01-01 00:00:00'::timestamp then to_char({c}, 'YYYY-MM-DD\"T\"HH24:MI:SS.US BC') \
         else to_char({c}, 'YYYY-MM-DD\"T\"HH24:MI:SS.US') end",
    )
}

/// The mapping of a scalar Postgres type by `pg_type.typname` and `typtype`.
///
/// Deprecated: [`crate::codec`] maps types now; this goes when pg-source switches to it.
pub fn map_type(typname: &str, typtype: &str) -> Mapping {
    use ConnectType::*;
    const AS_IS: &str = "{c}";
    const AS_TEXT: &str = "{c}::text";
    // Days and time of day separately: extract(epoch) goes through float8
    // and drops the last microseconds of far-off timestamps.
    const MICROS: &str = "case when {c} is null then null when isfinite({c}) then ({c}::date - date '1970-01-01')::int8 * 86400000000 + (extract(epoch from {c}::time) * 1000000)::int8 when {c} > 'epoch' then 9223372036854775807 else -9223372036854775808 end";
    match (typname, typtype) {
        ("int2", _) => Mapping::new(Int16, None, AS_IS),
        ("int4", _) => Mapping::new(Int32, None, AS_IS),
        ("int8", _) | ("oid", _) => Mapping::new(Int64, None, AS_IS),
        ("float4", _) => Mapping::new(Float32, None, AS_IS),
        ("float8", _) => Mapping::new(Float64, None, AS_IS),
        ("bool", _) => Mapping::new(Boolean, None, AS_IS),
        ("text" | "varchar" | "bpchar" | "name" | "char", _) => Mapping::new(String, None, AS_IS),
        ("numeric", _) => Mapping::new(String, None, AS_TEXT),
        ("timestamp", _) => Mapping::new(Int64, Some(MICRO_TIMESTAMP), MICROS),
        ("timestamptz", _) => Mapping::new(
            String,
            Some("io.debezium.time.ZonedTimestamp"),
            "case when not isfinite({c}) then {c}::text \
             when {c} < '0001-01-01 00:00:00+00' then to_char({c} at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\" BC') \
             else to_char({c} at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') end",
        ),
        ("date", _) => Mapping::new(
            Int32,
            Some("io.debezium.time.Date"),
            "case when {c} is null then null when isfinite({c}) then {c} - date '1970-01-01' when {c} > 'epoch' then 2147483647 else -2147483648 end",
        ),
        ("time", _) => Mapping::new(
            Int64,
            Some("io.debezium.time.MicroTime"),
            "(extract(epoch from {c}) * 1000000)::bigint",
        ),
        ("timetz", _) => Mapping::new(String, Some("io.debezium.time.ZonedTime"), AS_TEXT),
        ("interval", _) => Mapping::new(String, Some("io.debezium.time.Interval"), AS_TEXT),
        ("uuid", _) => Mapping::new(String, Some("io.debezium.data.Uuid"), AS_TEXT),
        ("json" | "jsonb", _) => Mapping::new(String, Some("io.debezium.data.Json"), AS_TEXT),
        ("bytea", _) => Mapping::new(
            Bytes,
            None,
            "translate(encode({c}, 'base64'), E'\\n', '')",
        ),
        (_, "e") => Mapping::new(String, Some("io.debezium.data.Enum"), AS_TEXT),
        _ => Mapping::new(String, None, AS_TEXT),
    }
}

/// A column as the envelope sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// `pg_type.typname`, for messages.
    pub pg_type: String,
    /// Whether the column may be NULL.
    pub optional: bool,
    /// How it is carried.
    pub mapping: Mapping,
}

impl Column {
    /// A column from the catalog: `typname`, `typtype`, and for arrays the
    /// element's `typname` and `typtype`.
    pub fn from_catalog(
        name: &str,
        typname: &str,
        typtype: &str,
        element: Option<(&str, &str)>,
        not_null: bool,
    ) -> Self {
        let mapping = match element {
            Some((elem, elem_typtype)) => {
                let inner = map_type(elem, elem_typtype);
                // Arrays of plain numbers, booleans and text travel as JSON
                // arrays of those; any other element type as its text.
                let plain = inner.logical.is_none()
                    && !matches!(inner.connect, ConnectType::Bytes)
                    && inner.sql == "{c}";
                if plain {
                    Mapping::new(ConnectType::Array(Box::new(inner.connect)), None, "{c}")
                } else {
                    Mapping::new(
                        ConnectType::Array(Box::new(ConnectType::String)),
                        None,
                        "{c}::text[]",
                    )
                }
            }
            None => map_type(typname, typtype),
        };
        Self {
            name: name.to_owned(),
            pg_type: typname.to_owned(),
            optional: !not_null,
            mapping,
        }
    }

    /// The SQL expression that turns column `qualifier.name` into its JSON
    /// value, aliased to the column's name.
    pub fn select_expr(&self, qualifier: &str) -> String {
        let col = format!("{qualifier}.{}", quote_ident(&self.name));
        let expr = self.mapping.sql.replace("{c}", &col);
        format!("{expr} as {}", quote_ident(&self.name))
    }

    /// Whether the column is a `timestamp` carried as int64 microseconds,
    /// which some values do not fit (arrays of `timestamp` travel as text).
    fn is_micro_timestamp(&self) -> bool {
        self.mapping.logical == Some(MICRO_TIMESTAMP)
    }

    /// The Connect schema of the field.
    pub fn field_schema(&self) -> Value {
        let mut field = type_schema(&self.mapping.connect, self.optional);
        if let Some(logical) = self.mapping.logical {
            field["name"] = json!(logical);
            field["version"] = json!(1);
        }
        field["field"] = json!(self.name);
        field
    }
}

fn type_schema(t: &ConnectType, optional: bool) -> Value {
    match t {
        ConnectType::Array(inner) => json!({
            "type": "array",
            "items": type_schema(inner, true),
            "optional": optional,
        }),
        other => json!({"type": other.name(), "optional": optional}),
    }
}

/// The Connect struct schema of a row.
pub fn struct_schema(name: &str, columns: &[Column], optional: bool) -> Value {
    json!({
        "type": "struct",
        "fields": columns.iter().map(Column::field_schema).collect::<Vec<_>>(),
        "optional": optional,
        "name": name,
    })
}

/// SQL that yields a row's payload as JSON text: `row_to_json` over the
/// converted columns, in column order.
///
/// Deprecated: [`crate::codec::RowCodec`] encodes rows now; this goes when pg-source switches to it.
pub fn payload_sql(columns: &[Column], qualifier: &str) -> String {
    let exprs: Vec<String> = columns.iter().map(|c| c.select_expr(qualifier)).collect();
    format!(
        "(select row_to_json(\"tidemark.row\") from (select {}) \"tidemark.row\")::text",
        exprs.join(", ")
    )
}

/// SQL that is true when a `timestamp` column of the row `qualifier` holds
/// a finite value at or past [`MICROS_LIMIT`], so the row must be a wide
/// record; never NULL. `None` when `columns` has no `timestamp` column: such
/// a table's rows are never wide, and its queries pay nothing.
pub fn out_of_range_sql(columns: &[Column], qualifier: &str) -> Option<String> {
    let tests: Vec<String> = columns
        .iter()
        .filter(|c| c.is_micro_timestamp())
        .map(|c| {
            let col = format!("{qualifier}.{}", quote_ident(&c.name));
            format!("({col} >= '{MICROS_LIMIT}'::timestamp and {col} < 'infinity'::timestamp)")
        })
        .collect();
    if tests.is_empty() {
        None
    } else {
        Some(format!("coalesce({}, false)", tests.join(" or ")))
    }
}

/// The columns as a wide record carries them: `timestamp` columns as
/// `io.debezium.time.IsoTimestamp` strings, every other column unchanged.
/// Every record carries its own schema, so a consumer reads a wide record
/// by its schema like any other.
pub fn wide_columns(columns: &[Column]) -> Vec<Column> {
    columns
        .iter()
        .map(|c| {
            let mut c = c.clone();
            if c.is_micro_timestamp() {
                c.mapping = iso_timestamp();
            }
            c
        })
        .collect()
}

/// SQL that yields a row's payload as JSON text in the encoding the SQL
/// boolean `wide` picks: [`wide_columns`] when true, `columns` otherwise.
/// The caller renders the record with the schema of the same choice.
pub fn either_payload_sql(columns: &[Column], qualifier: &str, wide: &str) -> String {
    format!(
        "case when {wide} then {} else {} end",
        payload_sql(&wide_columns(columns), qualifier),
        payload_sql(columns, qualifier)
    )
}

/// A row's payload as JSON text and whether it is wide, as two SQL
/// expressions over the row `qualifier`: a row is rendered with the wide
/// schema when the second is true. A column list without `timestamp`
/// columns gets the plain [`payload_sql`] and `false`.
pub fn payload_and_wide_sql(columns: &[Column], qualifier: &str) -> (String, String) {
    match out_of_range_sql(columns, qualifier) {
        Some(wide) => (either_payload_sql(columns, qualifier, &wide), wide),
        None => (payload_sql(columns, qualifier), "false".to_owned()),
    }
}

/// The record templates of one column list: the ordinary one and, when the
/// list has `timestamp` columns, the one for wide rows.
#[derive(Debug, Clone)]
pub struct RecordTemplates {
    narrow: RecordTemplate,
    wide: Option<RecordTemplate>,
}

impl RecordTemplates {
    /// Templates for the struct `name` of `columns` (not optional, as keys
    /// and `timestamp+incrementing` values are).
    pub fn new(name: &str, columns: &[Column]) -> Self {
        let wide = columns
            .iter()
            .any(Column::is_micro_timestamp)
            .then(|| RecordTemplate::new(&struct_schema(name, &wide_columns(columns), false)));
        Self {
            narrow: RecordTemplate::new(&struct_schema(name, columns, false)),
            wide,
        }
    }

    /// Templates for records without a schema (`schemas.enable=false`):
    /// wide rows need no schema of their own then.
    pub fn schemaless() -> Self {
        Self {
            narrow: RecordTemplate::schemaless(),
            wide: None,
        }
    }

    /// A record with `payload`, in the wide schema when `wide` (as the SQL
    /// of [`payload_and_wide_sql`] says).
    pub fn render(&self, payload: &str, wide: bool) -> Vec<u8> {
        match (&self.wide, wide) {
            (Some(t), true) => t.render(payload),
            _ => self.narrow.render(payload),
        }
    }
}

/// A pre-rendered schema: records are `prefix + payload + "}"`, so the hot
/// path copies bytes and never serialises the schema again.
#[derive(Debug, Clone)]
pub struct RecordTemplate {
    prefix: Vec<u8>,
    /// Whether the record closes the `{"schema":..., "payload":` wrapper.
    wrapped: bool,
}

impl RecordTemplate {
    /// A template for records with `schema`.
    pub fn new(schema: &Value) -> Self {
        let mut prefix = br#"{"schema":"#.to_vec();
        serde_json::to_writer(&mut prefix, schema).expect("a schema always serialises");
        prefix.extend_from_slice(br#","payload":"#);
        Self {
            prefix,
            wrapped: true,
        }
    }

    /// A template for records that are the payload alone, as Kafka
    /// Connect's JSON converter writes them with `schemas.enable=false`.
    pub fn schemaless() -> Self {
        Self {
            prefix: Vec::new(),
            wrapped: false,
        }
    }

    /// A record with `payload`, which must be one JSON value (Postgres'
    /// `row_to_json` output is).
    pub fn render(&self, payload: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.prefix.len() + payload.len() + 1);
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(payload.as_bytes());
        if self.wrapped {
            out.push(b'}');
        }
        out
    }
}

/// Debezium's operation codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
pub enum Op {
    /// A row was inserted.
    #[serde(rename = "c")]
    Create,
    /// A row was updated.
    #[serde(rename = "u")]
    Update,
    /// A row was deleted.
    #[serde(rename = "d")]
    Delete,
    /// A row read by the initial snapshot.
    #[serde(rename = "r")]
    Read,
    /// The table was truncated (Debezium's `t`): `before` and `after` are
    /// null and the record's Kafka key is null.
    #[serde(rename = "t")]
    Truncate,
}

impl Op {
    /// The one-letter code.
    pub fn code(self) -> &'static str {
        match self {
            Self::Create => "c",
            Self::Update => "u",
            Self::Delete => "d",
            Self::Read => "r",
            Self::Truncate => "t",
        }
    }
}

/// Renders change events in Debezium's envelope, inside Kafka Connect JSON,
/// so tools that read Debezium topics (Flink's `debezium-json`, Connect's
/// `ExtractNewRecordState`) read Tidemark's.
///
/// Envelope version 2 (`source.version` `tidemark-0.2.0`):
///
/// ```text
/// {"before": {..}|null, "after": {..}|null,
///  "source": {"version", "connector": "tidemark", "name", "ts_ms", "ts_us", "ts_ns",
///             "snapshot", "snapshot_chunk"?, "db", "sequence", "schema", "table", "txId", "lsn", "xmin": null},
///  "transaction": {"id", "total_order", "data_collection_order", "commit_order",
///                  "event_count", "data_collections"},
///  "op", "ts_ms", "ts_us", "ts_ns"}
/// ```
///
/// - `source.ts_*` is the commit time of the event's *unit* (see
///   [`Transaction`]): in `logical` mode the transaction's commit timestamp,
///   in `changelog` mode when the batch's snapshot was taken (an upper bound
///   of each of its commits), for snapshot reads when the snapshot began.
///   The top-level `ts_*` is when Tidemark read the change.
/// - `source.snapshot` is `first`, `first_in_data_collection`, `true`,
///   `last_in_data_collection` or `last` for snapshot reads (`last` on the
///   snapshot's last row), `false` for changes, and `incremental` for the
///   rows (and the opening TRUNCATE) of an incremental snapshot, whose
///   events also carry `source.snapshot_chunk`: `first`, `middle`, `last`
///   or `only` (first and last), where their chunk stands in that table's
///   snapshot (null on every other event). A reader that knows nothing of
///   `snapshot_chunk` (an optional string) reads the events as before; one
///   that does can tell where each snapshot begins and where it is complete.
/// - `source.sequence` is, in `logical` mode, Debezium's
///   `["<last commit lsn>","<this lsn>"]` as one JSON string of decimal
///   LSNs; in `changelog` mode the change log's `seq` as a decimal string;
///   null for snapshot reads. `source.lsn` is the change's WAL position in
///   `logical` mode, else null.
/// - `transaction` says where the event stands in its unit; tombstones carry
///   none and do not count.
#[derive(Debug, Clone)]
pub struct ChangeEnvelope {
    /// `{"schema":...,"payload":{"before":`, or `{"before":` without schema.
    prefix: Vec<u8>,
    /// Whether events close the `{"schema":..., "payload":` wrapper.
    wrapped: bool,
    /// `"source":{..."name":"n","ts_ms":` is split around the varying parts.
    source_head: String,
    source_db: String,
    source_table: String,
    /// `"public.t"`, as `data_collections` names the table.
    data_collection: String,
}

/// The Debezium version string Tidemark's events carry in `source.version`.
pub const SOURCE_VERSION: &str = concat!("tidemark-", env!("CARGO_PKG_VERSION"));

/// Where a snapshot read stands in the initial snapshot
/// (`source.snapshot`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMark {
    /// A change, not a snapshot read: `false`.
    No,
    /// The snapshot's first row.
    First,
    /// The first row of a table other than the first.
    FirstInTable,
    /// Any other snapshot row: `true`.
    Yes,
    /// The last row of a table other than the last.
    LastInTable,
    /// The snapshot's last row.
    Last,
    /// A row of an incremental snapshot (a table that entered the
    /// connector's set while it streams, or a snapshot on demand):
    /// `incremental`, without saying which chunk it is in.
    Incremental,
    /// A row of an incremental snapshot's chunk, saying where the chunk
    /// stands (`source.snapshot_chunk`): `incremental`.
    IncrementalChunk(ChunkPlace),
}

/// Where a chunk stands in its incremental snapshot
/// (`source.snapshot_chunk`, on every event of the chunk): a replay that
/// starts a table from its newest complete snapshot needs to know where
/// each snapshot begins and ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkPlace {
    /// The snapshot's first chunk (and not its last): `first`.
    First,
    /// Neither first nor last: `middle`.
    Middle,
    /// The last chunk (the table is whole from here): `last`.
    Last,
    /// The first and the last: `only`.
    Only,
}

impl ChunkPlace {
    /// The place of a chunk from whether it is its snapshot's first and
    /// last.
    pub fn of(first: bool, last: bool) -> Self {
        match (first, last) {
            (true, true) => Self::Only,
            (true, false) => Self::First,
            (false, true) => Self::Last,
            (false, false) => Self::Middle,
        }
    }

    /// The `source.snapshot_chunk` text.
    pub fn text(self) -> &'static str {
        match self {
            Self::First => "first",
            Self::Middle => "middle",
            Self::Last => "last",
            Self::Only => "only",
        }
    }
}

impl SnapshotMark {
    /// The `source.snapshot` text.
    pub fn text(self) -> &'static str {
        match self {
            Self::No => "false",
            Self::First => "first",
            Self::FirstInTable => "first_in_data_collection",
            Self::Yes => "true",
            Self::LastInTable => "last_in_data_collection",
            Self::Last => "last",
            Self::Incremental | Self::IncrementalChunk(_) => "incremental",
        }
    }

    /// The mark of a snapshot row by where it stands: the last row of the
    /// snapshot wins over every other mark, as the unit's end must be told.
    pub fn of_row(
        first_of_snapshot: bool,
        first_of_table: bool,
        last_of_table: bool,
        last_of_snapshot: bool,
    ) -> Self {
        if last_of_snapshot {
            Self::Last
        } else if first_of_snapshot {
            Self::First
        } else if last_of_table {
            Self::LastInTable
        } else if first_of_table {
            Self::FirstInTable
        } else {
            Self::Yes
        }
    }
}

/// Where a change came from in the source (`source.sequence`,
/// `source.lsn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sequence {
    /// Snapshot reads.
    None,
    /// `changelog` mode: the change log's `seq`.
    ChangeLog(i64),
    /// `logical` mode: the end LSN of the last transaction sent before
    /// this one's, and the change's own WAL position.
    Logical {
        /// The previous transaction's end LSN.
        last_commit: u64,
        /// This change's LSN.
        lsn: u64,
    },
}

/// A unit's totals, carried by its last event only.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnitEnd {
    /// Events in the unit (tombstones not counted).
    pub event_count: u64,
    /// Events per table, `("public.t", n)`, in the order the tables first
    /// appear in the unit.
    pub data_collections: Vec<(String, u64)>,
}

/// Where an event stands in its unit (`transaction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxPlace<'a> {
    /// The unit's place in commit order.
    pub commit_order: u64,
    /// The commit_order of the unit the connector sent before this one;
    /// `None` for the first it ever sends.
    pub prev_commit_order: Option<u64>,
    /// The event's place in the unit, from 1.
    pub total_order: u64,
    /// The event's place among the unit's events of its table, from 1.
    pub data_collection_order: u64,
    /// Set on the unit's last event.
    pub end: Option<&'a UnitEnd>,
}

/// One change to render.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    /// The operation.
    pub op: Op,
    /// The row before (payload JSON), for updates and deletes.
    pub before: Option<&'a str>,
    /// The row after, for creates, updates and reads.
    pub after: Option<&'a str>,
    /// The unit's commit time, µs since the epoch (`source.ts_*`).
    pub commit_us: i64,
    /// The writing transaction's id.
    pub txid: Option<u64>,
    /// Where it came from in the source.
    pub sequence: Sequence,
    /// Where a snapshot read stands.
    pub snapshot: SnapshotMark,
    /// When Tidemark read it, µs since the epoch.
    pub read_us: i64,
    /// Where it stands in its unit.
    pub transaction: TxPlace<'a>,
}

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl ChangeEnvelope {
    /// An envelope for the rows of `schema`.`table` with `columns`, in
    /// database `db`, from connector `name` (Debezium's topic prefix slot).
    pub fn new(name: &str, db: &str, schema: &str, table: &str, columns: &[Column]) -> Self {
        let fields: Vec<Value> = columns.iter().map(Column::field_schema).collect();
        Self::for_rows(name, db, schema, table, &fields, &fields, None)
    }

    /// An envelope whose `before` and `after` have the Connect field
    /// schemas `before` and `after` (a [`crate::codec::RowCodec`]'s, for the
    /// variants each row image took), and say the source table's OID
    /// (`tidemark.table.oid`) where `table_oid` gives it.
    pub fn for_rows(
        name: &str,
        db: &str,
        schema: &str,
        table: &str,
        before: &[Value],
        after: &[Value],
        table_oid: Option<crate::codec::Oid>,
    ) -> Self {
        let parameters = crate::codec::table_parameters(table_oid);
        let row = |field: &str, fields: &[Value]| {
            let mut s = json!({
                "type": "struct",
                "fields": fields,
                "optional": true,
                "name": format!("{name}.{schema}.{table}.Value"),
                "field": field,
            });
            if let Some(p) = &parameters {
                s["parameters"] = p.clone();
            }
            s
        };
        let source_fields = json!([
            {"type": "string", "optional": false, "field": "version"},
            {"type": "string", "optional": false, "field": "connector"},
            {"type": "string", "optional": false, "field": "name"},
            {"type": "int64", "optional": false, "field": "ts_ms"},
            {"type": "int64", "optional": true, "field": "ts_us"},
            {"type": "int64", "optional": true, "field": "ts_ns"},
            {"type": "string", "optional": true, "name": "io.debezium.data.Enum", "version": 1,
             "parameters": {"allowed": "true,first,first_in_data_collection,last_in_data_collection,last,false,incremental"},
             "default": "false", "field": "snapshot"},
            {"type": "string", "optional": true, "field": "snapshot_chunk"},
            {"type": "string", "optional": false, "field": "db"},
            {"type": "string", "optional": true, "field": "sequence"},
            {"type": "string", "optional": false, "field": "schema"},
            {"type": "string", "optional": false, "field": "table"},
            {"type": "int64", "optional": true, "field": "txId"},
            {"type": "int64", "optional": true, "field": "lsn"},
            {"type": "int64", "optional": true, "field": "xmin"},
        ]);
        let transaction_fields = json!([
            {"type": "string", "optional": false, "field": "id"},
            {"type": "int64", "optional": false, "field": "total_order"},
            {"type": "int64", "optional": false, "field": "data_collection_order"},
            {"type": "int64", "optional": false, "field": "commit_order"},
            {"type": "int64", "optional": true, "field": "prev_commit_order"},
            {"type": "int64", "optional": true, "field": "event_count"},
            {"type": "array", "optional": true, "field": "data_collections",
             "items": {"type": "struct", "optional": false, "name": "tidemark.DataCollection",
                       "fields": [
                           {"type": "string", "optional": false, "field": "data_collection"},
                           {"type": "int64", "optional": false, "field": "event_count"}]}},
        ]);
        let schema_json = json!({
            "type": "struct",
            "fields": [
                row("before", before),
                row("after", after),
                {"type": "struct", "fields": source_fields, "optional": false,
                 "name": "io.debezium.connector.postgresql.Source", "field": "source"},
                {"type": "struct", "fields": transaction_fields, "optional": true,
                 "name": "event.block", "version": 1, "field": "transaction"},
                {"type": "string", "optional": false, "field": "op"},
                {"type": "int64", "optional": true, "field": "ts_ms"},
                {"type": "int64", "optional": true, "field": "ts_us"},
                {"type": "int64", "optional": true, "field": "ts_ns"},
            ],
            "optional": false,
            "name": format!("{name}.{schema}.{table}.Envelope"),
            "version": 2,
        });
        let mut prefix = br#"{"schema":"#.to_vec();
        serde_json::to_writer(&mut prefix, &schema_json).expect("a schema always serialises");
        prefix.extend_from_slice(br#","payload":{"before":"#);
        let q = |s: &str| serde_json::to_string(s).expect("a string always serialises");
        Self {
            prefix,
            wrapped: true,
            source_head: format!(
                r#","source":{{"version":{},"connector":"tidemark","name":{},"ts_ms":"#,
                q(SOURCE_VERSION),
                q(name)
            ),
            source_db: format!(r#","db":{},"#, q(db)),
            source_table: format!(r#""schema":{},"table":{},"#, q(schema), q(table)),
            data_collection: format!("{schema}.{table}"),
        }
    }

    /// The name `data_collections` gives this envelope's table
    /// (`schema.table`).
    pub fn data_collection(&self) -> &str {
        &self.data_collection
    }

    /// The same envelope for events that are the payload alone, as Kafka
    /// Connect's JSON converter writes them with `schemas.enable=false`
    /// (what Flink's `debezium-json` reads by default).
    pub fn without_schema(mut self) -> Self {
        self.prefix = br#"{"before":"#.to_vec();
        self.wrapped = false;
        self
    }

    /// Renders one change event.
    pub fn render(&self, c: &Change<'_>) -> Vec<u8> {
        use std::io::Write as _;
        let mut out = Vec::with_capacity(
            self.prefix.len() + c.before.map_or(4, str::len) + c.after.map_or(4, str::len) + 500,
        );
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(c.before.unwrap_or("null").as_bytes());
        out.extend_from_slice(br#","after":"#);
        out.extend_from_slice(c.after.unwrap_or("null").as_bytes());
        out.extend_from_slice(self.source_head.as_bytes());
        let _ = write!(
            out,
            r#"{},"ts_us":{},"ts_ns":{}"#,
            c.commit_us.div_euclid(1000),
            c.commit_us,
            i128::from(c.commit_us) * 1000
        );
        let _ = write!(out, r#","snapshot":"{}""#, c.snapshot.text());
        match c.snapshot {
            SnapshotMark::IncrementalChunk(place) => {
                let _ = write!(out, r#","snapshot_chunk":"{}""#, place.text());
            }
            _ => out.extend_from_slice(br#","snapshot_chunk":null"#),
        }
        out.extend_from_slice(self.source_db.as_bytes());
        let lsn = match c.sequence {
            Sequence::None => {
                out.extend_from_slice(br#""sequence":null,"#);
                None
            }
            Sequence::ChangeLog(seq) => {
                let _ = write!(out, r#""sequence":"{seq}","#);
                None
            }
            Sequence::Logical { last_commit, lsn } => {
                let _ = write!(out, r#""sequence":"[\"{last_commit}\",\"{lsn}\"]","#);
                Some(lsn)
            }
        };
        out.extend_from_slice(self.source_table.as_bytes());
        match c.txid {
            Some(txid) => {
                let _ = write!(out, r#""txId":{txid},"#);
            }
            None => out.extend_from_slice(br#""txId":null,"#),
        }
        match lsn {
            Some(lsn) => {
                let _ = write!(out, r#""lsn":{lsn},"#);
            }
            None => out.extend_from_slice(br#""lsn":null,"#),
        }
        out.extend_from_slice(br#""xmin":null},"transaction":{"id":""#);
        let t = &c.transaction;
        match c.txid {
            Some(txid) => {
                let _ = write!(out, "{txid}");
            }
            None => out.extend_from_slice(b"snapshot"),
        }
        let _ = write!(
            out,
            r#":{}","total_order":{},"data_collection_order":{},"commit_order":{},"#,
            t.commit_order, t.total_order, t.data_collection_order, t.commit_order
        );
        match t.prev_commit_order {
            Some(p) => {
                let _ = write!(out, r#""prev_commit_order":{p},"#);
            }
            None => out.extend_from_slice(br#""prev_commit_order":null,"#),
        }
        match t.end {
            Some(end) => {
                let _ = write!(
                    out,
                    r#""event_count":{},"data_collections":["#,
                    end.event_count
                );
                for (i, (table, n)) in end.data_collections.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(br#"{"data_collection":"#);
                    serde_json::to_writer(&mut out, table).expect("a string always serialises");
                    let _ = write!(out, r#","event_count":{n}}}"#);
                }
                out.extend_from_slice(b"]}");
            }
            None => out.extend_from_slice(br#""event_count":null,"data_collections":null}"#),
        }
        out.extend_from_slice(br#","op":""#);
        out.extend_from_slice(c.op.code().as_bytes());
        let _ = write!(
            out,
            r#"","ts_ms":{},"ts_us":{},"ts_ns":{}}}"#,
            c.read_us.div_euclid(1000),
            c.read_us,
            i128::from(c.read_us) * 1000
        );
        if self.wrapped {
            out.push(b'}');
        }
        out
    }
}

/// A Debezium-style change event as read back from a topic or a file line:
/// the one definition every consumer of Tidemark's change topics shares.
/// Reads envelope version 2 and version 1 (0.1's, without `transaction`,
/// `ts_us`, `ts_ns`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChangeEvent {
    /// The row before the change (updates, deletes).
    pub before: Option<Value>,
    /// The row after the change (creates, updates, snapshot reads).
    pub after: Option<Value>,
    /// Where the change came from.
    pub source: ChangeSource,
    /// Where the event stands in its unit; `None` in version 1 events.
    #[serde(default)]
    pub transaction: Option<Transaction>,
    /// What happened.
    pub op: Op,
    /// When Tidemark read the change, ms since the epoch.
    pub ts_ms: Option<i64>,
    /// The same in µs (version 2).
    #[serde(default)]
    pub ts_us: Option<i64>,
}

/// The `source` block of a change event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChangeSource {
    /// Tidemark's version.
    pub version: String,
    /// The connector name.
    pub name: String,
    /// When the unit committed (see [`ChangeEnvelope`]), ms since the epoch.
    pub ts_ms: i64,
    /// The same in µs (version 2).
    #[serde(default)]
    pub ts_us: Option<i64>,
    /// `"first"`, `"true"`, `"last"`, ... for snapshot reads, `"false"` for
    /// changes.
    pub snapshot: Option<String>,
    /// Incremental snapshot reads: where their chunk stands in the
    /// snapshot, `"first"`, `"middle"`, `"last"` or `"only"` (see
    /// [`ChunkPlace`]); null (or absent, before it existed) otherwise.
    #[serde(default)]
    pub snapshot_chunk: Option<String>,
    /// Database.
    pub db: String,
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
    /// The writing transaction.
    #[serde(rename = "txId")]
    pub tx_id: Option<u64>,
    /// The change's place in the source (see [`Sequence`]).
    pub sequence: Option<String>,
    /// `logical` mode: the change's WAL position.
    #[serde(default)]
    pub lsn: Option<u64>,
}

/// The `transaction` block of a change event: where the event stands in
/// its *unit*, what pg-replay applies atomically and in order. In `logical`
/// mode a unit is one source transaction (`commit_order` its commit LSN);
/// in `changelog` mode one batch of transactions that became visible
/// between two snapshots (`commit_order` the batch's ordinal, from 1); the
/// initial snapshot is unit 0. `commit_order` increases with source commit
/// order across all tables and partitions of a connector.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Transaction {
    /// `"<txId>:<commit_order>"` (`"snapshot:0"` for snapshot reads).
    pub id: String,
    /// The event's place in the unit, from 1.
    pub total_order: u64,
    /// The event's place among the unit's events of its table, from 1.
    pub data_collection_order: u64,
    /// The unit's place in commit order.
    pub commit_order: u64,
    /// The commit_order of the unit sent before this one (`None` for the
    /// first, and in events of Tidemark before 0.2's amendment).
    #[serde(default)]
    pub prev_commit_order: Option<u64>,
    /// Events in the unit: on its last event only.
    pub event_count: Option<u64>,
    /// Events per table: on the unit's last event only.
    pub data_collections: Option<Vec<DataCollection>>,
}

/// One table's events in a unit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DataCollection {
    /// `schema.table`.
    pub data_collection: String,
    /// Its events in the unit.
    pub event_count: u64,
}

impl ChangeEvent {
    /// Decodes a change event from a record value or file line, with or
    /// without the Connect `{"schema", "payload"}` wrapper.
    ///
    /// Fails when the JSON is not a change event, saying what is missing.
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let value: Value = serde_json::from_slice(bytes)?;
        let payload = match value {
            Value::Object(mut o) if o.contains_key("payload") && o.contains_key("schema") => {
                o.remove("payload").unwrap_or(Value::Null)
            }
            other => other,
        };
        serde_json::from_value(payload)
    }

    /// The row the event leaves behind (`after`), or the deleted one.
    pub fn row(&self) -> Option<&Value> {
        self.after.as_ref().or(self.before.as_ref())
    }
}

/// A Connect JSON record as read back from a topic or a file line.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ConnectRecord {
    /// The schema, as written.
    pub schema: Value,
    /// The values.
    pub payload: Value,
}

impl ConnectRecord {
    /// Decodes one record.
    ///
    /// Fails when the bytes are not JSON with `schema` and `payload`.
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// A payload field.
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.payload.get(name)
    }
}

/// The largest and smallest `MicroTimestamp`: how [`map_type`] carries
/// `infinity` and `-infinity`.
const MICROS_INFINITY: &str = "9223372036854775807";
const MICROS_MINUS_INFINITY: &str = "-9223372036854775808";

/// Deprecated: use [`crate::codec::to_pg_text`]; this goes when pg-source switches to the codec.
///
/// Plays a field back into Postgres: the SQL expression that turns the
/// field's JSON value, held by the `jsonb` placeholder `param` (like `$1`),
/// into a Postgres value whose text form is the original column's. It is the
/// inverse of [`Column::select_expr`], driven by the field's Connect schema
/// (as [`Column::field_schema`] writes it and as every record carries it), so
/// a restore or a checker needs nothing but the record.
///
/// The arithmetic is exact: microsecond timestamps and times are rebuilt
/// from integer days, seconds and microseconds (never via `float8` seconds),
/// numerics and other plain strings come back as their exact text, numbers
/// are read from `jsonb`'s decimal text. JSON `null` (or an SQL NULL
/// parameter) gives NULL. Per schema:
///
/// | field schema | SQL result |
/// |---|---|
/// | `int16`/`int32`/`int64`, `float`/`double`, `boolean` | `int2`/`int4`/`int8`, `float4`/`float8`, `bool` |
/// | `bytes` (base64) | `bytea` |
/// | `string` (text, numeric, enums, any other type as text) | `text` |
/// | `io.debezium.time.MicroTimestamp` | `timestamp` (`±infinity` from the int64 extremes) |
/// | `io.debezium.time.IsoTimestamp` | `timestamp` (wide records) |
/// | `io.debezium.time.ZonedTimestamp` | `timestamptz` |
/// | `io.debezium.time.Date` | `date` |
/// | `io.debezium.time.MicroTime` | `time` (`24:00:00` included) |
/// | `io.debezium.time.ZonedTime` | `timetz` |
/// | `io.debezium.time.Interval` | `interval` |
/// | `io.debezium.data.Uuid` | `uuid` |
/// | `io.debezium.data.Json` | `json` (the exact text, so `json` and `jsonb` columns alike) |
/// | `array` of numbers or booleans | an array of that type, any number of dimensions |
/// | `array` of strings | `text[]`, any number of dimensions |
/// | `array` of bytes | `bytea[]`, one dimension |
///
/// What the text form does not carry cannot come back: the enum's type and
/// the column's own type for plain strings (cast the result, like
/// `::my_enum` or `::numeric`), and the sign of a float `-0` (`jsonb` holds
/// numbers as decimals).
pub fn decode_sql(field_schema: &Value, param: &str) -> String {
    let p = format!("({param})::jsonb");
    // The scalar as text; NULL for JSON null.
    let text = format!("({p} #>> '{{}}')");
    let logical = field_schema.get("name").and_then(Value::as_str);
    let connect = field_schema
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("string");
    match (logical, connect) {
        (Some(MICRO_TIMESTAMP), _) => format!(
            "(case when {text} is null then null::timestamp \
             when {text} = '{MICROS_INFINITY}' then 'infinity'::timestamp \
             when {text} = '{MICROS_MINUS_INFINITY}' then '-infinity'::timestamp \
             else 'epoch'::timestamp + {} end)",
            micros_interval(&format!("{text}::int8"), true)
        ),
        (Some(ISO_TIMESTAMP), _) => format!("{text}::timestamp"),
        (Some("io.debezium.time.ZonedTimestamp"), _) => format!("{text}::timestamptz"),
        (Some("io.debezium.time.Date"), _) => format!(
            "case {text}::int4 when 2147483647 then 'infinity'::date when -2147483648 then '-infinity'::date \
             else date '1970-01-01' + {text}::int4 end"
        ),
        (Some("io.debezium.time.MicroTime"), _) => format!(
            "(case when {text} is null then null::time \
             when {text} = '86400000000' then '24:00:00'::time \
             else time '00:00' + {} end)",
            micros_interval(&format!("{text}::int8"), false)
        ),
        (Some("io.debezium.time.ZonedTime"), _) => format!("{text}::timetz"),
        (Some("io.debezium.time.Interval"), _) => format!("{text}::interval"),
        (Some("io.debezium.data.Uuid"), _) => format!("{text}::uuid"),
        (Some("io.debezium.data.Json"), _) => format!("{text}::json"),
        (_, "array") => {
            let items = field_schema
                .get("items")
                .and_then(|i| i.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("string");
            match items {
                "bytes" => format!(
                    "(case when jsonb_typeof({p}) = 'array' then \
                     array(select decode(e #>> '{{}}', 'base64') \
                     from jsonb_array_elements({p}) with ordinality a(e, i) order by i) end)"
                ),
                // Postgres' own JSON-to-record conversion builds arrays of
                // any dimension from nested JSON arrays, each element from
                // its text.
                other => format!(
                    "(select x.a from jsonb_to_record(jsonb_build_object('a', {p})) as x(a {}[]))",
                    scalar_type(other)
                ),
            }
        }
        (_, "bytes") => format!("decode({text}, 'base64')"),
        (_, "string") => text,
        (_, other) => format!("{text}::{}", scalar_type(other)),
    }
}

/// The Postgres type of a Connect scalar type; `text` for strings and
/// anything else.
fn scalar_type(connect: &str) -> &'static str {
    match connect {
        "int8" | "int16" => "int2",
        "int32" => "int4",
        "int64" => "int8",
        "float" | "float32" => "float4",
        "double" | "float64" => "float8",
        "boolean" => "bool",
        _ => "text",
    }
}

/// An exact `interval` of `micros` (an `int8` SQL expression) microseconds:
/// its days (with `days`), seconds and microseconds are each small integers,
/// read by interval input without any floating-point step.
fn micros_interval(micros: &str, days: bool) -> String {
    if days {
        format!(
            "format('%s days %s seconds %s microseconds', {micros} / 86400000000, \
             {micros} % 86400000000 / 1000000, {micros} % 1000000)::interval"
        )
    } else {
        format!(
            "format('%s seconds %s microseconds', {micros} / 1000000, {micros} % 1000000)::interval"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, typname: &str, not_null: bool) -> Column {
        Column::from_catalog(name, typname, "b", None, not_null)
    }

    #[test]
    fn the_seed_table_maps_losslessly() {
        let cols = [
            col("id", "int4", true),
            col("data", "varchar", true),
            col("is_soft_deleted", "bool", false),
            col("last_updated", "timestamp", true),
            col("amount", "numeric", false),
        ];
        let schema = struct_schema("streaming_update_table", &cols, false);
        assert_eq!(
            schema["fields"][0],
            json!({"type":"int32","optional":false,"field":"id"})
        );
        assert_eq!(
            schema["fields"][3]["name"],
            "io.debezium.time.MicroTimestamp"
        );
        assert_eq!(schema["fields"][4]["type"], "string");
        let sql = payload_sql(&cols, "t");
        assert!(sql.contains(r#"t."amount"::text as "amount""#), "{sql}");
        assert!(
            sql.contains(r#"(t."last_updated"::date - date '1970-01-01')::int8 * 86400000000"#),
            "{sql}"
        );
    }

    #[test]
    fn arrays_map_to_arrays() {
        let ints = Column::from_catalog("a", "_int4", "b", Some(("int4", "b")), false);
        assert_eq!(
            ints.field_schema(),
            json!({"type":"array","items":{"type":"int32","optional":true},"optional":true,"field":"a"})
        );
        let stamps = Column::from_catalog("s", "_timestamp", "b", Some(("timestamp", "b")), false);
        assert_eq!(stamps.field_schema()["items"]["type"], "string");
        assert!(stamps.select_expr("t").starts_with(r#"t."s"::text[]"#));
    }

    #[test]
    fn rows_are_wide_only_by_their_timestamp_columns() {
        // No `timestamp` column, or only arrays of them (text): never wide.
        let plain = [
            col("id", "int4", true),
            col("tstz", "timestamptz", false),
            Column::from_catalog("s", "_timestamp", "b", Some(("timestamp", "b")), false),
        ];
        assert_eq!(out_of_range_sql(&plain, "t"), None);
        assert_eq!(wide_columns(&plain), plain);
        assert_eq!(
            either_payload_sql(&plain, "t", "false"),
            format!(
                "case when false then {0} else {0} end",
                payload_sql(&plain, "t")
            )
        );

        let cols = [
            col("id", "int4", true),
            col("ts", "timestamp", true),
            col(r#"la"st"#, "timestamp", false),
        ];
        assert_eq!(
            out_of_range_sql(&cols, "b").unwrap(),
            "coalesce(\
             (b.\"ts\" >= '294247-01-10 04:00:54.775807'::timestamp and b.\"ts\" < 'infinity'::timestamp) or \
             (b.\"la\"\"st\" >= '294247-01-10 04:00:54.775807'::timestamp and b.\"la\"\"st\" < 'infinity'::timestamp), \
             false)"
        );
    }

    #[test]
    fn wide_records_carry_timestamps_as_iso_text() {
        let cols = [
            col("id", "int4", true),
            col("ts", "timestamp", false),
            col("d", "date", false),
        ];
        let wide = wide_columns(&cols);
        assert_eq!(wide[0], cols[0]);
        assert_eq!(wide[2], cols[2]);
        assert_eq!(
            wide[1].field_schema(),
            json!({"type": "string", "optional": true, "name": "io.debezium.time.IsoTimestamp",
                   "version": 1, "field": "ts"})
        );
        let expr = wide[1].select_expr("t");
        assert!(
            expr.starts_with(r#"case when not isfinite(t."ts") then t."ts"::text "#),
            "{expr}"
        );
        assert!(
            expr.contains(r#"to_char(t."ts", 'YYYY-MM-DD"T"HH24:MI:SS.US BC')"#),
            "{expr}"
        );
        assert!(
            expr.ends_with(r#"else to_char(t."ts", 'YYYY-MM-DD"T"HH24:MI:SS.US') end as "ts""#),
            "{expr}"
        );
        let either = either_payload_sql(&cols, "t", "w.wide");
        assert_eq!(
            either,
            format!(
                "case when w.wide then {} else {} end",
                payload_sql(&wide, "t"),
                payload_sql(&cols, "t")
            )
        );
        // The wide schema is the ordinary one with only `ts` changed.
        let narrow = struct_schema("t", &cols, false);
        let wide_schema = struct_schema("t", &wide, false);
        assert_eq!(narrow["fields"][0], wide_schema["fields"][0]);
        assert_eq!(narrow["fields"][2], wide_schema["fields"][2]);
        assert_eq!(
            narrow["fields"][1]["name"],
            "io.debezium.time.MicroTimestamp"
        );
        assert_eq!(
            decode_sql(&wide_schema["fields"][1], "$1"),
            format!("{TEXT}::timestamp")
        );
    }

    #[test]
    fn names_are_quoted_in_sql() {
        let odd = col(r#"we"ird"#, "text", false);
        assert_eq!(odd.select_expr("t"), r#"t."we""ird" as "we""ird""#);
    }

    #[test]
    fn templates_render_records_that_decode() {
        let schema = struct_schema("t", &[col("id", "int4", true)], false);
        let t = RecordTemplate::new(&schema);
        let bytes = t.render(r#"{"id":7}"#);
        let rec = ConnectRecord::decode(&bytes).unwrap();
        assert_eq!(rec.field("id"), Some(&json!(7)));
        assert_eq!(rec.schema, schema);
    }

    #[test]
    fn before_and_after_say_the_source_table_s_oid_where_known() {
        let fields = vec![col("id", "int4", true).field_schema()];
        let schema = |e: &ChangeEnvelope| -> Value {
            let bytes = e.render(&Change {
                op: Op::Create,
                before: None,
                after: Some(r#"{"id":1}"#),
                commit_us: 1_700_000_000_000_000,
                txid: Some(1),
                sequence: Sequence::Logical {
                    last_commit: 1,
                    lsn: 2,
                },
                snapshot: SnapshotMark::No,
                read_us: 1_700_000_000_000_000,
                transaction: TxPlace {
                    commit_order: 2,
                    prev_commit_order: None,
                    total_order: 1,
                    data_collection_order: 1,
                    end: None,
                },
            });
            serde_json::from_slice::<Value>(&bytes).unwrap()["schema"].clone()
        };
        let with = schema(&ChangeEnvelope::for_rows(
            "conn",
            "db",
            "public",
            "t",
            &fields,
            &fields,
            Some(16400),
        ));
        for part in [0, 1] {
            assert_eq!(
                with["fields"][part]["parameters"],
                json!({"tidemark.table.oid": "16400"}),
                "{}",
                with["fields"][part]["field"]
            );
        }
        let without = schema(&ChangeEnvelope::for_rows(
            "conn", "db", "public", "t", &fields, &fields, None,
        ));
        // Otherwise the envelope is the one it was.
        let mut stripped = with.clone();
        for part in [0, 1] {
            stripped["fields"][part]
                .as_object_mut()
                .unwrap()
                .remove("parameters");
        }
        assert_eq!(stripped, without);
        assert_eq!(without["fields"][0].get("parameters"), None);
    }

    #[test]
    fn change_events_render_and_decode() {
        let cols = [col("id", "int4", true), col("data", "text", false)];
        let env = ChangeEnvelope::new("conn", "db", "public", "t", &cols);
        let end = UnitEnd {
            event_count: 2,
            data_collections: vec![("public.t".into(), 2)],
        };
        let bytes = env.render(&Change {
            op: Op::Update,
            before: Some(r#"{"id":1,"data":"a"}"#),
            after: Some(r#"{"id":1,"data":"b \"quoted\""}"#),
            commit_us: 1_700_000_000_000_123,
            txid: Some(1234),
            sequence: Sequence::Logical {
                last_commit: 100,
                lsn: 150,
            },
            snapshot: SnapshotMark::No,
            read_us: 1_700_000_000_050_000,
            transaction: TxPlace {
                commit_order: 160,
                prev_commit_order: Some(100),
                total_order: 2,
                data_collection_order: 2,
                end: Some(&end),
            },
        });
        let raw: Value = serde_json::from_slice(&bytes).expect("valid JSON");
        assert_eq!(raw["schema"]["name"], "conn.public.t.Envelope");
        assert_eq!(raw["schema"]["fields"][0]["name"], "conn.public.t.Value");
        let p = &raw["payload"];
        assert_eq!(p["source"]["version"], SOURCE_VERSION);
        assert_eq!(SOURCE_VERSION, "tidemark-0.2.0");
        assert_eq!(p["source"]["ts_ms"], 1_700_000_000_000i64);
        assert_eq!(p["source"]["ts_us"], 1_700_000_000_000_123i64);
        assert_eq!(p["source"]["ts_ns"].to_string(), "1700000000000123000");
        assert_eq!(p["source"]["sequence"], r#"["100","150"]"#);
        assert_eq!(p["source"]["lsn"], 150);
        assert_eq!(p["transaction"]["id"], "1234:160");
        assert_eq!(
            p["transaction"]["data_collections"][0]["data_collection"],
            "public.t"
        );
        assert_eq!(p["ts_us"], 1_700_000_000_050_000i64);
        // Every payload field is in the schema, in order.
        let fields: Vec<&str> = raw["schema"]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["field"].as_str().unwrap())
            .collect();
        let keys: Vec<&str> = p.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(fields, keys);
        let source_fields: Vec<&str> = raw["schema"]["fields"][2]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["field"].as_str().unwrap())
            .collect();
        let source_keys: Vec<&str> = p["source"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(source_fields, source_keys);
        let tx_fields: Vec<&str> = raw["schema"]["fields"][3]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["field"].as_str().unwrap())
            .collect();
        let tx_keys: Vec<&str> = p["transaction"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(tx_fields, tx_keys);
        assert_eq!(p["transaction"]["prev_commit_order"], 100);
        let ev = ChangeEvent::decode(&bytes).unwrap();
        assert_eq!(ev.op, Op::Update);
        assert_eq!(ev.before.unwrap()["data"], "a");
        assert_eq!(ev.after.as_ref().unwrap()["data"], "b \"quoted\"");
        assert_eq!(ev.source.tx_id, Some(1234));
        assert_eq!(ev.source.lsn, Some(150));
        assert_eq!(ev.source.table, "t");
        assert_eq!(ev.ts_ms, Some(1_700_000_000_050));
        let tx = ev.transaction.unwrap();
        assert_eq!(
            (
                tx.commit_order,
                tx.prev_commit_order,
                tx.total_order,
                tx.event_count
            ),
            (160, Some(100), 2, Some(2))
        );
        assert_eq!(tx.data_collections.unwrap()[0].event_count, 2);

        let delete = Change {
            op: Op::Delete,
            before: Some(r#"{"id":1,"data":"b"}"#),
            after: None,
            commit_us: 1_000,
            txid: None,
            sequence: Sequence::None,
            snapshot: SnapshotMark::Last,
            read_us: 2_000,
            transaction: TxPlace {
                commit_order: 0,
                prev_commit_order: None,
                total_order: 1,
                data_collection_order: 1,
                end: None,
            },
        };
        let del = env.render(&delete);
        let ev = ChangeEvent::decode(&del).unwrap();
        assert_eq!(ev.op, Op::Delete);
        assert!(ev.after.is_none());
        assert_eq!(ev.row().unwrap()["id"], 1);
        assert_eq!(ev.source.snapshot.as_deref(), Some("last"));
        let tx = ev.transaction.as_ref().unwrap();
        assert_eq!((tx.id.as_str(), tx.event_count), ("snapshot:0", None));

        // Without a schema the event is the payload alone, and decodes the same.
        let bare = env.clone().without_schema().render(&delete);
        let raw: Value = serde_json::from_slice(&bare).expect("valid JSON");
        assert!(raw.get("schema").is_none(), "{raw}");
        assert_eq!(raw["op"], "d");
        assert_eq!(ChangeEvent::decode(&bare).unwrap(), ev);
        assert!(bare.len() * 3 < del.len(), "the schema is most of an event");
    }

    #[test]
    fn version_1_events_still_decode() {
        let v1 = br#"{"before":null,"after":{"id":1},"source":{"version":"tidemark-0.1.0","connector":"tidemark","name":"n","ts_ms":5,"snapshot":"true","db":"d","sequence":null,"schema":"public","table":"t","txId":null,"lsn":null,"xmin":null},"op":"r","ts_ms":6}"#;
        let ev = ChangeEvent::decode(v1).unwrap();
        assert_eq!(ev.op, Op::Read);
        assert!(ev.transaction.is_none());
        assert_eq!(ev.source.ts_us, None);
    }

    #[test]
    fn snapshot_marks_put_the_snapshot_end_first() {
        use SnapshotMark::*;
        assert_eq!(SnapshotMark::of_row(true, true, true, true), Last);
        assert_eq!(SnapshotMark::of_row(true, true, true, false), First);
        assert_eq!(SnapshotMark::of_row(false, true, true, false), LastInTable);
        assert_eq!(
            SnapshotMark::of_row(false, true, false, false),
            FirstInTable
        );
        assert_eq!(SnapshotMark::of_row(false, false, false, false), Yes);
        assert_eq!(Yes.text(), "true");
    }

    #[test]
    fn schemaless_records_are_the_payload_alone() {
        let t = RecordTemplates::schemaless();
        assert_eq!(t.render(r#"{"id":1}"#, false), br#"{"id":1}"#);
        assert_eq!(t.render(r#"{"id":1}"#, true), br#"{"id":1}"#);
        let with = RecordTemplate::new(&json!({"type": "int32"}));
        assert_eq!(
            with.render("1"),
            br#"{"schema":{"type":"int32"},"payload":1}"#
        );
    }

    #[test]
    fn exact_numbers_survive_decoding() {
        let rec = ConnectRecord::decode(
            br#"{"schema":{},"payload":{"n":123456789012345678901234567890.123}}"#,
        )
        .unwrap();
        assert_eq!(
            rec.field("n").unwrap().to_string(),
            "123456789012345678901234567890.123"
        );
    }

    fn decode(typname: &str, element: Option<(&str, &str)>) -> String {
        let c = Column::from_catalog("c", typname, "b", element, false);
        decode_sql(&c.field_schema(), "$1")
    }

    const TEXT: &str = "(($1)::jsonb #>> '{}')";

    #[test]
    fn plain_fields_are_cast_from_their_json_text() {
        assert_eq!(decode("int2", None), format!("{TEXT}::int2"));
        assert_eq!(decode("int4", None), format!("{TEXT}::int4"));
        assert_eq!(decode("int8", None), format!("{TEXT}::int8"));
        assert_eq!(decode("float4", None), format!("{TEXT}::float4"));
        assert_eq!(decode("float8", None), format!("{TEXT}::float8"));
        assert_eq!(decode("bool", None), format!("{TEXT}::bool"));
        assert_eq!(decode("bytea", None), format!("decode({TEXT}, 'base64')"));
        // Numerics, text and types without a mapping are their exact text.
        for typname in ["numeric", "text", "varchar", "inet", "money"] {
            assert_eq!(decode(typname, None), TEXT, "{typname}");
        }
        let e = Column::from_catalog("c", "mood", "e", None, false);
        assert_eq!(decode_sql(&e.field_schema(), "$1"), TEXT);
    }

    #[test]
    fn the_placeholder_is_used_as_given() {
        let c = Column::from_catalog("c", "int4", "b", None, false);
        assert_eq!(
            decode_sql(&c.field_schema(), "$7"),
            "(($7)::jsonb #>> '{}')::int4"
        );
        assert_eq!(
            decode_sql(&c.field_schema(), "t.v -> 'id'"),
            "((t.v -> 'id')::jsonb #>> '{}')::int4"
        );
    }

    #[test]
    fn time_fields_are_rebuilt_with_integer_arithmetic_only() {
        let ts = decode("timestamp", None);
        assert!(
            ts.contains(&format!("when {TEXT} is null then null::timestamp")),
            "{ts}"
        );
        assert!(
            ts.contains(&format!(
                "when {TEXT} = '9223372036854775807' then 'infinity'::timestamp"
            )),
            "{ts}"
        );
        assert!(
            ts.contains(&format!(
                "when {TEXT} = '-9223372036854775808' then '-infinity'::timestamp"
            )),
            "{ts}"
        );
        assert!(
            ts.contains(&format!(
                "else 'epoch'::timestamp + format('%s days %s seconds %s microseconds', {TEXT}::int8 / 86400000000, {TEXT}::int8 % 86400000000 / 1000000, {TEXT}::int8 % 1000000)::interval end"
            )),
            "{ts}"
        );
        let time = decode("time", None);
        assert!(
            time.contains("when (($1)::jsonb #>> '{}') = '86400000000' then '24:00:00'::time"),
            "{time}"
        );
        assert!(
            time.contains(&format!(
                "else time '00:00' + format('%s seconds %s microseconds', {TEXT}::int8 / 1000000, {TEXT}::int8 % 1000000)::interval end"
            )),
            "{time}"
        );
        for sql in [&ts, &time] {
            // No floating-point step anywhere: no float types, no seconds
            // as a fraction, no interval scaled by a number.
            for bad in [
                "float",
                "double",
                "to_timestamp",
                "make_interval",
                "epoch from",
                "* interval",
                "1e6",
                "1000000.0",
            ] {
                assert!(!sql.contains(bad), "{bad} in {sql}");
            }
        }
        assert!(
            decode("date", None).contains(&format!("else date '1970-01-01' + {TEXT}::int4 end"))
        );
        assert_eq!(decode("timestamptz", None), format!("{TEXT}::timestamptz"));
        assert_eq!(decode("timetz", None), format!("{TEXT}::timetz"));
        assert_eq!(decode("interval", None), format!("{TEXT}::interval"));
    }

    #[test]
    fn strings_with_a_logical_type_get_their_type_back() {
        assert_eq!(decode("uuid", None), format!("{TEXT}::uuid"));
        assert_eq!(decode("json", None), format!("{TEXT}::json"));
        assert_eq!(decode("jsonb", None), format!("{TEXT}::json"));
    }

    #[test]
    fn arrays_come_back_as_arrays_of_their_element_type() {
        let convert = |t: &str| {
            format!("(select x.a from jsonb_to_record(jsonb_build_object('a', ($1)::jsonb)) as x(a {t}[]))")
        };
        assert_eq!(decode("_int4", Some(("int4", "b"))), convert("int4"));
        assert_eq!(decode("_int8", Some(("int8", "b"))), convert("int8"));
        assert_eq!(decode("_float8", Some(("float8", "b"))), convert("float8"));
        assert_eq!(decode("_bool", Some(("bool", "b"))), convert("bool"));
        assert_eq!(decode("_text", Some(("text", "b"))), convert("text"));
        // Other elements travel as their text.
        assert_eq!(
            decode("_timestamp", Some(("timestamp", "b"))),
            convert("text")
        );
        assert_eq!(decode("_numeric", Some(("numeric", "b"))), convert("text"));
        let bytes = decode_sql(
            &json!({"type": "array", "items": {"type": "bytes", "optional": true}, "optional": true}),
            "$1",
        );
        assert!(bytes.starts_with("(case when jsonb_typeof(($1)::jsonb) = 'array' then array(select decode(e #>> '{}', 'base64')"), "{bytes}");
        assert!(
            bytes.contains("with ordinality a(e, i) order by i"),
            "{bytes}"
        );
    }

    #[test]
    fn every_mapped_type_has_a_way_back() {
        let scalars = [
            "int2",
            "int4",
            "int8",
            "oid",
            "float4",
            "float8",
            "bool",
            "text",
            "varchar",
            "bpchar",
            "name",
            "char",
            "numeric",
            "timestamp",
            "timestamptz",
            "date",
            "time",
            "timetz",
            "interval",
            "uuid",
            "json",
            "jsonb",
            "bytea",
        ];
        let columns = scalars.map(|typname| Column::from_catalog("c", typname, "b", None, false));
        for c in columns.iter().chain(&wide_columns(&columns)) {
            let typname = &c.pg_type;
            let sql = decode_sql(&c.field_schema(), "$1");
            assert!(sql.contains("($1)::jsonb"), "{typname}: {sql}");
            // A value with a logical type or a non-string type gets a cast.
            if c.mapping.logical.is_some() || c.mapping.connect != ConnectType::String {
                assert_ne!(sql, TEXT, "{typname} comes back as bare text");
            }
        }
    }
}
