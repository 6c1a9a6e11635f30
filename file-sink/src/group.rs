//! The segmented archive's reading side: one member of the consumer group
//! `connect-<name>`, writing the partitions the group assigns it.
//!
//! Several instances with the same name share a topic's partitions; each
//! partition's files are written by one instance at a time, the holder of
//! the partition's lock ([`crate::lock`], in the partition's folder). The
//! group decides who should write a partition; the lock decides who may:
//!
//! - A partition the group assigns is paused until its lock is taken and
//!   its files recovered ([`segments::acquire`]); reading resumes at the
//!   recovered checkpoint. Records before it are skipped.
//! - A partition the group revokes is let go: its last writes are made
//!   durable, then its lock is released, and only then can the next owner
//!   take it.
//! - A former owner that was killed lost its lock with its process. One
//!   that is alive but stalled (paused, swapping, cut off from Kafka) keeps
//!   its lock: the new owner waits for it, and says so, rather than write
//!   beside it. When the stalled one wakes, the group has taken the
//!   partition from it; it finishes the write in hand, lets go, and the
//!   new owner starts from what it left.
//!
//! A recovered partition whose checkpoint has a fingerprint is first read
//! from the fingerprinted record: if the topic holds another record there
//! (it was deleted and created again, as after `docker compose down -v`),
//! or ends before it, the partition's folder is set aside as
//! `<partition>.before-reset-<time>` and the partition starts anew. If the
//! topic lost records the archive has not read (retention), the sink stops
//! and says so.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::FutureExt as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tidemark_common::archive::{
    partition_dir, Archive, Fingerprint, Mark, PartitionCheckpoint, Position,
};
use tidemark_common::ops::names;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::consumer::{Rebalance, Rebalances, SinkContext};
use crate::pipeline::Pipeline;
use crate::segments::{
    self, Acquire, Acquired, PartBatch, SegAppender, SegCommitter, SegReport, SegmentConfig, Tp,
    Work,
};
use crate::{prepare, Config, Prepared, Totals, BATCH_BYTES, CONSUMER_SETTINGS, FIXED_SETTINGS};

type SharedConsumer = Arc<StreamConsumer<SinkContext>>;

/// Where reading a partition starts, from its checkpoint read without the
/// lock: the fingerprinted record (to check the topic), else the next
/// offset; `None` for the beginning.
fn unlocked_start(root: &Path, topic: &str, partition: i32) -> Option<i64> {
    let cp = PartitionCheckpoint::load(&partition_dir(root, topic, partition)).ok()??;
    match &cp.fingerprint {
        Some(fp) => Some(fp.offset),
        None => (cp.next_offset > 0).then_some(cp.next_offset),
    }
}

/// What the reading loop knows of one assigned partition.
struct Part {
    state: State,
    /// An attempt to take it is running.
    attempting: bool,
    /// The holder it is waiting for was logged.
    held_logged: bool,
    /// The offset after the last record handed over.
    delivered: Option<i64>,
    /// A completeness probe in flight or waiting for statistics.
    probe: Option<Probe>,
    probing: bool,
}

enum State {
    /// Assigned, its lock not yet taken.
    Waiting,
    /// Taken; the first record read must be the fingerprinted one.
    Verifying(Box<Acquired>, Fingerprint),
    /// Being set aside and started anew.
    Resetting,
    /// Written by this instance; records before `next` are skipped.
    Owned { next: i64 },
}

/// A completeness probe: `k` is a unit known committed in Kafka (seen
/// ending, or followed), and the partition's last stable offset was `lso`
/// when asked at `at`, after `k` was known. Once the partition is handled
/// up to `lso` (by statistics emitted after `at`), every one of its events
/// of units up to `k` is in the archive.
struct Probe {
    at: Instant,
    lso: i64,
    k: (i64, Option<i64>),
}

/// What blocking work done off the loop reports.
enum Done {
    Acquire(Tp, anyhow::Result<Acquisition>),
    Reset(Tp, anyhow::Result<(Box<Acquired>, PathBuf)>),
    Probe(Tp, Option<Probe>),
    Others(Option<(i64, Option<i64>)>),
    Retention(anyhow::Result<Option<(i64, String)>>),
    Complete(Option<Mark>),
    /// The topics' partitions noted, after the unit given was known.
    Topics(anyhow::Result<()>, Option<(i64, Option<i64>)>),
    Lost(Option<String>),
}

enum Acquisition {
    Held(String),
    /// Taken: the partition's low and high watermarks, and how many
    /// partitions the topic had when the archive first noted it (`None`:
    /// not noted yet, a topic new to the archive).
    Ready(Box<Acquired>, i64, i64, Option<i32>),
}

/// Why a partition the archive holds nothing of cannot start at `low`,
/// and the fix: it was added to the topic after the archive first noted
/// the topic's `first` partitions, so its records from offset 0 are the
/// archive's to hold, and Kafka deleted those before `low`. `None` when it
/// may start there (a partition the topic had when the archive began, or a
/// topic new to the archive: an archive begun on an old topic starts at
/// what Kafka still holds).
pub(crate) fn added_partition_cut(
    root: &Path,
    topic: &str,
    partition: i32,
    first: Option<i32>,
    low: i64,
) -> Option<(String, String)> {
    let first = first?;
    (low > 0 && partition >= first).then(|| {
        (
            format!(
                "{topic} partition {partition} was added to the topic after the archive began (it had {first} partition(s) then), so the archive must hold it from offset 0, but the topic now starts at offset {low}: records 0 to {} were deleted before they were archived (retention, or a lost broker), and the archive cannot be complete",
                low - 1
            ),
            format!(
                "to archive what is left and accept the loss, move {} away (the next start notes the topic's partitions anew, as for an archive begun on this topic now), and raise the topic's retention.ms so that a partition added later is read before Kafka deletes its records",
                root.join(topic).join(tidemark_common::archive::TOPIC_FILE).display()
            ),
        )
    })
}

/// A unit known committed in Kafka, from an event read: its own unit when
/// it is the unit's last, else the one before.
fn known_from(pos: &Position) -> Option<(i64, Option<i64>)> {
    let co = pos.commit_order?;
    Some((if pos.unit_end { co } else { co - 1 }, pos.ts_us))
}

/// Whether the unit known committed, `k`, gives a later mark than `mark`:
/// a later unit, or (a heartbeat's) a later time.
fn later_than(k: (i64, Option<i64>), mark: Option<Mark>) -> bool {
    let m = mark.unwrap_or_default();
    k.0 + 1 > m.commit_order.unwrap_or(i64::MIN)
        || k.1.is_some_and(|t| t > m.ts_us.unwrap_or(i64::MIN))
}

fn later(
    a: Option<(i64, Option<i64>)>,
    b: Option<(i64, Option<i64>)>,
) -> Option<(i64, Option<i64>)> {
    match (a, b) {
        // A heartbeat names no later unit but a later time.
        (Some(x), Some(y)) => Some(if (y.0, y.1) > (x.0, x.1) { y } else { x }),
        (x, y) => x.or(y),
    }
}

/// Runs one group member until `shutdown` is cancelled.
///
/// Fails when the archive cannot be written or recovered, Kafka refuses
/// the consumer, or a partition lost records the archive had not read.
pub async fn run(
    cfg: Config,
    seg: SegmentConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<Totals> {
    if let Some(addr) = cfg.http_addr {
        tidemark_common::ops::serve(
            addr,
            tidemark_common::ops::names::SINK,
            cfg.health.clone(),
            shutdown.clone(),
        )
        .await?;
    }
    let root = seg.root.clone();
    {
        let root = root.clone();
        tokio::task::spawn_blocking(move || segments::create_archive(&root)).await??;
    }
    let rebalances = Arc::new(Rebalances::new({
        let root = root.clone();
        move |t, p| unlocked_start(&root, t, p)
    }));
    let group = format!("connect-{}", cfg.name);
    let fetch = {
        let (kafka, group, topics, root) = (
            cfg.kafka.clone(),
            group.clone(),
            cfg.topics.clone(),
            root.clone(),
        );
        tokio::task::spawn_blocking(move || {
            crate::probe_fetch(&kafka, &group, &topics, |t, p| unlocked_start(&root, t, p))
        })
        .await?
    };
    cfg.fetch_bytes
        .store(fetch, std::sync::atomic::Ordering::Relaxed);
    if fetch != crate::consumer::FETCH_MIN {
        tracing::info!(
            fetch_bytes = fetch,
            "reading with larger fetches, sized to what the records expand to"
        );
    }
    let fetch = fetch.to_string();
    let mut settings = vec![("group.id", group.as_str())];
    settings.extend_from_slice(CONSUMER_SETTINGS);
    settings.push(("fetch.message.max.bytes", &fetch));
    // A killed member's partitions move on after this; librdkafka's 45 s
    // would leave them unread that long.
    settings.push(("session.timeout.ms", "10000"));
    // The group sees partitions added to a topic, and a listed topic
    // created, at its next metadata refresh (librdkafka's default is every
    // 5 minutes); the records written there meanwhile wait in Kafka, read
    // from the partition's beginning once it is assigned.
    let refresh = cfg.metadata_refresh.as_millis().max(1).to_string();
    settings.push(("topic.metadata.refresh.interval.ms", &refresh));
    let mut fixed: Vec<(&str, &str, &str)> = FIXED_SETTINGS.to_vec();
    fixed.push((
        "partition.assignment.strategy",
        "cooperative-sticky",
        "a rebalance moves only the partitions that change owner",
    ));
    let consumer: SharedConsumer = Arc::new(
        cfg.kafka
            .client_config_fixed(&settings, &fixed)?
            .create_with_context(SinkContext::for_group(rebalances.clone()))
            .context("cannot create the Kafka consumer; check the kafka properties")?,
    );
    let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .context("cannot subscribe to the topics")?;
    // Issue 16.5: one line that says what this run is and will do.
    tracing::info!(
        connector = %cfg.name,
        mode = "segmented",
        topics = %cfg.topics.join(", "),
        position = "per partition, in the archive",
        plan = "resume each partition this instance is assigned after its checkpoint in the archive (from its beginning without one)",
        archive = %root.display(),
        group,
        rotate_bytes = seg.rotate_bytes,
        rotate_interval = ?seg.rotate_interval,
        compression = ?seg.compression,
        retention_window = ?seg.retention_window,
        kafka = %cfg.kafka.bootstrap_servers,
        "file-sink started"
    );
    cfg.health.set_ready(true);

    let mut pipeline = Pipeline::start_stages(
        SegAppender::new(seg.clone()),
        SegCommitter::new(seg.clone()),
    )?;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut parts: HashMap<Tp, Part> = HashMap::new();
    let mut report = SegReport::default();
    let mut reported = Totals::default();
    let mut reported_sealed = 0u64;
    let mut reported_retired = 0u64;
    let mut known: Option<(i64, Option<i64>)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks = 0u64;
    // A note of the topics in flight: the next waits for it (each can wait
    // 5 s per topic for the brokers).
    let noting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut complete_logged: Option<Mark> = None;
    let mut kafka_error_logged = false;
    let mut fatal: Option<anyhow::Error> = None;
    let mut pre: Vec<Work> = Vec::new();
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = rebalances.notify.notified() => {
                for r in rebalances.take() {
                    match r {
                        Rebalance::Assigned(list) => {
                            for (tp, assigned) in list {
                                tracing::info!(topic = %tp.0, partition = tp.1, start = ?assigned, "partition assigned");
                                parts.insert(tp.clone(), Part {
                                    state: State::Waiting,
                                    attempting: false,
                                    held_logged: false,
                                    delivered: None,
                                    probe: None,
                                    probing: false,
                                });
                                try_acquire(&seg, &cfg.name, &consumer, &done_tx, &tp, parts.get_mut(&tp).expect("inserted"));
                            }
                        }
                        Rebalance::Revoked(list) => {
                            for tp in list {
                                tracing::info!(topic = %tp.0, partition = tp.1, "partition revoked");
                                if let Some(Part { state: State::Owned { .. }, .. }) = parts.remove(&tp) {
                                    note_held(&cfg, &parts);
                                    if !pipeline.send(Work::Release(tp)).await {
                                        break;
                                    }
                                }
                            }
                        }
                    }
                }
                continue;
            }
            Some(done) = done_rx.recv() => {
                match on_done(done, &seg, &cfg.name, &consumer, &done_tx, &mut parts, &mut known, &mut complete_logged, &mut pre) {
                    Ok(()) => {}
                    Err(e) => {
                        fatal = Some(e);
                        break;
                    }
                }
                note_held(&cfg, &parts);
                let mut stopped = false;
                for w in pre.drain(..) {
                    if !pipeline.send(w).await {
                        stopped = true;
                        break;
                    }
                }
                if stopped {
                    break;
                }
                continue;
            }
            _ = tick.tick() => {
                ticks += 1;
                cfg.health.progress();
                on_tick(ticks, &seg, &cfg, &consumer, &done_tx, &mut parts, &report, known, &noting, &mut pre);
                let mut stopped = false;
                for w in pre.drain(..) {
                    if !pipeline.send(w).await {
                        stopped = true;
                        break;
                    }
                }
                if stopped {
                    break;
                }
                continue;
            }
            changed = pipeline.committed().changed() => {
                if changed.is_err() {
                    break;
                }
                report = pipeline.committed().borrow_and_update().clone();
                count(&report, &mut reported, &mut reported_sealed, &mut reported_retired);
                continue;
            }
            m = consumer.recv() => m,
        };
        let mut slots: Vec<Slot<'_>> = Vec::new();
        let mut bytes = 0usize;
        let mut records = 0usize;
        match first {
            Ok(msg) => {
                if kafka_error_logged {
                    tracing::info!("kafka reachable again");
                    kafka_error_logged = false;
                }
                route(
                    msg, &cfg, &consumer, &done_tx, &seg, &mut parts, &mut slots, &mut known,
                    &mut pre, &mut bytes,
                );
                records += 1;
            }
            Err(e) => {
                metrics::counter!(names::SINK_ERRORS, "kind" => "kafka").increment(1);
                match e.rdkafka_error_code() {
                    Some(rdkafka::error::RDKafkaErrorCode::TopicAuthorizationFailed) => {
                        fatal = Some(anyhow::anyhow!(
                            "not allowed to read topic {}: {e}; grant READ on it and on group {group} to this user",
                            cfg.topics.join(", ")
                        ));
                        break;
                    }
                    Some(rdkafka::error::RDKafkaErrorCode::GroupAuthorizationFailed) => {
                        fatal = Some(anyhow::anyhow!("not allowed to join consumer group {group}: {e}; grant READ on the group to this user"));
                        break;
                    }
                    Some(rdkafka::error::RDKafkaErrorCode::AutoOffsetReset) => {
                        // A partition assigned at its checkpoint's offset
                        // may hit this before it is paused and checked;
                        // taking it seeks it where it must read. Only a
                        // partition this instance writes and whose place
                        // the topic lost stops the sink.
                        tracing::debug!(error = %e, "an assigned partition's start is not in its topic; checking the partitions written");
                        let owned: Vec<(Tp, i64)> = parts
                            .iter()
                            .filter_map(|(tp, p)| match p.state {
                                State::Owned { next } => Some((tp.clone(), next)),
                                _ => None,
                            })
                            .collect();
                        let (consumer, done) = (consumer.clone(), done_tx.clone());
                        tokio::task::spawn_blocking(move || {
                            let lost = owned.into_iter().find_map(|(tp, next)| {
                                let (low, high) = consumer.fetch_watermarks(&tp.0, tp.1, Duration::from_secs(10)).ok()?;
                                (next < low || next > high).then(|| format!(
                                    "{} partition {}: the archive reads from offset {next}, but the topic now holds offsets {low} to {high}: records were deleted (retention, a lost broker) or the topic was recreated while file-sink ran; a restart checks each partition and sets aside those whose topic was recreated",
                                    tp.0, tp.1
                                ))
                            });
                            let _ = done.send(Done::Lost(lost));
                        });
                        continue;
                    }
                    _ => {
                        if !kafka_error_logged {
                            tracing::warn!(error = %e, "kafka consumer error; retrying");
                            kafka_error_logged = true;
                        }
                        continue;
                    }
                }
            }
        }
        while records < cfg.max_batch_records && bytes < BATCH_BYTES {
            match consumer.recv().now_or_never() {
                Some(Ok(msg)) => {
                    route(
                        msg, &cfg, &consumer, &done_tx, &seg, &mut parts, &mut slots, &mut known,
                        &mut pre, &mut bytes,
                    );
                    records += 1;
                }
                _ => break,
            }
        }
        let batch = close_slots(&mut slots, &mut parts);
        let mut stopped = false;
        for w in pre.drain(..) {
            if !pipeline.send(w).await {
                stopped = true;
                break;
            }
        }
        if stopped {
            break;
        }
        if !batch.is_empty() && !pipeline.send(Work::Batch(batch)).await {
            break;
        }
    }
    let result = pipeline.finish().await;
    if result.is_err() {
        metrics::counter!(names::SINK_ERRORS, "kind" => "file").increment(1);
    }
    let report = result.context(
        "stopped without committing the last records; they will be read again after a restart",
    )?;
    count(
        &report,
        &mut reported,
        &mut reported_sealed,
        &mut reported_retired,
    );
    crate::close(consumer, None).await;
    if let Some(e) = fatal {
        return Err(e);
    }
    tracing::info!(
        lines = report.totals.written,
        dead = report.totals.dead,
        sealed = report.sealed,
        "file-sink stopped"
    );
    Ok(report.totals)
}

/// Says how many partitions this instance writes now.
fn note_held(cfg: &Config, parts: &HashMap<Tp, Part>) {
    let held = parts
        .values()
        .filter(|p| matches!(p.state, State::Owned { .. }))
        .count();
    cfg.held.store(held, std::sync::atomic::Ordering::Relaxed);
    metrics::gauge!(names::SINK_PARTITIONS_HELD).set(held as f64);
}

/// Counts what the syncer made durable since the last report.
fn count(report: &SegReport, reported: &mut Totals, sealed: &mut u64, retired: &mut u64) {
    let now = report.totals;
    metrics::counter!(names::SINK_LINES_WRITTEN).increment(now.written - reported.written);
    metrics::counter!(names::SINK_DEAD_LETTERS).increment(now.dead - reported.dead);
    metrics::counter!(names::SINK_TOMBSTONES_SKIPPED).increment(now.skipped - reported.skipped);
    metrics::counter!(names::SINK_SEGMENTS_SEALED).increment(report.sealed - *sealed);
    metrics::counter!(names::SINK_SEGMENTS_RETIRED).increment(report.retired - *retired);
    if now.dead > reported.dead {
        tracing::warn!(
            records = now.dead - reported.dead,
            "records sent to the partitions' dead-letter files"
        );
    }
    *reported = now;
    *sealed = report.sealed;
    *retired = report.retired;
}

/// Starts an attempt to take `tp`'s lock and recover it, off the loop.
fn try_acquire(
    seg: &SegmentConfig,
    owner: &str,
    consumer: &SharedConsumer,
    done: &mpsc::UnboundedSender<Done>,
    tp: &Tp,
    part: &mut Part,
) {
    if part.attempting {
        return;
    }
    part.attempting = true;
    let (seg, owner, consumer, done, tp) = (
        seg.clone(),
        owner.to_owned(),
        consumer.clone(),
        done.clone(),
        tp.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let r = (|| -> anyhow::Result<Acquisition> {
            match segments::acquire(&seg, &tp, &owner)? {
                Acquire::Held(h) => Ok(Acquisition::Held(h)),
                Acquire::Ready(a) => {
                    let (low, high) =
                        watermarks_when_led(&*consumer, &tp.0, tp.1).with_context(|| {
                            format!("cannot read the offsets of {} partition {}", tp.0, tp.1)
                        })?;
                    let first = segments::topic_file(&seg.root, &tp.0).map(|t| t.first());
                    Ok(Acquisition::Ready(a, low, high, first))
                }
            }
        })();
        let _ = done.send(Done::Acquire(tp, r));
    });
}

/// How long a partition that has no leader for the moment (just created, or
/// the broker restarting) is waited for before taking it fails.
const LEADER_PATIENCE: Duration = Duration::from_secs(30);

/// The partition's low and high watermarks. A partition whose leader is
/// being elected (Kafka answers "not leader" or "leader not available" for
/// a moment after a topic is created or a broker restarts) is asked again
/// for up to [`LEADER_PATIENCE`], instead of stopping the sink; any other
/// error fails at once.
fn watermarks_when_led<C: Consumer<SinkContext>>(
    consumer: &C,
    topic: &str,
    partition: i32,
) -> rdkafka::error::KafkaResult<(i64, i64)> {
    use rdkafka::error::RDKafkaErrorCode as Code;
    let until = Instant::now() + LEADER_PATIENCE;
    loop {
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Err(e)
                if matches!(
                    e.rdkafka_error_code(),
                    Some(Code::NotLeaderForPartition | Code::LeaderNotAvailable)
                ) && Instant::now() < until =>
            {
                tracing::info!(topic, partition, error = %e, "the partition has no leader yet; asking again");
                std::thread::sleep(Duration::from_millis(500));
            }
            r => return r,
        }
    }
}

/// Seeks `tp` to `offset` and resumes it. Always a seek: the fetcher may
/// have met an offset the topic no longer has before the partition was
/// paused, and only a seek starts it again.
///
/// A fetcher that met such an offset (a checkpoint's offset in a topic
/// created again) has stopped, and librdkafka refuses to seek it
/// (`Erroneous state`): the partition is then taken again at `offset`.
fn start_reading(consumer: &SharedConsumer, tp: &Tp, offset: Option<i64>) -> anyhow::Result<()> {
    let to = offset.map_or(Offset::Beginning, Offset::Offset);
    let what = || {
        format!(
            "cannot move the reading of {} partition {} to {to:?}",
            tp.0, tp.1
        )
    };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&tp.0, tp.1);
    match consumer.seek(&tp.0, tp.1, to, Duration::from_secs(10)) {
        Ok(()) => {}
        // rdkafka gives a seek's error as text only.
        Err(rdkafka::error::KafkaError::Seek(e)) if e.ends_with("Erroneous state") => {
            tracing::debug!(topic = %tp.0, partition = tp.1, "the partition's fetcher has stopped; taking the partition again at its offset");
            consumer.incremental_unassign(&tpl).with_context(what)?;
            let mut at = TopicPartitionList::new();
            at.add_partition_offset(&tp.0, tp.1, to)
                .with_context(what)?;
            consumer.incremental_assign(&at).with_context(what)?;
        }
        Err(e) => return Err(e).with_context(what),
    }
    consumer
        .resume(&tpl)
        .with_context(|| format!("cannot resume reading {} partition {}", tp.0, tp.1))
}

fn pause(consumer: &SharedConsumer, tp: &Tp) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&tp.0, tp.1);
    if let Err(e) = consumer.pause(&tpl) {
        tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "cannot pause the partition");
    }
}

fn spawn_reset(
    seg: &SegmentConfig,
    owner: &str,
    done: &mpsc::UnboundedSender<Done>,
    tp: Tp,
    a: Acquired,
) {
    let (seg, owner, done) = (seg.clone(), owner.to_owned(), done.clone());
    tokio::task::spawn_blocking(move || {
        let r = segments::reset(&seg, a, &owner).map(|(a, p)| (Box::new(a), p));
        let _ = done.send(Done::Reset(tp, r));
    });
}

#[allow(clippy::too_many_arguments)]
fn on_done(
    done: Done,
    seg: &SegmentConfig,
    owner: &str,
    consumer: &SharedConsumer,
    done_tx: &mpsc::UnboundedSender<Done>,
    parts: &mut HashMap<Tp, Part>,
    known: &mut Option<(i64, Option<i64>)>,
    complete_logged: &mut Option<Mark>,
    pre: &mut Vec<Work>,
) -> anyhow::Result<()> {
    match done {
        Done::Acquire(tp, r) => {
            let Some(part) = parts.get_mut(&tp) else {
                // Revoked meanwhile: dropping the result lets the lock go.
                return Ok(());
            };
            part.attempting = false;
            if !matches!(part.state, State::Waiting) {
                return Ok(());
            }
            match r? {
                Acquisition::Held(holder) => {
                    if !part.held_logged {
                        tracing::warn!(topic = %tp.0, partition = tp.1, %holder, "the partition's former owner still holds it (finishing, or stalled); waiting for it to let go");
                        part.held_logged = true;
                    }
                }
                Acquisition::Ready(a, low, high, first) => {
                    let start = a.start();
                    let fp = a.fingerprint().cloned();
                    tracing::info!(topic = %tp.0, partition = tp.1, next = ?start, low, high, "partition taken");
                    let verdict = fp
                        .as_ref()
                        .and_then(|fp| crate::identity::by_offsets(&tp.0, tp.1, fp, low, high));
                    match (start, fp) {
                        (None, _) => {
                            if let Some((why, fix)) =
                                added_partition_cut(&seg.root, &tp.0, tp.1, first, low)
                            {
                                anyhow::bail!("{why}. To go on: {fix}");
                            }
                            tracing::info!(topic = %tp.0, partition = tp.1, "the archive holds nothing of this partition yet (new to the archive, or added to the topic): reading it from its beginning");
                            pre.push(Work::Acquire(a));
                            start_reading(consumer, &tp, None)?;
                            part.state = State::Owned { next: 0 };
                        }
                        (Some(next), Some(_))
                            if matches!(verdict, Some(crate::identity::Verdict::Recreated(_))) =>
                        {
                            let Some(crate::identity::Verdict::Recreated(why)) = verdict else {
                                unreachable!()
                            };
                            tracing::warn!(topic = %tp.0, partition = tp.1, archived_up_to = next, why, "the topic is not the one archived: it was deleted and created again (or its log was cut); setting the archived partition aside and starting it anew");
                            part.state = State::Resetting;
                            spawn_reset(seg, owner, done_tx, tp, *a);
                        }
                        (Some(next), _) if low > next => {
                            // A partition added after the archive began is
                            // refused again from its beginning: its topic's
                            // file must go too.
                            let also = if first.is_some_and(|n| tp.1 >= n) {
                                format!(
                                    ", and, as the partition was added to the topic after the archive began, {} too",
                                    seg.root
                                        .join(&tp.0)
                                        .join(tidemark_common::archive::TOPIC_FILE)
                                        .display()
                                )
                            } else {
                                String::new()
                            };
                            anyhow::bail!(
                                "{} partition {}: the topic now starts at offset {low}, but the archive has read only up to {next}: records {next} to {} were deleted before they were archived (retention, or a lost broker). To archive what is left, move the partition's folder {} away{also}",
                                tp.0,
                                tp.1,
                                low - 1,
                                partition_dir(&seg.root, &tp.0, tp.1).display()
                            );
                        }
                        (Some(next), Some(fp)) if verdict.is_none() => {
                            start_reading(consumer, &tp, Some(fp.offset))?;
                            part.state = State::Verifying(a, fp);
                            let _ = next;
                        }
                        (Some(next), _) => {
                            pre.push(Work::Acquire(a));
                            start_reading(consumer, &tp, Some(next))?;
                            part.state = State::Owned { next };
                        }
                    }
                }
            }
        }
        Done::Reset(tp, r) => {
            let Some(part) = parts.get_mut(&tp) else {
                return Ok(());
            };
            if !matches!(part.state, State::Resetting) {
                return Ok(());
            }
            let (a, aside) = r?;
            tracing::warn!(topic = %tp.0, partition = tp.1, aside = %aside.display(), "the archived partition is set aside (its files are kept there unchanged); archiving the new topic's partition from its beginning");
            pre.push(Work::Acquire(a));
            start_reading(consumer, &tp, None)?;
            part.state = State::Owned { next: 0 };
        }
        Done::Probe(tp, probe) => {
            if let Some(part) = parts.get_mut(&tp) {
                part.probing = false;
                part.probe = probe;
            }
        }
        Done::Others(k) => *known = later(*known, k),
        Done::Retention(r) => match r {
            Ok(Some((before, reason))) => {
                for (tp, part) in parts.iter() {
                    if matches!(part.state, State::Owned { .. }) {
                        pre.push(Work::Retire(tp.clone(), before, reason.clone()));
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot apply the retention policy; trying again later")
            }
        },
        Done::Complete(mark) => {
            if mark != *complete_logged {
                if let Some(m) = mark {
                    tracing::info!(
                        commit_order = ?m.commit_order,
                        ts = ?m.ts_us.and_then(|us| u64::try_from(us).ok()).map(|us| humantime::format_rfc3339_micros(std::time::UNIX_EPOCH + Duration::from_micros(us)).to_string()),
                        "archive complete: every source change committed before this is in it"
                    );
                }
                *complete_logged = mark;
            }
        }
        Done::Lost(lost) => {
            if let Some(why) = lost {
                anyhow::bail!("{why}");
            }
        }
        Done::Topics(r, k) => match r {
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "cannot note the topics' partitions");
            }
            // Every partition holding events of units up to `k` existed
            // before `k` was known, so the topic files now count it: a
            // partition's own events may take its mark that far.
            Ok(()) => {
                if let Some((co, ts_us)) = k {
                    pre.push(Work::Counted(Mark {
                        commit_order: Some(co + 1),
                        ts_us,
                    }));
                }
            }
        },
    }
    Ok(())
}

/// One partition's records in the batch being read, with what the
/// reading loop knows of it meanwhile: found per record by a scan (a batch
/// reads few partitions), so a record costs neither a copy of its topic's
/// name nor a hash of it.
struct Slot<'c> {
    tp: Tp,
    /// Records before this offset are skipped (its `State::Owned`).
    next: i64,
    batch: PartBatch,
    /// The last record handled; `None` while none was.
    last: Option<BorrowedMessage<'c>>,
}

/// The batch's partitions that got a record, each with its last record's
/// fingerprint, and their reading positions noted in `parts`.
fn close_slots(slots: &mut Vec<Slot<'_>>, parts: &mut HashMap<Tp, Part>) -> Vec<(Tp, PartBatch)> {
    let mut out = Vec::with_capacity(slots.len());
    for s in slots.drain(..) {
        let Some(msg) = s.last else {
            continue;
        };
        if let Some(part) = parts.get_mut(&s.tp) {
            if let State::Owned { next } = &mut part.state {
                *next = s.next;
                part.delivered = Some(s.next);
            }
        }
        let mut b = s.batch;
        b.fingerprint = Some(crate::identity::fingerprint(
            msg.offset(),
            msg.timestamp().to_millis(),
            msg.key(),
            msg.payload(),
        ));
        out.push((s.tp, b));
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn route<'c>(
    msg: BorrowedMessage<'c>,
    cfg: &Config,
    consumer: &SharedConsumer,
    done_tx: &mpsc::UnboundedSender<Done>,
    seg: &SegmentConfig,
    parts: &mut HashMap<Tp, Part>,
    slots: &mut Vec<Slot<'c>>,
    known: &mut Option<(i64, Option<i64>)>,
    pre: &mut Vec<Work>,
    bytes: &mut usize,
) {
    let offset = msg.offset();
    let partition = msg.partition();
    let topic = msg.topic();
    let i = match slots
        .iter()
        .position(|s| s.tp.1 == partition && s.tp.0 == topic)
    {
        Some(i) => i,
        None => match owned_slot(
            msg.topic(),
            partition,
            &msg,
            cfg,
            consumer,
            done_tx,
            seg,
            parts,
            pre,
        ) {
            Some(next) => {
                slots.push(Slot {
                    tp: (topic.to_owned(), partition),
                    next,
                    batch: PartBatch::default(),
                    last: None,
                });
                slots.len() - 1
            }
            None => return,
        },
    };
    let s = &mut slots[i];
    if offset < s.next {
        return;
    }
    s.next = offset + 1;
    let b = &mut s.batch;
    match prepare(msg.payload(), offset, cfg.max_record_bytes) {
        Prepared::Tombstone => b.skipped += 1,
        Prepared::Heartbeat(mark) => {
            // Committed after every unit before its mark: the partition's
            // own mark, and a later one for the idle partitions to take.
            b.skipped += 1;
            if let Some(co) = mark.commit_order {
                *known = later(*known, Some((co - 1, mark.ts_us)));
            }
            pre.push(Work::Mark(s.tp.clone(), mark));
        }
        Prepared::Line(line, pos) => {
            *known = later(*known, known_from(&pos));
            b.lines.extend_from_slice(&line);
            b.lines.push(b'\n');
            b.records.push((b.lines.len(), pos));
            *bytes += line.len() + 1;
        }
        Prepared::Dead(reason) => {
            crate::dead_letter(&msg, &reason, &mut b.dead);
            b.dead_count += 1;
            *bytes += b.dead.len();
        }
    }
    b.next = offset + 1;
    s.last = Some(msg);
}

/// The first record of a partition in a batch: checks a partition being
/// verified against the archive's last record (the record is then its
/// first, or is skipped), and says where an owned partition's records
/// start (`None`: not written by this instance, skip the record).
#[allow(clippy::too_many_arguments)]
fn owned_slot(
    topic: &str,
    partition: i32,
    msg: &BorrowedMessage<'_>,
    cfg: &Config,
    consumer: &SharedConsumer,
    done_tx: &mpsc::UnboundedSender<Done>,
    seg: &SegmentConfig,
    parts: &mut HashMap<Tp, Part>,
    pre: &mut Vec<Work>,
) -> Option<i64> {
    let tp: Tp = (topic.to_owned(), partition);
    let offset = msg.offset();
    let part = parts.get_mut(&tp)?;
    if let State::Verifying(_, fp) = &part.state {
        if offset < fp.offset {
            return None;
        }
        let verdict = crate::identity::by_record(
            &tp.0,
            tp.1,
            fp,
            offset,
            msg.timestamp().to_millis(),
            msg.key(),
            msg.payload(),
        );
        let same = !matches!(verdict, crate::identity::Verdict::Recreated(_));
        let State::Verifying(a, fp) = std::mem::replace(&mut part.state, State::Resetting) else {
            unreachable!("matched above")
        };
        if !same {
            tracing::warn!(topic = %tp.0, partition = tp.1, offset, "the topic holds another record where the archive's last one was: it was deleted and created again; setting the archived partition aside and starting it anew");
            pause(consumer, &tp);
            spawn_reset(seg, &cfg.name, done_tx, tp, *a);
            return None;
        }
        if offset > fp.offset {
            tracing::info!(topic = %tp.0, partition = tp.1, "the archive's last record is gone from the topic (compacted); going on without checking it");
        }
        let next = a.start().unwrap_or(0);
        pre.push(Work::Acquire(a));
        part.state = State::Owned { next };
        let _ = fp;
        note_held(cfg, parts);
    }
    match parts.get(&tp)?.state {
        State::Owned { next } => Some(next),
        _ => None,
    }
}

#[allow(clippy::too_many_arguments)]
fn on_tick(
    ticks: u64,
    seg: &SegmentConfig,
    cfg: &Config,
    consumer: &SharedConsumer,
    done_tx: &mpsc::UnboundedSender<Done>,
    parts: &mut HashMap<Tp, Part>,
    report: &SegReport,
    known: Option<(i64, Option<i64>)>,
    noting: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    pre: &mut Vec<Work>,
) {
    if seg.rotate_interval.is_some() {
        pre.push(Work::Tick);
    }
    let mut lag = 0i64;
    let mut lag_known = true;
    let mut hint = TopicPartitionList::new();
    let mut probes = Vec::new();
    for (tp, part) in parts.iter_mut() {
        if matches!(part.state, State::Waiting) {
            try_acquire(seg, &cfg.name, consumer, done_tx, tp, part);
        }
        if !matches!(part.state, State::Owned { .. }) {
            continue;
        }
        let Some(cp) = report.partitions.get(tp) else {
            continue;
        };
        let next = cp.next_offset;
        let delivered = part.delivered.unwrap_or(next);
        let stats = consumer.context().partition(&tp.0, tp.1);
        match stats.and_then(|(_, s)| s.lag(next, delivered)) {
            Some(l) => lag += l,
            None => lag_known = false,
        }
        if cp.fingerprint.is_some() {
            let _ = hint.add_partition_offset(&tp.0, tp.1, Offset::Offset(next));
        }
        // Completeness: finish a probe once statistics newer than it say
        // the partition is handled up to where it stood.
        if let (Some(probe), Some((at, s))) = (&part.probe, stats) {
            if at > probe.at {
                if s.handled(next, delivered) >= probe.lso {
                    let mark = Mark {
                        commit_order: Some(probe.k.0 + 1),
                        ts_us: probe.k.1,
                    };
                    if later_than(probe.k, cp.complete_before) {
                        pre.push(Work::Mark(tp.clone(), mark));
                    }
                }
                part.probe = None;
            }
        }
        let caught_up = stats.and_then(|(_, s)| s.lag(next, delivered)) == Some(0);
        if let Some(k) = known.filter(|k| {
            caught_up && later_than(*k, cp.complete_before) && part.probe.is_none() && !part.probing
        }) {
            part.probing = true;
            probes.push((tp.clone(), k));
        }
    }
    if !probes.is_empty() {
        let (consumer, done, topics, root) = (
            consumer.clone(),
            done_tx.clone(),
            cfg.topics.clone(),
            seg.root.clone(),
        );
        tokio::task::spawn_blocking(move || {
            // The archive's mark covers the partitions its topic files
            // count: a partition added to a topic (or a listed topic
            // created) before these units were committed is counted first,
            // so the mark waits for it (read from its beginning once
            // assigned) instead of leaving out its records. Each `k` was
            // known before this question was asked.
            let counted = note_topics(&consumer, &topics, &root);
            if let Err(e) = &counted {
                tracing::debug!(error = %format!("{e:#}"), "cannot note the topics' partitions; the completeness mark waits");
            }
            for (tp, k) in probes {
                let probe = counted
                    .as_ref()
                    .ok()
                    .and_then(|()| {
                        consumer
                            .fetch_watermarks(&tp.0, tp.1, Duration::from_secs(5))
                            .ok()
                    })
                    .map(|(_, lso)| Probe {
                        at: Instant::now(),
                        lso,
                        k,
                    });
                let _ = done.send(Done::Probe(tp, probe));
            }
        });
    }
    if lag_known {
        metrics::gauge!(names::SINK_LAG_RECORDS).set(lag as f64);
    }
    note_held(cfg, parts);
    if hint.count() > 0 {
        if let Err(e) = consumer.commit(&hint, CommitMode::Async) {
            tracing::debug!(error = %e, "cannot commit the offset hint");
        }
    }
    let root = seg.root.clone();
    if ticks % 5 == 1 {
        // What other instances' partitions show committed.
        let done = done_tx.clone();
        let root = root.clone();
        tokio::task::spawn_blocking(move || {
            let _ = done.send(Done::Others(others_known(&root)));
        });
    }
    // Often: a partition's mark from its own events waits for this (see
    // `Done::Topics`).
    if ticks % 2 == 1 && !noting.swap(true, std::sync::atomic::Ordering::AcqRel) {
        let (done, consumer, topics, root, noting) = (
            done_tx.clone(),
            consumer.clone(),
            cfg.topics.clone(),
            root.clone(),
            noting.clone(),
        );
        tokio::task::spawn_blocking(move || {
            // Cleared however the note ends, a panic included: else no
            // note would run again, and the marks would stall unseen.
            struct Clear(std::sync::Arc<std::sync::atomic::AtomicBool>);
            impl Drop for Clear {
                fn drop(&mut self) {
                    self.0.store(false, std::sync::atomic::Ordering::Release);
                }
            }
            let clear = Clear(noting);
            let noted = note_topics(&consumer, &topics, &root);
            drop(clear);
            let _ = done.send(Done::Topics(noted, known));
        });
    }
    if ticks % 10 == 5 {
        let done = done_tx.clone();
        let root = root.clone();
        let window = seg.retention_window;
        tokio::task::spawn_blocking(move || {
            let archive = Archive::open(&root).ok();
            let _ = done.send(Done::Complete(
                archive.as_ref().and_then(|a| a.complete_before(false)),
            ));
            if let Some(window) = window {
                let _ = done.send(Done::Retention(crate::retention::plan(
                    &root,
                    window,
                    std::time::SystemTime::now(),
                )));
            }
        });
    }
}

/// Notes in the archive how many partitions each of `topics` has now, as
/// the brokers say (a listed topic not created yet has none to note).
/// Blocks.
fn note_topics(consumer: &SharedConsumer, topics: &[String], root: &Path) -> anyhow::Result<()> {
    for t in topics {
        let md = consumer.fetch_metadata(Some(t), Duration::from_secs(5))?;
        for mt in md.topics() {
            match mt.error() {
                None if !mt.partitions().is_empty() => {
                    segments::note_partitions(root, mt.name(), mt.partitions().len() as i32)?;
                }
                // A topic that does not exist (yet) holds no unit's events.
                None => {}
                Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => {}
                // Anything else (a leader being elected, no permission) says
                // nothing of its partitions: nothing is counted from this
                // note, lest a mark cover a unit with events there.
                Some(e) => {
                    anyhow::bail!("cannot read the partitions of topic {}: {e:?}", mt.name())
                }
            }
        }
    }
    Ok(())
}

/// The latest unit known committed, from every partition's checkpoint in
/// the archive (durable there, so committed in Kafka).
fn others_known(root: &Path) -> Option<(i64, Option<i64>)> {
    let mut k = None;
    for topic in std::fs::read_dir(root).ok()?.flatten() {
        let Ok(parts) = std::fs::read_dir(topic.path()) else {
            continue;
        };
        for p in parts.flatten() {
            if let Ok(Some(cp)) = PartitionCheckpoint::load(&p.path()) {
                k = later(k, cp.last.as_ref().and_then(known_from));
                // A heartbeat's partition has a mark and no line.
                let marked = cp
                    .complete_before
                    .and_then(|m| Some((m.commit_order? - 1, m.ts_us)));
                k = later(k, marked);
            }
        }
    }
    k
}
