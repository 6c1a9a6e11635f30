//! Telling a topic deleted and created again from the one an output holds.
//!
//! After `docker compose down -v` and `up`, pg-source creates its topics
//! anew: same names, new contents, offsets from 0. A checkpoint's offsets
//! then point into another log. Each checkpoint keeps a fingerprint of the
//! last record read from each partition (offset, Kafka timestamp, hash of
//! key and value); the topic is still the one archived when it holds that
//! same record at that offset. It is another one when it ends before that
//! offset or holds another record there. (Kafka's topic IDs would say the
//! same, but the Kafka client Tidemark uses does not expose them.) When the
//! fingerprinted record is gone (compaction, retention), nothing can be
//! told, and reading goes on as before: records deleted before they were
//! read still stop the sink.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use sha2::Digest as _;
use tidemark_common::archive::Fingerprint;
use tidemark_common::kafka::KafkaSettings;

/// The fingerprint of a record.
pub fn fingerprint(
    offset: i64,
    timestamp: Option<i64>,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> Fingerprint {
    let mut h = sha2::Sha256::new();
    // Lengths first, so key and value cannot trade bytes.
    for part in [key, value] {
        match part {
            Some(b) => {
                h.update((b.len() as u64).to_le_bytes());
                h.update(b);
            }
            None => h.update(u64::MAX.to_le_bytes()),
        }
    }
    let digest = h.finalize();
    Fingerprint {
        offset,
        timestamp,
        hash: digest[..8].iter().map(|b| format!("{b:02x}")).collect(),
    }
}

/// What a partition's log says about a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It holds the fingerprinted record.
    Same,
    /// The record is gone; nothing can be told.
    Unknown,
    /// It is another log; why.
    Recreated(String),
}

/// Tells whether the fingerprinted record is still at its offset, when the
/// log's end (`high`, the last stable offset) and start (`low`) are known:
/// `None` when the record must be read to tell.
pub fn by_offsets(
    topic: &str,
    partition: i32,
    fp: &Fingerprint,
    low: i64,
    high: i64,
) -> Option<Verdict> {
    if high <= fp.offset {
        return Some(Verdict::Recreated(format!(
            "{topic} partition {partition} ends at offset {high}, but the records read from it reach offset {}",
            fp.offset
        )));
    }
    if low > fp.offset {
        return Some(Verdict::Unknown);
    }
    None
}

/// Tells whether a record read at the fingerprint's offset (or the first
/// after it) is the fingerprinted one.
pub fn by_record(
    topic: &str,
    partition: i32,
    fp: &Fingerprint,
    offset: i64,
    timestamp: Option<i64>,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> Verdict {
    if offset > fp.offset {
        return Verdict::Unknown;
    }
    let same_time = fp.timestamp.is_none() || fp.timestamp == timestamp;
    if same_time && fingerprint(offset, timestamp, key, value).hash == fp.hash {
        Verdict::Same
    } else {
        Verdict::Recreated(format!(
            "{topic} partition {partition} holds another record at offset {offset} than the one read there before"
        ))
    }
}

/// Reads the partition at the fingerprint's offset and tells.
///
/// Fails when Kafka cannot be asked; a topic that does not exist (yet)
/// gives [`Verdict::Unknown`].
pub fn check(
    kafka: &KafkaSettings,
    topic: &str,
    partition: i32,
    fp: &Fingerprint,
) -> anyhow::Result<Verdict> {
    let consumer: BaseConsumer = kafka
        .client_config_fixed(
            &[("group.id", "tidemark-identity-check")],
            &[
                (
                    "isolation.level",
                    "read_committed",
                    "only committed records are compared",
                ),
                ("enable.auto.commit", "false", "the check commits nothing"),
            ],
        )?
        .create()
        .context("cannot create a Kafka consumer to check the topic")?;
    let (low, high) = match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
        Ok(w) => w,
        Err(e)
            if e.rdkafka_error_code()
                == Some(rdkafka::error::RDKafkaErrorCode::UnknownTopicOrPartition) =>
        {
            return Ok(Verdict::Unknown)
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("cannot read the offsets of {topic} partition {partition}")
            })
        }
    };
    if let Some(v) = by_offsets(topic, partition, fp, low, high) {
        return Ok(v);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(fp.offset))?;
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                return Ok(by_record(
                    topic,
                    partition,
                    fp,
                    m.offset(),
                    m.timestamp().to_millis(),
                    m.key(),
                    m.payload(),
                ))
            }
            Some(Err(e)) => tracing::debug!(error = %e, "checking the topic"),
            None => {}
        }
    }
    Ok(Verdict::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_told_by_its_offset_key_and_value() {
        let fp = fingerprint(9, Some(5), Some(b"k"), Some(b"v"));
        assert_eq!(
            by_record("t", 0, &fp, 9, Some(5), Some(b"k"), Some(b"v")),
            Verdict::Same
        );
        assert!(matches!(
            by_record("t", 0, &fp, 9, Some(5), Some(b"k"), Some(b"w")),
            Verdict::Recreated(_)
        ));
        assert!(matches!(
            by_record("t", 0, &fp, 9, Some(5), Some(b"kv"), None),
            Verdict::Recreated(_)
        ));
        assert!(matches!(
            by_record("t", 0, &fp, 9, Some(6), Some(b"k"), Some(b"v")),
            Verdict::Recreated(_)
        ));
        assert_eq!(
            by_record("t", 0, &fp, 12, None, None, None),
            Verdict::Unknown
        );
        assert!(matches!(
            by_offsets("t", 0, &fp, 0, 9),
            Some(Verdict::Recreated(_))
        ));
        assert_eq!(by_offsets("t", 0, &fp, 10, 20), Some(Verdict::Unknown));
        assert_eq!(by_offsets("t", 0, &fp, 0, 10), None);
    }
}
