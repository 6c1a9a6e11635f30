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
//!   [`modes::timestamp`]).
//! - SIGTERM finishes the batch in flight, commits it, and exits.
//!
//! Layout: [`run`] sets up (tables, topics, the producer, stored positions)
//! and drives one capture mode ([`modes`]) through one retry and health
//! loop. The modes share the catalog reader ([`catalog`]), a captured
//! table's records ([`table`]), the initial snapshot ([`snapshot`]) and the
//! `pgoutput` decoder ([`pgoutput`]); errors are sorted in [`errors`].

pub mod catalog;
pub mod check;
pub mod cli;
pub mod config;
pub mod dead_letter;
pub mod errors;
pub mod incremental;
pub mod log;
pub mod modes;
pub mod pgoutput;
pub mod producer;
pub mod shape;
pub mod shapes;
pub mod signal;
pub mod snapshot;
pub mod table;
pub mod visibility;

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use sqlx::PgPool;
use tidemark_common::kafka::{ensure_topic, read_compacted, TopicSpec};
use tidemark_common::ops::names;
use tidemark_common::pg::TableName;
use tokio_util::sync::CancellationToken;

pub use crate::config::{
    ChangeLogConfig, Config, LogicalConfig, Mode, ModeConfig, TimestampConfig, KEYS,
};
use crate::errors::{Class, SourceError};
use crate::modes::changelog::ChangeLogMode;
use crate::modes::logical::LogicalMode;
use crate::modes::timestamp::TimestampMode;
use crate::modes::{Batch, Capture, Committed};
use crate::producer::{BatchError, TxProducer};

/// Runs until `shutdown` is cancelled or an error that waiting cannot cure.
///
/// Fails on a bad table or column, on a permission error, or when Kafka
/// fences this instance; transient Postgres and Kafka errors are retried.
/// While starting (before the mode reads), Postgres or Kafka lost (a
/// restart of either just then) starts again after a second, for
/// `connection.attempts` x `connection.backoff.ms` from the first such
/// failure; then the error is returned. A Kafka producer lost while
/// reading starts again with a new producer, after a wait that doubles
/// from 1 s to 16 s; more than [`LostRestarts::MAX`] such losses within
/// [`LostRestarts::WINDOW`] return the error (a broker that keeps failing
/// the producer is not cured by starting again).
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    if let Some(addr) = cfg.http_addr {
        tidemark_common::ops::serve(
            addr,
            tidemark_common::ops::names::SOURCE,
            cfg.health.clone(),
            shutdown.clone(),
        )
        .await?;
    }
    let mut first_failure: Option<Instant> = None;
    let mut lost = LostRestarts::default();
    loop {
        let mut reading = false;
        let wait = match start_and_run(&cfg, &shutdown, &mut reading).await {
            Err(e)
                if !reading
                    && !shutdown.is_cancelled()
                    && unreachable_at_start(&e)
                    && first_failure.is_none_or(|t| t.elapsed() < cfg.connect_patience) =>
            {
                first_failure.get_or_insert_with(Instant::now);
                tracing::warn!(error = %format!("{e:#}"), "postgres or kafka lost while starting; starting again");
                Duration::from_secs(1)
            }
            Err(e)
                if !shutdown.is_cancelled()
                    && matches!(e.downcast_ref::<BatchError>(), Some(BatchError::Lost(_))) =>
            {
                // The producer is unusable (a fatal librdkafka error after a
                // broker restart): start again as a restart of the program
                // would, with a new producer that fences the old one and the
                // position read back from Kafka, not the one in memory,
                // since a commit that failed so may have reached the broker.
                let Some(wait) = lost.next(Instant::now()) else {
                    return Err(e.context(format!(
                        "the Kafka producer was lost {} times within {} minutes, each time after a new one had started; check the brokers' health and logs, and that this instance's transactional.id is not used by another process",
                        LostRestarts::MAX + 1,
                        LostRestarts::WINDOW.as_secs() / 60
                    )));
                };
                tracing::warn!(error = %format!("{e:#}"), wait_s = wait.as_secs(), "kafka producer failed; starting again with a new one from the stored position");
                first_failure = None;
                wait
            }
            result => return result,
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The producers lost lately, and how long to wait before the next one.
#[derive(Default)]
struct LostRestarts {
    /// When each loss within the window happened, oldest first.
    at: std::collections::VecDeque<Instant>,
}

impl LostRestarts {
    /// Losses within [`Self::WINDOW`] started again; one more stops.
    const MAX: usize = 5;
    const WINDOW: Duration = Duration::from_secs(600);

    /// Records a loss at `now`: the wait before starting again (1 s,
    /// doubling with each loss in the window, at most 16 s), or `None` when
    /// there were too many.
    fn next(&mut self, now: Instant) -> Option<Duration> {
        while self
            .at
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Self::WINDOW)
        {
            self.at.pop_front();
        }
        if self.at.len() >= Self::MAX {
            return None;
        }
        let wait = Duration::from_secs(1 << self.at.len().min(4));
        self.at.push_back(now);
        Some(wait)
    }
}

/// Whether a failure to start is Postgres or Kafka out of reach (a lost
/// connection, a broker down), which starting again may cure.
fn unreachable_at_start(e: &anyhow::Error) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    e.chain().any(|c| {
        c.downcast_ref::<sqlx::Error>()
            .is_some_and(tidemark_common::pg::is_transient)
            || c.downcast_ref::<rdkafka::error::KafkaError>()
                .and_then(rdkafka::error::KafkaError::rdkafka_error_code)
                .is_some_and(|code| {
                    matches!(
                        code,
                        C::BrokerTransportFailure
                            | C::AllBrokersDown
                            | C::BrokerNotAvailable
                            | C::NetworkException
                            | C::OperationTimedOut
                            | C::RequestTimedOut
                            | C::LeaderNotAvailable
                            | C::CoordinatorNotAvailable
                            | C::CoordinatorLoadInProgress
                            | C::NotCoordinator
                    )
                })
    })
}

/// [`run`]'s start and run; `reading` is set once the mode reads.
async fn start_and_run(
    cfg: &Config,
    shutdown: &CancellationToken,
    reading: &mut bool,
) -> anyhow::Result<()> {
    let cfg = cfg.clone();
    let shutdown = shutdown.clone();
    let Some(pool) = cfg
        .pg
        .connect_until(3, cfg.connect_patience, &shutdown)
        .await?
    else {
        tracing::info!("pg-source stopped while waiting for postgres");
        return Ok(());
    };
    if let ModeConfig::Timestamp(t) = &cfg.mode {
        check_privileges(&pool, &t.db_timezone).await?;
    }
    let tables = resolve_tables(&cfg, &pool).await?;
    // Changelog mode: a captured table dropped since may still have changes
    // in the change log, which are sent; it is no reason to refuse.
    let changelog = matches!(&cfg.mode, ModeConfig::ChangeLog(_));
    let topics: Vec<(&TableName, String)> = tables
        .iter()
        .map(|t| (t, topic_name(&cfg.topic_prefix, &t.name)))
        .collect();
    let heartbeat_topic = match &cfg.mode {
        ModeConfig::ChangeLog(c) => c.heartbeat_topic(&cfg.name),
        _ => None,
    };
    let mut reserved = vec![("the offsets topic", cfg.offsets_topic.as_str())];
    if let Some(t) = &heartbeat_topic {
        reserved.push(("the heartbeat topic", t.as_str()));
    }
    if !matches!(cfg.mode, ModeConfig::Timestamp(_)) {
        reserved.push(("the dead-letter topic", dead_letter::TOPIC));
    }
    check_topics(&topics, &reserved)?;
    let mut infos = Vec::new();
    let mut gone = Vec::new();
    for t in &tables {
        let topic = topic_name(&cfg.topic_prefix, &t.name);
        match catalog::TableInfo::load(&pool, t).await? {
            Some(info) => infos.push((info, topic)),
            None if changelog && catalog::was_captured(&pool, t).await? => {
                gone.push((t.clone(), topic));
            }
            // Logical mode: a captured table dropped since (its publication
            // is still there) is no reason to stop the others.
            None if matches!(cfg.mode, ModeConfig::Logical(_))
                && catalog::was_published(&pool, t).await? =>
            {
                tracing::warn!(table = %t, "a captured table was dropped: what was captured of it was sent; the other tables go on");
                metrics::gauge!(names::SOURCE_TABLES_DROPPED, "table" => t.to_string()).set(1.0);
            }
            None => bail!(
                "table {t} does not exist in this database: run schema-init, or fix table.whitelist / connection.url"
            ),
        }
    }
    if infos.is_empty() && gone.is_empty() {
        bail!(
            "none of the tables to read exists any more ({}): nothing to capture",
            tables
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    let admin = cfg.kafka.admin()?;
    for topic in infos
        .iter()
        .map(|(_, t)| t)
        .chain(gone.iter().map(|(_, t)| t))
    {
        ensure_topic(&admin, topic, &cfg.topic).await?;
    }
    let offsets_spec = TopicSpec {
        partitions: 1,
        replication_factor: cfg.topic.replication_factor,
        configs: vec![("cleanup.policy".into(), "compact".into())],
    };
    ensure_topic(&admin, &cfg.offsets_topic, &offsets_spec).await?;
    if !matches!(cfg.mode, ModeConfig::Timestamp(_)) {
        ensure_topic(&admin, dead_letter::TOPIC, &cfg.topic).await?;
    }
    if let Some(topic) = &heartbeat_topic {
        let spec = TopicSpec {
            partitions: 1,
            ..cfg.topic.clone()
        };
        ensure_topic(&admin, topic, &spec).await?;
    }

    // Fence older instances first, so their open transaction is aborted and
    // the positions read next are final.
    let mut producer = TxProducer::new(&cfg.kafka, &cfg.transactional_id, shutdown.clone()).await?;
    producer.name_tables(
        infos
            .iter()
            .map(|(info, topic)| (topic.clone(), info.name.to_string()))
            .collect(),
    );
    let settings = cfg.kafka.clone();
    let offsets_topic = cfg.offsets_topic.clone();
    let stored = tokio::task::spawn_blocking(move || {
        read_compacted(&settings, &offsets_topic, Duration::from_secs(60))
    })
    .await??;

    let schemas = (cfg.key_schemas, cfg.value_schemas);
    let database = cfg.pg.database().unwrap_or("postgres").to_owned();
    // Issue 16.5: one line that says what this run is and will do.
    let (position, plan) = start_plan(&cfg, &stored);
    let table_names = tables
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let topic_names = tables
        .iter()
        .map(|t| topic_name(&cfg.topic_prefix, &t.name))
        .collect::<Vec<_>>()
        .join(", ");
    let started = |mode: &str| {
        tracing::info!(
            connector = %cfg.name,
            mode,
            tables = %table_names,
            topics = %topic_names,
            position = %position,
            plan,
            postgres = %cfg.pg,
            kafka = %cfg.kafka.bootstrap_servers,
            "pg-source started"
        )
    };
    match &cfg.mode {
        ModeConfig::Timestamp(t) => {
            let mode = TimestampMode::new(
                t.clone(),
                &cfg.name,
                &pool,
                infos,
                &stored,
                &cfg.offsets_topic,
                schemas,
            )
            .await?;
            started("timestamp+incrementing");
            *reading = true;
            drive(&cfg, mode, &producer, &shutdown).await
        }
        ModeConfig::ChangeLog(c) => {
            let mut mode = ChangeLogMode::new(
                c.clone(),
                &cfg.name,
                &database,
                &pool,
                infos,
                gone,
                &stored,
                &cfg.offsets_topic,
                schemas,
            )
            .await?;
            mode.discovery = discovery(&cfg, &reserved)?;
            started("changelog");
            *reading = true;
            drive(&cfg, mode, &producer, &shutdown).await
        }
        ModeConfig::Logical(l) => {
            // Creating the slot waits for open transactions, however long:
            // a stop must not wait with it.
            let prepared = tokio::select! {
                r = LogicalMode::new(
                    l.clone(),
                    &cfg.name,
                    &database,
                    &pool,
                    &cfg.pg,
                    infos,
                    &stored,
                    &cfg.offsets_topic,
                    schemas,
                ) => Some(r?),
                _ = shutdown.cancelled() => None,
            };
            let Some(mut mode) = prepared else {
                tracing::info!("pg-source stopped before it began reading");
                return Ok(());
            };
            mode.discovery = discovery(&cfg, &reserved)?;
            started("logical");
            *reading = true;
            drive(&cfg, mode, &producer, &shutdown).await
        }
    }
}

/// The one loop: reads a mode until it is caught up, a batch per Kafka
/// transaction with the position, then waits as the mode says. A failed
/// step or send puts the saved position back, so the same changes are read
/// again; transient failures are retried every second, logged once per
/// outage, and mark the program unready meanwhile.
async fn drive<M: Capture>(
    cfg: &Config,
    mut mode: M,
    producer: &TxProducer,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    // Ready (`/readyz`) once the first catch-up is done: the initial
    // snapshot sent and the stream read to its end.
    let mut pg_down = false;
    while !shutdown.is_cancelled() {
        let result = catch_up(&mut mode, producer, shutdown).await;
        // Alive (`/healthz`) on every round, failed ones included.
        cfg.health.progress();
        // An aborted Kafka transaction is read and sent again after a
        // second, not at the next wake-up.
        let mut retry_soon = false;
        match result {
            Ok(()) => {
                if pg_down {
                    tracing::info!("postgres reachable again");
                    pg_down = false;
                }
                if !cfg.health.is_ready() {
                    cfg.health.set_ready(true);
                }
            }
            Err(SourceError::Kafka(BatchError::Stopped)) => {
                tracing::info!("{}", BatchError::Stopped);
                break;
            }
            Err(e @ SourceError::Kafka(BatchError::Retry(_))) => {
                retry_soon = true;
                metrics::counter!(names::SOURCE_ERRORS, "kind" => "kafka").increment(1);
                tracing::warn!(error = %e, "kafka transaction aborted; the batch will be read and sent again");
            }
            Err(e) if e.class() == Class::Transient => {
                metrics::counter!(names::SOURCE_ERRORS, "kind" => e.kind()).increment(1);
                if !pg_down {
                    match e {
                        SourceError::Stream { .. } | SourceError::StreamClosed(_) => {
                            tracing::warn!(error = %e, "replication stream lost; resuming from the stored position")
                        }
                        _ => tracing::warn!(error = %e, "postgres unreachable; retrying"),
                    }
                    cfg.health.set_ready(false);
                    pg_down = true;
                }
            }
            Err(SourceError::Kafka(e @ BatchError::Lost(_))) => {
                // [`run`] starts again with a new producer, which reads the
                // position back from Kafka.
                metrics::counter!(names::SOURCE_ERRORS, "kind" => "kafka").increment(1);
                cfg.health.set_ready(false);
                return Err(anyhow::Error::new(e));
            }
            Err(SourceError::Kafka(BatchError::Fatal(e))) => return Err(e),
            Err(e) => return Err(anyhow::Error::new(e)),
        }
        if pg_down || retry_soon {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        } else {
            mode.wait(shutdown).await;
        }
    }
    cfg.health.set_ready(false);
    tracing::info!("pg-source stopped");
    Ok(())
}

/// Sends batches until the mode is caught up. Written once for every mode:
/// save the position, read, send the batch with the position the read left,
/// and put the saved position back when either fails.
async fn catch_up<M: Capture>(
    mode: &mut M,
    producer: &TxProducer,
    shutdown: &CancellationToken,
) -> Result<(), SourceError> {
    // The Kafka transaction the batches marked `more` left open: the
    // position before its first batch, when it began, and what it holds.
    let mut open: Option<(M::Saved, Instant, usize, usize)> = None;
    while !shutdown.is_cancelled() {
        let saved = mode.save();
        let mut batch = match mode.next(shutdown).await {
            Ok(Some(batch)) => batch,
            Ok(None) if open.is_some() => {
                // Nothing came after an open transaction's parts: it ends
                // here, with the position its parts left.
                Batch {
                    what: "batch committed",
                    ..Batch::default()
                }
            }
            Ok(None) => {
                if mode.zero_lag_when_caught_up() {
                    metrics::gauge!(names::SOURCE_LAG_SECONDS).set(0.0);
                }
                break;
            }
            Err(e) => {
                if let Some((first, ..)) = open.take() {
                    mode.restore(first);
                    producer.abort_open().await.map_err(SourceError::Kafka)?;
                } else {
                    mode.restore(saved);
                }
                return Err(e);
            }
        };
        let records = std::mem::take(&mut batch.records);
        let n = records.len();
        if batch.more && !shutdown.is_cancelled() {
            let (first, started, records_before, rows_before) =
                open.take().unwrap_or((saved, Instant::now(), 0, 0));
            if let Err(e) = producer.send_part(records).await {
                mode.restore(first);
                return Err(SourceError::Kafka(e));
            }
            open = Some((first, started, records_before + n, rows_before + batch.rows));
            continue;
        }
        let (saved, started, n, rows) = match open.take() {
            Some((first, started, records, rows)) => {
                (first, started, records + n, rows + batch.rows)
            }
            None => (saved, Instant::now(), n, batch.rows),
        };
        if let Err(e) = producer.send_batch(records, mode.position_record()).await {
            mode.restore(saved);
            return Err(SourceError::Kafka(e));
        }
        mode.committed(&Committed {
            records: n,
            rows,
            what: batch.what,
            commit: started.elapsed(),
        })
        .await;
        metrics::counter!(names::SOURCE_ROWS_READ).increment(rows as u64);
        metrics::counter!(names::SOURCE_RECORDS_PRODUCED).increment(n as u64);
        metrics::counter!(names::SOURCE_BATCHES).increment(1);
        if let Some(ms) = batch.newest_change_ms {
            let lag = (tidemark_common::health::now_ms() - ms).max(0) as f64 / 1000.0;
            metrics::gauge!(names::SOURCE_LAG_SECONDS).set(lag);
            // Every record of the batch is at least this old.
            metrics::histogram!(names::SOURCE_CHANGE_LAG).record_many(lag, n);
        }
    }
    if let Some((first, ..)) = open.take() {
        // Stopping with a transaction open: what its parts sent is not
        // committed, and is read again at the next start.
        mode.restore(first);
        producer.abort_open().await.map_err(SourceError::Kafka)?;
    }
    Ok(())
}

/// What a start does, from the stored positions: the position (as text,
/// `none` when there is none) and the plan (snapshot, resume, or stream
/// from now), for the start line and `--check`.
pub(crate) fn start_plan(
    cfg: &Config,
    stored: &std::collections::HashMap<Vec<u8>, Vec<u8>>,
) -> (String, &'static str) {
    use tidemark_common::offset::{position_key, SourcePosition};
    let decode = |table: &str| {
        stored
            .get(&position_key(&cfg.name, table))
            .and_then(|b| SourcePosition::decode(b).ok())
    };
    let fresh = |initial: bool| {
        if initial {
            "initial snapshot, then stream changes"
        } else {
            "stream changes from now (snapshot.mode no_data)"
        }
    };
    match &cfg.mode {
        ModeConfig::Logical(l) => match decode("tidemark.logical") {
            Some(SourcePosition::Logical(p)) => (
                format!("lsn {}", pgwire_replication::Lsn(p.lsn)),
                if p.snapshot.is_some() {
                    "resume the initial snapshot"
                } else {
                    "resume streaming"
                },
            ),
            Some(_) => ("another mode's".to_owned(), "refuse"),
            None => ("none".to_owned(), fresh(l.initial_snapshot)),
        },
        ModeConfig::ChangeLog(c) => match decode(tidemark_common::names::CHANGE_LOG) {
            Some(SourcePosition::ChangeLog(p)) => (
                format!("unit {}", p.commit_order),
                if p.snapshot.is_some() {
                    "resume the initial snapshot"
                } else {
                    "resume streaming"
                },
            ),
            Some(_) => ("another mode's".to_owned(), "refuse"),
            None => ("none".to_owned(), fresh(c.initial_snapshot)),
        },
        ModeConfig::Timestamp(_) => {
            let n = stored
                .keys()
                .filter(|k| {
                    serde_json::from_slice::<serde_json::Value>(k)
                        .ok()
                        .is_some_and(|v| v[0] == cfg.name.as_str())
                })
                .count();
            if n == 0 {
                (
                    "none".to_owned(),
                    "read every table from its start (or timestamp.initial)",
                )
            } else {
                (format!("{n} table(s)"), "resume after the stored rows")
            }
        }
    }
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

/// Refuses tables whose topics would be one: their records would mix in
/// one topic, and in a compacted topic one table's keys would overwrite the
/// other's. Kafka counts names that differ only in `.` and `_` as one (they
/// share metric names) and refuses the second; a table's topic may not be
/// one of Tidemark's own (`reserved`: what each is, and its name) either.
///
/// Fails naming both tables, or the table and the topic.
pub fn check_topics(
    tables: &[(&TableName, String)],
    reserved: &[(&str, &str)],
) -> anyhow::Result<()> {
    let kafka_key = |topic: &str| topic.replace('.', "_");
    let mut seen: std::collections::HashMap<String, (&TableName, &str)> =
        std::collections::HashMap::new();
    for (table, topic) in tables {
        if let Some((what, name)) = reserved
            .iter()
            .find(|(_, name)| kafka_key(name) == kafka_key(topic))
        {
            bail!(
                "table {table} would write to topic {topic}, which is {what} ({name}): set another topic.prefix"
            );
        }
        match seen.get(&kafka_key(topic)) {
            Some((other, _)) if other == table => {}
            Some((other, other_topic)) if other_topic == topic => bail!(
                "tables {other} and {table} would share the topic {topic} (the topic names a table by its name alone, \
                 with characters Kafka does not allow as `_`), and in a compacted topic one's keys would overwrite the other's: \
                 capture them with two connectors of different topic.prefix, or rename one"
            ),
            Some((other, other_topic)) => bail!(
                "the topics of tables {other} ({other_topic}) and {table} ({topic}) differ only in `.` and `_`, \
                 which Kafka counts as one name: capture them with two connectors of different topic.prefix, or rename one"
            ),
            None => {
                seen.insert(kafka_key(topic), (table, topic));
            }
        }
    }
    Ok(())
}

/// What finding tables while running needs, when `table.whitelist` has
/// patterns.
///
/// Fails when the Kafka admin client cannot be made.
fn discovery(
    cfg: &Config,
    reserved: &[(&str, &str)],
) -> anyhow::Result<Option<crate::modes::changelog::Discovery>> {
    if cfg.table_patterns.is_empty() {
        return Ok(None);
    }
    Ok(Some(crate::modes::changelog::Discovery {
        patterns: cfg.table_patterns.clone(),
        prefix: cfg.topic_prefix.clone(),
        admin: cfg.kafka.admin()?,
        topic: cfg.topic.clone(),
        reserved: reserved
            .iter()
            .map(|(w, n)| ((*w).to_owned(), (*n).to_owned()))
            .collect(),
    }))
}

/// The tables to read: those `table.whitelist` names, and those its
/// patterns match among the tables the mode finds (captured, published, or
/// with both columns); every table the mode finds when it is not set.
///
/// Fails when the mode finds no table, or on a catalog error.
pub(crate) async fn resolve_tables(cfg: &Config, pool: &PgPool) -> anyhow::Result<Vec<TableName>> {
    let Some(named) = &cfg.tables else {
        return discover_tables(cfg, pool).await;
    };
    let mut tables = named.clone();
    if !cfg.table_patterns.is_empty() {
        for t in discover_tables(cfg, pool).await.unwrap_or_default() {
            if config::matches_any(&cfg.table_patterns, &t) && !tables.contains(&t) {
                tables.push(t);
            }
        }
        if tables.is_empty() {
            bail!(
                "no table that table.whitelist names or matches ({}) is captured in {}: run schema-init for them (--capture changelog or logical --table <table>)",
                cfg.table_patterns.iter().map(|p| p.text.as_str()).collect::<Vec<_>>().join(", "),
                cfg.pg
            );
        }
    }
    Ok(tables)
}

/// The tables to read when `table.whitelist` is not set.
pub(crate) async fn discover_tables(cfg: &Config, pool: &PgPool) -> anyhow::Result<Vec<TableName>> {
    let found = match cfg.mode.mode() {
        Mode::TimestampIncrementing => {
            let ModeConfig::Timestamp(t) = &cfg.mode else {
                unreachable!("the mode says so")
            };
            catalog::discover(pool, &t.timestamp_column, &t.incrementing_column).await?
        }
        Mode::ChangeLog => catalog::discover_captured(pool).await?,
        Mode::Logical => catalog::discover_published(pool).await?,
    };
    if found.is_empty() {
        match &cfg.mode {
            ModeConfig::Timestamp(t) => bail!(
                "no table in {} has both columns `{}` and `{}`: run schema-init, set table.whitelist, or fix the column names",
                cfg.pg, t.timestamp_column, t.incrementing_column
            ),
            ModeConfig::ChangeLog(_) => bail!(
                "no table in {} has change-log capture: run schema-init --capture changelog --table <table>, or set table.whitelist",
                cfg.pg
            ),
            ModeConfig::Logical(_) => bail!(
                "no table in {} has logical capture: run schema-init --capture logical --table <table>, or set table.whitelist",
                cfg.pg
            ),
        }
    }
    Ok(found)
}

/// Warns when the user cannot see other roles' transactions, since then the
/// out-of-order-commit guarantee holds only for its own sessions.
pub(crate) async fn check_privileges(pool: &PgPool, tz: &str) -> anyhow::Result<()> {
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

pub(crate) fn is_utc(tz: &str) -> bool {
    matches!(
        tz.to_ascii_uppercase().as_str(),
        "UTC" | "ETC/UTC" | "GMT" | "ETC/GMT" | "UCT" | "Z" | "ZULU"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn producer_losses_back_off_then_stop_within_the_window_and_are_forgotten_after() {
        let mut l = LostRestarts::default();
        let t0 = Instant::now();
        let waits: Vec<Option<u64>> = (0..6)
            .map(|i| l.next(t0 + Duration::from_secs(i)).map(|d| d.as_secs()))
            .collect();
        assert_eq!(waits, [Some(1), Some(2), Some(4), Some(8), Some(16), None]);
        // The first loss leaves the window: one more start, waiting 16 s.
        let later = t0 + LostRestarts::WINDOW;
        assert_eq!(l.next(later).map(|d| d.as_secs()), Some(16));
        // All forgotten after a quiet window: back to 1 s.
        let quiet = later + LostRestarts::WINDOW;
        assert_eq!(l.next(quiet).map(|d| d.as_secs()), Some(1));
    }

    fn check(tables: &[&str]) -> Result<(), String> {
        let names: Vec<TableName> = tables
            .iter()
            .map(|t| TableName::parse(t).unwrap())
            .collect();
        let topics: Vec<(&TableName, String)> = names
            .iter()
            .map(|t| (t, topic_name("p.", &t.name)))
            .collect();
        check_topics(&topics, &[("the offsets topic", "tidemark.source-offsets")])
            .map_err(|e| e.to_string())
    }

    #[test]
    fn tables_sharing_a_topic_are_refused_naming_both() {
        check(&["t", "u", "\"T\"", "s.v"]).unwrap();
        check(&["t", "public.t"]).unwrap();
        let err = check(&["s1.t", "s2.t"]).unwrap_err();
        assert!(
            err.contains("tables s1.t and s2.t would share the topic p.t"),
            "{err}"
        );
        let err = check(&["\"a b\"", "a_b"]).unwrap_err();
        assert!(err.contains("would share the topic p.a_b"), "{err}");
        let err = check(&["\"a.b\"", "a_b"]).unwrap_err();
        assert!(
            err.contains("(p.a.b) and public.a_b (p.a_b) differ only in"),
            "{err}"
        );
        let names = [TableName::parse("\"source-offsets\"").unwrap()];
        let topics = [(&names[0], topic_name("tidemark.", &names[0].name))];
        let err = check_topics(&topics, &[("the offsets topic", "tidemark.source-offsets")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("which is the offsets topic"), "{err}");
    }
}
