//! Issue 16.3: `--check` of pg-source, file-sink and pg-replay against real
//! services: a setup that would run passes (exit 0), one that would stop
//! fails (exit 1) naming the problem and its fix, and neither changes
//! anything.

use std::process::{Command, Output};

use crate::support::*;

fn run(bin: &str, args: &[&str]) -> (Option<i32>, String) {
    let out: Output = Command::new(bin).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code(), stdout)
}

/// The connector file of a fixture's source, as a user has it.
fn source_file(fx: &Fixture) -> std::path::PathBuf {
    let c = fx.source_connector();
    let config: serde_json::Map<String, serde_json::Value> = c
        .props
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let path = fx.dir.path().join("source.json");
    std::fs::write(
        &path,
        serde_json::json!({"name": c.name, "config": config}).to_string(),
    )
    .unwrap();
    path
}

fn topic_exists(topic: &str) -> bool {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let consumer: BaseConsumer = kafka().client_config(&[]).create().unwrap();
    let md = consumer
        .fetch_metadata(None, std::time::Duration::from_secs(10))
        .unwrap();
    md.topics().iter().any(|t| t.name() == topic)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_source_check_passes_a_logical_setup_and_names_what_breaks_it() {
    let fx = Fixture::logical().await;
    let file = source_file(&fx);
    let offsets = format!("{}offsets", fx.prefix);
    let args = [
        "--check",
        "--connector-config",
        file.to_str().unwrap(),
        "--offsets-topic",
        &offsets,
        "--bootstrap-servers",
        &bootstrap(),
    ];
    let bin = env!("CARGO_BIN_EXE_it-pg-source");
    let (code, out) = run(bin, &args);
    assert_eq!(code, Some(0), "{out}");
    for line in [
        "ok   wal_level = logical",
        "ok   table public.streaming_update_table: ",
        "published with replica identity full",
        "does not exist yet: the first start creates it",
        "stored position: none; a start does: initial snapshot, then stream changes",
        "ok   signal table tidemark.signal readable: snapshots on demand are on",
        "0 failed",
    ] {
        assert!(out.contains(line), "no {line:?} in\n{out}");
    }
    // Nothing was created: no slot, no topic.
    let slot = pg_source::modes::logical::default_slot_name(&fx.source_name);
    let slots: i64 =
        sqlx::query_scalar("select count(*) from pg_replication_slots where slot_name = $1")
            .bind(&slot)
            .fetch_one(&fx.pool)
            .await
            .unwrap();
    assert_eq!(slots, 0, "--check created the slot");
    assert!(!topic_exists(&fx.topic()), "--check created the topic");
    assert!(
        !topic_exists(&offsets),
        "--check created the positions topic"
    );

    // Updates would come without the old row: a run stops.
    sqlx::query("alter table streaming_update_table replica identity default")
        .execute(&fx.pool)
        .await
        .unwrap();
    let (code, out) = run(bin, &args);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("FAIL table public.streaming_update_table: ")
            && out.contains("run schema-init --capture logical --table"),
        "{out}"
    );
    assert!(out.contains("1 failed"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_source_check_of_changelog_mode_without_capture_fails_with_the_fix() {
    let fx = Fixture::new().await;
    let file = source_file(&fx);
    let offsets = format!("{}offsets", fx.prefix);
    let (code, out) = run(
        env!("CARGO_BIN_EXE_it-pg-source"),
        &[
            "--check",
            "--connector-config",
            file.to_str().unwrap(),
            "--mode",
            "changelog",
            "--table-whitelist",
            "public.streaming_update_table",
            "--offsets-topic",
            &offsets,
            "--bootstrap-servers",
            &bootstrap(),
        ],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(
            "FAIL change log: there is no tidemark.change_log: run schema-init --capture changelog"
        ),
        "{out}"
    );
    assert!(
        out.contains("has no change-log trigger: run schema-init --capture changelog --table public.streaming_update_table"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sink_check_passes_a_new_output_and_refuses_a_file_without_checkpoint() {
    let fx = Fixture::new().await;
    let topic = fx.topic();
    let admin = kafka().admin().unwrap();
    tidemark_common::kafka::ensure_topic(
        &admin,
        &topic,
        &tidemark_common::kafka::TopicSpec {
            partitions: 2,
            replication_factor: -1,
            configs: Vec::new(),
        },
    )
    .await
    .unwrap();
    let file = fx.file();
    let args = [
        "--check",
        "--name",
        &fx.sink_name,
        "--topics",
        &topic,
        "--file",
        file.to_str().unwrap(),
        "--bootstrap-servers",
        &bootstrap(),
    ];
    let bin = env!("CARGO_BIN_EXE_it-file-sink");
    let (code, out) = run(bin, &args);
    assert_eq!(code, Some(0), "{out}");
    for line in [
        "exists and is writable",
        "no file and no checkpoint yet",
        &format!("ok   topic {topic}: 2 partition(s), 0 record(s) to write"),
        "0 failed, 0 warnings",
    ] {
        assert!(out.contains(line), "no {line:?} in\n{out}");
    }
    let left: Vec<_> = std::fs::read_dir(fx.dir.path()).unwrap().collect();
    assert!(left.is_empty(), "--check created files: {left:?}");

    // Lines nobody can account for: a run would stop.
    std::fs::write(&file, "{\"a\":1}\n").unwrap();
    let (code, out) = run(bin, &args);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("holds 8 bytes but has no checkpoint")
            && out.contains("fix: move the file away"),
        "{out}"
    );
    // A missing folder, and a topic that is not there yet (a warning).
    let missing = fx.dir.path().join("no-such-folder").join("out.txt");
    let (code, out) = run(
        bin,
        &[
            "--check",
            "--name",
            &fx.sink_name,
            "--topics",
            &format!("{topic}-missing"),
            "--file",
            missing.to_str().unwrap(),
            "--bootstrap-servers",
            &bootstrap(),
        ],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("FAIL the output folder") && out.contains("does not exist"),
        "{out}"
    );
    assert!(
        out.contains("-missing does not exist: file-sink waits for it"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_replay_check_passes_a_ready_target_and_refuses_a_table_without_key() {
    use crate::replay::{event, Db};
    let db = Db::new().await;
    db.exec("create table p (id int primary key, data text not null)")
        .await;
    db.exec("create table q (id int, data text not null)").await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("archive.txt");
    let row = |id: i64| serde_json::json!({"id": id, "data": "x"});
    let lines = [event(
        "c",
        "p",
        serde_json::Value::Null,
        row(1),
        1,
        1,
        Some(1),
        100,
        1,
    )];
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let url = db.url();
    let bin = env!("CARGO_BIN_EXE_it-pg-replay");
    let (code, out) = run(
        bin,
        &[
            "--check",
            "--input",
            input.to_str().unwrap(),
            "--target-url",
            &url,
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    for line in [
        "archive file",
        "tidemark.replay_position does not exist yet",
        "tables of the archive",
        "ok   target table public.p: 2 columns, primary key of 1 column(s), writable",
        "0 failed",
    ] {
        assert!(out.contains(line), "no {line:?} in\n{out}");
    }
    let created: bool =
        sqlx::query_scalar("select to_regclass('tidemark.replay_position') is not null")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(!created, "--check created the position table");

    let (code, out) = run(
        bin,
        &[
            "--check",
            "--input",
            input.to_str().unwrap(),
            "--target-url",
            &url,
            "--table",
            "public.p=public.q",
        ],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("FAIL target table public.q: target table public.q has no primary key"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_source_check_of_timestamp_mode_warns_of_a_poll_without_index() {
    let fx = Fixture::new().await;
    sqlx::raw_sql(
        "create table plain (id serial primary key, last_updated timestamp not null default now())",
    )
    .execute(&fx.pool)
    .await
    .unwrap();
    let file = source_file(&fx);
    let offsets = format!("{}offsets", fx.prefix);
    let (code, out) = run(
        env!("CARGO_BIN_EXE_it-pg-source"),
        &[
            "--check",
            "--connector-config",
            file.to_str().unwrap(),
            "--table-whitelist",
            "public.streaming_update_table,public.plain",
            "--offsets-topic",
            &offsets,
            "--bootstrap-servers",
            &bootstrap(),
        ],
    );
    assert_eq!(code, Some(0), "a warning does not stop a run: {out}");
    assert!(
        out.contains("WARN table public.plain has no index on (last_updated, id): every poll reads the whole table")
            && out.contains(r#"fix: create index on "public"."plain" ("last_updated", "id")"#),
        "{out}"
    );
    assert!(
        !out.contains("table public.streaming_update_table has no index"),
        "schema-init made the seed's index: {out}"
    );
    // Two tables of one name in two schemas would share a topic.
    sqlx::raw_sql("create schema other; create table other.plain (id int primary key, last_updated timestamp)")
        .execute(&fx.pool)
        .await
        .unwrap();
    let (code, collide) = run(
        env!("CARGO_BIN_EXE_it-pg-source"),
        &[
            "--check",
            "--connector-config",
            file.to_str().unwrap(),
            "--table-whitelist",
            "public.plain,other.plain",
            "--offsets-topic",
            &offsets,
            "--bootstrap-servers",
            &bootstrap(),
        ],
    );
    assert_eq!(code, Some(1), "{collide}");
    assert!(collide.contains("FAIL topics: "), "{collide}");
    // A fresh broker has no transaction log before the first transaction.
    assert!(
        out.contains("kafka: the transaction log exists")
            || out.contains("kafka: the brokers can create the transaction log"),
        "{out}"
    );
}

/// `--check` in changelog mode says whether snapshots on demand are on: the
/// signal table readable, or a WARN with the fix when it is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_source_check_of_changelog_mode_says_whether_signals_are_read() {
    let fx = Fixture::changelog(schema_init::TriggerLevel::Row).await;
    let file = source_file(&fx);
    let offsets = format!("{}offsets", fx.prefix);
    let args = [
        "--check",
        "--connector-config",
        file.to_str().unwrap(),
        "--mode",
        "changelog",
        "--table-whitelist",
        "public.streaming_update_table",
        "--offsets-topic",
        &offsets,
        "--bootstrap-servers",
        &bootstrap(),
    ];
    let bin = env!("CARGO_BIN_EXE_it-pg-source");
    let (_, out) = run(bin, &args);
    assert!(
        out.contains("ok   signal table tidemark.signal readable: snapshots on demand are on"),
        "{out}"
    );
    sqlx::query("drop table tidemark.signal")
        .execute(&fx.pool)
        .await
        .unwrap();
    let (_, out) = run(bin, &args);
    assert!(
        out.contains("WARN no signal table tidemark.signal: snapshots on demand are off")
            && out.contains("run schema-init --capture changelog of this release"),
        "{out}"
    );
}
