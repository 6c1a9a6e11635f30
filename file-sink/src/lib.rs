//! file-sink: Kafka → file.
//!
//! Delivery contract:
//!
//! - Reads `read_committed`, so aborted transactions of pg-source never reach
//!   the file.
//! - Each record's value is written as one line of JSON (pretty-printed JSON
//!   is compacted; nothing else is changed), in offset order per partition.
//! - The sink owns its position (see [`output`]): lines are fsynced before the
//!   checkpoint that covers them is saved, and on start the file is cut back
//!   to the checkpoint and reading resumes there. The file therefore holds
//!   each record exactly once, across crashes. Kafka's committed group
//!   offsets are written after each checkpoint as a hint for lag monitoring
//!   only.
//! - Reading, appending and fsyncing run at once on three threads (see
//!   [`pipeline`]); one fsync and checkpoint covers every batch appended
//!   before it began, so the disk, not the hand-offs, sets the pace.
//! - A record that is not JSON, or is larger than the limit, goes to the
//!   dead-letter file `<file>.dead-letter` with the reason, and the sink goes
//!   on; a tombstone (null value) is skipped.
//! - A write error (full disk, permission) stops the sink with the error
//!   before anything is committed, so nothing is lost.
//! - One sink per output: a lock beside it ([`lock`]) refuses a second.
//! - A topic deleted and created again under the checkpoint (as by
//!   `docker compose down -v`) is told from the one archived by the last
//!   record's fingerprint ([`identity`]); the old output is kept aside,
//!   unchanged, under a `.before-reset-<time>` name, and a new one starts.
//! - A partition added to a topic after the output began is the output's
//!   to hold from offset 0 (the partitions a topic had when first taken
//!   are kept: the single file's checkpoint's `first_partitions`, the
//!   archive's `topic.json`); if Kafka deleted its first records before
//!   they were read, the sink stops naming them and the fix, instead of
//!   starting where the partition now begins.
//!
//! Two outputs:
//!
//! - **One growing file** (the default; the seed's FileStreamSink `topics` +
//!   `file`), [`output`]: one instance, partitions assigned by hand.
//! - **A segmented archive** (any of `file.rotate.bytes`,
//!   `file.rotate.interval.ms`, `file.compression`): `file` is a folder with,
//!   per partition, segments sealed by size or age (compressed with zstd or
//!   gzip, each a complete stream), a manifest line per sealed segment and a
//!   checkpoint. Several instances with one name share a topic's partitions
//!   as the consumer group `connect-<name>` ([`group`]), each partition
//!   written by the holder of its lock; storage and crash recovery are in
//!   [`segments`], retention in [`retention`].
//!
//! The archive's layout, the manifest's and checkpoint's fields and the
//! completeness mark are specified in `tidemark_common::archive`, which
//! also reads both outputs back (pg-replay uses it). In short, per
//! partition folder `<archive>/<topic>/<partition>/`:
//!
//! ```text
//! <topic>+<partition>+<first offset, 20 digits>.jsonl.zst  sealed segments (.gz, or .jsonl)
//! <topic>+<partition>+<first offset, 20 digits>.jsonl.open the segment being written
//! manifest.jsonl   {"kind":"sealed","segment","first_offset","last_offset","records",
//!                   "plain_bytes","compression","bytes","sha256","first","last",
//!                   "min_ts_us","max_ts_us","snapshot_first","snapshot_last",
//!                   "complete_before","sealed_at"} per sealed segment, once;
//!                  {"kind":"retired",...} when retention deleted one
//! checkpoint.json  next offset, open and closed segments, completeness mark
//! lock, dead-letter.jsonl
//! ```

pub mod check;
pub mod cli;
pub mod consumer;
pub mod group;
pub mod identity;
pub mod lock;
pub mod output;
pub mod pipeline;
pub mod retention;
pub mod segments;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use futures::FutureExt as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tidemark_common::archive::{Compression, Position};
use tidemark_common::config::{Conditional, ConnectorConfig, KeySet};
use tidemark_common::health::Health;
use tidemark_common::kafka::KafkaSettings;
use tidemark_common::offset::SinkCheckpoint;
use tidemark_common::ops::names;
use tidemark_common::ConfigError;
use tokio_util::sync::CancellationToken;

use crate::consumer::{FetchSizer, SinkContext, FETCH_MIN};
use crate::output::{Batch, Output};
use crate::pipeline::{Committed, Pipeline};
use crate::segments::SegmentConfig;

/// The connector keys file-sink reads.
pub const KEYS: KeySet = KeySet {
    supported: &[
        "topics",
        "file",
        "file.rotate.bytes",
        "file.rotate.interval.ms",
        "file.compression",
        "file.compression.level",
        "file.retention.window.ms",
    ],
    ignored: &[],
    conditional: &[
        Conditional {
            key: "key.converter",
            accept: accept_converter,
        },
        Conditional {
            key: "value.converter",
            accept: accept_converter,
        },
        Conditional {
            key: "key.converter.schemas.enable",
            accept: accept_any_bool,
        },
        Conditional {
            key: "value.converter.schemas.enable",
            accept: accept_any_bool,
        },
    ],
    unsupported: &[
        ("topics.regex", "list the topics in `topics`"),
        ("transforms", "single message transforms are not supported"),
        ("predicates", "single message transforms are not supported"),
        (
            "errors.tolerance",
            "bad records always go to the dead-letter file and the sink goes on",
        ),
        (
            "errors.deadletterqueue.topic.name",
            "bad records go to the dead-letter file <file>.dead-letter",
        ),
    ],
};

fn accept_converter(value: &str) -> Result<(), String> {
    match value {
        "org.apache.kafka.connect.json.JsonConverter"
        | "org.apache.kafka.connect.storage.StringConverter" => Ok(()),
        other => Err(format!(
            "file-sink writes each record's JSON as it is; use JsonConverter or StringConverter, or remove the key (got {other})"
        )),
    }
}

fn accept_any_bool(value: &str) -> Result<(), String> {
    match value {
        "true" | "false" => Ok(()),
        other => Err(format!("expected true or false, got {other}")),
    }
}

/// Everything file-sink needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Connector name; the consumer group is `connect-<name>`, as in Kafka
    /// Connect, so lag tools find it where they found the old sink.
    pub name: String,
    /// Topics to read.
    pub topics: Vec<String>,
    /// The output file, or with [`Config::segments`] the archive's folder.
    pub file: PathBuf,
    /// Set when rotation or compression is configured: a segmented archive
    /// in the folder `file` (see [`tidemark_common::archive`]) instead of
    /// one growing file.
    pub segments: Option<SegmentConfig>,
    /// The brokers.
    pub kafka: KafkaSettings,
    /// Records per batch handed to the writer at most; a batch also ends at
    /// [`BATCH_BYTES`] or when no record is waiting. One fsync covers every
    /// batch written by the time it starts.
    pub max_batch_records: usize,
    /// Larger records go to the dead-letter file.
    pub max_record_bytes: usize,
    /// How often to look for new partitions or topics that appeared.
    pub metadata_refresh: Duration,
    /// Set ready once reading; for `/healthz` and tests.
    pub health: Health,
    /// Partitions of a segmented archive this instance writes now; for
    /// the gauge and for tests.
    pub held: Arc<std::sync::atomic::AtomicUsize>,
    /// The per-partition fetch size the consumer uses now (see
    /// [`consumer::FetchSizer`], [`probe_fetch`]); for tests.
    pub fetch_bytes: Arc<std::sync::atomic::AtomicUsize>,
    /// Where to serve `/healthz` and `/metrics`; `None` serves nothing.
    pub http_addr: Option<std::net::SocketAddr>,
}

impl Config {
    /// Builds the config from a connector config. Returns warnings for
    /// ignored keys.
    ///
    /// Fails on the first key that is wrong, naming it.
    pub fn from_connector(
        c: &ConnectorConfig,
        kafka: KafkaSettings,
    ) -> Result<(Self, Vec<String>), ConfigError> {
        let warnings = c.check_keys(&KEYS)?;
        let topics_text = c.require("topics", "the topics to read, comma-separated")?;
        let topics: Vec<String> = topics_text
            .split(',')
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect();
        if let Some(bad) = topics.iter().find(|t| {
            !t.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-'))
        }) {
            return Err(ConfigError::invalid(
                "topics",
                topics_text,
                format!("`{bad}` is not a Kafka topic name (letters, digits, . _ -)"),
            ));
        }
        let file = c.require(
            "file",
            "the output file, like /tmp/data/streaming_output.txt",
        )?;
        let segments = segment_config(c, Path::new(file))?;
        Ok((
            Self {
                name: c.name.clone(),
                topics,
                file: PathBuf::from(file),
                segments,
                kafka,
                max_batch_records: 5_000,
                max_record_bytes: 16 * 1024 * 1024,
                metadata_refresh: Duration::from_secs(10),
                health: Health::new(),
                held: Arc::default(),
                fetch_bytes: Arc::default(),
                http_addr: None,
            },
            warnings,
        ))
    }
}

/// Default `file.rotate.bytes`: a segment of 128 MiB of lines compresses
/// to a few MiB, a size object stores and `zstdcat` handle well.
pub const DEFAULT_ROTATE_BYTES: u64 = 128 * 1024 * 1024;

/// The segmented archive's settings, when any of its keys is set.
///
/// Fails naming the key whose value is wrong.
fn segment_config(c: &ConnectorConfig, file: &Path) -> Result<Option<SegmentConfig>, ConfigError> {
    let keys = [
        "file.rotate.bytes",
        "file.rotate.interval.ms",
        "file.compression",
        "file.compression.level",
    ];
    if !keys.iter().any(|k| c.get(k).is_some()) {
        if c.get("file.retention.window.ms").is_some() {
            return Err(ConfigError::invalid(
                "file.retention.window.ms",
                c.get("file.retention.window.ms").unwrap_or_default(),
                "retention deletes sealed segments, and a single file has none: set file.rotate.bytes or file.rotate.interval.ms too",
            ));
        }
        return Ok(None);
    }
    let rotate_bytes = c.int(
        "file.rotate.bytes",
        DEFAULT_ROTATE_BYTES as i64,
        1..=i64::MAX,
    )? as u64;
    let rotate_interval = match c.get("file.rotate.interval.ms") {
        None => None,
        Some(_) => Some(c.millis("file.rotate.interval.ms", 0)?).filter(|d| !d.is_zero()),
    };
    let compression = match c.get("file.compression") {
        None => Compression::None,
        Some(text) => Compression::parse(text).ok_or_else(|| {
            ConfigError::invalid("file.compression", text, "expected none, zstd or gzip")
        })?,
    };
    let (lo, hi) = match compression {
        Compression::Zstd => (-7, 19),
        Compression::Gzip => (0, 9),
        Compression::None => (0, 0),
    };
    let level = c.int(
        "file.compression.level",
        SegmentConfig::default_level(compression).into(),
        lo..=hi,
    )? as i32;
    let retention_window = match c.get("file.retention.window.ms") {
        None => None,
        Some(text) => {
            let d = c.millis("file.retention.window.ms", 0)?;
            if d.is_zero() {
                return Err(ConfigError::invalid(
                    "file.retention.window.ms",
                    text,
                    "a window of 0 would delete what the latest restore needs; remove the key to keep everything",
                ));
            }
            Some(d)
        }
    };
    Ok(Some(SegmentConfig {
        root: file.to_path_buf(),
        rotate_bytes,
        rotate_interval,
        compression,
        level,
        retention_window,
    }))
}

/// Totals since start, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Lines written.
    pub written: u64,
    /// Records sent to the dead-letter file.
    pub dead: u64,
    /// Tombstones skipped.
    pub skipped: u64,
}

/// Bytes of lines after which a batch goes to the writer even when more
/// records wait: large enough that a write moves a good stretch (over 100
/// records of a few KB), small enough that the batches in flight hold little
/// memory.
pub const BATCH_BYTES: usize = 256 * 1024;

/// librdkafka settings of the consumer; the user's `--kafka-property` values
/// win over them.
///
/// The read-ahead is most of the sink's memory. librdkafka fetches until
/// `queued.max.messages.kbytes` of records wait, and each fetch brings up to
/// `fetch.message.max.bytes` of compressed batches per partition, which
/// expand: Debezium records with a per-record schema compress about 40:1, so
/// 64 KiB fetched is about 2.6 MB in memory. Measured on 1M such records,
/// 64 KiB fetches and a 1 MiB queue peak at about 20 MB RSS and keep up with
/// the disk; 256 KiB fetches, 30 MB. A record larger than the fetch limits
/// still arrives (the broker always returns the first batch) and goes to the
/// dead-letter file if it is over `max_record_bytes`. librdkafka's default
/// `fetch.queue.backoff.ms` (1 s) idled the sink 88% of the time: a small
/// queue is drained within a millisecond, so it is checked every
/// millisecond. A single file's consumer starts at 64 KiB fetches and sizes
/// them to what the records expand to ([`consumer::FetchSizer`]): up to
/// 1 MiB for records written without compression, where 64 KiB fetches
/// held the sink to a third of what it writes. A segmented archive's
/// consumer (a group member: changing it means leaving the group) takes
/// the size [`probe_fetch`] finds at its start, and keeps it. A user's
/// `--kafka-property fetch.message.max.bytes` wins and is kept.
/// `fetch.max.bytes` bounds one response over all partitions; librdkafka
/// allows no less than `message.max.bytes` (1 MB).
pub(crate) const CONSUMER_SETTINGS: &[(&str, &str)] = &[
    ("queued.max.messages.kbytes", "1024"),
    ("fetch.message.max.bytes", "65536"),
    ("fetch.max.bytes", "1048576"),
    ("fetch.queue.backoff.ms", "1"),
    ("fetch.wait.max.ms", "10"),
    // The lag gauge reads the fetcher's position from the statistics.
    ("statistics.interval.ms", "1000"),
];

/// What exactly-once into the file rests on; `--kafka-property` may not
/// change them. A partition without a checkpoint is assigned at its
/// beginning explicitly, so `auto.offset.reset` only ever acts on a
/// checkpoint's offset that the topic no longer has, and that must stop the
/// sink rather than silently re-read or skip.
pub(crate) const FIXED_SETTINGS: &[(&str, &str, &str)] = &[
    (
        "isolation.level",
        "read_committed",
        "only committed records may reach the file",
    ),
    (
        "enable.auto.commit",
        "false",
        "the checkpoint beside the file is the position",
    ),
    (
        "enable.auto.offset.store",
        "false",
        "the checkpoint beside the file is the position",
    ),
    (
        "auto.offset.reset",
        "error",
        "a checkpoint's offset the topic no longer has must stop the sink",
    ),
];

/// Runs until `shutdown` is cancelled.
///
/// Fails when the output cannot be opened or written (a missing folder, a
/// full disk, no permission) or Kafka refuses the consumer (no READ on a
/// topic); nothing that was not durably written is ever committed.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<Totals> {
    if let Some(seg) = cfg.segments.clone() {
        return group::run(cfg, seg, shutdown).await;
    }
    if let Some(addr) = cfg.http_addr {
        tidemark_common::ops::serve(
            addr,
            tidemark_common::ops::names::SINK,
            cfg.health.clone(),
            shutdown.clone(),
        )
        .await?;
    }
    let path = cfg.file.clone();
    let owner = cfg.name.clone();
    let mut out = tokio::task::spawn_blocking(move || Output::open(&path, &owner)).await??;
    // The user's own fetch size wins, and is kept.
    let mut sizer = (!cfg
        .kafka
        .properties
        .iter()
        .any(|(k, _)| k == "fetch.message.max.bytes"))
    .then(FetchSizer::default);
    let mut consumer = single_consumer(&cfg, FETCH_MIN)?;
    cfg.fetch_bytes
        .store(FETCH_MIN, std::sync::atomic::Ordering::Relaxed);

    let mut assigned = BTreeSet::new();
    // Per topic, the partitions it had when the file took it: the
    // checkpoint's, and those noted since (kept here at once, as the
    // checkpoint that keeps them is saved on the syncer's thread).
    let mut firsts = out.checkpoint.first_partitions.clone();
    // Notes the checkpoint has yet to keep.
    let mut noted = Vec::new();
    let mut waiting_logged = false;
    while assigned.is_empty() {
        cfg.health.progress();
        match assign_new(
            &consumer,
            &cfg.kafka,
            &cfg.topics,
            &cfg.file,
            &out.checkpoint,
            &mut firsts,
            &mut assigned,
        ) {
            Ok(n) if !assigned.is_empty() => {
                noted.extend(n);
                break;
            }
            Err(e) if e.downcast_ref::<AddedPartitionCut>().is_some() => return Err(e),
            Err(e) if e.downcast_ref::<Recreated>().is_some() => {
                let why = e.to_string();
                let (path, owner) = (cfg.file.clone(), cfg.name.clone());
                out = tokio::task::spawn_blocking(move || -> anyhow::Result<Output> {
                    let aside = out.set_aside()?;
                    tracing::warn!(
                        why,
                        file = %path.display(),
                        aside = %aside.display(),
                        "the topic is not the one the file holds (deleted and created again, as by `docker compose down -v`): the file, its checkpoint and dead letters are kept unchanged under the new name, and a new file starts from the topic's beginning"
                    );
                    Output::open(&path, &owner)
                })
                .await??;
                // A new file: its topics are noted anew.
                firsts = out.checkpoint.first_partitions.clone();
                noted.clear();
                continue;
            }
            Ok(n) => {
                noted.extend(n);
                if !waiting_logged {
                    tracing::info!(topics = ?cfg.topics, "waiting for the topics to exist");
                    waiting_logged = true;
                }
            }
            // Waiting cannot cure a refused authorisation.
            Err(e) if format!("{e:#}").contains("not allowed") => return Err(e),
            Err(e) => {
                if !waiting_logged {
                    tracing::warn!(error = %format!("{e:#}"), "kafka unreachable; retrying");
                    waiting_logged = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(Totals::default()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    // Issue 16.5: one line that says what this run is and will do.
    let resumed = out
        .checkpoint
        .offsets
        .values()
        .map(BTreeMap::len)
        .sum::<usize>();
    tracing::info!(
        connector = %cfg.name,
        mode = "file",
        topics = %cfg.topics.join(", "),
        file = %cfg.file.display(),
        partitions = assigned.len(),
        position = %if resumed == 0 {
            "none".to_owned()
        } else {
            format!("checkpoint of {resumed} partition(s), file at {} bytes", out.checkpoint.file_len)
        },
        plan = if resumed == 0 {
            "read every partition from its beginning"
        } else {
            "resume each partition after its checkpoint"
        },
        kafka = %cfg.kafka.bootstrap_servers,
        "file-sink started"
    );
    cfg.health.set_ready(true);

    let mut pipeline = Pipeline::start(out)?;
    // The counts noted are kept before any record is read, so a restart
    // finds them even if no record ever comes.
    if !noted.is_empty() {
        let batch = Batch {
            noted: std::mem::take(&mut noted),
            ..Default::default()
        };
        if !pipeline.send(batch).await {
            return pipeline.finish().await.map(|c| c.totals);
        }
    }
    let mut reported = Totals::default();
    let mut hinted = std::time::Instant::now()
        .checked_sub(HINT_INTERVAL)
        .unwrap_or_else(std::time::Instant::now);
    let mut refresh = tokio::time::interval(cfg.metadata_refresh);
    refresh.tick().await;
    let mut lag_tick = tokio::time::interval(LAG_INTERVAL);
    let mut size_tick = tokio::time::interval(SIZE_INTERVAL);
    let mut kafka_error_logged = false;
    let mut fatal: Option<anyhow::Error> = None;
    let mut sent = 0u64;
    // Per partition, the offset after the last record handed over.
    let mut delivered: HashMap<(String, i32), i64> = HashMap::new();
    let mut resize: Option<usize> = None;
    loop {
        if let Some(fetch) = resize.take() {
            let checkpoint = pipeline.committed().borrow().checkpoint.clone();
            match resized(&cfg, fetch, &assigned, &delivered, &checkpoint, &firsts) {
                Ok(new) => {
                    tracing::info!(
                        fetch_bytes = fetch,
                        "reading with another fetch size, sized to what the records expand to"
                    );
                    cfg.fetch_bytes
                        .store(fetch, std::sync::atomic::Ordering::Relaxed);
                    let old = std::mem::replace(&mut consumer, new);
                    tokio::spawn(close(Arc::new(old), None));
                    if let Some(z) = sizer.as_mut() {
                        z.restart();
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot resize the fetch; reading on as before");
                    sizer = None;
                }
            }
        }
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = lag_tick.tick() => {
                report_lag(&consumer, &pipeline.committed().borrow().checkpoint, &delivered, &assigned);
                continue;
            }
            _ = size_tick.tick(), if sizer.is_some() => {
                if let Some(z) = sizer.as_mut() {
                    let (at, rx, rxmsg) = consumer.context().traffic();
                    resize = z.observe(at, rx, rxmsg);
                }
                continue;
            }
            _ = refresh.tick() => {
                cfg.health.progress();
                let checkpoint = pipeline.committed().borrow().checkpoint.clone();
                match assign_new(&consumer, &cfg.kafka, &cfg.topics, &cfg.file, &checkpoint, &mut firsts, &mut assigned) {
                    Err(e) if e.downcast_ref::<Recreated>().is_some() => {
                        fatal = Some(anyhow::anyhow!("{e}; restart file-sink to keep the file aside and start a new one"));
                        break;
                    }
                    Err(e) if e.downcast_ref::<AddedPartitionCut>().is_some() => {
                        fatal = Some(e);
                        break;
                    }
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot refresh topic metadata"),
                    Ok(n) if n.is_empty() => {}
                    // Ahead of the topic's first records, in the order the
                    // writer takes batches.
                    Ok(n) => {
                        let batch = Batch { noted: n, ..Default::default() };
                        if !pipeline.send(batch).await {
                            break;
                        }
                    }
                }
                continue;
            }
            changed = pipeline.committed().changed() => {
                // An error means the syncer stopped on a failure, which
                // `finish` returns below.
                if changed.is_err() {
                    break;
                }
                let committed = pipeline.committed().borrow_and_update().clone();
                report_committed(&cfg, &consumer, &committed, &mut reported, &mut hinted);
                continue;
            }
            m = consumer.recv() => m,
        };
        let mut batch = Batch {
            lines: Vec::with_capacity(BATCH_BYTES + BATCH_BYTES / 4),
            ..Default::default()
        };
        // The last record of each partition, for its fingerprint.
        let mut last: Vec<BorrowedMessage<'_>> = Vec::new();
        match first {
            Ok(msg) => {
                if kafka_error_logged {
                    tracing::info!("kafka reachable again");
                    kafka_error_logged = false;
                }
                add(&mut batch, &msg, cfg.max_record_bytes);
                keep_last(&mut last, msg);
            }
            // A refused fetch stays refused until someone grants READ:
            // retrying would only hide it.
            Err(e)
                if e.rdkafka_error_code()
                    == Some(rdkafka::error::RDKafkaErrorCode::TopicAuthorizationFailed) =>
            {
                metrics::counter!(names::SINK_ERRORS, "kind" => "kafka").increment(1);
                fatal = Some(anyhow::anyhow!(
                    "not allowed to read topic {}: {e}; grant READ on it and on group connect-{} to this user",
                    cfg.topics.join(", "),
                    cfg.name
                ));
                break;
            }
            Err(e)
                if e.rdkafka_error_code()
                    == Some(rdkafka::error::RDKafkaErrorCode::AutoOffsetReset) =>
            {
                metrics::counter!(names::SINK_ERRORS, "kind" => "kafka").increment(1);
                let checkpoint = pipeline.committed().borrow().checkpoint.clone();
                fatal = Some(anyhow::anyhow!(
                    "the checkpoint's position is not in the topic any more: {e}; checkpoint offsets {}. \
                     Records were deleted (retention, a lost broker) or the topic was recreated. \
                     To start the file over, move it and {} away",
                    serde_json::to_string(&checkpoint.offsets).unwrap_or_default(),
                    SinkCheckpoint::path_for(&cfg.file).display()
                ));
                break;
            }
            Err(e) => {
                metrics::counter!(names::SINK_ERRORS, "kind" => "kafka").increment(1);
                if !kafka_error_logged {
                    tracing::warn!(error = %e, "kafka consumer error; retrying");
                    kafka_error_logged = true;
                }
                continue;
            }
        }
        // Take whatever is already waiting, up to a bounded batch; the
        // syncer covers as many batches as were written by the time it
        // starts each fsync.
        while batch.records() < cfg.max_batch_records as u64
            && batch.lines.len() + batch.dead.len() < BATCH_BYTES
        {
            match consumer.recv().now_or_never() {
                Some(Ok(msg)) => {
                    add(&mut batch, &msg, cfg.max_record_bytes);
                    keep_last(&mut last, msg);
                }
                // The next recv() sees the error again and handles it.
                _ => break,
            }
        }
        for msg in last.drain(..) {
            let (topic, p) = (msg.topic().to_owned(), msg.partition());
            let fp = identity::fingerprint(
                msg.offset(),
                msg.timestamp().to_millis(),
                msg.key(),
                msg.payload(),
            );
            batch.fingerprints.push((topic, p, fp));
        }
        drop(last);
        sent += batch.records();
        for (topic, p, next) in &batch.reached {
            delivered.insert((topic.clone(), *p), *next);
        }
        if !pipeline.send(batch).await {
            break;
        }
    }
    let result = pipeline.finish().await;
    if result.is_err() {
        metrics::counter!(names::SINK_ERRORS, "kind" => "file").increment(1);
    }
    let committed = result.with_context(|| {
        format!(
            "stopped without committing: the last {} records will be read again after a restart",
            sent - reported.written - reported.dead - reported.skipped
        )
    })?;
    report_committed(&cfg, &consumer, &committed, &mut reported, &mut hinted);
    close(
        Arc::new(consumer),
        checkpoint_offsets(&committed.checkpoint),
    )
    .await;
    if let Some(e) = fatal {
        return Err(e);
    }
    tracing::info!(
        lines = committed.totals.written,
        dead = committed.totals.dead,
        "file-sink stopped"
    );
    Ok(committed.totals)
}

/// How long [`probe_fetch`] may read.
const PROBE_TIME: Duration = Duration::from_millis(600);

/// The fetch size for a consumer that cannot change it later (a member of
/// a consumer group: a new consumer would leave the group and move every
/// partition). Reads `topics` for a moment from where reading will start
/// (`start`: a partition's offset, `None` for its beginning), outside the
/// group and writing nothing, and sizes the fetch by what the brokers send,
/// as [`FetchSizer`] does. [`FETCH_MIN`] when there is too little to read
/// to judge by (a topic read to its end), on any error, or when the user
/// set `fetch.message.max.bytes`.
pub(crate) fn probe_fetch(
    kafka: &KafkaSettings,
    group: &str,
    topics: &[String],
    start: impl Fn(&str, i32) -> Option<i64>,
) -> usize {
    if kafka
        .properties
        .iter()
        .any(|(k, _)| k == "fetch.message.max.bytes")
    {
        return FETCH_MIN;
    }
    let fetch = FETCH_MIN.to_string();
    let mut settings = vec![("group.id", group)];
    settings.extend_from_slice(CONSUMER_SETTINGS);
    settings.push(("fetch.message.max.bytes", &fetch));
    settings.push(("statistics.interval.ms", "100"));
    let consumer: rdkafka::consumer::BaseConsumer<SinkContext> = match kafka
        .client_config_fixed(&settings, FIXED_SETTINGS)
        .and_then(|c| {
            c.create_with_context(SinkContext::default())
                .map_err(anyhow::Error::from)
        }) {
        Ok(c) => c,
        Err(_) => return FETCH_MIN,
    };
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) else {
            return FETCH_MIN;
        };
        for t in md.topics().iter().filter(|t| t.error().is_none()) {
            for p in t.partitions() {
                let offset = start(topic, p.id()).map_or(Offset::Beginning, Offset::Offset);
                if tpl.add_partition_offset(topic, p.id(), offset).is_err() {
                    return FETCH_MIN;
                }
            }
        }
    }
    if tpl.count() == 0 || consumer.assign(&tpl).is_err() {
        return FETCH_MIN;
    }
    let mut sizer = FetchSizer::default();
    let deadline = std::time::Instant::now() + PROBE_TIME;
    while std::time::Instant::now() < deadline {
        // Serves the fetches and the statistics; the records are dropped.
        let _ = consumer.poll(Duration::from_millis(10));
        let (at, rx, rxmsg) = consumer.context().traffic();
        if let Some(size) = sizer.observe(at, rx, rxmsg) {
            return size;
        }
        if sizer.judged() {
            break;
        }
    }
    FETCH_MIN
}

/// The consumer of a single file, fetching `fetch` bytes per partition.
fn single_consumer(cfg: &Config, fetch: usize) -> anyhow::Result<StreamConsumer<SinkContext>> {
    let group = format!("connect-{}", cfg.name);
    let fetch = fetch.to_string();
    let mut settings = vec![("group.id", group.as_str())];
    settings.extend_from_slice(CONSUMER_SETTINGS);
    settings.push(("fetch.message.max.bytes", &fetch));
    // The fetch sizer judges by the statistics: a backlog read at the
    // wrong size for a second would be a second lost.
    settings.push(("statistics.interval.ms", SIZE_INTERVAL_MS));
    cfg.kafka
        .client_config_fixed(&settings, FIXED_SETTINGS)?
        .create_with_context(SinkContext::default())
        .context("cannot create the Kafka consumer; check the kafka properties")
}

/// A consumer fetching `fetch` bytes per partition, reading the `assigned`
/// partitions on from the record after the last one handed over (else the
/// checkpoint's offset, else the beginning): what the former one had
/// fetched beyond is fetched again, nothing is skipped.
fn resized(
    cfg: &Config,
    fetch: usize,
    assigned: &BTreeSet<(String, i32)>,
    delivered: &HashMap<(String, i32), i64>,
    checkpoint: &SinkCheckpoint,
    firsts: &BTreeMap<String, i32>,
) -> anyhow::Result<StreamConsumer<SinkContext>> {
    let consumer = single_consumer(cfg, fetch)?;
    let mut tpl = TopicPartitionList::new();
    for (topic, p) in assigned {
        let offset = match delivered
            .get(&(topic.clone(), *p))
            .copied()
            .or_else(|| checkpoint.next_offset(topic, *p))
        {
            Some(next) => Offset::Offset(next),
            // A partition added after the file began, from offset 0 as
            // when it was first assigned (see `assign_new`).
            None if firsts.get(topic).is_some_and(|f| *p >= *f) => Offset::Offset(0),
            None => Offset::Beginning,
        };
        tpl.add_partition_offset(topic, *p, offset)?;
    }
    consumer.assign(&tpl).context("cannot assign partitions")?;
    Ok(consumer)
}

/// How long closing the consumer may take. With the broker down, librdkafka
/// holds the last offset commit and the close for `session.timeout.ms`
/// (45 s), longer than an orchestrator's grace period.
const CLOSE_PATIENCE: Duration = Duration::from_secs(5);

/// Leaves the offset hint for lag tools (everything read is already
/// durable in the file) and closes the consumer, waiting at most
/// [`CLOSE_PATIENCE`]: the position is the checkpoint beside the file, so
/// nothing depends on either.
pub(crate) async fn close(
    consumer: Arc<StreamConsumer<SinkContext>>,
    hint: Option<TopicPartitionList>,
) {
    let (done, closed) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("file-sink-close".into())
        .spawn(move || {
            if let Some(tpl) = hint {
                if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                    tracing::debug!(error = %e, "cannot commit the offset hint on exit");
                }
            }
            drop(consumer);
            let _ = done.send(());
        });
    if spawned.is_err() {
        return;
    }
    let waited = tokio::task::spawn_blocking(move || closed.recv_timeout(CLOSE_PATIENCE)).await;
    if !matches!(waited, Ok(Ok(()))) {
        tracing::warn!(
            patience = ?CLOSE_PATIENCE,
            "Kafka did not answer while closing; lag tools may show an older offset until the next start (the checkpoint beside the file holds the position)"
        );
    }
}

/// Counts what the syncer made durable since the last report, and leaves the
/// offset hint for lag tools.
fn report_committed(
    cfg: &Config,
    consumer: &StreamConsumer<SinkContext>,
    committed: &Committed,
    reported: &mut Totals,
    hinted: &mut std::time::Instant,
) {
    let now = committed.totals;
    let dead = now.dead - reported.dead;
    metrics::counter!(names::SINK_LINES_WRITTEN).increment(now.written - reported.written);
    metrics::counter!(names::SINK_DEAD_LETTERS).increment(dead);
    metrics::counter!(names::SINK_TOMBSTONES_SKIPPED).increment(now.skipped - reported.skipped);
    if now == *reported {
        return;
    }
    cfg.health.progress();
    tracing::debug!(
        lines = now.written - reported.written,
        dead,
        "batches written"
    );
    if dead > 0 {
        tracing::warn!(records = dead, file = %output::dead_letter_path(&cfg.file).display(), "records sent to the dead-letter file");
    }
    *reported = now;
    // A hint for lag tools: once a second is enough, where every fsync
    // could be hundreds of commits a second (queued while the coordinator
    // is away). The exit leaves the last one.
    if hinted.elapsed() >= HINT_INTERVAL {
        *hinted = std::time::Instant::now();
        if let Some(tpl) = checkpoint_offsets(&committed.checkpoint) {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!(error = %e, "cannot commit the offset hint");
            }
        }
    }
}

/// How often file-sink leaves its offset hint in Kafka.
const HINT_INTERVAL: Duration = Duration::from_secs(1);

/// The checkpoint's offsets as a partition list; `None` when it has none.
fn checkpoint_offsets(checkpoint: &SinkCheckpoint) -> Option<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for (topic, parts) in &checkpoint.offsets {
        for (p, next) in parts {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*next))
                .ok()?;
        }
    }
    (tpl.count() > 0).then_some(tpl)
}

/// What one record becomes; `P` is what is read of its place in the
/// source (a [`Position`] for the segmented archive, nothing for the single
/// file).
pub enum Prepared<'a, P = Position> {
    /// A tombstone (null value): skipped.
    Tombstone,
    /// A line (without its line break) and where its event stands.
    Line(std::borrow::Cow<'a, [u8]>, P),
    /// A record that cannot be a line, and why.
    Dead(String),
    /// A heartbeat of pg-source (no line): the mark it carries.
    Heartbeat(tidemark_common::archive::Mark),
}

/// Checks a record's value and reads its position in one pass: a line, a
/// tombstone, or a dead letter with the reason (not UTF-8, not JSON, larger
/// than `max_bytes`).
pub fn prepare(value: Option<&[u8]>, offset: i64, max_bytes: usize) -> Prepared<'_> {
    prepare_with(value, max_bytes, |v| Position::parse_line(v, offset))
}

/// Checks a record's value as [`prepare`] does, reading nothing of its
/// position: the single file needs none, and a plain validity check costs
/// less than half of reading one (it runs on every byte of every record,
/// on the thread that reads from Kafka).
pub fn check(value: Option<&[u8]>, max_bytes: usize) -> Prepared<'_, ()> {
    prepare_with(value, max_bytes, |v| {
        serde_json::from_slice::<serde::de::IgnoredAny>(v).map(|_| ())
    })
}

/// [`prepare`] and [`check`]: `read` checks that the value is JSON and
/// reads what the caller needs of it.
fn prepare_with<P>(
    value: Option<&[u8]>,
    max_bytes: usize,
    read: impl FnOnce(&[u8]) -> Result<P, serde_json::Error>,
) -> Prepared<'_, P> {
    let Some(value) = value else {
        return Prepared::Tombstone;
    };
    if value.len() > max_bytes {
        return Prepared::Dead(format!(
            "record of {} bytes is larger than the limit of {max_bytes}",
            value.len()
        ));
    }
    if let Some(mark) = tidemark_common::archive::heartbeat_mark(value) {
        return Prepared::Heartbeat(mark);
    }
    if let Err(e) = std::str::from_utf8(value) {
        return Prepared::Dead(format!("not JSON: the bytes are not UTF-8 text ({e})"));
    }
    let pos = match read(value) {
        Ok(p) => p,
        Err(e) => return Prepared::Dead(format!("not JSON: {e}")),
    };
    if has_line_break(value) {
        // Pretty-printed JSON: one line per record, so compact it. Read as
        // a value it is checked once more: a lone surrogate (`"\ud800"`)
        // passes the check above (which skips strings' contents) but is no
        // text, and must not stop the sink.
        let v: serde_json::Value = match serde_json::from_slice(value) {
            Ok(v) => v,
            Err(e) => return Prepared::Dead(format!("not JSON: {e}")),
        };
        let compact = serde_json::to_vec(&v).expect("a value always serialises");
        return Prepared::Line(std::borrow::Cow::Owned(compact), pos);
    }
    Prepared::Line(std::borrow::Cow::Borrowed(value), pos)
}

/// The dead-letter line for a record: where it came from, why, and its
/// key and value in base64.
pub fn dead_letter(msg: &BorrowedMessage<'_>, reason: &str, out: &mut Vec<u8>) {
    let b64 = base64::engine::general_purpose::STANDARD;
    let entry = serde_json::json!({
        "topic": msg.topic(),
        "partition": msg.partition(),
        "offset": msg.offset(),
        "reason": reason,
        "key_base64": msg.key().map(|k| b64.encode(k)),
        "value_base64": msg.payload().map(|v| b64.encode(v)),
    });
    serde_json::to_writer(&mut *out, &entry).expect("a value always serialises");
    out.push(b'\n');
}

/// Adds one record to the batch: a line, a dead letter or a skipped
/// tombstone.
fn add(batch: &mut Batch, msg: &BorrowedMessage<'_>, max_bytes: usize) {
    batch.reach(msg.topic(), msg.partition(), msg.offset() + 1);
    match check(msg.payload(), max_bytes) {
        Prepared::Tombstone | Prepared::Heartbeat(_) => batch.skipped += 1,
        Prepared::Line(line, _) => {
            batch.lines.extend_from_slice(&line);
            batch.lines.push(b'\n');
            batch.written += 1;
        }
        Prepared::Dead(reason) => {
            dead_letter(msg, &reason, &mut batch.dead);
            batch.dead_count += 1;
        }
    }
}

/// Keeps `msg` as the last record read of its partition, in place of the
/// one before. A batch reads few partitions, so a scan by partition number
/// first costs less per record than hashing the topic's name.
fn keep_last<'a>(last: &mut Vec<BorrowedMessage<'a>>, msg: BorrowedMessage<'a>) {
    let p = msg.partition();
    match last
        .iter_mut()
        .find(|m| m.partition() == p && m.topic() == msg.topic())
    {
        Some(slot) => *slot = msg,
        None => last.push(msg),
    }
}

/// Whether `value` holds a line break. Fixed-size blocks with a byte
/// accumulator let the compiler compare 32 bytes per instruction; this runs
/// on every byte of every record, and `contains` twice costs two slower
/// passes.
fn has_line_break(value: &[u8]) -> bool {
    let mut blocks = value.chunks_exact(32);
    for block in &mut blocks {
        let mut found = 0u8;
        for &b in block {
            found |= u8::from(b == b'\n') | u8::from(b == b'\r');
        }
        if found != 0 {
            return true;
        }
    }
    blocks.remainder().iter().any(|&b| b == b'\n' || b == b'\r')
}

/// How often the lag gauge is set: librdkafka's statistics come once a
/// second (a single file's, every [`SIZE_INTERVAL`]).
const LAG_INTERVAL: Duration = Duration::from_secs(1);

/// How often a single file's consumer emits statistics and its fetch size
/// is judged.
const SIZE_INTERVAL: Duration = Duration::from_millis(250);
const SIZE_INTERVAL_MS: &str = "250";

/// Sets the lag gauge: records in Kafka not yet in the file, from
/// librdkafka's latest statistics (see [`consumer::PartitionStats::lag`]);
/// left as it was while a partition's end is not known yet.
fn report_lag(
    consumer: &StreamConsumer<SinkContext>,
    checkpoint: &SinkCheckpoint,
    delivered: &HashMap<(String, i32), i64>,
    assigned: &BTreeSet<(String, i32)>,
) {
    let mut lag = 0i64;
    for (topic, p) in assigned {
        let next = checkpoint.next_offset(topic, *p).unwrap_or(0);
        let delivered = delivered.get(&(topic.clone(), *p)).copied().unwrap_or(next);
        match consumer
            .context()
            .partition(topic, *p)
            .and_then(|(_, s)| s.lag(next, delivered))
        {
            Some(l) => lag += l,
            None => return,
        }
    }
    metrics::gauge!(names::SINK_LAG_RECORDS).set(lag as f64);
}

/// A partition's topic is not the one the file holds (see [`identity`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Recreated(String);

/// A partition added to its topic after the file began lost records the
/// file must hold (see [`added_partition_cut`]): waiting cannot bring them
/// back, so the sink stops.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct AddedPartitionCut(String);

/// Why a partition the single file holds nothing of cannot start at `low`,
/// and the fix: it was added to the topic after the file first took the
/// topic's `first` partitions, so its records from offset 0 are the file's
/// to hold, and Kafka deleted those before `low`. `None` when it may start
/// there: a partition the topic had when the file took it (a file begun
/// on an old topic starts at what Kafka still holds), or nothing deleted.
/// `file` is the output file, whose checkpoint the fix names.
pub(crate) fn added_partition_cut(
    file: &Path,
    topic: &str,
    partition: i32,
    first: Option<i32>,
    low: i64,
) -> Option<(String, String)> {
    let first = first?;
    (low > 0 && partition >= first).then(|| {
        (
            format!(
                "{topic} partition {partition} was added to the topic after the file began (it had {first} partition(s) then), so the file must hold it from offset 0, but the topic now starts at offset {low}: records 0 to {} were deleted before they were written (retention, or a lost broker), and the file cannot be complete",
                low - 1
            ),
            format!(
                "to write what is left and accept the loss, stop file-sink and remove \"{topic}\" from \"first_partitions\" in {} (the next start notes the topic's partitions anew, as for a file begun on this topic now), or move the file and that checkpoint away to start a new file from what Kafka still holds; and raise the topic's retention.ms so that a partition added later is read before Kafka deletes its records",
                SinkCheckpoint::path_for(file).display()
            ),
        )
    })
}

/// Assigns partitions of `topics` not yet assigned, each at the checkpoint's
/// offset or the beginning. `firsts` holds, per topic, the partitions it
/// had when the file first took it; a topic not in it is noted now with
/// the partitions it has, and the notes made are returned, for the
/// checkpoint to keep.
///
/// Fails when Kafka cannot be asked, when a partition's topic is not the
/// one the file holds ([`Recreated`]), or when a partition added to the
/// topic after the file began lost records before the file read them
/// ([`AddedPartitionCut`]); nothing is assigned or noted then.
fn assign_new(
    consumer: &StreamConsumer<SinkContext>,
    kafka: &KafkaSettings,
    topics: &[String],
    file: &Path,
    checkpoint: &SinkCheckpoint,
    firsts: &mut BTreeMap<String, i32>,
    assigned: &mut BTreeSet<(String, i32)>,
) -> anyhow::Result<Vec<(String, i32)>> {
    let mut fresh = TopicPartitionList::new();
    let mut keys = Vec::new();
    let mut noted = Vec::new();
    for topic in topics {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(2))
            .with_context(|| {
                format!("cannot read the metadata of topic {topic}; is Kafka reachable?")
            })?;
        for t in md.topics() {
            if let Some(err) = t.error() {
                let code = err;
                if code
                    == rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED
                {
                    bail!("not allowed to read topic {topic}: grant READ on it and on group connect-<name>");
                }
                continue;
            }
            if t.partitions().is_empty() {
                continue;
            }
            let first = match firsts.get(topic) {
                Some(n) => *n,
                None => {
                    let n = t.partitions().len() as i32;
                    if checkpoint.offsets.contains_key(topic) {
                        tracing::info!(
                            topic = %topic,
                            partitions = n,
                            "the checkpoint was written before file-sink kept the partitions a topic had when the file took it: the partitions the topic has now stand for them, and a partition added from now on must be read from offset 0"
                        );
                    } else {
                        tracing::info!(
                            topic = %topic,
                            partitions = n,
                            "noting the partitions the topic has as the file takes it: a partition added later must be read from offset 0"
                        );
                    }
                    noted.push((topic.clone(), n));
                    n
                }
            };
            for p in t.partitions() {
                let key = (topic.clone(), p.id());
                if assigned.contains(&key) {
                    continue;
                }
                let offset = match checkpoint.next_offset(topic, p.id()) {
                    Some(next) => Offset::Offset(next),
                    None => Offset::Beginning,
                };
                if let Some(fp) = checkpoint.fingerprint(topic, p.id()) {
                    if let identity::Verdict::Recreated(why) =
                        identity::check(kafka, topic, p.id(), fp)?
                    {
                        return Err(Recreated(why).into());
                    }
                }
                // A partition added after the file began is the file's to
                // hold from offset 0: if Kafka no longer has its first
                // records, reading it from where it now starts would lose
                // them without a word.
                let mut offset = offset;
                if offset == Offset::Beginning && p.id() >= first {
                    // Briefly, and this partition only: the others are read
                    // meanwhile, and it is asked again at the next refresh.
                    let low = match consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(5))
                    {
                        Ok((low, _)) => low,
                        Err(e) => {
                            tracing::warn!(topic = %topic, partition = p.id(), error = %e, "cannot read the offsets of a partition added to the topic; asking again at the next metadata refresh");
                            continue;
                        }
                    };
                    if let Some((why, fix)) =
                        added_partition_cut(file, topic, p.id(), Some(first), low)
                    {
                        return Err(AddedPartitionCut(format!("{why}. To go on: {fix}")).into());
                    }
                    // From offset 0 itself, not from wherever the partition
                    // begins when librdkafka asks: records deleted meanwhile
                    // then stop the sink (`auto.offset.reset=error`).
                    offset = Offset::Offset(0);
                }
                fresh.add_partition_offset(topic, p.id(), offset)?;
                keys.push(key);
            }
        }
    }
    if fresh.count() > 0 {
        let names: Vec<String> = fresh
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(at) => format!("{} [{}] at offset {at}", e.topic(), e.partition()),
                _ => format!("{} [{}] from its beginning", e.topic(), e.partition()),
            })
            .collect();
        tracing::info!(
            partitions = %names.join(", "),
            "reading partitions new to this run (at start, or added to a topic or created since)"
        );
        consumer
            .incremental_assign(&fresh)
            .context("cannot assign partitions")?;
    }
    // Only now: a partition marked before an error above would never be
    // read.
    assigned.extend(keys);
    firsts.extend(noted.iter().cloned());
    Ok(noted)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pretty-printed record with a lone surrogate escape passed the
    /// validity check and then panicked the reading thread where it was
    /// compacted: the sink stopped, and stopped again on the same record
    /// after every restart.
    #[test]
    fn a_pretty_printed_record_with_a_lone_surrogate_is_a_dead_letter() {
        let text = b"{\n  \"a\": \"\\ud800\"\n}";
        assert!(
            matches!(check(Some(text), 1 << 20), Prepared::Dead(r) if r.starts_with("not JSON"))
        );
        assert!(
            matches!(prepare(Some(text), 0, 1 << 20), Prepared::Dead(r) if r.starts_with("not JSON"))
        );
        // On one line it is kept as it is, as before.
        let line = b"{\"a\": \"\\ud800\"}";
        assert!(matches!(check(Some(line), 1 << 20), Prepared::Line(..)));
    }

    #[test]
    fn only_a_partition_added_after_the_file_began_must_start_at_zero() {
        let file = Path::new("/data/out.txt");
        // Added later (the topic had 1 partition), cut before offset 5.
        let (why, fix) = added_partition_cut(file, "t", 1, Some(1), 5).unwrap();
        assert!(
            why.starts_with("t partition 1 was added to the topic after the file began (it had 1 partition(s) then)"),
            "{why}"
        );
        assert!(why.contains("records 0 to 4 were deleted"), "{why}");
        assert!(
            fix.contains(
                r#"remove "t" from "first_partitions" in /data/out.txt.tidemark-checkpoint"#
            ),
            "{fix}"
        );
        // Nothing deleted, a partition the topic had when the file took it,
        // or a topic not noted yet: read from where Kafka starts.
        assert_eq!(added_partition_cut(file, "t", 1, Some(1), 0), None);
        assert_eq!(added_partition_cut(file, "t", 0, Some(1), 5), None);
        assert_eq!(added_partition_cut(file, "t", 2, Some(3), 5), None);
        assert_eq!(added_partition_cut(file, "t", 1, None, 5), None);
        assert!(added_partition_cut(file, "t", 3, Some(3), 1).is_some());
    }

    #[test]
    fn line_breaks_are_found_at_every_position() {
        for len in [0, 1, 31, 32, 33, 64, 100] {
            let plain = vec![b'x'; len];
            assert!(!has_line_break(&plain), "{len}");
            for at in 0..len {
                for brk in [b'\n', b'\r'] {
                    let mut v = plain.clone();
                    v[at] = brk;
                    assert!(has_line_break(&v), "{len} {at} {brk}");
                }
            }
        }
    }
}
