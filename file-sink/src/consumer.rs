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
use std::sync::Mutex;
use std::time::Instant;

use rdkafka::client::ClientContext;
use rdkafka::consumer::ConsumerContext;
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

/// The consumer's context: keeps the latest statistics.
#[derive(Debug, Default)]
pub struct SinkContext {
    stats: Mutex<Snapshot>,
}

impl SinkContext {
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

impl ConsumerContext for SinkContext {}

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
