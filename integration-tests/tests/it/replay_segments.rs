//! pg-replay over a segmented archive that the real pipeline wrote:
//! pg-source on a topic of three partitions, file-sink rotating small zstd
//! segments, pg-replay reading the archive folder with `--input`: following
//! it while it is written, to a point in time (reading no segment wholly
//! after it), to the end, and killed with SIGKILL mid-replay and started
//! again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{Rng as _, SeedableRng as _};
use sqlx::PgPool;
use tidemark_common::archive::{Archive, ManifestLine};
use tidemark_common::pg::TableName;
use tokio_util::sync::CancellationToken;

use crate::archive::{archive_lines, archive_sink};
use crate::replay::{config, replay, Db};
use crate::support::*;

pub(crate) const DDL: &str = "
create table streaming_update_table (
  id serial primary key,
  data varchar(256) not null,
  is_soft_deleted boolean default false,
  create_date timestamp not null default now(),
  last_updated timestamp not null default now())";

pub(crate) async fn rows(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("select t::text from streaming_update_table t order by id")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// `n` transactions of 1 to 6 inserts, updates and deletes (some rolled
/// back), so units span partitions.
pub(crate) async fn write(pool: &PgPool, rng: &mut rand::rngs::StdRng, n: usize, next: &mut i32) {
    for _ in 0..n {
        let mut tx = pool.begin().await.unwrap();
        for _ in 0..rng.random_range(1..=6) {
            let r: f64 = rng.random();
            let k = rng.random_range(1..=*next);
            if r < 0.45 {
                *next += 1;
                sqlx::query("insert into streaming_update_table (id, data) values ($1, $2)")
                    .bind(*next)
                    .bind(format!(
                        "row {next} {}",
                        "x".repeat(rng.random_range(0..80))
                    ))
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            } else if r < 0.85 {
                sqlx::query("update streaming_update_table set data = $2, is_soft_deleted = not is_soft_deleted where id = $1")
                    .bind(k)
                    .bind(format!("updated {}", rng.random::<u32>()))
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            } else {
                sqlx::query("delete from streaming_update_table where id = $1")
                    .bind(k)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
        }
        if rng.random_bool(0.1) {
            tx.rollback().await.unwrap();
        } else {
            tx.commit().await.unwrap();
        }
    }
}

/// Waits until the archive's durable records stop growing for a while.
pub(crate) async fn wait_idle(dir: &Path) -> usize {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = (usize::MAX, Instant::now());
    loop {
        let n = if dir.join("tidemark-archive.json").exists() {
            let d = dir.to_path_buf();
            tokio::task::spawn_blocking(move || {
                std::panic::catch_unwind(|| archive_lines(&d).len()).unwrap_or(0)
            })
            .await
            .unwrap()
        } else {
            0
        };
        if n != last.0 {
            last = (n, Instant::now());
        } else if n > 0 && last.1.elapsed() > Duration::from_millis(2000) {
            return n;
        }
        assert!(Instant::now() < deadline, "the pipeline did not settle");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

async fn server_now_us(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select (extract(epoch from clock_timestamp()) * 1000000)::int8")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn changes_counted(pool: &PgPool) -> i64 {
    sqlx::query_scalar::<_, i64>("select changes from tidemark.replay_position")
        .fetch_optional(pool)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// Per partition, the sealed segments wholly after `t` but the first of
/// them (which holds the partition's first event past `t`).
fn segments_after_the_first_past(dir: &Path, t: i64) -> Vec<PathBuf> {
    let Archive::Segmented { partitions, .. } = Archive::open(dir).unwrap() else {
        panic!("not segmented")
    };
    let mut out = Vec::new();
    for p in partitions {
        let past: Vec<_> = p
            .segments
            .iter()
            .filter(|s| s.stats.min_ts_us.is_some_and(|m| m > t))
            .collect();
        out.extend(past.iter().skip(1).map(|s| p.dir.join(&s.segment)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segmented_archive_of_three_partitions_replays_follows_stops_at_a_time_and_survives_sigkill(
) {
    let fx = Fixture::logical().await;
    let source = fx.start_source_with(&[("topic.creation.default.partitions", "3")]);
    let root = fx.dir.path().join("archive");
    let sink_cfg = archive_sink(
        &fx.sink_name,
        &fx.topic(),
        &root,
        &[
            ("file.rotate.bytes", "12000"),
            ("file.rotate.interval.ms", "1000"),
            ("file.compression", "zstd"),
        ],
    );
    let sink = Running::start(|token| file_sink::run(sink_cfg, token));
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut next = 1000;
    write(&fx.pool, &mut rng, 20, &mut next).await;
    wait_idle(&root).await;

    // A follower, started while the pipeline runs.
    let follow_db = Db::new().await;
    follow_db.exec(DDL).await;
    let mut cfg = config(&follow_db, &[&root]);
    cfg.follow = true;
    cfg.name = "follower".into();
    let stop_follow = CancellationToken::new();
    let follower = tokio::spawn(pg_replay::run(cfg, stop_follow.clone()));

    write(&fx.pool, &mut rng, 80, &mut next).await;
    wait_idle(&root).await;
    let at_t = rows(&fx.pool).await;
    let t = server_now_us(&fx.pool).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    write(&fx.pool, &mut rng, 120, &mut next).await;
    wait_idle(&root).await;
    let final_rows = rows(&fx.pool).await;
    assert_ne!(at_t, final_rows);

    // The follower catches up while file-sink still runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    while rows(&follow_db.pool).await != final_rows {
        assert!(
            !follower.is_finished(),
            "the follower stopped: {:?}",
            follower.await
        );
        assert!(Instant::now() < deadline, "the follower did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop_follow.cancel();
    follower.await.unwrap().unwrap();
    source.stop().await.unwrap();
    sink.stop().await.unwrap();

    let Archive::Segmented { partitions, .. } = Archive::open(&root).unwrap() else {
        panic!("not segmented")
    };
    assert_eq!(partitions.len(), 3);
    let sealed: usize = partitions.iter().map(|p| p.segments.len()).sum();
    assert!(sealed >= 6, "only {sealed} sealed segments");
    for p in &partitions {
        let (lines, _) = tidemark_common::archive::read_manifest(&p.dir).unwrap();
        assert!(lines.iter().all(|l| matches!(l, ManifestLine::Sealed(_))));
    }

    // To the point in time, with the segments after the first past it
    // moved away: they are not read.
    let db = Db::new().await;
    db.exec(DDL).await;
    let later = segments_after_the_first_past(&root, t);
    for f in &later {
        std::fs::rename(f, f.with_extension("aside")).unwrap();
    }
    let mut cfg = config(&db, &[&root]);
    cfg.until = pg_replay::UntilArg::Time(t);
    let s = replay(cfg).await;
    for f in &later {
        std::fs::rename(f.with_extension("aside"), f).unwrap();
    }
    assert!(s.unwrap().units > 0);
    assert_eq!(rows(&db.pool).await, at_t, "the table as it was at T");
    eprintln!("{} segments past T left unread", later.len());
    // Then on to the end, and verify.
    replay(config(&db, &[&root])).await.unwrap();
    assert_eq!(rows(&db.pool).await, final_rows);
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
    let total = changes_counted(&db.pool).await;
    // A second run changes nothing.
    let again = replay(config(&db, &[&root])).await.unwrap();
    assert_eq!(again.changes, 0);

    // SIGKILL mid-replay, then restarts: the same target, every change
    // applied once.
    let killed = Db::new().await;
    killed.exec(DDL).await;
    let start = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_it-pg-replay"))
            .arg("--input")
            .arg(&root)
            .args([
                "--target-url",
                &killed.url(),
                "--batch-changes",
                "5",
                "--max-delay",
                "20ms",
                "--http-addr",
                "off",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut kills = 0;
    let mut krng = rand::rng();
    for threshold in [total / 5, total / 2, total * 4 / 5] {
        let mut child = start();
        let deadline = Instant::now() + Duration::from_secs(60);
        let finished = loop {
            assert!(Instant::now() < deadline, "the replay never got on");
            if child.try_wait().unwrap().is_some() {
                break true;
            }
            if changes_counted(&killed.pool).await >= threshold {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        };
        if finished {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            continue;
        }
        tokio::time::sleep(Duration::from_millis(krng.random_range(0..10))).await;
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    let out = start().wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(kills >= 1, "the replay was never cut");
    assert_eq!(rows(&killed.pool).await, final_rows, "after {kills} kills");
    assert_eq!(
        changes_counted(&killed.pool).await,
        total,
        "every change once"
    );
    let streams: String = sqlx::query_scalar("select streams::text from tidemark.replay_position")
        .fetch_one(&killed.pool)
        .await
        .unwrap();
    assert!(streams.contains("archive:"), "{streams}");
    // --check reads the folder as an archive.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_it-pg-replay"))
        .arg("--check")
        .arg("--input")
        .arg(&root)
        .args(["--target-url", &killed.url()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("segmented archive") && text.contains("3 partitions"),
        "{text}"
    );
    eprintln!("{kills} kills, {total} changes, {sealed} sealed segments");
    fx.drop_slot().await;
}

/// Partitions that never receive a record (one key written, three
/// partitions) hold nothing back, following or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_without_records_hold_nothing_back() {
    let fx = Fixture::logical().await;
    sqlx::raw_sql("delete from streaming_update_table; insert into streaming_update_table (id, data) values (1, 'one')")
        .execute(&fx.pool)
        .await
        .unwrap();
    let source = fx.start_source_with(&[("topic.creation.default.partitions", "3")]);
    let root = fx.dir.path().join("archive");
    let sink_cfg = archive_sink(
        &fx.sink_name,
        &fx.topic(),
        &root,
        &[("file.rotate.bytes", "4000"), ("file.compression", "zstd")],
    );
    let sink = Running::start(|token| file_sink::run(sink_cfg, token));
    // The snapshot first, then changes of that one key.
    wait_idle(&root).await;
    for i in 0..30 {
        sqlx::query("update streaming_update_table set data = $1 where id = 1")
            .bind(format!("v{i}"))
            .execute(&fx.pool)
            .await
            .unwrap();
    }
    wait_idle(&root).await;
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    let Archive::Segmented { partitions, .. } = Archive::open(&root).unwrap() else {
        panic!("not segmented")
    };
    let with_records = partitions
        .iter()
        .filter(|p| p.checkpoint.as_ref().is_some_and(|c| c.last.is_some()))
        .count();
    eprintln!(
        "{} partition folders, {with_records} with records, marks {:?}",
        partitions.len(),
        partitions
            .iter()
            .map(|p| p.complete_before(false))
            .collect::<Vec<_>>()
    );
    let db = Db::new().await;
    db.exec(DDL).await;
    let s = replay(config(&db, &[&root])).await.unwrap();
    assert_eq!(with_records, 1, "one key, one partition");
    assert_eq!(s.changes, 31, "the snapshot's row and 30 updates");
    assert_eq!(rows(&db.pool).await, rows(&fx.pool).await);
    // A follower over the same archive gets there too.
    let follow_db = Db::new().await;
    follow_db.exec(DDL).await;
    let mut cfg = config(&follow_db, &[&root]);
    cfg.follow = true;
    let stop = CancellationToken::new();
    let follower = tokio::spawn(pg_replay::run(cfg, stop.clone()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while rows(&follow_db.pool).await != rows(&fx.pool).await {
        assert!(
            !follower.is_finished() && Instant::now() < deadline,
            "the follower did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    follower.await.unwrap().unwrap();
    fx.drop_slot().await;
}
