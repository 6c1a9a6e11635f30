//! A table's shape as the codec sees it: its columns with their types, its
//! primary key with the operators of the key index, and the record
//! templates of each combination of value variants.
//!
//! Shapes come from the catalog (the snapshot, timestamp mode, and the
//! primary key and NOT NULL flags in logical mode) and from pgoutput
//! Relation messages (logical mode's column names, types and typmods, as
//! the change was written). Every value goes through
//! [`tidemark_common::codec::RowCodec`]; no query renders a row.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use sqlx::PgConnection;
use tidemark_common::codec::{
    CodecError, ColumnSpec, ColumnType, Oid, RowCodec, TypeCache, Variants, FIRST_NORMAL_OID,
};
use tidemark_common::envelope::{ChangeEnvelope, RecordTemplate};
use tidemark_common::names::{quote_ident, quote_literal};
use tidemark_common::offset::KeyIdentity;
use tidemark_common::pg::TableName;

/// A primary-key column and how keys compare: with the operators of the
/// key index's operator class, schema-qualified, so a keyset bound means
/// what the index means and no other operator is resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyColumn {
    /// The column's name.
    pub name: String,
    /// The column's `pg_attribute.attnum`, which a rename leaves alone.
    pub attnum: i32,
    /// The key index's OID (`pg_index.indexrelid`): another one is another
    /// key, whose order may differ.
    pub index: Oid,
    /// The type literals of the column are written as: the base type of a
    /// domain (so no domain CHECK runs), schema-qualified
    /// (`pg_catalog.int4`, `public.mood`).
    pub literal_type: String,
    /// `operator(schema.<)` of the key's operator class.
    pub lt: String,
    /// `operator(schema.=)` of the key's operator class.
    pub eq: String,
    /// `operator(schema.>)` of the key's operator class.
    pub gt: String,
    /// The key index's collation of the column (`pg_index.indcollation`,
    /// `"schema"."name"`), for a collatable type: what its order compares
    /// texts in.
    pub collation: Option<String>,
    /// A domain with a CHECK constraint inside the literal type
    /// (`"public"."d"` of a key of `public.d[]`, of a composite or range
    /// with such a field or subtype): a literal's input would run the
    /// CHECK, code of the domain's owner, in pg-source's session. Such a
    /// key cannot bound a keyset read, and the table cannot be snapshotted
    /// (see [`CatalogShape::literal_safe_key`]).
    pub literal_check: Option<String>,
}

/// A table's columns and key as the catalog has them now.
#[derive(Debug, Clone)]
pub struct CatalogShape {
    /// The table's OID.
    pub oid: Oid,
    /// Live columns in order.
    pub columns: Vec<ColumnSpec>,
    /// The primary key in index order; empty without one.
    pub key: Vec<KeyColumn>,
    /// The newest transaction (32-bit xid) that wrote the catalog rows of
    /// the columns and the primary-key index: the last DDL that changed a
    /// NOT NULL flag or the key is this one or an earlier one.
    pub changed_by: u32,
    /// The generated columns (`attgenerated`), in order: logical decoding
    /// does not send their values.
    pub generated: Vec<String>,
}

#[derive(sqlx::FromRow)]
struct AttributeRow {
    xmin: i64,
    name: String,
    type_oid: i64,
    typmod: i32,
    not_null: bool,
    attnum: i32,
    generated: bool,
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    xmin: i64,
    name: String,
    attnum: i32,
    index: i64,
    lt: String,
    eq: String,
    gt: String,
    collation: Option<String>,
}

/// The live columns of a table.
const COLUMNS_SQL: &str = r#"
select a.xmin::pg_catalog.text::pg_catalog.int8 as xmin,
       a.attname::pg_catalog.text as name, a.atttypid::pg_catalog.int8 as type_oid,
       a.atttypmod as typmod, a.attnotnull as not_null, a.attnum::pg_catalog.int4 as attnum,
       a.attgenerated operator(pg_catalog.<>) '' as generated
from pg_catalog.pg_attribute a
where a.attrelid operator(pg_catalog.=) $1::pg_catalog.oid
  and a.attnum operator(pg_catalog.>) 0 and not a.attisdropped
order by a.attnum
limit 1600
"#;

/// The primary key's columns in index order, with the `<`, `=` and `>`
/// (strategies 1, 3 and 5) of each column's operator class.
const KEY_SQL: &str = r#"
select i.xmin::pg_catalog.text::pg_catalog.int8 as xmin,
       a.attname::pg_catalog.text as name,
       k.attnum::pg_catalog.int4 as attnum, i.indexrelid::pg_catalog.int8 as index,
       pg_catalog.format('operator(%I.%s)', ltn.nspname, lt.oprname) as lt,
       pg_catalog.format('operator(%I.%s)', eqn.nspname, eq.oprname) as eq,
       pg_catalog.format('operator(%I.%s)', gtn.nspname, gt.oprname) as gt,
       (select pg_catalog.format('%I.%I', cn.nspname, co.collname)
          from pg_catalog.pg_collation co
          join pg_catalog.pg_namespace cn on cn.oid operator(pg_catalog.=) co.collnamespace
         where co.oid operator(pg_catalog.=) k.coll) as collation
from pg_catalog.pg_index i
cross join lateral rows from (pg_catalog.unnest(i.indkey::pg_catalog.int2[]),
                             pg_catalog.unnest(i.indclass::pg_catalog.oid[]),
                             pg_catalog.unnest(i.indcollation::pg_catalog.oid[]))
     with ordinality as k(attnum, opclass, coll, n)
join pg_catalog.pg_attribute a
  on a.attrelid operator(pg_catalog.=) i.indrelid and a.attnum operator(pg_catalog.=) k.attnum
join pg_catalog.pg_opclass oc on oc.oid operator(pg_catalog.=) k.opclass
join pg_catalog.pg_amop lto
  on lto.amopfamily operator(pg_catalog.=) oc.opcfamily
 and lto.amoplefttype operator(pg_catalog.=) oc.opcintype
 and lto.amoprighttype operator(pg_catalog.=) oc.opcintype
 and lto.amopstrategy operator(pg_catalog.=) 1
join pg_catalog.pg_operator lt on lt.oid operator(pg_catalog.=) lto.amopopr
join pg_catalog.pg_namespace ltn on ltn.oid operator(pg_catalog.=) lt.oprnamespace
join pg_catalog.pg_amop eqo
  on eqo.amopfamily operator(pg_catalog.=) oc.opcfamily
 and eqo.amoplefttype operator(pg_catalog.=) oc.opcintype
 and eqo.amoprighttype operator(pg_catalog.=) oc.opcintype
 and eqo.amopstrategy operator(pg_catalog.=) 3
join pg_catalog.pg_operator eq on eq.oid operator(pg_catalog.=) eqo.amopopr
join pg_catalog.pg_namespace eqn on eqn.oid operator(pg_catalog.=) eq.oprnamespace
join pg_catalog.pg_amop gto
  on gto.amopfamily operator(pg_catalog.=) oc.opcfamily
 and gto.amoplefttype operator(pg_catalog.=) oc.opcintype
 and gto.amoprighttype operator(pg_catalog.=) oc.opcintype
 and gto.amopstrategy operator(pg_catalog.=) 5
join pg_catalog.pg_operator gt on gt.oid operator(pg_catalog.=) gto.amopopr
join pg_catalog.pg_namespace gtn on gtn.oid operator(pg_catalog.=) gt.oprnamespace
where i.indrelid operator(pg_catalog.=) $1::pg_catalog.oid and i.indisprimary
order by k.n
limit 32
"#;

/// The first domain with a CHECK constraint that a literal of type `$1`
/// (never itself a domain: the literal is of a domain's base type) would
/// run the input of: one reached through array elements, composite fields,
/// range subtypes and multiranges' ranges, at any depth (`"public"."d"`).
const CHECKED_DOMAIN_SQL: &str = r#"
with recursive reach(oid, depth) as (
  select $1::pg_catalog.oid, 0
  union
  select e.child, r.depth operator(pg_catalog.+) 1
  from reach r
  cross join lateral (
    select t.typbasetype as child from pg_catalog.pg_type t
     where t.oid operator(pg_catalog.=) r.oid and t.typtype operator(pg_catalog.=) 'd'
    union all
    select t.typelem from pg_catalog.pg_type t
     where t.oid operator(pg_catalog.=) r.oid and t.typelem operator(pg_catalog.<>) 0
       and t.typlen operator(pg_catalog.=) -1
    union all
    select a.atttypid from pg_catalog.pg_type t
      join pg_catalog.pg_attribute a on a.attrelid operator(pg_catalog.=) t.typrelid
     where t.oid operator(pg_catalog.=) r.oid and t.typtype operator(pg_catalog.=) 'c'
       and a.attnum operator(pg_catalog.>) 0 and not a.attisdropped
    union all
    select g.rngsubtype from pg_catalog.pg_range g where g.rngtypid operator(pg_catalog.=) r.oid
    union all
    select g.rngtypid from pg_catalog.pg_range g where g.rngmultitypid operator(pg_catalog.=) r.oid
  ) e
  where r.depth operator(pg_catalog.<) 16
)
select pg_catalog.format('%I.%I', n.nspname, t.typname)
from reach r
join pg_catalog.pg_type t on t.oid operator(pg_catalog.=) r.oid
join pg_catalog.pg_namespace n on n.oid operator(pg_catalog.=) t.typnamespace
where t.typtype operator(pg_catalog.=) 'd'
  and exists (select 1 from pg_catalog.pg_constraint c
               where c.contypid operator(pg_catalog.=) t.oid and c.contype operator(pg_catalog.=) 'c')
order by r.depth
limit 1
"#;

impl CatalogShape {
    /// Fails when a key column's literals would run a domain's CHECK (see
    /// [`KeyColumn::literal_check`]): snapshots read a table in key order
    /// from a key written as literals, so such a table cannot be
    /// snapshotted without running its owner's code with pg-source's
    /// privileges. The error names the table, the column, the domain and
    /// the fix.
    pub fn literal_safe_key(&self, table: &dyn std::fmt::Display) -> anyhow::Result<()> {
        let Some((k, domain)) = self
            .key
            .iter()
            .find_map(|k| k.literal_check.as_ref().map(|d| (k, d)))
        else {
            return Ok(());
        };
        let ty = self
            .columns
            .iter()
            .find(|c| c.name == k.name)
            .map(|c| c.ty.sql_type().to_owned())
            .unwrap_or_default();
        anyhow::bail!(
            "table {table}: primary key column {} has type {ty}, which holds domain {domain} with a CHECK \
             constraint; pg-source reads a table in key order from keys written as literals, and a literal's \
             input would run that CHECK (code of the domain's owner) with pg-source's privileges, so the table \
             cannot be snapshotted. Fix: give the key column a type without such a domain (for an array of a \
             domain, its base type's array) and put the check on the table (alter table ... add check (...))",
            quote_ident(&k.name)
        )
    }

    /// Reads a table's columns, their types (through `types`) and its
    /// primary key; `None` when the table no longer exists (or was dropped
    /// while it was read).
    ///
    /// Fails on a catalog error or a type the codec cannot resolve.
    pub async fn load(
        conn: &mut PgConnection,
        types: &TypeCache,
        oid: Oid,
    ) -> anyhow::Result<Option<Self>> {
        let exists: bool = sqlx::query_scalar(
            "select exists (select 1 from pg_catalog.pg_class c where c.oid operator(pg_catalog.=) $1::pg_catalog.oid)",
        )
        .bind(i64::from(oid))
        .fetch_one(&mut *conn)
        .await?;
        if !exists {
            return Ok(None);
        }
        let rows: Vec<AttributeRow> = sqlx::query_as(COLUMNS_SQL)
            .bind(i64::from(oid))
            .fetch_all(&mut *conn)
            .await?;
        let ids: Vec<(Oid, i32)> = rows.iter().map(|r| (r.type_oid as Oid, r.typmod)).collect();
        let mut xmins: Vec<u32> = rows.iter().map(|r| r.xmin as u32).collect();
        let column_types = types.column_types_on(conn, &ids).await?;
        let generated: Vec<String> = rows
            .iter()
            .filter(|r| r.generated)
            .map(|r| r.name.clone())
            .collect();
        let columns: Vec<ColumnSpec> = rows
            .into_iter()
            .zip(column_types)
            .map(|(r, ty)| ColumnSpec {
                name: r.name,
                ty,
                not_null: r.not_null,
                attnum: Some(r.attnum),
                key_position: None,
            })
            .collect();
        let keys: Vec<KeyRow> = sqlx::query_as(KEY_SQL)
            .bind(i64::from(oid))
            .fetch_all(&mut *conn)
            .await?;
        xmins.extend(keys.iter().map(|k| k.xmin as u32));
        let changed_by = newest_xid(&xmins);
        let mut key = Vec::with_capacity(keys.len());
        for k in keys {
            let Some(col) = columns.iter().find(|c| c.name == k.name) else {
                continue;
            };
            let base = col.ty.ty.base();
            // A built-in type holds no domain; a user type may.
            let literal_check = if base.oid < FIRST_NORMAL_OID {
                None
            } else {
                sqlx::query_scalar(CHECKED_DOMAIN_SQL)
                    .bind(i64::from(base.oid))
                    .fetch_optional(&mut *conn)
                    .await?
            };
            key.push(KeyColumn {
                literal_type: literal_type(&col.ty),
                name: k.name,
                attnum: k.attnum,
                index: k.index as Oid,
                lt: k.lt,
                eq: k.eq,
                gt: k.gt,
                collation: k.collation,
                literal_check,
            });
        }
        // Dropped while it was read (the queries above then found nothing):
        // a table that exists now existed all along, since a dropped table's
        // OID does not come back.
        let exists: bool = sqlx::query_scalar(
            "select exists (select 1 from pg_catalog.pg_class c where c.oid operator(pg_catalog.=) $1::pg_catalog.oid)",
        )
        .bind(i64::from(oid))
        .fetch_one(&mut *conn)
        .await?;
        if !exists {
            return Ok(None);
        }
        Ok(Some(Self {
            oid,
            columns,
            key,
            changed_by,
            generated,
        }))
    }

    /// The OID of a table by name; `None` when it does not exist.
    ///
    /// Fails on a catalog error.
    pub async fn oid_of(
        conn: &mut PgConnection,
        table: &TableName,
    ) -> Result<Option<Oid>, sqlx::Error> {
        let oid: Option<i64> = sqlx::query_scalar(
            "select c.oid::pg_catalog.int8 from pg_catalog.pg_class c
             join pg_catalog.pg_namespace n on n.oid operator(pg_catalog.=) c.relnamespace
             where n.nspname operator(pg_catalog.=) $1 and c.relname operator(pg_catalog.=) $2",
        )
        .bind(&table.schema)
        .bind(&table.name)
        .fetch_optional(&mut *conn)
        .await?;
        Ok(oid.map(|o| o as Oid))
    }
}

/// Whether 32-bit transaction id `a` was assigned after `b` (the server's
/// circular order: ids within 2^31 of each other compare).
pub fn xid_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The newest of `xids` in circular order; 0 for none.
fn newest_xid(xids: &[u32]) -> u32 {
    xids.iter()
        .copied()
        .reduce(|n, x| if xid_after(x, n) { x } else { n })
        .unwrap_or(0)
}

/// The type a key literal is written as: a domain's base type, the column's
/// own type otherwise, schema-qualified (`pg_catalog.int4`,
/// `"public"."mood"`), so no other type of that name is resolved.
fn literal_type(ty: &ColumnType) -> String {
    let base = ty.ty.base();
    format!("{}.{}", quote_ident(&base.schema), quote_ident(&base.name))
}

/// A literal of `text` as a value of `ty` (`'7'::pg_catalog.int4`): literal
/// coercion runs the type's input function, not a cast.
pub fn literal(text: &str, ty: &str) -> String {
    format!("{}::{ty}", quote_literal(text))
}

/// SQL that is true when the key columns of `alias` (`t`) come after the
/// key `texts` (keyset order), or (`or_equal`) are at it: a lexicographic
/// comparison with the key index's operators and the key as literals.
pub fn key_after_sql(key: &[KeyColumn], alias: &str, texts: &[String], or_equal: bool) -> String {
    let left: Vec<String> = key
        .iter()
        .map(|k| format!("{alias}.{}", quote_ident(&k.name)))
        .collect();
    lexicographic_gt(key, &left, &literals(key, texts), or_equal)
}

/// The key `texts` as literals of the key columns' literal types, each
/// with an explicit COLLATE of the key index's collation where it has one:
/// two literals (a change's key against a stored bound) would otherwise
/// compare in the database's collation, and a column against a literal in
/// the column's, while the snapshot's chunks are ordered by the index's.
pub fn literals(key: &[KeyColumn], texts: &[String]) -> Vec<String> {
    key.iter()
        .zip(texts)
        .map(|(k, t)| {
            let lit = literal(t, &k.literal_type);
            match &k.collation {
                Some(c) => format!("({lit} collate {c})"),
                None => lit,
            }
        })
        .collect()
}

/// SQL that is true when the key `left` comes after `right` (each a SQL
/// expression per key column), or (`or_equal`) equals it, by the key
/// index's operators: column i greater and the ones before it equal.
pub fn lexicographic_gt(
    key: &[KeyColumn],
    left: &[String],
    right: &[String],
    or_equal: bool,
) -> String {
    let n = key.len().min(left.len()).min(right.len());
    let mut terms = Vec::new();
    for i in 0..n {
        let mut parts: Vec<String> = (0..i)
            .map(|j| format!("{} {} {}", left[j], key[j].eq, right[j]))
            .collect();
        parts.push(format!("{} {} {}", left[i], key[i].gt, right[i]));
        terms.push(format!("({})", parts.join(" and ")));
    }
    if or_equal {
        let all: Vec<String> = (0..n)
            .map(|j| format!("{} {} {}", left[j], key[j].eq, right[j]))
            .collect();
        terms.push(format!("({})", all.join(" and ")));
    }
    format!("({})", terms.join(" or "))
}

/// `order by` of the key columns in the key index's order.
pub fn key_order_sql(key: &[KeyColumn], alias: &str) -> String {
    key.iter()
        .map(|k| format!("{alias}.{} using {}", quote_ident(&k.name), k.lt))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The key as a stored incremental snapshot position names it: by its
/// index and its columns' attnums, which a column rename leaves alone.
pub fn key_identity(key: &[KeyColumn]) -> KeyIdentity {
    KeyIdentity {
        index: key.first().map_or(0, |k| k.index),
        attnums: key.iter().map(|k| k.attnum).collect(),
    }
}

/// A stored key (a snapshot's last key, a segment bound) as the key
/// columns' texts: an object of each key column's text as 0.2 stores it,
/// or its `to_jsonb` as 0.1 stored it (numbers as their text), or an array
/// of the texts in key order. `None` when a column is missing.
pub fn stored_key_texts(stored: &Value, key: &[KeyColumn]) -> Option<Vec<String>> {
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    };
    match stored {
        Value::Array(items) => items.iter().map(text).collect(),
        Value::Object(o) => key.iter().map(|k| o.get(&k.name).and_then(text)).collect(),
        _ => None,
    }
}

/// The record templates of one row struct (a key, or a row state), one
/// per combination of its values' variants.
#[derive(Debug)]
pub struct Templates {
    codec: Arc<RowCodec>,
    name: String,
    schemas: bool,
    default: Arc<RecordTemplate>,
    others: Mutex<HashMap<Variants, Arc<RecordTemplate>>>,
}

impl Templates {
    /// Templates of rows of `codec`, a struct schema called `name` (not
    /// optional), with the schema or (`schemas` false) the payload alone.
    pub fn new(codec: Arc<RowCodec>, name: &str, schemas: bool) -> Self {
        let default = Arc::new(Self::make(&codec, name, schemas, &Variants::default()));
        Self {
            codec,
            name: name.to_owned(),
            schemas,
            default,
            others: Mutex::new(HashMap::new()),
        }
    }

    fn make(codec: &RowCodec, name: &str, schemas: bool, variants: &Variants) -> RecordTemplate {
        if schemas {
            RecordTemplate::new(&codec.struct_schema(name, false, variants))
        } else {
            RecordTemplate::schemaless()
        }
    }

    /// The template of a row whose values took `variants`.
    pub fn get(&self, variants: &Variants) -> Arc<RecordTemplate> {
        if variants.is_default() || !self.schemas {
            return self.default.clone();
        }
        let mut others = self.others.lock().expect("never poisoned");
        others
            .entry(variants.clone())
            .or_insert_with(|| Arc::new(Self::make(&self.codec, &self.name, true, variants)))
            .clone()
    }
}

/// Where a table's events come from, for their envelope and names.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The connector's name.
    pub connector: String,
    /// The database.
    pub database: String,
    /// The table.
    pub table: TableName,
    /// Leave the Connect schema out of keys / values.
    pub key_schemas: bool,
    /// See `key_schemas`.
    pub value_schemas: bool,
}

/// One shape of a captured table: how its row images and keys are encoded
/// and what envelope their events get.
#[derive(Debug)]
pub struct Shape {
    origin: Arc<Origin>,
    /// The columns, in order.
    pub columns: Vec<ColumnSpec>,
    /// The primary key, and where its columns are in `columns`.
    pub key: Vec<KeyColumn>,
    key_index: Vec<usize>,
    row: Arc<RowCodec>,
    key_codec: Arc<RowCodec>,
    keys: Templates,
    envelopes: Mutex<HashMap<(Variants, Variants), Arc<ChangeEnvelope>>>,
}

/// A row image encoded: its payload JSON and the variants its values took.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// `{"col":value,...}`.
    pub json: String,
    /// The values' variants.
    pub variants: Variants,
}

impl Shape {
    /// A shape of `columns` keyed by `key` (columns by name), of the
    /// table whose OID is `table_oid` (which its row images' schemas say:
    /// the attnums of the columns are this table's).
    ///
    /// Fails when a key column is not among the columns.
    pub fn new(
        origin: Arc<Origin>,
        table_oid: Oid,
        columns: Vec<ColumnSpec>,
        key: Vec<KeyColumn>,
    ) -> anyhow::Result<Self> {
        let key_index = key
            .iter()
            .map(|k| {
                columns
                    .iter()
                    .position(|c| c.name == k.name)
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "table {}: primary-key column {} is not among the columns sent",
                            origin.table,
                            k.name
                        )
                    })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (row, key_codec) = RowCodec::keyed(columns.clone(), &key_index);
        let (row, key_codec) = (Arc::new(row.with_table_oid(table_oid)), Arc::new(key_codec));
        let t = &origin.table;
        let keys = Templates::new(
            key_codec.clone(),
            &format!("{}.{}.{}.Key", origin.connector, t.schema, t.name),
            origin.key_schemas,
        );
        Ok(Self {
            origin,
            columns,
            key,
            key_index,
            row,
            key_codec,
            keys,
            envelopes: Mutex::new(HashMap::new()),
        })
    }

    /// The table.
    pub fn table(&self) -> &TableName {
        &self.origin.table
    }

    /// Encodes a row image from each column's text (`None` for NULL).
    ///
    /// Fails, naming the column, when a value is not what its type prints.
    pub fn encode_row<T: AsRef<[u8]>>(&self, fields: &[Option<T>]) -> Result<Encoded, CodecError> {
        let mut out = Vec::with_capacity(64 * fields.len());
        let variants = self.row.encode(fields, &mut out)?;
        Ok(Encoded {
            json: String::from_utf8(out).expect("the codec writes UTF-8"),
            variants,
        })
    }

    /// Encodes the key of a row from the row's column texts.
    ///
    /// Fails like [`Shape::encode_row`].
    pub fn encode_key<T: AsRef<[u8]>>(&self, fields: &[Option<T>]) -> Result<Encoded, CodecError> {
        let key: Vec<Option<&[u8]>> = self
            .key_index
            .iter()
            .map(|&i| fields.get(i).and_then(|f| f.as_ref().map(AsRef::as_ref)))
            .collect();
        let mut out = Vec::with_capacity(16 * key.len());
        let variants = self.key_codec.encode(&key, &mut out)?;
        Ok(Encoded {
            json: String::from_utf8(out).expect("the codec writes UTF-8"),
            variants,
        })
    }

    /// The key column texts of a row, for keyset bounds and segment checks.
    pub fn key_texts<T: AsRef<[u8]>>(&self, fields: &[Option<T>]) -> Vec<Option<String>> {
        self.key_index
            .iter()
            .map(|&i| {
                fields
                    .get(i)
                    .and_then(|f| f.as_ref())
                    .map(|t| String::from_utf8_lossy(t.as_ref()).into_owned())
            })
            .collect()
    }

    /// The key record of an encoded key.
    pub fn key_record(&self, key: &Encoded) -> Vec<u8> {
        self.keys.get(&key.variants).render(&key.json)
    }

    /// The envelope of a change whose `before` and `after` took these
    /// variants (`None` for an absent image).
    pub fn envelope(
        &self,
        before: Option<&Variants>,
        after: Option<&Variants>,
    ) -> Arc<ChangeEnvelope> {
        let none = Variants::default();
        let (b, a) = if self.origin.value_schemas {
            (
                before.unwrap_or(&none).clone(),
                after.unwrap_or(&none).clone(),
            )
        } else {
            (none.clone(), none)
        };
        let mut cache = self.envelopes.lock().expect("never poisoned");
        if let Some(e) = cache.get(&(b.clone(), a.clone())) {
            return e.clone();
        }
        let o = &self.origin;
        let mut env = ChangeEnvelope::for_rows(
            &o.connector,
            &o.database,
            &o.table.schema,
            &o.table.name,
            &self.row.fields(&b),
            &self.row.fields(&a),
            self.row.table_oid(),
        );
        if !o.value_schemas {
            env = env.without_schema();
        }
        let env = Arc::new(env);
        // Combinations beyond a few hundred are built each time.
        if cache.len() < 256 {
            cache.insert((b, a), env.clone());
        }
        env
    }

    /// Whether two shapes encode and describe rows the same way.
    pub fn same_as(&self, columns: &[ColumnSpec], key: &[KeyColumn]) -> bool {
        self.columns == columns && self.key == key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(names: &[&str]) -> Vec<KeyColumn> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| KeyColumn {
                name: (*n).to_owned(),
                attnum: i as i32 + 1,
                index: 1,
                literal_type: "\"pg_catalog\".\"int4\"".to_owned(),
                lt: "operator(pg_catalog.<)".to_owned(),
                eq: "operator(pg_catalog.=)".to_owned(),
                gt: "operator(pg_catalog.>)".to_owned(),
                collation: None,
                literal_check: None,
            })
            .collect()
    }

    #[test]
    fn keyset_bounds_are_literals_compared_with_the_index_operators() {
        let k = key(&["a", "b"]);
        assert_eq!(
            key_after_sql(&k, "t", &["1".into(), "it's".into()], false),
            "((t.\"a\" operator(pg_catalog.>) '1'::\"pg_catalog\".\"int4\") or \
             (t.\"a\" operator(pg_catalog.=) '1'::\"pg_catalog\".\"int4\" and \
             t.\"b\" operator(pg_catalog.>) 'it''s'::\"pg_catalog\".\"int4\"))"
        );
        assert_eq!(
            key_order_sql(&k, "t"),
            "t.\"a\" using operator(pg_catalog.<), t.\"b\" using operator(pg_catalog.<)"
        );
        let mut collated = key(&["a"]);
        collated[0].literal_type = "\"pg_catalog\".\"text\"".to_owned();
        collated[0].collation = Some("\"pg_catalog\".\"C\"".to_owned());
        assert_eq!(
            key_after_sql(&collated, "t", &["b".into()], false),
            "((t.\"a\" operator(pg_catalog.>) ('b'::\"pg_catalog\".\"text\" collate \"pg_catalog\".\"C\")))"
        );
        let at = lexicographic_gt(&k[..1], &["x".into()], &["y".into()], true);
        assert_eq!(
            at,
            "((x operator(pg_catalog.>) y) or (x operator(pg_catalog.=) y))"
        );
    }

    #[test]
    fn xids_compare_in_circular_order() {
        assert!(xid_after(10, 9));
        assert!(!xid_after(9, 10) && !xid_after(9, 9));
        assert!(xid_after(3, u32::MAX - 3), "across the wrap");
        assert_eq!(newest_xid(&[5, 900, 7]), 900);
        assert_eq!(newest_xid(&[u32::MAX - 1, 4, u32::MAX]), 4);
        assert_eq!(newest_xid(&[]), 0);
    }

    #[test]
    fn stored_keys_read_as_0_2_and_0_1_wrote_them() {
        let k = key(&["id", "name"]);
        assert_eq!(
            stored_key_texts(&serde_json::json!(["7", "x"]), &k),
            Some(vec!["7".to_owned(), "x".to_owned()])
        );
        // 0.1: to_jsonb of the key columns.
        assert_eq!(
            stored_key_texts(&serde_json::json!({"name": "x", "id": 7}), &k),
            Some(vec!["7".to_owned(), "x".to_owned()])
        );
        assert_eq!(stored_key_texts(&serde_json::json!({"id": 7}), &k), None);
        assert_eq!(stored_key_texts(&serde_json::json!([null]), &k), None);
    }
}
