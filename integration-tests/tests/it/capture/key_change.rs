//! A table's primary key changes while its incremental snapshot runs (issue
//! 14), in both capture modes, with pg-source running or killed meanwhile:
//! a key column renamed (the snapshot goes on from its last key, no key is
//! read twice) or the key replaced by another column (the snapshot starts
//! again, from a TRUNCATE event). pg-source never stops for it, the other
//! table goes on, and the table's topic replays to the table.
//!
//! Table `b` enters the set at a restart (it was captured, and not read),
//! so it gets an incremental snapshot in chunks of 10 rows; `a` is read all
//! along.

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

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    ChangeLog,
    Logical,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ddl {
    /// `id` renamed `ident`.
    Rename,
    /// The key on `id` replaced by one on `n`.
    Replace,
}

impl Mode {
    fn overrides(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Mode::ChangeLog => &[("batch.max.rows", "10")],
            Mode::Logical => &[("mode", "logical"), ("batch.max.rows", "10")],
        }
    }
}

/// `a` (one row) and `b` (`id`, `n` = -`id`, `v`; 10,000 rows in
/// changelog mode, whose chunks go faster, 2,000 in logical mode, so the
/// snapshot still runs when the test has seen its first chunks), both
/// captured; pg-source reads `a` alone until it sent its row, then `a` and
/// `b`: `b` entered the set.
pub(super) async fn b_enters_the_set(db: &Db, mode: Mode) -> (Task, TopicReader) {
    let rows = match mode {
        Mode::ChangeLog => 10_000,
        Mode::Logical => 2_000,
    };
    script(
        &db.admin,
        &format!(
            "create table public.a (id int8 primary key, v text not null);
             insert into public.a values (1, 'a1');
             create table public.b (id int4 primary key, n int4 not null, v text not null);
             insert into public.b select g, -g, 'b' from generate_series(1, {rows}) g;"
        ),
    )
    .await;
    for t in ["a", "b"] {
        match mode {
            Mode::ChangeLog => db.capture(t, Capture::full(TriggerLevel::Row)).await,
            Mode::Logical => {
                for step in schema_init::logical_steps(&TableName::parse(t).unwrap()) {
                    script(&db.admin, &step.sql).await;
                }
            }
        }
    }
    let mut reader = TopicReader::new(&[db.topic("a"), db.topic("b")]);
    let source = db.start_source(&["a"], mode.overrides()).await;
    reader.at_least(&db.topic("a"), 1).await;
    source.stop().await;
    (spawn(db, mode), reader)
}

/// pg-source over `a` and `b`, not waited for (it says it is ready once
/// caught up, which is after `b`'s snapshot).
pub(super) fn spawn(db: &Db, mode: Mode) -> Task {
    let cfg = db.source_config(&["a", "b"], mode.overrides());
    Task::spawn(|token| pg_source::run(cfg, token))
}

/// Waits until `b` had `n` key-index scans (the chunks' reads) by the
/// server's statistics: pg-source's snapshot of it runs.
pub(super) async fn scans_of_b(db: &Db, source: &mut Task, n: i64) {
    let deadline = Instant::now() + WAIT;
    loop {
        source.assert_running("pg-source").await;
        let scans: i64 = sqlx::query_scalar(
            "select coalesce(idx_scan, 0) from pg_stat_user_tables where relid = 'public.b'::regclass",
        )
        .fetch_one(&db.admin)
        .await
        .unwrap();
        if scans >= n {
            return;
        }
        assert!(Instant::now() < deadline, "b's snapshot did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads until `done` holds, failing the test (with pg-source's error) if
/// pg-source stops meanwhile.
pub(super) async fn until_running(
    reader: &mut TopicReader,
    source: &mut Task,
    what: &str,
    done: impl Fn(&BTreeMap<String, Vec<Event>>) -> bool,
) {
    let deadline = Instant::now() + WAIT * 2;
    while !done(&reader.events) {
        source
            .assert_running(&format!("pg-source, while waiting for {what},"))
            .await;
        assert!(
            Instant::now() < deadline,
            "waited {:?} for {what}",
            WAIT * 2
        );
        let _ = tokio::time::timeout(
            Duration::from_millis(500),
            reader.until(what, WAIT * 3, &done),
        )
        .await;
    }
}

/// The snapshot reads (`op: r`) of `topic` whose key names `column`.
fn reads_keyed_by(events: &BTreeMap<String, Vec<Event>>, topic: &str, column: &str) -> usize {
    events.get(topic).map_or(0, |ev| {
        ev.iter()
            .filter(|e| {
                e.event.as_ref().is_some_and(|ev| ev.op == Op::Read) && e.key.get(column).is_some()
            })
            .count()
    })
}

/// Whether `topic` holds a row whose `v` is `end`.
pub(super) fn has_end(events: &BTreeMap<String, Vec<Event>>, topic: &str) -> bool {
    events.get(topic).is_some_and(|ev| {
        ev.iter()
            .any(|e| e.after().is_some_and(|a| a["v"] == "end"))
    })
}

/// A key column renamed `id` -> `ident`: events before the rename name it
/// `id`, later ones `ident`. Renamed back to `id` in keys and rows, so a
/// replay compares the same column.
fn unrenamed(events: &[Event]) -> Vec<Event> {
    let fix = |v: &mut Value| {
        if let Some(o) = v.as_object_mut() {
            if let Some(x) = o.remove("ident") {
                o.insert("id".into(), x);
            }
        }
    };
    events
        .iter()
        .cloned()
        .map(|mut e| {
            fix(&mut e.key);
            if let Some(ev) = e.event.as_mut() {
                ev.after.as_mut().map(fix);
                ev.before.as_mut().map(fix);
            }
            e
        })
        .collect()
}

/// The scenario: `b`'s snapshot runs, `ddl` happens (with pg-source killed
/// around it when `killed`), then changes of `b` on both sides of the
/// snapshot's progress and of `a`; with the key replaced and `killed`,
/// pg-source is killed once more during the snapshot started again.
async fn key_change(mode: Mode, ddl: Ddl, killed: bool) {
    let db = Db::new().await;
    let (mut source, mut reader) = b_enters_the_set(&db, mode).await;
    let topic = db.topic("b");
    // The snapshot is held mid-way, whatever its pace and the reader's: a
    // lock its next chunk waits for, taken once some chunks went, and
    // released by the DDL's commit (so the chunk reads the table after it).
    scans_of_b(&db, &mut source, 3).await;
    let mut held = db.admin.acquire().await.unwrap();
    sqlx::raw_sql("begin; lock table public.b in access exclusive mode")
        .execute(&mut *held)
        .await
        .unwrap();
    let locked: i64 = sqlx::query_scalar(
        "select count(*) from pg_locks where relation = 'public.b'::regclass
          and mode = 'AccessExclusiveLock' and granted",
    )
    .fetch_one(&db.admin)
    .await
    .unwrap();
    assert_eq!(locked, 1, "b locked");
    until_running(&mut reader, &mut source, "b's first chunks", |e| {
        reads_keyed_by(e, &topic, "id") >= 10
    })
    .await;
    let sql = match ddl {
        Ddl::Rename => "alter table public.b rename column id to ident",
        Ddl::Replace => "alter table public.b drop constraint b_pkey, add primary key (n)",
    };
    if killed {
        source.kill().await;
        sqlx::raw_sql(&format!("{sql}; commit"))
            .execute(&mut *held)
            .await
            .unwrap();
        source = spawn(&db, mode);
    } else {
        sqlx::raw_sql(&format!("{sql}; commit"))
            .execute(&mut *held)
            .await
            .unwrap();
    }
    drop(held);
    let id = if ddl == Ddl::Rename { "ident" } else { "id" };
    // Rows the snapshot has sent, rows it has not, a new row above all (in
    // both keys' order: it arrives once the snapshot is done).
    script(
        &db.admin,
        &format!(
            "update public.b set v = 'changed' where {id} in (3, 1500);
             delete from public.b where {id} in (4, 1600);
             insert into public.b values (100000, 100000, 'end');
             insert into public.a values (2, 'end');"
        ),
    )
    .await;
    let new_key = if ddl == Ddl::Rename { "ident" } else { "n" };
    if ddl == Ddl::Replace && killed {
        until_running(&mut reader, &mut source, "b's chunks by its new key", |e| {
            reads_keyed_by(e, &topic, new_key) >= 20
        })
        .await;
        source.kill().await;
        source = spawn(&db, mode);
    }
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
    // The DDL came while the snapshot ran: it read rows after it.
    assert!(
        reads_keyed_by(&reader.events, &topic, new_key) > 0,
        "no snapshot read after the DDL: the snapshot ended before it; last read: {:?}",
        events
            .iter()
            .rev()
            .find(|e| e.event.as_ref().is_some_and(|ev| ev.op == Op::Read))
            .map(|e| (&e.key, e.after()))
    );
    let truncates = events
        .iter()
        .filter(|e| e.event.as_ref().is_some_and(|ev| ev.op == Op::Truncate))
        .count();
    match ddl {
        Ddl::Rename => {
            // Renamed: the snapshot went on from its last key.
            assert_eq!(truncates, 0, "the snapshot started again");
            let mut read = BTreeMap::<String, usize>::new();
            for e in unrenamed(events) {
                if e.event.as_ref().is_some_and(|ev| ev.op == Op::Read) {
                    *read.entry(e.key.to_string()).or_default() += 1;
                }
            }
            assert!(read.values().all(|n| *n == 1), "a key read twice");
            let mut rows = BTreeMap::new();
            for (_, row) in table_rows(&db.admin, "public.b", &["ident"]).await {
                let mut row = row;
                let x = row.as_object_mut().unwrap().remove("ident").unwrap();
                row.as_object_mut().unwrap().insert("id".into(), x.clone());
                rows.insert(serde_json::json!({ "id": x }).to_string(), row);
            }
            assert_eq!(replay(&unrenamed(events)), rows, "b replayed");
        }
        Ddl::Replace => {
            // Replaced: started again, from one TRUNCATE.
            assert_eq!(truncates, 1, "one TRUNCATE begins the snapshot again");
            let last = events
                .iter()
                .rposition(|e| e.event.as_ref().is_some_and(|ev| ev.op == Op::Truncate))
                .unwrap();
            let mut read = BTreeMap::<String, usize>::new();
            for e in &events[last..] {
                if e.event.as_ref().is_some_and(|ev| ev.op == Op::Read) {
                    *read.entry(e.key.to_string()).or_default() += 1;
                }
            }
            assert!(read.values().all(|n| *n == 1), "a key read twice");
            assert_eq!(
                replay(events),
                table_rows(&db.admin, "public.b", &["n"]).await,
                "b replayed"
            );
        }
    }
    assert_eq!(
        replay(&reader.events[&db.topic("a")]),
        table_rows(&db.admin, "public.a", &["id"]).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_key_column_renamed_during_incremental_snapshot() {
    key_change(Mode::ChangeLog, Ddl::Rename, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_key_column_renamed_while_stopped_during_incremental_snapshot() {
    key_change(Mode::ChangeLog, Ddl::Rename, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_key_replaced_during_incremental_snapshot() {
    key_change(Mode::ChangeLog, Ddl::Replace, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_key_replaced_while_stopped_during_incremental_snapshot() {
    key_change(Mode::ChangeLog, Ddl::Replace, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_key_column_renamed_during_incremental_snapshot() {
    key_change(Mode::Logical, Ddl::Rename, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_key_column_renamed_while_stopped_during_incremental_snapshot() {
    key_change(Mode::Logical, Ddl::Rename, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_key_replaced_during_incremental_snapshot() {
    key_change(Mode::Logical, Ddl::Replace, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_key_replaced_while_stopped_during_incremental_snapshot() {
    key_change(Mode::Logical, Ddl::Replace, true).await;
}
