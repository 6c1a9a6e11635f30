//! `pg-replay --check`: everything that would stop or weaken a replay,
//! looked at without changing anything (no table or position row is
//! created, no lock taken): the archive (files readable, topics there), the
//! target (reachable, the position table and this replay's position,
//! another pg-replay on the same name), and each target table (exists or
//! can be created, primary key, privileges, triggers).

use std::collections::BTreeSet;
use std::io::BufRead as _;
use std::time::Duration;

use sqlx::{Connection as _, PgConnection};
use tidemark_common::check::Report;
use tidemark_common::names;
use tidemark_common::pg::TableName;

use crate::apply::UserTriggers;
use crate::{position, target, Config};

/// Records read from the start of each file to learn the archive's tables
/// when --table does not name them.
const SCAN_LINES: usize = 1_000;

/// Runs every check of `cfg` and returns the findings.
pub async fn check(cfg: &Config) -> Report {
    let mut r = Report::new();
    r.ok(format!(
        "configuration: replay {:?}, {} file(s), {} topic(s), into {}",
        cfg.name,
        cfg.inputs.len(),
        cfg.topics.len(),
        cfg.target
    ));
    let mut seen = BTreeSet::new();
    for path in &cfg.inputs {
        if path.is_dir() {
            match crate::segmented::partitions(path) {
                Ok(parts) => {
                    r.ok(format!(
                        "segmented archive {} readable ({} partitions)",
                        path.display(),
                        parts.len()
                    ));
                    // The tables of each partition's first records.
                    let records = tidemark_common::archive::Archive::open(path).map(|a| {
                        a.records(&Default::default())
                            .take(SCAN_LINES)
                            .filter_map(Result::ok)
                            .map(|r| r.line)
                            .collect::<Vec<_>>()
                    });
                    if let Ok(lines) = records {
                        scan_lines(lines.iter().map(String::as_str), &mut seen);
                    }
                }
                Err(e) => r.fail(
                    format!("{e:#}"),
                    "fix --input: give the folder file-sink's `file` names, readable by this user",
                ),
            }
            continue;
        }
        match std::fs::File::open(path) {
            Ok(f) => {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                r.ok(format!(
                    "archive file {} readable ({len} bytes)",
                    path.display()
                ));
                scan_tables(f, &mut seen);
            }
            Err(e) => r.fail(
                format!("archive file {}: {e}", path.display()),
                "fix --input, or give this user read permission on the file",
            ),
        }
    }
    if !cfg.topics.is_empty() {
        let kafka = cfg.kafka.clone();
        let topics = cfg.topics.clone();
        match tokio::task::spawn_blocking(move || {
            let mut r = Report::new();
            check_topics(&kafka, &topics, &mut r);
            r
        })
        .await
        {
            Ok(more) => r.findings.extend(more.findings),
            Err(e) => r.fail(format!("checking Kafka: {e}"), ""),
        }
    }
    let mut conn = match tokio::time::timeout(
        Duration::from_secs(10),
        PgConnection::connect_with(&cfg.target.options),
    )
    .await
    {
        Ok(Ok(c)) => {
            r.ok(format!("target: connected to {}", cfg.target));
            c
        }
        Ok(Err(e)) => {
            r.error(
                &format!("target {}", cfg.target),
                &tidemark_common::pg::explain(e, &cfg.target),
            );
            return r;
        }
        Err(_) => {
            r.fail(
                format!("target {}: no answer within 10 s", cfg.target),
                "check --target-url (TIDEMARK_TARGET_URL) and that Postgres runs",
            );
            return r;
        }
    };
    if let Err(e) = stored_position(cfg, &mut conn, &mut r).await {
        r.error("replay position", &e);
    }
    let tables: Vec<TableName> = if cfg.tables.is_empty() {
        let names: Vec<TableName> = seen
            .iter()
            .filter_map(|t: &String| TableName::parse(t).ok())
            .collect();
        if !names.is_empty() {
            r.ok(format!(
                "tables of the archive (its first {SCAN_LINES} records of each file): {}",
                seen.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        names
    } else {
        cfg.tables.iter().map(|(_, t)| t.clone()).collect()
    };
    for t in &tables {
        if let Err(e) = table(cfg, &mut conn, t, &mut r).await {
            r.error(&format!("target table {t}"), &e);
        }
    }
    r
}

/// Adds the `schema.table` of the first records of an archive file.
fn scan_tables(f: std::fs::File, seen: &mut BTreeSet<String>) {
    let lines: Vec<String> = std::io::BufReader::new(f)
        .lines()
        .take(SCAN_LINES)
        .map_while(Result::ok)
        .collect();
    scan_lines(lines.iter().map(String::as_str), seen);
}

fn scan_lines<'a>(lines: impl Iterator<Item = &'a str>, seen: &mut BTreeSet<String>) {
    for line in lines {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let payload = if v.get("payload").is_some() && v.get("schema").is_some() {
            &v["payload"]
        } else {
            &v
        };
        let source = &payload["source"];
        if let (Some(s), Some(t)) = (source["schema"].as_str(), source["table"].as_str()) {
            seen.insert(
                TableName {
                    schema: s.to_owned(),
                    name: t.to_owned(),
                }
                .to_string(),
            );
        }
    }
}

/// The archive topics.
fn check_topics(kafka: &tidemark_common::kafka::KafkaSettings, topics: &[String], r: &mut Report) {
    let Some((_, metadata)) = tidemark_common::check::kafka_metadata(kafka, r) else {
        return;
    };
    for topic in topics {
        match metadata.topics().iter().find(|t| t.name() == topic) {
            None => r.fail(
                format!("archive topic {topic} does not exist"),
                "fix --topic (the topics pg-source writes are the table names with topic.prefix)",
            ),
            Some(t) if t.error().is_some() => r.fail(
                format!("archive topic {topic}: {:?}", t.error()),
                "grant this user READ and DESCRIBE on it",
            ),
            Some(t) => r.ok(format!(
                "archive topic {topic} ({} partition(s))",
                t.partitions().len()
            )),
        }
    }
}

/// The position table, this replay's position and its lock.
async fn stored_position(
    cfg: &Config,
    conn: &mut PgConnection,
    r: &mut Report,
) -> anyhow::Result<()> {
    let (user, exists, can_create_db, schema_exists, can_create_schema): (String, bool, bool, bool, bool) =
        sqlx::query_as(
            "select current_user::pg_catalog.text,
                    pg_catalog.to_regclass($1) is not null,
                    pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE'),
                    exists (select from pg_catalog.pg_namespace where nspname operator(pg_catalog.=) 'tidemark'),
                    exists (select from pg_catalog.pg_namespace where nspname operator(pg_catalog.=) 'tidemark')
                    and pg_catalog.has_schema_privilege('tidemark', 'CREATE')",
        )
        .bind(names::REPLAY_POSITION)
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        if can_create_schema || (!schema_exists && can_create_db) {
            r.ok(format!(
                "{} does not exist yet: the first run creates it, and replays from the archive's start",
                names::REPLAY_POSITION
            ));
        } else {
            r.fail(
                format!("{} does not exist, and user {user} may not create it", names::REPLAY_POSITION),
                format!("grant create on database to {user} (or create schema tidemark for it), or create the table as its owner"),
            );
        }
        return Ok(());
    }
    let (owned, readable, writable): (bool, bool, bool) = sqlx::query_as(
        "select pg_catalog.pg_has_role(c.relowner, 'USAGE'),
                pg_catalog.has_table_privilege(c.oid, 'SELECT'),
                pg_catalog.has_table_privilege(c.oid, 'INSERT') and pg_catalog.has_table_privilege(c.oid, 'UPDATE')
           from pg_catalog.pg_class c where c.oid operator(pg_catalog.=) pg_catalog.to_regclass($1)",
    )
    .bind(names::REPLAY_POSITION)
    .fetch_one(&mut *conn)
    .await?;
    if !owned {
        r.fail(
            format!("{} belongs to another role", names::REPLAY_POSITION),
            "connect as its owner (or drop it to start over)",
        );
        return Ok(());
    }
    if !readable || !writable {
        r.fail(
            format!(
                "user {user} may not read and write {}",
                names::REPLAY_POSITION
            ),
            format!(
                "grant select, insert, update on {} to {user}",
                names::REPLAY_POSITION
            ),
        );
        return Ok(());
    }
    let stored: Option<(Option<i64>, i64, i64)> = sqlx::query_as(&format!(
        "select commit_order, changes, units from {} where name operator(pg_catalog.=) $1",
        position::TABLE
    ))
    .bind(&cfg.name)
    .fetch_optional(&mut *conn)
    .await?;
    match stored {
        Some((Some(order), changes, units)) => r.ok(format!(
            "replay {:?} has applied {units} unit(s), {changes} change(s), up to unit {order}: a run resumes after it",
            cfg.name
        )),
        _ => r.ok(format!(
            "replay {:?} has applied nothing yet: a run starts at the archive's beginning",
            cfg.name
        )),
    }
    let busy: bool = sqlx::query_scalar(
        "select exists (select from pg_catalog.pg_locks
                         where locktype operator(pg_catalog.=) 'advisory'
                           and database operator(pg_catalog.=) (select oid from pg_catalog.pg_database where datname operator(pg_catalog.=) pg_catalog.current_database())
                           and ((classid::pg_catalog.int8 operator(pg_catalog.<<) 32) operator(pg_catalog.|) objid::pg_catalog.int8) operator(pg_catalog.=) $1
                           and objsubid operator(pg_catalog.=) 1)",
    )
    .bind(position::lock_key(&cfg.name))
    .fetch_one(&mut *conn)
    .await?;
    if busy {
        r.fail(
            format!(
                "another pg-replay is applying replay {:?} to this database now",
                cfg.name
            ),
            "stop it, or give this one another --name (TIDEMARK_REPLAY_NAME)",
        );
    }
    Ok(())
}

/// One target table.
async fn table(
    cfg: &Config,
    conn: &mut PgConnection,
    t: &TableName,
    r: &mut Report,
) -> anyhow::Result<()> {
    let Some(found) = target::load_table(conn, t).await? else {
        let can: bool = sqlx::query_scalar(
            "select coalesce((select pg_catalog.has_schema_privilege(n.oid, 'CREATE') from pg_catalog.pg_namespace n
                               where n.nspname operator(pg_catalog.=) $1), false)",
        )
        .bind(&t.schema)
        .fetch_one(&mut *conn)
        .await?;
        if can {
            r.ok(format!("target table {t} does not exist: a run creates it from the column types the archive carries"));
        } else {
            r.fail(
                format!("target table {t} does not exist, and this user may not create it in schema {}", t.schema),
                format!("create the table (pg_dump --schema-only --table of the source), or grant create on schema {} to this user", t.schema),
            );
        }
        return Ok(());
    };
    let refused: Vec<&str> = [
        (found.can_insert, "INSERT"),
        (found.can_update, "UPDATE"),
        (found.can_delete, "DELETE"),
    ]
    .into_iter()
    .filter(|(ok, _)| !ok)
    .map(|(_, what)| what)
    .collect();
    if !refused.is_empty() {
        r.fail(
            format!(
                "this user may not write target table {t} (no {})",
                refused.join(", ")
            ),
            format!(
                "grant select, insert, update, delete on {} to it, or connect as the table's owner",
                t.quoted()
            ),
        );
        return Ok(());
    }
    if !found.owner_is_session && !found.may_become_owner && !found.owner_is_superuser {
        let owner = tidemark_common::names::quote_ident(&found.owner);
        r.fail(
            format!(
                "target table {t} belongs to role {owner}, whose code on it would run with this user's privileges"
            ),
            format!("connect as {owner} (or a member of it, or a superuser: pg-replay then writes as {owner})"),
        );
        return Ok(());
    }
    if !found.user_triggers.is_empty() {
        let names: Vec<&str> = found
            .user_triggers
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        match (cfg.user_triggers, found.owned) {
            (UserTriggers::Disable, false) => {
                r.fail(
                    format!("target table {t} has triggers ({}) that pg-replay disables while it applies, which needs ownership", names.join(", ")),
                    "connect as the table's owner, or pass --user-triggers fire to let them run",
                );
                return Ok(());
            }
            (UserTriggers::Fire, _) => r.warn(
                format!("target table {t} has triggers ({}) that fire on replayed rows (--user-triggers fire); the archive already holds their effects at the source", names.join(", ")),
                "leave --user-triggers at disable unless the triggers must run",
            ),
            (UserTriggers::Disable, true) => {}
        }
    }
    r.ok(format!(
        "target table {t}: {} columns, primary key of {} column(s), writable",
        found.columns.len(),
        found.key.len()
    ));
    Ok(())
}
