//! Reading a table's shape from the Postgres catalog.

use anyhow::{bail, Context as _};
use sqlx::PgPool;
use tidemark_common::envelope::Column;
use tidemark_common::pg::TableName;

/// A captured table: its columns, primary key, and the Postgres types of the
/// columns the poll orders by.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// The table.
    pub name: TableName,
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
    /// Reads the table's columns and primary key.
    ///
    /// Fails when the table does not exist, naming the setting to fix.
    pub async fn load(pool: &PgPool, name: &TableName) -> anyhow::Result<Self> {
        let oid: Option<i64> = sqlx::query_scalar("select to_regclass($1)::oid::int8")
            .bind(name.quoted())
            .fetch_one(pool)
            .await
            .with_context(|| format!("cannot look up table {name}"))?;
        let Some(oid) = oid else {
            bail!("table {name} does not exist in this database: run schema-init, or fix table.whitelist / connection.url");
        };
        let rows: Vec<ColumnRow> = sqlx::query_as(
            r#"
            select a.attname::text as name,
                   t.typname::text as typname,
                   t.typtype::text as typtype,
                   et.typname::text as elem_typname,
                   et.typtype::text as elem_typtype,
                   a.attnotnull as not_null,
                   format_type(a.atttypid, null) as sql_type,
                   coalesce(a.attnum = any(i.indkey::int2[]), false) as in_pk
            from pg_attribute a
            join pg_type t on t.oid = a.atttypid
            left join pg_type et on et.oid = t.typelem and t.typcategory = 'A'
            left join pg_index i on i.indrelid = a.attrelid and i.indisprimary
            where a.attrelid = $1::oid and a.attnum > 0 and not a.attisdropped
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
        Ok(Self {
            name: name.clone(),
            columns,
            key,
            sql_types,
        })
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
/// mode when `table.whitelist` is not set.
///
/// Fails on a catalog error.
pub async fn discover_captured(pool: &PgPool) -> anyhow::Result<Vec<TableName>> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        r#"
        select distinct n.nspname::text, c.relname::text
        from pg_trigger t
        join pg_class c on c.oid = t.tgrelid
        join pg_namespace n on n.oid = c.relnamespace
        where t.tgname in ('tidemark_capture', 'tidemark_capture_insert')
        order by 1, 2
        limit 1000
        "#,
    )
    .fetch_all(pool)
    .await
    .context("cannot list the captured tables")?;
    Ok(rows
        .into_iter()
        .map(|(schema, name)| TableName { schema, name })
        .collect())
}

/// The tables schema-init gave logical capture (a `tidemark_` publication),
/// for when `table.whitelist` is not set.
///
/// Fails on a catalog error.
pub async fn discover_published(pool: &PgPool) -> anyhow::Result<Vec<TableName>> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        r"select distinct schemaname::text, tablename::text from pg_publication_tables
          where pubname like 'tidemark\_%' order by 1, 2",
    )
    .fetch_all(pool)
    .await
    .context("cannot list the publications")?;
    Ok(rows
        .into_iter()
        .map(|(schema, name)| TableName { schema, name })
        .collect())
}
