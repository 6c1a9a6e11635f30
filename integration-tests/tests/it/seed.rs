//! The seed post's scenario, end to end, with Tidemark's programs.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_scenario_arrives_line_by_line_in_order() {
    let fx = Fixture::new().await;
    let source = fx.start_source();
    let sink = fx.start_sink();

    // The sample row schema-init inserted.
    let lines = wait_for_lines(&fx.file(), 1, WAIT).await;
    assert_eq!(lines.len(), 1);
    let first = &lines[0];
    assert_eq!(int(first, "id"), 1);
    assert_eq!(text(first, "data"), "test data");
    assert_eq!(first.field("is_soft_deleted"), Some(&json!(false)));
    assert_eq!(first.schema["name"], "streaming_update_table");
    let fields: Vec<&str> = first.schema["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "id",
            "data",
            "is_soft_deleted",
            "create_date",
            "last_updated"
        ]
    );

    sqlx::query("UPDATE streaming_update_table SET data = 'some new data' WHERE id = 1")
        .execute(&fx.pool)
        .await
        .unwrap();
    let lines = wait_for_lines(&fx.file(), 2, WAIT).await;
    assert_eq!(text(&lines[1], "data"), "some new data");
    assert_eq!(lines[1].field("is_soft_deleted"), Some(&json!(false)));

    sqlx::query("UPDATE streaming_update_table SET is_soft_deleted = true WHERE id = 1")
        .execute(&fx.pool)
        .await
        .unwrap();
    let lines = wait_for_lines(&fx.file(), 3, WAIT).await;
    assert_eq!(text(&lines[2], "data"), "some new data");
    assert_eq!(lines[2].field("is_soft_deleted"), Some(&json!(true)));

    // Timestamps keep the database's microseconds, and only move forward.
    let micros: i64 = sqlx::query_scalar(
        "select (extract(epoch from last_updated) * 1000000)::int8 from streaming_update_table where id = 1",
    )
    .fetch_one(&fx.pool)
    .await
    .unwrap();
    assert_eq!(int(&lines[2], "last_updated"), micros);
    let stamps: Vec<i64> = lines.iter().map(|l| int(l, "last_updated")).collect();
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{stamps:?}");

    // Nothing more arrives: each change exactly once.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(read_lines(&fx.file()).len(), 3);

    source.stop().await.unwrap();
    let totals = sink.stop().await.unwrap();
    assert_eq!(totals.written, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_primary_keys_and_values_are_lossless() {
    use rdkafka::Message;

    let fx = Fixture::new().await;
    sqlx::query(
        "alter table streaming_update_table add column amount numeric, add column note text",
    )
    .execute(&fx.pool)
    .await
    .unwrap();
    sqlx::query(
        "insert into streaming_update_table (data, amount, note, last_updated)
         values ('precise', 123456789012345678901234567890.123456789, null, '2026-01-02 03:04:05.123456')",
    )
    .execute(&fx.pool)
    .await
    .unwrap();
    let source = fx.start_source();

    let consumer = topic_consumer(&fx.topic());
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let msg = match tokio::time::timeout(WAIT, consumer.recv())
            .await
            .expect("records arrive")
        {
            Ok(msg) => msg,
            // The topic may not exist yet when the consumer starts.
            Err(_) => continue,
        };
        let key: serde_json::Value = serde_json::from_slice(msg.key().unwrap()).unwrap();
        let value: serde_json::Value = serde_json::from_slice(msg.payload().unwrap()).unwrap();
        seen.push((key, value));
    }
    source.stop().await.unwrap();

    let (key, value) = seen
        .iter()
        .find(|(_, v)| v["payload"]["data"] == "precise")
        .expect("the precise row arrives");
    assert_eq!(key["payload"], json!({"id": 2}));
    assert_eq!(key["schema"]["fields"][0]["type"], "int32");
    let payload = &value["payload"];
    assert_eq!(
        payload["amount"],
        json!("123456789012345678901234567890.123456789")
    );
    assert_eq!(payload["note"], serde_json::Value::Null);
    // 2026-01-02 03:04:05.123456 as microseconds since the epoch.
    assert_eq!(
        payload["last_updated"].as_i64(),
        Some(1_767_323_045_123_456)
    );
}
