//! An initial snapshot resumed after a crash (pg-source killed in the
//! middle of it) compares keys as its chunks were ordered: by the key
//! index's operators and collation, not the database's. A text key whose
//! collation orders unlike the database's default (`en-x-icu` in a `C`
//! database: `a...` before `B...` there, after it here) must neither lose
//! the changes of rows read before the crash nor repeat rows.

use std::collections::BTreeMap;

use schema_init::TriggerLevel;
use tidemark_common::envelope::Op;

use super::*;

/// Runs `sql` as the user.
async fn script(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// 300 keys `a00000..` (first in the key's order, last in the database's)
/// and 10,000 keys `B00000..`, read 20 a Kafka transaction (slow enough
/// that the kill comes while `B` keys are read).
const TABLE: &str = r#"
create table public.k (k text collate "en-x-icu" primary key, v text not null);
insert into public.k select 'a' || pg_catalog.lpad(g::text, 5, '0'), 'old' from generate_series(0, 299) g;
insert into public.k select 'B' || pg_catalog.lpad(g::text, 5, '0'), 'old' from generate_series(0, 9999) g"#;

/// The initial snapshot's progress in the position stored for `db`'s
/// connector; panics when the snapshot is not in progress.
async fn stored_snapshot(db: &Db, logical: bool) -> tidemark_common::offset::SnapshotProgress {
    use tidemark_common::offset::{position_key, SourcePosition};
    let settings = kafka();
    let topic = format!("{}offsets", db.prefix);
    let stored = tokio::task::spawn_blocking(move || {
        tidemark_common::kafka::read_compacted(&settings, &topic, Duration::from_secs(30))
    })
    .await
    .unwrap()
    .unwrap();
    let key = position_key(
        &db.source_name,
        if logical {
            "tidemark.logical"
        } else {
            tidemark_common::names::CHANGE_LOG
        },
    );
    let snapshot = match stored.get(&key).map(|v| SourcePosition::decode(v)) {
        Some(Ok(SourcePosition::ChangeLog(p))) => p.snapshot,
        Some(Ok(SourcePosition::Logical(p))) => p.snapshot,
        other => panic!("no position stored: {other:?}"),
    };
    snapshot.expect("the initial snapshot in progress")
}

async fn a_resumed_snapshot_compares_keys_in_the_key_s_collation(logical: bool) {
    let db = Db::new().await;
    script(&db.admin, TABLE).await;
    let mut overrides = vec![
        ("batch.max.rows", "100"),
        ("snapshot.fetch.size", "20"),
        ("snapshot.transaction.max.rows", "20"),
    ];
    if logical {
        for step in schema_init::logical_steps(&TableName::parse("k").unwrap()) {
            script(&db.admin, &step.sql).await;
        }
        overrides.push(("mode", "logical"));
    } else {
        db.capture("k", Capture::full(TriggerLevel::Row)).await;
    }
    let topic = db.topic("k");
    let mut reader = TopicReader::new(&[topic.as_str()]);
    // Not waited for: pg-source is ready once its initial snapshot is done.
    let cfg = db.source_config(&["k"], &overrides);
    let source = Task::spawn(|token| pg_source::run(cfg, token));
    // Killed once the topic holds 400 records (its high watermark, which
    // the topic's reader would see seconds later).
    let watermarks: rdkafka::consumer::BaseConsumer = kafka()
        .client_config(&[("group.id", &unique("watermarks"))])
        .create()
        .unwrap();
    let start = Instant::now();
    loop {
        let partitions = watermarks
            .fetch_metadata(Some(&topic), Duration::from_millis(300))
            .map(|md| md.topics().first().map_or(0, |t| t.partitions().len()))
            .unwrap_or(0);
        let high: i64 = (0..partitions as i32)
            .map(|p| {
                watermarks
                    .fetch_watermarks(&topic, p, Duration::from_millis(300))
                    .map_or(0, |(_, high)| high)
            })
            .sum();
        if high >= 400 {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "no 400 records in {topic} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    source.kill().await;
    // The killed instance stored a snapshot in progress, past the `a` keys.
    let progress = stored_snapshot(&db, logical).await;
    let last_key = progress
        .last_key
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(
        last_key.contains("\"B"),
        "the kill came while the snapshot read `B` keys: {progress:?}"
    );
    // Rows read before the crash change (all `a` keys were), and rows not
    // read yet.
    script(
        &db.admin,
        "update public.k set v = 'after crash' where k < 'a00100' or k like 'B09%';
         delete from public.k where k between 'a00100' and 'a00109' or k between 'B09900' and 'B09909';
         insert into public.k values ('a99999', 'new'), ('B99999', 'new')",
    )
    .await;
    let source = db.start_source(&["k"], &overrides).await;
    script(&db.admin, "insert into public.k values ('zzz', 'last')").await;
    reader
        .until("the last insert", WAIT * 2, |events| {
            events.get(&topic).is_some_and(|e| {
                e.iter().any(|e| {
                    e.event
                        .as_ref()
                        .and_then(|ev| ev.row())
                        .is_some_and(|r| r["v"] == "last")
                })
            })
        })
        .await;
    reader.settle(Duration::from_millis(1500)).await;
    source.stop().await;
    let events = &reader.events[&topic];
    let mut reads: BTreeMap<String, usize> = BTreeMap::new();
    for e in events {
        if e.event.as_ref().is_some_and(|ev| ev.op == Op::Read) {
            *reads.entry(e.key.to_string()).or_default() += 1;
        }
    }
    let twice: Vec<_> = reads.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "rows read twice: {twice:?}");
    let expected = table_rows(&db.admin, "public.k", &["k"]).await;
    let got = replay(events);
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(*v))
        .map(|(k, _)| k)
        .chain(got.keys().filter(|k| !expected.contains_key(*k)))
        .take(10)
        .collect();
    assert!(wrong.is_empty(), "keys the topic replays wrong: {wrong:?}");
    assert_eq!(got, expected, "the topic replayed");
    if logical {
        let slot = pg_source::modes::logical::default_slot_name(&db.source_name);
        sqlx::query(
            "select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = $1",
        )
        .bind(&slot)
        .execute(&db.admin)
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_resumed_snapshot_compares_keys_in_the_key_s_collation() {
    a_resumed_snapshot_compares_keys_in_the_key_s_collation(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_resumed_snapshot_compares_keys_in_the_key_s_collation() {
    a_resumed_snapshot_compares_keys_in_the_key_s_collation(true).await;
}

/// The initial snapshot reads the table's own rows (and its partitions'),
/// not those of an inheritance child made behind the event trigger's back,
/// whose writes the table's triggers never capture: the topic replays to
/// `select ... from only` the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_reads_no_rows_of_inheritance_children() {
    let db = Db::new().await;
    script(
        &db.admin,
        "create table public.p (id int8 primary key, v text not null);
         insert into public.p values (1, 'own'), (2, 'own')",
    )
    .await;
    db.capture("p", Capture::full(TriggerLevel::Row)).await;
    script(
        &db.admin,
        "alter event trigger tidemark_ddl disable;
         create table public.p_child () inherits (public.p);
         alter event trigger tidemark_ddl enable always;
         insert into public.p_child values (100, 'child')",
    )
    .await;
    let topic = db.topic("p");
    let mut reader = TopicReader::new(&[topic.as_str()]);
    let source = db.start_source(&["p"], &[]).await;
    script(&db.admin, "insert into public.p values (3, 'last')").await;
    reader
        .until("the last insert", WAIT, |events| {
            events.get(&topic).is_some_and(|e| {
                e.iter().any(|e| {
                    e.event
                        .as_ref()
                        .and_then(|ev| ev.row())
                        .is_some_and(|r| r["v"] == "last")
                })
            })
        })
        .await;
    source.stop().await;
    let expected = table_rows(&db.admin, "only public.p", &["id"]).await;
    assert_eq!(expected.len(), 3, "{expected:?}");
    assert_eq!(
        replay(&reader.events[&topic]),
        expected,
        "the topic replayed"
    );
}
