//! The segmented archive's storage: appending records to each partition's
//! open segment, sealing segments, and recovering a partition after a
//! crash. The layout and the manifest are [`tidemark_common::archive`]'s.
//!
//! Exactly once per partition rests on one order of steps, each durable
//! before the next:
//!
//! 1. Records are appended to the partition's open segment (plain JSON
//!    lines) and its dead-letter file, then fsynced.
//! 2. The partition's checkpoint is replaced: next offset, the open
//!    segment's durable length and statistics, and the segments that are
//!    full (or old) enough to seal, listed as `closed`.
//! 3. Each closed segment is sealed: compressed into a temporary file,
//!    fsynced, renamed to its final name, its manifest line appended and
//!    fsynced; then the checkpoint is replaced without it, and its plain
//!    file removed.
//!
//! Recovery ([`acquire`]) holds the partition's lock and undoes or redoes
//! what a crash interrupted: the open segment and the dead-letter file are
//! cut back to the checkpoint, a closed segment without its manifest line
//! is sealed again (compression is deterministic, so to the same bytes),
//! and any file no checkpoint or manifest accounts for (a sealed file whose
//! manifest line was never written, a temporary file, an open segment
//! begun after the checkpoint) is removed. Its records are read again from
//! Kafka, from the checkpoint's offset.
//!
//! Only the holder of a partition's lock ([`crate::lock`]) writes any of
//! its files, so an instance that lost the partition (a rebalance, a long
//! pause) cannot write over the one that has it now.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read as _, Seek as _, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use sha2::Digest as _;
use tidemark_common::archive::{
    open_segment_name, partition_dir, read_manifest, segment_name, Compression, Fingerprint,
    ManifestLine, Mark, OpenSegment, PartitionCheckpoint, Position, SealedSegment, SegmentStats,
    TopicFile, ARCHIVE_MARKER, CHECKPOINT, DEAD_LETTER, FORMAT_VERSION, LOCK, MANIFEST,
    OPEN_SUFFIX, TOPIC_FILE,
};
use tidemark_common::offset::sync_dir;

use crate::lock::Lock;
use crate::pipeline::{Appender, Committer, Merge};
use crate::Totals;

/// A topic and partition.
pub type Tp = (String, i32);

/// How the archive is written.
#[derive(Debug, Clone)]
pub struct SegmentConfig {
    /// The archive's folder (`file`).
    pub root: PathBuf,
    /// A segment is sealed after the record that takes it to this many
    /// bytes (`file.rotate.bytes`).
    pub rotate_bytes: u64,
    /// A segment is sealed this long after its first record
    /// (`file.rotate.interval.ms`), records or not.
    pub rotate_interval: Option<Duration>,
    /// How sealed segments are compressed (`file.compression`).
    pub compression: Compression,
    /// The compression level (`file.compression.level`).
    pub level: i32,
    /// Keep every time of this last stretch restorable and delete sealed
    /// segments no restore into it needs (`file.retention.window.ms`);
    /// `None` deletes nothing.
    pub retention_window: Option<Duration>,
}

impl SegmentConfig {
    /// The default compression level of `c`.
    pub fn default_level(c: Compression) -> i32 {
        match c {
            Compression::Zstd => 3,
            Compression::Gzip => 6,
            Compression::None => 0,
        }
    }
}

/// Creates the archive folder (its parent must exist) and its marker.
///
/// Fails when `root` is a file (a single-file output), its parent is
/// missing, or it cannot be written.
pub fn create_archive(root: &Path) -> anyhow::Result<()> {
    if root.is_file() {
        bail!(
            "`file` {} is a single output file, but rotation or compression writes a segmented archive, which is a folder: point `file` at a new folder, or remove the file.rotate.* and file.compression keys",
            root.display()
        );
    }
    let parent = match root.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        bail!(
            "the folder {} for the archive {} does not exist: create it, or change `file`",
            parent.display(),
            root.display()
        );
    }
    std::fs::create_dir_all(root)
        .with_context(|| format!("cannot create the archive folder {}", root.display()))?;
    let marker = root.join(ARCHIVE_MARKER);
    if !marker.exists() {
        // Several instances may start at once on a new archive: each
        // writes through a name of its own (they write the same bytes).
        // One temporary name for all made the later renames fail.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = root.join(format!("{ARCHIVE_MARKER}.{}-{n}.tmp", std::process::id()));
        let text = serde_json::json!({"format": "tidemark-archive", "version": FORMAT_VERSION});
        write_through(&marker, &tmp, format!("{text}\n").as_bytes())?;
    }
    Ok(())
}

/// What `topic.json` of `topic` says, if it is there and readable.
pub fn topic_file(root: &Path, topic: &str) -> Option<TopicFile> {
    std::fs::read(root.join(topic).join(TOPIC_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<TopicFile>(&bytes).ok())
}

/// Records in `topic.json` that the topic has `partitions` partitions,
/// unless it already says as many or more. The count the file was first
/// written with is kept beside it ([`TopicFile::first_partitions`]), so the
/// archive can tell a partition added to the topic later.
///
/// Fails when the file cannot be written.
pub fn note_partitions(root: &Path, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let dir = root.join(topic);
    let path = dir.join(TOPIC_FILE);
    let says_enough = || topic_file(root, topic).is_some_and(|t| t.partitions >= partitions);
    if says_enough() {
        return Ok(());
    }
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the archive folder {}", dir.display()))?;
    // The regular note (every 2 s) and a completeness probe (and other instances) note
    // at once: one writer at a time, each looking again under the lock, so
    // an older, smaller count never replaces a larger one (the archive's
    // mark would leave the partition added out) and two never share the
    // temporary file. The lock file's name is no partition's.
    let lock_path = dir.join(format!("{TOPIC_FILE}.lock"));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("cannot lock {}", lock_path.display()))?;
    let before = topic_file(root, topic);
    if before.as_ref().is_some_and(|t| t.partitions >= partitions) {
        return Ok(());
    }
    let t = TopicFile {
        topic: topic.to_owned(),
        partitions,
        first_partitions: Some(before.map_or(partitions, |t| t.first())),
    };
    // Through a name of this process's own, so a rename is whole; fsynced,
    // as the marks the count allows are durable in the checkpoints.
    let tmp = dir.join(format!("{TOPIC_FILE}.{}.tmp", std::process::id()));
    write_through(&path, &tmp, &serde_json::to_vec(&t)?)
}

/// Writes `bytes` to `path` through a temporary file, fsynced, renamed
/// over `path`, and the folder fsynced.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    write_through(path, &path.with_file_name(tmp_name), bytes)
}

/// [`write_atomically`] through the temporary file `tmp`.
fn write_through(path: &Path, tmp: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = tmp.to_path_buf();
    let mut f = File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} into place", path.display()))?;
    sync_dir(path)
}

fn save_checkpoint(dir: &Path, cp: &PartitionCheckpoint) -> anyhow::Result<()> {
    write_atomically(
        &dir.join(CHECKPOINT),
        &serde_json::to_vec(cp).expect("a checkpoint serialises"),
    )
}

/// One partition's records in a batch.
#[derive(Debug, Default)]
pub struct PartBatch {
    /// Lines, each ending in `\n`.
    pub lines: Vec<u8>,
    /// Per line: where it ends in `lines`, and its position.
    pub records: Vec<(usize, Position)>,
    /// Dead letters, each a line.
    pub dead: Vec<u8>,
    /// Dead letters in `dead`.
    pub dead_count: u64,
    /// Tombstones skipped.
    pub skipped: u64,
    /// The offset after the last record of the batch.
    pub next: i64,
    /// The last record's fingerprint.
    pub fingerprint: Option<Fingerprint>,
}

/// What the reader hands the writer thread.
pub enum Work {
    /// Records, per partition.
    Batch(Vec<(Tp, PartBatch)>),
    /// A partition this instance now holds, recovered.
    Acquire(Box<Acquired>),
    /// A partition this instance no longer holds: its last writes are
    /// committed, then its lock is let go.
    Release(Tp),
    /// Seal segments older than the rotation interval.
    Tick,
    /// A partition's new completeness mark.
    Mark(Tp, Mark),
    /// The archive's topic files count every partition holding events of
    /// units before this mark (noted after such a unit was read, so after
    /// every partition it touches existed): a partition's mark from its own
    /// events goes no further, lest it cover a unit with events in a
    /// partition the archive does not count yet.
    Counted(Mark),
    /// Delete sealed segments of a partition whose events all have a
    /// commit order below this one (a retention policy decided it).
    Retire(Tp, i64, String),
}

/// A recovered partition, ready to be written.
pub struct Acquired {
    /// Which.
    pub tp: Tp,
    /// The writer's side.
    writer: PartWriter,
    /// The syncer's side.
    sync: PartSync,
}

impl Acquired {
    /// Where reading resumes: the next offset, `None` for the beginning.
    pub fn start(&self) -> Option<i64> {
        let cp = &self.sync.checkpoint;
        (cp.next_offset > 0 || cp.fingerprint.is_some()).then_some(cp.next_offset)
    }

    /// The last record read, to check that the topic is still the one the
    /// archive holds.
    pub fn fingerprint(&self) -> Option<&Fingerprint> {
        self.sync.checkpoint.fingerprint.as_ref()
    }

    /// The checkpoint as recovered.
    pub fn checkpoint(&self) -> &PartitionCheckpoint {
        &self.sync.checkpoint
    }
}

/// The writer's state of one partition.
struct PartWriter {
    dir: PathBuf,
    topic: String,
    partition: i32,
    open: Option<WriterOpen>,
    /// Segments closed since the last point.
    closed: Vec<OpenSegment>,
    dead: Option<File>,
    dead_len: u64,
    next: i64,
    fingerprint: Option<Fingerprint>,
    last: Option<Position>,
}

struct WriterOpen {
    file: File,
    seg: OpenSegment,
}

/// The syncer's state of one partition.
struct PartSync {
    dir: PathBuf,
    lock: Lock,
    manifest: File,
    checkpoint: PartitionCheckpoint,
    /// Files fsynced by name, kept open.
    handles: HashMap<String, File>,
    /// The latest heartbeat's or probe's mark, as it came: the checkpoint
    /// holds it no further than the counted mark, and takes more of it as
    /// that moves on.
    wanted: Option<Mark>,
}

/// What a sync may claim for one partition.
#[derive(Default)]
pub struct PartPoint {
    next: Option<i64>,
    fingerprint: Option<Fingerprint>,
    last: Option<Position>,
    /// The open segment as written (`None` inside: none open).
    open: Option<Option<OpenSegment>>,
    closed: Vec<OpenSegment>,
    dead_letter_bytes: Option<u64>,
    mark: Option<Mark>,
    retire: Option<(i64, String)>,
    release: bool,
    acquire: Option<Box<PartSync>>,
    written: u64,
    dead: u64,
    skipped: u64,
}

impl PartPoint {
    fn merge(&mut self, later: PartPoint) {
        if later.acquire.is_some() {
            // A partition let go and taken again: the new state wins.
            *self = later;
            return;
        }
        self.next = later.next.or(self.next);
        self.fingerprint = later.fingerprint.or(self.fingerprint.take());
        self.last = later.last.or(self.last.take());
        self.open = later.open.or(self.open.take());
        self.closed.extend(later.closed);
        self.dead_letter_bytes = later.dead_letter_bytes.or(self.dead_letter_bytes);
        self.mark = match (self.mark, later.mark) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.retire = later.retire.or(self.retire.take());
        self.release |= later.release;
        self.written += later.written;
        self.dead += later.dead;
        self.skipped += later.skipped;
    }
}

/// What a sync may claim, per partition.
#[derive(Default)]
pub struct SegPoint {
    parts: BTreeMap<Tp, PartPoint>,
    /// A [`Work::Counted`] mark.
    counted: Option<Mark>,
}

impl Merge for SegPoint {
    fn merge(&mut self, later: Self) {
        self.counted = merge_marks([self.counted, later.counted]);
        for (tp, p) in later.parts {
            match self.parts.get_mut(&tp) {
                Some(mine) => mine.merge(p),
                None => {
                    self.parts.insert(tp, p);
                }
            }
        }
    }
}

/// The writer thread's side: every partition held, appending.
pub struct SegAppender {
    cfg: SegmentConfig,
    parts: HashMap<Tp, PartWriter>,
}

impl SegAppender {
    /// An appender holding no partition yet.
    pub fn new(cfg: SegmentConfig) -> Self {
        Self {
            cfg,
            parts: HashMap::new(),
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl PartWriter {
    fn point(&self) -> PartPoint {
        PartPoint {
            next: Some(self.next),
            fingerprint: self.fingerprint.clone(),
            last: self.last.clone(),
            open: Some(self.open.as_ref().map(|o| o.seg.clone())),
            dead_letter_bytes: Some(self.dead_len),
            ..Default::default()
        }
    }

    /// Appends one partition's batch, closing segments by size.
    fn append(&mut self, b: PartBatch, rotate_bytes: u64) -> anyhow::Result<PartPoint> {
        let mut start = 0usize;
        let mut written_from = 0usize;
        for (end, pos) in &b.records {
            let len = (*end - start) as u64;
            if self.open.is_none() {
                self.begin(pos.offset)?;
            }
            let open = self.open.as_mut().expect("begun above");
            if open.seg.stats.records == 0 {
                open.seg.stats = SegmentStats::start(pos.clone(), len);
            } else {
                open.seg.stats.add(pos.clone(), len);
            }
            self.last = Some(pos.clone());
            start = *end;
            if open.seg.stats.plain_bytes >= rotate_bytes {
                // The record that fills the segment is its last, however
                // the records were batched: sizes decide, not timing.
                open.file
                    .write_all(&b.lines[written_from..start])
                    .with_context(|| {
                        format!(
                            "cannot write to {}",
                            self.dir.join(&open.seg.segment).display()
                        )
                    })?;
                written_from = start;
                let closed = self.open.take().expect("open above");
                self.closed.push(closed.seg);
            }
        }
        if written_from < start {
            let open = self.open.as_mut().expect("records after the last rotation");
            open.file
                .write_all(&b.lines[written_from..start])
                .with_context(|| {
                    format!(
                        "cannot write to {}",
                        self.dir.join(&open.seg.segment).display()
                    )
                })?;
        }
        if !b.dead.is_empty() {
            if self.dead.is_none() {
                let path = self.dir.join(DEAD_LETTER);
                self.dead = Some(
                    OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .with_context(|| {
                            format!("cannot open the dead-letter file {}", path.display())
                        })?,
                );
                sync_dir(&path)?;
            }
            self.dead
                .as_mut()
                .expect("opened above")
                .write_all(&b.dead)
                .with_context(|| {
                    format!("cannot write to {}", self.dir.join(DEAD_LETTER).display())
                })?;
            self.dead_len += b.dead.len() as u64;
        }
        self.next = self.next.max(b.next);
        if b.fingerprint.is_some() {
            self.fingerprint = b.fingerprint;
        }
        let mut point = self.point();
        point.closed = std::mem::take(&mut self.closed);
        point.written = b.records.len() as u64;
        point.dead = b.dead_count;
        point.skipped = b.skipped;
        Ok(point)
    }

    /// Starts a segment whose first record is at `offset`.
    fn begin(&mut self, offset: i64) -> anyhow::Result<()> {
        let name = open_segment_name(&self.topic, self.partition, offset);
        let path = self.dir.join(&name);
        // A file of that name can only be a leftover no checkpoint covers
        // (recovery removes those), so it is started anew.
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .with_context(|| format!("cannot create the segment {}", path.display()))?;
        sync_dir(&path)?;
        self.open = Some(WriterOpen {
            file,
            seg: OpenSegment {
                segment: name,
                opened_at_ms: now_ms(),
                stats: SegmentStats {
                    first_offset: offset,
                    last_offset: offset,
                    ..Default::default()
                },
            },
        });
        Ok(())
    }
}

impl Appender for SegAppender {
    type Work = Work;
    type Point = SegPoint;

    fn append(&mut self, work: Work) -> anyhow::Result<Option<SegPoint>> {
        let mut point = SegPoint::default();
        match work {
            Work::Batch(parts) => {
                for (tp, b) in parts {
                    // A batch for a partition let go meanwhile is dropped:
                    // its records are the new holder's to write.
                    let Some(w) = self.parts.get_mut(&tp) else {
                        continue;
                    };
                    let p = w.append(b, self.cfg.rotate_bytes)?;
                    point.parts.insert(tp, p);
                }
            }
            Work::Acquire(a) => {
                let Acquired { tp, writer, sync } = *a;
                let mut p = writer.point();
                p.acquire = Some(Box::new(sync));
                self.parts.insert(tp.clone(), writer);
                point.parts.insert(tp, p);
            }
            Work::Release(tp) => {
                if let Some(w) = self.parts.remove(&tp) {
                    let mut p = w.point();
                    p.release = true;
                    point.parts.insert(tp, p);
                }
            }
            Work::Tick => {
                let Some(interval) = self.cfg.rotate_interval else {
                    return Ok(None);
                };
                let now = now_ms();
                for (tp, w) in &mut self.parts {
                    let due = w.open.as_ref().is_some_and(|o| {
                        o.seg.stats.records > 0
                            && now - o.seg.opened_at_ms >= interval.as_millis() as i64
                    });
                    if due {
                        let closed = w.open.take().expect("checked above");
                        let mut p = w.point();
                        p.closed.push(closed.seg);
                        point.parts.insert(tp.clone(), p);
                    }
                }
            }
            Work::Mark(tp, mark) => {
                if self.parts.contains_key(&tp) {
                    point.parts.insert(
                        tp,
                        PartPoint {
                            mark: Some(mark),
                            ..Default::default()
                        },
                    );
                }
            }
            Work::Counted(mark) => point.counted = Some(mark),
            Work::Retire(tp, before, reason) => {
                if self.parts.contains_key(&tp) {
                    point.parts.insert(
                        tp,
                        PartPoint {
                            retire: Some((before, reason)),
                            ..Default::default()
                        },
                    );
                }
            }
        }
        Ok((!point.parts.is_empty() || point.counted.is_some()).then_some(point))
    }
}

/// What is durable, per partition, as the syncer last saved it.
#[derive(Debug, Clone, Default)]
pub struct SegReport {
    /// Checkpoints of the partitions held.
    pub partitions: BTreeMap<Tp, PartitionCheckpoint>,
    /// Records covered by checkpoints since start.
    pub totals: Totals,
    /// Segments sealed since start.
    pub sealed: u64,
    /// Segments retired since start.
    pub retired: u64,
}

/// The syncer thread's side.
///
/// A closed segment is sealed (compressed, its manifest line written) on a
/// thread of its own, one at a time, while the syncer goes on fsyncing and
/// committing what the writer appends: a 128 MiB segment's compression
/// held every commit behind it, and with it the reading, for as long as it
/// took. The files are written in the same order as before (the
/// compressed file in place, then the manifest line, then the checkpoint,
/// then the plain file removed), so a crash between any two recovers as
/// before; only the compression itself runs beside the commits.
pub struct SegCommitter {
    cfg: SegmentConfig,
    parts: HashMap<Tp, PartSync>,
    report: SegReport,
    sealing: Option<SealJob>,
    /// The latest [`Work::Counted`] mark: how far a partition's own events
    /// may take its mark.
    counted: Option<Mark>,
}

/// How long past its rotation a time-closed segment with nothing after it
/// waits for the counted mark to cover it before it is sealed anyway (see
/// [`PartSync::next_seal`]).
const SEAL_WAIT: Duration = Duration::from_secs(30);

/// What compressing a closed segment needs.
struct SealInput {
    /// The plain segment's file name.
    segment: String,
    plain: PathBuf,
    len: u64,
    dest: PathBuf,
    /// The sealed segment's file name.
    name: String,
    compression: Compression,
    level: i32,
}

impl SealInput {
    fn compress(&self) -> anyhow::Result<(u64, String)> {
        compress(
            &self.plain,
            self.len,
            &self.dest,
            self.compression,
            self.level,
        )
    }
}

/// A seal running on its thread.
struct SealJob {
    tp: Tp,
    input: SealInput,
    done: std::sync::mpsc::Receiver<anyhow::Result<(u64, String)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SegCommitter {
    /// A committer holding no partition yet.
    pub fn new(cfg: SegmentConfig) -> Self {
        Self {
            cfg,
            parts: HashMap::new(),
            report: SegReport::default(),
            sealing: None,
            counted: None,
        }
    }

    /// Records the seal in flight once its compression is done (`wait`:
    /// waiting for it), and starts the next closed segment's; with `wait`,
    /// until no closed segment is left. Returns the segments sealed.
    ///
    /// Fails when a compression or a file of the seal failed.
    fn advance_seals(&mut self, wait: bool) -> anyhow::Result<u64> {
        let mut sealed = 0;
        loop {
            if let Some(job) = &self.sealing {
                let result = if wait {
                    job.done.recv().ok()
                } else {
                    match job.done.try_recv() {
                        Ok(r) => Some(r),
                        Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(sealed),
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
                    }
                };
                let mut job = self.sealing.take().expect("checked above");
                if let Some(t) = job.thread.take() {
                    let _ = t.join();
                }
                let result = result.unwrap_or_else(|| {
                    Err(anyhow::anyhow!(
                        "the thread sealing {} stopped",
                        job.input.segment
                    ))
                });
                self.finish_job(&job.tp, &job.input, result)?;
                sealed += 1;
            }
            let next = self.parts.iter().find_map(|(tp, s)| {
                s.next_seal(&self.cfg, self.counted, wait)
                    .map(|i| (tp.clone(), i))
            });
            let Some((tp, input)) = next else {
                return Ok(sealed);
            };
            self.start_job(tp, input)?;
            if !wait {
                return Ok(sealed);
            }
        }
    }

    fn start_job(&mut self, tp: Tp, input: SealInput) -> anyhow::Result<()> {
        let (tx, done) = std::sync::mpsc::channel();
        let job_input = SealInput {
            segment: input.segment.clone(),
            plain: input.plain.clone(),
            len: input.len,
            dest: input.dest.clone(),
            name: input.name.clone(),
            compression: input.compression,
            level: input.level,
        };
        let thread = std::thread::Builder::new()
            .name("file-sink-seal".into())
            .spawn(move || {
                let _ = tx.send(job_input.compress());
            })
            .context("cannot start the thread that seals segments")?;
        self.sealing = Some(SealJob {
            tp,
            input,
            done,
            thread: Some(thread),
        });
        Ok(())
    }

    fn finish_job(
        &mut self,
        tp: &Tp,
        input: &SealInput,
        result: anyhow::Result<(u64, String)>,
    ) -> anyhow::Result<()> {
        let compressed = result?;
        let sync = self.parts.get_mut(tp).with_context(|| {
            format!(
                "segment {} was sealed for a partition let go",
                input.segment
            )
        })?;
        sync.finish_seal(input, compressed, self.counted)?;
        self.report.sealed += 1;
        self.report
            .partitions
            .insert(tp.clone(), sync.checkpoint.clone());
        Ok(())
    }

    /// Seals every closed segment of `tp` now, on this thread (the one in
    /// flight first, if it is `tp`'s): before a partition is let go, so its
    /// next holder finds its files settled.
    fn seal_now(&mut self, tp: &Tp) -> anyhow::Result<u64> {
        let mut sealed = 0;
        if self.sealing.as_ref().is_some_and(|j| &j.tp == tp) {
            let mut job = self.sealing.take().expect("checked above");
            let result = job.done.recv().unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "the thread sealing {} stopped",
                    job.input.segment
                ))
            });
            if let Some(t) = job.thread.take() {
                let _ = t.join();
            }
            self.finish_job(tp, &job.input, result)?;
            sealed += 1;
        }
        while let Some(input) = self
            .parts
            .get(tp)
            .and_then(|s| s.next_seal(&self.cfg, self.counted, true))
        {
            let result = input.compress();
            self.finish_job(tp, &input, result)?;
            sealed += 1;
        }
        Ok(sealed)
    }

    /// Seals every closed segment, waiting for each (tests, and the end of
    /// a run).
    pub fn settle(&mut self) -> anyhow::Result<u64> {
        self.advance_seals(true)
    }
}

impl Drop for SegCommitter {
    fn drop(&mut self) {
        // A compression left running would write on after the partition's
        // lock is gone; it is deterministic, but nobody would wait for it.
        if let Some(mut job) = self.sealing.take() {
            if let Some(t) = job.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl PartSync {
    /// Fsyncs the file `name` in the partition's folder, keeping it open.
    fn fsync(&mut self, name: &str) -> anyhow::Result<()> {
        if !self.handles.contains_key(name) {
            let path = self.dir.join(name);
            let f = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            self.handles.insert(name.to_owned(), f);
        }
        self.handles[name]
            .sync_data()
            .with_context(|| format!("cannot write to {}", self.dir.join(name).display()))
    }

    /// Fsyncs and records what `p` claims; returns the segments retired.
    fn commit(&mut self, p: PartPoint, counted: Option<Mark>) -> anyhow::Result<u64> {
        let mut next = self.checkpoint.clone();
        for c in &p.closed {
            self.fsync(&c.segment)?;
        }
        if let Some(Some(open)) = &p.open {
            let grew = next.open.as_ref().is_none_or(|o| {
                o.segment != open.segment || o.stats.plain_bytes != open.stats.plain_bytes
            });
            if grew && open.stats.records > 0 {
                self.fsync(&open.segment)?;
            }
        }
        if let Some(bytes) = p.dead_letter_bytes {
            if bytes > next.dead_letter_bytes {
                self.fsync(DEAD_LETTER)?;
            }
            next.dead_letter_bytes = bytes;
        }
        if let Some(n) = p.next {
            next.next_offset = next.next_offset.max(n);
        }
        if p.fingerprint.is_some() {
            next.fingerprint = p.fingerprint;
        }
        if p.last.is_some() {
            next.last = p.last;
        }
        if let Some(open) = p.open {
            next.open = open.filter(|o| o.stats.records > 0);
        }
        next.closed.extend(p.closed);
        self.wanted = merge_marks([self.wanted, p.mark]);
        next.complete_before = merge_marks([
            next.complete_before,
            // A heartbeat's or a probe's, no further than counted either.
            self.wanted.and_then(|m| counted.map(|c| m.min(c))),
            next.last.as_ref().and_then(|l| counted_mark(l, counted)),
        ]);
        if next != self.checkpoint {
            save_checkpoint(&self.dir, &next)?;
            self.checkpoint = next;
        }
        let mut retired = 0;
        if let Some((before, reason)) = p.retire {
            retired = self.retire(before, &reason)?;
        }
        Ok(retired)
    }

    /// The first closed segment's compression job: what [`compress`] needs,
    /// to run on a thread of its own.
    ///
    /// A segment with nothing after it (closed by time on an idle
    /// partition) takes the partition's mark into its manifest line, so it
    /// waits until the counted mark covers its own last event, lest the
    /// line keep a mark held back for good; `force` seals it anyway (the
    /// partition let go, the run's end).
    fn next_seal(
        &self,
        cfg: &SegmentConfig,
        counted: Option<Mark>,
        force: bool,
    ) -> Option<SealInput> {
        let seg = self.checkpoint.closed.first()?;
        let nothing_after = self.checkpoint.closed.len() == 1 && self.checkpoint.open.is_none();
        let own = own_mark(&seg.stats.last);
        // Records without a commit order (not pg-source's) give no mark to
        // wait for; and the wait is bounded, should the topics not be
        // noted (the brokers' metadata out of reach).
        let covered = own.commit_order.is_none()
            || counted.is_some_and(|c| c.commit_order >= own.commit_order);
        let waited = cfg.rotate_interval.is_some_and(|iv| {
            now_ms() - seg.opened_at_ms >= iv.as_millis() as i64 + SEAL_WAIT.as_millis() as i64
        });
        if nothing_after && !force && !covered && !waited {
            return None;
        }
        let name = segment_name(
            &self.checkpoint.topic,
            self.checkpoint.partition,
            seg.stats.first_offset,
            cfg.compression,
        );
        Some(SealInput {
            segment: seg.segment.clone(),
            plain: self.dir.join(&seg.segment),
            len: seg.stats.plain_bytes,
            dest: self.dir.join(&name),
            name,
            compression: cfg.compression,
            level: cfg.level,
        })
    }

    /// Records a sealed segment, the first closed one, whose compressed
    /// file [`compress`] put in place: its manifest line, the checkpoint
    /// without it, and the plain file removed, in that order (the order a
    /// recovery after a crash between any two relies on).
    fn finish_seal(
        &mut self,
        input: &SealInput,
        (bytes, sha256): (u64, String),
        counted: Option<Mark>,
    ) -> anyhow::Result<()> {
        let seg = self
            .checkpoint
            .closed
            .first()
            .filter(|c| c.segment == input.segment)
            .cloned()
            .with_context(|| {
                format!(
                    "segment {} was sealed but is no longer the first closed one in {}",
                    input.segment,
                    self.dir.display()
                )
            })?;
        let nothing_after = self.checkpoint.closed.len() == 1 && self.checkpoint.open.is_none();
        let mark = if nothing_after {
            self.checkpoint.complete_before
        } else {
            counted_mark(&seg.stats.last, counted)
        };
        self.seal_line(
            &seg,
            input.name.clone(),
            input.compression,
            (bytes, sha256),
            mark,
        )?;
        self.checkpoint.closed.remove(0);
        self.checkpoint.sealed += 1;
        save_checkpoint(&self.dir, &self.checkpoint)?;
        self.handles.remove(&seg.segment);
        std::fs::remove_file(&input.plain)
            .with_context(|| format!("cannot remove {}", input.plain.display()))?;
        sync_dir(&input.plain)?;
        Ok(())
    }

    /// Seals a closed segment here and now (a recovery's): the compressed
    /// file, then its manifest line.
    fn seal(
        &mut self,
        cfg: &SegmentConfig,
        seg: &OpenSegment,
        mark: Option<Mark>,
    ) -> anyhow::Result<()> {
        let name = segment_name(
            &self.checkpoint.topic,
            self.checkpoint.partition,
            seg.stats.first_offset,
            cfg.compression,
        );
        let compressed = compress(
            &self.dir.join(&seg.segment),
            seg.stats.plain_bytes,
            &self.dir.join(&name),
            cfg.compression,
            cfg.level,
        )?;
        self.seal_line(seg, name, cfg.compression, compressed, mark)
    }

    /// The manifest line of a sealed segment.
    fn seal_line(
        &mut self,
        seg: &OpenSegment,
        name: String,
        compression: Compression,
        (bytes, sha256): (u64, String),
        mark: Option<Mark>,
    ) -> anyhow::Result<()> {
        let line = ManifestLine::Sealed(Box::new(SealedSegment {
            segment: name,
            topic: self.checkpoint.topic.clone(),
            partition: self.checkpoint.partition,
            stats: seg.stats.clone(),
            compression,
            bytes,
            sha256,
            complete_before: mark,
            sealed_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        }));
        self.append_manifest(&line)
    }

    fn append_manifest(&mut self, line: &ManifestLine) -> anyhow::Result<()> {
        let mut text = serde_json::to_vec(line).expect("a manifest line serialises");
        text.push(b'\n');
        let path = self.dir.join(MANIFEST);
        self.manifest
            .write_all(&text)
            .and_then(|_| self.manifest.sync_data())
            .with_context(|| format!("cannot write the manifest {}", path.display()))
    }

    /// Deletes sealed segments whose every event has a commit order below
    /// `before`: a `retired` line first, then the file.
    fn retire(&mut self, before: i64, reason: &str) -> anyhow::Result<u64> {
        let (lines, _) = read_manifest(&self.dir)?;
        let mut live: Vec<SealedSegment> = Vec::new();
        for l in lines {
            match l {
                ManifestLine::Sealed(s) => live.push(*s),
                ManifestLine::Retired { segment, .. } => live.retain(|s| s.segment != segment),
            }
        }
        let mut n = 0;
        for s in live {
            let old = s.stats.last.commit_order.is_some_and(|c| c < before);
            if !old {
                // Segments are in commit order: none after this is older.
                break;
            }
            self.append_manifest(&ManifestLine::Retired {
                segment: s.segment.clone(),
                at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
                reason: reason.to_owned(),
            })?;
            let path = self.dir.join(&s.segment);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot remove {}", path.display()))
                }
            }
            n += 1;
        }
        if n > 0 {
            sync_dir(&self.dir.join(MANIFEST))?;
        }
        Ok(n)
    }
}

/// The mark a partition's own last event gives: units before its commit
/// order are complete on the partition (events arrive in commit order),
/// and its own unit too when it is the unit's last event.
fn own_mark(last: &Position) -> Mark {
    Mark {
        commit_order: last.commit_order.map(|c| c + i64::from(last.unit_end)),
        ts_us: last.ts_us,
    }
}

/// A partition's mark from its last event, `last`, no further than what
/// the archive's topic files are known to count (`counted`, see
/// [`Work::Counted`]); none before anything is counted.
fn counted_mark(last: &Position, counted: Option<Mark>) -> Option<Mark> {
    counted.map(|c| own_mark(last).min(c))
}

fn merge_marks(marks: impl IntoIterator<Item = Option<Mark>>) -> Option<Mark> {
    marks.into_iter().flatten().reduce(Mark::max)
}

/// A writer that hashes and counts what passes through.
struct Hashing<W> {
    inner: W,
    hasher: sha2::Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the first `len` bytes of `plain` to `dest`, compressed, through
/// a temporary file that is fsynced and renamed; returns the stored size
/// and its SHA-256. The same input, compression and level always give the
/// same bytes.
fn compress(
    plain: &Path,
    len: u64,
    dest: &Path,
    c: Compression,
    level: i32,
) -> anyhow::Result<(u64, String)> {
    let input = File::open(plain).with_context(|| format!("cannot read {}", plain.display()))?;
    let mut input = BufReader::with_capacity(1 << 20, input.take(len));
    let mut tmp_name = dest.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dest.with_file_name(tmp_name);
    let out = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut out = Hashing {
        inner: BufWriter::with_capacity(1 << 20, out),
        hasher: sha2::Sha256::new(),
        bytes: 0,
    };
    let what = || format!("cannot write {}", tmp.display());
    match c {
        Compression::None => {
            std::io::copy(&mut input, &mut out).with_context(what)?;
        }
        Compression::Zstd => {
            let mut z = zstd::stream::write::Encoder::new(&mut out, level).with_context(what)?;
            z.include_checksum(true).with_context(what)?;
            z.set_pledged_src_size(Some(len)).with_context(what)?;
            std::io::copy(&mut input, &mut z).with_context(what)?;
            z.finish().with_context(what)?;
        }
        Compression::Gzip => {
            let mut z = flate2::write::GzEncoder::new(
                &mut out,
                flate2::Compression::new(level.clamp(0, 9) as u32),
            );
            std::io::copy(&mut input, &mut z).with_context(what)?;
            z.finish().with_context(what)?;
        }
    }
    out.flush().with_context(what)?;
    let Hashing {
        inner,
        hasher,
        bytes,
    } = out;
    let file = inner
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(what)?;
    file.sync_all().with_context(what)?;
    drop(file);
    std::fs::rename(&tmp, dest)
        .with_context(|| format!("cannot move {} into place", dest.display()))?;
    sync_dir(dest)?;
    let sha: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((bytes, sha))
}

impl Committer for SegCommitter {
    type Point = SegPoint;
    type Report = SegReport;

    fn commit(&mut self, point: SegPoint) -> anyhow::Result<()> {
        let counted = merge_marks([self.counted, point.counted]);
        let moved = counted != self.counted;
        self.counted = counted;
        let idle: Vec<Tp> = if moved {
            // A partition with nothing new would keep the mark its last
            // commit was held back to: it takes the counted mark's move too.
            self.parts
                .keys()
                .filter(|tp| !point.parts.contains_key(*tp))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        for tp in idle {
            let sync = self.parts.get_mut(&tp).expect("listed above");
            sync.commit(PartPoint::default(), counted)?;
            self.report.partitions.insert(tp, sync.checkpoint.clone());
        }
        for (tp, mut p) in point.parts {
            if let Some(sync) = p.acquire.take() {
                self.parts.insert(tp.clone(), *sync);
            }
            let release = p.release;
            let (written, dead, skipped) = (p.written, p.dead, p.skipped);
            let Some(sync) = self.parts.get_mut(&tp) else {
                continue;
            };
            let retired = sync.commit(p, self.counted)?;
            self.report.totals.written += written;
            self.report.totals.dead += dead;
            self.report.totals.skipped += skipped;
            self.report.retired += retired;
            if release {
                self.seal_now(&tp)?;
                // The last commit is durable: the lock can go.
                if let Some(s) = self.parts.remove(&tp) {
                    tracing::info!(topic = %tp.0, partition = tp.1, next = s.checkpoint.next_offset, "partition let go");
                    drop(s.lock);
                }
                self.report.partitions.remove(&tp);
            } else {
                self.report.partitions.insert(tp, sync.checkpoint.clone());
            }
        }
        self.advance_seals(false)?;
        Ok(())
    }

    fn report(&self) -> SegReport {
        self.report.clone()
    }

    fn busy(&self) -> bool {
        self.sealing.is_some()
    }

    fn idle(&mut self) -> anyhow::Result<bool> {
        Ok(self.advance_seals(false)? > 0)
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        self.advance_seals(true).map(|_| ())
    }
}

/// The outcome of trying to take a partition.
pub enum Acquire {
    /// Taken and recovered.
    Ready(Box<Acquired>),
    /// Another instance holds it (its description).
    Held(String),
}

/// Takes a partition's lock and recovers its files (see the module doc).
///
/// Fails when a file cannot be read or written, or the partition's files
/// contradict each other (a manifest line lost, an open segment shorter
/// than its checkpoint): damage a person must look at.
pub fn acquire(cfg: &SegmentConfig, tp: &Tp, owner: &str) -> anyhow::Result<Acquire> {
    let dir = partition_dir(&cfg.root, &tp.0, tp.1);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the partition folder {}", dir.display()))?;
    let lock = match Lock::try_acquire(&dir.join(LOCK), owner)? {
        Ok(l) => l,
        Err(holder) => return Ok(Acquire::Held(holder)),
    };
    recover(cfg, tp, dir, lock).map(|a| Acquire::Ready(Box::new(a)))
}

fn recover(cfg: &SegmentConfig, tp: &Tp, dir: PathBuf, lock: Lock) -> anyhow::Result<Acquired> {
    let (topic, partition) = (tp.0.clone(), tp.1);
    let mut cp = PartitionCheckpoint::load(&dir)?.unwrap_or(PartitionCheckpoint {
        version: FORMAT_VERSION,
        topic: topic.clone(),
        partition,
        ..Default::default()
    });
    if cp.topic != topic || cp.partition != partition {
        bail!(
            "{} holds the checkpoint of {} partition {}, not of {topic} partition {partition}: the archive's folders were moved",
            dir.display(),
            cp.topic,
            cp.partition
        );
    }
    let manifest_path = dir.join(MANIFEST);
    let (lines, manifest_len) = read_manifest(&dir)?;
    let manifest = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&manifest_path)
        .with_context(|| format!("cannot open the manifest {}", manifest_path.display()))?;
    if manifest.metadata()?.len() > manifest_len {
        // A line torn by a crash while it was appended.
        tracing::warn!(manifest = %manifest_path.display(), "cutting off a torn manifest line");
        manifest.set_len(manifest_len)?;
        manifest.sync_all()?;
    }
    let sealed: Vec<SealedSegment> = lines
        .iter()
        .filter_map(|l| match l {
            ManifestLine::Sealed(s) => Some((**s).clone()),
            ManifestLine::Retired { .. } => None,
        })
        .collect();
    if (sealed.len() as u64) < cp.sealed {
        bail!(
            "the manifest {} lists {} sealed segments where the checkpoint knows of {}: it was truncated or replaced; restore it",
            manifest_path.display(),
            sealed.len(),
            cp.sealed
        );
    }
    let mut sync = PartSync {
        dir: dir.clone(),
        lock,
        manifest,
        checkpoint: cp.clone(),
        handles: HashMap::new(),
        wanted: None,
    };
    // Closed segments: sealed already (the crash came after the manifest
    // line), or sealed now.
    let mut known = sealed.len() as u64;
    while let Some(seg) = sync.checkpoint.closed.first().cloned() {
        let done = sealed
            .iter()
            .skip(cp.sealed as usize)
            .any(|s| s.stats.first_offset == seg.stats.first_offset);
        if !done {
            let plain = dir.join(&seg.segment);
            let have = std::fs::metadata(&plain).map(|m| m.len()).unwrap_or(0);
            if have < seg.stats.plain_bytes {
                bail!(
                    "the closed segment {} holds {have} bytes where its checkpoint says {}: restore it",
                    plain.display(),
                    seg.stats.plain_bytes
                );
            }
            tracing::info!(segment = %seg.segment, "sealing a segment a crash left unsealed");
            // No further than the checkpoint's mark, which was counted
            // (see [`Work::Counted`]).
            let mark = counted_mark(&seg.stats.last, sync.checkpoint.complete_before);
            sync.seal(cfg, &seg, mark)?;
            known += 1;
        }
        sync.checkpoint.closed.remove(0);
        sync.checkpoint.sealed += 1;
    }
    if known != sync.checkpoint.sealed {
        bail!(
            "the manifest {} lists {known} sealed segments but the checkpoint accounts for {}: restore the checkpoint, or move the partition folder away to read it again",
            manifest_path.display(),
            sync.checkpoint.sealed
        );
    }
    // The open segment and the dead letters, cut back to the checkpoint.
    let open = match sync.checkpoint.open.clone() {
        Some(seg) => {
            let path = dir.join(&seg.segment);
            let mut file = OpenOptions::new()
                .write(true)
                .open(&path)
                .with_context(|| {
                    format!(
                        "the open segment {} of the checkpoint is missing: restore it",
                        path.display()
                    )
                })?;
            let have = file.metadata()?.len();
            if have < seg.stats.plain_bytes {
                bail!(
                    "the open segment {} holds {have} bytes where its checkpoint says {}: restore it",
                    path.display(),
                    seg.stats.plain_bytes
                );
            }
            if have > seg.stats.plain_bytes {
                tracing::warn!(segment = %path.display(), bytes = have - seg.stats.plain_bytes, "dropping the tail written after the last checkpoint; those records are read again");
                file.set_len(seg.stats.plain_bytes)?;
                file.sync_all()?;
            }
            file.seek(std::io::SeekFrom::End(0))?;
            Some(WriterOpen { file, seg })
        }
        None => None,
    };
    let dead_path = dir.join(DEAD_LETTER);
    let dead_have = std::fs::metadata(&dead_path).map(|m| m.len()).unwrap_or(0);
    if dead_have > sync.checkpoint.dead_letter_bytes {
        let f = OpenOptions::new().write(true).open(&dead_path)?;
        f.set_len(sync.checkpoint.dead_letter_bytes)?;
        f.sync_all()?;
    } else if dead_have < sync.checkpoint.dead_letter_bytes {
        tracing::warn!(file = %dead_path.display(), "the dead-letter file is shorter than the checkpoint says; counting from its length");
        sync.checkpoint.dead_letter_bytes = dead_have;
    }
    // Files nothing accounts for: begun or sealed after the checkpoint.
    let (lines, _) = read_manifest(&dir)?;
    let mut live: Vec<String> = Vec::new();
    for l in lines {
        match l {
            ManifestLine::Sealed(s) => live.push(s.segment),
            ManifestLine::Retired { segment, .. } => live.retain(|s| *s != segment),
        }
    }
    for entry in std::fs::read_dir(&dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with(&format!("{topic}+{partition}+"));
        let stray = (ours
            && name.ends_with(OPEN_SUFFIX)
            && sync
                .checkpoint
                .open
                .as_ref()
                .is_none_or(|o| o.segment != name))
            || (ours && !name.ends_with(OPEN_SUFFIX) && !live.contains(&name))
            || name.ends_with(".tmp");
        if stray {
            tracing::info!(file = %name, "removing a file no checkpoint or manifest accounts for");
            std::fs::remove_file(dir.join(&name))?;
        }
    }
    if sync.checkpoint != cp {
        save_checkpoint(&dir, &sync.checkpoint)?;
        cp = sync.checkpoint.clone();
    }
    sync_dir(&dir.join(CHECKPOINT))?;
    let writer = PartWriter {
        dir,
        topic,
        partition,
        open,
        closed: Vec::new(),
        dead: None,
        dead_len: cp.dead_letter_bytes,
        next: cp.next_offset,
        fingerprint: cp.fingerprint.clone(),
        last: cp.last.clone(),
    };
    Ok(Acquired {
        tp: tp.clone(),
        writer,
        sync,
    })
}

/// Sets a partition's folder aside (`<partition>.before-reset-<time>`)
/// because its topic is not the one the archive holds any more, and starts
/// it anew. Returns the new partition and where the old one went. The old
/// folder's lock is held until the new one's is.
///
/// Fails when the folder cannot be moved or the new one created.
pub fn reset(
    cfg: &SegmentConfig,
    old: Acquired,
    owner: &str,
) -> anyhow::Result<(Acquired, PathBuf)> {
    let dir = old.sync.dir.clone();
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(':', "");
    let name = dir
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let mut aside = dir.with_file_name(format!("{name}.before-reset-{stamp}"));
    let mut n = 1;
    while aside.exists() {
        n += 1;
        aside = dir.with_file_name(format!("{name}.before-reset-{stamp}-{n}"));
    }
    std::fs::rename(&dir, &aside)
        .with_context(|| format!("cannot move {} aside to {}", dir.display(), aside.display()))?;
    sync_dir(&dir)?;
    match acquire(cfg, &old.tp, owner)? {
        Acquire::Ready(a) => Ok((*a, aside)),
        Acquire::Held(holder) => bail!(
            "moved {} aside, but {holder} took the new folder first",
            dir.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_starting_at_once_on_a_new_archive_all_start() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("archive");
            let results: Vec<anyhow::Result<()>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..6).map(|_| s.spawn(|| create_archive(&root))).collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for r in results {
                r.unwrap();
            }
            assert!(root.join(ARCHIVE_MARKER).is_file());
            let left: Vec<_> = std::fs::read_dir(&root).unwrap().flatten().collect();
            assert_eq!(left.len(), 1, "{left:?}");
        }
    }

    fn cfg(root: &Path, rotate_bytes: u64, c: Compression) -> SegmentConfig {
        SegmentConfig {
            root: root.to_path_buf(),
            rotate_bytes,
            rotate_interval: None,
            compression: c,
            level: SegmentConfig::default_level(c),
            retention_window: None,
        }
    }

    fn batch(from: i64, n: i64) -> PartBatch {
        let mut b = PartBatch::default();
        for o in from..from + n {
            let line = format!(
                r#"{{"op":"c","source":{{"ts_us":{}}},"transaction":{{"commit_order":{o},"total_order":1,"event_count":1}}}}"#,
                o * 100
            );
            b.lines.extend_from_slice(line.as_bytes());
            b.lines.push(b'\n');
            b.records
                .push((b.lines.len(), Position::of_line(line.as_bytes(), o)));
        }
        b.next = from + n;
        b.fingerprint = Some(crate::identity::fingerprint(
            from + n - 1,
            None,
            None,
            Some(b"x"),
        ));
        b
    }

    fn take(cfg: &SegmentConfig, tp: &Tp) -> Acquired {
        match acquire(cfg, tp, "test").unwrap() {
            Acquire::Ready(a) => *a,
            Acquire::Held(h) => panic!("held by {h}"),
        }
    }

    /// Runs works through an appender and committer, synchronously.
    fn run(cfg: &SegmentConfig, works: Vec<Work>) -> SegReport {
        let mut a = SegAppender::new(cfg.clone());
        let mut c = SegCommitter::new(cfg.clone());
        for w in works {
            if let Some(p) = a.append(w).unwrap() {
                c.commit(p).unwrap();
            }
        }
        c.settle().unwrap();
        c.report()
    }

    fn lines_of(root: &Path) -> Vec<String> {
        let archive = tidemark_common::archive::Archive::open(root).unwrap();
        archive
            .records(&Default::default())
            .map(|r| r.unwrap().line)
            .collect()
    }

    /// A tail reads what the archive holds, steps over sealed segments
    /// outside its range unread, and refuses a position in a segment that
    /// retention took away rather than skip what is left of it.
    #[test]
    fn a_tail_skips_what_is_outside_its_range_and_refuses_a_retired_position() {
        use tidemark_common::archive::{PartitionTail, ReadOptions, SegmentPos};
        let tp: Tp = ("t".into(), 0);
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 1000, Compression::Zstd);
        create_archive(dir.path()).unwrap();
        let a = take(&c, &tp);
        run(
            &c,
            vec![
                Work::Acquire(Box::new(a)),
                Work::Batch(vec![(tp.clone(), batch(0, 40))]),
            ],
        );
        let pdir = partition_dir(dir.path(), "t", 0);
        let read_all = |t: &mut PartitionTail| {
            let mut out = Vec::new();
            while let Some(r) = t.next_record().unwrap() {
                out.push((String::from_utf8(r.line).unwrap(), r.next));
            }
            out
        };
        let all = read_all(&mut PartitionTail::new(
            &pdir,
            SegmentPos::START,
            ReadOptions::default(),
        ));
        let lines: Vec<String> = all.iter().map(|(l, _)| l.clone()).collect();
        assert_eq!(lines, lines_of(dir.path()));
        assert_eq!(lines.len(), 40);

        let (manifest, _) = read_manifest(&pdir).unwrap();
        let sealed: Vec<SealedSegment> = manifest
            .into_iter()
            .filter_map(|l| match l {
                ManifestLine::Sealed(s) => Some(*s),
                ManifestLine::Retired { .. } => None,
            })
            .collect();
        assert!(sealed.len() >= 3, "{sealed:?}");
        // From commit order 30 on: the segments wholly before it unread.
        let opts = ReadOptions {
            from_commit_order: Some(30),
            ..Default::default()
        };
        let from30 = read_all(&mut PartitionTail::new(&pdir, SegmentPos::START, opts));
        let holding30 = sealed
            .iter()
            .find(|s| s.stats.last.commit_order >= Some(30))
            .unwrap();
        assert_eq!(from30.len() as i64, 40 - holding30.stats.first_offset);
        assert_eq!(from30[0].0, lines[holding30.stats.first_offset as usize]);

        // Retention takes the first segment away from under a reader in it.
        let inside = all[2].1;
        assert_eq!(inside.segment, sealed[0].stats.first_offset);
        std::fs::remove_file(pdir.join(&sealed[0].segment)).unwrap();
        let retired = ManifestLine::Retired {
            segment: sealed[0].segment.clone(),
            at: "2026-12-01T00:00:00Z".into(),
            reason: "test".into(),
        };
        let mut m = std::fs::OpenOptions::new()
            .append(true)
            .open(pdir.join(MANIFEST))
            .unwrap();
        writeln!(m, "{}", serde_json::to_string(&retired).unwrap()).unwrap();
        let err = PartitionTail::new(&pdir, inside, ReadOptions::default())
            .next_record()
            .unwrap_err()
            .to_string();
        assert!(err.contains("not in the archive"), "{err}");
        // From the start, what is left.
        let left = read_all(&mut PartitionTail::new(
            &pdir,
            SegmentPos::START,
            ReadOptions::default(),
        ));
        assert_eq!(left.len() as i64, 40 - sealed[1].stats.first_offset);
    }

    #[test]
    fn segments_rotate_by_size_whatever_the_batching_and_are_complete_streams() {
        let tp: Tp = ("t".into(), 0);
        let names = |root: &Path| {
            let (lines, _) = read_manifest(&partition_dir(root, "t", 0)).unwrap();
            lines
                .into_iter()
                .map(|l| match l {
                    ManifestLine::Sealed(s) => (s.segment, s.stats.records, s.sha256),
                    ManifestLine::Retired { .. } => unreachable!(),
                })
                .collect::<Vec<_>>()
        };
        let one = tempfile::tempdir().unwrap();
        let c1 = cfg(one.path(), 1000, Compression::Zstd);
        create_archive(one.path()).unwrap();
        let a = take(&c1, &tp);
        run(
            &c1,
            vec![
                Work::Acquire(Box::new(a)),
                Work::Batch(vec![(tp.clone(), batch(0, 40))]),
            ],
        );
        let two = tempfile::tempdir().unwrap();
        let c2 = cfg(two.path(), 1000, Compression::Zstd);
        create_archive(two.path()).unwrap();
        let a = take(&c2, &tp);
        let mut works = vec![Work::Acquire(Box::new(a))];
        for i in 0..8 {
            works.push(Work::Batch(vec![(tp.clone(), batch(i * 5, 5))]));
        }
        run(&c2, works);
        let (n1, n2) = (names(one.path()), names(two.path()));
        assert!(n1.len() >= 3, "{n1:?}");
        assert_eq!(n1, n2, "same names, counts and bytes however batched");
        assert_eq!(lines_of(one.path()), lines_of(two.path()));
        assert_eq!(lines_of(one.path()).len(), 40);
        let first = partition_dir(one.path(), "t", 0).join(&n1[0].0);
        let plain = zstd::decode_all(File::open(first).unwrap()).unwrap();
        assert_eq!(
            plain.iter().filter(|b| **b == b'\n').count() as u64,
            n1[0].1
        );
    }

    #[test]
    fn a_crash_anywhere_in_a_seal_recovers_to_the_same_archive() {
        let tp: Tp = ("t".into(), 3);
        for compression in [Compression::Zstd, Compression::Gzip, Compression::None] {
            // The reference: no crash.
            let good = tempfile::tempdir().unwrap();
            let cg = cfg(good.path(), 600, compression);
            create_archive(good.path()).unwrap();
            let a = take(&cg, &tp);
            run(
                &cg,
                vec![
                    Work::Acquire(Box::new(a)),
                    Work::Batch(vec![(tp.clone(), batch(0, 20))]),
                ],
            );
            let want_dir = partition_dir(good.path(), "t", 3);
            let (want, _) = read_manifest(&want_dir).unwrap();

            // Crashes: after the checkpoint lists the closed segment, after
            // its compressed file is in place, and with a torn manifest line.
            for crash in 0..3 {
                let dir = tempfile::tempdir().unwrap();
                let c = cfg(dir.path(), 600, compression);
                create_archive(dir.path()).unwrap();
                let a = take(&c, &tp);
                let mut app = SegAppender::new(c.clone());
                let mut com = SegCommitter::new(c.clone());
                let p = app.append(Work::Acquire(Box::new(a))).unwrap().unwrap();
                com.commit(p).unwrap();
                let mut p = app
                    .append(Work::Batch(vec![(tp.clone(), batch(0, 20))]))
                    .unwrap()
                    .unwrap();
                // Step 2 only: checkpoint with the closed segments, no seal.
                let part = p.parts.get_mut(&tp).unwrap();
                let closed = part.closed.clone();
                assert!(!closed.is_empty());
                let sync = com.parts.get_mut(&tp).unwrap();
                let mut cp = sync.checkpoint.clone();
                for s in &closed {
                    sync.fsync(&s.segment).unwrap();
                }
                if let Some(Some(o)) = &part.open {
                    sync.fsync(&o.segment).unwrap();
                }
                cp.next_offset = part.next.unwrap();
                cp.fingerprint = part.fingerprint.clone();
                cp.last = part.last.clone();
                cp.open = part.open.clone().flatten();
                cp.closed = closed.clone();
                save_checkpoint(&sync.dir, &cp).unwrap();
                let pdir = sync.dir.clone();
                if crash >= 1 {
                    let name = segment_name("t", 3, closed[0].stats.first_offset, compression);
                    compress(
                        &pdir.join(&closed[0].segment),
                        closed[0].stats.plain_bytes,
                        &pdir.join(name),
                        compression,
                        c.level,
                    )
                    .unwrap();
                }
                if crash == 2 {
                    let mut m = OpenOptions::new()
                        .append(true)
                        .open(pdir.join(MANIFEST))
                        .unwrap();
                    m.write_all(b"{\"kind\":\"sealed\",\"segm").unwrap();
                }
                // The process dies: its lock goes with it.
                drop(com);
                drop(app);
                // An unsynced tail in the open segment, too.
                if let Some(o) = &cp.open {
                    let mut f = OpenOptions::new()
                        .append(true)
                        .open(pdir.join(&o.segment))
                        .unwrap();
                    f.write_all(b"{\"torn\":").unwrap();
                }
                let a = take(&c, &tp);
                assert_eq!(
                    a.checkpoint().closed.len(),
                    0,
                    "recovery seals what was closed"
                );
                let start = a.start().unwrap();
                run(
                    &c,
                    vec![
                        Work::Acquire(Box::new(a)),
                        Work::Batch(vec![(tp.clone(), batch(start, 20 - start))]),
                    ],
                );
                let (got, _) = read_manifest(&pdir).unwrap();
                let strip = |v: &[ManifestLine]| -> Vec<(String, u64, String, i64, i64)> {
                    v.iter()
                        .map(|l| match l {
                            ManifestLine::Sealed(s) => (
                                s.segment.clone(),
                                s.bytes,
                                s.sha256.clone(),
                                s.stats.first_offset,
                                s.stats.last_offset,
                            ),
                            ManifestLine::Retired { .. } => unreachable!(),
                        })
                        .collect()
                };
                assert_eq!(strip(&got), strip(&want), "{compression:?}, crash {crash}");
                assert_eq!(
                    lines_of(dir.path()),
                    lines_of(good.path()),
                    "{compression:?}, crash {crash}"
                );
                let leftovers: Vec<String> = std::fs::read_dir(&pdir)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".tmp"))
                    .collect();
                assert!(leftovers.is_empty(), "{leftovers:?}");
            }
        }
    }

    #[test]
    fn a_held_partition_is_not_taken_and_time_seals_without_new_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path(), 1 << 30, Compression::Zstd);
        c.rotate_interval = Some(Duration::from_millis(1));
        create_archive(dir.path()).unwrap();
        let tp: Tp = ("t".into(), 0);
        let a = take(&c, &tp);
        assert!(
            matches!(acquire(&c, &tp, "other").unwrap(), Acquire::Held(h) if h.contains("`test`"))
        );
        let mut app = SegAppender::new(c.clone());
        let mut com = SegCommitter::new(c.clone());
        for w in [
            Work::Acquire(Box::new(a)),
            Work::Batch(vec![(tp.clone(), batch(0, 3))]),
            // The topic's partitions noted after unit 2 was read.
            Work::Counted(Mark {
                commit_order: Some(3),
                ts_us: None,
            }),
        ] {
            let p = app.append(w).unwrap().unwrap();
            com.commit(p).unwrap();
        }
        assert_eq!(com.report().sealed, 0);
        std::thread::sleep(Duration::from_millis(5));
        let p = app.append(Work::Tick).unwrap().unwrap();
        com.commit(p).unwrap();
        // Sealed on its own thread: the syncer looks in while it is busy.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while com.busy() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            com.idle().unwrap();
        }
        assert_eq!(com.report().sealed, 1);
        let archive = tidemark_common::archive::Archive::open(dir.path()).unwrap();
        let sealed = archive
            .records(&tidemark_common::archive::ReadOptions {
                sealed_only: true,
                ..Default::default()
            })
            .count();
        assert_eq!(sealed, 3);
        // The last event ends its unit: the partition is complete past it.
        let Some(Mark { commit_order, .. }) = archive.complete_before(true) else {
            panic!("no mark")
        };
        assert_eq!(commit_order, Some(3));
    }

    #[test]
    fn an_idle_partition_s_mark_follows_the_counted_mark() {
        // Partition 0 is idle after its events; the counted mark moves on
        // later, with nothing new for it: its mark, and the manifest line of
        // its time-closed segment, take the move, and a heartbeat's mark held
        // back by counted is taken as counted moves too.
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path(), 1 << 30, Compression::Zstd);
        c.rotate_interval = Some(Duration::from_millis(1));
        create_archive(dir.path()).unwrap();
        let (t0, t1): (Tp, Tp) = (("t".into(), 0), ("t".into(), 1));
        let mut app = SegAppender::new(c.clone());
        let mut com = SegCommitter::new(c.clone());
        let counted = |co: i64| {
            Work::Counted(Mark {
                commit_order: Some(co),
                ts_us: None,
            })
        };
        let mark_of = |com: &SegCommitter, tp: &Tp| {
            com.report().partitions[tp]
                .complete_before
                .and_then(|m| m.commit_order)
        };
        for w in [
            Work::Acquire(Box::new(take(&c, &t0))),
            Work::Acquire(Box::new(take(&c, &t1))),
            Work::Batch(vec![(t0.clone(), batch(0, 3))]),
            // Counted only up to unit 1: the partition's mark waits at 1.
            counted(1),
        ] {
            if let Some(p) = app.append(w).unwrap() {
                com.commit(p).unwrap();
            }
        }
        assert_eq!(mark_of(&com, &t0), Some(1));
        // Time closes its segment; it is not sealed with the held-back mark.
        std::thread::sleep(Duration::from_millis(5));
        let p = app.append(Work::Tick).unwrap().unwrap();
        com.commit(p).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while com.busy() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            com.idle().unwrap();
        }
        assert_eq!(com.report().sealed, 0, "sealed before counted covered it");
        // Counted moves past its events; nothing new for partition 0.
        let p = app.append(counted(3)).unwrap().unwrap();
        com.commit(p).unwrap();
        assert_eq!(mark_of(&com, &t0), Some(3));
        // A heartbeat on partition 1 says 10; counted says 5, then 8.
        for w in [
            Work::Mark(
                t1.clone(),
                Mark {
                    commit_order: Some(10),
                    ts_us: None,
                },
            ),
            counted(5),
        ] {
            if let Some(p) = app.append(w).unwrap() {
                com.commit(p).unwrap();
            }
        }
        assert_eq!(mark_of(&com, &t1), Some(5));
        let p = app.append(counted(8)).unwrap().unwrap();
        com.commit(p).unwrap();
        assert_eq!(mark_of(&com, &t1), Some(8));
        com.settle().unwrap();
        assert_eq!(com.report().sealed, 1);
        // Partition 0's sealed segment carries 3, not the 1 it had when
        // time closed it.
        let (lines, _) = read_manifest(&partition_dir(dir.path(), "t", 0)).unwrap();
        let marks: Vec<Option<i64>> = lines
            .iter()
            .filter_map(|l| match l {
                ManifestLine::Sealed(s) => Some(s.complete_before.and_then(|m| m.commit_order)),
                ManifestLine::Retired { .. } => None,
            })
            .collect();
        assert_eq!(marks, [Some(3)]);
        let archive = tidemark_common::archive::Archive::open(dir.path()).unwrap();
        let Some(Mark { commit_order, .. }) = archive.complete_before(false) else {
            panic!("no mark")
        };
        assert_eq!(commit_order, Some(3));
        // Sealed only (what retention goes by): partition 1 holds nothing
        // but a heartbeat's mark, which does not hold the archive back.
        let Some(Mark { commit_order, .. }) = archive.complete_before(true) else {
            panic!("no sealed mark")
        };
        assert_eq!(commit_order, Some(3));
    }

    #[test]
    fn partition_counts_noted_at_once_never_go_back() {
        // The regular note (every 2 s) and a completeness probe note a topic's
        // partitions on two threads at once; one with an older count must
        // neither fail nor leave it below the other's (the archive's mark
        // would then leave out the partition added).
        for _ in 0..300 {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().to_path_buf();
            note_partitions(&root, "t", 1).unwrap();
            let go = std::sync::Arc::new(std::sync::Barrier::new(2));
            let threads: Vec<_> = [2, 3]
                .into_iter()
                .map(|n| {
                    let (root, go) = (root.clone(), go.clone());
                    std::thread::spawn(move || {
                        go.wait();
                        note_partitions(&root, "t", n)
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap().unwrap();
            }
            let t: TopicFile =
                serde_json::from_slice(&std::fs::read(root.join("t").join(TOPIC_FILE)).unwrap())
                    .unwrap();
            assert_eq!(t.partitions, 3);
            assert_eq!(t.first_partitions, Some(1));
        }
    }

    #[test]
    fn the_first_partition_count_is_kept_as_the_topic_grows() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        note_partitions(&root, "t", 2).unwrap();
        note_partitions(&root, "t", 5).unwrap();
        note_partitions(&root, "t", 3).unwrap();
        let t = topic_file(&root, "t").unwrap();
        assert_eq!((t.partitions, t.first_partitions), (5, Some(2)));
        // An archive written before the first count was kept: the count it
        // says stands for it, and is kept once the topic grows.
        std::fs::write(
            root.join("t").join(TOPIC_FILE),
            br#"{"topic":"t","partitions":4}"#,
        )
        .unwrap();
        assert_eq!(topic_file(&root, "t").unwrap().first(), 4);
        note_partitions(&root, "t", 6).unwrap();
        let t = topic_file(&root, "t").unwrap();
        assert_eq!((t.partitions, t.first_partitions), (6, Some(4)));
    }
}
