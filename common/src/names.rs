//! Every name Tidemark creates in a user's database, in one place, and the
//! quoting that puts names and values into SQL.
//!
//! schema-init creates these objects, pg-source and pg-replay read them; a
//! name written twice could drift. Everything Tidemark owns lives in schema
//! [`SCHEMA`], whose names start with nothing a user table needs, and every
//! name outside it (triggers on the user's tables, the publication, the
//! capture role) starts with `tidemark`. The seed's own objects (its
//! `last_updated` trigger and index) are the user's, named as the seed names
//! them, and are here too so that nothing else spells them.
//!
//! Names are plain strings; [`quote_ident`] and [`quote_literal`] make them
//! safe in SQL. Qualified constants (`tidemark.change_log`) are written so
//! that they need no quoting.

use crate::pg::TableName;

/// The schema that holds Tidemark's own objects.
pub const SCHEMA: &str = "tidemark";

/// The change log the capture triggers append to (`changelog` capture).
pub const CHANGE_LOG: &str = "tidemark.change_log";

/// The row shapes change-log rows were written with (`changelog` capture):
/// one row per table and column layout, referenced by `change_log.shape`.
pub const SHAPES: &str = "tidemark.shapes";

/// The signal table (`changelog` capture): a row of kind
/// [`SIGNAL_EXECUTE_SNAPSHOT`] asks pg-source for an incremental snapshot
/// of the tables its `data` names.
pub const SIGNAL: &str = "tidemark.signal";

/// [`SIGNAL`]'s kind that asks for a snapshot (Debezium's signal name).
pub const SIGNAL_EXECUTE_SNAPSHOT: &str = "execute-snapshot";

/// pg-replay's applied position, in the target database.
pub const REPLAY_POSITION: &str = "tidemark.replay_position";

/// The row-level capture trigger (`--capture-trigger row`).
pub const ROW_TRIGGER: &str = "tidemark_capture";

/// The statement-level capture trigger of inserts (`--capture-trigger statement`).
pub const INSERT_TRIGGER: &str = "tidemark_capture_insert";

/// The statement-level capture trigger of updates.
pub const UPDATE_TRIGGER: &str = "tidemark_capture_update";

/// The statement-level capture trigger of deletes.
pub const DELETE_TRIGGER: &str = "tidemark_capture_delete";

/// The statement-level capture trigger of `TRUNCATE` (both trigger levels:
/// Postgres fires truncate triggers per statement only).
pub const TRUNCATE_TRIGGER: &str = "tidemark_capture_truncate";

/// On a captured partitioned table: marks, before a `TRUNCATE` of it, that
/// its partitions are truncated with it (see [`TRUNCATE_GUARD_FUNCTION`]).
pub const TRUNCATE_BEGIN_TRIGGER: &str = "tidemark_capture_truncate_begin";

/// On a captured partitioned table: clears the mark of
/// [`TRUNCATE_BEGIN_TRIGGER`] after the `TRUNCATE`.
pub const TRUNCATE_END_TRIGGER: &str = "tidemark_capture_truncate_end";

/// On every partition (at any depth) of a captured partitioned table:
/// refuses a `TRUNCATE` that empties the partition without its table.
pub const TRUNCATE_GUARD_TRIGGER: &str = "tidemark_capture_truncate_guard";

/// The function of the three triggers above (security definer, owned by
/// [`CAPTURE_ROLE`] in `changelog` capture).
pub const TRUNCATE_GUARD_FUNCTION: &str = "tidemark.guard_truncate";

/// Puts [`TRUNCATE_BEGIN_TRIGGER`], [`TRUNCATE_END_TRIGGER`] and
/// [`TRUNCATE_GUARD_TRIGGER`] on a partitioned table and its partitions.
pub const GUARD_PARTITIONS_FUNCTION: &str = "tidemark.guard_partitions";

/// The marks of [`TRUNCATE_BEGIN_TRIGGER`]: (transaction, table) while the
/// table's `TRUNCATE` runs.
pub const TRUNCATE_MARKS: &str = "tidemark.truncating";

/// Every capture trigger name; a table with [`ROW_TRIGGER`] or
/// [`INSERT_TRIGGER`] is captured.
pub const CAPTURE_TRIGGERS: [&str; 8] = [
    ROW_TRIGGER,
    INSERT_TRIGGER,
    UPDATE_TRIGGER,
    DELETE_TRIGGER,
    TRUNCATE_TRIGGER,
    TRUNCATE_BEGIN_TRIGGER,
    TRUNCATE_END_TRIGGER,
    TRUNCATE_GUARD_TRIGGER,
];

/// The transition table of new rows in statement-level capture triggers.
pub const NEW_TRANSITION_TABLE: &str = "tidemark_new";

/// The transition table of old rows in statement-level capture triggers.
pub const OLD_TRANSITION_TABLE: &str = "tidemark_old";

/// The NOLOGIN role that owns the capture functions: it holds USAGE on
/// [`SCHEMA`] and INSERT on [`CHANGE_LOG`], nothing else.
pub const CAPTURE_ROLE: &str = "tidemark_capture";

/// The event trigger that keeps capture functions in step with `ALTER TABLE`.
pub const EVENT_TRIGGER: &str = "tidemark_ddl";

/// The function [`EVENT_TRIGGER`] runs.
pub const EVENT_TRIGGER_FUNCTION: &str = "tidemark.on_ddl_command_end";

/// The event trigger (`sql_drop`) that keeps capture functions in step with
/// columns dropped by a cascade (`drop type ... cascade`, `drop extension
/// ... cascade`), which no `ALTER TABLE` announces.
pub const DROP_EVENT_TRIGGER: &str = "tidemark_ddl_drop";

/// The function [`DROP_EVENT_TRIGGER`] runs.
pub const DROP_EVENT_TRIGGER_FUNCTION: &str = "tidemark.on_sql_drop";

/// The event trigger (`ddl_command_start` of the DROPs that can drop a
/// table) that notes, for [`DROP_EVENT_TRIGGER`], every partition of a
/// captured partitioned table and where its rows are stored: a partition
/// dropped with rows would remove them from the table unseen.
pub const DROP_START_EVENT_TRIGGER: &str = "tidemark_ddl_drop_start";

/// The function [`DROP_START_EVENT_TRIGGER`] runs.
pub const DROP_START_EVENT_TRIGGER_FUNCTION: &str = "tidemark.on_drop_start";

/// The transaction-local setting in which [`DROP_START_EVENT_TRIGGER`]
/// hands its notes to [`DROP_EVENT_TRIGGER`].
pub const DROPPING_SETTING: &str = "tidemark.dropping";

/// Logs every row of a partition attached to (or detached from) a captured
/// partitioned table as a create (or a delete) of that table.
pub const ARCHIVE_PARTITION_FUNCTION: &str = "tidemark.archive_partition";

/// The function that records a table's shape and (re)creates its capture
/// function; schema-init and [`EVENT_TRIGGER_FUNCTION`] call it.
pub const GENERATE_CAPTURE_FUNCTION: &str = "tidemark.generate_capture";

/// The function that brings captured tables' functions up to date with
/// their shapes (the event trigger's work, and the 0.1 upgrade's).
pub const REFRESH_CAPTURES_FUNCTION: &str = "tidemark.refresh_captures";

/// The channel the NOTIFY trigger signals on and pg-source listens on
/// (timestamp+incrementing mode).
pub const NOTIFY_CHANNEL: &str = "tidemark";

/// The function of the NOTIFY trigger.
pub const NOTIFY_FUNCTION: &str = "tidemark.notify_change";

/// The statement-level trigger that sends `NOTIFY tidemark`.
pub const NOTIFY_TRIGGER: &str = "tidemark_notify";

/// The prefix of every publication schema-init creates (`logical` capture).
pub const PUBLICATION_PREFIX: &str = "tidemark_";

/// The seed table's trigger function and trigger, which keep
/// `last_updated` current; created in the table's own schema.
pub const SEED_LAST_UPDATED: &str = "update_last_updated_column";

/// The advisory-lock key text that keeps two schema-init runs apart.
pub const SCHEMA_INIT_LOCK: &str = "tidemark.schema-init";

/// The unqualified name of `table`'s capture function in [`SCHEMA`]:
/// readable, under Postgres' 63-byte limit, and distinct for tables whose
/// names differ only in where the dot is.
pub fn capture_function(table: &TableName) -> String {
    format!("capture_{}", short_hashed(table))
}

/// `tidemark."capture_..."`, ready for SQL.
pub fn capture_function_qualified(table: &TableName) -> String {
    format!("{SCHEMA}.{}", quote_ident(&capture_function(table)))
}

/// The publication schema-init creates for `logical` capture of `table`.
/// Always put it into SQL or `START_REPLICATION` with [`quote_ident`]: it
/// keeps the table name's case and characters.
pub fn publication_name(table: &TableName) -> String {
    format!("{PUBLICATION_PREFIX}{}", short_hashed(table))
}

/// The seed's `(last_updated, id)` index on `table` (in the table's schema).
pub fn seed_index(table: &TableName) -> String {
    let short = table.name.chars().take(40).collect::<String>();
    format!("{short}_last_updated_id_idx")
}

/// The first 40 bytes of `table`'s name and a hash of its quoted full name.
pub fn short_hashed(table: &TableName) -> String {
    // FNV-1a, 32 bits: stable across releases, unlike std's hasher.
    let mut hash: u32 = 0x811c_9dc5;
    for b in table.quoted().bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let mut short = String::new();
    for c in table.name.chars() {
        if short.len() + c.len_utf8() > 40 {
            break;
        }
        short.push(c);
    }
    format!("{short}_{hash:08x}")
}

/// Quotes an identifier for SQL (`"a""b"`), so a name from config or the
/// catalog can never inject SQL or change case.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string constant for SQL (`'it''s'`). Tidemark's sessions run
/// with `standard_conforming_strings = on`, so a backslash is an ordinary
/// character; a string holding one is written in the `E''` form anyway, so
/// the literal means the same under either setting.
pub fn quote_literal(value: &str) -> String {
    if value.contains('\\') {
        format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", value.replace('\'', "''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_are_short_stable_and_distinct() {
        let a = TableName::parse("a_b.c").unwrap();
        let b = TableName::parse("a.b_c").unwrap();
        assert_ne!(capture_function(&a), capture_function(&b));
        assert_eq!(capture_function(&a), capture_function(&a));
        let wide = TableName::parse(&"é".repeat(31)).unwrap();
        assert!(
            capture_function(&wide).len() <= 63,
            "{}",
            capture_function(&wide)
        );
        let long = TableName::parse(&"x".repeat(63)).unwrap();
        assert!(capture_function(&long).len() <= 63);
        assert!(capture_function(&long).starts_with(&format!("capture_{}", "x".repeat(40))));
    }

    #[test]
    fn names_keep_the_values_of_0_1() {
        // Installed databases carry these names; a change would orphan them.
        let seed = TableName::parse("streaming_update_table").unwrap();
        assert_eq!(
            publication_name(&seed),
            "tidemark_streaming_update_table_775a793d"
        );
        assert_eq!(
            capture_function_qualified(&seed),
            "tidemark.\"capture_streaming_update_table_775a793d\""
        );
        assert_eq!(
            seed_index(&seed),
            "streaming_update_table_last_updated_id_idx"
        );
    }

    #[test]
    fn quoting_cannot_be_escaped() {
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\'b"), r"E'a\\''b'");
    }
}
