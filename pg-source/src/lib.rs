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
pub mod changelog_mode;
pub mod cli;
pub mod logical_mode;
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
use tidemark_common::health::Health;
use tidemark_common::kafka::{ensure_topic, read_compacted, KafkaSettings, TopicSpec};
use tidemark_common::offset::{position_key, SourcePosition, DEFAULT_OFFSETS_TOPIC};
use tidemark_common::ops::names;
use tidemark_common::pg::{is_transient, PgTarget, TableName};
use tidemark_common::ConfigError;
use tokio_util::sync::CancellationToken;

use std::collections::HashMap;

use crate::changelog_mode::{ChangeLogReader, ChangeTable, Chunk, SnapshotRun};
use crate::logical_mode::LogicalStream;
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
        "connection.attempts",
        "connection.backoff.ms",
        "batch.max.rows",
        "timestamp.delay.interval.ms",
        "timestamp.initial",
        "table.whitelist",
        "table.include.list",
        "db.timezone",
        "topic.creation.default.partitions",
        "topic.creation.default.replication.factor",
        "validate.non.null",
        "tombstones.on.delete",
        "snapshot.mode",
        "slot.name",
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

/// How pg-source finds changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The JDBC connector's mode: row states by `(timestamp, id)`; needs no
    /// trigger of Tidemark's, misses hard deletes.
    TimestampIncrementing,
    /// Every insert, update and delete from schema-init's change-log triggers.
    ChangeLog,
    /// Every insert, update and delete from a logical replication slot:
    /// nothing runs in the writers' transactions.
    Logical,
}

/// Everything pg-source needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Connector name: names the stored position and the transactional id.
    pub name: String,
    /// How changes are found.
    pub mode: Mode,
    /// `changelog` mode: send a tombstone after each delete.
    pub tombstones: bool,
    /// `key.converter.schemas.enable`: keys carry their Connect schema.
    pub key_schemas: bool,
    /// `value.converter.schemas.enable`: values carry their Connect schema;
    /// without it a record is the payload alone, several times smaller.
    pub value_schemas: bool,
    /// `changelog` mode: send every existing row first when no position is
    /// stored (`snapshot.mode=initial`).
    pub initial_snapshot: bool,
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
    /// How long to wait for Postgres at start (`connection.attempts` x
    /// `connection.backoff.ms`); once running, pg-source waits for it
    /// without limit.
    pub connect_patience: Duration,
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
    /// `logical` mode: the replication slot (`slot.name`).
    pub slot_name: String,
    /// Wake on `NOTIFY tidemark` as well as on the poll interval.
    pub listen: bool,
    /// Changelog mode: how often to compare the database's snapshot with
    /// the last one read, a query that reads no table. Commits are found
    /// this way without a NOTIFY trigger, which would cost every writing
    /// transaction a turn on Postgres' global notification queue lock.
    pub probe_interval: Duration,
    /// Set ready once connected and reading; for `/healthz` and tests.
    pub health: Health,
    /// Where to serve `/healthz` and `/metrics`; `None` serves nothing.
    pub http_addr: Option<std::net::SocketAddr>,
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
        let mode = match c.get("mode").unwrap_or("timestamp+incrementing") {
            "timestamp+incrementing" => Mode::TimestampIncrementing,
            "changelog" => Mode::ChangeLog,
            "logical" => Mode::Logical,
            other => {
                return Err(ConfigError::invalid(
                    "mode",
                    other,
                    "pg-source supports logical and changelog (every change, deletes included) and timestamp+incrementing (the bulk, timestamp and incrementing modes miss changes)",
                ))
            }
        };
        let column = |key: &str, why: &str| -> Result<String, ConfigError> {
            match mode {
                Mode::TimestampIncrementing => Ok(c.require(key, why)?.to_owned()),
                Mode::ChangeLog | Mode::Logical => Ok(c.get(key).unwrap_or_default().to_owned()),
            }
        };
        let tombstones = match c.get("tombstones.on.delete").unwrap_or("true") {
            "true" => true,
            "false" => false,
            other => {
                return Err(ConfigError::invalid(
                    "tombstones.on.delete",
                    other,
                    "expected true or false",
                ))
            }
        };
        let schemas = |key: &str| !c.get(key).is_some_and(|v| v.eq_ignore_ascii_case("false"));
        let (key_schemas, value_schemas) = (
            schemas("key.converter.schemas.enable"),
            schemas("value.converter.schemas.enable"),
        );
        let initial_snapshot = match c.get("snapshot.mode").unwrap_or("initial") {
            "initial" => true,
            "no_data" | "never" => false,
            other => {
                return Err(ConfigError::invalid(
                    "snapshot.mode",
                    other,
                    "expected initial (send existing rows first) or no_data (changes only)",
                ))
            }
        };
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
            mode,
            tombstones,
            key_schemas,
            value_schemas,
            initial_snapshot,
            pg,
            kafka,
            tables,
            timestamp_column: column(
                "timestamp.column.name",
                "the column the trigger sets to now(), like last_updated",
            )?,
            incrementing_column: column(
                "incrementing.column.name",
                "the table's increasing id column, like id",
            )?,
            topic_prefix: c.get("topic.prefix").unwrap_or("").to_owned(),
            poll_interval: c.millis("poll.interval.ms", 5000)?,
            connect_patience: c.millis("connection.backoff.ms", 10_000)?
                * c.int("connection.attempts", 3, 1..=i64::from(u16::MAX))? as u32,
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
            slot_name: match c.get("slot.name") {
                Some(name) => {
                    if name.is_empty()
                        || name.len() > 63
                        || !name
                            .chars()
                            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
                    {
                        return Err(ConfigError::invalid(
                            "slot.name",
                            name,
                            "a replication slot name has 1 to 63 lower-case letters, digits and underscores",
                        ));
                    }
                    name.to_owned()
                }
                None => logical_mode::default_slot_name(&c.name),
            },
            listen: mode != Mode::Logical,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            health: Health::new(),
            http_addr: None,
        };
        Ok((cfg, warnings))
    }
}

/// The default of [`Config::probe_interval`]: a wake-up within 20 ms, for
/// about 50 one-row queries a second while idle.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(20);

/// Runs until `shutdown` is cancelled or an error that waiting cannot cure.
///
/// Fails on a bad table or column, on a permission error, or when Kafka
/// fences this instance; transient Postgres and Kafka errors are retried.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    if let Some(addr) = cfg.http_addr {
        tidemark_common::ops::serve(addr, cfg.health.clone(), shutdown.clone()).await?;
    }
    let pool = cfg.pg.connect(3, cfg.connect_patience).await?;
    if cfg.mode == Mode::TimestampIncrementing {
        check_privileges(&pool, &cfg.db_timezone).await?;
    }
    let tables = match &cfg.tables {
        Some(t) => t.clone(),
        None => discover_tables(&cfg, &pool).await?,
    };
    let mut infos = Vec::new();
    for t in &tables {
        let info = catalog::TableInfo::load(&pool, t).await?;
        let topic = topic_name(&cfg.topic_prefix, &t.name);
        infos.push((info, topic));
    }

    let admin = cfg.kafka.admin()?;
    for (_, topic) in &infos {
        ensure_topic(&admin, topic, &cfg.topic).await?;
    }
    let offsets_spec = TopicSpec {
        partitions: 1,
        replication_factor: cfg.topic.replication_factor,
        configs: vec![("cleanup.policy".into(), "compact".into())],
    };
    ensure_topic(&admin, &cfg.offsets_topic, &offsets_spec).await?;

    // Fence older instances first, so their open transaction is aborted and
    // the positions read next are final.
    let producer = TxProducer::new(&cfg.kafka, &cfg.transactional_id, shutdown.clone()).await?;
    let settings = cfg.kafka.clone();
    let offsets_topic = cfg.offsets_topic.clone();
    let stored = tokio::task::spawn_blocking(move || {
        read_compacted(&settings, &offsets_topic, Duration::from_secs(60))
    })
    .await??;

    let mut source = match cfg.mode {
        Mode::TimestampIncrementing => {
            Source::Timestamp(timestamp_readers(&cfg, &pool, infos, &stored).await?)
        }
        Mode::ChangeLog => {
            let (reader, snapshot) = changelog_reader(&cfg, &pool, infos, &stored).await?;
            Source::ChangeLog(Box::new(reader), snapshot)
        }
        Mode::Logical => {
            // Creating the slot waits for open transactions, however long:
            // a stop must not wait with it.
            let prepared = tokio::select! {
                r = changelog_reader(&cfg, &pool, infos, &stored) => Some(r?),
                _ = shutdown.cancelled() => None,
            };
            let Some((reader, snapshot)) = prepared else {
                tracing::info!("pg-source stopped before it began reading");
                return Ok(());
            };
            Source::Logical(Box::new(reader), snapshot, None, std::time::Instant::now())
        }
    };

    let mut listener = if cfg.listen {
        listen(&pool).await
    } else {
        None
    };
    tracing::info!(
        connector = %cfg.name,
        mode = ?cfg.mode,
        tables = tables.len(),
        postgres = %cfg.pg,
        kafka = %cfg.kafka.bootstrap_servers,
        "pg-source started"
    );

    cfg.health.set_ready(true);
    let mut pg_down = false;
    let mut follow_up = false;
    // An aborted Kafka transaction is read and sent again after a second,
    // not at the next probe.
    let mut kafka_retry = false;
    while !shutdown.is_cancelled() {
        let result = match &mut source {
            Source::Timestamp(readers) => {
                poll_all(&cfg, &pool, &producer, readers, &shutdown).await
            }
            Source::ChangeLog(reader, snapshot) => {
                poll_changelog(&pool, &producer, reader, snapshot, &shutdown).await
            }
            Source::Logical(reader, snapshot, stream, last_commit) => {
                poll_logical(
                    &cfg,
                    &pool,
                    &producer,
                    reader,
                    snapshot,
                    stream,
                    last_commit,
                    &shutdown,
                )
                .await
            }
        };
        match result {
            Ok(_) => {
                cfg.health.progress();
                if pg_down {
                    tracing::info!("postgres reachable again");
                    cfg.health.set_ready(true);
                    pg_down = false;
                }
            }
            Err(PollError::Postgres(e)) if is_transient(&e) => {
                metrics::counter!(names::SOURCE_ERRORS, "kind" => "postgres").increment(1);
                if !pg_down {
                    tracing::warn!(error = %e, "postgres unreachable; retrying");
                    cfg.health.set_ready(false);
                    pg_down = true;
                }
            }
            Err(PollError::Postgres(e)) => {
                return Err(e).context("cannot read the source table");
            }
            Err(PollError::Transient(e)) => {
                metrics::counter!(names::SOURCE_ERRORS, "kind" => "postgres").increment(1);
                if !pg_down {
                    tracing::warn!(error = %format!("{e:#}"), "replication stream lost; resuming from the stored position");
                    cfg.health.set_ready(false);
                    pg_down = true;
                }
            }
            Err(PollError::Kafka(BatchError::Retry(e))) => {
                kafka_retry = true;
                metrics::counter!(names::SOURCE_ERRORS, "kind" => "kafka").increment(1);
                tracing::warn!(error = %format!("{e:#}"), "kafka transaction aborted; the batch will be read and sent again");
            }
            Err(PollError::Kafka(BatchError::Fatal(e))) => return Err(e),
            Err(PollError::Kafka(BatchError::Stopped)) => {
                tracing::info!("{}", BatchError::Stopped);
                break;
            }
            Err(PollError::Other(e)) => return Err(e),
        }
        // In timestamp mode, rows committed just now may sit inside the
        // clock guard; look again once it has passed, then fall back to the
        // poll interval. The change log needs no guard.
        let wait = if pg_down || std::mem::take(&mut kafka_retry) {
            Duration::from_secs(1)
        } else if follow_up {
            Duration::from_millis(CLOCK_GUARD_MS as u64 + 10)
        } else if cfg.mode == Mode::ChangeLog {
            cfg.poll_interval.min(cfg.probe_interval)
        } else if cfg.mode == Mode::Logical {
            // The stream waits for changes itself.
            Duration::ZERO
        } else {
            cfg.poll_interval
        };
        follow_up = false;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
            woke = wait_notify(&mut listener) => {
                if woke {
                    follow_up = cfg.mode == Mode::TimestampIncrementing;
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
    cfg.health.set_ready(false);
    tracing::info!("pg-source stopped");
    Ok(())
}

/// The topic of a table: the prefix and the table name, with every
/// character Kafka does not allow in a topic name (anything but letters,
/// digits, `.`, `_` and `-`) replaced by `_`.
pub fn topic_name(prefix: &str, table: &str) -> String {
    format!("{prefix}{table}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// What is being read.
#[allow(clippy::large_enum_variant)]
enum Source {
    Timestamp(Vec<TimestampReader>),
    ChangeLog(Box<ChangeLogReader>, Option<SnapshotRun>),
    Logical(
        Box<ChangeLogReader>,
        Option<SnapshotRun>,
        Option<LogicalStream>,
        std::time::Instant,
    ),
}

/// The tables to read when `table.whitelist` is not set.
async fn discover_tables(cfg: &Config, pool: &PgPool) -> anyhow::Result<Vec<TableName>> {
    let found = match cfg.mode {
        Mode::TimestampIncrementing => {
            catalog::discover(pool, &cfg.timestamp_column, &cfg.incrementing_column).await?
        }
        Mode::ChangeLog => catalog::discover_captured(pool).await?,
        Mode::Logical => catalog::discover_published(pool).await?,
    };
    if found.is_empty() {
        match cfg.mode {
            Mode::TimestampIncrementing => bail!(
                "no table in {} has both columns `{}` and `{}`: run schema-init, set table.whitelist, or fix the column names",
                cfg.pg, cfg.timestamp_column, cfg.incrementing_column
            ),
            Mode::ChangeLog => bail!(
                "no table in {} has change-log capture: run schema-init --capture changelog --table <table>, or set table.whitelist",
                cfg.pg
            ),
            Mode::Logical => bail!(
                "no table in {} has logical capture: run schema-init --capture logical --table <table>, or set table.whitelist",
                cfg.pg
            ),
        }
    }
    Ok(found)
}

async fn timestamp_readers(
    cfg: &Config,
    pool: &PgPool,
    infos: Vec<(catalog::TableInfo, String)>,
    stored: &HashMap<Vec<u8>, Vec<u8>>,
) -> anyhow::Result<Vec<TimestampReader>> {
    let mut readers = Vec::new();
    for (info, topic) in infos {
        let key = position_key(&cfg.name, &info.name.to_string());
        let mut r = TimestampReader::new(
            info,
            topic,
            key,
            &cfg.timestamp_column,
            &cfg.incrementing_column,
            &cfg.db_timezone,
        )?;
        r.drop_schemas(!cfg.key_schemas, !cfg.value_schemas);
        match stored.get(&r.position_key).map(|b| SourcePosition::decode(b)).transpose()? {
            Some(SourcePosition::TimestampIncrementing {
                timestamp,
                incrementing,
            }) => {
                tracing::info!(table = %r.table.name, timestamp = %timestamp, incrementing, "resuming from stored position");
                r.position = Some((timestamp, incrementing));
            }
            Some(other) => bail!(
                "the stored position of connector {} is for another mode ({other:?}): use a new connector name to change modes",
                cfg.name
            ),
            None => match cfg.timestamp_initial {
                Some(ms) => {
                    r.start_at(pool, ms).await?;
                    tracing::info!(table = %r.table.name, position = ?r.position, "no stored position, starting at timestamp.initial");
                }
                None => {
                    tracing::info!(table = %r.table.name, "no stored position, reading the table from the beginning")
                }
            },
        }
        readers.push(r);
    }
    Ok(readers)
}

async fn changelog_reader(
    cfg: &Config,
    pool: &PgPool,
    infos: Vec<(catalog::TableInfo, String)>,
    stored: &HashMap<Vec<u8>, Vec<u8>>,
) -> anyhow::Result<(ChangeLogReader, Option<SnapshotRun>)> {
    let database = cfg.pg.database().unwrap_or("postgres").to_owned();
    let mut tables = Vec::new();
    for (info, topic) in infos {
        let mut table = ChangeTable::new(
            pool,
            info,
            topic,
            &cfg.name,
            &database,
            cfg.mode == Mode::Logical,
        )
        .await?;
        table.drop_schemas(!cfg.key_schemas, !cfg.value_schemas);
        tables.push(table);
    }
    let mut reader = ChangeLogReader {
        tables,
        position: Default::default(),
        tombstones: cfg.tombstones,
        chunk: cfg.batch_max_rows,
        position_key: position_key(&cfg.name, "tidemark.change_log"),
        offsets_topic: cfg.offsets_topic.clone(),
        // Rows sent before a stop may be left: prune them from the start.
        prune_pending: cfg.mode == Mode::ChangeLog,
        logical: cfg.mode == Mode::Logical,
    };
    let logical = cfg.mode == Mode::Logical;
    if logical {
        // Logical positions live under their own key: a connector that
        // changes mode is told so instead of reading another mode's position.
        reader.position_key = position_key(&cfg.name, "tidemark.logical");
    }
    let fresh = match stored.get(&reader.position_key).map(|b| SourcePosition::decode(b)).transpose()? {
        Some(SourcePosition::ChangeLog(p)) if !logical => {
            tracing::info!(done = %p.done, snapshot_running = p.snapshot.is_some(), "resuming from stored position");
            reader.position = p;
            false
        }
        Some(SourcePosition::Logical(p)) if logical => {
            let lsn = logical_mode::prepare_slot(pool, &cfg.slot_name, Some(p.lsn.unwrap_or(0))).await?;
            tracing::info!(slot = %cfg.slot_name, lsn = %pgwire_replication::Lsn(lsn), in_txn = p.in_txn, snapshot_running = p.snapshot.is_some(), "resuming from stored position");
            reader.position = p;
            false
        }
        Some(other) => bail!(
            "the stored position of connector {} is for another mode ({other:?}): use a new connector name to change modes",
            cfg.name
        ),
        None => {
            // The slot first: every transaction committed after it is in
            // its stream, every one before is in the snapshot taken next.
            let lsn = if logical {
                Some(logical_mode::prepare_slot(pool, &cfg.slot_name, None).await?)
            } else {
                None
            };
            reader.start(pool, cfg.initial_snapshot).await?;
            reader.position.lsn = lsn;
            tracing::info!(initial_snapshot = cfg.initial_snapshot, "no stored position, starting now");
            true
        }
    };
    let snapshot = match reader.position.snapshot {
        Some(_) => Some(SnapshotRun::open(pool, &mut reader, fresh).await?),
        None => None,
    };
    Ok((reader, snapshot))
}

/// Counts one committed batch.
fn count_batch(rows: usize, records: usize) {
    metrics::counter!(names::SOURCE_ROWS_READ).increment(rows as u64);
    metrics::counter!(names::SOURCE_RECORDS_PRODUCED).increment(records as u64);
    metrics::counter!(names::SOURCE_BATCHES).increment(1);
}

/// A snapshot error as a poll error: database errors keep their kind, so a
/// dropped connection is retried.
fn snapshot_error(e: anyhow::Error) -> PollError {
    match e.downcast::<sqlx::Error>() {
        Ok(e) => PollError::Postgres(e),
        Err(e) => PollError::Other(e),
    }
}

/// Sends snapshot rows while the snapshot runs, then changes until caught
/// up, a chunk per Kafka transaction with the position.
/// Prunes a chunk of the change log; a failure only delays it.
async fn prune(pool: &PgPool, reader: &mut ChangeLogReader) {
    match reader.prune(pool).await {
        Ok(pruned) => tracing::debug!(
            rows = pruned,
            more = reader.prune_pending,
            "change log pruned"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "cannot prune the change log; will retry after the next batch")
        }
    }
}

async fn poll_changelog(
    pool: &PgPool,
    producer: &TxProducer,
    reader: &mut ChangeLogReader,
    snapshot: &mut Option<SnapshotRun>,
    shutdown: &CancellationToken,
) -> Result<u64, PollError> {
    let mut total = 0;
    while !shutdown.is_cancelled() {
        reopen_snapshot(pool, reader, snapshot).await?;
        let saved = reader.position.clone();
        let (chunk, what) = match snapshot_chunk(reader, snapshot, &saved).await? {
            Some((chunk, what)) => (Some(chunk), what),
            None => {
                let was_batch = reader.position.batch.clone();
                let next = match reader.next_changes(pool).await {
                    Ok(next) => next,
                    Err(e) => {
                        // A batch may have been marked done in memory.
                        reader.position = saved;
                        return Err(PollError::Postgres(e));
                    }
                };
                match next {
                    Some(chunk) => (Some(chunk), "changes committed"),
                    None if was_batch.is_some() && !saved.after_seq.is_empty() => {
                        // A batch with rows just finished: record it, then prune.
                        (Some(Chunk::default()), "batch done")
                    }
                    None => (None, ""),
                }
            }
        };
        let Some(chunk) = chunk else {
            metrics::gauge!(names::SOURCE_LAG_SECONDS).set(0.0);
            if reader.prune_pending {
                // Caught up: a good moment for the rest of a backlog.
                prune(pool, reader).await;
            }
            break;
        };
        let started = std::time::Instant::now();
        let prune_log = what == "batch done" || chunk.batch_done;
        let records = chunk.records;
        let n = records.len();
        if let Err(e) = producer.send_batch(records, reader.position_record()).await {
            // Read the same chunk again; a finished snapshot is reopened.
            reader.position = saved;
            return Err(PollError::Kafka(e));
        }
        tracing::info!(records = n, rows = chunk.rows, commit = ?started.elapsed(), "{what}");
        total += chunk.rows as u64;
        count_batch(chunk.rows, n);
        if let Some(ms) = chunk.newest_change_ms {
            let lag = (tidemark_common::health::now_ms() - ms).max(0) as f64 / 1000.0;
            metrics::gauge!(names::SOURCE_LAG_SECONDS).set(lag);
        }
        if prune_log || reader.prune_pending {
            prune(pool, reader).await;
        }
    }
    Ok(total)
}

/// Reopens the snapshot transaction when it was lost (a dropped connection):
/// the rest is read in a new one and recorded as segments.
async fn reopen_snapshot(
    pool: &PgPool,
    reader: &mut ChangeLogReader,
    snapshot: &mut Option<SnapshotRun>,
) -> Result<(), PollError> {
    if reader.position.snapshot.is_some() && snapshot.is_none() {
        *snapshot = Some(
            SnapshotRun::open(pool, reader, false)
                .await
                .map_err(snapshot_error)?,
        );
    }
    Ok(())
}

/// The next chunk of the initial snapshot (an empty one records its end),
/// or `None` when no snapshot runs. On an error the position is `saved`
/// again and the snapshot transaction closed.
async fn snapshot_chunk(
    reader: &mut ChangeLogReader,
    snapshot: &mut Option<SnapshotRun>,
    saved: &tidemark_common::offset::ChangeLogPosition,
) -> Result<Option<(Chunk, &'static str)>, PollError> {
    let Some(run) = snapshot else {
        return Ok(None);
    };
    let next = match run.next(reader).await {
        Ok(next) => next,
        Err(e) => {
            // Whatever the failed read moved, it is read again.
            *snapshot = None;
            reader.position = saved.clone();
            return Err(snapshot_error(e));
        }
    };
    Ok(Some(match next {
        Some(chunk) => (chunk, "snapshot chunk committed"),
        None => {
            *snapshot = None;
            // The snapshot's end is a position too.
            (Chunk::default(), "initial snapshot committed")
        }
    }))
}

/// Logical mode: sends the initial snapshot while it runs, then what the
/// replication stream brings, a batch per Kafka transaction with the
/// position; returns after a second without changes.
#[allow(clippy::too_many_arguments)]
async fn poll_logical(
    cfg: &Config,
    pool: &PgPool,
    producer: &TxProducer,
    reader: &mut ChangeLogReader,
    snapshot: &mut Option<SnapshotRun>,
    stream: &mut Option<LogicalStream>,
    last_commit: &mut std::time::Instant,
    shutdown: &CancellationToken,
) -> Result<u64, PollError> {
    let mut total = 0;
    while !shutdown.is_cancelled() {
        reopen_snapshot(pool, reader, snapshot).await?;
        let saved = reader.position.clone();
        let (chunk, what) = match snapshot_chunk(reader, snapshot, &saved).await? {
            Some((chunk, what)) => (chunk, what),
            None => {
                if stream.is_none() {
                    let opened = LogicalStream::open(pool, &cfg.pg, &cfg.slot_name, reader)
                        .await
                        .map_err(logical_error)?;
                    *stream = Some(opened);
                }
                let s = stream.as_mut().expect("opened above");
                let next = tokio::select! {
                    _ = shutdown.cancelled() => None,
                    next = s.next(reader, *last_commit) => Some(next),
                };
                let Some(next) = next else {
                    // Stopped mid-read: nothing of it was sent.
                    *stream = None;
                    reader.position = saved;
                    return Ok(total);
                };
                match next {
                    Ok(Some(batch)) if batch.position_only => (batch.chunk, "position committed"),
                    Ok(Some(batch)) => (batch.chunk, "changes committed"),
                    Ok(None) => {
                        metrics::gauge!(names::SOURCE_LAG_SECONDS).set(0.0);
                        break;
                    }
                    Err(e) => {
                        // The stream resumes from the stored position.
                        *stream = None;
                        reader.position = saved;
                        return Err(logical_error(e));
                    }
                }
            }
        };
        let started = std::time::Instant::now();
        let records = chunk.records;
        let n = records.len();
        if let Err(e) = producer.send_batch(records, reader.position_record()).await {
            // Read the same changes again, from the stored position.
            *stream = None;
            reader.position = saved;
            return Err(PollError::Kafka(e));
        }
        *last_commit = std::time::Instant::now();
        if let (Some(s), Some(lsn)) = (stream.as_mut(), reader.position.lsn) {
            s.acknowledge(lsn);
        }
        tracing::info!(records = n, rows = chunk.rows, lsn = %pgwire_replication::Lsn(reader.position.lsn.unwrap_or(0)), commit = ?started.elapsed(), "{what}");
        total += chunk.rows as u64;
        count_batch(chunk.rows, n);
        if let Some(ms) = chunk.newest_change_ms {
            let lag = (tidemark_common::health::now_ms() - ms).max(0) as f64 / 1000.0;
            metrics::gauge!(names::SOURCE_LAG_SECONDS).set(lag);
        }
    }
    Ok(total)
}

/// A logical-stream error as a poll error: transient ones are retried.
fn logical_error(e: anyhow::Error) -> PollError {
    if logical_mode::is_transient(&e) {
        PollError::Transient(e)
    } else {
        match e.downcast::<sqlx::Error>() {
            Ok(e) => PollError::Postgres(e),
            Err(e) => PollError::Other(e),
        }
    }
}

enum PollError {
    /// A replication-stream error that waiting may cure.
    Transient(anyhow::Error),
    Postgres(sqlx::Error),
    Kafka(BatchError),
    Other(anyhow::Error),
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
                    value: Some(row.value),
                })
                .collect();
            let position = Record {
                topic: cfg.offsets_topic.clone(),
                key: r.position_key.clone(),
                value: Some(TimestampReader::encode_position(&last)),
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
            count_batch(n, n);
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
    if !(server_tz.eq_ignore_ascii_case(tz) || is_utc(&server_tz) && is_utc(tz)) {
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
