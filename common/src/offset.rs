//! Source and sink positions.
//!
//! A source position says how far pg-source has read a table; it travels in
//! the same Kafka transaction as the records it covers, so a restart resumes
//! exactly after what Kafka committed. A sink checkpoint says which Kafka
//! offsets the output file covers; file-sink owns it, next to the file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// The topic that holds source positions, compacted, one key per table.
pub const DEFAULT_OFFSETS_TOPIC: &str = "tidemark.source-offsets";

/// How far a source has read, as the offsets topic stores it: one JSON
/// object tagged by `mode`. The field names are those 0.1 stored, so its
/// positions still decode where their meaning is the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum SourcePosition {
    /// `timestamp+incrementing` mode, one per table.
    TimestampIncrementing(TimestampPosition),
    /// `changelog` mode, one per connector.
    ChangeLog(ChangeLogPosition),
    /// `logical` mode, one per connector.
    Logical(LogicalPosition),
}

/// `timestamp+incrementing` mode: the last row sent of one table, by its
/// timestamp column and its incrementing column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimestampPosition {
    /// The last row's timestamp as Postgres prints it (ISO, microseconds,
    /// UTC for `timestamptz`); kept as text so it compares back exactly.
    pub timestamp: String,
    /// The last row's incrementing column.
    pub incrementing: i64,
}

/// How far `changelog` mode has read, in Postgres snapshots (`pg_snapshot`
/// text, `xmin:xmax:xip,...`).
///
/// Every transaction visible in `done` has been sent. The transactions that
/// became visible between `done` and `batch` are being sent, each table in
/// `seq` order, up to `after_seq`. Reading by snapshot difference sends
/// transactions in commit order, batch by batch; within a batch, two changes
/// of one row are in `seq` order, which is their commit order too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeLogPosition {
    /// Every transaction visible in this snapshot is sent.
    pub done: String,
    /// The snapshot whose newly visible transactions are being sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<String>,
    /// Per table, the last `seq` sent within `batch`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub after_seq: BTreeMap<String, i64>,
    /// The initial snapshot, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotProgress>,
    /// Per table, the parts of an initial snapshot that were read in later
    /// snapshots after a restart (see [`Segment`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub segments: BTreeMap<String, Vec<Segment>>,
    /// The ordinal of the last batch that sent events (its events'
    /// `commit_order`); the next batch with events is one more.
    #[serde(default)]
    pub commit_order: u64,
    /// When `batch` was taken, µs since the epoch: its events' commit time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_us: Option<i64>,
    /// Events of `batch` sent so far, per table in the order they came
    /// (their `total_order` and `data_collection_order` go on from here).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unit_counts: Vec<(String, u64)>,
    /// The units sent so far (see [`UnitChain`]): the next unit's
    /// `prev_commit_order`.
    #[serde(default, flatten)]
    pub chain: UnitChain,
    /// The tables this connector streams (`format('%I.%I')` names): a
    /// table read now that is not here entered the set since (a longer
    /// `table.whitelist`, a table a pattern came to match) and gets an
    /// incremental snapshot. `None` in a position stored before tables
    /// could enter: every table read at the next start counts as in the set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables: Option<BTreeSet<String>>,
    /// The incremental snapshots to do, the one being read first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub incremental: Vec<IncrementalProgress>,
    /// Tables that left the set (no longer read): what the archive holds
    /// of one is stale, so if it enters again, its snapshot begins with a
    /// TRUNCATE event that empties it.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub left: BTreeSet<String>,
    /// The OID each table is read as: a table created under its name later
    /// (the one read dropped, or renamed away) takes its place, and enters
    /// the set again. Absent in a position stored before: the tables of
    /// those names at the next start.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub oids: BTreeMap<String, u32>,
    /// Tables read whose changes were last logged under another name
    /// (renamed away): one logged under its name again enters the set again.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub away: BTreeSet<String>,
}

/// Where the incremental snapshot of one table stands: the table's rows are
/// sent in key order, a chunk per unit, and this says how far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncrementalProgress {
    /// The table (`format('%I.%I')`).
    pub table: String,
    /// The key of the last row sent; `None` before the first chunk. With
    /// [`Self::key`]: an array of the key columns' texts in key order. A
    /// position stored without it holds an object of each key column's
    /// text by column name, which a renamed key column cannot be found in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_key: Option<serde_json::Value>,
    /// The primary key the chunks were read in the order of, by what a
    /// column rename leaves alone: a key replaced since (other columns, or
    /// another index) restarts the table's snapshot, as `last_key` means
    /// nothing in the new key's order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyIdentity>,
    /// Rows sent so far.
    #[serde(default)]
    pub rows: u64,
    /// Why the snapshot runs: `added` (the table entered the set),
    /// `re-entered` (it entered again after it had left: its first chunk
    /// begins with a TRUNCATE event) or `signal` (asked for).
    #[serde(default)]
    pub reason: String,
    /// When it was asked for, µs since the epoch.
    #[serde(default)]
    pub since_us: i64,
    /// The signal that asked for it (`tidemark.signal`'s `id`), for a
    /// snapshot on demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i64>,
}

/// A primary key as a stored incremental snapshot position names it: the
/// key index's OID and its columns' `pg_attribute.attnum`s in index order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyIdentity {
    /// `pg_index.indexrelid`.
    pub index: u32,
    /// `pg_index.indkey`.
    pub attnums: Vec<i32>,
}

/// How far `logical` mode has read the replication slot, and the initial
/// snapshot it started with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogicalPosition {
    /// The end LSN of the last transaction sent whole; the replication
    /// stream resumes after it.
    #[serde(default)]
    pub lsn: u64,
    /// When a large transaction is split over several Kafka transactions:
    /// the WAL position of the last change sent of the transaction after
    /// `lsn`. A restart skips its changes up to there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_txn_lsn: Option<u64>,
    /// How many changes at `in_txn_lsn` were sent (a multi-row insert, as
    /// `COPY` writes, has several changes at one position).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub in_txn: u64,
    /// Events of the transaction after `lsn` sent so far, per table in the
    /// order they came, when it is split (their `total_order` and
    /// `data_collection_order` go on from here).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_txn_counts: Vec<(String, u64)>,
    /// The snapshot the initial snapshot read (`pg_snapshot` text), taken
    /// just after the slot was created: the stream's transactions visible
    /// in it are in the snapshot's rows and are not sent again.
    pub done: String,
    /// The initial snapshot, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotProgress>,
    /// Per table, the parts of the initial snapshot read in later snapshots
    /// after a restart (see [`Segment`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub segments: BTreeMap<String, Vec<Segment>>,
    /// The units sent so far (see [`UnitChain`]): the next unit's
    /// `prev_commit_order`.
    #[serde(default, flatten)]
    pub chain: UnitChain,
    /// The tables this connector streams (`format('%I.%I')` names), so a
    /// table that entered the set since is told apart; `None` in a position
    /// stored before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables: Option<BTreeSet<String>>,
    /// The incremental snapshots to do, the one being read first (as in
    /// [`ChangeLogPosition::incremental`]; pg-source's
    /// `modes::logical::added` says how logical mode lines a chunk up with
    /// the replication stream).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub incremental: Vec<IncrementalProgress>,
    /// Tables that left the set (as in [`ChangeLogPosition::left`]).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub left: BTreeSet<String>,
    /// The OID each table is read as: a table created under its name later
    /// (the one read dropped, or renamed away) takes its place, and enters
    /// the set again. Absent in a position stored before: the tables of
    /// those names at the next start.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub oids: BTreeMap<String, u32>,
    /// The snapshot (`pg_snapshot` text) up to which the signal table was
    /// read (snapshots on demand): a signal whose transaction it shows was
    /// acted on. `None` in a position stored before: signals are read from
    /// the first look on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signals: Option<String>,
}

/// Which units a connector has sent, for `transaction.prev_commit_order`:
/// the commit_order of the unit sent before this one, `null` on the first
/// unit it ever sends (the initial snapshot, unit 0, when it has rows).
/// Kept in the stored position, so a restart and a unit cut over several
/// Kafka transactions go on with the right one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitChain {
    /// The commit_order of the last unit with events (or dead letters)
    /// sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sent: Option<u64>,
    /// The prev_commit_order of that unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_prev: Option<u64>,
}

impl UnitChain {
    /// The prev_commit_order of an event (or dead letter) of unit
    /// `commit_order`, which is now the last unit sent.
    pub fn event_of(&mut self, commit_order: u64) -> Option<u64> {
        if self.last_sent != Some(commit_order) {
            self.last_prev = self.last_sent;
            self.last_sent = Some(commit_order);
        }
        self.last_prev
    }
}

/// Counts events of a unit per table, in the order the tables come: the
/// `data_collection_order` of the next event of `table`, and the
/// `total_order` of the next event, after counting it.
pub fn count_event(counts: &mut Vec<(String, u64)>, table: &str) -> (u64, u64) {
    let n = match counts.iter_mut().find(|(t, _)| t == table) {
        Some((_, n)) => {
            *n += 1;
            *n
        }
        None => {
            counts.push((table.to_owned(), 1));
            1
        }
    };
    (n, counts.iter().map(|(_, n)| n).sum())
}

/// The parts of a position the initial snapshot reads and moves, borrowed
/// from a [`ChangeLogPosition`] or a [`LogicalPosition`].
#[derive(Debug)]
pub struct SnapshotState<'a> {
    /// The snapshot streaming starts at: set when a fresh snapshot opens.
    pub done: &'a mut String,
    /// The snapshot's progress, `None` once it is over.
    pub progress: &'a mut Option<SnapshotProgress>,
    /// Key ranges read in later snapshots after restarts.
    pub segments: &'a mut BTreeMap<String, Vec<Segment>>,
    /// The units sent: the snapshot is unit 0.
    pub chain: &'a mut UnitChain,
}

impl ChangeLogPosition {
    /// The initial snapshot's part of the position.
    pub fn snapshot_state(&mut self) -> SnapshotState<'_> {
        SnapshotState {
            done: &mut self.done,
            progress: &mut self.snapshot,
            segments: &mut self.segments,
            chain: &mut self.chain,
        }
    }
}

impl LogicalPosition {
    /// The initial snapshot's part of the position.
    pub fn snapshot_state(&mut self) -> SnapshotState<'_> {
        SnapshotState {
            done: &mut self.done,
            progress: &mut self.snapshot,
            segments: &mut self.segments,
            chain: &mut self.chain,
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Where an initial snapshot stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotProgress {
    /// Tables not finished yet, the one being read first.
    pub tables: Vec<String>,
    /// The primary key of the last row sent from the first table (as
    /// `to_jsonb` of the key columns); `None` before its first row.
    pub last_key: Option<serde_json::Value>,
    /// Rows sent so far, all tables.
    pub rows: u64,
    /// Rows sent so far per table, in the order the tables were read: the
    /// snapshot's `data_collection_order` and, on its last event,
    /// `data_collections`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub counts: Vec<(String, u64)>,
    /// When the snapshot began, µs since the epoch: its events' commit time.
    #[serde(default)]
    pub started_us: i64,
}

/// A key range of a table read in one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// The snapshot the range was read in.
    pub snapshot: String,
    /// Keys after this one (exclusive); `None` from the first key.
    pub lo: Option<serde_json::Value>,
    /// Keys up to this one (inclusive); `None` to the last key.
    pub hi: Option<serde_json::Value>,
}

/// The key a source position is stored under: connector name and table,
/// shaped like Kafka Connect's source-offset keys.
pub fn position_key(connector: &str, table: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!([connector, {"table": table, "protocol": "tidemark-1"}]))
        .expect("a JSON array always serialises")
}

impl SourcePosition {
    /// Encodes the position as the offsets topic stores it.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a position always serialises")
    }

    /// Decodes a stored position.
    ///
    /// Fails when the bytes are not a position this version understands.
    pub fn decode(bytes: &[u8]) -> anyhow::Result<Self> {
        serde_json::from_slice(bytes).with_context(|| {
            format!(
                "stored source position `{}` is not one this version of pg-source understands",
                String::from_utf8_lossy(bytes)
            )
        })
    }
}

/// One partition's next offset to read.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
}

/// What file-sink has durably written: the output file's length, and for each
/// partition the next offset to read. Saved only after the file is fsynced,
/// so on restart the file is cut back to `file_len` and reading resumes at
/// `offsets`: no line is lost and none is written twice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkCheckpoint {
    /// Format version, for future changes.
    pub version: u32,
    /// Bytes of the output file that this checkpoint covers.
    pub file_len: u64,
    /// Bytes of the dead-letter file that this checkpoint covers.
    #[serde(default)]
    pub dead_letter_len: u64,
    /// `topic` → `partition` → next offset to read.
    pub offsets: BTreeMap<String, BTreeMap<i32, i64>>,
    /// `topic` → `partition` → the last record read, to tell a topic
    /// deleted and created again from the one the file holds.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fingerprints: BTreeMap<String, BTreeMap<i32, crate::archive::Fingerprint>>,
    /// `topic` → the partitions it had when the file first took it: one
    /// numbered at or above this was added to the topic later, so the file
    /// must hold it from offset 0. A topic is absent until it is first
    /// assigned, and in checkpoints written before this was kept (the
    /// count at the first assignment after the upgrade then stands for it).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub first_partitions: BTreeMap<String, i32>,
}

impl SinkCheckpoint {
    /// Where the checkpoint of output file `file` lives.
    pub fn path_for(file: &Path) -> PathBuf {
        let mut name = file
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        name.push(".tidemark-checkpoint");
        file.with_file_name(name)
    }

    /// Loads a checkpoint; `None` when there is none yet.
    ///
    /// Fails when the file exists but cannot be read or parsed: that is
    /// damage a person must look at, not a fresh start.
    pub fn load(path: &Path) -> anyhow::Result<Option<Self>> {
        match fs::read(path) {
            Ok(bytes) => {
                let cp: Self = serde_json::from_slice(&bytes).with_context(|| {
                    format!("checkpoint {} is damaged; restore it or remove it together with the output file to start over", path.display())
                })?;
                Ok(Some(cp))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read checkpoint {}", path.display())),
        }
    }

    /// Saves the checkpoint atomically: a temporary file is written and
    /// fsynced, renamed over the old one, and the folder fsynced, so a crash
    /// leaves either the old or the new checkpoint, never a torn one.
    ///
    /// Fails on any write, sync or rename error.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec(self).expect("a checkpoint always serialises");
        let mut f = fs::File::create(&tmp)
            .with_context(|| format!("cannot write checkpoint {}", tmp.display()))?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("cannot write checkpoint {}", tmp.display()))?;
        drop(f);
        fs::rename(&tmp, path)
            .with_context(|| format!("cannot move checkpoint into place at {}", path.display()))?;
        sync_dir(path)?;
        Ok(())
    }

    /// The next offset of one partition, if any was recorded.
    pub fn next_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        self.offsets.get(topic)?.get(&partition).copied()
    }

    /// The last record read from a partition, if recorded.
    pub fn fingerprint(&self, topic: &str, partition: i32) -> Option<&crate::archive::Fingerprint> {
        self.fingerprints.get(topic)?.get(&partition)
    }

    /// The partitions `topic` had when the file first took it, if noted.
    pub fn first_partitions(&self, topic: &str) -> Option<i32> {
        self.first_partitions.get(topic).copied()
    }

    /// Records that everything before `next` in a partition is written.
    pub fn advance(&mut self, topic: &str, partition: i32, next: i64) {
        let slot = self
            .offsets
            .entry(topic.to_owned())
            .or_default()
            .entry(partition)
            .or_insert(next);
        *slot = (*slot).max(next);
    }
}

/// Fsyncs the folder holding `path`, so a rename or a new file in it survives
/// a power loss.
///
/// Fails when the folder cannot be opened or synced.
pub fn sync_dir(path: &Path) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync folder {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_unit_names_the_one_sent_before_it() {
        let mut c = UnitChain::default();
        assert_eq!(c.event_of(0), None, "the snapshot is the first unit");
        assert_eq!(c.event_of(0), None);
        assert_eq!(c.event_of(160), Some(0));
        assert_eq!(c.event_of(160), Some(0), "a unit's every event");
        assert_eq!(c.event_of(300), Some(160));
        let stored: UnitChain = serde_json::from_value(serde_json::to_value(c).unwrap()).unwrap();
        assert_eq!(stored, c);
        let mut fresh = UnitChain::default();
        assert_eq!(
            fresh.event_of(7),
            None,
            "no snapshot: the first unit has none"
        );
    }

    #[test]
    fn changelog_positions_round_trip() {
        let mut p = ChangeLogPosition {
            done: "100:105:101,103".into(),
            batch: Some("104:110:".into()),
            ..Default::default()
        };
        p.after_seq.insert("public.t".into(), 42);
        p.segments.insert(
            "public.t".into(),
            vec![Segment {
                snapshot: "90:95:".into(),
                lo: Some(serde_json::json!({"id": 7})),
                hi: None,
            }],
        );
        let pos = SourcePosition::ChangeLog(p);
        assert_eq!(SourcePosition::decode(&pos.encode()).unwrap(), pos);
    }

    #[test]
    fn positions_round_trip() {
        let p = SourcePosition::TimestampIncrementing(TimestampPosition {
            timestamp: "2026-11-23 19:00:00.123456".into(),
            incrementing: 42,
        });
        assert_eq!(SourcePosition::decode(&p.encode()).unwrap(), p);
        assert!(SourcePosition::decode(b"{\"mode\":\"nope\"}").is_err());
    }

    #[test]
    fn positions_stored_by_0_1_still_decode() {
        let ts = br#"{"mode":"timestamp_incrementing","timestamp":"2026-01-01 00:00:00","incrementing":7}"#;
        assert_eq!(
            SourcePosition::decode(ts).unwrap(),
            SourcePosition::TimestampIncrementing(TimestampPosition {
                timestamp: "2026-01-01 00:00:00".into(),
                incrementing: 7
            })
        );
        let logical =
            br#"{"mode":"logical","done":"10:12:11","lsn":23456,"in_txn_lsn":23500,"in_txn":3}"#;
        let SourcePosition::Logical(p) = SourcePosition::decode(logical).unwrap() else {
            panic!("not a logical position")
        };
        assert_eq!(
            (p.lsn, p.in_txn_lsn, p.in_txn, p.done.as_str()),
            (23456, Some(23500), 3, "10:12:11")
        );
        let changelog = br#"{"mode":"change_log","done":"10:12:11","batch":"12:14:","after_seq":{"public.t":5}}"#;
        let SourcePosition::ChangeLog(p) = SourcePosition::decode(changelog).unwrap() else {
            panic!("not a change-log position")
        };
        assert_eq!(p.after_seq["public.t"], 5);
    }

    #[test]
    fn checkpoints_save_atomically_and_only_advance() {
        let dir = tempfile::tempdir().unwrap();
        let path = SinkCheckpoint::path_for(&dir.path().join("out.txt"));
        assert_eq!(path.file_name().unwrap(), "out.txt.tidemark-checkpoint");
        assert!(SinkCheckpoint::load(&path).unwrap().is_none());
        let mut cp = SinkCheckpoint {
            version: 1,
            file_len: 10,
            ..Default::default()
        };
        cp.advance("t", 0, 5);
        cp.advance("t", 0, 3);
        assert_eq!(cp.next_offset("t", 0), Some(5));
        cp.save(&path).unwrap();
        assert_eq!(SinkCheckpoint::load(&path).unwrap(), Some(cp));
        std::fs::write(&path, b"{torn").unwrap();
        assert!(SinkCheckpoint::load(&path).is_err());
    }

    #[test]
    fn a_checkpoint_without_first_partition_counts_stays_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = SinkCheckpoint::path_for(&dir.path().join("out.txt"));
        // As written before the first counts were kept.
        std::fs::write(
            &path,
            br#"{"version":1,"file_len":8,"offsets":{"t":{"0":1}}}"#,
        )
        .unwrap();
        let mut cp = SinkCheckpoint::load(&path).unwrap().unwrap();
        assert_eq!(cp.next_offset("t", 0), Some(1));
        assert_eq!(cp.first_partitions("t"), None);
        cp.first_partitions.insert("t".into(), 2);
        cp.save(&path).unwrap();
        assert_eq!(
            SinkCheckpoint::load(&path)
                .unwrap()
                .unwrap()
                .first_partitions("t"),
            Some(2)
        );
    }
}
