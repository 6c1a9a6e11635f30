//! Heartbeats in `changelog` mode (issue 14.5): with no change in the
//! captured tables, pg-source still commits its position and writes a
//! heartbeat, and file-sink's segmented archive moves its completeness mark
//! by it, so how far the archive is complete is always known.

use schema_init::TriggerLevel;
use tidemark_common::archive::{Archive, Mark};

use super::*;
use crate::archive::archive_sink;
use crate::support::Running;

/// The archive's completeness mark once `done` holds of it, within `WAIT`.
async fn mark_when(root: &std::path::Path, what: &str, done: impl Fn(Mark) -> bool) -> Mark {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = Archive::open(root)
            .ok()
            .and_then(|a| a.complete_before(false));
        if let Some(m) = m.filter(|m| done(*m)) {
            return m;
        }
        assert!(Instant::now() < deadline, "{what}: the mark is {m:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Two captured tables, one of them never written: after the last change
/// the archive's mark passes its unit, and then, with no change at all,
/// its time moves on past the quiet spell's start while its unit stays;
/// a change after the heartbeats completes its unit as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_change_heartbeats_move_the_archive_s_completeness_mark() {
    let db = Db::new().await;
    for t in ["q", "r"] {
        exec(
            &db.admin,
            &format!("create table public.{t} (id int8 primary key, v text not null)"),
        )
        .await;
        db.capture(t, Capture::full(TriggerLevel::Row)).await;
    }
    exec(&db.admin, "insert into public.q values (1, 'a')").await;
    let source = db
        .start_source(&["q", "r"], &[("heartbeat.interval.ms", "300")])
        .await;
    let heartbeats = format!("__tidemark-heartbeat.{}", db.source_name);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("archive");
    let topics = [db.topic("q"), db.topic("r"), heartbeats];
    let cfg = archive_sink(
        &unique("hb"),
        &topics.join(","),
        &root,
        &[("file.rotate.bytes", "1000000")],
    );
    let sink = Running::start(|t| file_sink::run(cfg, t));
    // Unit 0 is the snapshot of q's row, unit 1 this insert.
    exec(&db.admin, "insert into public.q values (2, 'b')").await;
    mark_when(&root, "unit 1 complete", |m| m.commit_order >= Some(2)).await;
    let quiet_from = tidemark_common::envelope::now_us();
    let later = mark_when(&root, "the quiet spell's heartbeats", |m| {
        m.ts_us.is_some_and(|t| t > quiet_from + 1_000_000)
    })
    .await;
    assert_eq!(later.commit_order, Some(2), "no unit came: {later:?}");
    exec(&db.admin, "insert into public.q values (3, 'c')").await;
    mark_when(&root, "unit 2 complete", |m| m.commit_order >= Some(3)).await;
    sink.stop().await.unwrap();
    source.stop().await;
    // file-sink wrote no line for a heartbeat.
    let lines = crate::archive::archive_lines(&root);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(lines.iter().all(|l| !l.contains("tidemark.heartbeat")));
}

/// Issue 15.1: an initial snapshot's Kafka transactions each hold several
/// of its reads (`snapshot.fetch.size` rows), rather than one read each, and
/// every row arrives once. The position is written once per transaction:
/// fewer positions with the snapshot under way than reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_s_kafka_transactions_hold_several_reads() {
    let db = Db::new().await;
    exec(
        &db.admin,
        "create table public.s (id int8 primary key, v text not null)",
    )
    .await;
    exec(
        &db.admin,
        "insert into public.s select g, 'v' || g from generate_series(1, 6000) g",
    )
    .await;
    db.capture("s", Capture::full(TriggerLevel::Row)).await;
    let topic = db.topic("s");
    let offsets = format!("{}offsets", db.prefix);
    let mut reader = TopicReader::new(&[topic.as_str()]);
    let source = db
        .start_source(&["s"], &[("snapshot.fetch.size", "500")])
        .await;
    reader.at_least(&topic, 6000).await;
    source.stop().await;
    let ids: std::collections::BTreeSet<i64> = reader.events[&topic]
        .iter()
        .map(|e| e.after().unwrap()["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 6000, "every row once");
    assert_eq!(reader.events[&topic].len(), 6000, "every row once");
    let under_way = positions(&offsets)
        .iter()
        .filter(|v| v.get("snapshot").is_some())
        .count();
    assert!(
        under_way < 11,
        "12 reads of 500 rows went into {} Kafka transactions before the snapshot's last",
        under_way
    );
}

/// Every position record of the offsets topic `topic`, committed ones only.
pub(super) fn positions(topic: &str) -> Vec<serde_json::Value> {
    use rdkafka::consumer::BaseConsumer;
    let consumer: BaseConsumer = crate::support::kafka()
        .client_config(&[
            ("group.id", &unique("positions")),
            ("auto.offset.reset", "earliest"),
            ("isolation.level", "read_committed"),
        ])
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(3) {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if let Some(v) = m.payload() {
                    out.push(serde_json::from_slice(v).unwrap());
                }
                quiet_since = Instant::now();
            }
            Some(Err(e)) => panic!("cannot read {topic}: {e}"),
            None => {}
        }
    }
    out
}
