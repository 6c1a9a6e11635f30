//! Tables that enter a connector's set while it runs (issue 14.2): by a
//! `table.include.list` pattern that comes to match a table created later,
//! or by a longer list at a restart. The table's existing rows arrive by an
//! incremental snapshot while the other tables stream; a replay of its topic
//! is the table, with no create of a key it holds and no update of one it
//! lacks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use schema_init::TriggerLevel;
use tidemark_common::envelope::Op;

use super::*;

/// Runs `sql` as the user.
pub(super) async fn script(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// One writer: inserts, updates and deletes on `table` (keys from `base`),
/// paced, until `stop`; `v` holds the commit's wall time in ms, so a
/// reader can tell how long a change took to arrive.
fn writer(pool: PgPool, table: &'static str, base: i64, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    tokio::spawn(async move {
        let mut n = 0u64;
        let mut i = 0i64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let now = "(extract(epoch from clock_timestamp()) * 1000)::int8::text";
            let sql = match i % 4 {
                // Keys the snapshot reads, or has read: updates and deletes
                // of rows that were there before the table was added.
                1 => format!("update {table} set v = {now} where id = {}", (i * 37) % 3000),
                2 => format!("insert into {table} values ({}, {now}) on conflict (id) do update set v = excluded.v", base + i),
                3 => format!("delete from {table} where id = {}", (i * 53 + 11) % 3000),
                _ => format!("update {table} set id = id + 100000, v = {now} where id = {}", (i * 17 + 5) % 3000),
            };
            // A conflicting key move is no failure of the pipeline.
            let _ = sqlx::query(&sql).execute(&pool).await;
            n += 1;
            // Paced: CI runs many tests on two cores.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        n
    })
}

/// The `r` events of `events` per key.
pub(super) fn snapshot_reads(events: &[Event]) -> BTreeMap<String, usize> {
    let mut reads = BTreeMap::new();
    for e in events {
        if e.event.as_ref().is_some_and(|ev| ev.op == Op::Read) {
            *reads.entry(e.key.to_string()).or_default() += 1;
        }
    }
    reads
}

/// How long each streamed change of `events` took from its commit (its
/// `v`, ms) to pg-source's read (`ts_ms`), in ms, leaving out changes
/// committed within `outages` (pg-source killed and starting again).
fn delays(events: &[Event], outages: &[(i64, i64)]) -> Vec<i64> {
    events
        .iter()
        .filter_map(|e| {
            let ev = e.event.as_ref()?;
            if ev.op == Op::Read {
                return None;
            }
            let v: i64 = ev.after.as_ref()?["v"].as_str()?.parse().ok()?;
            if outages.iter().any(|(from, to)| (*from..=*to).contains(&v)) {
                return None;
            }
            let read = e.raw.as_ref()?["payload"]["ts_ms"].as_i64()?;
            Some(read - v)
        })
        .collect()
}

/// Per chunk (unit) of the incremental snapshot: from its snapshot
/// (`source.ts_ms`) to its rows' rendering (`ts_ms`), in ms.
fn chunk_times(events: &[Event]) -> Vec<i64> {
    let mut per_unit: BTreeMap<u64, i64> = BTreeMap::new();
    for e in events {
        let Some(ev) = e.event.as_ref().filter(|ev| ev.op == Op::Read) else {
            continue;
        };
        let raw = &e.raw.as_ref().unwrap()["payload"];
        let held = raw["ts_ms"].as_i64().unwrap() - raw["source"]["ts_ms"].as_i64().unwrap();
        let unit = ev.transaction.as_ref().unwrap().commit_order;
        let t = per_unit.entry(unit).or_default();
        *t = (*t).max(held);
    }
    per_unit.into_values().collect()
}

fn now_ms() -> i64 {
    tidemark_common::health::now_ms()
}

/// `p`th percentile of sorted `v`.
fn pct(v: &[i64], p: usize) -> i64 {
    v.get(v.len().saturating_sub(1) * p / 100)
        .copied()
        .unwrap_or(0)
}

/// A table created while pg-source runs, matched by a pattern, under four
/// writers (two on other tables, two on it), pg-source killed twice during
/// its incremental snapshot: its topic replays to the table with every row
/// once, and the other tables kept streaming (their delay is printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_table_created_while_running_is_snapshotted_incrementally() {
    let db = Db::new().await;
    script(
        &db.admin,
        "create table public.a (id int8 primary key, v text not null);
         create table public.b (id int8 primary key, v text not null);
         insert into public.a select g, 'old' from generate_series(0, 99) g;
         insert into public.b select g, 'old' from generate_series(0, 99) g;",
    )
    .await;
    for t in ["a", "b"] {
        db.capture(t, Capture::full(TriggerLevel::Row)).await;
    }
    let overrides = [
        ("batch.max.rows", "100"),
        ("table.whitelist", "a, b, public\\.new_[a-z]+"),
    ];
    let mut source = db.start_source(&["a", "b"], &overrides).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = vec![
        writer(db.admin.clone(), "public.a", 10_000, stop.clone()),
        writer(db.admin.clone(), "public.b", 10_000, stop.clone()),
    ];
    // The new table, with rows from before its capture (which no change
    // event holds), then captured: the pattern picks it up.
    script(
        &db.admin,
        "create table public.new_t (id int8 primary key, v text not null);
         insert into public.new_t select g, 'before capture ' || g from generate_series(0, 2999) g;",
    )
    .await;
    db.capture("new_t", Capture::full(TriggerLevel::Row)).await;
    writers.push(writer(
        db.admin.clone(),
        "public.new_t",
        20_000,
        stop.clone(),
    ));
    writers.push(writer(
        db.admin.clone(),
        "public.new_t",
        30_000,
        stop.clone(),
    ));
    let topic = db.topic("new_t");
    let topics = [db.topic("a"), db.topic("b"), topic.clone()];
    let mut reader = TopicReader::new(&topics);
    // Killed twice while the snapshot runs.
    let mut outages = Vec::new();
    for reads in [300, 1200] {
        reader
            .until(&format!("{reads} snapshot reads of new_t"), WAIT * 2, |e| {
                snapshot_reads(e.get(&topic).map_or(&[][..], Vec::as_slice)).len() >= reads
            })
            .await;
        source.assert_running("pg-source").await;
        let killed = now_ms();
        source.kill().await;
        source = db.start_source(&["a", "b"], &overrides).await;
        // Changes committed while it was down (or in its last second, in
        // a batch the kill cut) wait for the restart.
        outages.push((killed - 1000, now_ms() + 500));
    }
    reader
        .until("2500 snapshot reads of new_t", WAIT * 2, |e| {
            snapshot_reads(e.get(&topic).map_or(&[][..], Vec::as_slice)).len() >= 2500
        })
        .await;
    stop.store(true, Ordering::Relaxed);
    let mut writes = 0;
    for w in writers {
        writes += w.await.unwrap();
    }
    // A last change of each table marks the end.
    for t in ["a", "b", "new_t"] {
        script(
            &db.admin,
            &format!("insert into public.{t} values (-1, 'end')"),
        )
        .await;
    }
    reader
        .until("the last change of every table", WAIT * 2, |e| {
            topics.iter().all(|t| {
                e.get(t).is_some_and(|ev| {
                    ev.iter()
                        .any(|e| e.after().is_some_and(|a| a["v"] == "end"))
                })
            })
        })
        .await;
    reader.settle(Duration::from_secs(1)).await;
    source.stop().await;
    let events = &reader.events[&topic];
    // Every row exactly once: the replay (which refuses a create of a key
    // it holds, an update or delete of one it lacks) is the table.
    assert_eq!(
        replay(events),
        table_rows(&db.admin, "public.new_t", &["id"]).await,
        "new_t replayed"
    );
    let reads = snapshot_reads(events);
    let twice: Vec<_> = reads.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "keys read twice by the snapshot: {twice:?}"
    );
    for e in events.iter().filter_map(|e| e.event.as_ref()) {
        if e.op == Op::Read {
            assert_eq!(e.source.snapshot.as_deref(), Some("incremental"), "{e:?}");
        }
    }
    for t in ["a", "b"] {
        assert_eq!(
            replay(&reader.events[&db.topic(t)]),
            table_rows(&db.admin, &format!("public.{t}"), &["id"]).await,
            "{t} replayed"
        );
    }
    let mut d: Vec<i64> = topics[..2]
        .iter()
        .flat_map(|t| delays(&reader.events[t], &outages))
        .collect();
    d.sort_unstable();
    let mut c = chunk_times(events);
    c.sort_unstable();
    println!(
        "incremental snapshot of 3000 rows (batch.max.rows 100, 2 kills) under {writes} writes: \
         other tables' changes commit->read p50 {} ms, p99 {} ms, max {} ms over {} changes \
         (restarts left out); chunk snapshot->rendered p50 {} ms, max {} ms over {} chunks; \
         new_t: {} keys read, {} events",
        pct(&d, 50),
        pct(&d, 99),
        pct(&d, 100),
        d.len(),
        pct(&c, 50),
        pct(&c, 100),
        c.len(),
        reads.len(),
        events.len()
    );
}

/// Tables `a` (one row) and `b` (250), both captured with row triggers.
async fn two_captured_tables() -> Db {
    let db = Db::new().await;
    script(
        &db.admin,
        "create table public.a (id int8 primary key, v text not null);
         create table public.b (id int8 primary key, v text not null);
         insert into public.a values (1, 'a1');
         insert into public.b select g, 'b' || g from generate_series(1, 250) g;",
    )
    .await;
    db.capture("a", Capture::full(TriggerLevel::Row)).await;
    db.capture("b", Capture::full(TriggerLevel::Row)).await;
    db
}

/// A table added by a longer list at a restart gets the snapshot too, and
/// its changes made while pg-source was stopped are not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_table_added_by_restart_is_snapshotted_incrementally() {
    let db = two_captured_tables().await;
    let overrides = [("batch.max.rows", "100")];
    let source = db.start_source(&["a"], &overrides).await;
    script(&db.admin, "insert into public.a values (2, 'a2')").await;
    let mut reader = TopicReader::new(&[db.topic("a"), db.topic("b")]);
    reader.at_least(&db.topic("a"), 2).await;
    source.stop().await;
    script(
        &db.admin,
        "update public.b set v = 'changed while stopped' where id = 7;
         delete from public.b where id = 8;",
    )
    .await;
    let source = db.start_source(&["a", "b"], &overrides).await;
    script(
        &db.admin,
        "update public.b set v = 'changed while snapshotting' where id in (3, 203);
         insert into public.b values (1000, 'new');
         insert into public.a values (3, 'a3');",
    )
    .await;
    let topic = db.topic("b");
    reader
        .until("every row of b", WAIT, |e| {
            e.get(&topic).is_some_and(|ev| {
                let rows = super::replay(ev);
                rows.len() == 250
                    && rows
                        .values()
                        .filter(|r| r["v"] == "changed while snapshotting")
                        .count()
                        == 2
            })
        })
        .await;
    reader.settle(Duration::from_secs(1)).await;
    source.stop().await;
    assert_eq!(
        replay(&reader.events[&topic]),
        table_rows(&db.admin, "public.b", &["id"]).await
    );
    assert_eq!(
        replay(&reader.events[&db.topic("a")]),
        table_rows(&db.admin, "public.a", &["id"]).await
    );
    let reads = snapshot_reads(&reader.events[&topic]);
    assert!(reads.values().all(|n| *n == 1), "{reads:?}");
    assert!(reads.len() >= 247, "{} keys read", reads.len());
}

/// A schema change among the changes an added table's first snapshot chunk
/// waits for (pg-source was stopped across it): the batch up to the
/// chunk's snapshot ends at the schema change too, so the changes of each
/// shape of `a` are units of their own (pg-replay applies the change
/// between them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_schema_change_before_an_added_table_s_first_chunk_ends_the_batch() {
    let db = two_captured_tables().await;
    let overrides = [("batch.max.rows", "100")];
    let source = db.start_source(&["a"], &overrides).await;
    let mut reader = TopicReader::new(&[db.topic("a"), db.topic("b")]);
    reader.at_least(&db.topic("a"), 1).await;
    source.stop().await;
    // Each statement its own transaction.
    for sql in [
        "insert into public.a values (2, 'old shape')",
        "update public.a set v = 'old shape too' where id = 1",
        "alter table public.a add column n text",
        "insert into public.a values (3, 'new shape', 'n3')",
        "update public.a set n = 'n1' where id = 1",
    ] {
        script(&db.admin, sql).await;
    }
    let source = db.start_source(&["a", "b"], &overrides).await;
    let topic = db.topic("a");
    let events = reader.at_least(&topic, 5).await.to_vec();
    reader
        .until("every row of b", WAIT, |e| {
            e.get(&db.topic("b"))
                .is_some_and(|ev| super::replay(ev).len() == 250)
        })
        .await;
    source.stop().await;
    let unit = |i: usize| {
        let e = events[i].event.as_ref().unwrap();
        (
            e.transaction.as_ref().map(|t| t.commit_order),
            e.after.as_ref().unwrap().get("n").is_some(),
        )
    };
    let (old_a, old_b, new_a, new_b) = (unit(1), unit(2), unit(3), unit(4));
    assert!(!old_a.1 && !old_b.1 && new_a.1 && new_b.1, "{events:?}");
    assert_eq!(old_a.0, old_b.0, "the old shape's changes: one unit");
    assert_eq!(new_a.0, new_b.0, "the new shape's changes: one unit");
    assert!(
        old_a.0 < new_a.0,
        "each shape in units of its own: {old_a:?} {new_a:?}"
    );
}

/// Logical mode: a table captured (its publication made) while pg-source
/// is stopped, with WAL from before the publication still to read, and a
/// restart with the longer list: pg-source streams instead of exiting with
/// `publication ... does not exist` at every start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_table_added_by_restart_does_not_crash_loop() {
    let db = Db::new().await;
    script(
        &db.admin,
        "create table public.a (id int8 primary key, v text not null)",
    )
    .await;
    for step in schema_init::logical_steps(&TableName::parse("a").unwrap()) {
        script(&db.admin, &step.sql).await;
    }
    let source = db.start_source(&["a"], &[("mode", "logical")]).await;
    script(&db.admin, "insert into public.a values (1, 'x')").await;
    let mut reader = TopicReader::new(&[db.topic("a"), db.topic("b")]);
    reader.at_least(&db.topic("a"), 1).await;
    source.stop().await;
    // WAL the slot has not confirmed, from before b's publication.
    script(&db.admin, "insert into public.a values (2, 'x')").await;
    script(
        &db.admin,
        "create table public.b (id int8 primary key, v text not null)",
    )
    .await;
    for step in schema_init::logical_steps(&TableName::parse("b").unwrap()) {
        script(&db.admin, &step.sql).await;
    }
    script(
        &db.admin,
        "insert into public.a values (3, 'x'); insert into public.b values (1, 'y')",
    )
    .await;
    let mut source = db.start_source(&["a", "b"], &[("mode", "logical")]).await;
    reader.at_least(&db.topic("a"), 3).await;
    // b joins once the stream has passed its publication's birth; its
    // changes from then on arrive (those before are lost, and logged).
    let mut id = 100;
    let deadline = Instant::now() + WAIT;
    loop {
        id += 1;
        script(
            &db.admin,
            &format!("insert into public.b values ({id}, 'y')"),
        )
        .await;
        let b = db.topic("b");
        let arrived = tokio::time::timeout(Duration::from_millis(500), async {
            reader
                .until("a change of b", WAIT, |e| {
                    e.get(&b).is_some_and(|ev| !ev.is_empty())
                })
                .await
        })
        .await;
        if arrived.is_ok() {
            break;
        }
        source.assert_running("pg-source").await;
        assert!(
            Instant::now() < deadline,
            "no change of b arrived within {WAIT:?}"
        );
    }
    source.assert_running("pg-source").await;
    let ids: BTreeSet<i64> = reader.events[&db.topic("a")]
        .iter()
        .filter_map(|e| e.after().and_then(|a| a["id"].as_i64()))
        .collect();
    assert_eq!(ids, BTreeSet::from([1, 2, 3]));
    source.stop().await;
    let slot = pg_source::modes::logical::default_slot_name(&db.source_name);
    let _ = sqlx::query("select pg_drop_replication_slot($1)")
        .bind(&slot)
        .execute(&db.admin)
        .await;
}

/// A table that leaves the set (a shorter list at a restart) and enters it
/// again: its rows deleted while it was out must not stay in a replay, so
/// its new snapshot begins with a TRUNCATE event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_table_that_left_and_came_back_replays_to_its_rows() {
    let db = Db::new().await;
    script(
        &db.admin,
        "create table public.a (id int8 primary key, v text not null);
         create table public.b (id int8 primary key, v text not null);
         insert into public.a values (1, 'a1');
         insert into public.b select g, 'b' || g from generate_series(1, 30) g;",
    )
    .await;
    db.capture("a", Capture::full(TriggerLevel::Row)).await;
    db.capture("b", Capture::full(TriggerLevel::Row)).await;
    let overrides = [("batch.max.rows", "10")];
    let topic = db.topic("b");
    let mut reader = TopicReader::new(&[db.topic("a"), topic.clone()]);
    let source = db.start_source(&["a", "b"], &overrides).await;
    reader.at_least(&topic, 30).await;
    source.stop().await;
    // Out of the set: these changes are not read.
    let source = db.start_source(&["a"], &overrides).await;
    script(
        &db.admin,
        "delete from public.b where id <= 10; update public.b set v = 'while out' where id = 20;
         insert into public.a values (2, 'a2');",
    )
    .await;
    reader.at_least(&db.topic("a"), 2).await;
    source.stop().await;
    let source = db.start_source(&["a", "b"], &overrides).await;
    script(&db.admin, "insert into public.b values (100, 'back')").await;
    reader
        .until("b replayed to its rows", WAIT, |e| {
            e.get(&topic).is_some_and(|ev| {
                let rows = super::replay(ev);
                rows.len() == 21 && rows.values().any(|r| r["v"] == "while out")
            })
        })
        .await;
    reader.settle(Duration::from_secs(1)).await;
    source.stop().await;
    assert_eq!(
        replay(&reader.events[&topic]),
        table_rows(&db.admin, "public.b", &["id"]).await
    );
    let truncates = reader.events[&topic]
        .iter()
        .filter(|e| e.event.as_ref().is_some_and(|ev| ev.op == Op::Truncate))
        .count();
    assert_eq!(truncates, 1, "one TRUNCATE begins the second snapshot");
}

/// Logical mode: a table created and published while pg-source runs,
/// matched by a pattern, joins the stream; the other tables go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_table_created_while_running_joins_by_pattern() {
    let db = Db::new().await;
    script(
        &db.admin,
        "create table public.a (id int8 primary key, v text not null)",
    )
    .await;
    for step in schema_init::logical_steps(&TableName::parse("a").unwrap()) {
        script(&db.admin, &step.sql).await;
    }
    let overrides = [("mode", "logical"), ("table.whitelist", "a, public\\.n_.*")];
    let mut source = db.start_source(&["a"], &overrides).await;
    let topic = db.topic("n_x");
    let mut reader = TopicReader::new(&[db.topic("a"), topic.clone()]);
    script(
        &db.admin,
        "create table public.n_x (id int8 primary key, v text not null)",
    )
    .await;
    for step in schema_init::logical_steps(&TableName::parse("n_x").unwrap()) {
        script(&db.admin, &step.sql).await;
    }
    let mut id = 0;
    let deadline = Instant::now() + WAIT;
    loop {
        id += 1;
        script(
            &db.admin,
            &format!("insert into public.n_x values ({id}, 'n'); insert into public.a values ({id}, 'a')"),
        )
        .await;
        let arrived = tokio::time::timeout(Duration::from_millis(500), async {
            reader
                .until("a change of n_x", WAIT, |e| {
                    e.get(&topic).is_some_and(|ev| !ev.is_empty())
                })
                .await
        })
        .await;
        if arrived.is_ok() {
            break;
        }
        source.assert_running("pg-source").await;
        assert!(
            Instant::now() < deadline,
            "no change of n_x arrived within {WAIT:?}"
        );
    }
    // Every change of a arrived, in order, meanwhile.
    reader.at_least(&db.topic("a"), id as usize).await;
    let ids: Vec<i64> = reader.events[&db.topic("a")]
        .iter()
        .filter_map(|e| e.after().and_then(|a| a["id"].as_i64()))
        .collect();
    assert_eq!(ids, (1..=id).collect::<Vec<i64>>());
    // n_x's changes from when it joined are all there.
    let first = reader.events[&topic][0].after().unwrap()["id"]
        .as_i64()
        .unwrap();
    script(
        &db.admin,
        &format!("insert into public.n_x values ({}, 'last')", id + 1),
    )
    .await;
    reader
        .until("n_x's last change", WAIT, |e| {
            e.get(&topic).is_some_and(|ev| {
                ev.iter()
                    .any(|e| e.after().is_some_and(|a| a["v"] == "last"))
            })
        })
        .await;
    let got: Vec<i64> = reader.events[&topic]
        .iter()
        .filter_map(|e| e.after().and_then(|a| a["id"].as_i64()))
        .collect();
    assert_eq!(got, (first..=id + 1).collect::<Vec<i64>>());
    source.assert_running("pg-source").await;
    source.stop().await;
    let slot = pg_source::modes::logical::default_slot_name(&db.source_name);
    let _ = sqlx::query("select pg_drop_replication_slot($1)")
        .bind(&slot)
        .execute(&db.admin)
        .await;
}

/// Logical capture of `table` (its publication, replica identity full).
pub(super) async fn capture_logical(db: &Db, table: &str) {
    for step in schema_init::logical_steps(&TableName::parse(table).unwrap()) {
        script(&db.admin, &step.sql).await;
    }
}

/// Drops the connector's slot (the janitor would, later).
pub(super) async fn drop_slot(db: &Db) {
    let slot = pg_source::modes::logical::default_slot_name(&db.source_name);
    let _ = sqlx::query("select pg_drop_replication_slot($1)")
        .bind(&slot)
        .execute(&db.admin)
        .await;
}

/// Replays `events` as [`replay`] does, and also refuses a snapshot read
/// of a key the replay holds: a chunk's row that came after the key's
/// create (or an earlier read) would put an older row over a newer one.
pub(super) fn replay_strict(events: &[Event]) -> BTreeMap<String, serde_json::Value> {
    let mut held = BTreeSet::new();
    for e in events {
        let Some(ev) = &e.event else { continue };
        let key = e.key.to_string();
        match ev.op {
            Op::Read => assert!(
                held.insert(key.clone()),
                "a snapshot read of key {key}, which the replay holds: {e:?}"
            ),
            Op::Create | Op::Update => {
                held.insert(key);
            }
            Op::Delete => {
                held.remove(&key);
            }
            Op::Truncate => held.clear(),
        }
    }
    replay(events)
}

/// Logical mode: a table created while pg-source runs, published and
/// matched by a pattern, under four writers (two on other tables, two on
/// it), pg-source killed twice during its incremental snapshot: its topic
/// replays to the table with every row once, no chunk row after a newer
/// event of its key, and the other tables kept streaming (their delay is
/// printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_table_created_while_running_is_snapshotted_incrementally() {
    let db = Db::new().await;
    script(
        &db.admin,
        "create table public.a (id int8 primary key, v text not null);
         create table public.b (id int8 primary key, v text not null);
         insert into public.a select g, 'old' from generate_series(0, 99) g;
         insert into public.b select g, 'old' from generate_series(0, 99) g;",
    )
    .await;
    for t in ["a", "b"] {
        capture_logical(&db, t).await;
    }
    let overrides = [
        ("mode", "logical"),
        ("batch.max.rows", "100"),
        ("table.whitelist", "a, b, public\\.new_[a-z]+"),
    ];
    let mut source = db.start_source(&["a", "b"], &overrides).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = vec![
        writer(db.admin.clone(), "public.a", 10_000, stop.clone()),
        writer(db.admin.clone(), "public.b", 10_000, stop.clone()),
    ];
    // The new table, with rows from before its capture (which no change
    // event holds), then captured: the pattern picks it up.
    script(
        &db.admin,
        "create table public.new_t (id int8 primary key, v text not null);
         insert into public.new_t select g, 'before capture ' || g from generate_series(0, 2999) g;",
    )
    .await;
    capture_logical(&db, "new_t").await;
    writers.push(writer(
        db.admin.clone(),
        "public.new_t",
        20_000,
        stop.clone(),
    ));
    writers.push(writer(
        db.admin.clone(),
        "public.new_t",
        30_000,
        stop.clone(),
    ));
    let topic = db.topic("new_t");
    let topics = [db.topic("a"), db.topic("b"), topic.clone()];
    let mut reader = TopicReader::new(&topics);
    // Killed twice while the snapshot runs.
    let mut outages = Vec::new();
    for reads in [300, 1200] {
        reader
            .until(&format!("{reads} snapshot reads of new_t"), WAIT * 2, |e| {
                snapshot_reads(e.get(&topic).map_or(&[][..], Vec::as_slice)).len() >= reads
            })
            .await;
        source.assert_running("pg-source").await;
        let killed = now_ms();
        source.kill().await;
        source = db.start_source(&["a", "b"], &overrides).await;
        outages.push((killed - 1000, now_ms() + 500));
    }
    reader
        .until("2500 snapshot reads of new_t", WAIT * 2, |e| {
            snapshot_reads(e.get(&topic).map_or(&[][..], Vec::as_slice)).len() >= 2500
        })
        .await;
    stop.store(true, Ordering::Relaxed);
    let mut writes = 0;
    for w in writers {
        writes += w.await.unwrap();
    }
    for t in ["a", "b", "new_t"] {
        script(
            &db.admin,
            &format!("insert into public.{t} values (-1, 'end')"),
        )
        .await;
    }
    reader
        .until("the last change of every table", WAIT * 2, |e| {
            topics.iter().all(|t| {
                e.get(t).is_some_and(|ev| {
                    ev.iter()
                        .any(|e| e.after().is_some_and(|a| a["v"] == "end"))
                })
            })
        })
        .await;
    reader.settle(Duration::from_secs(1)).await;
    source.assert_running("pg-source").await;
    source.stop().await;
    drop_slot(&db).await;
    let events = &reader.events[&topic];
    assert_eq!(
        replay_strict(events),
        table_rows(&db.admin, "public.new_t", &["id"]).await,
        "new_t replayed"
    );
    let reads = snapshot_reads(events);
    let twice: Vec<_> = reads.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "keys read twice by the snapshot: {twice:?}"
    );
    for e in events.iter().filter_map(|e| e.event.as_ref()) {
        if e.op == Op::Read {
            assert_eq!(e.source.snapshot.as_deref(), Some("incremental"), "{e:?}");
        }
    }
    for t in ["a", "b"] {
        assert_eq!(
            replay(&reader.events[&db.topic(t)]),
            table_rows(&db.admin, &format!("public.{t}"), &["id"]).await,
            "{t} replayed"
        );
    }
    let mut d: Vec<i64> = topics[..2]
        .iter()
        .flat_map(|t| delays(&reader.events[t], &outages))
        .collect();
    d.sort_unstable();
    let mut c = chunk_times(events);
    c.sort_unstable();
    println!(
        "logical: incremental snapshot of 3000 rows (batch.max.rows 100, 2 kills) under {writes} writes: \
         other tables' changes commit->read p50 {} ms, p99 {} ms, max {} ms over {} changes \
         (restarts left out); chunk snapshot->rendered p50 {} ms, max {} ms over {} chunks; \
         new_t: {} keys read, {} events",
        pct(&d, 50),
        pct(&d, 99),
        pct(&d, 100),
        d.len(),
        pct(&c, 50),
        pct(&c, 100),
        c.len(),
        reads.len(),
        events.len()
    );
}

/// Logical mode: a table added by a longer list at a restart (captured
/// while pg-source was stopped, so its publication is younger than the WAL
/// still to read) gets the snapshot too, and its changes made while
/// pg-source was stopped and while it joins are in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_table_added_by_restart_is_snapshotted_incrementally() {
    let db = Db::new().await;
    script(
        &db.admin,
        "create table public.a (id int8 primary key, v text not null);
         create table public.b (id int8 primary key, v text not null);
         insert into public.a values (1, 'a1');
         insert into public.b select g, 'b' || g from generate_series(1, 250) g;",
    )
    .await;
    capture_logical(&db, "a").await;
    let overrides = [("mode", "logical"), ("batch.max.rows", "100")];
    let source = db.start_source(&["a"], &overrides).await;
    script(&db.admin, "insert into public.a values (2, 'a2')").await;
    let mut reader = TopicReader::new(&[db.topic("a"), db.topic("b")]);
    reader.at_least(&db.topic("a"), 2).await;
    source.stop().await;
    // WAL the slot has not confirmed, from before b's publication.
    script(&db.admin, "insert into public.a values (3, 'a3')").await;
    capture_logical(&db, "b").await;
    script(
        &db.admin,
        "update public.b set v = 'changed while stopped' where id = 7;
         delete from public.b where id = 8;",
    )
    .await;
    let mut source = db.start_source(&["a", "b"], &overrides).await;
    script(
        &db.admin,
        "update public.b set v = 'changed while snapshotting' where id in (3, 203);
         insert into public.b values (1000, 'new');
         insert into public.a values (4, 'a4');",
    )
    .await;
    let topic = db.topic("b");
    reader
        .until("every row of b", WAIT, |e| {
            e.get(&topic).is_some_and(|ev| {
                let rows = super::replay(ev);
                rows.len() == 250
                    && rows
                        .values()
                        .filter(|r| r["v"] == "changed while snapshotting")
                        .count()
                        == 2
            })
        })
        .await;
    reader.settle(Duration::from_secs(1)).await;
    source.assert_running("pg-source").await;
    source.stop().await;
    drop_slot(&db).await;
    assert_eq!(
        replay_strict(&reader.events[&topic]),
        table_rows(&db.admin, "public.b", &["id"]).await
    );
    assert_eq!(
        replay(&reader.events[&db.topic("a")]),
        table_rows(&db.admin, "public.a", &["id"]).await
    );
    let reads = snapshot_reads(&reader.events[&topic]);
    assert!(reads.values().all(|n| *n == 1), "{reads:?}");
    assert!(reads.len() >= 247, "{} keys read", reads.len());
}

/// Logical mode: chunks whose snapshots miss transactions whose commit
/// records are already in the WAL (a commit held by `commit_delay` waits
/// between writing its commit record and leaving the running-transactions
/// array, as a slow flush or a synchronous standby makes it): the stream's
/// changes of those transactions correct the chunks' rows. Each of the
/// writer's transactions updates 10 keys spread over the table, and each
/// key once, so a chunk row older than a change the stream left out would
/// stay in the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_incremental_snapshot_takes_the_commits_its_snapshots_missed() {
    let db = Db::new().await;
    script(
        &db.admin,
        "create table public.a (id int8 primary key, v text not null);
         create table public.t_slow (id int8 primary key, v text not null);
         insert into public.t_slow select g, 'old' from generate_series(0, 2999) g;",
    )
    .await;
    capture_logical(&db, "a").await;
    let overrides = [
        ("mode", "logical"),
        ("batch.max.rows", "100"),
        ("table.whitelist", "a, public\\.t_.*"),
    ];
    let mut source = db.start_source(&["a"], &overrides).await;
    let stop = Arc::new(AtomicBool::new(false));
    let slow = {
        let pool = db.admin.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            for i in 0..300 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                // 50 ms between the commit record and the commit's end.
                script(
                    &pool,
                    &format!(
                        "begin; set local commit_delay = 50000; set local commit_siblings = 0;
                         update public.t_slow set v = 'slow {i}' where id % 300 = {i}; commit;"
                    ),
                )
                .await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    capture_logical(&db, "t_slow").await;
    let topic = db.topic("t_slow");
    let mut reader = TopicReader::new(&[db.topic("a"), topic.clone()]);
    reader
        .until("3000 snapshot reads of t_slow", WAIT * 2, |e| {
            snapshot_reads(e.get(&topic).map_or(&[][..], Vec::as_slice)).len() >= 3000
        })
        .await;
    stop.store(true, Ordering::Relaxed);
    slow.await.unwrap();
    script(&db.admin, "insert into public.t_slow values (-1, 'end')").await;
    reader
        .until("the last change of t_slow", WAIT, |e| {
            e.get(&topic).is_some_and(|ev| {
                ev.iter()
                    .any(|e| e.after().is_some_and(|a| a["v"] == "end"))
            })
        })
        .await;
    source.assert_running("pg-source").await;
    source.stop().await;
    drop_slot(&db).await;
    let events = &reader.events[&topic];
    let rows = table_rows(&db.admin, "public.t_slow", &["id"]).await;
    let slow_rows = rows.values().filter(|r| r["v"] != "old").count();
    assert_eq!(replay_strict(events), rows, "t_slow replayed");
    let reads = snapshot_reads(events);
    assert!(reads.values().all(|n| *n == 1), "keys read twice");
    println!(
        "t_slow: {} snapshot reads, {} rows the slow writer changed, {} events",
        reads.len(),
        slow_rows,
        events.len()
    );
}

/// Logical mode: a table that leaves the set (a shorter list at a restart)
/// and enters it again: its snapshot begins with a TRUNCATE event, so its
/// rows deleted while it was out do not stay in a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_table_that_left_and_came_back_replays_to_its_rows() {
    let db = Db::new().await;
    script(
        &db.admin,
        "create table public.a (id int8 primary key, v text not null);
         create table public.b (id int8 primary key, v text not null);
         insert into public.a values (1, 'a1');
         insert into public.b select g, 'b' || g from generate_series(1, 30) g;",
    )
    .await;
    capture_logical(&db, "a").await;
    capture_logical(&db, "b").await;
    let overrides = [("mode", "logical"), ("batch.max.rows", "10")];
    let topic = db.topic("b");
    let mut reader = TopicReader::new(&[db.topic("a"), topic.clone()]);
    let source = db.start_source(&["a", "b"], &overrides).await;
    reader.at_least(&topic, 30).await;
    source.stop().await;
    // Out of the set: these changes are not read.
    let source = db.start_source(&["a"], &overrides).await;
    script(
        &db.admin,
        "delete from public.b where id <= 10; update public.b set v = 'while out' where id = 20;
         insert into public.a values (2, 'a2');",
    )
    .await;
    reader.at_least(&db.topic("a"), 2).await;
    source.stop().await;
    let mut source = db.start_source(&["a", "b"], &overrides).await;
    script(&db.admin, "insert into public.b values (100, 'back')").await;
    reader
        .until("b replayed to its rows", WAIT, |e| {
            e.get(&topic).is_some_and(|ev| {
                let rows = super::replay(ev);
                rows.len() == 21 && rows.values().any(|r| r["v"] == "while out")
            })
        })
        .await;
    reader.settle(Duration::from_secs(1)).await;
    source.assert_running("pg-source").await;
    source.stop().await;
    drop_slot(&db).await;
    assert_eq!(
        replay(&reader.events[&topic]),
        table_rows(&db.admin, "public.b", &["id"]).await
    );
    let truncates = reader.events[&topic]
        .iter()
        .filter(|e| e.event.as_ref().is_some_and(|ev| ev.op == Op::Truncate))
        .count();
    assert_eq!(truncates, 1, "one TRUNCATE begins the second snapshot");
}

/// Review (a837647): a transaction whose commit record the stream has
/// passed (and the slot confirmed) but that is still in the running-
/// transactions array, waiting for a synchronous standby, with the newest
/// xid (no later xid has ended, so `pg_current_snapshot()` prints it as
/// `x:x:`, xid >= xmax, not in the xip list). The seed taken at the start
/// (`in_progress()`: the xip list only) misses it, so the added table's
/// chunk is read in a snapshot that does not see it and is used; the
/// stream starts after its commit, so its change of the table is never
/// sent: once it ends, the replay keeps the old row.
///
/// Changes the server's configuration (synchronous_commit local for every
/// session, synchronous_standby_names a standby that never connects) and
/// needs no other xid to end while it runs: run it alone
/// (`-- --exact capture::added::logical_added_table_keeps_a_commit_that_waited_for_a_standby`).
/// A panic before the cancel leaves the configuration changed: reset it
/// with `alter system reset synchronous_standby_names; alter system reset
/// synchronous_commit; select pg_reload_conf()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "changes the server's synchronous commit settings and needs no other transaction to end meanwhile: run alone on private services (see the doc)"]
async fn logical_added_table_keeps_a_commit_that_waited_for_a_standby() {
    let db = Db::new().await;
    script(
        &db.admin,
        "create table public.a (id int8 primary key, v text not null);
         create table public.b (id int8 primary key, v text not null);
         insert into public.a values (1, 'a1');
         insert into public.b select g, 'b' || g from generate_series(1, 50) g;",
    )
    .await;
    capture_logical(&db, "a").await;
    capture_logical(&db, "b").await;
    let overrides = [("mode", "logical")];
    let source = db.start_source(&["a"], &overrides).await;
    let mut reader = TopicReader::new(&[db.topic("a"), db.topic("b")]);
    reader.at_least(&db.topic("a"), 1).await;
    // Only a session that asks waits for the standby, which never comes.
    script(&db.admin, "alter system set synchronous_commit = 'local'").await;
    script(&db.admin, "select pg_reload_conf()").await;
    script(
        &db.admin,
        "alter system set synchronous_standby_names = 'tidemark_review_nobody'",
    )
    .await;
    script(&db.admin, "select pg_reload_conf()").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut v = db.admin.begin().await.unwrap();
    sqlx::query("set local synchronous_commit = on")
        .execute(&mut *v)
        .await
        .unwrap();
    sqlx::query("update public.b set v = 'committed, waited for a standby' where id = 5")
        .execute(&mut *v)
        .await
        .unwrap();
    let pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(&mut *v)
        .await
        .unwrap();
    let commit = tokio::spawn(async move { v.commit().await });
    // Its commit record is in the WAL, flushed and decodable; it waits in
    // SyncRep, still running for every snapshot.
    let mut waiting = false;
    for _ in 0..100 {
        waiting = sqlx::query_scalar::<_, bool>(
            "select exists (select 1 from pg_stat_activity where pid = $1 and wait_event = 'SyncRep')",
        )
        .bind(pid)
        .fetch_one(&db.admin)
        .await
        .unwrap();
        if waiting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let past: String = sqlx::query_scalar("select pg_current_wal_lsn()::text")
        .fetch_one(&db.admin)
        .await
        .unwrap();
    let snap: String = sqlx::query_scalar("select pg_current_snapshot()::text")
        .fetch_one(&db.admin)
        .await
        .unwrap();
    println!("waiting in SyncRep: {waiting}; snapshot now {snap}; WAL {past}");
    // The stream (a only) passes it, and the slot is confirmed past it
    // (idle keepalives, position committed every 5 s).
    let slot = pg_source::modes::logical::default_slot_name(&db.source_name);
    let mut confirmed = false;
    for _ in 0..300 {
        confirmed = sqlx::query_scalar::<_, bool>(
            "select coalesce(confirmed_flush_lsn >= $2::pg_lsn, false) from pg_replication_slots where slot_name = $1",
        )
        .bind(&slot)
        .bind(&past)
        .fetch_one(&db.admin)
        .await
        .unwrap();
        if confirmed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("slot confirmed past it: {confirmed}");
    source.stop().await;
    // b is added: its incremental snapshot is read while the transaction
    // still waits (a correct pg-source holds the chunk until it ends).
    let source = db.start_source(&["a", "b"], &overrides).await;
    reader.settle(Duration::from_secs(10)).await;
    let early = snapshot_reads(
        reader
            .events
            .get(&db.topic("b"))
            .map_or(&[][..], Vec::as_slice),
    );
    println!("b keys read while the transaction waited: {}", early.len());
    // The standby is given up on: the transaction ends, committed.
    sqlx::query("select pg_cancel_backend($1)")
        .bind(pid)
        .execute(&db.admin)
        .await
        .unwrap();
    let _ = commit.await;
    script(&db.admin, "alter system reset synchronous_standby_names").await;
    script(&db.admin, "alter system reset synchronous_commit").await;
    script(&db.admin, "select pg_reload_conf()").await;
    script(&db.admin, "insert into public.b values (1000, 'end')").await;
    let topic = db.topic("b");
    reader
        .until("b's snapshot and its last change", WAIT, |e| {
            e.get(&topic).is_some_and(|ev| {
                snapshot_reads(ev).len() >= 49
                    && ev
                        .iter()
                        .any(|e| e.after().is_some_and(|a| a["v"] == "end"))
            })
        })
        .await;
    reader.settle(Duration::from_secs(1)).await;
    source.stop().await;
    drop_slot(&db).await;
    assert_eq!(
        replay_strict(&reader.events[&topic]),
        table_rows(&db.admin, "public.b", &["id"]).await,
        "b replayed (id 5 must be 'committed, waited for a standby')"
    );
}
