//! Change-log capture, version 2: what schema-init installs and pg-source
//! reads, tried as hostile or careless users would. Each test has its own
//! database (without the seed's table, unless it asks), roles, topics and
//! connector name.

mod added;
mod added_faults;
mod added_holes;
mod batching;
mod ddl;
mod heartbeat;
mod key_change;
mod key_change_review;
mod recreated;
mod resume;
mod security;
mod truncate;
mod unit_totals;
mod upgrade;
mod values;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::Message as _;
use schema_init::Capture;
use serde_json::Value;
use sqlx::PgPool;
use tidemark_common::config::ConnectorConfig;
use tidemark_common::envelope::ChangeEvent;
use tidemark_common::health::Health;
use tidemark_common::pg::{PgTarget, TableName};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::{database_url, example, kafka, unique, user_options, user_pool};

pub const WAIT: Duration = Duration::from_secs(60);

/// The four kinds of change-log capture.
pub fn every_capture() -> [Capture; 4] {
    use schema_init::{TriggerLevel, UpdateBefore};
    [
        Capture::full(TriggerLevel::Row),
        Capture::full(TriggerLevel::Statement),
        Capture {
            trigger: TriggerLevel::Row,
            update_before: UpdateBefore::Null,
        },
        Capture {
            trigger: TriggerLevel::Statement,
            update_before: UpdateBefore::Null,
        },
    ]
}

/// A database of the test's own, empty but for what the test makes.
pub struct Db {
    pub name: String,
    /// A superuser pool on the database acting as the user (DDL, writes):
    /// ordinary connections with the server's default search_path.
    pub admin: PgPool,
    pub superuser: PgTarget,
    pub prefix: String,
    pub source_name: String,
}

impl Db {
    pub async fn new() -> Self {
        tidemark_common::telemetry::init_for_tests();
        let name = unique("tm_cap_");
        let server = PgTarget::from_url("DATABASE_URL", &database_url()).unwrap();
        let pool = server.connect(1, Duration::from_secs(10)).await.unwrap();
        exec(&pool, &format!("create database {name}")).await;
        pool.close().await;
        let superuser = server.with_database(&name);
        let admin = user_pool(&name, 4).await;
        Self {
            name,
            admin,
            superuser,
            prefix: format!("{}.", unique("c")),
            source_name: unique("src"),
        }
    }

    /// A login role of the test's own (roles are the server's, so the name
    /// is unique), and a pool connected as it to this database.
    pub async fn role(&self, prefix: &str) -> (String, PgPool) {
        let role = unique(prefix);
        exec(
            &self.admin,
            &format!("create role {role} login password 'pw-{role}'"),
        )
        .await;
        let options = user_options(&self.name)
            .username(&role)
            .password(&format!("pw-{role}"));
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .unwrap();
        (role, pool)
    }

    /// This database, connected as `role` (made by [`Db::role`]).
    pub fn target_as(&self, role: &str) -> PgTarget {
        let url = url::Url::parse(&database_url()).unwrap();
        PgTarget::from_url(
            "DATABASE_URL",
            &format!(
                "postgres://{role}:pw-{role}@{}:{}/{}",
                url.host_str().unwrap(),
                url.port().unwrap_or(5432),
                self.name
            ),
        )
        .unwrap()
    }

    /// schema-init `--capture changelog` of `table`, as `target`, with no
    /// seed objects.
    pub async fn schema_init_as(
        &self,
        target: PgTarget,
        table: &str,
        capture: Capture,
    ) -> anyhow::Result<schema_init::Report> {
        let server = target.with_database("postgres");
        schema_init::run(&schema_init::Config {
            target: Some(server),
            database: self.name.clone(),
            table: TableName::parse(table).unwrap(),
            notify: false,
            sample_row: false,
            seed_objects: false,
            capture: Some(capture),
            logical: false,
        })
        .await
    }

    /// schema-init `--capture changelog` of `table`, as a superuser.
    pub async fn capture(&self, table: &str, capture: Capture) {
        self.schema_init_as(self.superuser.clone(), table, capture)
            .await
            .unwrap_or_else(|e| panic!("schema-init of {table}: {e:#}"));
    }

    /// pg-source in `changelog` mode over `tables`, as a superuser.
    pub fn source_config(&self, tables: &[&str], overrides: &[(&str, &str)]) -> pg_source::Config {
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
                    self.name
                )),
            ),
            ("connection.user", Some(url.username().to_owned())),
            ("connection.password", url.password().map(str::to_owned)),
            ("topic.prefix", Some(self.prefix.clone())),
            ("poll.interval.ms", Some("200".into())),
            ("mode", Some("changelog".into())),
            ("table.whitelist", Some(tables.join(","))),
        ]);
        c.apply_overrides(overrides.iter().map(|(k, v)| (*k, Some((*v).to_owned()))));
        let (mut cfg, _) = pg_source::Config::from_connector(&c, kafka()).unwrap();
        cfg.offsets_topic = format!("{}offsets", self.prefix);
        cfg
    }

    /// Starts pg-source and waits until it reads.
    pub async fn start_source(&self, tables: &[&str], overrides: &[(&str, &str)]) -> Task {
        let cfg = self.source_config(tables, overrides);
        let health: Health = cfg.health.clone();
        let mut task = Task::spawn(|token| pg_source::run(cfg, token));
        let start = Instant::now();
        while !health.is_ready() {
            task.assert_running("pg-source, instead of reading,").await;
            assert!(
                start.elapsed() < WAIT,
                "pg-source not ready within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        task
    }

    /// The topic of `table` (a name in the `public` schema).
    pub fn topic(&self, table: &str) -> String {
        pg_source::topic_name(&self.prefix, table)
    }
}

/// pg-source running in-process.
pub struct Task {
    token: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Task {
    fn spawn<Fut>(f: impl FnOnce(CancellationToken) -> Fut) -> Self
    where
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let token = CancellationToken::new();
        let handle = tokio::spawn(f(token.clone()));
        Self { token, handle }
    }

    /// Stops it as SIGTERM would, and fails the test if it had failed.
    pub async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("stops within 30 s of the cancel")
            .expect("does not panic")
            .expect("pg-source ran without an error");
    }

    /// Kills it at whatever point it is (in-process stand-in for SIGKILL:
    /// no shutdown code runs, a Kafka transaction in flight stays open
    /// until the next instance fences it).
    pub async fn kill(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }

    /// Panics with its error if it stopped by itself.
    pub async fn assert_running(&mut self, what: &str) {
        if self.handle.is_finished() {
            match (&mut self.handle).await.expect("does not panic") {
                Ok(()) => panic!("{what} stopped by itself"),
                Err(e) => panic!("{what} stopped: {e:#}"),
            }
        }
    }
}

pub async fn exec(pool: &PgPool, sql: &str) {
    sqlx::query(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// One record of a topic: its key's payload and its value as a change
/// event (`None` for a tombstone).
#[derive(Debug, Clone)]
pub struct Event {
    pub key: Value,
    pub event: Option<ChangeEvent>,
    /// The value as sent, Connect schema included.
    pub raw: Option<Value>,
}

impl Event {
    /// The row image a replay applies: `after`, or for a delete `None`.
    pub fn after(&self) -> Option<&Value> {
        self.event.as_ref().and_then(|e| e.after.as_ref())
    }
}

/// A `read_committed` reader of topics from their beginning.
pub struct TopicReader {
    consumer: StreamConsumer,
    pub events: BTreeMap<String, Vec<Event>>,
}

impl TopicReader {
    pub fn new<S: AsRef<str>>(topics: &[S]) -> Self {
        let consumer: StreamConsumer = kafka()
            .client_config(&[
                ("group.id", &unique("check")),
                ("auto.offset.reset", "earliest"),
                ("isolation.level", "read_committed"),
                ("topic.metadata.refresh.interval.ms", "500"),
            ])
            .create()
            .unwrap();
        let topics: Vec<&str> = topics.iter().map(AsRef::as_ref).collect();
        consumer.subscribe(&topics).unwrap();
        Self {
            consumer,
            events: BTreeMap::new(),
        }
    }

    /// Reads until `done` holds for what was read, for at most `timeout`.
    pub async fn until(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&BTreeMap<String, Vec<Event>>) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !done(&self.events) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "waited {timeout:?} for {what}; read: {:#?}",
                self.events
                    .iter()
                    .map(|(t, e)| (
                        t,
                        e.len(),
                        e.iter()
                            .rev()
                            .take(3)
                            .map(|e| e.after().cloned())
                            .collect::<Vec<_>>()
                    ))
                    .collect::<Vec<_>>()
            );
            let Ok(msg) =
                tokio::time::timeout(left.min(Duration::from_millis(500)), self.consumer.recv())
                    .await
            else {
                continue;
            };
            push(&mut self.events, msg);
            // `done` may scan all that was read: asked after a burst, not
            // after every record.
            for _ in 0..1000 {
                match tokio::time::timeout(Duration::from_millis(20), self.consumer.recv()).await {
                    Ok(msg) => push(&mut self.events, msg),
                    Err(_) => break,
                }
            }
        }
    }

    /// Reads until `topic` has `n` records (tombstones included).
    pub async fn at_least(&mut self, topic: &str, n: usize) -> &[Event] {
        self.until(&format!("{n} records in {topic}"), WAIT, |e| {
            e.get(topic).map_or(0, Vec::len) >= n
        })
        .await;
        &self.events[topic]
    }

    /// Reads for `quiet` more, to see that nothing else arrives.
    pub async fn settle(&mut self, quiet: Duration) {
        let deadline = Instant::now() + quiet;
        self.until("nothing", quiet + Duration::from_secs(5), |_| {
            Instant::now() >= deadline
        })
        .await;
    }
}

/// Decodes one record into `events`.
fn push(
    events: &mut BTreeMap<String, Vec<Event>>,
    msg: rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'_>>,
) {
    let msg = match msg {
        Ok(m) => m,
        // Subscribed before pg-source created the topic.
        Err(rdkafka::error::KafkaError::MessageConsumption(
            rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
        )) => return,
        Err(e) => panic!("cannot read the topics: {e}"),
    };
    let key: Value = msg
        .key()
        .map(|k| serde_json::from_slice(k).unwrap())
        .unwrap_or(Value::Null);
    let key = key.get("payload").cloned().unwrap_or(key);
    // The dead-letter topic holds no change events.
    let event = msg
        .payload()
        .filter(|_| msg.topic() != "tidemark.dead-letter")
        .map(|v| {
            ChangeEvent::decode(v).unwrap_or_else(|e| {
                panic!("not a change event ({e}): {}", String::from_utf8_lossy(v))
            })
        });
    let raw = msg.payload().map(|v| serde_json::from_slice(v).unwrap());
    events
        .entry(msg.topic().to_owned())
        .or_default()
        .push(Event { key, event, raw });
}

/// Plays a topic's change events back into key → row, as a restore would;
/// also checks that no change is applied to a row in a state it was not in
/// (a create of an existing key, an update or delete of a missing one).
pub fn replay(events: &[Event]) -> BTreeMap<String, Value> {
    use tidemark_common::envelope::Op;
    let mut rows = BTreeMap::new();
    for e in events {
        let Some(event) = &e.event else { continue };
        let key = e.key.to_string();
        match event.op {
            Op::Read | Op::Create => {
                let before = rows.insert(key.clone(), event.after.clone().expect("after"));
                if event.op == Op::Create {
                    assert!(
                        before.is_none(),
                        "a create of key {key}, which exists: {e:?}"
                    );
                }
            }
            Op::Update => {
                let before = rows.insert(key.clone(), event.after.clone().expect("after"));
                assert!(
                    before.is_some(),
                    "an update of key {key}, which is missing: {e:?}"
                );
            }
            Op::Delete => {
                assert!(
                    rows.remove(&key).is_some(),
                    "a delete of key {key}, which is missing: {e:?}"
                );
            }
            // One topic is one table.
            Op::Truncate => rows.clear(),
        }
    }
    rows
}

/// The table's rows as pg-source's records carry them, read in Postgres as
/// JSON (for comparing simple types: text, integers, booleans).
pub async fn table_rows(pool: &PgPool, table: &str, key: &[&str]) -> BTreeMap<String, Value> {
    let key_expr = key
        .iter()
        .map(|k| {
            format!(
                "'{k}', \"tidemark test row\".{}",
                tidemark_common::names::quote_ident(k)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    // An alias no test column is named.
    let rows: Vec<(Value, Value)> = sqlx::query_as(&format!(
        "select json_build_object({key_expr}), to_json(\"tidemark test row\".*) from {table} \"tidemark test row\""
    ))
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}
