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
//! - A record that is not JSON, or is larger than the limit, goes to the
//!   dead-letter file `<file>.dead-letter` with the reason, and the sink goes
//!   on; a tombstone (null value) is skipped.
//! - A write error (full disk, permission) stops the sink with the error
//!   before anything is committed, so nothing is lost.

pub mod cli;
pub mod output;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use futures::FutureExt as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tidemark_common::config::{Conditional, ConnectorConfig, KeySet};
use tidemark_common::health::Health;
use tidemark_common::kafka::KafkaSettings;
use tidemark_common::ops::names;
use tidemark_common::ConfigError;
use tokio_util::sync::CancellationToken;

use crate::output::{Batch, Output};

/// The connector keys file-sink reads.
pub const KEYS: KeySet = KeySet {
    supported: &["topics", "file"],
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
    /// The output file.
    pub file: PathBuf,
    /// The brokers.
    pub kafka: KafkaSettings,
    /// Records per fsync at most; a batch also ends when no record is waiting.
    pub max_batch_records: usize,
    /// Larger records go to the dead-letter file.
    pub max_record_bytes: usize,
    /// How often to look for new partitions or topics that appeared.
    pub metadata_refresh: Duration,
    /// Set ready once reading; for `/healthz` and tests.
    pub health: Health,
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
        Ok((
            Self {
                name: c.name.clone(),
                topics,
                file: PathBuf::from(file),
                kafka,
                max_batch_records: 5_000,
                max_record_bytes: 16 * 1024 * 1024,
                metadata_refresh: Duration::from_secs(10),
                health: Health::new(),
                http_addr: None,
            },
            warnings,
        ))
    }
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

/// Runs until `shutdown` is cancelled.
///
/// Fails when the output cannot be opened or written (a missing folder, a
/// full disk, no permission) or Kafka refuses the consumer (no READ on a
/// topic); nothing that was not durably written is ever committed.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<Totals> {
    if let Some(addr) = cfg.http_addr {
        tidemark_common::ops::serve(addr, cfg.health.clone(), shutdown.clone()).await?;
    }
    let path = cfg.file.clone();
    let mut out = tokio::task::spawn_blocking(move || Output::open(&path)).await??;
    let consumer: StreamConsumer = cfg
        .kafka
        .client_config(&[
            ("group.id", &format!("connect-{}", cfg.name)),
            ("isolation.level", "read_committed"),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            ("queued.max.messages.kbytes", "4096"),
            ("fetch.max.bytes", "8388608"),
        ])
        .create()
        .context("cannot create the Kafka consumer; check the kafka properties")?;

    let mut assigned = BTreeSet::new();
    let mut waiting_logged = false;
    while assigned.is_empty() {
        match assign_new(&consumer, &cfg.topics, &out, &mut assigned) {
            Ok(()) if !assigned.is_empty() => break,
            Ok(()) => {
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
    tracing::info!(
        connector = %cfg.name,
        file = %cfg.file.display(),
        partitions = assigned.len(),
        kafka = %cfg.kafka.bootstrap_servers,
        "file-sink started"
    );
    cfg.health.set_ready(true);

    let mut totals = Totals::default();
    let mut refresh = tokio::time::interval(cfg.metadata_refresh);
    refresh.tick().await;
    let mut kafka_error_logged = false;
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = refresh.tick() => {
                cfg.health.progress();
                report_lag(&consumer, &out, &assigned);
                if let Err(e) = assign_new(&consumer, &cfg.topics, &out, &mut assigned) {
                    tracing::warn!(error = %format!("{e:#}"), "cannot refresh topic metadata");
                }
                continue;
            }
            m = consumer.recv() => m,
        };
        let mut batch = Batch::default();
        match first {
            Ok(msg) => {
                if kafka_error_logged {
                    tracing::info!("kafka reachable again");
                    kafka_error_logged = false;
                }
                add(&mut batch, &msg, cfg.max_record_bytes);
            }
            // A refused fetch stays refused until someone grants READ:
            // retrying would only hide it.
            Err(e)
                if e.rdkafka_error_code()
                    == Some(rdkafka::error::RDKafkaErrorCode::TopicAuthorizationFailed) =>
            {
                metrics::counter!(names::SINK_ERRORS, "kind" => "kafka").increment(1);
                bail!(
                    "not allowed to read topic {}: {e}; grant READ on it and on group connect-{} to this user",
                    cfg.topics.join(", "),
                    cfg.name
                );
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
        // Take whatever is already waiting, so one fsync covers it all.
        while batch.written + batch.dead_count + batch.skipped < cfg.max_batch_records as u64 {
            match consumer.recv().now_or_never() {
                Some(Ok(msg)) => add(&mut batch, &msg, cfg.max_record_bytes),
                _ => break,
            }
        }
        let (o, result, batch) = tokio::task::spawn_blocking(move || {
            let r = out.commit(&batch);
            (out, r, batch)
        })
        .await?;
        out = o;
        if result.is_err() {
            metrics::counter!(names::SINK_ERRORS, "kind" => "file").increment(1);
        }
        result.with_context(|| {
            format!(
                "stopped without committing: the last {} records will be written again after a restart",
                batch.written + batch.dead_count
            )
        })?;
        cfg.health.progress();
        metrics::counter!(names::SINK_LINES_WRITTEN).increment(batch.written);
        metrics::counter!(names::SINK_DEAD_LETTERS).increment(batch.dead_count);
        metrics::counter!(names::SINK_TOMBSTONES_SKIPPED).increment(batch.skipped);
        totals.written += batch.written;
        totals.dead += batch.dead_count;
        totals.skipped += batch.skipped;
        tracing::debug!(
            lines = batch.written,
            dead = batch.dead_count,
            "batch written"
        );
        if batch.dead_count > 0 {
            tracing::warn!(records = batch.dead_count, file = %output::dead_letter_path(&cfg.file).display(), "records sent to the dead-letter file");
        }
        commit_hint(&consumer, &batch);
    }
    // Everything read was already committed to the file; leave the hint too.
    let mut tpl = TopicPartitionList::new();
    for (topic, parts) in &out.checkpoint.offsets {
        for (p, next) in parts {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*next))?;
        }
    }
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            tracing::debug!(error = %e, "cannot commit the offset hint on exit");
        }
    }
    tracing::info!(
        lines = totals.written,
        dead = totals.dead,
        "file-sink stopped"
    );
    Ok(totals)
}

/// Adds one record to the batch: a line, a dead letter or a skipped
/// tombstone.
fn add(batch: &mut Batch, msg: &BorrowedMessage<'_>, max_bytes: usize) {
    batch.reach(msg.topic(), msg.partition(), msg.offset() + 1);
    let Some(value) = msg.payload() else {
        batch.skipped += 1;
        return;
    };
    let reason = if value.len() > max_bytes {
        Some(format!(
            "record of {} bytes is larger than the limit of {max_bytes}",
            value.len()
        ))
    } else {
        match std::str::from_utf8(value) {
            Err(e) => Some(format!("not JSON: the bytes are not UTF-8 text ({e})")),
            Ok(text) => match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                Ok(_) => None,
                Err(e) => Some(format!("not JSON: {e}")),
            },
        }
    };
    match reason {
        None => {
            if value.contains(&b'\n') || value.contains(&b'\r') {
                // Pretty-printed JSON: one line per record, so compact it.
                let v: serde_json::Value = serde_json::from_slice(value).expect("checked above");
                serde_json::to_writer(&mut batch.lines, &v).expect("a value always serialises");
            } else {
                batch.lines.extend_from_slice(value);
            }
            batch.lines.push(b'\n');
            batch.written += 1;
        }
        Some(reason) => {
            let b64 = base64::engine::general_purpose::STANDARD;
            let entry = serde_json::json!({
                "topic": msg.topic(),
                "partition": msg.partition(),
                "offset": msg.offset(),
                "reason": reason,
                "key_base64": msg.key().map(|k| b64.encode(k)),
                "value_base64": b64.encode(value),
            });
            serde_json::to_writer(&mut batch.dead, &entry).expect("a value always serialises");
            batch.dead.push(b'\n');
            batch.dead_count += 1;
        }
    }
}

/// Sets the lag gauge: records in Kafka not yet in the file. The watermark
/// look-ups are short network calls, made once per metadata refresh.
fn report_lag(consumer: &StreamConsumer, out: &Output, assigned: &BTreeSet<(String, i32)>) {
    let mut lag = 0i64;
    for (topic, p) in assigned {
        match consumer.fetch_watermarks(topic, *p, Duration::from_secs(1)) {
            Ok((_, high)) => {
                let next = out.checkpoint.next_offset(topic, *p).unwrap_or(0);
                lag += (high - next).max(0);
            }
            Err(_) => return,
        }
    }
    metrics::gauge!(names::SINK_LAG_RECORDS).set(lag as f64);
}

fn commit_hint(consumer: &StreamConsumer, batch: &Batch) {
    let mut tpl = TopicPartitionList::new();
    for (topic, p, next) in &batch.reached {
        if tpl
            .add_partition_offset(topic, *p, Offset::Offset(*next))
            .is_err()
        {
            return;
        }
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        tracing::debug!(error = %e, "cannot commit the offset hint");
    }
}

/// Assigns partitions of `topics` not yet assigned, each at the checkpoint's
/// offset or the beginning.
fn assign_new(
    consumer: &StreamConsumer,
    topics: &[String],
    out: &Output,
    assigned: &mut BTreeSet<(String, i32)>,
) -> anyhow::Result<()> {
    let mut fresh = TopicPartitionList::new();
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
            for p in t.partitions() {
                let key = (topic.clone(), p.id());
                if assigned.contains(&key) {
                    continue;
                }
                let offset = match out.checkpoint.next_offset(topic, p.id()) {
                    Some(next) => Offset::Offset(next),
                    None => Offset::Beginning,
                };
                fresh.add_partition_offset(topic, p.id(), offset)?;
                assigned.insert(key);
            }
        }
    }
    if fresh.count() > 0 {
        tracing::info!(partitions = fresh.count(), "reading new partitions");
        consumer
            .incremental_assign(&fresh)
            .context("cannot assign partitions")?;
    }
    Ok(())
}
