//! Transactions that commit out of order (kafka-connect-jdbc #172).

use std::time::Duration;

use sqlx::{ConnectOptions as _, Connection as _};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_transaction_that_commits_late_is_not_missed() {
    let fx = Fixture::new().await;
    sqlx::query(
        "insert into streaming_update_table (data) select 'row ' || g from generate_series(2, 4) g",
    )
    .execute(&fx.pool)
    .await
    .unwrap();
    let source = fx.start_source();
    let sink = fx.start_sink();
    wait_for_lines(&fx.file(), 4, Duration::from_secs(30)).await;

    // A long transaction stamps row 2 with its start time...
    let mut long = fx.user_options().connect().await.unwrap();
    let mut tx = long.begin().await.unwrap();
    sqlx::query("update streaming_update_table set data = 'late' where id = 2")
        .execute(&mut *tx)
        .await
        .unwrap();

    // ...while later transactions commit after it.
    for i in 0..5 {
        sqlx::query("update streaming_update_table set data = $1 where id = 3")
            .bind(format!("quick {i}"))
            .execute(&fx.pool)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The JDBC connector's query would have read the quick commits and moved
    // its position past row 2's timestamp, never to read it. Tidemark holds
    // its bound at the open transaction's start instead.
    assert_eq!(
        read_lines(&fx.file()).len(),
        4,
        "nothing passes the open transaction"
    );
    tx.commit().await.unwrap();

    let lines = wait_for_lines(&fx.file(), 6, Duration::from_secs(30)).await;
    let late: Vec<_> = lines
        .iter()
        .filter(|l| int(l, "id") == 2 && text(l, "data") == "late")
        .collect();
    assert_eq!(late.len(), 1, "the late commit arrives exactly once");
    let quick: Vec<&str> = lines
        .iter()
        .filter(|l| int(l, "id") == 3)
        .map(|l| text(l, "data"))
        .collect();
    // Row states, as the JDBC connector sends: the last one wins.
    assert_eq!(quick, ["row 3", "quick 4"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(read_lines(&fx.file()).len(), 6);

    source.stop().await.unwrap();
    sink.stop().await.unwrap();
}
