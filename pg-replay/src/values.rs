//! A value of a record, as the text its column type's input function reads,
//! and written into `COPY` text format.
//!
//! The type mapping itself is the codec's (`common::codec`): this module
//! only hands it the field schema and the JSON value, and escapes the text
//! for `COPY`.

use serde_json::Value;

/// The Postgres text form of `value` under `field_schema`; `None` for NULL.
///
/// Fails, saying why, when the value does not fit its schema.
pub fn pg_text(field_schema: &Value, value: &Value) -> Result<Option<String>, String> {
    tidemark_common::codec::to_pg_text(field_schema, value).map_err(|e| e.to_string())
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
