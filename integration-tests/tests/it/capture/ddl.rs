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
    }
    log
}

fn op_char(op: Op) -> char {
    match op {
        Op::Create => 'c',
        Op::Update => 'u',
        Op::Delete => 'd',
        Op::Read => 'r',
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
