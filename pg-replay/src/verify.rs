//! `pg-replay verify`: whether two tables (a source and its replay) hold the
//! same rows, in bounded memory, on tables of any size.
//!
//! The source's primary key is walked in ranges of `--chunk-rows` rows; for
//! each range both sides give a row count and a sum of row hashes (each
//! row's text, `record_out` of its columns in the source's order, hashed
//! with `hashtextextended`). A range that differs is split again (at keys of
//! whichever side has more rows in it) until it holds at most
//! `--leaf-rows` rows a side; then both sides' keys and hashes are read and
//! compared, and the differing keys printed, at most `--max-diffs`.
//!
//! Values are compared by their text under Tidemark's fixed session settings
//! on both sides (ISO dates in UTC, ISO 8601 intervals, hex bytea, exact
//! floats), so equal values compare equal across servers. Key bounds are
//! written as literals of the key columns' base types, and compared with the
//! primary key's operator-class operators.

use std::collections::HashMap;
use std::fmt::Write as _;

use anyhow::{bail, Context as _};
use sqlx::{PgConnection, Row as _};
use tidemark_common::pg::{quote_ident, PgTarget, TableName};

use crate::target::{self, TargetTable};

/// What `verify` compares and how finely.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    /// The database the archive came from (or any reference).
    pub source: PgTarget,
    /// The replayed database.
    pub target: PgTarget,
    /// Source → target tables.
    pub tables: Vec<(TableName, TableName)>,
    /// Rows per range in the first pass.
    pub chunk_rows: u64,
    /// Ranges of at most this many rows a side are compared row by row.
    pub leaf_rows: u64,
    /// Differing keys printed at most.
    pub max_diffs: usize,
}

/// One differing row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// The source table.
    pub table: TableName,
    /// The key, as `(a, b)=(1, x)`.
    pub key: String,
    /// `only in source`, `only in target` or `differs`.
    pub what: &'static str,
}

/// What `verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Rows compared (source side).
    pub rows: u64,
    /// The differing rows found (at most `max_diffs`).
    pub differences: Vec<Difference>,
    /// Whether more rows differ than are listed.
    pub more: bool,
    /// Tables whose columns differ (no rows compared).
    pub column_mismatches: Vec<String>,
}

impl Report {
    /// Whether the tables are equal.
    pub fn equal(&self) -> bool {
        self.differences.is_empty() && self.column_mismatches.is_empty()
    }
}

/// Verify only reads. (The settings that fix each value's text are every
/// Tidemark session's, from `common::pg`.) A table whose row-level security
/// policies would apply to this role is an error (`row_security = off`):
/// a policy would hide rows, so two tables could compare equal that are
/// not, and its expressions are the table owner's code.
const SETTINGS: &[&str] = &[
    "set default_transaction_read_only = on",
    "set row_security = off",
];

async fn open(target: &PgTarget) -> anyhow::Result<PgConnection> {
    let pool = target
        .connect(1, std::time::Duration::from_secs(30))
        .await?;
    let mut conn = pool.acquire().await?.detach();
    pool.close().await;
    for s in SETTINGS {
        sqlx::query(s).execute(&mut conn).await?;
    }
    Ok(conn)
}

/// How to read one table's rows on one side.
struct Side {
    conn: PgConnection,
    table: TargetTable,
    /// `record_out` of the compared columns, as text.
    row_text: String,
    /// Per key column: the base type's output function, qualified.
    key_out: Vec<String>,
    /// Per key column: the base type, for literals.
    key_base: Vec<String>,
}

/// Compares every table pair.
///
/// Fails when a database cannot be reached, a table is missing or has no
/// primary key.
pub async fn verify(cfg: &VerifyConfig) -> anyhow::Result<Report> {
    let mut src_conn = open(&cfg.source).await.context("verify: the source")?;
    let mut dst_conn = open(&cfg.target).await.context("verify: the target")?;
    let mut report = Report::default();
    for (s, t) in &cfg.tables {
        let src = target::load_table(&mut src_conn, s)
            .await?
            .with_context(|| format!("source table {s} does not exist in {}", cfg.source))?;
        let dst = target::load_table(&mut dst_conn, t)
            .await?
            .with_context(|| format!("target table {t} does not exist in {}", cfg.target))?;
        let cols = |x: &TargetTable| -> Vec<(String, String)> {
            x.columns
                .iter()
                .map(|c| (c.name.clone(), c.type_sql.clone()))
                .collect()
        };
        let (sc, dc) = (cols(&src), cols(&dst));
        let key_names = |x: &TargetTable| -> Vec<String> {
            x.key.iter().map(|&k| x.columns[k].name.clone()).collect()
        };
        if sc != dc || key_names(&src) != key_names(&dst) {
            let show = |c: &[(String, String)]| {
                c.iter()
                    .map(|(n, t)| format!("{n} {t}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            report.column_mismatches.push(format!(
                "{s} ({}) and {t} ({}) differ in their columns or primary key",
                show(&sc),
                show(&dc)
            ));
            continue;
        }
        let mut a = side(src_conn, src).await?;
        let mut b = side(dst_conn, dst).await?;
        let started = std::time::Instant::now();
        compare_table(cfg, s, &mut a, &mut b, &mut report).await?;
        tracing::info!(table = %s, rows = report.rows, seconds = started.elapsed().as_secs_f64(), "verified");
        src_conn = a.conn;
        dst_conn = b.conn;
    }
    Ok(report)
}

async fn side(mut conn: PgConnection, table: TargetTable) -> anyhow::Result<Side> {
    let cols: Vec<String> = table
        .columns
        .iter()
        .map(|c| format!("t.{}", quote_ident(&c.name)))
        .collect();
    let row_text = format!(
        "pg_catalog.textin(pg_catalog.record_out(row({})))",
        cols.join(", ")
    );
    let mut key_out = Vec::new();
    let mut key_base = Vec::new();
    for &k in &table.key {
        let col = &table.columns[k];
        let row = sqlx::query(
            r#"select pg_catalog.quote_ident(pn.nspname::text) operator(pg_catalog.||) '.'
                      operator(pg_catalog.||) pg_catalog.quote_ident(p.proname::text) as out_fn,
                      pg_catalog.format_type(b.oid, null) as base
               from pg_catalog.pg_attribute a
               join pg_catalog.pg_type t on t.oid operator(pg_catalog.=) a.atttypid
               join pg_catalog.pg_type b on b.oid operator(pg_catalog.=)
                    (case when t.typtype operator(pg_catalog.=) 'd' then t.typbasetype else t.oid end)
               join pg_catalog.pg_proc p on p.oid operator(pg_catalog.=) b.typoutput
               join pg_catalog.pg_namespace pn on pn.oid operator(pg_catalog.=) p.pronamespace
               where a.attrelid operator(pg_catalog.=) $1::pg_catalog.int8::pg_catalog.oid
                 and a.attname operator(pg_catalog.=) $2"#,
        )
        .bind(table.oid as i64)
        .bind(&col.name)
        .fetch_one(&mut conn)
        .await
        .with_context(|| format!("cannot read the key type of {}", table.name))?;
        key_out.push(row.get::<String, _>("out_fn"));
        key_base.push(row.get::<String, _>("base"));
    }
    Ok(Side {
        conn,
        table,
        row_text,
        key_out,
        key_base,
    })
}

/// A key as the texts of its columns.
type Key = Vec<String>;

/// A range of keys: after `lo` (exclusive) up to `hi` (inclusive); `None`
/// is open.
#[derive(Debug, Clone)]
struct Range {
    lo: Option<Key>,
    hi: Option<Key>,
}

impl Side {
    fn key_cols(&self) -> Vec<String> {
        self.table
            .key
            .iter()
            .map(|&k| format!("t.{}", quote_ident(&self.table.columns[k].name)))
            .collect()
    }

    fn literal(&self, i: usize, text: &str) -> String {
        format!("'{}'::{}", text.replace('\'', "''"), self.key_base[i])
    }

    /// `key > lo` (lexicographic over the key columns) with the operator
    /// class's operators.
    fn after(&self, lo: &Key) -> String {
        self.greater(lo)
    }

    fn at_most(&self, hi: &Key) -> String {
        format!("not {}", self.greater(hi))
    }

    /// The row's key is greater than `key`.
    fn greater(&self, key: &Key) -> String {
        // (a > x) or (a = x and b > y) or ...
        let cols = self.key_cols();
        let mut terms = Vec::new();
        for i in 0..cols.len() {
            let mut parts = Vec::new();
            for j in 0..i {
                parts.push(format!(
                    "{} {} {}",
                    cols[j],
                    self.table.key_eq[j],
                    self.literal(j, &key[j])
                ));
            }
            // a > x is x < a with the operator class's `<`.
            parts.push(format!(
                "{} {} {}",
                self.literal(i, &key[i]),
                self.table.key_lt[i],
                cols[i]
            ));
            terms.push(format!("({})", parts.join(" and ")));
        }
        format!("({})", terms.join(" or "))
    }

    fn range_cond(&self, r: &Range) -> String {
        let mut conds = Vec::new();
        if let Some(lo) = &r.lo {
            conds.push(self.after(lo));
        }
        if let Some(hi) = &r.hi {
            conds.push(self.at_most(hi));
        }
        if conds.is_empty() {
            "true".into()
        } else {
            conds.join(" and ")
        }
    }

    fn order(&self) -> String {
        self.key_cols()
            .iter()
            .zip(&self.table.key_lt)
            .map(|(c, lt)| format!("{c} using {lt}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn key_texts(&self) -> String {
        self.key_cols()
            .iter()
            .zip(&self.key_out)
            .map(|(c, f)| format!("pg_catalog.textin({f}({c}))"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The key `offset` rows into range `r` (0-based), if there is one.
    async fn key_at(&mut self, r: &Range, offset: u64) -> anyhow::Result<Option<Key>> {
        let sql = format!(
            "select {} from {} t where {} order by {} offset {offset} limit 1",
            self.key_texts(),
            self.table.name.quoted(),
            self.range_cond(r),
            self.order()
        );
        let row = sqlx::query(&sql).fetch_optional(&mut self.conn).await?;
        Ok(row.map(|row| {
            (0..self.table.key.len())
                .map(|i| row.get::<String, _>(i))
                .collect()
        }))
    }

    /// Rows and the sum of their hashes in range `r`.
    async fn digest(&mut self, r: &Range) -> anyhow::Result<(u64, String)> {
        let sql = format!(
            "select count(*), coalesce(sum(pg_catalog.hashtextextended({}, 0)), 0)::pg_catalog.text from {} t where {}",
            self.row_text,
            self.table.name.quoted(),
            self.range_cond(r)
        );
        let row = sqlx::query(&sql).fetch_one(&mut self.conn).await?;
        Ok((row.get::<i64, _>(0) as u64, row.get::<String, _>(1)))
    }

    /// Keys and row hashes in range `r`.
    async fn rows(&mut self, r: &Range) -> anyhow::Result<HashMap<Key, i64>> {
        let sql = format!(
            "select pg_catalog.hashtextextended({}, 0), {} from {} t where {}",
            self.row_text,
            self.key_texts(),
            self.table.name.quoted(),
            self.range_cond(r)
        );
        let rows = sqlx::query(&sql).fetch_all(&mut self.conn).await?;
        let n = self.table.key.len();
        Ok(rows
            .into_iter()
            .map(|row| {
                let key: Key = (0..n).map(|i| row.get::<String, _>(i + 1)).collect();
                (key, row.get::<i64, _>(0))
            })
            .collect())
    }
}

async fn compare_table(
    cfg: &VerifyConfig,
    name: &TableName,
    a: &mut Side,
    b: &mut Side,
    report: &mut Report,
) -> anyhow::Result<()> {
    let chunk = cfg.chunk_rows.max(1);
    let mut lo: Option<Key> = None;
    loop {
        let open = Range {
            lo: lo.clone(),
            hi: None,
        };
        let hi = a.key_at(&open, chunk - 1).await?;
        let range = Range {
            lo: lo.clone(),
            hi: hi.clone(),
        };
        let (da, db) = tokio::try_join!(a.digest(&range), b.digest(&range))?;
        report.rows += da.0;
        if da != db {
            narrow(cfg, name, a, b, range, da.0, db.0, report).await?;
            if report.more {
                return Ok(());
            }
        }
        match hi {
            Some(h) => lo = Some(h),
            None => return Ok(()),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn narrow(
    cfg: &VerifyConfig,
    name: &TableName,
    a: &mut Side,
    b: &mut Side,
    range: Range,
    na: u64,
    nb: u64,
    report: &mut Report,
) -> anyhow::Result<()> {
    if na.max(nb) <= cfg.leaf_rows.max(1) {
        let (ra, rb) = tokio::try_join!(a.rows(&range), b.rows(&range))?;
        let mut diffs: Vec<(Key, &'static str)> = Vec::new();
        for (k, h) in &ra {
            match rb.get(k) {
                None => diffs.push((k.clone(), "only in source")),
                Some(h2) if h2 != h => diffs.push((k.clone(), "differs")),
                _ => {}
            }
        }
        for k in rb.keys() {
            if !ra.contains_key(k) {
                diffs.push((k.clone(), "only in target"));
            }
        }
        diffs.sort();
        let key_names: Vec<String> = a
            .table
            .key
            .iter()
            .map(|&k| a.table.columns[k].name.clone())
            .collect();
        for (k, what) in diffs {
            if report.differences.len() >= cfg.max_diffs {
                report.more = true;
                return Ok(());
            }
            let mut key = String::new();
            let _ = write!(key, "({})=({})", key_names.join(", "), k.join(", "));
            report.differences.push(Difference {
                table: name.clone(),
                key,
                what,
            });
        }
        return Ok(());
    }
    // Split at keys of the side with more rows in the range.
    const PARTS: u64 = 16;
    let (bigger, n) = if na >= nb { (0, na) } else { (1, nb) };
    let step = n.div_ceil(PARTS).max(1);
    let mut bounds = Vec::new();
    let mut offset = step - 1;
    while offset < n.saturating_sub(1) {
        let side = if bigger == 0 { &mut *a } else { &mut *b };
        match side.key_at(&range, offset).await? {
            Some(k) => bounds.push(k),
            None => break,
        }
        offset += step;
    }
    if bounds.is_empty() {
        // The table changed under the comparison; compare what is there.
        let mut cfg = cfg.clone();
        cfg.leaf_rows = u64::MAX;
        return Box::pin(narrow(&cfg, name, a, b, range, 0, 0, report)).await;
    }
    let mut lo = range.lo.clone();
    for hi in bounds
        .into_iter()
        .map(Some)
        .chain(std::iter::once(range.hi.clone()))
    {
        let sub = Range {
            lo: lo.clone(),
            hi: hi.clone(),
        };
        let (da, db) = tokio::try_join!(a.digest(&sub), b.digest(&sub))?;
        if da != db {
            Box::pin(narrow(cfg, name, a, b, sub, da.0, db.0, report)).await?;
            if report.more {
                return Ok(());
            }
        }
        lo = hi;
    }
    Ok(())
}

/// Prints the report and says whether the tables are equal.
pub fn print(report: &Report, cfg: &VerifyConfig) -> anyhow::Result<()> {
    for m in &report.column_mismatches {
        println!("{m}");
    }
    for d in &report.differences {
        println!("{}: {} {}", d.table, d.key, d.what);
    }
    if report.more {
        println!("(more rows differ; --max-diffs {} shown)", cfg.max_diffs);
    }
    if report.equal() {
        println!(
            "equal: {} table(s), {} rows compared",
            cfg.tables.len(),
            report.rows
        );
        Ok(())
    } else {
        bail!(
            "the tables differ: {} differing row(s){} listed above",
            report.differences.len(),
            if report.more { " or more" } else { "" }
        )
    }
}
