//! `changelog` and `logical` modes: every insert, update and delete, in
//! Debezium's envelope, exactly once, in commit order per key. Each test
//! runs in both modes.

use std::collections::BTreeMap;
use std::time::Duration;

use schema_init::{Capture, TriggerLevel, UpdateBefore};
use sqlx::{ConnectOptions as _, Connection as _};
use tidemark_common::envelope::Op;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);

/// Waits until playing the file back gives the table's rows.
async fn wait_for_replay(fx: &Fixture, timeout: Duration) {
    let start = std::time::Instant::now();
    loop {
        // Whether the time is up, before the read: a read of a large file
        // under load takes many seconds, and the last one must start after
        // the time is up, or a file complete by then fails on a stale read.
        let last = start.elapsed() > timeout;
        let want = table_state(&fx.pool).await;
        let got = replay(&read_events(&fx.file()));
        if got == want {
            return;
        }
        if last {
            let missing: Vec<_> = want
                .iter()
                .filter(|(k, v)| got.get(k) != Some(v))
                .take(5)
                .collect();
            let extra: Vec<_> = got
                .iter()
                .filter(|(k, _)| !want.contains_key(k))
                .take(5)
                .collect();
            panic!("after {timeout:?} the file plays back {} rows, the table has {}; differing: {missing:?}, extra: {extra:?}", got.len(), want.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn exec(pool: &sqlx::PgPool, sql: &str) {
    sqlx::query(sql).execute(pool).await.unwrap();
}

async fn every_change_arrives(capture: Capture) {
    every_change_arrives_in(Fixture::changelog(capture).await, capture.update_before).await;
}

async fn every_change_arrives_in(fx: Fixture, update_before: UpdateBefore) {
    let source = fx.start_source();
    let sink = fx.start_sink();

    // The sample row, read by the initial snapshot.
    let events = wait_for_events(&fx.file(), 1, WAIT).await;
    assert_eq!(events[0].op, Op::Read);
    assert_eq!(events[0].after.as_ref().unwrap()["data"], "test data");
    assert_eq!(events[0].source.snapshot.as_deref(), Some("last"));

    exec(
        &fx.pool,
        "insert into streaming_update_table (data) values ('two'), ('three')",
    )
    .await;
    exec(
        &fx.pool,
        "update streaming_update_table set data = 'some new data' where id = 1",
    )
    .await;
    exec(
        &fx.pool,
        "update streaming_update_table set data = 'again' where id = 1",
    )
    .await;
    exec(&fx.pool, "delete from streaming_update_table where id = 2").await;
    exec(
        &fx.pool,
        "update streaming_update_table set id = 30 where id = 3",
    )
    .await;

    // c, c, u, u, d, then the key change as d + c.
    let events = wait_for_events(&fx.file(), 8, WAIT).await;
    let ops: Vec<Op> = events.iter().map(|e| e.op).collect();
    assert_eq!(
        ops,
        [
            Op::Read,
            Op::Create,
            Op::Create,
            Op::Update,
            Op::Update,
            Op::Delete,
            Op::Delete,
            Op::Create
        ]
    );
    match update_before {
        UpdateBefore::Full => {
            assert_eq!(events[3].before.as_ref().unwrap()["data"], "test data")
        }
        UpdateBefore::Null => assert!(events[3].before.is_none(), "{:?}", events[3]),
    }
    assert_eq!(events[3].after.as_ref().unwrap()["data"], "some new data");
    assert_eq!(events[4].after.as_ref().unwrap()["data"], "again");
    // Deletes carry the whole old row whatever updates log.
    assert_eq!(events[5].before.as_ref().unwrap()["id"], 2);
    assert_eq!(events[5].before.as_ref().unwrap()["data"], "two");
    assert!(events[5].after.is_none());
    assert_eq!(events[6].before.as_ref().unwrap()["id"], 3);
    assert_eq!(events[6].before.as_ref().unwrap()["data"], "three");
    assert_eq!(events[7].after.as_ref().unwrap()["id"], 30);
    assert!(events[1].source.tx_id.is_some());
    assert_eq!(events[1].source.table, "streaming_update_table");
    assert_eq!(replay(&events), table_state(&fx.pool).await);

    // The change log is pruned once Kafka has the changes.
    let mut left = if fx.changelog { i64::MAX } else { 0 };
    for _ in 0..100 {
        if left == 0 {
            break;
        }
        left = sqlx::query_scalar("select count(*) from tidemark.change_log")
            .fetch_one(&fx.pool)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0, "the change log keeps what Kafka confirmed");

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(read_events(&fx.file()).len(), 8, "nothing twice");
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    fx.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_mode_sends_every_change_deletes_included() {
    every_change_arrives_in(Fixture::logical().await, UpdateBefore::Full).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_triggers_send_every_change_deletes_included() {
    every_change_arrives(Capture::full(TriggerLevel::Row)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_triggers_send_every_change_deletes_included() {
    every_change_arrives(Capture::full(TriggerLevel::Statement)).await;
}

/// Updates that log no old row still send every change, deletes with the
/// whole old row, and a key change as a delete and a create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_triggers_without_update_before_images_send_every_change() {
    every_change_arrives(Capture {
        trigger: TriggerLevel::Row,
        update_before: UpdateBefore::Null,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_triggers_without_update_before_images_send_every_change() {
    every_change_arrives(Capture {
        trigger: TriggerLevel::Statement,
        update_before: UpdateBefore::Null,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_are_followed_by_a_tombstone_in_the_topic() {
    tombstones_follow_deletes(Fixture::changelog(TriggerLevel::Row).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_mode_follows_deletes_with_a_tombstone() {
    tombstones_follow_deletes(Fixture::logical().await).await;
}

async fn tombstones_follow_deletes(fx: Fixture) {
    use rdkafka::Message;

    exec(&fx.pool, "delete from streaming_update_table where id = 1").await;
    let source = fx
        .start_source_with(&[("snapshot.mode", "no_data")])
        .ready()
        .await;
    exec(
        &fx.pool,
        "insert into streaming_update_table (data) values ('x')",
    )
    .await;
    exec(&fx.pool, "delete from streaming_update_table where id = 2").await;
    let consumer = topic_consumer(&fx.topic());
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let Ok(msg) = tokio::time::timeout(WAIT, consumer.recv())
            .await
            .expect("records arrive")
        else {
            continue;
        };
        let key: serde_json::Value = serde_json::from_slice(msg.key().unwrap()).unwrap();
        seen.push((
            key["payload"]["id"].as_i64().unwrap(),
            msg.payload().map(|p| p.to_vec()),
        ));
    }
    source.stop().await.unwrap();
    assert_eq!(seen[0].0, 2);
    assert_eq!(seen[1].0, 2);
    assert_eq!(
        seen[2],
        (2, None),
        "a tombstone with the same key follows the delete"
    );
    let delete =
        tidemark_common::envelope::ChangeEvent::decode(seen[1].1.as_ref().unwrap()).unwrap();
    assert_eq!(delete.op, Op::Delete);
    fx.drop_slot().await;
}

/// What the writers committed: per key, the data values in commit order.
type Committed = BTreeMap<i64, Vec<Option<String>>>;

/// A writer owning keys `base..base+keys`: inserts, updates, deletes, some of
/// it in transactions it rolls back or holds open for a while.
async fn writer(
    pool: sqlx::PgPool,
    target: sqlx::postgres::PgConnectOptions,
    base: i64,
    keys: i64,
    rounds: usize,
) -> Committed {
    let mut committed: Committed = BTreeMap::new();
    let mut conn = target.connect().await.unwrap();
    for round in 0..rounds {
        let key = base + (round as i64 % keys);
        let value = format!("w{base}-r{round}");
        let exists = committed
            .get(&key)
            .and_then(|v| v.last().cloned())
            .flatten()
            .is_some();
        let mut tx = conn.begin().await.unwrap();
        let op = if !exists {
            sqlx::query("insert into streaming_update_table (id, data) values ($1, $2)")
                .bind(key as i32)
                .bind(&value)
                .execute(&mut *tx)
                .await
                .unwrap();
            Some(value)
        } else if round % 7 == 3 {
            sqlx::query("delete from streaming_update_table where id = $1")
                .bind(key as i32)
                .execute(&mut *tx)
                .await
                .unwrap();
            None
        } else {
            sqlx::query("update streaming_update_table set data = $2 where id = $1")
                .bind(key as i32)
                .bind(&value)
                .execute(&mut *tx)
                .await
                .unwrap();
            Some(value)
        };
        if round % 11 == 5 {
            // A long transaction: others commit past it meanwhile.
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        if round % 5 == 4 {
            tx.rollback().await.unwrap();
        } else {
            tx.commit().await.unwrap();
            committed.entry(key).or_default().push(op);
        }
    }
    drop(pool);
    committed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_long_transactions_and_rollbacks_arrive_exactly_once_in_order() {
    concurrent_writers(Fixture::changelog(TriggerLevel::Row).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_mode_sends_concurrent_writers_long_transactions_and_rollbacks_exactly_once_in_order(
) {
    concurrent_writers(Fixture::logical().await).await;
}

async fn concurrent_writers(fx: Fixture) {
    exec(&fx.pool, "delete from streaming_update_table").await;
    let source = fx
        .start_source_with(&[("snapshot.mode", "no_data"), ("batch.max.rows", "50")])
        .ready()
        .await;
    let sink = fx.start_sink();
    let mut writers = Vec::new();
    for w in 0..4 {
        writers.push(tokio::spawn(writer(
            fx.pool.clone(),
            fx.user_options(),
            1000 * (w + 1),
            6,
            60,
        )));
    }
    let mut committed: Committed = BTreeMap::new();
    for w in writers {
        committed.extend(w.await.unwrap());
    }
    let expected: usize = committed.values().map(Vec::len).sum();
    let events = wait_for_events(&fx.file(), expected, WAIT).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let events_after = read_events(&fx.file());
    assert_eq!(
        events_after.len(),
        events.len().max(expected),
        "nothing twice"
    );

    let mut seen: Committed = BTreeMap::new();
    for e in &events_after {
        let row = e.row().unwrap();
        let id = row["id"].as_i64().unwrap();
        let data = match e.op {
            Op::Delete => None,
            _ => Some(
                e.after.as_ref().unwrap()["data"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            ),
        };
        seen.entry(id).or_default().push(data);
    }
    assert_eq!(
        seen, committed,
        "every committed change once, in commit order per key; no rolled-back change"
    );
    assert_eq!(replay(&events_after), table_state(&fx.pool).await);
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    fx.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_initial_snapshot_meets_the_stream_with_no_gap_and_no_overlap() {
    snapshot_meets_stream(Fixture::changelog(TriggerLevel::Row).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_mode_meets_the_initial_snapshot_with_no_gap_and_no_overlap() {
    snapshot_meets_stream(Fixture::logical().await).await;
}

async fn snapshot_meets_stream(fx: Fixture) {
    exec(&fx.pool, "insert into streaming_update_table (data) select 'row ' || g from generate_series(2, 3000) g").await;
    if fx.logical {
        // Creating a slot waits for the transactions open on the server, so
        // the slot comes first here, as it would from an earlier start
        // that stopped before its first commit; pg-source uses it.
        sqlx::query("select pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(pg_source::modes::logical::default_slot_name(
                &fx.source_name,
            ))
            .execute(&fx.pool)
            .await
            .unwrap();
    }
    // A transaction open while the snapshot starts: its change must come
    // after the snapshot, exactly once.
    let mut open = fx.user_options().connect().await.unwrap();
    let mut tx = open.begin().await.unwrap();
    sqlx::query("update streaming_update_table set data = 'late' where id = 2500")
        .execute(&mut *tx)
        .await
        .unwrap();

    let source = fx
        .start_source_with(&[("batch.max.rows", "200")])
        .ready()
        .await;
    let sink = fx.start_sink();
    // Changes while the snapshot runs.
    for i in 0..20 {
        sqlx::query("update streaming_update_table set data = $1 where id = $2")
            .bind(format!("during {i}"))
            .bind(1 + i * 150)
            .execute(&fx.pool)
            .await
            .unwrap();
    }
    exec(
        &fx.pool,
        "delete from streaming_update_table where id = 2999",
    )
    .await;
    tx.commit().await.unwrap();

    wait_for_replay(&fx, WAIT).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let events = read_events(&fx.file());
    let reads: Vec<i64> = events
        .iter()
        .filter(|e| e.op == Op::Read)
        .map(|e| e.after.as_ref().unwrap()["id"].as_i64().unwrap())
        .collect();
    let mut unique_reads = reads.clone();
    unique_reads.sort();
    unique_reads.dedup();
    assert_eq!(unique_reads.len(), reads.len(), "each row read once");
    assert_eq!(replay(&events), table_state(&fx.pool).await);
    let lates = events
        .iter()
        .filter(|e| e.op == Op::Update && e.after.as_ref().unwrap()["data"] == "late")
        .count();
    assert_eq!(
        lates, 1,
        "the transaction open at the snapshot arrives once, as a change"
    );
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    fx.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_in_the_middle_of_the_snapshot_resumes_without_gap_or_overlap() {
    crash_mid_snapshot(Fixture::changelog(TriggerLevel::Row).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_mode_resumes_a_crashed_snapshot_without_gap_or_overlap() {
    crash_mid_snapshot(Fixture::logical().await).await;
}

async fn crash_mid_snapshot(fx: Fixture) {
    exec(&fx.pool, "insert into streaming_update_table (data) select 'row ' || g from generate_series(2, 20000) g").await;
    // Reads of 100 rows, Kafka transactions of 500: the kill comes in the
    // middle of the snapshot, and of a transaction.
    let overrides = [
        ("batch.max.rows", "100"),
        ("snapshot.fetch.size", "100"),
        ("snapshot.transaction.max.rows", "500"),
    ];
    let source = fx.start_source_with(&overrides);
    let sink = fx.start_sink();
    wait_for_events(&fx.file(), 2000, WAIT).await;
    source.kill().await;
    // Changes after the crash, to rows already read and rows not yet read.
    for id in [5, 1500, 15000, 19999] {
        sqlx::query("update streaming_update_table set data = 'after crash' where id = $1")
            .bind(id)
            .execute(&fx.pool)
            .await
            .unwrap();
    }
    exec(
        &fx.pool,
        "delete from streaming_update_table where id in (6, 16000)",
    )
    .await;
    let source = fx.start_source_with(&overrides);
    wait_for_replay(&fx, Duration::from_secs(120)).await;
    // Let the stream settle.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let events = read_events(&fx.file());
    let mut reads = BTreeMap::new();
    for e in events.iter().filter(|e| e.op == Op::Read) {
        *reads
            .entry(e.after.as_ref().unwrap()["id"].as_i64().unwrap())
            .or_insert(0) += 1;
    }
    assert!(reads.values().all(|n| *n == 1), "a row read twice");
    // Rows already read before the crash get their changes as events; rows
    // read after it carry them in their snapshot state: either way, once.
    assert_eq!(replay(&events), table_state(&fx.pool).await);
    let after_crash_updates = events
        .iter()
        .filter(|e| e.op == Op::Update && e.after.as_ref().unwrap()["data"] == "after crash")
        .count();
    assert!(after_crash_updates <= 4);
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    fx.drop_slot().await;
}

/// The logical position pg-source stored for the fixture's connector.
async fn stored_logical_position(fx: &Fixture) -> tidemark_common::offset::LogicalPosition {
    let settings = kafka();
    let topic = format!("{}offsets", fx.prefix);
    let stored = tokio::task::spawn_blocking(move || {
        tidemark_common::kafka::read_compacted(&settings, &topic, Duration::from_secs(30))
    })
    .await
    .unwrap()
    .unwrap();
    let key = tidemark_common::offset::position_key(&fx.source_name, "tidemark.logical");
    match stored
        .get(&key)
        .map(|v| tidemark_common::offset::SourcePosition::decode(v))
    {
        Some(Ok(tidemark_common::offset::SourcePosition::Logical(p))) => p,
        other => panic!("no logical position stored: {other:?}"),
    }
}

/// Kills pg-source once part of a large transaction is in the file (so
/// Kafka committed it, with a position inside the transaction), and checks
/// the stored position is inside it. The file is watched rather than the
/// positions topic: a reader of that topic may not reach its end while
/// pg-source commits a batch every few milliseconds.
async fn crash_inside_the_transaction(fx: &Fixture, source: Running<()>) {
    let started = std::time::Instant::now();
    while read_events(&fx.file()).is_empty() {
        assert!(
            started.elapsed() < WAIT,
            "no part of the transaction was committed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    source.kill().await;
    let cut = stored_logical_position(fx).await;
    assert!(
        cut.in_txn_lsn.is_some(),
        "the crash came after the whole transaction was sent; nothing resumed inside it: {cut:?}"
    );
}

/// A transaction larger than a batch goes to Kafka in parts; a crash between
/// parts resumes inside it, sending each change once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_mode_splits_a_large_transaction_and_resumes_inside_it_after_a_crash() {
    const ROWS: i64 = 60000;
    let fx = Fixture::logical().await;
    exec(&fx.pool, &format!("insert into streaming_update_table (data) select 'row ' || g from generate_series(2, {ROWS}) g")).await;
    let overrides = [("batch.max.rows", "100"), ("snapshot.mode", "no_data")];
    let source = fx.start_source_with(&overrides).ready().await;
    let sink = fx.start_sink();
    // One transaction updating every row.
    exec(
        &fx.pool,
        "update streaming_update_table set data = data || ' updated'",
    )
    .await;
    // Crash once Kafka holds part of it.
    crash_inside_the_transaction(&fx, source).await;
    exec(
        &fx.pool,
        "update streaming_update_table set data = 'after' where id = 7",
    )
    .await;
    let source = fx.start_source_with(&overrides);
    wait_for_replay(&fx, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let events = read_events(&fx.file());
    let mut per_key: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for e in &events {
        assert_eq!(e.op, Op::Update, "{e:?}");
        let after = e.after.as_ref().unwrap();
        per_key
            .entry(after["id"].as_i64().unwrap())
            .or_default()
            .push(after["data"].as_str().unwrap().to_owned());
    }
    assert_eq!(per_key.len(), ROWS as usize, "every row's update arrives");
    // The transaction is one unit across its parts and the crash: numbered
    // 1..ROWS, the totals on its last event only.
    let unit: Vec<_> = events[..ROWS as usize]
        .iter()
        .map(|e| e.transaction.clone().expect("a v2 event"))
        .collect();
    for (k, t) in unit.iter().enumerate() {
        assert_eq!(t.commit_order, unit[0].commit_order, "{t:?}");
        assert_eq!(t.total_order, k as u64 + 1, "{t:?}");
        let last = k + 1 == ROWS as usize;
        assert_eq!(t.event_count, last.then_some(ROWS as u64), "{t:?}");
    }
    let after = events[ROWS as usize].transaction.as_ref().unwrap();
    assert!(after.commit_order > unit[0].commit_order);
    assert_eq!(after.event_count, Some(1));
    for (id, seen) in &per_key {
        let want = if *id == 7 {
            vec!["row 7 updated".to_owned(), "after".to_owned()]
        } else if *id == 1 {
            vec!["test data updated".to_owned()]
        } else {
            vec![format!("row {id} updated")]
        };
        assert_eq!(seen, &want, "id {id}: each change once, in order");
    }
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    fx.drop_slot().await;
}

/// With `schemas.enable=false` keys and values are the payload alone, as
/// Connect's JSON converter writes them (what Flink's `debezium-json` reads
/// by default), and still decode as change events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemaless_records_are_the_payload_alone() {
    use rdkafka::Message;

    let fx = Fixture::changelog(TriggerLevel::Statement).await;
    let source = fx
        .start_source_with(&[
            ("key.converter.schemas.enable", "false"),
            ("value.converter.schemas.enable", "false"),
        ])
        .ready()
        .await;
    exec(
        &fx.pool,
        "update streaming_update_table set data = 'bare' where id = 1",
    )
    .await;
    let consumer = topic_consumer(&fx.topic());
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let Ok(msg) = tokio::time::timeout(WAIT, consumer.recv())
            .await
            .expect("records arrive")
        else {
            continue;
        };
        seen.push((msg.key().unwrap().to_vec(), msg.payload().unwrap().to_vec()));
    }
    source.stop().await.unwrap();
    for (key, value) in &seen {
        assert_eq!(key, br#"{"id":1}"#);
        let raw: serde_json::Value = serde_json::from_slice(value).unwrap();
        assert!(raw.get("schema").is_none(), "{raw}");
        assert!(raw.get("payload").is_none(), "{raw}");
    }
    let read = tidemark_common::envelope::ChangeEvent::decode(&seen[0].1).unwrap();
    assert_eq!(read.op, Op::Read);
    let update = tidemark_common::envelope::ChangeEvent::decode(&seen[1].1).unwrap();
    assert_eq!(update.op, Op::Update);
    assert_eq!(update.after.as_ref().unwrap()["data"], "bare");
    assert_eq!(update.before.as_ref().unwrap()["data"], "test data");
}

/// Writes to tables pg-source does not read still move its position, so the
/// slot lets Postgres recycle WAL (and a shutdown, which waits for the slot
/// to confirm what was sent, is not held up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_mode_confirms_the_slot_past_changes_of_other_tables() {
    let fx = Fixture::logical().await;
    exec(
        &fx.pool,
        "create table other (id serial primary key, v text)",
    )
    .await;
    let source = fx
        .start_source_with(&[("snapshot.mode", "no_data")])
        .ready()
        .await;
    let slot = pg_source::modes::logical::default_slot_name(&fx.source_name);
    let confirmed = || async {
        sqlx::query_scalar::<_, String>(
            "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
        )
        .bind(&slot)
        .fetch_one(&fx.pool)
        .await
        .unwrap()
    };
    let lsn_after_writes: String = {
        for i in 0..50 {
            exec(&fx.pool, &format!("insert into other (v) values ('{i}')")).await;
        }
        sqlx::query_scalar("select pg_current_wal_lsn()::text")
            .fetch_one(&fx.pool)
            .await
            .unwrap()
    };
    let started = std::time::Instant::now();
    loop {
        let at = confirmed().await;
        let past: bool = sqlx::query_scalar("select $1::pg_lsn >= $2::pg_lsn")
            .bind(&at)
            .bind(&lsn_after_writes)
            .fetch_one(&fx.pool)
            .await
            .unwrap();
        if past {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "the slot stayed confirmed at {at}, before {lsn_after_writes}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The stored position moved as far, so a restart finds slot and
    // position in agreement.
    source.stop().await.unwrap();
    let source = fx
        .start_source_with(&[("snapshot.mode", "no_data")])
        .ready()
        .await;
    exec(
        &fx.pool,
        "update streaming_update_table set data = 'still here' where id = 1",
    )
    .await;
    let sink = fx.start_sink();
    let events = wait_for_events(&fx.file(), 1, WAIT).await;
    assert_eq!(events[0].after.as_ref().unwrap()["data"], "still here");
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    fx.drop_slot().await;
}

/// A transaction cut by a crash resumes at the WAL position of its last
/// change sent, whatever tables the restarted pg-source reads: here a table
/// whose changes came first in the transaction is added at the restart,
/// and the table read all along still gets each change once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_mode_resumes_a_cut_transaction_after_the_table_set_changed() {
    const ROWS: i64 = 30000;
    let fx = Fixture::logical().await;
    exec(&fx.pool, "create table tb (id int primary key, v text)").await;
    for step in schema_init::logical_steps(&tidemark_common::pg::TableName::parse("tb").unwrap()) {
        exec(&fx.pool, &step.sql).await;
    }
    exec(
        &fx.pool,
        &format!("insert into tb select g, 'b' || g from generate_series(1, {ROWS}) g"),
    )
    .await;
    exec(&fx.pool, &format!("insert into streaming_update_table (data) select 'row ' || g from generate_series(2, {ROWS}) g")).await;
    let first = [
        ("batch.max.rows", "100"),
        ("snapshot.mode", "no_data"),
        ("table.whitelist", "streaming_update_table"),
    ];
    let source = fx.start_source_with(&first).ready().await;
    let sink = fx.start_sink();
    // One transaction: every row of tb, then every row of the seed table.
    let mut conn = fx.user_options().connect().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("update tb set v = v || ' updated'")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("update streaming_update_table set data = data || ' updated'")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    crash_inside_the_transaction(&fx, source).await;

    let source = fx.start_source_with(&[
        ("batch.max.rows", "100"),
        ("snapshot.mode", "no_data"),
        ("table.whitelist", "streaming_update_table,tb"),
    ]);
    let events = wait_for_events(&fx.file(), ROWS as usize, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let events_after = read_events(&fx.file());
    assert_eq!(
        events_after.len(),
        events.len().max(ROWS as usize),
        "nothing twice"
    );
    let mut per_key: BTreeMap<i64, u32> = BTreeMap::new();
    for e in &events_after {
        *per_key
            .entry(e.after.as_ref().unwrap()["id"].as_i64().unwrap())
            .or_default() += 1;
    }
    assert_eq!(per_key.len(), ROWS as usize, "every row's update arrives");
    assert!(per_key.values().all(|n| *n == 1), "each change once");
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    fx.drop_slot().await;
}
