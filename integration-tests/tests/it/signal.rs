//! Snapshots on demand (issue 14.3): a row in `tidemark.signal` asks a
//! running pg-source (changelog and logical modes) for an incremental snapshot of a
//! table while paced writers change it; file-sink writes the archive; a
//! replay from the beginning and one from the newest complete snapshot
//! (`--from-snapshot newest`) both equal the source table. And a signal is
//! acted on once across a kill of pg-source in the middle of its snapshot.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tidemark_common::envelope::{ChangeEvent, Op};
use tokio::task::JoinHandle;

use crate::replay::{config, replay, Db};
use crate::replay_pipeline::{table_rows, wait_idle, Writer, SEED_DDL};
use crate::support::*;

/// How long a step of the pipeline may take (CI runs many tests on 2 cores).
const WAIT: Duration = Duration::from_secs(120);

/// Asks for a snapshot: a row of `tidemark.signal`, as a user would write it.
async fn signal(pool: &PgPool, kind: &str, data: &str) {
    sqlx::query("insert into tidemark.signal (kind, data) values ($1, $2::jsonb)")
        .bind(kind)
        .bind(data)
        .execute(pool)
        .await
        .unwrap();
}

/// Runs one statement.
async fn exec(pool: &PgPool, sql: &str) {
    sqlx::query(sql).execute(pool).await.unwrap();
}

/// One writer's transactions (inserts, updates, deletes, key changes,
/// rollbacks) on the seed table, paced for CI's two cores, until `stop`.
fn writer(pool: PgPool, seed: u64, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut w = Writer::new(&pool, seed).await;
        while !stop.load(Ordering::Relaxed) {
            w.run(&pool, 1).await;
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    })
}

/// The incremental snapshot events of the archive.
fn incremental(events: &[ChangeEvent]) -> Vec<&ChangeEvent> {
    events
        .iter()
        .filter(|e| e.source.snapshot.as_deref() == Some("incremental"))
        .collect()
}

/// The units of the archive whose events carry `place` (or `only`).
fn units_marked(events: &[ChangeEvent], place: &str) -> Vec<i64> {
    let mut units: Vec<i64> = incremental(events)
        .into_iter()
        .filter(
            |e| matches!(e.source.snapshot_chunk.as_deref(), Some(p) if p == place || p == "only"),
        )
        .map(|e| e.transaction.as_ref().unwrap().commit_order as i64)
        .collect();
    units.dedup();
    units
}

/// Lines of the file that hold `needle`, and the distinct units of those
/// lines: a cheap look (no JSON decoding) while the pipeline runs.
fn lines_with(path: &Path, needle: &str) -> (usize, usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut units = std::collections::BTreeSet::new();
    let mut n = 0;
    for line in text.lines().filter(|l| l.contains(needle)) {
        n += 1;
        if let Some(at) = line.find("\"commit_order\":") {
            let digits: String = line[at + 15..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            units.insert(digits);
        }
    }
    (n, units.len())
}

/// Waits until the archive holds `n` complete snapshots (`last` or `only`
/// chunks).
async fn wait_for_snapshots(path: &Path, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let done = lines_with(path, "\"snapshot_chunk\":\"last\"").1
            + lines_with(path, "\"snapshot_chunk\":\"only\"").1;
        if done >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the archive holds {done} complete incremental snapshots after {within:?}, not {n}; {} incremental events",
            lines_with(path, "\"snapshot\":\"incremental\"").0
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Rows of the seed table for the snapshots to read, with keys the
/// writers' inserts never take.
async fn fill(pool: &PgPool, rows: i64) {
    sqlx::query(
        "insert into streaming_update_table (id, data) select g, 'row ' || g from generate_series(100000, 100000 + $1 - 1) g",
    )
    .bind(rows)
    .execute(pool)
    .await
    .unwrap();
}

/// Replays `file` into a new database from the beginning and from the
/// newest snapshot: both must equal `expected`. Returns the changes each
/// applied.
async fn both_replays(file: &Path, expected: &[String]) -> (u64, u64) {
    let whole = Db::new().await;
    whole.exec(SEED_DDL).await;
    // Small runs: within one run a key's create and its re-read net to one
    // insert, so only runs that part them show how a re-read is applied.
    let mut cfg = config(&whole, &[file]);
    cfg.batch_changes = 97;
    let from_start = replay(cfg)
        .await
        .expect("a replay from the beginning, whose re-read rows are upserts");
    assert_eq!(
        table_rows(&whole.pool).await,
        expected,
        "replayed from the beginning = the source"
    );
    let newest = Db::new().await;
    newest.exec(SEED_DDL).await;
    let mut cfg = config(&newest, &[file]);
    cfg.from_snapshot = pg_replay::snapshots::FromSnapshot::Newest;
    cfg.batch_changes = 97;
    let from_snapshot = replay(cfg)
        .await
        .expect("a replay from the newest snapshot");
    assert_eq!(
        table_rows(&newest.pool).await,
        expected,
        "replayed from the newest snapshot = the source"
    );
    (from_start.changes, from_snapshot.changes)
}

/// Two re-snapshots on demand while a paced writer changes the table (and
/// a malformed signal and one naming a table not captured, which change
/// nothing): the archive marks where each begins and ends, and a restore
/// from the newest one equals a restore from the beginning, and the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_snapshot_on_demand_under_writes_restores_from_the_newest_snapshot_as_from_the_beginning(
) {
    re_snapshots_under_writes(Fixture::changelog(schema_init::TriggerLevel::Row).await).await;
}

/// The same in `logical` mode, where the signal table is read between
/// batches and a chunk takes its place in the replication stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_a_re_snapshot_on_demand_under_writes_restores_from_the_newest_snapshot_as_from_the_beginning(
) {
    re_snapshots_under_writes(Fixture::logical().await).await;
}

async fn re_snapshots_under_writes(fx: Fixture) {
    fill(&fx.pool, 1500).await;
    let source = fx
        .start_source_with(&[("batch.max.rows", "100")])
        .ready()
        .await;
    let sink = fx.start_sink();
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(fx.pool.clone(), 21, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(
        &fx.pool,
        "execute-snapshot",
        r#"{"data-collections": ["public.nowhere"]}"#,
    )
    .await;
    signal(
        &fx.pool,
        "execute-snapshot",
        r#"{"tables": "public.streaming_update_table"}"#,
    )
    .await;
    signal(
        &fx.pool,
        "execute-snapshot",
        r#"{"data-collections": ["public.streaming_update_table"], "type": "incremental"}"#,
    )
    .await;
    wait_for_snapshots(&fx.file(), 1, WAIT).await;
    signal(
        &fx.pool,
        "execute-snapshot",
        r#"{"data-collections": ["streaming_update_table"]}"#,
    )
    .await;
    wait_for_snapshots(&fx.file(), 2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    w.await.unwrap();
    wait_idle(&fx.file()).await;
    source.assert_running();
    source.stop().await.unwrap();
    sink.stop().await.unwrap();

    let events = read_events(&fx.file());
    let (first, last) = (
        units_marked(&events, "first"),
        units_marked(&events, "last"),
    );
    assert_eq!(first.len(), 2, "two snapshots begun: {first:?}");
    assert_eq!(last.len(), 2, "two snapshots ended: {last:?}");
    assert!(first[0] <= last[0] && last[0] < first[1] && first[1] <= last[1]);
    // Each snapshot reads each key once.
    for (from, to) in first.iter().zip(&last) {
        let mut reads: BTreeMap<String, usize> = BTreeMap::new();
        for e in incremental(&events) {
            let co = e.transaction.as_ref().unwrap().commit_order as i64;
            if e.op == Op::Read && (*from..=*to).contains(&co) {
                *reads
                    .entry(e.after.as_ref().unwrap()["id"].to_string())
                    .or_default() += 1;
            }
        }
        assert!(
            reads.len() >= 1000,
            "the snapshot read {} keys",
            reads.len()
        );
        assert!(reads.values().all(|n| *n == 1), "a key read twice");
    }
    let expected = table_rows(&fx.pool).await;
    let (whole, newest) = both_replays(&fx.file(), &expected).await;
    assert!(
        newest < whole,
        "the replay from the newest snapshot applied fewer changes ({newest}) than from the beginning ({whole})"
    );
}

/// A signal is acted on once: pg-source killed in the middle of the
/// snapshot it asked for resumes it (no second snapshot begins, no key is
/// read twice), and the archive restores to the source either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_is_acted_on_once_across_a_kill_mid_snapshot() {
    acted_on_once_across_a_kill(Fixture::changelog(schema_init::TriggerLevel::Row).await).await;
}

/// The same in `logical` mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_a_signal_is_acted_on_once_across_a_kill_mid_snapshot() {
    acted_on_once_across_a_kill(Fixture::logical().await).await;
}

async fn acted_on_once_across_a_kill(fx: Fixture) {
    fill(&fx.pool, 10_000).await;
    let overrides = [("batch.max.rows", "50")];
    let source = fx.start_source_with(&overrides).ready().await;
    let sink = fx.start_sink();
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(fx.pool.clone(), 22, stop.clone());
    signal(
        &fx.pool,
        "execute-snapshot",
        r#"{"data-collections": ["public.streaming_update_table"]}"#,
    )
    .await;
    let deadline = Instant::now() + WAIT;
    while lines_with(&fx.file(), "\"snapshot\":\"incremental\"").0 < 500 {
        assert!(Instant::now() < deadline, "the snapshot did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        lines_with(&fx.file(), "\"snapshot_chunk\":\"last\"").0,
        0,
        "the kill comes before the snapshot's end"
    );
    source.kill().await;
    let source = fx.start_source_with(&overrides);
    wait_for_snapshots(&fx.file(), 1, WAIT).await;
    stop.store(true, Ordering::Relaxed);
    w.await.unwrap();
    wait_idle(&fx.file()).await;
    source.assert_running();
    source.stop().await.unwrap();
    sink.stop().await.unwrap();

    let events = read_events(&fx.file());
    assert_eq!(
        units_marked(&events, "first").len(),
        1,
        "one snapshot begun"
    );
    assert_eq!(units_marked(&events, "last").len(), 1, "one snapshot ended");
    let mut reads: BTreeMap<String, usize> = BTreeMap::new();
    for e in incremental(&events) {
        *reads
            .entry(e.after.as_ref().unwrap()["id"].to_string())
            .or_default() += 1;
    }
    assert!(
        reads.len() >= 9000,
        "the snapshot read {} keys",
        reads.len()
    );
    let twice: Vec<_> = reads.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "keys read twice: {twice:?}");
    both_replays(&fx.file(), &table_rows(&fx.pool).await).await;
}

/// pg-source reads only a signal table made as schema-init makes it (a
/// plain table a superuser owns, in a schema a superuser owns): one that a
/// less privileged role owns is not read (its signal queues nothing, and
/// the stream goes on), and once a superuser owns it again, the next start
/// acts on the signal waiting there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_a_signal_table_a_less_privileged_role_owns_is_not_read() {
    let fx = Fixture::logical().await;
    fill(&fx.pool, 200).await;
    let role = unique("tm_signal_owner_");
    exec(&fx.pool, &format!("create role {role}")).await;
    exec(
        &fx.pool,
        &format!("alter table tidemark.signal owner to {role}"),
    )
    .await;
    let source = fx.start_source_with(&[]).ready().await;
    let sink = fx.start_sink();
    signal(
        &fx.pool,
        "execute-snapshot",
        r#"{"data-collections": ["public.streaming_update_table"]}"#,
    )
    .await;
    // Well past a few looks at the signal table; the stream goes on.
    tokio::time::sleep(Duration::from_secs(4)).await;
    exec(
        &fx.pool,
        "update streaming_update_table set data = 'after the signal' where id = 100000",
    )
    .await;
    let deadline = Instant::now() + WAIT;
    while lines_with(&fx.file(), "after the signal").0 == 0 {
        assert!(Instant::now() < deadline, "the stream stopped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        lines_with(&fx.file(), "\"snapshot\":\"incremental\"").0,
        0,
        "a signal in a table a less privileged role owns was acted on"
    );
    source.assert_running();
    source.stop().await.unwrap();
    exec(
        &fx.pool,
        "alter table tidemark.signal owner to current_user",
    )
    .await;
    exec(&fx.pool, &format!("drop role {role}")).await;
    let source = fx.start_source_with(&[]);
    wait_for_snapshots(&fx.file(), 1, WAIT).await;
    wait_idle(&fx.file()).await;
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    let events = read_events(&fx.file());
    assert_eq!(units_marked(&events, "first").len(), 1, "one snapshot");
    both_replays(&fx.file(), &table_rows(&fx.pool).await).await;
}
