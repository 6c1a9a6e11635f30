//! Reading the archive: the lines of file-sink's files and the records of
//! Kafka topics, each as a stream of raw records with the position they came
//! from.
//!
//! Every input is one or more *streams* (a file, a topic partition) read in
//! their own order on their own thread or task, and handed over through one
//! bounded channel, so at most [`CHANNEL_RECORDS`] records wait in memory.
//!
//! - A file is read line by line. A last line without its newline is
//!   file-sink's crash tail (a write cut short): it is never handed over. In
//!   follow mode the reader waits for the rest of it; when the file has
//!   file-sink's checkpoint beside it, only the bytes the checkpoint covers
//!   are read, because file-sink cuts anything after them when it restarts.
//! - A segmented archive (a folder) is a stream per topic partition, read
//!   by [`crate::segmented`].
//! - A topic is read `read_committed` from the beginning (or the resume hint)
//!   of every partition, without a consumer group's offsets: the position
//!   lives in the target database. A tombstone (null value) is skipped.

use std::fmt;
use std::fs::File;
use std::io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use tidemark_common::kafka::KafkaSettings;

use crate::record::{Decoder, Record, RecordError};
use tidemark_common::offset::SinkCheckpoint;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Batches of records that may wait between the readers and the applier.
pub const CHANNEL_BATCHES: usize = 8;

/// Records per batch at most; a batch also ends at [`BATCH_BYTES`] of
/// record text, and whenever the reader would wait. Handing records over in
/// batches spares a thread wake-up per record.
const BATCH_RECORDS: usize = 256;

/// Bytes of record text per batch at most.
const BATCH_BYTES: usize = 512 * 1024;

/// How often a follow-mode reader looks for more of a file.
pub(crate) const FILE_POLL: Duration = Duration::from_millis(50);

/// Identifies a stream: an index into [`Streams`].
pub type StreamId = u32;

/// Where a stream's records come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamKind {
    /// A file (file-sink's output).
    File(PathBuf),
    /// One partition of a topic.
    Partition {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
    },
    /// One partition of a segmented archive (its folder), read by
    /// [`crate::segmented`]. Its positions are a segment's first Kafka
    /// offset (`offset`) and the lines of it read (`line`).
    Segments {
        /// The partition's folder.
        dir: PathBuf,
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
    },
}

impl StreamKind {
    /// The key the resume hint is stored under in the target.
    pub fn hint_key(&self) -> String {
        match self {
            Self::File(path) => format!("file:{}", path.display()),
            Self::Partition { topic, partition } => format!("kafka:{topic}:{partition}"),
            // Not the folder: a position names segments by their first
            // offset, so it holds when the archive is moved.
            Self::Segments {
                topic, partition, ..
            } => format!("archive:{topic}:{partition}"),
        }
    }
}

impl fmt::Display for StreamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Partition { topic, partition } => {
                write!(f, "topic {topic} partition {partition}")
            }
            Self::Segments { dir, .. } => write!(f, "{}", dir.display()),
        }
    }
}

/// Where a stream resumes: a byte offset and the number of the line there
/// (files), or an offset (partitions, `line` unused).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamPos {
    /// Byte offset (file) or Kafka offset (partition) of the next record.
    pub offset: u64,
    /// 1-based number of the line at `offset` (files), for messages.
    #[serde(default)]
    pub line: u64,
}

/// One raw record and where it came from.
#[derive(Debug, Clone)]
pub struct RawRecord {
    /// The stream it belongs to.
    pub stream: StreamId,
    /// Its bytes (a file line without its newline, a record value).
    pub bytes: Vec<u8>,
    /// Where it starts.
    pub pos: StreamPos,
    /// Where the next record of the stream starts.
    pub next: StreamPos,
}

/// A record decoded by its reader (each reader decodes its own records, on
/// its own thread).
#[derive(Debug)]
pub struct Decoded {
    /// The stream it belongs to.
    pub stream: StreamId,
    /// Where it starts.
    pub pos: StreamPos,
    /// Where the next record of the stream starts.
    pub next: StreamPos,
    /// The record, or why it is not one.
    pub record: Result<Record, RecordError>,
}

/// What the readers hand over.
#[derive(Debug)]
pub enum Item {
    /// Records, in stream order.
    Records(Vec<Decoded>),
    /// The stream has nothing more right now (follow mode: it is caught up).
    CaughtUp(StreamId),
    /// The stream has nothing more, ever (not following).
    End(StreamId),
    /// A partition of a segmented archive holds every event of the units
    /// before this commit order that it will ever hold, and the reader has
    /// handed them all over (the archive's completeness mark, followed).
    CompleteBefore(StreamId, i64),
    /// The reader failed; the replay stops with this error.
    Failed(anyhow::Error),
}

/// The position of one record, for messages: "file F line L (byte B)" or
/// "topic T partition P offset O".
#[derive(Debug, Clone)]
pub struct Origin {
    /// The stream.
    pub kind: Arc<StreamKind>,
    /// Its position.
    pub pos: StreamPos,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.kind {
            StreamKind::File(path) => write!(
                f,
                "{} line {} (byte offset {})",
                path.display(),
                self.pos.line,
                self.pos.offset
            ),
            StreamKind::Partition { topic, partition } => write!(
                f,
                "topic {topic} partition {partition} offset {}",
                self.pos.offset
            ),
            StreamKind::Segments { dir, .. } => write!(
                f,
                "{} segment from offset {} line {}",
                dir.display(),
                self.pos.offset,
                self.pos.line + 1
            ),
        }
    }
}

/// The streams of a replay, by id.
#[derive(Debug, Default, Clone)]
pub struct Streams {
    kinds: Vec<Arc<StreamKind>>,
}

impl Streams {
    /// Adds a stream and returns its id.
    pub fn add(&mut self, kind: StreamKind) -> StreamId {
        self.kinds.push(Arc::new(kind));
        (self.kinds.len() - 1) as StreamId
    }

    /// The stream with this id.
    pub fn kind(&self, id: StreamId) -> &Arc<StreamKind> {
        &self.kinds[id as usize]
    }

    /// How many streams there are.
    pub fn len(&self) -> usize {
        self.kinds.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }

    /// The origin of a position in a stream.
    pub fn origin(&self, id: StreamId, pos: StreamPos) -> Origin {
        Origin {
            kind: self.kind(id).clone(),
            pos,
        }
    }
}

/// Decodes records and hands them over in batches.
pub(crate) struct Batcher {
    tx: mpsc::Sender<Item>,
    decoder: Decoder,
    batch: Vec<Decoded>,
    bytes: usize,
}

impl Batcher {
    pub(crate) fn new(tx: mpsc::Sender<Item>) -> Self {
        Self {
            tx,
            decoder: Decoder::new(),
            batch: Vec::with_capacity(BATCH_RECORDS),
            bytes: 0,
        }
    }

    /// Decodes and queues a record; false once the receiver is gone.
    pub(crate) fn push(&mut self, r: RawRecord) -> bool {
        self.bytes += r.bytes.len();
        let record = self.decoder.decode(&r.bytes);
        self.batch.push(Decoded {
            stream: r.stream,
            pos: r.pos,
            next: r.next,
            record,
        });
        if self.batch.len() >= BATCH_RECORDS || self.bytes >= BATCH_BYTES {
            return self.flush();
        }
        true
    }

    /// Sends what is queued; false once the receiver is gone.
    pub(crate) fn flush(&mut self) -> bool {
        if self.batch.is_empty() {
            return true;
        }
        self.bytes = 0;
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_RECORDS));
        self.tx.blocking_send(Item::Records(batch)).is_ok()
    }

    /// Sends what is queued, then `item`; false once the receiver is gone.
    pub(crate) fn send(&mut self, item: Item) -> bool {
        self.flush() && self.tx.blocking_send(item).is_ok()
    }
}

/// Reads one file and hands its complete lines to `tx`, from `start`.
///
/// Not following: every complete line, then [`Item::End`]; a last line
/// without a newline is left out with a warning. Following: waits for more,
/// sending [`Item::CaughtUp`] whenever it reaches the end, reading only what
/// file-sink's checkpoint covers when there is one, until `shutdown`.
///
/// Sends [`Item::Failed`] when the file cannot be read, a line is longer than
/// `max_line`, or the file shrinks below what was read (it was replaced).
pub fn read_file(
    id: StreamId,
    path: PathBuf,
    start: StreamPos,
    follow: bool,
    max_line: usize,
    tx: mpsc::Sender<Item>,
    shutdown: CancellationToken,
) {
    let mut out = Batcher::new(tx);
    if let Err(e) = read_file_inner(id, &path, start, follow, max_line, &mut out, &shutdown) {
        out.send(Item::Failed(e));
    }
}

fn read_file_inner(
    id: StreamId,
    path: &Path,
    start: StreamPos,
    follow: bool,
    max_line: usize,
    out: &mut Batcher,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut file = File::open(path).with_context(|| {
        format!(
            "cannot open the archive file {} (--input): check the path and that this user may read it",
            path.display()
        )
    })?;
    let checkpoint_path = SinkCheckpoint::path_for(path);
    file.seek(SeekFrom::Start(start.offset))
        .with_context(|| format!("cannot seek in {}", path.display()))?;
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let mut pos = start;
    let mut line = Vec::new();
    let mut warned_tail = false;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        // In follow mode, only what file-sink has made durable: it cuts the
        // rest when it restarts after a crash.
        let limit = if follow {
            SinkCheckpoint::load(&checkpoint_path)?.map(|c| c.file_len)
        } else {
            None
        };
        let len = std::fs::metadata(path)
            .with_context(|| format!("cannot read the archive file {}", path.display()))?
            .len();
        if len < pos.offset {
            bail!(
                "the archive file {} shrank to {len} bytes below the {} already read: it was replaced or cut; \
                 start pg-replay again to read it anew",
                path.display(),
                pos.offset
            );
        }
        let end = limit.map_or(len, |l| l.min(len));
        let mut sent_any = false;
        while pos.offset < end {
            line.clear();
            let budget = (end - pos.offset).min(max_line as u64 + 1);
            let n = (&mut reader)
                .take(budget)
                .read_until(b'\n', &mut line)
                .with_context(|| format!("cannot read the archive file {}", path.display()))?;
            if n == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                if line.len() > max_line {
                    bail!(
                        "{} line {} (byte offset {}) is longer than --max-line-bytes ({max_line}); \
                         raise it if the record is genuine",
                        path.display(),
                        pos.line,
                        pos.offset
                    );
                }
                // A line without its newline yet: go back to its start and
                // look again later (following), or leave it out (not).
                reader
                    .seek(SeekFrom::Start(pos.offset))
                    .with_context(|| format!("cannot seek in {}", path.display()))?;
                if !follow && !warned_tail {
                    tracing::warn!(
                        file = %path.display(),
                        offset = pos.offset,
                        bytes = line.len(),
                        "the last line has no newline (a write cut short by a crash); it is left out"
                    );
                    warned_tail = true;
                }
                break;
            }
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let next = StreamPos {
                offset: pos.offset + n as u64,
                line: pos.line + 1,
            };
            let record = RawRecord {
                stream: id,
                bytes: std::mem::take(&mut line),
                pos,
                next,
            };
            pos = next;
            if !out.push(record) {
                return Ok(());
            }
            sent_any = true;
            // (Not at every line: the check takes a lock.)
            if pos.line.is_multiple_of(256) && shutdown.is_cancelled() {
                return Ok(());
            }
        }
        if !follow {
            out.send(Item::End(id));
            return Ok(());
        }
        if !sent_any || pos.offset >= end {
            if !out.send(Item::CaughtUp(id)) {
                return Ok(());
            }
            std::thread::sleep(FILE_POLL);
        }
    }
}

/// Checks that a resume hint still points at the start of a line of the
/// file (the byte before it is a newline); otherwise the file was replaced
/// and reading starts from the beginning.
pub fn file_hint_is_valid(path: &Path, hint: StreamPos) -> bool {
    if hint.offset == 0 {
        return true;
    }
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    let Ok(meta) = f.metadata() else {
        return false;
    };
    if meta.len() < hint.offset || hint.line < 2 {
        return false;
    }
    let mut byte = [0u8; 1];
    f.seek(SeekFrom::Start(hint.offset - 1)).is_ok()
        && f.read_exact(&mut byte).is_ok()
        && byte[0] == b'\n'
}

/// librdkafka settings for reading an archive topic; the user's
/// `--kafka-property` values win over them.
const CONSUMER_SETTINGS: &[(&str, &str)] = &[
    ("queued.max.messages.kbytes", "4096"),
    ("fetch.message.max.bytes", "262144"),
    ("fetch.max.bytes", "1048576"),
    ("fetch.queue.backoff.ms", "1"),
    ("fetch.wait.max.ms", "50"),
];

/// What replaying a topic rests on; `--kafka-property` may not change it.
const FIXED_SETTINGS: &[(&str, &str, &str)] = &[
    (
        "isolation.level",
        "read_committed",
        "only what pg-source committed may be replayed",
    ),
    (
        "enable.auto.commit",
        "false",
        "the replay position lives in the target database",
    ),
    (
        "enable.partition.eof",
        "true",
        "pg-replay must know when it has read a partition to its end",
    ),
];

/// The partitions of `topics`, in topic then partition order.
///
/// Fails when the brokers cannot be reached within `timeout`, a topic does
/// not exist, or reading its metadata is not allowed.
pub fn topic_partitions(
    kafka: &KafkaSettings,
    topics: &[String],
    timeout: Duration,
) -> anyhow::Result<Vec<(String, i32)>> {
    let consumer: BaseConsumer = kafka
        .client_config(&[])
        .create()
        .context("cannot create a Kafka client; check the kafka properties")?;
    let mut out = Vec::new();
    for topic in topics {
        let meta = consumer
            .fetch_metadata(Some(topic), timeout)
            .with_context(|| {
                format!(
                    "cannot read the metadata of topic {topic} from {}: check --bootstrap-servers",
                    kafka.bootstrap_servers
                )
            })?;
        let Some(t) = meta.topics().iter().find(|t| t.name() == topic) else {
            bail!("topic {topic} is not known to the brokers");
        };
        if let Some(err) = t.error() {
            let code = rdkafka::error::RDKafkaErrorCode::from(err);
            match code {
                rdkafka::error::RDKafkaErrorCode::TopicAuthorizationFailed => bail!(
                    "not allowed to read topic {topic}: grant READ and DESCRIBE on it to this user"
                ),
                _ => bail!(
                    "topic {topic} does not exist ({code}): check --topic, or that pg-source has written to it"
                ),
            }
        }
        if t.partitions().is_empty() {
            bail!("topic {topic} has no partitions");
        }
        let mut parts: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
        parts.sort_unstable();
        out.extend(parts.into_iter().map(|p| (topic.clone(), p)));
    }
    Ok(out)
}

/// Reads the given partitions from their start positions and hands their
/// records to `tx`, on the calling (blocking) thread, until every partition
/// reached its end (not following) or `shutdown`.
///
/// Sends [`Item::Failed`] when the consumer cannot be created, reading is
/// not allowed, or a partition no longer holds its start offset.
pub fn read_partitions(
    kafka: KafkaSettings,
    group: String,
    partitions: Vec<(StreamId, String, i32, StreamPos)>,
    follow: bool,
    tx: mpsc::Sender<Item>,
    shutdown: CancellationToken,
) {
    let mut out = Batcher::new(tx);
    if let Err(e) = read_partitions_inner(&kafka, &group, &partitions, follow, &mut out, &shutdown)
    {
        out.send(Item::Failed(e));
    }
}

fn read_partitions_inner(
    kafka: &KafkaSettings,
    group: &str,
    partitions: &[(StreamId, String, i32, StreamPos)],
    follow: bool,
    out: &mut Batcher,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut settings = vec![("group.id", group), ("auto.offset.reset", "error")];
    settings.extend_from_slice(CONSUMER_SETTINGS);
    let consumer: BaseConsumer = kafka
        .client_config_fixed(&settings, FIXED_SETTINGS)?
        .create()
        .context("cannot create the Kafka consumer; check the kafka properties")?;
    let mut tpl = TopicPartitionList::new();
    for (_, topic, partition, start) in partitions {
        let offset = if start.offset == 0 {
            Offset::Beginning
        } else {
            Offset::Offset(start.offset as i64)
        };
        tpl.add_partition_offset(topic, *partition, offset)
            .context("cannot assign a partition")?;
    }
    consumer
        .assign(&tpl)
        .context("cannot assign the topic's partitions")?;
    let id_of = |topic: &str, partition: i32| {
        partitions
            .iter()
            .find(|(_, t, p, _)| t == topic && *p == partition)
            .map(|(id, ..)| *id)
    };
    let mut at_end = vec![false; partitions.len()];
    let mut logged_error = false;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        // Waiting only with nothing queued: what is queued goes first.
        let wait = if out.batch.is_empty() { 200 } else { 0 };
        let Some(result) = consumer.poll(Duration::from_millis(wait)) else {
            if !out.flush() {
                return Ok(());
            }
            continue;
        };
        match result {
            Ok(msg) => {
                logged_error = false;
                let Some(id) = id_of(msg.topic(), msg.partition()) else {
                    continue;
                };
                let index = partitions.iter().position(|(i, ..)| *i == id).unwrap_or(0);
                at_end[index] = false;
                let offset = msg.offset() as u64;
                let pos = StreamPos { offset, line: 0 };
                let next = StreamPos {
                    offset: offset + 1,
                    line: 0,
                };
                // A tombstone carries nothing to replay.
                let Some(value) = msg.payload() else {
                    continue;
                };
                let record = RawRecord {
                    stream: id,
                    bytes: value.to_vec(),
                    pos,
                    next,
                };
                if !out.push(record) {
                    return Ok(());
                }
            }
            Err(rdkafka::error::KafkaError::PartitionEOF(partition)) => {
                // librdkafka names the partition only; topics are told apart
                // by the position of the partition in the assignment.
                let pos = consumer.position().ok();
                for (index, (id, topic, p, _)) in partitions.iter().enumerate() {
                    if *p != partition || at_end[index] {
                        continue;
                    }
                    // The partition is at its end when its position is at
                    // the high watermark (read_committed: the stable end).
                    let reached = pos
                        .as_ref()
                        .and_then(|l| l.find_partition(topic, *p))
                        .map(|e| e.offset());
                    let (_, high) = consumer
                        .fetch_watermarks(topic, *p, Duration::from_secs(5))
                        .unwrap_or((0, i64::MAX));
                    let done = match reached {
                        Some(Offset::Offset(o)) => o >= high,
                        _ => high == 0,
                    };
                    if done {
                        at_end[index] = true;
                        let item = if follow {
                            Item::CaughtUp(*id)
                        } else {
                            Item::End(*id)
                        };
                        if !out.send(item) {
                            return Ok(());
                        }
                    }
                }
                if !follow && at_end.iter().all(|e| *e) {
                    out.flush();
                    return Ok(());
                }
            }
            Err(e) => {
                let code = e.rdkafka_error_code();
                match code {
                    Some(rdkafka::error::RDKafkaErrorCode::TopicAuthorizationFailed) => bail!(
                        "not allowed to read the archive topics: {e}; grant READ on them to this user"
                    ),
                    Some(rdkafka::error::RDKafkaErrorCode::AutoOffsetReset)
                    | Some(rdkafka::error::RDKafkaErrorCode::OffsetOutOfRange) => bail!(
                        "the topic no longer holds the offset pg-replay resumes from ({e}): records were deleted \
                         by retention; replay into a fresh target from an archive that holds them"
                    ),
                    _ => {
                        if !logged_error {
                            tracing::warn!(error = %e, "kafka consumer error; retrying");
                            logged_error = true;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    /// The field `a` of a row-state record.
    fn a_of(d: &Decoded) -> i64 {
        match &d.record {
            Ok(Record::RowState(r)) => r.row.get("a").and_then(|v| v.as_i64()).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    fn collect(path: &Path, start: StreamPos, max_line: usize) -> (Vec<Decoded>, Option<String>) {
        let (tx, mut rx) = mpsc::channel(100);
        let p = path.to_path_buf();
        std::thread::spawn(move || {
            read_file(0, p, start, false, max_line, tx, CancellationToken::new())
        })
        .join()
        .unwrap();
        let mut out = Vec::new();
        let mut err = None;
        while let Ok(item) = rx.try_recv() {
            match item {
                Item::Records(r) => out.extend(r),
                Item::Failed(e) => err = Some(format!("{e:#}")),
                _ => {}
            }
        }
        (out, err)
    }

    #[test]
    fn complete_lines_are_read_and_the_torn_tail_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(b"{\"a\":1}\n{\"a\":2}\r\n{\"a\":")
            .unwrap();
        let (lines, err) = collect(&path, StreamPos { offset: 0, line: 1 }, 1000);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(lines.len(), 2);
        assert_eq!(a_of(&lines[0]), 1);
        assert_eq!(a_of(&lines[1]), 2);
        assert_eq!(lines[1].pos, StreamPos { offset: 8, line: 2 });
        assert_eq!(
            lines[1].next,
            StreamPos {
                offset: 17,
                line: 3
            }
        );
        // Resuming at a hint reads on from there.
        let (rest, _) = collect(&path, lines[1].pos, 1000);
        assert_eq!(rest.len(), 1);
        assert!(file_hint_is_valid(&path, lines[1].pos));
        assert!(!file_hint_is_valid(&path, StreamPos { offset: 3, line: 2 }));
    }

    #[test]
    fn an_overlong_line_is_an_error_naming_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        std::fs::write(&path, b"{}\n0123456789012345678901234567890\n").unwrap();
        let (lines, err) = collect(&path, StreamPos { offset: 0, line: 1 }, 10);
        assert_eq!(lines.len(), 1);
        let err = err.expect("an error");
        assert!(err.contains("line 2 (byte offset 3)"), "{err}");
        assert!(err.contains("--max-line-bytes"), "{err}");
    }

    #[test]
    fn following_waits_for_the_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        std::fs::write(&path, b"{\"a\":1}\n{\"a\"").unwrap();
        let (tx, mut rx) = mpsc::channel(100);
        let shutdown = CancellationToken::new();
        let (p, s) = (path.clone(), shutdown.clone());
        let reader = std::thread::spawn(move || {
            read_file(0, p, StreamPos { offset: 0, line: 1 }, true, 1000, tx, s)
        });
        let mut records = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut appended = false;
        while records.len() < 2 && std::time::Instant::now() < deadline {
            match rx.blocking_recv() {
                Some(Item::Records(r)) => records.extend(r),
                Some(Item::CaughtUp(_)) if !appended => {
                    assert_eq!(records.len(), 1, "the torn line is not handed over");
                    let mut f = std::fs::OpenOptions::new()
                        .append(true)
                        .open(&path)
                        .unwrap();
                    f.write_all(b":2}\n").unwrap();
                    appended = true;
                }
                Some(Item::Failed(e)) => panic!("{e:#}"),
                _ => {}
            }
        }
        shutdown.cancel();
        drop(rx);
        reader.join().unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(a_of(&records[1]), 2);
    }
}
