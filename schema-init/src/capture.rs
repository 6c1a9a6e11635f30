//! Change-log capture: the `tidemark.change_log` and `tidemark.shapes`
//! tables, the role `tidemark_capture`, per captured table a trigger
//! function and its triggers, and the event trigger `tidemark_ddl` that
//! keeps the functions in step with the tables' shapes (see
//! [`changelog_steps`] for the privilege model and why).
//!
//! Each captured table gets its own function, generated from the table's
//! shape (`tidemark.capture_<table>_<hash>`) with the table name and shape
//! id written in as literals, so the triggers run only static SQL that
//! Postgres plans once per session: no catalog lookup and no `execute` per
//! statement. The generator is itself a function in the database
//! (`tidemark.generate_capture`, in `sql/`), so that schema-init and the
//! event trigger generate the same code; `--dry-run` prints it.
//!
//! What the choices cost a writer is measured by `dev/bench-triggers` and
//! tabled in docs/benchmarks.md.

use tidemark_common::names::{self, quote_ident, quote_literal};
use tidemark_common::pg::TableName;

use crate::Step;

/// The change log every captured table writes to.
pub const CHANGE_LOG: &str = names::CHANGE_LOG;

/// How change-log triggers fire. Both record the same changes; they differ
/// in what they cost the writer (see docs/benchmarks.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerLevel {
    /// One log insert per changed row: a function call per row, so bulk
    /// statements pay most.
    Row,
    /// One log insert per statement from its transition tables: cheapest
    /// for bulk statements, about the same for single-row commits.
    Statement,
}

/// What an update's change event carries as `before`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateBefore {
    /// The whole row before the update, like Debezium with
    /// `REPLICA IDENTITY FULL`.
    Full,
    /// `null`, like Debezium with Postgres' default replica identity: each
    /// update logs one row image instead of two. Deletes still carry the
    /// whole old row, and an update that changes the primary key is still
    /// a delete of the old key and a create of the new one.
    Null,
}

/// Change-log capture as installed on one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capture {
    /// How the triggers fire.
    pub trigger: TriggerLevel,
    /// What updates log of the old row.
    pub update_before: UpdateBefore,
}

impl Capture {
    /// Capture with `trigger` that logs whole rows before and after.
    pub const fn full(trigger: TriggerLevel) -> Self {
        Self {
            trigger,
            update_before: UpdateBefore::Full,
        }
    }
}

impl From<TriggerLevel> for Capture {
    fn from(trigger: TriggerLevel) -> Self {
        Self::full(trigger)
    }
}

/// The name (unqualified) of `table`'s capture function in schema
/// `tidemark` (see [`names::capture_function`]).
pub fn function_name(table: &TableName) -> String {
    names::capture_function(table)
}

/// The session settings every capture function runs with, as `SET` clauses:
/// a fixed `search_path`, so that nothing a writer or table owner creates is
/// resolved in it, and the settings under which `record_out` prints values
/// in the text form the codec reads: those of every Tidemark session
/// ([`tidemark_common::pg::SESSION_SETTINGS`]) but `client_encoding` (the
/// text is stored in the server's encoding and converted for each reader).
pub fn function_settings() -> String {
    tidemark_common::pg::SESSION_SETTINGS
        .iter()
        .filter(|(name, _)| !name.eq_ignore_ascii_case("client_encoding"))
        .map(|(name, value)| {
            let value = if name.eq_ignore_ascii_case("search_path") {
                value
                    .split(',')
                    .map(|s| quote_literal(s.trim()))
                    .collect::<Vec<_>>()
                    .join(", ")
            } else {
                quote_literal(value)
            };
            format!("set {name} = {value}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The tags after which the event trigger looks for changed shapes: every
/// `ALTER TABLE` (columns, types, keys, renames) and the renames of what a
/// shape names (schemas, types, domains, extensions' types); and `CREATE
/// TABLE`, only to refuse an inheritance child of a captured table (or a
/// partition of one captured with statement triggers).
const DDL_TAGS: &str =
    "'ALTER TABLE', 'ALTER SCHEMA', 'ALTER TYPE', 'ALTER DOMAIN', 'ALTER EXTENSION', 'CREATE TABLE'";

/// The DROPs that can drop a table (a partition), before which the start
/// event trigger notes the partitions of captured tables; the drop trigger
/// refuses any other DROP of such a partition, which it cannot check.
const DROP_TAGS: &str = "'DROP TABLE', 'DROP FOREIGN TABLE', 'DROP SCHEMA', 'DROP OWNED', 'DROP TYPE', \
     'DROP DOMAIN', 'DROP EXTENSION', 'DROP SERVER', 'DROP FOREIGN DATA WRAPPER', 'DROP ACCESS METHOD'";

/// The check (and creation) of the capture role, for a role named `role`:
/// what schema-init runs for `tidemark_capture`, here so that tests can try
/// it on roles of their own (the real one is the server's, shared).
pub fn capture_role_sql(role: &str) -> String {
    fill(include_str!("sql/capture_role.sql")).replace(names::CAPTURE_ROLE, role)
}

/// The part of the schema checks that lists what in schema `tidemark` a
/// role other than a superuser controls (into `v_bad`).
const UNSAFE_OBJECTS: &str = include_str!("sql/unsafe_objects.sql");

/// The signal table (snapshots on demand), in both captures.
fn signal_table() -> String {
    format!(
        r#"create table if not exists {signal} (
  id pg_catalog.int8 generated always as identity primary key,
  kind pg_catalog.text not null,
  data pg_catalog.jsonb not null default '{{}}'::pg_catalog.jsonb,
  txid pg_catalog.xid8 not null default pg_catalog.pg_current_xact_id(),
  created_by pg_catalog.text not null default pg_catalog."current_user"(),
  created_at pg_catalog.timestamptz not null default pg_catalog.clock_timestamp()
)"#,
        signal = names::SIGNAL
    )
}

/// Fills the `@NAME@` placeholders of the SQL files with the names of
/// [`names`] (and a few constants of this module).
fn fill(template: &str) -> String {
    let settings = function_settings();
    let values: [(&str, &str); 29] = [
        ("SCHEMA", names::SCHEMA),
        ("SIGNAL", names::SIGNAL),
        ("CHANGE_LOG", names::CHANGE_LOG),
        ("SHAPES", names::SHAPES),
        ("CAPTURE_ROLE", names::CAPTURE_ROLE),
        ("GENERATE_CAPTURE", names::GENERATE_CAPTURE_FUNCTION),
        ("REFRESH_CAPTURES", names::REFRESH_CAPTURES_FUNCTION),
        ("EVENT_TRIGGER", names::EVENT_TRIGGER),
        ("EVENT_TRIGGER_FUNCTION", names::EVENT_TRIGGER_FUNCTION),
        (
            "DROP_EVENT_TRIGGER_FUNCTION",
            names::DROP_EVENT_TRIGGER_FUNCTION,
        ),
        ("ROW_TRIGGER", names::ROW_TRIGGER),
        ("INSERT_TRIGGER", names::INSERT_TRIGGER),
        ("UPDATE_TRIGGER", names::UPDATE_TRIGGER),
        ("DELETE_TRIGGER", names::DELETE_TRIGGER),
        ("TRUNCATE_TRIGGER", names::TRUNCATE_TRIGGER),
        ("TRUNCATE_BEGIN_TRIGGER", names::TRUNCATE_BEGIN_TRIGGER),
        ("TRUNCATE_END_TRIGGER", names::TRUNCATE_END_TRIGGER),
        ("TRUNCATE_GUARD_TRIGGER", names::TRUNCATE_GUARD_TRIGGER),
        ("TRUNCATE_GUARD_FUNCTION", names::TRUNCATE_GUARD_FUNCTION),
        (
            "GUARD_PARTITIONS_FUNCTION",
            names::GUARD_PARTITIONS_FUNCTION,
        ),
        ("TRUNCATE_MARKS", names::TRUNCATE_MARKS),
        (
            "ARCHIVE_PARTITION_FUNCTION",
            names::ARCHIVE_PARTITION_FUNCTION,
        ),
        (
            "DROP_START_EVENT_TRIGGER_FUNCTION",
            names::DROP_START_EVENT_TRIGGER_FUNCTION,
        ),
        ("DROPPING_SETTING", names::DROPPING_SETTING),
        ("NEW_TABLE", names::NEW_TRANSITION_TABLE),
        ("OLD_TABLE", names::OLD_TRANSITION_TABLE),
        ("FUNCTION_SETTINGS", &settings),
        ("DDL_TAGS", DDL_TAGS),
        ("NOTIFY_CHANNEL", names::NOTIFY_CHANNEL),
    ];
    let mut out = String::with_capacity(template.len() + 1024);
    let mut rest = template;
    while let Some(at) = rest.find('@') {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 1..];
        match tail.find('@').map(|end| (&tail[..end], end)) {
            Some((key, end)) if values.iter().any(|(k, _)| *k == key) => {
                let value = values.iter().find(|(k, _)| *k == key).expect("found").1;
                out.push_str(value);
                rest = &tail[end + 1..];
            }
            _ => {
                out.push('@');
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The change-log objects for one table.
///
/// **`tidemark.change_log`** holds one row per change: `seq` (the order in
/// which the changes were written; for two changes of one row it is also
/// their commit order, since the second writer waits for the first's row
/// lock), `txid` (`pg_current_xact_id()`, which pg-source compares with its
/// snapshots to read only finished transactions, in commit order), the
/// table, the `shape` the row images were written with, the operation, and
/// the row before and after as the text of `pg_catalog.record_out` (a
/// composite literal, which pg-source decodes with the codec by the shape).
/// **`tidemark.shapes`** holds each shape: the table's live columns in order
/// (name, attnum, type OID and typmod, `format_type` text, not-null), its
/// primary key's column names in index order, and the transaction and
/// snapshot (`pg_current_snapshot()`) of the DDL that recorded it, at which
/// pg-source ends a batch. A row image is never rendered by Postgres, so a `json` value jsonb
/// refuses, an `hstore` or a type without a JSON form is kept exactly.
///
/// **Privileges.** Each table's capture function is `security definer`,
/// owned by the NOLOGIN role `tidemark_capture`, which holds nothing but
/// USAGE on schema `tidemark`, INSERT on the change log and SELECT, INSERT,
/// DELETE on `tidemark.truncating` (the partition guard's marks; the identity
/// `seq` needs no sequence grant: Postgres does not check one for identity
/// columns). So writers need no grant of their own, cannot write the log
/// other than through their changes, and whatever the function ran would
/// run with no privilege but appending to the log. It runs no code of a
/// user's: `record_out` calls only the output functions of the columns'
/// types (C functions, which only a superuser installs, also for enums,
/// domains, composites and ranges); no cast, no domain CHECK, no operator
/// of a user's (old and new rows of statement triggers are paired by key
/// with the key's `pg_catalog` equality, or by the key's text where its
/// operator class is an extension's). The alternative, no security definer,
/// would make every writer need INSERT on the log, so any writer could
/// forge changes of any table. Its `SET` clauses ([`function_settings`])
/// fix `search_path` and the settings the codec reads values under.
///
/// **Names.** The generated code never shares a namespace with the user's
/// identifiers: no PL/pgSQL variables in queries over user rows (the table
/// name and shape id are written in as literals), whole rows as `alias.*`,
/// columns only as `alias.column`, and `#variable_conflict use_column`.
///
/// **Schema changes.** The event trigger `tidemark_ddl` (ddl_command_end,
/// so schema-init must run as a superuser) records a new shape for every
/// captured table an `ALTER TABLE` (or a rename) changed and regenerates its
/// capture function with the new shape id, in the DDL's own transaction;
/// the DDL's lock orders every row logged with the old shape before every
/// row logged with the new one. A second event trigger, `tidemark_ddl_drop`
/// (`sql_drop`), does the same for columns a cascade drops (`drop type`,
/// `drop domain`, `drop extension ... cascade`), which no `ALTER TABLE`
/// announces. A captured table left without a primary key
/// refuses writes, naming the fix, until it has one again (change a key in
/// one `ALTER TABLE`, or drop and add it in one transaction).
///
/// **TRUNCATE** fires the trigger `tidemark_capture_truncate` (`after
/// truncate`, per statement: Postgres has no row-level truncate trigger),
/// which runs the same function: one log row of op `t`, both images null,
/// with the table's current shape, in the truncating transaction and in its
/// order among that transaction's other changes. `TRUNCATE a, b` and
/// `TRUNCATE ... CASCADE` fire it on every captured table they empty. A
/// function generated before TRUNCATE was captured (its comment lacks
/// "truncate too") is generated anew by the next run.
///
/// **TRUNCATE of a partition.** Postgres clones no statement trigger onto
/// a partition, and a TRUNCATE of one partition of a captured partitioned
/// table removes only that partition's rows: a TRUNCATE event of the table
/// would empty the whole table on replay, and no event at all would keep
/// the rows. Such a TRUNCATE is refused, naming the fix (`delete from` the
/// partition, which is captured row by row, or truncate the table as a
/// whole): every partition at every depth gets the trigger
/// `tidemark_capture_truncate_guard` (`before truncate`, from
/// `tidemark.guard_partitions`; the event trigger puts it on partitions
/// created or attached later). A TRUNCATE of the partitioned table truncates
/// its partitions too and fires their triggers: the table's own
/// `tidemark_capture_truncate_begin` marks, in `tidemark.truncating`, which
/// no writer can write, that its partitions go with it, and
/// `tidemark_capture_truncate_end` clears the mark after it.
///
/// **ATTACH, DETACH and DROP of a partition.** The event trigger archives
/// the rows of a partition attached to (detached from) a captured
/// partitioned table as creates (deletes) of the table, in the DDL's
/// transaction (`tidemark.archive_partition`): one attached has no guard
/// yet, one detached keeps the guard whose argument names the table. A
/// `DROP` of a partition whose file is not empty is refused, naming the fix
/// (detach it first): `tidemark_ddl_drop_start` (`ddl_command_start`) notes
/// the partitions and their files, which `tidemark_ddl_drop` reads once
/// the catalog has forgotten them.
///
/// **Partitioned tables** take row triggers, which Postgres clones onto
/// every partition: the function builds each image column by column in the
/// partitioned table's order (a partition attached with its columns in
/// another order logs them in the table's). Statement triggers are refused
/// there, since a write straight to a partition never fires them.
///
/// **Replica sessions.** The triggers are enabled always, so they fire for
/// logical replication's apply too (it runs with `session_replication_role
/// = replica`, where a trigger enabled the default way does not fire); the
/// event trigger enables them always again after `enable trigger all`, and
/// warns when one is disabled.
///
/// **Generated text.** A body goes into `create function` as a string
/// literal, never between dollar quotes: a table or column name (which a
/// table owner chooses) may hold any dollar-quote tag, and the event
/// trigger generates the function as a superuser.
///
/// **Snapshots on demand.** `tidemark.signal` (`id`, `kind`, `data` jsonb,
/// `txid`, `created_by`, `created_at`) takes a row of kind
/// `execute-snapshot` with `data` `{"data-collections": ["public.t"]}` to
/// ask a running pg-source for an incremental snapshot of `public.t`
/// (Debezium's signal table, as a Tidemark table). Nobody but its owner
/// (the superuser schema-init runs as) may write it: every privilege is
/// revoked from public, and an administrator lets a role ask with
/// `grant usage on schema tidemark to R; grant insert (kind, data) on
/// tidemark.signal to R` (only those two columns, so the transaction id
/// pg-source orders signals by is always the writer's own). pg-source
/// reads it as it reads the change log (`grant select`), acting on each
/// row once: the first batch whose snapshot shows its transaction.
/// **Upgrading** from 0.1 (jsonb row images, no shape): an empty change log
/// is converted in place; one that still holds changes is refused, saying
/// how to drain it first.
pub fn changelog_steps(table: &TableName, capture: impl Into<Capture>) -> Vec<Step> {
    let capture = capture.into();
    let t = table.quoted();
    let function = names::capture_function_qualified(table);
    let step = |what: &str, sql: String| Step {
        what: what.to_owned(),
        sql,
        only_if_new_table: false,
        needs_key: false,
    };
    let change_log = names::CHANGE_LOG;
    let shapes = names::SHAPES;
    let role = quote_ident(names::CAPTURE_ROLE);
    let schema = quote_ident(names::SCHEMA);
    let mut steps = vec![
        step(
            "check that schema-init runs as a superuser and that schema tidemark is safe",
            fill(&include_str!("sql/check_changelog.sql").replace("@UNSAFE_OBJECTS@", UNSAFE_OBJECTS)),
        ),
        step(
            "create schema tidemark",
            format!("create schema if not exists {schema}"),
        ),
        step(
            "create table tidemark.change_log",
            format!(
                r#"create table if not exists {change_log} (
  seq pg_catalog.int8 generated always as identity primary key,
  txid pg_catalog.xid8 not null default pg_catalog.pg_current_xact_id(),
  table_name pg_catalog.text not null,
  shape pg_catalog.int4 not null,
  op pg_catalog."char" not null,
  before pg_catalog.text,
  after pg_catalog.text,
  changed_at pg_catalog.timestamptz not null default pg_catalog.clock_timestamp()
)"#
            ),
        ),
        step(
            "create table tidemark.shapes",
            format!(
                r#"create table if not exists {shapes} (
  id pg_catalog.int4 generated always as identity primary key,
  relid pg_catalog.oid not null,
  table_name pg_catalog.text not null,
  columns pg_catalog.jsonb not null,
  key pg_catalog.jsonb not null,
  created_at pg_catalog.timestamptz not null default pg_catalog.clock_timestamp()
)"#
            ),
        ),
        // Each shape's DDL transaction and the snapshot it saw (made empty
        // first, so shapes recorded before keep none rather than this
        // run's): pg-source ends a batch there, so that no unit holds a
        // table's changes of two shapes (see pg-source's changelog mode).
        // Only in read committed: there the recording statement's snapshot
        // is taken under the DDL's table lock; a repeatable read or
        // serializable transaction's snapshot may be older than the lock.
        // (The event trigger empties it for DDL that locks no table.)
        step(
            "add txid and snapshot to tidemark.shapes",
            format!(
                "alter table {shapes}\n  add column if not exists txid pg_catalog.xid8,\n  \
                 add column if not exists snapshot pg_catalog.pg_snapshot"
            ),
        ),
        step(
            "record the DDL's transaction and snapshot with each new shape",
            format!(
                "alter table {shapes}\n  alter column txid set default pg_catalog.pg_current_xact_id(),\n  \
                 alter column snapshot set default case\n    \
                 when pg_catalog.current_setting('transaction_isolation') operator(pg_catalog.=) 'read committed'\n    \
                 then pg_catalog.pg_current_snapshot() end"
            ),
        ),
        step(
            "create table tidemark.truncating",
            format!(
                "create table if not exists {} (\n  txid pg_catalog.xid8 not null,\n  relid pg_catalog.oid not null\n)",
                names::TRUNCATE_MARKS
            ),
        ),
        step(
            "revoke every privilege on tidemark.truncating from public",
            format!("revoke all on table {} from public", names::TRUNCATE_MARKS),
        ),
        step(
            "create table tidemark.signal",
            signal_table(),
        ),
        step(
            "revoke every privilege on tidemark.signal from public",
            format!("revoke all on table {} from public", names::SIGNAL),
        ),
        step(
            "create role tidemark_capture, or check the one there",
            fill(include_str!("sql/capture_role.sql")),
        ),
        step(
            "grant tidemark_capture usage on schema tidemark",
            format!("grant usage on schema {schema} to {role}"),
        ),
        step(
            "grant tidemark_capture insert on tidemark.change_log",
            format!("grant insert on table {change_log} to {role}"),
        ),
        step(
            "grant tidemark_capture select, insert, delete on tidemark.truncating",
            format!(
                "grant select, insert, delete on table {} to {role}",
                names::TRUNCATE_MARKS
            ),
        ),
        step(
            "create function tidemark.generate_capture",
            fill(include_str!("sql/generate_capture.sql")),
        ),
        step(
            "create function tidemark.refresh_captures",
            fill(include_str!("sql/refresh_captures.sql")),
        ),
        step(
            "create function tidemark.guard_truncate",
            fill(include_str!("sql/guard_truncate.sql")),
        ),
        step(
            "make tidemark_capture own tidemark.guard_truncate",
            format!(
                "alter function {}() owner to {role}",
                names::TRUNCATE_GUARD_FUNCTION
            ),
        ),
        step(
            "create function tidemark.guard_partitions",
            fill(include_str!("sql/guard_partitions.sql")),
        ),
        step(
            "create function tidemark.archive_partition",
            fill(include_str!("sql/archive_partition.sql")),
        ),
        step(
            "create function tidemark.on_ddl_command_end",
            fill(include_str!("sql/on_ddl_command_end.sql")),
        ),
        step(
            "create function tidemark.on_drop_start",
            fill(include_str!("sql/on_drop_start.sql")),
        ),
        step(
            "create function tidemark.on_sql_drop",
            fill(include_str!("sql/on_sql_drop.sql")),
        ),
        step(
            "revoke execute on tidemark's own functions from public",
            format!(
                "revoke all on function {}(pg_catalog.oid, pg_catalog.text, pg_catalog.text, pg_catalog.text), \
                 {}(pg_catalog.oid[]), {}(), {}(), {}(), {}(), {}(pg_catalog.oid), \
                 {}(pg_catalog.oid, pg_catalog.oid, pg_catalog.\"char\") from public",
                names::GENERATE_CAPTURE_FUNCTION,
                names::REFRESH_CAPTURES_FUNCTION,
                names::EVENT_TRIGGER_FUNCTION,
                names::DROP_START_EVENT_TRIGGER_FUNCTION,
                names::DROP_EVENT_TRIGGER_FUNCTION,
                names::TRUNCATE_GUARD_FUNCTION,
                names::GUARD_PARTITIONS_FUNCTION,
                names::ARCHIVE_PARTITION_FUNCTION,
            ),
        ),
        step(
            "upgrade a change log of Tidemark 0.1",
            fill(include_str!("sql/upgrade_0_1.sql")),
        ),
    ];
    steps.push(step(
        "check that no write to the table can bypass its triggers (partitions, inheritance)",
        do_block(&format!(
            r#"declare
  v_relkind pg_catalog.char;
  v_partition pg_catalog.bool;
  v_name pg_catalog.text;
  v_parent pg_catalog.text;
  v_child pg_catalog.text;
begin
  select c.relkind, c.relispartition, c.oid::pg_catalog.regclass::pg_catalog.text,
         (select i.inhparent::pg_catalog.regclass::pg_catalog.text from pg_catalog.pg_inherits i
           where i.inhrelid operator(pg_catalog.=) c.oid order by i.inhseqno limit 1),
         (select i.inhrelid::pg_catalog.regclass::pg_catalog.text from pg_catalog.pg_inherits i
           where i.inhparent operator(pg_catalog.=) c.oid order by i.inhrelid limit 1)
    into v_relkind, v_partition, v_name, v_parent, v_child
    from pg_catalog.pg_class c
   where c.oid operator(pg_catalog.=) {table}::pg_catalog.regclass;
  if {statement} and v_relkind operator(pg_catalog.=) 'p' then
    raise exception using
      message = pg_catalog.format('table %s is partitioned: its statement-level triggers would not fire for writes made to a partition directly, whose changes would be lost', v_name),
      hint = 'capture it with row-level triggers (--capture-trigger row), which its partitions inherit';
  end if;
  if {statement} and v_parent is not null then
    raise exception using
      message = pg_catalog.format('table %s is %s of %s: its statement-level triggers would not fire for writes made through %s, whose changes would be lost',
        v_name, case when v_partition then 'a partition' else 'an inheritance child' end, v_parent, v_parent),
      hint = 'capture it with row-level triggers (--capture-trigger row), which fire for every row written to it, or capture the partitioned table';
  end if;
  if v_relkind operator(pg_catalog.<>) 'p' and v_child is not null then
    raise exception using
      message = pg_catalog.format('table %s has the inheritance child %s: its triggers would not fire for rows of %s (written to it directly, or updated and deleted through %s), whose changes would be lost', v_name, v_child, v_child, v_name),
      hint = 'make it a partitioned table, whose row-level triggers every partition runs (--capture-trigger row)';
  end if;
end"#,
            table = quote_literal(&t),
            statement = capture.trigger == TriggerLevel::Statement,
        )),
    ));
    steps.extend([Step {
        needs_key: true,
        ..step(
            &format!("create function tidemark.capture for {table}"),
            format!(
                "select {}({}::pg_catalog.regclass::pg_catalog.oid, {}, {}, {})",
                names::GENERATE_CAPTURE_FUNCTION,
                quote_literal(&t),
                quote_literal(&names::capture_function(table)),
                quote_literal(match capture.trigger {
                    TriggerLevel::Row => "row",
                    TriggerLevel::Statement => "statement",
                }),
                quote_literal(match capture.update_before {
                    UpdateBefore::Full => "full",
                    UpdateBefore::Null => "null",
                }),
            ),
        )
    }]);
    let drop = |name: &str| format!("drop trigger if exists {} on {t}", quote_ident(name));

    match capture.trigger {
        TriggerLevel::Row => {
            for name in [
                names::INSERT_TRIGGER,
                names::UPDATE_TRIGGER,
                names::DELETE_TRIGGER,
            ] {
                steps.push(step(
                    &format!("drop statement-level trigger {name}"),
                    drop(name),
                ));
            }
            steps.push(step(
                &format!("create trigger {}", names::ROW_TRIGGER),
                format!(
                    "create or replace trigger {}\n\
                     after insert or update or delete on {t}\n\
                     for each row execute function {function}()",
                    quote_ident(names::ROW_TRIGGER)
                ),
            ));
        }
        TriggerLevel::Statement => {
            steps.push(step(
                &format!("drop row-level trigger {}", names::ROW_TRIGGER),
                drop(names::ROW_TRIGGER),
            ));
            let (old, new) = (
                quote_ident(names::OLD_TRANSITION_TABLE),
                quote_ident(names::NEW_TRANSITION_TABLE),
            );
            for (name, event, tables) in [
                (
                    names::INSERT_TRIGGER,
                    "insert",
                    format!("new table as {new}"),
                ),
                (
                    names::UPDATE_TRIGGER,
                    "update",
                    format!("old table as {old} new table as {new}"),
                ),
                (
                    names::DELETE_TRIGGER,
                    "delete",
                    format!("old table as {old}"),
                ),
            ] {
                // A trigger's transition tables cannot be changed in place.
                steps.push(step(&format!("drop trigger {name}"), drop(name)));
                steps.push(step(
                    &format!("create trigger {name}"),
                    format!(
                        "create trigger {}\n\
                         after {event} on {t}\n\
                         referencing {tables}\n\
                         for each statement execute function {function}()",
                        quote_ident(name)
                    ),
                ));
            }
        }
    }
    // Postgres fires truncate triggers per statement only, at both levels;
    // the function logs one `t` row with no image. `TRUNCATE a, b` and a
    // cascade fire the trigger of each captured table truncated.
    steps.push(step(
        &format!("create trigger {}", names::TRUNCATE_TRIGGER),
        format!(
            "create or replace trigger {}\n\
             after truncate on {t}\n\
             for each statement execute function {function}()",
            quote_ident(names::TRUNCATE_TRIGGER)
        ),
    ));
    // Postgres clones no statement trigger onto a partition: a partitioned
    // table's partitions refuse a TRUNCATE of their own, which no event
    // could carry (the event trigger guards partitions made later too).
    steps.push(step(
        "guard the partitions of a partitioned table against a TRUNCATE of a partition alone",
        format!(
            "select {}({}::pg_catalog.regclass::pg_catalog.oid)",
            names::GUARD_PARTITIONS_FUNCTION,
            quote_literal(&t)
        ),
    ));
    // Also in replica sessions: logical replication's apply (a subscriber's
    // tables) runs as one, and a trigger enabled the default way would not
    // fire for what it writes. One ALTER TABLE, so that the event trigger
    // (of an earlier run) sees them all enabled.
    let triggers: &[&str] = match capture.trigger {
        TriggerLevel::Row => &[names::ROW_TRIGGER, names::TRUNCATE_TRIGGER],
        TriggerLevel::Statement => &[
            names::INSERT_TRIGGER,
            names::UPDATE_TRIGGER,
            names::DELETE_TRIGGER,
            names::TRUNCATE_TRIGGER,
        ],
    };
    steps.push(step(
        "enable the capture triggers always (also for replica sessions)",
        format!(
            "alter table {t} {}",
            triggers
                .iter()
                .map(|name| format!("enable always trigger {}", quote_ident(name)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ));
    for (name, event, function) in [
        (
            names::EVENT_TRIGGER,
            format!("ddl_command_end\nwhen tag in ({DDL_TAGS})"),
            names::EVENT_TRIGGER_FUNCTION,
        ),
        (
            names::DROP_START_EVENT_TRIGGER,
            format!("ddl_command_start\nwhen tag in ({DROP_TAGS})"),
            names::DROP_START_EVENT_TRIGGER_FUNCTION,
        ),
        (
            names::DROP_EVENT_TRIGGER,
            "sql_drop".to_owned(),
            names::DROP_EVENT_TRIGGER_FUNCTION,
        ),
    ] {
        let event_trigger = quote_ident(name);
        steps.extend([
            step(
                &format!("drop event trigger {name}"),
                format!("drop event trigger if exists {event_trigger}"),
            ),
            step(
                &format!("create event trigger {name}"),
                format!(
                    "create event trigger {event_trigger} on {event}\n\
                     execute function {function}()"
                ),
            ),
            // Also under session_replication_role = replica, so no DDL leaves
            // a capture function writing a shape the table no longer has.
            step(
                &format!("enable event trigger {name} always"),
                format!("alter event trigger {event_trigger} enable always"),
            ),
        ]);
    }
    steps
}

/// A `do` block of `body`, which holds names: as a string literal, never
/// between dollar quotes, since a name may hold any dollar-quote tag.
fn do_block(body: &str) -> String {
    format!("do {}", quote_literal(body))
}

/// The objects of `logical` capture for one table: the whole old row in
/// the WAL (`replica identity full`, so updates and deletes carry their
/// `before` as change-log capture does) and a publication of its inserts,
/// updates, deletes and truncates, which pg-source's replication slot
/// reads (a publication an older schema-init made without truncates is
/// altered to publish them). A partitioned table is refused (see
/// docs/modes.md): pgoutput sends a partition's changes under the
/// partition's own name and replica identity, and a TRUNCATE of one
/// partition, which no event of the table could carry, goes unseen when
/// the partitions are published as their table. Nothing
/// runs in the writers' transactions: Postgres decodes the WAL in its own
/// process. Change-log triggers left from `--capture changelog` are
/// dropped, so writers do not pay for both.
pub fn logical_steps(table: &TableName) -> Vec<Step> {
    let t = table.quoted();
    let publication = names::publication_name(table);
    let step = |what: &str, sql: String| Step {
        what: what.to_owned(),
        sql,
        only_if_new_table: false,
        needs_key: true,
    };
    let mut steps = Vec::new();
    for name in names::CAPTURE_TRIGGERS {
        steps.push(Step {
            needs_key: false,
            ..step(
                &format!("drop change-log trigger {name}"),
                format!("drop trigger if exists {} on {t}", quote_ident(name)),
            )
        });
    }
    steps.push(step(
        "check that the table is not partitioned (a TRUNCATE of one partition could not be carried)",
        do_block(&format!(
            r#"begin
  if exists (select 1 from pg_catalog.pg_class c
              where c.oid operator(pg_catalog.=) {table}::pg_catalog.regclass
                and c.relkind operator(pg_catalog.=) 'p') then
    raise exception using
      errcode = 'feature_not_supported',
      message = pg_catalog.format('table %s is partitioned, which logical capture does not carry: the stream names its partitions, each with a replica identity of its own, and drops a TRUNCATE of one partition unseen, so a restore would keep its rows', {table}::pg_catalog.regclass),
      hint = 'capture it with --capture changelog --capture-trigger row (and mode changelog), which carries every partition''s changes and refuses a TRUNCATE of a partition alone';
  end if;
end"#,
            table = quote_literal(&t),
        )),
    ));
    steps.push(step(
        "check that the table has no generated columns (logical decoding does not send them)",
        do_block(&format!(
            r#"declare
  v_columns pg_catalog.text;
begin
  select pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' order by a.attnum) into v_columns
    from pg_catalog.pg_attribute a
   where a.attrelid operator(pg_catalog.=) {table}::pg_catalog.regclass
     and a.attnum operator(pg_catalog.>) 0 and not a.attisdropped
     and a.attgenerated operator(pg_catalog.<>) '';
  if v_columns is not null then
    raise exception using
      message = pg_catalog.format('table %s has generated columns (%s), whose values logical decoding does not send, so its events would lack them', {table}::pg_catalog.regclass, v_columns),
      hint = 'capture it with --capture changelog (and mode changelog), whose row images carry them';
  end if;
end"#,
            table = quote_literal(&t),
        )),
    ));
    steps.push(step(
        &format!("set replica identity full on {table}"),
        format!("alter table {t} replica identity full"),
    ));
    steps.push(step(
        &format!("create publication {publication}"),
        do_block(&format!(
            r#"begin
  if not exists (select 1 from pg_catalog.pg_publication where pubname operator(pg_catalog.=) {name}) then
    create publication {ident} for table {t} with (publish = 'insert, update, delete, truncate');
  else
    if not (select p.pubtruncate from pg_catalog.pg_publication p where p.pubname operator(pg_catalog.=) {name}) then
      -- Made by a schema-init from before TRUNCATE was captured.
      alter publication {ident} set (publish = 'insert, update, delete, truncate');
    end if;
    if not exists (select 1 from pg_catalog.pg_publication_rel r
                     join pg_catalog.pg_publication p on p.oid operator(pg_catalog.=) r.prpubid
                    where p.pubname operator(pg_catalog.=) {name}
                      and r.prrelid operator(pg_catalog.=) {table}::pg_catalog.regclass) then
      -- The table was dropped and created again under its name (a
      -- publication holds tables by OID, so the new one is not in it).
      alter publication {ident} set table {t};
    end if;
  end if;
end"#,
            table = quote_literal(&t),
            name = quote_literal(&publication),
            ident = quote_ident(&publication),
        )),
    ));
    steps.push(Step {
        needs_key: false,
        ..step(
            "create table tidemark.signal (snapshots on demand; as a superuser only)",
            fill(
                &include_str!("sql/signal_logical.sql")
                    .replace("@UNSAFE_OBJECTS@", UNSAFE_OBJECTS)
                    .replace("@SIGNAL_TABLE@", &signal_table()),
            ),
        )
    });
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql(capture: Capture) -> String {
        let t = TableName::parse("streaming_update_table").unwrap();
        changelog_steps(&t, capture)
            .iter()
            .map(|s| s.sql.clone())
            .collect::<Vec<_>>()
            .join(";\n")
    }

    #[test]
    fn every_placeholder_is_filled() {
        for capture in [
            Capture::full(TriggerLevel::Row),
            Capture::full(TriggerLevel::Statement),
        ] {
            let text = sql(capture);
            let mut rest = text.as_str();
            while let Some(at) = rest.find('@') {
                let tail = &rest[at + 1..];
                let word: String = tail
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                    .collect();
                assert!(
                    !(word.len() > 2 && tail[word.len()..].starts_with('@')),
                    "unfilled @{word}@"
                );
                rest = tail;
            }
            assert!(text.contains("create or replace function tidemark.generate_capture("));
            assert!(text.contains("insert into tidemark.change_log (table_name, shape, op, after)"));
            assert!(text.contains(
                "set search_path = 'pg_catalog', 'pg_temp' set DateStyle = 'ISO' set IntervalStyle = 'iso_8601' set TimeZone = 'UTC'"
            ));
            assert!(!text.contains("set client_encoding"));
        }
    }

    #[test]
    fn row_and_statement_triggers_replace_each_other() {
        let row = sql(Capture::full(TriggerLevel::Row));
        assert!(row.contains(
            "select tidemark.generate_capture('\"public\".\"streaming_update_table\"'::pg_catalog.regclass::pg_catalog.oid, 'capture_streaming_update_table_775a793d', 'row', 'full')"
        ));
        assert!(row.contains(
            "for each row execute function tidemark.\"capture_streaming_update_table_775a793d\"()"
        ));
        assert!(row.contains("drop trigger if exists \"tidemark_capture_update\""));
        let statement = sql(Capture {
            trigger: TriggerLevel::Statement,
            update_before: UpdateBefore::Null,
        });
        assert!(statement.contains("'statement', 'null')"));
        assert!(statement
            .contains("referencing old table as \"tidemark_old\" new table as \"tidemark_new\""));
        assert!(statement.contains("drop trigger if exists \"tidemark_capture\" on"));
        assert!(statement.contains("create event trigger \"tidemark_ddl\" on ddl_command_end"));
    }

    #[test]
    fn only_the_generation_needs_a_primary_key() {
        let t = TableName::parse("t").unwrap();
        let steps = changelog_steps(&t, TriggerLevel::Row);
        let keyed: Vec<&str> = steps
            .iter()
            .filter(|s| s.needs_key)
            .map(|s| s.what.as_str())
            .collect();
        assert_eq!(keyed, ["create function tidemark.capture for public.t"]);
    }

    #[test]
    fn odd_table_names_stay_quoted() {
        let t = TableName::parse(r#""My ""Table""#).unwrap();
        let text: String = changelog_steps(&t, Capture::full(TriggerLevel::Row))
            .iter()
            .map(|s| s.sql.clone())
            .collect();
        assert!(
            text.contains(r#"'"public"."My ""Table"'::pg_catalog.regclass"#),
            "{text}"
        );
    }
}
