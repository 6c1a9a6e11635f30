//! Unit assembly: which source transactions (units) the archive holds whole,
//! and which of them may be applied now, in commit order.
//!
//! A unit is what pg-source's envelope calls a transaction: every event
//! carries the unit's `commit_order` and its own `total_order` (1-based), and
//! the unit's last event carries `event_count`. A unit is *complete* when
//! every total_order from 1 to event_count is present, each once. A unit may
//! be applied once it is complete and no unit before it can still turn up:
//!
//! - when the events name the unit before them (`prev_commit_order`), that
//!   unit must be the last one applied;
//! - otherwise every stream must have passed the unit's commit_order (each
//!   stream holds its units in commit order), have ended, or be a Kafka
//!   partition read to its end (pg-source commits units to Kafka in commit
//!   order, so a partition read to its end holds nothing older to come);
//!   following a segmented archive, whose topics may gain partitions, a
//!   partition counts only once its completeness mark, as it was when the
//!   archive's partitions were last listed, is past the unit
//!   ([`Units::follow_listing`]).
//!
//! Units are applied as a prefix in commit order: the run of ready units
//! stops at the first that is not ready, and at the point in time asked for
//! (`--until*`), so the target only passes through states the source had.
//!
//! A unit once ready stays ready (nothing of it or before it can come any
//! more), so it leaves the pending units for a compact record of 40 bytes
//! ([`Units::fold`]) until its run is applied: a run of many small source
//! transactions waits in little memory.

use std::collections::{BTreeMap, VecDeque};

use crate::archive::{StreamId, StreamPos};
use smallvec::SmallVec;

/// Where the replay stops, in the terms each capture mode can know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Until {
    /// Everything the archive holds.
    #[default]
    End,
    /// Units whose commit time (`source.ts_us`) is at most this, up to the
    /// first one after it.
    Time(i64),
    /// Units whose commit_order is at most this (logical mode: a commit
    /// LSN; also what `--until-txid` becomes once its unit is found).
    CommitOrder(i64),
}

/// Why the archive cannot be replayed further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// The same event twice.
    #[error("unit {commit_order} holds total_order {total_order} twice")]
    Duplicate {
        /// The unit.
        commit_order: i64,
        /// The event.
        total_order: i64,
    },
    /// Event counts that disagree.
    #[error("unit {commit_order} says it has {a} events in one place and {b} in another")]
    CountMismatch {
        /// The unit.
        commit_order: i64,
        /// One count.
        a: i64,
        /// The other.
        b: i64,
    },
    /// More events than the unit has.
    #[error("unit {commit_order} holds total_order {total_order}, beyond its event_count {count}")]
    BeyondCount {
        /// The unit.
        commit_order: i64,
        /// The event.
        total_order: i64,
        /// Its count.
        count: i64,
    },
    /// An event of a unit before the last one applied in this run.
    #[error(
        "an event of unit {commit_order} arrived after unit {applied} was applied: the archive holds \
         units out of commit order (several partitions interleaved in one file; this needs the events' \
         prev_commit_order) or holds this unit twice"
    )]
    Late {
        /// The late unit.
        commit_order: i64,
        /// The last unit applied.
        applied: i64,
    },
    /// The chain of units is broken.
    #[error(
        "unit {commit_order} follows unit {prev}, but the last unit applied is {applied}: {why}"
    )]
    Chain {
        /// The unit.
        commit_order: i64,
        /// The unit it says comes before it.
        prev: String,
        /// The last applied.
        applied: String,
        /// What that means.
        why: &'static str,
    },
    /// Too many units wait behind one not ready.
    #[error(
        "{waiting} units wait in memory behind unit {commit_order}, {why}. pg-replay keeps at most \
         --max-pending-units (TIDEMARK_MAX_PENDING_UNITS, here {max}) units waiting, since each holds \
         memory until it is applied: raise it if the machine has the memory (a waiting unit takes a \
         few hundred bytes), or replay up to an earlier point (--until) and then the rest"
    )]
    TooManyPending {
        /// The first unit not ready.
        commit_order: i64,
        /// How many wait.
        waiting: usize,
        /// The bound (`--max-pending-units`).
        max: usize,
        /// Why the first unit is not ready.
        why: Waiting,
    },
}

impl UnitError {
    /// Names the streams an error speaks of, by `name` (a file, a
    /// partition's folder, a topic partition), instead of by number.
    pub fn name_streams(mut self, name: impl Fn(StreamId) -> String) -> Self {
        if let UnitError::TooManyPending {
            why: Waiting::Streams { ids, names },
            ..
        } = &mut self
        {
            *names = ids.iter().map(|id| name(*id)).collect();
        }
        self
    }
}

/// Why a unit is not ready, for [`UnitError::TooManyPending`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waiting {
    /// Not all its events are here.
    Incomplete {
        /// Events read.
        events: i64,
        /// Its event_count, once its last event was read.
        count: Option<i64>,
        /// The first total_order missing.
        first_missing: i64,
    },
    /// It is whole and names the unit before it, which is not here yet.
    Prev(i64),
    /// It is whole and does not name the unit before it: it waits until
    /// no stream can still hold an earlier one.
    Streams {
        /// The streams that still may.
        ids: Vec<StreamId>,
        /// Their names, once given ([`UnitError::name_streams`]).
        names: Vec<String>,
    },
}

impl std::fmt::Display for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Waiting::Incomplete {
                events,
                count,
                first_missing,
            } => {
                match count {
                    Some(n) => write!(
                        f,
                        "which is still incomplete (it holds {events} of its {n} events; total_order \
                         {first_missing} is the first missing)"
                    )?,
                    None => write!(
                        f,
                        "which is still incomplete (it holds {events} events but not its last one, the \
                         one with event_count)"
                    )?,
                }
                write!(
                    f,
                    ": an event of it is missing from the archive, or a stream of the archive that holds \
                     it is read far behind the others"
                )
            }
            Waiting::Prev(p) => write!(
                f,
                "which is whole but names unit {p} before it, which is not read yet: a stream of the archive \
                 that holds it is read far behind the others, or it is missing from the archive"
            ),
            Waiting::Streams { ids, names } => {
                let which = if names.is_empty() {
                    ids.iter()
                        .map(|i| format!("stream {i}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                } else {
                    names.join(", ")
                };
                write!(
                    f,
                    "which is whole, but its events do not name the unit before them (no \
                     transaction.prev_commit_order: they were written by a pg-source from before it carried \
                     it), so it is applied only once no part of the archive can still hold an earlier unit, \
                     and {which} may: not read past it yet, or, following a segmented archive, with no \
                     completeness mark past it yet (file-sink's checkpoint)"
                )
            }
        }
    }
}

/// Seen total_orders of a unit, as sorted disjoint ranges `[a, b)`, so that
/// events arriving in order cost one range whatever the unit's size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Seen {
    /// Inline for the usual one range: a long replay keeps many units
    /// pending, and a heap allocation each would double their memory.
    ranges: SmallVec<[(i64, i64); 1]>,
}

impl Seen {
    /// Adds `n`; false when it was already there.
    fn insert(&mut self, n: i64) -> bool {
        // Fast path: the next one after the last range.
        if let Some(last) = self.ranges.last_mut() {
            if last.1 == n {
                last.1 += 1;
                return true;
            }
        }
        let i = self.ranges.partition_point(|r| r.1 < n);
        if let Some(r) = self.ranges.get(i) {
            if r.0 <= n && n < r.1 {
                return false;
            }
        }
        // Join with the range ending at n and/or the one starting at n + 1.
        let joins_left = i < self.ranges.len() && self.ranges[i].1 == n;
        if joins_left {
            self.ranges[i].1 += 1;
            if i + 1 < self.ranges.len() && self.ranges[i + 1].0 == n + 1 {
                self.ranges[i].1 = self.ranges[i + 1].1;
                self.ranges.remove(i + 1);
            }
            return true;
        }
        if i < self.ranges.len() && self.ranges[i].0 == n + 1 {
            self.ranges[i].0 = n;
            return true;
        }
        self.ranges.insert(i, (n, n + 1));
        true
    }

    fn len(&self) -> i64 {
        self.ranges.iter().map(|r| r.1 - r.0).sum()
    }

    /// Whether exactly 1..=count are present.
    fn is_complete(&self, count: i64) -> bool {
        count == 0 && self.ranges.is_empty() || self.ranges.as_slice() == [(1, count + 1)]
    }

    /// The first missing total_order up to `count` (or after the last seen).
    fn first_missing(&self) -> i64 {
        match self.ranges.first() {
            Some(&(1, end)) => end,
            _ => 1,
        }
    }
}

/// What the tracker knows of one unit.
#[derive(Debug, Clone)]
pub struct UnitState {
    seen: Seen,
    /// event_count, once the last event was read.
    pub count: Option<i64>,
    /// The unit before, when the events say (`Some(None)`: the first unit).
    pub prev: Option<Option<i64>>,
    /// Commit time, µs.
    pub ts_us: i64,
    /// A transaction of the unit (logical: the transaction).
    pub tx_id: Option<i64>,
    /// The largest change LSN seen (logical mode).
    pub lsn: Option<i64>,
    /// The first event's place in each stream it has events in.
    pub first_pos: SmallVec<[(StreamId, StreamPos); 1]>,
    /// Changes of mapped tables staged for it.
    pub staged: u64,
    /// Whether it holds a TRUNCATE.
    pub has_truncate: bool,
}

impl UnitState {
    /// Events seen.
    pub fn events(&self) -> i64 {
        self.seen.len()
    }

    /// Whether every event is here.
    pub fn is_complete(&self) -> bool {
        self.count.is_some_and(|c| self.seen.is_complete(c))
    }

    /// The first missing event's total_order.
    pub fn first_missing(&self) -> i64 {
        self.seen.first_missing()
    }
}

/// One event, as the tracker sees it.
#[derive(Debug, Clone, Copy)]
pub struct EventInfo {
    /// The unit.
    pub commit_order: i64,
    /// The event's place in it.
    pub total_order: i64,
    /// event_count, on the last event.
    pub event_count: Option<i64>,
    /// prev_commit_order, when carried.
    pub prev: Option<Option<i64>>,
    /// Commit time, µs.
    pub ts_us: i64,
    /// Transaction id.
    pub tx_id: Option<i64>,
    /// WAL position.
    pub lsn: Option<i64>,
    /// The stream and place it was read from.
    pub stream: StreamId,
    /// Its place.
    pub pos: StreamPos,
    /// Whether it is a TRUNCATE.
    pub truncate: bool,
}

/// What to do with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Stage it: its unit is not applied yet.
    Stage,
    /// Skip it: its unit was applied before this run.
    Skip,
}

/// Per stream: how far it has been read, in commit order and position.
#[derive(Debug, Clone, Default)]
struct StreamState {
    /// The largest commit_order read from it.
    watermark: Option<i64>,
    /// It will hold nothing more (not following).
    ended: bool,
    /// A Kafka partition read to its end (see the module doc).
    caught_up_partition: bool,
    /// A segmented archive's partition read past its completeness mark:
    /// it holds nothing more of the units before it.
    complete_before: Option<i64>,
    /// Where its next record starts.
    read: StreamPos,
    /// A partition of a segmented archive that may grow while the replay
    /// follows it ([`Units::follow_listing`]): only its mark says what it
    /// holds nothing more of, not its head.
    by_mark: bool,
    /// `complete_before` as it was when the archive's partitions were last
    /// listed ([`Units::partitions_listed`]).
    listed: Option<i64>,
}

/// The run of units ready to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyRun {
    /// The last unit of the run.
    pub last: i64,
    /// How many units.
    pub units: usize,
    /// Changes staged for them.
    pub staged: u64,
    /// Its commit time.
    pub ts_us: i64,
    /// Its transaction.
    pub tx_id: Option<i64>,
    /// Its largest LSN.
    pub lsn: Option<i64>,
    /// Whether the run reaches the point in time asked for: nothing after it
    /// is to be applied.
    pub reaches_end: bool,
}

/// A unit known ready (complete, in order, within the point in time) and
/// not applied yet, as little as a run needs of it: a long run of small
/// source transactions waits in 40 bytes each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReadyUnit {
    commit_order: i64,
    ts_us: i64,
    /// [`NONE`] for none.
    tx_id: i64,
    /// [`NONE`] for none.
    lsn: i64,
    staged: u64,
}

/// `None` of a [`ReadyUnit`]'s optional numbers.
const NONE: i64 = i64::MIN;

fn some(v: i64) -> Option<i64> {
    (v != NONE).then_some(v)
}

/// What a run of ready units up to some unit holds, for its position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunSummary {
    /// Units.
    pub units: u64,
    /// Changes staged for them.
    pub staged: u64,
    /// The last unit's commit time.
    pub ts_us: Option<i64>,
    /// Its transaction.
    pub tx_id: Option<i64>,
    /// Its largest LSN.
    pub lsn: Option<i64>,
}

/// Tracks units from the events read until they are applied.
#[derive(Debug)]
pub struct Units {
    /// The last unit applied before this run (from the stored position).
    floor: Option<i64>,
    /// The last unit applied, this run or before.
    applied: Option<i64>,
    /// Units read and not known ready yet.
    pending: BTreeMap<i64, UnitState>,
    /// Units known ready and not applied, in commit order, all before the
    /// pending ones ([`Units::fold`]).
    ready: VecDeque<ReadyUnit>,
    /// Changes staged for `ready`.
    ready_staged: u64,
    /// Per stream, the earliest first event of a unit in `ready` (`None`:
    /// none there). Kept until `ready` is empty: a resume point earlier than
    /// needed only re-reads events that are then skipped.
    ready_first: Vec<Option<StreamPos>>,
    streams: Vec<StreamState>,
    /// Per stream, the first record set aside unread (see
    /// [`Units::hold`]): a resume point is never after it.
    holds: Vec<Option<StreamPos>>,
    until: Until,
    /// Set once a unit past `until` is in order: nothing from it on applies.
    end: Option<i64>,
    max_pending: usize,
}

impl Units {
    /// A tracker resuming after `applied` (`None`: nothing applied yet),
    /// over `streams` streams starting at `starts`.
    pub fn new(
        applied: Option<i64>,
        starts: &[StreamPos],
        until: Until,
        max_pending: usize,
    ) -> Self {
        Self {
            floor: applied,
            applied,
            pending: BTreeMap::new(),
            ready: VecDeque::new(),
            ready_staged: 0,
            ready_first: vec![None; starts.len()],
            holds: vec![None; starts.len()],
            streams: starts
                .iter()
                .map(|s| StreamState {
                    read: *s,
                    ..Default::default()
                })
                .collect(),
            until,
            end: None,
            max_pending,
        }
    }

    /// The replay follows a segmented archive, whose topics may gain
    /// partitions (and which may gain topics) while it runs, and
    /// `segments` says which streams are its partitions. A partition not
    /// listed yet has no stream, and one file-sink has not seen yet is not
    /// even in `topic.json`: how far the others have been read (their
    /// heads) says nothing of it. Their completeness marks do: file-sink
    /// notes a partition in `topic.json` before any partition's mark
    /// covers a unit with events in it. So from now on such a stream holds
    /// nothing more of a unit once its mark, as it was when the partitions
    /// were last listed ([`Units::partitions_listed`]), is past the unit:
    /// what it had read then, it had read before the listing, which gave
    /// every partition counted a stream. Units that name the one before
    /// them (`prev_commit_order`) need none of this.
    pub fn follow_listing(&mut self, segments: impl Fn(StreamId) -> bool) {
        for (id, s) in self.streams.iter_mut().enumerate() {
            s.by_mark = segments(id as StreamId);
        }
    }

    /// A partition that appeared in the segmented archive followed
    /// ([`Units::follow_listing`]), resuming at `start`; its id is the next
    /// one. Until its mark passes a unit, that unit and every later one
    /// whose place in the order rests on the streams' marks waits for it.
    pub fn add_stream(&mut self, start: StreamPos) {
        self.streams.push(StreamState {
            read: start,
            by_mark: true,
            ..Default::default()
        });
        self.ready_first.push(None);
        self.holds.push(None);
    }

    /// The archive's partitions were listed, and every one listed has a
    /// stream: the marks the streams have now count.
    pub fn partitions_listed(&mut self) {
        for s in &mut self.streams {
            s.listed = s.complete_before;
        }
    }

    /// The last unit applied.
    pub fn applied(&self) -> Option<i64> {
        self.applied
    }

    /// Units read and not known ready: incomplete, or waiting for a unit
    /// before them.
    pub fn pending(&self) -> &BTreeMap<i64, UnitState> {
        &self.pending
    }

    /// Units read and not applied, ready or not.
    pub fn waiting(&self) -> usize {
        self.pending.len() + self.ready.len()
    }

    /// Units known ready and not applied.
    pub fn ready_units(&self) -> usize {
        self.ready.len()
    }

    /// Changes staged for the units not applied.
    pub fn staged(&self) -> u64 {
        self.ready_staged + self.pending.values().map(|u| u.staged).sum::<u64>()
    }

    /// Records an event; says whether to stage it.
    ///
    /// Fails on a duplicate event, counts that disagree, an event beyond its
    /// unit's count, an event of a unit before the last applied in this run,
    /// or too many units waiting behind an incomplete one.
    pub fn add(&mut self, e: &EventInfo, next: StreamPos) -> Result<Disposition, UnitError> {
        let stream = &mut self.streams[e.stream as usize];
        stream.read = next;
        stream.watermark = Some(
            stream
                .watermark
                .map_or(e.commit_order, |w| w.max(e.commit_order)),
        );
        if self.floor.is_some_and(|f| e.commit_order <= f) {
            return Ok(Disposition::Skip);
        }
        if let Some(applied) = self.applied {
            if e.commit_order <= applied {
                return Err(UnitError::Late {
                    commit_order: e.commit_order,
                    applied,
                });
            }
        }
        if !self.pending.contains_key(&e.commit_order) && self.pending.len() >= self.max_pending {
            // Those that became ready since the last fold leave first.
            self.fold()?;
            if self.pending.len() >= self.max_pending {
                return Err(self.too_many_pending());
            }
        }
        let unit = self
            .pending
            .entry(e.commit_order)
            .or_insert_with(|| UnitState {
                seen: Seen::default(),
                count: None,
                prev: None,
                ts_us: e.ts_us,
                tx_id: e.tx_id,
                lsn: None,
                first_pos: SmallVec::new(),
                staged: 0,
                has_truncate: false,
            });
        if let Some(n) = e.event_count {
            match unit.count {
                Some(c) if c != n => {
                    return Err(UnitError::CountMismatch {
                        commit_order: e.commit_order,
                        a: c,
                        b: n,
                    })
                }
                _ => unit.count = Some(n),
            }
        }
        if let Some(c) = unit.count {
            let beyond = if e.total_order > c {
                Some(e.total_order)
            } else {
                unit.seen.ranges.last().map(|r| r.1 - 1).filter(|&m| m > c)
            };
            if let Some(total_order) = beyond {
                return Err(UnitError::BeyondCount {
                    commit_order: e.commit_order,
                    total_order,
                    count: c,
                });
            }
        }
        if !unit.seen.insert(e.total_order) {
            return Err(UnitError::Duplicate {
                commit_order: e.commit_order,
                total_order: e.total_order,
            });
        }
        if e.prev.is_some() {
            unit.prev = e.prev;
        }
        if e.lsn.is_some() {
            unit.lsn = unit.lsn.max(e.lsn);
        }
        if unit.tx_id.is_none() {
            unit.tx_id = e.tx_id;
        }
        unit.has_truncate |= e.truncate;
        match unit.first_pos.iter_mut().find(|(s, _)| *s == e.stream) {
            Some(_) => {}
            None => unit.first_pos.push((e.stream, e.pos)),
        }
        Ok(Disposition::Stage)
    }

    /// The error for too many pending units: why the first is not ready.
    fn too_many_pending(&self) -> UnitError {
        let (&co, unit) = self.pending.iter().next().expect("not empty");
        let why = if !unit.is_complete() {
            Waiting::Incomplete {
                events: unit.events(),
                count: unit.count,
                first_missing: unit.first_missing(),
            }
        } else if let Some(Some(p)) = unit.prev {
            Waiting::Prev(p)
        } else {
            Waiting::Streams {
                ids: (0..self.streams.len() as StreamId)
                    .filter(|&id| !self.stream_past(id, co))
                    .collect(),
                names: Vec::new(),
            }
        };
        UnitError::TooManyPending {
            commit_order: co,
            waiting: self.pending.len(),
            max: self.max_pending,
            why,
        }
    }

    /// Counts a staged change of a unit.
    pub fn count_staged(&mut self, commit_order: i64) {
        if let Some(u) = self.pending.get_mut(&commit_order) {
            u.staged += 1;
        } else if let Ok(i) = self
            .ready
            .binary_search_by_key(&commit_order, |u| u.commit_order)
        {
            // Its last event made it ready before it was staged.
            self.ready[i].staged += 1;
            self.ready_staged += 1;
        }
    }

    /// Records that a stream was read up to `next` without an event (a
    /// record of no unit, a tombstone).
    pub fn advance(&mut self, stream: StreamId, next: StreamPos) {
        self.streams[stream as usize].read = next;
    }

    /// A record of unit `commit_order` was read from `stream` at `pos` and
    /// set aside, not added (it waits for the units before a schema change
    /// of its table, see the crate's replay loop): the stream has reached
    /// that unit, and resumes no later than `pos` until
    /// [`Units::release_holds`].
    pub fn hold(&mut self, stream: StreamId, commit_order: i64, pos: StreamPos) {
        let s = &mut self.streams[stream as usize];
        s.watermark = Some(s.watermark.map_or(commit_order, |w| w.max(commit_order)));
        let hold = &mut self.holds[stream as usize];
        if hold.is_none_or(|h| (pos.offset, pos.line) < (h.offset, h.line)) {
            *hold = Some(pos);
        }
    }

    /// The records set aside are taken up again (added, or set aside anew).
    pub fn release_holds(&mut self) {
        self.holds.iter_mut().for_each(|h| *h = None);
    }

    /// Whether every unit before `commit_order` is ready or applied: none is
    /// pending, and none can still come (the unit's `prev_commit_order`
    /// names the last of them; without it, every stream has passed it).
    /// The unit itself must have been added; one folded into the ready ones
    /// has everything before it ready.
    ///
    /// Fails as [`Units::fold`] does.
    pub fn before_is_ready(&mut self, commit_order: i64) -> Result<bool, UnitError> {
        self.fold()?;
        if self.pending.range(..commit_order).next().is_some() {
            return Ok(false);
        }
        let Some(unit) = self.pending.get(&commit_order) else {
            return Ok(true);
        };
        let last = self.ready.back().map(|u| u.commit_order).or(self.applied);
        self.in_order(commit_order, unit, last)
    }

    /// The stream will hold nothing more.
    pub fn end_stream(&mut self, stream: StreamId) {
        self.streams[stream as usize].ended = true;
    }

    /// A Kafka partition was read to its end.
    pub fn partition_caught_up(&mut self, stream: StreamId) {
        self.streams[stream as usize].caught_up_partition = true;
    }

    /// A segmented archive's partition holds nothing more of the units
    /// before `commit_order`.
    pub fn stream_complete_before(&mut self, stream: StreamId, commit_order: i64) {
        let s = &mut self.streams[stream as usize];
        s.complete_before = s.complete_before.max(Some(commit_order));
    }

    /// A Kafka partition received a record again.
    pub fn partition_active(&mut self, stream: StreamId) {
        self.streams[stream as usize].caught_up_partition = false;
    }

    /// Whether every stream has ended.
    pub fn all_ended(&self) -> bool {
        self.streams.iter().all(|s| s.ended)
    }

    /// Whether the point in time asked for has been reached: nothing more
    /// will be applied.
    pub fn reached_end(&self) -> bool {
        self.end.is_some()
    }

    /// Whether no stream can still hold a unit at or before `commit_order`.
    fn streams_past(&self, commit_order: i64) -> bool {
        (0..self.streams.len() as StreamId).all(|id| self.stream_past(id, commit_order))
    }

    /// Whether stream `id` can no longer hold a unit at or before
    /// `commit_order`.
    fn stream_past(&self, id: StreamId, commit_order: i64) -> bool {
        let s = &self.streams[id as usize];
        if s.by_mark {
            return s.ended || s.listed.is_some_and(|c| commit_order < c);
        }
        s.ended
            || s.caught_up_partition
            || s.watermark.is_some_and(|w| w >= commit_order)
            || s.complete_before.is_some_and(|c| commit_order < c)
    }

    /// Moves the units that have become ready (complete and in order, in
    /// a prefix in commit order, up to the point in time) from the pending
    /// ones into the compact ready list. A unit once ready stays so: no
    /// event of it or before it can come any more.
    ///
    /// Fails when the chain of units is broken: a unit names a predecessor
    /// before the last applied, or says it is the first while units were
    /// applied.
    pub fn fold(&mut self) -> Result<(), UnitError> {
        let mut last = self.ready.back().map(|u| u.commit_order).or(self.applied);
        while let Some((&co, unit)) = self.pending.iter().next() {
            if self.end.is_some_and(|e| co >= e) {
                break;
            }
            let beyond = match self.until {
                Until::End => false,
                Until::Time(t) => unit.ts_us > t,
                Until::CommitOrder(c) => co > c,
            };
            if beyond {
                // Only once it is certain no unit before it is missing.
                if self.in_order(co, unit, last)? {
                    self.end = Some(co);
                }
                break;
            }
            if !unit.is_complete() || !self.in_order(co, unit, last)? {
                break;
            }
            let (_, unit) = self.pending.pop_first().expect("just seen");
            for (s, pos) in &unit.first_pos {
                let first = &mut self.ready_first[*s as usize];
                if first.is_none_or(|p| (pos.offset, pos.line) < (p.offset, p.line)) {
                    *first = Some(*pos);
                }
            }
            self.ready_staged += unit.staged;
            self.ready.push_back(ReadyUnit {
                commit_order: co,
                ts_us: unit.ts_us,
                tx_id: unit.tx_id.unwrap_or(NONE),
                lsn: unit.lsn.unwrap_or(NONE),
                staged: unit.staged,
            });
            last = Some(co);
        }
        Ok(())
    }

    /// The run of units that may be applied now, as a prefix in commit
    /// order; `None` when the first unit not applied is not ready.
    ///
    /// Fails as [`Units::fold`] does.
    pub fn ready(&mut self) -> Result<Option<ReadyRun>, UnitError> {
        self.fold()?;
        let Some(last) = self.ready.back() else {
            return Ok(None);
        };
        Ok(Some(ReadyRun {
            last: last.commit_order,
            units: self.ready.len(),
            staged: self.ready_staged,
            ts_us: last.ts_us,
            tx_id: some(last.tx_id),
            lsn: some(last.lsn),
            // Every unit before the end is ready once it is known.
            reaches_end: self.end.is_some(),
        }))
    }

    /// The ready units up to `upto`, for the position of their run.
    pub fn summary_upto(&self, upto: i64) -> RunSummary {
        let n = self.ready.partition_point(|u| u.commit_order <= upto);
        let mut sum = RunSummary {
            units: n as u64,
            staged: self.ready.range(..n).map(|u| u.staged).sum(),
            ts_us: None,
            tx_id: None,
            lsn: None,
        };
        if let Some(u) = n.checked_sub(1).map(|i| self.ready[i]) {
            sum.ts_us = Some(u.ts_us);
            sum.tx_id = some(u.tx_id);
            sum.lsn = some(u.lsn);
        }
        sum
    }

    /// The last ready unit before `commit_order`.
    pub fn ready_before(&self, commit_order: i64) -> Option<i64> {
        let n = self
            .ready
            .partition_point(|u| u.commit_order < commit_order);
        n.checked_sub(1).map(|i| self.ready[i].commit_order)
    }

    /// Whether `unit` (commit_order `co`) comes right after `last`.
    fn in_order(&self, co: i64, unit: &UnitState, last: Option<i64>) -> Result<bool, UnitError> {
        let show = |o: Option<i64>| o.map_or("none".to_owned(), |v| v.to_string());
        match unit.prev {
            Some(prev) if prev == last => Ok(true),
            Some(Some(p)) if last.is_some_and(|l| p < l) => Err(UnitError::Chain {
                commit_order: co,
                prev: p.to_string(),
                applied: show(last),
                why: "the archive holds two histories (a connector reset, or two connectors with one name)",
            }),
            Some(None) => Err(UnitError::Chain {
                commit_order: co,
                prev: "none (it says it is the connector's first unit)".into(),
                applied: show(last),
                why: "the connector started over; replay it into a fresh target",
            }),
            Some(Some(_)) if last.is_none() && self.floor.is_none() && self.streams_past(co) => {
                Err(UnitError::Chain {
                    commit_order: co,
                    prev: show(unit.prev.flatten()),
                    applied: "none".into(),
                    why: "the archive does not start at the connector's first unit (its start was deleted?); \
                          replay needs the whole history from the snapshot on",
                })
            }
            // The unit before it has not been read yet.
            Some(Some(_)) => Ok(false),
            None => Ok(self.streams_past(co)),
        }
    }

    /// Forgets the units of `run`: they are applied.
    pub fn applied_run(&mut self, last: i64) {
        while let Some(u) = self.ready.front() {
            if u.commit_order > last {
                break;
            }
            self.ready_staged -= u.staged;
            self.ready.pop_front();
        }
        if self.ready.is_empty() {
            self.ready_first.iter_mut().for_each(|p| *p = None);
        }
        self.pending.retain(|&co, _| co > last);
        self.applied = Some(last);
    }

    /// Where each stream may resume from after the units up to `applied`
    /// are applied: its read position, or the first event of a unit not
    /// applied if earlier.
    pub fn resume_points(&self) -> Vec<StreamPos> {
        self.resume_points_after(i64::MIN)
    }

    /// Like [`Units::resume_points`], once the units up to `applied` are
    /// applied.
    pub fn resume_points_after(&self, applied: i64) -> Vec<StreamPos> {
        let mut points: Vec<StreamPos> = self.streams.iter().map(|s| s.read).collect();
        let earlier = |p: &mut StreamPos, pos: &StreamPos| {
            if (pos.offset, pos.line) < (p.offset, p.line) {
                *p = *pos;
            }
        };
        for (p, hold) in points.iter_mut().zip(&self.holds) {
            if let Some(pos) = hold {
                earlier(p, pos);
            }
        }
        if self.ready.back().is_some_and(|u| u.commit_order > applied) {
            // Ready units after `applied` stay: where the first of them
            // (or an earlier one) starts.
            for (p, first) in points.iter_mut().zip(&self.ready_first) {
                if let Some(pos) = first {
                    earlier(p, pos);
                }
            }
        }
        for (_, unit) in self.pending.range(applied.saturating_add(1)..) {
            for (s, pos) in &unit.first_pos {
                let p = &mut points[*s as usize];
                // (offset, line): a segmented archive's positions are a
                // segment's first offset and a line in it.
                if (pos.offset, pos.line) < (p.offset, p.line) {
                    *p = *pos;
                }
            }
        }
        points
    }

    /// The first pending unit in commit order, for gap reports.
    pub fn first_pending(&self) -> Option<(i64, &UnitState)> {
        self.pending.iter().next().map(|(co, u)| (*co, u))
    }

    /// The point in time's end, once known.
    pub fn end(&self) -> Option<i64> {
        self.end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(co: i64, ord: i64, count: Option<i64>, stream: StreamId) -> EventInfo {
        EventInfo {
            commit_order: co,
            total_order: ord,
            event_count: count,
            prev: None,
            ts_us: co * 10,
            tx_id: Some(co),
            lsn: None,
            stream,
            pos: StreamPos {
                offset: (co * 100 + ord) as u64,
                line: 0,
            },
            truncate: false,
        }
    }

    fn at(offset: u64) -> StreamPos {
        StreamPos { offset, line: 0 }
    }

    #[test]
    fn seen_ranges_merge_and_find_gaps() {
        let mut s = Seen::default();
        for n in [3, 1, 5, 2] {
            assert!(s.insert(n));
        }
        assert_eq!(s.ranges.as_slice(), [(1, 4), (5, 6)]);
        assert!(!s.insert(2));
        assert!(!s.is_complete(5));
        assert_eq!(s.first_missing(), 4);
        assert!(s.insert(4));
        assert!(s.is_complete(5));
        assert_eq!(s.len(), 5);
        let mut t = Seen::default();
        t.insert(2);
        assert_eq!(t.first_missing(), 1);
    }

    #[test]
    fn a_unit_is_ready_only_when_whole() {
        let mut u = Units::new(None, &[at(0)], Until::End, 100);
        u.add(&ev(10, 1, None, 0), at(1)).unwrap();
        u.add(&ev(10, 2, None, 0), at(2)).unwrap();
        assert_eq!(u.ready().unwrap(), None, "no event_count yet");
        u.add(&ev(10, 3, Some(3), 0), at(3)).unwrap();
        let run = u.ready().unwrap().unwrap();
        assert_eq!((run.last, run.units), (10, 1));
        u.applied_run(10);
        // A unit missing its first event is not ready, and its position
        // holds the resume point back.
        let mut late_first = ev(20, 2, Some(2), 0);
        late_first.pos = at(4);
        u.add(&late_first, at(5)).unwrap();
        assert_eq!(u.ready().unwrap(), None);
        assert_eq!(u.resume_points(), vec![at(4)]);
        assert_eq!(u.resume_points_after(20), vec![at(5)]);
        assert_eq!(u.first_pending().unwrap().1.first_missing(), 1);
    }

    #[test]
    fn units_apply_in_commit_order_across_streams() {
        // Two partitions; unit 20 complete on stream 1 while stream 0 has
        // only reached 10: unit 15 may still come on stream 0.
        let mut u = Units::new(None, &[at(0), at(0)], Until::End, 100);
        u.add(&ev(10, 1, Some(1), 0), at(1)).unwrap();
        u.add(&ev(20, 1, Some(1), 1), at(1)).unwrap();
        assert_eq!(u.ready().unwrap().unwrap().last, 10);
        u.add(&ev(15, 1, Some(1), 0), at(2)).unwrap();
        let run = u.ready().unwrap().unwrap();
        assert_eq!(
            (run.last, run.units),
            (15, 2),
            "20 waits: stream 0 is at 15"
        );
        u.add(&ev(25, 1, None, 0), at(3)).unwrap();
        assert_eq!(u.ready().unwrap().unwrap().last, 20);
        u.applied_run(20);
        // Anything older now is late.
        let late = u.add(&ev(12, 1, Some(1), 0), at(3)).unwrap_err();
        assert!(matches!(
            late,
            UnitError::Late {
                commit_order: 12,
                applied: 20
            }
        ));
    }

    #[test]
    fn ready_units_wait_folded_and_apply_as_a_prefix() {
        let mut u = Units::new(None, &[at(0)], Until::End, 100);
        for co in 1..=3 {
            let mut e = ev(co * 10, 1, Some(1), 0);
            e.pos = at(co as u64 * 100);
            u.add(&e, at(co as u64 * 100 + 1)).unwrap();
            u.count_staged(co * 10);
        }
        // Unit 40 is read in part: it waits, pending.
        let mut e = ev(40, 1, None, 0);
        e.pos = at(400);
        u.add(&e, at(401)).unwrap();
        u.fold().unwrap();
        assert_eq!((u.pending().len(), u.ready_units(), u.waiting()), (1, 3, 4));
        // A change staged after its unit was folded still counts.
        u.count_staged(30);
        assert_eq!(u.staged(), 4);
        let run = u.ready().unwrap().unwrap();
        assert_eq!(
            (run.last, run.units, run.staged, run.tx_id),
            (30, 3, 4, Some(30))
        );
        assert_eq!(u.ready_before(30), Some(20));
        assert_eq!(u.ready_before(10), None);
        let upto_20 = u.summary_upto(20);
        assert_eq!(
            (upto_20.units, upto_20.staged, upto_20.ts_us, upto_20.tx_id),
            (2, 2, Some(200), Some(20))
        );
        // With units after 20 still to apply, a stream resumes no later
        // than the first ready unit's first event.
        assert_eq!(u.resume_points_after(20), vec![at(100)]);
        assert_eq!(u.resume_points_after(30), vec![at(400)]);
        u.applied_run(20);
        assert_eq!((u.ready_units(), u.staged()), (1, 2));
        assert_eq!(u.ready().unwrap().unwrap().last, 30);
        u.applied_run(30);
        assert_eq!(u.ready().unwrap(), None);
        assert_eq!(u.resume_points(), vec![at(400)]);
        // The rest of unit 40 makes it ready, after 30.
        u.add(&ev(40, 2, Some(2), 0), at(402)).unwrap();
        let run = u.ready().unwrap().unwrap();
        assert_eq!((run.last, run.units), (40, 1));
        assert_eq!(u.resume_points(), vec![at(400)]);
    }

    #[test]
    fn a_stream_added_while_following_is_merged_in_commit_order() {
        // One partition of a segmented archive at first: its mark counts as
        // it was when the partitions were last listed, its head not at all
        // (a partition not in topic.json yet may hold an earlier unit).
        let mut u = Units::new(None, &[at(0)], Until::End, 100);
        u.follow_listing(|_| true);
        u.add(&ev(10, 1, Some(1), 0), at(1)).unwrap();
        u.add(&ev(20, 1, Some(1), 0), at(2)).unwrap();
        u.partitions_listed();
        assert_eq!(
            u.ready().unwrap(),
            None,
            "its head is at 20, its mark unknown"
        );
        u.stream_complete_before(0, 11);
        assert_eq!(u.ready().unwrap(), None, "read after the last listing");
        u.partitions_listed();
        assert_eq!(u.ready().unwrap().unwrap().last, 10);
        u.applied_run(10);
        // Unit 30 too, the mark past both; a listing finds a second
        // partition, which holds unit 25.
        u.add(&ev(30, 1, Some(1), 0), at(3)).unwrap();
        u.stream_complete_before(0, 31);
        u.add_stream(at(0));
        u.partitions_listed();
        assert_eq!(
            u.ready().unwrap(),
            None,
            "unit 20 waits for the new partition"
        );
        u.add(&ev(25, 1, Some(1), 1), at(1)).unwrap();
        u.stream_complete_before(1, 26);
        u.partitions_listed();
        let run = u.ready().unwrap().unwrap();
        assert_eq!(
            (run.last, run.units),
            (25, 2),
            "25 comes before 30, which waits for stream 1's mark to pass it"
        );
        u.stream_complete_before(1, 31);
        assert_eq!(u.ready().unwrap().unwrap().last, 25, "until listed");
        u.partitions_listed();
        assert_eq!(u.ready().unwrap().unwrap().last, 30);
        assert_eq!(u.resume_points().len(), 2);
        // Units that name the one before them need no mark.
        let mut e = ev(40, 1, Some(1), 1);
        e.prev = Some(Some(30));
        u.add(&e, at(2)).unwrap();
        assert_eq!(u.ready().unwrap().unwrap().last, 40);
    }

    #[test]
    fn a_partition_read_to_its_end_holds_nothing_older() {
        let mut u = Units::new(None, &[at(0), at(0)], Until::End, 100);
        u.add(&ev(20, 1, Some(1), 1), at(1)).unwrap();
        assert_eq!(u.ready().unwrap(), None);
        u.partition_caught_up(0);
        assert_eq!(u.ready().unwrap().unwrap().last, 20);
    }

    #[test]
    fn the_chain_decides_when_it_is_there() {
        let mut u = Units::new(None, &[at(0), at(0)], Until::End, 100);
        let mut a = ev(5, 1, Some(1), 0);
        a.prev = Some(None);
        let mut c = ev(30, 1, Some(1), 1);
        c.prev = Some(Some(20));
        u.add(&a, at(1)).unwrap();
        u.add(&c, at(1)).unwrap();
        // Unit 20 is named but not read: 30 waits although both streams
        // passed it.
        assert_eq!(u.ready().unwrap().unwrap().last, 5);
        let mut b = ev(20, 1, Some(1), 0);
        b.prev = Some(Some(5));
        u.add(&b, at(2)).unwrap();
        assert_eq!(u.ready().unwrap().unwrap().last, 30);
        // A second "first unit" is an error.
        u.applied_run(30);
        let mut again = ev(40, 1, Some(1), 0);
        again.prev = Some(None);
        u.add(&again, at(3)).unwrap();
        assert!(matches!(u.ready(), Err(UnitError::Chain { .. })));
    }

    #[test]
    fn what_is_before_a_unit_is_ready_once_it_all_came_and_held_records_hold_the_resume_point() {
        let e = |co, ord, count, stream, prev, pos| {
            let mut e = ev(co, ord, count, stream);
            e.prev = prev;
            e.pos = at(pos);
            e
        };
        // Unit 20 of two events (one per stream), 30 after it on stream 1,
        // named by the chain.
        let mut u = Units::new(None, &[at(0), at(0)], Until::End, 100);
        u.add(&e(10, 1, Some(1), 0, Some(None), 0), at(1)).unwrap();
        u.add(&e(20, 1, None, 1, Some(Some(10)), 0), at(1)).unwrap();
        u.add(&e(30, 1, Some(1), 1, Some(Some(20)), 1), at(2))
            .unwrap();
        assert!(!u.before_is_ready(30).unwrap(), "20 is not whole");
        // A record of 40 read from stream 1 and set aside, and the stream
        // read on past it.
        u.hold(1, 40, at(2));
        u.advance(1, at(3));
        u.add(&e(20, 2, Some(2), 0, Some(Some(10)), 1), at(2))
            .unwrap();
        assert!(u.before_is_ready(30).unwrap());
        assert!(u.before_is_ready(20).unwrap());
        u.applied_run(30);
        assert_eq!(
            u.resume_points(),
            vec![at(2), at(2)],
            "stream 1 resumes at the record set aside"
        );
        u.release_holds();
        assert_eq!(u.resume_points(), vec![at(2), at(3)]);
        // Without the chain: once every stream passed the unit.
        let mut u = Units::new(None, &[at(0), at(0)], Until::End, 100);
        u.add(&ev(5, 1, Some(1), 0), at(1)).unwrap();
        assert!(!u.before_is_ready(5).unwrap(), "stream 1 may hold 4");
        u.hold(1, 7, at(0));
        assert!(u.before_is_ready(5).unwrap());
    }

    #[test]
    fn bad_archives_are_refused() {
        let mut u = Units::new(None, &[at(0)], Until::End, 2);
        u.add(&ev(1, 1, None, 0), at(1)).unwrap();
        assert!(matches!(
            u.add(&ev(1, 1, None, 0), at(2)),
            Err(UnitError::Duplicate { .. })
        ));
        u.add(&ev(1, 3, None, 0), at(3)).unwrap();
        assert!(matches!(
            u.add(&ev(1, 2, Some(2), 0), at(4)),
            Err(UnitError::BeyondCount { total_order: 3, .. })
        ));
        let mut u = Units::new(None, &[at(0)], Until::End, 2);
        u.add(&ev(1, 1, Some(2), 0), at(1)).unwrap();
        assert!(matches!(
            u.add(&ev(1, 2, Some(3), 0), at(2)),
            Err(UnitError::CountMismatch { .. })
        ));
        u.add(&ev(2, 1, None, 0), at(3)).unwrap();
        assert!(matches!(
            u.add(&ev(3, 1, None, 0), at(4)),
            Err(UnitError::TooManyPending {
                commit_order: 1,
                ..
            })
        ));
    }

    #[test]
    fn too_many_pending_says_why_the_first_unit_waits() {
        // Whole, without prev_commit_order, while stream 1 is not past it:
        // the error names the stream and the bound, not a missing event.
        let mut u = Units::new(None, &[at(0), at(0)], Until::End, 2);
        u.add(&ev(1, 1, Some(1), 0), at(1)).unwrap();
        u.add(&ev(2, 1, Some(1), 0), at(2)).unwrap();
        let e = u
            .add(&ev(3, 1, Some(1), 0), at(3))
            .unwrap_err()
            .name_streams(|id| format!("input {id}"));
        let UnitError::TooManyPending {
            commit_order: 1,
            max: 2,
            why: Waiting::Streams { ids, .. },
            ..
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!(ids, &[1]);
        let text = e.to_string();
        assert!(text.contains("which is whole"), "{text}");
        assert!(text.contains("input 1 may"), "{text}");
        assert!(text.contains("--max-pending-units"), "{text}");
        assert!(!text.contains("incomplete"), "{text}");
        // Ready ones leave before the bound is checked: stream 1 passed
        // both, so unit 3 is taken.
        u.add(&ev(9, 1, None, 1), at(1)).unwrap();
        assert_eq!(
            u.add(&ev(3, 1, Some(1), 0), at(3)).unwrap(),
            Disposition::Stage
        );
        // Incomplete: says so, with what it holds.
        let mut u = Units::new(None, &[at(0)], Until::End, 1);
        u.add(&ev(1, 1, None, 0), at(1)).unwrap();
        let e = u.add(&ev(2, 1, Some(1), 0), at(2)).unwrap_err();
        assert!(
            matches!(
                &e,
                UnitError::TooManyPending {
                    why: Waiting::Incomplete {
                        events: 1,
                        count: None,
                        ..
                    },
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("still incomplete"), "{e}");
    }

    #[test]
    fn units_applied_before_are_skipped() {
        let mut u = Units::new(Some(10), &[at(0)], Until::End, 100);
        assert_eq!(
            u.add(&ev(10, 1, Some(1), 0), at(1)).unwrap(),
            Disposition::Skip
        );
        assert_eq!(
            u.add(&ev(11, 1, Some(1), 0), at(2)).unwrap(),
            Disposition::Stage
        );
        assert_eq!(u.ready().unwrap().unwrap().last, 11);
    }

    #[test]
    fn the_point_in_time_is_a_prefix() {
        // Times 10, 20, 40, 30 (a clock step back); until 35 stops before
        // the unit at 40 even though the one after it is earlier.
        let mut u = Units::new(None, &[at(0)], Until::Time(350), 100);
        for (i, co) in [1, 2, 4, 3].iter().enumerate() {
            let mut e = ev(i as i64 + 1, 1, Some(1), 0);
            e.ts_us = co * 100;
            u.add(&e, at(i as u64 + 1)).unwrap();
        }
        let run = u.ready().unwrap().unwrap();
        assert_eq!((run.last, run.reaches_end), (2, true));
        assert!(u.reached_end());
        // Until a commit order: known to be over once the stream passed it.
        let mut u = Units::new(None, &[at(0)], Until::CommitOrder(2), 100);
        u.add(&ev(1, 1, Some(1), 0), at(1)).unwrap();
        u.add(&ev(2, 1, Some(1), 0), at(2)).unwrap();
        let run = u.ready().unwrap().unwrap();
        assert_eq!((run.last, run.reaches_end), (2, false));
        u.add(&ev(3, 1, None, 0), at(3)).unwrap();
        let run = u.ready().unwrap().unwrap();
        assert_eq!((run.last, run.reaches_end), (2, true));
    }
}
