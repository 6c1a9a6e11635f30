//! `pg-source --check`: everything that would stop or weaken a run, looked
//! at without changing anything (no slot, topic or position is created):
//! Postgres reachable, the user's privileges, the mode's server settings
//! (`wal_level`, replication slots, the change log), each table (exists,
//! readable, primary key, capture), Kafka reachable, each topic, the
//! positions topic and the position stored in it.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use pgwire_replication::Lsn;
use rdkafka::admin::{AdminOptions, ResourceSpecifier};
use sqlx::PgPool;
use tidemark_common::check::Report;
use tidemark_common::names;
use tidemark_common::offset::{position_key, SourcePosition};
use tidemark_common::pg::TableName;

use crate::config::{Config, ModeConfig};
use crate::modes::{changelog, logical};
use crate::{catalog, topic_name};

/// Runs every check of `cfg` and returns the findings.
pub async fn check(cfg: &Config) -> Report {
    let mut r = Report::new();
    let mode = match &cfg.mode {
        ModeConfig::Timestamp(_) => "timestamp+incrementing",
        ModeConfig::ChangeLog(_) => "changelog",
        ModeConfig::Logical(_) => "logical",
    };
    r.ok(format!(
        "configuration: connector {}, mode {mode}, topic prefix {:?}",
        cfg.name, cfg.topic_prefix
    ));
    let pool = match cfg.pg.connect(2, Duration::from_secs(3)).await {
        Ok(pool) => {
            r.ok(format!("postgres: connected to {}", cfg.pg));
            Some(pool)
        }
        Err(e) => {
            r.error(&format!("postgres at {}", cfg.pg), &e);
            None
        }
    };
    let mut topics = Vec::new();
    if let Some(pool) = &pool {
        if let Err(e) = postgres(cfg, pool, &mut r, &mut topics).await {
            r.error("postgres", &e);
        }
    }
    let stored = kafka(cfg, &topics, &mut r).await;
    if let (Some(pool), Some(stored)) = (&pool, stored) {
        if let Err(e) = position(cfg, pool, &stored, &mut r).await {
            r.error("the stored position", &e);
        }
    }
    r
}

/// The server, the user and every table; `topics` gets the tables' topics.
async fn postgres(
    cfg: &Config,
    pool: &PgPool,
    r: &mut Report,
    topics: &mut Vec<String>,
) -> anyhow::Result<()> {
    let (user, superuser, replication, version): (String, bool, bool, String) = sqlx::query_as(
        "select r.rolname::pg_catalog.text, r.rolsuper, r.rolreplication,
                pg_catalog.current_setting('server_version')
           from pg_catalog.pg_roles r where r.rolname operator(pg_catalog.=) current_user",
    )
    .fetch_one(pool)
    .await?;
    r.ok(format!(
        "postgres {version}, user {user}{}",
        if superuser { " (superuser)" } else { "" }
    ));
    match &cfg.mode {
        ModeConfig::Timestamp(t) => {
            let (can_see, valid_tz, server_tz): (bool, bool, String) = sqlx::query_as(
                "select pg_catalog.pg_has_role(current_user, 'pg_read_all_stats', 'member') or $2,
                        exists (select 1 from pg_catalog.pg_timezone_names where name operator(pg_catalog.=) $1)
                        or exists (select 1 from pg_catalog.pg_timezone_abbrevs where abbrev operator(pg_catalog.=) $1),
                        pg_catalog.current_setting('log_timezone')",
            )
            .bind(&t.db_timezone)
            .bind(superuser)
            .fetch_one(pool)
            .await?;
            if can_see {
                r.ok("the user sees every role's open transactions (pg_read_all_stats)");
            } else {
                r.warn(
                    format!("user {user} is not a member of pg_read_all_stats: a row another role commits late may be missed"),
                    format!("grant pg_read_all_stats to {user}"),
                );
            }
            if !valid_tz {
                r.fail(
                    format!(
                        "db.timezone {:?} is not a time zone Postgres knows",
                        t.db_timezone
                    ),
                    "set db.timezone to a zone like UTC or Europe/Berlin",
                );
            } else if !(server_tz.eq_ignore_ascii_case(&t.db_timezone)
                || crate::is_utc(&server_tz) && crate::is_utc(&t.db_timezone))
            {
                r.warn(
                    format!(
                        "db.timezone {} differs from the server's time zone {server_tz}",
                        t.db_timezone
                    ),
                    "set db.timezone to the zone the writers' timestamp columns are in",
                );
            } else {
                r.ok(format!("db.timezone {}", t.db_timezone));
            }
        }
        ModeConfig::ChangeLog(_) => {
            match changelog::check_change_log(pool).await {
                Ok(()) => {
                    let (readable, ddl): (bool, bool) = sqlx::query_as(&format!(
                    "select pg_catalog.has_table_privilege('{log}', 'SELECT')
                            and pg_catalog.has_table_privilege('{shapes}', 'SELECT'),
                            exists (select 1 from pg_catalog.pg_event_trigger
                                     where evtname operator(pg_catalog.=) '{ddl}' and evtenabled operator(pg_catalog.<>) 'D')",
                    log = names::CHANGE_LOG,
                    shapes = names::SHAPES,
                    ddl = names::EVENT_TRIGGER,
                ))
                .fetch_one(pool)
                .await?;
                    if readable {
                        r.ok(format!(
                            "change log {} (version 2) readable",
                            names::CHANGE_LOG
                        ));
                    } else {
                        r.fail(
                        format!("user {user} cannot read {} and {}", names::CHANGE_LOG, names::SHAPES),
                        format!("grant usage on schema {} to {user}; grant select on {}, {} to {user}", names::SCHEMA, names::CHANGE_LOG, names::SHAPES),
                    );
                    }
                    signal_table(pool, &user, "changelog", r).await?;
                    if ddl {
                        r.ok(format!(
                            "event trigger {} records schema changes",
                            names::EVENT_TRIGGER
                        ));
                    } else {
                        r.warn(
                        format!("event trigger {} is missing or disabled: an ALTER TABLE of a captured table would not be recorded, and its changes would be decoded with the old columns", names::EVENT_TRIGGER),
                        "run schema-init --capture changelog as a superuser",
                    );
                    }
                }
                Err(e) => r.error("change log", &e),
            }
        }
        ModeConfig::Logical(l) => {
            let (wal_level, senders, slots, used): (String, i32, i32, i64) = sqlx::query_as(
                "select pg_catalog.current_setting('wal_level'),
                        pg_catalog.current_setting('max_wal_senders')::pg_catalog.int4,
                        pg_catalog.current_setting('max_replication_slots')::pg_catalog.int4,
                        (select pg_catalog.count(*) from pg_catalog.pg_replication_slots)",
            )
            .fetch_one(pool)
            .await?;
            if wal_level == "logical" {
                r.ok("wal_level = logical");
            } else {
                r.fail(
                    format!("wal_level = {wal_level}, and mode logical needs logical"),
                    "alter system set wal_level = logical as a superuser and restart Postgres, or use mode changelog",
                );
            }
            if superuser || replication {
                r.ok(format!("user {user} may replicate (REPLICATION attribute)"));
            } else {
                r.fail(
                    format!("user {user} lacks the REPLICATION attribute a replication slot needs"),
                    format!("alter role {user} replication"),
                );
            }
            if senders < 1 {
                r.fail(
                    "max_wal_senders = 0: no replication connection is possible",
                    "set max_wal_senders to at least 1 and restart Postgres",
                );
            }
            slot(pool, &l.slot_name, slots, used, r).await?;
            signal_table(pool, &user, "logical", r).await?;
        }
    }

    let tables = match &cfg.tables {
        Some(t) if cfg.table_patterns.is_empty() => t.clone(),
        _ => match crate::resolve_tables(cfg, pool).await {
            Ok(t) => {
                r.ok(format!(
                    "tables found (table.whitelist unset or a pattern): {}",
                    t.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                t
            }
            Err(e) => {
                r.error("tables", &e);
                Vec::new()
            }
        },
    };
    let named: Vec<(&TableName, String)> = tables
        .iter()
        .map(|t| (t, topic_name(&cfg.topic_prefix, &t.name)))
        .collect();
    let mut reserved = vec![("the offsets topic", cfg.offsets_topic.as_str())];
    if !matches!(cfg.mode, ModeConfig::Timestamp(_)) {
        reserved.push(("the dead-letter topic", crate::dead_letter::TOPIC));
    }
    if let Err(e) = crate::check_topics(&named, &reserved) {
        r.error("topics", &e);
    }
    for t in &tables {
        topics.push(topic_name(&cfg.topic_prefix, &t.name));
        if let Err(e) = table(cfg, pool, t, &user, r).await {
            r.error(&format!("table {t}"), &e);
        }
    }
    if !matches!(cfg.mode, ModeConfig::Timestamp(_)) {
        topics.push(crate::dead_letter::TOPIC.to_owned());
    }
    Ok(())
}

/// The signal table (snapshots on demand): there, made as schema-init
/// makes it (a table a superuser owns, in a schema a superuser owns), and
/// readable by `user`. `mode`: the `--capture` that creates it.
async fn signal_table(pool: &PgPool, user: &str, mode: &str, r: &mut Report) -> anyhow::Result<()> {
    let (schema, table) = names::SIGNAL.split_once('.').expect("schema.table");
    let signal: Option<(bool, bool)> = sqlx::query_as(crate::signal::TRUST_SQL)
        .bind(schema)
        .bind(table)
        .fetch_optional(pool)
        .await?;
    match signal {
        Some((true, true)) => r.ok(format!(
            "signal table {} readable: snapshots on demand are on",
            names::SIGNAL
        )),
        Some((false, _)) => r.warn(
            format!("{} is not a table owned by a superuser in a schema a superuser owns: pg-source does not read it, and snapshots on demand are off", names::SIGNAL),
            format!("check who made it; drop it and run schema-init --capture {mode} of this release as a superuser"),
        ),
        Some((true, false)) => r.warn(
            format!("user {user} cannot read the signal table {}: snapshots on demand are off", names::SIGNAL),
            format!("grant usage on schema {} to {user}; grant select on {} to {user}", names::SCHEMA, names::SIGNAL),
        ),
        None => r.warn(
            format!("no signal table {}: snapshots on demand are off", names::SIGNAL),
            format!("run schema-init --capture {mode} of this release as a superuser"),
        ),
    }
    Ok(())
}

/// The replication slot, or room for it.
async fn slot(
    pool: &PgPool,
    slot: &str,
    max: i32,
    used: i64,
    r: &mut Report,
) -> anyhow::Result<()> {
    type SlotRow = (
        Option<String>,
        Option<String>,
        bool,
        Option<String>,
        bool,
        Option<i32>,
        Option<i64>,
    );
    let found: Option<SlotRow> = sqlx::query_as(
        "select plugin::pg_catalog.text, database::pg_catalog.text,
                database operator(pg_catalog.=) pg_catalog.current_database(),
                wal_status, active, active_pid,
                pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), restart_lsn)::pg_catalog.int8
           from pg_catalog.pg_replication_slots where slot_name operator(pg_catalog.=) $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await?;
    match found {
        None if i64::from(max) <= used => r.fail(
            format!("replication slot {slot} does not exist, and all {max} slots (max_replication_slots) are taken"),
            "drop a slot nobody reads (select pg_drop_replication_slot('...')), or raise max_replication_slots and restart Postgres",
        ),
        None => r.ok(format!(
            "replication slot {slot} does not exist yet: the first start creates it ({used} of {max} slots taken)"
        )),
        Some((plugin, database, same_db, wal_status, active, pid, kept)) => {
            if plugin.as_deref() != Some("pgoutput") || !same_db {
                r.fail(
                    format!(
                        "replication slot {slot} belongs to another reader (plugin {}, database {})",
                        plugin.unwrap_or_default(),
                        database.unwrap_or_default()
                    ),
                    format!("set slot.name to another name, or drop it: select pg_drop_replication_slot('{slot}')"),
                );
            } else if wal_status.as_deref() == Some("lost") {
                r.fail(
                    format!("replication slot {slot} lost WAL it needed (max_slot_wal_keep_size): the changes since cannot be read"),
                    format!("drop it (select pg_drop_replication_slot('{slot}')) and start over with a new connector name"),
                );
            } else {
                let kept_mb = kept.unwrap_or(0) as f64 / 1_048_576.0;
                r.ok(format!("replication slot {slot} exists (pgoutput, this database), keeping {kept_mb:.1} MB of WAL"));
                if wal_status.as_deref() == Some("unreserved") {
                    r.warn(
                        format!("replication slot {slot} is about to lose WAL it needs (wal_status unreserved)"),
                        "start pg-source so it reads on, or raise max_slot_wal_keep_size",
                    );
                }
            }
            if active {
                r.warn(
                    format!("replication slot {slot} is being read now, by process {}", pid.unwrap_or(0)),
                    "a second pg-source on the same connector waits for it; give each connector its own name and slot.name",
                );
            }
        }
    }
    Ok(())
}

/// One configured table.
async fn table(
    cfg: &Config,
    pool: &PgPool,
    t: &TableName,
    user: &str,
    r: &mut Report,
) -> anyhow::Result<()> {
    let info = match catalog::TableInfo::load(pool, t).await {
        Ok(Some(info)) => info,
        Ok(None) => {
            if matches!(cfg.mode, ModeConfig::ChangeLog(_))
                && catalog::was_captured(pool, t).await?
            {
                r.warn(
                    format!("table {t} was dropped: the changes logged before the drop are sent, then nothing"),
                    "remove it from table.whitelist once they are sent",
                );
            } else if matches!(cfg.mode, ModeConfig::Logical(_))
                && catalog::was_published(pool, t).await?
            {
                r.warn(
                    format!("table {t} was dropped: what was captured of it was sent, the other tables go on"),
                    "remove it from table.whitelist",
                );
            } else {
                r.error(
                    &format!("table {t}"),
                    &anyhow::anyhow!("table {t} does not exist in this database: run schema-init, or fix table.whitelist / connection.url"),
                );
            }
            return Ok(());
        }
        Err(e) => {
            r.error(&format!("table {t}"), &e);
            return Ok(());
        }
    };
    let readable: bool = sqlx::query_scalar(
        "select pg_catalog.has_table_privilege(pg_catalog.to_regclass($1), 'SELECT')",
    )
    .bind(t.quoted())
    .fetch_one(pool)
    .await?;
    if !readable {
        r.fail(
            format!("user {user} cannot read table {t}"),
            format!("grant select on {} to {user}", t.quoted()),
        );
    }
    let key: Vec<&str> = info.key.iter().map(|c| c.name.as_str()).collect();
    let captured = match &cfg.mode {
        ModeConfig::Timestamp(ts) => {
            for col in [&ts.timestamp_column, &ts.incrementing_column] {
                if info.column(col).is_none() {
                    r.fail(
                        format!("table {t} has no column {col}"),
                        "fix timestamp.column.name / incrementing.column.name, or table.whitelist",
                    );
                }
            }
            if key.is_empty() {
                r.warn(
                    format!(
                        "table {t} has no primary key: its records are keyed by {}",
                        ts.incrementing_column
                    ),
                    format!("add a primary key to {t}"),
                );
            }
            // Each poll reads `(timestamp, id) > position` in that order:
            // without an index that leads with both, every poll scans.
            let indexed: bool = sqlx::query_scalar(
                "select exists (
                   select 1 from pg_catalog.pg_index i
                    where i.indrelid operator(pg_catalog.=) pg_catalog.to_regclass($1)
                      and i.indnatts operator(pg_catalog.>=) 2
                      and (select a.attname from pg_catalog.pg_attribute a
                            where a.attrelid operator(pg_catalog.=) i.indrelid
                              and a.attnum operator(pg_catalog.=) i.indkey[0]) operator(pg_catalog.=) $2::pg_catalog.name
                      and (select a.attname from pg_catalog.pg_attribute a
                            where a.attrelid operator(pg_catalog.=) i.indrelid
                              and a.attnum operator(pg_catalog.=) i.indkey[1]) operator(pg_catalog.=) $3::pg_catalog.name)",
            )
            .bind(t.quoted())
            .bind(&ts.timestamp_column)
            .bind(&ts.incrementing_column)
            .fetch_one(pool)
            .await?;
            if !indexed && info.column(&ts.timestamp_column).is_some() {
                r.warn(
                    format!(
                        "table {t} has no index on ({}, {}): every poll reads the whole table",
                        ts.timestamp_column, ts.incrementing_column
                    ),
                    format!(
                        "create index on {} ({}, {})",
                        t.quoted(),
                        tidemark_common::names::quote_ident(&ts.timestamp_column),
                        tidemark_common::names::quote_ident(&ts.incrementing_column)
                    ),
                );
            }
            Ok(())
        }
        ModeConfig::ChangeLog(_) => changelog::check_trigger(pool, t).await,
        ModeConfig::Logical(_) => logical::check_capture(pool, t).await,
    };
    if key.is_empty() && !matches!(cfg.mode, ModeConfig::Timestamp(_)) {
        r.fail(
            format!("table {t} has no primary key, so its changes cannot be keyed"),
            format!("add a primary key to {t}, or use mode timestamp+incrementing"),
        );
    }
    match captured {
        Ok(()) if readable && !key.is_empty() => r.ok(format!(
            "table {t}: {} columns, primary key ({}), readable{}",
            info.columns.len(),
            key.join(", "),
            match &cfg.mode {
                ModeConfig::Timestamp(_) => "",
                ModeConfig::ChangeLog(_) => ", change-log trigger",
                ModeConfig::Logical(_) => ", published with replica identity full",
            }
        )),
        Ok(()) => {}
        Err(e) => r.error(&format!("table {t}"), &e),
    }
    Ok(())
}

/// Kafka, the tables' topics and the positions topic; returns the stored
/// positions when they could be read.
async fn kafka(
    cfg: &Config,
    topics: &[String],
    r: &mut Report,
) -> Option<HashMap<Vec<u8>, Vec<u8>>> {
    let (_, metadata) =
        tokio::task::block_in_place(|| tidemark_common::check::kafka_metadata(&cfg.kafka, r))?;
    transactions(cfg, &metadata, r).await;
    let existing: HashMap<&str, (usize, bool)> = metadata
        .topics()
        .iter()
        .map(|t| {
            let denied = t.error().is_some_and(|e| {
                e == rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED
            });
            (t.name(), (t.partitions().len(), denied))
        })
        .collect();
    let unique: BTreeSet<&String> = topics.iter().collect();
    for topic in unique {
        match existing.get(topic.as_str()) {
            Some((_, true)) => r.fail(
                format!("not allowed to describe topic {topic}"),
                "grant this user WRITE and DESCRIBE on it (and a transactional id's WRITE)",
            ),
            Some((n, false)) => r.ok(format!("topic {topic} exists ({n} partitions)")),
            None => r.ok(format!(
                "topic {topic} does not exist yet: the first start creates it ({} partitions, replication factor {})",
                cfg.topic.partitions,
                if cfg.topic.replication_factor < 0 { "of the broker".to_owned() } else { cfg.topic.replication_factor.to_string() }
            )),
        }
    }
    let offsets = &cfg.offsets_topic;
    match existing.get(offsets.as_str()) {
        None => {
            r.ok(format!(
                "positions topic {offsets} does not exist yet: no stored position, the first start creates it (compacted)"
            ));
            Some(HashMap::new())
        }
        Some((_, true)) => {
            r.fail(
                format!("not allowed to describe the positions topic {offsets}"),
                "grant this user READ, WRITE and DESCRIBE on it",
            );
            None
        }
        Some(_) => {
            match compacted(cfg, offsets).await {
                Ok(true) => r.ok(format!("positions topic {offsets} is compacted")),
                Ok(false) => r.warn(
                    format!("positions topic {offsets} is not compacted: retention may delete the stored position"),
                    format!("kafka-configs --alter --entity-type topics --entity-name {offsets} --add-config cleanup.policy=compact"),
                ),
                Err(e) => r.warn(format!("cannot read the configuration of {offsets}: {e:#}"), "grant DESCRIBE_CONFIGS on it"),
            }
            let settings = cfg.kafka.clone();
            let topic = offsets.clone();
            let read = tokio::task::spawn_blocking(move || {
                tidemark_common::kafka::read_compacted(&settings, &topic, Duration::from_secs(15))
            })
            .await;
            match read {
                Ok(Ok(stored)) => Some(stored),
                Ok(Err(e)) => {
                    r.error(&format!("positions topic {offsets}"), &e);
                    None
                }
                Err(e) => {
                    r.fail(format!("reading {offsets}: {e}"), "");
                    None
                }
            }
        }
    }
}

/// Whether the brokers can run transactions, which every batch is: Kafka
/// creates its transaction log at the first transaction, with
/// `transaction.state.log.replication.factor` replicas, and refuses to while
/// fewer brokers run (a single broker keeps the default, 3).
async fn transactions(cfg: &Config, metadata: &rdkafka::metadata::Metadata, r: &mut Report) {
    if metadata
        .topics()
        .iter()
        .any(|t| t.name() == "__transaction_state")
    {
        r.ok("kafka: the transaction log exists");
        return;
    }
    let brokers = metadata.brokers().len();
    let Some(broker) = metadata.brokers().first() else {
        return;
    };
    let wanted = async {
        let admin = cfg.kafka.admin()?;
        let results = admin
            .describe_configs(
                &[ResourceSpecifier::Broker(broker.id())],
                &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
            )
            .await?;
        let resource = results
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no answer"))?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::Ok(
            resource
                .get("transaction.state.log.replication.factor")
                .and_then(|e| e.value.as_deref())
                .and_then(|v| v.parse::<usize>().ok()),
        )
    }
    .await;
    match wanted {
        Ok(Some(rf)) if rf > brokers => r.fail(
            format!("kafka: the first transaction needs {rf} brokers for the transaction log (transaction.state.log.replication.factor), and {brokers} run"),
            format!("set transaction.state.log.replication.factor (and transaction.state.log.min.isr) to at most {brokers} in the brokers' configuration, or run more brokers"),
        ),
        Ok(_) => r.ok("kafka: the brokers can create the transaction log"),
        Err(e) => r.warn(
            format!("kafka: cannot read the brokers' configuration ({e:#}), so whether transactions work is unknown"),
            "grant DESCRIBE_CONFIGS on the cluster, or check transaction.state.log.replication.factor by hand",
        ),
    }
}

/// Whether the topic's cleanup.policy includes compact.
async fn compacted(cfg: &Config, topic: &str) -> anyhow::Result<bool> {
    let admin = cfg.kafka.admin()?;
    let results = admin
        .describe_configs(
            &[ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    let resource = results
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no answer"))?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(resource
        .get("cleanup.policy")
        .and_then(|e| e.value.as_deref())
        .is_some_and(|v| v.split(',').any(|p| p.trim() == "compact")))
}

/// What the stored position says a start would do.
async fn position(
    cfg: &Config,
    pool: &PgPool,
    stored: &HashMap<Vec<u8>, Vec<u8>>,
    r: &mut Report,
) -> anyhow::Result<()> {
    let (at, plan) = crate::start_plan(cfg, stored);
    if plan == "refuse" {
        r.fail(
            format!(
                "the stored position of connector {} is for another mode",
                cfg.name
            ),
            "use a new connector name to change modes",
        );
        return Ok(());
    }
    if let ModeConfig::Logical(l) = &cfg.mode {
        let key = position_key(&cfg.name, "tidemark.logical");
        if let Some(Ok(SourcePosition::Logical(p))) =
            stored.get(&key).map(|b| SourcePosition::decode(b))
        {
            let flushed: Option<Option<String>> = sqlx::query_scalar(
                "select confirmed_flush_lsn::pg_catalog.text from pg_catalog.pg_replication_slots where slot_name operator(pg_catalog.=) $1",
            )
            .bind(&l.slot_name)
            .fetch_optional(pool)
            .await?;
            match flushed {
                None => {
                    r.fail(
                        format!("a position is stored ({at}) but replication slot {} is gone: the changes since cannot be read", l.slot_name),
                        "start over with a new connector name (a new initial snapshot), or restore the slot",
                    );
                    return Ok(());
                }
                Some(f) => {
                    let f = logical::parse_lsn(f.as_deref().unwrap_or("0/0"))?;
                    if f > p.lsn {
                        r.fail(
                            format!("replication slot {} was confirmed up to {} but the stored position is {}: something else reads the slot", l.slot_name, Lsn(f), Lsn(p.lsn)),
                            "give each connector its own slot.name; drop this slot and start over with a new connector name",
                        );
                        return Ok(());
                    }
                }
            }
        }
    }
    r.ok(format!("stored position: {at}; a start does: {plan}"));
    Ok(())
}
