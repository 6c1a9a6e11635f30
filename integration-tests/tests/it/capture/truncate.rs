//! TRUNCATE as its own event (issue 14.1, contract amendment 4): inside a
//! transaction between inserts, `TRUNCATE a, b` and a cascade over a
//! captured foreign-key child; one event per table truncated, with a null
//! Kafka key, in its place in the unit and counted in its totals; in
//! `changelog` mode (both trigger levels) and `logical` mode.

use schema_init::{TriggerLevel, UpdateBefore};
use tidemark_common::envelope::Op;

use super::*;

const TABLES: &str = "
create table public.a (id int8 primary key, v text not null);
create table public.b (id int8 primary key, v text not null);
create table public.c (id int8 primary key, a_id int8 not null references public.a (id));
insert into public.a values (1, 'old'), (2, 'old');
insert into public.b values (1, 'old');
insert into public.c values (1, 1)";

/// The writes after pg-source started: each string one transaction.
const TRANSACTIONS: [&str; 3] = [
    // Inserts before and after a TRUNCATE, and a key the TRUNCATE freed
    // inserted again.
    "begin;
     insert into public.a values (3, 'x');
     truncate public.b;
     insert into public.b values (1, 'new');
     insert into public.a values (4, 'x');
     commit",
    // Two tables named, and c by the cascade.
    "begin;
     insert into public.c values (2, 3);
     truncate public.a, public.b cascade;
     insert into public.a values (1, 'again');
     insert into public.c values (1, 1);
     commit",
    "truncate public.b; insert into public.b values (5, 'y')",
];

/// Runs `sql`, statements and all, as the user.
async fn script(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// What the streamed units hold, flattened in unit order: (table, op, id).
/// TRUNCATE events of one statement are sorted by table.
fn expected() -> Vec<(String, char, Option<i64>)> {
    let e = |t: &str, op: char, id: Option<i64>| (t.to_owned(), op, id);
    vec![
        e("a", 'c', Some(3)),
        e("b", 't', None),
        e("b", 'c', Some(1)),
        e("a", 'c', Some(4)),
        e("c", 'c', Some(2)),
        e("a", 't', None),
        e("b", 't', None),
        e("c", 't', None),
        e("a", 'c', Some(1)),
        e("c", 'c', Some(1)),
        e("b", 't', None),
        e("b", 'c', Some(5)),
    ]
}

/// Records per topic once every write is sent (snapshot reads included).
const COUNTS: [(&str, usize); 3] = [("a", 6), ("b", 6), ("c", 4)];

/// The change events of `topics` by unit (`commit_order`), each unit's in
/// `total_order`, with their table; checks every unit's numbering and
/// totals on the way.
fn units(reader: &TopicReader, topics: &[(String, String)]) -> BTreeMap<u64, Vec<(String, Event)>> {
    let mut units: BTreeMap<u64, Vec<(String, Event)>> = BTreeMap::new();
    for (table, topic) in topics {
        for e in reader.events.get(topic).into_iter().flatten() {
            let event = e.event.as_ref().expect("no tombstones: nothing is deleted");
            let tx = event.transaction.as_ref().expect("a transaction block");
            units
                .entry(tx.commit_order)
                .or_default()
                .push((table.clone(), e.clone()));
        }
    }
    for (commit_order, events) in &mut units {
        events.sort_by_key(|(_, e)| tx(e).total_order);
        let n = events.len() as u64;
        let mut per_table: BTreeMap<String, u64> = BTreeMap::new();
        for (i, (table, e)) in events.iter().enumerate() {
            let t = tx(e);
            assert_eq!(
                t.total_order,
                i as u64 + 1,
                "unit {commit_order}: total_order runs 1..={n} without a gap: {events:#?}"
            );
            let k = per_table.entry(format!("public.{table}")).or_default();
            *k += 1;
            assert_eq!(t.data_collection_order, *k, "unit {commit_order}, {e:?}");
            let last = i as u64 + 1 == n;
            assert_eq!(
                t.event_count,
                last.then_some(n),
                "event_count on the unit's last event only: {e:?}"
            );
            if last {
                let got: BTreeMap<String, u64> = t
                    .data_collections
                    .clone()
                    .expect("data_collections on the last event")
                    .into_iter()
                    .map(|d| (d.data_collection, d.event_count))
                    .collect();
                assert_eq!(got, per_table, "unit {commit_order}'s data_collections");
            } else {
                assert!(t.data_collections.is_none(), "{e:?}");
            }
        }
    }
    units
}

fn tx(e: &Event) -> &tidemark_common::envelope::Transaction {
    e.event.as_ref().unwrap().transaction.as_ref().unwrap()
}

/// One event as (table, op, id, txId).
type Flat = (String, char, Option<i64>, Option<u64>);

/// The streamed units' events, runs of TRUNCATE events sorted by table.
fn flatten(units: &BTreeMap<u64, Vec<(String, Event)>>) -> Vec<Flat> {
    let mut out: Vec<Flat> = Vec::new();
    let mut run: Vec<Flat> = Vec::new();
    for (_, events) in units.range(1..) {
        for (table, e) in events {
            let event = e.event.as_ref().unwrap();
            let op = event.op.code().chars().next().unwrap();
            let id = event.row().map(|r| r["id"].as_i64().unwrap());
            let flat = (table.clone(), op, id, event.source.tx_id);
            if op == 't' {
                run.push(flat);
                continue;
            }
            run.sort();
            out.append(&mut run);
            out.push(flat);
        }
        run.sort();
        out.append(&mut run);
    }
    out
}

/// The streamed units' events as (table, op, id).
fn ops(units: &BTreeMap<u64, Vec<(String, Event)>>) -> Vec<(String, char, Option<i64>)> {
    flatten(units)
        .into_iter()
        .map(|(t, op, id, _)| (t, op, id))
        .collect()
}

/// A database with the tables, captured with `capture` (`None`: `logical`
/// capture and mode), pg-source over them with `overrides`, and the writes
/// made; the tables and their topics.
async fn captured_writes(
    capture: Option<Capture>,
    overrides: &[(&str, &str)],
) -> (Db, Task, Vec<(String, String)>) {
    let db = Db::new().await;
    script(&db.admin, TABLES).await;
    for t in ["a", "b", "c"] {
        match capture {
            Some(capture) => db.capture(t, capture).await,
            None => {
                for step in schema_init::logical_steps(&TableName::parse(t).unwrap()) {
                    script(&db.admin, &step.sql).await;
                }
            }
        }
    }
    let topics: Vec<(String, String)> = ["a", "b", "c"]
        .iter()
        .map(|t| ((*t).to_owned(), db.topic(t)))
        .collect();
    let mut overrides = overrides.to_vec();
    if capture.is_none() {
        overrides.push(("mode", "logical"));
    }
    let source = db.start_source(&["a", "b", "c"], &overrides).await;
    for sql in TRANSACTIONS {
        script(&db.admin, sql).await;
    }
    (db, source, topics)
}

/// Drops the replication slot of `db`'s source (logical mode).
async fn drop_slot(db: &Db) {
    let slot = pg_source::modes::logical::default_slot_name(&db.source_name);
    sqlx::query(
        "select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = $1",
    )
    .bind(&slot)
    .execute(&db.admin)
    .await
    .unwrap();
}

async fn truncate_is_an_event_in_its_place(capture: Option<Capture>) {
    let (db, source, topics) = captured_writes(capture, &[]).await;
    let mut reader = TopicReader::new(&topics.iter().map(|(_, t)| t).collect::<Vec<_>>());
    reader
        .until("every change", WAIT, |events| {
            COUNTS
                .iter()
                .all(|(t, n)| events.get(&db.topic(t)).map_or(0, Vec::len) >= *n)
        })
        .await;
    reader.settle(Duration::from_secs(1)).await;
    for (t, n) in COUNTS {
        assert_eq!(reader.events[&db.topic(t)].len(), n, "records of {t}");
    }
    let sent = units(&reader, &topics);
    assert_eq!(ops(&sent), expected());
    for (table, e) in sent.values().flatten() {
        let event = e.event.as_ref().unwrap();
        if event.op != Op::Truncate {
            continue;
        }
        // Debezium's convention: null key, no images, the table named.
        assert_eq!(e.key, Value::Null, "a TRUNCATE's Kafka key is null");
        assert!(event.before.is_none() && event.after.is_none(), "{e:?}");
        assert_eq!(
            (event.source.schema.as_str(), event.source.table.as_str()),
            ("public", table.as_str())
        );
        assert_eq!(event.source.snapshot.as_deref(), Some("false"));
        let raw = e.raw.as_ref().unwrap();
        assert_eq!(raw["payload"]["op"], "t", "{raw}");
        assert!(raw["schema"].is_object(), "the Connect schema is there");
    }
    // One transaction's events share its txId, TRUNCATE's included.
    let txids: Vec<Option<u64>> = flatten(&sent).iter().map(|e| e.3).collect();
    let (one, rest) = txids.split_at(4);
    let (two, three) = rest.split_at(6);
    for tx in [one, two, three] {
        assert!(
            tx[0].is_some() && tx.iter().all(|t| *t == tx[0]),
            "{txids:?}"
        );
    }
    assert!(one[0] != two[0] && two[0] != three[0], "{txids:?}");
    // Replayed, every table is as the source has it (a TRUNCATE left out
    // would keep the old rows, and a create of a freed key would fail).
    for (table, topic) in &topics {
        assert_eq!(
            replay(&reader.events[topic]),
            table_rows(&db.admin, &format!("public.{table}"), &["id"]).await,
            "{table} replayed"
        );
    }
    source.stop().await;
    if capture.is_none() {
        drop_slot(&db).await;
    }
}

/// `skipped.operations=t`: the same changes but the TRUNCATEs, numbered and
/// counted without them.
async fn truncate_skipped(capture: Option<Capture>) {
    let (db, source, topics) = captured_writes(capture, &[("skipped.operations", "t")]).await;
    let mut reader = TopicReader::new(&topics.iter().map(|(_, t)| t).collect::<Vec<_>>());
    let without: Vec<_> = expected().into_iter().filter(|e| e.1 != 't').collect();
    reader
        .until("every change but the TRUNCATEs", WAIT, |events| {
            events.values().map(Vec::len).sum::<usize>() >= 4 + without.len()
        })
        .await;
    reader.settle(Duration::from_secs(1)).await;
    let sent = units(&reader, &topics);
    assert_eq!(ops(&sent), without);
    source.stop().await;
    if capture.is_none() {
        drop_slot(&db).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_truncate_skipped_by_skipped_operations() {
    truncate_skipped(Some(Capture::full(TriggerLevel::Row))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_truncate_skipped_by_skipped_operations() {
    truncate_skipped(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_truncate() {
    truncate_is_an_event_in_its_place(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_truncate_with_row_triggers() {
    truncate_is_an_event_in_its_place(Some(Capture::full(TriggerLevel::Row))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_truncate_with_statement_triggers() {
    truncate_is_an_event_in_its_place(Some(Capture {
        trigger: TriggerLevel::Statement,
        update_before: UpdateBefore::Null,
    }))
    .await;
}

/// A change log and capture functions of a schema-init from before TRUNCATE
/// was captured: the next run brings them up to date.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_schema_init_captures_truncate_of_a_table_captured_before() {
    let db = Db::new().await;
    exec(&db.admin, "create table public.a (id int8 primary key)").await;
    db.capture("a", Capture::full(TriggerLevel::Row)).await;
    // As the previous version left it: no truncate trigger, a function
    // whose comment is the old one's.
    script(
        &db.admin,
        &format!(
            "drop trigger {} on public.a;
             do $$ declare f regprocedure := (select t.tgfoid::regprocedure from pg_trigger t
                                               where t.tgrelid = 'public.a'::regclass and t.tgname = 'tidemark_capture');
             begin
               execute format('comment on function %s is %L', f,
                 replace(obj_description(f, 'pg_proc'), ' (truncate too)', ''));
             end $$",
            tidemark_common::names::TRUNCATE_TRIGGER
        ),
    )
    .await;
    db.capture("a", Capture::full(TriggerLevel::Row)).await;
    script(
        &db.admin,
        "insert into public.a values (1); truncate public.a",
    )
    .await;
    let ops: Vec<String> =
        sqlx::query_scalar("select op::text from tidemark.change_log order by seq")
            .fetch_all(&db.admin)
            .await
            .unwrap();
    assert_eq!(ops, ["c", "t"]);
    let comment: String = sqlx::query_scalar(
        "select obj_description(t.tgfoid, 'pg_proc') from pg_trigger t
          where t.tgrelid = 'public.a'::regclass and t.tgname = 'tidemark_capture'",
    )
    .fetch_one(&db.admin)
    .await
    .unwrap();
    assert!(comment.contains("(truncate too)"), "{comment}");
}

/// A partitioned table, two levels deep, with partitions made before and
/// after its capture (created under it and attached).
const PARTITIONED: &str = "
create table public.pt (id int8 primary key, v text not null) partition by range (id);
create table public.pt_a partition of public.pt for values from (0) to (100);
create table public.pt_b partition of public.pt for values from (100) to (200) partition by range (id);
create table public.pt_b1 partition of public.pt_b for values from (100) to (150);
insert into public.pt values (1, 'old'), (101, 'old')";

/// Made after the capture: the event trigger (`changelog`) or the
/// publication (`logical`) must cover them.
const PARTITIONED_LATER: &str = "
create table public.pt_b2 partition of public.pt_b for values from (150) to (200);
create table public.pt_c partition of public.pt for values from (200) to (300);
create table public.pt_d (v text not null, id int8 not null);
alter table public.pt attach partition public.pt_d for values from (300) to (400)";

/// A TRUNCATE of one partition of a captured partitioned table (issue
/// 14.1) removes only that partition's rows, which a TRUNCATE event of the
/// table cannot say (a replay would empty the whole table) and no event at
/// all would lose (a replay would keep them): it is refused, naming the
/// fix, for partitions at every depth and those made after the capture;
/// a TRUNCATE of the table itself, which truncates every partition, is
/// one event and replays right, also in a transaction with inserts before
/// and after it. Replayed, the topic gives the table as Postgres has it.
async fn a_partition_truncate_is_refused(capture: Capture) {
    let db = Db::new().await;
    script(&db.admin, PARTITIONED).await;
    db.capture("pt", capture).await;
    script(&db.admin, PARTITIONED_LATER).await;
    let topic = db.topic("pt");
    let mut reader = TopicReader::new(&[topic.as_str()]);
    let source = db.start_source(&["pt"], &[]).await;
    script(
        &db.admin,
        "insert into public.pt select g, 'x' from generate_series(0, 399, 7) g on conflict do nothing",
    )
    .await;
    for (statement, partition) in [
        ("truncate public.pt_a", "pt_a"),
        ("truncate public.pt_b", "pt_b"),
        ("truncate public.pt_b1", "pt_b1"),
        ("truncate public.pt_b2", "pt_b2"),
        ("truncate public.pt_c", "pt_c"),
        ("truncate public.pt_d", "pt_d"),
        ("truncate public.pt_a, public.pt_c", "pt_a"),
        // The partition's trigger fires before the table's marks it.
        ("truncate public.pt_a, public.pt", "pt_a"),
        // A TRUNCATE of the table ended before: its mark is gone.
        (
            "do $$ begin truncate public.pt; insert into public.pt values (5, 'y'); truncate public.pt_a; end $$",
            "pt_a",
        ),
    ] {
        let err = sqlx::raw_sql(statement)
            .execute(&db.admin)
            .await
            .expect_err(statement);
        let err = err.into_database_error().expect("a database error");
        assert_eq!(err.code().as_deref(), Some("0A000"), "{statement}: {err}");
        assert!(
            err.message().contains(&format!(
                "Tidemark captures table public.pt, and a TRUNCATE of its partition public.{partition} alone cannot be archived"
            )),
            "{statement}: {err}"
        );
    }
    let err = sqlx::raw_sql("truncate public.pt_b1")
        .execute(&db.admin)
        .await
        .expect_err("a partition's TRUNCATE");
    let hint = err
        .as_database_error()
        .and_then(|e| e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>())
        .and_then(|e| e.hint())
        .map(str::to_owned);
    assert_eq!(
        hint.as_deref(),
        Some("delete from public.pt_b1 (captured row by row), or truncate public.pt as a whole (alone, or named before its partitions)")
    );
    // What it suggests works: DELETE from a partition is captured row by
    // row, the table's own TRUNCATE is one event.
    for sql in [
        "delete from public.pt_b1",
        "begin; insert into public.pt values (2, 'y'); truncate public.pt; insert into public.pt values (3, 'z'), (210, 'z'), (301, 'z'); commit",
        "insert into public.pt values (102, 'w'), (160, 'w')",
        "delete from public.pt_c",
    ] {
        script(&db.admin, sql).await;
    }
    // A partition detached (empty: its rows deleted first) is a table of its
    // own again, truncated freely.
    script(
        &db.admin,
        "delete from public.pt_d; alter table public.pt detach partition public.pt_d; truncate public.pt_d",
    )
    .await;
    script(&db.admin, "insert into public.pt values (4, 'last')").await;
    let expected = table_rows(&db.admin, "public.pt", &["id"]).await;
    reader
        .until("the table's last insert", WAIT, |events| {
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
    let events = &reader.events[&topic];
    let truncates = events
        .iter()
        .filter(|e| e.event.as_ref().is_some_and(|ev| ev.op == Op::Truncate))
        .count();
    assert_eq!(truncates, 1, "one TRUNCATE event, of the table as a whole");
    assert_eq!(replay(events), expected, "the topic replayed");
    assert_eq!(expected.len(), 4, "{expected:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_partition_truncate_is_refused() {
    a_partition_truncate_is_refused(Capture::full(TriggerLevel::Row)).await;
}

/// The error a DROP of a partition with rows gets: (message, hint).
async fn refused(pool: &PgPool, sql: &str) -> (String, Option<String>) {
    let err = sqlx::raw_sql(sql).execute(pool).await.expect_err(sql);
    let err = err
        .as_database_error()
        .and_then(|e| e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>())
        .unwrap_or_else(|| panic!("{sql}: a database error"));
    assert_eq!(err.code(), "0A000", "{sql}: {err}");
    (err.message().to_owned(), err.hint().map(str::to_owned))
}

/// A partition that leaves a captured partitioned table (DETACH, also
/// CONCURRENTLY, at any depth) takes its rows out of the table, and one
/// that joins (ATTACH) brings rows in, with no write of the table: the rows
/// it holds are archived as deletes (or creates) of the table in the DDL's
/// transaction. A DROP of a partition that may hold rows is refused, naming
/// the fix (detach it first); an empty partition is detached and dropped
/// freely. Replayed, the topic gives the table as Postgres has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_partitions_attached_detached_and_dropped_keep_the_archive_exact() {
    let db = Db::new().await;
    script(&db.admin, PARTITIONED).await;
    db.capture("pt", Capture::full(TriggerLevel::Row)).await;
    let topic = db.topic("pt");
    let mut reader = TopicReader::new(&[topic.as_str()]);
    let source = db.start_source(&["pt"], &[]).await;
    script(
        &db.admin,
        "insert into public.pt select g, 'x' from generate_series(3, 141, 3) g;
         create table public.pt_c partition of public.pt for values from (200) to (300) partition by range (id);
         create table public.pt_c1 partition of public.pt_c for values from (200) to (250);
         create table public.pt_c2 partition of public.pt_c for values from (250) to (300);
         insert into public.pt select g, 'c' from generate_series(200, 299, 11) g;
         -- Its columns in another order than the table's.
         create table public.pt_d (v text not null, id int8 not null);
         insert into public.pt_d select 'd', g from generate_series(300, 399, 9) g",
    )
    .await;
    // Rows that join the table by an ATTACH.
    script(
        &db.admin,
        "alter table public.pt attach partition public.pt_d for values from (300) to (400)",
    )
    .await;
    script(&db.admin, "update public.pt set v = 'd2' where id = 309").await;
    // DROP of a partition holding rows, at any depth, is refused.
    for (sql, partition, parent) in [
        ("drop table public.pt_a", "pt_a", "pt"),
        ("drop table public.pt_b1", "pt_b1", "pt_b"),
        ("drop table public.pt_c", "pt_c1", "pt_c"),
        ("drop table public.pt_d", "pt_d", "pt"),
    ] {
        let (message, hint) = refused(&db.admin, sql).await;
        assert!(
            message.contains(&format!(
                "Tidemark captures table public.pt, and dropping its partition public.{partition}, which may hold rows, would remove them from the table unseen"
            )),
            "{sql}: {message}"
        );
        assert_eq!(
            hint.as_deref(),
            Some(format!(
                "alter table public.{parent} detach partition public.{partition} first (Tidemark archives the rows it holds as deletes), then drop it; or delete from public.{partition} and vacuum it"
            ).as_str()),
            "{sql}"
        );
    }
    // DETACH takes the rows out of the table: at the top, below, and
    // concurrently (its own statement: it cannot run in a transaction).
    script(
        &db.admin,
        "alter table public.pt detach partition public.pt_a",
    )
    .await;
    script(
        &db.admin,
        "alter table public.pt_c detach partition public.pt_c1",
    )
    .await;
    script(
        &db.admin,
        "alter table public.pt detach partition public.pt_d concurrently",
    )
    .await;
    // Detached, they are tables of their own: dropped freely.
    script(
        &db.admin,
        "drop table public.pt_a, public.pt_c1, public.pt_d",
    )
    .await;
    // A sub-partitioned partition leaves with its partitions' rows.
    script(
        &db.admin,
        "alter table public.pt detach partition public.pt_c; drop table public.pt_c",
    )
    .await;
    // An empty partition is detached and dropped freely, and a partition
    // never written to is dropped at once.
    script(
        &db.admin,
        "create table public.pt_e partition of public.pt for values from (400) to (500);
         alter table public.pt detach partition public.pt_e;
         drop table public.pt_e;
         create table public.pt_f partition of public.pt for values from (500) to (600);
         drop table public.pt_f;
         insert into public.pt values (149, 'last')",
    )
    .await;
    let expected = table_rows(&db.admin, "public.pt", &["id"]).await;
    reader
        .until("the table's last insert", WAIT, |events| {
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
    let events = &reader.events[&topic];
    assert_eq!(replay(events), expected, "the topic replayed");
    // What is left: pt_b1's rows (101, 14 written, and the last).
    assert_eq!(expected.len(), 1 + 14 + 1, "{expected:?}");
    let creates_of_d = events
        .iter()
        .filter(|e| {
            e.event
                .as_ref()
                .is_some_and(|ev| ev.op == Op::Create && ev.row().is_some_and(|r| r["v"] == "d"))
        })
        .count();
    assert_eq!(
        creates_of_d, 12,
        "pt_d's rows arrive as creates when it is attached"
    );
}

/// `logical` capture refuses a partitioned table, schema-init and
/// pg-source both, naming `changelog` capture: pgoutput names the
/// partitions in the stream, and drops a TRUNCATE of one partition unseen
/// when they are published as their table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_capture_refuses_a_partitioned_table() {
    let db = Db::new().await;
    script(&db.admin, PARTITIONED).await;
    let table = TableName::parse("pt").unwrap();
    let mut refused = None;
    for step in schema_init::logical_steps(&table) {
        if let Err(e) = sqlx::raw_sql(&step.sql).execute(&db.admin).await {
            refused = Some(format!("{}: {e}", step.what));
            break;
        }
    }
    let refused = refused.expect("schema-init --capture logical refuses a partitioned table");
    assert!(
        refused.contains("table pt is partitioned, which logical capture does not carry"),
        "{refused}"
    );
    // A publication made by hand: pg-source refuses it too.
    script(
        &db.admin,
        &format!(
            "alter table public.pt replica identity full;
             create publication {} for table public.pt with (publish_via_partition_root = true)",
            tidemark_common::names::quote_ident(&tidemark_common::names::publication_name(&table))
        ),
    )
    .await;
    let cfg = db.source_config(&["pt"], &[("mode", "logical")]);
    let token = CancellationToken::new();
    let run =
        tokio::time::timeout(Duration::from_secs(30), pg_source::run(cfg, token.clone())).await;
    token.cancel();
    let err = run
        .expect("pg-source stops")
        .expect_err("pg-source refuses a partitioned table in logical mode");
    let err = format!("{err:#}");
    assert!(
        err.contains("table public.pt is partitioned, which logical capture does not carry")
            && err.contains("--capture changelog"),
        "{err}"
    );
}
