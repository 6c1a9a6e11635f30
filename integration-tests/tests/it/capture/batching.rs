//! Issue 15.3: batching by time. While streaming, a Kafka transaction
//! commits when its batch is full or `batch.linger.ms` after the last batch
//! stopped reading, whichever comes first: a steady stream of small commits
//! makes about one Kafka transaction per linger (each writes one position
//! to the offsets topic), in both modes, and every change still arrives
//! once and in order.

use super::heartbeat::positions;
use super::*;
use crate::support::Fixture;

const LINGER_MS: u128 = 400;
const COMMITS: usize = 60;

/// Writes `COMMITS` single-row commits 20 ms apart with
/// `batch.linger.ms=400`: the changes arrive once each, in order, in at
/// most one Kafka transaction per linger of the time they took, plus slack:
/// the first batch goes at once, a batch can end just after its linger,
/// and an idle pg-source commits its position now and then (logical mode
/// every 5 s when the WAL moved) while the offsets are read back. Before
/// batching by time these commits made about 60 transactions.
async fn a_steady_stream_commits_once_per_linger(fx: &Fixture) {
    let topic = fx.topic();
    let offsets = format!("{}offsets", fx.prefix);
    let mut reader = TopicReader::new(&[topic.as_str()]);
    let source = fx
        .start_source_with(&[("batch.linger.ms", &LINGER_MS.to_string())])
        .ready()
        .await;
    // The seed's sample row, from the initial snapshot.
    reader.at_least(&topic, 1).await;
    let before = positions(&offsets).len();
    let start = Instant::now();
    for i in 0..COMMITS {
        sqlx::query("update public.streaming_update_table set data = $1")
            .bind(format!("v{i}"))
            .execute(&fx.pool)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reader.at_least(&topic, 1 + COMMITS).await;
    let took = start.elapsed();
    source.stop().await.unwrap();
    let data: Vec<&str> = reader.events[&topic][1..]
        .iter()
        .map(|e| e.after().unwrap()["data"].as_str().unwrap())
        .collect();
    let written: Vec<String> = (0..COMMITS).map(|i| format!("v{i}")).collect();
    assert_eq!(data, written, "every change once, in order");
    let transactions = positions(&offsets).len() - before;
    let most = (took.as_millis() / LINGER_MS) as usize + 6;
    assert!(
        transactions <= most,
        "{COMMITS} commits over {took:?} went into {transactions} Kafka transactions; with a linger of {LINGER_MS} ms at most {most}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_mode_commits_a_steady_stream_once_per_linger() {
    let fx = Fixture::changelog(Capture::full(schema_init::TriggerLevel::Statement)).await;
    a_steady_stream_commits_once_per_linger(&fx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_mode_commits_a_steady_stream_once_per_linger() {
    let fx = Fixture::logical().await;
    a_steady_stream_commits_once_per_linger(&fx).await;
    fx.drop_slot().await;
}
