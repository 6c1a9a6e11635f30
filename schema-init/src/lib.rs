//! schema-init: creates what capture needs in the user's database, once.
//!
//! It creates the database if it is missing, the seed's table with its
//! `last_updated` trigger and sample row, an index on `(last_updated, id)`
//! so each poll reads only what changed, and a statement-level trigger that
//! sends a `NOTIFY tidemark` on every change so pg-source wakes at once
//! instead of waiting for its next poll. Every statement is idempotent and
//! the whole run is one transaction under an advisory lock, so running it
//! again (or twice at once) changes nothing and adds no second sample row.
//!
//! With `--capture changelog` it installs change-log capture instead of the
//! NOTIFY trigger: triggers that record every insert, update, delete and
//! truncate, with the row before and after, the transaction id, a sequence and the
//! row's shape, in `tidemark.change_log`, in the writing transaction itself,
//! and an event trigger that follows `ALTER TABLE` (see [`changelog_steps`],
//! which also says why the privileges are as they are). pg-source finds
//! those commits without a NOTIFY. It needs a superuser.
//!
//! **Security.** schema-init's own session runs with `search_path =
//! pg_catalog, pg_temp` (as every Tidemark session, `common::pg`), and every statement it runs or generates names
//! functions, operators and tables with their schema, so nothing another
//! role created (a `public.format(text, text, text)` that makes its owner
//! superuser when a superuser calls it) is ever resolved. The seed's objects
//! (its table, the `update_last_updated_column` trigger function, the index)
//! are the user's and land in the table's schema, named with it.

pub mod capture;
pub mod cli;

pub use capture::{
    changelog_steps, function_settings, logical_steps, Capture, TriggerLevel, UpdateBefore,
    CHANGE_LOG,
};

use std::time::Duration;

use anyhow::Context as _;
use sqlx::Connection as _;
use tidemark_common::names::{self, quote_ident, quote_literal};
use tidemark_common::pg::{PgTarget, TableName};

/// What to create, and where.
#[derive(Debug, Clone)]
pub struct Config {
    /// A superuser or owner connection; its database is only used to create
    /// the target database.
    pub target: Option<PgTarget>,
    /// The database to create and fill.
    pub database: String,
    /// The table to create.
    pub table: TableName,
    /// Install the NOTIFY trigger that wakes pg-source.
    pub notify: bool,
    /// Insert the seed's sample row when the table is new.
    pub sample_row: bool,
    /// Install the seed's `last_updated` trigger and `(last_updated, id)`
    /// index; off for a table of the user's own shape.
    pub seed_objects: bool,
    /// Change-log capture to install, if any.
    pub capture: Option<Capture>,
    /// Install `logical` capture (a publication and `replica identity
    /// full`) instead; needs `wal_level = logical`.
    pub logical: bool,
}

/// One statement of the plan, with what it is for.
#[derive(Debug, Clone)]
pub struct Step {
    /// What the statement does, for logs and `--dry-run`.
    pub what: String,
    /// The SQL.
    pub sql: String,
    /// Runs only when the table did not exist before this run.
    pub only_if_new_table: bool,
    /// Capture of the table: schema-init first checks that it has a
    /// primary key, to refuse with a message that says what to do.
    pub needs_key: bool,
}

/// The channel pg-source listens on.
pub const NOTIFY_CHANNEL: &str = names::NOTIFY_CHANNEL;

/// The statements to run in the target database, in order.
pub fn plan(cfg: &Config) -> Vec<Step> {
    let t = cfg.table.quoted();
    let schema = quote_ident(&cfg.table.schema);
    let index = quote_ident(&names::seed_index(&cfg.table));
    let seed_function = format!("{schema}.{}", quote_ident(names::SEED_LAST_UPDATED));
    let step = |what: &str, sql: String| Step {
        what: what.to_owned(),
        sql,
        only_if_new_table: false,
        needs_key: false,
    };
    let mut steps = vec![
        step(
            &format!("create schema {}", cfg.table.schema),
            format!("create schema if not exists {schema}"),
        ),
        step(
            &format!("create table {}", cfg.table),
            format!(
                r#"create table if not exists {t} (
  id serial primary key,
  data varchar(256) not null,
  is_soft_deleted boolean default false,
  create_date timestamp not null default pg_catalog.now(),
  last_updated timestamp not null default pg_catalog.now()
)"#
            ),
        ),
    ];
    // The seed's objects are the user's: they run in the user's sessions,
    // with the user's search_path, so their body names its functions too.
    let seed = [
        step(
            &format!("create function {}", names::SEED_LAST_UPDATED),
            format!(
                r#"create or replace function {seed_function}()
returns trigger set search_path = pg_catalog, pg_temp as $$
begin
  new.last_updated = pg_catalog.now();
  return new;
end;
$$ language plpgsql"#
            ),
        ),
        step(
            &format!("create trigger {}", names::SEED_LAST_UPDATED),
            format!(
                "create or replace trigger {}\n\
                 before update on {t}\n\
                 for each row execute procedure {seed_function}()",
                quote_ident(names::SEED_LAST_UPDATED)
            ),
        ),
        step(
            "create index on (last_updated, id)",
            format!("create index if not exists {index} on {t} (last_updated, id)"),
        ),
    ];
    if cfg.seed_objects {
        steps.extend(seed);
    }
    let notify_trigger = quote_ident(names::NOTIFY_TRIGGER);
    if cfg.capture.is_some() || cfg.logical {
        // pg-source's changelog and logical modes finds commits by comparing snapshots;
        // a NOTIFY per transaction would cost writers a turn on Postgres'
        // global notification queue lock (about a fifth of single-row
        // commit throughput, measured by dev/bench-triggers).
        steps.push(step(
            &format!(
                "drop trigger {} (changelog and logical modes need none)",
                names::NOTIFY_TRIGGER
            ),
            format!("drop trigger if exists {notify_trigger} on {t}"),
        ));
    } else if cfg.notify {
        steps.extend([
            step(
                "create schema tidemark",
                format!("create schema if not exists {}", quote_ident(names::SCHEMA)),
            ),
            step(
                &format!("create function {}", names::NOTIFY_FUNCTION),
                format!(
                    r#"create or replace function {}()
returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
  perform pg_catalog.pg_notify({}, tg_table_schema operator(pg_catalog.||) '.' operator(pg_catalog.||) tg_table_name);
  return null;
end;
$$"#,
                    names::NOTIFY_FUNCTION,
                    quote_literal(names::NOTIFY_CHANNEL)
                ),
            ),
            step(
                &format!("create trigger {}", names::NOTIFY_TRIGGER),
                format!(
                    "create or replace trigger {notify_trigger}\n\
                     after insert or update or delete on {t}\n\
                     for each statement execute function {}()",
                    names::NOTIFY_FUNCTION
                ),
            ),
        ]);
    }
    if cfg.logical {
        steps.extend(logical_steps(&cfg.table));
    } else if let Some(capture) = cfg.capture {
        steps.extend(changelog_steps(&cfg.table, capture));
    }
    if cfg.sample_row {
        steps.push(Step {
            only_if_new_table: true,
            ..step(
                "insert the sample row",
                format!("insert into {t} (data) values ('test data')"),
            )
        });
    }
    steps
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The database was created by this run.
    pub created_database: bool,
    /// The table was created by this run.
    pub created_table: bool,
}

/// Prints the SQL a run would execute, without connecting.
pub fn dry_run(cfg: &Config) -> String {
    let mut out = format!(
        "-- run in the server's default database, when {db} is missing:\ncreate database {};\n\n-- then in {db}, in one transaction:\n",
        quote_ident(&cfg.database),
        db = cfg.database
    );
    for step in plan(cfg) {
        if step.only_if_new_table {
            out.push_str("-- only when the table was just created:\n");
        }
        out.push_str(&step.sql);
        out.push_str(";\n\n");
    }
    out
}

/// Creates everything. Safe to run again.
///
/// Fails when the server is unreachable, the credentials are wrong, or the
/// user may not create the database or table; the message says which.
pub async fn run(cfg: &Config) -> anyhow::Result<Report> {
    let target = cfg.target.as_ref().context(
        "no database URL: set DATABASE_URL or --database-url to a superuser or owner URL like postgres://postgres:postgres@127.0.0.1:5432/postgres",
    )?;
    let admin = target.connect(1, Duration::from_secs(30)).await?;
    let exists: bool = sqlx::query_scalar(
        "select exists (select 1 from pg_catalog.pg_database where datname operator(pg_catalog.=) $1)",
    )
            .bind(&cfg.database)
            .fetch_one(&admin)
            .await
            .context("cannot list databases")?;
    let mut created_database = false;
    if !exists {
        let sql = format!("create database {}", quote_ident(&cfg.database));
        match sqlx::query(&sql).execute(&admin).await {
            Ok(_) => {
                created_database = true;
                tracing::info!(database = %cfg.database, "database created");
            }
            // Another schema-init created it meanwhile.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot create database {}; connect as a user with CREATEDB, or create it yourself", cfg.database)
                })
            }
        }
    } else {
        tracing::info!(database = %cfg.database, "database exists");
    }
    admin.close().await;

    let db_target = target.with_database(&cfg.database);
    let pool = db_target.connect(1, Duration::from_secs(30)).await?;
    if cfg.logical {
        let wal_level: String =
            sqlx::query_scalar("select pg_catalog.current_setting('wal_level')")
                .fetch_one(&pool)
                .await?;
        if wal_level != "logical" {
            anyhow::bail!(
                "--capture logical needs wal_level = logical, and {db_target} has wal_level = {wal_level}: \
                 run `alter system set wal_level = logical` as a superuser and restart Postgres \
                 (or start it with -c wal_level=logical), or use --capture changelog"
            );
        }
        let superuser: bool = sqlx::query_scalar(
            "select r.rolsuper from pg_catalog.pg_roles r where r.rolname operator(pg_catalog.=) current_user",
        )
        .fetch_one(&pool)
        .await?;
        if !superuser {
            tracing::warn!(
                "snapshots on demand are off: only a superuser's schema-init creates the signal table {} that pg-source reads them from (run schema-init --capture logical once as a superuser to turn them on)",
                names::SIGNAL
            );
        }
    }
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    // Two schema-init runs at once must not both insert the sample row.
    sqlx::query("select pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext($1))")
        .bind(names::SCHEMA_INIT_LOCK)
        .execute(&mut *tx)
        .await?;
    let table_existed: bool = sqlx::query_scalar("select pg_catalog.to_regclass($1) is not null")
        .bind(cfg.table.quoted())
        .fetch_one(&mut *tx)
        .await?;
    let mut checked_key = false;
    for step in plan(cfg) {
        if step.needs_key && !checked_key {
            let has_pk: bool = sqlx::query_scalar(
                "select exists (select 1 from pg_catalog.pg_index \
                 where indrelid operator(pg_catalog.=) pg_catalog.to_regclass($1) and indisprimary)",
            )
            .bind(cfg.table.quoted())
            .fetch_one(&mut *tx)
            .await?;
            if !has_pk {
                anyhow::bail!(
                    "table {} has no primary key, so its changes cannot be keyed: add one (alter table ... add primary key), or capture it with timestamp+incrementing mode",
                    cfg.table
                );
            }
            checked_key = true;
        }
        if step.only_if_new_table && table_existed {
            tracing::info!(step = %step.what, "skipped: the table already existed");
            continue;
        }
        sqlx::query(&step.sql)
            .execute(&mut *tx)
            .await
            .map_err(database_error)
            .with_context(|| format!("cannot {} in {}", step.what, db_target))?;
        tracing::info!(step = %step.what, "done");
    }
    tx.commit().await.context("cannot commit the schema")?;
    drop(conn);
    pool.close().await;
    Ok(Report {
        created_database,
        created_table: !table_existed,
    })
}

/// A database error as its message and, where Postgres gives one, its hint
/// (which says what to do); other errors as they are.
fn database_error(e: sqlx::Error) -> anyhow::Error {
    match e
        .as_database_error()
        .and_then(|d| d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>())
    {
        Some(pg) => match pg.hint() {
            Some(hint) => anyhow::anyhow!("{} (hint: {hint})", pg.message()),
            None => anyhow::anyhow!("{}", pg.message()),
        },
        None => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            target: None,
            database: "streaming_example".into(),
            table: TableName::parse("streaming_update_table").unwrap(),
            notify: true,
            sample_row: true,
            seed_objects: true,
            capture: None,
            logical: false,
        }
    }

    #[test]
    fn changelog_capture_installs_one_kind_of_trigger_and_drops_the_other() {
        let mut c = cfg();
        c.capture = Some(TriggerLevel::Row.into());
        let text = dry_run(&c);
        assert!(text.contains("create table if not exists tidemark.change_log"));
        assert!(text
            .contains("for each row execute function tidemark.\"capture_streaming_update_table_"));
        assert!(text.contains("drop trigger if exists \"tidemark_capture_update\""));
        assert!(text.contains("drop trigger if exists \"tidemark_notify\" on"));
        assert!(
            !text.contains("pg_notify"),
            "changelog capture needs no NOTIFY"
        );
        c.capture = Some(TriggerLevel::Statement.into());
        let text = dry_run(&c);
        assert!(text
            .contains("referencing old table as \"tidemark_old\" new table as \"tidemark_new\""));
        assert!(text.contains("drop trigger if exists \"tidemark_capture\" on"));
    }

    #[test]
    fn the_plan_has_the_seed_objects_and_only_one_conditional_insert() {
        let steps = plan(&cfg());
        let sql: Vec<&str> = steps.iter().map(|s| s.sql.as_str()).collect();
        assert!(sql.iter().any(
            |s| s.contains("create table if not exists \"public\".\"streaming_update_table\"")
        ));
        assert!(sql
            .iter()
            .any(|s| s.contains("on \"public\".\"streaming_update_table\" (last_updated, id)")));
        let inserts: Vec<&Step> = steps
            .iter()
            .filter(|s| s.sql.starts_with("insert"))
            .collect();
        assert_eq!(inserts.len(), 1);
        assert!(inserts[0].only_if_new_table);
    }

    #[test]
    fn dry_run_prints_every_statement() {
        let text = dry_run(&cfg());
        assert!(text.contains("create database \"streaming_example\";"));
        assert!(text.contains("for each statement execute function tidemark.notify_change()"));
    }

    #[test]
    fn odd_names_are_quoted() {
        let mut c = cfg();
        c.database = "we\"ird".into();
        c.table = TableName::parse(r#""My Table""#).unwrap();
        let text = dry_run(&c);
        assert!(text.contains(r#"create database "we""ird";"#));
        assert!(text.contains(r#""public"."My Table""#));
    }
}
