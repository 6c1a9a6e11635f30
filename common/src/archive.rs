//! The archive file-sink writes, and how to read it back.
//!
//! file-sink writes one of two things, both read by [`Archive::open`]:
//!
//! - **A single file** (the default, the seed's FileStreamSink `file`): one
//!   line of JSON per record, every topic and partition interleaved in the
//!   order read, beside it `<file>.tidemark-checkpoint` (how many bytes are
//!   durable). Read up to the checkpoint's length.
//! - **A segmented archive** (when `file.rotate.bytes`,
//!   `file.rotate.interval.ms` or `file.compression` is set): `file` names a
//!   folder, laid out as below, and each partition's records are cut into
//!   segments that are sealed (compressed, checksummed, listed in a
//!   manifest) by size or age.
//!
//! # Layout of a segmented archive
//!
//! ```text
//! <archive>/tidemark-archive.json            {"format":"tidemark-archive","version":1}
//! <archive>/<topic>/topic.json               {"topic":..,"partitions":N,"first_partitions":F}: how many partitions the topic has, and had when first noted
//! <archive>/<topic>/<partition>/             one folder per partition, named by its number
//!     lock                                   held (flock) by the file-sink instance writing it
//!     checkpoint.json                        the partition's position; replaced atomically
//!     manifest.jsonl                         one line per sealed (or retired) segment, appended
//!     <topic>+<partition>+<offset>.jsonl.zst a sealed segment (.jsonl.gz, or .jsonl uncompressed)
//!     <topic>+<partition>+<offset>.jsonl.open the segment being written, uncompressed
//!     dead-letter.jsonl                      records that are not JSON or too large
//! <archive>/<topic>/<partition>.before-reset-<UTC time>/  a partition set aside by a reset
//! ```
//!
//! `<offset>` is the Kafka offset of the segment's first record, 20 digits,
//! so names sort in offset order and a restart writes the same names. A
//! segment holds the same lines a single file would: each record's value
//! as one line of JSON, in offset order (tombstones are skipped). A sealed
//! segment is one complete zstd frame or gzip member (`zstdcat`, `zcat`).
//! Segments are sealed by size (deterministic: the record that takes the
//! segment to `file.rotate.bytes` is its last, whatever the batching) or
//! by age (`file.rotate.interval.ms` after its first record, by the clock,
//! whether or not records arrive). A segment, once sealed, is never
//! rewritten.
//!
//! # `manifest.jsonl`
//!
//! One JSON object per line, appended and fsynced at each seal, before the
//! checkpoint moves past the segment: exactly one `sealed` line per segment,
//! crash or not. [`ManifestLine`] is the schema:
//!
//! ```text
//! {"kind":"sealed","segment":"t+0+00000000000000000000.jsonl.zst","topic":"t","partition":0,
//!  "first_offset":0,"last_offset":1041,"records":1000,"plain_bytes":612345,
//!  "compression":"zstd","bytes":48211,"sha256":"<hex of the file as stored>",
//!  "first":{"offset":0,"commit_order":0,"total_order":1,"ts_us":..,"snapshot":"first"},
//!  "last":{"offset":1041,"commit_order":37,"total_order":2,"ts_us":..,"unit_end":true},
//!  "min_ts_us":..,"max_ts_us":..,
//!  "snapshot_first":{..}|absent,"snapshot_last":{..}|absent,
//!  "complete_before":{"commit_order":37,"ts_us":..}|absent,
//!  "sealed_at":"2026-12-01T10:00:00Z"}
//! {"kind":"retired","segment":"t+0+00000000000000000000.jsonl.zst","at":"..","reason":".."}
//! ```
//!
//! - `first_offset`/`last_offset`: Kafka offsets of the first and last
//!   record in the segment; `records`: its lines; `plain_bytes`: their bytes
//!   uncompressed; `bytes` and `sha256`: the file as stored (`sha256sum`).
//! - `first`, `last` ([`Position`]): the first and last event's place in the
//!   source, from the envelope: `source.ts_us` (the source commit time;
//!   `ts_ms` × 1000 for older events), `transaction.commit_order` and
//!   `total_order`, `unit_end` when the event is its unit's last
//!   (`transaction.event_count` set), `snapshot` when `source.snapshot` is
//!   not `"false"`. Fields an event does not carry are absent.
//! - `min_ts_us`/`max_ts_us`: the range of commit times in the segment.
//! - `snapshot_first`/`snapshot_last`: the segment's events with
//!   `source.snapshot` `"first"` and `"last"`, where a snapshot starts and
//!   ends; retention looks for base snapshots by them.
//! - `complete_before` ([`Mark`]): see completeness below, for this
//!   partition's sealed segments up to and including this one.
//! - A `retired` line says a retention policy deleted the segment; readers
//!   skip it.
//!
//! # `checkpoint.json`
//!
//! [`PartitionCheckpoint`]: the next Kafka offset to read, how many
//! `sealed` lines of the manifest it knows, the open segment (its name,
//! durable length and the same statistics a manifest line has), the
//! dead-letter file's durable length, the last record's fingerprint (to
//! tell a recreated topic), and the partition's completeness mark. Saved
//! only after the files it covers are fsynced.
//!
//! # Completeness
//!
//! A [`Mark`] `{"commit_order": C, "ts_us": T}` on a partition says: every
//! event of this partition that belongs to a unit (a source transaction,
//! see the envelope's `transaction` block) with `commit_order < C` is in
//! the archive, and so is every one committed at the source before `T`.
//! The archive's mark is the minimum over every partition of every topic
//! ([`Archive::complete_before`]): every source change committed before `T`
//! is in the archive. A partition learns its mark from its own events
//! (events arrive in commit order) and, when it is idle, from having been
//! read to its end after some other partition showed a later unit.
//!
//! With no change to send, pg-source (`changelog` mode) writes a
//! **heartbeat** every `heartbeat.interval.ms` to its heartbeat topic
//! (`__tidemark-heartbeat.<name>`): `{"tidemark.heartbeat": {"connector":
//! N, "complete_before": {"commit_order": C, "ts_us": T}}, "ts_ms": ..}`,
//! committed after every unit before C and every change committed before T
//! ([`heartbeat_value`], [`heartbeat_mark`]). file-sink writes no line for
//! it: it is that partition's mark, and, like a later unit, lets the idle
//! partitions read to their end take the mark too, so the archive's mark
//! moves while the tables are quiet.
//!
//! # Reading
//!
//! [`Archive::records`] yields every record in source commit order across
//! partitions (by `commit_order`, then `total_order`; records without them
//! keep their partition's order), with its [`Position`]; [`ReadOptions`]
//! skips whole segments outside a commit-order or time range, reading only
//! the manifest for them. The open segment is read up to its checkpointed
//! length. Nothing here writes.
//!
//! [`PartitionTail`] reads one partition from a [`SegmentPos`] (segment,
//! lines and bytes read of it) and follows it while file-sink writes,
//! through rotations and seals; each line comes with the position to resume
//! from. That is what a player of the archive keeps as its place: the
//! position names a segment by its first offset, so it survives seals,
//! restarts and moves of the archive. A player merges its partitions' tails
//! by commit order, as [`Archive::records`] does, and may apply a unit up to
//! the archive's completeness mark ([`Archive::complete_before`]) knowing
//! that no partition will show an earlier one later.

use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::offset::SinkCheckpoint;

/// The file that marks a folder as a segmented archive.
pub const ARCHIVE_MARKER: &str = "tidemark-archive.json";
/// The version of the layout this module writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// A partition folder's manifest.
pub const MANIFEST: &str = "manifest.jsonl";
/// A partition folder's checkpoint.
pub const CHECKPOINT: &str = "checkpoint.json";
/// A partition folder's lock file.
pub const LOCK: &str = "lock";
/// A partition folder's dead-letter file.
pub const DEAD_LETTER: &str = "dead-letter.jsonl";
/// A topic folder's description.
pub const TOPIC_FILE: &str = "topic.json";
/// The suffix of the segment being written.
pub const OPEN_SUFFIX: &str = ".jsonl.open";

/// Why an archive cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not what the format says it should be.
    #[error("{path} is damaged: {why}")]
    Damaged {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn damaged(path: &Path, why: impl Into<String>) -> ArchiveError {
    ArchiveError::Damaged {
        path: path.display().to_string(),
        why: why.into(),
    }
}

/// How sealed segments are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as written.
    #[default]
    None,
    /// One zstd frame.
    Zstd,
    /// One gzip member.
    Gzip,
}

impl Compression {
    /// The file name's ending for a sealed segment.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => ".jsonl",
            Compression::Zstd => ".jsonl.zst",
            Compression::Gzip => ".jsonl.gz",
        }
    }

    /// Parses `file.compression`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "none" => Some(Compression::None),
            "zstd" => Some(Compression::Zstd),
            "gzip" => Some(Compression::Gzip),
            _ => None,
        }
    }
}

/// The name of a sealed segment: topic, partition, first offset (20
/// digits) and the compression's ending.
pub fn segment_name(topic: &str, partition: i32, first_offset: i64, c: Compression) -> String {
    format!("{topic}+{partition}+{first_offset:020}{}", c.extension())
}

/// The name of an open (being written) segment.
pub fn open_segment_name(topic: &str, partition: i32, first_offset: i64) -> String {
    format!("{topic}+{partition}+{first_offset:020}{OPEN_SUFFIX}")
}

/// A partition's folder in the archive at `root`.
pub fn partition_dir(root: &Path, topic: &str, partition: i32) -> PathBuf {
    root.join(topic).join(partition.to_string())
}

/// Where an event stands in the source, as far as its envelope says, and
/// its Kafka offset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The record's Kafka offset.
    pub offset: i64,
    /// `transaction.commit_order`: the unit's place in source commit order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_order: Option<i64>,
    /// `transaction.total_order`: the event's place in its unit, from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_order: Option<i64>,
    /// `source.ts_us` (or `ts_ms` × 1000): the source commit time, µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts_us: Option<i64>,
    /// The event is its unit's last (`transaction.event_count` is set).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unit_end: bool,
    /// `source.snapshot`, unless `"false"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

// What the position is read from. Numbers are read by [`Int`], which takes
// any JSON number (one that is not an i64 reads as none) without the
// allocation a `serde_json::Number` makes under the workspace's
// arbitrary precision; this runs for every record a segmented archive
// writes. A field of another type makes the whole line fall back to a
// plain validity check.
#[derive(Deserialize, Default)]
struct PeekTop {
    #[serde(default)]
    payload: Option<PeekEvent>,
    #[serde(default)]
    source: Option<PeekSource>,
    #[serde(default)]
    transaction: Option<PeekTransaction>,
}

#[derive(Deserialize, Default)]
struct PeekEvent {
    #[serde(default)]
    source: Option<PeekSource>,
    #[serde(default)]
    transaction: Option<PeekTransaction>,
}

#[derive(Deserialize, Default)]
struct PeekSource {
    #[serde(default)]
    ts_us: Option<Int>,
    #[serde(default)]
    ts_ms: Option<Int>,
    #[serde(default)]
    snapshot: Option<Snapshot>,
}

/// `source.snapshot` unless it is `"false"`, which nearly every event
/// says: that one is compared where it lies in the line, not allocated.
struct Snapshot(Option<String>);

impl<'de> Deserialize<'de> for Snapshot {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Snapshot;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E>(self, v: &str) -> Result<Snapshot, E> {
                Ok(Snapshot((v != "false").then(|| v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

#[derive(Deserialize, Default)]
struct PeekTransaction {
    #[serde(default)]
    commit_order: Option<Int>,
    #[serde(default)]
    total_order: Option<Int>,
    #[serde(default)]
    event_count: Option<Int>,
}

/// A JSON number, as an i64 when it is one.
struct Int(Option<i64>);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Int;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Int, E> {
                Ok(Int(Some(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Int, E> {
                Ok(Int(i64::try_from(v).ok()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Int, E> {
                Ok(Int(None))
            }
        }
        d.deserialize_i64(V)
    }
}

impl Position {
    /// Checks that `line` is JSON and reads what it says about its place in
    /// the source, with or without the Connect `{"schema","payload"}`
    /// wrapper, in one pass for a change event. JSON that is not a change
    /// event gives a position with the offset only.
    ///
    /// Fails when the line is not JSON.
    pub fn parse_line(line: &[u8], offset: i64) -> Result<Self, serde_json::Error> {
        let top = match serde_json::from_slice::<PeekTop>(line) {
            Ok(t) => t,
            Err(e) if e.is_data() => {
                serde_json::from_slice::<serde::de::IgnoredAny>(line)?;
                PeekTop::default()
            }
            Err(e) => return Err(e),
        };
        let (source, tx) = match top.payload {
            Some(p) => (p.source, p.transaction),
            None => (top.source, top.transaction),
        };
        let source = source.unwrap_or_default();
        let tx = tx.unwrap_or_default();
        let int = |n: &Option<Int>| n.as_ref().and_then(|n| n.0);
        Ok(Position {
            offset,
            commit_order: int(&tx.commit_order),
            total_order: int(&tx.total_order),
            ts_us: int(&source.ts_us).or(int(&source.ts_ms).map(|ms| ms.saturating_mul(1000))),
            unit_end: tx.event_count.is_some(),
            snapshot: source.snapshot.and_then(|s| s.0),
        })
    }

    /// Like [`Self::parse_line`], with a line that is not JSON giving the
    /// offset only.
    pub fn of_line(line: &[u8], offset: i64) -> Self {
        Self::parse_line(line, offset).unwrap_or(Position {
            offset,
            ..Default::default()
        })
    }
}

/// A completeness mark: every event of units with `commit_order` below
/// this one, and every event committed at the source before `ts_us`, is in.
/// Either may be absent (events without them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// Units before this commit order are complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_order: Option<i64>,
    /// Changes committed before this time (µs since the epoch) are complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts_us: Option<i64>,
}

/// The field that makes a record a heartbeat (see the module's docs).
pub const HEARTBEAT_FIELD: &str = "tidemark.heartbeat";

/// A heartbeat record's value: `connector` has sent every event before
/// `complete_before`; `ts_ms` is when it was written.
pub fn heartbeat_value(connector: &str, complete_before: Mark, ts_ms: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        HEARTBEAT_FIELD: {"connector": connector, "complete_before": complete_before},
        "ts_ms": ts_ms,
    }))
    .expect("a heartbeat serialises")
}

/// The mark a heartbeat record's value carries; `None` for any other
/// record (checked by its first bytes first, so a change event costs
/// nothing here).
pub fn heartbeat_mark(value: &[u8]) -> Option<Mark> {
    #[derive(Deserialize)]
    struct Beat {
        complete_before: Mark,
    }
    #[derive(Deserialize)]
    struct Top {
        #[serde(rename = "tidemark.heartbeat")]
        beat: Beat,
    }
    let head = br#"{"tidemark.heartbeat":"#;
    if !value.starts_with(head) {
        return None;
    }
    serde_json::from_slice::<Top>(value)
        .ok()
        .map(|t| t.beat.complete_before)
}

impl Mark {
    /// The later of two marks, field by field.
    pub fn max(self, other: Mark) -> Mark {
        Mark {
            commit_order: max_opt(self.commit_order, other.commit_order),
            ts_us: max_opt(self.ts_us, other.ts_us),
        }
    }

    /// The earlier of two marks, field by field; a field one of them lacks
    /// is unknown.
    pub fn min(self, other: Mark) -> Mark {
        let both = |a: Option<i64>, b: Option<i64>| Some(a?.min(b?));
        Mark {
            commit_order: both(self.commit_order, other.commit_order),
            ts_us: both(self.ts_us, other.ts_us),
        }
    }
}

fn max_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// What a segment holds; the same for an open segment (in the checkpoint)
/// and a sealed one (in the manifest).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentStats {
    /// Offset of the first record.
    pub first_offset: i64,
    /// Offset of the last record.
    pub last_offset: i64,
    /// Records (lines).
    pub records: u64,
    /// Bytes of the lines, uncompressed.
    pub plain_bytes: u64,
    /// The first event's position.
    pub first: Position,
    /// The last event's position.
    pub last: Position,
    /// The earliest commit time in the segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ts_us: Option<i64>,
    /// The latest commit time in the segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ts_us: Option<i64>,
    /// The event that starts a snapshot (`source.snapshot` = `"first"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_first: Option<Position>,
    /// The event that ends a snapshot (`source.snapshot` = `"last"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_last: Option<Position>,
}

impl SegmentStats {
    /// The statistics of a segment whose first record is `line` at `pos`.
    pub fn start(pos: Position, line_bytes: u64) -> Self {
        let mut s = SegmentStats {
            first_offset: pos.offset,
            last_offset: pos.offset,
            records: 0,
            plain_bytes: 0,
            first: pos.clone(),
            last: pos.clone(),
            ..Default::default()
        };
        s.add(pos, line_bytes);
        s
    }

    /// Counts one more record (not the first: see [`Self::start`]).
    pub fn add(&mut self, pos: Position, line_bytes: u64) {
        if self.records > 0 {
            self.last_offset = pos.offset;
        }
        self.records += 1;
        self.plain_bytes += line_bytes;
        if let Some(ts) = pos.ts_us {
            self.min_ts_us = Some(self.min_ts_us.map_or(ts, |m| m.min(ts)));
            self.max_ts_us = Some(self.max_ts_us.map_or(ts, |m| m.max(ts)));
        }
        match pos.snapshot.as_deref() {
            Some("first") if self.snapshot_first.is_none() => {
                self.snapshot_first = Some(pos.clone())
            }
            Some("last") => self.snapshot_last = Some(pos.clone()),
            _ => {}
        }
        self.last = pos;
    }
}

/// A sealed segment, as its manifest line describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSegment {
    /// The file name, in the partition's folder.
    pub segment: String,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// What it holds.
    #[serde(flatten)]
    pub stats: SegmentStats,
    /// How it is compressed.
    pub compression: Compression,
    /// Bytes of the file as stored.
    pub bytes: u64,
    /// SHA-256 of the file as stored, hex.
    pub sha256: String,
    /// The partition's completeness through this segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete_before: Option<Mark>,
    /// When it was sealed (RFC 3339, UTC).
    pub sealed_at: String,
}

/// One line of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ManifestLine {
    /// A segment was sealed.
    Sealed(Box<SealedSegment>),
    /// A segment was deleted by a retention policy.
    Retired {
        /// The file name.
        segment: String,
        /// When (RFC 3339, UTC).
        at: String,
        /// Why it could go.
        reason: String,
    },
}

/// The segment being written, as the checkpoint knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenSegment {
    /// The file name (`...jsonl.open`), in the partition's folder.
    pub segment: String,
    /// When its first record was written (ms since the epoch): it is
    /// sealed `file.rotate.interval.ms` after.
    pub opened_at_ms: i64,
    /// What its durable part holds; `plain_bytes` is the durable length.
    #[serde(flatten)]
    pub stats: SegmentStats,
}

/// Identifies the last record read from a partition, so that a topic
/// deleted and created again is told from the one the archive holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Its offset.
    pub offset: i64,
    /// Its Kafka timestamp (ms), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
    /// The first 16 hex digits of SHA-256 over its key and value.
    pub hash: String,
}

/// A partition's position in a segmented archive.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionCheckpoint {
    /// Format version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The next Kafka offset to read.
    pub next_offset: i64,
    /// The last record read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Fingerprint>,
    /// `sealed` lines of the manifest this checkpoint knows of.
    pub sealed: u64,
    /// Segments full or old enough to seal, written and fsynced, whose
    /// seal (compression, manifest line) may not have happened yet: a
    /// restart seals them again, to the same bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub closed: Vec<OpenSegment>,
    /// The segment being written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open: Option<OpenSegment>,
    /// Durable bytes of the dead-letter file.
    #[serde(default)]
    pub dead_letter_bytes: u64,
    /// The partition's completeness mark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete_before: Option<Mark>,
    /// The last event's position (in the open segment or the last sealed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Position>,
}

impl PartitionCheckpoint {
    /// Loads a partition's checkpoint; `None` when there is none.
    ///
    /// Fails when the file cannot be read or is not a checkpoint.
    pub fn load(dir: &Path) -> Result<Option<Self>, ArchiveError> {
        let path = dir.join(CHECKPOINT);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| damaged(&path, e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }
}

/// A topic folder's description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicFile {
    /// Topic.
    pub topic: String,
    /// Its partitions, as last seen by a writer.
    pub partitions: i32,
    /// The partitions it had when the archive first noted it: one numbered
    /// at or above this was added to the topic later, so the archive must
    /// hold it from offset 0. Absent in archives written before it was
    /// kept (then `partitions` stands for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_partitions: Option<i32>,
}

impl TopicFile {
    /// The partitions the topic had when the archive first noted it.
    pub fn first(&self) -> i32 {
        self.first_partitions.unwrap_or(self.partitions)
    }
}

/// Reads a manifest: its complete lines, and the byte length they take
/// (a torn last line, from a crash while appending, is not counted).
///
/// Fails when the file cannot be read or a complete line is not a
/// manifest line.
pub fn read_manifest(dir: &Path) -> Result<(Vec<ManifestLine>, u64), ArchiveError> {
    let path = dir.join(MANIFEST);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let mut lines = Vec::new();
    let mut len = 0u64;
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        if !line.ends_with(b"\n") {
            break;
        }
        let entry: ManifestLine = serde_json::from_slice(line)
            .map_err(|e| damaged(&path, format!("line {}: {e}", lines.len() + 1)))?;
        lines.push(entry);
        len += line.len() as u64;
    }
    Ok((lines, len))
}

/// What to read; whole segments outside the range are skipped unread.
/// Records without a commit order or time always pass.
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    /// Only units with `commit_order >= from_commit_order`.
    pub from_commit_order: Option<i64>,
    /// Only units with `commit_order <= to_commit_order`.
    pub to_commit_order: Option<i64>,
    /// Only events committed at or before this time (µs).
    pub until_ts_us: Option<i64>,
    /// Leave the open segments out: only what is sealed.
    pub sealed_only: bool,
}

impl ReadOptions {
    fn keeps(&self, p: &Position) -> bool {
        let co = p.commit_order;
        !(matches!((co, self.from_commit_order), (Some(c), Some(f)) if c < f)
            || matches!((co, self.to_commit_order), (Some(c), Some(t)) if c > t)
            || matches!((p.ts_us, self.until_ts_us), (Some(ts), Some(u)) if ts > u))
    }

    /// Whether any record of a segment with these statistics can pass.
    pub fn may_keep(&self, s: &SegmentStats) -> bool {
        let below =
            matches!((s.last.commit_order, self.from_commit_order), (Some(c), Some(f)) if c < f);
        let above =
            matches!((s.first.commit_order, self.to_commit_order), (Some(c), Some(t)) if c > t);
        let later = matches!((s.min_ts_us, self.until_ts_us), (Some(ts), Some(u)) if ts > u);
        !(below || above || later)
    }
}

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Topic and partition; `None` in a single-file archive.
    pub partition: Option<(String, i32)>,
    /// The record's line, without its line break.
    pub line: String,
    /// Where the event stands in the source. In a segmented archive the
    /// offset is the segment's first offset (lines do not carry their own);
    /// in a single file it is the line's number from 0.
    pub position: Position,
}

/// One partition of a segmented archive.
#[derive(Debug, Clone)]
pub struct PartitionArchive {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Its folder.
    pub dir: PathBuf,
    /// Its checkpoint, if it has one.
    pub checkpoint: Option<PartitionCheckpoint>,
    /// Sealed segments in offset order, retired ones left out.
    pub segments: Vec<SealedSegment>,
}

impl PartitionArchive {
    /// Reads a partition folder's checkpoint and manifest. Seals the
    /// checkpoint does not know of yet (a seal that happened while reading,
    /// or a crash right after one) are included.
    ///
    /// Fails when either file is damaged.
    pub fn open(dir: &Path, topic: &str, partition: i32) -> Result<Self, ArchiveError> {
        let checkpoint = PartitionCheckpoint::load(dir)?;
        let (lines, _) = read_manifest(dir)?;
        let mut segments: Vec<SealedSegment> = Vec::new();
        for line in lines {
            match line {
                ManifestLine::Sealed(s) => segments.push(*s),
                ManifestLine::Retired { segment, .. } => segments.retain(|s| s.segment != segment),
            }
        }
        Ok(Self {
            topic: topic.to_owned(),
            partition,
            dir: dir.to_path_buf(),
            checkpoint,
            segments,
        })
    }

    /// The segments written but not sealed yet (closed ones awaiting their
    /// seal, then the open one's durable part), in offset order, leaving
    /// out any a seal already covers.
    pub fn unsealed(&self) -> Vec<&OpenSegment> {
        let Some(cp) = self.checkpoint.as_ref() else {
            return Vec::new();
        };
        cp.closed
            .iter()
            .chain(cp.open.iter())
            .filter(|o| {
                o.stats.records > 0
                    && !self
                        .segments
                        .iter()
                        .any(|s| s.stats.first_offset == o.stats.first_offset)
            })
            .collect()
    }

    /// The partition's completeness mark, counting the open segment
    /// unless `sealed_only`.
    pub fn complete_before(&self, sealed_only: bool) -> Option<Mark> {
        let sealed = self.segments.last().and_then(|s| s.complete_before);
        // With nothing unsealed, all the partition holds is sealed (or it
        // holds nothing: a heartbeat topic's partition, one never written,
        // one whose segments retention deleted): the checkpoint's mark is
        // the sealed part's too. Else such a partition would hold the
        // archive's sealed mark, and with it retention, back for good.
        if sealed_only && (self.checkpoint.is_none() || !self.unsealed().is_empty()) {
            return sealed;
        }
        let cp = self.checkpoint.as_ref()?.complete_before;
        match (cp, sealed) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Checks every sealed segment against its manifest line: its size,
    /// its SHA-256, and that it decompresses to exactly its count of lines,
    /// whose first and last carry the positions the line says (offsets
    /// aside, which lines do not carry).
    ///
    /// Fails naming the first segment that disagrees.
    pub fn verify(&self) -> Result<(), ArchiveError> {
        use sha2::Digest as _;
        for s in &self.segments {
            let path = self.dir.join(&s.segment);
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            if bytes.len() as u64 != s.bytes {
                return Err(damaged(
                    &path,
                    format!("{} bytes where the manifest says {}", bytes.len(), s.bytes),
                ));
            }
            let sha: String = sha2::Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if sha != s.sha256 {
                return Err(damaged(&path, "its SHA-256 is not the manifest's"));
            }
            let mut plain = Vec::new();
            let read = match s.compression {
                Compression::None => {
                    plain = bytes;
                    Ok(0)
                }
                Compression::Zstd => zstd::stream::read::Decoder::new(&bytes[..])
                    .and_then(|mut d| d.read_to_end(&mut plain)),
                Compression::Gzip => {
                    flate2::read::GzDecoder::new(&bytes[..]).read_to_end(&mut plain)
                }
            };
            read.map_err(|e| damaged(&path, format!("does not decompress: {e}")))?;
            if plain.len() as u64 != s.stats.plain_bytes
                || !plain.ends_with(b"\n") && !plain.is_empty()
            {
                return Err(damaged(
                    &path,
                    format!(
                        "{} bytes of lines where the manifest says {}",
                        plain.len(),
                        s.stats.plain_bytes
                    ),
                ));
            }
            let lines: Vec<&[u8]> = plain.split_inclusive(|b| *b == b'\n').collect();
            if lines.len() as u64 != s.stats.records {
                return Err(damaged(
                    &path,
                    format!(
                        "{} lines where the manifest says {}",
                        lines.len(),
                        s.stats.records
                    ),
                ));
            }
            let strip = |l: &[u8], p: &Position| Position {
                offset: p.offset,
                ..Position::of_line(&l[..l.len() - 1], p.offset)
            };
            if let (Some(first), Some(last)) = (lines.first(), lines.last()) {
                if strip(first, &s.stats.first) != s.stats.first
                    || strip(last, &s.stats.last) != s.stats.last
                {
                    return Err(damaged(
                        &path,
                        "its first or last line is not the one the manifest describes",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The partition's records in offset order.
    ///
    /// Fails (on the iterator) when a segment is missing, shorter than the
    /// manifest says, or holds other than its count of lines.
    pub fn records(&self, opts: &ReadOptions) -> PartitionRecords {
        let mut parts: Vec<Part> = self
            .segments
            .iter()
            .filter(|s| opts.may_keep(&s.stats))
            .map(|s| Part {
                path: self.dir.join(&s.segment),
                sealed_in: None,
                compression: s.compression,
                stored_bytes: Some(s.bytes),
                plain_bytes: s.stats.plain_bytes,
                records: s.stats.records,
                first_offset: s.stats.first_offset,
            })
            .collect();
        if !opts.sealed_only {
            for open in self
                .unsealed()
                .into_iter()
                .filter(|o| opts.may_keep(&o.stats))
            {
                parts.push(Part {
                    path: self.dir.join(&open.segment),
                    sealed_in: Some(self.dir.clone()),
                    compression: Compression::None,
                    stored_bytes: None,
                    plain_bytes: open.stats.plain_bytes,
                    records: open.stats.records,
                    first_offset: open.stats.first_offset,
                });
            }
        }
        parts.reverse();
        PartitionRecords {
            partition: Some((self.topic.clone(), self.partition)),
            parts,
            current: None,
            opts: opts.clone(),
            line_no: 0,
        }
    }
}

struct Part {
    path: PathBuf,
    /// For an unsealed segment, the partition folder: if the file is gone,
    /// it was sealed meanwhile, and the sealed file holds the same lines.
    sealed_in: Option<PathBuf>,
    compression: Compression,
    /// The stored size a sealed segment must have.
    stored_bytes: Option<u64>,
    /// Bytes of lines to read.
    plain_bytes: u64,
    /// Lines it must hold.
    records: u64,
    first_offset: i64,
}

struct Reading {
    lines: Box<dyn BufRead + Send>,
    path: PathBuf,
    left: u64,
    first_offset: i64,
}

/// The records of one partition (or of a single file), in order.
pub struct PartitionRecords {
    partition: Option<(String, i32)>,
    /// Parts still to read, last first.
    parts: Vec<Part>,
    current: Option<Reading>,
    opts: ReadOptions,
    /// Single file: the next line's number.
    line_no: i64,
}

impl PartitionRecords {
    fn open_part(mut part: Part) -> Result<Reading, ArchiveError> {
        let file = match (File::open(&part.path), &part.sealed_in) {
            (Ok(f), _) => f,
            (Err(e), Some(dir)) if e.kind() == std::io::ErrorKind::NotFound => {
                let (lines, _) = read_manifest(dir)?;
                let sealed = lines.into_iter().find_map(|l| match l {
                    ManifestLine::Sealed(s) if s.stats.first_offset == part.first_offset => {
                        Some(*s)
                    }
                    _ => None,
                });
                let Some(s) = sealed else {
                    return Err(io_err(&part.path)(e));
                };
                part.path = dir.join(&s.segment);
                part.compression = s.compression;
                part.stored_bytes = Some(s.bytes);
                File::open(&part.path).map_err(io_err(&part.path))?
            }
            (Err(e), _) => return Err(io_err(&part.path)(e)),
        };
        if let Some(want) = part.stored_bytes {
            let have = file.metadata().map_err(io_err(&part.path))?.len();
            if have != want {
                return Err(damaged(
                    &part.path,
                    format!("{have} bytes where the manifest says {want}"),
                ));
            }
        }
        let raw: Box<dyn Read + Send> = match part.compression {
            Compression::None => Box::new(file),
            Compression::Zstd => {
                Box::new(zstd::stream::read::Decoder::new(file).map_err(io_err(&part.path))?)
            }
            Compression::Gzip => Box::new(flate2::read::GzDecoder::new(file)),
        };
        Ok(Reading {
            lines: Box::new(BufReader::with_capacity(
                256 * 1024,
                raw.take(part.plain_bytes),
            )),
            path: part.path,
            left: part.records,
            first_offset: part.first_offset,
        })
    }

    fn next_line(&mut self) -> Option<Result<Record, ArchiveError>> {
        loop {
            if self.current.is_none() {
                let part = self.parts.pop()?;
                match Self::open_part(part) {
                    Ok(r) => self.current = Some(r),
                    Err(e) => return Some(Err(e)),
                }
            }
            let r = self.current.as_mut().expect("opened above");
            let mut buf = Vec::new();
            match r.lines.read_until(b'\n', &mut buf) {
                Err(e) => return Some(Err(io_err(&r.path)(e))),
                Ok(0) => {
                    if r.left != 0 && self.partition.is_some() {
                        return Some(Err(damaged(
                            &r.path,
                            format!("{} lines fewer than the manifest says", r.left),
                        )));
                    }
                    self.current = None;
                }
                Ok(_) if !buf.ends_with(b"\n") => {
                    // A single file's torn tail, past every checkpoint.
                    if self.partition.is_none() {
                        self.current = None;
                        continue;
                    }
                    return Some(Err(damaged(&r.path, "the last line is cut short")));
                }
                Ok(_) => {
                    if self.partition.is_some() {
                        if r.left == 0 {
                            return Some(Err(damaged(
                                &r.path,
                                "more lines than the manifest says",
                            )));
                        }
                        r.left -= 1;
                    }
                    buf.pop();
                    let offset = if self.partition.is_some() {
                        r.first_offset
                    } else {
                        self.line_no += 1;
                        self.line_no - 1
                    };
                    let position = Position::of_line(&buf, offset);
                    let line = match String::from_utf8(buf) {
                        Ok(l) => l,
                        Err(_) => return Some(Err(damaged(&r.path, "a line is not UTF-8"))),
                    };
                    return Some(Ok(Record {
                        partition: self.partition.clone(),
                        line,
                        position,
                    }));
                }
            }
        }
    }
}

impl Iterator for PartitionRecords {
    type Item = Result<Record, ArchiveError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.next_line()? {
                Ok(r) if !self.opts.keeps(&r.position) => continue,
                other => return Some(other),
            }
        }
    }
}

/// Which topics and partitions a segmented archive holds, read from its
/// folders and `topic.json` files alone (no checkpoint or manifest): cheap
/// enough for a player following the archive to look again at every poll
/// for partitions and topics added since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// Every partition folder, by topic and partition, in that order.
    pub folders: Vec<(String, i32)>,
    /// Per topic, the partitions its `topic.json` says it has.
    pub topics: Vec<(String, i32)>,
}

impl Layout {
    /// Reads the layout of the segmented archive at `root` (which must be
    /// one: [`Archive::open`] checks its marker).
    ///
    /// Fails when a folder cannot be listed or a `topic.json` is damaged.
    pub fn read(root: &Path) -> Result<Self, ArchiveError> {
        let mut layout = Layout::default();
        for topic in sorted_dir(root)? {
            let tdir = root.join(&topic);
            if !tdir.is_dir() {
                continue;
            }
            if let Ok(bytes) = std::fs::read(tdir.join(TOPIC_FILE)) {
                let t: TopicFile = serde_json::from_slice(&bytes)
                    .map_err(|e| damaged(&tdir.join(TOPIC_FILE), e.to_string()))?;
                layout.topics.push((topic.clone(), t.partitions));
            }
            let mut numbers: Vec<i32> = sorted_dir(&tdir)?
                .iter()
                .filter_map(|n| {
                    n.parse::<i32>()
                        .ok()
                        .filter(|p| *p >= 0 && p.to_string() == *n)
                })
                .collect();
            numbers.sort_unstable();
            layout
                .folders
                .extend(numbers.into_iter().map(|p| (topic.clone(), p)));
        }
        Ok(layout)
    }

    /// Every partition the archive has or will have: each folder, and each
    /// partition a `topic.json` counts (one that has received nothing yet
    /// may have no folder), by topic and partition.
    pub fn partitions(&self) -> Vec<(String, i32)> {
        let mut out = self.folders.clone();
        for (topic, n) in &self.topics {
            out.extend((0..*n).map(|p| (topic.clone(), p)));
        }
        out.sort();
        out.dedup();
        out
    }
}

/// An archive opened for reading.
#[derive(Debug, Clone)]
pub enum Archive {
    /// A single file and its checkpoint.
    Single {
        /// The file.
        path: PathBuf,
        /// Its durable length (the checkpoint's), or its whole length
        /// without a checkpoint.
        len: u64,
    },
    /// A segmented archive's partitions, by topic and partition.
    Segmented {
        /// The archive's folder.
        root: PathBuf,
        /// Its partitions.
        partitions: Vec<PartitionArchive>,
        /// Per topic, the partitions its `topic.json` says it has.
        topics: Vec<(String, i32)>,
    },
}

impl Archive {
    /// Opens what file-sink wrote at `path`: a folder holding
    /// [`ARCHIVE_MARKER`] is a segmented archive, a file a single file.
    ///
    /// Fails when the path is neither, or a manifest or checkpoint is
    /// damaged.
    pub fn open(path: &Path) -> Result<Self, ArchiveError> {
        let meta = std::fs::metadata(path).map_err(io_err(path))?;
        if meta.is_file() {
            let len = match SinkCheckpoint::load(&SinkCheckpoint::path_for(path)) {
                Ok(Some(cp)) => cp.file_len.min(meta.len()),
                Ok(None) => meta.len(),
                Err(e) => return Err(damaged(path, format!("{e:#}"))),
            };
            return Ok(Archive::Single {
                path: path.to_path_buf(),
                len,
            });
        }
        let marker = path.join(ARCHIVE_MARKER);
        if !marker.is_file() {
            return Err(damaged(
                path,
                format!("a folder without {ARCHIVE_MARKER} is not an archive file-sink wrote"),
            ));
        }
        let layout = Layout::read(path)?;
        let mut partitions = Vec::new();
        for (topic, p) in &layout.folders {
            partitions.push(PartitionArchive::open(
                &partition_dir(path, topic, *p),
                topic,
                *p,
            )?);
        }
        Ok(Archive::Segmented {
            root: path.to_path_buf(),
            partitions,
            topics: layout.topics,
        })
    }

    /// The archive's completeness: every source change committed before
    /// the mark is in (see the module doc). `None` when some partition
    /// does not know its own yet, or for a single file.
    pub fn complete_before(&self, sealed_only: bool) -> Option<Mark> {
        let Archive::Segmented {
            partitions, topics, ..
        } = self
        else {
            return None;
        };
        // A partition without a folder has nothing archived yet.
        for (topic, n) in topics {
            let have = partitions.iter().filter(|p| &p.topic == topic).count();
            if (have as i32) < *n {
                return None;
            }
        }
        let mut mark: Option<Mark> = None;
        for p in partitions {
            let m = p.complete_before(sealed_only)?;
            mark = Some(mark.map_or(m, |a| a.min(m)));
        }
        mark
    }

    /// Every record, in source commit order across partitions (see the
    /// module doc), filtered by `opts`.
    pub fn records(&self, opts: &ReadOptions) -> Records {
        let streams: Vec<PartitionRecords> = match self {
            Archive::Single { path, len } => vec![PartitionRecords {
                partition: None,
                parts: vec![Part {
                    path: path.clone(),
                    sealed_in: None,
                    compression: Compression::None,
                    stored_bytes: None,
                    plain_bytes: *len,
                    records: 0,
                    first_offset: 0,
                }],
                current: None,
                opts: opts.clone(),
                line_no: 0,
            }],
            Archive::Segmented { partitions, .. } => {
                partitions.iter().map(|p| p.records(opts)).collect()
            }
        };
        Records {
            streams,
            heads: BinaryHeap::new(),
            started: false,
            failed: None,
        }
    }
}

fn sorted_dir(dir: &Path) -> Result<Vec<String>, ArchiveError> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

/// A record waiting in the merge, ordered so the heap pops the earliest.
struct Head {
    key: (i64, i64, usize, u64),
    record: Record,
}

impl PartialEq for Head {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}
impl Eq for Head {}
impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Head {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.key.cmp(&self.key)
    }
}

/// The records of an archive in source commit order.
pub struct Records {
    streams: Vec<PartitionRecords>,
    heads: BinaryHeap<Head>,
    started: bool,
    failed: Option<ArchiveError>,
}

impl Records {
    fn pull(&mut self, i: usize, seq: u64) -> Result<(), ArchiveError> {
        if let Some(r) = self.streams[i].next().transpose()? {
            let key = (
                r.position.commit_order.unwrap_or(-1),
                r.position.total_order.unwrap_or(-1),
                i,
                seq,
            );
            self.heads.push(Head { key, record: r });
        }
        Ok(())
    }
}

impl Iterator for Records {
    type Item = Result<Record, ArchiveError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.failed.take() {
            return Some(Err(e));
        }
        if !self.started {
            self.started = true;
            for i in 0..self.streams.len() {
                if let Err(e) = self.pull(i, 0) {
                    return Some(Err(e));
                }
            }
        }
        let head = self.heads.pop()?;
        let (_, _, i, seq) = head.key;
        if let Err(e) = self.pull(i, seq + 1) {
            self.failed = Some(e);
        }
        Some(Ok(head.record))
    }
}

/// Where reading one partition of a segmented archive stands: in the
/// segment whose first Kafka offset is `segment`, after its first `lines`
/// lines (`bytes` bytes of them, uncompressed). Segment names and contents
/// are deterministic and a sealed segment holds exactly the lines its open
/// file held, so a position stays valid across seals, restarts of
/// file-sink and moves of the archive; keep it to resume reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentPos {
    /// The segment's first offset; `-1`: before the first segment.
    pub segment: i64,
    /// Bytes of its lines already read.
    pub bytes: u64,
    /// Its lines already read.
    pub lines: u64,
}

impl SegmentPos {
    /// Before every record.
    pub const START: SegmentPos = SegmentPos {
        segment: -1,
        bytes: 0,
        lines: 0,
    };
}

impl Default for SegmentPos {
    fn default() -> Self {
        Self::START
    }
}

/// One line read by a [`PartitionTail`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailRecord {
    /// The line, without its line break.
    pub line: Vec<u8>,
    /// Where its event stands in the source; the offset is its segment's
    /// first offset.
    pub position: Position,
    /// Where the line starts.
    pub at: SegmentPos,
    /// Where the next line starts: the position to resume from once this
    /// one is applied.
    pub next: SegmentPos,
}

/// A segment a tail can read: its first offset, where its lines are, and
/// how many bytes of them are durable.
struct TailSegment {
    first_offset: i64,
    path: PathBuf,
    compression: Compression,
    stored_bytes: Option<u64>,
    plain_bytes: u64,
    records: u64,
    stats: SegmentStats,
    sealed: bool,
}

/// Reads one partition of a segmented archive in offset order from a
/// [`SegmentPos`], and follows it while file-sink writes: sealed segments
/// first, then the segments not sealed yet, each up to the length its
/// checkpoint says is durable. When everything durable has been read,
/// [`Self::next_record`] returns `None`; called again later it goes on
/// with what was written meanwhile, through rotations and seals (a segment
/// sealed while being read is read on in its sealed file, at the same
/// line). Sealed segments whose manifest line `skip` says hold nothing in
/// its range ([`ReadOptions::may_keep`]) are stepped over unread; records
/// are not filtered one by one.
///
/// It only reads, so any number of readers may follow an archive that
/// file-sink is writing, on any machine that sees the folder.
pub struct PartitionTail {
    dir: PathBuf,
    pos: SegmentPos,
    skip: ReadOptions,
    /// The segment being read, its lines, and how many bytes of them may
    /// be read.
    current: Option<(TailSegment, Box<dyn BufRead + Send>, u64)>,
}

impl PartitionTail {
    /// A reader of the partition folder `dir` from `from`.
    pub fn new(dir: &Path, from: SegmentPos, skip: ReadOptions) -> Self {
        Self {
            dir: dir.to_path_buf(),
            pos: from,
            skip,
            current: None,
        }
    }

    /// Where the next line starts.
    pub fn position(&self) -> SegmentPos {
        self.pos
    }

    /// The partition's segments now, sealed and not, in offset order.
    fn segments(&self) -> Result<Vec<TailSegment>, ArchiveError> {
        let p = PartitionArchive::open(&self.dir, "", 0)?;
        let mut out: Vec<TailSegment> = p
            .segments
            .iter()
            .map(|s| TailSegment {
                first_offset: s.stats.first_offset,
                path: self.dir.join(&s.segment),
                compression: s.compression,
                stored_bytes: Some(s.bytes),
                plain_bytes: s.stats.plain_bytes,
                records: s.stats.records,
                stats: s.stats.clone(),
                sealed: true,
            })
            .collect();
        for o in p.unsealed() {
            out.push(TailSegment {
                first_offset: o.stats.first_offset,
                path: self.dir.join(&o.segment),
                compression: Compression::None,
                stored_bytes: None,
                plain_bytes: o.stats.plain_bytes,
                records: o.stats.records,
                stats: o.stats.clone(),
                sealed: false,
            });
        }
        out.sort_by_key(|s| s.first_offset);
        Ok(out)
    }

    /// Opens `seg` at `bytes` into its lines. `None` when an unsealed
    /// segment's file is gone: it was sealed meanwhile.
    fn open_at(
        seg: &TailSegment,
        bytes: u64,
    ) -> Result<Option<Box<dyn BufRead + Send>>, ArchiveError> {
        let mut file = match File::open(&seg.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !seg.sealed => return Ok(None),
            Err(e) => return Err(io_err(&seg.path)(e)),
        };
        if let Some(want) = seg.stored_bytes {
            let have = file.metadata().map_err(io_err(&seg.path))?.len();
            if have != want {
                return Err(damaged(
                    &seg.path,
                    format!("{have} bytes where the manifest says {want}"),
                ));
            }
        }
        let mut raw: Box<dyn Read + Send> = match seg.compression {
            Compression::None => {
                use std::io::Seek as _;
                file.seek(std::io::SeekFrom::Start(bytes))
                    .map_err(io_err(&seg.path))?;
                Box::new(file)
            }
            Compression::Zstd => {
                Box::new(zstd::stream::read::Decoder::new(file).map_err(io_err(&seg.path))?)
            }
            Compression::Gzip => Box::new(flate2::read::GzDecoder::new(file)),
        };
        if seg.compression != Compression::None {
            let skipped = std::io::copy(&mut (&mut raw).take(bytes), &mut std::io::sink())
                .map_err(io_err(&seg.path))?;
            if skipped != bytes {
                return Err(damaged(
                    &seg.path,
                    format!("{skipped} bytes of lines where {bytes} were read before"),
                ));
            }
        }
        Ok(Some(Box::new(BufReader::with_capacity(
            256 * 1024,
            raw.take(seg.plain_bytes.saturating_sub(bytes)),
        ))))
    }

    /// Positions the reader on what to read next, from the segments as
    /// they are now; `false` when there is nothing more yet.
    fn refill(&mut self) -> Result<bool, ArchiveError> {
        self.current = None;
        // An unsealed segment sealed between listing and opening is looked
        // for again, in its sealed file.
        for _ in 0..3 {
            let mut segments = self.segments()?;
            let Some(i) = self.pick(&segments)? else {
                return Ok(false);
            };
            let seg = segments.swap_remove(i);
            if let Some(lines) = Self::open_at(&seg, self.pos.bytes)? {
                let left = seg.plain_bytes - self.pos.bytes;
                self.current = Some((seg, lines, left));
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Moves the position over segments read to their end that a later
    /// one follows (file-sink writes one segment of a partition at a time,
    /// so those are complete) and over segments `skip` leaves out; returns
    /// the index of the segment to read from, or `None` when every durable
    /// line has been read.
    fn pick(&mut self, segments: &[TailSegment]) -> Result<Option<usize>, ArchiveError> {
        let gone = |pos: SegmentPos, dir: &Path| {
            damaged(
                dir,
                format!(
                    "the segment starting at offset {} (read up to its line {}) is not in the archive: retired by retention, or another archive",
                    pos.segment, pos.lines
                ),
            )
        };
        // Whether the position's segment is listed (or need not be: at its
        // start, the next listed one will do).
        let mut found = self.pos.bytes == 0 && self.pos.lines == 0;
        for (i, seg) in segments.iter().enumerate() {
            if seg.first_offset < self.pos.segment {
                continue;
            }
            if seg.first_offset > self.pos.segment {
                if !found {
                    return Err(gone(self.pos, &self.dir));
                }
                self.pos = SegmentPos {
                    segment: seg.first_offset,
                    bytes: 0,
                    lines: 0,
                };
                if seg.sealed && !self.skip.may_keep(&seg.stats) {
                    self.pos.bytes = seg.plain_bytes;
                    self.pos.lines = seg.records;
                    continue;
                }
            }
            found = true;
            if self.pos.bytes > seg.plain_bytes || self.pos.lines > seg.records {
                return Err(damaged(
                    &seg.path,
                    format!(
                        "it holds {} lines ({} bytes), fewer than the {} ({} bytes) read from it before",
                        seg.records, seg.plain_bytes, self.pos.lines, self.pos.bytes
                    ),
                ));
            }
            if self.pos.bytes < seg.plain_bytes {
                return Ok(Some(i));
            }
        }
        if !found {
            return Err(gone(self.pos, &self.dir));
        }
        Ok(None)
    }

    /// The next durable line, or `None` when every durable line has been
    /// read (call again to follow).
    ///
    /// Fails when a segment is missing, damaged, or shorter than what was
    /// read from it before (an archive other than the one the position
    /// was taken in).
    pub fn next_record(&mut self) -> Result<Option<TailRecord>, ArchiveError> {
        loop {
            if self.current.is_none() && !self.refill()? {
                return Ok(None);
            }
            let (seg, lines, left) = self.current.as_mut().expect("refilled");
            if *left == 0 {
                self.current = None;
                // Read to the durable end: see whether more is durable, or
                // sealed, or a later segment began.
                if !self.refill()? {
                    return Ok(None);
                }
                continue;
            }
            let mut buf = Vec::new();
            let n = lines
                .read_until(b'\n', &mut buf)
                .map_err(io_err(&seg.path))? as u64;
            if n == 0 || !buf.ends_with(b"\n") {
                return Err(damaged(
                    &seg.path,
                    format!(
                        "it ends inside the {} durable bytes its {} says it holds",
                        seg.plain_bytes,
                        if seg.sealed { "manifest" } else { "checkpoint" }
                    ),
                ));
            }
            *left -= n;
            buf.pop();
            let at = self.pos;
            self.pos.bytes += n;
            self.pos.lines += 1;
            if self.pos.lines > seg.records {
                return Err(damaged(
                    &seg.path,
                    "more lines than its manifest or checkpoint says",
                ));
            }
            let position = Position::of_line(&buf, seg.first_offset);
            return Ok(Some(TailRecord {
                line: buf,
                position,
                at,
                next: self.pos,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_mark_is_read_escaped_or_not_and_false_is_none() {
        let snap = |v: &str| {
            let line =
                format!(r#"{{"source":{{"snapshot":{v}}},"transaction":{{"commit_order":4}}}}"#);
            Position::parse_line(line.as_bytes(), 0).unwrap()
        };
        assert_eq!(snap(r#""false""#).snapshot, None);
        assert_eq!(snap(r#""fa\u006cse""#).snapshot, None);
        assert_eq!(snap("null").snapshot, None);
        assert_eq!(snap(r#""first""#).snapshot.as_deref(), Some("first"));
        assert_eq!(snap(r#""l\u0061st""#).snapshot.as_deref(), Some("last"));
        assert_eq!(snap(r#""first""#).commit_order, Some(4));
        // Another type: the line is JSON, its position unknown.
        assert_eq!(snap("1").commit_order, None);
    }

    #[test]
    fn positions_are_read_with_and_without_the_connect_wrapper() {
        let bare = br#"{"before":null,"after":{"id":1},"source":{"ts_ms":5,"ts_us":5001,"snapshot":"first"},"transaction":{"id":"7:0","total_order":1,"commit_order":0,"event_count":null},"op":"r"}"#;
        let p = Position::of_line(bare, 3);
        assert_eq!(
            p,
            Position {
                offset: 3,
                commit_order: Some(0),
                total_order: Some(1),
                ts_us: Some(5001),
                unit_end: false,
                snapshot: Some("first".into()),
            }
        );
        let wrapped = br#"{"schema":{"type":"struct"},"payload":{"source":{"ts_ms":5,"snapshot":"false"},"transaction":{"commit_order":9,"total_order":2,"event_count":2},"op":"u"}}"#;
        let p = Position::of_line(wrapped, 0);
        assert_eq!(p.commit_order, Some(9));
        assert_eq!(p.ts_us, Some(5000));
        assert!(p.unit_end);
        assert_eq!(p.snapshot, None);
        assert_eq!(
            Position::of_line(b"[1,2]", 4),
            Position {
                offset: 4,
                ..Default::default()
            }
        );
        // A payload of another shape is still JSON; broken JSON is not.
        assert!(Position::parse_line(br#"{"schema":{},"payload":"text"}"#, 0).is_ok());
        assert!(Position::parse_line(br#"{"source":{"ts_us":"soon"}}"#, 0).is_ok());
        assert!(Position::parse_line(b"{\"a\":", 0).is_err());
        assert!(Position::parse_line(b"{} x", 0).is_err());
    }

    #[test]
    fn a_number_that_is_no_i64_reads_as_none_and_keeps_the_rest() {
        let line = br#"{"source":{"ts_ms":1.5e3,"ts_us":-7},"transaction":{"commit_order":18446744073709551615,"total_order":123456789012345678901234567890,"event_count":0.0}}"#;
        let p = Position::parse_line(line, 2).unwrap();
        assert_eq!(
            p,
            Position {
                offset: 2,
                commit_order: None,
                total_order: None,
                ts_us: Some(-7),
                unit_end: true,
                snapshot: None,
            }
        );
        // A number of another type than expected: only the offset.
        let p = Position::parse_line(br#"{"transaction":{"commit_order":"9"}}"#, 1).unwrap();
        assert_eq!(p.commit_order, None);
        assert!(Position::parse_line(br#"{"source":{"ts_us":01}}"#, 0).is_err());
    }

    #[test]
    fn marks_combine_field_by_field() {
        let a = Mark {
            commit_order: Some(5),
            ts_us: Some(100),
        };
        let b = Mark {
            commit_order: Some(7),
            ts_us: None,
        };
        assert_eq!(
            a.min(b),
            Mark {
                commit_order: Some(5),
                ts_us: None
            }
        );
        assert_eq!(
            a.max(b),
            Mark {
                commit_order: Some(7),
                ts_us: Some(100)
            }
        );
    }

    #[test]
    fn manifest_lines_keep_their_documented_shape() {
        let mut stats = SegmentStats::start(
            Position {
                offset: 0,
                commit_order: Some(0),
                total_order: Some(1),
                ts_us: Some(10),
                unit_end: false,
                snapshot: Some("first".into()),
            },
            10,
        );
        stats.add(
            Position {
                offset: 2,
                commit_order: Some(3),
                ts_us: Some(30),
                ..Default::default()
            },
            12,
        );
        let line = ManifestLine::Sealed(Box::new(SealedSegment {
            segment: segment_name("t", 0, 0, Compression::Zstd),
            topic: "t".into(),
            partition: 0,
            stats,
            compression: Compression::Zstd,
            bytes: 20,
            sha256: "ab".into(),
            complete_before: Some(Mark {
                commit_order: Some(3),
                ts_us: Some(30),
            }),
            sealed_at: "2026-12-01T10:00:00Z".into(),
        }));
        let text = serde_json::to_string(&line).unwrap();
        assert_eq!(
            text,
            r#"{"kind":"sealed","segment":"t+0+00000000000000000000.jsonl.zst","topic":"t","partition":0,"first_offset":0,"last_offset":2,"records":2,"plain_bytes":22,"first":{"offset":0,"commit_order":0,"total_order":1,"ts_us":10,"snapshot":"first"},"last":{"offset":2,"commit_order":3,"ts_us":30},"min_ts_us":10,"max_ts_us":30,"snapshot_first":{"offset":0,"commit_order":0,"total_order":1,"ts_us":10,"snapshot":"first"},"compression":"zstd","bytes":20,"sha256":"ab","complete_before":{"commit_order":3,"ts_us":30},"sealed_at":"2026-12-01T10:00:00Z"}"#
        );
        assert_eq!(serde_json::from_str::<ManifestLine>(&text).unwrap(), line);
    }

    /// Writes a sealed zstd segment and its manifest line by hand, as the
    /// format describes, plus an open segment with an unsynced tail.
    fn write_partition(root: &Path, topic: &str, p: i32, lines: &[(i64, &str)], sealed: usize) {
        let dir = partition_dir(root, topic, p);
        std::fs::create_dir_all(&dir).unwrap();
        let (seal, open) = lines.split_at(sealed);
        let mut manifest = String::new();
        let mut cp = PartitionCheckpoint {
            version: FORMAT_VERSION,
            topic: topic.into(),
            partition: p,
            ..Default::default()
        };
        if !seal.is_empty() {
            let text: String = seal.iter().map(|(_, l)| format!("{l}\n")).collect();
            let mut stats: Option<SegmentStats> = None;
            for (off, l) in seal {
                let pos = Position::of_line(l.as_bytes(), *off);
                match &mut stats {
                    None => stats = Some(SegmentStats::start(pos, l.len() as u64 + 1)),
                    Some(s) => s.add(pos, l.len() as u64 + 1),
                }
            }
            let stats = stats.unwrap();
            let name = segment_name(topic, p, stats.first_offset, Compression::Zstd);
            let z = zstd::encode_all(text.as_bytes(), 3).unwrap();
            std::fs::write(dir.join(&name), &z).unwrap();
            manifest += &serde_json::to_string(&ManifestLine::Sealed(Box::new(SealedSegment {
                segment: name,
                topic: topic.into(),
                partition: p,
                stats,
                compression: Compression::Zstd,
                bytes: z.len() as u64,
                sha256: String::new(),
                complete_before: None,
                sealed_at: String::new(),
            })))
            .unwrap();
            manifest += "\n";
            cp.sealed = 1;
        }
        // A torn manifest line from a crash is not read.
        manifest += "{\"kind\":\"sea";
        std::fs::write(dir.join(MANIFEST), manifest).unwrap();
        if !open.is_empty() {
            let text: String = open.iter().map(|(_, l)| format!("{l}\n")).collect();
            let mut stats = SegmentStats::start(
                Position::of_line(open[0].1.as_bytes(), open[0].0),
                open[0].1.len() as u64 + 1,
            );
            for (off, l) in &open[1..] {
                stats.add(Position::of_line(l.as_bytes(), *off), l.len() as u64 + 1);
            }
            let name = open_segment_name(topic, p, open[0].0);
            std::fs::write(dir.join(&name), text + "{\"unsynced\":1}\n").unwrap();
            cp.open = Some(OpenSegment {
                segment: name,
                opened_at_ms: 0,
                stats,
            });
        }
        std::fs::write(dir.join(CHECKPOINT), serde_json::to_vec(&cp).unwrap()).unwrap();
    }

    fn event(co: i64, order: i64) -> String {
        format!(
            r#"{{"op":"c","source":{{"ts_us":{}}},"transaction":{{"commit_order":{co},"total_order":{order}}}}}"#,
            co * 10
        )
    }

    #[test]
    fn a_segmented_archive_is_read_in_commit_order_across_partitions() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(
            root.path().join(ARCHIVE_MARKER),
            r#"{"format":"tidemark-archive","version":1}"#,
        )
        .unwrap();
        let e = |co, o| event(co, o);
        let (a, b, c, d, f) = (e(1, 1), e(1, 2), e(2, 1), e(3, 1), e(3, 2));
        write_partition(root.path(), "t", 0, &[(0, &a), (5, &c), (6, &f)], 2);
        write_partition(root.path(), "t", 1, &[(0, &b), (1, &d)], 1);
        let archive = Archive::open(root.path()).unwrap();
        let got: Vec<(i64, i64)> = archive
            .records(&ReadOptions::default())
            .map(|r| {
                let p = r.unwrap().position;
                (p.commit_order.unwrap(), p.total_order.unwrap())
            })
            .collect();
        assert_eq!(got, vec![(1, 1), (1, 2), (2, 1), (3, 1), (3, 2)]);
        // Sealed only, and a range that skips the first segments unread.
        let sealed: Vec<String> = archive
            .records(&ReadOptions {
                sealed_only: true,
                ..Default::default()
            })
            .map(|r| r.unwrap().line)
            .collect();
        assert_eq!(sealed, vec![a.clone(), b.clone(), c.clone()]);
        std::fs::remove_file(partition_dir(root.path(), "t", 0).join(segment_name(
            "t",
            0,
            0,
            Compression::Zstd,
        )))
        .unwrap();
        let later: Vec<String> = archive
            .records(&ReadOptions {
                from_commit_order: Some(3),
                ..Default::default()
            })
            .map(|r| r.unwrap().line)
            .collect();
        assert_eq!(later, vec![d, f]);
        // A missing segment in range is an error, not a gap.
        assert!(archive.records(&ReadOptions::default()).any(|r| r.is_err()));
    }

    #[test]
    fn a_single_file_is_read_up_to_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        std::fs::write(&path, "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n{\"a\"").unwrap();
        let archive = Archive::open(&path).unwrap();
        assert_eq!(archive.records(&ReadOptions::default()).count(), 3);
        SinkCheckpoint {
            version: 1,
            file_len: 16,
            ..Default::default()
        }
        .save(&SinkCheckpoint::path_for(&path))
        .unwrap();
        let lines: Vec<String> = Archive::open(&path)
            .unwrap()
            .records(&ReadOptions::default())
            .map(|r| r.unwrap().line)
            .collect();
        assert_eq!(lines, vec!["{\"a\":1}", "{\"a\":2}"]);
    }
}
