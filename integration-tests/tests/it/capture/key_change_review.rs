//! Review of 96a6617 (issue 14): a key column renamed while pg-source
//! (logical mode) is stopped, with a change of the table written before the
//! rename not read yet. After the restart the stream's Relation for that
//! change names the old columns (`id, v`), the catalog's key is `ident`, and
//! no earlier shape of the table is known: pg-source stops with "table
//! public.b: the stream sent columns (id, v) without the primary key's
//! (ident); changes cannot be keyed", the other table with it, and again at
//! every start (the stored LSN is before that change). key_change.rs's
//! "killed" variants pass only because no change of `b` is unread at the
//! kill.
//!
//! Also: the key replaced by a transaction that first writes the table
//! with the old key on both sides of the snapshot's progress (updates,
//! deletes, an insert, keys moved across it), with pg-source running or
//! killed around it, both modes: the snapshot starts again from one
//! TRUNCATE and the topic replays to the table. These passed on main
//! (f795930, 96a6617's code) twice: coverage the key_change.rs tests lack
//! (they write nothing of `b` before the DDL), not a fix.

use super::*;

async fn script(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

fn has_end(events: &BTreeMap<String, Vec<Event>>, topic: &str) -> bool {
    events.get(topic).is_some_and(|ev| {
        ev.iter()
            .any(|e| e.after().is_some_and(|a| a["v"] == "end"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "not fixed: logical mode stops when a change written before a key column's rename is first read after a restart (see the module doc)"]
async fn review_logical_key_column_renamed_while_stopped_with_a_change_unread() {
    let db = Db::new().await;
    script(
        &db.admin,
        "create table public.a (id int8 primary key, v text not null);
         insert into public.a values (1, 'a1');
         create table public.b (id int4 primary key, v text not null);
         insert into public.b values (1, 'b1');",
    )
    .await;
    for t in ["a", "b"] {
        for step in schema_init::logical_steps(&TableName::parse(t).unwrap()) {
            script(&db.admin, &step.sql).await;
        }
    }
    let overrides = [("mode", "logical")];
    let mut reader = TopicReader::new(&[db.topic("a"), db.topic("b")]);
    let source = db.start_source(&["a", "b"], &overrides).await;
    script(&db.admin, "insert into public.b values (2, 'b2')").await;
    reader.at_least(&db.topic("b"), 2).await;
    source.stop().await;
    // Written before the rename, read after it.
    script(&db.admin, "update public.b set v = 'changed' where id = 1").await;
    script(&db.admin, "alter table public.b rename column id to ident").await;
    script(
        &db.admin,
        "insert into public.b values (3, 'end'); insert into public.a values (2, 'end')",
    )
    .await;
    let cfg = db.source_config(&["a", "b"], &overrides);
    let mut source = Task::spawn(|token| pg_source::run(cfg, token));
    let deadline = Instant::now() + WAIT * 2;
    while !(has_end(&reader.events, &db.topic("b")) && has_end(&reader.events, &db.topic("a"))) {
        source
            .assert_running("pg-source, waiting for the rows 'end'")
            .await;
        assert!(Instant::now() < deadline, "the rows 'end' never came");
        let _ = tokio::time::timeout(
            Duration::from_millis(500),
            reader.until("end", WAIT, |e| {
                has_end(e, &db.topic("b")) && has_end(e, &db.topic("a"))
            }),
        )
        .await;
    }
    source.assert_running("pg-source").await;
    source.stop().await;
    let slot = pg_source::modes::logical::default_slot_name(&db.source_name);
    let _ = sqlx::query("select pg_drop_replication_slot($1)")
        .bind(&slot)
        .execute(&db.admin)
        .await;
    let changed = reader.events[&db.topic("b")]
        .iter()
        .any(|e| e.after().is_some_and(|a| a["v"] == "changed"));
    assert!(changed, "the update written before the rename is missing");
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    ChangeLog,
    Logical,
}

impl Mode {
    fn overrides(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Mode::ChangeLog => &[("batch.max.rows", "10")],
            Mode::Logical => &[("mode", "logical"), ("batch.max.rows", "10")],
        }
    }
}

fn reads_keyed_by(events: &BTreeMap<String, Vec<Event>>, topic: &str, column: &str) -> usize {
    use tidemark_common::envelope::Op;
    events.get(topic).map_or(0, |ev| {
        ev.iter()
            .filter(|e| {
                e.event.as_ref().is_some_and(|ev| ev.op == Op::Read) && e.key.get(column).is_some()
            })
            .count()
    })
}

async fn until_running(
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
        assert!(Instant::now() < deadline, "waited for {what}");
        let _ = tokio::time::timeout(
            Duration::from_millis(500),
            reader.until(what, WAIT * 3, &done),
        )
        .await;
    }
}

/// The key of `b` replaced while its snapshot runs, by a transaction that
/// first writes rows on both sides of the snapshot's progress with the old
/// key (updates, deletes, an insert), so the stream meets changes of the
/// old key's shape in the DDL's own transaction before the new shape.
async fn replaced_after_writes_in_its_transaction(mode: Mode, killed: bool) {
    use tidemark_common::envelope::Op;
    let db = Db::new().await;
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
            Mode::ChangeLog => {
                db.capture(t, Capture::full(schema_init::TriggerLevel::Row))
                    .await
            }
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
    let spawn = |db: &Db| {
        let cfg = db.source_config(&["a", "b"], mode.overrides());
        Task::spawn(|token| pg_source::run(cfg, token))
    };
    let mut source = spawn(&db);
    let topic = db.topic("b");
    until_running(&mut reader, &mut source, "b's first chunks", |e| {
        reads_keyed_by(e, &topic, "id") >= 30
    })
    .await;
    let mut held = db.admin.acquire().await.unwrap();
    sqlx::raw_sql(
        "begin; lock table public.b in access exclusive mode;
         update public.b set v = 'pre' where id in (2, 1700);
         delete from public.b where id in (5, 7, 1800);
         insert into public.b values (50000, 50000, 'pre');
         update public.b set id = 60000, n = 60000 where id = 6;
         update public.b set id = 7, n = 7 where id = 1950;",
    )
    .execute(&mut *held)
    .await
    .unwrap();
    let sql = "alter table public.b drop constraint b_pkey, add primary key (n);
               update public.b set v = 'post' where id in (3, 1600); commit";
    if killed {
        source.kill().await;
        sqlx::raw_sql(sql).execute(&mut *held).await.unwrap();
        source = spawn(&db);
    } else {
        sqlx::raw_sql(sql).execute(&mut *held).await.unwrap();
    }
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
    assert!(
        reads_keyed_by(&reader.events, &topic, "n") > 0,
        "no read by the new key"
    );
    let truncates = events
        .iter()
        .filter(|e| e.event.as_ref().is_some_and(|ev| ev.op == Op::Truncate))
        .count();
    assert_eq!(truncates, 1, "one TRUNCATE begins the snapshot again");
    assert_eq!(
        replay(events),
        table_rows(&db.admin, "public.b", &["n"]).await,
        "b replayed"
    );
    assert_eq!(
        replay(&reader.events[&db.topic("a")]),
        table_rows(&db.admin, "public.a", &["id"]).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_changelog_key_replaced_after_writes_in_its_transaction() {
    replaced_after_writes_in_its_transaction(Mode::ChangeLog, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_changelog_key_replaced_after_writes_in_its_transaction_killed() {
    replaced_after_writes_in_its_transaction(Mode::ChangeLog, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_logical_key_replaced_after_writes_in_its_transaction() {
    replaced_after_writes_in_its_transaction(Mode::Logical, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_logical_key_replaced_after_writes_in_its_transaction_killed() {
    replaced_after_writes_in_its_transaction(Mode::Logical, true).await;
}
