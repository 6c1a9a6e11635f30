//! Change-event envelope version 2 as a consumer reads it from the file:
//! snapshot marks, units with their orders and totals, the LSN and
//! microsecond times, in both capture modes.

use std::time::Duration;

use tidemark_common::envelope::{ChangeEvent, Op};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);

async fn exec(pool: &sqlx::PgPool, sql: &str) {
    sqlx::raw_sql(sql).execute(pool).await.unwrap();
}

/// Checks every unit of `events` (in file order, one partition): its events
/// are contiguous, numbered 1..n in `total_order` and per table in
/// `data_collection_order`, and only its last carries `event_count` n and
/// the per-table totals; `commit_order` increases from unit to unit, and
/// each unit's events name the unit before (`prev_commit_order`; `before`
/// for the first of `events`). Returns the units' sizes.
fn check_units(events: &[ChangeEvent], before: Option<u64>) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut i = 0;
    let mut last_order = before;
    let mut prev_unit = before;
    while i < events.len() {
        let tx = events[i].transaction.as_ref().expect("a v2 event");
        let order = tx.commit_order;
        if let Some(prev) = last_order {
            assert!(order > prev, "commit_order {order} after {prev}");
        }
        last_order = Some(order);
        let mut n = 0;
        while i + n < events.len()
            && events[i + n].transaction.as_ref().unwrap().commit_order == order
        {
            n += 1;
        }
        let unit = &events[i..i + n];
        for (k, e) in unit.iter().enumerate() {
            let tx = e.transaction.as_ref().unwrap();
            assert_eq!(tx.total_order, k as u64 + 1, "{tx:?}");
            assert_eq!(tx.data_collection_order, k as u64 + 1, "{tx:?}");
            assert!(tx.id.ends_with(&format!(":{order}")), "{tx:?}");
            assert_eq!(tx.prev_commit_order, prev_unit, "{tx:?}");
            if k + 1 == n {
                assert_eq!(tx.event_count, Some(n as u64), "{tx:?}");
                let dc = tx
                    .data_collections
                    .as_ref()
                    .expect("totals on the last event");
                assert_eq!(dc.len(), 1, "{dc:?}");
                assert_eq!(dc[0].data_collection, "public.streaming_update_table");
                assert_eq!(dc[0].event_count, n as u64);
            } else {
                assert_eq!(tx.event_count, None, "{tx:?}");
                assert!(tx.data_collections.is_none(), "{tx:?}");
            }
        }
        sizes.push(n);
        prev_unit = Some(order);
        i += n;
    }
    sizes
}

async fn units_and_marks(fx: Fixture) {
    // Five rows for the snapshot: the sample row and four more.
    exec(
        &fx.pool,
        "insert into streaming_update_table (data) select 'row ' || g from generate_series(2, 5) g",
    )
    .await;
    let source = fx.start_source();
    let sink = fx.start_sink();
    let snapshot = wait_for_events(&fx.file(), 5, WAIT).await;
    let marks: Vec<&str> = snapshot
        .iter()
        .map(|e| e.source.snapshot.as_deref().unwrap())
        .collect();
    assert_eq!(marks, ["first", "true", "true", "true", "last"]);
    for e in &snapshot {
        assert_eq!(e.op, Op::Read);
        assert_eq!(e.transaction.as_ref().unwrap().commit_order, 0);
        assert_eq!(e.source.sequence, None);
        assert_eq!(e.source.lsn, None);
    }
    assert_eq!(check_units(&snapshot, None), [5]);

    // Transactions of several changes each, a primary-key change among them
    // (a delete and a create: two events of one unit).
    exec(
        &fx.pool,
        "begin; insert into streaming_update_table (data) values ('a'), ('b'), ('c'); commit;",
    )
    .await;
    exec(
        &fx.pool,
        "begin; update streaming_update_table set data = 'x' where id in (1, 2); commit;",
    )
    .await;
    exec(
        &fx.pool,
        "begin; update streaming_update_table set id = 100 where id = 3; delete from streaming_update_table where id = 4; commit;",
    )
    .await;
    let events = wait_for_events(&fx.file(), 5 + 3 + 2 + 3, WAIT).await;
    let changes = &events[5..];
    let sizes = check_units(changes, Some(0));
    assert_eq!(sizes.iter().sum::<usize>(), 8, "{sizes:?}");
    if fx.logical {
        // One unit per transaction.
        assert_eq!(sizes, [3, 2, 3]);
    }
    let mut last_lsn = 0;
    for e in changes {
        assert_eq!(e.source.snapshot.as_deref(), Some("false"));
        let ts_us = e.source.ts_us.expect("source.ts_us");
        assert_eq!(ts_us.div_euclid(1000), e.source.ts_ms);
        assert_eq!(e.ts_us.unwrap().div_euclid(1000), e.ts_ms.unwrap());
        let seq = e.source.sequence.as_deref().expect("a sequence");
        if fx.logical {
            let lsn = e.source.lsn.expect("source.lsn in logical mode");
            assert!(lsn >= last_lsn, "lsn {lsn} after {last_lsn}");
            last_lsn = lsn;
            let parts: Vec<u64> = serde_json::from_str::<Vec<String>>(seq)
                .unwrap_or_else(|e| panic!("{seq}: {e}"))
                .iter()
                .map(|p| p.parse().unwrap())
                .collect();
            assert_eq!(parts.len(), 2);
            assert_eq!(parts[1], lsn);
            assert!(parts[0] <= lsn, "{seq}");
        } else {
            assert_eq!(e.source.lsn, None);
            seq.parse::<u64>().unwrap_or_else(|e| panic!("{seq}: {e}"));
        }
    }
    // After a restart, the next unit names the last one sent before it
    // (kept in the stored position).
    source.stop().await.unwrap();
    let last = changes
        .last()
        .unwrap()
        .transaction
        .as_ref()
        .unwrap()
        .commit_order;
    let source = fx.start_source();
    exec(
        &fx.pool,
        "insert into streaming_update_table (data) values ('after the restart')",
    )
    .await;
    let events = wait_for_events(&fx.file(), 5 + 8 + 1, WAIT).await;
    assert_eq!(check_units(&events[13..], Some(last)), [1]);
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    if fx.logical {
        fx.drop_slot().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_events_carry_units_orders_and_snapshot_marks() {
    units_and_marks(Fixture::changelog(schema_init::TriggerLevel::Row).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_events_carry_units_orders_and_snapshot_marks() {
    units_and_marks(Fixture::logical().await).await;
}
