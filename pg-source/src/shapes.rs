//! The row shapes of `changelog` capture (`tidemark.shapes`): what each
//! change-log row's `before` and `after` were written with, so that a row
//! logged before an `ALTER TABLE` is read with the columns and types it had
//! then, and never rendered by Postgres.
//!
//! A shape is read once per id and kept: shapes never change (an ALTER
//! records a new one). Its columns become a [`RowCodec`] for the row image
//! and one for the key; types come from a [`TypeCache`]. A type dropped
//! since (a column retyped from an enum, then the enum dropped) is no
//! longer in the catalog: its values travel as their text, under the name
//! the shape recorded.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use serde::Deserialize;
use sqlx::PgPool;
use tidemark_common::codec::{
    parse_record, CodecError, ColumnSpec, ColumnType, Oid, RowCodec, TypeCache, Variants,
};
use tidemark_common::names;

/// One column as `tidemark.shapes.columns` records it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ShapeColumn {
    /// The column's name.
    pub name: String,
    /// `pg_attribute.attnum`.
    pub attnum: i32,
    /// `pg_attribute.atttypid`.
    pub type_oid: i64,
    /// `pg_attribute.atttypmod`.
    pub typmod: i32,
    /// `pg_catalog.format_type(type_oid, typmod)`, schema-qualified.
    #[serde(rename = "type")]
    pub sql_type: String,
    /// `pg_attribute.attnotnull`.
    pub not_null: bool,
}

/// A table's shape: its columns in order and its primary key.
#[derive(Debug)]
pub struct Shape {
    /// `tidemark.shapes.id`.
    pub id: i32,
    /// The table's OID when the shape was recorded.
    pub relid: i64,
    /// The table, as `format('%I.%I')` wrote it.
    pub table_name: String,
    /// The columns, in order.
    pub columns: Vec<ShapeColumn>,
    /// The primary key's columns, in index order.
    pub key: Vec<String>,
    /// Encodes a whole row image.
    pub row: Arc<RowCodec>,
    /// Encodes the key's columns.
    pub key_codec: Arc<RowCodec>,
    /// Where each key column is in the row.
    key_index: Vec<usize>,
}

/// A row image decoded with its shape.
#[derive(Debug)]
pub struct Image {
    /// The row as payload JSON.
    pub row: Vec<u8>,
    /// The variants its values took.
    pub row_variants: Variants,
    /// The key as payload JSON.
    pub key: Vec<u8>,
    /// The variants the key's values took.
    pub key_variants: Variants,
    /// The key columns' texts, as their output functions printed them.
    pub key_text: Vec<Option<String>>,
}

impl Shape {
    /// Decodes a row image (`record_out` text) of this shape.
    ///
    /// Fails, naming the column, when the text is not a row of this shape or
    /// a value cannot be carried exactly.
    pub fn decode(&self, record: &str) -> Result<Image, CodecError> {
        let mut fields = parse_record(record)?;
        if self.columns.is_empty() && fields == [None] {
            fields.clear();
        }
        let fields: Vec<Option<&[u8]>> = fields
            .iter()
            .map(|f| f.as_deref().map(str::as_bytes))
            .collect();
        let mut row = Vec::with_capacity(record.len() + 16 * fields.len());
        let row_variants = self.row.encode(&fields, &mut row)?;
        let key_fields: Vec<Option<&[u8]>> = self.key_index.iter().map(|&i| fields[i]).collect();
        let mut key = Vec::with_capacity(32);
        let key_variants = self.key_codec.encode(&key_fields, &mut key)?;
        let key_text = key_fields
            .iter()
            .map(|f| f.map(|b| String::from_utf8_lossy(b).into_owned()))
            .collect();
        Ok(Image {
            key_text,
            row,
            row_variants,
            key,
            key_variants,
        })
    }
}

#[derive(sqlx::FromRow)]
struct ShapeRow {
    id: i32,
    relid: i64,
    table_name: String,
    columns: sqlx::types::Json<Vec<ShapeColumn>>,
    key: sqlx::types::Json<Vec<String>>,
}

/// The shapes read so far, by id.
#[derive(Debug, Default)]
pub struct Shapes {
    by_id: HashMap<i32, Arc<Shape>>,
    types: Arc<TypeCache>,
}

impl Shapes {
    /// Shapes resolving types with `types`.
    pub fn new(types: Arc<TypeCache>) -> Self {
        Self {
            by_id: HashMap::new(),
            types,
        }
    }

    /// A shape read before.
    pub fn get(&self, id: i32) -> Option<Arc<Shape>> {
        self.by_id.get(&id).cloned()
    }

    /// The newest shape of each of `tables` (`format('%I.%I')` names), read
    /// into the cache: what a table looks like now, as far as capture knows.
    ///
    /// Fails on a database error.
    pub async fn newest(
        &mut self,
        pool: &PgPool,
        tables: &[String],
    ) -> anyhow::Result<HashMap<String, Arc<Shape>>> {
        let ids: Vec<i32> = sqlx::query_scalar(&format!(
            "select pg_catalog.max(id) from {} \
             where table_name operator(pg_catalog.=) any ($1) group by table_name limit 100000",
            names::SHAPES
        ))
        .bind(tables)
        .fetch_all(pool)
        .await
        .with_context(|| format!("cannot read {}", names::SHAPES))?;
        self.load(pool, &ids).await?;
        Ok(ids
            .iter()
            .filter_map(|id| self.get(*id))
            .map(|s| (s.table_name.clone(), s))
            .collect())
    }

    /// Reads the shapes of `ids` not read yet.
    ///
    /// Fails on a database error, when a shape is missing (the change log
    /// names a shape `tidemark.shapes` lacks), or when a type cannot be
    /// resolved.
    pub async fn load(&mut self, pool: &PgPool, ids: &[i32]) -> anyhow::Result<()> {
        let mut missing: Vec<i32> = ids
            .iter()
            .copied()
            .filter(|id| !self.by_id.contains_key(id))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let rows: Vec<ShapeRow> = sqlx::query_as(&format!(
            "select id, relid::pg_catalog.int8 as relid, table_name, columns, key from {} \
             where id operator(pg_catalog.=) any ($1) limit 100000",
            names::SHAPES
        ))
        .bind(&missing)
        .fetch_all(pool)
        .await
        .with_context(|| format!("cannot read {}", names::SHAPES))?;
        for id in &missing {
            if !rows.iter().any(|r| r.id == *id) {
                anyhow::bail!(
                    "the change log names shape {id}, which {} does not have: was it edited by hand? run schema-init again for the table",
                    names::SHAPES
                );
            }
        }
        for r in rows {
            let shape = self.build(pool, r).await?;
            self.by_id.insert(shape.id, Arc::new(shape));
        }
        Ok(())
    }

    async fn build(&self, pool: &PgPool, r: ShapeRow) -> anyhow::Result<Shape> {
        let columns = r.columns.0;
        let key = r.key.0;
        let mut oids = Vec::with_capacity(columns.len());
        for c in &columns {
            let oid = Oid::try_from(c.type_oid)
                .with_context(|| format!("shape {} has a bad type OID {}", r.id, c.type_oid))?;
            oids.push(oid);
        }
        if let Err(CodecError::UnknownType { .. }) = self.types.resolve(pool, &oids).await {
            // Dropped since: known by the name the shape recorded.
            for (c, &oid) in columns.iter().zip(&oids) {
                if self.types.get(oid).is_none() {
                    let (schema, name) = split_type_name(&c.sql_type);
                    self.types.note_type(oid, &schema, &name);
                }
            }
        }
        self.types.resolve(pool, &oids).await.with_context(|| {
            format!(
                "cannot resolve the types of {} (shape {})",
                r.table_name, r.id
            )
        })?;
        let specs: Vec<ColumnSpec> = columns
            .iter()
            .zip(&oids)
            .map(|(c, &oid)| ColumnSpec {
                name: c.name.clone(),
                ty: ColumnType::new(
                    self.types.get(oid).expect("resolved above"),
                    c.typmod,
                    c.sql_type.clone(),
                ),
                not_null: c.not_null,
                attnum: Some(c.attnum),
                key_position: None,
            })
            .collect();
        let mut key_index = Vec::with_capacity(key.len());
        for k in &key {
            let i = columns.iter().position(|c| &c.name == k).with_context(|| {
                format!(
                    "shape {} of {} has key column {k} but no such column",
                    r.id, r.table_name
                )
            })?;
            key_index.push(i);
        }
        let (row, key_codec) = RowCodec::keyed(specs, &key_index);
        // The attnums are those of the table the shape was recorded for.
        let relid = Oid::try_from(r.relid)
            .with_context(|| format!("shape {} has a bad table OID {}", r.id, r.relid))?;
        let row = row.with_table_oid(relid);
        Ok(Shape {
            id: r.id,
            relid: r.relid,
            table_name: r.table_name,
            row: Arc::new(row),
            key_codec: Arc::new(key_codec),
            key_index,
            columns,
            key,
        })
    }
}

/// `schema` and `name` of a `format_type` text (`public.mood`,
/// `"My Schema"."a.b"`, `public.t(3)[]`), unquoted; `pg_catalog` when the
/// text names no schema.
fn split_type_name(sql_type: &str) -> (String, String) {
    let mut parts = vec![String::new()];
    let mut chars = sql_type.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                parts.last_mut().expect("one part").push('"');
            }
            '"' => quoted = !quoted,
            '.' if !quoted => parts.push(String::new()),
            '(' | '[' if !quoted => break,
            c => parts.last_mut().expect("one part").push(c),
        }
    }
    match parts.len() {
        1 => ("pg_catalog".to_owned(), parts.remove(0)),
        _ => {
            let name = parts.pop().expect("two parts");
            (parts.join("."), name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_are_split_and_unquoted() {
        assert_eq!(
            split_type_name("public.mood"),
            ("public".into(), "mood".into())
        );
        assert_eq!(
            split_type_name(r#""My ""S"""."a.b"[]"#),
            (r#"My "S""#.into(), "a.b".into())
        );
        assert_eq!(split_type_name("s.t(3)"), ("s".into(), "t".into()));
        assert_eq!(
            split_type_name("integer"),
            ("pg_catalog".into(), "integer".into())
        );
    }

    fn shape(columns: &[(&str, u32)], key: &[&str]) -> Shape {
        let columns: Vec<ShapeColumn> = columns
            .iter()
            .enumerate()
            .map(|(i, (n, oid))| ShapeColumn {
                name: (*n).into(),
                attnum: i as i32 + 1,
                type_oid: i64::from(*oid),
                typmod: -1,
                sql_type: ColumnType::builtin(*oid, -1).unwrap().sql_type().to_owned(),
                not_null: false,
            })
            .collect();
        let specs: Vec<ColumnSpec> = columns
            .iter()
            .map(|c| {
                ColumnSpec::new(
                    c.name.clone(),
                    ColumnType::builtin(c.type_oid as u32, -1).unwrap(),
                    c.not_null,
                )
            })
            .collect();
        let key_index: Vec<usize> = key
            .iter()
            .map(|k| columns.iter().position(|c| c.name == *k).unwrap())
            .collect();
        Shape {
            id: 1,
            relid: 1,
            table_name: "public.t".into(),
            key_codec: Arc::new(RowCodec::new(
                key_index.iter().map(|&i| specs[i].clone()).collect(),
            )),
            row: Arc::new(RowCodec::new(specs)),
            key: key.iter().map(|k| (*k).to_owned()).collect(),
            key_index,
            columns,
        }
    }

    #[test]
    fn a_row_and_its_key_are_decoded_from_record_text() {
        let s = shape(&[("a", 25), ("id", 23), ("j", 114)], &["id"]);
        let image = s.decode(r#"("x ""y""",7,"{""a"":""\\u0000""}")"#).unwrap();
        assert_eq!(
            String::from_utf8(image.row).unwrap(),
            r#"{"a":"x \"y\"","id":7,"j":"{\"a\":\"\\u0000\"}"}"#
        );
        assert_eq!(String::from_utf8(image.key).unwrap(), r#"{"id":7}"#);
        assert!(s.decode("(1,2)").is_err(), "a row of another shape");
    }
}
