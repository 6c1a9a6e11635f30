//! A database with Tidemark 0.1's change-log capture (jsonb row images, no
//! shapes) meets the new schema-init: changes 0.1 has not sent are never
//! dropped; an empty log is converted in place and every captured table,
//! named or not, logs version 2 rows from then on, keeping its settings.

use schema_init::{Capture, TriggerLevel, UpdateBefore};

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_0_1_change_log_is_upgraded_when_empty_and_refused_while_it_holds_changes() {
    let db = Db::new().await;
    for t in ["old_statement", "old_row"] {
        exec(
            &db.admin,
            &format!("create table public.{t} (id int primary key, v text)"),
        )
        .await;
    }
    sqlx::raw_sql(include_str!("../fixtures/changelog_0_1.sql"))
        .execute(&db.admin)
        .await
        .unwrap();
    exec(
        &db.admin,
        "insert into public.old_statement values (1, 'a')",
    )
    .await;
    exec(&db.admin, "insert into public.old_row values (1, 'a')").await;
    let capture = Capture {
        trigger: TriggerLevel::Statement,
        update_before: UpdateBefore::Null,
    };

    let err = db
        .schema_init_as(db.superuser.clone(), "old_statement", capture)
        .await
        .expect_err("upgraded a change log holding unsent changes");
    let err = format!("{err:#}");
    assert!(
        err.contains("tidemark.change_log was made by Tidemark 0.1 and still holds 2 changes that pg-source has not sent or not yet pruned"),
        "{err}"
    );
    let (rows, kind): (i64, String) = sqlx::query_as(
        "select (select count(*) from tidemark.change_log), format_type(atttypid, null)
           from pg_attribute where attrelid = 'tidemark.change_log'::regclass and attname = 'before'",
    )
    .fetch_one(&db.admin)
    .await
    .unwrap();
    assert_eq!(
        (rows, kind.as_str()),
        (2, "jsonb"),
        "the refused run changed the log"
    );

    // What pg-source 0.1 does once Kafka has them.
    let last_seq: i64 = sqlx::query_scalar("delete from tidemark.change_log returning seq")
        .fetch_all(&db.admin)
        .await
        .unwrap()
        .into_iter()
        .max()
        .unwrap();
    db.capture("old_statement", capture).await;

    let source = db
        .start_source(
            &["old_statement", "old_row"],
            &[("snapshot.mode", "no_data")],
        )
        .await;
    let topics = [db.topic("old_statement"), db.topic("old_row")];
    let mut reader = TopicReader::new(&topics);
    for t in ["old_statement", "old_row"] {
        exec(
            &db.admin,
            &format!("insert into public.{t} values (2, 'b')"),
        )
        .await;
        exec(
            &db.admin,
            &format!("update public.{t} set v = 'c' where id = 2"),
        )
        .await;
    }
    // The sequence, not the rows: pg-source may have sent and pruned them.
    let newest: i64 = sqlx::query_scalar(
        "select pg_catalog.pg_sequence_last_value(pg_catalog.pg_get_serial_sequence('tidemark.change_log', 'seq')::pg_catalog.regclass)",
    )
    .fetch_one(&db.admin)
    .await
    .unwrap();
    assert!(
        newest >= last_seq + 4,
        "seq went on to {newest} only, after {last_seq} and four changes"
    );
    reader
        .until("the changes after the upgrade", WAIT, |e| {
            topics.iter().all(|t| e.get(t).map_or(0, Vec::len) >= 2)
        })
        .await;
    source.stop().await;
    // Each table kept its update-before setting: 0.1's statement function
    // logged none, its row function the whole old row.
    let statement = &reader.events[&topics[0]];
    let row = &reader.events[&topics[1]];
    assert!(
        statement[1].event.as_ref().unwrap().before.is_none(),
        "{statement:?}"
    );
    assert_eq!(
        row[1].event.as_ref().unwrap().before.as_ref().unwrap()["v"],
        "b"
    );
    assert_eq!(row[1].after().unwrap()["v"], "c");
    assert_eq!(statement[1].after().unwrap()["v"], "c");

    let owners: Vec<String> = sqlx::query_scalar(
        "select distinct r.rolname::text from pg_proc p join pg_roles r on r.oid = p.proowner
          where p.pronamespace = 'tidemark'::regnamespace and p.prorettype = 'trigger'::regtype",
    )
    .fetch_all(&db.admin)
    .await
    .unwrap();
    assert_eq!(owners, ["tidemark_capture"]);
}
