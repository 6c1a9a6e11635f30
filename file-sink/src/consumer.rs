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

    /// The statistics of one partition, with when they were emitted.
    pub fn partition(&self, topic: &str, partition: i32) -> Option<(Instant, PartitionStats)> {
        let s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let at = s.at?;
        s.partitions
            .get(&(topic.to_owned(), partition))
            .map(|p| (at, *p))
    }
}

#[derive(Deserialize)]
struct RawStats {
    #[serde(default)]
    topics: HashMap<String, RawTopic>,
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
        for (topic, t) in raw.topics {
            for (p, stats) in t.partitions {
                // "-1" is librdkafka's internal unassigned partition.
                if let Ok(p) = p.parse::<i32>() {
                    if p >= 0 {
                        partitions.insert((topic.clone(), p), stats);
                    }
                }
            }
        }
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        *s = Snapshot {
            at: Some(Instant::now()),
            partitions,
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
}
