//! pg-replay against a real Postgres, on archives written here line by line
//! in pg-source's envelope (v2, with the `transaction` block), so each test
//! can hold exactly the units, gaps and bad lines it is about. The
//! end-to-end tests over the real pipeline are in `replay_pipeline.rs`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use tidemark_common::pg::{PgTarget, TableName};
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// A database of its own for one test, dropped at the end.
pub struct Db {
    pub name: String,
    pub target: PgTarget,
    pub pool: PgPool,
}

impl Db {
    pub async fn new() -> Self {
        tidemark_common::telemetry::init_for_tests();
        let admin = PgTarget::from_url("DATABASE_URL", &database_url()).unwrap();
        let pool = admin.connect(1, Duration::from_secs(10)).await.unwrap();
        let name = unique("rp_");
        sqlx::query(&format!("create database {name}"))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        let target = admin.with_database(&name);
        // The test acts as the user: an ordinary connection.
        let pool = user_pool(&name, 4).await;
        Self { name, target, pool }
    }

    /// Runs statements (several, separated by `;`) as the user.
    pub async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sql)
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// `select` rows as text, one string per row (`record_out`), ordered.
    pub async fn rows(&self, sql: &str) -> Vec<String> {
        sqlx::query_scalar(&format!("select x::text from ({sql}) x order by 1"))
            .fetch_all(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub fn url(&self) -> String {
        let mut u = url::Url::parse(&database_url()).unwrap();
        u.set_path(&format!("/{}", self.name));
        u.to_string()
    }
}

/// An archive written line by line, as file-sink writes it.
#[derive(Default)]
pub struct Archive {
    lines: Vec<String>,
}

/// One change: op, table, before, after.
pub type Change<'a> = (&'a str, &'a str, Value, Value);

impl Archive {
    /// Adds a unit: its changes in order, commit order `co`, committed at
    /// `ts` seconds after 2024-01-01, transaction `txid`.
    pub fn unit(&mut self, co: i64, txid: i64, ts: i64, changes: &[Change<'_>]) -> &mut Self {
        let n = changes.len() as i64;
        for (i, (op, table, before, after)) in changes.iter().enumerate() {
            let ord = i as i64 + 1;
            self.lines.push(event(
                op,
                table,
                before.clone(),
                after.clone(),
                co,
                ord,
                (ord == n).then_some(n),
                txid,
                ts,
            ));
        }
        self
    }

    pub fn raw(&mut self, line: &str) -> &mut Self {
        self.lines.push(line.to_owned());
        self
    }

    pub fn write(&self, path: &Path) {
        let mut text = self.lines.join("\n");
        text.push('\n');
        std::fs::write(path, text).unwrap();
    }
}

/// 2024-01-01T00:00:00Z in µs.
pub const T0_US: i64 = 1_704_067_200_000_000;

#[allow(clippy::too_many_arguments)]
pub fn event(
    op: &str,
    table: &str,
    before: Value,
    after: Value,
    co: i64,
    ord: i64,
    count: Option<i64>,
    txid: i64,
    ts: i64,
) -> String {
    let (schema, name) = table.split_once('.').unwrap_or(("public", table));
    let us = T0_US + ts * 1_000_000;
    json!({
        "before": before, "after": after,
        "source": {"version": "tidemark-0.2.0", "connector": "tidemark", "name": "src",
                   "ts_ms": us / 1000, "ts_us": us, "ts_ns": us * 1000,
                   "snapshot": "false", "db": "db", "sequence": null, "schema": schema,
                   "table": name, "txId": txid, "lsn": null, "xmin": null},
        "transaction": {"id": format!("{txid}:{co}"), "total_order": ord,
                        "data_collection_order": ord, "commit_order": co,
                        "event_count": count, "data_collections": null},
        "op": op, "ts_ms": us / 1000 + 5, "ts_us": us + 5000, "ts_ns": (us + 5000) * 1000,
    })
    .to_string()
}

pub fn config<P: AsRef<Path>>(db: &Db, inputs: &[P]) -> pg_replay::Config {
    let mut cfg = pg_replay::Config::new(db.target.clone());
    cfg.inputs = inputs.iter().map(|p| p.as_ref().to_path_buf()).collect();
    cfg.progress_interval = Duration::from_secs(60);
    cfg
}

pub async fn replay(cfg: pg_replay::Config) -> anyhow::Result<pg_replay::Summary> {
    tokio::time::timeout(
        Duration::from_secs(120),
        pg_replay::run(cfg, CancellationToken::new()),
    )
    .await
    .expect("pg-replay finishes within 2 minutes")
}

fn row(id: i64, data: &str) -> Value {
    json!({"id": id, "data": data})
}

fn child(id: i64, parent: i64) -> Value {
    json!({"id": id, "parent": parent})
}

const NULL: Value = Value::Null;

/// Two tables with a foreign key, units spread over two files (as two
/// partitions would be) and out of order between the files.
fn two_table_archive(dir: &Path) -> Vec<PathBuf> {
    let (a, b) = (dir.join("a.txt"), dir.join("b.txt"));
    let mut fa = Archive::default();
    let mut fb = Archive::default();
    // Unit 1: parents 1, 2 (file a) with child 10 of 1 (file b).
    fa.lines
        .push(event("c", "p", NULL, row(1, "one"), 1, 1, None, 100, 1));
    fa.lines
        .push(event("c", "p", NULL, row(2, "two"), 1, 2, None, 100, 1));
    fb.lines
        .push(event("c", "c", NULL, child(10, 1), 1, 3, Some(3), 100, 1));
    // Unit 2: the child moves to parent 2, parent 1 is deleted; then the
    // key of parent 2 changes from 2 to 3 in unit 3 (child deleted first).
    fb.lines.push(event(
        "u",
        "c",
        child(10, 1),
        child(10, 2),
        2,
        1,
        None,
        101,
        2,
    ));
    fa.lines
        .push(event("d", "p", row(1, "one"), NULL, 2, 2, Some(2), 101, 2));
    fb.lines
        .push(event("d", "c", child(10, 2), NULL, 3, 1, None, 102, 3));
    fa.lines
        .push(event("d", "p", row(2, "two"), NULL, 3, 2, None, 102, 3));
    fa.lines
        .push(event("c", "p", NULL, row(3, "two"), 3, 3, None, 102, 3));
    fb.lines
        .push(event("c", "c", NULL, child(11, 3), 3, 4, Some(4), 102, 3));
    fa.write(&a);
    fb.write(&b);
    vec![a, b]
}

async fn parent_child(db: &Db) {
    db.exec(
        "create table p (id int primary key, data text not null);
         create table c (id int primary key, parent int not null references p (id))",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_are_applied_whole_in_commit_order_and_a_second_run_changes_nothing() {
    let db = Db::new().await;
    parent_child(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let inputs = two_table_archive(dir.path());
    let s = replay(config(&db, &inputs)).await.unwrap();
    assert_eq!((s.units, s.changes, s.position), (3, 9, Some(3)));
    assert_eq!(db.rows("select * from p").await, vec!["(3,two)"]);
    assert_eq!(db.rows("select * from c").await, vec!["(11,3)"]);
    let pos = db
        .rows("select (commit_order, tx_id, changes, units) from tidemark.replay_position")
        .await;
    assert_eq!(pos, vec!["(\"(3,102,9,3)\")"]);
    // Again: nothing to do, nothing changed.
    let again = replay(config(&db, &inputs)).await.unwrap();
    assert_eq!((again.units, again.changes), (0, 0));
    assert_eq!(db.rows("select * from p").await, vec!["(3,two)"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_in_time_is_a_prefix_of_whole_units() {
    let db = Db::new().await;
    parent_child(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let inputs = two_table_archive(dir.path());
    let mut cfg = config(&db, &inputs);
    // Unit 2 committed at +2 s, unit 3 at +3 s.
    cfg.until = pg_replay::UntilArg::Time(T0_US + 2_500_000);
    let s = replay(cfg).await.unwrap();
    assert_eq!(s.position, Some(2));
    assert_eq!(db.rows("select * from p").await, vec!["(2,two)"]);
    assert_eq!(db.rows("select * from c").await, vec!["(10,2)"]);
    // Going on later, to the end.
    replay(config(&db, &inputs)).await.unwrap();
    assert_eq!(db.rows("select * from p").await, vec!["(3,two)"]);
    // --until-txid: the unit of transaction 100 only, into another table set.
    let db2 = Db::new().await;
    parent_child(&db2).await;
    let mut cfg = config(&db2, &inputs);
    cfg.until = pg_replay::UntilArg::Txid(100);
    assert_eq!(replay(cfg).await.unwrap().position, Some(1));
    assert_eq!(
        db2.rows("select * from p").await,
        vec!["(1,one)", "(2,two)"]
    );
    let mut cfg = config(&db2, &inputs);
    cfg.until = pg_replay::UntilArg::Txid(999);
    let err = format!("{:#}", replay(cfg).await.unwrap_err());
    assert!(
        err.contains("transaction 999 (--until-txid) is not in the archive"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_disagrees_stops_before_that_unit_naming_table_key_and_line() {
    let db = Db::new().await;
    db.exec("create table t (id int primary key, data text not null); insert into t values (5, 'there')")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.txt");
    let mut a = Archive::default();
    a.unit(1, 1, 1, &[("c", "t", NULL, row(1, "a"))])
        .unit(2, 2, 2, &[("c", "t", NULL, row(2, "b"))])
        .unit(
            3,
            3,
            3,
            &[
                ("c", "t", NULL, row(3, "c")),
                ("c", "t", NULL, row(5, "five")),
            ],
        )
        .unit(4, 4, 4, &[("c", "t", NULL, row(4, "d"))]);
    a.write(&path);
    let err = format!("{:#}", replay(config(&db, &[&path])).await.unwrap_err());
    assert!(err.contains("table public.t key (id)=(5)"), "{err}");
    assert!(err.contains("out.txt line 4"), "{err}");
    assert!(err.contains("unit 3"), "{err}");
    // Units 1 and 2 are applied, nothing of 3 or after.
    assert_eq!(db.rows("select id from t").await, vec!["(1)", "(2)", "(5)"]);
    // An update of a missing row is refused the same way.
    let db = Db::new().await;
    db.exec("create table t (id int primary key, data text not null)")
        .await;
    let mut a = Archive::default();
    a.unit(1, 1, 1, &[("u", "t", row(9, "x"), row(9, "y"))]);
    a.write(&path);
    let err = format!("{:#}", replay(config(&db, &[&path])).await.unwrap_err());
    assert!(
        err.contains("updates a row the target does not hold"),
        "{err}"
    );
    // With --on-conflict upsert the archive wins.
    let mut cfg = config(&db, &[path]);
    cfg.on_conflict = pg_replay::apply::OnConflict::Upsert;
    replay(cfg).await.unwrap();
    assert_eq!(db.rows("select * from t").await, vec!["(9,y)"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_stops_before_the_incomplete_unit_and_names_it() {
    let db = Db::new().await;
    db.exec("create table t (id int primary key, data text not null)")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.txt");
    let mut a = Archive::default();
    a.unit(1, 1, 1, &[("c", "t", NULL, row(1, "a"))]);
    // Unit 2's event 2 of 3 is missing (dead-lettered at the source).
    a.lines
        .push(event("c", "t", NULL, row(2, "b"), 2, 1, None, 2, 2));
    a.lines
        .push(event("c", "t", NULL, row(3, "c"), 2, 3, Some(3), 2, 2));
    a.unit(3, 3, 3, &[("c", "t", NULL, row(4, "d"))]);
    a.write(&path);
    let err = format!("{:#}", replay(config(&db, &[path])).await.unwrap_err());
    assert!(err.contains("a gap in the archive: unit 2"), "{err}");
    assert!(
        err.contains("holds 2 of its 3 events (total_order 2 is the first missing)"),
        "{err}"
    );
    assert!(err.contains("out.txt line 2"), "{err}");
    assert!(err.contains("tidemark.dead-letter"), "{err}");
    assert_eq!(db.rows("select id from t").await, vec!["(1)"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lines_and_tables_are_refused_naming_their_place() {
    let db = Db::new().await;
    db.exec("create table t (id int primary key, data text not null)")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.txt");
    // A line that is not a record: nothing of its unit or after applied.
    let mut a = Archive::default();
    a.unit(1, 1, 1, &[("c", "t", NULL, row(1, "a"))]);
    a.raw("Struct{id=2,data=b}");
    a.unit(2, 2, 2, &[("c", "t", NULL, row(2, "b"))]);
    a.write(&path);
    let err = format!("{:#}", replay(config(&db, &[&path])).await.unwrap_err());
    assert!(err.contains("out.txt line 2 (byte offset"), "{err}");
    assert!(err.contains("not JSON"), "{err}");
    assert_eq!(db.rows("select id from t").await, Vec::<String>::new());
    // Records of a table --table does not map.
    let mut a = Archive::default();
    a.unit(
        1,
        1,
        1,
        &[
            ("c", "t", NULL, row(1, "a")),
            ("c", "other", NULL, row(1, "x")),
        ],
    );
    a.write(&path);
    let mut cfg = config(&db, &[&path]);
    cfg.tables = vec![(
        TableName::parse("t").unwrap(),
        TableName::parse("t").unwrap(),
    )];
    let err = format!("{:#}", replay(cfg.clone()).await.unwrap_err());
    assert!(
        err.contains("a change of table public.other, which no --table maps"),
        "{err}"
    );
    assert!(err.contains("out.txt line 2"), "{err}");
    assert_eq!(db.rows("select id from t").await, Vec::<String>::new());
    cfg.ignore_unmapped = true;
    replay(cfg).await.unwrap();
    assert_eq!(db.rows("select id from t").await, vec!["(1)"]);
    // A target whose columns differ.
    let db = Db::new().await;
    db.exec("create table t (id int primary key, info text)")
        .await;
    let err = format!("{:#}", replay(config(&db, &[&path])).await.unwrap_err());
    assert!(
        err.contains("the columns of target table public.t do not match"),
        "{err}"
    );
    assert!(
        err.contains("the archive has columns the target lacks: data"),
        "{err}"
    );
    assert!(
        err.contains("the target has columns the archive does not carry: info"),
        "{err}"
    );
    // A target this role may not write.
    let db = Db::new().await;
    let role = unique("rp_reader_");
    db.exec(&format!(
        "create table t (id int primary key, data text not null);
         create role {role} login password 'pw';
         grant select on t to {role};
         create schema tidemark authorization {role}"
    ))
    .await;
    let mut u = url::Url::parse(&db.url()).unwrap();
    u.set_username(&role).unwrap();
    u.set_password(Some("pw")).unwrap();
    let mut cfg = config(&db, &[&path]);
    cfg.target = PgTarget::from_url("url", u.as_str()).unwrap();
    cfg.ignore_unmapped = true;
    cfg.tables = vec![(
        TableName::parse("t").unwrap(),
        TableName::parse("t").unwrap(),
    )];
    let err = format!("{:#}", replay(cfg).await.unwrap_err());
    assert!(
        err.contains(
            "this role may not write target table public.t (no INSERT, UPDATE, DELETE privilege)"
        ),
        "{err}"
    );
    assert_eq!(db.rows("select id from t").await, Vec::<String>::new());
    db.exec(&format!(
        "drop schema tidemark cascade; drop owned by {role}; drop role {role}"
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_line_is_never_applied() {
    let db = Db::new().await;
    db.exec("create table t (id int primary key, data text not null)")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.txt");
    let mut a = Archive::default();
    a.unit(1, 1, 1, &[("c", "t", NULL, row(1, "a"))]);
    a.write(&path);
    // The next unit's only line, cut short before its newline: complete
    // JSON but not known to be whole.
    let torn = event("c", "t", NULL, row(2, "b"), 2, 1, Some(1), 2, 2);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut f, torn.as_bytes()).unwrap();
    let s = replay(config(&db, &[path])).await.unwrap();
    assert_eq!(s.position, Some(1));
    assert_eq!(db.rows("select id from t").await, vec!["(1)"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_tells_equal_tables_from_ones_with_a_changed_row() {
    let src = Db::new().await;
    let dst = Db::new().await;
    for db in [&src, &dst] {
        db.exec(
            "create table t (a int, b text, v numeric, primary key (a, b));
             insert into t select i % 100, 'k' || (i / 100), i * 1.5 from generate_series(1, 5000) i",
        )
        .await;
    }
    let cfg = pg_replay::verify::VerifyConfig {
        source: src.target.clone(),
        target: dst.target.clone(),
        tables: vec![(
            TableName::parse("t").unwrap(),
            TableName::parse("t").unwrap(),
        )],
        chunk_rows: 700,
        leaf_rows: 20,
        max_diffs: 10,
    };
    let report = pg_replay::verify::verify(&cfg).await.unwrap();
    assert!(report.equal(), "{report:?}");
    assert_eq!(report.rows, 5000);
    dst.exec("update t set v = v + 0.01 where a = 42 and b = 'k17'; delete from t where a = 3 and b = 'k0'; insert into t values (1000, 'x', 1)")
        .await;
    let report = pg_replay::verify::verify(&cfg).await.unwrap();
    let mut diffs: Vec<(String, &str)> = report
        .differences
        .iter()
        .map(|d| (d.key.clone(), d.what))
        .collect();
    diffs.sort();
    assert_eq!(
        diffs,
        vec![
            ("(a, b)=(1000, x)".to_owned(), "only in target"),
            ("(a, b)=(3, k0)".to_owned(), "only in source"),
            ("(a, b)=(42, k17)".to_owned(), "differs"),
        ]
    );
    assert!(pg_replay::verify::print(&report, &cfg).is_err());
}

/// An archive of `units` units over tables `p` and `c` (`c.parent`
/// references `p`): inserts, updates, deletes, key changes, and a few large
/// units. Returns the lines.
fn busy_archive(units: i64, seed: u64) -> Archive {
    use rand::{Rng as _, SeedableRng as _};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut a = Archive::default();
    let mut parents: Vec<i64> = Vec::new();
    let mut children: Vec<(i64, i64)> = Vec::new();
    let mut next = 1i64;
    for co in 1..=units {
        let size = if co % 97 == 0 {
            400
        } else {
            rng.random_range(1..=8)
        };
        let mut changes: Vec<(String, String, Value, Value)> = Vec::new();
        for _ in 0..size {
            let r: f64 = rng.random();
            if r < 0.3 || parents.is_empty() {
                let k = next;
                next += 1;
                changes.push(("c".into(), "p".into(), NULL, row(k, &format!("p{k}"))));
                parents.push(k);
            } else if r < 0.45 {
                let k = next;
                next += 1;
                let p = parents[rng.random_range(0..parents.len())];
                changes.push(("c".into(), "c".into(), NULL, child(k, p)));
                children.push((k, p));
            } else if r < 0.8 {
                let i = rng.random_range(0..parents.len());
                let k = parents[i];
                changes.push((
                    "u".into(),
                    "p".into(),
                    row(k, "old"),
                    row(k, &format!("u{co} \\ \t ' \"")),
                ));
            } else if r < 0.9 && !children.is_empty() {
                let i = rng.random_range(0..children.len());
                let (k, p) = children.swap_remove(i);
                changes.push(("d".into(), "c".into(), child(k, p), NULL));
            } else {
                // Delete a parent: its children first, as the source must.
                let i = rng.random_range(0..parents.len());
                let p = parents.swap_remove(i);
                let (gone, kept): (Vec<_>, Vec<_>) = children.iter().partition(|(_, cp)| *cp == p);
                for (k, cp) in gone {
                    changes.push(("d".into(), "c".into(), child(k, cp), NULL));
                }
                children = kept;
                changes.push(("d".into(), "p".into(), row(p, "x"), NULL));
            }
        }
        let changes: Vec<Change<'_>> = changes
            .iter()
            .map(|(op, t, b, a)| (op.as_str(), t.as_str(), b.clone(), a.clone()))
            .collect();
        a.unit(co, 10_000 + co, co, &changes);
    }
    a
}

/// pg-replay killed with SIGKILL at random instants and started again, until
/// it completes: the target equals an uninterrupted replay's, and the
/// position counts every change once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_instants_then_restarts_end_in_the_same_target() {
    use rand::Rng as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.txt");
    let archive = busy_archive(3000, 11);
    archive.write(&path);
    let total = archive.lines.len() as i64;
    let reference = Db::new().await;
    parent_child(&reference).await;
    replay(config(&reference, &[&path])).await.unwrap();

    let db = Db::new().await;
    parent_child(&db).await;
    // Five kills spread over the run: each once the position has passed a
    // random count of changes, a random few milliseconds later (so at any
    // point of a commit cycle); then a run to the end.
    let mut rng = rand::rng();
    let mut thresholds: Vec<i64> = (0..5).map(|_| rng.random_range(1..total)).collect();
    thresholds.sort_unstable();
    let applied = || async {
        sqlx::query_scalar::<_, i64>("select changes from tidemark.replay_position")
            .fetch_optional(&db.pool)
            .await
            .ok()
            .flatten()
            .unwrap_or(0)
    };
    let start = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_it-pg-replay"))
            .arg("--input")
            .arg(&path)
            .args([
                "--target-url",
                &db.url(),
                "--batch-changes",
                "50",
                "--http-addr",
                "off",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut kills = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    for threshold in thresholds {
        let mut child = start();
        let finished = loop {
            assert!(
                std::time::Instant::now() < deadline,
                "the replay never got on"
            );
            if child.try_wait().unwrap().is_some() {
                break true;
            }
            if applied().await >= threshold {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
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
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..15))).await;
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
    assert!(
        kills >= 3,
        "killed only {kills} times: the runs were too short to be cut"
    );
    for t in ["p", "c"] {
        assert_eq!(
            db.rows(&format!("select * from {t}")).await,
            reference.rows(&format!("select * from {t}")).await,
            "table {t} after {kills} kills"
        );
    }
    let counted: i64 = sqlx::query_scalar("select changes from tidemark.replay_position")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(counted, total, "every change applied once");
    eprintln!("{kills} kills, {total} changes");
}

/// A change event with the Connect schema, its row fields `(name, Connect
/// type, SQL type)`.
fn event_with_schema(fields: &[(&str, &str, &str)], op: &str, after: Value, co: i64) -> String {
    let payload: Value =
        serde_json::from_str(&event("c", "t", NULL, after, co, 1, Some(1), co, co)).unwrap();
    let mut payload = payload;
    payload["op"] = json!(op);
    if op == "u" {
        payload["before"] = payload["after"].clone();
    }
    let row: Vec<Value> = fields
        .iter()
        .map(|(name, connect, sql)| {
            json!({"type": connect, "optional": *name != "id", "field": name,
                   "parameters": {"tidemark.column.type": sql}})
        })
        .collect();
    let schema = json!({"type": "struct", "name": "src.public.t.Envelope", "fields": [
        {"type": "struct", "fields": row, "optional": true, "field": "before"},
        {"type": "struct", "fields": row, "optional": true, "field": "after"},
        {"type": "struct", "fields": [], "optional": false, "field": "source"},
        {"type": "string", "optional": false, "field": "op"}]});
    json!({"schema": schema, "payload": payload}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_in_the_archive_stop_the_replay_or_are_applied_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.txt");
    let v1 = [("id", "int32", "integer"), ("data", "string", "text")];
    let v2 = [
        ("id", "int32", "integer"),
        ("data", "string", "text"),
        ("extra", "int32", "integer"),
    ];
    let v3 = [
        ("id", "int32", "integer"),
        ("info", "string", "text"),
        ("extra", "int32", "integer"),
    ];
    let v4 = [
        ("id", "int32", "integer"),
        ("info", "string", "text"),
        ("extra", "int64", "bigint"),
    ];
    let v5 = [
        ("id", "int32", "integer"),
        ("info", "int32", "integer"),
        ("extra", "int64", "bigint"),
    ];
    let mut a = Archive::default();
    a.raw(&event_with_schema(
        &v1,
        "c",
        json!({"id": 1, "data": "one"}),
        1,
    ));
    a.raw(&event_with_schema(
        &v1,
        "c",
        json!({"id": 2, "data": "two"}),
        2,
    ));
    a.raw(&event_with_schema(
        &v2,
        "u",
        json!({"id": 1, "data": "one", "extra": 7}),
        3,
    ));
    a.raw(&event_with_schema(
        &v3,
        "c",
        json!({"id": 3, "info": "three", "extra": 8}),
        4,
    ));
    a.raw(&event_with_schema(
        &v4,
        "u",
        json!({"id": 3, "info": "three", "extra": 9_000_000_000i64}),
        5,
    ));
    a.raw(&event_with_schema(
        &v5,
        "c",
        json!({"id": 4, "info": 4, "extra": 1}),
        6,
    ));
    a.write(&path);

    // By default: stop before the change, saying what it is.
    let db = Db::new().await;
    db.exec("create table t (id int primary key, data text)")
        .await;
    let err = format!("{:#}", replay(config(&db, &[&path])).await.unwrap_err());
    assert!(
        err.contains(
            "changes the columns of table public.t at unit 3: column extra (integer) added"
        ),
        "{err}"
    );
    assert!(err.contains("out.txt line 3"), "{err}");
    assert_eq!(db.rows("select * from t").await, vec!["(1,one)", "(2,two)"]);
    // The user makes the change (as the source did) and goes on, to the
    // next one.
    db.exec("alter table t add column extra integer").await;
    let err = format!("{:#}", replay(config(&db, &[&path])).await.unwrap_err());
    assert!(
        err.contains("at unit 4: column data renamed to info"),
        "{err}"
    );
    assert_eq!(
        db.rows("select * from t").await,
        vec!["(1,one,7)", "(2,two,)"]
    );

    // With --schema-changes apply: added, renamed and widened in order; the
    // type change that can alter values stops it.
    let db = Db::new().await;
    db.exec("create table t (id int primary key, data text)")
        .await;
    let mut cfg = config(&db, &[&path]);
    cfg.schema_changes = pg_replay::apply::SchemaChanges::Apply;
    let err = format!("{:#}", replay(cfg).await.unwrap_err());
    assert!(
        err.contains("column info changed from text to integer, which does not keep every value"),
        "{err}"
    );
    assert!(err.contains("out.txt line 6"), "{err}");
    assert_eq!(
        db.rows("select * from t").await,
        vec!["(1,one,7)", "(2,two,)", "(3,three,9000000000)"]
    );
    let columns: Vec<String> = sqlx::query_scalar(
        "select attname || ' ' || format_type(atttypid, atttypmod) from pg_attribute \
         where attrelid = 't'::regclass and attnum > 0 and not attisdropped order by attnum",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(columns, ["id integer", "info text", "extra bigint"]);
}

/// [`event_with_schema`] whose fields carry their source attnums, as
/// pg-source's records do (`tidemark.column.attnum`).
fn event_with_attnums(
    fields: &[(&str, &str, &str, i32)],
    op: &str,
    after: Value,
    co: i64,
) -> String {
    let plain: Vec<(&str, &str, &str)> = fields.iter().map(|f| (f.0, f.1, f.2)).collect();
    let mut v: Value = serde_json::from_str(&event_with_schema(&plain, op, after, co)).unwrap();
    for part in [0, 1] {
        for (k, f) in fields.iter().enumerate() {
            v["schema"]["fields"][part]["fields"][k]["parameters"]["tidemark.column.attnum"] =
                json!(f.3.to_string());
        }
    }
    v.to_string()
}

/// One record can carry several schema changes at once (pg-source read
/// the change after all of them): a column renamed beside a column added,
/// and a column dropped and added again under its name. The attnums tell
/// them apart, so the renamed column keeps its values and the column made
/// again loses them, as at the source; names alone would drop the renamed
/// column's values and keep the old ones of the column made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_beside_other_schema_changes_keeps_its_values_by_attnum() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.txt");
    let v1 = [
        ("id", "int32", "integer", 1),
        ("flag", "boolean", "boolean", 2),
        ("b", "string", "text", 3),
    ];
    // alter table t rename flag to soft; alter table t drop b;
    // alter table t add note text; alter table t add b text
    let v2 = [
        ("id", "int32", "integer", 1),
        ("soft", "boolean", "boolean", 2),
        ("note", "string", "text", 4),
        ("b", "string", "text", 5),
    ];
    let mut a = Archive::default();
    a.raw(&event_with_attnums(
        &v1,
        "c",
        json!({"id": 1, "flag": true, "b": "one"}),
        1,
    ));
    a.raw(&event_with_attnums(
        &v1,
        "c",
        json!({"id": 2, "flag": false, "b": "two"}),
        2,
    ));
    a.raw(&event_with_attnums(
        &v2,
        "c",
        json!({"id": 3, "soft": true, "note": "n", "b": "three"}),
        3,
    ));
    a.write(&path);

    let db = Db::new().await;
    db.exec("create table t (id int primary key, flag boolean, b text)")
        .await;
    let mut cfg = config(&db, &[&path]);
    cfg.schema_changes = pg_replay::apply::SchemaChanges::Apply;
    replay(cfg).await.unwrap();
    let columns: Vec<String> = sqlx::query_scalar(
        "select attname || ' ' || format_type(atttypid, atttypmod) from pg_attribute \
         where attrelid = 't'::regclass and attnum > 0 and not attisdropped order by attnum",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        columns,
        ["id integer", "soft boolean", "note text", "b text"]
    );
    assert_eq!(
        db.rows("select * from t order by id").await,
        vec!["(1,t,,)", "(2,f,,)", "(3,t,n,three)"]
    );
}

/// A column renamed, then another added under its old name that pg-source
/// could not place (no attnum), then the renamed one dropped: the added
/// column keeps its values. The attnum known for the old name went with the
/// rename; a stale one left under the name would take the added column for
/// a column dropped and added again, and empty it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attnum_follows_its_column_through_a_rename() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.txt");
    let v1 = [("id", "int32", "integer", 1), ("a", "string", "text", 2)];
    let v2 = [("id", "int32", "integer", 1), ("c", "string", "text", 2)];
    let v4 = [("id", "int32", "integer", 1), ("a", "string", "text", 3)];
    let mut a = Archive::default();
    a.raw(&event_with_attnums(
        &v1,
        "c",
        json!({"id": 1, "a": "one"}),
        1,
    ));
    a.raw(&event_with_attnums(
        &v2,
        "c",
        json!({"id": 2, "c": "two"}),
        2,
    ));
    // `a` added again, sent without an attnum.
    let mut v3: Value = serde_json::from_str(&event_with_attnums(
        &[
            ("id", "int32", "integer", 1),
            ("c", "string", "text", 2),
            ("a", "string", "text", 0),
        ],
        "c",
        json!({"id": 3, "c": "three", "a": "A3"}),
        3,
    ))
    .unwrap();
    for part in [0, 1] {
        v3["schema"]["fields"][part]["fields"][2]["parameters"]
            .as_object_mut()
            .unwrap()
            .remove("tidemark.column.attnum");
    }
    a.raw(&v3.to_string());
    a.raw(&event_with_attnums(
        &v4,
        "c",
        json!({"id": 4, "a": "A4"}),
        4,
    ));
    a.write(&path);

    let db = Db::new().await;
    db.exec("create table t (id int primary key, a text)").await;
    let mut cfg = config(&db, &[&path]);
    cfg.schema_changes = pg_replay::apply::SchemaChanges::Apply;
    replay(cfg).await.unwrap();
    assert_eq!(
        db.rows("select * from t order by id").await,
        vec!["(1,)", "(2,)", "(3,A3)", "(4,A4)"]
    );
}

/// [`event_with_attnums`] of the source table whose OID is `oid`, which
/// pg-source's records say on the row structs (`tidemark.table.oid`).
fn event_of_table(
    oid: u32,
    fields: &[(&str, &str, &str, i32)],
    op: &str,
    after: Value,
    co: i64,
) -> String {
    let mut v: Value = serde_json::from_str(&event_with_attnums(fields, op, after, co)).unwrap();
    for part in [0, 1] {
        v["schema"]["fields"][part]["parameters"] = json!({"tidemark.table.oid": oid.to_string()});
    }
    v.to_string()
}

/// A session with `search_path = pg_catalog, pg_temp`.
async fn session(db: &Db) -> sqlx::pool::PoolConnection<sqlx::Postgres> {
    let mut c = db.pool.acquire().await.unwrap();
    sqlx::query("set search_path = pg_catalog, pg_temp")
        .execute(&mut *c)
        .await
        .unwrap();
    c
}

/// Table `public.t`'s live columns (`name type`, by attnum) and rows (by
/// key, as text).
async fn columns_and_rows(db: &Db) -> (Vec<String>, Vec<String>) {
    let mut c = session(db).await;
    let columns = sqlx::query_scalar(
        "select a.attname::text || ' ' || format_type(a.atttypid, a.atttypmod) \
         from pg_attribute a where a.attrelid = 'public.t'::regclass \
         and a.attnum > 0 and not a.attisdropped order by a.attnum",
    )
    .fetch_all(&mut *c)
    .await
    .unwrap();
    let rows = sqlx::query_scalar("select t::text from public.t t order by t.id")
        .fetch_all(&mut *c)
        .await
        .unwrap();
    (columns, rows)
}

/// The source table's OID and the attnums of its live columns.
async fn oid_and_attnums(db: &Db) -> (u32, Vec<(String, i32)>) {
    let mut c = session(db).await;
    let oid: i64 = sqlx::query_scalar("select 'public.t'::regclass::oid::int8")
        .fetch_one(&mut *c)
        .await
        .unwrap();
    let attnums = sqlx::query_as(
        "select a.attname::text, a.attnum::int4 from pg_attribute a \
         where a.attrelid = 'public.t'::regclass and a.attnum > 0 and not a.attisdropped \
         order by a.attnum",
    )
    .fetch_all(&mut *c)
    .await
    .unwrap();
    (u32::try_from(oid).unwrap(), attnums)
}

/// A source table dropped and created again under its name (pg-source then
/// sends the new one's rows after a TRUNCATE, by a snapshot) is another
/// table: its attnums are counted again, and collide with the old one's.
/// Here the old (id, a text, b integer) has `a` dropped, so b is attnum 3;
/// the new (id, b integer, c text) has b at 2 (the old a's) and c at 3
/// (the old b's). Paired by attnum, the old b would be taken for c,
/// renamed and retyped to text (which stops), and b for a column added.
/// The records say the table's OID, so pg-replay pairs the new table's
/// columns by name: the target equals the source. With --schema-changes
/// stop, the message says the table was created again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_table_created_again_is_not_paired_with_the_old_one_by_attnum() {
    // The source, as it was and is, for its OIDs, attnums and rows.
    let source = Db::new().await;
    source
        .exec(
            "set search_path = pg_catalog, pg_temp;
             create table public.t (id integer primary key, a text, b integer);
             insert into public.t values (1, 'one', 10), (2, 'two', 20)",
        )
        .await;
    let (old_oid, old_attnums) = oid_and_attnums(&source).await;
    source
        .exec(
            "set search_path = pg_catalog, pg_temp;
             alter table public.t drop column a;
             insert into public.t values (3, 30)",
        )
        .await;
    assert_eq!(
        oid_and_attnums(&source).await.1,
        [("id".into(), 1), ("b".into(), 3)]
    );
    source
        .exec(
            "set search_path = pg_catalog, pg_temp;
             drop table public.t;
             create table public.t (id integer primary key, b integer, c text);
             insert into public.t values (1, 100, 'x'), (5, 500, 'y')",
        )
        .await;
    let (new_oid, new_attnums) = oid_and_attnums(&source).await;
    assert_ne!(old_oid, new_oid);
    assert_eq!(
        new_attnums,
        [("id".into(), 1), ("b".into(), 2), ("c".into(), 3)],
        "the new table's attnums collide with the old one's"
    );
    source
        .exec("set search_path = pg_catalog, pg_temp; insert into public.t values (6, 600, 'z')")
        .await;
    assert_eq!(old_attnums[1], ("a".into(), 2));

    let v1 = [
        ("id", "int32", "integer", 1),
        ("a", "string", "text", 2),
        ("b", "int32", "integer", 3),
    ];
    let v2 = [("id", "int32", "integer", 1), ("b", "int32", "integer", 3)];
    let v3 = [
        ("id", "int32", "integer", 1),
        ("b", "int32", "integer", 2),
        ("c", "string", "text", 3),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.txt");
    let mut a = Archive::default();
    a.raw(&event_of_table(
        old_oid,
        &v1,
        "c",
        json!({"id": 1, "a": "one", "b": 10}),
        1,
    ));
    a.raw(&event_of_table(
        old_oid,
        &v1,
        "c",
        json!({"id": 2, "a": "two", "b": 20}),
        2,
    ));
    a.raw(&event_of_table(
        old_oid,
        &v2,
        "c",
        json!({"id": 3, "b": 30}),
        3,
    ));
    // The new table: a TRUNCATE, its rows, then a change.
    a.raw(&event_of_table(new_oid, &v3, "t", NULL, 4));
    a.raw(&event_of_table(
        new_oid,
        &v3,
        "c",
        json!({"id": 1, "b": 100, "c": "x"}),
        5,
    ));
    a.raw(&event_of_table(
        new_oid,
        &v3,
        "c",
        json!({"id": 5, "b": 500, "c": "y"}),
        6,
    ));
    a.raw(&event_of_table(
        new_oid,
        &v3,
        "c",
        json!({"id": 6, "b": 600, "c": "z"}),
        7,
    ));
    a.write(&path);
    let target_ddl = "set search_path = pg_catalog, pg_temp;
        create table public.t (id integer primary key, a text, b integer)";

    let db = Db::new().await;
    db.exec(target_ddl).await;
    let mut cfg = config(&db, &[&path]);
    cfg.schema_changes = pg_replay::apply::SchemaChanges::Apply;
    replay(cfg)
        .await
        .expect("pg-replay replays the table created again");
    let (columns, rows) = columns_and_rows(&db).await;
    assert_eq!(columns, ["id integer", "b integer", "c text"]);
    assert_eq!(
        (columns, rows),
        columns_and_rows(&source).await,
        "target = source"
    );

    // Stopping at the change, the message says why the columns are told by
    // name, naming both OIDs.
    let db = Db::new().await;
    db.exec(target_ddl).await;
    let err = format!("{:#}", replay(config(&db, &[&path])).await.unwrap_err());
    assert!(err.contains("at unit 3: column a dropped"), "{err}");
    db.exec("set search_path = pg_catalog, pg_temp; alter table public.t drop column a")
        .await;
    let err = format!("{:#}", replay(config(&db, &[&path])).await.unwrap_err());
    assert!(
        err.contains(&format!(
            "source table public.t was created again (OID {old_oid}, now {new_oid}), so its columns are told by name: column c (text) added"
        )),
        "{err}"
    );
    assert!(err.contains("out.txt line 4"), "{err}");
}

/// The target's password from a file (`--target-password-file`): kept off
/// the command line, never in a message; one in `--target-url` on the
/// command line works but is warned about, naming the file flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_password_comes_from_a_file_and_one_on_the_command_line_is_warned_about() {
    let db = Db::new().await;
    let role = unique("rp_writer_");
    let password = unique("Sekr3t-replay-");
    db.exec(&format!(
        "create table t (id int primary key, data text not null);
         create role {role} login password '{password}';
         grant insert, update, delete, select on t to {role};
         create schema tidemark authorization {role}"
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.txt");
    let mut a = Archive::default();
    a.unit(1, 1, 1, &[("c", "t", NULL, row(1, "a"))]);
    a.unit(2, 2, 2, &[("c", "t", NULL, row(2, "b"))]);
    a.write(&path);
    let mut url = url::Url::parse(&db.url()).unwrap();
    url.set_username(&role).unwrap();
    url.set_password(None).unwrap();
    let run = |until: &str, url: &str, file: Option<&Path>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_it-pg-replay"));
        cmd.arg("--input")
            .arg(&path)
            .args(["--target-url", url, "--http-addr", "off"])
            .args(["--until-txid", until])
            .env_remove("PGPASSWORD")
            .env_remove("TIDEMARK_TARGET_PASSWORD_FILE");
        if let Some(file) = file {
            cmd.env("TIDEMARK_TARGET_PASSWORD_FILE", file);
        }
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains(&password), "{text}");
        (out.status.success(), text)
    };
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-password-x7\n").unwrap();
    let (ok, text) = run("1", url.as_str(), Some(&wrong));
    assert!(!ok && text.contains("password"), "{text}");
    assert!(!text.contains("not-the-password-x7"), "{text}");
    let right = dir.path().join("right");
    std::fs::write(&right, format!("{password}\n")).unwrap();
    let (ok, text) = run("1", url.as_str(), Some(&right));
    assert!(ok, "{text}");
    assert!(!text.contains("command line"), "{text}");
    assert_eq!(db.rows("select id from t").await, vec!["(1)"]);
    url.set_password(Some(&password)).unwrap();
    let (ok, text) = run("2", url.as_str(), None);
    assert!(ok, "{text}");
    assert!(
        text.contains("the password in --target-url's URL is given on the command line")
            && text.contains("--target-password-file"),
        "{text}"
    );
    assert_eq!(db.rows("select id from t").await, vec!["(1)", "(2)"]);
    db.exec(&format!(
        "drop schema tidemark cascade; drop owned by {role}; drop role {role}"
    ))
    .await;
}

/// A trap for the hostile-owner test: records who called it and, when that
/// is a superuser, makes `attacker` one.
fn owner_trap(attacker: &str, name: &str, returns: &str, result: &str) -> String {
    let label = name.split('(').next().unwrap();
    format!(
        r#"create function public.{name} returns {returns} language plpgsql as $trap$
begin
  insert into public.calls (caller, trap) values (current_user, '{label}');
  if (select rolsuper from pg_catalog.pg_roles where rolname operator(pg_catalog.=) current_user) then
    execute 'alter role {attacker} superuser';
  end if;
  {result}
end $trap$;
alter function public.{name} owner to {attacker};"#
    )
}

/// The owner of a target table (no superuser) attaches its code to it: a
/// CHECK constraint, a domain's CHECK on a column's type, a trigger. A
/// pg-replay connected as a superuser writes as the owner, so that code
/// never runs with more privilege than the owner has; a pg-replay whose
/// role has only grants on the table (so cannot write as the owner) refuses
/// the table instead of running the owner's code as itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_table_owner_s_code_never_runs_with_pg_replay_s_privileges() {
    let db = Db::new().await;
    let attacker = unique("rp_owner_");
    let writer = unique("rp_writer_");
    let mut setup = format!(
        "create role {attacker} nologin;
         create role {writer} login password 'pw';
         create table public.calls (caller text, trap text);
         grant insert on public.calls to public;"
    );
    setup.push_str(&owner_trap(
        &attacker,
        "trap_check(d text)",
        "boolean",
        "return true;",
    ));
    setup.push_str(&owner_trap(
        &attacker,
        "trap_domain(d text)",
        "boolean",
        "return true;",
    ));
    setup.push_str(&owner_trap(
        &attacker,
        "trap_trigger()",
        "trigger",
        "return new;",
    ));
    setup.push_str(&format!(
        "create domain public.label as text check (public.trap_domain(value));
         alter domain public.label owner to {attacker};
         create table public.t (id int primary key, data public.label not null
                                check (public.trap_check(data)));
         alter table public.t owner to {attacker};
         create trigger trap before insert or update on public.t
           for each row execute function public.trap_trigger();
         grant select, insert, update, delete on public.t to {writer};
         create schema tidemark authorization {writer};"
    ));
    db.exec(&setup).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.txt");
    // With the Connect schema: the records name the domain as the type.
    let fields = [
        ("id", "int32", "integer"),
        ("data", "string", "public.label"),
    ];
    let mut delete: Value =
        serde_json::from_str(&event_with_schema(&fields, "c", row(2, "b"), 4)).unwrap();
    delete["payload"]["op"] = json!("d");
    delete["payload"]["before"] = delete["payload"]["after"].take();
    let mut a = Archive::default();
    a.raw(&event_with_schema(&fields, "c", row(1, "a"), 1))
        .raw(&event_with_schema(&fields, "c", row(2, "b"), 2))
        .raw(&event_with_schema(&fields, "u", row(1, "a2"), 3))
        .raw(&delete.to_string());
    a.write(&path);

    // A role with grants only: refused before anything is written.
    let mut u = url::Url::parse(&db.url()).unwrap();
    u.set_username(&writer).unwrap();
    u.set_password(Some("pw")).unwrap();
    let mut cfg = config(&db, &[&path]);
    cfg.target = PgTarget::from_url("url", u.as_str()).unwrap();
    let err = format!("{:#}", replay(cfg).await.unwrap_err());
    assert!(
        err.contains(&format!(
            "target table public.t belongs to role \"{attacker}\""
        )) && err.contains("would run with this role's privileges"),
        "{err}"
    );
    assert_eq!(db.rows("select id from t").await, Vec::<String>::new());
    assert_eq!(
        db.rows("select caller from public.calls").await,
        Vec::<String>::new()
    );
    db.exec("drop schema tidemark cascade").await;

    // A superuser, letting the owner's trigger fire too: it writes as the owner.
    let mut cfg = config(&db, &[&path]);
    cfg.user_triggers = pg_replay::apply::UserTriggers::Fire;
    replay(cfg).await.unwrap();
    assert_eq!(
        db.rows("select id, data::text from t").await,
        vec!["(1,a2)"]
    );
    let superuser: bool = sqlx::query_scalar("select rolsuper from pg_roles where rolname = $1")
        .bind(&attacker)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    if superuser {
        db.exec(&format!("alter role {attacker} nosuperuser")).await;
    }
    let callers = db
        .rows("select distinct caller, trap from public.calls")
        .await;
    assert!(!superuser, "{attacker} made itself superuser: {callers:?}");
    // Every trap ran (the test can see them), and only as the owner.
    let mut want: Vec<String> = ["trap_check", "trap_domain", "trap_trigger"]
        .iter()
        .map(|t| format!("({attacker},{t})"))
        .collect();
    want.sort();
    assert_eq!(callers, want);
    db.exec(&format!(
        "drop schema tidemark cascade; drop table public.t; drop domain public.label;
         drop owned by {attacker}; drop owned by {writer}; drop role {attacker}; drop role {writer}"
    ))
    .await;
}

/// `line` (an event of [`event`]) with `transaction.prev_commit_order`.
fn with_prev(line: &str, prev: Option<i64>) -> String {
    let mut v: Value = serde_json::from_str(line).unwrap();
    v["transaction"]["prev_commit_order"] = json!(prev);
    v.to_string()
}

/// The issue's bad inputs not covered above, each refused with an error
/// that names its place in the archive (and table, column and key where
/// there is one), with nothing of the bad unit applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_names_its_place_table_column_and_key_and_applies_nothing_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.txt");

    // An envelope of a later Tidemark.
    let db = Db::new().await;
    db.exec("create table t (id int primary key, data text not null)")
        .await;
    let mut a = Archive::default();
    a.unit(1, 1, 1, &[("c", "t", NULL, row(1, "a"))]);
    let mut later: Value =
        serde_json::from_str(&event("c", "t", NULL, row(2, "b"), 2, 1, Some(1), 2, 2)).unwrap();
    later["source"]["version"] = json!("tidemark-9.0.0");
    a.raw(&later.to_string());
    a.write(&path);
    let err = format!("{:#}", replay(config(&db, &[&path])).await.unwrap_err());
    assert!(err.contains("out.txt line 2 (byte offset"), "{err}");
    assert!(
        err.contains("envelope version tidemark-9.0.0 is of a later Tidemark"),
        "{err}"
    );
    assert_eq!(db.rows("select id from t").await, Vec::<String>::new());

    // A file cut in the middle of a unit (its last line torn).
    let db = Db::new().await;
    db.exec("create table t (id int primary key, data text not null)")
        .await;
    let mut a = Archive::default();
    a.unit(1, 1, 1, &[("c", "t", NULL, row(1, "a"))]);
    a.raw(&event("c", "t", NULL, row(2, "b"), 2, 1, None, 2, 2));
    a.write(&path);
    let torn = event("c", "t", NULL, row(3, "c"), 2, 2, Some(2), 2, 2);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut f, &torn.as_bytes()[..torn.len() / 2]).unwrap();
    let err = format!("{:#}", replay(config(&db, &[&path])).await.unwrap_err());
    assert!(
        err.contains("a gap in the archive: unit 2 (transaction 2, first event at"),
        "{err}"
    );
    assert!(err.contains("out.txt line 2 (byte offset"), "{err}");
    assert!(err.contains("holds 1 events but not its last one"), "{err}");
    assert_eq!(db.rows("select id from t").await, vec!["(1)"]);

    // A unit missing entirely: the one after it names it.
    let db = Db::new().await;
    db.exec("create table t (id int primary key, data text not null)")
        .await;
    let mut a = Archive::default();
    a.raw(&with_prev(
        &event("c", "t", NULL, row(1, "a"), 1, 1, Some(1), 1, 1),
        None,
    ))
    .raw(&with_prev(
        &event("c", "t", NULL, row(3, "c"), 3, 1, Some(1), 3, 3),
        Some(2),
    ));
    a.write(&path);
    let err = format!("{:#}", replay(config(&db, &[&path])).await.unwrap_err());
    assert!(
        err.contains("unit 3 (first event at") && err.contains("out.txt line 2 (byte offset"),
        "{err}"
    );
    assert!(
        err.contains("a unit before it is missing from the archive (it names unit 2 before it)"),
        "{err}"
    );
    assert_eq!(db.rows("select id from t").await, vec!["(1)"]);

    // A value the target's column type refuses.
    let db = Db::new().await;
    db.exec("create table t (id int primary key, data varchar(3) not null)")
        .await;
    let mut a = Archive::default();
    a.unit(1, 1, 1, &[("c", "t", NULL, row(1, "ab"))]).unit(
        2,
        2,
        2,
        &[("c", "t", NULL, row(2, "abcdef"))],
    );
    a.write(&path);
    let err = format!("{:#}", replay(config(&db, &[&path])).await.unwrap_err());
    assert!(
        err.contains("cannot replay column data of table public.t (target public.t, key (id)=(2))"),
        "{err}"
    );
    assert!(err.contains("out.txt line 2 (byte offset"), "{err}");
    assert!(
        err.contains("value too long for type character varying(3)"),
        "{err}"
    );
    assert_eq!(db.rows("select id from t").await, Vec::<String>::new());
}

/// A TRUNCATE event (op `t`, Debezium's convention: before and after null,
/// `source` names the table) empties its target table inside its unit: a
/// parent and its child truncated by one source statement, new rows in the
/// same unit, a change after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_that_a_foreign_key_stops_names_the_fix_and_applies_nothing() {
    let db = Db::new().await;
    // The target's c references p; the archive truncates p alone (as a
    // replay from a snapshot of p empties it alone).
    parent_child(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.txt");
    let mut a = Archive::default();
    a.unit(1, 1, 1, &[("c", "p", NULL, row(1, "one"))]).unit(
        2,
        2,
        2,
        &[("t", "p", NULL, NULL), ("c", "p", NULL, row(2, "two"))],
    );
    a.write(&path);
    let e = replay(config(&db, &[&path])).await.unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains(r#"Table "c" references "p""#), "{msg}");
    assert!(
        msg.contains("Replay without --from-snapshot") && msg.contains("drop that foreign key"),
        "{msg}"
    );
    assert!(
        db.rows("select id from p").await.is_empty(),
        "nothing of the run is applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_in_the_archive_empties_the_table_inside_its_unit() {
    let db = Db::new().await;
    parent_child(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.txt");
    let mut a = Archive::default();
    a.unit(
        1,
        1,
        1,
        &[
            ("c", "p", NULL, row(1, "one")),
            ("c", "p", NULL, row(2, "two")),
            ("c", "c", NULL, child(10, 1)),
        ],
    )
    .unit(
        2,
        2,
        2,
        &[
            ("t", "c", NULL, NULL),
            ("t", "p", NULL, NULL),
            ("c", "p", NULL, row(3, "three")),
            ("c", "c", NULL, child(11, 3)),
        ],
    )
    .unit(3, 3, 3, &[("u", "p", row(3, "three"), row(3, "three!"))])
    .unit(
        4,
        4,
        4,
        &[
            ("u", "p", row(3, "three!"), row(3, "x")),
            ("c", "p", NULL, row(4, "three!")),
        ],
    );
    a.write(&path);
    let text = std::fs::read_to_string(&path).unwrap();
    let truncate: Value = serde_json::from_str(text.lines().nth(3).unwrap()).unwrap();
    assert_eq!(
        (
            &truncate["op"],
            &truncate["before"],
            &truncate["after"],
            &truncate["source"]["table"]
        ),
        (&json!("t"), &NULL, &NULL, &json!("c"))
    );
    // To the moment before the TRUNCATE, then on: the truncate is applied
    // in a run of its own and in one with the units around it.
    let mut cfg = config(&db, &[&path]);
    cfg.until = pg_replay::UntilArg::Txid(1);
    let s = replay(cfg).await.unwrap();
    assert_eq!(s.position, Some(1));
    assert_eq!(db.rows("select id from p").await, vec!["(1)", "(2)"]);
    replay(config(&db, &[&path])).await.unwrap();
    assert_eq!(
        db.rows("select * from p").await,
        vec!["(3,x)", "(4,three!)"]
    );
    assert_eq!(db.rows("select * from c").await, vec!["(11,3)"]);
    let again = replay(config(&db, &[&path])).await.unwrap();
    assert_eq!(again.changes, 0);
    // The whole archive in one run, into a fresh target.
    let fresh = Db::new().await;
    parent_child(&fresh).await;
    replay(config(&fresh, &[&path])).await.unwrap();
    assert_eq!(
        fresh.rows("select * from p").await,
        vec!["(3,x)", "(4,three!)"]
    );
    assert_eq!(fresh.rows("select * from c").await, vec!["(11,3)"]);
    // Event by event: foreign keys both ways between p and c are a cycle,
    // which the set-based apply leaves to the event-by-event one.
    let cyclic = Db::new().await;
    cyclic
        .exec(
            "create table p (id int primary key, data text not null, fav int);
             create table c (id int primary key, parent int not null references p (id));
             alter table p add foreign key (fav) references c (id)",
        )
        .await;
    let p = |id: i64, data: &str, fav: Option<i64>| json!({"id": id, "data": data, "fav": fav});
    let mut a = Archive::default();
    a.unit(
        1,
        1,
        1,
        &[
            ("c", "p", NULL, p(1, "one", None)),
            ("c", "c", NULL, child(10, 1)),
        ],
    )
    .unit(
        2,
        2,
        2,
        &[
            ("t", "c", NULL, NULL),
            ("t", "p", NULL, NULL),
            ("c", "p", NULL, p(3, "three", None)),
            ("c", "c", NULL, child(11, 3)),
        ],
    )
    .unit(
        3,
        3,
        3,
        &[("u", "p", p(3, "three", None), p(3, "three", Some(11)))],
    );
    a.write(&path);
    let s = replay(config(&cyclic, &[&path])).await.unwrap();
    assert!(s.slow_runs > 0, "{s:?}");
    assert_eq!(cyclic.rows("select * from p").await, vec!["(3,three,11)"]);
    assert_eq!(cyclic.rows("select * from c").await, vec!["(11,3)"]);
}

/// `line` (an event of [`event`] or [`event_with_schema`]) as event
/// `ord` of unit `co`, `count` on the unit's last, after unit `prev`.
fn placed(line: &str, co: i64, ord: i64, count: Option<i64>, prev: Option<i64>) -> String {
    let mut v: Value = serde_json::from_str(line).unwrap();
    let payload = if v.get("payload").is_some() {
        &mut v["payload"]
    } else {
        &mut v
    };
    payload["transaction"] = json!({"id": format!("{co}:{co}"), "total_order": ord,
        "data_collection_order": ord, "commit_order": co, "prev_commit_order": prev,
        "event_count": count, "data_collections": null});
    payload["source"]["txId"] = json!(co);
    v.to_string()
}

/// A change of a table's columns (unit M) right after a unit of two tables
/// (U) whose other event is read later: on another stream that lags (a
/// partition of the other table's topic with more to read), or further on
/// in file-sink's single file (which holds the topics in the order it read
/// them). The archive is whole: the change waits until U is here, U is
/// applied, then the change is made and M applied. Before, pg-replay
/// stopped: "unit U before it is not complete in the archive" (issue 14,
/// the logical fault runs). A unit before the change that never comes is
/// still a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_change_waits_for_a_unit_before_it_read_later_on_another_stream_or_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = [("id", "int32", "integer"), ("data", "string", "text")];
    let v2 = [
        ("id", "int32", "integer"),
        ("data", "string", "text"),
        ("extra", "int32", "integer"),
    ];
    let t = |fields: &[(&str, &str, &str)], op: &str, after: Value| {
        event_with_schema(fields, op, after, 1)
    };
    let p = |id: i64| event("c", "p", NULL, json!({"id": id}), 1, 1, None, 1, 1);
    let two_tables = || async {
        let db = Db::new().await;
        db.exec(
            "create table t (id int primary key, data text); create table p (id int primary key)",
        )
        .await;
        db
    };
    let expect_t = ["(1,one,7)", "(2,two,)"];

    // One file: U's event of p comes after M.
    let file = dir.path().join("single.txt");
    let mut a = Archive::default();
    a.raw(&placed(&t(&v1, "c", row(1, "one")), 1, 1, Some(1), None))
        .raw(&placed(&t(&v1, "c", row(2, "two")), 2, 1, None, Some(1)))
        .raw(&placed(
            &t(&v2, "u", json!({"id": 1, "data": "one", "extra": 7})),
            3,
            1,
            Some(1),
            Some(2),
        ))
        .raw(&placed(&p(1), 2, 2, Some(2), Some(1)));
    a.write(&file);
    let db = two_tables().await;
    let mut cfg = config(&db, &[&file]);
    cfg.schema_changes = pg_replay::apply::SchemaChanges::Apply;
    let done = replay(cfg).await.expect("the single file replays whole");
    assert_eq!(done.position, Some(3));
    assert_eq!(db.rows("select * from t").await, expect_t);
    assert_eq!(db.rows("select * from p").await, ["(1)"]);
    // By default the replay stops at the change, having applied U.
    let db = two_tables().await;
    let err = format!("{:#}", replay(config(&db, &[&file])).await.unwrap_err());
    assert!(
        err.contains(
            "changes the columns of table public.t at unit 3: column extra (integer) added"
        ),
        "{err}"
    );
    assert_eq!(db.rows("select * from p").await, ["(1)"], "U applied");

    // Two files, as two partitions: the one with U's event of p holds
    // 20,000 units before it, and is read side by side with the small one.
    const FILL: i64 = 20_000;
    let (big, small) = (dir.path().join("big.txt"), dir.path().join("small.txt"));
    let mut a = Archive::default();
    for co in 1..=FILL {
        a.raw(&placed(
            &p(co + 1),
            co,
            1,
            Some(1),
            (co > 1).then_some(co - 1),
        ));
    }
    a.raw(&placed(&p(1), FILL + 1, 2, Some(2), Some(FILL)));
    a.write(&big);
    let mut b = Archive::default();
    b.raw(&placed(
        &t(&v1, "c", row(1, "one")),
        FILL + 1,
        1,
        None,
        Some(FILL),
    ))
    .raw(&placed(
        &t(&v1, "c", row(2, "two")),
        FILL + 2,
        1,
        Some(1),
        Some(FILL + 1),
    ))
    .raw(&placed(
        &t(&v2, "u", json!({"id": 1, "data": "one", "extra": 7})),
        FILL + 3,
        1,
        Some(1),
        Some(FILL + 2),
    ));
    b.write(&small);
    let db = two_tables().await;
    // The small file first: its reader starts first.
    let mut cfg = config(&db, &[&small, &big]);
    cfg.schema_changes = pg_replay::apply::SchemaChanges::Apply;
    let done = replay(cfg).await.expect("the two files replay whole");
    assert_eq!(done.position, Some(FILL + 3));
    assert_eq!(db.rows("select * from t").await, expect_t);
    let n: i64 = sqlx::query_scalar("select count(*) from p")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, FILL + 1);

    // U's event of p missing: a gap, with nothing of U or after applied.
    let file = dir.path().join("gap.txt");
    let mut a = Archive::default();
    a.raw(&placed(&t(&v1, "c", row(1, "one")), 1, 1, Some(1), None))
        .raw(&placed(&t(&v1, "c", row(2, "two")), 2, 1, None, Some(1)))
        .raw(&placed(
            &t(&v2, "u", json!({"id": 1, "data": "one", "extra": 7})),
            3,
            1,
            Some(1),
            Some(2),
        ));
    a.write(&file);
    let db = two_tables().await;
    let mut cfg = config(&db, &[&file]);
    cfg.schema_changes = pg_replay::apply::SchemaChanges::Apply;
    let err = format!("{:#}", replay(cfg).await.unwrap_err());
    assert!(err.contains("a gap in the archive: unit 2"), "{err}");
    assert_eq!(db.rows("select * from t").await, ["(1,one)"]);
}

/// Two changes of columns that would both have to wait for a unit before
/// them (review of 430988f): t's at unit 4, then p's at unit 3, while unit 2
/// is still incomplete in the file. The second must not replace the first,
/// which would drop t's change and its row with no error: pg-replay
/// refuses, names both units, and applies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_schema_change_waiting_beside_another_is_refused_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = [("id", "int32", "integer"), ("data", "string", "text")];
    let v2 = [
        ("id", "int32", "integer"),
        ("data", "string", "text"),
        ("extra", "int32", "integer"),
    ];
    let p1 = [("id", "int32", "integer")];
    let p2 = [("id", "int32", "integer"), ("x", "int32", "integer")];
    let t = |fields: &[(&str, &str, &str)], op: &str, after: Value| {
        event_with_schema(fields, op, after, 1)
    };
    // The same event, of table p.
    let p = |fields: &[(&str, &str, &str)], after: Value| {
        let mut v: Value = serde_json::from_str(&event_with_schema(fields, "c", after, 1)).unwrap();
        v["payload"]["source"]["table"] = json!("p");
        v["schema"]["name"] = json!("src.public.p.Envelope");
        v.to_string()
    };
    let file = dir.path().join("two-waiting.txt");
    let mut a = Archive::default();
    a.raw(&placed(&t(&v1, "c", row(1, "one")), 1, 1, Some(1), None))
        .raw(&placed(&p(&p1, json!({"id": 10})), 2, 1, None, Some(1)))
        .raw(&placed(
            &t(&v2, "u", json!({"id": 1, "data": "one", "extra": 7})),
            4,
            1,
            Some(1),
            Some(3),
        ))
        .raw(&placed(
            &p(&p2, json!({"id": 11, "x": 5})),
            3,
            1,
            Some(1),
            Some(2),
        ))
        .raw(&placed(&t(&v1, "c", row(2, "two")), 2, 2, Some(2), Some(1)));
    a.write(&file);
    let db = Db::new().await;
    db.exec("create table t (id int primary key, data text); create table p (id int primary key)")
        .await;
    let mut cfg = config(&db, &[&file]);
    cfg.schema_changes = pg_replay::apply::SchemaChanges::Apply;
    let err = format!("{:#}", replay(cfg).await.unwrap_err());
    assert!(
        err.contains("at unit 3, and of another table at unit 4") && err.contains("not two"),
        "{err}"
    );
    assert_eq!(db.rows("select * from t").await, Vec::<String>::new());
    assert_eq!(db.rows("select * from p").await, Vec::<String>::new());
}
