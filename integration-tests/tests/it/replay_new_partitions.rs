//! pg-replay following a segmented archive whose topic gains partitions
//! while everything runs (issue 13, with issue 12's `--follow`): the
//! follower picks up each partition file-sink adds to the archive, reads
//! it from its start, and merges its events with the others' in source
//! commit order, so the target ends equal to the source.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rand::SeedableRng as _;
use tidemark_common::archive::Archive;
use tidemark_common::pg::TableName;
use tokio_util::sync::CancellationToken;

use crate::archive::{archive_lines, archive_sink};
use crate::new_partitions::add_partitions;
use crate::replay::{config, Db};
use crate::replay_segments::{rows, wait_idle, write, DDL};
use crate::support::*;

/// Waits up to 90 s for the target to hold `want`; false when the
/// follower stopped first.
async fn caught_up(
    pool: &sqlx::PgPool,
    want: &[String],
    follower: &tokio::task::JoinHandle<anyhow::Result<pg_replay::Summary>>,
) -> bool {
    let deadline = Instant::now() + Duration::from_secs(90);
    while rows(pool).await != want {
        if follower.is_finished() {
            return false;
        }
        assert!(
            Instant::now() < deadline,
            "the follower did not catch up within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    true
}

/// pg-source writes a topic of one partition, file-sink archives it in
/// segments, and pg-replay follows the archive; then two partitions are
/// added to the topic, and the transactions written after it spread over
/// all three (pg-source's producer looks at the topic's partitions every
/// second). The follower must pick up the two new partitions without a
/// restart and apply every unit once, in commit order: the target ends
/// equal to the source, row for row, and the follower applied as many
/// units as the archive holds. Before the fix it never read the new
/// partitions: units with events there stayed incomplete, and the ones
/// after them waited, so the target stopped short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_picks_up_partitions_added_to_the_topic_and_applies_in_commit_order() {
    let fx = Fixture::logical().await;
    let topic = fx.topic();
    let mut c = fx.source_connector();
    c.apply_overrides([("topic.creation.default.partitions", Some("1".to_owned()))]);
    let (mut source_cfg, _) = pg_source::Config::from_connector(&c, kafka()).unwrap();
    source_cfg.offsets_topic = format!("{}offsets", fx.prefix);
    source_cfg
        .kafka
        .properties
        .push(("topic.metadata.refresh.interval.ms".into(), "1000".into()));
    let source = Running::start(|token| pg_source::run(source_cfg, token));
    let root = fx.dir.path().join("archive");
    let mut sink_cfg = archive_sink(
        &fx.sink_name,
        &topic,
        &root,
        &[
            ("file.rotate.bytes", "12000"),
            ("file.rotate.interval.ms", "1000"),
            ("file.compression", "zstd"),
        ],
    );
    sink_cfg.metadata_refresh = Duration::from_secs(1);
    let sink = Running::start(|token| file_sink::run(sink_cfg, token));
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let mut next = 1000;
    write(&fx.pool, &mut rng, 20, &mut next).await;
    wait_idle(&root).await;

    let db = Db::new().await;
    db.exec(DDL).await;
    let mut cfg = config(&db, &[&root]);
    cfg.follow = true;
    cfg.name = "grower".into();
    let stop = CancellationToken::new();
    let follower = tokio::spawn(pg_replay::run(cfg, stop.clone()));
    write(&fx.pool, &mut rng, 30, &mut next).await;
    wait_idle(&root).await;
    let want = rows(&fx.pool).await;
    if !caught_up(&db.pool, &want, &follower).await {
        panic!(
            "the follower stopped before partitions were added: {:?}",
            follower.await
        );
    }

    add_partitions(&topic, 3).await;
    // Some right away (the producer may not know the new partitions yet),
    // then more once it does: units span the partitions.
    write(&fx.pool, &mut rng, 20, &mut next).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    write(&fx.pool, &mut rng, 150, &mut next).await;
    wait_idle(&root).await;
    let final_rows = rows(&fx.pool).await;
    let done = caught_up(&db.pool, &final_rows, &follower).await;
    stop.cancel();
    let summary = follower
        .await
        .unwrap()
        .expect("the follower applies every unit in commit order");
    assert!(done, "the follower stopped early");
    source.stop().await.unwrap();
    sink.stop().await.unwrap();

    // The new partitions were really written to, and each unit of the
    // archive was applied once.
    let Archive::Segmented { partitions, .. } = Archive::open(&root).unwrap() else {
        panic!("not segmented")
    };
    let written: Vec<i32> = partitions
        .iter()
        .filter(|p| p.checkpoint.as_ref().is_some_and(|c| c.last.is_some()))
        .map(|p| p.partition)
        .collect();
    assert_eq!(written, vec![0, 1, 2], "every partition holds records");
    let units: BTreeSet<i64> = archive_lines(&root)
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let event = if v.get("payload").is_some() {
                &v["payload"]
            } else {
                &v
            };
            event["transaction"]["commit_order"]
                .as_i64()
                .unwrap_or_else(|| panic!("an event without its unit: {l}"))
        })
        .collect();
    assert_eq!(
        summary.units,
        units.len() as u64,
        "every unit of the archive applied once"
    );
    assert_eq!(summary.position, units.last().copied());
    assert_eq!(rows(&db.pool).await, final_rows);
    let verify = pg_replay::verify::VerifyConfig {
        source: fx.target.clone(),
        target: db.target.clone(),
        tables: vec![(
            TableName::parse("streaming_update_table").unwrap(),
            TableName::parse("streaming_update_table").unwrap(),
        )],
        chunk_rows: 50,
        leaf_rows: 10,
        max_diffs: 10,
    };
    let report = pg_replay::verify::verify(&verify).await.unwrap();
    assert!(report.equal(), "{report:?}");
    fx.drop_slot().await;
}

/// Produces units `units` of two inserts into table `t` each (keys
/// `co * 10 + 1` and `+ 2`), unit `co` wholly in the partition
/// `place(co)`, in commit order. The events do not name the unit before
/// them (no `prev_commit_order`), so only the partitions' completeness
/// marks can tell the replay that no earlier unit is still to come.
pub(crate) async fn produce_placed(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    units: std::ops::RangeInclusive<i64>,
    place: impl Fn(i64) -> i32,
) {
    use rdkafka::producer::FutureRecord;
    let mut pending = Vec::new();
    for co in units {
        for ord in 1..=2 {
            let id = co * 10 + ord;
            let line = crate::replay::event(
                "c",
                "t",
                serde_json::Value::Null,
                serde_json::json!({"id": id, "data": format!("unit {co}")}),
                co,
                ord,
                (ord == 2).then_some(2),
                co + 100,
                co,
            );
            let key = format!("{{\"id\":{id}}}");
            pending.push(
                producer
                    .send_result(
                        FutureRecord::to(topic)
                            .partition(place(co))
                            .key(key.as_bytes())
                            .payload(line.as_bytes()),
                    )
                    .map_err(|(e, _)| e)
                    .unwrap(),
            );
        }
    }
    for p in pending {
        p.await.unwrap().unwrap();
    }
}

/// The same with events that do not name the unit before them: after a
/// partition is added, the odd units go to partition 0 and the even ones
/// to the new partition 1, which file-sink reads only once its metadata
/// shows it. Partition 0's archive then holds units 23, 25, ... before
/// unit 22 is anywhere in the archive: the follower must not apply them
/// on the strength of partition 0 having been read past them, only once
/// the completeness marks (which wait for partition 1) say no earlier
/// unit can come. Applied out of order, unit 22 would arrive after 23 was
/// applied and stop the follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_never_applies_a_unit_before_one_in_a_partition_added_later() {
    let topic = crate::archive::topic(1).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("archive");
    let mut sink_cfg = archive_sink(
        &unique("placed"),
        &topic,
        &root,
        &[("file.rotate.bytes", "4000")],
    );
    sink_cfg.metadata_refresh = Duration::from_secs(1);
    let sink = Running::start(|token| file_sink::run(sink_cfg, token));
    let producer = crate::archive::producer();
    produce_placed(&producer, &topic, 1..=20, |_| 0).await;
    wait_idle(&root).await;

    let db = Db::new().await;
    db.exec("create table t (id int primary key, data text not null)")
        .await;
    let count = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>("select count(*) from t")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let mut cfg = config(&db, &[&root]);
    cfg.follow = true;
    let stop = CancellationToken::new();
    let follower = tokio::spawn(pg_replay::run(cfg, stop.clone()));
    let wait = |n: i64| {
        let (pool, follower) = (db.pool.clone(), &follower);
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while count(pool.clone()).await < n {
                if follower.is_finished() {
                    return false;
                }
                assert!(
                    Instant::now() < deadline,
                    "the follower did not get to {n} rows"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            true
        }
    };
    let mut done = wait(40).await;

    if done {
        add_partitions(&topic, 2).await;
        let producer = crate::archive::producer();
        produce_placed(&producer, &topic, 21..=60, |co| (co % 2 == 0) as i32).await;
        done = wait(120).await;
    }
    stop.cancel();
    let summary = follower
        .await
        .unwrap()
        .expect("the follower applies every unit in commit order");
    sink.stop().await.unwrap();
    assert!(done, "the follower stopped early");
    assert_eq!((summary.units, summary.position), (60, Some(60)));
    let got: Vec<(i32, String)> = sqlx::query_as("select id, data from t order by id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let want: Vec<(i32, String)> = (1..=60)
        .flat_map(|co| {
            [
                (co * 10 + 1, format!("unit {co}")),
                (co * 10 + 2, format!("unit {co}")),
            ]
        })
        .collect();
    assert_eq!(got, want);
}
