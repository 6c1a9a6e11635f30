//! Rows: a list of named, typed columns encoded from their text into the
//! record's JSON and described by a Connect struct schema.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::json::{escape_json_into, is_json_number, is_pg_integer};
use super::text::{parse_array, parse_record, ArrayText, Dim, Field};
use super::time::{self, Instant};
use super::types::{length_and_scale, ColumnType, Oid, PgType, TypeKind};
use super::CodecError;

/// Connect logical names the codec writes.
pub mod logical {
    /// `timestamp` as int64 microseconds since 1970.
    pub const MICRO_TIMESTAMP: &str = "io.debezium.time.MicroTimestamp";
    /// `timestamp` beyond int64 microseconds, as ISO text.
    pub const ISO_TIMESTAMP: &str = "io.debezium.time.IsoTimestamp";
    /// `timestamptz` as ISO text in UTC.
    pub const ZONED_TIMESTAMP: &str = "io.debezium.time.ZonedTimestamp";
    /// `date` as int32 days since 1970.
    pub const DATE: &str = "io.debezium.time.Date";
    /// `time` as int64 microseconds since midnight.
    pub const MICRO_TIME: &str = "io.debezium.time.MicroTime";
    /// `timetz` as its text.
    pub const ZONED_TIME: &str = "io.debezium.time.ZonedTime";
    /// `interval` as its ISO 8601 text.
    pub const INTERVAL: &str = "io.debezium.time.Interval";
    /// `uuid` as its text.
    pub const UUID: &str = "io.debezium.data.Uuid";
    /// `json` and `jsonb` as their text.
    pub const JSON: &str = "io.debezium.data.Json";
    /// Enum labels.
    pub const ENUM: &str = "io.debezium.data.Enum";
    /// A value carried as its exact Postgres text because its column's usual
    /// mapping cannot carry it (a float `NaN`, an array with lower bounds
    /// other than 1).
    pub const PG_TEXT: &str = "tidemark.data.PgText";
}

/// Schema parameter names.
pub mod param {
    /// Debezium's source type name (`typname`, upper case).
    pub const SOURCE_TYPE: &str = "__debezium.source.column.type";
    /// Debezium's source length (character and bit strings, `numeric`
    /// precision).
    pub const SOURCE_LENGTH: &str = "__debezium.source.column.length";
    /// Debezium's source scale (`numeric` scale, fractional-second digits).
    pub const SOURCE_SCALE: &str = "__debezium.source.column.scale";
    /// The exact SQL type, `format_type(oid, typmod)`.
    pub const COLUMN_TYPE: &str = "tidemark.column.type";
    /// The array element delimiter, only where it is not `,` (`box[]`).
    pub const ARRAY_DELIMITER: &str = "tidemark.array.delimiter";
    /// A primary-key column's 1-based position in the key (absent on other
    /// columns), so that playback can create the table from the records.
    pub const COLUMN_KEY: &str = "tidemark.column.key";
    /// The column's `pg_attribute.attnum` in the source, where known.
    pub const COLUMN_ATTNUM: &str = "tidemark.column.attnum";
    /// The source table's `pg_class` OID, where known, as a parameter of
    /// the row struct schema (a change event's `before` and `after`, a row
    /// state's value), not of a field: attnums are a column's identity
    /// within one table only, and a table dropped and created again under
    /// its name has another OID and attnums counted again from 1.
    pub const TABLE_OID: &str = "tidemark.table.oid";
}

/// How one value of a column was carried, when its column's usual schema
/// would not carry it exactly. A record's schema is the one of its values'
/// variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// The column's usual schema.
    Default,
    /// A `timestamp` past int64 microseconds: an `io.debezium.time.IsoTimestamp`
    /// string.
    IsoTimestamp,
    /// The value's exact Postgres text, a `tidemark.data.PgText` string.
    PgText,
    /// An array of this many dimensions (2 to 6): nested arrays, with a
    /// schema nested as deep.
    Dims(u8),
}

/// The variants of one row's values; all [`Variant::Default`] (the common
/// case) costs no allocation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Variants(Option<Box<[Variant]>>);

impl Variants {
    /// Whether every value has its column's usual schema.
    pub fn is_default(&self) -> bool {
        self.0.is_none()
    }

    /// The variant of column `i`.
    pub fn get(&self, i: usize) -> Variant {
        self.0
            .as_ref()
            .and_then(|v| v.get(i).copied())
            .unwrap_or(Variant::Default)
    }

    fn set(&mut self, i: usize, n: usize, v: Variant) {
        if v != Variant::Default {
            self.0
                .get_or_insert_with(|| vec![Variant::Default; n].into_boxed_slice())[i] = v;
        }
    }
}

/// A column of a row: its name, type and whether it may be NULL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSpec {
    /// The column's name.
    pub name: String,
    /// Its type.
    pub ty: ColumnType,
    /// `attnotnull`: the field schema is not optional.
    pub not_null: bool,
    /// `pg_attribute.attnum`, where the caller knows it: the field schema's
    /// `tidemark.column.attnum`.
    pub attnum: Option<i32>,
    /// The 1-based position in the primary key, for a key column: the field
    /// schema's `tidemark.column.key`. [`RowCodec::keyed`] sets it.
    pub key_position: Option<u32>,
}

impl ColumnSpec {
    /// A column with no known attnum, not in the key.
    pub fn new(name: impl Into<String>, ty: ColumnType, not_null: bool) -> Self {
        Self {
            name: name.into(),
            ty,
            not_null,
            attnum: None,
            key_position: None,
        }
    }
}

/// How a scalar (or an array element) maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scalar {
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    Bool,
    /// Text-like types and `numeric`: a JSON string of the text.
    Text,
    /// `inet`: its text with the netmask always shown.
    Inet,
    Bytea,
    Timestamp,
    Timestamptz,
    Date,
    Time,
    /// A string with a logical name.
    Named(&'static str),
    /// `interval`: a string with its logical name, checked to be ISO 8601.
    Interval,
}

impl Scalar {
    /// The mapping of a type that is not a domain, array or vector.
    fn of(ty: &PgType) -> Self {
        match ty.base().kind {
            TypeKind::Bool => Self::Bool,
            TypeKind::Int2 => Self::Int16,
            TypeKind::Int4 => Self::Int32,
            TypeKind::Int8 | TypeKind::Oid => Self::Int64,
            TypeKind::Float4 => Self::Float32,
            TypeKind::Float8 => Self::Float64,
            TypeKind::Bytea => Self::Bytea,
            TypeKind::Timestamp => Self::Timestamp,
            TypeKind::Timestamptz => Self::Timestamptz,
            TypeKind::Date => Self::Date,
            TypeKind::Time => Self::Time,
            TypeKind::Timetz => Self::Named(logical::ZONED_TIME),
            TypeKind::Interval => Self::Interval,
            TypeKind::Uuid => Self::Named(logical::UUID),
            TypeKind::Json | TypeKind::Jsonb => Self::Named(logical::JSON),
            TypeKind::Enum => Self::Named(logical::ENUM),
            TypeKind::Inet => Self::Inet,
            TypeKind::Numeric
            | TypeKind::Text
            | TypeKind::Vector { .. }
            | TypeKind::Composite
            | TypeKind::Range { .. }
            | TypeKind::Array { .. }
            | TypeKind::Domain { .. }
            | TypeKind::Other => Self::Text,
        }
    }

    /// The Connect type and logical name of the usual schema.
    fn connect(self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::Int16 => ("int16", None),
            Self::Int32 => ("int32", None),
            Self::Int64 => ("int64", None),
            Self::Float32 => ("float", None),
            Self::Float64 => ("double", None),
            Self::Bool => ("boolean", None),
            Self::Text | Self::Inet => ("string", None),
            Self::Bytea => ("bytes", None),
            Self::Timestamp => ("int64", Some(logical::MICRO_TIMESTAMP)),
            Self::Timestamptz => ("string", Some(logical::ZONED_TIMESTAMP)),
            Self::Date => ("int32", Some(logical::DATE)),
            Self::Time => ("int64", Some(logical::MICRO_TIME)),
            Self::Named(name) => ("string", Some(name)),
            Self::Interval => ("string", Some(logical::INTERVAL)),
        }
    }

    /// How an array element of this type travels: numbers, booleans and
    /// text as themselves, every other element as its text (as 0.1 did).
    fn element(self) -> Element {
        match self {
            Self::Int16 => Element::Int("int16"),
            Self::Int32 => Element::Int("int32"),
            Self::Int64 => Element::Int("int64"),
            Self::Float32 => Element::Float("float"),
            Self::Float64 => Element::Float("double"),
            Self::Bool => Element::Bool,
            Self::Inet => Element::Inet,
            _ => Element::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Element {
    Int(&'static str),
    Float(&'static str),
    Bool,
    Inet,
    Text,
}

impl Element {
    fn connect(self) -> &'static str {
        match self {
            Self::Int(t) | Self::Float(t) => t,
            Self::Bool => "boolean",
            Self::Inet | Self::Text => "string",
        }
    }
}

/// How a column maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    Scalar(Scalar),
    Array {
        elem: Element,
        delimiter: u8,
    },
    /// `int2vector`/`oidvector`: space-separated numbers, as JSON arrays.
    Vector(Element),
}

impl Mapping {
    fn of(ty: &PgType) -> Self {
        // `inet`'s netmask quirk keeps 0.1's bytes for `inet` columns; a
        // domain over it (new in 0.2 anyway) carries the plain text, which
        // plays back exactly without knowing the column is an `inet`.
        let domain = matches!(ty.kind, TypeKind::Domain { .. });
        let plain = |s: Scalar, domain: bool| match s {
            Scalar::Inet if domain => Scalar::Text,
            s => s,
        };
        match &ty.base().kind {
            TypeKind::Array { elem, delimiter } => Self::Array {
                elem: plain(
                    Scalar::of(elem),
                    domain || matches!(elem.kind, TypeKind::Domain { .. }),
                )
                .element(),
                delimiter: *delimiter,
            },
            TypeKind::Vector { elem: 21 } => Self::Vector(Element::Int("int16")),
            TypeKind::Vector { .. } => Self::Vector(Element::Int("int64")),
            _ => Self::Scalar(plain(Scalar::of(ty), domain)),
        }
    }
}

/// One column, ready to encode.
#[derive(Debug)]
struct Plan {
    spec: ColumnSpec,
    /// `"name":`, escaped as `row_to_json` escapes keys.
    key: Box<[u8]>,
    mapping: Mapping,
    parameters: Value,
}

/// Encodes rows of one list of columns (a table's row image, or its key)
/// and gives the Connect schema of each combination of [`Variants`].
///
/// Cheap to share (`Arc`); schemas of variant combinations are cached.
#[derive(Debug)]
pub struct RowCodec {
    columns: Vec<Plan>,
    default_fields: Arc<[Value]>,
    variant_fields: Mutex<HashMap<Variants, Arc<[Value]>>>,
    /// The source table's OID, for a table's row image: what its struct
    /// schema's `tidemark.table.oid` says (see [`RowCodec::with_table_oid`]).
    table_oid: Option<Oid>,
}

/// At most this many variant combinations are cached per codec; more are
/// computed each time (a table whose rows vary that much is rare).
const MAX_CACHED_VARIANTS: usize = 256;

impl RowCodec {
    /// A codec for rows of `columns`, in order.
    pub fn new(columns: Vec<ColumnSpec>) -> Self {
        let columns: Vec<Plan> = columns.into_iter().map(Plan::new).collect();
        let default_fields = columns
            .iter()
            .map(|c| c.field_schema(Variant::Default))
            .collect();
        Self {
            columns,
            default_fields,
            variant_fields: Mutex::new(HashMap::new()),
            table_oid: None,
        }
    }

    /// The same codec for the row image of the table whose OID is `oid`:
    /// its struct schemas carry `tidemark.table.oid`. (A key's codec has
    /// none: a key's schema is part of the record key, which must not
    /// change.)
    pub fn with_table_oid(mut self, oid: Oid) -> Self {
        self.table_oid = Some(oid);
        self
    }

    /// The source table's OID, when the codec was given it.
    pub fn table_oid(&self) -> Option<Oid> {
        self.table_oid
    }

    /// The codecs of a table's rows and of its key, the key being the
    /// columns at `key_index` in key order: each key column's field schema
    /// says its position in the key (`tidemark.column.key`), in both.
    ///
    /// Panics when an index is out of range (callers found them among
    /// `columns`).
    pub fn keyed(mut columns: Vec<ColumnSpec>, key_index: &[usize]) -> (Self, Self) {
        for (position, &i) in key_index.iter().enumerate() {
            columns[i].key_position = Some(position as u32 + 1);
        }
        let key = key_index.iter().map(|&i| columns[i].clone()).collect();
        (Self::new(columns), Self::new(key))
    }

    /// The columns, in order.
    pub fn columns(&self) -> impl ExactSizeIterator<Item = &ColumnSpec> {
        self.columns.iter().map(|p| &p.spec)
    }

    /// Writes the row `{"col":value,...}` to `out`, byte for byte as 0.1's
    /// `row_to_json` SQL wrote every value it got right, from each column's
    /// text (`None` for SQL NULL), and returns the variants the values took.
    ///
    /// Fails, naming the column, when a value's text is not what its type's
    /// output function prints under Tidemark's session settings, or when
    /// the number of values is not the number of columns. `out` then holds
    /// a partial row: truncate it.
    pub fn encode<T: AsRef<[u8]>>(
        &self,
        fields: &[Option<T>],
        out: &mut Vec<u8>,
    ) -> Result<Variants, CodecError> {
        if fields.len() != self.columns.len() {
            return Err(CodecError::Arity {
                expected: self.columns.len(),
                got: fields.len(),
            });
        }
        let mut variants = Variants::default();
        out.push(b'{');
        for (i, (plan, field)) in self.columns.iter().zip(fields).enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&plan.key);
            let Some(field) = field else {
                out.extend_from_slice(b"null");
                continue;
            };
            let text = std::str::from_utf8(field.as_ref())
                .map_err(|e| plan.error(format!("the text is not UTF-8 ({e})")))?;
            let v = plan
                .encode(text, out)
                .map_err(|reason| plan.error(reason))?;
            variants.set(i, self.columns.len(), v);
        }
        out.push(b'}');
        Ok(variants)
    }

    /// [`RowCodec::encode`] of a whole row's `record_out` text (what the
    /// change log stores and snapshot queries select): `(1,abc,,"x y")`.
    ///
    /// Fails when the text is not a composite literal of as many fields as
    /// the codec has columns, or as [`RowCodec::encode`] does.
    pub fn encode_record(&self, text: &str, out: &mut Vec<u8>) -> Result<Variants, CodecError> {
        let mut fields = parse_record(text)?;
        // `()` is one NULL field, or no fields at all.
        if self.columns.is_empty() && fields == [None] {
            fields.clear();
        }
        let fields: Vec<Option<&[u8]>> = fields
            .iter()
            .map(|f| f.as_deref().map(str::as_bytes))
            .collect();
        self.encode(&fields, out)
    }

    /// The Connect field schemas of a row whose values took `variants`, in
    /// column order. The usual combination is precomputed; others are
    /// computed once and cached.
    pub fn fields(&self, variants: &Variants) -> Arc<[Value]> {
        if variants.is_default() {
            return self.default_fields.clone();
        }
        let mut cache = self.variant_fields.lock().expect("never poisoned");
        if let Some(f) = cache.get(variants) {
            return f.clone();
        }
        let fields: Arc<[Value]> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| c.field_schema(variants.get(i)))
            .collect();
        if cache.len() < MAX_CACHED_VARIANTS {
            cache.insert(variants.clone(), fields.clone());
        }
        fields
    }

    /// The Connect struct schema `name` of a row whose values took
    /// `variants`.
    pub fn struct_schema(&self, name: &str, optional: bool, variants: &Variants) -> Value {
        let mut s = json!({
            "type": "struct",
            "fields": self.fields(variants).to_vec(),
            "optional": optional,
            "name": name,
        });
        if let Some(parameters) = table_parameters(self.table_oid) {
            s["parameters"] = parameters;
        }
        s
    }
}

/// The parameters of a row struct schema of the table whose OID is
/// `table_oid`: `{"tidemark.table.oid": "<oid>"}`; `None` when it is not
/// known (the struct then has no parameters, as before there were any).
pub fn table_parameters(table_oid: Option<Oid>) -> Option<Value> {
    table_oid.map(|oid| json!({ param::TABLE_OID: oid.to_string() }))
}

impl Plan {
    fn new(spec: ColumnSpec) -> Self {
        let mut key = Vec::with_capacity(spec.name.len() + 3);
        escape_json_into(&mut key, spec.name.as_bytes());
        key.push(b':');
        let mapping = Mapping::of(&spec.ty.ty);
        let mut parameters = Map::new();
        parameters.insert(
            param::SOURCE_TYPE.into(),
            spec.ty.ty.name.to_ascii_uppercase().into(),
        );
        let (length, scale) = length_and_scale(&spec.ty.ty, spec.ty.typmod);
        if let Some(length) = length {
            parameters.insert(param::SOURCE_LENGTH.into(), length.to_string().into());
        }
        if let Some(scale) = scale {
            parameters.insert(param::SOURCE_SCALE.into(), scale.to_string().into());
        }
        parameters.insert(param::COLUMN_TYPE.into(), spec.ty.sql_type().into());
        if let Some(position) = spec.key_position {
            parameters.insert(param::COLUMN_KEY.into(), position.to_string().into());
        }
        if let Some(attnum) = spec.attnum {
            parameters.insert(param::COLUMN_ATTNUM.into(), attnum.to_string().into());
        }
        if let Mapping::Array { delimiter, .. } = mapping {
            if delimiter != b',' {
                parameters.insert(
                    param::ARRAY_DELIMITER.into(),
                    char::from(delimiter).to_string().into(),
                );
            }
        }
        Self {
            key: key.into_boxed_slice(),
            mapping,
            parameters: Value::Object(parameters),
            spec,
        }
    }

    fn error(&self, reason: String) -> CodecError {
        CodecError::Value {
            column: self.spec.name.clone(),
            sql_type: self.spec.ty.sql_type().to_owned(),
            reason,
        }
    }

    /// The field schema for values of `variant`.
    fn field_schema(&self, variant: Variant) -> Value {
        let optional = !self.spec.not_null;
        let mut s = match (self.mapping, variant) {
            (_, Variant::PgText) => primitive("string", Some(logical::PG_TEXT), optional),
            (Mapping::Scalar(Scalar::Timestamp), Variant::IsoTimestamp) => {
                primitive("string", Some(logical::ISO_TIMESTAMP), optional)
            }
            (Mapping::Scalar(scalar), _) => {
                let (ty, name) = scalar.connect();
                primitive(ty, name, optional)
            }
            (Mapping::Array { elem, .. } | Mapping::Vector(elem), v) => {
                let depth = match v {
                    Variant::Dims(n) => n,
                    _ => 1,
                };
                let mut inner = primitive(elem.connect(), None, true);
                for level in 0..depth {
                    let optional = if level + 1 == depth { optional } else { true };
                    let mut array = Map::new();
                    array.insert("type".into(), "array".into());
                    array.insert("items".into(), Value::Object(inner));
                    array.insert("optional".into(), optional.into());
                    inner = array;
                }
                inner
            }
        };
        s.insert("parameters".into(), self.parameters.clone());
        s.insert("field".into(), self.spec.name.clone().into());
        Value::Object(s)
    }

    /// Writes one non-NULL value; says which variant it took, or why it
    /// cannot be carried.
    fn encode(&self, text: &str, out: &mut Vec<u8>) -> Result<Variant, String> {
        match self.mapping {
            Mapping::Scalar(s) => encode_scalar(s, text, out),
            Mapping::Array { elem, delimiter } => {
                let array = parse_array(text, delimiter).map_err(|e| e.to_string())?;
                encode_array(elem, text, &array, out)
            }
            Mapping::Vector(elem) => {
                out.push(b'[');
                for (n, item) in text.split(' ').filter(|s| !s.is_empty()).enumerate() {
                    if n > 0 {
                        out.push(b',');
                    }
                    encode_element(elem, item, out)?;
                }
                out.push(b']');
                Ok(Variant::Default)
            }
        }
    }
}

fn primitive(ty: &str, name: Option<&str>, optional: bool) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("type".into(), ty.into());
    m.insert("optional".into(), optional.into());
    if let Some(name) = name {
        m.insert("name".into(), name.into());
        m.insert("version".into(), 1.into());
    }
    m
}

fn excerpt(text: &str) -> String {
    let shown: String = text.chars().take(48).collect();
    if shown.len() < text.len() {
        format!("`{shown}…`")
    } else {
        format!("`{shown}`")
    }
}

fn write_int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn encode_scalar(s: Scalar, text: &str, out: &mut Vec<u8>) -> Result<Variant, String> {
    let b = text.as_bytes();
    match s {
        Scalar::Int16 => write_integer(out, text, i64::from(i16::MIN), i64::from(i16::MAX))?,
        Scalar::Int32 => write_integer(out, text, i64::from(i32::MIN), i64::from(i32::MAX))?,
        Scalar::Int64 => write_integer(out, text, i64::MIN, i64::MAX)?,
        Scalar::Float32 | Scalar::Float64 => {
            if is_json_number(b) {
                out.extend_from_slice(b);
            } else if matches!(text, "NaN" | "Infinity" | "-Infinity") {
                escape_json_into(out, b);
                return Ok(Variant::PgText);
            } else {
                return Err(format!("{} is not a float", excerpt(text)));
            }
        }
        Scalar::Bool => out.extend_from_slice(parse_bool(text)?),
        Scalar::Text | Scalar::Named(_) => escape_json_into(out, b),
        Scalar::Interval => {
            if !text.starts_with('P') {
                return Err(format!(
                    "{} is not an ISO 8601 interval: the session needs IntervalStyle=iso_8601",
                    excerpt(text)
                ));
            }
            escape_json_into(out, b);
        }
        Scalar::Inet => write_inet(out, text),
        Scalar::Bytea => {
            let bytes = parse_bytea(text)?;
            out.push(b'"');
            let start = out.len();
            out.resize(start + bytes.len().div_ceil(3) * 4, 0);
            let n = base64::engine::general_purpose::STANDARD
                .encode_slice(&bytes, &mut out[start..])
                .expect("the buffer is large enough");
            out.truncate(start + n);
            out.push(b'"');
        }
        Scalar::Timestamp => match time::parse_timestamp(text)? {
            Instant::Infinity => write_int(out, i64::MAX),
            Instant::NegInfinity => write_int(out, i64::MIN),
            Instant::Finite(us) => match i64::try_from(us) {
                // i64::MAX and MIN stand for the infinities.
                Ok(us) if us != i64::MAX && us != i64::MIN => write_int(out, us),
                _ => {
                    write_iso_string(out, us, false, text)?;
                    return Ok(Variant::IsoTimestamp);
                }
            },
        },
        Scalar::Timestamptz => match time::parse_timestamptz(text)? {
            Instant::Infinity => out.extend_from_slice(br#""infinity""#),
            Instant::NegInfinity => out.extend_from_slice(br#""-infinity""#),
            Instant::Finite(us) => write_iso_string(out, us, true, text)?,
        },
        Scalar::Date => match time::parse_date(text)? {
            Instant::Infinity => write_int(out, i32::MAX),
            Instant::NegInfinity => write_int(out, i32::MIN),
            Instant::Finite(days) => match i32::try_from(days) {
                Ok(d) if d != i32::MAX && d != i32::MIN => write_int(out, d),
                _ => return Err(format!("{} is out of range", excerpt(text))),
            },
        },
        Scalar::Time => write_int(out, time::parse_time(text)?),
    }
    Ok(Variant::Default)
}

/// Writes an integer's text as the JSON number it is, when it is one within
/// `min..=max` (what the field's Connect type holds).
fn write_integer(out: &mut Vec<u8>, text: &str, min: i64, max: i64) -> Result<(), String> {
    if !is_pg_integer(text.as_bytes()) {
        return Err(format!("{} is not an integer", excerpt(text)));
    }
    match text.parse::<i64>() {
        Ok(n) if (min..=max).contains(&n) => {
            out.extend_from_slice(text.as_bytes());
            Ok(())
        }
        _ => Err(format!("{} is out of range for its type", excerpt(text))),
    }
}

/// The ISO text of `us` as a JSON string (it needs no escapes).
fn write_iso_string(out: &mut Vec<u8>, us: i128, zulu: bool, text: &str) -> Result<(), String> {
    out.push(b'"');
    time::write_iso(out, us, zulu).ok_or_else(|| format!("{} is out of range", excerpt(text)))?;
    out.push(b'"');
    Ok(())
}

fn parse_bool(text: &str) -> Result<&'static [u8], String> {
    match text {
        "t" => Ok(b"true"),
        "f" => Ok(b"false"),
        _ => Err(format!("{} is not a boolean", excerpt(text))),
    }
}

/// `inet` as its `text` cast prints it (what 0.1 carried): the netmask
/// always shown, `/32` or `/128` where `inet_out` leaves it out.
fn write_inet(out: &mut Vec<u8>, text: &str) {
    if text.contains('/') {
        escape_json_into(out, text.as_bytes());
    } else {
        let mask = if text.contains(':') { "/128" } else { "/32" };
        escape_json_into(out, format!("{text}{mask}").as_bytes());
    }
}

/// The bytes of `bytea` text in hex format (`\x00ff`).
pub(crate) fn parse_bytea(text: &str) -> Result<Vec<u8>, String> {
    let hex = text.strip_prefix("\\x").ok_or_else(|| {
        format!(
            "{} is not bytea in hex format: the session needs bytea_output=hex",
            excerpt(text)
        )
    })?;
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    if hex.len() % 2 != 0 {
        return Err(format!("{} has an odd number of hex digits", excerpt(text)));
    }
    hex.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(|| format!("{} is not hex", excerpt(text)))
}

/// One array element (or vector item); `Err` with the reason it is not of
/// its type. A float that JSON cannot hold is the caller's to handle.
fn encode_element(elem: Element, text: &str, out: &mut Vec<u8>) -> Result<(), String> {
    let b = text.as_bytes();
    match elem {
        Element::Int("int16") => {
            write_integer(out, text, i64::from(i16::MIN), i64::from(i16::MAX))?
        }
        Element::Int("int32") => {
            write_integer(out, text, i64::from(i32::MIN), i64::from(i32::MAX))?
        }
        Element::Int(_) => write_integer(out, text, i64::MIN, i64::MAX)?,
        Element::Float(_) if is_json_number(b) => out.extend_from_slice(b),
        Element::Float(_) => return Err(format!("element {} is not a float", excerpt(text))),
        Element::Bool => out.extend_from_slice(parse_bool(text)?),
        Element::Inet => write_inet(out, text),
        Element::Text => escape_json_into(out, b),
    }
    Ok(())
}

/// An array as nested JSON arrays, or as its text when JSON arrays cannot
/// carry it exactly (lower bounds other than 1, non-finite floats).
fn encode_array(
    elem: Element,
    text: &str,
    array: &ArrayText<'_>,
    out: &mut Vec<u8>,
) -> Result<Variant, String> {
    let non_finite = |f: &Field<'_>| {
        matches!(elem, Element::Float(_))
            && matches!(f.as_deref(), Some("NaN" | "Infinity" | "-Infinity"))
    };
    if !array.one_based() || array.elements.iter().any(non_finite) {
        escape_json_into(out, text.as_bytes());
        return Ok(Variant::PgText);
    }
    let mut items = array.elements.iter();
    write_level(elem, &array.dims, &mut items, out)?;
    Ok(match array.dims.len() {
        0 | 1 => Variant::Default,
        n => Variant::Dims(n as u8),
    })
}

fn write_level<'a, 'b: 'a>(
    elem: Element,
    dims: &[Dim],
    items: &mut impl Iterator<Item = &'a Field<'b>>,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    out.push(b'[');
    if let Some((first, rest)) = dims.split_first() {
        for n in 0..first.len {
            if n > 0 {
                out.push(b',');
            }
            if rest.is_empty() {
                match items.next().expect("the parser counted the elements") {
                    None => out.extend_from_slice(b"null"),
                    Some(text) => encode_element(elem, text, out)?,
                }
            } else {
                write_level(elem, rest, items, out)?;
            }
        }
    }
    out.push(b']');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::types::{builtin, Oid};

    fn col(name: &str, oid: Oid, typmod: i32, not_null: bool) -> ColumnSpec {
        ColumnSpec::new(name, ColumnType::builtin(oid, typmod).unwrap(), not_null)
    }

    fn one(oid: Oid, text: &str) -> (String, Variant) {
        let codec = RowCodec::new(vec![col("c", oid, -1, false)]);
        let mut out = Vec::new();
        let v = codec
            .encode(&[Some(text)], &mut out)
            .unwrap_or_else(|e| panic!("{oid} {text}: {e}"));
        let s = String::from_utf8(out).unwrap();
        let value = s
            .strip_prefix(r#"{"c":"#)
            .and_then(|s| s.strip_suffix('}'))
            .unwrap()
            .to_owned();
        (value, v.get(0))
    }

    fn value(oid: Oid, text: &str) -> String {
        let (v, variant) = one(oid, text);
        assert_eq!(variant, Variant::Default, "{oid} {text}");
        v
    }

    fn fails(oid: Oid, text: &str) -> String {
        let codec = RowCodec::new(vec![col("c", oid, -1, false)]);
        codec
            .encode(&[Some(text)], &mut Vec::new())
            .expect_err(text)
            .to_string()
    }

    #[test]
    fn numbers_and_booleans_are_json_values() {
        assert_eq!(value(21, "-32768"), "-32768");
        assert_eq!(value(23, "2147483647"), "2147483647");
        assert_eq!(value(20, "-9223372036854775808"), "-9223372036854775808");
        assert_eq!(value(26, "4294967295"), "4294967295");
        assert_eq!(value(700, "3.4028235e+38"), "3.4028235e+38");
        assert_eq!(value(701, "0.30000000000000004"), "0.30000000000000004");
        assert_eq!(value(701, "-0"), "-0");
        assert_eq!(value(701, "1e-320"), "1e-320");
        assert_eq!(value(16, "t"), "true");
        assert_eq!(value(16, "f"), "false");
        assert!(fails(23, "1.5").contains("not an integer"));
        assert!(fails(21, "32768").contains("out of range"));
        assert!(fails(20, "9223372036854775808").contains("out of range"));
        assert!(fails(1005, "{1,-32769}").contains("out of range"));
        assert!(fails(16, "true").contains("not a boolean"));
        assert!(fails(701, "nan").contains("not a float"));
    }

    #[test]
    fn non_finite_floats_are_strings_under_pg_text() {
        for (oid, text) in [(701, "NaN"), (701, "Infinity"), (700, "-Infinity")] {
            assert_eq!(one(oid, text), (format!("\"{text}\""), Variant::PgText));
        }
        let codec = RowCodec::new(vec![col("f", 701, -1, true)]);
        let mut out = Vec::new();
        let v = codec.encode(&[Some("NaN")], &mut out).unwrap();
        assert_eq!(out, br#"{"f":"NaN"}"#);
        let f = &codec.fields(&v)[0];
        assert_eq!(f["type"], "string");
        assert_eq!(f["name"], logical::PG_TEXT);
        assert_eq!(f["optional"], false);
        assert_eq!(codec.fields(&Variants::default())[0]["type"], "double");
    }

    #[test]
    fn text_like_values_are_strings() {
        assert_eq!(value(25, "a\"b\\c\nd\u{1}"), r#""a\"b\\c\nd\u0001""#);
        assert_eq!(value(1042, "ab   "), r#""ab   ""#);
        assert_eq!(
            value(1700, "-12345678901234567890.1234500000"),
            r#""-12345678901234567890.1234500000""#
        );
        assert_eq!(value(1700, "NaN"), r#""NaN""#);
        assert_eq!(
            value(2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            r#""a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11""#
        );
        assert_eq!(
            value(114, r#"{ "k" : 1,  "k": 2 }"#),
            r#""{ \"k\" : 1,  \"k\": 2 }""#
        );
        assert_eq!(value(114, r#"{"a":"\u0000"}"#), r#""{\"a\":\"\\u0000\"}""#);
        assert_eq!(value(3802, "null"), r#""null""#);
        assert_eq!(
            value(1266, "12:34:56.789012+05:30"),
            r#""12:34:56.789012+05:30""#
        );
        assert_eq!(
            value(1186, "P1Y2M3DT4H5M6.789012S"),
            r#""P1Y2M3DT4H5M6.789012S""#
        );
        assert!(fails(1186, "1 year").contains("IntervalStyle=iso_8601"));
        assert_eq!(value(869, "10.0.0.1"), r#""10.0.0.1/32""#);
        assert_eq!(value(869, "::1"), r#""::1/128""#);
        assert_eq!(value(869, "10.0.0.0/8"), r#""10.0.0.0/8""#);
        assert_eq!(value(650, "10.0.0.0/8"), r#""10.0.0.0/8""#);
        assert_eq!(value(790, "$1,234.56"), r#""$1,234.56""#);
        assert_eq!(value(3904, "[1,5)"), r#""[1,5)""#);
    }

    #[test]
    fn bytea_is_base64() {
        assert_eq!(value(17, "\\x00ff0a5c27228000"), r#""AP8KXCcigAA=""#);
        assert_eq!(value(17, "\\x"), r#""""#);
        assert!(fails(17, "abc").contains("bytea_output=hex"));
        assert!(fails(17, "\\x0").contains("odd"));
    }

    #[test]
    fn times_are_numbers_or_iso_text() {
        assert_eq!(
            value(1114, "2024-02-29 23:59:59.999999"),
            "1709251199999999"
        );
        assert_eq!(value(1114, "infinity"), i64::MAX.to_string());
        assert_eq!(value(1114, "-infinity"), i64::MIN.to_string());
        assert_eq!(
            value(1114, "294247-01-10 04:00:54.775806"),
            (i64::MAX - 1).to_string()
        );
        assert_eq!(
            one(1114, "294247-01-10 04:00:54.775807"),
            (
                r#""294247-01-10T04:00:54.775807""#.to_owned(),
                Variant::IsoTimestamp
            )
        );
        assert_eq!(
            value(1184, "2024-02-29 18:29:59.123456+00"),
            r#""2024-02-29T18:29:59.123456Z""#
        );
        assert_eq!(
            value(1184, "0044-03-15 12:00:00.5+00 BC"),
            r#""0044-03-15T12:00:00.500000Z BC""#
        );
        assert_eq!(value(1184, "infinity"), r#""infinity""#);
        assert_eq!(value(1082, "1970-01-02"), "1");
        assert_eq!(value(1082, "infinity"), "2147483647");
        assert_eq!(value(1082, "-infinity"), "-2147483648");
        assert_eq!(value(1083, "24:00:00"), "86400000000");
        assert_eq!(value(1083, "00:00:00.000001"), "1");
        assert!(fails(1082, "02/29/2024").contains("DateStyle=ISO"));
    }

    #[test]
    fn arrays_nest_to_their_dimensions() {
        assert_eq!(value(1007, "{1,NULL,-2147483648}"), "[1,null,-2147483648]");
        assert_eq!(value(1007, "{}"), "[]");
        assert_eq!(
            one(1007, "{{1,2},{3,NULL}}"),
            ("[[1,2],[3,null]]".to_owned(), Variant::Dims(2))
        );
        assert_eq!(
            one(1009, "{{{x}}}"),
            (r#"[[["x"]]]"#.to_owned(), Variant::Dims(3))
        );
        assert_eq!(
            value(1009, r#"{"a\"b","c,d",NULL,"NULL",""}"#),
            r#"["a\"b","c,d",null,"NULL",""]"#
        );
        assert_eq!(value(1000, "{t,f,NULL}"), "[true,false,null]");
        assert_eq!(value(1022, "{0.1,-0,1e-320}"), "[0.1,-0,1e-320]");
        assert_eq!(value(1028, "{1,4294967295}"), "[1,4294967295]");
        // Other elements travel as their text.
        assert_eq!(
            value(1115, r#"{"2024-01-01 00:00:00.000001",infinity}"#),
            r#"["2024-01-01 00:00:00.000001","infinity"]"#
        );
        assert_eq!(value(1231, "{1.50,NaN}"), r#"["1.50","NaN"]"#);
        assert_eq!(value(1001, r#"{"\\x00ff"}"#), r#"["\\x00ff"]"#);
        assert_eq!(
            value(1041, "{10.0.0.1,::1/64}"),
            r#"["10.0.0.1/32","::1/64"]"#
        );
        assert_eq!(
            value(1020, "{(1,1),(0,0);(2,2),(1,1)}"),
            r#"["(1,1),(0,0)","(2,2),(1,1)"]"#
        );
        assert_eq!(value(22, "1 2 -3"), "[1,2,-3]");
        assert_eq!(value(30, ""), "[]");
    }

    #[test]
    fn arrays_json_cannot_carry_are_their_text() {
        assert_eq!(
            one(1007, "[0:1]={7,8}"),
            (r#""[0:1]={7,8}""#.to_owned(), Variant::PgText)
        );
        assert_eq!(
            one(1022, "{1.5,NaN}"),
            (r#""{1.5,NaN}""#.to_owned(), Variant::PgText)
        );
        assert!(fails(1007, "{1,x}").contains("not an integer"));
        assert!(fails(1007, "{1").contains("array literal"));
    }

    #[test]
    fn array_schemas_nest_with_the_value() {
        let codec = RowCodec::new(vec![col("a", 1007, -1, false), col("b", 1020, -1, true)]);
        let plain = codec.fields(&Variants::default());
        assert_eq!(
            plain[0],
            json!({"type": "array", "items": {"type": "int32", "optional": true}, "optional": true,
                   "parameters": {"__debezium.source.column.type": "_INT4", "tidemark.column.type": "integer[]"},
                   "field": "a"})
        );
        assert_eq!(plain[1]["parameters"][param::ARRAY_DELIMITER], ";");
        let mut out = Vec::new();
        let v = codec
            .encode(&[Some("{{{1}},{{2}}}"), Some("{}")], &mut out)
            .unwrap();
        assert_eq!(out, br#"{"a":[[[1]],[[2]]],"b":[]}"#);
        let nested = codec.fields(&v);
        assert_eq!(
            nested[0]["items"],
            json!({"type": "array", "items": {"type": "array", "items": {"type": "int32", "optional": true},
                   "optional": true}, "optional": true})
        );
        assert_eq!(nested[0]["optional"], true);
        assert_eq!(nested[1], plain[1]);
        assert!(Arc::ptr_eq(&codec.fields(&v), &nested), "cached");
    }

    #[test]
    fn rows_are_written_as_row_to_json_does() {
        let codec = RowCodec::new(vec![
            col("id", 23, -1, true),
            col("we\"ird\n", 25, -1, false),
            col("ts", 1114, -1, false),
        ]);
        let mut out = Vec::new();
        let v = codec
            .encode(&[Some("1"), None, Some("1970-01-01 00:00:01")], &mut out)
            .unwrap();
        assert!(v.is_default());
        assert_eq!(out, br#"{"id":1,"we\"ird\n":null,"ts":1000000}"#);
        let mut out = Vec::new();
        codec.encode_record(r#"(1,"a ""b""",)"#, &mut out).unwrap();
        assert_eq!(out, br#"{"id":1,"we\"ird\n":"a \"b\"","ts":null}"#);
        let err = codec.encode(&[Some("1")], &mut Vec::new()).unwrap_err();
        assert!(
            matches!(
                err,
                CodecError::Arity {
                    expected: 3,
                    got: 1
                }
            ),
            "{err}"
        );
        let err = codec
            .encode(&[Some("x"), None, None], &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"id\"") && err.contains("integer"), "{err}");
    }

    #[test]
    fn field_schemas_carry_the_source_type() {
        let codec = RowCodec::new(vec![
            col("v", 1043, 260, true),
            col("n", 1700, (10 << 16 | 2) + 4, false),
            col("ts", 1114, 3, false),
        ]);
        let f = codec.fields(&Variants::default());
        assert_eq!(
            f[0],
            json!({"type": "string", "optional": false,
                   "parameters": {"__debezium.source.column.type": "VARCHAR",
                                  "__debezium.source.column.length": "256",
                                  "tidemark.column.type": "character varying(256)"},
                   "field": "v"})
        );
        assert_eq!(
            f[1]["parameters"],
            json!({"__debezium.source.column.type": "NUMERIC",
                   "__debezium.source.column.length": "10",
                   "__debezium.source.column.scale": "2",
                   "tidemark.column.type": "numeric(10,2)"})
        );
        assert_eq!(
            f[2],
            json!({"type": "int64", "optional": true, "name": logical::MICRO_TIMESTAMP, "version": 1,
                   "parameters": {"__debezium.source.column.type": "TIMESTAMP",
                                  "__debezium.source.column.scale": "3",
                                  "tidemark.column.type": "timestamp(3) without time zone"},
                   "field": "ts"})
        );
        let s = codec.struct_schema("x.Value", true, &Variants::default());
        assert_eq!(s["type"], "struct");
        assert_eq!(s["name"], "x.Value");
        assert_eq!(s["fields"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn a_domain_over_inet_is_its_plain_text() {
        let domain = Arc::new(PgType {
            oid: 70001,
            schema: "public".into(),
            name: "addr".into(),
            sql_name: "public.addr".into(),
            kind: TypeKind::Domain {
                base: builtin(869).unwrap(),
            },
        });
        let codec = RowCodec::new(vec![ColumnSpec::new(
            "a",
            ColumnType::new(domain, -1, "public.addr".into()),
            false,
        )]);
        let mut out = Vec::new();
        codec.encode(&[Some("10.0.0.1")], &mut out).unwrap();
        assert_eq!(out, br#"{"a":"10.0.0.1"}"#);
    }

    #[test]
    fn domains_map_as_their_base_type() {
        let base = builtin(23).unwrap();
        let domain = Arc::new(PgType {
            oid: 70000,
            schema: "public".into(),
            name: "posint".into(),
            sql_name: "public.posint".into(),
            kind: TypeKind::Domain { base },
        });
        let codec = RowCodec::new(vec![ColumnSpec::new(
            "d",
            ColumnType::new(domain, -1, "public.posint".into()),
            false,
        )]);
        let mut out = Vec::new();
        codec.encode(&[Some("5")], &mut out).unwrap();
        assert_eq!(out, br#"{"d":5}"#);
        let f = &codec.fields(&Variants::default())[0];
        assert_eq!(f["type"], "int32");
        assert_eq!(f["parameters"][param::SOURCE_TYPE], "POSINT");
        assert_eq!(f["parameters"][param::COLUMN_TYPE], "public.posint");
    }

    #[test]
    fn keyed_codecs_say_each_key_column_s_position_and_every_known_attnum() {
        let mut cols = vec![
            col("a", 23, -1, true),
            col("b", 25, -1, false),
            col("c", 20, -1, true),
        ];
        for (i, c) in cols.iter_mut().enumerate() {
            c.attnum = Some(i as i32 + 2);
        }
        cols[1].attnum = None;
        // The key is (c, a): positions follow the key, not the columns.
        let (row, key) = RowCodec::keyed(cols, &[2, 0]);
        let fields = row.fields(&Variants::default());
        let params = |f: &Value, p: &str| f["parameters"].get(p).cloned();
        assert_eq!(params(&fields[0], param::COLUMN_KEY), Some(json!("2")));
        assert_eq!(params(&fields[1], param::COLUMN_KEY), None);
        assert_eq!(params(&fields[2], param::COLUMN_KEY), Some(json!("1")));
        assert_eq!(params(&fields[0], param::COLUMN_ATTNUM), Some(json!("2")));
        assert_eq!(params(&fields[1], param::COLUMN_ATTNUM), None);
        assert_eq!(params(&fields[2], param::COLUMN_ATTNUM), Some(json!("4")));
        let key_fields = key.fields(&Variants::default());
        let names: Vec<_> = key_fields.iter().map(|f| f["field"].clone()).collect();
        assert_eq!(names, [json!("c"), json!("a")]);
        assert_eq!(params(&key_fields[0], param::COLUMN_KEY), Some(json!("1")));
        assert_eq!(params(&key_fields[1], param::COLUMN_KEY), Some(json!("2")));
    }

    #[test]
    fn a_row_struct_says_its_table_s_oid_and_a_key_struct_does_not() {
        let (row, key) =
            RowCodec::keyed(vec![col("id", 23, -1, true), col("b", 25, -1, false)], &[0]);
        // Without it (a codec of a key, or of playback's own), the struct has
        // no parameters, as before.
        let plain = row.struct_schema("t", false, &Variants::default());
        assert_eq!(plain.get("parameters"), None);
        let row = row.with_table_oid(16400);
        assert_eq!(row.table_oid(), Some(16400));
        let s = row.struct_schema("t", false, &Variants::default());
        assert_eq!(s["parameters"], json!({"tidemark.table.oid": "16400"}));
        assert_eq!(s["parameters"][param::TABLE_OID], "16400");
        // The field schemas are the same with or without it.
        assert_eq!(s["fields"], plain["fields"]);
        let k = key.struct_schema("t.Key", false, &Variants::default());
        assert_eq!(k.get("parameters"), None, "a record key never changes");
    }
}
