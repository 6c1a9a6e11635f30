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
