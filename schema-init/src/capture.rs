//! Change-log capture: the `tidemark.change_log` table and, per captured
//! table, a trigger function and its triggers.
//!
//! Each captured table gets its own function, generated at install time
//! from the table's primary key (`tidemark.capture_<table>_<hash>`), so the
//! triggers run only static SQL that Postgres plans once per session: no
//! catalog lookup and no `execute` per statement. Changing the primary key
//! later needs schema-init to run again; pg-source refuses a table whose
//! trigger is missing.
//!
//! What the choices cost a writer is measured by `dev/bench-triggers` and
//! tabled in the README.

use tidemark_common::pg::{quote_ident, TableName};

use crate::Step;

/// The change log every captured table writes to.
pub const CHANGE_LOG: &str = "tidemark.change_log";

/// How change-log triggers fire. Both record the same changes; they differ
/// in what they cost the writer (see the README's table).
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
/// `tidemark`: readable, under Postgres' 63-byte limit, and distinct for
/// tables whose names differ only in where the dot is.
pub fn function_name(table: &TableName) -> String {
    format!("capture_{}", tidemark_common::pg::short_hashed(table))
}

/// The change-log objects for one table.
///
/// `tidemark.change_log` holds one row per change: `seq` (the order in
/// which the changes were written; for two changes of one row it is also
/// their commit order, since the second writer waits for the first's row
/// lock), `txid` (`pg_current_xact_id()`, which pg-source compares with its
/// snapshots to read only finished transactions, in commit order), the
/// table, the operation and the row before and after as `jsonb`. The
/// trigger function is `security definer`, so writers need no grant on the
/// `tidemark` schema. Its `search_path` is fixed (`pg_catalog, pg_temp`)
/// and every name in it is schema-qualified as well: a writer's own
/// `search_path` or temporary objects (a `pg_temp.text` domain, say) must
/// not run code as the function's owner. `extra_float_digits = 3` keeps a
/// writer's own setting from shortening the floats it logs.
pub fn changelog_steps(table: &TableName, capture: impl Into<Capture>) -> Vec<Step> {
    let capture = capture.into();
    let t = table.quoted();
    let function = format!("tidemark.{}", quote_ident(&function_name(table)));
    let step = |what: &str, sql: String| Step {
        what: what.to_owned(),
        sql,
        only_if_new_table: false,
    };
    let mut steps = vec![
        step(
            "create schema tidemark",
            "create schema if not exists tidemark".into(),
        ),
        step(
            "create table tidemark.change_log",
            format!(
                r#"create table if not exists {CHANGE_LOG} (
  seq bigint generated always as identity primary key,
  txid xid8 not null default pg_current_xact_id(),
  table_name text not null,
  op "char" not null,
  before jsonb,
  after jsonb,
  changed_at timestamptz not null default clock_timestamp()
)"#
            ),
        ),
        step(
            &format!("create function tidemark.capture for {table}"),
            function_sql(table, &function, capture),
        ),
    ];
    let drop = |name: &str| format!("drop trigger if exists {name} on {t}");
    match capture.trigger {
        TriggerLevel::Row => {
            for name in [
                "tidemark_capture_insert",
                "tidemark_capture_update",
                "tidemark_capture_delete",
            ] {
                steps.push(step(
                    &format!("drop statement-level trigger {name}"),
                    drop(name),
                ));
            }
            steps.push(step(
                "create trigger tidemark_capture",
                format!(
                    "create or replace trigger tidemark_capture\n\
                     after insert or update or delete on {t}\n\
                     for each row execute function {function}()"
                ),
            ));
        }
        TriggerLevel::Statement => {
            steps.push(step(
                "drop row-level trigger tidemark_capture",
                drop("tidemark_capture"),
            ));
            for (name, event, tables) in [
                (
                    "tidemark_capture_insert",
                    "insert",
                    "new table as tidemark_new",
                ),
                (
                    "tidemark_capture_update",
                    "update",
                    "old table as tidemark_old new table as tidemark_new",
                ),
                (
                    "tidemark_capture_delete",
                    "delete",
                    "old table as tidemark_old",
                ),
            ] {
                // A trigger's transition tables cannot be changed in place.
                steps.push(step(&format!("drop trigger {name}"), drop(name)));
                steps.push(step(
                    &format!("create trigger {name}"),
                    format!(
                        "create trigger {name}\n\
                         after {event} on {t}\n\
                         referencing {tables}\n\
                         for each statement execute function {function}()"
                    ),
                ));
            }
        }
    }
    steps
}

/// The objects of `logical` capture for one table: the whole old row in
/// the WAL (`replica identity full`, so updates and deletes carry their
/// `before` as change-log capture does) and a publication of its inserts,
/// updates and deletes, which pg-source's replication slot reads. Nothing
/// runs in the writers' transactions: Postgres decodes the WAL in its own
/// process. Change-log triggers left from `--capture changelog` are
/// dropped, so writers do not pay for both.
pub fn logical_steps(table: &TableName) -> Vec<Step> {
    let t = table.quoted();
    let publication = tidemark_common::pg::publication_name(table);
    let step = |what: &str, sql: String| Step {
        what: what.to_owned(),
        sql,
        only_if_new_table: false,
    };
    let mut steps = Vec::new();
    for name in [
        "tidemark_capture",
        "tidemark_capture_insert",
        "tidemark_capture_update",
        "tidemark_capture_delete",
    ] {
        steps.push(step(
            &format!("drop change-log trigger {name}"),
            format!("drop trigger if exists {name} on {t}"),
        ));
    }
    steps.push(step(
        &format!("set replica identity full on {table}"),
        format!("alter table {t} replica identity full"),
    ));
    steps.push(step(
        &format!("create publication {publication}"),
        format!(
            r#"do $tidemark$
begin
  if not exists (select 1 from pg_catalog.pg_publication where pubname = {name}) then
    create publication {ident} for table {t} with (publish = 'insert, update, delete');
  end if;
end
$tidemark$"#,
            name = quote_literal(&publication),
            ident = quote_ident(&publication),
        ),
    ));
    steps
}

/// A `do` block that reads `table`'s primary key from the catalog and
/// creates its capture function with the key's columns written in, so the
/// plan needs no connection and `--dry-run` prints exactly what runs.
fn function_sql(table: &TableName, function: &str, capture: Capture) -> String {
    let table_literal = quote_literal(&table.quoted());
    let function_literal = quote_literal(function);
    // The body, as a format() pattern: %2$s matches the two row images'
    // keys by the key's own equality (`o.k = n.k and ...`), %3$s by the
    // key's text.
    let body = match (capture.trigger, capture.update_before) {
        (TriggerLevel::Row, before) => {
            let update = match before {
                UpdateBefore::Full => format!(
                    r#"    insert into {CHANGE_LOG} (table_name, op, before, after)
    values (pg_catalog.format('%%I.%%I', tg_table_schema, tg_table_name), 'u', pg_catalog.to_jsonb(old), pg_catalog.to_jsonb(new));"#
                ),
                UpdateBefore::Null => format!(
                    r#"    if %3$s then
      insert into {CHANGE_LOG} (table_name, op, after)
      values (pg_catalog.format('%%I.%%I', tg_table_schema, tg_table_name), 'u', pg_catalog.to_jsonb(new));
    else
      -- The key changed: a delete of the old key, then a create.
      insert into {CHANGE_LOG} (table_name, op, before, after)
      values (pg_catalog.format('%%I.%%I', tg_table_schema, tg_table_name), 'd', pg_catalog.to_jsonb(old), null),
             (pg_catalog.format('%%I.%%I', tg_table_schema, tg_table_name), 'c', null, pg_catalog.to_jsonb(new));
    end if;"#
                ),
            };
            format!(
                r#"begin
  if tg_op operator(pg_catalog.=) 'UPDATE' then
{update}
  elsif tg_op operator(pg_catalog.=) 'INSERT' then
    insert into {CHANGE_LOG} (table_name, op, after)
    values (pg_catalog.format('%%I.%%I', tg_table_schema, tg_table_name), 'c', pg_catalog.to_jsonb(new));
  else
    insert into {CHANGE_LOG} (table_name, op, before)
    values (pg_catalog.format('%%I.%%I', tg_table_schema, tg_table_name), 'd', pg_catalog.to_jsonb(old));
  end if;
  return null;
end"#
            )
        }
        (TriggerLevel::Statement, before) => {
            let before = match before {
                UpdateBefore::Full => "pg_catalog.to_jsonb(o)",
                // The old row too when the key's text changed (numeric
                // 1.0 to 1.00, citext case): pg-source then sends a delete
                // of the old key and a create, so no stale key remains.
                UpdateBefore::Null => {
                    "case when n is null or not (%3$s) then pg_catalog.to_jsonb(o) end"
                }
            };
            format!(
                r#"declare
  tidemark_table pg_catalog.text := pg_catalog.format('%%I.%%I', tg_table_schema, tg_table_name);
begin
  if tg_op operator(pg_catalog.=) 'INSERT' then
    insert into {CHANGE_LOG} (table_name, op, after)
    select tidemark_table, 'c', pg_catalog.to_jsonb(n) from tidemark_new n;
  elsif tg_op operator(pg_catalog.=) 'DELETE' then
    insert into {CHANGE_LOG} (table_name, op, before)
    select tidemark_table, 'd', pg_catalog.to_jsonb(o) from tidemark_old o;
  else
    -- Old and new rows paired by primary key; a row whose key changed is
    -- logged as a delete and a create.
    insert into {CHANGE_LOG} (table_name, op, before, after)
    select tidemark_table, case when n is null then 'd' when o is null then 'c' else 'u' end,
           {before}, pg_catalog.to_jsonb(n)
      from tidemark_old o full join tidemark_new n on %2$s;
  end if;
  return null;
end"#
            )
        }
    };
    let (old, new) = match capture.trigger {
        TriggerLevel::Row => ("old", "new"),
        TriggerLevel::Statement => ("o", "n"),
    };
    format!(
        r#"do $tidemark$
declare
  key text[];
  eq text[];
begin
  -- The key's columns, each with the equality operator of its index's
  -- operator class, named with its schema.
  select array_agg(a.attname::text order by k.ord),
         array_agg(format('operator(%I.=)', ns.nspname) order by k.ord)
    into key, eq
    from pg_index i
   cross join unnest(i.indkey::int2[], i.indclass::oid[]) with ordinality k(attnum, opclass, ord)
    join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
    join pg_opclass oc on oc.oid = k.opclass
    join pg_amop am on am.amopfamily = oc.opcfamily and am.amopstrategy = 3
                   and am.amoplefttype = oc.opcintype and am.amoprighttype = oc.opcintype
    join pg_operator op on op.oid = am.amopopr
    join pg_namespace ns on ns.oid = op.oprnamespace
   where i.indrelid = {table_literal}::regclass and i.indisprimary;
  if key is null then
    raise exception 'table % has no primary key', {table_literal};
  end if;
  execute format(
    $function$create or replace function %1$s() returns trigger
language plpgsql security definer
set search_path = pg_catalog, pg_temp set extra_float_digits = 3 as $body$
{body}
$body$$function$,
    {function_literal},
    (select string_agg(format('{old}.%1$I %2$s {new}.%1$I', c, e), ' and ')
       from unnest(key, eq) as u(c, e)),
    (select string_agg(format('{old}.%1$I::pg_catalog.text operator(pg_catalog.=) {new}.%1$I::pg_catalog.text', c), ' and ')
       from unnest(key) as u(c)));
  execute format('comment on function %s() is %L', {function_literal},
    format('Tidemark change-log capture of %s, primary key (%s)', {table_literal}, array_to_string(key, ', ')));
end
$tidemark$"#
    )
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
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
    fn function_names_are_short_stable_and_distinct() {
        let a = TableName::parse("a_b.c").unwrap();
        let b = TableName::parse("a.b_c").unwrap();
        assert_ne!(function_name(&a), function_name(&b));
        assert_eq!(function_name(&a), function_name(&a));
        let wide = TableName::parse(&"é".repeat(31)).unwrap();
        assert!(function_name(&wide).len() <= 63, "{}", function_name(&wide));
        let long = TableName::parse(&"x".repeat(63)).unwrap();
        assert!(function_name(&long).len() <= 63);
        assert!(function_name(&long).starts_with(&format!("capture_{}", "x".repeat(40))));
    }

    #[test]
    fn row_triggers_log_before_images_only_when_asked() {
        let full = sql(Capture::full(TriggerLevel::Row));
        assert!(full.contains("'u', pg_catalog.to_jsonb(old), pg_catalog.to_jsonb(new)"));
        assert!(full
            .contains("for each row execute function tidemark.\"capture_streaming_update_table_"));
        let null = sql(Capture {
            trigger: TriggerLevel::Row,
            update_before: UpdateBefore::Null,
        });
        assert!(null.contains("'u', pg_catalog.to_jsonb(new)"));
        assert!(!null.contains("'u', pg_catalog.to_jsonb(old)"));
        assert!(null.contains("format('old.%1$I %2$s new.%1$I', c, e)"));
    }

    #[test]
    fn statement_triggers_pair_rows_by_key_without_dynamic_sql_per_statement() {
        let full = sql(Capture::full(TriggerLevel::Statement));
        assert!(full.contains("full join tidemark_new n on %2$s"));
        assert!(full.contains("format('o.%1$I %2$s n.%1$I', c, e)"));
        assert!(full.contains("referencing old table as tidemark_old new table as tidemark_new"));
        assert!(full.contains("drop trigger if exists tidemark_capture on"));
        let null = sql(Capture {
            trigger: TriggerLevel::Statement,
            update_before: UpdateBefore::Null,
        });
        assert!(null.contains(
            "case when n is null or not (%3$s) then pg_catalog.to_jsonb(o) end, pg_catalog.to_jsonb(n)"
        ));
        assert!(null.contains("set search_path = pg_catalog, pg_temp"));
        assert!(null.contains("tidemark_table pg_catalog.text"));
    }

    #[test]
    fn odd_table_names_stay_quoted_inside_the_generated_function() {
        let t = TableName::parse(r#""My ""Table""#).unwrap();
        let text: String = changelog_steps(&t, Capture::full(TriggerLevel::Row))
            .iter()
            .map(|s| s.sql.clone())
            .collect();
        assert!(
            text.contains(r#"'"public"."My ""Table"'::regclass"#),
            "{text}"
        );
    }
}
