//! The fault-injection suite: concurrent writers (long transactions,
//! rollbacks, deletes), migrations and TRUNCATEs (of the seed's table, and
//! of both tables at once, each between inserts in its transaction) while
//! pg-source, file-sink, the Kafka broker and Postgres are killed and
//! restarted at random instants. A table is created, filled and captured
//! during the run; `table.whitelist` matches it by a pattern, so its rows
//! arrive by an incremental snapshot, which meets a fault of each kind.
//!
//! Then every committed change must be in the archive exactly once, in
//! commit order per key, and nothing from a rolled-back transaction: the
//! seed table's changes all of them, the added table's each key's snapshot
//! read (a state the key had) and every change after it. Each table's
//! events, applied strictly (no create or read of a key held, no update or
//! delete of a key missing, a TRUNCATE empties the table), restore the
//! table; and pg-replay of the archive into a new database gives tables
//! that `pg-replay verify` finds equal to the source's.
//!
//! It restarts the shared broker and Postgres (through `dev/services`), so it
//! does not run with the other tests: `.ci/run` runs a short version after
//! them, and a longer one is
//!
//! ```sh
//! TIDEMARK_FAULT_SECONDS=300 TIDEMARK_FAULT_WRITERS=8 \
//!   cargo test -p integration-tests --release fault -- --ignored --nocapture
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng as _, SeedableRng as _};
use schema_init::TriggerLevel;
use sqlx::{ConnectOptions as _, Connection as _};
use tidemark_common::envelope::Op;
use tidemark_common::pg::TableName;

use crate::support::*;

/// The tests here restart the shared services, so they take turns.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits for this test's turn with the shared services, which these tests
/// stop and restart through `dev/services`.
async fn take_services() -> tokio::sync::MutexGuard<'static, ()> {
    assert!(
        std::env::var("DATABASE_URL").is_ok() && std::env::var("KAFKA_BOOTSTRAP_SERVERS").is_ok(),
        "the fault tests stop and restart Kafka and Postgres through dev/services: run `eval \"$(dev/services up)\"` first"
    );
    SERIAL.lock().await
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A program running as a real process.
struct Proc {
    name: &'static str,
    exe: &'static str,
    args: Vec<String>,
    log: PathBuf,
    child: Child,
}

impl Proc {
    fn start(name: &'static str, exe: &'static str, args: Vec<String>, log: PathBuf) -> Self {
        let child = spawn(exe, &args, &log);
        Self {
            name,
            exe,
            args,
            log,
            child,
        }
    }

    fn kill_and_restart(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
        self.child = spawn(self.exe, &self.args, &self.log);
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            panic!(
                "{} exited with {status}; last log lines:\n{}",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("{} did not stop within 15 s of SIGTERM", self.name);
    }
}

impl Drop for Proc {
    /// A failing test must not leave its programs running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(exe: &str, args: &[String], log: &Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(exe)
        .args(args)
        .env(
            "TIDEMARK_LOG",
            "info,sqlx=warn,rdkafka=warn,librdkafka=warn",
        )
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {exe}: {e}"))
}

fn services(cmd: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dev/services");
    let status = Command::new("bash")
        .arg(&script)
        .arg(cmd)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "dev/services {cmd} failed");
}

/// Where the fault suite's records go.
#[derive(Clone, Copy)]
enum Sinks {
    /// One file-sink writing the seed's single file.
    SingleFile,
    /// `instances` file-sinks in one group writing a segmented archive
    /// (rotation by size and time, zstd) of a topic of `partitions`.
    Archive { instances: usize, partitions: i32 },
}

/// The topic of [`ADDED`].
fn added_topic(fx: &Fixture) -> String {
    pg_source::topic_name(&fx.prefix, ADDED)
}

/// The archive's folder, in the fixture's directory.
fn archive_dir(fx: &Fixture) -> PathBuf {
    fx.dir.path().join("archive")
}

/// Starts pg-source (changelog mode, small batches) and file-sink on the
/// fixture's table as real processes, logging into the fixture's directory.
fn start_programs(fx: &Fixture) -> (Proc, Proc) {
    let (source, mut sinks) = start_programs_with(fx, Sinks::SingleFile);
    (source, sinks.remove(0))
}

/// Like [`start_programs`], with the sinks `sinks` says.
fn start_programs_with(fx: &Fixture, sinks: Sinks) -> (Proc, Vec<Proc>) {
    let dir = fx.dir.path();
    let source_cfg = dir.join("pg.source.connector.json");
    let c = fx.source_connector();
    let mut config = serde_json::Map::new();
    for (k, v) in &c.props {
        config.insert(k.clone(), serde_json::Value::String(v.clone()));
    }
    config.insert("batch.max.rows".into(), "100".into());
    // The seed's table, and by a pattern the table added during the run.
    config.insert(
        "table.whitelist".into(),
        format!("{MAIN}, public\\.{ADDED}").into(),
    );
    if let Sinks::Archive { partitions, .. } = sinks {
        config.insert(
            "topic.creation.default.partitions".into(),
            partitions.to_string().into(),
        );
    }
    std::fs::write(
        &source_cfg,
        serde_json::json!({"name": c.name, "config": config}).to_string(),
    )
    .unwrap();
    let sink = fx.sink_connector();
    let sink_cfg = dir.join("sink.json");
    // Both topics from the start: file-sink reads the added table's once
    // pg-source creates it.
    let topics = format!("{},{}", fx.topic(), added_topic(fx));
    let sink_json = match sinks {
        Sinks::SingleFile => {
            serde_json::json!({"name": sink.name, "config": {"topics": topics, "file": fx.file()}})
        }
        Sinks::Archive { .. } => serde_json::json!({"name": sink.name, "config": {
            "topics": topics,
            "file": archive_dir(fx),
            "file.rotate.bytes": "65536",
            "file.rotate.interval.ms": "2000",
            "file.compression": "zstd",
        }}),
    };
    std::fs::write(&sink_cfg, sink_json.to_string()).unwrap();
    let kafka_args = vec![
        "--bootstrap-servers".to_owned(),
        bootstrap(),
        "--http-addr".to_owned(),
        "off".to_owned(),
    ];
    let source = Proc::start(
        "pg-source",
        env!("CARGO_BIN_EXE_it-pg-source"),
        [
            vec![
                "--connector-config".into(),
                source_cfg.display().to_string(),
                "--offsets-topic".into(),
                format!("{}offsets", fx.prefix),
            ],
            kafka_args.clone(),
        ]
        .concat(),
        dir.join("pg-source.log"),
    );
    let instances = match sinks {
        Sinks::SingleFile => 1,
        Sinks::Archive { instances, .. } => instances,
    };
    let names = ["file-sink", "file-sink-2", "file-sink-3", "file-sink-4"];
    let sinks = (0..instances)
        .map(|i| {
            Proc::start(
                names[i],
                env!("CARGO_BIN_EXE_it-file-sink"),
                [
                    vec!["--connector-config".into(), sink_cfg.display().to_string()],
                    kafka_args.clone(),
                ]
                .concat(),
                dir.join(format!("{}.log", names[i])),
            )
        })
        .collect();
    (source, sinks)
}

/// The seed's table, which the writers and migrations change.
const MAIN: &str = "streaming_update_table";

/// The table created, filled and captured while the faults go on (issue
/// 14.2): `table.whitelist` matches it by a pattern, and its rows from
/// before its capture arrive by an incremental snapshot.
const ADDED: &str = "fault_added";

/// What was committed: per table and key, the data values in commit order
/// (`None` for a delete). A TRUNCATE is no entry: the keys it emptied show
/// as absent to the next change of each, which is then a create.
type Committed = BTreeMap<(&'static str, i64), Vec<Option<String>>>;

/// A writer owning keys `base..base+keys` of `table` (starting from
/// `committed`, what it holds of them already), surviving Postgres
/// restarts: each transaction also writes a token to a ledger, so after a
/// connection error during COMMIT the writer can tell whether it
/// committed. TRUNCATEs empty its keys behind its back: an update or
/// delete that finds no row says the key is gone, and changes nothing.
async fn writer(
    target: sqlx::postgres::PgConnectOptions,
    table: &'static str,
    (base, keys): (i64, i64),
    mut committed: Committed,
    stop_at: Instant,
    seed: u64,
) -> (Committed, u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut present: std::collections::BTreeSet<i64> = committed
        .iter()
        .filter(|(_, v)| v.last().is_some_and(Option::is_some))
        .map(|((_, k), _)| *k)
        .collect();
    let mut rolled_back = 0;
    let mut conn = None;
    let mut round = 0u64;
    let insert = format!("insert into {table} (id, data) values ($1, $2)");
    let delete = format!("delete from {table} where id = $1 and $2::text is not null");
    let update = format!("update {table} set data = $2 where id = $1");
    while Instant::now() < stop_at {
        round += 1;
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match target.connect().await {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let key = base + rng.random_range(0..keys);
        let value = format!("w{table}{base}-r{round}");
        let token = format!("{table}-{base}-{round}");
        let long = rng.random_ratio(1, 15);
        let rollback = rng.random_ratio(1, 6);
        let (sql, after) = if !present.contains(&key) {
            (&insert, Some(value.clone()))
        } else if rng.random_ratio(1, 5) {
            (&delete, None)
        } else {
            (&update, Some(value.clone()))
        };
        // Rows the statement touched, once it ran (known even when the
        // connection breaks during COMMIT).
        let mut touched: Option<u64> = None;
        let attempt = async {
            let mut tx = c.begin().await?;
            let n = sqlx::query(sql)
                .bind(key as i32)
                .bind(&value)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            touched = Some(n);
            sqlx::query("insert into fault_ledger (token) values ($1)")
                .bind(&token)
                .execute(&mut *tx)
                .await?;
            if long {
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
            }
            if rollback {
                tx.rollback().await?;
                Ok::<bool, sqlx::Error>(false)
            } else {
                tx.commit().await?;
                Ok(true)
            }
        };
        let mut broken = false;
        let done = match attempt.await {
            Ok(done) => done,
            Err(_) if touched.is_none() => {
                broken = true;
                false
            }
            Err(_) => {
                // The connection broke; did the commit happen?
                loop {
                    if let Ok(mut c) = target.connect().await {
                        if let Ok(found) = sqlx::query_scalar::<_, bool>(
                            "select exists (select 1 from fault_ledger where token = $1)",
                        )
                        .bind(&token)
                        .fetch_one(&mut c)
                        .await
                        {
                            conn = Some(c);
                            break found;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        match touched {
            // An update or delete of a key a TRUNCATE emptied (committed
            // before this statement ran, whatever became of this
            // transaction).
            Some(0) => {
                assert!(
                    sql != &insert,
                    "an insert of {key} into {table} inserted nothing"
                );
                present.remove(&key);
            }
            Some(_) if done => {
                committed
                    .entry((table, key))
                    .or_default()
                    .push(after.clone());
                if after.is_some() {
                    present.insert(key);
                } else {
                    present.remove(&key);
                }
            }
            _ => {}
        }
        if !done {
            rolled_back += 1;
        }
        if broken {
            // Most likely Postgres restarting: a new connection.
            conn = None;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    (committed, rolled_back)
}

/// Runs `attempt` until it succeeds, through Postgres restarts, saying
/// what failed.
async fn retried<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    loop {
        match attempt().await {
            Ok(v) => return v,
            Err(e) => {
                println!("{what}: {e:#}; trying again");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}

/// The TRUNCATEs of a run (issue 14.1): of the seed's table alone, then
/// `TRUNCATE` of both tables once the added table's snapshot has met a
/// fault of each kind (`faults_met`; so most often while that snapshot
/// still runs), then of the seed's table again. Each comes inside a
/// transaction that inserts a row into each truncated table before it
/// (emptied by it) and one after. Returns those rows, and how many
/// TRUNCATEs of each table committed.
async fn truncator(
    target: sqlx::postgres::PgConnectOptions,
    start: Instant,
    run: Duration,
    mut faults_met: tokio::sync::watch::Receiver<bool>,
    with_added: bool,
) -> (Committed, BTreeMap<&'static str, usize>) {
    let mut committed = Committed::new();
    let mut truncates: BTreeMap<&'static str, usize> = BTreeMap::new();
    for (round, at, tables) in [
        (0i64, 0.3, &[MAIN][..]),
        (1, 0.45, &[MAIN, ADDED][..]),
        (2, 0.85, &[MAIN][..]),
    ] {
        let tables = if with_added { tables } else { &[MAIN][..] };
        let mut when = start + run.mul_f64(at);
        if tables.contains(&ADDED) {
            // At the latest three quarters into the run.
            tokio::select! {
                _ = faults_met.wait_for(|met| *met) => {}
                _ = tokio::time::sleep_until((start + run.mul_f64(0.75)).into()) => {}
            }
            when = when.max(Instant::now());
        }
        tokio::time::sleep_until(when.into()).await;
        // After the column added by the first migration: a row it finds
        // would be NULL there in a restore (the archive has no value for
        // it), and the TRUNCATEs leave none.
        loop {
            let added = async {
                let mut c = target.connect().await?;
                sqlx::query_scalar::<_, bool>(MIGRATIONS[0].1)
                    .fetch_one(&mut c)
                    .await
            };
            if let Ok(true) = added.await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let token = format!("truncate-{round}");
        let keys = |t: &str| (if t == MAIN { 90_000 } else { 50_000 }) + 2 * round;
        let list = tables.join(", ");
        let attempt = || async {
            let mut c = target.connect().await?;
            let mut tx = c.begin().await?;
            if sqlx::query_scalar::<_, bool>(
                "select exists (select 1 from fault_ledger where token = $1)",
            )
            .bind(&token)
            .fetch_one(&mut *tx)
            .await?
            {
                return Ok(()); // committed before the connection broke
            }
            for t in tables {
                sqlx::query(&format!("insert into {t} (id, data) values ($1, $2)"))
                    .bind(keys(t))
                    .bind(format!("emptied by truncate {round}"))
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(&format!("truncate {list}"))
                .execute(&mut *tx)
                .await?;
            for t in tables {
                sqlx::query(&format!("insert into {t} (id, data) values ($1, $2)"))
                    .bind(keys(t) + 1)
                    .bind(format!("after truncate {round}"))
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query("insert into fault_ledger (token) values ($1)")
                .bind(&token)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            anyhow::Ok(())
        };
        retried(&format!("truncate {list}"), attempt).await;
        for &t in tables {
            committed.insert(
                (t, keys(t)),
                vec![Some(format!("emptied by truncate {round}"))],
            );
            committed.insert(
                (t, keys(t) + 1),
                vec![Some(format!("after truncate {round}"))],
            );
            *truncates.entry(t).or_default() += 1;
        }
        println!("truncate done: {list}");
    }
    (committed, truncates)
}

/// Creates [`ADDED`] at `at` with `rows` rows, captures it (schema-init,
/// as a user adding a table would), says when on `captured`, then runs two
/// writers on it until `stop_at`: one over the rows from before the
/// capture (keys 0..rows), one over keys of its own. Returns what they
/// committed, the rows from before the capture included.
#[allow(clippy::too_many_arguments)]
async fn table_adder(
    user: sqlx::postgres::PgConnectOptions,
    init: schema_init::Config,
    at: Instant,
    rows: i64,
    captured: tokio::sync::watch::Sender<Option<Instant>>,
    stop_at: Instant,
    seed: u64,
) -> (Committed, u64) {
    tokio::time::sleep_until(at.into()).await;
    // One transaction: a restart leaves the table whole or absent.
    let create =
        format!("create table if not exists {ADDED} (id int8 primary key, data text not null)");
    let fill = format!(
        "insert into {ADDED} select g, 'before capture ' || g from generate_series(0, $1 - 1) g
           on conflict (id) do nothing"
    );
    loop {
        let attempt = async {
            let mut c = user.connect().await?;
            let mut tx = c.begin().await?;
            sqlx::query(&create).execute(&mut *tx).await?;
            sqlx::query(&fill).bind(rows).execute(&mut *tx).await?;
            tx.commit().await?;
            anyhow::Ok(())
        };
        match attempt.await {
            Ok(()) => break,
            Err(e) => println!("create and fill the added table: {e:#}; trying again"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let cfg = schema_init::Config {
        table: TableName::parse(ADDED).unwrap(),
        sample_row: false,
        seed_objects: false,
        ..init
    };
    while let Err(e) = schema_init::run(&cfg).await {
        println!("schema-init of the added table: {e:#}; trying again");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!(
        "added table {ADDED} captured, {rows} rows, at {} ms since the epoch",
        tidemark_common::health::now_ms()
    );
    captured.send_replace(Some(Instant::now()));
    let before: Committed = (0..rows)
        .map(|g| ((ADDED, g), vec![Some(format!("before capture {g}"))]))
        .collect();
    let a = tokio::spawn(writer(
        user.clone(),
        ADDED,
        (0, rows),
        before,
        stop_at,
        seed,
    ));
    let b = tokio::spawn(writer(
        user,
        ADDED,
        (20_000, 20),
        Committed::new(),
        stop_at,
        seed + 1,
    ));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let mut committed = a.0;
    committed.extend(b.0);
    (committed, a.1 + b.1)
}

/// The migrations the migration writer runs during a fault run (issue 11.5),
/// each with the query that says it is done (a migration interrupted by a
/// Postgres restart is tried again): a column added, one renamed, the key
/// widened, one retyped and one dropped.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "alter table streaming_update_table add column note text not null default 'n'",
        "select exists (select from pg_attribute where attrelid = 'streaming_update_table'::regclass and attname = 'note' and not attisdropped)",
    ),
    (
        "alter table streaming_update_table rename column is_soft_deleted to soft_deleted",
        "select exists (select from pg_attribute where attrelid = 'streaming_update_table'::regclass and attname = 'soft_deleted')",
    ),
    (
        "alter table streaming_update_table alter column id type bigint, alter column data type text",
        "select atttypid = 'int8'::regtype from pg_attribute where attrelid = 'streaming_update_table'::regclass and attname = 'id'",
    ),
    (
        "alter table streaming_update_table drop column create_date",
        "select not exists (select from pg_attribute where attrelid = 'streaming_update_table'::regclass and attname = 'create_date' and not attisdropped)",
    ),
];

/// Runs [`MIGRATIONS`] spread over the run, while the writers write and the
/// services are killed: each is retried until its check says it is done.
/// Returns how many were done.
async fn migration_writer(
    target: sqlx::postgres::PgConnectOptions,
    start: Instant,
    run: Duration,
) -> usize {
    let mut done = 0;
    for (i, (sql, check)) in MIGRATIONS.iter().enumerate() {
        let at = start + run.mul_f64((i + 1) as f64 / (MIGRATIONS.len() + 1) as f64);
        tokio::time::sleep_until(at.into()).await;
        loop {
            let attempt = async {
                let mut c = target.connect().await?;
                if !sqlx::query_scalar::<_, bool>(check)
                    .fetch_one(&mut c)
                    .await?
                {
                    sqlx::query(sql).execute(&mut c).await?;
                }
                sqlx::query_scalar::<_, bool>(check).fetch_one(&mut c).await
            };
            match attempt.await {
                Ok(true) => break,
                Ok(false) => panic!("{sql} ran but its check says it is not done"),
                Err(e) => {
                    println!("migration {sql}: {e}; trying again");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        done += 1;
        println!("migration done: {sql}");
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared Kafka broker and Postgres; run alone (see the module doc)"]
async fn fault_injection_every_committed_change_exactly_once() {
    let _serial = take_services().await;
    fault_injection(Fixture::changelog(TriggerLevel::Row).await).await;
}

/// The same faults with the archive: three file-sink instances in one group
/// share a six-partition topic, writing segments rotated by size and time
/// and compressed with zstd, while any of them (often two in a row, the
/// second during the rebalance the first caused) is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared Kafka broker and Postgres; run alone (see the module doc)"]
async fn fault_injection_archive_three_sinks_every_committed_change_exactly_once() {
    let _serial = take_services().await;
    fault_injection_with(
        Fixture::changelog(TriggerLevel::Row).await,
        Sinks::Archive {
            instances: 3,
            partitions: 6,
        },
    )
    .await;
}

/// The same faults for logical mode: the replication stream is cut by every
/// Postgres restart and resumes from the position Kafka holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared Kafka broker and Postgres; run alone (see the module doc)"]
async fn fault_injection_logical_mode_every_committed_change_exactly_once() {
    let _serial = take_services().await;
    let fx = Fixture::logical().await;
    fault_injection(fx).await;
}

async fn fault_injection(fx: Fixture) {
    fault_injection_with(fx, Sinks::SingleFile).await
}

/// The archive's change events, read back in order after checking every
/// sealed segment against its manifest line.
fn archive_events(fx: &Fixture) -> Vec<tidemark_common::envelope::ChangeEvent> {
    use tidemark_common::archive::{Archive, ReadOptions};
    let root = archive_dir(fx);
    if !root.join(tidemark_common::archive::ARCHIVE_MARKER).exists() {
        return Vec::new();
    }
    let Ok(archive) = Archive::open(&root) else {
        return Vec::new();
    };
    archive
        .records(&ReadOptions::default())
        .filter_map(|r| r.ok())
        .map(|r| {
            tidemark_common::envelope::ChangeEvent::decode(r.line.as_bytes())
                .unwrap_or_else(|e| panic!("line is not a change event ({e}): {}", r.line))
        })
        .collect()
}

/// Every record value of `topic` a `read_committed` reader sees, tombstones
/// left out, up to its end.
fn topic_values(topic: &str) -> Vec<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::Message as _;
    let consumer: BaseConsumer = kafka()
        .client_config(&[
            ("group.id", &unique("check")),
            ("isolation.level", "read_committed"),
            ("enable.auto.commit", "false"),
        ])
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in md.topics()[0].partitions() {
        let (_, high) = consumer
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .unwrap();
        ends.insert(p.id(), high);
        tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut values = Vec::new();
    let mut at: BTreeMap<i32, i64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ends
        .iter()
        .any(|(p, end)| at.get(p).copied().unwrap_or(0) + 1 < *end)
        && Instant::now() < deadline
    {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                at.insert(m.partition(), m.offset());
                if let Some(v) = m.payload() {
                    values.push(String::from_utf8(v.to_vec()).unwrap());
                }
            }
            _ => {
                // A transactional topic ends with a commit marker, which
                // no poll returns: the consumer's position tells it is
                // past the end.
                if let Ok(position) = consumer.position() {
                    for e in position.elements() {
                        if let rdkafka::Offset::Offset(o) = e.offset() {
                            if o >= ends[&e.partition()] {
                                at.insert(e.partition(), o);
                            }
                        }
                    }
                }
            }
        }
    }
    values
}

/// One table's events, in the archive's order (source commit order).
fn events_of<'a>(
    events: &'a [tidemark_common::envelope::ChangeEvent],
    table: &str,
) -> Vec<&'a tidemark_common::envelope::ChangeEvent> {
    events.iter().filter(|e| e.source.table == table).collect()
}

/// An event's key (`id`), from its row.
fn key_of(e: &tidemark_common::envelope::ChangeEvent) -> i64 {
    e.row().unwrap()["id"].as_i64().unwrap()
}

/// A create's, update's or read's `data`.
fn data_of(e: &tidemark_common::envelope::ChangeEvent) -> String {
    e.after.as_ref().unwrap()["data"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Whether `e` is a read of an incremental snapshot (or its TRUNCATE
/// marking an empty table or a table that came back).
fn snapshot_event(e: &tidemark_common::envelope::ChangeEvent) -> bool {
    e.source.snapshot.as_deref().is_some_and(|s| s != "false")
}

/// The table a restore of `events` gives, `id` → `data`, applying each
/// event strictly: a create or snapshot read of a key the restore holds,
/// or an update or delete of one it lacks, is a violation (a change lost,
/// repeated or out of order), listed.
fn replay_strict(
    events: &[&tidemark_common::envelope::ChangeEvent],
) -> (BTreeMap<i64, String>, Vec<String>) {
    let mut rows = BTreeMap::new();
    let mut violations = Vec::new();
    for e in events {
        let at = e
            .transaction
            .as_ref()
            .map(|t| (t.commit_order, t.total_order));
        match e.op {
            Op::Truncate => rows.clear(),
            Op::Create | Op::Read => {
                if let Some(old) = rows.insert(key_of(e), data_of(e)) {
                    violations.push(format!(
                        "{:?} of key {} held as {old:?} at {at:?}",
                        e.op,
                        key_of(e)
                    ));
                }
            }
            Op::Update => {
                if rows.insert(key_of(e), data_of(e)).is_none() {
                    violations.push(format!("update of missing key {} at {at:?}", key_of(e)));
                }
            }
            Op::Delete => {
                if rows.remove(&key_of(e)).is_none() {
                    violations.push(format!("delete of missing key {} at {at:?}", key_of(e)));
                }
            }
        }
    }
    (rows, violations)
}

/// A table's `id` → `data` in Postgres.
async fn table_rows(pool: &sqlx::PgPool, table: &str) -> BTreeMap<i64, String> {
    // Cast: the fault suite's migrations widen `id` and retype `data`.
    let rows: Vec<(i64, String)> =
        sqlx::query_as(&format!("select id::int8, data::text from {table}"))
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    rows.into_iter().collect()
}

/// Whether the added table's incremental snapshot has ended in `events`
/// (its last chunk, or the one of a table found empty).
fn added_snapshot_done(events: &[&tidemark_common::envelope::ChangeEvent]) -> bool {
    events
        .iter()
        .any(|e| matches!(e.source.snapshot_chunk.as_deref(), Some("last" | "only")))
}

/// What the check of one table found.
#[derive(Debug, Default)]
struct Counts {
    lost: usize,
    duplicated: usize,
    out_of_order: usize,
    /// Keys seen that no committed transaction wrote.
    unexpected: usize,
    /// Strict replay's violations.
    violations: Vec<String>,
    /// TRUNCATE events (not a snapshot's).
    truncates: usize,
    /// The first keys whose changes differ, what was committed and what
    /// the archive holds.
    mismatches: Vec<String>,
}

/// Checks one table's events against what was committed to it, counting
/// lost, duplicated and out-of-order changes exactly.
///
/// Streamed changes are told apart by their place in the source (the
/// change-log `seq`, logical mode's WAL position): one event per place and
/// table. With `snapshotted` (the added table), a key's first event may be
/// its incremental snapshot read, which must be a state the key had, and
/// its later events the changes committed after that state, no more and no
/// fewer; a key without a read must show a tail of its committed changes
/// (those made once its range was read). Without it, every committed
/// change must be there, in order.
fn check_table(
    events: &[&tidemark_common::envelope::ChangeEvent],
    committed: &Committed,
    table: &'static str,
    snapshotted: bool,
) -> Counts {
    let mut counts = Counts::default();
    let mut places = std::collections::BTreeSet::new();
    let mut reads: BTreeMap<i64, String> = BTreeMap::new();
    let mut seen: BTreeMap<i64, Vec<Option<String>>> = BTreeMap::new();
    for e in events {
        if e.op == Op::Read || (e.op == Op::Truncate && snapshot_event(e)) {
            if e.op == Op::Read && reads.insert(key_of(e), data_of(e)).is_some() {
                counts.duplicated += 1; // read twice
            }
            continue;
        }
        if !places.insert(e.source.sequence.clone().unwrap_or_default()) {
            counts.duplicated += 1;
            continue;
        }
        match e.op {
            Op::Truncate => counts.truncates += 1,
            Op::Delete => seen.entry(key_of(e)).or_default().push(None),
            _ => seen.entry(key_of(e)).or_default().push(Some(data_of(e))),
        }
    }
    if !snapshotted && !reads.is_empty() {
        counts
            .violations
            .push(format!("{} snapshot reads of {table}", reads.len()));
    }
    let empty = Vec::new();
    for ((t, key), want) in committed.range((table, i64::MIN)..=(table, i64::MAX)) {
        debug_assert_eq!(*t, table);
        let got = seen.get(key).unwrap_or(&empty);
        // The committed changes the archive must hold of this key.
        let from = if !snapshotted {
            0
        } else if let Some(read) = reads.get(key) {
            match want
                .iter()
                .rposition(|v| v.as_deref() == Some(read.as_str()))
            {
                Some(i) => i + 1,
                None => {
                    counts
                        .violations
                        .push(format!("key {key} read as {read:?}, a value it never had"));
                    want.len()
                }
            }
        } else if want.ends_with(got) {
            want.len() - got.len()
        } else {
            want.len().saturating_sub(got.len())
        };
        let all = want;
        let want = &want[from..];
        if got != want {
            if counts.mismatches.len() < 10 {
                counts.mismatches.push(format!(
                    "key {key}: read {:?}, committed {all:?}, archived after the read {got:?}",
                    reads.get(key)
                ));
            }
            let missing = want.iter().filter(|v| !got.contains(v)).count();
            counts.lost += missing;
            if missing == 0 {
                counts.out_of_order += 1;
            }
        }
    }
    counts.unexpected = seen
        .keys()
        .chain(reads.keys())
        .filter(|k| !committed.contains_key(&(table, **k)))
        .count();
    counts
}

/// With `TIDEMARK_FAULT_KEEP_LOGS=<folder>`, the programs' logs of a fault
/// run are copied there when the test ends, passed or failed (the fixture's
/// folder is deleted).
struct KeepLogs(PathBuf);

impl Drop for KeepLogs {
    fn drop(&mut self) {
        let Some(to) = std::env::var_os("TIDEMARK_FAULT_KEEP_LOGS") else {
            return;
        };
        let to = PathBuf::from(to);
        let _ = std::fs::create_dir_all(&to);
        for entry in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let _ = std::fs::copy(&path, to.join(entry.file_name()));
            }
        }
        println!("logs kept in {}", to.display());
    }
}

async fn fault_injection_with(fx: Fixture, sinks_setup: Sinks) {
    let _keep = KeepLogs(fx.dir.path().to_path_buf());
    let seconds = env_num("TIDEMARK_FAULT_SECONDS", 30);
    let writers = env_num("TIDEMARK_FAULT_WRITERS", 4);
    let added_rows = env_num("TIDEMARK_FAULT_ADDED_ROWS", 10_000) as i64;
    // The added table (and with it `TRUNCATE` of both tables) in every
    // mode; TIDEMARK_FAULT_LOGICAL_ADDED=0 leaves it out of the logical
    // run. That run had it off by default for a while: see
    // docs/development.md for its failures, their fixes and the runs that
    // brought it back (30 of 30 passed on 2026-12-03).
    let with_added = !fx.logical || env_num("TIDEMARK_FAULT_LOGICAL_ADDED", 1) == 1;
    let seed = env_num("TIDEMARK_FAULT_SEED", rand::rng().random());
    println!(
        "fault injection ({} mode): {seconds} s, {writers} writers, seed {seed}",
        if fx.logical { "logical" } else { "changelog" }
    );

    sqlx::query("delete from streaming_update_table")
        .execute(&fx.pool)
        .await
        .unwrap();
    sqlx::query("create table fault_ledger (token text primary key)")
        .execute(&fx.pool)
        .await
        .unwrap();

    let dir = fx.dir.path();
    let (mut source, mut sinks) = start_programs_with(&fx, sinks_setup);
    let read_all = |fx: &Fixture| match sinks_setup {
        Sinks::SingleFile => read_events(&fx.file()),
        Sinks::Archive { .. } => archive_events(fx),
    };
    // Let the source take its starting snapshot before writers begin.
    let started = Instant::now();
    while !std::fs::read_to_string(dir.join("pg-source.log"))
        .unwrap_or_default()
        .contains("pg-source started")
    {
        source.assert_running();
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "pg-source did not start within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let run_started = Instant::now();
    let run = Duration::from_secs(seconds);
    let stop_at = run_started + run;
    let migrations = tokio::spawn(migration_writer(fx.user_options(), run_started, run));
    let (captured_tx, mut captured) = tokio::sync::watch::channel(None);
    let (faults_met_tx, faults_met) = tokio::sync::watch::channel(false);
    let adder = with_added.then(|| {
        tokio::spawn(table_adder(
            fx.user_options(),
            fx.init.clone(),
            run_started + run.mul_f64(0.15),
            added_rows,
            captured_tx,
            stop_at,
            seed ^ 0xadd,
        ))
    });
    if !with_added {
        println!("without the added table (TIDEMARK_FAULT_LOGICAL_ADDED=0)");
    }
    let truncates = tokio::spawn(truncator(
        fx.user_options(),
        run_started,
        run,
        faults_met,
        with_added,
    ));
    let mut tasks = Vec::new();
    for w in 0..writers {
        tasks.push(tokio::spawn(writer(
            fx.user_options(),
            MAIN,
            (10_000 * (w as i64 + 1), 20),
            Committed::new(),
            stop_at,
            seed + w,
        )));
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut kills: BTreeMap<&str, u32> = BTreeMap::new();
    // When each fault struck (ms since the epoch), to tell which came
    // during the added table's incremental snapshot.
    let mut struck: Vec<(i64, &str)> = Vec::new();
    // Once the added table's incremental snapshot starts, the next faults
    // are one of each kind (in random order) in quick succession, so the
    // snapshot meets them all.
    let mut forced: Option<Vec<usize>> = None;
    let n = sinks.len();
    while Instant::now() + Duration::from_secs(2) < stop_at {
        let pause = if forced.as_ref().is_some_and(|f| !f.is_empty()) {
            rng.random_range(200..700)
        } else {
            rng.random_range(500..3000)
        };
        let until = Instant::now() + Duration::from_millis(pause);
        while Instant::now() < until {
            if forced.is_none()
                && captured.borrow_and_update().is_some()
                && std::fs::read_to_string(dir.join("pg-source.log"))
                    .unwrap_or_default()
                    .contains("incremental snapshot started")
            {
                let mut kinds = vec![0, 1, 2, 3 + rng.random_range(0..n)];
                use rand::seq::SliceRandom as _;
                kinds.shuffle(&mut rng);
                forced = Some(kinds);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A broker restart takes 20-30 s here, and holds pg-source (and
        // so the added table's discovery and snapshot) that long: until
        // the forced faults are done (or most of the run has passed), it
        // is only one of them.
        let kafka_now = !with_added
            || *faults_met_tx.borrow()
            || Instant::now() > run_started + run.mul_f64(0.6);
        let pick = forced.as_mut().and_then(Vec::pop).unwrap_or_else(|| loop {
            let pick = rng.random_range(0..3 + n);
            if pick != 1 || kafka_now {
                break pick;
            }
        });
        let last_forced = forced.as_ref().is_some_and(Vec::is_empty) && !*faults_met_tx.borrow();
        let victim = match pick {
            0 => "pg-source",
            1 => "kafka",
            2 => "postgres",
            i => sinks[i - 3].name,
        };
        struck.push((tidemark_common::health::now_ms(), victim));
        match pick {
            0 => source.kill_and_restart(),
            1 => tokio::task::spawn_blocking(|| services("restart-kafka"))
                .await
                .unwrap(),
            2 => tokio::task::spawn_blocking(|| services("restart-postgres"))
                .await
                .unwrap(),
            i => {
                sinks[i - 3].kill_and_restart();
                // With several instances, often kill another while the
                // group rebalances after the first one's restart.
                if n > 1 && rng.random_ratio(1, 2) {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(100..1500))).await;
                    let j = (i - 3 + rng.random_range(1..n)) % n;
                    sinks[j].kill_and_restart();
                    *kills.entry("sink during a rebalance").or_default() += 1;
                }
            }
        }
        *kills.entry(victim).or_default() += 1;
        if last_forced {
            faults_met_tx.send_replace(true);
        }
    }

    let mut committed = Committed::new();
    let mut rolled_back = 0;
    for t in tasks {
        let (c, r) = t.await.unwrap();
        committed.extend(c);
        rolled_back += r;
    }
    if let Some(adder) = adder {
        let (c, r) = adder.await.unwrap();
        committed.extend(c);
        rolled_back += r;
    }
    let (c, truncated) = truncates.await.unwrap();
    committed.extend(c);
    assert_eq!(
        migrations.await.unwrap(),
        MIGRATIONS.len(),
        "every migration ran"
    );
    // One change after the last migration (which, retried across restarts,
    // may end after the writers stop): it must carry the final shape.
    let final_key = 1i64;
    retried("the write after the migrations", || async {
        let mut c = fx.user_options().connect().await?;
        sqlx::query(
            "insert into streaming_update_table (id, data) values ($1, 'after the migrations')",
        )
        .bind(final_key)
        .execute(&mut c)
        .await?;
        anyhow::Ok(())
    })
    .await;
    committed
        .entry((MAIN, final_key))
        .or_default()
        .push(Some("after the migrations".to_owned()));
    let main_changes: usize = committed
        .range((MAIN, i64::MIN)..=(MAIN, i64::MAX))
        .map(|(_, v)| v.len())
        .sum();
    let changes: usize = committed.values().map(Vec::len).sum();

    // Wait for the stream to catch up: both tables restore to what
    // Postgres holds, the added table's snapshot has ended, and the seed
    // table's changes are all there.
    let deadline =
        Instant::now() + Duration::from_secs(env_num("TIDEMARK_FAULT_CATCH_UP_SECONDS", 180));
    let events = loop {
        source.assert_running();
        for sink in &mut sinks {
            sink.assert_running();
        }
        let events = read_all(&fx);
        let main = events_of(&events, MAIN);
        let added = events_of(&events, ADDED);
        if replay_strict(&main).0 == table_rows(&fx.pool, MAIN).await
            && (!with_added || added_snapshot_done(&added))
            && replay_strict(&added).0 == table_rows(&fx.pool, ADDED).await
            && main.len() >= main_changes
        {
            tokio::time::sleep(Duration::from_secs(2)).await;
            break read_all(&fx);
        }
        if Instant::now() >= deadline {
            for (table, evs) in [(MAIN, &main), (ADDED, &added)] {
                let (got, violations) = replay_strict(evs);
                let want = table_rows(&fx.pool, table).await;
                let differ: Vec<String> = want
                    .keys()
                    .chain(got.keys())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .filter(|k| want.get(k) != got.get(k))
                    .take(10)
                    .map(|k| {
                        let history: Vec<String> = evs
                            .iter()
                            .filter(|e| e.op == Op::Truncate || key_of(e) == *k)
                            .map(|e| {
                                format!(
                                    "{:?}{}@{:?}",
                                    e.op,
                                    e.after.as_ref().map_or(String::new(), |a| format!("={}", a["data"])),
                                    e.transaction.as_ref().map(|t| t.commit_order)
                                )
                            })
                            .collect();
                        format!(
                            "key {k}: table {:?}, restored {:?}, committed {:?}, events {history:?}",
                            want.get(k),
                            got.get(k),
                            committed.get(&(table, *k))
                        )
                    })
                    .collect();
                println!(
                    "{table}: violations {violations:?}; keys that differ:\n{}",
                    differ.join("\n")
                );
            }
        }
        assert!(
            Instant::now() < deadline,
            "the file did not catch up within 180 s ({} events of the seed table, {main_changes} changes; {} of the added table, snapshot done: {});\n{}\n{}",
            main.len(),
            added.len(),
            added_snapshot_done(&added),
            log_tail(&dir.join("pg-source.log"), 40),
            log_tail(&dir.join("file-sink.log"), 40)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    source.stop();
    for sink in sinks {
        sink.stop();
    }
    if let Sinks::Archive { .. } = sinks_setup {
        // The manifest agrees with the segments, and the segments hold
        // exactly the topics' records.
        use tidemark_common::archive::{Archive, ReadOptions};
        let archive = Archive::open(&archive_dir(&fx)).unwrap();
        let Archive::Segmented { partitions, .. } = &archive else {
            unreachable!()
        };
        let mut sealed = 0;
        for p in partitions {
            p.verify()
                .unwrap_or_else(|e| panic!("the manifest disagrees with the segments: {e}"));
            sealed += p.segments.len();
        }
        let mut lines: Vec<String> = archive
            .records(&ReadOptions::default())
            .map(|r| r.unwrap().line)
            .collect();
        let topics = [fx.topic(), added_topic(&fx)];
        let mut values = tokio::task::spawn_blocking(move || {
            topics
                .iter()
                .flat_map(|t| topic_values(t))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        lines.sort();
        values.sort();
        println!(
            "archive: {} partitions, {sealed} sealed segments, {} records; topics: {} records",
            partitions.len(),
            lines.len(),
            values.len()
        );
        assert!(sealed > 0, "nothing was sealed");
        assert!(
            lines == values,
            "the union of the segments is not the topics, exactly once"
        );
    }

    let main = events_of(&events, MAIN);
    let added = events_of(&events, ADDED);
    let mut counts = BTreeMap::new();
    for (table, evs, snapshotted) in [(MAIN, &main, false), (ADDED, &added, true)] {
        let mut c = check_table(evs, &committed, table, snapshotted);
        let (restored, violations) = replay_strict(evs);
        c.violations.extend(violations);
        assert_eq!(
            restored,
            table_rows(&fx.pool, table).await,
            "{table}: the events restore to the table"
        );
        counts.insert(table, c);
    }
    let kills_total: u32 = kills.values().sum();
    // The added table's snapshot: from its first read to its end, as
    // pg-source read them; the faults and TRUNCATEs within.
    let reads: Vec<&&tidemark_common::envelope::ChangeEvent> =
        added.iter().filter(|e| snapshot_event(e)).collect();
    let window = (
        reads.iter().filter_map(|e| e.ts_ms).min().unwrap_or(0),
        reads.iter().filter_map(|e| e.ts_ms).max().unwrap_or(0),
    );
    let during: Vec<&str> = struck
        .iter()
        .filter(|(at, _)| (window.0..=window.1).contains(at))
        .map(|(_, v)| *v)
        .collect();
    let first_chunk = reads
        .iter()
        .filter_map(|e| e.transaction.as_ref().map(|t| t.commit_order))
        .min();
    let last_chunk = reads
        .iter()
        .filter_map(|e| e.transaction.as_ref().map(|t| t.commit_order))
        .max();
    let truncate_during = added.iter().any(|e| {
        e.op == Op::Truncate
            && !snapshot_event(e)
            && e.transaction.as_ref().is_some_and(|t| {
                first_chunk.is_some_and(|f| t.commit_order > f)
                    && last_chunk.is_some_and(|l| t.commit_order < l)
            })
    });
    println!(
        "changes: {changes}, rolled back: {rolled_back}, kills: {kills_total} {kills:?}, truncates committed: {truncated:?}"
    );
    for (table, c) in &counts {
        println!(
            "{table}: {} events, lost: {}, duplicated: {}, out of order keys: {}, rolled-back keys seen: {}, strict-replay violations: {}, truncate events: {}",
            if *table == MAIN { main.len() } else { added.len() },
            c.lost,
            c.duplicated,
            c.out_of_order,
            c.unexpected,
            c.violations.len(),
            c.truncates
        );
    }
    println!(
        "{ADDED}: {} snapshot reads over {} ms, faults during it: {during:?}, a TRUNCATE during it: {truncate_during}",
        reads.len(),
        window.1 - window.0
    );
    println!(
        "faults (ms since the epoch): {struck:?}; pg-source on the added table:\n{}",
        std::fs::read_to_string(dir.join("pg-source.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("incremental snapshot")
                || l.contains("entered the set")
                || l.contains("pg-source started"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for (table, c) in &counts {
        for m in &c.mismatches {
            println!("{table}: {m}");
        }
    }
    for (table, c) in &counts {
        assert!(
            c.violations.is_empty(),
            "{table}: {:?}",
            &c.violations[..c.violations.len().min(10)]
        );
        assert_eq!(c.lost, 0, "{table}: lost changes");
        assert_eq!(c.duplicated, 0, "{table}: duplicated changes");
        assert_eq!(
            c.out_of_order, 0,
            "{table}: keys whose changes arrived out of commit order"
        );
        assert_eq!(
            c.unexpected, 0,
            "{table}: changes from rolled-back transactions"
        );
    }
    // Every TRUNCATE of the seed table is there once (the added table's
    // before its first chunk have nothing to empty and are not sent).
    assert_eq!(
        counts[MAIN].truncates, truncated[MAIN],
        "TRUNCATEs of {MAIN}"
    );
    assert!(
        counts[ADDED].truncates <= truncated.get(ADDED).copied().unwrap_or(0),
        "TRUNCATEs of {ADDED}"
    );
    // The migrations show in the events: the added column's value from the
    // first change after it, the renamed column under one name at a time,
    // and the last change in the final shape.
    let rows: Vec<&serde_json::Value> = main.iter().filter_map(|e| e.after.as_ref()).collect();
    for row in &rows {
        if let Some(note) = row.get("note") {
            assert_eq!(note, "n", "the added column's value: {row}");
        }
        assert!(
            !(row.get("soft_deleted").is_some() && row.get("is_soft_deleted").is_some()),
            "a renamed column under both names: {row}"
        );
    }
    let last = rows
        .iter()
        .rev()
        .find(|r| r["id"] == final_key)
        .expect("the change after the migrations");
    assert!(
        last.get("note").is_some()
            && last.get("soft_deleted").is_some()
            && last.get("is_soft_deleted").is_none()
            && last.get("create_date").is_none(),
        "the last change has the final shape: {last}"
    );
    assert!(kills_total > 0, "the run was too short to kill anything");

    // The restore: pg-replay of the archive into a new database (its
    // tables made from the archive, the migrations applied as they come),
    // compared with the source table by table.
    let db = crate::replay::Db::new().await;
    let mut cfg = match sinks_setup {
        // The single file holds both topics in the order file-sink read
        // them, so a unit of both tables (a TRUNCATE of both, say) can be
        // cut by a migration's unit, which pg-replay refuses ("not
        // complete in the archive"): the topics it was written from are
        // restored instead, each partition its own stream, as the
        // segmented archive's.
        Sinks::SingleFile => {
            let mut cfg = crate::replay::config::<&Path>(&db, &[]);
            cfg.topics = vec![fx.topic()];
            if with_added {
                cfg.topics.push(added_topic(&fx));
            }
            cfg.kafka = kafka();
            cfg
        }
        Sinks::Archive { .. } => crate::replay::config(&db, &[archive_dir(&fx)]),
    };
    cfg.schema_changes = pg_replay::apply::SchemaChanges::Apply;
    // In both modes the migrations fall between units (a changelog batch
    // ends at each schema change), so every table is restored; but from a
    // changelog segmented archive, where a unit is spread over several
    // streams, two tables' schema changes can wait at once for a unit
    // before them, which pg-replay refuses (it lets one wait; see
    // replay::a_second_schema_change_waiting_beside_another_is_refused_not_lost):
    // there only the added table is restored, and the seed table's
    // restore is checked by the strict replay above.
    let archive = matches!(sinks_setup, Sinks::Archive { .. });
    let restored: &[&str] = match (with_added, !fx.logical && archive) {
        (true, true) => &[ADDED],
        (true, false) => &[MAIN, ADDED],
        (false, _) => &[MAIN],
    };
    let pairs: Vec<(TableName, TableName)> = restored
        .iter()
        .map(|t| (TableName::parse(t).unwrap(), TableName::parse(t).unwrap()))
        .collect();
    if !fx.logical {
        cfg.tables = pairs.clone();
        cfg.ignore_unmapped = true;
    }
    let summary = crate::replay::replay(cfg)
        .await
        .unwrap_or_else(|e| panic!("pg-replay of the archive: {e:#}"));
    let verify = pg_replay::verify::VerifyConfig {
        source: fx.target.clone(),
        target: db.target.clone(),
        tables: pairs,
        chunk_rows: 500,
        leaf_rows: 20,
        max_diffs: 10,
    };
    let report = pg_replay::verify::verify(&verify).await.unwrap();
    println!(
        "pg-replay of {restored:?}: {} units, {} changes; verify: {} rows compared, equal: {}",
        summary.units,
        summary.changes,
        report.rows,
        report.equal()
    );
    assert!(
        report.equal(),
        "the restore differs from the source: {report:?}"
    );
    fx.drop_slot().await;
}

/// Both programs started while the broker is down wait for it (pg-source
/// logging that it waits), then stream with nothing lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the shared Kafka broker; run alone (see the module doc)"]
async fn fault_programs_started_without_a_broker_wait_for_it() {
    let _serial = take_services().await;
    let fx = Fixture::changelog(TriggerLevel::Row).await;
    let before = sqlx::query_scalar::<_, i64>("select count(*) from streaming_update_table")
        .fetch_one(&fx.pool)
        .await
        .unwrap();

    tokio::task::spawn_blocking(|| services("stop-kafka"))
        .await
        .unwrap();
    let (mut source, mut sink) = start_programs(&fx);
    // Long enough for every start-up step to have met the missing broker.
    tokio::time::sleep(Duration::from_secs(8)).await;
    source.assert_running();
    sink.assert_running();
    sqlx::query("insert into streaming_update_table (data) values ('after the outage')")
        .execute(&fx.pool)
        .await
        .unwrap();
    tokio::task::spawn_blocking(|| services("start-kafka"))
        .await
        .unwrap();

    let want = before as usize + 1;
    wait_for_events(&fx.file(), want, Duration::from_secs(120)).await;
    // Anything sent twice would show up by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = read_events(&fx.file());
    source.assert_running();
    sink.assert_running();
    assert_eq!(
        events.len(),
        want,
        "every row once: the snapshot, then the insert"
    );
    // The row written during the outage is there, as a snapshot read or as
    // a change, depending on how far pg-source got before the broker left.
    assert_eq!(replay(&events), table_state(&fx.pool).await);
    assert!(events
        .iter()
        .any(|e| e.after.as_ref().and_then(|a| a["data"].as_str()) == Some("after the outage")));
    let log = std::fs::read_to_string(fx.dir.path().join("pg-source.log")).unwrap();
    assert!(
        log.contains("waiting for Kafka"),
        "pg-source did not say it was waiting for the broker:\n{log}"
    );
    assert!(
        log.contains("pg-source started"),
        "pg-source never started:\n{log}"
    );
    println!(
        "pg-source while the broker was down:\n{}",
        log.lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(8)
            .collect::<Vec<_>>()
            .join("\n")
    );
    source.stop();
    sink.stop();
}

/// SIGTERM with the broker down: both programs stop within `Proc::stop`'s
/// 15 s (librdkafka alone would hold them 30-45 s), and the batch pg-source
/// had in flight arrives once after both start again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the shared Kafka broker; run alone (see the module doc)"]
async fn fault_sigterm_with_the_broker_down_stops_promptly_and_loses_nothing() {
    let _serial = take_services().await;
    let fx = Fixture::changelog(TriggerLevel::Row).await;
    let (source, sink) = start_programs(&fx);
    let rows = sqlx::query_scalar::<_, i64>("select count(*) from streaming_update_table")
        .fetch_one(&fx.pool)
        .await
        .unwrap() as usize;
    wait_for_events(&fx.file(), rows, Duration::from_secs(60)).await;

    tokio::task::spawn_blocking(|| services("stop-kafka"))
        .await
        .unwrap();
    sqlx::query("update streaming_update_table set data = 'during the outage'")
        .execute(&fx.pool)
        .await
        .unwrap();
    // Long enough for pg-source to have read the update and be waiting on
    // Kafka for it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::spawn_blocking(move || {
        source.stop();
        sink.stop();
    })
    .await
    .unwrap();
    let log = std::fs::read_to_string(fx.dir.path().join("pg-source.log")).unwrap();
    assert!(
        log.contains("the batch in flight was not committed"),
        "pg-source should have stopped mid-batch:\n{log}"
    );

    tokio::task::spawn_blocking(|| services("start-kafka"))
        .await
        .unwrap();
    let (source, sink) = start_programs(&fx);
    wait_for_events(&fx.file(), rows * 2, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = read_events(&fx.file());
    assert_eq!(
        events.len(),
        rows * 2,
        "each row's snapshot read, then its update, once"
    );
    assert_eq!(replay(&events), table_state(&fx.pool).await);
    source.stop();
    sink.stop();
}

/// The last `n` lines of a program's log, headed by its name, for a failure
/// message: a stall in CI is diagnosed from what the programs said.
fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "---- last lines of {} ----\n{}",
        log.display(),
        lines[lines.len().saturating_sub(n)..].join("\n")
    )
}
