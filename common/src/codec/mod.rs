//! The codec: the one place Postgres types are mapped, from a value's text
//! to the record's JSON and Connect schema, and back.
//!
//! # Input: text under fixed session settings
//!
//! Every value arrives as its type output function's text, printed under
//! Tidemark's session settings:
//!
//! ```text
//! DateStyle=ISO, IntervalStyle=iso_8601, TimeZone=UTC, extra_float_digits=3,
//! bytea_output=hex, lc_monetary=C, client_encoding=UTF8, standard_conforming_strings=on
//! ```
//!
//! Sources: pgoutput tuples (one text per column), the change log's
//! `record_out` text of whole rows, snapshot and poll queries selecting
//! `pg_catalog.textin(pg_catalog.record_out(t.*))`, `COPY ... TO` text. Only
//! output functions ran to print them, so capture runs no user code. A text
//! that is not what the type prints under those settings (a `DateStyle=SQL`
//! date, a `postgres`-style interval, `bytea` in escape format) is an error,
//! never a guess.
//!
//! # API
//!
//! - [`PgType`] / [`TypeKind`]: a type resolved once per OID. Built-in types
//!   come from a static table ([`builtin`]); others from [`TypeCache`], which
//!   reads `pg_catalog.pg_type` once per OID (with what a domain or array
//!   rests on) and takes pgoutput Type messages ([`TypeCache::note_type`]) for
//!   types dropped since.
//! - [`ColumnType`]: type + typmod, with [`ColumnType::sql_type`], exactly
//!   `pg_catalog.format_type(oid, typmod)` as a Tidemark session prints it.
//! - [`RowCodec`] over [`ColumnSpec`]s (a row image, or a key):
//!   [`RowCodec::encode`] writes `{"col":value,...}` from per-column text
//!   (`None` = NULL) and returns the row's [`Variants`];
//!   [`RowCodec::encode_record`] does the same from a `record_out` text;
//!   [`RowCodec::fields`] / [`RowCodec::struct_schema`] give the Connect
//!   schema of those variants (the usual one precomputed, others cached).
//! - [`parse_record`] / [`write_record`]: composite literals;
//!   [`parse_array`] / [`write_array_element`]: array literals;
//!   [`parse_copy_line`] / [`write_copy_field`]: `COPY` text format.
//! - [`to_pg_text`] (and [`to_pg_row`]): a field's JSON value back to the
//!   Postgres text its column type's input function reads, driven by the
//!   field schema the record carries. It replaces
//!   [`envelope::decode_sql`](crate::envelope::decode_sql).
//! - [`CodecError`]: says the column and why; callers add table and key.
//!
//! How each source uses it:
//! - logical mode (pgoutput): [`TypeCache::note_type`] for each Type message
//!   (it also forgets a type renamed since), [`TypeCache::column_types`] for
//!   a Relation message's (type OID, typmod) list, one [`RowCodec`] per
//!   relation and key, [`RowCodec::encode`] with each tuple's column texts.
//!   `None` is SQL NULL only: an unchanged TOASTed value (`u`) has no text
//!   and is the caller's to fill or refuse.
//! - changelog mode: a `tidemark.shapes` row gives the columns (OID, typmod,
//!   name, not-null); [`RowCodec::encode_record`] reads `before`/`after`.
//! - snapshots and polls: [`RowCodec::encode_record`] of
//!   `pg_catalog.textin(pg_catalog.record_out(t.*))`.
//! - playback: [`to_pg_row`] / [`to_pg_text`] with the record's field
//!   schemas, then [`write_copy_field`] for `COPY FROM STDIN` text (or a
//!   literal).
//!
//! A row's [`Variants`] belong to that row image: an update's `before` and
//! `after` may take different ones (one has a `NaN`, the other not), and so
//! different struct schemas; how the envelope carries that is the
//! envelope's choice.
//!
//! # Mapping
//!
//! Byte for byte what 0.1's SQL (`envelope::map_type`, `row_to_json`) wrote
//! for every value it got right:
//!
//! | Postgres | JSON | Connect schema |
//! |---|---|---|
//! | `smallint`, `integer`, `bigint`, `oid` | number | `int16`, `int32`, `int64`, `int64` |
//! | `real`, `double precision` | number, shortest exact digits | `float`, `double` |
//! | `boolean` | `true`/`false` | `boolean` |
//! | `numeric` | its text (`"NaN"`, `"Infinity"` too) | `string` |
//! | `text`, `varchar`, `char(n)`, `name`, `"char"` | string, escaped as Postgres' `escape_json` | `string` |
//! | `timestamp` | µs since 1970; `infinity`/`-infinity` as `i64::MAX`/`MIN` | `int64` `io.debezium.time.MicroTimestamp` |
//! | `timestamptz` | `"YYYY-MM-DDTHH:MI:SS.ffffffZ"` (` BC`), `"infinity"` | `string` `io.debezium.time.ZonedTimestamp` |
//! | `date` | days since 1970; infinities as `i32::MAX`/`MIN` | `int32` `io.debezium.time.Date` |
//! | `time` | µs since midnight (`24:00:00` is 86400000000) | `int64` `io.debezium.time.MicroTime` |
//! | `timetz`, `interval` (ISO 8601), `uuid`, `json`, `jsonb` | their text | `string` `io.debezium.time.ZonedTime`, `...Interval`, `io.debezium.data.Uuid`, `io.debezium.data.Json` |
//! | `bytea` | base64 | `bytes` |
//! | enums | the label | `string` `io.debezium.data.Enum` |
//! | `inet` | its text with the netmask always shown (`10.0.0.1/32`, as 0.1's `::text`) | `string` |
//! | arrays of the number, boolean and text types above | nested JSON arrays of those | `array` nested as deep as the value |
//! | arrays of any other type | nested JSON arrays of the elements' text | `array` of `string` |
//! | `int2vector`, `oidvector` | JSON arrays of numbers | `array` of `int16`/`int64` |
//! | domains | as their base type | as their base type |
//! | composites, ranges, multiranges, geometric, network, `money`, `xml`, `tsvector`, extension types (`hstore`, `ltree`, `citext`, `cube`, `isn`, ...), anything else | its exact text | `string` |
//!
//! `json` keeps its exact text (duplicate keys, whitespace, `\u0000`);
//! `jsonb`'s JSON `null` is the string `"null"`; SQL NULL is JSON `null`.
//! An integer outside its Connect type's range, a `bytea` not in hex, an
//! interval not in ISO 8601, a date not in ISO order, text that is not
//! UTF-8: errors, never a guess.
//!
//! ## Variants: values the usual schema cannot carry
//!
//! Such a value takes a per-value [`Variant`], and the record's schema is
//! the one of its values' variants:
//! - a `timestamp` past int64 µs (from 294247-01-10 04:00:54.775807 on):
//!   `string` `io.debezium.time.IsoTimestamp`, `"YYYY-MM-DDTHH:MI:SS.ffffff"`;
//! - a float `NaN`/`Infinity`/`-Infinity`: the string `"NaN"` (as 0.1 wrote
//!   it) under `string` `tidemark.data.PgText`, so Connect's converter reads
//!   it exactly instead of `0.0`;
//! - an array of 2 to 6 dimensions: a schema nested as deep
//!   (`array<array<int32>>`), so Connect reads `[[1,2],[3,4]]` exactly;
//! - an array whose lower bounds are not 1 (`[0:1]={7,8}`), or of floats with
//!   a non-finite element: its exact text under `tidemark.data.PgText`.
//!
//! The row without variants (the common case) allocates nothing for them.
//!
//! ## Field schema parameters
//!
//! Every field schema carries `parameters`: Debezium's
//! `__debezium.source.column.type` (`typname` upper-cased: `INT4`, `_INT4`,
//! `VARCHAR`, `MOOD`), `__debezium.source.column.length` (length of
//! `varchar(n)`, `char(n)`, `bit(n)`, `varbit(n)`; precision of `numeric(p,s)`)
//! and `__debezium.source.column.scale` (scale of `numeric(p,s)`; fractional
//! digits of `time(p)`, `timestamp(p)`, `interval(p)`...) where the column has
//! a typmod; `tidemark.column.type`, the exact SQL type
//! ([`ColumnType::sql_type`]); and `tidemark.array.delimiter` for arrays whose
//! element delimiter is not `,` (`box[]`: `;`).
//!
//! ## Changed from 0.1
//!
//! - Domains map as their base type (0.1: their `::text`, a string).
//! - `oid` (and `oid[]`, `oidvector`) values are JSON numbers, as their
//!   `int64` schema says (0.1 wrote strings, which Connect read as 0).
//! - Only the `timestamp` value past int64 µs takes the ISO variant (0.1
//!   switched every `timestamp` column of such a row).
//! - Float `NaN`s, multi-dimensional arrays and arrays with other lower
//!   bounds have schemas that say what the JSON holds (above).
//! - `xml` is its output text, as `COPY` and `pg_dump` print it (0.1 sent
//!   its stored text, which may keep an XML declaration `xml_out` drops).
//! - Values of user types are their output text (0.1 applied the type's
//!   cast to `text`, possibly user code).
//!
//! # Playback
//!
//! [`to_pg_text`] gives the text Postgres printed: `to_pg_text(schema,
//! encode(text)) == text` for every value of every mapping (tested against
//! a real Postgres, property-based, and fuzzed). The text goes to the
//! column's input function: as a literal `'..'::type` or in `COPY FROM`
//! text format (after COPY's own backslash escaping).
//!
//! # Tests
//!
//! Unit tests beside each part; property tests without a server in
//! `proptests`; against a real Postgres, every built-in and contrib type
//! (and generated values) through `record_out`, `COPY`, the codec and back,
//! byte for byte as 0.1, in `integration-tests/tests/it/codec.rs`; fuzz
//! targets in `common/fuzz` (see its README).

mod cache;
mod json;
mod playback;
#[cfg(test)]
mod proptests;
mod row;
mod text;
mod time;
mod types;

pub use cache::TypeCache;
pub use json::escape_json_into;
pub use playback::{to_pg_row, to_pg_text, to_pg_text_planned, TextPlan};
pub use row::{logical, param, table_parameters, ColumnSpec, RowCodec, Variant, Variants};
pub use text::{
    parse_array, parse_copy_line, parse_record, write_array_element, write_copy_field,
    write_record, ArrayText, Dim, Field, MAX_DIMS,
};
pub use types::{builtin, builtin_types, ColumnType, Oid, PgType, TypeKind, FIRST_NORMAL_OID};

/// Why a value cannot be carried, or a record not played back.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A column's value is not the text its type prints under Tidemark's
    /// session settings, or cannot be carried exactly.
    #[error("column {column:?} ({sql_type}): {reason}")]
    Value {
        /// The column.
        column: String,
        /// Its SQL type.
        sql_type: String,
        /// What is wrong.
        reason: String,
    },
    /// A composite or array literal that Postgres would not read.
    #[error("malformed {what} at byte {at}: {reason}")]
    Malformed {
        /// `composite literal` or `array literal`.
        what: &'static str,
        /// The byte offset of the trouble.
        at: usize,
        /// What is wrong.
        reason: String,
    },
    /// A row with a different number of values than the codec has columns.
    #[error("a row of {expected} columns came with {got} values")]
    Arity {
        /// The codec's columns.
        expected: usize,
        /// The values given.
        got: usize,
    },
    /// A record's field that does not fit its schema.
    #[error("field {field:?} cannot be played back: {reason}")]
    Playback {
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A type OID that is neither built in, nor in `pg_catalog.pg_type`, nor
    /// named by a pgoutput Type message.
    #[error("type {oid} is unknown: not built in, not in pg_catalog.pg_type (dropped?), and no pgoutput Type message named it")]
    UnknownType {
        /// The OID.
        oid: Oid,
    },
    /// The catalog query failed.
    #[error("cannot read type {oid} from pg_catalog.pg_type")]
    Catalog {
        /// The first OID of the query.
        oid: Oid,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },
}
