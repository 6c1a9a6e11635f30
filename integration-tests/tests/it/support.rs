//! Shared test plumbing: real services from the environment, unique names,
//! programs started in-process, and waits with timeouts.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::Rng as _;
use sqlx::PgPool;
use tidemark_common::config::ConnectorConfig;
use tidemark_common::envelope::ConnectRecord;
use tidemark_common::kafka::KafkaSettings;
use tidemark_common::pg::{PgTarget, TableName};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The repository's copies of the seed's connector configs.
pub fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

/// `DATABASE_URL`, a superuser URL.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").expect(
        "DATABASE_URL is not set: run `eval \"$(dev/services up)\"` before `cargo test --workspace`",
    )
}

/// `KAFKA_BOOTSTRAP_SERVERS`.
pub fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").expect(
        "KAFKA_BOOTSTRAP_SERVERS is not set: run `eval \"$(dev/services up)\"` before `cargo test --workspace`",
    )
}

/// A short random suffix, so parallel tests never share a database, topic or
/// group.
pub fn unique(prefix: &str) -> String {
    let n: u32 = rand::rng().random();
    format!("{prefix}{n:08x}")
}

/// One test's world: its own database with the seed's table, its own topic
/// prefix, connector names and output file.
pub struct Fixture {
    pub changelog: bool,
    pub database: String,
    pub prefix: String,
    pub source_name: String,
    pub sink_name: String,
    pub dir: tempfile::TempDir,
    pub pool: PgPool,
    pub target: PgTarget,
}

impl Fixture {
    /// Runs schema-init for a new database and connects to it.
    pub async fn new() -> Self {
        Self::with_capture(None).await
    }

    /// Like [`Fixture::new`], with change-log capture installed, and the
    /// source connector switched to `changelog` mode.
    pub async fn changelog(level: schema_init::TriggerLevel) -> Self {
        Self::with_capture(Some(level)).await
    }

    async fn with_capture(capture: Option<schema_init::TriggerLevel>) -> Self {
        tidemark_common::telemetry::init_for_tests();
        let database = unique("tm_");
        let admin = PgTarget::from_url("DATABASE_URL", &database_url()).unwrap();
        let cfg = schema_init::Config {
            target: Some(admin.clone()),
            database: database.clone(),
            table: TableName::parse("streaming_update_table").unwrap(),
            notify: true,
            sample_row: true,
            seed_objects: true,
            capture,
        };
        schema_init::run(&cfg).await.expect("schema-init runs");
        let target = admin.with_database(&database);
        let pool = target.connect(4, Duration::from_secs(10)).await.unwrap();
        Self {
            changelog: capture.is_some(),
            prefix: format!("{}.", unique("t")),
            source_name: unique("src"),
            sink_name: unique("sink"),
            dir: tempfile::tempdir().unwrap(),
            database,
            pool,
            target,
        }
    }

    /// The topic of the seed table.
    pub fn topic(&self) -> String {
        format!("{}streaming_update_table", self.prefix)
    }

    /// The output file.
    pub fn file(&self) -> PathBuf {
        self.dir.path().join("streaming_output.txt")
    }

    /// The seed's source connector JSON, pointed at this fixture's database
    /// and prefix the way a user would with flags.
    pub fn source_connector(&self) -> ConnectorConfig {
        let mut c = ConnectorConfig::from_file(&example("pg.source.connector.json")).unwrap();
        let url = url::Url::parse(&database_url()).unwrap();
        c.apply_overrides([
            ("name", Some(self.source_name.clone())),
            (
                "connection.url",
                Some(format!(
                    "jdbc:postgresql://{}:{}/{}",
                    url.host_str().unwrap(),
                    url.port().unwrap_or(5432),
                    self.database
                )),
            ),
            ("connection.user", Some(url.username().to_owned())),
            ("connection.password", url.password().map(str::to_owned)),
            ("topic.prefix", Some(self.prefix.clone())),
            ("poll.interval.ms", Some("200".into())),
        ]);
        if self.changelog {
            c.apply_overrides([("mode", Some("changelog".to_owned()))]);
        }
        c
    }

    /// The seed's sink connector JSON, pointed at this fixture's topic and file.
    pub fn sink_connector(&self) -> ConnectorConfig {
        let mut c = ConnectorConfig::from_file(&example("streaming.updates.sink.json")).unwrap();
        c.apply_overrides([
            ("name", Some(self.sink_name.clone())),
            ("topics", Some(self.topic())),
            ("file", Some(self.file().display().to_string())),
        ]);
        c
    }

    pub fn source_config(&self) -> pg_source::Config {
        let (mut cfg, _) =
            pg_source::Config::from_connector(&self.source_connector(), kafka()).unwrap();
        cfg.offsets_topic = format!("{}offsets", self.prefix);
        cfg
    }

    pub fn sink_config(&self) -> file_sink::Config {
        file_sink::Config::from_connector(&self.sink_connector(), kafka())
            .unwrap()
            .0
    }

    pub fn start_source(&self) -> Running<()> {
        Running::start(|token| pg_source::run(self.source_config(), token))
    }

    /// Starts pg-source with connector-key overrides.
    pub fn start_source_with(&self, overrides: &[(&str, &str)]) -> Running<()> {
        let mut c = self.source_connector();
        c.apply_overrides(overrides.iter().map(|(k, v)| (*k, Some((*v).to_owned()))));
        let (mut cfg, _) = pg_source::Config::from_connector(&c, kafka()).unwrap();
        cfg.offsets_topic = format!("{}offsets", self.prefix);
        let health = cfg.health.clone();
        let mut running = Running::start(|token| pg_source::run(cfg, token));
        running.health = Some(health);
        running
    }

    pub fn start_sink(&self) -> Running<file_sink::Totals> {
        Running::start(|token| file_sink::run(self.sink_config(), token))
    }
}

/// A `read_committed` consumer of `topic` from its beginning, in a group of
/// its own, as a downstream reader would see the topic.
pub fn topic_consumer(topic: &str) -> rdkafka::consumer::StreamConsumer {
    use rdkafka::consumer::Consumer as _;
    let consumer: rdkafka::consumer::StreamConsumer = kafka()
        .client_config(&[
            ("group.id", &unique("check")),
            ("auto.offset.reset", "earliest"),
            ("isolation.level", "read_committed"),
        ])
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    consumer
}

/// The Kafka settings from the environment.
pub fn kafka() -> KafkaSettings {
    KafkaSettings::new(&bootstrap(), &[]).unwrap()
}

/// A program running in-process.
pub struct Running<T> {
    token: CancellationToken,
    handle: JoinHandle<anyhow::Result<T>>,
    health: Option<tidemark_common::health::Health>,
}

impl<T: Send + 'static> Running<T> {
    fn start<F, Fut>(f: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    {
        let token = CancellationToken::new();
        let handle = tokio::spawn(f(token.clone()));
        Self {
            token,
            handle,
            health: None,
        }
    }

    /// Waits until the program says it is reading (pg-source has taken its
    /// starting point), so changes made after this are its to send.
    pub async fn ready(self) -> Self {
        let health = self.health.clone().expect("started with a health handle");
        assert!(
            health.wait_ready(Duration::from_secs(60)).await,
            "not ready within 60 s"
        );
        self
    }

    /// Stops it as SIGTERM would, and returns its result.
    pub async fn stop(self) -> anyhow::Result<T> {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("stops within 30 s")
            .expect("does not panic")
    }

    /// Kills it at whatever point it is (in-process stand-in for SIGKILL:
    /// no shutdown code runs).
    pub async fn kill(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }

    /// Fails the test if the program already stopped with an error.
    pub fn assert_running(&self) {
        assert!(!self.handle.is_finished(), "the program stopped early");
    }
}

/// Waits until the file holds at least `n` lines, and returns them decoded.
pub async fn wait_for_lines(path: &Path, n: usize, timeout: Duration) -> Vec<ConnectRecord> {
    let start = Instant::now();
    loop {
        let lines = read_lines(path);
        if lines.len() >= n {
            return lines;
        }
        if start.elapsed() > timeout {
            panic!(
                "waited {timeout:?} for {n} lines in {}, found {}:\n{}",
                path.display(),
                lines.len(),
                std::fs::read_to_string(path).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every complete line of the file, decoded.
pub fn read_lines(path: &Path) -> Vec<ConnectRecord> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| {
            ConnectRecord::decode(l.trim_end().as_bytes())
                .unwrap_or_else(|e| panic!("line is not a record ({e}): {l}"))
        })
        .collect()
}

/// An integer payload field.
pub fn int(rec: &ConnectRecord, field: &str) -> i64 {
    rec.field(field)
        .and_then(|v| v.as_i64())
        .unwrap_or_else(|| panic!("no integer `{field}` in {:?}", rec.payload))
}

/// A string payload field.
pub fn text<'a>(rec: &'a ConnectRecord, field: &str) -> &'a str {
    rec.field(field)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("no string `{field}` in {:?}", rec.payload))
}

/// Every complete line of the file, as change events.
pub fn read_events(path: &Path) -> Vec<tidemark_common::envelope::ChangeEvent> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| {
            tidemark_common::envelope::ChangeEvent::decode(l.trim_end().as_bytes())
                .unwrap_or_else(|e| panic!("line is not a change event ({e}): {l}"))
        })
        .collect()
}

/// Waits until the file holds at least `n` change events.
pub async fn wait_for_events(
    path: &Path,
    n: usize,
    timeout: Duration,
) -> Vec<tidemark_common::envelope::ChangeEvent> {
    let start = Instant::now();
    loop {
        let events = read_events(path);
        if events.len() >= n {
            return events;
        }
        if start.elapsed() > timeout {
            panic!(
                "waited {timeout:?} for {n} events in {}, found {}",
                path.display(),
                events.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Plays change events back into `id` → `data`, as a restore would.
pub fn replay(
    events: &[tidemark_common::envelope::ChangeEvent],
) -> std::collections::BTreeMap<i64, String> {
    use tidemark_common::envelope::Op;
    let mut rows = std::collections::BTreeMap::new();
    for e in events {
        match e.op {
            Op::Create | Op::Update | Op::Read => {
                let after = e.after.as_ref().expect("c, u and r carry the row after");
                rows.insert(
                    after["id"].as_i64().unwrap(),
                    after["data"].as_str().unwrap().to_owned(),
                );
            }
            Op::Delete => {
                let before = e.before.as_ref().expect("d carries the row before");
                rows.remove(&before["id"].as_i64().unwrap());
            }
        }
    }
    rows
}

/// The table's `id` → `data`.
pub async fn table_state(pool: &sqlx::PgPool) -> std::collections::BTreeMap<i64, String> {
    let rows: Vec<(i32, String)> = sqlx::query_as("select id, data from streaming_update_table")
        .fetch_all(pool)
        .await
        .unwrap();
    rows.into_iter().map(|(id, d)| (i64::from(id), d)).collect()
}
