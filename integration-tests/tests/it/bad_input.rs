//! Bad input, each case with a test: every column type round-trips from the
//! table through Kafka into the file and back into Postgres; odd table and
//! column names are quoted, never injected; a table without a primary key is
//! refused in `changelog` mode and keyed by its incrementing column in
//! `timestamp+incrementing` mode; records file-sink cannot write go to the
//! dead-letter file while the sink goes on; unreachable servers are retried,
//! then reported (Postgres) or waited for (Kafka).

use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::Message as _;
use schema_init::TriggerLevel;
use serde_json::Value;
use sqlx::ConnectOptions as _;
use tidemark_common::config::ConnectorConfig;
use tidemark_common::envelope::{
    decode_sql, struct_schema, ChangeEvent, Column, Op, RecordTemplate,
};
use tidemark_common::health::Health;
use tidemark_common::kafka::{ensure_topic, KafkaSettings, TopicSpec};
use tidemark_common::offset::SinkCheckpoint;
use tidemark_common::pg::{quote_ident, TableName};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Plumbing of this file: programs with a config of the test's own making.

/// A program started in-process with a config the fixture cannot build (a
/// table or topic of the test's own).
pub(crate) struct Task<T> {
    token: CancellationToken,
    handle: JoinHandle<anyhow::Result<T>>,
}

impl<T: Send + 'static> Task<T> {
    fn spawn<Fut>(f: impl FnOnce(CancellationToken) -> Fut) -> Self
    where
        Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    {
        let token = CancellationToken::new();
        let handle = tokio::spawn(f(token.clone()));
        Self { token, handle }
    }

    fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Stops it as SIGTERM would, and returns its result.
    pub(crate) async fn stop(self) -> anyhow::Result<T> {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("stops within 30 s of the cancel")
            .expect("does not panic")
    }

    /// Panics with its error if it stopped by itself.
    async fn assert_running(&mut self, what: &str) {
        if self.handle.is_finished() {
            let result = (&mut self.handle).await.expect("does not panic");
            match result {
                Ok(_) => panic!("{what} stopped by itself"),
                Err(e) => panic!("{what} stopped: {e:#}"),
            }
        }
    }
}

/// pg-source with the fixture's connector plus `overrides`.
fn source_config(fx: &Fixture, overrides: &[(&str, &str)]) -> pg_source::Config {
    let mut c = fx.source_connector();
    c.apply_overrides(overrides.iter().map(|(k, v)| (*k, Some((*v).to_owned()))));
    let (mut cfg, _) = pg_source::Config::from_connector(&c, kafka()).unwrap();
    cfg.offsets_topic = format!("{}offsets", fx.prefix);
    cfg
}

/// Starts pg-source and waits until it reads; fails with its error if it
/// stops instead.
pub(crate) async fn start_source(fx: &Fixture, overrides: &[(&str, &str)]) -> Task<()> {
    let cfg = source_config(fx, overrides);
    let health: Health = cfg.health.clone();
    let mut task = Task::spawn(|token| pg_source::run(cfg, token));
    let start = Instant::now();
    loop {
        if health.is_ready() {
            return task;
        }
        task.assert_running("pg-source, instead of reading,").await;
        assert!(
            start.elapsed() < WAIT,
            "pg-source not ready within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The fixture's sink config, reading `topic` into `file`.
pub(crate) fn sink_config(fx: &Fixture, topic: &str, file: &Path) -> file_sink::Config {
    let mut cfg = fx.sink_config();
    cfg.topics = vec![topic.to_owned()];
    cfg.file = file.to_path_buf();
    cfg
}

pub(crate) fn start_sink(cfg: file_sink::Config) -> Task<file_sink::Totals> {
    Task::spawn(|token| file_sink::run(cfg, token))
}

pub(crate) async fn exec(pool: &sqlx::PgPool, sql: &str) {
    sqlx::query(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Installs row-level change-log capture on `table`, as schema-init
/// `--capture changelog` does.
async fn install_capture(pool: &sqlx::PgPool, table: &TableName) {
    for step in schema_init::changelog_steps(table, TriggerLevel::Row) {
        exec(pool, &step.sql).await;
    }
}

/// A fixture with change-log capture, or with `logical` capture.
pub(crate) async fn capture_fixture(logical: bool) -> Fixture {
    if logical {
        Fixture::logical().await
    } else {
        Fixture::changelog(TriggerLevel::Row).await
    }
}

/// Installs the fixture's kind of capture on `table`, as schema-init does.
pub(crate) async fn install_fixture_capture(fx: &Fixture, table: &TableName) {
    if fx.logical {
        for step in schema_init::logical_steps(table) {
            exec(&fx.pool, &step.sql).await;
        }
    } else {
        install_capture(&fx.pool, table).await;
    }
}

/// Polls `f` every 50 ms until it gives a value, for at most `timeout`.
async fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "waited {timeout:?} for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The complete lines of a file, as written (bytes that are not UTF-8 shown
/// as U+FFFD, so such a line is seen, not the whole file lost).
fn raw_lines(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| l.trim_end_matches('\n').to_owned())
        .collect()
}

/// One line of the file: the whole record (schema included) and the event.
struct Line {
    raw: Value,
    event: ChangeEvent,
}

impl Line {
    /// The field schemas of `before` or `after`, from the record's own
    /// schema: each has the schema of its own values.
    fn side_fields(&self, side: &str) -> Vec<Value> {
        let fields = self.raw["schema"]["fields"]
            .as_array()
            .expect("an envelope schema");
        let row = fields
            .iter()
            .find(|f| f["field"] == side)
            .unwrap_or_else(|| panic!("the envelope has a `{side}` field"));
        row["fields"].as_array().expect("a struct").clone()
    }

    /// The field schemas of the row, from the record's own schema.
    fn row_fields(&self) -> Vec<Value> {
        let fields = self.raw["schema"]["fields"]
            .as_array()
            .expect("an envelope schema");
        let after = fields
            .iter()
            .find(|f| f["field"] == "after")
            .expect("the envelope has an `after` field");
        after["fields"].as_array().expect("a struct").clone()
    }
}

fn read_change_lines(path: &Path) -> Vec<Line> {
    raw_lines(path)
        .iter()
        .map(|l| Line {
            raw: serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")),
            event: ChangeEvent::decode(l.as_bytes())
                .unwrap_or_else(|e| panic!("not a change event ({e}): {l}")),
        })
        .collect()
}

/// Waits for `n` change events in the file, failing at once if pg-source
/// or file-sink stops.
async fn wait_for_change_lines(
    path: &Path,
    n: usize,
    source: &mut Task<()>,
    sink: &mut Task<file_sink::Totals>,
) -> Vec<Line> {
    let start = Instant::now();
    loop {
        source.assert_running("pg-source").await;
        sink.assert_running("file-sink").await;
        let lines = read_change_lines(path);
        if lines.len() >= n {
            return lines;
        }
        assert!(
            start.elapsed() < WAIT,
            "waited {WAIT:?} for {n} events in {}, found {}: {:?}",
            path.display(),
            lines.len(),
            lines
                .iter()
                .map(|l| (l.event.op, l.event.row().cloned()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// 1. Every built-in column type round-trips, as far as the file and back.

pub(crate) const ALL_TYPES: &str = r#"
create table all_types (
  id int primary key,
  n numeric,
  n_scaled numeric(40, 10),
  ts timestamp,
  tstz timestamptz,
  d date,
  t time,
  tz timetz,
  iv interval,
  u uuid,
  j jsonb,
  js json,
  ints int[],
  texts text[],
  b bytea,
  e mood,
  flag boolean,
  small smallint,
  big bigint,
  r real,
  dp double precision,
  txt text
)"#;

/// The columns written from text, in insert order (`b` and `texts` are bound
/// as bytes and a text array).
const TEXT_COLUMNS: &[(&str, &str)] = &[
    ("n", "numeric"),
    ("n_scaled", "numeric"),
    ("ts", "timestamp"),
    ("tstz", "timestamptz"),
    ("d", "date"),
    ("t", "time"),
    ("tz", "timetz"),
    ("iv", "interval"),
    ("u", "uuid"),
    ("j", "jsonb"),
    ("js", "json"),
    ("ints", "int[]"),
    ("e", "mood"),
    ("flag", "boolean"),
    ("small", "smallint"),
    ("big", "bigint"),
    ("r", "real"),
    ("dp", "double precision"),
    ("txt", "text"),
];

pub(crate) struct TypedRow {
    id: i32,
    text: Vec<Option<&'static str>>,
    texts: Option<Vec<Option<&'static str>>>,
    bytes: Option<Vec<u8>>,
}

pub(crate) fn full_row() -> TypedRow {
    TypedRow {
        id: 1,
        text: vec![
            Some("123456789012345678901234567890"),
            Some("-12345678901234567890.1234500000"),
            Some("2024-02-29 23:59:59.999999"),
            Some("2024-02-29 23:59:59.123456+05:30"),
            Some("2024-02-29"),
            Some("23:59:59.999999"),
            Some("12:34:56.789012+05:30"),
            Some("1 year 2 mons 3 days 04:05:06.789012"),
            Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            Some(r#"{"b": [1, 2.50, {"c": null}], "a": "x\"y\\z", "big": 123456789012345678901234567890.5}"#),
            Some(r#"{ "k" : 1,  "k": 2 , "s":"\u00e9", "n": 1.0E+2 }"#),
            Some("{1,NULL,-2147483648,2147483647}"),
            Some(r#"it's "complicated""#),
            Some("true"),
            Some("-32768"),
            Some("9223372036854775807"),
            Some("3.4028235e+38"),
            Some("0.30000000000000004"),
            Some("it's \"quoted\" \\ back\\\\slash\nnew line\r\n\ttab 😀 e\u{301} 🇩🇪 a\u{200d}b {}[],\"NULL\" end"),
        ],
        texts: Some(vec![
            Some(r#"a"b"#),
            Some("c,d"),
            Some(r"x\y"),
            Some("NULL"),
            None,
            Some(""),
            Some("new\nline"),
            Some("{}"),
            Some("[x]"),
            Some("😀"),
        ]),
        bytes: Some(vec![0x00, 0xff, 0x0a, 0x5c, 0x27, 0x22, 0x80, 0x00]),
    }
}

pub(crate) fn other_row() -> TypedRow {
    TypedRow {
        id: 3,
        text: vec![
            Some("-0.000000000000000000000000000001"),
            Some("0.0000000000"),
            Some("1900-01-01 00:00:00.000001"),
            Some("1969-12-31 23:59:59.999999+00"),
            Some("1901-12-13"),
            Some("00:00:00.000001"),
            Some("23:59:59.999999-11:30"),
            Some("-1 days +00:00:00.000001"),
            Some("00000000-0000-0000-0000-000000000000"),
            Some("[]"),
            Some("[]"),
            Some("{}"),
            Some("happy"),
            Some("false"),
            Some("32767"),
            Some("-9223372036854775808"),
            Some("1.1754944e-38"),
            Some("-2.2250738585072014e-308"),
            Some(""),
        ],
        texts: Some(vec![]),
        bytes: Some(vec![]),
    }
}

pub(crate) fn null_row() -> TypedRow {
    TypedRow {
        id: 2,
        text: vec![None; TEXT_COLUMNS.len()],
        texts: None,
        bytes: None,
    }
}

pub(crate) async fn insert_typed<'c, E>(conn: E, row: &TypedRow)
where
    E: sqlx::PgExecutor<'c>,
{
    let mut cols = vec!["id".to_owned(), "texts".to_owned(), "b".to_owned()];
    let mut params = vec![
        "$1".to_owned(),
        "$2::text[]".to_owned(),
        "$3::bytea".to_owned(),
    ];
    for (i, (col, ty)) in TEXT_COLUMNS.iter().enumerate() {
        cols.push((*col).to_owned());
        params.push(format!("${}::{ty}", i + 4));
    }
    let sql = format!(
        "insert into all_types ({}) values ({})",
        cols.join(", "),
        params.join(", ")
    );
    let mut q = sqlx::query(&sql)
        .bind(row.id)
        .bind(row.texts.clone())
        .bind(row.bytes.clone());
    for v in &row.text {
        q = q.bind(*v);
    }
    q.execute(conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Plays each field of `row` (a row of table `table` as the file holds it)
/// back with [`decode_sql`] and compares it with the table's row `id`, by
/// text form: a numeric's scale, a timestamp's microseconds, a JSON
/// document's spacing all count. Returns what differs.
async fn lossy_fields(
    pool: &sqlx::PgPool,
    table: &str,
    key: &str,
    fields: &[Value],
    row: &Value,
    id: &Value,
) -> Vec<String> {
    let mut lossy = Vec::new();
    for field in fields {
        let name = field["field"].as_str().expect("a field name");
        let Some(value) = row.get(name) else {
            lossy.push(format!("{name}: missing from the row {row}"));
            continue;
        };
        let sql = format!(
            "select ({decoded})::text, (t.{col})::text, ({decoded})::text is not distinct from (t.{col})::text \
             from {table} t where t.{key} = ($2::jsonb #>> '{{}}')::int8",
            decoded = decode_sql(field, "$1"),
            col = quote_ident(name),
            key = quote_ident(key),
        );
        let result: Result<(Option<String>, Option<String>, bool), _> = sqlx::query_as(&sql)
            .bind(value.clone())
            .bind(id.clone())
            .fetch_one(pool)
            .await;
        match result {
            Ok((_, _, true)) => {}
            Ok((decoded, original, false)) => lossy.push(format!(
                "{name}: the table has {original:?}, the file {value} plays back as {decoded:?}"
            )),
            Err(e) => lossy.push(format!(
                "{name}: the file's {value} does not play back ({e}): {sql}"
            )),
        }
    }
    lossy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_column_type_round_trips_through_the_file_and_back() {
    every_column_type_round_trips(false).await;
}

/// Logical mode reads values as the replication stream prints them: they
/// must play back as exactly as the change log's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_column_type_round_trips_in_logical_mode() {
    every_column_type_round_trips(true).await;
}

async fn every_column_type_round_trips(logical: bool) {
    let fx = capture_fixture(logical).await;
    exec(
        &fx.pool,
        "create type mood as enum ('happy', 'it''s \"complicated\"')",
    )
    .await;
    exec(&fx.pool, ALL_TYPES).await;
    let table = TableName::parse("all_types").unwrap();
    install_fixture_capture(&fx, &table).await;

    // A writer whose session settings differ from pg-source's in every way
    // that changes how values print: capture must not depend on them.
    let mut writer = fx.user_options().connect().await.unwrap();
    for set in [
        "set timezone = 'Asia/Kolkata'",
        "set intervalstyle = 'postgres_verbose'",
        "set datestyle = 'SQL, DMY'",
    ] {
        sqlx::query(set).execute(&mut writer).await.unwrap();
    }
    // Row 1 is read by the initial snapshot, the others from the change log.
    insert_typed(&mut writer, &full_row()).await;
    let mut source = start_source(&fx, &[("table.whitelist", "all_types")]).await;
    let topic = format!("{}all_types", fx.prefix);
    let file = fx.dir.path().join("all_types.txt");
    let mut sink = start_sink(sink_config(&fx, &topic, &file));
    insert_typed(&mut writer, &null_row()).await;
    insert_typed(&mut writer, &other_row()).await;
    // An update that changes nothing: `before` and `after` both equal row 3.
    sqlx::query("update all_types set id = id where id = 3")
        .execute(&mut writer)
        .await
        .unwrap();

    let lines = wait_for_change_lines(&file, 4, &mut source, &mut sink).await;
    let ops: Vec<Op> = lines.iter().map(|l| l.event.op).collect();
    assert_eq!(ops, [Op::Read, Op::Create, Op::Create, Op::Update]);

    let columns: Vec<String> = sqlx::query_scalar(
        "select attname::text from pg_attribute where attrelid = 'all_types'::regclass and attnum > 0 and not attisdropped order by attnum",
    )
    .fetch_all(&fx.pool)
    .await
    .unwrap();
    let mut lossy = Vec::new();
    for line in &lines {
        let fields = line.row_fields();
        let names: Vec<&str> = fields
            .iter()
            .map(|f| f["field"].as_str().unwrap())
            .collect();
        assert_eq!(names, columns, "every column, in order, in the schema");
        for (which, row) in [("before", &line.event.before), ("after", &line.event.after)] {
            let Some(row) = row else { continue };
            for problem in lossy_fields(&fx.pool, "all_types", "id", &fields, row, &row["id"]).await
            {
                lossy.push(format!(
                    "{:?} {which} of id {}: {problem}",
                    line.event.op, row["id"]
                ));
            }
        }
    }
    assert!(lossy.is_empty(), "lossy columns:\n{}", lossy.join("\n"));

    // The check itself is exact: one microsecond, one digit, one byte or a
    // numeric's trailing zero off is a loss.
    let mut tampered = lines[0].event.after.clone().unwrap();
    tampered["ts"] = serde_json::from_str("1709251199999998").unwrap();
    tampered["n"] = "123456789012345678901234567891".into();
    tampered["n_scaled"] = "-12345678901234567890.123450000".into();
    tampered["b"] = "AP8KXCcigAE=".into();
    tampered["dp"] = serde_json::from_str("0.3").unwrap();
    let caught = lossy_fields(
        &fx.pool,
        "all_types",
        "id",
        &lines[0].row_fields(),
        &tampered,
        &tampered["id"],
    )
    .await;
    let caught: Vec<&str> = caught
        .iter()
        .map(|p| p.split(':').next().unwrap())
        .collect();
    assert_eq!(caught, ["n", "n_scaled", "ts", "b", "dp"]);

    // NULL is NULL in every nullable column, not a default or an empty value.
    let nulls = lines[1].event.after.as_ref().unwrap();
    for c in columns.iter().filter(|c| *c != "id") {
        assert_eq!(nulls[c.as_str()], Value::Null, "{c} of the all-NULL row");
    }
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    fx.drop_slot().await;
}

/// Creates table `edges` (`id int primary key` and `columns`) with capture,
/// inserts `rows` (SQL `values` tuples) from a writer session with
/// `writer_settings`, and plays every field of the events back: returns
/// what differs from the table.
async fn round_trip(columns: &str, rows: &[&str], writer_settings: &[&str]) -> Vec<String> {
    let mut lossy = round_trip_in(false, columns, rows, writer_settings).await;
    for problem in round_trip_in(true, columns, rows, writer_settings).await {
        lossy.push(format!("logical mode: {problem}"));
    }
    lossy
}

/// [`round_trip`] with change-log capture, or with `logical` capture.
async fn round_trip_in(
    logical: bool,
    columns: &str,
    rows: &[&str],
    writer_settings: &[&str],
) -> Vec<String> {
    let fx = capture_fixture(logical).await;
    exec(
        &fx.pool,
        &format!("create table edges (id int primary key, {columns})"),
    )
    .await;
    install_fixture_capture(&fx, &TableName::parse("edges").unwrap()).await;
    let mut source = start_source(&fx, &[("table.whitelist", "edges")]).await;
    let topic = format!("{}edges", fx.prefix);
    let file = fx.dir.path().join("edges.txt");
    let mut sink = start_sink(sink_config(&fx, &topic, &file));
    let mut writer = fx.user_options().connect().await.unwrap();
    for set in writer_settings {
        sqlx::query(set).execute(&mut writer).await.unwrap();
    }
    for values in rows {
        let sql = format!("insert into edges values {values}");
        sqlx::query(&sql)
            .execute(&mut writer)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let lines = wait_for_change_lines(&file, rows.len(), &mut source, &mut sink).await;
    let mut lossy = Vec::new();
    for line in &lines {
        let row = line.event.after.as_ref().expect("inserts carry the row");
        for problem in
            lossy_fields(&fx.pool, "edges", "id", &line.row_fields(), row, &row["id"]).await
        {
            lossy.push(format!("id {}: {problem}", row["id"]));
        }
    }
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
    fx.drop_slot().await;
    lossy
}

/// Values at the edges of their types: infinities, BC, 24:00, NaN, the
/// largest and smallest, nested and empty arrays. Kept apart from the test
/// above so a loss here names its own edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_values_round_trip_through_the_file_and_back() {
    let lossy = round_trip(
        "ts timestamp, tstz timestamptz, d date, t time, n numeric, f4 real, f8 double precision, \
         grid int[], words text[], stamps timestamp[], iv interval",
        &[
            "(1, 'infinity', 'infinity', 'infinity', '24:00:00', 'NaN', 'NaN', 'Infinity', \
              '{{1,2},{3,NULL}}', '{{a,\"b c\"},{NULL,\"\\\\\"}}', '{\"2024-01-01 00:00:00.000001\",infinity}', '178000000 years')",
            "(2, '-infinity', '-infinity', '-infinity', '00:00:00', '-0.00', '-Infinity', '1e-320', \
              '{}', '{}', '{}', '-177999999 years -1 microsecond')",
            "(3, '0044-03-15 12:00:00.5 BC', '0044-03-15 12:00:00.5+00 BC', '0044-03-15 BC', '12:00', \
              '1e-1000', '0.1', '0.30000000000000004', '{-1}', '{\"\"}', '{NULL}', 'P1Y2M3DT4H5M6.000007S')",
            "(4, '294246-12-31 23:59:59.999999', '294276-12-31 23:59:59.999999+00', '5874897-12-31', '23:59:59.999999', \
              '1e130', '1.17549435e-38', '4.9e-324', '{0}', '{\" \"}', '{\"1999-12-31 23:59:59\"}', '0')",
            "(5, '4713-11-24 00:00:00 BC', '4713-11-24 00:00:00+00 BC', '4713-11-24 BC', '00:00:00.000001', \
              '-1e-130', '-3.4028235e+38', '-1.7976931348623157e+308', '{{{1}}}', '{{{x}}}', '{NULL,NULL}', 'P-1D')",
        ],
        &[],
    )
    .await;
    assert!(lossy.is_empty(), "lossy edge values:\n{}", lossy.join("\n"));
}

/// `timestamp` travels as int64 microseconds since 1970, whose largest
/// value also stands for `infinity`: the one real timestamp at that value
/// must not come back as `infinity`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timestamp_at_the_int64_microsecond_limit_round_trips() {
    let lossy = round_trip(
        "ts timestamp",
        &["(1, '294247-01-10 04:00:54.775807')"],
        &[],
    )
    .await;
    assert!(lossy.is_empty(), "lossy:\n{}", lossy.join("\n"));
}

/// Postgres' `timestamp` reaches 294276 AD, past what int64 microseconds
/// since 1970 hold: such a row must neither stop the stream nor be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_past_the_int64_microsecond_limit_round_trip() {
    let lossy = round_trip(
        "ts timestamp",
        &["(1, '294276-12-31 23:59:59.999999')"],
        &[],
    )
    .await;
    assert!(lossy.is_empty(), "lossy:\n{}", lossy.join("\n"));
}

/// The first `timestamp` int64 microseconds cannot carry, the one before
/// it, and the last one Postgres has, as SQL literals.
const LIMIT: &str = "'294247-01-10 04:00:54.775807'::timestamp";
const BELOW_LIMIT: &str = "'294247-01-10 04:00:54.775806'::timestamp";
const LAST: &str = "'294276-12-31 23:59:59.999999'::timestamp";

/// Reads `topic` from its beginning as a `read_committed` consumer until `n`
/// records arrived: each key's bytes, the key and the value (`None` for a
/// tombstone). Fails at once if pg-source stops.
async fn wait_for_records(
    topic: &str,
    n: usize,
    source: &mut Task<()>,
) -> Vec<(Vec<u8>, Value, Option<Value>)> {
    let consumer = topic_consumer(topic);
    let start = Instant::now();
    let mut records = Vec::new();
    while records.len() < n {
        source.assert_running("pg-source").await;
        assert!(
            start.elapsed() < WAIT,
            "waited {WAIT:?} for {n} records in {topic}, found {}",
            records.len()
        );
        let Ok(received) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
        else {
            continue;
        };
        // The topic may not exist yet when the consumer starts.
        let Ok(msg) = received else { continue };
        let key = msg.key().expect("records are keyed").to_vec();
        let parsed: Value = serde_json::from_slice(&key).expect("the key is JSON");
        let value = msg
            .payload()
            .map(|v| serde_json::from_slice(v).expect("the value is JSON"));
        records.push((key, parsed, value));
    }
    records
}

/// Plays each field of `row` back with [`decode_sql`], as the record's own
/// field schemas say, and prints it as Postgres does.
async fn played_back(pool: &sqlx::PgPool, fields: &[Value], row: &Value) -> Vec<Option<String>> {
    let exprs: Vec<String> = fields
        .iter()
        .map(|f| {
            let name = f["field"]
                .as_str()
                .expect("a field name")
                .replace('\'', "''");
            format!(
                "({})::text",
                decode_sql(f, &format!("$1::jsonb -> '{name}'"))
            )
        })
        .collect();
    let sql = format!("select array[{}]::text[]", exprs.join(", "));
    sqlx::query_scalar(&sql)
        .bind(row)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{row} does not play back ({e}): {sql}"))
}

/// How Postgres prints `values` (SQL expressions).
async fn printed(pool: &sqlx::PgPool, values: &[&str]) -> Vec<Option<String>> {
    let exprs: Vec<String> = values.iter().map(|v| format!("({v})::text")).collect();
    let sql = format!("select array[{}]::text[]", exprs.join(", "));
    sqlx::query_scalar(&sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The logical type of field `name` among `fields`.
fn logical<'a>(fields: &'a [Value], name: &str) -> &'a str {
    fields
        .iter()
        .find(|f| f["field"] == name)
        .and_then(|f| f["name"].as_str())
        .unwrap_or_else(|| panic!("no logical type for {name} in {fields:?}"))
}

/// The logical type a record carries its `timestamp` columns with.
fn timestamp_type(wide: bool) -> &'static str {
    if wide {
        "io.debezium.time.IsoTimestamp"
    } else {
        "io.debezium.time.MicroTimestamp"
    }
}

/// `changelog` mode sends rows whose `timestamp` values int64 microseconds
/// cannot hold in every kind of event: a snapshot read, a create, an update
/// into the wide encoding, a primary key change and deletes with their
/// tombstones. Each value past the limit is an ISO string under its own
/// field schema (the codec's per-value variant), so `before` and `after`
/// each have the schema of their own values; a key is wide by its own
/// values only, so one key always has the same bytes. Everything plays back
/// exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_mode_sends_wide_rows_in_every_kind_of_event() {
    let fx = Fixture::changelog(TriggerLevel::Row).await;
    exec(
        &fx.pool,
        "create table wide (id int, k timestamp, ts timestamp, stamps timestamp[], primary key (id, k))",
    )
    .await;
    install_capture(&fx.pool, &TableName::parse("wide").unwrap()).await;
    let stamps = r#"'{"294276-12-31 23:59:59.999999",infinity}'::timestamp[]"#;
    exec(
        &fx.pool,
        &format!("insert into wide values (1, {LAST}, 'infinity', {stamps})"),
    )
    .await;
    let mut source = start_source(&fx, &[("table.whitelist", "wide")]).await;
    let early = "'2024-01-01 00:00:00'::timestamp";
    for sql in [
        format!("insert into wide values (2, {early}, {BELOW_LIMIT}, null)"),
        format!("update wide set ts = {LIMIT} where id = 2"),
        format!("update wide set k = {LIMIT}, ts = '-infinity' where id = 2"),
        "delete from wide where id = 1".to_owned(),
    ] {
        exec(&fx.pool, &sql).await;
    }
    let records = wait_for_records(&format!("{}wide", fx.prefix), 8, &mut source).await;

    let row1 = ["1", LAST, "'infinity'::timestamp", stamps];
    let row2a = ["2", early, BELOW_LIMIT, "null"];
    let row2b = ["2", early, LIMIT, "null"];
    let row2c = ["2", LIMIT, "'-infinity'::timestamp", "null"];
    // (key, wide key, and unless a tombstone: op, whether a value of the
    // row is wide, before, after). Each value's schema is judged by that
    // value alone, the snapshot's too.
    type Row = [&'static str; 4];
    type Expected = (
        [&'static str; 2],
        bool,
        Option<(Op, bool, Option<Row>, Option<Row>)>,
    );
    let expected: [Expected; 8] = [
        (["1", LAST], true, Some((Op::Read, true, None, Some(row1)))),
        (
            ["2", early],
            false,
            Some((Op::Create, false, None, Some(row2a))),
        ),
        (
            ["2", early],
            false,
            Some((Op::Update, true, Some(row2a), Some(row2b))),
        ),
        (
            ["2", early],
            false,
            Some((Op::Delete, true, Some(row2b), None)),
        ),
        (["2", early], false, None),
        (
            ["2", LIMIT],
            true,
            Some((Op::Create, true, None, Some(row2c))),
        ),
        (
            ["1", LAST],
            true,
            Some((Op::Delete, true, Some(row1), None)),
        ),
        (["1", LAST], true, None),
    ];
    for (i, ((_, key, value), (key_row, key_wide, event))) in
        records.iter().zip(&expected).enumerate()
    {
        let fields = key["schema"]["fields"].as_array().expect("a key schema");
        assert_eq!(
            logical(fields, "k"),
            timestamp_type(*key_wide),
            "key {i}: {key}"
        );
        assert_eq!(
            played_back(&fx.pool, fields, &key["payload"]).await,
            printed(&fx.pool, key_row).await,
            "key {i}: {key}"
        );
        let Some((op, _row_wide, before, after)) = event else {
            assert_eq!(value, &None, "record {i} is a tombstone");
            continue;
        };
        let value = value
            .as_ref()
            .unwrap_or_else(|| panic!("record {i} has a value"));
        let bytes = serde_json::to_vec(value).unwrap();
        let line = Line {
            raw: value.clone(),
            event: ChangeEvent::decode(&bytes).expect("a change event"),
        };
        assert_eq!(line.event.op, *op, "record {i}");
        for (which, got, want) in [
            ("before", &line.event.before, before),
            ("after", &line.event.after, after),
        ] {
            let fields = line.side_fields(which);
            match (got, want) {
                (None, None) => {}
                (Some(got), Some(want)) => {
                    // `k` and `ts` are the row's 2nd and 3rd values.
                    for (name, v) in [("k", want[1]), ("ts", want[2])] {
                        assert_eq!(
                            logical(&fields, name),
                            timestamp_type(v == LIMIT || v == LAST),
                            "record {i} {which}: {value}"
                        );
                    }
                    assert_eq!(
                        played_back(&fx.pool, &fields, got).await,
                        printed(&fx.pool, want).await,
                        "record {i} {which}: {value}"
                    )
                }
                _ => panic!("record {i} {which}: {value}"),
            }
        }
    }
    // One key, one byte string, however its events are encoded.
    assert!(records[1..=4].iter().all(|r| r.0 == records[1].0));
    assert!([6, 7].iter().all(|&i| records[i].0 == records[0].0));
    // Just below the limit, a row keeps the int64 encoding.
    assert_eq!(
        records[1].2.as_ref().unwrap()["payload"]["after"]["ts"],
        serde_json::json!(i64::MAX - 1)
    );
    source.stop().await.unwrap();
}

/// `timestamp+incrementing` mode renders wide rows and keys the same way.
/// Its position column, `last_updated`, stays near the clock; the position
/// itself is the timestamp's text, which any `timestamp` survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamp_mode_sends_rows_past_the_int64_microsecond_limit() {
    let fx = Fixture::new().await;
    exec(
        &fx.pool,
        "create table far (id serial, ts timestamp, other timestamp, \
         last_updated timestamp not null default now(), primary key (id, ts))",
    )
    .await;
    exec(
        &fx.pool,
        &format!(
            "insert into far (ts, other) values ({LAST}, null), ({BELOW_LIMIT}, 'infinity'), \
             ('2024-01-01', {LIMIT}), ({LIMIT}, '-infinity')"
        ),
    )
    .await;
    let mut source = start_source(&fx, &[("table.whitelist", "far")]).await;
    let records = wait_for_records(&format!("{}far", fx.prefix), 4, &mut source).await;
    // (wide key, wide `ts` value) of ids 1 to 4: a value is wide by its own
    // value only (id 3's `other` is past the limit, its `ts` is not).
    let expected = [(true, true), (false, false), (false, false), (true, true)];
    let mut lossy = Vec::new();
    for ((_, key, value), (key_wide, wide)) in records.iter().zip(expected) {
        let value = value.as_ref().expect("a value");
        let id = &key["payload"]["id"];
        for (record, wide) in [(key, key_wide), (value, wide)] {
            let fields = record["schema"]["fields"].as_array().expect("a schema");
            assert_eq!(logical(fields, "ts"), timestamp_type(wide), "{record}");
            for problem in lossy_fields(&fx.pool, "far", "id", fields, &record["payload"], id).await
            {
                lossy.push(format!("id {id}: {problem}"));
            }
        }
    }
    assert!(lossy.is_empty(), "lossy:\n{}", lossy.join("\n"));
    source.stop().await.unwrap();
}

/// The capture trigger's `to_jsonb` runs in the writer's session, so a
/// writer's `extra_float_digits` must not decide how exactly floats are
/// kept (0 prints 15 significant digits, `real` 6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_printing_floats_with_fewer_digits_loses_nothing() {
    let lossy = round_trip(
        "f4 real, f8 double precision, f8s double precision[]",
        &["(1, '1.17549435e-38', '0.30000000000000004', '{0.1,0.30000000000000004}')"],
        &["set extra_float_digits = 0"],
    )
    .await;
    assert!(lossy.is_empty(), "lossy:\n{}", lossy.join("\n"));
}

/// Captures table `aliases` whose primary key is `pk` and whose other
/// columns are `others`, named like the aliases in pg-source's own queries:
/// five rows read by the initial snapshot two at a time, then an insert, an
/// update and a delete; every event with its exact values.
async fn columns_named_like_query_aliases(pk: &str, others: &[&str]) {
    let fx = Fixture::changelog(TriggerLevel::Row).await;
    let cols: Vec<String> = others
        .iter()
        .map(|c| format!("{} text", quote_ident(c)))
        .collect();
    exec(
        &fx.pool,
        &format!(
            "create table aliases ({} int primary key, {})",
            quote_ident(pk),
            cols.join(", ")
        ),
    )
    .await;
    install_capture(&fx.pool, &TableName::parse("aliases").unwrap()).await;
    let row = |id: i64, tag: &str| {
        let mut m = serde_json::Map::new();
        m.insert(pk.to_owned(), id.into());
        for c in others {
            m.insert((*c).to_owned(), format!("{c}-{tag}{id}").into());
        }
        Value::Object(m)
    };
    let insert = |id: i64, tag: &str| {
        let r = row(id, tag);
        format!(
            "insert into aliases select * from jsonb_populate_record(null::aliases, '{}')",
            r.to_string().replace('\'', "''")
        )
    };
    for id in 1..=5 {
        exec(&fx.pool, &insert(id, "")).await;
    }
    let mut source = start_source(
        &fx,
        &[("table.whitelist", "aliases"), ("batch.max.rows", "2")],
    )
    .await;
    let topic = format!("{}aliases", fx.prefix);
    let file = fx.dir.path().join("aliases.txt");
    let mut sink = start_sink(sink_config(&fx, &topic, &file));
    exec(&fx.pool, &insert(6, "")).await;
    let set: Vec<String> = others
        .iter()
        .map(|c| format!("{} = {} || 'u'", quote_ident(c), quote_ident(c)))
        .collect();
    exec(
        &fx.pool,
        &format!(
            "update aliases set {} where {} = 6",
            set.join(", "),
            quote_ident(pk)
        ),
    )
    .await;
    exec(
        &fx.pool,
        &format!("delete from aliases where {} = 6", quote_ident(pk)),
    )
    .await;
    let lines = wait_for_change_lines(&file, 8, &mut source, &mut sink).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events: Vec<ChangeEvent> = read_change_lines(&file)
        .into_iter()
        .map(|l| l.event)
        .collect();
    assert_eq!(events.len(), lines.len().max(8), "nothing twice");
    let ops: Vec<Op> = events.iter().map(|e| e.op).collect();
    assert_eq!(
        ops,
        [
            Op::Read,
            Op::Read,
            Op::Read,
            Op::Read,
            Op::Read,
            Op::Create,
            Op::Update,
            Op::Delete
        ]
    );
    for (i, e) in events.iter().take(5).enumerate() {
        assert_eq!(
            e.after,
            Some(row(i as i64 + 1, "")),
            "snapshot row {}",
            i + 1
        );
    }
    let mut updated = row(6, "");
    for c in others {
        updated[*c] = format!("{c}-6u").into();
    }
    assert_eq!(events[5].after, Some(row(6, "")));
    assert_eq!(events[6].before, Some(row(6, "")));
    assert_eq!(events[6].after, Some(updated.clone()));
    assert_eq!(events[7].before, Some(updated));
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_named_p_is_captured() {
    columns_named_like_query_aliases("id", &["p"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_named_s_is_captured() {
    columns_named_like_query_aliases("id", &["s"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_key_named_k_is_snapshotted_in_full() {
    columns_named_like_query_aliases("k", &["v"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_named_like_the_other_query_aliases_are_captured() {
    columns_named_like_query_aliases(
        "seq",
        &[
            "l", "a", "b", "t", "x", "txid", "op", "before", "after", "key", "raw_key",
        ],
    )
    .await;
}

/// `timestamp+incrementing` mode builds its payload with the same SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamp_mode_captures_a_column_named_p() {
    let fx = Fixture::new().await;
    exec(
        &fx.pool,
        "create table with_p (id serial primary key, p text, last_updated timestamp not null default now())",
    )
    .await;
    exec(&fx.pool, "insert into with_p (p) values ('one')").await;
    let mut source = start_source(&fx, &[("table.whitelist", "with_p")]).await;
    let consumer = topic_consumer(&format!("{}with_p", fx.prefix));
    let msg = tokio::select! {
        m = consumer.recv() => m.unwrap(),
        _ = async {
            loop {
                source.assert_running("pg-source").await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        } => unreachable!(),
        _ = tokio::time::sleep(WAIT) => panic!("no record within {WAIT:?}"),
    };
    let value: Value = serde_json::from_slice(msg.payload().unwrap()).unwrap();
    assert_eq!(value["payload"]["p"], "one");
    source.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// 2. Table and column names with quotes, spaces or upper case.

/// Columns named to break unquoted SQL, each with the value it gets.
const ODD_COLUMNS: &[&str] = &[
    "Mixed Case",
    r#"quote"d"#,
    "semi;colon",
    r#"x"); drop table t; --"#,
];

/// Captures `schema`.`table` with odd column names in `changelog` mode,
/// inserts, updates and deletes, and checks the events carry the exact names
/// and values and that nothing else happened.
async fn odd_names_are_quoted(schema: &str, table: &str) {
    let fx = Fixture::changelog(TriggerLevel::Row).await;
    let name = TableName {
        schema: schema.to_owned(),
        name: table.to_owned(),
    };
    let q = name.quoted();
    exec(&fx.pool, &format!("create schema {}", quote_ident(schema))).await;
    let cols: Vec<String> = ODD_COLUMNS
        .iter()
        .map(|c| format!("{} text", quote_ident(c)))
        .collect();
    exec(
        &fx.pool,
        &format!(
            "create table {q} (\"Id\" int primary key, {})",
            cols.join(", ")
        ),
    )
    .await;
    // What an injection through the names would drop.
    exec(&fx.pool, "create table public.t (x int)").await;
    exec(
        &fx.pool,
        &format!("create table {}.t (x int)", quote_ident(schema)),
    )
    .await;
    install_capture(&fx.pool, &name).await;

    // The whitelist names the table as a user would write it.
    let whitelist = format!(
        "\"{}\".\"{}\"",
        schema.replace('"', "\"\""),
        table.replace('"', "\"\"")
    );
    let mut source = start_source(&fx, &[("table.whitelist", &whitelist)]).await;
    // The topic is the prefix and the table's name in whatever form
    // pg-source makes of it; find it.
    let topic = wait_until("pg-source's topic for the table", WAIT, || {
        let consumer: rdkafka::consumer::BaseConsumer = kafka().client_config(&[]).create().ok()?;
        use rdkafka::consumer::Consumer as _;
        let md = consumer.fetch_metadata(None, Duration::from_secs(5)).ok()?;
        md.topics()
            .iter()
            .map(|t| t.name().to_owned())
            .find(|t| t.starts_with(&fx.prefix) && *t != format!("{}offsets", fx.prefix))
    })
    .await;
    let file = fx.dir.path().join("odd.txt");
    let mut sink = start_sink(sink_config(&fx, &topic, &file));

    let values = [
        "Ünïcödé",
        r#"a "quoted" value"#,
        "'); drop table t; --",
        r"back\slash",
    ];
    let insert = format!(
        "insert into {q} (\"Id\", {}) values (1, $1, $2, $3, $4)",
        ODD_COLUMNS
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut query = sqlx::query(&insert);
    for v in values {
        query = query.bind(v);
    }
    query.execute(&fx.pool).await.unwrap();
    exec(
        &fx.pool,
        &format!(
            "update {q} set {} = 'changed' where \"Id\" = 1",
            quote_ident(ODD_COLUMNS[3])
        ),
    )
    .await;
    exec(&fx.pool, &format!("delete from {q} where \"Id\" = 1")).await;

    let lines = wait_for_change_lines(&file, 3, &mut source, &mut sink).await;
    let ops: Vec<Op> = lines.iter().map(|l| l.event.op).collect();
    assert_eq!(ops, [Op::Create, Op::Update, Op::Delete]);
    let mut expected = serde_json::Map::new();
    expected.insert("Id".into(), 1.into());
    for (c, v) in ODD_COLUMNS.iter().zip(values) {
        expected.insert((*c).into(), v.into());
    }
    let created = Value::Object(expected.clone());
    expected.insert(ODD_COLUMNS[3].into(), "changed".into());
    let updated = Value::Object(expected);
    assert_eq!(lines[0].event.after.as_ref(), Some(&created));
    assert_eq!(lines[1].event.before.as_ref(), Some(&created));
    assert_eq!(lines[1].event.after.as_ref(), Some(&updated));
    assert_eq!(lines[2].event.before.as_ref(), Some(&updated));
    for line in &lines {
        assert_eq!(line.event.source.schema, schema);
        assert_eq!(line.event.source.table, table);
        let fields: Vec<String> = line
            .row_fields()
            .iter()
            .map(|f| f["field"].as_str().unwrap().to_owned())
            .collect();
        let mut want = vec!["Id".to_owned()];
        want.extend(ODD_COLUMNS.iter().map(|c| (*c).to_owned()));
        assert_eq!(fields, want, "the schema names the columns exactly");
        assert_eq!(
            line.raw["schema"]["name"],
            format!("{}.{schema}.{table}.Envelope", fx.source_name)
        );
    }
    // The record key is the primary key, by its exact name.
    {
        let consumer = topic_consumer(&topic);
        let msg = tokio::time::timeout(WAIT, consumer.recv())
            .await
            .expect("the topic has records")
            .unwrap();
        let key: Value = serde_json::from_slice(msg.key().expect("a key")).unwrap();
        assert_eq!(key["payload"], serde_json::json!({"Id": 1}));
    }

    // Nothing else happened: both tables named t still exist, the captured
    // table is as the statements left it.
    for t in ["public.t", &format!("{}.t", quote_ident(schema))] {
        let exists: bool = sqlx::query_scalar("select to_regclass($1) is not null")
            .bind(t)
            .fetch_one(&fx.pool)
            .await
            .unwrap();
        assert!(exists, "table {t} was dropped");
    }
    let left: i64 = sqlx::query_scalar(&format!("select count(*) from {q}"))
        .fetch_one(&fx.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    source.stop().await.unwrap();
    sink.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_table_and_column_names_are_quoted_never_injected() {
    odd_names_are_quoted("My Schema", r#"Odd "Table" Name"#).await;
}

/// The same with a table name that is a valid Kafka topic name, so the
/// quoting of the schema and columns is checked whatever pg-source makes of
/// an odd table name's topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_schema_and_column_names_with_an_upper_case_table_are_quoted() {
    odd_names_are_quoted("My Schema", "Odd_Table.Name-1").await;
}

// ---------------------------------------------------------------------------
// 3. A table without a primary key.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_init_refuses_to_capture_a_table_without_a_primary_key() {
    let fx = Fixture::new().await;
    exec(&fx.pool, "create table no_pk (id int, data text)").await;
    let admin = tidemark_common::pg::PgTarget::from_url("DATABASE_URL", &database_url()).unwrap();
    let cfg = schema_init::Config {
        target: Some(admin),
        database: fx.database.clone(),
        table: TableName::parse("no_pk").unwrap(),
        notify: true,
        sample_row: false,
        seed_objects: false,
        capture: Some(TriggerLevel::Row.into()),
        logical: false,
    };
    let err = format!(
        "{:#}",
        schema_init::run(&cfg)
            .await
            .expect_err("schema-init refuses")
    );
    assert!(err.contains("public.no_pk"), "names the table: {err}");
    assert!(err.contains("no primary key"), "says what is wrong: {err}");
    assert!(
        err.contains("add primary key") && err.contains("timestamp+incrementing"),
        "says how to fix it: {err}"
    );
    // The run was one transaction: nothing of it is left behind.
    let triggers: i64 = sqlx::query_scalar(
        "select count(*) from pg_trigger where tgrelid = 'no_pk'::regclass and not tgisinternal",
    )
    .fetch_one(&fx.pool)
    .await
    .unwrap();
    assert_eq!(triggers, 0, "no trigger installed on the table");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_mode_refuses_a_table_without_a_primary_key() {
    let fx = Fixture::changelog(TriggerLevel::Row).await;
    exec(
        &fx.pool,
        "create table no_pk (id int primary key, data text)",
    )
    .await;
    install_capture(&fx.pool, &TableName::parse("no_pk").unwrap()).await;
    // The key dropped after capture was installed, past schema-init's check.
    exec(&fx.pool, "alter table no_pk drop constraint no_pk_pkey").await;
    let cfg = source_config(&fx, &[("table.whitelist", "no_pk")]);
    let run = pg_source::run(cfg, CancellationToken::new());
    let err = match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(Err(e)) => format!("{e:#}"),
        Ok(Ok(())) => panic!("pg-source ran with a table without a primary key"),
        Err(_) => panic!("pg-source kept running with a table without a primary key"),
    };
    assert!(err.contains("public.no_pk"), "names the table: {err}");
    assert!(err.contains("no primary key"), "says what is wrong: {err}");
    assert!(
        err.contains("add one") && err.contains("timestamp+incrementing"),
        "says how to fix it: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamp_mode_keys_a_table_without_a_primary_key_by_its_incrementing_column() {
    let fx = Fixture::new().await;
    exec(
        &fx.pool,
        "create table no_pk (id serial, data text, last_updated timestamp not null default now())",
    )
    .await;
    exec(
        &fx.pool,
        "insert into no_pk (data) values ('one'), ('two'), ('three')",
    )
    .await;
    let source = start_source(&fx, &[("table.whitelist", "no_pk")]).await;
    let consumer = topic_consumer(&format!("{}no_pk", fx.prefix));
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let msg = tokio::time::timeout(WAIT, consumer.recv())
            .await
            .expect("records arrive")
            .unwrap();
        let key: Value = serde_json::from_slice(msg.key().expect("records are keyed")).unwrap();
        let value: Value = serde_json::from_slice(msg.payload().unwrap()).unwrap();
        assert_eq!(
            key["schema"]["fields"],
            serde_json::json!([{"type": "int32", "optional": false, "parameters": {
                "__debezium.source.column.type": "INT4", "tidemark.column.type": "integer",
                "tidemark.column.attnum": "1"}, "field": "id"}]),
            "the key is the incrementing column (not a primary-key column: no tidemark.column.key)"
        );
        assert_eq!(key["payload"]["id"], value["payload"]["id"]);
        seen.push(key["payload"]["id"].as_i64().unwrap());
    }
    assert_eq!(seen, [1, 2, 3]);
    source.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// 4. Records the sink cannot handle.

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64, padded, as the dead-letter file holds values.
fn base64(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn base64_matches_the_standard_alphabet() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
}

/// A sink config of its own: a topic, a file, and a 1000-byte record limit.
fn small_sink(dir: &Path, topic: &str, group: &str) -> file_sink::Config {
    let c = ConnectorConfig::from_json(
        &serde_json::json!({"name": group, "config": {
            "topics": topic,
            "file": dir.join("out.txt").display().to_string(),
        }})
        .to_string(),
    )
    .unwrap();
    let (mut cfg, _) = file_sink::Config::from_connector(&c, kafka()).unwrap();
    cfg.max_record_bytes = 1000;
    cfg
}

async fn produce(producer: &FutureProducer, topic: &str, value: Option<&[u8]>) -> i64 {
    let mut record = FutureRecord::<str, [u8]>::to(topic).key("k");
    if let Some(v) = value {
        record = record.payload(v);
    }
    let delivery = producer
        .send(record, Duration::from_secs(30))
        .await
        .unwrap_or_else(|(e, _)| panic!("cannot produce to {topic}: {e}"));
    assert_eq!(delivery.partition, 0);
    delivery.offset
}

/// A topic of one partition of the test's own, and a producer.
async fn topic_and_producer() -> (String, FutureProducer) {
    tidemark_common::telemetry::init_for_tests();
    let topic = unique("t.badrecords.");
    let kafka = kafka();
    ensure_topic(
        &kafka.admin().unwrap(),
        &topic,
        &TopicSpec {
            partitions: 1,
            replication_factor: -1,
            configs: Vec::new(),
        },
    )
    .await
    .unwrap();
    (topic, kafka.client_config(&[]).create().unwrap())
}

/// JSON whose strings hold bytes that are not UTF-8 is not JSON (RFC 8259
/// requires UTF-8): written as a line it would make the file unreadable as
/// text for every line-by-line JSON reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_with_bytes_that_are_not_utf8_goes_to_the_dead_letter_file() {
    let (topic, producer) = topic_and_producer().await;
    let dir = tempfile::tempdir().unwrap();
    let bad: [&[u8]; 2] = [b"{\"a\":\"\xff\"}", b"[\"\xc3\x28\"]"];
    let mut offsets = Vec::new();
    produce(&producer, &topic, Some(br#"{"n":1}"#)).await;
    for value in bad {
        offsets.push(produce(&producer, &topic, Some(value)).await);
    }
    let last = produce(&producer, &topic, Some(br#"{"n":2}"#)).await;
    let cfg = small_sink(dir.path(), &topic, &unique("sink"));
    let file = cfg.file.clone();
    let sink = start_sink(cfg);
    let checkpoint_path = SinkCheckpoint::path_for(&file);
    wait_until("the checkpoint to pass the last record", WAIT, || {
        let cp = SinkCheckpoint::load(&checkpoint_path).ok()??;
        (cp.next_offset(&topic, 0)? == last + 1).then_some(())
    })
    .await;
    let text = std::fs::read(&file).unwrap();
    let dead: Vec<Value> = raw_lines(&file_sink::output::dead_letter_path(&file))
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    sink.stop().await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&text),
        "{\"n\":1}\n{\"n\":2}\n",
        "only the valid JSON is in the file"
    );
    assert_eq!(dead.len(), 2, "{dead:?}");
    for ((d, offset), value) in dead.iter().zip(offsets).zip(bad) {
        assert_eq!(d["offset"].as_i64(), Some(offset));
        assert_eq!(d["value_base64"], base64(value).as_str());
        let why = d["reason"].as_str().unwrap_or_default();
        assert!(why.contains("JSON") || why.contains("UTF-8"), "{why}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_the_sink_cannot_write_go_to_the_dead_letter_file_and_the_sink_goes_on() {
    let (topic, producer) = topic_and_producer().await;
    let dir = tempfile::tempdir().unwrap();
    let group = unique("sink");

    let template = RecordTemplate::new(&struct_schema(
        "t",
        &[
            Column::from_catalog("id", "int4", "b", None, true),
            Column::from_catalog("data", "text", "b", None, false),
        ],
        false,
    ));
    let good1 = template.render(r#"{"id":1,"data":"first"}"#);
    let good2 = template.render(r#"{"id":2,"data":"last"}"#);
    let pretty = b"{\r\n  \"schema\": {\"type\": \"struct\"},\n  \"payload\": {\n    \"id\": 3,\n    \"data\": \"two\\nlines\"\n  }\n}\n".to_vec();
    let oversized = {
        let mut v = br#"{"pad":""#.to_vec();
        v.resize(5000 - 2, b'x');
        v.extend_from_slice(br#""}"#);
        assert_eq!(v.len(), 5000);
        serde_json::from_slice::<Value>(&v).expect("valid JSON");
        v
    };
    // (value, what the sink does with it: a line, a dead letter with this
    // reason, or nothing)
    enum Want {
        Line(Vec<u8>),
        Dead(&'static [&'static str]),
        Skipped,
    }
    let cases: Vec<(Option<Vec<u8>>, Want)> = vec![
        (Some(good1.clone()), Want::Line(good1.clone())),
        (Some(br#"{"a":"#.to_vec()), Want::Dead(&["not JSON", "EOF"])),
        (
            Some(vec![0x00, 0xff, 0xfe, 0x80, b'\n', 0x01]),
            Want::Dead(&["not JSON"]),
        ),
        (Some(b"[1,2,3]".to_vec()), Want::Line(b"[1,2,3]".to_vec())),
        (
            Some(oversized.clone()),
            Want::Dead(&["5000 bytes", "limit of 1000"]),
        ),
        (
            Some(br#"{"a":1} {"b":2}"#.to_vec()),
            Want::Dead(&["not JSON", "trailing"]),
        ),
        (Some(Vec::new()), Want::Dead(&["not JSON"])),
        (
            Some(pretty.clone()),
            Want::Line(
                serde_json::to_vec(&serde_json::from_slice::<Value>(&pretty).unwrap()).unwrap(),
            ),
        ),
        (None, Want::Skipped),
        (Some(good2.clone()), Want::Line(good2.clone())),
    ];
    let mut offsets = Vec::new();
    for (value, _) in &cases {
        offsets.push(produce(&producer, &topic, value.as_deref()).await);
    }
    let last_offset = *offsets.last().unwrap();

    let cfg = small_sink(dir.path(), &topic, &group);
    let file = cfg.file.clone();
    let dead_file = file_sink::output::dead_letter_path(&file);
    let sink = start_sink(cfg.clone());
    let want_lines: Vec<String> = cases
        .iter()
        .filter_map(|(_, w)| match w {
            Want::Line(l) => Some(String::from_utf8(l.clone()).unwrap()),
            _ => None,
        })
        .collect();
    let want_dead: Vec<(i64, &[&str], &[u8])> = cases
        .iter()
        .zip(&offsets)
        .filter_map(|((v, w), off)| match w {
            Want::Dead(reason) => Some((*off, *reason, v.as_deref().unwrap())),
            _ => None,
        })
        .collect();

    // The checkpoint moves past every record, the bad ones and the
    // tombstone included.
    let checkpoint_path = SinkCheckpoint::path_for(&file);
    wait_until("the checkpoint to pass the last record", WAIT, || {
        let cp = SinkCheckpoint::load(&checkpoint_path).ok()??;
        (cp.next_offset(&topic, 0)? == last_offset + 1).then_some(())
    })
    .await;
    assert!(
        !sink.is_finished(),
        "the sink keeps running after bad records"
    );
    let lines = raw_lines(&file);
    assert_eq!(
        lines, want_lines,
        "the good records and the compacted one, in order"
    );
    assert!(!lines[2].contains('\n') && !lines[2].contains('\r'));

    let dead: Vec<Value> = raw_lines(&dead_file)
        .iter()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("a dead letter is not JSON ({e}): {l}"))
        })
        .collect();
    assert_eq!(
        dead.len(),
        want_dead.len(),
        "one dead letter per bad record: {dead:#?}"
    );
    for (d, (offset, reason, value)) in dead.iter().zip(&want_dead) {
        assert_eq!(d["topic"], topic.as_str(), "{d}");
        assert_eq!(d["partition"], 0, "{d}");
        assert_eq!(d["offset"].as_i64(), Some(*offset), "{d}");
        assert_eq!(d["value_base64"], base64(value).as_str(), "{d}");
        assert_eq!(d["key_base64"], base64(b"k").as_str(), "{d}");
        let why = d["reason"].as_str().unwrap_or_default();
        for part in *reason {
            assert!(
                why.contains(part),
                "the reason of offset {offset} says `{part}`: {why}"
            );
        }
    }

    let totals = sink.stop().await.unwrap();
    assert_eq!(
        (totals.written, totals.dead, totals.skipped),
        (want_lines.len() as u64, want_dead.len() as u64, 1)
    );

    // A restart writes nothing twice: only the record produced after it.
    let file_before = std::fs::read(&file).unwrap();
    let dead_before = std::fs::read(&dead_file).unwrap();
    let sink = start_sink(cfg);
    let good3 = template.render(r#"{"id":4,"data":"after the restart"}"#);
    produce(&producer, &topic, Some(&good3)).await;
    let lines = wait_until("the record produced after the restart", WAIT, || {
        let l = raw_lines(&file);
        (l.len() > want_lines.len()).then_some(l)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut expected = want_lines.clone();
    expected.push(String::from_utf8(good3).unwrap());
    assert_eq!(
        raw_lines(&file),
        expected,
        "nothing written twice: {lines:?}"
    );
    assert!(std::fs::read(&file).unwrap().starts_with(&file_before));
    assert_eq!(
        std::fs::read(&dead_file).unwrap(),
        dead_before,
        "no dead letter twice"
    );
    let totals = sink.stop().await.unwrap();
    assert_eq!((totals.written, totals.dead, totals.skipped), (1, 0, 0));
    producer.flush(Duration::from_secs(5)).unwrap();
}

// ---------------------------------------------------------------------------
// 5. Connection failures.

/// pg-source waits for an unreachable Postgres (it may be starting) for
/// `connection.attempts` x `connection.backoff.ms`, then exits with a clear
/// error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_postgres_is_retried_then_reported() {
    tidemark_common::telemetry::init_for_tests();
    let mut c = ConnectorConfig::from_file(&example("pg.source.connector.json")).unwrap();
    c.apply_overrides([
        ("name", Some(unique("src"))),
        (
            "connection.url",
            Some("jdbc:postgresql://127.0.0.1:1/x".to_owned()),
        ),
        ("connection.attempts", Some("4".to_owned())),
        ("connection.backoff.ms", Some("1500".to_owned())),
    ]);
    let (cfg, _) = pg_source::Config::from_connector(&c, kafka()).unwrap();
    assert_eq!(cfg.connect_patience, Duration::from_secs(6));
    let started = Instant::now();
    let run = pg_source::run(cfg, CancellationToken::new());
    let err = match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(Err(e)) => format!("{e:#}"),
        Ok(Ok(())) => panic!("pg-source ran without its database"),
        Err(_) => panic!("pg-source neither connected nor gave up within 30 s"),
    };
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(20),
        "gave up after {took:?}, not after about 6 s of retrying: {err}"
    );
    assert!(err.contains("127.0.0.1:1/x"), "names the server: {err}");
    assert!(
        err.contains("still unreachable after 6s"),
        "says what is wrong: {err}"
    );
    assert!(
        !err.contains("postgres:postgres"),
        "no password in the message: {err}"
    );
}

/// file-sink started while Kafka is unreachable keeps retrying (Kafka may be
/// starting), and stops cleanly when told to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_kafka_is_waited_for_and_the_sink_stops_on_cancel() {
    tidemark_common::telemetry::init_for_tests();
    let dir = tempfile::tempdir().unwrap();
    let c = ConnectorConfig::from_json(
        &serde_json::json!({"name": unique("sink"), "config": {
            "topics": "tidemark.nowhere",
            "file": dir.path().join("out.txt").display().to_string(),
        }})
        .to_string(),
    )
    .unwrap();
    let unreachable = KafkaSettings::new("127.0.0.1:1", &[]).unwrap();
    let (cfg, _) = file_sink::Config::from_connector(&c, unreachable).unwrap();
    let mut sink = start_sink(cfg);
    // Longer than one metadata request's 10-second timeout, so a sink that
    // gives up after its first failed attempt is caught.
    tokio::time::sleep(Duration::from_secs(15)).await;
    sink.assert_running("file-sink, with Kafka unreachable, instead of retrying,")
        .await;
    let started = Instant::now();
    let totals = sink.stop().await.expect("stops cleanly on cancel");
    assert_eq!(totals, file_sink::Totals::default());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "stopped {:?} after the cancel",
        started.elapsed()
    );
}
