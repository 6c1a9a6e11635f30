//! Every unit ends with an event that carries its totals (`event_count`),
//! even when the filters leave out every change of its later part: here a
//! transaction larger than `batch.max.rows` that first writes rows an
//! incremental snapshot has sent (those changes are sent) and then rows it
//! has not (left out: the snapshot's later chunks read them). Its events
//! went to Kafka in the first part; the parts after it had none, so the
//! unit had no last event and pg-replay stopped at "a gap in the archive".
//! In both capture modes.

use std::collections::BTreeMap;

use tidemark_common::envelope::Op;

use super::key_change::{b_enters_the_set, has_end, scans_of_b, script, until_running, Mode};
use super::*;

/// The units of `events` (by `commit_order`) whose events are not as many
/// as their last event's `event_count` says, or that have no such event.
fn units_without_their_end(events: &BTreeMap<String, Vec<Event>>) -> Vec<String> {
    let mut units: BTreeMap<u64, (u64, Option<u64>)> = BTreeMap::new();
    for e in events.values().flatten() {
        let Some(t) = e.event.as_ref().and_then(|ev| ev.transaction.as_ref()) else {
            continue;
        };
        let unit = units.entry(t.commit_order).or_default();
        unit.0 += 1;
        if let Some(n) = t.event_count {
            unit.1 = Some(n);
        }
    }
    units
        .into_iter()
        .filter(|(_, (n, count))| *count != Some(*n))
        .map(|(co, (n, count))| format!("unit {co}: {n} events, event_count {count:?}"))
        .collect()
}

async fn a_unit_whose_later_part_is_all_left_out(mode: Mode) {
    let db = Db::new().await;
    let (mut source, mut reader) = b_enters_the_set(&db, mode).await;
    let topic = db.topic("b");
    // The snapshot is held after its first chunks by a lock its next chunk
    // waits for; the transaction that holds it writes b, and commits while
    // the snapshot's progress is still below the keys it writes last.
    scans_of_b(&db, &mut source, 3).await;
    let mut held = db.admin.acquire().await.unwrap();
    sqlx::raw_sql("begin; lock table public.b in access exclusive mode")
        .execute(&mut *held)
        .await
        .unwrap();
    until_running(&mut reader, &mut source, "b's first chunks", |e| {
        e.get(&topic).is_some_and(|ev| {
            ev.iter()
                .filter(|e| e.event.as_ref().is_some_and(|ev| ev.op == Op::Read))
                .count()
                >= 10
        })
    })
    .await;
    // 5 changes below the snapshot's progress (sent), then 30 above it
    // (left out), one row each: with batch.max.rows 10, the transaction's
    // last three parts have nothing to send.
    sqlx::raw_sql(
        "update public.b set v = 'below' where id <= 5;
         update public.b set v = 'above' where id > 1900 and id <= 1930;
         commit",
    )
    .execute(&mut *held)
    .await
    .unwrap();
    drop(held);
    script(
        &db.admin,
        "insert into public.b values (100000, 100000, 'end');
         insert into public.a values (2, 'end');",
    )
    .await;
    until_running(&mut reader, &mut source, "the rows 'end' of a and b", |e| {
        has_end(e, &topic) && has_end(e, &db.topic("a"))
    })
    .await;
    reader.settle(Duration::from_secs(1)).await;
    source.assert_running("pg-source").await;
    source.stop().await;
    if mode == Mode::Logical {
        let slot = pg_source::modes::logical::default_slot_name(&db.source_name);
        let _ = sqlx::query("select pg_drop_replication_slot($1)")
            .bind(&slot)
            .execute(&db.admin)
            .await;
    }
    let events = &reader.events[&topic];
    let with = |op: Op, v: &str| {
        events
            .iter()
            .filter(|e| {
                e.event.as_ref().is_some_and(|ev| ev.op == op)
                    && e.after().is_some_and(|a| a["v"] == v)
            })
            .count()
    };
    // What the test is about happened: the first changes were sent, the
    // others left out and read by later chunks.
    assert_eq!(
        with(Op::Update, "below"),
        5,
        "the changes below the progress"
    );
    assert_eq!(
        with(Op::Update, "above"),
        0,
        "the changes above the snapshot's progress are left out"
    );
    assert_eq!(
        with(Op::Read, "above"),
        30,
        "later chunks read the rows changed above the progress"
    );
    assert_eq!(
        units_without_their_end(&reader.events),
        Vec::<String>::new(),
        "every unit's last event carries its event_count"
    );
    assert_eq!(
        replay(events),
        table_rows(&db.admin, "public.b", &["id"]).await,
        "b replayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_a_unit_whose_later_chunks_are_all_left_out_still_ends() {
    a_unit_whose_later_part_is_all_left_out(Mode::ChangeLog).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_a_transaction_whose_later_parts_are_all_left_out_still_ends() {
    a_unit_whose_later_part_is_all_left_out(Mode::Logical).await;
}
