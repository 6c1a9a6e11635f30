//! The fault-injection suite: concurrent writers (long transactions,
//! rollbacks, deletes) while pg-source, file-sink, the Kafka broker and
//! Postgres are killed and restarted at random instants; then every
//! committed change must be in the file exactly once, in commit order per
//! key, and nothing from a rolled-back transaction.
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
    config.insert("table.whitelist".into(), "streaming_update_table".into());
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
    let sink_json = match sinks {
        Sinks::SingleFile => {
            serde_json::json!({"name": sink.name, "config": {"topics": fx.topic(), "file": fx.file()}})
        }
        Sinks::Archive { .. } => serde_json::json!({"name": sink.name, "config": {
            "topics": fx.topic(),
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

/// What the writers committed: per key, the data values in commit order
/// (`None` for a delete).
type Committed = BTreeMap<i64, Vec<Option<String>>>;

/// A writer owning keys `base..base+keys`, surviving Postgres restarts: each
/// transaction also writes a token to a ledger, so after a connection error
/// during COMMIT the writer can tell whether it committed.
async fn writer(
    target: sqlx::postgres::PgConnectOptions,
    base: i64,
    keys: i64,
    stop_at: Instant,
    seed: u64,
) -> (Committed, u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut committed: Committed = BTreeMap::new();
    let mut rolled_back = 0;
    let mut conn = None;
    let mut round = 0u64;
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
        let value = format!("w{base}-r{round}");
        let token = format!("{base}-{round}");
        let exists = committed
            .get(&key)
            .and_then(|v| v.last().cloned())
            .flatten()
            .is_some();
        let long = rng.random_ratio(1, 15);
        let rollback = rng.random_ratio(1, 6);
        let op = if !exists {
            (
                "insert into streaming_update_table (id, data) values ($1, $2)",
                Some(value.clone()),
            )
        } else if rng.random_ratio(1, 5) {
            (
                "delete from streaming_update_table where id = $1 and $2::text is not null",
                None,
            )
        } else {
            (
                "update streaming_update_table set data = $2 where id = $1",
                Some(value.clone()),
            )
        };
        let attempt = async {
            let mut tx = c.begin().await?;
            sqlx::query(op.0)
                .bind(key as i32)
                .bind(&value)
                .execute(&mut *tx)
                .await?;
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
        match attempt.await {
            Ok(true) => committed.entry(key).or_default().push(op.1),
            Ok(false) => rolled_back += 1,
            Err(_) => {
                // The connection broke; did the commit happen?
                let known = loop {
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
                };
                if known {
                    committed.entry(key).or_default().push(op.1);
                } else {
                    rolled_back += 1;
                }
            }
        }
    }
    (committed, rolled_back)
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
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            at.insert(m.partition(), m.offset());
            if let Some(v) = m.payload() {
                values.push(String::from_utf8(v.to_vec()).unwrap());
            }
        }
    }
    values
}

async fn fault_injection_with(fx: Fixture, sinks_setup: Sinks) {
    let seconds = env_num("TIDEMARK_FAULT_SECONDS", 30);
    let writers = env_num("TIDEMARK_FAULT_WRITERS", 4);
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
    let stop_at = run_started + Duration::from_secs(seconds);
    let migrations = tokio::spawn(migration_writer(
        fx.user_options(),
        run_started,
        Duration::from_secs(seconds),
    ));
    let mut tasks = Vec::new();
    for w in 0..writers {
        tasks.push(tokio::spawn(writer(
            fx.user_options(),
            10_000 * (w as i64 + 1),
            20,
            stop_at,
            seed + w,
        )));
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut kills: BTreeMap<&str, u32> = BTreeMap::new();
    while Instant::now() + Duration::from_secs(2) < stop_at {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..3000))).await;
        let n = sinks.len();
        let pick = rng.random_range(0..3 + n);
        let victim = match pick {
            0 => "pg-source",
            1 => "kafka",
            2 => "postgres",
            i => sinks[i - 3].name,
        };
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
    }

    let mut committed: Committed = BTreeMap::new();
    let mut rolled_back = 0;
    for t in tasks {
        let (c, r) = t.await.unwrap();
        committed.extend(c);
        rolled_back += r;
    }
    assert_eq!(
        migrations.await.unwrap(),
        MIGRATIONS.len(),
        "every migration ran"
    );
    // One change after the last migration (which, retried across restarts,
    // may end after the writers stop): it must carry the final shape.
    let final_key = 1i64;
    loop {
        let write = async {
            let mut c = fx.user_options().connect().await?;
            sqlx::query(
                "insert into streaming_update_table (id, data) values ($1, 'after the migrations')",
            )
            .bind(final_key)
            .execute(&mut c)
            .await
        };
        match write.await {
            Ok(_) => break,
            Err(e) => {
                println!("the write after the migrations: {e}; trying again");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    committed
        .entry(final_key)
        .or_default()
        .push(Some("after the migrations".to_owned()));
    let changes: usize = committed.values().map(Vec::len).sum();

    // Wait for the stream to catch up.
    let deadline = Instant::now() + Duration::from_secs(180);
    let events = loop {
        source.assert_running();
        for sink in &mut sinks {
            sink.assert_running();
        }
        let events = read_all(&fx);
        if replay(&events) == table_state(&fx.pool).await && events.len() >= changes {
            tokio::time::sleep(Duration::from_secs(2)).await;
            break read_all(&fx);
        }
        assert!(
            Instant::now() < deadline,
            "the file did not catch up within 180 s ({} events of {changes});\n{}\n{}",
            events.len(),
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
        // exactly the topic's records.
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
        let topic = fx.topic();
        let mut values = tokio::task::spawn_blocking(move || topic_values(&topic))
            .await
            .unwrap();
        lines.sort();
        values.sort();
        println!(
            "archive: {} partitions, {sealed} sealed segments, {} records; topic: {} records",
            partitions.len(),
            lines.len(),
            values.len()
        );
        assert!(sealed > 0, "nothing was sealed");
        assert!(
            lines == values,
            "the union of the segments is not the topic, exactly once"
        );
    }

    // Duplicates: one change-log sequence number (logical mode: one WAL
    // position) per change.
    let mut by_seq: BTreeMap<String, u32> = BTreeMap::new();
    for e in &events {
        *by_seq
            .entry(e.source.sequence.clone().unwrap_or_default())
            .or_default() += 1;
    }
    let duplicated: u32 = by_seq.values().map(|n| n - 1).sum();
    let mut seen: Committed = BTreeMap::new();
    let mut last_seq: BTreeMap<String, ()> = BTreeMap::new();
    for e in &events {
        let seq = e.source.sequence.clone().unwrap_or_default();
        if last_seq.insert(seq, ()).is_some() {
            continue;
        }
        let id = e.row().unwrap()["id"].as_i64().unwrap();
        let data = match e.op {
            Op::Delete => None,
            _ => Some(
                e.after.as_ref().unwrap()["data"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            ),
        };
        seen.entry(id).or_default().push(data);
    }
    let mut lost = 0;
    let mut out_of_order = 0;
    for (key, want) in &committed {
        let got = seen.get(key).cloned().unwrap_or_default();
        if got != *want {
            let missing = want.iter().filter(|v| !got.contains(v)).count();
            lost += missing;
            if missing == 0 {
                out_of_order += 1;
            }
        }
    }
    let unexpected: usize = seen.keys().filter(|k| !committed.contains_key(k)).count();
    let kills_total: u32 = kills.values().sum();
    println!(
        "changes: {changes}, rolled back: {rolled_back}, kills: {kills_total} {kills:?}, lost: {lost}, duplicated: {duplicated}, out of order keys: {out_of_order}, rolled-back keys seen: {unexpected}"
    );
    assert_eq!(lost, 0, "lost changes");
    assert_eq!(duplicated, 0, "duplicated changes");
    assert_eq!(
        out_of_order, 0,
        "keys whose changes arrived out of commit order"
    );
    assert_eq!(unexpected, 0, "changes from rolled-back transactions");
    assert_eq!(seen, committed);
    // The migrations show in the events: the added column's value from the
    // first change after it, the renamed column under one name at a time,
    // and the last change in the final shape.
    let rows: Vec<&serde_json::Value> = events.iter().filter_map(|e| e.after.as_ref()).collect();
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
