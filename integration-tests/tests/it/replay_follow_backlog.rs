//! pg-replay `--follow` over a segmented archive whose events do not name
//! the unit before them (no `prev_commit_order`: written by a pg-source
//! from before it carried it), with a backlog far larger than
//! `--max-pending-units` (issue 13, review finding M1). Such units may be
//! applied only once every partition's completeness mark is past them;
//! the follower must apply the backlog in bounded memory as it reads it,
//! and keep up as the archive grows, without applying a unit before the
//! archive holds all of it and without reordering units. The same archive
//! replayed without `--follow` must apply just the same.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::archive::{archive_sink, producer, topic};
use crate::replay::{config, replay, Db};
use crate::replay_new_partitions::produce_placed;
use crate::replay_segments::wait_idle;
use crate::support::*;

/// Units waiting in memory at most, far below the backlog.
const MAX_PENDING: usize = 1000;
/// The backlog, in units of two inserts each.
const BACKLOG: i64 = 6000;
/// Units written while the follower runs.
const MORE: i64 = 500;

const DDL: &str = "create table public.t (id int primary key, data text not null)";

async fn count(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("select pg_catalog.count(*) from public.t")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The target's rows, against what units `1..=units` insert.
async fn assert_rows(pool: &sqlx::PgPool, units: i64) {
    let got: Vec<(i32, String)> = sqlx::query_as("select id, data from public.t order by id")
        .fetch_all(pool)
        .await
        .unwrap();
    let want: Vec<(i32, String)> = (1..=units as i32)
        .flat_map(|co| {
            [
                (co * 10 + 1, format!("unit {co}")),
                (co * 10 + 2, format!("unit {co}")),
            ]
        })
        .collect();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "the target's rows are not the units' rows");
}

/// The backlog of [`BACKLOG`] units (each wholly in one of two
/// partitions, alternately) is archived before the follower starts, with
/// `--max-pending-units` at [`MAX_PENDING`]. Before the fix the follower
/// read the whole backlog before any partition's mark counted (a reader
/// took its partition's mark only once caught up), so every unit waited,
/// and past the bound it stopped with "units wait behind unit 1, which is
/// still incomplete", though unit 1 was whole. Then [`MORE`] units are
/// written while it follows: it must keep up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_applies_a_backlog_of_units_without_prev_commit_order_in_bounded_memory() {
    let topic = topic(2).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("archive");
    let sink_cfg = archive_sink(
        &unique("backlog"),
        &topic,
        &root,
        &[("file.rotate.bytes", "200000")],
    );
    let sink = Running::start(|token| file_sink::run(sink_cfg, token));
    let producer = producer();
    produce_placed(&producer, &topic, 1..=BACKLOG, |co| (co % 2) as i32).await;
    wait_idle(&root).await;

    let db = Db::new().await;
    db.exec(DDL).await;
    let mut cfg = config(&db, &[&root]);
    cfg.follow = true;
    cfg.max_pending_units = MAX_PENDING;
    cfg.name = "backlog".into();
    let stop = CancellationToken::new();
    let follower = tokio::spawn(pg_replay::run(cfg, stop.clone()));
    let wait = |n: i64| {
        let (pool, follower) = (db.pool.clone(), &follower);
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while count(&pool).await < n {
                if follower.is_finished() {
                    return false;
                }
                assert!(
                    Instant::now() < deadline,
                    "the follower did not get to {n} rows"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            true
        }
    };
    let mut done = wait(2 * BACKLOG).await;
    if done {
        produce_placed(&producer, &topic, BACKLOG + 1..=BACKLOG + MORE, |co| {
            (co % 2) as i32
        })
        .await;
        done = wait(2 * (BACKLOG + MORE)).await;
    }
    stop.cancel();
    let summary = follower
        .await
        .unwrap()
        .expect("the follower applies the backlog and what follows in commit order");
    assert!(done, "the follower stopped early");
    assert_eq!(
        (summary.units, summary.position),
        (BACKLOG as u64 + MORE as u64, Some(BACKLOG + MORE))
    );
    assert_rows(&db.pool, BACKLOG + MORE).await;
    wait_idle(&root).await;
    sink.stop().await.unwrap();

    // The same archive without --follow, under the same bound.
    let db = Db::new().await;
    db.exec(DDL).await;
    let mut cfg = config(&db, &[&root]);
    cfg.max_pending_units = MAX_PENDING;
    let summary = replay(cfg)
        .await
        .expect("the archive replays without --follow under the same bound");
    assert_eq!(
        (summary.units, summary.position),
        (BACKLOG as u64 + MORE as u64, Some(BACKLOG + MORE))
    );
    assert_rows(&db.pool, BACKLOG + MORE).await;
}
