//! pg-source refuses what would go wrong silently, and one table's trouble
//! does not stop the others: odd table names in logical mode, two tables
//! that would share a topic, a view, a row larger than Kafka takes, a
//! captured table dropped while running.

use std::time::Duration;

use futures::StreamExt as _;
use rdkafka::consumer::Consumer as _;
use rdkafka::Message as _;
use tidemark_common::config::ConnectorConfig;
use tidemark_common::envelope::{ChangeEvent, Op};
use tidemark_common::pg::TableName;
use tokio_util::sync::CancellationToken;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);

async fn exec(pool: &sqlx::PgPool, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Gives `table` logical capture, as `schema-init --capture logical` does.
async fn capture(fx: &Fixture, table: &str) {
    for step in schema_init::logical_steps(&TableName::parse(table).unwrap()) {
        exec(&fx.pool, &step.sql).await;
    }
}

/// The first `n` change events of `topic` (tombstones left out).
async fn events(topic: &str, n: usize) -> Vec<ChangeEvent> {
    let consumer = topic_consumer(topic);
    let mut stream = consumer.stream();
    let mut out = Vec::new();
    while out.len() < n {
        let msg = tokio::time::timeout(WAIT, stream.next())
            .await
            .unwrap_or_else(|_| panic!("{} events of {n} in {topic}", out.len()))
            .unwrap()
            .unwrap();
        if let Some(v) = msg.payload() {
            out.push(ChangeEvent::decode(v).unwrap());
        }
    }
    out
}

/// Whether Kafka has `topic`.
fn topic_exists(topic: &str) -> bool {
    let consumer: rdkafka::consumer::BaseConsumer = kafka().client_config(&[]).create().unwrap();
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    md.topics().iter().any(|t| t.name() == topic)
}

/// What `run` failed with, within 60 s.
async fn run_error(c: &ConnectorConfig, offsets: String) -> String {
    let (mut cfg, _) = pg_source::Config::from_connector(c, kafka()).unwrap();
    cfg.offsets_topic = offsets;
    let run = pg_source::run(cfg, CancellationToken::new());
    match tokio::time::timeout(Duration::from_secs(60), run).await {
        Ok(Err(e)) => format!("{e:#}"),
        Ok(Ok(())) => panic!("pg-source stopped without an error"),
        Err(_) => panic!("pg-source kept running instead of failing"),
    }
}

fn connector(fx: &Fixture, overrides: &[(&str, &str)]) -> ConnectorConfig {
    let mut c = fx.source_connector();
    c.apply_overrides(overrides.iter().map(|(k, v)| (*k, Some((*v).to_owned()))));
    c
}

/// Issue 10.9: tables named as ORMs name them, with upper case or a space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_mode_captures_tables_with_upper_case_and_spaces_in_their_names() {
    let fx = Fixture::logical().await;
    for t in [r#""CamelCase""#, r#""Users""#, r#""a b""#] {
        exec(
            &fx.pool,
            &format!("create table {t} (id int primary key, v text)"),
        )
        .await;
        capture(&fx, t).await;
        exec(&fx.pool, &format!("insert into {t} values (1, 'before')")).await;
    }
    let source = fx
        .start_source_with(&[("table.whitelist", r#""CamelCase","Users","a b""#)])
        .ready()
        .await;
    for t in [r#""CamelCase""#, r#""Users""#, r#""a b""#] {
        exec(&fx.pool, &format!("update {t} set v = 'after'")).await;
    }
    for topic in ["CamelCase", "Users", "a_b"] {
        let got = events(&format!("{}{topic}", fx.prefix), 2).await;
        assert_eq!(got[0].op, Op::Read, "{topic}");
        assert_eq!(got[1].op, Op::Update, "{topic}");
        assert_eq!(got[1].after.as_ref().unwrap()["v"], "after", "{topic}");
    }
    source.stop().await.unwrap();
    fx.drop_slot().await;
}

/// Issue 10.15: a view in `table.whitelist` is refused as a view, before
/// any topic is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_is_refused_as_a_view_before_any_topic_is_created() {
    let fx = Fixture::changelog(schema_init::TriggerLevel::Row).await;
    exec(
        &fx.pool,
        "create view v as select * from streaming_update_table",
    )
    .await;
    let err = run_error(
        &connector(&fx, &[("table.whitelist", "v")]),
        format!("{}offsets", fx.prefix),
    )
    .await;
    assert!(err.contains("public.v is a view"), "{err}");
    assert!(!topic_exists(&format!("{}v", fx.prefix)));
    assert!(!topic_exists(&format!("{}offsets", fx.prefix)));
}

/// Issue 10.14: a change larger than Kafka accepts stops pg-source (nothing
/// may be sent past it), with a message that names the table, the key and
/// the limits to raise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_row_stops_pg_source_naming_table_key_and_limits() {
    let fx = Fixture::logical().await;
    exec(&fx.pool, "create table big (id int primary key, t text)").await;
    capture(&fx, "big").await;
    let c = connector(&fx, &[("table.whitelist", "big")]);
    let (mut cfg, _) = pg_source::Config::from_connector(&c, kafka()).unwrap();
    cfg.offsets_topic = format!("{}offsets", fx.prefix);
    let health = cfg.health.clone();
    let run = tokio::spawn(pg_source::run(cfg, CancellationToken::new()));
    assert!(health.wait_ready(WAIT).await);
    // 1.2 MB of text that does not compress away in the WAL check.
    exec(
        &fx.pool,
        "insert into big select 42, string_agg(md5(g::text), '') from generate_series(1, 40000) g",
    )
    .await;
    let err = tokio::time::timeout(WAIT, run)
        .await
        .expect("pg-source stops")
        .unwrap()
        .expect_err("pg-source fails");
    let err = format!("{err:#}");
    for want in [
        "public.big",
        r#""id":42"#,
        "message.max.bytes",
        "queue.buffering.max.kbytes",
    ] {
        assert!(err.contains(want), "{want} in {err}");
    }
    fx.drop_slot().await;
}

/// Issue 10.11, logical mode: a captured table dropped while pg-source
/// runs; its changes up to the drop are sent, the other table goes on, and
/// a restart does not stop at the missing table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_mode_goes_on_when_a_captured_table_is_dropped() {
    let fx = Fixture::logical().await;
    exec(&fx.pool, "create table gone (id int primary key, v text)").await;
    capture(&fx, "gone").await;
    let tables = [
        ("table.whitelist", "gone,streaming_update_table"),
        ("snapshot.mode", "no_data"),
    ];
    let source = fx.start_source_with(&tables).ready().await;
    exec(&fx.pool, "insert into gone values (1, 'last words')").await;
    exec(&fx.pool, "drop table gone").await;
    exec(
        &fx.pool,
        "insert into streaming_update_table (data) values ('after the drop')",
    )
    .await;
    let gone = events(&format!("{}gone", fx.prefix), 1).await;
    assert_eq!(gone[0].after.as_ref().unwrap()["v"], "last words");
    let seed = fx.topic();
    let got = events(&seed, 1).await;
    assert_eq!(got[0].after.as_ref().unwrap()["data"], "after the drop");
    source.assert_running();
    source.stop().await.unwrap();

    let source = fx.start_source_with(&tables).ready().await;
    exec(
        &fx.pool,
        "insert into streaming_update_table (data) values ('after the restart')",
    )
    .await;
    let got = events(&seed, 2).await;
    assert_eq!(got[1].after.as_ref().unwrap()["data"], "after the restart");
    source.assert_running();
    source.stop().await.unwrap();
    fx.drop_slot().await;
}
