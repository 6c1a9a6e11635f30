//! The dead-letter topic: where a change goes that Tidemark cannot encode
//! exactly (a text its type's codec refuses), instead of its table's topic.
//!
//! Key: connector, table and key text. Value: connector, table, column,
//! key, the error, the raw text and where the change was in the source
//! (each mode says what its position is). The change still counts in its
//! unit's `total_order` and `event_count`, so a replay sees the gap and
//! stops there, naming this topic. Every dead letter is logged as an ERROR
//! and counted in `tidemark_source_dead_letters_total{table}`.

use serde_json::{json, Value};
use tidemark_common::ops::names;

use crate::producer::Record;

/// The topic of changes Tidemark cannot encode.
pub const TOPIC: &str = "tidemark.dead-letter";

/// A change that cannot be sent as an event.
#[derive(Debug)]
pub struct DeadLetter<'a> {
    /// The connector's name.
    pub connector: &'a str,
    /// The table, `schema.table` as `format('%I.%I')` writes it.
    pub table: &'a str,
    /// The column whose value was refused, when one was.
    pub column: Option<&'a str>,
    /// The key's text, when it could be read.
    pub key: Option<&'a str>,
    /// What is wrong.
    pub error: &'a str,
    /// The row image's text as the source gave it.
    pub raw: Option<&'a str>,
    /// `c`, `u` or `d`.
    pub op: &'a str,
    /// Where the change is in the source and in its unit.
    pub position: Value,
}

impl DeadLetter<'_> {
    /// The dead-letter record, logged and counted.
    pub fn record(&self) -> Record {
        tracing::error!(
            table = self.table,
            column = self.column.unwrap_or(""),
            key = self.key.unwrap_or(""),
            error = self.error,
            position = %self.position,
            topic = TOPIC,
            "a change cannot be carried exactly; sent to the dead-letter topic"
        );
        metrics::counter!(names::SOURCE_DEAD_LETTERS, "table" => self.table.to_owned())
            .increment(1);
        let key = json!({
            "connector": self.connector,
            "table": self.table,
            "key": self.key,
        });
        let value = json!({
            "connector": self.connector,
            "table": self.table,
            "column": self.column,
            "key": self.key,
            "error": self.error,
            "raw": self.raw,
            "op": self.op,
            "position": self.position,
        });
        Record {
            topic: TOPIC.to_owned(),
            key: serde_json::to_vec(&key).expect("JSON always serialises"),
            value: Some(serde_json::to_vec(&value).expect("JSON always serialises")),
        }
    }
}
