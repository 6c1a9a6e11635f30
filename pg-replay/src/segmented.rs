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

use anyhow::bail;
use tidemark_common::archive::{
    Archive, PartitionArchive, PartitionTail, Position, ReadOptions, SegmentPos,
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
    let Archive::Segmented {
        partitions, topics, ..
    } = archive
    else {
        bail!("{} is not a segmented archive", root.display());
    };
    let mut out: Vec<(String, i32)> = partitions
        .iter()
        .map(|p| (p.topic.clone(), p.partition))
        .collect();
    for (topic, n) in topics {
        out.extend((0..n).map(|p| (topic.clone(), p)));
    }
    out.sort();
    out.dedup();
    Ok(out
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
    let mut tail = PartitionTail::new(
        &p.dir,
        SegmentPos {
            segment: p.start.offset as i64,
            bytes: 0,
            lines: 0,
        },
        skip,
    );
    let mut to_skip = p.start.line;
    // Following: the partition's completeness mark, read before the
    // records were last read to their durable end (so they hold everything
    // it covers), and the last one handed over.
    let mut mark: Option<i64> = None;
    let mut sent: Option<i64> = None;
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
                bail!(
                    "{}: the stored position is line {} of the segment from offset {}, which holds fewer \
                     durable lines: this is not the archive the position was taken in (or file-sink cut it); \
                     replay into a fresh target, or give another --name",
                    p.dir.display(),
                    p.start.line,
                    p.start.offset
                );
            }
            if !follow {
                out.send(Item::End(id));
                return Ok(());
            }
            if let Some(c) = mark.filter(|c| Some(*c) > sent) {
                if !out.send(Item::CompleteBefore(id, c)) {
                    return Ok(());
                }
                sent = Some(c);
            }
            if !out.send(Item::CaughtUp(id)) {
                return Ok(());
            }
            std::thread::sleep(FILE_POLL);
            mark = PartitionArchive::open(&p.dir, "", 0)
                .ok()
                .and_then(|a| a.complete_before(false))
                .and_then(|m| m.commit_order);
            continue;
        };
        if to_skip > 0 {
            if rec.at.segment != p.start.offset as i64 {
                bail!(
                    "{}: the stored position is line {} of the segment from offset {}, which is not in the \
                     archive (retired by retention, or another archive); replay into a fresh target",
                    p.dir.display(),
                    p.start.line,
                    p.start.offset
                );
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
        if beyond {
            out.send(Item::End(id));
            return Ok(());
        }
    }
}
