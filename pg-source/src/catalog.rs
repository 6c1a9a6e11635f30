//! Reading a table's shape from the Postgres catalog.

use anyhow::{bail, Context as _};
use sqlx::PgPool;
use tidemark_common::envelope::Column;
use tidemark_common::names;
use tidemark_common::pg::TableName;

/// A captured table: its columns, primary key, and the Postgres types of the
/// columns the poll orders by.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// The table.
    pub name: TableName,
    /// Its OID.
    pub oid: tidemark_common::codec::Oid,
    /// All columns, in order.
    pub columns: Vec<Column>,
    /// The record key's columns: the primary key, or the incrementing column
    /// when the table has none.
    pub key: Vec<Column>,
    /// `format_type` of each column, to cast bound parameters to the column's
    /// own type so the (timestamp, id) index is used.
    pub sql_types: Vec<(String, String)>,
}

#[derive(sqlx::FromRow)]
struct ColumnRow {
    name: String,
    typname: String,
    typtype: String,
    elem_typname: Option<String>,
    elem_typtype: Option<String>,
    not_null: bool,
    sql_type: String,
    in_pk: bool,
}

impl TableInfo {
    /// Reads the table's columns and primary key; `None` when it does not
    /// exist.
    ///
    /// Fails when the name is not a table (a view, a foreign table, ...),
    /// naming the setting to fix.
    pub async fn load(pool: &PgPool, name: &TableName) -> anyhow::Result<Option<Self>> {
        let found: Option<(i64, String)> = sqlx::query_as(
            "select c.oid::pg_catalog.int8, c.relkind::pg_catalog.text
             from pg_catalog.pg_class c
             join pg_catalog.pg_namespace n on n.oid operator(pg_catalog.=) c.relnamespace
             where n.nspname operator(pg_catalog.=) $1 and c.relname operator(pg_catalog.=) $2",
        )
        .bind(&name.schema)
        .bind(&name.name)
        .fetch_optional(pool)
        .await
        .with_context(|| format!("cannot look up table {name}"))?;
        let Some((oid, kind)) = found else {
            return Ok(None);
        };
        let what = match kind.as_str() {
            "r" | "p" => None,
            "v" => Some("a view"),
            "m" => Some("a materialized view"),
            "f" => Some("a foreign table"),
            "S" => Some("a sequence"),
            "i" | "I" => Some("an index"),
            "c" => Some("a composite type"),
            _ => Some("not a table"),
        };
        if let Some(what) = what {
            bail!("{name} is {what}, and pg-source reads tables only: name its tables in table.whitelist instead");
        }
        let rows: Vec<ColumnRow> = sqlx::query_as(
            r#"
            select a.attname::pg_catalog.text as name,
                   t.typname::pg_catalog.text as typname,
                   t.typtype::pg_catalog.text as typtype,
                   et.typname::pg_catalog.text as elem_typname,
                   et.typtype::pg_catalog.text as elem_typtype,
                   a.attnotnull as not_null,
                   pg_catalog.format_type(a.atttypid, null) as sql_type,
                   coalesce(a.attnum operator(pg_catalog.=) any(i.indkey::pg_catalog.int2[]), false) as in_pk
            from pg_catalog.pg_attribute a
            join pg_catalog.pg_type t on t.oid operator(pg_catalog.=) a.atttypid
            left join pg_catalog.pg_type et
              on et.oid operator(pg_catalog.=) t.typelem and t.typcategory operator(pg_catalog.=) 'A'
            left join pg_catalog.pg_index i
              on i.indrelid operator(pg_catalog.=) a.attrelid and i.indisprimary
            where a.attrelid operator(pg_catalog.=) $1::pg_catalog.oid
              and a.attnum operator(pg_catalog.>) 0 and not a.attisdropped
            order by a.attnum
            limit 1600
            "#,
        )
        .bind(oid)
        .fetch_all(pool)
        .await
        .with_context(|| format!("cannot read the columns of {name}"))?;
        let mut columns = Vec::with_capacity(rows.len());
        let mut key = Vec::new();
        let mut sql_types = Vec::new();
        for r in rows {
            let element = r.elem_typname.as_deref().zip(r.elem_typtype.as_deref());
            let col = Column::from_catalog(&r.name, &r.typname, &r.typtype, element, r.not_null);
            if r.in_pk {
                key.push(col.clone());
            }
            sql_types.push((r.name.clone(), r.sql_type));
            columns.push(col);
        }
        Ok(Some(Self {
            name: name.clone(),
            oid: oid as tidemark_common::codec::Oid,
            columns,
            key,
            sql_types,
        }))
    }

    /// A column by name.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The SQL type of a column, for casts.
    pub fn sql_type(&self, name: &str) -> &str {
        self.sql_types
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
            .unwrap_or("text")
    }
}

/// The user tables of the database that have both columns, for when
/// `table.whitelist` is not set (the JDBC connector reads every table).
///
/// Fails on a catalog error.
pub async fn discover(
    pool: &PgPool,
    ts_col: &str,
    inc_col: &str,
) -> anyhow::Result<Vec<TableName>> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        r#"
        select c.table_schema::text, c.table_name::text
        from information_schema.columns c
        join information_schema.tables t
          on t.table_schema = c.table_schema and t.table_name = c.table_name
        where t.table_type = 'BASE TABLE'
          and c.table_schema not in ('pg_catalog', 'information_schema', 'tidemark')
          and c.column_name in ($1, $2)
        group by 1, 2
        having count(distinct c.column_name) = 2
        order by 1, 2
        limit 1000
        "#,
    )
    .bind(ts_col)
    .bind(inc_col)
    .fetch_all(pool)
    .await
    .context("cannot list the tables of the database")?;
    Ok(rows
        .into_iter()
        .map(|(schema, name)| TableName { schema, name })
        .collect())
}

/// The tables that have schema-init's change-log triggers, for `changelog`
/// mode when `table.whitelist` is not set, and the dropped tables whose
/// changes the change log still holds (so they are sent, not stranded).
///
/// Fails on a catalog error.
pub async fn discover_captured(pool: &PgPool) -> anyhow::Result<Vec<TableName>> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        r#"
        select distinct n.nspname::pg_catalog.text, c.relname::pg_catalog.text
        from pg_catalog.pg_trigger t
        join pg_catalog.pg_class c on c.oid operator(pg_catalog.=) t.tgrelid
        join pg_catalog.pg_namespace n on n.oid operator(pg_catalog.=) c.relnamespace
        where t.tgname operator(pg_catalog.=) any ($1)
        order by 1, 2
        limit 1000
        "#,
    )
    .bind([names::ROW_TRIGGER, names::INSERT_TRIGGER])
    .fetch_all(pool)
    .await
    .context("cannot list the captured tables")?;
    let mut tables: Vec<TableName> = rows
        .into_iter()
        .map(|(schema, name)| TableName { schema, name })
        .collect();
    for name in dropped_with_changes(pool).await? {
        if let Ok(t) = TableName::parse(&name) {
            if !tables.contains(&t) {
                tables.push(t);
            }
        }
    }
    Ok(tables)
}

/// Whether `table` was captured by change-log capture (`tidemark.shapes`
/// knows its name): for a table that does not exist, that it was dropped.
///
/// Fails on a catalog error.
pub async fn was_captured(pool: &PgPool, table: &TableName) -> anyhow::Result<bool> {
    let sql = format!(
        "select pg_catalog.to_regclass($1) is not null and exists (
           select 1 from {} where table_name operator(pg_catalog.=) pg_catalog.format('%I.%I', $2::pg_catalog.text, $3::pg_catalog.text))",
        names::SHAPES
    );
    let captured: bool = sqlx::query_scalar(&sql)
        .bind(names::SHAPES)
        .bind(&table.schema)
        .bind(&table.name)
        .fetch_one(pool)
        .await
        .with_context(|| format!("cannot look whether {table} was captured"))?;
    Ok(captured)
}

/// The captured tables (`format('%I.%I')` names) that no longer exist but
/// whose changes the change log still holds.
///
/// Fails on a catalog error.
pub async fn dropped_with_changes(pool: &PgPool) -> anyhow::Result<Vec<String>> {
    let has_shapes: bool = sqlx::query_scalar("select pg_catalog.to_regclass($1) is not null")
        .bind(names::SHAPES)
        .fetch_one(pool)
        .await?;
    if !has_shapes {
        return Ok(Vec::new());
    }
    let names: Vec<String> = sqlx::query_scalar(&format!(
        r#"
        select s.table_name from (select distinct table_name from {shapes}) s
        where pg_catalog.to_regclass(s.table_name) is null
          and exists (select 1 from {log} l where l.table_name operator(pg_catalog.=) s.table_name)
        order by 1
        limit 1000
        "#,
        shapes = names::SHAPES,
        log = names::CHANGE_LOG,
    ))
    .fetch_all(pool)
    .await
    .context("cannot list the dropped tables with changes in the change log")?;
    Ok(names)
}

/// Whether `table` has the publication schema-init gives logical capture:
/// for a table that does not exist, that it was captured and dropped.
///
/// Fails on a catalog error.
pub async fn was_published(pool: &PgPool, table: &TableName) -> anyhow::Result<bool> {
    sqlx::query_scalar(
        "select exists (select 1 from pg_catalog.pg_publication p where p.pubname operator(pg_catalog.=) $1)",
    )
    .bind(tidemark_common::pg::publication_name(table))
    .fetch_one(pool)
    .await
    .with_context(|| format!("cannot look whether {table} was captured"))
}

/// The tables schema-init gave logical capture (a `tidemark_` publication),
/// for when `table.whitelist` is not set.
///
/// Fails on a catalog error.
pub async fn discover_published(pool: &PgPool) -> anyhow::Result<Vec<TableName>> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        r"select distinct schemaname::pg_catalog.text, tablename::pg_catalog.text
          from pg_catalog.pg_publication_tables
          where pg_catalog.starts_with(pubname::pg_catalog.text, $1) order by 1, 2 limit 1000",
    )
    .bind(names::PUBLICATION_PREFIX)
    .fetch_all(pool)
    .await
    .context("cannot list the publications")?;
    Ok(rows
        .into_iter()
        .map(|(schema, name)| TableName { schema, name })
        .collect())
}

/// The tables of the database that a `table.include.list` pattern matches
/// but that have no capture of `mode` (change-log triggers, or a Tidemark
/// publication): the user is told what to run for each. Partitions are
/// left out (their parent is what is captured).
///
/// Fails on a catalog error.
pub async fn uncaptured_matching(
    pool: &PgPool,
    patterns: &[crate::config::TablePattern],
    mode: crate::config::Mode,
) -> anyhow::Result<Vec<TableName>> {
    let captured = match mode {
        crate::config::Mode::Logical => {
            "exists (select 1 from pg_catalog.pg_publication_rel r
                      join pg_catalog.pg_publication p on p.oid operator(pg_catalog.=) r.prpubid
                     where r.prrelid operator(pg_catalog.=) c.oid
                       and pg_catalog.starts_with(p.pubname::pg_catalog.text, $2)
                       and $1::pg_catalog.text[] is not null)"
        }
        _ => {
            "exists (select 1 from pg_catalog.pg_trigger t
                      where t.tgrelid operator(pg_catalog.=) c.oid and t.tgname operator(pg_catalog.=) any ($1)
                        and $2::pg_catalog.text is not null)"
        }
    };
    let rows: Vec<(String, String)> = sqlx::query_as(&format!(
        "select n.nspname::pg_catalog.text, c.relname::pg_catalog.text
           from pg_catalog.pg_class c
           join pg_catalog.pg_namespace n on n.oid operator(pg_catalog.=) c.relnamespace
          where c.relkind operator(pg_catalog.=) any (array['r', 'p']::pg_catalog.\"char\"[])
            and not c.relispartition
            and n.nspname operator(pg_catalog.<>) all (array['pg_catalog', 'information_schema', 'tidemark', 'pg_toast'])
            and not pg_catalog.starts_with(n.nspname::pg_catalog.text, 'pg_temp')
            and not {captured}
          order by 1, 2
          limit 10000"
    ))
    .bind([names::ROW_TRIGGER, names::INSERT_TRIGGER])
    .bind(names::PUBLICATION_PREFIX)
    .fetch_all(pool)
    .await
    .context("cannot list the tables of the database")?;
    Ok(rows
        .into_iter()
        .map(|(schema, name)| TableName { schema, name })
        .filter(|t| crate::config::matches_any(patterns, t))
        .collect())
}
