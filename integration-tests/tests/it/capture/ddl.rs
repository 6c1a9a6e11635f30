//! Schema changes while pg-source runs in changelog mode and writers write
//! (issue 11, items 2 and 3), the migration pg-source slept through, and a
//! captured table dropped (issue 10.11). Each change is typed by the shape
//! it was written with.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::Rng as _;
use schema_init::Capture;
use serde_json::{json, Value};
use sqlx::PgPool;
use tidemark_common::envelope::Op;
use tokio_util::sync::CancellationToken;

use super::*;

/// What a writer did, in its order: (id, op, a after the op).
type WriterLog = Vec<(i64, char, Option<i64>)>;

/// Inserts, updates and deletes rows `id ≡ lane (mod 2)` below 100, each in
/// its own transaction, touching only `id` and `a`, until stopped.
async fn writer(pool: PgPool, lane: i64, stop: CancellationToken) -> WriterLog {
    let mut log = Vec::new();
    let mut live: BTreeMap<i64, i64> = BTreeMap::new();
    while !stop.is_cancelled() {
        let id = 2 * rand::rng().random_range(0..50i64) + lane;
        let roll = rand::rng().random_range(0..10);
        match live.get(&id).copied() {
            None => {
                let a = rand::rng().random_range(0..1000i64);
                sqlx::query("insert into public.s (id, a) values ($1::int8, $2::int8)")
                    .bind(id)
                    .bind(a)
                    .execute(&pool)
                    .await
                    .unwrap();
                live.insert(id, a);
                log.push((id, 'c', Some(a)));
            }
            Some(a) if roll < 7 => {
                sqlx::query("update public.s set a = $2::int8 where id = $1::int8")
                    .bind(id)
                    .bind(a + 1)
                    .execute(&pool)
                    .await
                    .unwrap();
                live.insert(id, a + 1);
                log.push((id, 'u', Some(a + 1)));
            }
            Some(_) => {
                sqlx::query("delete from public.s where id = $1::int8")
                    .bind(id)
                    .execute(&pool)
                    .await
                    .unwrap();
                live.remove(&id);
                log.push((id, 'd', None));
            }
        }
        // Paced: the test is about every DDL kind under concurrent writes,
        // not about throughput; unpaced, two writers outran the pipeline on
        // a loaded CI machine and the lag grew until a wait timed out.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    log
}

fn op_char(op: Op) -> char {
    match op {
        Op::Create => 'c',
        Op::Update => 'u',
        Op::Delete => 'd',
        Op::Read => 'r',
        Op::Truncate => 't',
    }
}

/// The id a change event is about.
fn event_id(e: &Event) -> Option<i64> {
    let event = e.event.as_ref()?;
    event
        .after
        .as_ref()
        .or(event.before.as_ref())
        .and_then(|row| row["id"].as_i64())
}

/// The last event about `id`.
fn last_of(events: &[Event], id: i64) -> &Event {
    events
        .iter()
        .rev()
        .find(|e| event_id(e) == Some(id))
        .unwrap_or_else(|| panic!("no event about id {id}"))
}

/// Waits until the last event about `id` satisfies `ok`.
async fn wait_for_state(
    reader: &mut TopicReader,
    topic: &str,
    id: i64,
    ok: impl Fn(&Value) -> bool,
) {
    let seen = reader
        .events
        .get(topic)
        .and_then(|events| events.iter().rev().find(|e| event_id(e) == Some(id)))
        .map(|e| format!("{:?}", e.event));
    reader
        .until(
            &format!("the change of row {id} (seen before: {seen:?})"),
            WAIT,
            |e| {
                e.get(topic).is_some_and(|events| {
                    events
                        .iter()
                        .rev()
                        .find(|e| event_id(e) == Some(id))
                        .is_some_and(|e| e.after().is_some_and(&ok))
                })
            },
        )
        .await;
}

/// The field schema of `field` in the `after` struct of a raw value.
fn after_field_schema<'a>(raw: &'a Value, field: &str) -> &'a Value {
    raw["schema"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["field"] == "after")
        .and_then(|after| after["fields"].as_array())
        .and_then(|fields| fields.iter().find(|f| f["field"] == field))
        .unwrap_or_else(|| panic!("no field {field} in the schema of {raw}"))
}

/// Every DDL kind of issue 11 while two writers write: the events after
/// each carry the new shape, and per row the topic holds exactly the
/// writers' changes, in their order, with their values.
async fn ddl_while_writers_write(capture: Capture) {
    let db = Db::new().await;
    exec(
        &db.admin,
        "create table public.s (id int primary key, a int, b text, c text)",
    )
    .await;
    exec(
        &db.admin,
        "insert into public.s values (1000, 1, 'four', 'cee'), (1001, 2, 'five', 'cee')",
    )
    .await;
    db.capture("s", capture).await;
    let topic = db.topic("s");
    let mut reader = TopicReader::new(&[topic.as_str()]);
    let source = db.start_source(&["s"], &[]).await;
    reader.at_least(&topic, 2).await;

    let stop = CancellationToken::new();
    let writers: Vec<_> = (0..2)
        .map(|lane| tokio::spawn(writer(db.admin.clone(), lane, stop.clone())))
        .collect();
    let pause = || tokio::time::sleep(Duration::from_millis(300));
    pause().await;

    exec(&db.admin, "alter table public.s add column d text").await;
    exec(&db.admin, "update public.s set d = 'dee' where id = 1000").await;
    wait_for_state(&mut reader, &topic, 1000, |row| row["d"] == "dee").await;
    pause().await;

    exec(&db.admin, "alter table public.s rename column c to c2").await;
    exec(&db.admin, "update public.s set c2 = 'cee2' where id = 1000").await;
    wait_for_state(&mut reader, &topic, 1000, |row| {
        row["c2"] == "cee2" && row.get("c").is_none()
    })
    .await;
    pause().await;

    exec(&db.admin, "alter table public.s alter column a type bigint").await;
    exec(
        &db.admin,
        "update public.s set a = 3000000000 where id = 1001",
    )
    .await;
    wait_for_state(&mut reader, &topic, 1001, |row| {
        row["a"] == json!(3_000_000_000i64)
    })
    .await;
    pause().await;

    exec(
        &db.admin,
        "alter table public.s alter column b type int using length(b)",
    )
    .await;
    exec(&db.admin, "update public.s set b = b + 3 where id = 1000").await;
    wait_for_state(&mut reader, &topic, 1000, |row| row["b"] == json!(7)).await;
    pause().await;

    // The writers always set `a`.
    exec(
        &db.admin,
        "alter table public.s alter column a set not null",
    )
    .await;
    exec(&db.admin, "update public.s set d = 'dee!' where id = 1000").await;
    wait_for_state(&mut reader, &topic, 1000, |row| row["d"] == "dee!").await;
    let raw = last_of(&reader.events[&topic], 1000).raw.clone().unwrap();
    assert_eq!(after_field_schema(&raw, "a")["optional"], false, "{raw}");
    exec(
        &db.admin,
        "alter table public.s alter column a drop not null",
    )
    .await;
    exec(&db.admin, "update public.s set d = null where id = 1000").await;
    wait_for_state(&mut reader, &topic, 1000, |row| row["d"].is_null()).await;
    let raw = last_of(&reader.events[&topic], 1000).raw.clone().unwrap();
    assert_eq!(after_field_schema(&raw, "a")["optional"], true, "{raw}");
    pause().await;

    exec(&db.admin, "alter table public.s drop column c2").await;
    exec(&db.admin, "update public.s set d = 'no c2' where id = 1000").await;
    wait_for_state(&mut reader, &topic, 1000, |row| {
        row["d"] == "no c2" && row.get("c2").is_none()
    })
    .await;
    pause().await;

    exec(
        &db.admin,
        "alter table public.s add column k int not null default 0",
    )
    .await;
    exec(
        &db.admin,
        "alter table public.s drop constraint s_pkey, add primary key (id, k)",
    )
    .await;
    exec(&db.admin, "update public.s set k = 1 where id = 1000").await;
    wait_for_state(&mut reader, &topic, 1000, |row| row["k"] == 1).await;
    let key_change = last_of(&reader.events[&topic], 1000);
    assert_eq!(key_change.key, json!({"id": 1000, "k": 1}));
    pause().await;

    stop.cancel();
    let mut logs = Vec::new();
    for w in writers {
        logs.push(w.await.unwrap());
    }
    let marker = 1_000_000_000i64;
    exec(
        &db.admin,
        &format!("insert into public.s (id, a) values ({marker}, 0)"),
    )
    .await;
    wait_for_state(&mut reader, &topic, marker, |_| true).await;
    source.stop().await;

    // Per row, the writers' changes exactly: nothing lost, twice or out of
    // order, every value as written.
    let events = &reader.events[&topic];
    let mut seen: BTreeMap<i64, WriterLog> = BTreeMap::new();
    for e in events {
        let (Some(id), Some(event)) = (event_id(e), e.event.as_ref()) else {
            continue;
        };
        if id >= 100 {
            continue;
        }
        let a = event
            .after
            .as_ref()
            .map(|row| row["a"].as_i64().expect("a is an integer"));
        seen.entry(id).or_default().push((id, op_char(event.op), a));
    }
    let mut written: BTreeMap<i64, WriterLog> = BTreeMap::new();
    for entry in logs.into_iter().flatten() {
        written.entry(entry.0).or_default().push(entry);
    }
    assert!(
        written.values().map(Vec::len).sum::<usize>() > 50,
        "the writers barely wrote"
    );
    for (id, ops) in &written {
        assert_eq!(seen.get(id), Some(ops), "row {id}");
    }
    assert_eq!(seen.len(), written.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ddl_kind_while_writers_write_row_triggers() {
    ddl_while_writers_write(every_capture()[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ddl_kind_while_writers_write_statement_triggers() {
    ddl_while_writers_write(every_capture()[1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ddl_kind_while_writers_write_statement_triggers_without_update_before() {
    ddl_while_writers_write(every_capture()[3]).await;
}

/// Issue 11: pg-source stopped, a row updated from `b = 'four'`, then
/// `alter column b type int using b::int`: pg-source starts, sends the
/// update typed as it was written (text), then the changes after the ALTER
/// typed as int, and runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_pg_source_slept_through_is_read_with_the_shapes_it_was_written_with() {
    let db = Db::new().await;
    exec(
        &db.admin,
        "create table public.s (id int primary key, b text)",
    )
    .await;
    db.capture("s", every_capture()[0]).await;
    let topic = db.topic("s");
    let mut reader = TopicReader::new(&[topic.as_str()]);
    let source = db.start_source(&["s"], &[]).await;
    exec(&db.admin, "insert into public.s values (1, 'four')").await;
    reader.at_least(&topic, 1).await;
    source.stop().await;

    exec(&db.admin, "update public.s set b = '4' where id = 1").await;
    exec(
        &db.admin,
        "alter table public.s alter column b type int using b::int",
    )
    .await;
    exec(&db.admin, "insert into public.s values (2, 5)").await;
    let mut source = db.start_source(&["s"], &[]).await;
    let events = reader.at_least(&topic, 3).await.to_vec();
    source.assert_running("pg-source after the migration").await;
    let update = events[1].event.as_ref().unwrap();
    assert_eq!(update.before.as_ref().unwrap()["b"], "four");
    assert_eq!(update.after.as_ref().unwrap()["b"], "4");
    assert_eq!(events[2].after().unwrap()["b"], json!(5));
    let raw = events[2].raw.as_ref().unwrap();
    assert_eq!(after_field_schema(raw, "b")["type"], "int32", "{raw}");
    let raw = events[1].raw.as_ref().unwrap();
    assert_eq!(after_field_schema(raw, "b")["type"], "string", "{raw}");

    exec(&db.admin, "update public.s set b = b * 2").await;
    reader.at_least(&topic, 5).await;
    source.stop().await;
}

/// Issue 10.11: DROP TABLE of one of two captured tables. What was captured
/// before the drop is sent, the other table's changes go on, the change log
/// is pruned, and a restart with the dropped table still configured neither
/// refuses nor stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_table_s_changes_are_sent_and_the_other_table_goes_on() {
    // The process's metrics, where pg-source running in-process reports.
    let metrics = tidemark_common::ops::recorder();
    let db = Db::new().await;
    for t in ["gone", "kept"] {
        exec(
            &db.admin,
            &format!("create table public.{t} (id int primary key, v text)"),
        )
        .await;
        db.capture(t, every_capture()[1]).await;
    }
    let topics = [db.topic("gone"), db.topic("kept")];
    let mut reader = TopicReader::new(&topics);
    let tables = ["gone", "kept"];
    let source = db.start_source(&tables, &[]).await;
    exec(&db.admin, "insert into public.gone values (1, 'a')").await;
    exec(&db.admin, "insert into public.kept values (1, 'a')").await;
    reader.at_least(&topics[0], 1).await;
    source.stop().await;

    // Changed while pg-source is stopped, then dropped.
    exec(&db.admin, "update public.gone set v = 'b'").await;
    exec(&db.admin, "insert into public.gone values (2, 'c')").await;
    exec(&db.admin, "insert into public.kept values (2, 'b')").await;
    exec(&db.admin, "drop table public.gone").await;
    exec(&db.admin, "insert into public.kept values (3, 'c')").await;

    let mut source = db.start_source(&tables, &[]).await;
    reader.at_least(&topics[0], 3).await;
    reader.at_least(&topics[1], 3).await;
    exec(&db.admin, "insert into public.kept values (4, 'd')").await;
    reader.at_least(&topics[1], 4).await;
    source.assert_running("pg-source after the drop").await;
    let page = metrics.render();
    assert!(
        page.lines()
            .any(|l| l.starts_with("tidemark_source_tables_dropped{")
                && l.contains(r#"table="public.gone""#)
                && l.ends_with(" 1")),
        "no metric says the table left: {page}"
    );
    let gone = &reader.events[&topics[0]];
    assert_eq!(gone[1].after().unwrap()["v"], "b");
    assert_eq!(gone[2].after().unwrap()["v"], "c");

    let mut left = i64::MAX;
    for _ in 0..100 {
        left = sqlx::query_scalar("select count(*) from tidemark.change_log")
            .fetch_one(&db.admin)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0, "the change log keeps what Kafka confirmed");
    source.stop().await;

    // A restart with the dropped table still in the whitelist.
    let source = db.start_source(&tables, &[]).await;
    exec(&db.admin, "insert into public.kept values (5, 'e')").await;
    reader.at_least(&topics[1], 5).await;
    reader.settle(Duration::from_secs(1)).await;
    assert_eq!(
        reader.events[&topics[0]].len(),
        3,
        "the dropped table's changes once"
    );
    source.stop().await;
}

/// A captured table left without a primary key refuses writes, saying why
/// and what to do, instead of logging changes nothing could key; with a key
/// again, its changes flow, keyed by the new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_table_without_a_primary_key_refuses_writes_until_it_has_one() {
    let db = Db::new().await;
    exec(
        &db.admin,
        "create table public.s (id int primary key, k int not null, v text)",
    )
    .await;
    db.capture("s", every_capture()[1]).await;
    exec(&db.admin, "alter table public.s drop constraint s_pkey").await;
    let err = sqlx::query("insert into public.s values (1, 1, 'a')")
        .execute(&db.admin)
        .await
        .expect_err("a write to a captured table without a key");
    let err = format!("{err}");
    assert!(
        err.contains("table public.s is captured by Tidemark and has no primary key"),
        "{err}"
    );
    exec(&db.admin, "alter table public.s add primary key (id, k)").await;
    let topic = db.topic("s");
    let mut reader = TopicReader::new(&[topic.as_str()]);
    let source = db.start_source(&["s"], &[]).await;
    exec(&db.admin, "insert into public.s values (1, 1, 'a')").await;
    let events = reader.at_least(&topic, 1).await.to_vec();
    source.stop().await;
    assert_eq!(events[0].key, json!({"id": 1, "k": 1}));
}

/// A captured table renamed while pg-source runs: its capture function logs
/// the new name from the rename on, and pg-source, which follows the table
/// by its OID, keeps sending its changes to the same topic, naming the new
/// table in `source.table`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_table_is_followed_to_its_topic() {
    let db = Db::new().await;
    exec(
        &db.admin,
        "create table public.s (id int primary key, v text)",
    )
    .await;
    db.capture("s", every_capture()[0]).await;
    let topic = db.topic("s");
    let mut reader = TopicReader::new(&[topic.as_str()]);
    let source = db
        .start_source(&["s"], &[("snapshot.mode", "no_data")])
        .await;
    exec(&db.admin, "insert into public.s values (1, 'before')").await;
    exec(&db.admin, "alter table public.s rename to renamed").await;
    exec(&db.admin, "insert into public.renamed values (2, 'after')").await;
    let events = reader.at_least(&topic, 2).await.to_vec();
    source.stop().await;
    let tables: Vec<String> = events
        .iter()
        .map(|e| e.event.as_ref().unwrap().source.table.clone())
        .collect();
    assert_eq!(tables, ["s", "renamed"]);
    assert_eq!(events[1].after().unwrap()["v"], "after");
}

/// The `source.table` of every change event in `events`.
fn source_tables(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e.event.as_ref().map(|ev| ev.source.table.clone()))
        .collect()
}

/// A partitioned table captured with row triggers, which its partitions
/// run as clones: changes written through it and straight to a partition
/// (one attached with its columns in another order) arrive as its own, each
/// value in its column, before and after an `ALTER TABLE`, and a row moved
/// to another partition is a delete and a create. Statement triggers, which
/// writes to a partition bypass, are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_s_changes_arrive_whichever_partition_they_were_written_to() {
    let db = Db::new().await;
    for sql in [
        "create table public.pt (id int primary key, a text, b text) partition by range (id)",
        "create table public.pt_low partition of public.pt for values from (0) to (100)",
        "create table public.pt_high (b text, a text, id int not null)",
        "alter table public.pt attach partition public.pt_high for values from (100) to (200)",
    ] {
        exec(&db.admin, sql).await;
    }
    for capture in [every_capture()[1], every_capture()[3]] {
        let err = db
            .schema_init_as(db.superuser.clone(), "pt", capture)
            .await
            .expect_err("statement triggers on a partitioned table");
        let err = format!("{err:#}");
        assert!(err.contains("table public.pt is partitioned"), "{err}");
    }
    db.capture("pt", every_capture()[0]).await;
    let topic = db.topic("pt");
    let mut reader = TopicReader::new(&[topic.as_str()]);
    let source = db
        .start_source(&["pt"], &[("snapshot.mode", "no_data")])
        .await;
    for sql in [
        "insert into public.pt values (1, 'a1', 'b1'), (101, 'a101', 'b101')",
        "insert into public.pt_low values (2, 'a2', 'b2')",
        "insert into public.pt_high (id, a, b) values (102, 'a102', 'b102')",
        "update public.pt_high set a = a || '!'",
        "alter table public.pt add column c int",
        "insert into public.pt_high (id, a, b, c) values (103, 'a103', 'b103', 3)",
        "update public.pt set c = id",
        "update public.pt set id = 150 where id = 1",
        "delete from public.pt_low where id = 2",
    ] {
        exec(&db.admin, sql).await;
    }
    // c c c c, u u, c, u u u u u, d (+tombstone) c, d (+tombstone).
    let events = reader
        .at_least(&topic, 4 + 2 + 1 + 5 + 3 + 2)
        .await
        .to_vec();
    reader.settle(Duration::from_secs(1)).await;
    source.stop().await;
    assert_eq!(reader.events[&topic].len(), 17);
    assert!(
        source_tables(&events).iter().all(|t| t == "pt"),
        "{:?}",
        source_tables(&events)
    );
    assert_eq!(
        events[3].after(),
        Some(&json!({"id": 102, "a": "a102", "b": "b102"}))
    );
    assert_eq!(
        replay(&events),
        table_rows(&db.admin, "public.pt", &["id"]).await
    );
}

/// Columns dropped by a cascade, which no `ALTER TABLE` announces (`drop
/// type`, `drop domain`, `drop extension ... cascade`), of tables captured
/// by row and by statement triggers: the changes written before a drop
/// arrive with the column, those after without it, every value in its
/// column, and pg-source runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_dropped_by_a_cascade_leave_the_shape_at_once() {
    let db = Db::new().await;
    for sql in [
        "create extension hstore",
        "create type public.mood as enum ('ok', 'sad')",
        "create domain public.word as text",
    ] {
        exec(&db.admin, sql).await;
    }
    let tables = ["by_row", "by_statement"];
    for (table, capture) in tables.iter().zip([every_capture()[0], every_capture()[1]]) {
        exec(
            &db.admin,
            &format!(
                "create table public.{table} (id int primary key, m public.mood, w public.word, h public.hstore, b text)"
            ),
        )
        .await;
        db.capture(table, capture).await;
    }
    let topics: Vec<String> = tables.iter().map(|t| db.topic(t)).collect();
    let mut reader = TopicReader::new(&topics);
    let mut source = db
        .start_source(&tables, &[("snapshot.mode", "no_data")])
        .await;
    let mut steps = vec![];
    for table in tables {
        steps.push(format!(
            "insert into public.{table} values (1, 'ok', 'w1', 'k=>1', 'b1')"
        ));
    }
    steps.push("drop type public.mood cascade".into());
    for table in tables {
        steps.push(format!(
            "insert into public.{table} values (2, 'w2', 'k=>2', 'b2')"
        ));
    }
    steps.push("drop domain public.word cascade".into());
    for table in tables {
        for id in [1, 2] {
            steps.push(format!(
                "update public.{table} set b = b || '!' where id = {id}"
            ));
        }
    }
    steps.push("drop extension hstore cascade".into());
    for table in tables {
        steps.push(format!("insert into public.{table} values (3, 'b3')"));
    }
    for sql in &steps {
        exec(&db.admin, sql).await;
    }
    for topic in &topics {
        reader.at_least(topic, 5).await;
    }
    source.assert_running("pg-source after the drops").await;
    source.stop().await;
    for topic in &topics {
        let afters: Vec<Option<&Value>> = reader.events[topic].iter().map(Event::after).collect();
        assert_eq!(
            afters,
            [
                Some(&json!({"id": 1, "m": "ok", "w": "w1", "h": "\"k\"=>\"1\"", "b": "b1"})),
                Some(&json!({"id": 2, "w": "w2", "h": "\"k\"=>\"2\"", "b": "b2"})),
                Some(&json!({"id": 1, "h": "\"k\"=>\"1\"", "b": "b1!"})),
                Some(&json!({"id": 2, "h": "\"k\"=>\"2\"", "b": "b2!"})),
                Some(&json!({"id": 3, "b": "b3"})),
            ],
            "{topic}"
        );
    }
}

/// The swap migration: a captured table renamed away, a new table of other
/// columns created under its name and captured, rows copied over, the old
/// one dropped. The two never share a capture function: the old table's
/// changes until the drop are logged as its own, with its shape, and the
/// new one's with the new shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_swapped_for_a_new_one_of_its_name_keeps_its_own_capture() {
    let db = Db::new().await;
    exec(
        &db.admin,
        "create table public.s (id int primary key, a text, b text)",
    )
    .await;
    db.capture("s", every_capture()[1]).await;
    let topic = db.topic("s");
    let mut reader = TopicReader::new(&[topic.as_str()]);
    let source = db
        .start_source(&["s"], &[("snapshot.mode", "no_data")])
        .await;
    exec(&db.admin, "insert into public.s values (1, 'a1', 'b1')").await;
    exec(&db.admin, "alter table public.s rename to s_old").await;
    exec(
        &db.admin,
        "create table public.s (id int primary key, b text, a text, c int)",
    )
    .await;
    db.capture("s", every_capture()[1]).await;
    // A writer that still knows the old table.
    exec(&db.admin, "update public.s_old set a = 'a1!'").await;
    exec(
        &db.admin,
        "insert into public.s (id, a, b, c) select id, a, b, 0 from public.s_old",
    )
    .await;
    exec(&db.admin, "insert into public.s values (2, 'b2', 'a2', 2)").await;
    exec(&db.admin, "drop table public.s_old").await;
    let events = reader.at_least(&topic, 4).await.to_vec();
    source.stop().await;
    assert_eq!(source_tables(&events), ["s", "s_old", "s", "s"]);
    let afters: Vec<Option<&Value>> = events.iter().map(Event::after).collect();
    assert_eq!(
        afters,
        [
            Some(&json!({"id": 1, "a": "a1", "b": "b1"})),
            Some(&json!({"id": 1, "a": "a1!", "b": "b1"})),
            Some(&json!({"id": 1, "b": "b1", "a": "a1!", "c": 0})),
            Some(&json!({"id": 2, "b": "b2", "a": "a2", "c": 2})),
        ]
    );
}

/// A table whose name holds the words by which the event trigger used to
/// tell a capture without update-before: after an `ALTER TABLE` its
/// updates still log the whole row before, as installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_named_like_a_capture_setting_keeps_its_setting_through_an_alter() {
    let db = Db::new().await;
    let name = "x, update before null";
    for (i, capture) in [every_capture()[0], every_capture()[1]]
        .into_iter()
        .enumerate()
    {
        let table = format!("{name} {i}");
        let quoted = tidemark_common::names::quote_ident(&table);
        exec(
            &db.admin,
            &format!("create table public.{quoted} (id int primary key, v text)"),
        )
        .await;
        db.capture(&quoted, capture).await;
        for sql in [
            format!("alter table public.{quoted} add column w int"),
            format!("insert into public.{quoted} values (1, 'one', 1)"),
            format!("update public.{quoted} set v = 'uno'"),
        ] {
            exec(&db.admin, &sql).await;
        }
    }
    let befores: Vec<(String, Option<String>)> = sqlx::query_as(
        "select table_name, before from tidemark.change_log where op = 'u' order by seq",
    )
    .fetch_all(&db.admin)
    .await
    .unwrap();
    assert_eq!(
        befores,
        [
            (
                format!(
                    "public.{}",
                    tidemark_common::names::quote_ident(&format!("{name} 0"))
                ),
                Some("(1,one,1)".to_owned())
            ),
            (
                format!(
                    "public.{}",
                    tidemark_common::names::quote_ident(&format!("{name} 1"))
                ),
                Some("(1,one,1)".to_owned())
            ),
        ]
    );
}

/// Where a write could bypass a table's capture triggers, schema-init
/// refuses to capture it, and a later DDL that would make it so is refused
/// (the event trigger aborts it): statement triggers on a partition or an
/// inheritance child (a write through the parent fires only the parent's
/// statement triggers), any triggers on an inheritance parent (its
/// children's rows fire the children's triggers). Row triggers on a
/// partition log the writes made through its partitioned table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_that_writes_could_bypass_is_refused_by_schema_init_and_by_the_event_trigger() {
    let db = Db::new().await;
    for sql in [
        "create table public.pt (id int primary key, v text) partition by range (id)",
        "create table public.pt_low partition of public.pt for values from (0) to (100)",
        "create table public.p (id int primary key, v text)",
        "create table public.c (id int primary key, v text) inherits (public.p)",
        "create table public.alone (id int primary key, v text)",
        "create table public.by_row (id int primary key, v text)",
        "create table public.other (id int primary key, v text)",
    ] {
        exec(&db.admin, sql).await;
    }
    let refused = [
        ("pt_low", every_capture()[1], "table public.pt_low is a partition of public.pt: its statement-level triggers would not fire for writes made through public.pt"),
        ("c", every_capture()[3], "table public.c is an inheritance child of public.p: its statement-level triggers would not fire"),
        ("p", every_capture()[0], "table public.p has the inheritance child public.c: its triggers would not fire for rows of public.c"),
        ("p", every_capture()[1], "table public.p has the inheritance child public.c"),
    ];
    for (table, capture, says) in refused {
        let err = db
            .schema_init_as(db.superuser.clone(), table, capture)
            .await
            .expect_err(table);
        let err = format!("{err:#}");
        assert!(err.contains(says), "{table}: {err}");
        assert!(err.contains("(hint: "), "{table}: {err}");
    }
    db.capture("pt_low", every_capture()[0]).await;
    db.capture("c", every_capture()[0]).await;
    db.capture("alone", every_capture()[1]).await;
    db.capture("by_row", every_capture()[0]).await;
    for (sql, says) in [
        (
            "alter table public.pt attach partition public.alone for values from (100) to (200)",
            "table public.alone is captured with statement-level triggers and is a partition or an inheritance child of public.pt",
        ),
        (
            "create table public.by_row_child (w int) inherits (public.by_row)",
            "table public.by_row is captured and has the inheritance child public.by_row_child",
        ),
        (
            "alter table public.other inherit public.by_row",
            "table public.by_row is captured and has the inheritance child public.other",
        ),
        (
            "alter table public.alone inherit public.other",
            "table public.alone is captured with statement-level triggers and is a partition or an inheritance child of public.other",
        ),
    ] {
        let err = sqlx::query(sql)
            .execute(&db.admin)
            .await
            .expect_err(sql)
            .to_string();
        assert!(err.contains(says), "{sql}: {err}");
    }
    let inherits: Vec<String> =
        sqlx::query_scalar("select inhrelid::regclass::text from pg_inherits order by 1")
            .fetch_all(&db.admin)
            .await
            .unwrap();
    assert_eq!(inherits, ["c", "pt_low", "pt_low_pkey"]);
    // What stays allowed: partitions of a table, temporary tables, DDL of
    // tables nobody captures.
    for sql in [
        "create table public.pt_high partition of public.pt for values from (200) to (300)",
        "create temporary table scratch (a int)",
        "create table public.q (id int)",
        "create table public.q_child () inherits (public.q)",
        "insert into public.pt values (1, 'through the parent'), (250, 'not captured')",
        "update public.pt set v = v || '!'",
        "insert into public.p values (2, 'parent')",
        "insert into public.c values (3, 'child')",
        "update public.p set v = v || '!'",
    ] {
        exec(&db.admin, sql).await;
    }
    let logged: Vec<(String, String, Option<String>)> =
        sqlx::query_as("select table_name, op::text, after from tidemark.change_log order by seq")
            .fetch_all(&db.admin)
            .await
            .unwrap();
    let row =
        |t: &str, op: &str, after: &str| (t.to_owned(), op.to_owned(), Some(after.to_owned()));
    assert_eq!(
        logged,
        [
            row("public.pt_low", "c", "(1,\"through the parent\")"),
            row("public.pt_low", "u", "(1,\"through the parent!\")"),
            row("public.c", "c", "(3,child)"),
            row("public.c", "u", "(3,child!)"),
        ]
    );
}

/// Capture triggers are enabled always, so they fire for replica sessions
/// too: those of logical replication's apply (a subscriber's tables) run
/// with `session_replication_role = replica`, where a trigger enabled the
/// default way stays silent. `enable trigger all` (which would set them
/// back to the default) leaves them enabled always.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_triggers_fire_for_replica_sessions_and_stay_enabled_always() {
    let db = Db::new().await;
    let (owner, owner_pool) = db.role("owner_").await;
    exec(
        &db.admin,
        &format!("grant create on schema public to {owner}"),
    )
    .await;
    for sql in [
        "create table public.by_statement (id int primary key, v text)",
        "create table public.by_row (id int primary key, v text) partition by range (id)",
        "create table public.by_row_low partition of public.by_row for values from (0) to (100)",
    ] {
        exec(&owner_pool, sql).await;
    }
    db.capture("by_statement", every_capture()[1]).await;
    db.capture("by_row", every_capture()[0]).await;
    let replica_write = |n: i32| {
        let admin = db.admin.clone();
        async move {
            let mut tx = admin.begin().await.unwrap();
            sqlx::query("set local session_replication_role = replica")
                .execute(&mut *tx)
                .await
                .unwrap();
            for table in ["by_statement", "by_row"] {
                sqlx::query(&format!(
                    "insert into public.{table} values ({n}, 'as a replica')"
                ))
                .execute(&mut *tx)
                .await
                .unwrap();
            }
            tx.commit().await.unwrap();
        }
    };
    replica_write(1).await;
    for table in ["by_statement", "by_row"] {
        exec(
            &owner_pool,
            &format!("alter table public.{table} enable trigger all"),
        )
        .await;
    }
    replica_write(2).await;
    let states: Vec<(String, String)> = sqlx::query_as(
        "select tgrelid::regclass::text, tgenabled::text from pg_trigger where tgname like 'tidemark%' order by 1, tgname",
    )
    .fetch_all(&db.admin)
    .await
    .unwrap();
    assert!(states.iter().all(|(_, s)| s == "A"), "{states:?}");
    let logged: Vec<(String, Option<String>)> =
        sqlx::query_as("select table_name, after from tidemark.change_log order by seq")
            .fetch_all(&db.admin)
            .await
            .unwrap();
    let row = |t: &str, n: i32| {
        (
            format!("public.{t}"),
            Some(format!("({n},\"as a replica\")")),
        )
    };
    assert_eq!(
        logged,
        [
            row("by_statement", 1),
            row("by_row", 1),
            row("by_statement", 2),
            row("by_row", 2)
        ]
    );
}

/// A table owner drops the change-log triggers of its table (owners may):
/// pg-source says so (an ERROR log and `tidemark_source_tables_uncaptured`),
/// the other tables go on, and a restart neither refuses nor stops; once
/// captured again, its changes flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_whose_owner_drops_its_capture_stops_only_itself() {
    let metrics = tidemark_common::ops::recorder();
    let db = Db::new().await;
    let (owner, owner_pool) = db.role("owner_").await;
    exec(
        &db.admin,
        &format!("grant create on schema public to {owner}"),
    )
    .await;
    exec(
        &db.admin,
        "create table public.kept_captured (id int primary key)",
    )
    .await;
    exec(
        &owner_pool,
        "create table public.capture_dropped_by_owner (id int primary key)",
    )
    .await;
    let tables = ["kept_captured", "capture_dropped_by_owner"];
    for t in tables {
        db.capture(t, every_capture()[1]).await;
    }
    let topics = [db.topic(tables[0]), db.topic(tables[1])];
    let mut reader = TopicReader::new(&topics);
    let source = db
        .start_source(&tables, &[("snapshot.mode", "no_data")])
        .await;
    exec(&db.admin, "insert into public.kept_captured values (1)").await;
    exec(
        &owner_pool,
        "insert into public.capture_dropped_by_owner values (1)",
    )
    .await;
    reader.at_least(&topics[1], 1).await;
    for trigger in ["insert", "update", "delete"] {
        exec(
            &owner_pool,
            &format!("drop trigger tidemark_capture_{trigger} on public.capture_dropped_by_owner"),
        )
        .await;
    }
    let said = || {
        metrics.render().lines().any(|l| {
            l.starts_with("tidemark_source_tables_uncaptured{")
                && l.contains(r#"table="public.capture_dropped_by_owner""#)
                && l.ends_with(" 1")
        })
    };
    let start = Instant::now();
    while !said() {
        assert!(
            start.elapsed() < WAIT,
            "no metric says the table is no longer captured: {}",
            metrics.render()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    exec(&db.admin, "insert into public.kept_captured values (2)").await;
    reader.at_least(&topics[0], 2).await;
    source.stop().await;

    let mut source = db
        .start_source(&tables, &[("snapshot.mode", "no_data")])
        .await;
    exec(&db.admin, "insert into public.kept_captured values (3)").await;
    reader.at_least(&topics[0], 3).await;
    db.capture(tables[1], every_capture()[1]).await;
    exec(
        &owner_pool,
        "insert into public.capture_dropped_by_owner values (2)",
    )
    .await;
    reader.at_least(&topics[1], 2).await;
    source.assert_running("pg-source").await;
    source.stop().await;
}

/// The shapes a DDL records carry the snapshot pg-source ends a batch at
/// only where it was taken under the table's lock: an ALTER TABLE in read
/// committed; not one in repeatable read (its snapshot may be older than
/// the lock), nor a schema rename (which locks no table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shape_keeps_its_ddl_s_snapshot_only_where_the_ddl_locked_the_table() {
    let db = Db::new().await;
    exec(&db.admin, "create schema s1").await;
    exec(&db.admin, "create table s1.t (id int primary key, b text)").await;
    db.capture("s1.t", every_capture()[0]).await;
    let latest = || async {
        sqlx::query_as::<_, (Option<String>, Option<String>)>(
            "select txid::text, snapshot::text from tidemark.shapes order by id desc limit 1",
        )
        .fetch_one(&db.admin)
        .await
        .unwrap()
    };
    exec(&db.admin, "alter table s1.t add column c int").await;
    let (txid, snapshot) = latest().await;
    assert!(
        txid.is_some() && snapshot.is_some(),
        "read committed: {txid:?} {snapshot:?}"
    );
    let mut tx = db.admin.begin().await.unwrap();
    for sql in [
        "set transaction isolation level repeatable read",
        "alter table s1.t add column d int",
    ] {
        sqlx::query(sql).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
    let (txid, snapshot) = latest().await;
    assert!(
        txid.is_some() && snapshot.is_none(),
        "repeatable read: {txid:?} {snapshot:?}"
    );
    exec(&db.admin, "alter schema s1 rename to s2").await;
    let (txid, snapshot) = latest().await;
    assert!(
        txid.is_some() && snapshot.is_none(),
        "schema rename: {txid:?} {snapshot:?}"
    );
    let shapes: i64 = sqlx::query_scalar("select count(*) from tidemark.shapes")
        .fetch_one(&db.admin)
        .await
        .unwrap();
    assert!(shapes >= 4, "a shape per change: {shapes}");
}
