//! The record envelope: how a Postgres row becomes a Kafka record, and how a
//! record is read back.
//!
//! Records use Kafka Connect's JsonConverter format with schemas enabled,
//! `{"schema": {...}, "payload": {...}}`, so existing Connect sinks read them.
//! Unlike the JDBC connector's records they lose nothing:
//!
//! - `timestamp` is int64 microseconds (`io.debezium.time.MicroTimestamp`),
//!   `timestamptz` an ISO-8601 string in UTC (`io.debezium.time.ZonedTimestamp`);
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

/// The mapping of a scalar Postgres type by `pg_type.typname` and `typtype`.
pub fn map_type(typname: &str, typtype: &str) -> Mapping {
    use ConnectType::*;
    const AS_IS: &str = "{c}";
    const AS_TEXT: &str = "{c}::text";
    const MICROS: &str = "case when {c} is null then null when isfinite({c}) then (extract(epoch from {c}) * 1000000)::bigint when {c} > 'epoch' then 9223372036854775807 else -9223372036854775808 end";
    match (typname, typtype) {
        ("int2", _) => Mapping::new(Int16, None, AS_IS),
        ("int4", _) => Mapping::new(Int32, None, AS_IS),
        ("int8", _) | ("oid", _) => Mapping::new(Int64, None, AS_IS),
        ("float4", _) => Mapping::new(Float32, None, AS_IS),
        ("float8", _) => Mapping::new(Float64, None, AS_IS),
        ("bool", _) => Mapping::new(Boolean, None, AS_IS),
        ("text" | "varchar" | "bpchar" | "name" | "char", _) => Mapping::new(String, None, AS_IS),
        ("numeric", _) => Mapping::new(String, None, AS_TEXT),
        ("timestamp", _) => Mapping::new(Int64, Some("io.debezium.time.MicroTimestamp"), MICROS),
        ("timestamptz", _) => Mapping::new(
            String,
            Some("io.debezium.time.ZonedTimestamp"),
            "case when isfinite({c}) then to_char({c} at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') else {c}::text end",
        ),
        ("date", _) => Mapping::new(
            Int32,
            Some("io.debezium.time.Date"),
            "case when isfinite({c}) then {c} - date '1970-01-01' else null end",
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
pub fn payload_sql(columns: &[Column], qualifier: &str) -> String {
    let exprs: Vec<String> = columns.iter().map(|c| c.select_expr(qualifier)).collect();
    format!(
        "(select row_to_json(p) from (select {}) p)::text",
        exprs.join(", ")
    )
}

/// A pre-rendered schema: records are `prefix + payload + "}"`, so the hot
/// path copies bytes and never serialises the schema again.
#[derive(Debug, Clone)]
pub struct RecordTemplate {
    prefix: Vec<u8>,
}

impl RecordTemplate {
    /// A template for records with `schema`.
    pub fn new(schema: &Value) -> Self {
        let mut prefix = br#"{"schema":"#.to_vec();
        serde_json::to_writer(&mut prefix, schema).expect("a schema always serialises");
        prefix.extend_from_slice(br#","payload":"#);
        Self { prefix }
    }

    /// A record with `payload`, which must be one JSON value (Postgres'
    /// `row_to_json` output is).
    pub fn render(&self, payload: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.prefix.len() + payload.len() + 1);
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(payload.as_bytes());
        out.push(b'}');
        out
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
            sql.contains(r#"extract(epoch from t."last_updated")"#),
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
}
