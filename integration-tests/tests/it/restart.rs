//! Restarts and crashes of each program in the middle of a stream.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::*;

/// Inserts `n` rows in small committed transactions.
async fn insert_rows(pool: &sqlx::PgPool, from: i64, n: i64) {
    for chunk in (from..from + n).collect::<Vec<_>>().chunks(25) {
        sqlx::query("insert into streaming_update_table (data) select 'row ' || g from unnest($1::int8[]) g")
            .bind(chunk.to_vec())
            .execute(pool)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every id once, in id order (ids are inserted in increasing order).
fn assert_each_row_once(path: &std::path::Path, rows: i64) {
    let lines = read_lines(path);
    let mut count: BTreeMap<i64, usize> = BTreeMap::new();
    for l in &lines {
        *count.entry(int(l, "id")).or_default() += 1;
    }
    let missing: Vec<i64> = (1..=rows).filter(|id| !count.contains_key(id)).collect();
    let twice: Vec<(&i64, &usize)> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(missing.is_empty(), "missing ids: {missing:?}");
    assert!(twice.is_empty(), "ids written more than once: {twice:?}");
    assert_eq!(lines.len() as i64, rows);
    let ids: Vec<i64> = lines.iter().map(|l| int(l, "id")).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids out of order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restarts_of_each_program_lose_and_repeat_nothing() {
    let fx = Fixture::new().await;
    let source = fx.start_source();
    let sink = fx.start_sink();
    insert_rows(&fx.pool, 2, 300).await;
    wait_for_lines(&fx.file(), 50, Duration::from_secs(30)).await;
    source.stop().await.unwrap();
    insert_rows(&fx.pool, 302, 300).await;
    let source = fx.start_source();
    sink.stop().await.unwrap();
    insert_rows(&fx.pool, 602, 300).await;
    let sink = fx.start_sink();
    wait_for_lines(&fx.file(), 901, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    assert_each_row_once(&fx.file(), 901);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_mid_stream_lose_and_repeat_nothing() {
    let fx = Fixture::new().await;
    let writer = {
        let pool = fx.pool.clone();
        tokio::spawn(async move { insert_rows(&pool, 2, 1500).await })
    };
    let mut source = fx.start_source();
    let mut sink = fx.start_sink();
    // Kill each program a few times while rows keep coming.
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(300 + 130 * round)).await;
        if round % 2 == 0 {
            source.kill().await;
            source = fx.start_source();
        } else {
            sink.kill().await;
            sink = fx.start_sink();
        }
    }
    writer.await.unwrap();
    wait_for_lines(&fx.file(), 1501, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    source.assert_running();
    sink.assert_running();
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    assert_each_row_once(&fx.file(), 1501);
}

/// A checkpoint whose offset the topic no longer has (records deleted, the
/// topic recreated) stops file-sink with the offsets and the way out,
/// instead of silently reading the topic again from its start; the file is
/// left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_past_the_topic_stops_the_sink_with_the_way_out() {
    let fx = Fixture::new().await;
    let source = fx.start_source();
    let sink = fx.start_sink();
    insert_rows(&fx.pool, 2, 20).await;
    wait_for_lines(&fx.file(), 21, Duration::from_secs(30)).await;
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    let before = std::fs::read(fx.file()).unwrap();

    let cp_path = tidemark_common::offset::SinkCheckpoint::path_for(&fx.file());
    let mut cp: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cp_path).unwrap()).unwrap();
    cp["offsets"][fx.topic()]["0"] = serde_json::json!(1_000_000);
    std::fs::write(&cp_path, cp.to_string()).unwrap();

    let err = fx
        .start_sink()
        .exited(Duration::from_secs(60))
        .await
        .expect_err("file-sink must stop")
        .to_string();
    assert!(err.contains("not in the topic any more"), "{err}");
    assert!(err.contains("1000000"), "the error names the offset: {err}");
    assert!(
        err.contains("move it and"),
        "the error says how to start over: {err}"
    );
    assert_eq!(
        std::fs::read(fx.file()).unwrap(),
        before,
        "the file is untouched"
    );
}

/// Properties that exactly-once rests on cannot be overridden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_properties_that_would_break_exactly_once_are_refused() {
    let fx = Fixture::new().await;
    let mut cfg = fx.sink_config();
    cfg.kafka
        .properties
        .push(("isolation.level".into(), "read_uncommitted".into()));
    let err = file_sink::run(cfg, tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("file-sink must refuse")
        .to_string();
    assert!(
        err.contains("isolation.level=read_uncommitted is not allowed"),
        "{err}"
    );
    let mut cfg = fx.source_config();
    cfg.kafka
        .properties
        .push(("enable.idempotence".into(), "false".into()));
    let err = pg_source::run(cfg, tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("pg-source must refuse")
        .to_string();
    assert!(
        err.contains("enable.idempotence=false is not allowed"),
        "{err}"
    );
}
