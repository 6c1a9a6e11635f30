//! The target database's side: its tables as the catalog describes them,
//! the tables pg-replay creates from the archive, and the foreign keys that
//! order the apply.
//!
//! Every statement names objects schema-qualified and runs with
//! `search_path = pg_catalog, pg_temp` (the connection's setting), so no
//! object a less privileged role created can be resolved by mistake. Key
//! comparisons use the operators of the primary key's operator classes,
//! written as `operator(schema.=)`.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context as _};
use sqlx::{PgConnection, Row as _};
use tidemark_common::pg::{quote_ident, TableName};

use crate::record::RowSchema;

/// A column of a target table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetColumn {
    /// Its name.
    pub name: String,
    /// `format_type(atttypid, atttypmod)`: schema-qualified for types
    /// outside `pg_catalog`, so it names the same type in any session.
    pub type_sql: String,
    /// `NOT NULL`.
    pub not_null: bool,
    /// A generated column: Postgres computes it, the apply leaves it out.
    pub generated: bool,
    /// `GENERATED ALWAYS AS IDENTITY`: inserts need `overriding system value`.
    pub identity_always: bool,
    /// `COLLATE schema.name` when it differs from the type's default.
    pub collation_sql: Option<String>,
    /// `atttypid`.
    pub type_oid: u32,
    /// `atttypmod`.
    pub typmod: i32,
}

/// A target table.
#[derive(Debug, Clone)]
pub struct TargetTable {
    /// Its name.
    pub name: TableName,
    /// `pg_class.oid`.
    pub oid: u32,
    /// Live columns, in attnum order.
    pub columns: Vec<TargetColumn>,
    /// Indexes into `columns` of the primary key, in key order.
    pub key: Vec<usize>,
    /// Per key column, its operator class's equality: `operator(ns.=)`.
    pub key_eq: Vec<String>,
    /// Per key column, its operator class's less-than: `operator(ns.<)`.
    pub key_lt: Vec<String>,
    /// Whether every key column's operator class is the built-in default
    /// one of the column's own type: then `PARTITION BY` the key compares
    /// with the same operators as the key's index.
    pub key_default_ops: bool,
    /// The primary key constraint's name, quoted.
    pub pk_constraint: String,
    /// Its enabled triggers of its own (not foreign-key ones): name and
    /// `tgenabled` (`O` origin, `A` always, `R` replica).
    pub user_triggers: Vec<(String, String)>,
    /// Whether this session's role owns it (directly or by membership).
    pub owned: bool,
    /// Its owner's role name.
    pub owner: String,
    /// Whether the owner is this session's role itself.
    pub owner_is_session: bool,
    /// Whether this session may `SET ROLE` to the owner (a superuser, or a
    /// member of the owner role).
    pub may_become_owner: bool,
    /// Whether the owner is a superuser (whose code may run as anyone).
    pub owner_is_superuser: bool,
    /// Privileges of this session's role on it.
    pub can_insert: bool,
    /// See `can_insert`.
    pub can_update: bool,
    /// See `can_insert`.
    pub can_delete: bool,
    /// See `can_insert`.
    pub can_truncate: bool,
}

impl TargetTable {
    /// The columns the apply writes: every column but generated ones.
    pub fn data_columns(&self) -> impl Iterator<Item = (usize, &TargetColumn)> {
        self.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.generated)
    }

    /// Whether column `i` is part of the primary key.
    pub fn is_key(&self, i: usize) -> bool {
        self.key.contains(&i)
    }
}

/// Looks a table up; `None` when it does not exist.
///
/// Fails on a query error, when the relation is not a table, or has no
/// primary key (replay matches rows by it).
pub async fn load_table(
    conn: &mut PgConnection,
    name: &TableName,
) -> anyhow::Result<Option<TargetTable>> {
    let row = sqlx::query(
        r#"select c.oid::int8 as oid, c.relkind::text as relkind,
                  pg_catalog.pg_has_role(c.relowner, 'USAGE') as owned,
                  pg_catalog.pg_get_userbyid(c.relowner)::pg_catalog.text as owner,
                  c.relowner operator(pg_catalog.=) (select r.oid from pg_catalog.pg_roles r
                                                     where r.rolname operator(pg_catalog.=) current_user)
                      as owner_is_session,
                  pg_catalog.pg_has_role(c.relowner, 'MEMBER') as may_become_owner,
                  (select r.rolsuper from pg_catalog.pg_roles r where r.oid operator(pg_catalog.=) c.relowner)
                      as owner_is_superuser,
                  pg_catalog.has_table_privilege(c.oid, 'INSERT') as can_insert,
                  pg_catalog.has_table_privilege(c.oid, 'UPDATE') as can_update,
                  pg_catalog.has_table_privilege(c.oid, 'DELETE') as can_delete,
                  pg_catalog.has_table_privilege(c.oid, 'TRUNCATE') as can_truncate
           from pg_catalog.pg_class c
           join pg_catalog.pg_namespace n on n.oid operator(pg_catalog.=) c.relnamespace
           where n.nspname operator(pg_catalog.=) $1 and c.relname operator(pg_catalog.=) $2"#,
    )
    .bind(&name.schema)
    .bind(&name.name)
    .fetch_optional(&mut *conn)
    .await
    .with_context(|| format!("cannot look up target table {name}"))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let relkind: String = row.get("relkind");
    if relkind != "r" && relkind != "p" {
        bail!("target {name} is not a table (relkind {relkind}); name a table with --table");
    }
    let oid = row.get::<i64, _>("oid") as u32;
    let user_triggers: Vec<(String, String)> = sqlx::query_as(
        r#"select g.tgname::text, g.tgenabled::text from pg_catalog.pg_trigger g
           where g.tgrelid operator(pg_catalog.=) $1::pg_catalog.int8::pg_catalog.oid and not g.tgisinternal
             and g.tgenabled operator(pg_catalog.<>) 'D'
           order by g.tgname"#,
    )
    .bind(oid as i64)
    .fetch_all(&mut *conn)
    .await
    .with_context(|| format!("cannot read the triggers of target table {name}"))?;
    let columns = sqlx::query(
        r#"select a.attname::text as name,
                  pg_catalog.format_type(a.atttypid, a.atttypmod) as type_sql,
                  a.atttypid::pg_catalog.int8 as type_oid, a.atttypmod as typmod,
                  a.attnotnull as not_null,
                  a.attgenerated operator(pg_catalog.<>) '' as generated,
                  a.attidentity operator(pg_catalog.=) 'a' as identity_always,
                  case when a.attcollation operator(pg_catalog.<>) 0
                        and a.attcollation operator(pg_catalog.<>) t.typcollation
                       then pg_catalog.quote_ident(cn.nspname::text) operator(pg_catalog.||) '.'
                            operator(pg_catalog.||) pg_catalog.quote_ident(co.collname::text)
                  end as collation_sql
           from pg_catalog.pg_attribute a
           join pg_catalog.pg_type t on t.oid operator(pg_catalog.=) a.atttypid
           left join pg_catalog.pg_collation co on co.oid operator(pg_catalog.=) a.attcollation
           left join pg_catalog.pg_namespace cn on cn.oid operator(pg_catalog.=) co.collnamespace
           where a.attrelid operator(pg_catalog.=) $1::pg_catalog.int8::pg_catalog.oid
             and a.attnum operator(pg_catalog.>) 0 and not a.attisdropped
           order by a.attnum"#,
    )
    .bind(oid as i64)
    .fetch_all(&mut *conn)
    .await
    .with_context(|| format!("cannot read the columns of target table {name}"))?
    .into_iter()
    .map(|r| TargetColumn {
        name: r.get("name"),
        type_sql: r.get("type_sql"),
        not_null: r.get("not_null"),
        generated: r.get("generated"),
        identity_always: r.get("identity_always"),
        collation_sql: r.get("collation_sql"),
        type_oid: r.get::<i64, _>("type_oid") as u32,
        typmod: r.get("typmod"),
    })
    .collect::<Vec<_>>();
    // The primary key, with the operators of each column's operator class
    // (btree: strategy 3 is equality, 1 less-than).
    let key_rows = sqlx::query(
        r#"select a.attname::text as name, con.conname::text as conname,
                  (select pg_catalog.quote_ident(ons.nspname::text) operator(pg_catalog.||) '.'
                          operator(pg_catalog.||) o.oprname::text
                   from pg_catalog.pg_amop am
                   join pg_catalog.pg_operator o on o.oid operator(pg_catalog.=) am.amopopr
                   join pg_catalog.pg_namespace ons on ons.oid operator(pg_catalog.=) o.oprnamespace
                   where am.amopfamily operator(pg_catalog.=) oc.opcfamily
                     and am.amoplefttype operator(pg_catalog.=) oc.opcintype
                     and am.amoprighttype operator(pg_catalog.=) oc.opcintype
                     and am.amopstrategy operator(pg_catalog.=) 3
                     and am.amopmethod operator(pg_catalog.=) oc.opcmethod) as eq,
                  (select pg_catalog.quote_ident(ons.nspname::text) operator(pg_catalog.||) '.'
                          operator(pg_catalog.||) o.oprname::text
                   from pg_catalog.pg_amop am
                   join pg_catalog.pg_operator o on o.oid operator(pg_catalog.=) am.amopopr
                   join pg_catalog.pg_namespace ons on ons.oid operator(pg_catalog.=) o.oprnamespace
                   where am.amopfamily operator(pg_catalog.=) oc.opcfamily
                     and am.amoplefttype operator(pg_catalog.=) oc.opcintype
                     and am.amoprighttype operator(pg_catalog.=) oc.opcintype
                     and am.amopstrategy operator(pg_catalog.=) 1
                     and am.amopmethod operator(pg_catalog.=) oc.opcmethod) as lt,
                  oc.opcdefault and oc.opcintype operator(pg_catalog.=) a.atttypid
                    and oc.opcnamespace operator(pg_catalog.=)
                        (select n.oid from pg_catalog.pg_namespace n
                         where n.nspname operator(pg_catalog.=) 'pg_catalog') as builtin_default
           from pg_catalog.pg_index i
           join pg_catalog.pg_constraint con on con.conindid operator(pg_catalog.=) i.indexrelid
                and con.contype operator(pg_catalog.=) 'p'
           cross join lateral pg_catalog.generate_series(0, i.indnkeyatts operator(pg_catalog.-) 1) k(n)
           join pg_catalog.pg_attribute a on a.attrelid operator(pg_catalog.=) i.indrelid
                and a.attnum operator(pg_catalog.=) i.indkey[k.n]
           join pg_catalog.pg_opclass oc on oc.oid operator(pg_catalog.=) i.indclass[k.n]
           where i.indrelid operator(pg_catalog.=) $1::pg_catalog.int8::pg_catalog.oid and i.indisprimary
           order by k.n"#,
    )
    .bind(oid as i64)
    .fetch_all(&mut *conn)
    .await
    .with_context(|| format!("cannot read the primary key of target table {name}"))?;
    if key_rows.is_empty() {
        bail!(
            "target table {name} has no primary key: pg-replay matches rows by it; add one \
             (alter table {} add primary key (...)) like the source's",
            name.quoted()
        );
    }
    let mut key = Vec::new();
    let mut key_eq = Vec::new();
    let mut key_lt = Vec::new();
    let mut pk_constraint = String::new();
    let mut key_default_ops = true;
    for r in &key_rows {
        let col: String = r.get("name");
        let i = columns
            .iter()
            .position(|c| c.name == col)
            .with_context(|| format!("primary key column {col} of {name} not found"))?;
        let eq: Option<String> = r.get("eq");
        let lt: Option<String> = r.get("lt");
        let (Some(eq), Some(lt)) = (eq, lt) else {
            bail!("the primary key of {name} has no btree equality or ordering for column {col}");
        };
        key_default_ops &= r.get::<bool, _>("builtin_default");
        key.push(i);
        key_eq.push(format!("operator({eq})"));
        key_lt.push(format!("operator({lt})"));
        pk_constraint = quote_ident(&r.get::<String, _>("conname"));
    }
    Ok(Some(TargetTable {
        name: name.clone(),
        oid,
        columns,
        key,
        key_eq,
        key_lt,
        key_default_ops,
        pk_constraint,
        user_triggers,
        owned: row.get("owned"),
        owner: row.get("owner"),
        owner_is_session: row.get("owner_is_session"),
        may_become_owner: row.get("may_become_owner"),
        owner_is_superuser: row.get("owner_is_superuser"),
        can_insert: row.get("can_insert"),
        can_update: row.get("can_update"),
        can_delete: row.get("can_delete"),
        can_truncate: row.get("can_truncate"),
    }))
}

/// The foreign keys among `tables` (by oid): child → parents.
///
/// Fails on a query error.
pub async fn foreign_keys(
    conn: &mut PgConnection,
    tables: &[u32],
) -> anyhow::Result<BTreeMap<u32, BTreeSet<u32>>> {
    let oids: Vec<i64> = tables.iter().map(|o| *o as i64).collect();
    let rows = sqlx::query(
        r#"select c.conrelid::int8 as child, c.confrelid::int8 as parent
           from pg_catalog.pg_constraint c
           where c.contype operator(pg_catalog.=) 'f'
             and c.conrelid::int8 operator(pg_catalog.=) any($1)
             and c.confrelid::int8 operator(pg_catalog.=) any($1)"#,
    )
    .bind(&oids)
    .fetch_all(&mut *conn)
    .await
    .context("cannot read the foreign keys of the target tables")?;
    let mut out: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    for r in rows {
        let child = r.get::<i64, _>("child") as u32;
        let parent = r.get::<i64, _>("parent") as u32;
        if child != parent {
            out.entry(child).or_default().insert(parent);
        }
    }
    Ok(out)
}

/// Orders `tables` parents before children by `parents` (child → parents);
/// tables in a cycle keep their given order among themselves. Returns the
/// order and whether a cycle was found.
pub fn parent_first(tables: &[u32], parents: &BTreeMap<u32, BTreeSet<u32>>) -> (Vec<u32>, bool) {
    let mut order = Vec::with_capacity(tables.len());
    let mut placed: BTreeSet<u32> = BTreeSet::new();
    let mut cycle = false;
    while order.len() < tables.len() {
        let before = order.len();
        for t in tables {
            if placed.contains(t) {
                continue;
            }
            let ready = parents
                .get(t)
                .is_none_or(|ps| ps.iter().all(|p| placed.contains(p) || !tables.contains(p)));
            if ready {
                placed.insert(*t);
                order.push(*t);
            }
        }
        if order.len() == before {
            // A cycle: place the first unplaced table and go on.
            cycle = true;
            if let Some(t) = tables.iter().find(|t| !placed.contains(t)) {
                placed.insert(*t);
                order.push(*t);
            }
        }
    }
    (order, cycle)
}

/// Checks that `text` looks like an SQL type name as `format_type` writes
/// it (words, quoted identifiers, dots, digits in parentheses, `[]`), so it
/// can go into `CREATE TABLE` without any way to break out of it. Postgres
/// then resolves it (with this session's `pg_catalog`-only search path).
pub fn is_plain_type_name(text: &str) -> bool {
    let mut chars = text.chars().peekable();
    let mut depth = 0i32;
    if text.trim().is_empty() || text.len() > 200 {
        return false;
    }
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                // A quoted identifier: anything but a lone quote inside.
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                        }
                        Some('"') => break,
                        Some('\0') | None => return false,
                        Some(_) => {}
                    }
                }
            }
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            // Inside parentheses only type modifiers: numbers.
            ',' | ' ' => {}
            c if c.is_ascii_digit() => {}
            '[' | ']' | '.' if depth == 0 => {}
            c if depth == 0 && (c.is_ascii_alphabetic() || c == '_') => {}
            _ => return false,
        }
    }
    depth == 0
}

/// Creates `name` from the columns a record carries (`tidemark.column.type`
/// for each, the primary key from `tidemark.column.key`), and its schema if
/// missing.
///
/// Fails, saying to create the table first, when the record does not carry
/// a column's type or the key, or a type does not exist in the target.
pub async fn create_table(
    conn: &mut PgConnection,
    name: &TableName,
    row: &RowSchema,
) -> anyhow::Result<()> {
    let create_first = format!(
        "create target table {name} first (e.g. from the source with pg_dump --schema-only --table), \
         or replay an archive whose records carry the column types (Tidemark 0.2's pg-source writes them)"
    );
    let mut cols = Vec::new();
    let mut key: Vec<(u32, String)> = Vec::new();
    for f in &row.fields {
        let Some(ty) = f.column_type() else {
            bail!(
                "the archive's records do not say the type of column {} of {name}; {create_first}",
                f.name
            );
        };
        if !is_plain_type_name(ty) {
            bail!(
                "the archive names type {ty:?} for column {} of {name}, which is not a type name",
                f.name
            );
        }
        let resolved: Option<String> = sqlx::query_scalar(
            "select pg_catalog.to_regtype($1)::pg_catalog.regtype::pg_catalog.text",
        )
        .bind(ty)
        .fetch_one(&mut *conn)
        .await
        .unwrap_or(None);
        if resolved.is_none() {
            bail!(
                "type {ty} of column {} of {name} does not exist in the target database; \
                 create it first (pg_dump --schema-only of the source has it), or {create_first}",
                f.name
            );
        }
        let not_null = if f.optional() { "" } else { " not null" };
        cols.push(format!("{} {ty}{not_null}", quote_ident(&f.name)));
        if let Some(k) = f.key_position() {
            key.push((k, quote_ident(&f.name)));
        }
    }
    if key.is_empty() {
        bail!("the archive's records do not say which columns form the primary key of {name}; {create_first}");
    }
    key.sort();
    let key_cols: Vec<String> = key.into_iter().map(|(_, c)| c).collect();
    // CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when
    // the schema is there.
    let schema_exists: bool = sqlx::query_scalar(
        "select exists (select from pg_catalog.pg_namespace where nspname operator(pg_catalog.=) $1)",
    )
    .bind(&name.schema)
    .fetch_one(&mut *conn)
    .await?;
    if !schema_exists {
        sqlx::query(&format!("create schema {}", quote_ident(&name.schema)))
            .execute(&mut *conn)
            .await
            .with_context(|| format!("cannot create schema {} for {name}", name.schema))?;
    }
    let sql = format!(
        "create table {} ({}, primary key ({}))",
        name.quoted(),
        cols.join(", "),
        key_cols.join(", ")
    );
    sqlx::query(&sql)
        .execute(&mut *conn)
        .await
        .with_context(|| format!("cannot create target table {name}: {sql}"))?;
    tracing::info!(table = %name, columns = cols.len(), "created the target table from the archive's column types");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_are_checked_before_they_go_into_sql() {
        for ok in [
            "integer",
            "character varying(256)",
            "numeric(10,2)",
            "timestamp(3) without time zone",
            "integer[]",
            "public.mood",
            r#""My Schema"."odd ""type""""#,
            "double precision[][]",
        ] {
            assert!(is_plain_type_name(ok), "{ok}");
        }
        for bad in [
            "",
            "int); drop table x; --",
            "int -- x",
            "text collate \"C\"'",
            "numeric(10",
            "int)",
            "\"unterminated",
            "a;b",
            "int/*x*/",
            "int generated always as (f(1)) stored",
            "numeric(a)",
        ] {
            assert!(!is_plain_type_name(bad), "{bad}");
        }
    }

    #[test]
    fn parents_come_first_and_cycles_are_told() {
        let mut parents = BTreeMap::new();
        parents.insert(3, BTreeSet::from([1]));
        parents.insert(2, BTreeSet::from([3]));
        let (order, cycle) = parent_first(&[2, 3, 1], &parents);
        assert_eq!(order, vec![1, 3, 2]);
        assert!(!cycle);
        parents.insert(1, BTreeSet::from([2]));
        let (order, cycle) = parent_first(&[2, 3, 1], &parents);
        assert_eq!(order.len(), 3);
        assert!(cycle);
    }
}
