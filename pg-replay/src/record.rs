//! One archive record, decoded: a change event (Debezium's envelope, v2,
//! with Tidemark's `transaction` block) or a `timestamp+incrementing` row
//! state, with or without the Kafka Connect `{"schema", "payload"}` wrapper.
//!
//! Decoding never panics and never guesses: a line that is not one of these
//! is an error saying what is wrong with it, and the caller names the line.
//!
//! The Connect schema is most of a record's bytes and the same for every
//! record of a table until its shape changes, so it is parsed once per
//! distinct text ([`SchemaCache`]); each record only has its payload parsed.

use std::collections::HashMap;
use std::hash::{Hash as _, Hasher as _};
use std::sync::Arc;

use serde::Deserialize;
use std::borrow::Cow;

use serde_json::value::RawValue;
use serde_json::Value;

/// Why a record cannot be replayed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// Not JSON at all.
    #[error("not JSON: {0}")]
    NotJson(String),
    /// JSON, but not a change event or a row state.
    #[error("not a change event or a row state: {0}")]
    NotARecord(String),
}

/// What a change event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `c`: a row was inserted.
    Create,
    /// `u`: a row was updated.
    Update,
    /// `d`: a row was deleted.
    Delete,
    /// `r`: a row read by the initial snapshot.
    Read,
    /// `r` with `source.snapshot` `"incremental"`: a row read by an
    /// incremental snapshot (a table added while streaming, or a snapshot
    /// on demand). The archive may already hold the key (a re-snapshot), so
    /// it is an upsert: the row as it was at the chunk's place in the stream.
    IncrementalRead,
    /// `t`: the table was truncated.
    Truncate,
}

impl Op {
    fn parse(code: &str) -> Option<Self> {
        Some(match code {
            "c" => Self::Create,
            "u" => Self::Update,
            "d" => Self::Delete,
            "r" => Self::Read,
            "t" => Self::Truncate,
            _ => return None,
        })
    }

    /// The one-letter code, as the staging tables store it.
    pub fn code(self) -> char {
        match self {
            Self::Create => 'c',
            Self::Update => 'u',
            Self::Delete => 'd',
            Self::Read => 'r',
            Self::IncrementalRead => 'i',
            Self::Truncate => 't',
        }
    }
}

pub use tidemark_common::envelope::ChunkPlace;

/// A row image: its fields in the order the record lists them. Not a map:
/// a row is read once, its fields looked up in the order of the target's
/// columns (usually the same order), and the list of names is shared by
/// every row of the same shape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    names: Arc<Vec<String>>,
    values: Vec<Value>,
}

impl Row {
    /// A row of these fields.
    pub fn new(fields: Vec<(String, Value)>) -> Self {
        let (names, values) = fields.into_iter().unzip();
        Self {
            names: Arc::new(names),
            values,
        }
    }

    /// The value of field `name`; `hint` is where to look first.
    pub fn get_at(&self, name: &str, hint: usize) -> Option<&Value> {
        let i = match self.names.get(hint) {
            Some(n) if n == name => hint,
            _ => self.names.iter().position(|n| n == name)?,
        };
        self.values.get(i)
    }

    /// The value of field `name`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.get_at(name, 0)
    }

    /// The field names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }
}

/// Reads a row object, reusing the last row's list of names when the
/// names are the same.
struct RowSeed<'c> {
    last: &'c mut Arc<Vec<String>>,
}

impl<'de> serde::de::DeserializeSeed<'de> for RowSeed<'_> {
    type Value = Row;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Row, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for RowSeed<'_> {
    type Value = Row;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a row object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Row, A::Error> {
        let mut values = Vec::with_capacity(self.last.len());
        let mut same = true;
        let mut names: Vec<String> = Vec::new();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let i = values.len();
            if same && self.last.get(i).is_none_or(|n| *n != *key) {
                same = false;
                names = self.last.iter().take(i).cloned().collect();
            }
            if !same {
                names.push(key.into_owned());
            }
            values.push(map.next_value::<Value>()?);
        }
        if same && values.len() != self.last.len() {
            same = false;
            names = self.last.iter().take(values.len()).cloned().collect();
        }
        if !same {
            *self.last = Arc::new(names);
        }
        Ok(Row {
            names: self.last.clone(),
            values,
        })
    }
}

/// A field of a row struct: its name and its Connect field schema (which
/// the codec reads the value back with).
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    /// The column name.
    pub name: String,
    /// The field schema as the record carries it.
    pub schema: Value,
}

impl Field {
    /// The source column's exact SQL type, when the record carries it
    /// (`tidemark.column.type`).
    pub fn column_type(&self) -> Option<&str> {
        self.param("tidemark.column.type")
    }

    /// The source column's `pg_attribute.attnum`, when the record carries
    /// it (`tidemark.column.attnum`): the same column under any name, never
    /// another's (attnums are not reused within one table; see
    /// [`RowSchema::table_oid`]).
    pub fn attnum(&self) -> Option<i32> {
        self.param("tidemark.column.attnum")?.parse().ok()
    }

    /// The field's position in the source table's primary key (1-based),
    /// when the record says (`tidemark.column.key`).
    pub fn key_position(&self) -> Option<u32> {
        self.param("tidemark.column.key")?.parse().ok()
    }

    /// Whether the field may be null.
    pub fn optional(&self) -> bool {
        self.schema
            .get("optional")
            .and_then(Value::as_bool)
            .unwrap_or(true)
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.schema.get("parameters")?.get(name)?.as_str()
    }
}

/// The fields of a row, in the order the record's schema lists them.
#[derive(Debug, Clone, PartialEq)]
pub struct RowSchema {
    /// The fields.
    pub fields: Vec<Field>,
    /// The source table's `pg_class` OID, when the record carries it
    /// (the struct's `tidemark.table.oid`): the table the fields' attnums
    /// belong to. A table dropped and created again under its name has
    /// another, and attnums counted again, so an attnum of another OID is
    /// another column.
    pub table_oid: Option<u32>,
}

impl RowSchema {
    fn from_struct(schema: &Value) -> Option<Self> {
        let table_oid = schema
            .get("parameters")
            .and_then(|p| p.get("tidemark.table.oid"))
            .and_then(Value::as_str)
            .and_then(|t| t.parse().ok());
        let fields = schema.get("fields")?.as_array()?;
        let mut out = Vec::with_capacity(fields.len());
        for f in fields {
            let name = f.get("field")?.as_str()?.to_owned();
            out.push(Field {
                name,
                schema: f.clone(),
            });
        }
        Some(Self {
            fields: out,
            table_oid,
        })
    }

    /// The field named `name`.
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }
}

/// The schema of a record, parsed once per distinct text.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordSchema {
    /// Row fields (a change event's `after`, else `before`; a row state's).
    pub row: Option<Arc<RowSchema>>,
    /// The struct's `name`: a row state's table name, as pg-source writes it.
    pub name: Option<String>,
    /// A number that differs between distinct schemas (for change detection).
    pub id: u64,
}

/// Distinct schemas seen so far, by their text.
#[derive(Debug, Default)]
pub struct SchemaCache {
    by_hash: HashMap<u64, Vec<CachedSchema>>,
    next_id: u64,
    entries: usize,
}

/// A schema's text and what it parsed to.
type CachedSchema = (Vec<u8>, Arc<RecordSchema>);

/// Distinct schema texts kept; past this the cache starts over (a table
/// whose shape changes at every record would otherwise grow it forever).
const SCHEMA_CACHE_ENTRIES: usize = 4096;

impl SchemaCache {
    fn get(&mut self, text: &[u8]) -> Result<Arc<RecordSchema>, RecordError> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        let hash = h.finish();
        if let Some(found) = self
            .by_hash
            .get(&hash)
            .and_then(|v| v.iter().find(|(t, _)| t == text))
        {
            return Ok(found.1.clone());
        }
        let value: Value =
            serde_json::from_slice(text).map_err(|e| RecordError::NotJson(e.to_string()))?;
        self.next_id += 1;
        let schema = Arc::new(parse_schema(&value, self.next_id));
        if self.entries >= SCHEMA_CACHE_ENTRIES {
            self.by_hash.clear();
            self.entries = 0;
        }
        self.entries += 1;
        self.by_hash
            .entry(hash)
            .or_default()
            .push((text.to_vec(), schema.clone()));
        Ok(schema)
    }
}

fn parse_schema(value: &Value, id: u64) -> RecordSchema {
    let name = value.get("name").and_then(Value::as_str).map(str::to_owned);
    let fields = value.get("fields").and_then(Value::as_array);
    // An envelope's fields are before, after, source, op, ...; a row
    // state's are the columns.
    let envelope_row = fields.and_then(|fs| {
        let find = |n: &str| {
            fs.iter()
                .find(|f| f.get("field").and_then(Value::as_str) == Some(n))
        };
        match (find("after").or_else(|| find("before")), find("op")) {
            (Some(row), Some(_)) => Some(RowSchema::from_struct(row)),
            _ => None,
        }
    });
    let row = match envelope_row {
        Some(row) => row,
        None => RowSchema::from_struct(value),
    };
    RecordSchema {
        row: row.map(Arc::new),
        name,
        id,
    }
}

/// The `transaction` block of a v2 change event.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TxBlock {
    /// `"<txId>:<commit_order>"`.
    #[serde(default)]
    pub id: Option<String>,
    /// 1-based place of the event in its unit.
    pub total_order: i64,
    /// 1-based place among the unit's events of this table.
    #[serde(default)]
    pub data_collection_order: Option<i64>,
    /// The unit's place in the source's commit order.
    pub commit_order: i64,
    /// The unit's number of events; only on its last event.
    #[serde(default)]
    pub event_count: Option<i64>,
    /// The commit_order of the unit the connector sent before this one
    /// (null for its first), when the archive carries it.
    #[serde(default, deserialize_with = "present")]
    pub prev_commit_order: Option<Option<i64>>,
}

/// Tells a field that is present with `null` (`Some(None)`) from one that is
/// absent (`None`, by `default`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
    Option::<i64>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct RawSource<'a> {
    #[serde(default, borrow)]
    version: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default)]
    ts_ms: Option<i64>,
    #[serde(default)]
    ts_us: Option<i64>,
    #[serde(default)]
    snapshot: Option<Value>,
    #[serde(default, borrow)]
    snapshot_chunk: Option<Cow<'a, str>>,
    #[serde(borrow)]
    schema: Cow<'a, str>,
    #[serde(borrow)]
    table: Cow<'a, str>,
    #[serde(rename = "txId", default)]
    tx_id: Option<i64>,
    #[serde(default)]
    lsn: Option<i64>,
}

/// A change event as it is first read: the row images left as text until
/// it is known which one is needed.
#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(default, borrow)]
    before: Option<&'a RawValue>,
    #[serde(default, borrow)]
    after: Option<&'a RawValue>,
    #[serde(borrow)]
    source: RawSource<'a>,
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(default)]
    transaction: Option<TxBlock>,
}

/// A decoded change event.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeRecord {
    /// What happened.
    pub op: Op,
    /// The row a delete removed (`before`); only deletes carry it here.
    pub before: Option<Row>,
    /// The row a create, update or snapshot read leaves (`after`).
    pub after: Option<Row>,
    /// The connector (`source.name`).
    pub connector: Arc<str>,
    /// Source schema.
    pub schema_name: Arc<str>,
    /// Source table.
    pub table: Arc<str>,
    /// The unit's commit time, µs since the epoch (`source.ts_us`, else
    /// `ts_ms` * 1000).
    pub ts_us: i64,
    /// The writing transaction.
    pub tx_id: Option<i64>,
    /// Logical mode: the change's WAL position.
    pub lsn: Option<i64>,
    /// `source.snapshot` as text (`"false"` when absent).
    pub snapshot: String,
    /// An incremental snapshot's event: where its chunk stands in the
    /// snapshot (`source.snapshot_chunk`).
    pub chunk: Option<ChunkPlace>,
    /// The unit this event belongs to; `None` for events without the
    /// `transaction` block (Tidemark 0.1's).
    pub tx: Option<TxBlock>,
    /// The record's schema, when it carries one.
    pub schema: Option<Arc<RecordSchema>>,
}

impl ChangeRecord {
    /// The row image the event leaves behind, or the deleted one.
    pub fn row(&self) -> Option<&Row> {
        self.after.as_ref().or(self.before.as_ref())
    }
}

/// A `timestamp+incrementing` row state: a row's whole state at the time it
/// was read; no transaction, and deletes are never seen.
#[derive(Debug, Clone, PartialEq)]
pub struct RowStateRecord {
    /// The row.
    pub row: Row,
    /// The record's schema, when it carries one (its `name` is the table).
    pub schema: Option<Arc<RecordSchema>>,
}

/// A decoded archive record. (Records are handled one at a time, so the
/// size difference of the variants costs nothing.)
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Record {
    /// A change event.
    Change(ChangeRecord),
    /// A row state.
    RowState(RowStateRecord),
}

/// Decodes records, keeping the schemas, names and row shapes seen.
#[derive(Debug, Default)]
pub struct Decoder {
    schemas: SchemaCache,
    names: Interner,
    row_names: Arc<Vec<String>>,
}

/// Shares the strings that repeat in every event (connector, schema,
/// table names).
#[derive(Debug, Default)]
struct Interner {
    strings: Vec<Arc<str>>,
}

impl Interner {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(found) = self.strings.iter().find(|x| &***x == s) {
            return found.clone();
        }
        // A few distinct names; a flood of them is not kept.
        if self.strings.len() >= 256 {
            self.strings.clear();
        }
        let a: Arc<str> = Arc::from(s);
        self.strings.push(a.clone());
        a
    }
}

impl Decoder {
    /// A decoder with an empty schema cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes one record.
    ///
    /// Fails when the bytes are not JSON, or are JSON but neither a change
    /// event nor a row state (saying what is missing).
    pub fn decode(&mut self, bytes: &[u8]) -> Result<Record, RecordError> {
        match split_wrapper(bytes)? {
            Split::Wrapped { schema, payload } => {
                let schema = match schema {
                    b"null" => None,
                    text => Some(self.schemas.get(text)?),
                };
                self.payload(payload, schema)
            }
            Split::Bare(payload) => self.payload(payload, None),
        }
    }
}

/// A record's parts.
enum Split<'a> {
    /// `{"schema": S, "payload": P}`: the texts of S and P.
    Wrapped { schema: &'a [u8], payload: &'a [u8] },
    /// A bare payload: its text.
    Bare(&'a [u8]),
}

/// Splits `{"schema": S, "payload": P}` into S and P without parsing S into
/// values (it is parsed once per distinct text); anything else is a bare
/// payload.
fn split_wrapper(bytes: &[u8]) -> Result<Split<'_>, RecordError> {
    let trimmed = trim(bytes);
    // The common case, as Kafka Connect's JsonConverter and pg-source write
    // it: `{"schema":` first, then `,"payload":`.
    const HEAD: &[u8] = br#"{"schema":"#;
    if let Some(rest) = trimmed.strip_prefix(HEAD) {
        let schema_len = json_value_len(rest)?;
        let (schema, after) = rest.split_at(schema_len);
        let after = trim(after);
        const MID: &[u8] = br#","payload":"#;
        if let Some(payload) = after.strip_prefix(MID) {
            if let Some(payload) = trim(payload).strip_suffix(b"}") {
                let payload = trim(payload);
                if json_value_len(payload)? == payload.len() {
                    return Ok(Split::Wrapped {
                        schema: trim(schema),
                        payload,
                    });
                }
            }
        }
    }
    // Anything else: an object without the wrapper, or not a record.
    if trimmed.first() == Some(&b'{') && !trimmed.starts_with(HEAD) {
        return Ok(Split::Bare(trimmed));
    }
    let value: Value =
        serde_json::from_slice(trimmed).map_err(|e| RecordError::NotJson(e.to_string()))?;
    match value {
        Value::Object(o) if o.contains_key("schema") && o.contains_key("payload") => {
            Err(RecordError::NotARecord(
                "the Connect wrapper must be exactly {\"schema\": ..., \"payload\": ...} in this order, as Kafka Connect's JsonConverter writes it"
                    .into(),
            ))
        }
        Value::Object(_) => Ok(Split::Bare(trimmed)),
        other => Err(RecordError::NotARecord(format!(
            "expected a JSON object, found {}",
            kind(&other)
        ))),
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}

/// The length of the JSON value at the start of `b`.
fn json_value_len(b: &[u8]) -> Result<usize, RecordError> {
    let mut stream = serde_json::Deserializer::from_slice(b).into_iter::<serde::de::IgnoredAny>();
    match stream.next() {
        Some(Ok(_)) => Ok(stream.byte_offset()),
        Some(Err(e)) => Err(RecordError::NotJson(e.to_string())),
        None => Err(RecordError::NotJson("empty".into())),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Decoder {
    fn payload(
        &mut self,
        payload: &[u8],
        schema: Option<Arc<RecordSchema>>,
    ) -> Result<Record, RecordError> {
        // The common case in one pass: a change event. Checked as UTF-8 at
        // once (the parser then need not check each string); a line that is
        // not UTF-8 is parsed as bytes, for the parser's own error.
        let parsed = match std::str::from_utf8(payload) {
            Ok(text) => serde_json::from_str::<RawEvent<'_>>(text),
            Err(_) => serde_json::from_slice::<RawEvent<'_>>(payload),
        };
        let raw: RawEvent<'_> = match parsed {
            Ok(raw) => raw,
            Err(first) => return not_an_event(payload, schema, first),
        };
        if let Some(version) = &raw.source.version {
            check_version(version)?;
        }
        let mut op = Op::parse(&raw.op)
            .ok_or_else(|| RecordError::NotARecord(format!("unknown op {:?}", raw.op)))?;
        if op == Op::Read
            && matches!(&raw.source.snapshot, Some(Value::String(s)) if s == "incremental")
        {
            op = Op::IncrementalRead;
        }
        let image = match op {
            Op::Create | Op::Read | Op::IncrementalRead | Op::Update => match raw.after {
                Some(a) if a.get() != "null" => Some(a),
                _ => {
                    return Err(RecordError::NotARecord(format!(
                        "op {} without \"after\"",
                        raw.op
                    )))
                }
            },
            Op::Delete => match raw.before {
                Some(b) if b.get() != "null" => Some(b),
                _ => return Err(RecordError::NotARecord("op d without \"before\"".into())),
            },
            Op::Truncate => None,
        };
        let row = match image {
            Some(text) => {
                let mut de = serde_json::Deserializer::from_str(text.get());
                let row = serde::de::DeserializeSeed::deserialize(
                    RowSeed {
                        last: &mut self.row_names,
                    },
                    &mut de,
                )
                .map_err(|e| {
                    RecordError::NotARecord(format!("a row image that is not an object: {e}"))
                })?;
                Some(row)
            }
            None => None,
        };
        let ts_us = match (raw.source.ts_us, raw.source.ts_ms) {
            (Some(us), _) => us,
            (None, Some(ms)) => ms.saturating_mul(1000),
            (None, None) => {
                return Err(RecordError::NotARecord(
                    "source has neither ts_us nor ts_ms".into(),
                ))
            }
        };
        if let Some(tx) = &raw.transaction {
            if tx.total_order < 1 {
                return Err(RecordError::NotARecord(format!(
                    "transaction.total_order {} is not 1 or more",
                    tx.total_order
                )));
            }
            if let Some(n) = tx.event_count {
                if n < tx.total_order {
                    return Err(RecordError::NotARecord(format!(
                        "transaction.event_count {n} is below this event's total_order {}",
                        tx.total_order
                    )));
                }
            }
        }
        let snapshot = match raw.source.snapshot {
            Some(Value::String(s)) => s,
            Some(Value::Bool(b)) => b.to_string(),
            _ => "false".to_owned(),
        };
        let (before, after) = match op {
            Op::Delete => (row, None),
            _ => (None, row),
        };
        let chunk = match raw.source.snapshot_chunk.as_deref() {
            None => None,
            Some("first") => Some(ChunkPlace::First),
            Some("middle") => Some(ChunkPlace::Middle),
            Some("last") => Some(ChunkPlace::Last),
            Some("only") => Some(ChunkPlace::Only),
            Some(other) => {
                return Err(RecordError::NotARecord(format!(
                    "unknown source.snapshot_chunk {other:?} (first, middle, last or only)"
                )))
            }
        };
        Ok(Record::Change(ChangeRecord {
            op,
            before,
            after,
            connector: self.names.get(raw.source.name.as_deref().unwrap_or("")),
            schema_name: self.names.get(&raw.source.schema),
            table: self.names.get(&raw.source.table),
            ts_us,
            tx_id: raw.source.tx_id,
            lsn: raw.source.lsn,
            snapshot,
            chunk,
            tx: raw.transaction,
            schema,
        }))
    }
}

/// Refuses a Tidemark envelope (`source.version` `tidemark-X.Y.Z`) of a
/// release after this one: its events may mean something this pg-replay
/// does not know. Tidemark 0.1 (envelope 1) up to this release are read;
/// another connector's version string (Debezium's) is left alone.
fn check_version(version: &str) -> Result<(), RecordError> {
    let Some(rest) = version.strip_prefix("tidemark-") else {
        return Ok(());
    };
    let release = |text: &str| -> Option<(u64, u64)> {
        let mut parts = text.split(['.', '-', '+']);
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    };
    let ours = release(env!("CARGO_PKG_VERSION")).expect("the package version is X.Y.Z");
    match release(rest) {
        Some(theirs) if theirs >= (0, 1) && theirs <= ours => Ok(()),
        Some(_) => Err(RecordError::NotARecord(format!(
            "envelope version {version} is of a later Tidemark than this pg-replay ({}), which reads \
             tidemark-0.1 to tidemark-{}.{}: replay it with the pg-replay of that release",
            env!("CARGO_PKG_VERSION"),
            ours.0,
            ours.1
        ))),
        None => Err(RecordError::NotARecord(format!(
            "unknown envelope version {version:?} (expected tidemark-X.Y.Z)"
        ))),
    }
}

/// A payload that did not read as a change event: a row state, or not a
/// record (and why).
fn not_an_event(
    payload: &[u8],
    schema: Option<Arc<RecordSchema>>,
    first: serde_json::Error,
) -> Result<Record, RecordError> {
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| RecordError::NotJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(RecordError::NotARecord(format!(
            "the payload is {}, not an object",
            kind(&value)
        )));
    };
    if obj.contains_key("op") && obj.contains_key("source") {
        return Err(RecordError::NotARecord(format!(
            "a malformed change event: {first}"
        )));
    }
    if obj.contains_key("op") || obj.contains_key("source") || obj.contains_key("before") {
        return Err(RecordError::NotARecord(
            "a change event needs both \"op\" and \"source\"".into(),
        ));
    }
    let row = Row::new(obj.into_iter().collect());
    Ok(Record::RowState(RowStateRecord { row, schema }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A v2 change event line as pg-source writes it (schema optional).
    pub fn event_line(
        op: &str,
        before: Value,
        after: Value,
        table: &str,
        tx: Value,
        with_schema: bool,
    ) -> Vec<u8> {
        let payload = json!({
            "before": before, "after": after,
            "source": {"version": "tidemark-0.2.0", "connector": "tidemark", "name": "src",
                       "ts_ms": 1_700_000_000_000i64, "ts_us": 1_700_000_000_000_000i64,
                       "snapshot": "false", "db": "db", "sequence": null, "schema": "public",
                       "table": table, "txId": 7, "lsn": null, "xmin": null},
            "transaction": tx,
            "op": op, "ts_ms": 1_700_000_000_001i64,
        });
        let v = if with_schema {
            json!({"schema": {"type": "struct", "name": "src.public.t.Envelope", "fields": [
                {"field": "before", "type": "struct", "optional": true, "fields": [
                    {"field": "id", "type": "int32", "optional": false},
                    {"field": "data", "type": "string", "optional": true}]},
                {"field": "after", "type": "struct", "optional": true, "fields": [
                    {"field": "id", "type": "int32", "optional": false},
                    {"field": "data", "type": "string", "optional": true}]},
                {"field": "source", "type": "struct", "fields": []},
                {"field": "op", "type": "string"}]},
                "payload": payload})
        } else {
            payload
        };
        serde_json::to_vec(&v).unwrap()
    }

    fn tx(co: i64, ord: i64, count: Option<i64>) -> Value {
        json!({"id": format!("7:{co}"), "total_order": ord, "data_collection_order": ord,
               "commit_order": co, "event_count": count, "data_collections": null})
    }

    #[test]
    fn change_events_decode_with_and_without_schema() {
        let mut d = Decoder::new();
        for with_schema in [true, false] {
            let line = event_line(
                "u",
                json!({"id": 1, "data": "a"}),
                json!({"id": 1, "data": "b"}),
                "t",
                tx(42, 2, Some(2)),
                with_schema,
            );
            let Record::Change(c) = d.decode(&line).unwrap() else {
                panic!("not a change")
            };
            assert_eq!(c.op, Op::Update);
            assert_eq!(&*c.table, "t");
            assert_eq!(c.ts_us, 1_700_000_000_000_000);
            let t = c.tx.unwrap();
            assert_eq!(
                (t.commit_order, t.total_order, t.event_count),
                (42, 2, Some(2))
            );
            assert_eq!(t.prev_commit_order, None);
            let after = c.after.unwrap();
            assert_eq!(after.get("data").unwrap(), "b");
            assert!(c.before.is_none(), "only the image the op needs is read");
            assert_eq!(c.schema.is_some(), with_schema);
            if with_schema {
                let s = c.schema.unwrap();
                let row = s.row.as_ref().unwrap();
                assert_eq!(row.fields[0].name, "id");
            }
        }
    }

    #[test]
    fn the_source_table_oid_is_read_from_the_row_struct() {
        let mut d = Decoder::new();
        let line = event_line(
            "c",
            Value::Null,
            json!({"id": 1, "data": "a"}),
            "t",
            tx(1, 1, Some(1)),
            true,
        );
        let mut v: Value = serde_json::from_slice(&line).unwrap();
        let Record::Change(c) = d.decode(&line).unwrap() else {
            panic!("not a change")
        };
        let row = c.schema.unwrap().row.clone().unwrap();
        assert_eq!(row.table_oid, None, "an archive without it");
        for part in [0, 1] {
            v["schema"]["fields"][part]["parameters"] = json!({"tidemark.table.oid": "16400"});
        }
        let Record::Change(c) = d.decode(&serde_json::to_vec(&v).unwrap()).unwrap() else {
            panic!("not a change")
        };
        let row = c.schema.unwrap().row.clone().unwrap();
        assert_eq!(row.table_oid, Some(16400));
        assert_eq!(row.fields.len(), 2);
    }

    #[test]
    fn the_schema_is_parsed_once_per_text() {
        let mut d = Decoder::new();
        let a = event_line(
            "c",
            Value::Null,
            json!({"id": 1}),
            "t",
            tx(1, 1, Some(1)),
            true,
        );
        let b = event_line(
            "c",
            Value::Null,
            json!({"id": 2}),
            "t",
            tx(2, 1, Some(1)),
            true,
        );
        let (Record::Change(x), Record::Change(y)) = (d.decode(&a).unwrap(), d.decode(&b).unwrap())
        else {
            panic!()
        };
        assert!(Arc::ptr_eq(
            x.schema.as_ref().unwrap(),
            y.schema.as_ref().unwrap()
        ));
    }

    #[test]
    fn rows_of_one_shape_share_their_names() {
        let mut d = Decoder::new();
        let a = event_line(
            "c",
            Value::Null,
            json!({"id": 1, "data": "a"}),
            "t",
            tx(1, 1, Some(1)),
            false,
        );
        let b = event_line(
            "c",
            Value::Null,
            json!({"id": 2, "data": "b"}),
            "t",
            tx(2, 1, Some(1)),
            false,
        );
        let c = event_line(
            "c",
            Value::Null,
            json!({"id": 3, "x": "c"}),
            "t",
            tx(3, 1, Some(1)),
            false,
        );
        let rows: Vec<Row> = [a, b, c]
            .iter()
            .map(|l| match d.decode(l).unwrap() {
                Record::Change(c) => c.after.unwrap(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(Arc::ptr_eq(&rows[0].names, &rows[1].names));
        assert_eq!(rows[2].names().collect::<Vec<_>>(), ["id", "x"]);
        assert_eq!(rows[2].get("x").unwrap(), "c");
        assert_eq!(rows[1].get_at("data", 1).unwrap(), "b");
        assert_eq!(rows[1].get("nope"), None);
    }

    #[test]
    fn prev_commit_order_null_is_told_from_absent() {
        let mut d = Decoder::new();
        let mut t = tx(5, 1, Some(1));
        t["prev_commit_order"] = Value::Null;
        let line = event_line("c", Value::Null, json!({"id": 1}), "t", t, false);
        let Record::Change(c) = d.decode(&line).unwrap() else {
            panic!()
        };
        assert_eq!(c.tx.unwrap().prev_commit_order, Some(None));
    }

    #[test]
    fn row_states_decode() {
        let mut d = Decoder::new();
        let line = br#"{"schema":{"type":"struct","fields":[{"type":"int32","optional":false,"field":"id"}],"optional":false,"name":"streaming_update_table"},"payload":{"id":1}}"#;
        let Record::RowState(r) = d.decode(line).unwrap() else {
            panic!()
        };
        assert_eq!(r.row.get("id").unwrap(), 1);
        assert_eq!(
            r.schema.unwrap().name.as_deref(),
            Some("streaming_update_table")
        );
        let Record::RowState(r) = d.decode(br#"{"id":2}"#).unwrap() else {
            panic!()
        };
        assert_eq!(r.row.get("id").unwrap(), 2);
    }

    #[test]
    fn envelopes_of_this_release_and_before_and_other_connectors_decode() {
        let mut d = Decoder::new();
        for version in [
            "tidemark-0.1.0",
            "tidemark-0.2.0",
            "tidemark-0.2.7",
            "2.7.0.Final",
        ] {
            let line = format!(
                r#"{{"op":"c","source":{{"version":"{version}","schema":"s","table":"t","ts_ms":1}},"after":{{"id":1}}}}"#
            );
            assert!(d.decode(line.as_bytes()).is_ok(), "{version}");
        }
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        let mut d = Decoder::new();
        let cases: &[(&[u8], &str)] = &[
            (b"", "not JSON"),
            (b"hello", "not JSON"),
            (b"[1,2]", "expected a JSON object"),
            (b"42", "expected a JSON object"),
            (br#"{"schema":{},"payload":3}"#, "not an object"),
            (br#"{"op":"c"}"#, "needs both"),
            (br#"{"op":"x","source":{"schema":"s","table":"t","ts_ms":1},"after":{}}"#, "unknown op"),
            (br#"{"op":"c","source":{"schema":"s","table":"t","ts_ms":1},"after":null}"#, "without \"after\""),
            (br#"{"op":"d","source":{"schema":"s","table":"t","ts_ms":1},"before":null}"#, "without \"before\""),
            (br#"{"op":"c","source":{"schema":"s","table":"t"},"after":{}}"#, "neither ts_us"),
            (br#"{"op":"c","source":{"schema":"s","table":"t","ts_ms":1},"after":{},"transaction":{"total_order":0,"commit_order":1}}"#, "total_order 0"),
            (br#"{"op":"c","source":{"schema":"s","table":"t","ts_ms":1},"after":{},"transaction":{"total_order":3,"commit_order":1,"event_count":2}}"#, "below"),
            (br#"{"schema":{"a":1},"payload":{"id":1}} trailing"#, "not JSON"),
            (br#"{"op":"c","source":{"version":"tidemark-9.0.0","schema":"s","table":"t","ts_ms":1},"after":{}}"#,
             "envelope version tidemark-9.0.0 is of a later Tidemark"),
            (br#"{"op":"c","source":{"version":"tidemark-0.99.1","schema":"s","table":"t","ts_ms":1},"after":{}}"#,
             "envelope version tidemark-0.99.1 is of a later Tidemark"),
            (br#"{"op":"c","source":{"version":"tidemark-x","schema":"s","table":"t","ts_ms":1},"after":{}}"#,
             "unknown envelope version \"tidemark-x\""),
        ];
        for (line, want) in cases {
            let err = d.decode(line).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{}: {err}",
                String::from_utf8_lossy(line)
            );
        }
    }
}
