//! Types that are not built in, read once from the catalog.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sqlx::{Acquire, PgConnection, Postgres};

use super::types::{builtin, format_builtin, ColumnType, Oid, PgType, TypeKind};
use super::CodecError;

/// Resolves type OIDs to [`PgType`]s: built-in types from the static table,
/// every other type once from `pg_catalog.pg_type` (with what it rests on:
/// a domain's base type, an array's element type), then from memory.
///
/// The catalog query reads only catalogs, schema-qualified, and calls only
/// `pg_catalog.format_type` (whose typmod output functions are C functions a
/// superuser installed): no user code runs.
///
/// pgoutput's Type messages name user types by schema and name; give them
/// to [`TypeCache::note_type`] so a type dropped since the change was
/// written still resolves (as its text, [`TypeKind::Other`]).
#[derive(Debug, Default)]
pub struct TypeCache {
    types: Mutex<HashMap<Oid, Arc<PgType>>>,
    /// Schema and name from pgoutput Type messages.
    noted: Mutex<HashMap<Oid, (String, String)>>,
    /// `format_type(oid, typmod)` of non-built-in types with a typmod.
    formats: Mutex<HashMap<(Oid, i32), String>>,
}

/// One row of the catalog query.
#[derive(sqlx::FromRow)]
struct TypeRow {
    oid: i64,
    schema: String,
    name: String,
    typtype: String,
    elem: i64,
    delim: String,
    base: i64,
    true_array: bool,
    subtype: i64,
    sql_name: String,
}

/// The types `$1` names and every type they rest on (element and base
/// types, recursively).
const TYPES_SQL: &str = r#"
with recursive wanted(oid) as (
    select w.oid from pg_catalog.unnest($1::pg_catalog.oid[]) as w(oid)
    union
    select d.dep
    from wanted
    join pg_catalog.pg_type t on t.oid operator(pg_catalog.=) wanted.oid
    cross join lateral (values (t.typelem), (t.typbasetype)) as d(dep)
    where d.dep operator(pg_catalog.<>) 0
)
select t.oid::pg_catalog.int8 as oid,
       n.nspname::pg_catalog.text as schema,
       t.typname::pg_catalog.text as name,
       t.typtype::pg_catalog.text as typtype,
       t.typelem::pg_catalog.int8 as elem,
       t.typdelim::pg_catalog.text as delim,
       t.typbasetype::pg_catalog.int8 as base,
       (t.typelem operator(pg_catalog.<>) 0
        and t.typsubscript operator(pg_catalog.=) 'pg_catalog.array_subscript_handler'::pg_catalog.regproc)
         as true_array,
       coalesce(r.rngsubtype, 0)::pg_catalog.int8 as subtype,
       pg_catalog.format_type(t.oid, -1) as sql_name
from wanted
join pg_catalog.pg_type t on t.oid operator(pg_catalog.=) wanted.oid
join pg_catalog.pg_namespace n on n.oid operator(pg_catalog.=) t.typnamespace
left join pg_catalog.pg_range r on r.rngtypid operator(pg_catalog.=) t.oid
limit 10000
"#;

/// `format_type` of each (oid, typmod) pair.
const FORMATS_SQL: &str = r#"
select pg_catalog.format_type(p.oid, p.typmod)
from rows from (pg_catalog.unnest($1::pg_catalog.oid[]), pg_catalog.unnest($2::pg_catalog.int4[]))
     with ordinality as p(oid, typmod, n)
order by p.n
"#;

impl TypeCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The type `oid` if it is built in or already resolved.
    pub fn get(&self, oid: Oid) -> Option<Arc<PgType>> {
        builtin(oid).or_else(|| self.lock_types().get(&oid).cloned())
    }

    /// Remembers a pgoutput Type message: `oid` is `schema`.`name`. Used
    /// for a type the catalog no longer has; a type resolved under another
    /// name (renamed since) is forgotten, to be resolved afresh.
    pub fn note_type(&self, oid: Oid, schema: &str, name: &str) {
        self.noted
            .lock()
            .expect("never poisoned")
            .insert(oid, (schema.to_owned(), name.to_owned()));
        let renamed = self
            .lock_types()
            .get(&oid)
            .is_some_and(|t| t.schema != schema || t.name != name);
        if renamed {
            self.forget(oid);
        }
    }

    /// Forgets what was resolved of `oid` (and of the types resting on it
    /// directly: its domains and array), so the next use reads the catalog
    /// again, as after `ALTER TYPE ... RENAME`.
    pub fn forget(&self, oid: Oid) {
        self.lock_types().retain(|&o, t| {
            let rests_on = match &t.kind {
                TypeKind::Domain { base } => base.oid == oid,
                TypeKind::Array { elem, .. } => elem.oid == oid,
                _ => false,
            };
            o != oid && !rests_on
        });
        self.formats
            .lock()
            .expect("never poisoned")
            .retain(|&(o, _), _| o != oid);
    }

    fn lock_types(&self) -> std::sync::MutexGuard<'_, HashMap<Oid, Arc<PgType>>> {
        self.types.lock().expect("never poisoned")
    }

    /// Resolves every type of `oids` not yet known, in one catalog query.
    ///
    /// Fails on a catalog error, or when a type is neither in the catalog
    /// nor noted from a pgoutput Type message.
    pub async fn resolve<'c, A>(&self, conn: A, oids: &[Oid]) -> Result<(), CodecError>
    where
        A: Acquire<'c, Database = Postgres>,
    {
        let Some(&first) = oids.iter().find(|&&o| self.get(o).is_none()) else {
            return Ok(());
        };
        let mut conn = conn
            .acquire()
            .await
            .map_err(|source| CodecError::Catalog { oid: first, source })?;
        self.resolve_on(&mut conn, oids).await
    }

    /// [`TypeCache::resolve`] on a connection. Not generic, so a future
    /// that awaits it stays `Send` (a generic `Acquire` argument makes the
    /// compiler ask for it under every lifetime).
    ///
    /// Fails as [`TypeCache::resolve`] does.
    pub async fn resolve_on(
        &self,
        conn: &mut PgConnection,
        oids: &[Oid],
    ) -> Result<(), CodecError> {
        let missing: Vec<Oid> = oids
            .iter()
            .copied()
            .filter(|&o| self.get(o).is_none())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = missing.iter().map(|&o| i64::from(o)).collect();
        let rows: Vec<TypeRow> = sqlx::query_as(TYPES_SQL)
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await
            .map_err(|source| CodecError::Catalog {
                oid: missing[0],
                source,
            })?;
        let rows: HashMap<Oid, TypeRow> = rows
            .into_iter()
            .filter_map(|r| Some((Oid::try_from(r.oid).ok()?, r)))
            .collect();
        for oid in missing {
            self.build(oid, &rows, 0)?;
        }
        Ok(())
    }

    /// Builds (and caches) `oid` from the rows of the catalog query.
    fn build(
        &self,
        oid: Oid,
        rows: &HashMap<Oid, TypeRow>,
        depth: usize,
    ) -> Result<Arc<PgType>, CodecError> {
        if let Some(t) = self.get(oid) {
            return Ok(t);
        }
        let Some(row) = rows.get(&oid) else {
            let noted = self
                .noted
                .lock()
                .expect("never poisoned")
                .get(&oid)
                .cloned();
            let Some((schema, name)) = noted else {
                return Err(CodecError::UnknownType { oid });
            };
            let t = Arc::new(PgType {
                oid,
                sql_name: format!("{}.{}", quote_if_needed(&schema), quote_if_needed(&name)),
                schema,
                name,
                kind: TypeKind::Other,
            });
            self.lock_types().insert(oid, t.clone());
            return Ok(t);
        };
        if depth > 16 {
            return Err(CodecError::UnknownType { oid });
        }
        let dep = |o: i64| -> Result<Arc<PgType>, CodecError> {
            let o = Oid::try_from(o).map_err(|_| CodecError::UnknownType { oid })?;
            self.build(o, rows, depth + 1)
        };
        let kind = match row.typtype.as_str() {
            "d" => {
                let base = dep(row.base)?;
                let base = match &base.kind {
                    TypeKind::Domain { base } => base.clone(),
                    _ => base,
                };
                TypeKind::Domain { base }
            }
            "e" => TypeKind::Enum,
            "c" => TypeKind::Composite,
            "r" => TypeKind::Range {
                subtype: Oid::try_from(row.subtype).unwrap_or(0),
            },
            "b" if row.true_array => {
                let elem = dep(row.elem)?;
                let delimiter = Oid::try_from(row.elem)
                    .ok()
                    .and_then(|e| rows.get(&e))
                    .and_then(|e| e.delim.bytes().next())
                    .unwrap_or(b',');
                TypeKind::Array { elem, delimiter }
            }
            _ => TypeKind::Other,
        };
        let t = Arc::new(PgType {
            oid,
            schema: row.schema.clone(),
            name: row.name.clone(),
            sql_name: row.sql_name.clone(),
            kind,
        });
        self.lock_types().insert(oid, t.clone());
        Ok(t)
    }

    /// The [`ColumnType`] of each (oid, typmod), resolving what is not yet
    /// known in at most two catalog queries.
    ///
    /// Fails as [`TypeCache::resolve`] does.
    pub async fn column_types<'c, A>(
        &self,
        conn: A,
        columns: &[(Oid, i32)],
    ) -> Result<Vec<ColumnType>, CodecError>
    where
        A: Acquire<'c, Database = Postgres>,
    {
        let mut conn = conn.acquire().await.map_err(|source| CodecError::Catalog {
            oid: columns.first().map_or(0, |c| c.0),
            source,
        })?;
        self.column_types_on(&mut conn, columns).await
    }

    /// [`TypeCache::column_types`] on a connection, `Send` for the same
    /// reason as [`TypeCache::resolve_on`].
    ///
    /// Fails as [`TypeCache::resolve`] does.
    pub async fn column_types_on(
        &self,
        conn: &mut PgConnection,
        columns: &[(Oid, i32)],
    ) -> Result<Vec<ColumnType>, CodecError> {
        let oids: Vec<Oid> = columns.iter().map(|c| c.0).collect();
        self.resolve_on(&mut *conn, &oids).await?;
        // Non-built-in types with a typmod: only the server can print them.
        let unknown: Vec<(Oid, i32)> = {
            let formats = self.formats.lock().expect("never poisoned");
            columns
                .iter()
                .copied()
                .filter(|&(o, m)| m >= 0 && builtin(o).is_none() && !formats.contains_key(&(o, m)))
                .collect()
        };
        if !unknown.is_empty() {
            let ids: Vec<i64> = unknown.iter().map(|c| i64::from(c.0)).collect();
            let mods: Vec<i32> = unknown.iter().map(|c| c.1).collect();
            let names: Vec<Option<String>> = sqlx::query_scalar(FORMATS_SQL)
                .bind(&ids)
                .bind(&mods)
                .fetch_all(&mut *conn)
                .await
                .map_err(|source| CodecError::Catalog {
                    oid: unknown[0].0,
                    source,
                })?;
            let mut formats = self.formats.lock().expect("never poisoned");
            for (key, name) in unknown.into_iter().zip(names) {
                if let Some(name) = name {
                    formats.insert(key, name);
                }
            }
        }
        columns
            .iter()
            .map(|&(oid, typmod)| {
                self.column_type_cached(oid, typmod)
                    .ok_or(CodecError::UnknownType { oid })
            })
            .collect()
    }

    /// [`TypeCache::column_types`] of one column.
    ///
    /// Fails as [`TypeCache::resolve`] does.
    pub async fn column_type<'c, A>(
        &self,
        conn: A,
        oid: Oid,
        typmod: i32,
    ) -> Result<ColumnType, CodecError>
    where
        A: Acquire<'c, Database = Postgres>,
    {
        let mut v = self.column_types(conn, &[(oid, typmod)]).await?;
        Ok(v.remove(0))
    }

    /// The [`ColumnType`] of (oid, typmod) without a query: `None` unless
    /// the type is built in or resolved (and, for a non-built-in type with
    /// a typmod, its `format_type` text known).
    pub fn column_type_cached(&self, oid: Oid, typmod: i32) -> Option<ColumnType> {
        let ty = self.get(oid)?;
        let sql = if ty.is_builtin() {
            format_builtin(&ty, typmod)
        } else if typmod < 0 {
            ty.sql_name.clone()
        } else {
            match self
                .formats
                .lock()
                .expect("never poisoned")
                .get(&(oid, typmod))
            {
                Some(s) => s.clone(),
                // A dropped type: its name and the typmod as printed for
                // types without a typmod output function.
                None if matches!(ty.kind, TypeKind::Other) && self.noted_has(oid) => {
                    format!("{}({typmod})", ty.sql_name)
                }
                None => return None,
            }
        };
        Some(ColumnType::new(ty, typmod, sql))
    }

    fn noted_has(&self, oid: Oid) -> bool {
        self.noted
            .lock()
            .expect("never poisoned")
            .contains_key(&oid)
    }
}

/// A name as `quote_identifier` writes it, for types known only by a
/// pgoutput Type message: bare when it is lower-case letters, digits and
/// `_` (a reserved word is not detected), quoted otherwise.
fn quote_if_needed(name: &str) -> String {
    let plain = name
        .bytes()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == b'_')
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_');
    if plain {
        name.to_owned()
    } else {
        crate::pg::quote_ident(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_types_need_no_query() {
        let cache = TypeCache::new();
        let t = cache.column_type_cached(1015, 14).unwrap();
        assert_eq!(t.sql_type(), "character varying(10)[]");
        assert!(cache.column_type_cached(70000, -1).is_none());
    }

    #[test]
    fn types_known_from_type_messages_are_text() {
        let cache = TypeCache::new();
        cache.note_type(70000, "My Schema", "mood");
        let rows = HashMap::new();
        let t = cache.build(70000, &rows, 0).unwrap();
        assert_eq!(t.kind, TypeKind::Other);
        assert_eq!(t.sql_name, "\"My Schema\".mood");
        assert!(matches!(
            cache.build(70001, &rows, 0),
            Err(CodecError::UnknownType { oid: 70001 })
        ));
        // Renamed: resolved afresh.
        cache.note_type(70000, "My Schema", "feeling");
        assert!(cache.get(70000).is_none());
        assert_eq!(
            cache.build(70000, &rows, 0).unwrap().sql_name,
            "\"My Schema\".feeling"
        );
        cache.forget(70000);
        assert!(cache.get(70000).is_none());
    }
}
