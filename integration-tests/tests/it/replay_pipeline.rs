//! pg-replay over what the real pipeline wrote: schema-init, pg-source and
//! file-sink in-process against the real Postgres and Kafka, writers doing
//! inserts, updates, deletes, key changes and rollbacks, then replays of
//! the file and the topic into fresh databases, compared with the source.
//! Both capture modes.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use rand::{Rng as _, SeedableRng as _};
use sqlx::{ConnectOptions as _, PgPool};
use tidemark_common::pg::TableName;

use crate::replay::{config, replay, Db};
use crate::support::*;

/// The seed's table and trigger, as a restore target made with
/// `pg_dump --schema-only` has them: the trigger must not fire on replay.
pub(crate) const SEED_DDL: &str = "
create table streaming_update_table (
  id serial primary key,
  data varchar(256) not null,
  is_soft_deleted boolean default false,
  create_date timestamp not null default now(),
  last_updated timestamp not null default now());
create function update_last_updated_column() returns trigger as $$
begin new.last_updated = now(); return new; end; $$ language plpgsql;
create trigger update_last_updated_column before update on streaming_update_table
  for each row execute procedure update_last_updated_column()";

/// Every row of the seed table as its text, in key order.
pub(crate) async fn table_rows(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("select t::text from streaming_update_table t order by id")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// A single writer's transactions: inserts, updates, deletes and key
/// changes, one in ten rolled back. Tracks the keys that exist.
pub(crate) struct Writer {
    rng: rand::rngs::StdRng,
    live: BTreeSet<i32>,
    next_key: i32,
}

impl Writer {
    pub(crate) async fn new(pool: &PgPool, seed: u64) -> Self {
        let live: Vec<i32> = sqlx::query_scalar("select id from streaming_update_table")
            .fetch_all(pool)
            .await
            .unwrap();
        Self {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            live: live.into_iter().collect(),
            next_key: 1_000,
        }
    }

    /// Runs `n` transactions of 1 to 5 changes.
    pub(crate) async fn run(&mut self, pool: &PgPool, n: usize) {
        for t in 0..n {
            let ops = self.rng.random_range(1..=5);
            self.transaction(pool, t, ops).await;
        }
    }

    /// Runs one transaction of `ops` changes.
    async fn run_sized(&mut self, pool: &PgPool, ops: usize) {
        self.transaction(pool, 0, ops).await;
    }

    async fn transaction(&mut self, pool: &PgPool, t: usize, ops: usize) {
        {
            let mut tx = pool.begin().await.unwrap();
            let mut live = self.live.clone();
            for _ in 0..ops {
                let r: f64 = self.rng.random();
                let pick = {
                    let v: Vec<i32> = live.iter().copied().collect();
                    (!v.is_empty()).then(|| v[self.rng.random_range(0..v.len())])
                };
                match (r, pick) {
                    (r, _) if r < 0.35 || live.len() < 3 => {
                        let k = self.next_key;
                        self.next_key += 1;
                        sqlx::query(
                            "insert into streaming_update_table (id, data) values ($1, $2)",
                        )
                        .bind(k)
                        .bind(format!("row {k} of txn {t}"))
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                        live.insert(k);
                    }
                    (r, Some(k)) if r < 0.75 => {
                        sqlx::query("update streaming_update_table set data = $2, is_soft_deleted = $3 where id = $1")
                            .bind(k)
                            .bind(format!("updated in txn {t} \t\\ 'quoted'"))
                            .bind(r < 0.5)
                            .execute(&mut *tx)
                            .await
                            .unwrap();
                    }
                    (r, Some(k)) if r < 0.9 => {
                        sqlx::query("delete from streaming_update_table where id = $1")
                            .bind(k)
                            .execute(&mut *tx)
                            .await
                            .unwrap();
                        live.remove(&k);
                    }
                    (_, Some(k)) => {
                        // A primary-key change: a delete and a create.
                        let to = self.next_key;
                        self.next_key += 1;
                        sqlx::query("update streaming_update_table set id = $2 where id = $1")
                            .bind(k)
                            .bind(to)
                            .execute(&mut *tx)
                            .await
                            .unwrap();
                        live.remove(&k);
                        live.insert(to);
                    }
                    _ => {}
                }
            }
            if self.rng.random_bool(0.1) {
                tx.rollback().await.unwrap();
            } else {
                tx.commit().await.unwrap();
                self.live = live;
            }
        }
    }
}

/// Waits until the file has stopped growing for a while (the pipeline has
/// sent everything committed so far).
pub(crate) async fn wait_idle(path: &Path) -> usize {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = (usize::MAX, Instant::now());
    loop {
        let n = std::fs::read(path)
            .map(|b| b.iter().filter(|c| **c == b'\n').count())
            .unwrap_or(0);
        if n != last.0 {
            last = (n, Instant::now());
        } else if n > 0 && last.1.elapsed() > Duration::from_millis(1500) {
            return n;
        }
        assert!(Instant::now() < deadline, "the pipeline did not settle");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Commit-time µs of "now" on the source server.
async fn server_now_us(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select (extract(epoch from clock_timestamp()) * 1000000)::int8")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn point_in_time_and_full_restore(fx: Fixture) {
    let source = fx.start_source();
    let sink = fx.start_sink();
    let mut writer = Writer::new(&fx.pool, 7).await;
    writer.run(&fx.pool, 60).await;
    // The moment to restore to: writers paused, everything before it in the
    // archive (a changelog batch is stamped when pg-source takes its
    // snapshot, so the pause lasts until it has).
    wait_idle(&fx.file()).await;
    let at_t = table_rows(&fx.pool).await;
    let t = server_now_us(&fx.pool).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    writer.run(&fx.pool, 60).await;
    wait_idle(&fx.file()).await;
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    let final_rows = table_rows(&fx.pool).await;
    assert_ne!(at_t, final_rows, "the second half changed something");

    // Restore to T into a table made from the source's schema (its trigger
    // included).
    let db = Db::new().await;
    db.exec(SEED_DDL).await;
    let mut cfg = config(&db, &[fx.file()]);
    cfg.until = pg_replay::UntilArg::Time(t);
    let s = replay(cfg).await.unwrap();
    assert!(s.units > 0);
    assert_eq!(table_rows(&db.pool).await, at_t, "the table as it was at T");
    // Then on to the end: the final state, checked with verify.
    replay(config(&db, &[fx.file()])).await.unwrap();
    assert_eq!(table_rows(&db.pool).await, final_rows);
    let verify = pg_replay::verify::VerifyConfig {
        source: fx.target.clone(),
        target: db.target.clone(),
        tables: vec![(
            TableName::parse("streaming_update_table").unwrap(),
            TableName::parse("streaming_update_table").unwrap(),
        )],
        chunk_rows: 50,
        leaf_rows: 10,
        max_diffs: 10,
    };
    let report = pg_replay::verify::verify(&verify).await.unwrap();
    assert!(report.equal(), "{report:?}");

    // From the topic, into another database: the same rows.
    let topic_db = Db::new().await;
    topic_db.exec(SEED_DDL).await;
    let mut cfg = config::<&Path>(&topic_db, &[]);
    cfg.topics = vec![fx.topic()];
    cfg.kafka = kafka();
    replay(cfg).await.unwrap();
    assert_eq!(
        table_rows(&topic_db.pool).await,
        final_rows,
        "topic replay = file replay"
    );
    fx.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_archives_restore_to_a_point_in_time_and_to_the_end() {
    point_in_time_and_full_restore(Fixture::logical().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_archives_restore_to_a_point_in_time_and_to_the_end() {
    point_in_time_and_full_restore(Fixture::changelog(schema_init::TriggerLevel::Row).await).await;
}

/// TRUNCATE inside a transaction with inserts before and after it (issue
/// 14.1), between writers' transactions that then take the freed keys
/// again: file-sink writes the TRUNCATE event like any other, and the
/// restore equals the source (one that missed it would keep the rows it
/// removed).
async fn truncate_replays(fx: Fixture) {
    // Ready first: the writes must come after the initial snapshot.
    let source = fx.start_source_with(&[]).ready().await;
    let sink = fx.start_sink();
    let mut writer = Writer::new(&fx.pool, 11).await;
    writer.run(&fx.pool, 30).await;
    let mut tx = fx.pool.begin().await.unwrap();
    for sql in [
        "insert into streaming_update_table (id, data) values (5000, 'before')",
        "truncate streaming_update_table",
        "insert into streaming_update_table (id, data) values (1, 'after'), (5000, 'after')",
    ] {
        sqlx::query(sql).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
    let mut writer = Writer::new(&fx.pool, 12).await;
    writer.run(&fx.pool, 30).await;
    wait_idle(&fx.file()).await;
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    let events = read_events(&fx.file());
    let truncates: Vec<_> = events
        .iter()
        .filter(|e| e.op == tidemark_common::envelope::Op::Truncate)
        .collect();
    assert_eq!(
        truncates.len(),
        1,
        "one TRUNCATE in the file: {:?}",
        events.iter().map(|e| e.op).collect::<Vec<_>>()
    );
    assert!(truncates[0].before.is_none() && truncates[0].after.is_none());
    let final_rows = table_rows(&fx.pool).await;

    let db = Db::new().await;
    db.exec(SEED_DDL).await;
    replay(config(&db, &[fx.file()])).await.unwrap();
    assert_eq!(table_rows(&db.pool).await, final_rows, "restored = source");
    fx.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_truncate_replays_to_the_source() {
    truncate_replays(Fixture::logical().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_truncate_replays_to_the_source() {
    truncate_replays(Fixture::changelog(schema_init::TriggerLevel::Row).await).await;
}

/// Every column type of the round-trip tests, captured (a snapshot row, then
/// changes: an all-NULL row, edge values, an update) and replayed into a
/// table made from the same DDL: the same rows, value for value, by text.
/// With `create_target`, the target has no such table: pg-replay creates it
/// from the records' field schemas (`tidemark.column.type`, `.key`,
/// optional), with the source's column types, NOT NULLs and primary key.
async fn every_column_type_replays(logical: bool, create_target: bool) {
    use crate::bad_input::*;
    let fx = capture_fixture(logical).await;
    let mood = "create type mood as enum ('happy', 'it''s \"complicated\"')";
    exec(&fx.pool, mood).await;
    exec(&fx.pool, ALL_TYPES).await;
    install_fixture_capture(&fx, &TableName::parse("all_types").unwrap()).await;
    let mut writer = fx.user_options().connect().await.unwrap();
    // A writer printing values its own way: the archive must not depend on it.
    for set in [
        "set timezone = 'Asia/Kolkata'",
        "set intervalstyle = 'postgres_verbose'",
        "set datestyle = 'SQL, DMY'",
    ] {
        sqlx::query(set).execute(&mut writer).await.unwrap();
    }
    insert_typed(&mut writer, &full_row()).await;
    let source = start_source(&fx, &[("table.whitelist", "all_types")]).await;
    let topic = format!("{}all_types", fx.prefix);
    let file = fx.dir.path().join("all_types.txt");
    let sink = start_sink(sink_config(&fx, &topic, &file));
    insert_typed(&mut writer, &null_row()).await;
    insert_typed(&mut writer, &other_row()).await;
    sqlx::query("update all_types set txt = 'changed', flag = not flag where id = 1")
        .execute(&mut writer)
        .await
        .unwrap();
    sqlx::query("delete from all_types where id = 3")
        .execute(&mut writer)
        .await
        .unwrap();
    sqlx::query("update all_types set id = 4 where id = 2")
        .execute(&mut writer)
        .await
        .unwrap();
    wait_idle(&file).await;
    source.stop().await.unwrap();
    sink.stop().await.unwrap();

    let db = Db::new().await;
    db.exec(mood).await;
    if !create_target {
        db.exec(ALL_TYPES).await;
    }
    replay(config(&db, &[&file])).await.unwrap();
    // The table's definition: columns in order with their exact types and
    // NOT NULL, and the primary key's columns in key order.
    let definition = |pool: PgPool| async move {
        sqlx::query_scalar::<_, String>(
            "select a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || case when a.attnotnull then ' not null' else '' end
               || coalesce(' key ' || (select k.n from unnest(i.indkey) with ordinality k(att, n) where k.att = a.attnum), '')
             from pg_attribute a left join pg_index i on i.indrelid = a.attrelid and i.indisprimary
             where a.attrelid = 'public.all_types'::regclass and a.attnum > 0 and not a.attisdropped
             order by a.attnum",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let source_definition = definition(fx.pool.clone()).await;
    assert!(
        source_definition.contains(&"id integer not null key 1".to_owned()),
        "{source_definition:?}"
    );
    assert_eq!(definition(db.pool.clone()).await, source_definition);
    let rows = |pool: PgPool| async move {
        let mut conn = pool.acquire().await.unwrap();
        // Both sides printed with the same settings.
        sqlx::query("set timezone = 'UTC'")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query_scalar::<_, String>("select w::text from all_types w order by id")
            .fetch_all(&mut *conn)
            .await
            .unwrap()
    };
    let want = rows(fx.pool.clone()).await;
    assert_eq!(want.len(), 2, "{want:?}");
    assert_eq!(rows(db.pool.clone()).await, want);
    fx.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_column_type_replays_from_a_changelog_archive() {
    every_column_type_replays(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_column_type_replays_from_a_logical_archive() {
    every_column_type_replays(true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_target_table_is_created_from_a_changelog_archive() {
    every_column_type_replays(false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_target_table_is_created_from_a_logical_archive() {
    every_column_type_replays(true, true).await;
}

/// `--follow` on the file while writers make 1,000 changes/s: the target
/// keeps up (verify finds it equal moments after the writers stop), its lag
/// is in /metrics, SIGTERM stops it; one row changed in the target makes
/// verify fail, naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_keeps_up_with_1000_changes_per_second_and_verify_tells_equal_from_changed() {
    let fx = Fixture::logical().await;
    let source = fx.start_source();
    let sink = fx.start_sink();
    let db = Db::new().await;
    db.exec(SEED_DDL).await;
    wait_idle(&fx.file()).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = config(&db, &[fx.file()]);
    cfg.follow = true;
    cfg.http_addr = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let token = tokio_util::sync::CancellationToken::new();
    let follower = tokio::spawn(pg_replay::run(cfg, token.clone()));

    // 10 changes per transaction, 100 transactions a second, for 8 s.
    let mut writer = Writer::new(&fx.pool, 3).await;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let started = Instant::now();
    let mut max_lag = 0f64;
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(8) {
        tick.tick().await;
        writer.run_sized(&fx.pool, 10).await;
        n += 1;
        if n % 100 == 0 && started.elapsed() > Duration::from_secs(2) {
            // The lag of this replay (the /metrics gauge is the process's,
            // shared by the tests running beside this one).
            let lag: Option<f64> = sqlx::query_scalar(
                "select extract(epoch from clock_timestamp())::float8 - ts_us / 1e6 from tidemark.replay_position",
            )
            .fetch_optional(&db.pool)
            .await
            .unwrap()
            .flatten();
            max_lag = max_lag.max(lag.unwrap_or(f64::MAX));
            assert!(!follower.is_finished(), "the follower stopped");
        }
    }
    let wrote = started.elapsed();
    assert!(
        wrote < Duration::from_secs(12),
        "the writers could not keep 1,000/s ({wrote:?})"
    );
    let verify = pg_replay::verify::VerifyConfig {
        source: fx.target.clone(),
        target: db.target.clone(),
        tables: vec![(
            TableName::parse("streaming_update_table").unwrap(),
            TableName::parse("streaming_update_table").unwrap(),
        )],
        chunk_rows: 100,
        leaf_rows: 10,
        max_diffs: 10,
    };
    // Caught up within seconds of the last commit.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let report = pg_replay::verify::verify(&verify).await.unwrap();
        if report.equal() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not caught up 10 s after the writers stopped: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(max_lag < 5.0, "lag reached {max_lag} s while following");
    let body = http_get_body(port, "/metrics").await;
    for name in ["tidemark_replay_position", "tidemark_replay_lag_seconds"] {
        assert!(metric(&body, name).is_some(), "{name} in {body}");
    }
    eprintln!("follow: the largest lag while writing was {max_lag:.2} s");
    // SIGTERM stops it cleanly.
    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), follower)
        .await
        .expect("stops within 10 s of SIGTERM")
        .unwrap()
        .unwrap();
    source.stop().await.unwrap();
    sink.stop().await.unwrap();

    // One changed row, and verify says which.
    let id: i32 =
        sqlx::query_scalar("select id from streaming_update_table order by id limit 1 offset 3")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    sqlx::query("alter table streaming_update_table disable trigger user")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("update streaming_update_table set data = data || '!' where id = $1")
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    let report = pg_replay::verify::verify(&verify).await.unwrap();
    assert!(!report.equal());
    assert_eq!(report.differences.len(), 1, "{report:?}");
    assert_eq!(report.differences[0].key, format!("(id)=({id})"));
    assert_eq!(report.differences[0].what, "differs");
    fx.drop_slot().await;
}

/// GET `path` on the loopback port, the body.
async fn http_get_body(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// A metric's value in Prometheus text.
fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
