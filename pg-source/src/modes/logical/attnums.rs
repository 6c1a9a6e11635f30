//! Which column of the table (its `attnum`) each column of a `Relation`
//! message is, once the catalog may have changed since the change the
//! message describes was written.
//!
//! A Relation message names a table's columns as they were when the change
//! was written (pgoutput reads the catalog as of the change's place in the
//! WAL), in attnum order, but it carries no attnums. Nor does it say which
//! columns form the primary key: with replica identity full, which logical
//! capture requires, pgoutput flags every column as part of the key. The
//! key is therefore the catalog's, whose columns are known by attnum. While
//! the catalog is the one the change was written under, names find them.
//! Once it was changed after the change (pg-source was stopped across an
//! `ALTER TABLE`, and the change was still unread), names may no longer
//! do: a key column renamed is not found at all, and two columns that
//! swapped names would key the change by the wrong one, silently.
//!
//! What is taken as proven, and why:
//!
//! - Attnums are never reused. A dropped column keeps its `pg_attribute` row
//!   (`attisdropped`); an added one takes the next attnum. So the message's
//!   columns are, in their order, some of the attnums the table has now,
//!   dropped ones included.
//! - A catalog row is *settled* when the transaction that wrote it (its
//!   `xmin`) precedes the slot's `catalog_xmin`. Every transaction before
//!   that id had ended before the place in the WAL from which the slot
//!   decodes, and so before every change the stream still sends; no later
//!   transaction replaced the row (it is the current one). A change still
//!   sent was written under a lock on the table (`ROW EXCLUSIVE` at least)
//!   held to its transaction's end, and the `ALTER TABLE` that wrote the
//!   row held `ACCESS EXCLUSIVE` to its own: the two cannot overlap, so the
//!   row was in place before the change. So the row is what the catalog
//!   held when the change was written.
//! - Which rows are not settled is told by their `xmin` lying in
//!   [`catalog_xmin`, `next`), `next` being the first id not yet assigned,
//!   read after the rows (so every row read was written below it). A row
//!   whose id is outside that range is older than `catalog_xmin`: a frozen
//!   row keeps its `xmin` (only a flag says it is frozen), which may then
//!   look newer than `catalog_xmin` in the circular order of ids, but it
//!   can never lie in the range of ids assigned since.
//! - A settled live column had its name and type then. The message's
//!   column of that name is it (names are unique among live columns), and
//!   must have its type; with no column of that name, it was not sent (a
//!   generated column, say). A settled dropped column was dropped already,
//!   and is not among the message's columns.
//! - Between two columns so placed (and before the first, and after the
//!   last), the message's columns are some of the unsettled attnums there,
//!   in order. As many of them as unsettled attnums: each is placed. None:
//!   no attnum there was sent. Otherwise it is not known which is which.
//!
//! Nothing else is taken as proof: not a name or a type of an unsettled
//! column (it may have been renamed or retyped since), nor a position
//! alone. A key column not placed so cannot key the change: the relation
//! is refused, and its changes until the table is described again go to
//! the dead-letter topic (see `relation()` in the mode).

use sqlx::PgConnection;
use tidemark_common::codec::Oid;

use crate::pgoutput::RelationColumn;

/// A `pg_attribute` row of a table (attnum above 0, dropped ones too).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(super) struct Attribute {
    pub attnum: i32,
    pub dropped: bool,
    pub name: String,
    pub type_oid: i64,
    pub typmod: i32,
    /// The transaction that wrote the row (32-bit).
    pub xmin: i64,
}

/// Where a table's attnum stands among a Relation message's columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    /// The message's column at this index.
    Sent(usize),
    /// Not among the message's columns (dropped, added after the change,
    /// or not sent).
    NotSent,
    /// Not known.
    Unknown,
}

/// Every column of the table, in attnum order, dropped ones too.
const ATTRIBUTES_SQL: &str = r#"
select a.attnum::pg_catalog.int4 as attnum, a.attisdropped as dropped,
       a.attname::pg_catalog.text as name, a.atttypid::pg_catalog.int8 as type_oid,
       a.atttypmod as typmod, a.xmin::pg_catalog.text::pg_catalog.int8 as xmin
from pg_catalog.pg_attribute a
where a.attrelid operator(pg_catalog.=) $1::pg_catalog.oid and a.attnum operator(pg_catalog.>) 0
order by a.attnum
limit 1600
"#;

/// The ids of the transactions whose catalog rows are not settled: from
/// the slot's `catalog_xmin` up to, not including, `next` (see the module
/// docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Unsettled {
    pub catalog_xmin: u32,
    pub next: u32,
}

/// Reads the slot's `catalog_xmin`, then the table's columns, dropped ones
/// too, then the next transaction id (the slot's id first: it only moves
/// forward, so rows written after it was read are at worst taken as
/// unsettled; the next id last, so every row read was written below it).
/// `None` for the slot without a `catalog_xmin`: then no row is settled.
///
/// Fails on a database error.
pub(super) async fn load(
    conn: &mut PgConnection,
    table: Oid,
    slot: &str,
) -> sqlx::Result<(Option<Unsettled>, Vec<Attribute>)> {
    let catalog_xmin: Option<i64> = sqlx::query_scalar(
        "select s.catalog_xmin::pg_catalog.text::pg_catalog.int8 from pg_catalog.pg_replication_slots s
          where s.slot_name operator(pg_catalog.=) $1",
    )
    .bind(slot)
    .fetch_optional(&mut *conn)
    .await?
    .flatten();
    let attributes = sqlx::query_as(ATTRIBUTES_SQL)
        .bind(i64::from(table))
        .fetch_all(&mut *conn)
        .await?;
    let next: i64 = sqlx::query_scalar(
        "select (pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::pg_catalog.text::pg_catalog.int8 operator(pg_catalog.%) 4294967296)",
    )
    .fetch_one(&mut *conn)
    .await?;
    let unsettled = catalog_xmin.map(|c| Unsettled {
        catalog_xmin: c as u32,
        next: next as u32,
    });
    Ok((unsettled, attributes))
}

/// Whether a catalog row written by `xmin` was the catalog's at every
/// change the slot still sends (see the module docs).
fn settled(xmin: u32, unsettled: Option<Unsettled>) -> bool {
    // The bootstrap (1) and frozen (2) ids precede every normal one.
    const FIRST_NORMAL: u32 = 3;
    xmin < FIRST_NORMAL
        || unsettled.is_some_and(|u| {
            u.catalog_xmin >= FIRST_NORMAL
                && xmin.wrapping_sub(u.catalog_xmin) >= u.next.wrapping_sub(u.catalog_xmin)
        })
}

/// The place of each of `attributes` (in attnum order) among the message's
/// columns `sent`; `None` when they contradict each other (a settled
/// column sent with another type, or settled columns sent out of order):
/// then nothing is known.
pub(super) fn places(
    sent: &[RelationColumn],
    attributes: &[Attribute],
    catalog_xmin: Option<Unsettled>,
) -> Option<Vec<Place>> {
    let mut out = vec![Place::Unknown; attributes.len()];
    // (attribute index, sent index) of the settled live columns sent.
    let mut pins = Vec::new();
    for (i, a) in attributes.iter().enumerate() {
        if !settled(a.xmin as u32, catalog_xmin) {
            continue;
        }
        if a.dropped {
            out[i] = Place::NotSent;
            continue;
        }
        match sent.iter().position(|c| c.name == a.name) {
            Some(j) => {
                let c = &sent[j];
                if i64::from(c.type_oid) != a.type_oid || c.typmod != a.typmod {
                    return None;
                }
                out[i] = Place::Sent(j);
                pins.push((i, j));
            }
            None => out[i] = Place::NotSent,
        }
    }
    let (mut attr_from, mut sent_from) = (0, 0);
    for (pin_attr, pin_sent) in pins
        .into_iter()
        .chain(std::iter::once((attributes.len(), sent.len())))
    {
        if pin_sent < sent_from {
            return None;
        }
        let open: Vec<usize> = (attr_from..pin_attr)
            .filter(|&i| out[i] == Place::Unknown)
            .collect();
        let between = pin_sent - sent_from;
        if between == open.len() {
            for (k, i) in open.into_iter().enumerate() {
                out[i] = Place::Sent(sent_from + k);
            }
        } else if between == 0 {
            for i in open {
                out[i] = Place::NotSent;
            }
        } else if between > open.len() {
            return None;
        }
        (attr_from, sent_from) = (pin_attr + 1, pin_sent + 1);
    }
    Some(out)
}

/// The attnum of each of the message's `n` columns that `places` (of
/// `attributes`) proves; `None` where it proves none.
pub(super) fn attnums_of_sent(
    n: usize,
    attributes: &[Attribute],
    places: Option<&[Place]>,
) -> Vec<Option<i32>> {
    let mut out = vec![None; n];
    for (a, p) in attributes.iter().zip(places.unwrap_or_default()) {
        if let Place::Sent(j) = *p {
            if let Some(slot) = out.get_mut(j) {
                *slot = Some(a.attnum);
            }
        }
    }
    out
}

/// The attnum of each column of a Relation message `sent` that the catalog
/// (`attributes`, `catalog_xmin`) proves, as [`places`] tells them.
pub(super) fn sent_attnums(
    sent: &[RelationColumn],
    attributes: &[Attribute],
    catalog_xmin: Option<Unsettled>,
) -> Vec<Option<i32>> {
    let places = places(sent, attributes, catalog_xmin);
    attnums_of_sent(sent.len(), attributes, places.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INT4: u32 = 23;
    const TEXT: u32 = 25;
    /// The slot's catalog_xmin in these tests, 150, and the next id, 300:
    /// rows by 100 are settled, rows by 200 are not.
    const SLOT: Option<Unsettled> = Some(Unsettled {
        catalog_xmin: 150,
        next: 300,
    });

    fn sent(columns: &[(&str, u32)]) -> Vec<RelationColumn> {
        columns
            .iter()
            .map(|&(name, type_oid)| RelationColumn {
                key: true,
                name: name.to_owned(),
                type_oid,
                typmod: -1,
            })
            .collect()
    }

    /// `(name, type, xmin)`; a `None` name is a dropped column.
    fn attrs(columns: &[(Option<&str>, u32, i64)]) -> Vec<Attribute> {
        columns
            .iter()
            .enumerate()
            .map(|(i, &(name, type_oid, xmin))| Attribute {
                attnum: i as i32 + 1,
                dropped: name.is_none(),
                name: name.map_or_else(
                    || format!("........pg.dropped.{}........", i + 1),
                    str::to_owned,
                ),
                type_oid: if name.is_some() { type_oid.into() } else { 0 },
                typmod: -1,
                xmin,
            })
            .collect()
    }

    #[test]
    fn a_renamed_key_column_is_placed_by_its_settled_neighbour() {
        // (id, v) sent; id renamed to ident since, v untouched.
        let s = sent(&[("id", INT4), ("v", TEXT)]);
        let a = attrs(&[(Some("ident"), INT4, 200), (Some("v"), TEXT, 100)]);
        assert_eq!(
            places(&s, &a, SLOT),
            Some(vec![Place::Sent(0), Place::Sent(1)])
        );
    }

    #[test]
    fn swapped_names_are_placed_by_position_not_by_name() {
        // (id, v) sent; then id -> x, v -> id, x -> v: both rows unsettled,
        // and as many as the columns sent.
        let s = sent(&[("id", INT4), ("v", INT4)]);
        let a = attrs(&[(Some("v"), INT4, 200), (Some("id"), INT4, 200)]);
        assert_eq!(
            places(&s, &a, SLOT),
            Some(vec![Place::Sent(0), Place::Sent(1)])
        );
    }

    #[test]
    fn added_and_dropped_columns_around_settled_ones() {
        // (a, id, b, v) sent; since: a dropped, id renamed, w added.
        let s = sent(&[("a", TEXT), ("id", INT4), ("b", TEXT), ("v", TEXT)]);
        let a = attrs(&[
            (None, 0, 200),
            (Some("ident"), INT4, 200),
            (Some("b"), TEXT, 100),
            (Some("v"), TEXT, 100),
            (Some("w"), TEXT, 200),
        ]);
        assert_eq!(
            places(&s, &a, SLOT),
            Some(vec![
                Place::Sent(0),
                Place::Sent(1),
                Place::Sent(2),
                Place::Sent(3),
                Place::NotSent
            ])
        );
    }

    #[test]
    fn too_many_unsettled_columns_are_not_guessed() {
        // (id, v) sent; every row unsettled and a column added since: id
        // may be attnum 1 or 2 (2 if attnum 1 was a generated column then).
        let s = sent(&[("id", INT4), ("v", TEXT)]);
        let a = attrs(&[
            (Some("ident"), INT4, 200),
            (Some("v"), TEXT, 200),
            (Some("w"), TEXT, 200),
        ]);
        assert_eq!(places(&s, &a, SLOT), Some(vec![Place::Unknown; 3]));
        // With no slot (no catalog_xmin), nothing is settled.
        let a = attrs(&[(Some("ident"), INT4, 100), (Some("v"), TEXT, 100)]);
        assert_eq!(
            places(&s, &a, None),
            Some(vec![Place::Sent(0), Place::Sent(1)])
        );
        let a = attrs(&[
            (Some("ident"), INT4, 100),
            (Some("v"), TEXT, 100),
            (Some("w"), TEXT, 100),
        ]);
        assert_eq!(places(&s, &a, None), Some(vec![Place::Unknown; 3]));
    }

    #[test]
    fn settled_columns_not_sent_and_contradictions() {
        // A settled column the message does not name was not sent.
        let s = sent(&[("id", INT4)]);
        let a = attrs(&[(Some("id"), INT4, 100), (Some("g"), TEXT, 2)]);
        assert_eq!(
            places(&s, &a, SLOT),
            Some(vec![Place::Sent(0), Place::NotSent])
        );
        // A settled column sent with another type, or out of order.
        let a = attrs(&[(Some("id"), TEXT, 100)]);
        assert_eq!(places(&s, &a, SLOT), None);
        let s = sent(&[("v", TEXT), ("id", INT4)]);
        let a = attrs(&[(Some("id"), INT4, 100), (Some("v"), TEXT, 100)]);
        assert_eq!(places(&s, &a, SLOT), None);
        // More columns sent than attnums that can hold them.
        let s = sent(&[("x", INT4), ("id", INT4)]);
        let a = attrs(&[(Some("id"), INT4, 100)]);
        assert_eq!(places(&s, &a, SLOT), None);
    }

    #[test]
    fn settled_is_outside_the_ids_assigned_since_catalog_xmin() {
        let u = |catalog_xmin, next| Some(Unsettled { catalog_xmin, next });
        assert!(settled(2, None));
        assert!(!settled(100, None));
        assert!(settled(100, u(150, 300)));
        assert!(!settled(150, u(150, 300)));
        assert!(!settled(299, u(150, 300)));
        // A frozen row keeps its old xmin, which may look newer than
        // catalog_xmin in the circular order: it is older all the same.
        assert!(settled(150 + (1 << 31) + 5, u(150, 300)));
        // Across the wrap: 4_000_000_000 came before 10.
        assert!(settled(4_000_000_000, u(10, 20)));
        assert!(!settled(10, u(4_000_000_000, 20)));
        assert!(!settled(4_000_000_001, u(4_000_000_000, 20)));
        assert!(settled(3_999_999_999, u(4_000_000_000, 20)));
    }
}
