//! A value of a record, as the text its column type's input function reads,
//! and written into `COPY` text format.
//!
//! The type mapping itself is the codec's (`common::codec`): this module
//! only hands it the field schema (with its plan, worked out once per
//! schema) and the JSON value, and escapes the text for `COPY`.

use std::borrow::Cow;

use serde_json::Value;
use tidemark_common::codec::{to_pg_text_planned, TextPlan};

/// The field schemas of a table's staging columns, each with its
/// [`TextPlan`], worked out once per record schema.
#[derive(Debug)]
pub struct Fields {
    schemas: Vec<Value>,
    plans: Vec<TextPlan>,
}

impl Fields {
    /// The fields of these schemas, in staging column order.
    pub fn new(schemas: Vec<Value>) -> Self {
        let plans = schemas.iter().map(TextPlan::of).collect();
        Self { schemas, plans }
    }

    /// The Postgres text of `value` in staging column `j` (0-based); `None`
    /// for NULL. A column without a field schema reads as a string.
    ///
    /// Fails, saying why, when the value does not fit its schema.
    pub fn pg_text<'a>(&self, j: usize, value: &'a Value) -> Result<Option<Cow<'a, str>>, String> {
        let schema = self.schemas.get(j).unwrap_or(&Value::Null);
        let plan = self
            .plans
            .get(j)
            .copied()
            .unwrap_or_else(|| TextPlan::of(schema));
        to_pg_text_planned(plan, schema, value).map_err(|e| e.to_string())
    }
}

/// Appends `text` to a `COPY ... from stdin` (text format) row: backslash,
/// tab, newline and carriage return escaped.
pub fn copy_escape(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// The `COPY` text form of NULL.
pub const COPY_NULL: &[u8] = b"\\N";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_is_escaped() {
        let mut out = Vec::new();
        copy_escape(&mut out, "a\tb\\c\nd\re");
        assert_eq!(out, b"a\\tb\\\\c\\nd\\re");
        let mut out = Vec::new();
        copy_escape(&mut out, "\\N");
        assert_eq!(out, b"\\\\N", "a text that reads \\N is not NULL");
    }
}
