//! The Kafka consumer's context: what librdkafka's statistics say about
//! each partition, for the lag gauge and for knowing when a partition has
//! been read to its end.
//!
//! On a transactional topic the last offset of a partition is usually a
//! transaction's commit marker, which is never delivered to the reader: a
//! sink that has written everything stands one (or more) offsets short of
//! the end. librdkafka knows it stepped over the marker, and says so in its
//! statistics (`app_offset`, against `ls_offset`, the last stable offset).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;

/// What librdkafka last said about one partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct PartitionStats {
    /// The offset after the last message handed to the sink, commit
    /// markers and aborted records included; negative before the first.
    pub app_offset: i64,
    /// The last stable offset: what a `read_committed` reader can read up
    /// to; negative until the first fetch answered.
    pub ls_offset: i64,
}

impl PartitionStats {
    /// How far the partition is durably handled: `next` is the next offset
    /// the checkpoint covers, `delivered` the next offset after the last
    /// record handed to the sink (as the sink counted them).
    ///
    /// librdkafka counts commit markers and aborted records it stepped over
    /// as handed over (`app_offset` moves past them), so once every record
    /// handed over is written, everything before `app_offset` is handled.
    pub fn handled(&self, next: i64, delivered: i64) -> i64 {
        if next >= delivered {
            next.max(self.app_offset)
        } else {
            next
        }
    }

    /// Records in the partition not yet durably written (see
    /// [`Self::handled`] for `next` and `delivered`); `None` while
    /// librdkafka has not yet learnt the partition's end.
    pub fn lag(&self, next: i64, delivered: i64) -> Option<i64> {
        if self.ls_offset < 0 {
            return None;
        }
        Some((self.ls_offset - self.handled(next, delivered)).max(0))
    }
}

/// The latest statistics, by topic and partition, and when they came.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// When librdkafka emitted them.
    pub at: Option<Instant>,
    /// Per `(topic, partition)`.
    pub partitions: HashMap<(String, i32), PartitionStats>,
    /// Bytes received from the brokers since start, as sent (compressed).
    pub rx_bytes: u64,
    /// Bytes of the records in them, uncompressed.
    pub rxmsg_bytes: u64,
}

/// The consumer's context: keeps the latest statistics and, for a member
/// of a consumer group, hands rebalances to the reading loop.
#[derive(Debug, Default)]
pub struct SinkContext {
    stats: Mutex<Snapshot>,
    group: Option<Arc<Rebalances>>,
}

/// What a rebalance did, for the reading loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rebalance {
    /// Partitions now assigned (paused), with the offset each was assigned
    /// at (`None`: the beginning).
    Assigned(Vec<((String, i32), Option<i64>)>),
    /// Partitions no longer assigned.
    Revoked(Vec<(String, i32)>),
}

/// Where reading a partition (topic, number) starts; `None`: the beginning.
type StartFn = dyn Fn(&str, i32) -> Option<i64> + Send + Sync;

/// Rebalances waiting for the reading loop, and how to find where each
/// partition's reading starts.
pub struct Rebalances {
    events: Mutex<Vec<Rebalance>>,
    /// Wakes the reading loop.
    pub notify: tokio::sync::Notify,
    /// Where a partition's reading starts, read without its lock: never
    /// later than where it starts once the lock is held, as checkpoints
    /// only move forward.
    start: Box<StartFn>,
}

impl std::fmt::Debug for Rebalances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rebalances")
            .field("events", &self.events)
            .finish()
    }
}

impl Rebalances {
    /// A queue whose assignments start where `start` says.
    pub fn new(start: impl Fn(&str, i32) -> Option<i64> + Send + Sync + 'static) -> Self {
        Self {
            events: Mutex::new(Vec::new()),
            notify: tokio::sync::Notify::new(),
            start: Box::new(start),
        }
    }

    /// Takes the rebalances that happened since the last call.
    pub fn take(&self) -> Vec<Rebalance> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn push(&self, r: Rebalance) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(r);
        self.notify.notify_one();
    }
}

impl SinkContext {
    /// A context for a consumer group member, handing rebalances to
    /// `group`.
    pub fn for_group(group: Arc<Rebalances>) -> Self {
        Self {
            stats: Mutex::default(),
            group: Some(group),
        }
    }

    /// When the latest statistics were emitted, the bytes received from
    /// the brokers by then (as sent) and the bytes of the records in them
    /// (keys and values, decompressed), since start.
    pub fn traffic(&self) -> (Option<Instant>, u64, u64) {
        let s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        (s.at, s.rx_bytes, s.rxmsg_bytes)
    }

    /// The statistics of one partition, with when they were emitted.
    pub fn partition(&self, topic: &str, partition: i32) -> Option<(Instant, PartitionStats)> {
        let s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let at = s.at?;
        s.partitions
            .get(&(topic.to_owned(), partition))
            .map(|p| (at, *p))
    }
}

/// The smallest per-partition fetch (`fetch.message.max.bytes`) file-sink
/// asks for, and where it starts: safe for records that compress 40:1.
pub const FETCH_MIN: usize = 64 * 1024;
/// The largest: about what `ConsumerPerformance` asks for.
pub const FETCH_MAX: usize = 1024 * 1024;
/// What one partition's fetch may expand to once decompressed.
pub const FETCH_EXPANDED: usize = 2 * 1024 * 1024;
/// Bytes a statistics interval must have brought to judge the ratio by.
const FETCH_SAMPLE: u64 = 1024 * 1024;

/// Sizes the per-partition fetch to what the topic's records expand to.
///
/// A fetch brings compressed batches, which librdkafka decompresses whole
/// before its queue bound (`queued.max.messages.kbytes`, counted in
/// decompressed bytes) can stop the next fetch: one fetch expanded is what
/// the read-ahead may overshoot by. Records that compress 40:1 make 64 KiB
/// fetched 2.6 MB in memory; records written without compression make
/// 64 KiB about 90 records of 750 B, and a round trip to the broker per 90
/// records holds the sink to a fraction of what it can write. So the fetch
/// is sized from what the brokers actually send: the bytes of records
/// received (decompressed) over the bytes received, from librdkafka's
/// statistics, such that one fetch expands to about [`FETCH_EXPANDED`],
/// within [`FETCH_MIN`]..=[`FETCH_MAX`], a power of two. It grows only when
/// four times larger is wanted and shrinks as soon as half is enough, so
/// it does not go back and forth on a ratio near a boundary.
#[derive(Debug)]
pub struct FetchSizer {
    /// The fetch size in use.
    pub current: usize,
    /// The statistics last judged by: when, bytes received, bytes of
    /// records; `None`: none yet, counting from zero.
    last: Option<(Instant, u64, u64)>,
}

impl Default for FetchSizer {
    fn default() -> Self {
        Self {
            current: FETCH_MIN,
            last: None,
        }
    }
}

impl FetchSizer {
    /// The fetch size for records that expand `ratio` times.
    pub fn wanted(ratio: f64) -> usize {
        let fit = (FETCH_EXPANDED as f64 / ratio.max(1.0)) as usize;
        let pow = if fit.is_power_of_two() {
            fit
        } else {
            fit.next_power_of_two() / 2
        };
        pow.clamp(FETCH_MIN, FETCH_MAX)
    }

    /// Takes the latest statistics (when emitted, bytes received, bytes of
    /// records in them); returns the new fetch size when it should change.
    pub fn observe(&mut self, at: Option<Instant>, rx: u64, rxmsg: u64) -> Option<usize> {
        let at = at?;
        // The counters start at zero with the consumer.
        let (was_at, was_rx, was_rxmsg) =
            self.last.map_or((None, 0, 0), |(a, r, m)| (Some(a), r, m));
        if was_at == Some(at) {
            return None;
        }
        let (drx, drxmsg) = (rx.saturating_sub(was_rx), rxmsg.saturating_sub(was_rxmsg));
        if drx < FETCH_SAMPLE {
            // Too little to judge by; keep counting from the same start.
            if rx < was_rx {
                self.last = Some((at, rx, rxmsg));
            }
            return None;
        }
        self.last = Some((at, rx, rxmsg));
        let wanted = Self::wanted(drxmsg as f64 / drx as f64);
        if wanted >= self.current * 4 || wanted <= self.current / 2 {
            self.current = wanted;
            return Some(wanted);
        }
        None
    }

    /// Whether a ratio has been judged since the start (or restart).
    pub fn judged(&self) -> bool {
        self.last.is_some()
    }

    /// Forgets the byte counts (a new consumer counts from zero).
    pub fn restart(&mut self) {
        self.last = None;
    }
}

#[derive(Deserialize)]
struct RawStats {
    #[serde(default)]
    topics: HashMap<String, RawTopic>,
    #[serde(default)]
    rx_bytes: u64,
    #[serde(default)]
    rxmsg_bytes: u64,
}

#[derive(Deserialize)]
struct RawTopic {
    #[serde(default)]
    partitions: HashMap<String, PartitionStats>,
}

impl ClientContext for SinkContext {
    /// librdkafka's log, except that a failed offset commit during a
    /// rebalance (the offsets are only a hint for lag tools; the checkpoints
    /// hold the position) is not a warning.
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            _ if fac == "COMMITFAIL" => tracing::debug!(target: "librdkafka", "{fac} {message}"),
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", "librdkafka: {fac} {message}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", "librdkafka: {fac} {message}"),
            L::Notice | L::Info => {
                tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}")
            }
            L::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}"),
        }
    }

    fn stats_raw(&self, statistics: &[u8]) {
        let raw: RawStats = match serde_json::from_slice(statistics) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read librdkafka's statistics");
                return;
            }
        };
        let mut partitions = HashMap::new();
        for (topic, t) in &raw.topics {
            for (p, stats) in &t.partitions {
                // "-1" is librdkafka's internal unassigned partition.
                if let Ok(p) = p.parse::<i32>() {
                    if p >= 0 {
                        partitions.insert((topic.clone(), p), *stats);
                    }
                }
            }
        }
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        *s = Snapshot {
            at: Some(Instant::now()),
            partitions,
            rx_bytes: raw.rx_bytes,
            rxmsg_bytes: raw.rxmsg_bytes,
        };
    }
}

impl ConsumerContext for SinkContext {
    /// Assigns new partitions at where their checkpoints say and pauses
    /// them until the reading loop holds their locks; lets revoked ones go
    /// at once. Only a group member (one that subscribed) gets here.
    ///
    /// Nothing here waits: a partition whose former owner is still
    /// finishing is waited for by the reading loop, not by librdkafka's
    /// poll, so this member keeps its place in the group meanwhile.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let Some(group) = &self.group else {
            return;
        };
        let parts: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut assigned = Vec::new();
                for (topic, p) in parts {
                    let start = (group.start)(&topic, p);
                    let offset = start.map_or(Offset::Beginning, Offset::Offset);
                    if let Err(e) = tpl.set_partition_offset(&topic, p, offset) {
                        tracing::warn!(topic, partition = p, error = %e, "cannot set the start offset");
                    }
                    assigned.push(((topic, p), start));
                }
                if let Err(e) = consumer.incremental_assign(tpl) {
                    tracing::warn!(error = %e, "cannot take the assigned partitions");
                }
                if let Err(e) = consumer.pause(tpl) {
                    tracing::warn!(error = %e, "cannot pause the assigned partitions");
                }
                group.push(Rebalance::Assigned(assigned));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if consumer.assignment_lost() {
                    tracing::warn!(partitions = parts.len(), "the group took these partitions away (this member was away too long); letting them go");
                }
                if let Err(e) = consumer.incremental_unassign(tpl) {
                    tracing::warn!(error = %e, "cannot let the revoked partitions go");
                }
                group.push(Rebalance::Revoked(parts));
            }
            other => {
                tracing::warn!(error = ?other, "the consumer group's rebalance failed; it is retried");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_marker_after_the_last_record_is_no_lag() {
        // Records 0..=9 handed over, the commit marker at 10 stepped over,
        // the end at 11.
        let s = PartitionStats {
            app_offset: 11,
            ls_offset: 11,
        };
        assert_eq!(s.lag(10, 10), Some(0));
        // Handed over but not yet written: the marker still counts.
        assert_eq!(s.lag(8, 10), Some(3));
        // Nothing handed over since the start: the checkpoint decides.
        assert_eq!(
            PartitionStats {
                app_offset: -1001,
                ..s
            }
            .lag(10, 0),
            Some(1)
        );
        assert_eq!(PartitionStats { ls_offset: -1, ..s }.lag(10, 10), None);
    }

    #[test]
    fn statistics_are_read_per_partition() {
        let ctx = SinkContext::default();
        ctx.stats_raw(
            br#"{"name":"c","topics":{"t":{"topic":"t","partitions":{
                "0":{"partition":0,"fetchq_cnt":0,"next_offset":11,"app_offset":11,"ls_offset":11,"hi_offset":11},
                "-1":{"partition":-1,"fetchq_cnt":0,"next_offset":0,"app_offset":0,"ls_offset":0}}}}}"#,
        );
        let (_, p) = ctx.partition("t", 0).unwrap();
        assert_eq!(p.app_offset, 11);
        assert!(ctx.partition("t", -1).is_none());
    }

    #[test]
    fn the_fetch_is_sized_to_what_it_expands_to() {
        assert_eq!(FetchSizer::wanted(0.93), FETCH_MAX);
        assert_eq!(FetchSizer::wanted(1.0), FETCH_MAX);
        assert_eq!(FetchSizer::wanted(3.0), 512 * 1024);
        assert_eq!(FetchSizer::wanted(4.0), 512 * 1024);
        assert_eq!(FetchSizer::wanted(40.0), FETCH_MIN);

        let t0 = Instant::now();
        let at = |s: u64| Some(t0 + std::time::Duration::from_secs(s));
        let mb = 1024 * 1024;
        let mut z = FetchSizer::default();
        assert_eq!(z.observe(None, 0, 0), None);
        // Too little traffic to judge by.
        assert_eq!(z.observe(at(0), mb / 2, mb / 2), None);
        assert_eq!(z.current, FETCH_MIN);
        // Uncompressed records: the largest fetch; the same statistics
        // again change nothing.
        assert_eq!(z.observe(at(2), 10 * mb, 9 * mb), Some(FETCH_MAX));
        assert_eq!(z.observe(at(2), 10 * mb, 9 * mb), None);
        assert_eq!(z.current, FETCH_MAX);
        // 3:1 wants 512 KiB: half is enough, so it shrinks...
        assert_eq!(z.observe(at(3), 20 * mb, 39 * mb), Some(512 * 1024));
        // ...but uncompressed again is only twice larger: it stays.
        assert_eq!(z.observe(at(4), 30 * mb, 49 * mb), None);
        // Records that compress 40:1 shrink it at once.
        assert_eq!(z.observe(at(5), 40 * mb, 449 * mb), Some(FETCH_MIN));
        // A new consumer's counters start from zero.
        z.restart();
        assert_eq!(z.observe(at(6), 2 * mb, 2 * mb), Some(FETCH_MAX));
    }
}
