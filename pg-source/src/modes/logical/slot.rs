//! The replication slot: its name, and the checks and creation before a
//! stream is opened.

use std::time::Duration;

use anyhow::{bail, Context as _};
use pgwire_replication::Lsn;
use sqlx::PgPool;

/// The default slot name of a connector: `tidemark_` and the name in the
/// characters a slot name allows, shortened with a hash when needed.
pub fn default_slot_name(connector: &str) -> String {
    let clean: String = connector
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = format!("tidemark_{clean}");
    if name.len() <= 63 && clean == connector {
        return name;
    }
    let mut hash: u32 = 0x811c_9dc5;
    for b in connector.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("tidemark_{}_{hash:08x}", &clean[..clean.len().min(40)])
}

/// Checks the server and slot before reading: `wal_level`, and that the
/// slot is a `pgoutput` slot of this database. On a fresh start (no stored
/// position) the slot is created if missing, and its start LSN returned;
/// on a resume the slot must not have been confirmed past `stored`.
///
/// Fails with what to do when the server is not set up for logical capture
/// or the slot is missing, foreign, or ahead of the stored position.
pub async fn prepare_slot(pool: &PgPool, slot: &str, stored: Option<u64>) -> anyhow::Result<u64> {
    let wal_level: String = sqlx::query_scalar("select pg_catalog.current_setting('wal_level')")
        .fetch_one(pool)
        .await?;
    if wal_level != "logical" {
        bail!("mode logical needs wal_level = logical, and the server has wal_level = {wal_level}: run `alter system set wal_level = logical` as a superuser and restart Postgres, or use mode changelog");
    }
    type SlotRow = (Option<String>, Option<String>, Option<String>, bool);
    let found: Option<SlotRow> = sqlx::query_as(
        "select s.confirmed_flush_lsn::pg_catalog.text, s.plugin::pg_catalog.text, s.database::pg_catalog.text,
                s.database operator(pg_catalog.=) pg_catalog.current_database()
                  and not coalesce(s.wal_status operator(pg_catalog.=) 'lost', false)
         from pg_catalog.pg_replication_slots s where s.slot_name operator(pg_catalog.=) $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await?;
    match (found, stored) {
        (None, None) => {
            tracing::info!(slot, "creating the replication slot; Postgres first waits for the transactions open on the server to finish");
            let create = sqlx::query_scalar::<_, String>(
                "select lsn::pg_catalog.text from pg_catalog.pg_create_logical_replication_slot($1, 'pgoutput')",
            )
            .bind(slot)
            .fetch_one(pool);
            tokio::pin!(create);
            let created = loop {
                tokio::select! {
                    r = &mut create => break r,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {
                        let waiting: Vec<String> = sqlx::query_scalar(
                            "select pg_catalog.format('pid %s (%s, %s, in a transaction since %s)', a.pid, a.usename, a.datname, a.xact_start)
                             from pg_catalog.pg_stat_activity a
                             where a.backend_xid is not null and a.pid operator(pg_catalog.<>) pg_catalog.pg_backend_pid()
                             order by a.xact_start limit 5",
                        )
                        .fetch_all(pool)
                        .await
                        .unwrap_or_default();
                        tracing::warn!(slot, sessions = ?waiting, "still creating the replication slot: Postgres waits for these transactions to end");
                    }
                }
            };
            let lsn = created.map_err(|e| {
                anyhow::Error::new(e).context(format!(
                    "cannot create replication slot {slot}: the user needs the REPLICATION attribute (alter role <user> replication), and max_replication_slots a free slot"
                ))
            })?;
            tracing::info!(slot, lsn = %lsn, "replication slot created");
            parse_lsn(&lsn)
        }
        (None, Some(_)) => bail!(
            "replication slot {slot} is gone, so the changes since the stored position cannot be read: \
             start over with a new connector name (a new initial snapshot), or restore the slot"
        ),
        (Some((flushed, plugin, database, same_db)), stored) => {
            if plugin.as_deref() != Some("pgoutput") || !same_db {
                bail!(
                    "replication slot {slot} exists but is not a usable pgoutput slot of this database (plugin {}, database {}; or Postgres removed WAL it needed, max_slot_wal_keep_size): \
                     drop it (select pg_drop_replication_slot('{slot}')) and start over with a new connector name, or set slot.name to another name",
                    plugin.unwrap_or_default(),
                    database.unwrap_or_default()
                );
            }
            let flushed = parse_lsn(flushed.as_deref().unwrap_or("0/0"))?;
            match stored {
                Some(at) if flushed > at => bail!(
                    "replication slot {slot} was confirmed up to {} but the stored position is {}: something else reads this slot, and the changes between are lost to this connector; \
                     give each connector its own slot.name, drop this slot (select pg_drop_replication_slot('{slot}')) and start over with a new connector name",
                    Lsn(flushed),
                    Lsn(at)
                ),
                Some(at) => Ok(at),
                None => {
                    tracing::info!(slot, lsn = %Lsn(flushed), "using the existing replication slot");
                    Ok(flushed)
                }
            }
        }
    }
}

pub fn parse_lsn(text: &str) -> anyhow::Result<u64> {
    let (hi, lo) = text
        .split_once('/')
        .with_context(|| format!("`{text}` is not an LSN"))?;
    let hi = u64::from_str_radix(hi, 16).with_context(|| format!("`{text}` is not an LSN"))?;
    let lo = u64::from_str_radix(lo, 16).with_context(|| format!("`{text}` is not an LSN"))?;
    Ok(hi << 32 | lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_are_valid_and_distinct() {
        assert_eq!(default_slot_name("jdbc_source"), "tidemark_jdbc_source");
        let odd = default_slot_name("My-Connector");
        assert!(odd.starts_with("tidemark_my_connector_"), "{odd}");
        assert_ne!(odd, default_slot_name("my_connector"));
        let long = default_slot_name(&"x".repeat(100));
        assert!(long.len() <= 63, "{long}");
    }

    #[test]
    fn lsns_parse_as_postgres_prints_them() {
        assert_eq!(parse_lsn("0/16B3748").unwrap(), 0x16B_3748);
        assert_eq!(parse_lsn("1/0").unwrap(), 1 << 32);
        assert!(parse_lsn("nonsense").is_err());
    }
}
