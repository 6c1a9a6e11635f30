//! Reading a segmented archive (the folder file-sink writes with
//! `file.rotate.bytes`, `file.rotate.interval.ms` or `file.compression`):
//! one stream per topic partition, each read in offset order by a
//! [`PartitionTail`] on its own thread, through sealed (compressed)
//! segments and then the ones file-sink is still writing, up to what its
//! checkpoint says is durable.
//!
//! A partition's position is kept as a [`StreamPos`]: `offset` is the
//! first Kafka offset of the segment (which names it, whatever it is
//! compressed with and wherever the archive is moved), `line` the lines of
//! it already read. It is stored in the target like every stream's, so a
//! restart resumes inside the segment it stopped in.
//!
//! What lies outside the replay's range is not read: sealed segments whose
//! manifest line says they hold only units applied before (below the
//! stored position) are stepped over unread, and a partition is read no
//! further than its first record past the point in time (`--until`,
//! `--until-lsn`, `--until-txid`): every later one lies after the point
//! too, as a partition holds its events in commit order. That one record
//! is handed over so that the replay sees where the point ends.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use tidemark_common::archive::{
    Archive, Layout, PartitionArchive, PartitionTail, Position, ReadOptions, SegmentPos,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::archive::{Batcher, Item, RawRecord, StreamId, StreamPos, FILE_POLL};
use crate::units::Until;

/// The partitions of the segmented archive at `root`, as (topic,
/// partition, folder): every partition folder there is, and every one its
/// topic's `topic.json` says the topic has (a partition that has received
/// nothing yet has no folder).
///
/// Fails when `root` is not an archive file-sink wrote or a manifest or
/// checkpoint is damaged.
pub fn partitions(root: &Path) -> anyhow::Result<Vec<(String, i32, PathBuf)>> {
    let archive = Archive::open(root).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the segmented archive {} (--input): {e}",
            root.display()
        )
    })?;
    if !matches!(archive, Archive::Segmented { .. }) {
        bail!("{} is not a segmented archive", root.display());
    }
    partitions_now(root)
}

/// Like [`partitions`], from the folders and `topic.json` files alone
/// (no checkpoint or manifest is read): what a follower looks at on each
/// poll for partitions and topics added since it started.
///
/// Fails when a folder cannot be listed or a `topic.json` is damaged.
pub fn partitions_now(root: &Path) -> anyhow::Result<Vec<(String, i32, PathBuf)>> {
    let layout = Layout::read(root).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the segmented archive {} (--input): {e}",
            root.display()
        )
    })?;
    Ok(layout
        .partitions()
        .into_iter()
        .map(|(t, p)| {
            let dir = tidemark_common::archive::partition_dir(root, &t, p);
            (t, p, dir)
        })
        .collect())
}

/// The partition's last Kafka offset archived so far, for progress.
pub fn last_offset(dir: &Path) -> u64 {
    tidemark_common::archive::PartitionCheckpoint::load(dir)
        .ok()
        .flatten()
        .map_or(0, |c| c.next_offset.max(0) as u64)
}

/// Whether an event at `p` lies past the point in time `until`.
fn past(until: Until, p: &Position) -> bool {
    match until {
        Until::End => false,
        Until::Time(t) => p.ts_us.is_some_and(|ts| ts > t),
        Until::CommitOrder(c) => p.commit_order.is_some_and(|co| co > c),
    }
}

/// The error for a stored position the partition does not hold.
fn not_held(p: &Partition) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: the stored position is line {} of the segment from offset {}, which the archive does not hold \
         (fewer durable lines, retired by retention, or another archive than the one the position was taken in); \
         replay into a fresh target, or give another --name",
        p.dir.display(),
        p.start.line,
        p.start.offset
    )
}

/// The partition's completeness mark as its folder says now (`None`: no
/// mark yet, or its files cannot be read at this instant).
fn read_mark(dir: &Path) -> Option<i64> {
    PartitionArchive::open(dir, "", 0)
        .ok()
        .and_then(|a| a.complete_before(false))
        .and_then(|m| m.commit_order)
}

/// Following, records read after which the reader hands over what the
/// partition holds nothing more of ([`mark_while_reading`]), while it is
/// still short of its durable end: a batch's worth.
const MARK_EVERY: usize = 256;

/// Following, how often at most the mark is read again while the records
/// read are past it (it is a manifest and a checkpoint to read).
const MARK_REFRESH: Duration = Duration::from_millis(200);

/// What a partition read up to a record of unit `last` (in offset order)
/// holds nothing more of, given its mark `mark` read before: the units
/// before both. Before `last`, because a partition holds its units in
/// commit order (pg-source commits them to Kafka in that order, file-sink
/// archives each partition in offset order), so every event of an earlier
/// unit came before; before `mark`, because the replay counts a mark only
/// where it also says that every partition holding such a unit was in its
/// topic's `topic.json` when the mark was read ([`crate::units`]). A
/// follower reading a backlog so applies it as it reads, instead of only
/// once every partition was read to its durable end, with every unit of
/// the backlog waiting in memory meanwhile (issue 13, review M1).
fn mark_while_reading(mark: Option<i64>, last: Option<i64>) -> Option<i64> {
    Some(mark?.min(last?))
}

/// Hands mark `c` of stream `id` over when it is past the last one
/// handed over (`sent`, which it then becomes). `false` when the
/// receiver is gone.
fn hand_over(out: &mut Batcher, id: u32, c: Option<i64>, sent: &mut Option<i64>) -> bool {
    match c.filter(|c| Some(*c) > *sent) {
        Some(c) => {
            *sent = Some(c);
            out.send(Item::CompleteBefore(id, c))
        }
        None => true,
    }
}

/// What one partition reader is to read.
pub struct Partition {
    /// The stream's id.
    pub id: StreamId,
    /// The partition's folder.
    pub dir: PathBuf,
    /// Where to resume.
    pub start: StreamPos,
    /// The last unit applied before this run: sealed segments holding only
    /// units up to it are stepped over.
    pub applied: Option<i64>,
    /// The point in time: reading stops after the first record past it.
    pub until: Until,
    /// Shared by the archive's partition readers: how far they may read
    /// ahead.
    pub gate: Arc<Gate>,
}

/// How far the partition readers of a segmented archive may read ahead of
/// the units the replay can apply. Each partition holds its units in
/// commit order, but the readers run side by side: one may read far ahead
/// of another (in commit order), and every unit it reads waits, in
/// memory, until the other has read past it (or, following, its mark
/// is). While too many units wait, the replay sets [`Gate::hold_above`]
/// to the first of them, and a reader that has read past it waits (having
/// handed over what it read and, following, its mark) until the replay
/// lifts it; the readers behind it read on, so the replay always moves.
#[derive(Debug)]
pub struct Gate {
    hold_above: AtomicI64,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            hold_above: AtomicI64::new(i64::MAX),
        }
    }
}

impl Gate {
    /// Readers that have read a unit after `commit_order` wait (`None`:
    /// none waits).
    pub fn hold_above(&self, commit_order: Option<i64>) {
        self.hold_above
            .store(commit_order.unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// Whether a reader that has read up to unit `last` waits.
    fn holds(&self, last: Option<i64>) -> bool {
        last.is_some_and(|co| co > self.hold_above.load(Ordering::Relaxed))
    }
}

/// Reads one partition from `p.start` and hands its records to `tx`.
///
/// Not following: every durable record, then [`Item::End`]. Following:
/// waits for more, sending [`Item::CaughtUp`] whenever it has read
/// everything durable, until `shutdown`. Past the point in time: that
/// record, then [`Item::End`].
///
/// Sends [`Item::Failed`] when a segment is missing, damaged or shorter
/// than the stored position says (another archive), or a record is longer
/// than `max_line`.
pub fn read_partition(
    p: Partition,
    follow: bool,
    max_line: usize,
    tx: mpsc::Sender<Item>,
    shutdown: CancellationToken,
) {
    let mut out = Batcher::new(tx);
    if let Err(e) = read_inner(&p, follow, max_line, &mut out, &shutdown) {
        out.send(Item::Failed(e));
    }
}

fn read_inner(
    p: &Partition,
    follow: bool,
    max_line: usize,
    out: &mut Batcher,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let id = p.id;
    // A partition that has received nothing yet has no folder: it reads
    // as empty until file-sink makes it.
    let skip = ReadOptions {
        from_commit_order: p.applied.and_then(|a| a.checked_add(1)),
        ..Default::default()
    };
    // The stored position names the segment and the lines of it read; the
    // lines are read again to reach it (a compressed segment is read from
    // its start in any case).
    // Nothing read yet: before the first segment, so that it too may be
    // stepped over.
    let from = if p.start == StreamPos::default() {
        SegmentPos::START
    } else {
        SegmentPos {
            segment: p.start.offset as i64,
            bytes: 0,
            lines: 0,
        }
    };
    let mut tail = PartitionTail::new(&p.dir, from, skip);
    let mut to_skip = p.start.line;
    // Following: the partition's completeness mark, read before the
    // records were last read to their durable end (so they hold everything
    // it covers), and the last one handed over. Read before the first
    // record too, for the marks handed over while a backlog is read.
    let mut mark: Option<i64> = follow.then(|| read_mark(&p.dir)).flatten();
    let mut mark_read = Instant::now();
    let mut sent: Option<i64> = None;
    // Following, while the partition is read towards its durable end: the
    // commit order of the last record read and how many records were read
    // since a mark was last handed over (see [`mark_while_reading`]).
    let mut last_co: Option<i64> = None;
    let mut since_sent = 0usize;
    let here = |pos: SegmentPos| StreamPos {
        offset: pos.segment.max(0) as u64,
        line: pos.lines,
    };
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let rec = tail.next_record().map_err(|e| {
            anyhow::anyhow!("cannot read the archive partition {}: {e}", p.dir.display())
        })?;
        let Some(rec) = rec else {
            if to_skip > 0 {
                return Err(not_held(p));
            }
            if !follow {
                out.send(Item::End(id));
                return Ok(());
            }
            if !hand_over(out, id, mark, &mut sent) {
                return Ok(());
            }
            if !out.send(Item::CaughtUp(id)) {
                return Ok(());
            }
            std::thread::sleep(FILE_POLL);
            mark = read_mark(&p.dir);
            mark_read = Instant::now();
            since_sent = 0;
            continue;
        };
        if to_skip > 0 {
            if rec.at.segment != p.start.offset as i64 {
                return Err(not_held(p));
            }
            to_skip -= 1;
            continue;
        }
        let pos = here(rec.at);
        if rec.line.len() > max_line {
            bail!(
                "{} segment from offset {} line {} is longer than --max-line-bytes ({max_line}); \
                 raise it if the record is genuine",
                p.dir.display(),
                pos.offset,
                pos.line + 1
            );
        }
        let beyond = past(p.until, &rec.position);
        let record = RawRecord {
            stream: id,
            bytes: rec.line,
            pos,
            next: here(rec.next),
        };
        if !out.push(record) {
            return Ok(());
        }
        last_co = rec.position.commit_order.or(last_co);
        if p.gate.holds(last_co) {
            // Read ahead of the units that wait: what was read goes over,
            // then the reader waits, taking its mark meanwhile.
            if !out.flush() {
                return Ok(());
            }
            while p.gate.holds(last_co) {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                if follow {
                    if mark_read.elapsed() >= MARK_REFRESH {
                        mark = read_mark(&p.dir).max(mark);
                        mark_read = Instant::now();
                    }
                    if !hand_over(out, id, mark_while_reading(mark, last_co), &mut sent) {
                        return Ok(());
                    }
                }
                std::thread::sleep(FILE_POLL);
            }
        }
        if follow {
            since_sent += 1;
            if since_sent >= MARK_EVERY {
                since_sent = 0;
                if last_co >= mark && mark_read.elapsed() >= MARK_REFRESH {
                    // Read past the mark: a later one may be there.
                    mark = read_mark(&p.dir).max(mark);
                    mark_read = Instant::now();
                }
                if !hand_over(out, id, mark_while_reading(mark, last_co), &mut sent) {
                    return Ok(());
                }
            }
        }
        if beyond {
            out.send(Item::End(id));
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_common::archive::{
        partition_dir, segment_name, Compression, ManifestLine, Mark, OpenSegment,
        PartitionCheckpoint, SealedSegment, SegmentStats, ARCHIVE_MARKER, CHECKPOINT,
        FORMAT_VERSION, MANIFEST,
    };

    fn event(co: i64, ts: i64) -> String {
        format!(
            r#"{{"op":"c","before":null,"after":{{"id":{co}}},"source":{{"connector":"tidemark","ts_us":{ts},"schema":"public","table":"t","snapshot":"false"}},"transaction":{{"commit_order":{co},"total_order":1,"event_count":1}}}}"#
        )
    }

    fn stats(lines: &[(i64, String)]) -> SegmentStats {
        let mut s: Option<SegmentStats> = None;
        for (off, l) in lines {
            let p = Position::of_line(l.as_bytes(), *off);
            match &mut s {
                None => s = Some(SegmentStats::start(p, l.len() as u64 + 1)),
                Some(s) => s.add(p, l.len() as u64 + 1),
            }
        }
        s.unwrap()
    }

    /// A partition folder with one uncompressed sealed segment per entry
    /// of `sealed`, then an open one, as file-sink lays them out.
    fn write(
        root: &Path,
        sealed: &[&[(i64, String)]],
        open: &[(i64, String)],
        mark: i64,
    ) -> PathBuf {
        std::fs::write(
            root.join(ARCHIVE_MARKER),
            r#"{"format":"tidemark-archive","version":1}"#,
        )
        .unwrap();
        let dir = partition_dir(root, "t", 0);
        std::fs::create_dir_all(&dir).unwrap();
        let mut manifest = String::new();
        for seg in sealed {
            let st = stats(seg);
            let name = segment_name("t", 0, st.first_offset, Compression::None);
            let text: String = seg.iter().map(|(_, l)| format!("{l}\n")).collect();
            std::fs::write(dir.join(&name), &text).unwrap();
            manifest += &serde_json::to_string(&ManifestLine::Sealed(Box::new(SealedSegment {
                segment: name,
                topic: "t".into(),
                partition: 0,
                stats: st,
                compression: Compression::None,
                bytes: text.len() as u64,
                sha256: String::new(),
                complete_before: None,
                sealed_at: String::new(),
            })))
            .unwrap();
            manifest.push('\n');
        }
        std::fs::write(dir.join(MANIFEST), manifest).unwrap();
        let st = stats(open);
        let name = tidemark_common::archive::open_segment_name("t", 0, st.first_offset);
        let text: String = open.iter().map(|(_, l)| format!("{l}\n")).collect();
        std::fs::write(dir.join(&name), text).unwrap();
        let cp = PartitionCheckpoint {
            version: FORMAT_VERSION,
            topic: "t".into(),
            partition: 0,
            sealed: sealed.len() as u64,
            open: Some(OpenSegment {
                segment: name,
                opened_at_ms: 0,
                stats: st,
            }),
            complete_before: Some(Mark {
                commit_order: Some(mark),
                ts_us: None,
            }),
            ..Default::default()
        };
        std::fs::write(dir.join(CHECKPOINT), serde_json::to_vec(&cp).unwrap()).unwrap();
        dir
    }

    fn read(
        dir: &Path,
        start: StreamPos,
        applied: Option<i64>,
        until: Until,
        follow: bool,
    ) -> (Vec<Item>, Vec<(StreamPos, StreamPos)>) {
        let (tx, mut rx) = mpsc::channel(1000);
        let shutdown = CancellationToken::new();
        let p = Partition {
            id: 0,
            dir: dir.to_path_buf(),
            start,
            applied,
            until,
            gate: Arc::default(),
        };
        let s = shutdown.clone();
        let reader = std::thread::spawn(move || read_partition(p, follow, 1 << 20, tx, s));
        let mut items = Vec::new();
        let mut records = Vec::new();
        let mut caught_up = 0;
        while let Some(item) = rx.blocking_recv() {
            match &item {
                Item::Records(r) => records.extend(r.iter().map(|d| (d.pos, d.next))),
                Item::CaughtUp(_) => {
                    caught_up += 1;
                    if caught_up == 3 {
                        shutdown.cancel();
                    }
                }
                Item::End(_) | Item::Failed(_) => {}
                Item::CompleteBefore(..) => {}
            }
            let end = matches!(item, Item::End(_) | Item::Failed(_));
            items.push(item);
            if end {
                break;
            }
        }
        drop(rx);
        reader.join().unwrap();
        (items, records)
    }

    fn lines(from: i64, to: i64) -> Vec<(i64, String)> {
        (from..to).map(|o| (o, event(o, o * 10))).collect()
    }

    #[test]
    fn a_partition_is_read_resumed_at_its_line_and_stopped_past_the_point() {
        let root = tempfile::tempdir().unwrap();
        let (a, b, c) = (lines(0, 3), lines(3, 6), lines(6, 8));
        let dir = write(root.path(), &[&a, &b], &c, 8);
        let at = |offset, line| StreamPos { offset, line };
        // Everything, with positions naming segment and line.
        let (items, recs) = read(&dir, StreamPos::default(), None, Until::End, false);
        assert_eq!(recs.len(), 8);
        assert_eq!(recs[0], (at(0, 0), at(0, 1)));
        assert_eq!(recs[4], (at(3, 1), at(3, 2)));
        assert_eq!(recs[7], (at(6, 1), at(6, 2)));
        assert!(matches!(items.last(), Some(Item::End(0))));
        // Resumed inside a sealed segment: the rest only.
        let (_, recs) = read(&dir, at(3, 2), None, Until::End, false);
        assert_eq!(recs.first().map(|r| r.0), Some(at(3, 2)));
        assert_eq!(recs.len(), 3);
        // Units up to 4 applied: the first segment is stepped over unread.
        std::fs::rename(
            dir.join(segment_name("t", 0, 0, Compression::None)),
            dir.join("aside"),
        )
        .unwrap();
        let (_, recs) = read(&dir, StreamPos::default(), Some(4), Until::End, false);
        assert_eq!(recs.first().map(|r| r.0), Some(at(3, 0)));
        std::fs::rename(
            dir.join("aside"),
            dir.join(segment_name("t", 0, 0, Compression::None)),
        )
        .unwrap();
        // Past the point: the first record after it, then nothing more; the
        // segments after it are not opened.
        std::fs::rename(
            dir.join("t+0+00000000000000000006.jsonl.open"),
            dir.join("aside"),
        )
        .unwrap();
        let (items, recs) = read(
            &dir,
            StreamPos::default(),
            None,
            Until::CommitOrder(3),
            false,
        );
        assert_eq!(recs.len(), 5, "{items:?}");
        let (_, recs) = read(&dir, StreamPos::default(), None, Until::Time(15), false);
        assert_eq!(recs.len(), 3);
        std::fs::rename(
            dir.join("aside"),
            dir.join("t+0+00000000000000000006.jsonl.open"),
        )
        .unwrap();
        // A position the archive does not hold is an error.
        let (items, _) = read(&dir, at(3, 9), None, Until::End, false);
        assert!(
            matches!(items.last(), Some(Item::Failed(e)) if format!("{e:#}").contains("does not hold")),
            "{items:?}"
        );
        // Following: the completeness mark, once read past.
        let (items, recs) = read(&dir, StreamPos::default(), None, Until::End, true);
        assert_eq!(recs.len(), 8);
        assert!(
            items
                .iter()
                .any(|i| matches!(i, Item::CompleteBefore(0, 8))),
            "{items:?}"
        );
    }
}
