//! Applying units to the target: staging by `COPY`, then a set-based apply
//! in one transaction with the position.
//!
//! Every change read is copied into a staging table of its target table
//! (`pg_temp.tidemark_stage_<n>`, temporary, so only this session sees it),
//! whose columns have the target's own types: values reach Postgres as text
//! and go through the types' input functions, never through a cast. Each
//! staged row carries its unit (`m_co`), its place in the unit (`m_ord`), its
//! operation and where it came from. A full buffer is sent on a task of its
//! own, which holds the connection until its `COPY` ends, so Postgres takes
//! one chunk in while pg-replay reads and writes the next; every other
//! statement waits for it first.
//!
//! A run of whole units (see [`crate::units`]) is applied in one target
//! transaction, together with the position:
//!
//! 1. per table, the net effect per key: the last event's row, and the first
//!    event's operation, which says what the target must hold before (a
//!    create or snapshot read: the key is absent; an update or delete: it is
//!    present); keys compared with the primary key's operator class;
//! 2. inserts and updates, tables in foreign-key order parents first, then
//!    deletes children first; a `TRUNCATE` in the run empties the table
//!    first and only the events after it count;
//! 3. each statement's row count must be what the net effect says; a key
//!    created and deleted within the run must be absent.
//!
//! If a count is off or a constraint fails, the transaction is rolled back
//! and the run examined: a target row that disagrees with the archive is a
//! conflict, reported with table, key and archive position (with
//! `--on-conflict upsert` the archive wins instead). Otherwise (a unique or
//! foreign key that the net effect's order trips over, a cycle of foreign
//! keys) the run is applied again event by event in commit order, which is
//! the order the source applied them in.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;
use sqlx::{Connection as _, PgConnection, Row as _};
use tidemark_common::pg::{quote_ident, TableName};

use crate::archive::{Origin, StreamKind, StreamPos, Streams};
use crate::position::{self, Advance};
use crate::record::{Op, Row, RowSchema};
use crate::target::{self, TargetTable};
use crate::values::{copy_escape, Fields, COPY_NULL};

/// Bytes of `COPY` data a table buffers before it is sent.
const COPY_CHUNK: usize = 1 << 20;

/// `=`, `<=`, `<>` on Tidemark's own columns (int8, "char"), qualified.
const EQ: &str = "operator(pg_catalog.=)";
const LE: &str = "operator(pg_catalog.<=)";
const NE: &str = "operator(pg_catalog.<>)";
const GT: &str = "operator(pg_catalog.>)";

/// What a target row that disagrees with the archive leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OnConflict {
    /// Stop without applying the unit, naming table, key and position.
    #[default]
    Stop,
    /// The archive wins: a create of a key that exists or an update of one
    /// that does not writes the row; a delete of a missing key does nothing.
    Upsert,
}

/// What to do with the target tables' own triggers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum UserTriggers {
    /// Disable them within each apply transaction (needs ownership of the
    /// table): the archive already holds what they did at the source.
    #[default]
    Disable,
    /// Let them fire.
    Fire,
}

/// What a schema change recorded in the archive leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SchemaChanges {
    /// Stop before the first unit of the new shape (the units before it
    /// applied), saying what changed, so the same change can be made to the
    /// target by hand (with the DEFAULT or USING the source used).
    #[default]
    Stop,
    /// Make the change: add, drop and rename columns, and widen types; a
    /// type change that may alter values stops the replay as `stop` does.
    Apply,
}

/// Why a run was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The target disagrees with the archive, or a change fails, at a unit:
    /// the units before it can be applied on their own.
    #[error("{message}")]
    AtUnit {
        /// The unit that cannot be applied.
        commit_order: i64,
        /// What to tell the user.
        message: String,
    },
    /// Anything else (the connection, a query).
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Where an event came from, as staged.
#[derive(Debug, Clone, Copy)]
pub struct RowMeta {
    /// Its unit.
    pub commit_order: i64,
    /// Its place in the unit.
    pub total_order: i64,
    /// What it did.
    pub op: Op,
    /// Its stream.
    pub stream: u32,
    /// Its place in the stream.
    pub pos: StreamPos,
}

/// One mapped table: the target, its staging tables and what is staged.
#[derive(Debug)]
pub struct Stage {
    /// The archive's table.
    pub source: TableName,
    /// The table it is applied to.
    pub target: TargetTable,
    stage: String,
    net: String,
    /// Staging columns c1..cn: indexes into `target.columns`.
    cols: Vec<usize>,
    /// Per record schema (by id): each staging column's field schema.
    fields: HashMap<u64, Arc<Fields>>,
    /// For records without a schema: the field schemas the codec gives the
    /// target's column types; set (and the columns checked) at the first.
    schemaless: Option<Arc<Fields>>,
    /// Whether a record's columns have matched the target's: a record
    /// that differs after that is a schema change at the source.
    matched: bool,
    /// The source attnum of each column, by its name now, as the records
    /// matched so far gave it, and the source table it is of: what tells a
    /// renamed column from a dropped and an added one, and a column dropped
    /// and added again under its name from one left alone.
    attnums: KnownAttnums,
    copy_sql: String,
    buf: Vec<u8>,
    /// The units with rows staged (sent or buffered) and not applied.
    by_unit: UnitSet,
    /// TRUNCATEs staged and not applied: unit → last total_order.
    truncates: BTreeMap<i64, i64>,
    /// Units staged and not applied that hold incremental snapshot reads
    /// (`i`) of the table: upserts.
    reads: BTreeSet<i64>,
    /// Units staged and not applied in which the table's events are
    /// applied as upserts: the window of the incremental snapshot a
    /// `--from-snapshot` replay starts the table from (see
    /// [`Applier::set_lenient`]).
    lenient: BTreeSet<i64>,
    /// The role every statement that touches the target runs as, quoted:
    /// its owner, when that is not this session's role (see
    /// [`Applier::act_for`]).
    act_as: Option<String>,
}

impl Stage {
    fn key_cond(&self, left: &str, right: &str) -> String {
        self.target
            .key
            .iter()
            .zip(&self.target.key_eq)
            .map(|(&k, op)| {
                let j = self.stage_col(k);
                format!(
                    "{left}.{} {op} {right}.c{j}",
                    quote_ident(&self.target.columns[k].name)
                )
            })
            .collect::<Vec<_>>()
            .join(" and ")
    }

    /// The staging column (1-based) of target column `i`.
    fn stage_col(&self, i: usize) -> usize {
        self.cols
            .iter()
            .position(|&c| c == i)
            .expect("a data column")
            + 1
    }

    fn key_stage_cols(&self, alias: &str) -> Vec<String> {
        self.target
            .key
            .iter()
            .map(|&k| format!("{alias}.c{}", self.stage_col(k)))
            .collect()
    }

    /// `ORDER BY` over the key with the operator class's `<`.
    fn key_order(&self, alias: &str) -> String {
        self.key_stage_cols(alias)
            .iter()
            .zip(&self.target.key_lt)
            .map(|(c, lt)| format!("{c} using {lt}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn target_cols(&self) -> String {
        self.cols
            .iter()
            .map(|&i| quote_ident(&self.target.columns[i].name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn stage_list(&self, alias: &str) -> String {
        (1..=self.cols.len())
            .map(|j| format!("{alias}.c{j}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn overriding(&self) -> &'static str {
        if self
            .cols
            .iter()
            .any(|&i| self.target.columns[i].identity_always)
        {
            " overriding system value"
        } else {
            ""
        }
    }

    /// `set "a" = n.c2, ...` over the non-key columns; `None` when all
    /// columns are key columns.
    fn update_set(&self, alias: &str) -> Option<String> {
        let sets: Vec<String> = self
            .cols
            .iter()
            .enumerate()
            .filter(|(_, &i)| !self.target.is_key(i))
            .map(|(j, &i)| {
                format!(
                    "{} = {alias}.c{}",
                    quote_ident(&self.target.columns[i].name),
                    j + 1
                )
            })
            .collect();
        (!sets.is_empty()).then(|| sets.join(", "))
    }

    /// Upserts the net rows of the run (`n`) that `cond` picks into the
    /// target, by its primary key.
    fn upsert_net_sql(&self, cond: &str) -> String {
        format!(
            "insert into {t} ({cols}){ov} select {vals} from {net} n where {cond} \
             on conflict on constraint {pk} {action}",
            t = self.target.name.quoted(),
            cols = self.target_cols(),
            ov = self.overriding(),
            vals = self.stage_list("n"),
            net = self.net,
            pk = self.target.pk_constraint,
            action = self.upsert_action(),
        )
    }

    /// What an upsert does with a key that exists: set every non-key
    /// column from the archive's row.
    fn upsert_action(&self) -> String {
        let sets: Vec<String> = self
            .cols
            .iter()
            .filter(|&&c| !self.target.is_key(c))
            .map(|&c| {
                let name = quote_ident(&self.target.columns[c].name);
                format!("{name} = excluded.{name}")
            })
            .collect();
        if sets.is_empty() {
            "do nothing".to_owned()
        } else {
            format!("do update set {}", sets.join(", "))
        }
    }

    /// The key's text, `(1,x)`, by the key types' output functions.
    fn key_text_sql(&self, alias: &str) -> String {
        format!(
            "pg_catalog.textin(pg_catalog.record_out(row({})))",
            self.key_stage_cols(alias).join(", ")
        )
    }

    fn key_names(&self) -> String {
        self.target
            .key
            .iter()
            .map(|&k| self.target.columns[k].name.clone())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Checks that a row schema's fields are exactly the target's columns,
    /// and returns each staging column's field schema.
    fn field_schemas(&self, row: &RowSchema) -> anyhow::Result<Vec<Value>> {
        let names: BTreeSet<&str> = row.fields.iter().map(|f| f.name.as_str()).collect();
        self.check_columns(&names, Some(row))?;
        Ok(self
            .cols
            .iter()
            .map(|&i| {
                row.field(&self.target.columns[i].name)
                    .map_or(Value::Null, |f| f.schema.clone())
            })
            .collect())
    }

    /// Checks the archive's columns (`names`) against the target's.
    fn check_columns(&self, names: &BTreeSet<&str>, row: Option<&RowSchema>) -> anyhow::Result<()> {
        let target: BTreeSet<&str> = self
            .target
            .columns
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        let missing: Vec<&str> = self
            .cols
            .iter()
            .map(|&i| self.target.columns[i].name.as_str())
            .filter(|n| !names.contains(n))
            .collect();
        let extra: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !target.contains(n))
            .collect();
        if !missing.is_empty() || !extra.is_empty() {
            let mut why = Vec::new();
            if !extra.is_empty() {
                why.push(format!(
                    "the archive has columns the target lacks: {}",
                    extra.join(", ")
                ));
            }
            if !missing.is_empty() {
                why.push(format!(
                    "the target has columns the archive does not carry: {}",
                    missing.join(", ")
                ));
            }
            bail!(
                "the columns of target table {} do not match the archive's table {}: {}; \
                 make the target's columns the source's (or let pg-replay create the table: drop it, \
                 or map to a new one with --table {}=SCHEMA.NEW)",
                self.target.name,
                self.source,
                why.join("; "),
                self.source
            );
        }
        if let Some(row) = row {
            for &i in &self.cols {
                let col = &self.target.columns[i];
                let Some(want) = row.field(&col.name).and_then(|f| f.column_type()) else {
                    continue;
                };
                if want != col.type_sql {
                    bail!(
                        "column {} of target table {} is {}, but the archive's is {want}: values would change \
                         on the way in; alter the target column to {want}",
                        col.name,
                        self.target.name,
                        col.type_sql
                    );
                }
            }
        }
        Ok(())
    }
}

/// One change of a table's columns that the archive records (a record of
/// the table whose columns differ from the ones before).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DdlStep {
    /// A column the records now carry.
    Add {
        /// Its name.
        name: String,
        /// Its type, when the records say.
        ty: Option<String>,
    },
    /// A column they no longer carry.
    Drop {
        /// Its name.
        name: String,
    },
    /// A column at the same place, of the same type, under a new name.
    Rename {
        /// The old name.
        from: String,
        /// The new name.
        to: String,
    },
    /// Changes told by names alone where the records tell columns by
    /// attnum: which column is which is not proven, so none is made.
    Unproven {
        /// The changes names alone give, described.
        steps: String,
        /// The target's columns no record gave an attnum for.
        columns: String,
    },
    /// A column whose type changed.
    Retype {
        /// Its name.
        name: String,
        /// The type before.
        from: String,
        /// The type now.
        to: String,
    },
}

impl DdlStep {
    /// What changed, for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Add { name, ty } => format!(
                "column {name} ({}) added",
                ty.as_deref().unwrap_or("type not recorded")
            ),
            Self::Drop { name } => format!("column {name} dropped"),
            Self::Rename { from, to } => format!("column {from} renamed to {to}"),
            Self::Retype { name, from, to } => format!("column {name} changed from {from} to {to}"),
            Self::Unproven { steps, columns } => format!(
                "columns changed ({steps} by their names), but the records tell columns by attnum and none of them gave one for {columns}, so which column is which is not proven"
            ),
        }
    }

    /// The `alter table` clause that makes the change, or why pg-replay
    /// cannot make it exactly.
    fn clause(&self) -> Result<String, String> {
        match self {
            Self::Add { name, ty: Some(ty) } if target::is_plain_type_name(ty) => {
                Ok(format!("add column {} {ty}", quote_ident(name)))
            }
            Self::Add { name, .. } => Err(format!(
                "the records do not give a usable type for the new column {name}"
            )),
            Self::Drop { name } => Ok(format!("drop column {}", quote_ident(name))),
            Self::Rename { from, to } => Ok(format!(
                "rename column {} to {}",
                quote_ident(from),
                quote_ident(to)
            )),
            Self::Retype { name, from, to } if widens(from, to) && target::is_plain_type_name(to) => {
                Ok(format!("alter column {} type {to}", quote_ident(name)))
            }
            Self::Unproven { .. } => Err(format!(
                "{}: make the change to the target as the source made it, and run pg-replay again",
                self.describe()
            )),
            Self::Retype { name, from, to } => Err(format!(
                "column {name} changed from {from} to {to}, which does not keep every value as it was: \
                 the rows the archive has no later change of hold what the source's USING made of them, \
                 which the archive does not carry"
            )),
        }
    }
}

/// Whether every value of type `from` is the same value of type `to`
/// (a wider integer, a longer varchar, more numeric digits at the same
/// scale, text for varchar).
fn widens(from: &str, to: &str) -> bool {
    let ints = ["smallint", "integer", "bigint"];
    let rank = |t: &str| ints.iter().position(|i| *i == t);
    if let (Some(a), Some(b)) = (rank(from), rank(to)) {
        return a <= b;
    }
    if rank(from).is_some() && to == "numeric" {
        return true;
    }
    let modifier = |t: &str, base: &str| -> Option<Vec<u32>> {
        let rest = t.strip_prefix(base)?;
        if rest.is_empty() {
            return Some(Vec::new());
        }
        rest.strip_prefix('(')?
            .strip_suffix(')')?
            .split(',')
            .map(|n| n.trim().parse().ok())
            .collect()
    };
    match (modifier(from, "character varying"), to) {
        (Some(_), "text") => return true,
        (Some(a), _) => {
            if let Some(b) = modifier(to, "character varying") {
                return b.is_empty() || (!a.is_empty() && b[0] >= a[0]);
            }
        }
        _ => {}
    }
    if let (Some(a), Some(b)) = (modifier(from, "numeric"), modifier(to, "numeric")) {
        return b.is_empty()
            || (a.len() == 2 && b.len() == 2 && b[1] == a[1] && b[0] - b[1] >= a[0] - a[1]);
    }
    from == "real" && to == "double precision"
}

/// A target column as [`column_diff`] compares it: name, type, and the
/// source attnum the records gave it, if known.
pub type Current = (String, String, Option<i32>);

/// The source attnums of a target table's columns, by the columns' names
/// now, as the records matched so far gave them, and the source table
/// (`tidemark.table.oid`) they belong to.
///
/// Attnums are never reused within one table, but a table dropped and
/// created again under its name is another table, with another OID and
/// attnums counted again from 1: its attnum 2 may be the old table's
/// attnum 3, or a column the old one had dropped. So the attnums known are
/// of one OID, and a record of another OID is not paired with them. Built
/// again after a restart from the first record that matches the target.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KnownAttnums {
    by_name: HashMap<String, i32>,
    /// The source table the attnums are of, where the records said
    /// (records of archives before `tidemark.table.oid` do not).
    table_oid: Option<u32>,
}

impl KnownAttnums {
    /// The attnum known for column `name`.
    pub fn get(&self, name: &str) -> Option<i32> {
        self.by_name.get(name).copied()
    }

    /// `(old, new)` when `row` says a source table OID other than the one
    /// the attnums known are of: the source table was dropped and created
    /// again under its name, and the attnums known say nothing of its
    /// columns. `None` when either OID is not known (a record without one
    /// is paired as before there were any).
    pub fn created_again(&self, row: &RowSchema) -> Option<(u32, u32)> {
        match (self.table_oid, row.table_oid) {
            (Some(old), Some(new)) if old != new => Some((old, new)),
            _ => None,
        }
    }

    /// Learns the attnums of a record whose columns match the target. A
    /// record of another source table ([`KnownAttnums::created_again`])
    /// first forgets every attnum known, and that is returned (old and new
    /// OID). A field without an attnum (pg-source could not place it)
    /// keeps the one known for its name: the record is of the shape the
    /// target has, so the name is still that column's.
    pub fn learn(&mut self, row: &RowSchema) -> Option<(u32, u32)> {
        let again = self.created_again(row);
        if again.is_some() {
            self.by_name.clear();
        }
        if let Some(oid) = row.table_oid {
            self.table_oid = Some(oid);
        }
        for field in &row.fields {
            if let Some(a) = field.attnum() {
                self.by_name.insert(field.name.clone(), a);
            }
        }
        again
    }

    /// Follows `steps`, made to the target, whose columns are now
    /// `columns`: a rename moves its attnum to the new name; a column
    /// dropped or added is known by the attnum its next record gives, not
    /// by an old one of its name.
    fn follow<'a>(&mut self, steps: &[DdlStep], columns: impl Iterator<Item = &'a str> + Clone) {
        for step in steps {
            match step {
                DdlStep::Drop { name } | DdlStep::Add { name, .. } => {
                    self.by_name.remove(name);
                }
                DdlStep::Rename { from, to } => match self.by_name.remove(from) {
                    Some(a) => {
                        self.by_name.insert(to.clone(), a);
                    }
                    None => {
                        self.by_name.remove(to);
                    }
                },
                DdlStep::Retype { .. } | DdlStep::Unproven { .. } => {}
            }
        }
        self.by_name.retain(|n, _| columns.clone().any(|c| c == n));
    }
}

/// The changes that turn the `current` columns into the record's (`row`).
///
/// A column is the record's field of the same source attnum, where both
/// carry one (`tidemark.column.attnum`), whatever their names: a field
/// under a new name is a rename, and a field of the same name but another
/// attnum is a column dropped and added again (its old values gone). Where
/// either lacks an attnum, a column is the field of its name, and a single
/// column gone and a single one new, at the same place and of the same
/// type, is taken for a rename (names alone do not tell a rename from a
/// drop and an add). A column paired by attnum is renamed and retyped as
/// its field is (a retype that may alter values stops). Where the record
/// gives attnums, a target column with none known that would be dropped,
/// or renamed by its place, makes the change [`DdlStep::Unproven`].
pub fn column_diff(current: &[Current], row: &RowSchema) -> Vec<DdlStep> {
    let new: Vec<(&str, Option<&str>, Option<i32>)> = row
        .fields
        .iter()
        .map(|f| (f.name.as_str(), f.column_type(), f.attnum()))
        .collect();
    diff(current, &new)
}

/// [`column_diff`] by names alone, as for records without attnums: for a
/// record of a source table created again under its name, whose attnums
/// are not those of the columns the target has.
pub fn column_diff_by_name(current: &[Current], row: &RowSchema) -> Vec<DdlStep> {
    let current: Vec<Current> = current
        .iter()
        .map(|(n, t, _)| (n.clone(), t.clone(), None))
        .collect();
    let new: Vec<(&str, Option<&str>, Option<i32>)> = row
        .fields
        .iter()
        .map(|f| (f.name.as_str(), f.column_type(), None))
        .collect();
    diff(&current, &new)
}

fn diff(current: &[Current], new: &[(&str, Option<&str>, Option<i32>)]) -> Vec<DdlStep> {
    let same_type = |c: &Current, ty: Option<&str>| ty.is_none_or(|t| t == c.1);
    // pair[i]: the field that current column i is.
    let mut pair: Vec<Option<usize>> = vec![None; current.len()];
    let mut taken = vec![false; new.len()];
    // Two target columns known by one attnum: one of them is wrong.
    let mut twice = false;
    for (i, c) in current.iter().enumerate() {
        let Some(a) = c.2 else { continue };
        // The same column, whatever its name and type now: a rename, a
        // retype (which widens or stops), or both.
        if let Some(j) = new.iter().position(|f| f.2 == Some(a)) {
            if taken[j] {
                twice = true;
            } else {
                pair[i] = Some(j);
                taken[j] = true;
            }
        }
    }
    for (i, c) in current.iter().enumerate() {
        if pair[i].is_some() {
            continue;
        }
        let by_name = new.iter().enumerate().position(|(j, f)| {
            !taken[j] && f.0 == c.0 && (c.2.is_none() || f.2.is_none() || f.2 == c.2)
        });
        if let Some(j) = by_name {
            pair[i] = Some(j);
            taken[j] = true;
        }
    }
    let gone: Vec<usize> = (0..current.len()).filter(|&i| pair[i].is_none()).collect();
    let added: Vec<usize> = (0..new.len()).filter(|&j| !taken[j]).collect();
    let mut by_place = false;
    if let ([g], [a]) = (gone.as_slice(), added.as_slice()) {
        let unknown = current[*g].2.is_none() || new[*a].2.is_none();
        let free = !new.iter().any(|f| f.0 == current[*g].0);
        if *g == *a && unknown && free && same_type(&current[*g], new[*a].1) {
            pair[*g] = Some(*a);
            by_place = true;
        }
    }
    // Drops first, so that a name they free can be taken; then renames,
    // each after the one that frees its new name (a cycle of renames is
    // left in its order: the target refuses it, saying which name exists).
    let mut steps: Vec<DdlStep> = gone
        .iter()
        .filter(|&&i| pair[i].is_none())
        .map(|&i| DdlStep::Drop {
            name: current[i].0.clone(),
        })
        .collect();
    let mut renames: Vec<(String, String)> = current
        .iter()
        .zip(&pair)
        .filter_map(|(c, p)| {
            p.filter(|&j| new[j].0 != c.0)
                .map(|j| (c.0.clone(), new[j].0.to_owned()))
        })
        .collect();
    while !renames.is_empty() {
        let free = renames
            .iter()
            .position(|(_, to)| !renames.iter().any(|(from, _)| from == to))
            .unwrap_or(0);
        let (from, to) = renames.remove(free);
        steps.push(DdlStep::Rename { from, to });
    }
    for (j, f) in new.iter().enumerate() {
        if !pair.contains(&Some(j)) {
            steps.push(DdlStep::Add {
                name: f.0.to_owned(),
                ty: f.1.map(str::to_owned),
            });
        }
    }
    for (i, c) in current.iter().enumerate() {
        let Some(j) = pair[i] else { continue };
        if let Some(ty) = new[j].1 {
            if ty != c.1 {
                steps.push(DdlStep::Retype {
                    name: new[j].0.to_owned(),
                    from: c.1.clone(),
                    to: ty.to_owned(),
                });
            }
        }
    }
    // The record tells its columns by attnum, but a column of the target
    // with none known is gone from it, or was renamed by its place: that is
    // no proof (its name may be another column's now), and a wrong drop or
    // rename would lose or move values.
    let attnums = new.iter().any(|f| f.2.is_some());
    let unknown_gone = (0..current.len()).any(|i| pair[i].is_none() && current[i].2.is_none());
    if attnums && (unknown_gone || by_place || twice) {
        let unknown: Vec<&str> = current
            .iter()
            .filter(|c| c.2.is_none())
            .map(|c| c.0.as_str())
            .collect();
        return vec![DdlStep::Unproven {
            steps: steps
                .iter()
                .map(DdlStep::describe)
                .collect::<Vec<_>>()
                .join(", "),
            columns: unknown.join(", "),
        }];
    }
    steps
}

/// The result of applying a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Changes applied (staged rows of the run).
    pub changes: u64,
    /// Whether it needed the event-by-event path.
    pub slow: bool,
}

/// The apply session: one connection, its staging tables and the mapping.
pub struct Applier {
    conn: Conn,
    /// The `COPY` of a full buffer, on a task of its own that holds the
    /// connection until it is done (see [`Applier::settle`]).
    in_flight: Option<InFlight>,
    /// An empty buffer with its capacity, to swap for one sent.
    spare: Vec<u8>,
    stages: Vec<Stage>,
    by_source: HashMap<TableName, usize>,
    mapping: Vec<(TableName, TableName)>,
    /// Only the mapped tables are replayed; other tables' events are skipped.
    pub only_mapped: bool,
    on_conflict: OnConflict,
    user_triggers: UserTriggers,
    /// Parent-first order of `stages`, and whether foreign keys form a cycle.
    order: Vec<usize>,
    cycle: bool,
    name: String,
    streams: Streams,
    /// The role the current transaction runs as (`SET LOCAL ROLE`), `None`
    /// for this session's own; reset at each `begin`.
    acting: Option<String>,
}

/// What the caller says about a run for the position.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// The last unit of the run (all staged rows with `m_co <= upto`).
    pub upto: i64,
    /// Units in it.
    pub units: u64,
    /// Changes staged for them.
    pub changes: u64,
    /// The position before.
    pub from: Option<i64>,
    /// The position to store (`None` for row-state archives).
    pub commit_order: Option<i64>,
    /// Commit time of the last unit.
    pub ts_us: Option<i64>,
    /// Its transaction.
    pub tx_id: Option<i64>,
    /// Its LSN.
    pub lsn: Option<i64>,
    /// Resume points once applied.
    pub streams: BTreeMap<String, StreamPos>,
}

impl Applier {
    /// An applier on `conn` (which holds the replay's lock), for replay
    /// `name`, mapping source tables to targets by `mapping` (empty: every
    /// table to the same name).
    pub fn new(
        conn: PgConnection,
        name: &str,
        mapping: Vec<(TableName, TableName)>,
        on_conflict: OnConflict,
        user_triggers: UserTriggers,
        streams: Streams,
    ) -> Self {
        Self {
            conn: Conn(Some(conn)),
            in_flight: None,
            spare: Vec::new(),
            stages: Vec::new(),
            by_source: HashMap::new(),
            only_mapped: !mapping.is_empty(),
            mapping,
            on_conflict,
            user_triggers,
            order: Vec::new(),
            cycle: false,
            name: name.to_owned(),
            streams,
            acting: None,
        }
    }

    /// A stream added to the replay (a partition that appeared in a
    /// segmented archive), for the places named in messages; its id is the
    /// next one.
    pub fn add_stream(&mut self, kind: StreamKind) {
        self.streams.add(kind);
    }

    /// Starts a transaction (as this session's own role).
    async fn begin(&mut self) -> Result<(), sqlx::Error> {
        sqlx::query("begin").execute(&mut *self.conn).await?;
        self.acting = None;
        Ok(())
    }

    /// Makes the rest of the transaction (until the next call) run as the
    /// owner of table `idx`'s target, or as this session's role for `None`.
    ///
    /// Whatever the owner of a table attached to it (triggers, rules, CHECK
    /// constraints, index expressions, defaults, policies, its domains'
    /// checks) runs as the role that writes to it. A pg-replay connected as
    /// a superuser (or any role with more privileges than the owner) writes
    /// as the owner, so the owner's code never gains a privilege it does
    /// not have; the position and the staging tables stay this role's.
    async fn act_for(&mut self, idx: Option<usize>) -> Result<(), sqlx::Error> {
        let want = idx.and_then(|i| self.stages[i].act_as.clone());
        if want == self.acting {
            return Ok(());
        }
        let sql = match &want {
            Some(role) => format!("set local role {role}"),
            None => "set local role none".to_owned(),
        };
        sqlx::query(&sql).execute(&mut *self.conn).await?;
        self.acting = want;
        Ok(())
    }

    /// Makes every change an upsert (row-state archives: no transactions,
    /// no deletes, each record a row's whole state).
    pub fn set_upsert(&mut self) {
        self.on_conflict = OnConflict::Upsert;
    }

    /// Applies the events of table `idx` in unit `commit_order` as upserts
    /// (call before its events are pushed): a `--from-snapshot` replay
    /// starts the table, emptied, at the first chunk of an incremental
    /// snapshot, and until its last chunk the target holds only the rows
    /// read so far and those changed since, so an update of a key not read
    /// yet writes the row as it then was, and a delete of one is nothing.
    pub fn set_lenient(&mut self, idx: usize, commit_order: i64) {
        self.stages[idx].lenient.insert(commit_order);
    }

    /// Whether table `idx`'s changes up to unit `upto` are applied as
    /// upserts (`--on-conflict upsert`, or a lenient unit in the run).
    fn upserts(&self, idx: usize, upto: i64) -> bool {
        self.on_conflict == OnConflict::Upsert
            || self.stages[idx].lenient.range(..=upto).next().is_some()
    }

    /// The connection, for the position and checks, once every change
    /// staged has reached it.
    ///
    /// Fails when staging the changes buffered fails.
    pub async fn conn(&mut self) -> anyhow::Result<&mut PgConnection> {
        self.flush().await?;
        Ok(&mut *self.conn)
    }

    /// The target a source table maps to; `None` when it is not mapped.
    pub fn target_of(&self, source: &TableName) -> Option<TableName> {
        if self.mapping.is_empty() {
            return Some(source.clone());
        }
        self.mapping
            .iter()
            .find(|(s, _)| s == source)
            .map(|(_, t)| t.clone())
    }

    /// The staging of `source`, set up on first sight: the target table
    /// looked up (or created from `row`), checked and its staging tables
    /// created. `None` when the table is not mapped.
    ///
    /// Fails when the target is missing and cannot be created, when this
    /// role may not write it, or when it has triggers pg-replay may not
    /// disable.
    pub async fn stage_for(
        &mut self,
        source: &TableName,
        row: Option<&RowSchema>,
    ) -> anyhow::Result<Option<usize>> {
        if let Some(&i) = self.by_source.get(source) {
            return Ok(Some(i));
        }
        let Some(target_name) = self.target_of(source) else {
            return Ok(None);
        };
        self.settle().await?;
        let target = match target::load_table(&mut self.conn, &target_name).await? {
            Some(t) => t,
            None => {
                let Some(row) = row else {
                    bail!(
                        "target table {target_name} does not exist and the archive carries no schema to create it from \
                         (written with value.converter.schemas.enable=false); create it first \
                         (e.g. pg_dump --schema-only --table of the source)"
                    );
                };
                target::create_table(&mut self.conn, &target_name, row).await?;
                target::load_table(&mut self.conn, &target_name)
                    .await?
                    .context("the table just created is not there")?
            }
        };
        let mut refused = Vec::new();
        for (ok, what) in [
            (target.can_insert, "INSERT"),
            (target.can_update, "UPDATE"),
            (target.can_delete, "DELETE"),
        ] {
            if !ok {
                refused.push(what);
            }
        }
        if !refused.is_empty() {
            bail!(
                "this role may not write target table {target_name} (no {} privilege); \
                 grant select, insert, update, delete on {} to it, or connect as the table's owner",
                refused.join(", "),
                target_name.quoted()
            );
        }
        if !target.owner_is_session && !target.may_become_owner && !target.owner_is_superuser {
            bail!(
                "target table {target_name} belongs to role {owner}, whose code on it (triggers, rules, CHECK \
                 constraints, defaults, index expressions, policies) would run with this role's privileges \
                 while pg-replay writes to it; connect as {owner} (or a member of it, or a superuser: pg-replay \
                 then writes as {owner})",
                owner = quote_ident(&target.owner)
            );
        }
        if !target.user_triggers.is_empty()
            && self.user_triggers == UserTriggers::Disable
            && !target.owned
        {
            bail!(
                "target table {target_name} has triggers ({}) that would change replayed rows (the archive \
                 already holds their effects at the source); pg-replay disables them while it applies, which \
                 needs ownership of the table: connect as its owner, or pass --user-triggers fire to let them run",
                target
                    .user_triggers
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let idx = self.stages.len();
        let (stage_sql, net_sql, cols) = staging_ddl(&target, idx);
        let stage = format!("pg_temp.tidemark_stage_{idx}");
        let net = format!("pg_temp.tidemark_net_{idx}");
        sqlx::query(&stage_sql)
            .execute(&mut *self.conn)
            .await
            .with_context(|| format!("cannot create the staging table for {target_name}"))?;
        sqlx::query(&net_sql)
            .execute(&mut *self.conn)
            .await
            .with_context(|| format!("cannot create the staging table for {target_name}"))?;
        let act_as = (!target.owner_is_session && target.may_become_owner)
            .then(|| quote_ident(&target.owner));
        if let Some(role) = &act_as {
            // Statements on the target run as its owner (`act_for`) and read
            // the staging tables; temporary tables are this session's only.
            sqlx::query(&format!("grant all on {stage}, {net} to {role}"))
                .execute(&mut *self.conn)
                .await
                .with_context(|| {
                    format!("cannot let {role} read the staging tables of {target_name}")
                })?;
        }
        let copy_sql = format!("copy {stage} from stdin");
        tracing::info!(source = %source, target = %target_name, columns = cols.len(), "replaying table");
        self.stages.push(Stage {
            source: source.clone(),
            target,
            stage,
            net,
            cols,
            fields: HashMap::new(),
            schemaless: None,
            matched: false,
            attnums: KnownAttnums::default(),
            copy_sql,
            buf: Vec::with_capacity(64 * 1024),
            by_unit: UnitSet::default(),
            truncates: BTreeMap::new(),
            reads: BTreeSet::new(),
            lenient: BTreeSet::new(),
            act_as,
        });
        self.by_source.insert(source.clone(), idx);
        self.reorder().await?;
        Ok(Some(idx))
    }

    async fn reorder(&mut self) -> anyhow::Result<()> {
        let oids: Vec<u32> = self.stages.iter().map(|s| s.target.oid).collect();
        let parents = target::foreign_keys(&mut self.conn, &oids).await?;
        let (order, cycle) = target::parent_first(&oids, &parents);
        self.order = order
            .iter()
            .map(|o| oids.iter().position(|x| x == o).expect("an oid of ours"))
            .collect();
        if cycle && !self.cycle {
            tracing::info!("the target tables' foreign keys form a cycle: units that touch them are applied event by event");
        }
        self.cycle = cycle;
        Ok(())
    }

    /// A mapped table's stage.
    pub fn stage(&self, idx: usize) -> &Stage {
        &self.stages[idx]
    }

    /// Whether a record of table `idx` with schema `id` (`row`) changes
    /// the table's columns: the changes, once records of the table have
    /// matched the target. `None` for a schema seen before, one that
    /// matches, or a first record (whose mismatch is an error of its own).
    ///
    /// A record of a source table created again under the table's name
    /// ([`Applier::created_again`]) is compared by names alone: its
    /// attnums are another table's.
    pub fn schema_change(&self, idx: usize, id: u64, row: &RowSchema) -> Option<Vec<DdlStep>> {
        let stage = &self.stages[idx];
        if stage.fields.contains_key(&id) || !stage.matched {
            return None;
        }
        let current: Vec<Current> = stage
            .cols
            .iter()
            .map(|&i| {
                let c = &stage.target.columns[i];
                (
                    c.name.clone(),
                    c.type_sql.clone(),
                    stage.attnums.get(&c.name),
                )
            })
            .collect();
        let steps = match stage.attnums.created_again(row) {
            Some(_) => column_diff_by_name(&current, row),
            None => column_diff(&current, row),
        };
        (!steps.is_empty()).then_some(steps)
    }

    /// `(old, new)` source table OIDs when a record of table `idx` with
    /// `row` is of another source table than the attnums known (one
    /// dropped and created again under its name): for messages.
    pub fn created_again(&self, idx: usize, row: &RowSchema) -> Option<(u32, u32)> {
        self.stages[idx].attnums.created_again(row)
    }

    /// Whether changes of table `idx` in unit `commit_order` are staged.
    pub fn stages_unit(&self, idx: usize, commit_order: i64) -> bool {
        self.stages[idx].by_unit.contains(commit_order)
    }

    /// Makes `steps` to the target table of `idx` in one transaction, and
    /// sets its staging up again for the new columns.
    ///
    /// Fails, saying why, when a step cannot be made exactly or the
    /// target refuses it; nothing is changed then.
    pub async fn apply_schema_change(
        &mut self,
        idx: usize,
        steps: &[DdlStep],
    ) -> anyhow::Result<()> {
        let stage = &self.stages[idx];
        anyhow::ensure!(
            stage.by_unit.is_empty(),
            "changes of {} are staged across its schema change",
            stage.source
        );
        let mut clauses = Vec::new();
        for step in steps {
            clauses.push(step.clause().map_err(|why| anyhow!("{why}"))?);
        }
        let table = stage.target.name.clone();
        self.settle().await?;
        self.begin().await?;
        self.act_for(Some(idx)).await?;
        for clause in &clauses {
            let sql = format!("alter table {} {clause}", table.quoted());
            if let Err(e) = sqlx::query(&sql).execute(&mut *self.conn).await {
                let _ = sqlx::query("rollback").execute(&mut *self.conn).await;
                bail!("cannot change target table {table} as the archive records ({sql}): {e}");
            }
        }
        sqlx::query("commit").execute(&mut *self.conn).await?;
        for step in steps {
            tracing::info!(table = %table, change = %step.describe(), "applied a schema change recorded in the archive");
        }
        let stage = &self.stages[idx];
        for t in [&stage.stage, &stage.net] {
            sqlx::query(&format!("drop table {t}"))
                .execute(&mut *self.conn)
                .await?;
        }
        let target = target::load_table(&mut self.conn, &table)
            .await?
            .with_context(|| format!("target table {table} is gone"))?;
        let (stage_sql, net_sql, cols) = staging_ddl(&target, idx);
        sqlx::query(&stage_sql).execute(&mut *self.conn).await?;
        sqlx::query(&net_sql).execute(&mut *self.conn).await?;
        if let Some(role) = &self.stages[idx].act_as {
            let stage = &self.stages[idx];
            sqlx::query(&format!(
                "grant all on {}, {} to {role}",
                stage.stage, stage.net
            ))
            .execute(&mut *self.conn)
            .await?;
        }
        let stage = &mut self.stages[idx];
        // The attnums follow the columns' new names (and are forgotten at
        // the next record, when it is of a source table created again).
        stage
            .attnums
            .follow(steps, target.columns.iter().map(|c| c.name.as_str()));
        stage.target = target;
        stage.cols = cols;
        stage.fields.clear();
        stage.schemaless = None;
        stage.buf.clear();
        self.reorder().await
    }

    /// Stages one change: its row (`after`, or `before` for a delete) into
    /// the COPY buffer of table `idx`, sending the buffer when it is full.
    ///
    /// Fails, naming table, column, key and `origin`, when the row's columns
    /// do not match the target's or a value cannot be carried exactly.
    pub async fn push(
        &mut self,
        idx: usize,
        meta: RowMeta,
        row: Option<&Row>,
        row_schema: Option<(u64, &RowSchema)>,
        origin: &Origin,
    ) -> anyhow::Result<()> {
        let stage = &mut self.stages[idx];
        let fields = match row_schema {
            Some((id, schema)) => match stage.fields.get(&id) {
                Some(f) => f.clone(),
                None => {
                    let f = Arc::new(Fields::new(
                        stage
                            .field_schemas(schema)
                            .with_context(|| format!("at {origin}"))?,
                    ));
                    stage.fields.insert(id, f.clone());
                    stage.matched = true;
                    if let Some((old, new)) = stage.attnums.learn(schema) {
                        tracing::info!(
                            source = %stage.source,
                            target = %stage.target.name,
                            old_oid = old,
                            new_oid = new,
                            "the source table was created again under its name: its columns are paired with the target's by name, not by the old table's attnums"
                        );
                    }
                    f
                }
            },
            None => match &stage.schemaless {
                Some(f) => f.clone(),
                None => {
                    // The schema the record would carry, from the target's
                    // types: a value of another variant (a timestamp past
                    // int64 µs) is then an error, never a guess.
                    if let Some(row) = row {
                        let names: BTreeSet<&str> = row.names().collect();
                        stage
                            .check_columns(&names, None)
                            .with_context(|| format!("at {origin}"))?;
                    }
                    let columns: Vec<(String, u32, i32, String)> = stage
                        .cols
                        .iter()
                        .map(|&i| {
                            let c = &stage.target.columns[i];
                            (c.name.clone(), c.type_oid, c.typmod, c.type_sql.clone())
                        })
                        .collect();
                    let types = column_types(&stage.target.name, &columns)
                        .with_context(|| format!("at {origin}"))?;
                    let specs = stage
                        .cols
                        .iter()
                        .zip(types)
                        .map(|(&i, ty)| {
                            tidemark_common::codec::ColumnSpec::new(
                                stage.target.columns[i].name.clone(),
                                ty,
                                stage.target.columns[i].not_null,
                            )
                        })
                        .collect();
                    let codec = tidemark_common::codec::RowCodec::new(specs);
                    let f = Arc::new(Fields::new(codec.fields(&Default::default()).to_vec()));
                    stage.schemaless = Some(f.clone());
                    f
                }
            },
        };
        use std::io::Write as _;
        let buf = &mut stage.buf;
        let _ = write!(
            buf,
            "{}\t{}\t{}\t{}\t{}\t{}",
            meta.commit_order,
            meta.total_order,
            meta.op.code(),
            meta.stream,
            meta.pos.offset,
            meta.pos.line
        );
        for (j, &i) in stage.cols.iter().enumerate() {
            buf.push(b'\t');
            let col = &stage.target.columns[i];
            let value = row
                .and_then(|r| r.get_at(&col.name, i))
                .unwrap_or(&Value::Null);
            let text = fields.pg_text(j, value).map_err(|why| {
                let key = row
                    .map(|r| key_json(r, &stage.target))
                    .unwrap_or_else(|| "(none)".into());
                anyhow!(
                    "cannot replay column {} of table {} (key {key}) at {origin}: {why}",
                    col.name,
                    stage.source
                )
            })?;
            match text {
                Some(t) => copy_escape(buf, &t),
                None => buf.extend_from_slice(COPY_NULL),
            }
        }
        buf.push(b'\n');
        stage.by_unit.insert(meta.commit_order);
        if meta.op == Op::Truncate {
            let last = stage.truncates.entry(meta.commit_order).or_insert(0);
            *last = (*last).max(meta.total_order);
        }
        if meta.op == Op::IncrementalRead {
            stage.reads.insert(meta.commit_order);
        }
        if stage.buf.len() >= COPY_CHUNK {
            self.flush_one(idx).await?;
        }
        Ok(())
    }

    /// Sends table `idx`'s buffer to its staging table on a task of its
    /// own, so the next changes are read and written while Postgres takes
    /// these in: at most one `COPY` is in flight, and every statement
    /// waits for it first ([`Applier::settle`]).
    async fn flush_one(&mut self, idx: usize) -> anyhow::Result<()> {
        if self.stages[idx].buf.is_empty() {
            return Ok(());
        }
        self.settle().await?;
        let mut conn = self.conn.0.take().expect("settled");
        let buf = std::mem::replace(&mut self.stages[idx].buf, std::mem::take(&mut self.spare));
        let copy_sql = self.stages[idx].copy_sql.clone();
        // The target's types check the values (a domain's CHECK runs): as
        // the target's owner, like every statement on the target.
        let owner = self.stages[idx].act_as.clone();
        let task = tokio::spawn(async move {
            let result = copy_in(&mut conn, &copy_sql, owner.as_deref(), &buf).await;
            (conn, buf, result)
        });
        self.in_flight = Some(InFlight { idx, task });
        Ok(())
    }

    /// Waits for the `COPY` in flight, if any, and takes the connection
    /// back.
    ///
    /// Fails as the `COPY` failed (a value its target type refused, named
    /// by table, column, key and archive position).
    async fn settle(&mut self) -> anyhow::Result<()> {
        let Some(InFlight { idx, task }) = self.in_flight.take() else {
            return Ok(());
        };
        let (conn, mut buf, result) = task
            .await
            .map_err(|e| anyhow!("the staging of changes stopped: {e}"))?;
        self.conn.0 = Some(conn);
        // The task's transaction (for the owner's role) has ended.
        self.acting = None;
        match result {
            Ok(()) => {
                buf.clear();
                self.spare = buf;
                Ok(())
            }
            Err(CopyFailed::Start(e)) => Err(anyhow!(e).context(format!(
                "cannot stage the changes of {}",
                self.stages[idx].source
            ))),
            Err(CopyFailed::Data(e)) => Err(self.copy_error(idx, e, &buf)),
        }
    }

    /// The error of a `COPY` into table `idx`'s staging table, naming the
    /// archive's place, table, column and key of the value the target type
    /// refused (from the error's `COPY ..., line N, column cK` context and
    /// line N of the buffer, which is still there).
    fn copy_error(&self, idx: usize, e: sqlx::Error, buf: &[u8]) -> anyhow::Error {
        let stage = &self.stages[idx];
        let context = e
            .as_database_error()
            .and_then(|d| d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>())
            .and_then(|d| d.r#where())
            .unwrap_or_default();
        let number_after = |tag: &str| -> Option<usize> {
            let rest = &context[context.find(tag)? + tag.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        let located = (|| {
            let line_no = number_after(", line ")?;
            let column = number_after(", column c")?;
            let line = buf.split(|&b| b == b'\n').nth(line_no.checked_sub(1)?)?;
            let fields: Vec<&[u8]> = line.split(|&b| b == b'\t').collect();
            let number = |i: usize| -> Option<u64> {
                std::str::from_utf8(fields.get(i)?).ok()?.parse().ok()
            };
            let origin = self.streams.origin(
                u32::try_from(number(3)?).ok()?,
                StreamPos {
                    offset: number(4)?,
                    line: number(5)?,
                },
            );
            let col = &stage.target.columns[*stage.cols.get(column.checked_sub(1)?)?];
            let key: Vec<String> = stage
                .target
                .key
                .iter()
                .map(|&k| {
                    let j = stage.cols.iter().position(|&c| c == k)?;
                    Some(String::from_utf8_lossy(fields.get(6 + j)?).into_owned())
                })
                .collect::<Option<_>>()?;
            Some((origin, col.name.clone(), key.join(",")))
        })();
        match located {
            Some((origin, column, key)) => anyhow!(
                "cannot replay column {column} of table {} (target {}, key ({})=({key})) at {origin}: the target \
                 column's type refused the value: {e}; nothing was applied from this batch of the archive",
                stage.source,
                stage.target.name,
                stage.key_names(),
            ),
            None => anyhow!(e).context(format!(
                "a value of table {} does not fit its target table {} (the target type's input refused it)",
                stage.source, stage.target.name
            )),
        }
    }

    /// Sends every buffered change to its staging table.
    ///
    /// Fails when `COPY` fails (a value its target type refuses).
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        for i in 0..self.stages.len() {
            self.flush_one(i).await?;
        }
        self.settle().await
    }

    /// Applies every staged change of units up to `run.upto`, and moves the
    /// position, in one transaction.
    ///
    /// Fails with [`ApplyError::AtUnit`] when the target disagrees with the
    /// archive or a change fails at some unit (nothing of the run applied),
    /// and with [`ApplyError::Other`] on a connection or query error.
    pub async fn apply(&mut self, run: &RunInfo) -> Result<Applied, ApplyError> {
        self.flush().await?;
        let tables: Vec<usize> = self
            .order
            .iter()
            .copied()
            .filter(|&i| self.stages[i].by_unit.any_upto(run.upto))
            .collect();
        if !self.cycle {
            self.begin().await.map_err(anyhow::Error::from)?;
            match self.fast(&tables, run.upto).await {
                Ok(FastOutcome::Done) => {
                    self.finish_run(&tables, run, run.changes).await?;
                    return Ok(Applied {
                        changes: run.changes,
                        slow: false,
                    });
                }
                Ok(FastOutcome::Mismatch(why)) => {
                    tracing::debug!(why, "set-based apply disagreed; examining the run");
                }
                Err(e) if is_constraint(&e) => {
                    tracing::debug!(error = %e, "set-based apply hit a constraint; examining the run");
                }
                Err(e) => {
                    let _ = sqlx::query("rollback").execute(&mut *self.conn).await;
                    return Err(ApplyError::Other(
                        with_truncate_fix(e).context("cannot apply changes to the target"),
                    ));
                }
            }
            sqlx::query("rollback")
                .execute(&mut *self.conn)
                .await
                .map_err(anyhow::Error::from)?;
            if self.on_conflict == OnConflict::Stop {
                if let Some(conflict) = self.diagnose(&tables, run.upto).await? {
                    return Err(conflict);
                }
            }
        }
        // Event by event, in commit order.
        self.begin().await.map_err(anyhow::Error::from)?;
        match self.slow(&tables, run.upto).await {
            Ok(_) => {
                self.finish_run(&tables, run, run.changes).await?;
                Ok(Applied {
                    changes: run.changes,
                    slow: true,
                })
            }
            Err(e) => {
                let _ = sqlx::query("rollback").execute(&mut *self.conn).await;
                Err(e)
            }
        }
    }

    /// Moves the position, clears what was applied from staging, commits.
    async fn finish_run(
        &mut self,
        tables: &[usize],
        run: &RunInfo,
        changes: u64,
    ) -> Result<(), ApplyError> {
        let result = async {
            self.act_for(None).await?;
            for &i in tables {
                let s = &self.stages[i];
                if !s.by_unit.any_after(run.upto) {
                    sqlx::query(&format!("truncate {}", s.stage))
                        .execute(&mut *self.conn)
                        .await?;
                } else {
                    // Deleting the applied rows would leave them dead in
                    // the table for every later scan to read (nothing
                    // vacuums a temporary table), so a long replay would
                    // slow down run after run: the rest is put aside, the
                    // table emptied and the rest put back.
                    sqlx::query(&format!(
                        "create temp table pg_temp.tidemark_keep as select * from {} s where s.m_co {GT} $1",
                        s.stage
                    ))
                    .bind(run.upto)
                    .execute(&mut *self.conn)
                    .await?;
                    sqlx::query(&format!("truncate {}", s.stage))
                        .execute(&mut *self.conn)
                        .await?;
                    sqlx::query(&format!(
                        "insert into {} select * from pg_temp.tidemark_keep",
                        s.stage
                    ))
                    .execute(&mut *self.conn)
                    .await?;
                    sqlx::query("drop table pg_temp.tidemark_keep")
                        .execute(&mut *self.conn)
                        .await?;
                }
            }
            position::advance(
                &mut self.conn,
                &self.name,
                &Advance {
                    from: run.from,
                    commit_order: run.commit_order,
                    ts_us: run.ts_us,
                    tx_id: run.tx_id,
                    lsn: run.lsn,
                    streams: &run.streams,
                    changes: changes as i64,
                    units: run.units as i64,
                },
            )
            .await?;
            sqlx::query("commit").execute(&mut *self.conn).await?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = result {
            let _ = sqlx::query("rollback").execute(&mut *self.conn).await;
            return Err(ApplyError::Other(
                e.context("cannot commit the applied changes"),
            ));
        }
        // Committed: what remains staged is what is after the run.
        for &i in tables {
            let s = &mut self.stages[i];
            s.by_unit.remove_upto(run.upto);
            s.truncates.retain(|&co, _| co > run.upto);
            s.reads.retain(|&co| co > run.upto);
            s.lenient.retain(|&co| co > run.upto);
        }
        Ok(())
    }

    /// Fills each table's net table from its staged rows of the run, as the
    /// table's owner: sorting and comparing keys runs their types'
    /// operators, which for a type of the owner's are the owner's code.
    async fn build_nets(&mut self, tables: &[usize], upto: i64) -> Result<(), sqlx::Error> {
        for &i in tables {
            self.act_for(Some(i)).await?;
            let s = &self.stages[i];
            let (after_co, after_ord) = s
                .truncates
                .range(..=upto)
                .next_back()
                .map_or((i64::MIN, i64::MIN), |(co, ord)| (*co, *ord));
            let keys = s.key_stage_cols("s").join(", ");
            let window = format!(
                "s.m_co {LE} $1 and s.m_op {NE} 't' and (s.m_co {GT} $2 or (s.m_co {EQ} $2 and s.m_ord {GT} $3))"
            );
            // One sort of the run's rows by key and place: each key's first
            // row, with its last row's values over the whole partition. It
            // needs `PARTITION BY` to compare keys as the key's index does,
            // which holds for the built-in default operator classes; for
            // others, two `DISTINCT ON` sorts by the index's own ordering.
            let sql = if s.target.key_default_ops {
                let last = (1..=s.cols.len())
                    .map(|j| format!("pg_catalog.last_value(s.c{j}) over w as c{j}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!(
                    "insert into {net} \
                     select x.m_op, x.m_co, x.m_ord, x.m_src, x.m_pos, x.m_line, x.l_op, {xcols} \
                     from (select s.m_op, s.m_co, s.m_ord, s.m_src, s.m_pos, s.m_line, \
                                  pg_catalog.row_number() over w as m_rn, \
                                  pg_catalog.last_value(s.m_op) over w as l_op, {last} \
                           from {stage} s where {window} \
                           window w as (partition by {keys} order by s.m_co, s.m_ord \
                                        rows between unbounded preceding and unbounded following)) x \
                     where x.m_rn {EQ} 1",
                    net = s.net,
                    stage = s.stage,
                    xcols = s.stage_list("x"),
                )
            } else {
                format!(
                "insert into {net} \
                 select f.m_op, f.m_co, f.m_ord, f.m_src, f.m_pos, f.m_line, l.m_op, {lcols} \
                 from (select distinct on ({keys}) s.* from {stage} s where {window} \
                       order by {order}, s.m_co desc, s.m_ord desc) l \
                 join (select distinct on ({keys}) s.m_op, s.m_co, s.m_ord, s.m_src, s.m_pos, s.m_line, {keys} \
                       from {stage} s where {window} order by {order}, s.m_co, s.m_ord) f \
                 on {join}",
                net = s.net,
                stage = s.stage,
                lcols = s.stage_list("l"),
                order = s.key_order("s"),
                join = s
                    .target
                    .key
                    .iter()
                    .zip(&s.target.key_eq)
                    .map(|(&k, op)| {
                        let j = s.stage_col(k);
                        format!("l.c{j} {op} f.c{j}")
                    })
                    .collect::<Vec<_>>()
                    .join(" and "),
                )
            };
            sqlx::query(&format!("truncate {}", s.net))
                .execute(&mut *self.conn)
                .await?;
            sqlx::query(&sql)
                .bind(upto)
                .bind(after_co)
                .bind(after_ord)
                .execute(&mut *self.conn)
                .await?;
        }
        Ok(())
    }

    /// The set-based apply, inside the caller's transaction.
    async fn fast(&mut self, tables: &[usize], upto: i64) -> Result<FastOutcome, sqlx::Error> {
        self.build_nets(tables, upto).await?;
        let mut expected = HashMap::new();
        for &i in tables {
            let s = &self.stages[i];
            let row = sqlx::query(&format!(
                "select count(*) filter (where n.f_op {EQ} any ('{{c,r}}') and n.l_op {NE} 'd') as ins, \
                        count(*) filter (where n.f_op {EQ} any ('{{u,d}}') and n.l_op {NE} 'd') as upd, \
                        count(*) filter (where n.f_op {EQ} any ('{{u,d}}') and n.l_op {EQ} 'd') as del \
                 from {} n",
                s.net
            ))
            .fetch_one(&mut *self.conn)
            .await?;
            expected.insert(
                i,
                (
                    row.get::<i64, _>("ins") as u64,
                    row.get::<i64, _>("upd") as u64,
                    row.get::<i64, _>("del") as u64,
                ),
            );
        }
        self.set_triggers(tables, false).await?;
        // The tables a TRUNCATE of the run empties, first: only their
        // changes after it are in the net tables. One statement for all (per
        // owner), as the source's own: a parent cannot be truncated apart
        // from the children that reference it.
        let truncated: Vec<usize> = tables
            .iter()
            .copied()
            .filter(|&i| self.stages[i].truncates.range(..=upto).next().is_some())
            .collect();
        self.truncate(&truncated).await?;
        for &i in tables {
            self.act_for(Some(i)).await?;
            let s = &self.stages[i];
            let (ins, upd, _) = expected[&i];
            if self.upserts(i, upto) {
                let sql = s.upsert_net_sql(&format!("n.l_op {NE} 'd'"));
                sqlx::query(&sql).execute(&mut *self.conn).await?;
                continue;
            }
            let sql = format!(
                "insert into {t} ({cols}){ov} select {vals} from {net} n \
                 where n.f_op {EQ} any ('{{c,r}}') and n.l_op {NE} 'd'",
                t = s.target.name.quoted(),
                cols = s.target_cols(),
                ov = s.overriding(),
                vals = s.stage_list("n"),
                net = s.net,
            );
            let done = sqlx::query(&sql)
                .execute(&mut *self.conn)
                .await?
                .rows_affected();
            if done != ins {
                return Ok(FastOutcome::Mismatch("insert count"));
            }
            let done = match s.update_set("n") {
                Some(sets) => {
                    let sql = format!(
                        "update {t} t set {sets} from {net} n \
                         where {cond} and n.f_op {EQ} any ('{{u,d}}') and n.l_op {NE} 'd'",
                        t = s.target.name.quoted(),
                        net = s.net,
                        cond = s.key_cond("t", "n"),
                    );
                    sqlx::query(&sql)
                        .execute(&mut *self.conn)
                        .await?
                        .rows_affected()
                }
                None => {
                    let sql = format!(
                        "select count(*) from {t} t join {net} n on {cond} \
                         where n.f_op {EQ} any ('{{u,d}}') and n.l_op {NE} 'd'",
                        t = s.target.name.quoted(),
                        net = s.net,
                        cond = s.key_cond("t", "n"),
                    );
                    sqlx::query_scalar::<_, i64>(&sql)
                        .fetch_one(&mut *self.conn)
                        .await? as u64
                }
            };
            if done != upd {
                return Ok(FastOutcome::Mismatch("update count"));
            }
            if s.reads.range(..=upto).next().is_some() {
                // A key whose first event in the run is an incremental
                // snapshot read may or may not be held: its row, whatever
                // the target had.
                let sql = s.upsert_net_sql(&format!("n.f_op {EQ} 'i' and n.l_op {NE} 'd'"));
                sqlx::query(&sql).execute(&mut *self.conn).await?;
            }
        }
        for &i in tables.iter().rev() {
            self.act_for(Some(i)).await?;
            let upsert = self.upserts(i, upto);
            let s = &self.stages[i];
            let (_, _, del) = expected[&i];
            if !upsert && s.reads.range(..=upto).next().is_some() {
                // Read by an incremental snapshot, then deleted in the run:
                // gone, whether the target held it or not.
                let sql = format!(
                    "delete from {t} t using {net} n where {cond} and n.f_op {EQ} 'i' and n.l_op {EQ} 'd'",
                    t = s.target.name.quoted(),
                    net = s.net,
                    cond = s.key_cond("t", "n"),
                );
                sqlx::query(&sql).execute(&mut *self.conn).await?;
            }
            let only_deleted = if upsert {
                format!("n.l_op {EQ} 'd'")
            } else {
                format!("n.f_op {EQ} any ('{{u,d}}') and n.l_op {EQ} 'd'")
            };
            let sql = format!(
                "delete from {t} t using {net} n where {cond} and {only_deleted}",
                t = s.target.name.quoted(),
                net = s.net,
                cond = s.key_cond("t", "n"),
            );
            let done = sqlx::query(&sql)
                .execute(&mut *self.conn)
                .await?
                .rows_affected();
            if !upsert && done != del {
                return Ok(FastOutcome::Mismatch("delete count"));
            }
            if !upsert {
                // A key created and deleted within the run must not have
                // been there before it.
                let sql = format!(
                    "select exists (select from {net} n join {t} t on {cond} \
                     where n.f_op {EQ} any ('{{c,r}}') and n.l_op {EQ} 'd')",
                    t = s.target.name.quoted(),
                    net = s.net,
                    cond = s.key_cond("t", "n"),
                );
                if sqlx::query_scalar::<_, bool>(&sql)
                    .fetch_one(&mut *self.conn)
                    .await?
                {
                    return Ok(FastOutcome::Mismatch("a key created in the run was there"));
                }
            }
        }
        self.set_triggers(tables, true).await?;
        Ok(FastOutcome::Done)
    }

    /// Empties the target tables of `stages` with one `truncate` per owner
    /// pg-replay writes as.
    async fn truncate(&mut self, stages: &[usize]) -> Result<(), sqlx::Error> {
        let mut groups: Vec<(usize, Vec<String>)> = Vec::new();
        for &i in stages {
            let name = self.stages[i].target.name.quoted();
            match groups
                .iter_mut()
                .find(|(j, _)| self.stages[*j].act_as == self.stages[i].act_as)
            {
                Some((_, names)) => names.push(name),
                None => groups.push((i, vec![name])),
            }
        }
        for (i, names) in groups {
            self.act_for(Some(i)).await?;
            sqlx::query(&format!("truncate {}", names.join(", ")))
                .execute(&mut *self.conn)
                .await?;
        }
        Ok(())
    }

    /// Disables (`enable = false`) or restores the target tables' own
    /// triggers, inside the apply transaction, so no other session ever
    /// sees them disabled.
    async fn set_triggers(&mut self, tables: &[usize], enable: bool) -> Result<(), sqlx::Error> {
        if self.user_triggers == UserTriggers::Fire {
            return Ok(());
        }
        for &i in tables {
            if self.stages[i].target.user_triggers.is_empty() {
                continue;
            }
            self.act_for(Some(i)).await?;
            let s = &self.stages[i];
            for (name, state) in &s.target.user_triggers {
                let how = match (enable, state.as_str()) {
                    (false, _) => "disable trigger",
                    (true, "A") => "enable always trigger",
                    (true, "R") => "enable replica trigger",
                    (true, _) => "enable trigger",
                };
                sqlx::query(&format!(
                    "alter table {} {how} {}",
                    s.target.name.quoted(),
                    quote_ident(name)
                ))
                .execute(&mut *self.conn)
                .await?;
            }
        }
        Ok(())
    }

    /// After a failed set-based apply: the first key (in commit order) whose
    /// target row disagrees with the archive, as an error at its unit.
    async fn diagnose(
        &mut self,
        tables: &[usize],
        upto: i64,
    ) -> Result<Option<ApplyError>, ApplyError> {
        let result = async {
            self.begin().await?;
            self.build_nets(tables, upto).await?;
            let mut first: Option<(i64, i64, String)> = None;
            for &i in tables {
                if self.upserts(i, upto) {
                    continue;
                }
                self.act_for(Some(i)).await?;
                let s = &self.stages[i];
                let truncated = s.truncates.range(..=upto).next().is_some();
                // After a TRUNCATE in the run every key is absent.
                let present = if truncated {
                    "false".to_owned()
                } else {
                    format!(
                        "exists (select from {t} t where {cond})",
                        t = s.target.name.quoted(),
                        cond = s.key_cond("t", "n")
                    )
                };
                let sql = format!(
                    "select n.f_op::pg_catalog.text as op, n.f_co, n.f_ord, n.f_src, n.f_pos, n.f_line, \
                            {key} as key, {present} as present \
                     from {net} n where n.f_op {NE} 'i' and (n.f_op {EQ} any ('{{c,r}}')) {EQ} ({present}) \
                     order by n.f_co, n.f_ord limit 1",
                    key = s.key_text_sql("n"),
                    net = s.net,
                );
                if let Some(row) = sqlx::query(&sql).fetch_optional(&mut *self.conn).await? {
                    let co: i64 = row.get("f_co");
                    let ord: i64 = row.get("f_ord");
                    if first.as_ref().is_none_or(|(c, o, _)| (co, ord) < (*c, *o)) {
                        let op: String = row.get("op");
                        let present: bool = row.get("present");
                        let origin = self.streams.origin(
                            row.get::<i32, _>("f_src") as u32,
                            StreamPos {
                                offset: row.get::<i64, _>("f_pos") as u64,
                                line: row.get::<i64, _>("f_line") as u64,
                            },
                        );
                        let what = match (op.as_str(), present) {
                            ("c" | "r", _) => "creates a row whose key the target already holds",
                            ("u", _) => "updates a row the target does not hold",
                            _ => "deletes a row the target does not hold",
                        };
                        first = Some((
                            co,
                            ord,
                            format!(
                                "the target disagrees with the archive: table {} key ({})={} — the event at {origin} \
                                 (unit {co}, event {ord}) {what}; nothing of that unit was applied. The target was \
                                 changed outside this replay, or replays into a table that was not empty: \
                                 fix the row, or pass --on-conflict upsert to let the archive win",
                                s.target.name,
                                s.key_names(),
                                trim_key(&row.get::<String, _>("key")),
                            ),
                        ));
                    }
                }
            }
            sqlx::query("rollback").execute(&mut *self.conn).await?;
            anyhow::Ok(first)
        }
        .await;
        match result {
            Ok(Some((co, _, message))) => Ok(Some(ApplyError::AtUnit {
                commit_order: co,
                message,
            })),
            Ok(None) => Ok(None),
            Err(e) => {
                let _ = sqlx::query("rollback").execute(&mut *self.conn).await;
                Err(ApplyError::Other(
                    e.context("cannot examine the changes the target refused"),
                ))
            }
        }
    }

    /// The event-by-event apply, inside the caller's transaction, in commit
    /// order across tables.
    async fn slow(&mut self, tables: &[usize], upto: i64) -> Result<u64, ApplyError> {
        if tables.is_empty() {
            return Ok(0);
        }
        let union: Vec<String> = tables
            .iter()
            .map(|&i| {
                format!(
                    "select {i} as t, s.m_co, s.m_ord, s.m_op::pg_catalog.text as op, s.m_src, s.m_pos, s.m_line, \
                            s.ctid::pg_catalog.text as tid \
                     from {} s where s.m_co {LE} $1",
                    self.stages[i].stage
                )
            })
            .collect();
        let declare = format!(
            "declare tidemark_events no scroll cursor for {} order by m_co, m_ord",
            union.join(" union all ")
        );
        sqlx::query(&declare)
            .bind(upto)
            .execute(&mut *self.conn)
            .await
            .map_err(anyhow::Error::from)?;
        self.set_triggers(tables, false)
            .await
            .map_err(anyhow::Error::from)?;
        let mut applied = 0u64;
        loop {
            let rows = sqlx::query("fetch 1000 from tidemark_events")
                .fetch_all(&mut *self.conn)
                .await
                .map_err(anyhow::Error::from)?;
            if rows.is_empty() {
                break;
            }
            // TRUNCATEs of one unit in a row, taken into the first one's
            // statement (a parent cannot be truncated apart from its
            // children): how many of the next rows are done.
            let mut skip = 0usize;
            for (r, row) in rows.iter().enumerate() {
                if skip > 0 {
                    skip -= 1;
                    continue;
                }
                let i = row.get::<i32, _>("t") as usize;
                let op: String = row.get("op");
                let tid: String = row.get("tid");
                let co: i64 = row.get("m_co");
                self.act_for(Some(i)).await.map_err(anyhow::Error::from)?;
                let upsert = self.upserts(i, upto);
                let s = &self.stages[i];
                let t = s.target.name.quoted();
                let (sql, want_one) = match op.as_str() {
                    "t" => {
                        let mut names = vec![t.clone()];
                        for next in &rows[r + 1..] {
                            let j = next.get::<i32, _>("t") as usize;
                            if next.get::<String, _>("op") != "t"
                                || next.get::<i64, _>("m_co") != co
                                || self.stages[j].act_as != s.act_as
                            {
                                break;
                            }
                            names.push(self.stages[j].target.name.quoted());
                            skip += 1;
                        }
                        (format!("truncate {}", names.join(", ")), false)
                    }
                    "c" | "r" | "u" | "i" if upsert || op == "i" => (
                        format!(
                            "insert into {t} ({cols}){ov} select {vals} from {stage} s \
                             where s.ctid {EQ} $1::pg_catalog.tid on conflict on constraint {pk} {action}",
                            cols = s.target_cols(),
                            ov = s.overriding(),
                            vals = s.stage_list("s"),
                            stage = s.stage,
                            pk = s.target.pk_constraint,
                            action = s.upsert_action(),
                        ),
                        false,
                    ),
                    "c" | "r" => (
                        format!(
                            "insert into {t} ({cols}){ov} select {vals} from {stage} s where s.ctid {EQ} $1::pg_catalog.tid",
                            cols = s.target_cols(),
                            ov = s.overriding(),
                            vals = s.stage_list("s"),
                            stage = s.stage,
                        ),
                        true,
                    ),
                    "u" => match s.update_set("s") {
                        Some(sets) => (
                            format!(
                                "update {t} t set {sets} from {stage} s where s.ctid {EQ} $1::pg_catalog.tid and {cond}",
                                stage = s.stage,
                                cond = s.key_cond("t", "s"),
                            ),
                            true,
                        ),
                        None => (
                            format!(
                                "select from {t} t join {stage} s on {cond} where s.ctid {EQ} $1::pg_catalog.tid",
                                stage = s.stage,
                                cond = s.key_cond("t", "s"),
                            ),
                            true,
                        ),
                    },
                    _ => (
                        format!(
                            "delete from {t} t using {stage} s where s.ctid {EQ} $1::pg_catalog.tid and {cond}",
                            stage = s.stage,
                            cond = s.key_cond("t", "s"),
                        ),
                        !upsert,
                    ),
                };
                let result = if sql.starts_with("select") {
                    sqlx::query(&sql)
                        .bind(&tid)
                        .fetch_all(&mut *self.conn)
                        .await
                        .map(|r| r.len() as u64)
                } else {
                    sqlx::query(&sql)
                        .bind(&tid)
                        .execute(&mut *self.conn)
                        .await
                        .map(|r| r.rows_affected())
                };
                let failure = match result {
                    Ok(n) if want_one && n != 1 => Some(match op.as_str() {
                        "u" => "updates a row the target does not hold".to_owned(),
                        _ => "deletes a row the target does not hold".to_owned(),
                    }),
                    Ok(_) => None,
                    Err(e)
                        if is_constraint(&e)
                            && e.as_database_error().and_then(|d| d.code()).as_deref()
                                == Some("23505")
                            && matches!(op.as_str(), "c" | "r") =>
                    {
                        Some("creates a row whose key the target already holds".to_owned())
                    }
                    Err(e) if is_constraint(&e) => Some(format!("fails in the target: {e}")),
                    Err(e) => {
                        return Err(ApplyError::Other(
                            with_truncate_fix(e).context("cannot apply a change"),
                        ))
                    }
                };
                if let Some(what) = failure {
                    let origin = self.streams.origin(
                        row.get::<i32, _>("m_src") as u32,
                        StreamPos {
                            offset: row.get::<i64, _>("m_pos") as u64,
                            line: row.get::<i64, _>("m_line") as u64,
                        },
                    );
                    let ord: i64 = row.get("m_ord");
                    let _ = sqlx::query("rollback").execute(&mut *self.conn).await;
                    let key = self.key_of(i, &tid).await.unwrap_or_else(|_| "?".into());
                    let s = &self.stages[i];
                    return Err(ApplyError::AtUnit {
                        commit_order: co,
                        message: format!(
                            "the change at {origin} (unit {co}, event {ord}) to table {} key ({})={key} {what}; \
                             nothing of that unit was applied. If the target was changed outside this replay, \
                             fix the row (or pass --on-conflict upsert to let the archive win)",
                            s.target.name,
                            s.key_names(),
                        ),
                    });
                }
                if op != "t" {
                    applied += 1;
                }
            }
        }
        sqlx::query("close tidemark_events")
            .execute(&mut *self.conn)
            .await
            .map_err(anyhow::Error::from)?;
        self.set_triggers(tables, true)
            .await
            .map_err(anyhow::Error::from)?;
        Ok(applied)
    }

    async fn key_of(&mut self, i: usize, tid: &str) -> anyhow::Result<String> {
        let s = &self.stages[i];
        let sql = format!(
            "select {} from {} s where s.ctid {EQ} $1::pg_catalog.tid",
            s.key_text_sql("s"),
            s.stage
        );
        let key: String = sqlx::query_scalar(&sql)
            .bind(tid)
            .fetch_one(&mut *self.conn)
            .await?;
        Ok(trim_key(&key))
    }

    /// Closes the connection (ending the session drops the staging tables
    /// and releases the replay's lock).
    pub async fn close(mut self) {
        let _ = self.settle().await;
        if let Some(conn) = self.conn.0.take() {
            let _ = conn.close().await;
        }
    }
}

/// A set of units (commit orders), sorted: units mostly arrive in commit
/// order, so an insert is mostly a push, and a long run of small units
/// costs 8 bytes each.
#[derive(Debug, Default)]
struct UnitSet(Vec<i64>);

impl UnitSet {
    fn insert(&mut self, co: i64) {
        match self.0.last() {
            Some(&last) if last == co => {}
            Some(&last) if last > co => {
                if let Err(i) = self.0.binary_search(&co) {
                    self.0.insert(i, co);
                }
            }
            _ => self.0.push(co),
        }
    }

    fn contains(&self, co: i64) -> bool {
        self.0.binary_search(&co).is_ok()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn any_upto(&self, upto: i64) -> bool {
        self.0.first().is_some_and(|&c| c <= upto)
    }

    fn any_after(&self, upto: i64) -> bool {
        self.0.last().is_some_and(|&c| c > upto)
    }

    fn remove_upto(&mut self, upto: i64) {
        let n = self.0.partition_point(|&c| c <= upto);
        self.0.drain(..n);
    }
}

/// The apply session's connection; `None` while a `COPY` in flight holds
/// it. Every use of it comes after [`Applier::settle`].
struct Conn(Option<PgConnection>);

impl std::ops::Deref for Conn {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.0
            .as_ref()
            .expect("a COPY in flight holds the connection")
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.0
            .as_mut()
            .expect("a COPY in flight holds the connection")
    }
}

/// A `COPY` running on its own task: the connection, the buffer sent and
/// how it went come back when it ends.
struct InFlight {
    /// The stage whose buffer it sends.
    idx: usize,
    task: tokio::task::JoinHandle<(PgConnection, Vec<u8>, Result<(), CopyFailed>)>,
}

/// How a `COPY` failed.
enum CopyFailed {
    /// It could not start (the connection, the staging table).
    Start(sqlx::Error),
    /// The data was refused (a value its column's type does not take).
    Data(sqlx::Error),
}

/// `COPY`s `buf` with `copy_sql`, as `owner` when given (in a transaction
/// of its own, so `SET LOCAL ROLE` ends with it).
async fn copy_in(
    conn: &mut PgConnection,
    copy_sql: &str,
    owner: Option<&str>,
    buf: &[u8],
) -> Result<(), CopyFailed> {
    if let Some(role) = owner {
        sqlx::query("begin")
            .execute(&mut *conn)
            .await
            .map_err(CopyFailed::Start)?;
        if let Err(e) = sqlx::query(&format!("set local role {role}"))
            .execute(&mut *conn)
            .await
        {
            let _ = sqlx::query("rollback").execute(&mut *conn).await;
            return Err(CopyFailed::Start(e));
        }
    }
    let result = async {
        let mut copy = conn
            .copy_in_raw(copy_sql)
            .await
            .map_err(CopyFailed::Start)?;
        match copy.send(buf).await {
            Ok(_) => copy.finish().await.map(|_| ()).map_err(CopyFailed::Data),
            Err(e) => Err(CopyFailed::Data(e)),
        }
    }
    .await;
    if owner.is_some() {
        let end = if result.is_ok() { "commit" } else { "rollback" };
        let ended = sqlx::query(end).execute(&mut *conn).await;
        result?;
        ended.map_err(CopyFailed::Start)?;
        return Ok(());
    }
    result
}

/// The `create temp table` statements of stage `idx`'s staging and net
/// tables for `target`, and the target columns they hold (c1..cn).
fn staging_ddl(target: &TargetTable, idx: usize) -> (String, String, Vec<usize>) {
    let cols: Vec<usize> = target.data_columns().map(|(i, _)| i).collect();
    let typed: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(j, &i)| {
            let c = &target.columns[i];
            match &c.collation_sql {
                Some(coll) => format!("c{} {} collate {coll}", j + 1, c.type_sql),
                None => format!("c{} {}", j + 1, c.type_sql),
            }
        })
        .collect();
    let meta = "m_co pg_catalog.int8 not null, m_ord pg_catalog.int8 not null, \
                m_op pg_catalog.\"char\" not null, m_src pg_catalog.int4 not null, \
                m_pos pg_catalog.int8 not null, m_line pg_catalog.int8 not null";
    let stage = format!(
        "create temp table pg_temp.tidemark_stage_{idx} ({meta}, {}) with (autovacuum_enabled = false)",
        typed.join(", ")
    );
    let net_meta = "f_op pg_catalog.\"char\", f_co pg_catalog.int8, f_ord pg_catalog.int8, \
                    f_src pg_catalog.int4, f_pos pg_catalog.int8, f_line pg_catalog.int8, \
                    l_op pg_catalog.\"char\"";
    let net = format!(
        "create temp table pg_temp.tidemark_net_{idx} ({net_meta}, {})",
        typed.join(", ")
    );
    (stage, net, cols)
}

/// The codec's types of built-in (oid, typmod) pairs, for records without a
/// schema; a column of another type (an enum, a domain, an extension's)
/// needs the schema the records would carry.
fn column_types(
    table: &TableName,
    columns: &[(String, u32, i32, String)],
) -> anyhow::Result<Vec<tidemark_common::codec::ColumnType>> {
    columns
        .iter()
        .map(|(name, oid, typmod, sql)| {
            tidemark_common::codec::ColumnType::builtin(*oid, *typmod).ok_or_else(|| {
                anyhow!(
                    "the archive's records carry no Connect schema, and column {name} of {table} is of type {sql}, \
                     which is not built in: pg-replay needs the schema to read its values exactly; capture with \
                     value.converter.schemas.enable=true"
                )
            })
        })
        .collect()
}

enum FastOutcome {
    Done,
    Mismatch(&'static str),
}

/// Whether a database error is a constraint the target enforces (class 23)
/// or a check of a domain (23514), as opposed to a broken connection.
fn is_constraint(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c.starts_with("23"))
}

/// The error of a statement on the target; for a `TRUNCATE` that a foreign
/// key stops (a table that references one emptied and is not emptied with
/// it), what to do about it.
fn with_truncate_fix(e: sqlx::Error) -> anyhow::Error {
    let refused = e
        .as_database_error()
        .and_then(|d| d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>())
        .filter(|d| d.code() == "0A000" && d.message().contains("foreign key"))
        .map(|d| d.detail().unwrap_or_default().to_owned());
    match refused {
        Some(detail) => anyhow!(e).context(format!(
            "a target table cannot be emptied while another table references it by a foreign key ({detail}); \
             pg-replay empties a table where the archive records a TRUNCATE of it (with the tables the source \
             truncated with it) and where --from-snapshot newest starts it from a snapshot (that table alone). \
             Replay without --from-snapshot (every table from the archive's beginning), or drop that foreign key \
             in the target for the replay and add it back after it (pg-replay verify then compares the tables)"
        )),
        None => anyhow!(e),
    }
}

/// `(5,)` → `(5)`: the key's text without the placeholder column that keeps
/// a one-column row a row.
fn trim_key(text: &str) -> String {
    text.strip_suffix(",)")
        .map(|t| format!("{t})"))
        .unwrap_or_else(|| text.to_owned())
}

/// A row's key as JSON, for messages.
fn key_json(row: &Row, target: &TargetTable) -> String {
    let mut key = serde_json::Map::new();
    for &k in &target.key {
        let name = &target.columns[k].name;
        key.insert(name.clone(), row.get(name).cloned().unwrap_or(Value::Null));
    }
    Value::Object(key).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Field;

    fn row(fields: &[(&str, &str)]) -> RowSchema {
        RowSchema {
            fields: fields
                .iter()
                .map(|(n, t)| Field {
                    name: (*n).into(),
                    schema: serde_json::json!({"field": n, "parameters": {"tidemark.column.type": t}}),
                })
                .collect(),
            table_oid: None,
        }
    }

    fn cols(c: &[(&str, &str)]) -> Vec<Current> {
        c.iter()
            .map(|(a, b)| ((*a).into(), (*b).into(), None))
            .collect()
    }

    /// Fields with attnums: `(name, type, attnum)`.
    fn row_at(fields: &[(&str, &str, i32)]) -> RowSchema {
        RowSchema {
            fields: fields
                .iter()
                .map(|(n, t, a)| Field {
                    name: (*n).into(),
                    schema: serde_json::json!({"field": n, "parameters": {
                        "tidemark.column.type": t,
                        "tidemark.column.attnum": a.to_string(),
                    }}),
                })
                .collect(),
            table_oid: None,
        }
    }

    /// [`row_at`] of the source table whose OID is `oid`.
    fn row_of(oid: u32, fields: &[(&str, &str, i32)]) -> RowSchema {
        RowSchema {
            table_oid: Some(oid),
            ..row_at(fields)
        }
    }

    fn cols_at(c: &[(&str, &str, i32)]) -> Vec<Current> {
        c.iter()
            .map(|(n, t, a)| ((*n).into(), (*t).into(), Some(*a)))
            .collect()
    }

    #[test]
    fn the_attnums_of_a_source_table_created_again_are_forgotten() {
        // Old table (id, a text, b integer), a dropped: b is attnum 3.
        let mut known = KnownAttnums::default();
        let old = row_of(
            16400,
            &[("id", "integer", 1), ("a", "text", 2), ("b", "integer", 3)],
        );
        assert_eq!(known.learn(&old), None, "the first table is not another");
        known.follow(
            &[DdlStep::Drop { name: "a".into() }],
            ["id", "b"].into_iter(),
        );
        assert_eq!(
            (known.get("id"), known.get("a"), known.get("b")),
            (Some(1), None, Some(3))
        );
        // A later record of the same table keeps them.
        assert_eq!(
            known.created_again(&row_of(16400, &[("id", "integer", 1), ("b", "integer", 3)])),
            None
        );
        // Created again as (id, b integer, c text): b is attnum 2 and c
        // attnum 3, which was the old b's.
        let new = row_of(
            16500,
            &[("id", "integer", 1), ("b", "integer", 2), ("c", "text", 3)],
        );
        assert_eq!(known.created_again(&new), Some((16400, 16500)));
        let current: Vec<Current> = ["id", "b"]
            .iter()
            .zip(["integer", "integer"])
            .map(|(n, t)| ((*n).into(), t.into(), known.get(n)))
            .collect();
        // By attnum, the old b would be taken for c (renamed and retyped,
        // which stops) and b for a column added.
        assert!(matches!(
            column_diff(&current, &new).as_slice(),
            [
                DdlStep::Rename { .. },
                DdlStep::Add { .. },
                DdlStep::Retype { .. }
            ]
        ));
        // By name, as the table's attnums say nothing of the old one: c
        // is added, b is b.
        assert_eq!(
            column_diff_by_name(&current, &new),
            [DdlStep::Add {
                name: "c".into(),
                ty: Some("text".into())
            }]
        );
        // Learning the new table's record forgets the old attnums, then
        // knows the new ones, of the new OID.
        assert_eq!(known.learn(&new), Some((16400, 16500)));
        assert_eq!((known.get("b"), known.get("c")), (Some(2), Some(3)));
        assert_eq!(known.created_again(&new), None);
        // A record without an OID (an archive written before pg-source sent
        // it) is paired as before: by the attnums known.
        let mut plain = new.clone();
        plain.table_oid = None;
        assert_eq!(known.created_again(&plain), None);
        assert_eq!(known.learn(&plain), None);
        assert_eq!(known.get("c"), Some(3));
        // Attnums learnt from records without an OID belong to no known
        // table: a first record with one keeps them and tells the table.
        let mut old_archive = KnownAttnums::default();
        old_archive.learn(&row_at(&[("id", "integer", 1), ("b", "integer", 3)]));
        assert_eq!(
            old_archive.learn(&row_of(16600, &[("id", "integer", 1)])),
            None
        );
        assert_eq!(old_archive.get("b"), Some(3));
        assert_eq!(
            old_archive.created_again(&row_of(16700, &[("id", "integer", 1)])),
            Some((16600, 16700))
        );
    }

    #[test]
    fn attnums_tell_a_rename_beside_other_changes_and_a_column_added_again() {
        let now = cols_at(&[
            ("id", "integer", 1),
            ("flag", "boolean", 2),
            ("b", "text", 3),
        ]);
        // flag renamed and a column added, seen in one step: names alone
        // would drop flag (and its values) and add two columns.
        assert_eq!(
            column_diff(
                &now,
                &row_at(&[
                    ("id", "integer", 1),
                    ("soft", "boolean", 2),
                    ("b", "text", 3),
                    ("note", "text", 4)
                ])
            ),
            [
                DdlStep::Rename {
                    from: "flag".into(),
                    to: "soft".into()
                },
                DdlStep::Add {
                    name: "note".into(),
                    ty: Some("text".into())
                }
            ]
        );
        // b dropped and added again: same name, new attnum; its old values
        // are gone at the source, so they go in the target too.
        assert_eq!(
            column_diff(
                &now,
                &row_at(&[
                    ("id", "integer", 1),
                    ("flag", "boolean", 2),
                    ("b", "text", 5)
                ])
            ),
            [
                DdlStep::Drop { name: "b".into() },
                DdlStep::Add {
                    name: "b".into(),
                    ty: Some("text".into())
                }
            ]
        );
        // A rename onto a dropped column's name, and a rename chain: each
        // step in an order the target can take.
        assert_eq!(
            column_diff(&now, &row_at(&[("id", "integer", 1), ("b", "boolean", 2)])),
            [
                DdlStep::Drop { name: "b".into() },
                DdlStep::Rename {
                    from: "flag".into(),
                    to: "b".into()
                }
            ]
        );
        assert_eq!(
            column_diff(
                &now,
                &row_at(&[("id", "integer", 1), ("b", "boolean", 2), ("c", "text", 3)])
            ),
            [
                DdlStep::Rename {
                    from: "b".into(),
                    to: "c".into()
                },
                DdlStep::Rename {
                    from: "flag".into(),
                    to: "b".into()
                }
            ]
        );
        // Same attnum, another name and type: renamed and retyped (the
        // retype then stops, as it may alter values).
        let steps = column_diff(
            &now,
            &row_at(&[("id", "integer", 1), ("x", "integer", 2), ("b", "text", 3)]),
        );
        assert_eq!(
            steps,
            [
                DdlStep::Rename {
                    from: "flag".into(),
                    to: "x".into()
                },
                DdlStep::Retype {
                    name: "x".into(),
                    from: "boolean".into(),
                    to: "integer".into()
                }
            ]
        );
        assert!(steps[1].clause().is_err());
        // A target column with no attnum known, against a record with
        // attnums: an added column is sure, a rename is not.
        let half = vec![
            ("id".to_string(), "integer".to_string(), Some(1)),
            ("a".to_string(), "text".to_string(), None),
        ];
        assert_eq!(
            column_diff(
                &half,
                &row_at(&[("id", "integer", 1), ("a", "text", 2), ("d", "text", 4)])
            ),
            [DdlStep::Add {
                name: "d".into(),
                ty: Some("text".into())
            }]
        );
        let steps = column_diff(&half, &row_at(&[("id", "integer", 1), ("c", "text", 2)]));
        assert!(
            matches!(&steps[..], [DdlStep::Unproven { columns, .. }] if columns == "a"),
            "{steps:?}"
        );
        assert!(steps[0].clause().is_err());
        // Two target columns known by one attnum (a stale entry): refused.
        let stale = cols_at(&[("id", "integer", 1), ("c", "text", 2), ("a", "text", 2)]);
        let steps = column_diff(
            &stale,
            &row_at(&[("id", "integer", 1), ("c", "text", 2), ("a", "text", 3)]),
        );
        assert!(
            matches!(&steps[..], [DdlStep::Unproven { .. }]),
            "{steps:?}"
        );
        // The fault run's case: a column added with no attnum known (its
        // records did not carry one), then a rename proven by attnum: made.
        let late = vec![
            ("id".to_string(), "integer".to_string(), Some(1)),
            ("flag".to_string(), "boolean".to_string(), Some(5)),
            ("note".to_string(), "text".to_string(), None),
        ];
        assert_eq!(
            column_diff(
                &late,
                &row_at(&[
                    ("id", "integer", 1),
                    ("soft", "boolean", 5),
                    ("note", "text", 7)
                ])
            ),
            [DdlStep::Rename {
                from: "flag".into(),
                to: "soft".into()
            }]
        );
        // Same attnum and name, a wider type: a retype.
        assert_eq!(
            column_diff(
                &now,
                &row_at(&[
                    ("id", "bigint", 1),
                    ("flag", "boolean", 2),
                    ("b", "text", 3)
                ])
            ),
            [DdlStep::Retype {
                name: "id".into(),
                from: "integer".into(),
                to: "bigint".into()
            }]
        );
    }

    #[test]
    fn column_changes_are_told_apart() {
        let now = cols(&[("id", "integer"), ("a", "text"), ("b", "integer")]);
        assert_eq!(
            column_diff(
                &now,
                &row(&[("id", "integer"), ("a", "text"), ("b", "integer")])
            ),
            []
        );
        assert_eq!(
            column_diff(
                &now,
                &row(&[("id", "integer"), ("x", "text"), ("b", "integer")])
            ),
            [DdlStep::Rename {
                from: "a".into(),
                to: "x".into()
            }]
        );
        // A new name elsewhere, or of another type, is a drop and an add.
        assert_eq!(
            column_diff(
                &now,
                &row(&[("id", "integer"), ("b", "integer"), ("x", "text")])
            ),
            [
                DdlStep::Drop { name: "a".into() },
                DdlStep::Add {
                    name: "x".into(),
                    ty: Some("text".into())
                }
            ]
        );
        assert_eq!(
            column_diff(
                &now,
                &row(&[("id", "integer"), ("a", "text"), ("b", "bigint")])
            ),
            [DdlStep::Retype {
                name: "b".into(),
                from: "integer".into(),
                to: "bigint".into()
            }]
        );
    }

    #[test]
    fn only_types_that_keep_every_value_widen() {
        for (from, to) in [
            ("smallint", "integer"),
            ("integer", "bigint"),
            ("integer", "numeric"),
            ("character varying(10)", "character varying(20)"),
            ("character varying(10)", "text"),
            ("character varying(10)", "character varying"),
            ("numeric(10,2)", "numeric(12,2)"),
            ("numeric(10,2)", "numeric"),
            ("real", "double precision"),
        ] {
            assert!(widens(from, to), "{from} -> {to}");
        }
        for (from, to) in [
            ("bigint", "integer"),
            ("text", "integer"),
            ("character varying(20)", "character varying(10)"),
            ("numeric(10,2)", "numeric(12,3)"),
            ("numeric", "numeric(10,2)"),
            ("integer", "text"),
            ("double precision", "real"),
        ] {
            assert!(!widens(from, to), "{from} -> {to}");
        }
    }
}
