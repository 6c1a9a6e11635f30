//! Shared test plumbing: real services from the environment, unique names,
//! programs started in-process, and waits with timeouts.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::Rng as _;
use sqlx::postgres::PgConnectOptions;
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

/// `DATABASE_URL`, a superuser URL: the external Postgres when the variable
/// is set, otherwise the test run's own container.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| services().database_url.clone())
}

/// `KAFKA_BOOTSTRAP_SERVERS`: the external broker when the variable is set,
/// otherwise the test run's own container.
pub fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| services().bootstrap.clone())
}

/// The Postgres and Kafka one test run shares.
pub struct Services {
    pub database_url: String,
    pub bootstrap: String,
    /// The Kafka container, for Kafka's own tools (`kafka-acls.sh`).
    pub kafka_container: String,
}

/// Starts (once per test run) a Postgres and a Kafka container with
/// testcontainers, from `TIDEMARK_POSTGRES_IMAGE` (default `postgres:15`) and
/// `TIDEMARK_KAFKA_IMAGE` (default `apache/kafka:4.3.1`); on machines without
/// a registry, `docker/build-images.sh` builds local ones and prints these
/// variables. The containers carry this process's id as a label; a later run
/// removes those whose process is gone, and `.ci/run` removes them all.
pub fn services() -> &'static Services {
    static SERVICES: std::sync::OnceLock<Services> = std::sync::OnceLock::new();
    SERVICES.get_or_init(|| {
        // testcontainers' blocking runner makes its own runtime, which cannot
        // start inside a test's: start the containers from a plain thread.
        std::thread::spawn(start_containers)
            .join()
            .expect("containers start")
    })
}

fn image(var: &str, default: &str) -> (String, String) {
    let full = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    match full.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name.to_owned(), tag.to_owned()),
        _ => (full, "latest".to_owned()),
    }
}

fn start_containers() -> Services {
    use testcontainers::core::{IntoContainerPort as _, WaitFor};
    use testcontainers::runners::SyncRunner as _;
    use testcontainers::{GenericImage, ImageExt as _};

    reap_stale_containers();
    let pid = std::process::id().to_string();
    let (pg_name, pg_tag) = image("TIDEMARK_POSTGRES_IMAGE", "postgres:15");
    let pg = GenericImage::new(pg_name, pg_tag)
        .with_exposed_port(5432.tcp())
        .with_wait_for(WaitFor::Nothing)
        .with_env_var("POSTGRES_PASSWORD", "postgres")
        .with_label("tidemark.tests.pid", &pid)
        .with_cmd([
            "postgres",
            "-c",
            "max_connections=300",
            // logical mode: every test's connector has a slot of its own.
            "-c",
            "wal_level=logical",
            "-c",
            "max_replication_slots=200",
            "-c",
            "max_wal_senders=100",
        ])
        .start()
        .unwrap_or_else(|e| panic!("cannot start the Postgres container (is Docker running? on a machine without a registry, run `eval \"$(docker/build-images.sh)\"` first): {e}"));
    let pg_port = pg.get_host_port_ipv4(5432.tcp()).unwrap();
    let database_url = format!("postgres://postgres:postgres@127.0.0.1:{pg_port}/postgres");

    // Kafka must advertise the address the tests reach it on, so its port
    // is chosen here and mapped one to one.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (kafka_name, kafka_tag) = image("TIDEMARK_KAFKA_IMAGE", "apache/kafka:4.3.1");
    let kafka = GenericImage::new(kafka_name, kafka_tag)
        .with_wait_for(WaitFor::Nothing)
        .with_mapped_port(port, port.tcp())
        .with_label("tidemark.tests.pid", &pid)
        .with_env_var("KAFKA_NODE_ID", "1")
        .with_env_var("KAFKA_PROCESS_ROLES", "broker,controller")
        .with_env_var(
            "KAFKA_LISTENERS",
            format!("PLAINTEXT://0.0.0.0:{port},CONTROLLER://0.0.0.0:9093"),
        )
        .with_env_var(
            "KAFKA_ADVERTISED_LISTENERS",
            format!("PLAINTEXT://127.0.0.1:{port}"),
        )
        .with_env_var("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER")
        .with_env_var("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093")
        .with_env_var(
            "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
            "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        )
        .with_env_var("KAFKA_INTER_BROKER_LISTENER_NAME", "PLAINTEXT")
        .with_env_var("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1")
        .with_env_var("KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS", "1")
        .with_env_var("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
        .with_env_var("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
        .with_env_var("KAFKA_TRANSACTION_STATE_LOG_NUM_PARTITIONS", "1")
        .with_env_var(
            "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR",
            "1",
        )
        .with_env_var("KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR", "1")
        .with_env_var("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")
        // ACLs are enforced but a resource without any is open to everyone,
        // so only a test that adds ACLs to its own topic sees a refusal.
        .with_env_var(
            "KAFKA_AUTHORIZER_CLASS_NAME",
            "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        )
        .with_env_var("KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND", "true")
        .with_env_var("KAFKA_HEAP_OPTS", "-Xmx512m -Xms512m")
        .start()
        .unwrap_or_else(|e| panic!("cannot start the Kafka container: {e}"));
    let bootstrap = format!("127.0.0.1:{port}");
    let kafka_container = kafka.id().to_owned();
    wait_until_ready(&database_url, &bootstrap);
    // The containers live as long as the test process.
    std::mem::forget(pg);
    std::mem::forget(kafka);
    Services {
        database_url,
        bootstrap,
        kafka_container,
    }
}

/// Waits until Postgres accepts a login and Kafka answers a metadata request.
fn wait_until_ready(database_url: &str, bootstrap: &str) {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let deadline = Instant::now() + Duration::from_secs(120);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let target = PgTarget::from_url("DATABASE_URL", database_url).unwrap();
    rt.block_on(async {
        loop {
            match target.connect(1, Duration::from_secs(1)).await {
                Ok(pool) => {
                    pool.close().await;
                    break;
                }
                Err(e) if Instant::now() > deadline => {
                    panic!("the Postgres container never accepted a login: {e:#}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    });
    let consumer: BaseConsumer = KafkaSettings::new(bootstrap, &[])
        .unwrap()
        .client_config(&[])
        .create()
        .unwrap();
    while let Err(e) = consumer.fetch_metadata(None, Duration::from_secs(2)) {
        assert!(
            Instant::now() < deadline,
            "the Kafka container never answered: {e}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Removes containers of earlier test runs whose process is gone.
fn reap_stale_containers() {
    let Ok(out) = std::process::Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            "label=tidemark.tests.pid",
            "--format",
            "{{.ID}} {{.Label \"tidemark.tests.pid\"}}",
        ])
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some((id, pid)) = line.split_once(' ') {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::process::Command::new("docker")
                    .args(["rm", "-f", "-v", id])
                    .output();
            }
        }
    }
}

/// Refuses `operation` (a Kafka ACL operation: `Read`, `Write`, ...) on
/// `topic` to the tests' Kafka user, `User:ANONYMOUS`, and leaves it every
/// other operation there, like a cluster whose operator forgot one grant.
/// The brokers allow everything on a resource without ACLs but nothing that
/// no ACL allows on one with ACLs, hence the ALLOW beside the DENY. The ACLs
/// go when the returned guard is dropped, so a shared broker keeps none.
///
/// Runs Kafka's own ACL tool: in the Kafka container, or with
/// `dev/services kafka-tool` for the broker in `KAFKA_BOOTSTRAP_SERVERS`.
pub async fn deny_acl(topic: &str, operation: &str) -> TopicAcls {
    let acls = TopicAcls {
        topic: topic.to_owned(),
    };
    for (permission, op) in [
        ("--allow-principal", "All"),
        ("--deny-principal", operation),
    ] {
        let args = acl_args(&[
            "--add",
            permission,
            "User:ANONYMOUS",
            "--operation",
            op,
            "--topic",
            topic,
        ]);
        let out = tokio::task::spawn_blocking(move || run_acl_tool(&args))
            .await
            .unwrap();
        if let Err(e) = out {
            panic!("{e}");
        }
    }
    acls
}

/// The ACLs [`deny_acl`] put on a topic; dropping it removes them all.
pub struct TopicAcls {
    topic: String,
}

impl Drop for TopicAcls {
    fn drop(&mut self) {
        // Blocks for the tool's run (a JVM start); not a panic, since this
        // also runs while a failed test unwinds.
        let args = acl_args(&["--remove", "--force", "--topic", &self.topic]);
        if let Err(e) = run_acl_tool(&args) {
            eprintln!("cannot remove the ACLs of {}: {e}", self.topic);
        }
    }
}

/// The command line of Kafka's `AclCommand` against the test brokers.
fn acl_args(args: &[&str]) -> Vec<String> {
    let mut cmd: Vec<String> = if std::env::var_os("KAFKA_BOOTSTRAP_SERVERS").is_some() {
        let services = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dev/services");
        vec![
            services.display().to_string(),
            "kafka-tool".into(),
            "org.apache.kafka.tools.AclCommand".into(),
        ]
    } else {
        vec![
            "docker".into(),
            "exec".into(),
            services().kafka_container.clone(),
            "/opt/kafka/bin/kafka-acls.sh".into(),
        ]
    };
    cmd.extend(["--bootstrap-server".to_owned(), bootstrap()]);
    cmd.extend(args.iter().map(|a| (*a).to_owned()));
    cmd
}

/// Runs the tool; fails with its output when it fails.
fn run_acl_tool(cmd: &[String]) -> Result<(), String> {
    let out = std::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", cmd[0]))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Connection options for `database` on the test server as the user's own
/// application has them: `DATABASE_URL` as it is, none of Tidemark's
/// session settings, so the tests' unqualified SQL (`create table t`,
/// `insert into t`) means what it means to a user, and nothing in the tests
/// depends on Tidemark's `search_path`.
pub fn user_options(database: &str) -> PgConnectOptions {
    database_url()
        .parse::<PgConnectOptions>()
        .expect("DATABASE_URL is a postgres:// URL")
        .database(database)
}

/// A pool of the test's own connections to `database` (see [`user_options`]).
pub async fn user_pool(database: &str, max_connections: u32) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(user_options(database))
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {database} as the test's user: {e}"))
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
    /// `logical` capture and mode.
    pub logical: bool,
    pub database: String,
    pub prefix: String,
    pub source_name: String,
    pub sink_name: String,
    pub dir: tempfile::TempDir,
    /// The test's own connections to the database, as the user's
    /// application has them (the server's default `search_path`): for the
    /// test's DDL, writes and checks, never for Tidemark's work.
    pub pool: PgPool,
    /// Where the programs connect, with Tidemark's session settings.
    pub target: PgTarget,
    /// How schema-init made the database, to run it again.
    pub init: schema_init::Config,
}

impl Fixture {
    /// Runs schema-init for a new database and connects to it.
    pub async fn new() -> Self {
        Self::with_capture(None).await
    }

    /// Like [`Fixture::new`], with change-log capture installed, and the
    /// source connector switched to `changelog` mode.
    pub async fn changelog(capture: impl Into<schema_init::Capture>) -> Self {
        Self::with_capture(Some(capture.into())).await
    }

    /// Like [`Fixture::new`], with logical capture installed, and the
    /// source connector switched to `logical` mode.
    pub async fn logical() -> Self {
        Self::with_kind(None, true).await
    }

    async fn with_capture(capture: Option<schema_init::Capture>) -> Self {
        Self::with_kind(capture, false).await
    }

    async fn with_kind(capture: Option<schema_init::Capture>, logical: bool) -> Self {
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
            logical,
        };
        schema_init::run(&cfg).await.expect("schema-init runs");
        let target = admin.with_database(&database);
        let pool = user_pool(&database, 4).await;
        Self {
            changelog: capture.is_some(),
            logical,
            prefix: format!("{}.", unique("t")),
            source_name: unique("src"),
            sink_name: unique("sink"),
            dir: tempfile::tempdir().unwrap(),
            database,
            pool,
            target,
            init: cfg,
        }
    }

    /// Options for one more of the test's own connections (see
    /// [`Fixture::pool`]).
    pub fn user_options(&self) -> PgConnectOptions {
        user_options(&self.database)
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
        if self.logical {
            c.apply_overrides([("mode", Some("logical".to_owned()))]);
        }
        c
    }

    /// Drops the replication slot of the fixture's source (logical mode), so
    /// it keeps no WAL after the test.
    pub async fn drop_slot(&self) {
        let slot = pg_source::modes::logical::default_slot_name(&self.source_name);
        for _ in 0..50 {
            let r = sqlx::query("select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = $1")
                .bind(&slot)
                .execute(&self.pool)
                .await;
            if r.is_ok() {
                return;
            }
            // Still held by a stream that is closing.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
        self.start_source_from(&c)
    }

    /// Starts pg-source with a connector config of the test's own making
    /// (keys removed, say), on the fixture's offsets topic.
    pub fn start_source_from(&self, c: &ConnectorConfig) -> Running<()> {
        let (mut cfg, _) = pg_source::Config::from_connector(c, kafka()).unwrap();
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
    topics_consumer(&[topic])
}

/// [`topic_consumer`] of several topics.
pub fn topics_consumer(topics: &[&str]) -> rdkafka::consumer::StreamConsumer {
    use rdkafka::consumer::Consumer as _;
    let consumer: rdkafka::consumer::StreamConsumer = kafka()
        .client_config(&[
            ("group.id", &unique("check")),
            ("auto.offset.reset", "earliest"),
            ("isolation.level", "read_committed"),
        ])
        .create()
        .unwrap();
    consumer.subscribe(topics).unwrap();
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
    pub fn start<F, Fut>(f: F) -> Self
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

    /// Whether it has ended by itself (an error, most likely).
    pub fn finished(&self) -> bool {
        self.handle.is_finished()
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

    /// Waits for the program to stop on its own, as a bad run must, and
    /// returns its result; fails the test if it still runs after `within`.
    pub async fn exited(self, within: Duration) -> anyhow::Result<T> {
        match tokio::time::timeout(within, self.handle).await {
            Ok(joined) => joined.expect("does not panic"),
            Err(_) => {
                self.token.cancel();
                panic!("still running after {within:?} instead of exiting")
            }
        }
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
            Op::Truncate => rows.clear(),
        }
    }
    rows
}

/// The table's `id` → `data`.
pub async fn table_state(pool: &sqlx::PgPool) -> std::collections::BTreeMap<i64, String> {
    // Cast: the fault suite's migrations widen `id` and retype `data`.
    let rows: Vec<(i64, String)> =
        sqlx::query_as("select id::int8, data::text from streaming_update_table")
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter().collect()
}
