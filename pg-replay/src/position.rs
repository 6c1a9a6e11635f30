//! The replay position: a row of `tidemark.replay_position` in the target,
//! written in the same transaction as the changes it covers, so the target
//! and its position never disagree, whatever instant pg-replay is killed at.
//!
//! The row is keyed by the replay's name (`--name`): one target may hold
//! several replays (of different archives into different tables). A session
//! advisory lock on the name keeps two pg-replay processes from applying the
//! same replay at once.

use std::collections::BTreeMap;

use anyhow::{bail, Context as _};
use sqlx::{PgConnection, Row as _};

use tidemark_common::names::SCHEMA;

/// The position table, schema-qualified (its name is `common::names`').
pub use tidemark_common::names::REPLAY_POSITION as TABLE;

use crate::archive::StreamPos;

/// What the stored position says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    /// The last unit applied; `None` before the first.
    pub commit_order: Option<i64>,
    /// Its commit time, µs since the epoch.
    pub ts_us: Option<i64>,
    /// Where each stream may resume (by [`crate::archive::StreamKind::hint_key`]):
    /// everything before is applied or older than the position. For
    /// row-state archives (no units) this is the position itself.
    pub streams: BTreeMap<String, StreamPos>,
    /// Changes applied so far, all runs.
    pub changes: i64,
    /// Units applied so far, all runs.
    pub units: i64,
}

/// How long [`open`] waits for the replay's lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// A 64-bit key for the advisory lock of replay `name` (FNV-1a, stable
/// across releases).
pub(crate) fn lock_key(name: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"tidemark.replay:".iter().chain(name.as_bytes()) {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// Creates the position table if needed, checks that nobody but this role
/// (or a superuser) controls it, takes the replay's lock and reads its
/// position.
///
/// Fails when the schema or table cannot be created (no CREATE privilege:
/// says what to grant), when the table or its schema belongs to another
/// role, or when another pg-replay still holds the name after [`LOCK_WAIT`].
pub async fn open(conn: &mut PgConnection, name: &str) -> anyhow::Result<Position> {
    // A pg-replay killed a moment ago may still hold the lock: its server
    // session ends only when the server notices, which can take until its
    // current statement ends. So wait a while before calling it another
    // pg-replay.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let mut said = false;
    let locked = loop {
        let locked: bool = sqlx::query_scalar("select pg_catalog.pg_try_advisory_lock($1)")
            .bind(lock_key(name))
            .fetch_one(&mut *conn)
            .await
            .context("cannot take the replay's advisory lock")?;
        if locked || std::time::Instant::now() >= deadline {
            break locked;
        }
        if !said {
            tracing::info!(
                replay = name,
                "another session holds this replay's lock; waiting for it to end"
            );
            said = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    if !locked {
        bail!(
            "another pg-replay is applying replay {name:?} to this database; stop it, or give this one \
             another --name (TIDEMARK_REPLAY_NAME)"
        );
    }
    let exists: bool = sqlx::query_scalar("select pg_catalog.to_regclass($1) is not null")
        .bind(TABLE)
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        let created = async {
            // CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even
            // when the schema is there.
            let schema: bool = sqlx::query_scalar(
                "select exists (select from pg_catalog.pg_namespace where nspname operator(pg_catalog.=) $1)",
            )
            .bind(SCHEMA)
            .fetch_one(&mut *conn)
            .await?;
            if !schema {
                sqlx::query(&format!("create schema {SCHEMA}"))
                    .execute(&mut *conn)
                    .await?;
            }
            sqlx::query(&format!(
                r#"create table if not exists {TABLE} (
                     name text primary key,
                     commit_order bigint,
                     ts_us bigint,
                     tx_id bigint,
                     lsn bigint,
                     streams jsonb not null default '{{}}',
                     changes bigint not null default 0,
                     units bigint not null default 0,
                     updated_at timestamptz not null default pg_catalog.clock_timestamp())"#
            ))
            .execute(&mut *conn)
            .await
        }
        .await;
        if let Err(e) = created {
            bail!(
                "cannot create {TABLE} in the target, where pg-replay keeps its position: {e}; \
                 grant this role CREATE on the database (or on schema {SCHEMA}), or create the table as its owner"
            );
        }
    }
    // Whoever controls the table or its schema could make this session run
    // their code (a trigger, a replaced table): only this role or a
    // superuser may.
    let safe: (bool, bool, bool) = sqlx::query_as(
        r#"select pg_catalog.pg_has_role(c.relowner, 'USAGE'),
                  (n.nspowner operator(pg_catalog.=) (select r.oid from pg_catalog.pg_roles r
                                                      where r.rolname operator(pg_catalog.=) current_user)
                   or (select r.rolsuper from pg_catalog.pg_roles r where r.oid operator(pg_catalog.=) n.nspowner)),
                  not exists (select from pg_catalog.pg_trigger g where g.tgrelid operator(pg_catalog.=) c.oid)
                  and not exists (select from pg_catalog.pg_rewrite w
                                  where w.ev_class operator(pg_catalog.=) c.oid)
           from pg_catalog.pg_class c
           join pg_catalog.pg_namespace n on n.oid operator(pg_catalog.=) c.relnamespace
           where c.oid operator(pg_catalog.=) pg_catalog.to_regclass($1)"#,
    )
    .bind(TABLE)
    .fetch_one(&mut *conn)
    .await
    .context("cannot check who owns the position table")?;
    match safe {
        (false, _, _) => bail!(
            "{TABLE} belongs to another role; pg-replay must connect as its owner (or drop it to start over)"
        ),
        (_, false, _) => bail!(
            "schema {SCHEMA} belongs to a role that is neither this one nor a superuser, so it could replace \
             {TABLE}; change its owner (alter schema {SCHEMA} owner to ...)"
        ),
        (_, _, false) => bail!("{TABLE} has triggers or rules; pg-replay will not write to it"),
        _ => {}
    }
    sqlx::query(&format!(
        "insert into {TABLE} (name) values ($1) on conflict (name) do nothing"
    ))
    .bind(name)
    .execute(&mut *conn)
    .await
    .map_err(|e| {
        anyhow::anyhow!("cannot write to {TABLE}: {e}; grant this role INSERT and UPDATE on it")
    })?;
    read(conn, name).await
}

/// Reads the position of replay `name`.
///
/// Fails on a query error or a damaged `streams` value.
pub async fn read(conn: &mut PgConnection, name: &str) -> anyhow::Result<Position> {
    let row = sqlx::query(&format!(
        "select commit_order, ts_us, streams::pg_catalog.text as streams, changes, units \
         from {TABLE} where name operator(pg_catalog.=) $1"
    ))
    .bind(name)
    .fetch_one(&mut *conn)
    .await
    .context("cannot read the replay position")?;
    let streams: String = row.get("streams");
    Ok(Position {
        commit_order: row.get("commit_order"),
        ts_us: row.get("ts_us"),
        streams: serde_json::from_str(&streams).with_context(|| {
            format!("the stored resume points of replay {name:?} are damaged: {streams}")
        })?,
        changes: row.get("changes"),
        units: row.get("units"),
    })
}

/// What one apply moves the position to.
#[derive(Debug, Clone)]
pub struct Advance<'a> {
    /// The position before (for the check that nobody else moved it).
    pub from: Option<i64>,
    /// The last unit applied.
    pub commit_order: Option<i64>,
    /// Its commit time.
    pub ts_us: Option<i64>,
    /// Its transaction.
    pub tx_id: Option<i64>,
    /// Its LSN.
    pub lsn: Option<i64>,
    /// Resume points.
    pub streams: &'a BTreeMap<String, StreamPos>,
    /// Changes applied by this step.
    pub changes: i64,
    /// Units applied by this step.
    pub units: i64,
}

/// Moves the position, inside the caller's transaction.
///
/// Fails when the stored position is not `from` any more (another process
/// applied in between, which the lock should have prevented).
pub async fn advance(conn: &mut PgConnection, name: &str, a: &Advance<'_>) -> anyhow::Result<()> {
    let streams = serde_json::to_string(a.streams).expect("positions serialise");
    let done = sqlx::query(&format!(
        r#"update {TABLE}
           set commit_order = $2, ts_us = $3, tx_id = $4, lsn = $5, streams = $6::pg_catalog.text::pg_catalog.jsonb,
               changes = changes operator(pg_catalog.+) $7, units = units operator(pg_catalog.+) $8,
               updated_at = pg_catalog.clock_timestamp()
           where name operator(pg_catalog.=) $1 and commit_order is not distinct from $9"#
    ))
    .bind(name)
    .bind(a.commit_order)
    .bind(a.ts_us)
    .bind(a.tx_id)
    .bind(a.lsn)
    .bind(streams)
    .bind(a.changes)
    .bind(a.units)
    .bind(a.from)
    .execute(&mut *conn)
    .await
    .context("cannot move the replay position")?;
    if done.rows_affected() != 1 {
        bail!("the replay position of {name:?} was moved by someone else while this pg-replay ran");
    }
    Ok(())
}
