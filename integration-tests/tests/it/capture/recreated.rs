//! A table dropped and created again under its name, or renamed away and
//! back (issue 14.4), in both capture modes, through the whole pipeline:
//! pg-source, file-sink, then pg-replay of the archive into a new database,
//! which must equal the source. The new table's rows inserted before it was
//! captured reach the archive only by a snapshot.

use std::time::{Duration, Instant};

use tidemark_common::envelope::Op;
use tidemark_common::pg::TableName;

use crate::replay::{config, replay, Db};
use crate::replay_pipeline::{table_rows, Writer, SEED_DDL};
use crate::support::{read_events, table_state, Fixture};

/// Runs `sql` on the fixture's database as the user.
async fn script(fx: &Fixture, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(&fx.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// schema-init's capture of the seed table again (the fixture's kind).
async fn capture_again(fx: &Fixture) {
    schema_init::run(&schema_init::Config {
        target: fx.init.target.clone(),
        database: fx.database.clone(),
        table: TableName::parse("streaming_update_table").unwrap(),
        notify: false,
        sample_row: false,
        seed_objects: false,
        capture: fx.init.capture,
        logical: fx.logical,
    })
    .await
    .expect("schema-init captures the table again");
}

/// Waits until the archive file plays back (by key, whatever table name
/// its events carry) to the table, and failing that for 90 s, fails.
async fn until_archived(fx: &Fixture) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let events = read_events(&fx.file());
        if crate::support::replay(&events) == table_state(&fx.pool).await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the archive did not reach the table within 90 s ({} events)",
            events.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// pg-replay of the archive into a new database equals the source table.
async fn replay_equals_source(fx: &Fixture) {
    replay_name_equals_source(fx, false).await;
}

/// The same, with `by_name` of the table's name alone: in changelog mode
/// the events of a table renamed away name the other table, which a replay
/// of the name leaves out (the table's snapshot after it came back holds
/// what they did).
async fn replay_name_equals_source(fx: &Fixture, by_name: bool) {
    let db = Db::new().await;
    sqlx::raw_sql(SEED_DDL).execute(&db.pool).await.unwrap();
    let mut cfg = config(&db, &[fx.file()]);
    if by_name {
        let t = TableName::parse("public.streaming_update_table").unwrap();
        cfg.tables = vec![(t.clone(), t)];
        cfg.ignore_unmapped = true;
    }
    replay(cfg).await.expect("pg-replay replays the archive");
    assert_eq!(
        table_rows(&db.pool).await,
        table_rows(&fx.pool).await,
        "restored = source"
    );
}

const SEED_TABLE: &str = "create table streaming_update_table (
  id serial primary key,
  data varchar(256) not null,
  is_soft_deleted boolean default false,
  create_date timestamp not null default now(),
  last_updated timestamp not null default now())";

/// Dropped and created again while pg-source runs, with rows inserted
/// before it is captured again, then written to.
async fn dropped_and_created_again(fx: Fixture) {
    let source = fx
        .start_source_with(&[("batch.max.rows", "10")])
        .ready()
        .await;
    let sink = fx.start_sink();
    Writer::new(&fx.pool, 31).await.run(&fx.pool, 20).await;
    until_archived(&fx).await;
    script(
        &fx,
        &format!(
            "drop table streaming_update_table; {SEED_TABLE};
             insert into streaming_update_table (id, data)
               select g, 'made again ' || g from generate_series(1, 45) g"
        ),
    )
    .await;
    capture_again(&fx).await;
    Writer::new(&fx.pool, 32).await.run(&fx.pool, 20).await;
    until_archived(&fx).await;
    source.assert_running();
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    let events = read_events(&fx.file());
    assert!(
        events.iter().any(|e| e.op == Op::Truncate),
        "the new table's snapshot begins with a TRUNCATE event"
    );
    replay_equals_source(&fx).await;
    fx.drop_slot().await;
}

/// Dropped and created again while pg-source runs, with rows inserted
/// before it is captured again, and never written to after: its rows come
/// by the snapshot alone.
async fn dropped_and_created_again_never_written(fx: Fixture) {
    let source = fx
        .start_source_with(&[("batch.max.rows", "10")])
        .ready()
        .await;
    let sink = fx.start_sink();
    Writer::new(&fx.pool, 33).await.run(&fx.pool, 20).await;
    until_archived(&fx).await;
    script(
        &fx,
        &format!(
            "drop table streaming_update_table; {SEED_TABLE};
             insert into streaming_update_table (id, data)
               select g, 'made again ' || g from generate_series(1, 45) g"
        ),
    )
    .await;
    capture_again(&fx).await;
    until_archived(&fx).await;
    source.assert_running();
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    replay_equals_source(&fx).await;
    fx.drop_slot().await;
}

/// Renamed away, written to, and renamed back while pg-source is stopped,
/// then written to.
async fn renamed_away_and_back(fx: Fixture) {
    let overrides = [("batch.max.rows", "10")];
    let source = fx.start_source_with(&overrides).ready().await;
    let sink = fx.start_sink();
    Writer::new(&fx.pool, 41).await.run(&fx.pool, 20).await;
    until_archived(&fx).await;
    source.stop().await.unwrap();
    script(
        &fx,
        "alter table streaming_update_table rename to sut_away;
         update sut_away set data = 'while away' where id in (select id from sut_away order by id limit 3);
         insert into sut_away (id, data) values (900, 'away');
         delete from sut_away where id = (select max(id) from sut_away where id < 900);
         alter table sut_away rename to streaming_update_table",
    )
    .await;
    let source = fx.start_source_with(&overrides).ready().await;
    script(
        &fx,
        "update streaming_update_table set data = 'back' where id = (select min(id) from streaming_update_table);
         insert into streaming_update_table (id, data) values (901, 'back')",
    )
    .await;
    until_archived(&fx).await;
    source.assert_running();
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    replay_name_equals_source(&fx, true).await;
    fx.drop_slot().await;
}

/// Dropped and created again with columns whose attnums are the old
/// table's for other columns (issue 12): the old table had `a text` and
/// `b integer` added and `a` dropped (b at attnum 7); the new one has
/// `b integer` at 6 (the old a's) and `c text` at 7 (the old b's). pg-replay
/// with --schema-changes apply must not take the old b for c (renamed and
/// retyped to text, which stops): the records say each table's OID, so it
/// pairs the new table's columns by name, and the restore equals the
/// source. (Changelog mode only for now: in logical mode the old table's
/// records of `a` come without an attnum here, so its drop stops as not
/// proven before the table is created again; see the report of issue 12.)
async fn created_again_with_colliding_attnums(fx: Fixture) {
    let source = fx
        .start_source_with(&[("batch.max.rows", "10")])
        .ready()
        .await;
    let sink = fx.start_sink();
    script(
        &fx,
        "begin; set local search_path = pg_catalog, pg_temp;
         alter table public.streaming_update_table add column a text, add column b integer;
         commit;
         begin; set local search_path = pg_catalog, pg_temp;
         insert into public.streaming_update_table (id, data, a, b)
           select g, 'old ' || g, 'a' || g, g from pg_catalog.generate_series(5001, 5005) g;
         commit;
         begin; set local search_path = pg_catalog, pg_temp;
         alter table public.streaming_update_table drop column a;
         commit;
         begin; set local search_path = pg_catalog, pg_temp;
         update public.streaming_update_table set b = 70 where id = 5002;
         commit",
    )
    .await;
    until_archived(&fx).await;
    script(
        &fx,
        &format!(
            "begin; set local search_path = pg_catalog, pg_temp;
             drop table public.streaming_update_table; {};
             insert into public.streaming_update_table (id, data, b, c)
               select g, 'made again ' || g, g * 10, 'c' || g from pg_catalog.generate_series(3, 9) g; commit",
            SEED_TABLE
                .replace("create table streaming_update_table", "create table public.streaming_update_table")
                .replace("now())", "now(),\n  b integer,\n  c text)")
                .replace("default now()", "default pg_catalog.now()")
        ),
    )
    .await;
    capture_again(&fx).await;
    script(
        &fx,
        "begin; set local search_path = pg_catalog, pg_temp;
         update public.streaming_update_table set c = 'changed', b = 1 where id = 4;
         insert into public.streaming_update_table (id, data, b, c) values (20, 'new', 200, 'c20'); commit",
    )
    .await;
    until_archived(&fx).await;
    source.assert_running();
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    let attnums: Vec<(String, i32)> = sqlx::query_as(
        "select a.attname::pg_catalog.text, a.attnum::pg_catalog.int4 from pg_catalog.pg_attribute a
         where a.attrelid operator(pg_catalog.=) 'public.streaming_update_table'::pg_catalog.regclass
           and a.attnum operator(pg_catalog.>) 5 order by a.attnum",
    )
    .fetch_all(&fx.pool)
    .await
    .unwrap();
    assert_eq!(
        attnums,
        [("b".into(), 6), ("c".into(), 7)],
        "the attnums collide"
    );

    replay_applying_schema_changes_equals_source(&fx).await;
    fx.drop_slot().await;
}

/// pg-replay of the archive with --schema-changes apply into a new database
/// with the seed's table: it equals the source.
async fn replay_applying_schema_changes_equals_source(fx: &Fixture) {
    let db = Db::new().await;
    sqlx::raw_sql(SEED_DDL).execute(&db.pool).await.unwrap();
    let mut cfg = config(&db, &[fx.file()]);
    cfg.schema_changes = pg_replay::apply::SchemaChanges::Apply;
    replay(cfg).await.expect("pg-replay replays the archive");
    assert_eq!(
        table_rows(&db.pool).await,
        table_rows(&fx.pool).await,
        "restored = source"
    );
}

/// Schema changes among writes that pg-source reads in one go (it was
/// stopped meanwhile): each ALTER ends a changelog batch at the snapshot
/// its DDL saw, so no unit holds a table's changes of two shapes, and
/// pg-replay with --schema-changes apply replays the archive to the source
/// (before, the first batch after the start held all of them, and pg-replay
/// stopped at "columns change inside source transaction").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_schema_changes_between_writes_read_at_once_replay_to_the_source() {
    let fx = Fixture::changelog(schema_init::TriggerLevel::Row).await;
    let source = fx.start_source_with(&[]).ready().await;
    let sink = fx.start_sink();
    until_archived(&fx).await;
    source.stop().await.unwrap();
    script(
        &fx,
        "begin; set local search_path = pg_catalog, pg_temp;
         alter table public.streaming_update_table add column a text, add column b integer;
         commit;
         begin; set local search_path = pg_catalog, pg_temp;
         insert into public.streaming_update_table (id, data, a, b)
           select g, 'old ' || g, 'a' || g, g from pg_catalog.generate_series(5001, 5005) g;
         commit;
         begin; set local search_path = pg_catalog, pg_temp;
         update public.streaming_update_table set a = 'changed' where id = 5001;
         commit;
         begin; set local search_path = pg_catalog, pg_temp;
         alter table public.streaming_update_table drop column a;
         commit;
         begin; set local search_path = pg_catalog, pg_temp;
         update public.streaming_update_table set b = 70 where id = 5002;
         commit;
         begin; set local search_path = pg_catalog, pg_temp;
         alter table public.streaming_update_table alter column b type pg_catalog.int8;
         commit;
         begin; set local search_path = pg_catalog, pg_temp;
         insert into public.streaming_update_table (id, data, b) values (6001, 'after', 9000000000);
         delete from public.streaming_update_table where id = 5003;
         commit",
    )
    .await;
    let source = fx.start_source_with(&[]).ready().await;
    until_archived(&fx).await;
    source.assert_running();
    source.stop().await.unwrap();
    sink.stop().await.unwrap();

    // The changes of each shape are units of their own.
    let events = read_events(&fx.file());
    let unit_of = |id: i64, has: &str| -> u64 {
        events
            .iter()
            .rev()
            .find(|e| {
                e.after
                    .as_ref()
                    .is_some_and(|a| a["id"] == id && a.get(has).is_some())
                    || (has == "-" && e.before.as_ref().is_some_and(|b| b["id"] == id))
            })
            .and_then(|e| e.transaction.as_ref())
            .map(|t| t.commit_order)
            .unwrap_or_else(|| panic!("no event of id {id} with {has}"))
    };
    let with_a = unit_of(5001, "a");
    let without_a = unit_of(5002, "b");
    let wider_b = unit_of(6001, "b");
    assert!(
        with_a < without_a && without_a < wider_b,
        "units {with_a}, {without_a}, {wider_b}: each shape in units of its own"
    );
    assert_eq!(
        unit_of(5003, "-"),
        wider_b,
        "the delete goes with its transaction"
    );

    replay_applying_schema_changes_equals_source(&fx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_table_created_again_with_colliding_attnums_replays_to_the_source() {
    created_again_with_colliding_attnums(Fixture::changelog(schema_init::TriggerLevel::Row).await)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_table_dropped_and_created_again_is_snapshotted() {
    dropped_and_created_again(Fixture::changelog(schema_init::TriggerLevel::Row).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_table_dropped_and_created_again_is_snapshotted() {
    dropped_and_created_again(Fixture::logical().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_table_renamed_away_and_back_while_stopped_replays_to_the_source() {
    renamed_away_and_back(Fixture::changelog(schema_init::TriggerLevel::Row).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_table_renamed_away_and_back_while_stopped_replays_to_the_source() {
    renamed_away_and_back(Fixture::logical().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_table_created_again_and_never_written_is_snapshotted() {
    dropped_and_created_again_never_written(
        Fixture::changelog(schema_init::TriggerLevel::Row).await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_table_created_again_and_never_written_is_snapshotted() {
    dropped_and_created_again_never_written(Fixture::logical().await).await;
}
