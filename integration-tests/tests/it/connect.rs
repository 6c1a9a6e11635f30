//! A real Kafka Connect 4.3.1 worker reads Tidemark's topics: every value a
//! Connect application gets from `JsonConverter` (`schemas.enable=true`) must
//! be the value written in Postgres.
//!
//! Each type of the codec's round-trip cases (every built-in type with its
//! edge values: floats with `NaN`, `±Infinity` and `-0`, timestamps past
//! int64 µs, `json` kept as text, `jsonb` `null`; arrays of each in one and
//! two dimensions and with lower bounds other than 1; the contrib types) gets
//! a table. Half the rows are there before pg-source starts (its initial
//! snapshot), the others are inserted after, and the odd ones updated (so
//! `before` is read too). One worker runs two sinks over all the tables'
//! topics (see `connect_worker`): Connect's `FileStreamSinkConnector` and the
//! tests' exact sink. Then, for every field of every key and row image:
//! - Connect's value, played back with the field schema Connect read
//!   (`codec::to_pg_text`) and printed by Postgres, must be the table's value
//!   as Postgres prints it: one digit, microsecond or byte off is a loss;
//! - so must Tidemark's own record (else the loss is Tidemark's, not the
//!   reader's, and the message says so);
//! - FileStreamSink's file must hold, once for each record, what
//!   `Struct.toString()` prints for that value (a `bytes` value prints as
//!   `[B@<hash>` there: the exact sink is what shows its content);
//! - the rest of the envelope (`source`, `op`, `ts_ms`, ...) must read as
//!   written.
//!
//! What Connect cannot read back exactly even with the right schema is named
//! in [`CONNECT_LOSSES`] and the README; the test fails if one of them no
//! longer happens, so the list stays true. Values carried as their exact
//! text under `tidemark.data.PgText` reach a Connect application as strings:
//! the kinds are in [`PG_TEXT_KINDS`], and any other is a failure.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Headers as _;
use rdkafka::Message as _;
use schema_init::TriggerLevel;
use serde_json::Value;
use sqlx::PgPool;
use tidemark_common::codec::{parse_record, to_pg_text};
use tidemark_common::kafka::{ensure_topic, TopicSpec};
use tidemark_common::pg::TableName;
use tokio_util::sync::CancellationToken;

use crate::codec::{
    builtin_cases, case_table, contrib_cases, lit, Case, CONTRIB_EXTENSIONS, USER_TYPES,
};
use crate::connect_worker::{read_dump_file, read_exact_records, struct_dump, ExactRecord, Worker};
use crate::support::*;

/// How long each wait may take (records in Kafka, then in the sinks' files).
const WAIT: Duration = Duration::from_secs(180);

/// What Connect's `JsonConverter` cannot read back exactly, whatever the
/// schema says: Jackson reads the JSON number `-0` as the integer 0 (and
/// `-0.0` as a `BigDecimal`, which has no negative zero), so a `real` or
/// `double precision` `-0` arrives as `0.0`, alone or in an array.
pub const CONNECT_LOSSES: &[&str] = &["a float -0 reads as 0.0"];

/// The values that travel as their exact Postgres text (`string`,
/// `tidemark.data.PgText`), so a Connect application gets a string where
/// the type's usual schema would give a number or a list.
pub const PG_TEXT_KINDS: &[&str] = &[
    "a float NaN or ±Infinity",
    "a float array with a NaN or ±Infinity element",
    "an array whose lower bounds are not 1",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_connect_reads_every_type_exactly_in_changelog_mode() {
    connect_reads_every_type(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_connect_reads_every_type_exactly_in_logical_mode() {
    connect_reads_every_type(true).await;
}

/// One table of the test: its case and its rows.
struct Table {
    name: String,
    ty: &'static str,
    rows: Vec<String>,
}

async fn exec(pool: &PgPool, sql: &str) {
    sqlx::query(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn connect_reads_every_type(logical: bool) {
    let started = Instant::now();
    // Fetch the jars and compile the fixture while Postgres works.
    let kit = tokio::spawn(crate::connect_worker::connect_kit());
    let fx = if logical {
        Fixture::logical().await
    } else {
        Fixture::changelog(TriggerLevel::Row).await
    };
    for ext in CONTRIB_EXTENSIONS {
        exec(&fx.pool, &format!("create extension {ext}")).await;
    }
    for stmt in USER_TYPES.split(";\n").filter(|s| !s.trim().is_empty()) {
        exec(&fx.pool, stmt).await;
    }
    let cases: Vec<Case> = builtin_cases().into_iter().chain(contrib_cases()).collect();
    let mut tables = Vec::new();
    for (n, case) in cases.iter().enumerate() {
        let name = format!("c{n}");
        let (columns, rows) = case_table(case);
        exec(&fx.pool, &format!("create table public.{name} ({columns})")).await;
        let table = TableName::parse(&format!("public.{name}")).unwrap();
        let steps = if logical {
            schema_init::logical_steps(&table)
        } else {
            schema_init::changelog_steps(&table, TriggerLevel::Row)
        };
        for step in steps {
            exec(&fx.pool, &step.sql).await;
        }
        tables.push(Table {
            name,
            ty: case.ty,
            rows,
        });
    }
    // Even rows for the initial snapshot, odd ones for the stream.
    let insert = |t: &Table, odd: bool| {
        let rows: Vec<&str> = t
            .rows
            .iter()
            .enumerate()
            .filter(|(i, _)| (i % 2 == 1) == odd)
            .map(|(_, r)| r.as_str())
            .collect();
        format!("insert into public.{} values {}", t.name, rows.join(", "))
    };
    for t in &tables {
        exec(&fx.pool, &insert(t, false)).await;
    }

    let whitelist: Vec<String> = tables
        .iter()
        .map(|t| format!("public.{}", t.name))
        .collect();
    let mut c = fx.source_connector();
    c.apply_overrides([("table.whitelist", Some(whitelist.join(",")))]);
    let (mut cfg, _) = pg_source::Config::from_connector(&c, kafka()).unwrap();
    cfg.offsets_topic = format!("{}offsets", fx.prefix);
    let health = cfg.health.clone();
    let token = CancellationToken::new();
    let mut source = tokio::spawn(pg_source::run(cfg, token.clone()));
    let ready = Instant::now();
    while !health.is_ready() {
        if source.is_finished() {
            let result = (&mut source).await.expect("pg-source does not panic");
            panic!("pg-source stopped before it read: {result:?}");
        }
        assert!(
            ready.elapsed() < WAIT,
            "pg-source not ready within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // pg-source made the topics before it said it reads.
    let topics = table_topics(&fx.prefix, &tables);
    let dlq_exact = format!("{}connect-dlq-exact", fx.prefix);
    let dlq_file = format!("{}connect-dlq-file", fx.prefix);
    let admin = kafka().admin().unwrap();
    let spec = TopicSpec {
        partitions: 1,
        replication_factor: -1,
        configs: Vec::new(),
    };
    for t in [&dlq_exact, &dlq_file] {
        ensure_topic(&admin, t, &spec).await.unwrap();
    }
    kit.await.unwrap();
    let exact_file = fx.dir.path().join("exact.jsonl");
    let dump_file = fx.dir.path().join("filestream.txt");
    let sink = |name: &str, class: &str, file: &std::path::Path, dlq: &str| {
        [
            ("name", name),
            ("connector.class", class),
            ("tasks.max", "1"),
            ("topics", &topics.join(",")),
            ("file", &file.display().to_string()),
            // A record the converter refuses goes to a dead-letter topic with
            // the reason in its headers, and the sink goes on.
            ("errors.tolerance", "all"),
            ("errors.deadletterqueue.topic.name", dlq),
            ("errors.deadletterqueue.topic.replication.factor", "1"),
            ("errors.deadletterqueue.context.headers.enable", "true"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect::<Vec<_>>()
    };
    // Connector names are unique: each sink's consumer group is
    // `connect-<name>`.
    let mut worker = Worker::start(
        fx.dir.path(),
        &bootstrap(),
        &[],
        &[
            sink(
                &format!("{}exact", fx.sink_name),
                "dev.tidemark.it.ExactSinkConnector",
                &exact_file,
                &dlq_exact,
            ),
            sink(
                &format!("{}file", fx.sink_name),
                "org.apache.kafka.connect.file.FileStreamSinkConnector",
                &dump_file,
                &dlq_file,
            ),
        ],
    )
    .await;

    for t in &tables {
        exec(&fx.pool, &insert(t, true)).await;
        exec(
            &fx.pool,
            &format!("update public.{} set id = id where id % 2 = 1", t.name),
        )
        .await;
    }
    let expected: usize = tables.iter().map(|t| t.rows.len() + t.rows.len() / 2).sum();

    // What Tidemark wrote, as a read_committed reader gets it.
    let raw = read_records(&topics, expected, &mut source).await;
    let mut dlq = Dlq::new(&dlq_exact, &dlq_file);
    let waited = Instant::now();
    loop {
        worker.assert_running();
        dlq.poll().await;
        let exact = read_exact_records(&exact_file).len() + dlq.exact.len();
        // A record's dump starts a line with `Struct{` (a string value's own
        // line ends may add lines); the comparison below counts exactly.
        let dumps = read_dump_file(&dump_file)
            .split_inclusive('\n')
            .filter(|l| l.starts_with("Struct{") && l.ends_with('\n'))
            .count()
            + dlq.file.len();
        if exact >= expected && dumps >= expected {
            break;
        }
        assert!(
            waited.elapsed() < WAIT,
            "waited {WAIT:?} for {expected} records in each sink: the exact sink has {exact}, FileStreamSink {dumps} (dead letters included); the worker's log ends:\n{}",
            worker.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker.stop();
    token.cancel();
    tokio::time::timeout(Duration::from_secs(30), source)
        .await
        .expect("pg-source stops within 30 s")
        .expect("pg-source does not panic")
        .expect("pg-source stops cleanly");
    fx.drop_slot().await;
    let read_at = started.elapsed();

    let tidemark = fx.target.connect(2, Duration::from_secs(10)).await.unwrap();
    let originals = originals(&tidemark, &tables).await;
    let exact = read_exact_records(&exact_file);
    let found = compare(&tidemark, &tables, &originals, &raw, &exact, &dlq).await;
    let mut problems = found.problems;
    problems.extend(compare_dumps(&exact, &read_dump_file(&dump_file), &dlq));
    eprintln!(
        "connect ({} mode): {} records, {} values compared in {:?} ({:?} until every record was read); Connect losses: {:?}; as text: {:?}",
        if logical { "logical" } else { "changelog" },
        raw.len(),
        found.values,
        started.elapsed(),
        read_at,
        found.losses.keys().collect::<Vec<_>>(),
        found.pg_text,
    );
    let summary: Vec<String> = found
        .summary
        .iter()
        .map(|(k, n)| format!("  {k}: {n}"))
        .collect();
    assert!(
        problems.is_empty(),
        "{} problems in {} values; by type and column:\n{}\nthe first 100:\n{}",
        problems.len(),
        found.values,
        summary.join("\n"),
        problems
            .iter()
            .take(100)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let losses: BTreeSet<&str> = found.losses.keys().copied().collect();
    assert_eq!(
        losses,
        CONNECT_LOSSES.iter().copied().collect(),
        "the values Connect cannot read exactly are as documented: {:#?}",
        found.losses
    );
    let kinds: BTreeSet<&str> = found.pg_text.iter().copied().collect();
    assert!(
        kinds.is_subset(&PG_TEXT_KINDS.iter().copied().collect()),
        "{kinds:?}"
    );
}

/// The tables' topics, as pg-source named them (prefix and table, with or
/// without the schema).
fn table_topics(prefix: &str, tables: &[Table]) -> Vec<String> {
    let consumer: StreamConsumer = kafka().client_config(&[]).create().unwrap();
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    let names: BTreeSet<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    let topics: Vec<String> = metadata
        .topics()
        .iter()
        .map(|t| t.name())
        .filter(|t| {
            t.strip_prefix(prefix)
                .map(|rest| rest.strip_prefix("public.").unwrap_or(rest))
                .is_some_and(|table| names.contains(table))
        })
        .map(str::to_owned)
        .collect();
    assert_eq!(
        topics.len(),
        tables.len(),
        "one topic per table with prefix {prefix}: {topics:?}"
    );
    topics
}

/// A record as Tidemark wrote it.
struct RawRecord {
    key: Value,
    value: Value,
}

/// Reads `topics` from their beginning as a `read_committed` consumer until
/// `n` records arrived, by (topic, partition, offset). Fails if pg-source
/// stops.
async fn read_records(
    topics: &[String],
    n: usize,
    source: &mut tokio::task::JoinHandle<anyhow::Result<()>>,
) -> BTreeMap<(String, i32, i64), RawRecord> {
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let consumer = topics_consumer(&names);
    let mut records = BTreeMap::new();
    let start = Instant::now();
    while records.len() < n {
        if source.is_finished() {
            let result = source.await.expect("pg-source does not panic");
            panic!("pg-source stopped: {result:?}");
        }
        assert!(
            start.elapsed() < WAIT,
            "waited {WAIT:?} for {n} records in the tables' topics, found {}",
            records.len()
        );
        let Ok(msg) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
        else {
            continue;
        };
        let msg = msg.unwrap();
        let json = |bytes: Option<&[u8]>| {
            bytes.map_or(Value::Null, |b| {
                serde_json::from_slice(b).unwrap_or_else(|e| {
                    panic!(
                        "a record that is not JSON ({e}): {}",
                        String::from_utf8_lossy(b)
                    )
                })
            })
        };
        records.insert(
            (msg.topic().to_owned(), msg.partition(), msg.offset()),
            RawRecord {
                key: json(msg.key()),
                value: json(msg.payload()),
            },
        );
    }
    records
}

/// The records each sink's converter refused, with Connect's reason.
struct Dlq {
    consumer: StreamConsumer,
    exact_topic: String,
    /// (topic, partition, offset) → exception message.
    exact: HashMap<(String, i32, i64), String>,
    file: HashMap<(String, i32, i64), String>,
}

impl Dlq {
    fn new(exact: &str, file: &str) -> Self {
        let consumer: StreamConsumer = kafka()
            .client_config(&[
                ("group.id", &unique("dlq")),
                ("auto.offset.reset", "earliest"),
            ])
            .create()
            .unwrap();
        consumer.subscribe(&[exact, file]).unwrap();
        Self {
            consumer,
            exact_topic: exact.to_owned(),
            exact: HashMap::new(),
            file: HashMap::new(),
        }
    }

    /// Takes what arrived, waiting at most 100 ms.
    async fn poll(&mut self) {
        while let Ok(msg) =
            tokio::time::timeout(Duration::from_millis(100), self.consumer.recv()).await
        {
            let msg = msg.unwrap();
            let mut h = HashMap::new();
            if let Some(headers) = msg.headers() {
                for header in headers.iter() {
                    h.insert(
                        header.key.to_owned(),
                        String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                    );
                }
            }
            let get = |k: &str| {
                h.get(&format!("__connect.errors.{k}"))
                    .cloned()
                    .unwrap_or_default()
            };
            let at = (
                get("topic"),
                get("partition").parse().unwrap_or(-1),
                get("offset").parse().unwrap_or(-1),
            );
            let why = format!(
                "{}: {}",
                get("exception.class.name"),
                get("exception.message")
            );
            if msg.topic() == self.exact_topic {
                self.exact.insert(at, why);
            } else {
                self.file.insert(at, why);
            }
        }
    }
}

/// One table's column names and SQL types, and each row's column texts by
/// `id`, as Postgres prints them under Tidemark's settings.
struct Original {
    columns: Vec<(String, String)>,
    rows: HashMap<i64, Vec<Option<String>>>,
}

async fn originals(tidemark: &PgPool, tables: &[Table]) -> HashMap<String, Original> {
    let mut out = HashMap::new();
    for t in tables {
        let columns: Vec<(String, String)> = sqlx::query_as(
            "select a.attname::pg_catalog.text, pg_catalog.format_type(a.atttypid, a.atttypmod) \
             from pg_catalog.pg_attribute a \
             where a.attrelid = $1::pg_catalog.regclass and a.attnum > 0 and not a.attisdropped \
             order by a.attnum",
        )
        .bind(format!("public.{}", t.name))
        .fetch_all(tidemark)
        .await
        .unwrap();
        let records: Vec<(i32, String)> = sqlx::query_as(&format!(
            "select t.id, pg_catalog.textin(pg_catalog.record_out(t.*)) from public.{} t",
            t.name
        ))
        .fetch_all(tidemark)
        .await
        .unwrap();
        let rows = records
            .into_iter()
            .map(|(id, record)| {
                let texts = parse_record(&record)
                    .unwrap()
                    .into_iter()
                    .map(|f| f.map(|c| c.into_owned()))
                    .collect();
                (i64::from(id), texts)
            })
            .collect();
        out.insert(t.name.clone(), Original { columns, rows });
    }
    out
}

/// What the comparison found.
#[derive(Default)]
struct Found {
    problems: Vec<String>,
    /// Known losses ([`CONNECT_LOSSES`]) and where they happened.
    losses: BTreeMap<&'static str, Vec<String>>,
    /// Kinds of values Connect got as `tidemark.data.PgText` strings.
    pg_text: BTreeSet<&'static str>,
    /// Problems by case type and column, and whose loss they are.
    summary: BTreeMap<String, usize>,
    values: usize,
}

/// The field schemas of row image `which` (`before`, `after`) in a value
/// schema, or of the key schema itself (`which` empty).
fn image_fields<'a>(schema: &'a Value, which: &str) -> Option<&'a Vec<Value>> {
    let image = if which.is_empty() {
        schema
    } else {
        schema["fields"]
            .as_array()?
            .iter()
            .find(|f| f["field"] == which)?
    };
    image["fields"].as_array()
}

/// One value to check: where, the column's SQL type and original text,
/// the field schema and JSON Tidemark wrote, and those Connect read.
struct Check<'a> {
    at: String,
    /// The case's type and the column, for the summary.
    ty: &'a str,
    column: &'a str,
    sql_type: &'a str,
    original: Option<&'a str>,
    tidemark: (&'a Value, &'a Value),
    connect: (Option<&'a Value>, &'a Value),
}

async fn compare(
    tidemark: &PgPool,
    tables: &[Table],
    originals: &HashMap<String, Original>,
    raw: &BTreeMap<(String, i32, i64), RawRecord>,
    exact: &[ExactRecord],
    dlq: &Dlq,
) -> Found {
    let mut found = Found::default();
    let types: HashMap<&str, &str> = tables.iter().map(|t| (t.name.as_str(), t.ty)).collect();
    let mut by_place: HashMap<(&str, i32, i64), &ExactRecord> = HashMap::new();
    for e in exact {
        if by_place
            .insert((e.topic.as_str(), e.partition, e.offset), e)
            .is_some()
        {
            found.problems.push(format!(
                "the exact sink got {} partition {} offset {} twice",
                e.topic, e.partition, e.offset
            ));
        }
    }
    if exact.len() + dlq.exact.len() != raw.len() {
        found.problems.push(format!(
            "Tidemark wrote {} records; the exact sink read {} and refused {}",
            raw.len(),
            exact.len(),
            dlq.exact.len()
        ));
    }
    for ((topic, partition, offset), record) in raw {
        let place = format!("{topic} partition {partition} offset {offset}");
        let source = &record.value["payload"]["source"];
        let table = source["table"].as_str().unwrap_or_default();
        let Some(original) = originals.get(table) else {
            found.problems.push(format!(
                "{place}: a record of no test table: {}",
                record.value
            ));
            continue;
        };
        let ty = types[table];
        if let Some(why) = dlq.exact.get(&(topic.clone(), *partition, *offset)) {
            found.problems.push(format!(
                "{table} ({ty}) {place}: Connect's converter refused the record: {why}"
            ));
            continue;
        }
        let Some(connect) = by_place.get(&(topic.as_str(), *partition, *offset)) else {
            found.problems.push(format!(
                "{table} ({ty}) {place}: the exact sink never got it"
            ));
            continue;
        };
        if let Some(invalid) = &connect.invalid {
            found
                .problems
                .push(format!("{table} ({ty}) {place}: {invalid}"));
        }
        // The envelope around the row images reads as written.
        let strip = |v: &Value| {
            let mut v = v["payload"].clone();
            if let Some(o) = v.as_object_mut() {
                o.remove("before");
                o.remove("after");
            }
            v
        };
        if strip(&record.value) != strip(&connect.value) {
            found.problems.push(format!(
                "{table} ({ty}) {place}: the envelope was {}, Connect read {}",
                strip(&record.value),
                strip(&connect.value)
            ));
        }
        let mut checks = Vec::new();
        for (which, tm, cn) in [
            ("key", &record.key, &connect.key),
            ("before", &record.value, &connect.value),
            ("after", &record.value, &connect.value),
        ] {
            let image = if which == "key" { "" } else { which };
            let tm_row = if image.is_empty() {
                &tm["payload"]
            } else {
                &tm["payload"][image]
            };
            let cn_row = if image.is_empty() {
                &cn["payload"]
            } else {
                &cn["payload"][image]
            };
            if tm_row.is_null() {
                if !cn_row.is_null() {
                    found.problems.push(format!(
                        "{table} ({ty}) {place}: no {which} was written, Connect read {cn_row}"
                    ));
                }
                continue;
            }
            let Some(id) = tm_row["id"].as_i64() else {
                found.problems.push(format!(
                    "{table} ({ty}) {place}: {which} without an id: {tm_row}"
                ));
                continue;
            };
            let Some(texts) = original.rows.get(&id) else {
                found.problems.push(format!(
                    "{table} ({ty}) {place}: {which} of id {id}, which the table lacks"
                ));
                continue;
            };
            let tm_fields = image_fields(&tm["schema"], image).map_or(&[][..], Vec::as_slice);
            let cn_fields = image_fields(&cn["schema"], image).map_or(&[][..], Vec::as_slice);
            for (c, (column, sql_type)) in original.columns.iter().enumerate() {
                if image.is_empty() && column != "id" {
                    continue;
                }
                let Some(tm_field) = tm_fields.iter().find(|f| f["field"] == column.as_str())
                else {
                    found.problems.push(format!(
                        "{table} ({ty}) {place}: {which} has no field {column}"
                    ));
                    continue;
                };
                checks.push(Check {
                    at: format!("{table} ({ty}) id {id} {which}.{column}"),
                    ty,
                    column,
                    sql_type,
                    original: texts[c].as_deref(),
                    tidemark: (tm_field, &tm_row[column.as_str()]),
                    connect: (
                        cn_fields.iter().find(|f| f["field"] == column.as_str()),
                        &cn_row[column.as_str()],
                    ),
                });
            }
        }
        check_values(tidemark, &checks, &mut found).await;
    }
    found
}

/// Plays each check's values back and compares them with the original.
async fn check_values(tidemark: &PgPool, checks: &[Check<'_>], found: &mut Found) {
    let mut texts: Vec<(&str, Option<String>)> = Vec::new();
    let mut played = Vec::new();
    for check in checks {
        found.values += 1;
        let tm = to_pg_text(check.tidemark.0, check.tidemark.1);
        let cn = match check.connect.0 {
            Some(schema) => to_pg_text(schema, check.connect.1).map_err(|e| e.to_string()),
            None => Err("no such field in the schema Connect read".to_owned()),
        };
        if let Some(schema) = check.connect.0 {
            if schema["name"] == "tidemark.data.PgText" {
                found
                    .pg_text
                    .insert(pg_text_kind(check.sql_type, check.original));
            }
        }
        for text in [
            tm.as_ref().ok().cloned().flatten(),
            cn.as_ref().ok().cloned().flatten(),
        ] {
            texts.push((check.sql_type, text));
        }
        played.push((tm, cn));
    }
    let printed = print_values(tidemark, &texts).await;
    for (n, (check, (tm, cn))) in checks.iter().zip(played).enumerate() {
        let original = check.original.map(str::to_owned);
        let tm = tm.map_err(|e| e.to_string());
        let (tm_printed, cn_printed) = (&printed[2 * n], &printed[2 * n + 1]);
        let tidemark_ok = matches!((&tm, tm_printed), (Ok(_), Ok(p)) if *p == original);
        let connect_ok = matches!((&cn, cn_printed), (Ok(_), Ok(p)) if *p == original);
        if tidemark_ok && connect_ok {
            continue;
        }
        let wrote = format!(
            "Tidemark wrote {} under {}, which {}",
            check.tidemark.1,
            short_schema(check.tidemark.0),
            describe(&tm, tm_printed)
        );
        let read = format!(
            "Connect read {} under {}, which {}",
            check.connect.1,
            check
                .connect
                .0
                .map_or_else(|| "no schema".to_owned(), short_schema),
            describe(&cn, cn_printed)
        );
        let has = format!("{}: Postgres has {}", check.at, show(check.original));
        if !tidemark_ok {
            // Tidemark's own loss; Connect's reading is told only if it
            // differs from the record's.
            let also = if tm_printed == cn_printed {
                String::new()
            } else {
                format!("; {read}")
            };
            found.problems.push(format!("{has}; {wrote}{also}"));
            *found
                .summary
                .entry(format!("{} {}: Tidemark", check.ty, check.column))
                .or_default() += 1;
            continue;
        }
        let what = format!("{has}; {read}; {wrote}");
        match known_loss(check.sql_type, check.original, cn_printed) {
            Some(loss) => found.losses.entry(loss).or_default().push(what),
            None => {
                found.problems.push(what);
                *found
                    .summary
                    .entry(format!("{} {}: Connect", check.ty, check.column))
                    .or_default() += 1;
            }
        }
    }
}

/// `"text"` or `NULL`.
fn show(text: Option<&str>) -> String {
    text.map_or_else(|| "NULL".to_owned(), |t| format!("{t:?}"))
}

/// What a value played back as: its text as Postgres prints it, or why not.
fn describe(
    played: &Result<Option<String>, String>,
    printed: &Result<Option<String>, String>,
) -> String {
    match (played, printed) {
        (Err(e), _) => format!("does not play back: {e}"),
        (Ok(_), Ok(p)) => format!("plays back as {}", show(p.as_deref())),
        (Ok(text), Err(e)) => format!(
            "plays back as {}, which Postgres refuses: {e}",
            show(text.as_deref())
        ),
    }
}

/// A field schema in short: `array<array<int32>>`, `string (tidemark.data.PgText)`.
fn short_schema(schema: &Value) -> String {
    let ty = schema["type"].as_str().unwrap_or("?");
    let inner = if ty == "array" {
        format!("array<{}>", short_schema(&schema["items"]))
    } else {
        ty.to_owned()
    };
    match schema["name"].as_str() {
        Some(name) => format!("{inner} ({name})"),
        None => inner,
    }
}

/// Which of [`CONNECT_LOSSES`] a difference is, if any: `connect` is the
/// original with each float `-0` as `0`.
fn known_loss(
    sql_type: &str,
    original: Option<&str>,
    connect: &Result<Option<String>, String>,
) -> Option<&'static str> {
    let (Some(original), Ok(Some(connect))) = (original, connect) else {
        return None;
    };
    let float = matches!(sql_type.trim_end_matches("[]"), "real" | "double precision");
    let zeroed: String = original
        .split_inclusive(['{', '}', ','])
        .map(|part| {
            let (value, end) = part.split_at(part.trim_end_matches(['{', '}', ',']).len());
            if value == "-0" {
                format!("0{end}")
            } else {
                part.to_owned()
            }
        })
        .collect();
    (float && original.contains("-0") && zeroed == *connect).then_some(CONNECT_LOSSES[0])
}

/// Which of [`PG_TEXT_KINDS`] a value carried as `tidemark.data.PgText` is,
/// by its type and its text.
fn pg_text_kind(sql_type: &str, original: Option<&str>) -> &'static str {
    let text = original.unwrap_or_default();
    let non_finite = text.contains("NaN") || text.contains("Infinity");
    let array = sql_type.ends_with("[]");
    let float = matches!(sql_type.trim_end_matches("[]"), "real" | "double precision");
    if text.starts_with('[') && text.contains("]={") {
        // An array literal with its bounds (`[0:1]={7,8}`), of an array
        // type or a domain over one.
        PG_TEXT_KINDS[2]
    } else if float && array && non_finite {
        PG_TEXT_KINDS[1]
    } else if float && !array && non_finite {
        PG_TEXT_KINDS[0]
    } else {
        "something else (not documented)"
    }
}

/// Each text as Postgres prints it after reading it as a value of its SQL
/// type (`None` stays `None`), in one query when all are valid, else one by
/// one so each refusal is named.
async fn print_values(
    tidemark: &PgPool,
    values: &[(&str, Option<String>)],
) -> Vec<Result<Option<String>, String>> {
    let expr = |(ty, text): &(&str, Option<String>)| match text {
        Some(t) => format!("pg_catalog.format('%s', {}::{ty})", lit(t)),
        None => "null".to_owned(),
    };
    if values.is_empty() {
        return Vec::new();
    }
    let all: Vec<String> = values.iter().map(expr).collect();
    let sql = format!("select array[{}]::pg_catalog.text[]", all.join(", "));
    if let Ok(printed) = sqlx::query_scalar::<_, Vec<Option<String>>>(&sql)
        .fetch_one(tidemark)
        .await
    {
        return printed.into_iter().map(Ok).collect();
    }
    let mut out = Vec::new();
    for v in values {
        let sql = format!("select {}::pg_catalog.text", expr(v));
        out.push(
            sqlx::query_scalar::<_, Option<String>>(&sql)
                .fetch_one(tidemark)
                .await
                .map_err(|e| e.to_string()),
        );
    }
    out
}

/// FileStreamSink's file against what `Struct.toString()` prints for each
/// value the exact sink read: every record's dump, once, each followed by a
/// line end, and nothing else.
fn compare_dumps(exact: &[ExactRecord], file: &str, dlq: &Dlq) -> Vec<String> {
    let mut problems = Vec::new();
    let mut dumps = Vec::new();
    for e in exact {
        if dlq
            .file
            .contains_key(&(e.topic.clone(), e.partition, e.offset))
        {
            continue;
        }
        match struct_dump(&e.value["schema"], &e.value["payload"]) {
            Ok(d) => dumps.push((d, e)),
            Err(why) => problems.push(format!(
                "{} offset {}: no Struct dump: {why}",
                e.topic, e.offset
            )),
        }
    }
    for (at, why) in &dlq.file {
        if !dlq.exact.contains_key(at) {
            problems.push(format!(
                "FileStreamSink's converter refused {at:?}, the exact sink's did not: {why}"
            ));
        }
    }
    let mut used = vec![false; dumps.len()];
    let mut at = 0;
    while at < file.len() {
        let rest = &file[at..];
        // The longest unmatched dump the file goes on with, then a line end.
        let hit = (0..dumps.len())
            .filter(|&n| !used[n])
            .filter_map(|n| match dumps[n].0.match_start(rest) {
                Ok(len) if rest[len..].starts_with('\n') => Some((len, n)),
                _ => None,
            })
            .max();
        if let Some((len, n)) = hit {
            used[n] = true;
            at += len + 1;
            continue;
        }
        // The unmatched value it is closest to, and the field that differs.
        let next = rest[1..]
            .find("\nStruct{")
            .map_or(rest.len(), |end| end + 2);
        let got = &rest[..next];
        let best = (0..dumps.len())
            .filter(|&n| !used[n])
            .map(|n| (dumps[n].0.match_start(rest).err().unwrap_or(0), n))
            .max();
        problems.push(match best {
            Some((differs, n)) => {
                let (d, e) = &dumps[n];
                format!(
                    "FileStreamSink wrote {got:?}, no value Connect read; closest: {} offset {}, whose {} is …{}…",
                    e.topic,
                    e.offset,
                    d.field_at(differs),
                    excerpt(&d.text, differs)
                )
            }
            None => format!("FileStreamSink wrote one record too many: {got:?}"),
        });
        at += next;
    }
    for (n, (d, e)) in dumps.iter().enumerate() {
        if !used[n] {
            problems.push(format!(
                "FileStreamSink wrote nothing for {} offset {}: {}",
                e.topic, e.offset, d.text
            ));
        }
    }
    problems
}

/// Up to 40 bytes of `text` either side of byte `at`, on character bounds.
fn excerpt(text: &str, at: usize) -> &str {
    let mut from = at.saturating_sub(40).min(text.len());
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    let mut to = (at + 40).min(text.len());
    while !text.is_char_boundary(to) {
        to += 1;
    }
    &text[from..to]
}
