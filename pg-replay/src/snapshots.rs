//! Incremental snapshots in the archive, and a replay that starts a table
//! from its newest complete one (`--from-snapshot newest`).
//!
//! pg-source (changelog mode) sends an incremental snapshot of a table that
//! entered the connector's set, or that a signal asked for, as chunks in
//! key order, each its own unit between the units of the stream; every
//! event of a chunk carries `source.snapshot: "incremental"` and
//! `source.snapshot_chunk` (`first`, `middle`, `last`, `only`). A chunk read
//! in snapshot `S` is placed in the stream at `S`: its rows are the table's
//! rows of its key range as they were there.
//!
//! **From the beginning** the archive replays as ever: an incremental read
//! is an upsert (a snapshot on demand re-reads keys the archive holds, with
//! the values a replay has at that point anyway).
//!
//! **From a snapshot.** A snapshot is *complete* before the replay's end
//! (`--until`) when its last chunk's unit is at or before it. Starting
//! table `T` from its newest complete snapshot, whose chunks are the units
//! `F..=L`, a replay leaves out every event of `T` in units before `F`,
//! empties `T` at the start of `F`, and applies `T`'s events in `F..=L` as
//! upserts (an update writes its row whole, a delete of a key not held is
//! nothing), then strictly as ever. This equals a replay from the
//! beginning at `L` and after: take any key `k`, read by the chunk placed
//! at `S_k` (in `F..=L`). After `S_k` both replays apply the same events to
//! the same row (the chunk's, which is the source's row at `S_k`, or none).
//! Before `S_k`, within the window, the replay from the snapshot holds `k`
//! only as the after-image of `k`'s last create or update since `F` (the
//! row as it then was), or not at all after a delete; if the source holds
//! `k` at `S_k` the chunk writes it, and if it does not, `k`'s last event
//! before `S_k` was a delete (or there was none since `F`, and the target
//! never held it): absent in both. Keys that no chunk reads were not in the
//! table at any chunk's snapshot covering them, so the same argument with
//! the chunk that covers their range holds. Within the window the table is
//! partial: a `--until` inside it gives the rows read so far.
//!
//! **A replay that ends inside an unfinished snapshot.** When the snapshot
//! is the table's first appearance in the archive (a table that entered the
//! set) or begins with a TRUNCATE event (it entered again), a replay from
//! the beginning holds only the rows read so far: pg-replay warns, naming
//! the table. A snapshot on demand of a table the archive already held
//! leaves a replay from the beginning whole (its changes were all sent).

use std::collections::{BTreeMap, BTreeSet};

use tidemark_common::pg::TableName;

use crate::record::ChunkPlace;
use crate::units::Until;

/// Where a replay starts each table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FromSnapshot {
    /// Every table from the archive's beginning.
    #[default]
    Beginning,
    /// Each table from its newest incremental snapshot complete before
    /// `--until` (from the beginning if it has none).
    Newest,
}

/// One table's snapshots, as seen so far.
#[derive(Debug, Clone, Default)]
struct Table {
    /// The first unit with an event of the table.
    earliest: Option<i64>,
    /// A snapshot begun and not ended.
    open: Option<Open>,
    /// The newest complete snapshot: its first and last chunks' units.
    complete: Option<(i64, i64)>,
}

#[derive(Debug, Clone, Copy)]
struct Open {
    first: i64,
    /// A replay from the beginning lacks the rows not read yet: the
    /// snapshot is the table's first appearance, or begins with a TRUNCATE.
    partial: bool,
}

/// The incremental snapshots of the archive's tables up to the replay's end.
#[derive(Debug, Clone, Default)]
pub struct Windows {
    tables: BTreeMap<TableName, Table>,
}

/// A snapshot unfinished at the replay's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfinished {
    /// The table.
    pub table: TableName,
    /// Its first chunk's unit.
    pub first: i64,
    /// A replay from the beginning holds the table partially.
    pub partial: bool,
}

/// Whether the unit `commit_order` committed at `ts_us` is within `until`.
pub fn within(until: Until, commit_order: i64, ts_us: i64) -> bool {
    match until {
        Until::End => true,
        Until::Time(t) => ts_us <= t,
        Until::CommitOrder(c) => commit_order <= c,
    }
}

impl Windows {
    /// Takes an event of `table` in unit `commit_order` (within the
    /// replay's end), a TRUNCATE or not, with its chunk place if it is an
    /// incremental snapshot's.
    pub fn see(
        &mut self,
        table: &TableName,
        commit_order: i64,
        truncate: bool,
        chunk: Option<ChunkPlace>,
    ) {
        if !self.tables.contains_key(table) {
            self.tables.insert(table.clone(), Table::default());
        }
        let t = self.tables.get_mut(table).expect("inserted above");
        let before = t.earliest;
        t.earliest = Some(before.map_or(commit_order, |e| e.min(commit_order)));
        let Some(place) = chunk else { return };
        if matches!(place, ChunkPlace::First | ChunkPlace::Only) {
            match &mut t.open {
                Some(o) if o.first == commit_order => o.partial |= truncate,
                _ => {
                    t.open = Some(Open {
                        first: commit_order,
                        partial: truncate || before.is_none_or(|e| e >= commit_order),
                    })
                }
            }
        }
        if matches!(place, ChunkPlace::Last | ChunkPlace::Only) {
            if let Some(o) = t.open.take() {
                t.complete = Some((o.first, commit_order));
            }
        }
    }

    /// Per table, the first and last units of its newest complete snapshot.
    pub fn newest_complete(&self) -> BTreeMap<TableName, (i64, i64)> {
        self.tables
            .iter()
            .filter_map(|(name, t)| t.complete.map(|c| (name.clone(), c)))
            .collect()
    }

    /// The snapshots begun and not ended.
    pub fn unfinished(&self) -> Vec<Unfinished> {
        self.tables
            .iter()
            .filter_map(|(name, t)| {
                t.open.map(|o| Unfinished {
                    table: name.clone(),
                    first: o.first,
                    partial: o.partial,
                })
            })
            .collect()
    }
}

/// What a replay from snapshots does with each table (see the module doc).
#[derive(Debug, Clone, Default)]
pub struct Starts {
    /// Per table, the window `(first, last)` it starts from.
    windows: BTreeMap<TableName, (i64, i64)>,
    /// Tables emptied at their window's start already (this run).
    reset: BTreeSet<TableName>,
}

/// What to do with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treat {
    /// Before the table's snapshot: left out.
    Skip,
    /// The snapshot's first unit, first event seen: empty the table, then
    /// apply it as an upsert.
    ResetThenUpsert,
    /// Within the snapshot: an upsert.
    Upsert,
    /// As ever.
    Apply,
}

impl Starts {
    /// Starts each table of `windows`' from its window.
    pub fn new(windows: BTreeMap<TableName, (i64, i64)>) -> Self {
        Self {
            windows,
            reset: BTreeSet::new(),
        }
    }

    /// Whether no table starts from a snapshot.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// The tables and their windows.
    pub fn windows(&self) -> &BTreeMap<TableName, (i64, i64)> {
        &self.windows
    }

    /// How to treat an event of `table` in unit `commit_order`.
    pub fn treat(&mut self, table: &TableName, commit_order: i64) -> Treat {
        let Some(&(first, last)) = self.windows.get(table) else {
            return Treat::Apply;
        };
        if commit_order < first {
            Treat::Skip
        } else if commit_order == first && self.reset.insert(table.clone()) {
            Treat::ResetThenUpsert
        } else if commit_order <= last {
            Treat::Upsert
        } else {
            Treat::Apply
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> TableName {
        TableName::parse(name).unwrap()
    }

    #[test]
    fn the_newest_complete_snapshot_is_found_and_an_unfinished_one_told() {
        let mut w = Windows::default();
        let a = t("public.a");
        w.see(&a, 1, false, None);
        w.see(&a, 2, false, Some(ChunkPlace::First));
        w.see(&a, 3, false, Some(ChunkPlace::Last));
        w.see(&a, 5, false, Some(ChunkPlace::Only));
        w.see(&a, 7, false, Some(ChunkPlace::First));
        w.see(&a, 7, false, Some(ChunkPlace::First));
        assert_eq!(w.newest_complete()[&a], (5, 5));
        // A re-snapshot of a table the archive held: a replay from the
        // beginning is whole.
        assert_eq!(
            w.unfinished(),
            vec![Unfinished {
                table: a.clone(),
                first: 7,
                partial: false
            }]
        );
        // A table whose first events are its snapshot, and one whose
        // snapshot opens with a TRUNCATE: partial.
        let b = t("public.b");
        w.see(&b, 4, false, Some(ChunkPlace::First));
        let c = t("public.c");
        w.see(&c, 1, false, None);
        w.see(&c, 6, true, Some(ChunkPlace::First));
        w.see(&c, 6, false, Some(ChunkPlace::First));
        let partial: Vec<_> = w
            .unfinished()
            .into_iter()
            .filter(|u| u.partial)
            .map(|u| u.table)
            .collect();
        assert_eq!(partial, vec![b, c]);
    }

    #[test]
    fn a_table_skips_before_its_snapshot_resets_once_and_upserts_within() {
        let a = t("public.a");
        let mut s = Starts::new([(a.clone(), (4, 6))].into_iter().collect());
        assert_eq!(s.treat(&a, 3), Treat::Skip);
        assert_eq!(s.treat(&a, 4), Treat::ResetThenUpsert);
        assert_eq!(s.treat(&a, 4), Treat::Upsert);
        assert_eq!(s.treat(&a, 6), Treat::Upsert);
        assert_eq!(s.treat(&a, 7), Treat::Apply);
        assert_eq!(s.treat(&t("public.b"), 1), Treat::Apply);
    }
}
