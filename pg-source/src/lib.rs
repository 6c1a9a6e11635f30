//! pg-source: Postgres → Kafka.
//!
//! Delivery contract:
//!
//! - Records are keyed by the row's primary key, so every change of a row
//!   lands in one partition, in order.
//! - Each batch of rows and the source position that covers it are produced
//!   in one Kafka transaction (idempotence on, `acks=all`). The in-memory
//!   position moves only after the commit succeeds; an aborted batch is read
//!   again. After a crash the position is read back from the offsets topic as
//!   a `read_committed` reader sees it, so what Kafka committed is never sent
//!   again and what it did not is re-read: consumers reading
//!   `read_committed` see each row state exactly once.
//! - No row is missed when transactions commit out of order (see
//!   [`timestamp_mode`]).
//! - SIGTERM finishes the batch in flight, commits it, and exits.

pub mod catalog;
pub mod producer;
pub mod timestamp_mode;

use std::time::Duration;

use anyhow::{bail, Context as _};
use futures::FutureExt as _;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tidemark_common::config::{
    accept_json_converter, accept_schemas_enabled, Conditional, ConnectorConfig, KeySet,
};
use tidemark_common::kafka::{ensure_topic, read_compacted, KafkaSettings, TopicSpec};
use tidemark_common::offset::{position_key, SourcePosition, DEFAULT_OFFSETS_TOPIC};
use tidemark_common::pg::{is_transient, PgTarget, TableName};
use tidemark_common::ConfigError;
use tokio_util::sync::CancellationToken;

use crate::producer::{BatchError, Record, TxProducer};
use crate::timestamp_mode::{TimestampReader, CLOCK_GUARD_MS};

/// The NOTIFY channel schema-init's trigger signals on.
pub const NOTIFY_CHANNEL: &str = "tidemark";

/// The connector keys pg-source reads.
pub const KEYS: KeySet = KeySet {
    supported: &[
        "connection.url",
        "connection.user",
        "connection.password",
        "mode",
        "timestamp.column.name",
        "incrementing.column.name",
        "topic.prefix",
        "poll.interval.ms",
        "batch.max.rows",
        "timestamp.delay.interval.ms",
        "timestamp.initial",
        "table.whitelist",
        "table.include.list",
        "db.timezone",
        "topic.creation.default.partitions",
        "topic.creation.default.replication.factor",
        "validate.non.null",
    ],
    ignored: &[
        (
            "numeric.mapping",
            "numerics are always sent as their exact decimal text",
        ),
        (
            "schema.pattern",
            "name the schema in table.whitelist (schema.table)",
        ),
        ("dialect.name", "Tidemark speaks PostgreSQL only"),
    ],
    conditional: &[
        Conditional {
            key: "key.converter",
            accept: accept_json_converter,
        },
        Conditional {
            key: "value.converter",
            accept: accept_json_converter,
        },
        Conditional {
            key: "key.converter.schemas.enable",
            accept: accept_schemas_enabled,
        },
        Conditional {
            key: "value.converter.schemas.enable",
            accept: accept_schemas_enabled,
        },
    ],
    unsupported: &[
        (
            "query",
            "pg-source reads whole tables; name them in table.whitelist",
        ),
        (
            "table.blacklist",
            "list the tables to read in table.whitelist instead",
        ),
        (
            "table.exclude.list",
            "list the tables to read in table.whitelist instead",
        ),
        (
            "transforms",
            "single message transforms are not supported; records are already keyed by primary key",
        ),
        ("predicates", "single message transforms are not supported"),
        (
            "numeric.precision.mapping",
            "numerics are always sent as their exact decimal text",
        ),
        (
            "exactly.once.support",
            "pg-source always writes in Kafka transactions",
        ),
        ("table.types", "pg-source reads tables only"),
        (
            "catalog.pattern",
            "name the schema in table.whitelist (schema.table)",
        ),
        ("quote.sql.identifiers", "identifiers are always quoted"),
        (
            "timestamp.granularity",
            "timestamps always keep microseconds",
        ),
        (
            "transaction.isolation.mode",
            "pg-source always reads committed rows below the oldest open transaction",
        ),
    ],
};

/// Everything pg-source needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Connector name: names the stored position and the transactional id.
    pub name: String,
    /// The database to read.
    pub pg: PgTarget,
    /// The brokers.
    pub kafka: KafkaSettings,
    /// Tables to read; `None` reads every table with both columns.
    pub tables: Option<Vec<TableName>>,
    /// `timestamp.column.name`.
    pub timestamp_column: String,
    /// `incrementing.column.name`.
    pub incrementing_column: String,
    /// Topic = prefix + table name.
    pub topic_prefix: String,
    /// The longest wait between polls; a NOTIFY wakes it sooner.
    pub poll_interval: Duration,
    /// Rows per batch (and per Kafka transaction).
    pub batch_max_rows: i64,
    /// `timestamp.delay.interval.ms`: how far behind the clock the poll stays.
    pub timestamp_delay_ms: i64,
    /// `timestamp.initial`: epoch ms to start from when no position is
    /// stored; -1 is now; `None` reads the table from the beginning.
    pub timestamp_initial: Option<i64>,
    /// Time zone of `timestamp` columns (`db.timezone`).
    pub db_timezone: String,
    /// How new topics look.
    pub topic: TopicSpec,
    /// Where positions are stored.
    pub offsets_topic: String,
    /// The Kafka transactional id.
    pub transactional_id: String,
    /// Wake on `NOTIFY tidemark` as well as on the poll interval.
    pub listen: bool,
}

impl Config {
    /// Builds the config from a connector config (file plus flag overrides).
    /// Returns warnings for ignored keys.
    ///
    /// Fails on the first key that is wrong, naming it.
    pub fn from_connector(
        c: &ConnectorConfig,
        kafka: KafkaSettings,
    ) -> Result<(Self, Vec<String>), ConfigError> {
        let warnings = c.check_keys(&KEYS)?;
        let mode = c.get("mode").unwrap_or("timestamp+incrementing");
        if mode != "timestamp+incrementing" {
            return Err(ConfigError::invalid(
                "mode",
                mode,
                "pg-source supports timestamp+incrementing (the bulk, timestamp and incrementing modes miss changes)",
            ));
        }
        let url = c.require(
            "connection.url",
            "the database to read, like jdbc:postgresql://host:5432/streaming_example",
        )?;
        let pg = PgTarget::from_jdbc(
            "connection.url",
            url,
            c.get("connection.user"),
            c.props.get("connection.password").map(String::as_str),
        )?;
        let tables = match c.get("table.whitelist").or(c.get("table.include.list")) {
            None => None,
            Some(list) => Some(
                list.split(',')
                    .map(|t| {
                        TableName::parse(t)
                            .map_err(|why| ConfigError::invalid("table.whitelist", list, why))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let timestamp_initial = match c.get("timestamp.initial") {
            None => None,
            Some(text) => {
                let n: i64 = text.parse().map_err(|_| {
                    ConfigError::invalid(
                        "timestamp.initial",
                        text,
                        "expected epoch milliseconds, or -1 for now",
                    )
                })?;
                if n < -1 {
                    return Err(ConfigError::invalid(
                        "timestamp.initial",
                        text,
                        "expected epoch milliseconds, or -1 for now",
                    ));
                }
                Some(n)
            }
        };
        let partitions = c.int("topic.creation.default.partitions", 1, 1..=10_000)?;
        let replication = c.int("topic.creation.default.replication.factor", -1, -1..=32)?;
        if replication == 0 {
            return Err(ConfigError::invalid(
                "topic.creation.default.replication.factor",
                "0",
                "expected -1 (the broker's default) or a positive number",
            ));
        }
        let cfg = Self {
            transactional_id: format!("tidemark-pg-source-{}", c.name),
            name: c.name.clone(),
            pg,
            kafka,
            tables,
            timestamp_column: c
                .require(
                    "timestamp.column.name",
                    "the column the trigger sets to now(), like last_updated",
                )?
                .to_owned(),
            incrementing_column: c
                .require(
                    "incrementing.column.name",
                    "the table's increasing id column, like id",
                )?
                .to_owned(),
            topic_prefix: c.get("topic.prefix").unwrap_or("").to_owned(),
            poll_interval: c.millis("poll.interval.ms", 5000)?,
            batch_max_rows: c.int("batch.max.rows", 1000, 1..=100_000)?,
            timestamp_delay_ms: c.int("timestamp.delay.interval.ms", 0, 0..=i64::from(i32::MAX))?,
            timestamp_initial,
            db_timezone: c.get("db.timezone").unwrap_or("UTC").to_owned(),
            topic: TopicSpec {
                partitions: partitions as i32,
                replication_factor: replication as i32,
                configs: Vec::new(),
            },
            offsets_topic: DEFAULT_OFFSETS_TOPIC.to_owned(),
            listen: true,
        };
        if cfg.topic_prefix.is_empty() && cfg.tables.is_none() {
            // Allowed, as in the JDBC connector; topics are then bare table names.
        }
        Ok((cfg, warnings))
    }
}

/// Runs until `shutdown` is cancelled or an error that waiting cannot cure.
///
/// Fails on a bad table or column, on a permission error, or when Kafka
/// fences this instance; transient Postgres and Kafka errors are retried.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = cfg.pg.connect(3, Duration::from_secs(60)).await?;
    check_privileges(&pool, &cfg.db_timezone).await?;
    let tables = match &cfg.tables {
        Some(t) => t.clone(),
        None => {
            let found =
                catalog::discover(&pool, &cfg.timestamp_column, &cfg.incrementing_column).await?;
            if found.is_empty() {
                bail!(
                    "no table in {} has both columns `{}` and `{}`: run schema-init, set table.whitelist, or fix the column names",
                    cfg.pg, cfg.timestamp_column, cfg.incrementing_column
                );
            }
            found
        }
    };
    let mut readers = Vec::new();
    for t in &tables {
        let info = catalog::TableInfo::load(&pool, t).await?;
        let topic = format!("{}{}", cfg.topic_prefix, t.name);
        let key = position_key(&cfg.name, &t.to_string());
        readers.push(TimestampReader::new(
            info,
            topic,
            key,
            &cfg.timestamp_column,
            &cfg.incrementing_column,
            &cfg.db_timezone,
        )?);
    }

    let admin = cfg.kafka.admin()?;
    for r in &readers {
        ensure_topic(&admin, &r.topic, &cfg.topic).await?;
    }
    let offsets_spec = TopicSpec {
        partitions: 1,
        replication_factor: cfg.topic.replication_factor,
        configs: vec![("cleanup.policy".into(), "compact".into())],
    };
    ensure_topic(&admin, &cfg.offsets_topic, &offsets_spec).await?;

    // Fence older instances first, so their open transaction is aborted and
    // the positions read next are final.
    let producer = TxProducer::new(&cfg.kafka, &cfg.transactional_id).await?;
    let settings = cfg.kafka.clone();
    let offsets_topic = cfg.offsets_topic.clone();
    let stored = tokio::task::spawn_blocking(move || {
        read_compacted(&settings, &offsets_topic, Duration::from_secs(60))
    })
    .await??;
    for r in &mut readers {
        match stored.get(&r.position_key) {
            Some(bytes) => match SourcePosition::decode(bytes)? {
                SourcePosition::TimestampIncrementing {
                    timestamp,
                    incrementing,
                } => {
                    tracing::info!(table = %r.table.name, timestamp = %timestamp, incrementing, "resuming from stored position");
                    r.position = Some((timestamp, incrementing));
                }
            },
            None => match cfg.timestamp_initial {
                Some(ms) => {
                    r.start_at(&pool, ms).await?;
                    tracing::info!(table = %r.table.name, position = ?r.position, "no stored position, starting at timestamp.initial");
                }
                None => {
                    tracing::info!(table = %r.table.name, "no stored position, reading the table from the beginning")
                }
            },
        }
    }

    let mut listener = if cfg.listen {
        listen(&pool).await
    } else {
        None
    };
    tracing::info!(
        connector = %cfg.name,
        tables = readers.len(),
        postgres = %cfg.pg,
        kafka = %cfg.kafka.bootstrap_servers,
        "pg-source started"
    );

    let mut pg_down = false;
    let mut follow_up = false;
    while !shutdown.is_cancelled() {
        match poll_all(&cfg, &pool, &producer, &mut readers, &shutdown).await {
            Ok(_) => {
                if pg_down {
                    tracing::info!("postgres reachable again");
                    pg_down = false;
                }
            }
            Err(PollError::Postgres(e)) if is_transient(&e) => {
                if !pg_down {
                    tracing::warn!(error = %e, "postgres unreachable; retrying");
                    pg_down = true;
                }
            }
            Err(PollError::Postgres(e)) => {
                return Err(e).context("cannot read the source table");
            }
            Err(PollError::Kafka(BatchError::Retry(e))) => {
                tracing::warn!(error = %format!("{e:#}"), "kafka transaction aborted; the batch will be read and sent again");
            }
            Err(PollError::Kafka(BatchError::Fatal(e))) => return Err(e),
        }
        // Rows committed just now may sit inside the clock guard; look again
        // once it has passed, then fall back to the poll interval.
        let wait = if pg_down {
            Duration::from_secs(1)
        } else if follow_up {
            Duration::from_millis(CLOCK_GUARD_MS as u64 + 10)
        } else {
            cfg.poll_interval
        };
        follow_up = false;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
            woke = wait_notify(&mut listener) => {
                if woke {
                    follow_up = true;
                    // Many commits, one poll.
                    if let Some(l) = listener.as_mut() {
                        while let Some(Ok(_)) = l.recv().now_or_never() {}
                    }
                } else {
                    tracing::warn!("lost the NOTIFY connection; polling every poll.interval.ms until it is back");
                    listener = None;
                }
            }
        }
        if listener.is_none() && cfg.listen && !pg_down {
            listener = listen(&pool).await;
        }
    }
    tracing::info!("pg-source stopped");
    Ok(())
}

enum PollError {
    Postgres(sqlx::Error),
    Kafka(BatchError),
}

/// Reads every table until it is caught up, a batch per transaction.
async fn poll_all(
    cfg: &Config,
    pool: &PgPool,
    producer: &TxProducer,
    readers: &mut [TimestampReader],
    shutdown: &CancellationToken,
) -> Result<u64, PollError> {
    let mut total = 0;
    for r in readers.iter_mut() {
        // The bound is read before the poll's own snapshot (a separate
        // statement), which is what makes it safe.
        let bound = r
            .bound(pool, cfg.timestamp_delay_ms)
            .await
            .map_err(PollError::Postgres)?;
        loop {
            let started = std::time::Instant::now();
            let rows = r
                .poll(pool, &bound, cfg.batch_max_rows)
                .await
                .map_err(PollError::Postgres)?;
            let read = started.elapsed();
            let n = rows.len();
            tracing::debug!(table = %r.table.name, rows = n, bound = %bound, read = ?read, "polled");
            let Some(last) = rows.last().map(|row| row.position.clone()) else {
                break;
            };
            let records = rows
                .into_iter()
                .map(|row| Record {
                    topic: r.topic.clone(),
                    key: row.key,
                    value: row.value,
                })
                .collect();
            let position = Record {
                topic: cfg.offsets_topic.clone(),
                key: r.position_key.clone(),
                value: TimestampReader::encode_position(&last),
            };
            let started = std::time::Instant::now();
            producer
                .send_batch(records, position)
                .await
                .map_err(PollError::Kafka)?;
            tracing::info!(
                table = %r.table.name,
                topic = %r.topic,
                rows = n,
                timestamp = %last.0,
                incrementing = last.1,
                read = ?read,
                commit = ?started.elapsed(),
                "batch committed"
            );
            r.position = Some(last);
            total += n as u64;
            if (n as i64) < cfg.batch_max_rows || shutdown.is_cancelled() {
                break;
            }
        }
    }
    Ok(total)
}

async fn listen(pool: &PgPool) -> Option<PgListener> {
    let attempt = async {
        let mut l = PgListener::connect_with(pool).await?;
        l.listen(NOTIFY_CHANNEL).await?;
        Ok::<_, sqlx::Error>(l)
    };
    match attempt.await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "cannot LISTEN for changes; polling every poll.interval.ms");
            None
        }
    }
}

/// Waits for a notification; `false` when the listening connection failed.
/// Without a listener it never returns.
async fn wait_notify(listener: &mut Option<PgListener>) -> bool {
    match listener {
        Some(l) => l.try_recv().await.map(|n| n.is_some()).unwrap_or(false),
        None => std::future::pending().await,
    }
}

/// Warns when the user cannot see other roles' transactions, since then the
/// out-of-order-commit guarantee holds only for its own sessions.
async fn check_privileges(pool: &PgPool, tz: &str) -> anyhow::Result<()> {
    let (can_see, valid_tz, server_tz): (bool, bool, String) = sqlx::query_as(
        r#"select pg_has_role(current_user, 'pg_read_all_stats', 'member')
                  or (select rolsuper from pg_roles where rolname = current_user),
                  exists (select 1 from pg_timezone_names where name = $1)
                  or exists (select 1 from pg_timezone_abbrevs where abbrev = $1),
                  current_setting('log_timezone')"#,
    )
    .bind(tz)
    .fetch_one(pool)
    .await
    .context("cannot check the user's privileges")?;
    if !valid_tz {
        bail!("config key `db.timezone` has an invalid value `{tz}`: not a time zone Postgres knows, like UTC or Europe/Berlin");
    }
    if !can_see {
        tracing::warn!(
            "the user is not a member of pg_read_all_stats: transactions of other roles that commit late may be missed; run `grant pg_read_all_stats to <user>`"
        );
    }
    if !server_tz.eq_ignore_ascii_case(tz) && !(is_utc(&server_tz) && is_utc(tz)) {
        tracing::warn!(db_timezone = tz, server_timezone = %server_tz, "db.timezone differs from the server's time zone; set db.timezone to the zone writers use");
    }
    Ok(())
}

fn is_utc(tz: &str) -> bool {
    matches!(
        tz.to_ascii_uppercase().as_str(),
        "UTC" | "ETC/UTC" | "GMT" | "ETC/GMT" | "UCT" | "Z" | "ZULU"
    )
}
