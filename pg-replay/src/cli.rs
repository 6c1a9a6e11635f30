//! The command line, shared by the binary and the test harness's copy of it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use tidemark_common::kafka::KafkaArgs;
use tidemark_common::pg::{PgTarget, TableName};

use crate::apply::{OnConflict, SchemaChanges, UserTriggers};
use crate::snapshots::FromSnapshot;
use crate::UntilArg;

/// Plays a Tidemark archive back into Postgres: the file file-sink writes
/// (--input) or the topics pg-source writes (--topic), into the tables of a
/// target database (--target-url), to any point in time, exactly once.
///
/// Source transactions are applied whole and in commit order (several per
/// target transaction), so the target only passes through states the source
/// had. The replay position is stored in the target (tidemark.replay_position,
/// keyed by --name) in the same transaction as the changes: a restart
/// resumes after it, and running again over the same archive changes
/// nothing. A target row that disagrees with the archive stops the replay,
/// naming table, key and archive position.
///
/// What each capture mode can tell: logical archives carry each source
/// transaction with its exact commit time and WAL position; changelog
/// archives carry batches of transactions, each stamped with the time of the
/// snapshot that ended it (so --until gives the last batch taken at or before
/// the time); timestamp+incrementing archives hold row states only: no
/// transactions, no commit times and no deletes (a deleted row stays), and
/// each record is upserted.
///
/// `pg-replay verify` compares a source table and its replay.
#[derive(Debug, Parser)]
#[command(version, about, long_about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    replay: ReplayArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Compares tables of two databases (a source and its replay) by hashes
    /// over primary-key ranges, narrowing down to the rows that differ; prints
    /// the differing keys and exits non-zero on any difference.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
struct ReplayArgs {
    /// An archive file as file-sink writes it (one JSON record per line, with
    /// or without the Connect schema), or a segmented archive's folder
    /// (file-sink with file.rotate.* or file.compression): every partition
    /// read through its segments, compressed or being written, resumed from
    /// its own position. Repeatable (comma-separated in the environment) for
    /// several files of one archive.
    #[arg(long = "input", env = "TIDEMARK_INPUT", value_delimiter = ',')]
    inputs: Vec<PathBuf>,

    /// An archive topic, read read_committed from its start. Repeatable
    /// (comma-separated in the environment): one per captured table.
    #[arg(long = "topic", env = "TIDEMARK_TOPICS", value_delimiter = ',')]
    topics: Vec<String>,

    #[command(flatten)]
    kafka: KafkaArgs,

    /// The database to restore into: a libpq URL
    /// (postgres://user:password@host:5432/db) or a JDBC URL
    /// (jdbc:postgresql://host:5432/db?user=...).
    #[arg(long, env = "TIDEMARK_TARGET_URL", hide_env_values = true)]
    target_url: Option<String>,

    /// A file holding the target's password (a container secret), which wins
    /// over a password in --target-url: keeps it off the command line.
    #[arg(long, env = "TIDEMARK_TARGET_PASSWORD_FILE")]
    target_password_file: Option<PathBuf>,

    /// SOURCE=TARGET: replay the archive's table SOURCE into TARGET (schema.table;
    /// `SOURCE` alone keeps the name). Repeatable. Without it, every table of
    /// the archive goes to the table of the same name. A missing target table
    /// is created from the column types the records carry.
    #[arg(long = "table", env = "TIDEMARK_TABLES", value_delimiter = ',')]
    tables: Vec<String>,

    /// With --table: skip the events of tables it does not name (units stay
    /// whole: their other tables' events are applied together).
    #[arg(long, env = "TIDEMARK_IGNORE_UNMAPPED")]
    ignore_unmapped: bool,

    /// The replay's name: its position in the target is stored under it, so
    /// one target can hold several replays.
    #[arg(long, env = "TIDEMARK_REPLAY_NAME", default_value = "default")]
    name: String,

    /// Stop before the first source transaction committed after this time
    /// (RFC 3339, like 2024-05-01T12:00:00Z). The time is each unit's commit
    /// time (source.ts_us): logical, the transaction's commit; changelog, the
    /// snapshot that ended its batch, so the last batch taken at or before
    /// the time is applied.
    #[arg(long, env = "TIDEMARK_UNTIL", conflicts_with_all = ["until_txid", "until_lsn"])]
    until: Option<String>,

    /// Stop after the source transaction with this id (txId): logical, that
    /// transaction; changelog, the batch that holds it (with the transactions
    /// that committed in the same batch). The archive is searched for it
    /// first; nothing is applied if it is not there.
    #[arg(long, env = "TIDEMARK_UNTIL_TXID", conflicts_with = "until_lsn")]
    until_txid: Option<i64>,

    /// Logical archives: stop after the last transaction whose commit LSN
    /// is at most this (X/Y, as pg_current_wal_lsn() prints it).
    #[arg(long, env = "TIDEMARK_UNTIL_LSN")]
    until_lsn: Option<String>,

    /// Where each table's replay starts: `beginning` (every event of the
    /// archive), or `newest`: a table with an incremental snapshot complete
    /// before the replay's end (--until; pg-source's snapshots on demand
    /// and of tables added while it ran) starts from the newest such
    /// snapshot: its earlier events are left out, the target table is
    /// emptied where the snapshot begins, and the snapshot's events apply
    /// as upserts until its last chunk, then as ever. The result is the
    /// same as from the beginning (docs/playback.md says why); it takes a
    /// first pass over the archive to find the snapshots, and applies fewer
    /// changes. Not the default: within the snapshot pg-replay cannot check
    /// the target against the archive, and a resumed replay must be given
    /// the same setting.
    #[arg(long, env = "TIDEMARK_FROM_SNAPSHOT", value_enum, default_value_t = FromSnapshot::Beginning)]
    from_snapshot: FromSnapshot,

    /// Keep applying as the archive grows (a warm standby), until SIGTERM,
    /// which stops at a unit boundary; lag and position in /metrics.
    #[arg(long, env = "TIDEMARK_FOLLOW")]
    follow: bool,

    /// What a target row that disagrees with the archive leads to: `stop`
    /// names table, key and archive position and applies nothing of that
    /// transaction; `upsert` lets the archive win (a create of an existing key
    /// or an update of a missing one writes the row, a delete of a missing one
    /// does nothing).
    #[arg(long, env = "TIDEMARK_ON_CONFLICT", value_enum, default_value_t = OnConflict::Stop)]
    on_conflict: OnConflict,

    /// The target tables' own triggers: `disable` them inside each apply
    /// transaction (the archive already holds their effects at the source;
    /// needs ownership of the table), or let them `fire`.
    #[arg(long, env = "TIDEMARK_USER_TRIGGERS", value_enum, default_value_t = UserTriggers::Disable)]
    user_triggers: UserTriggers,

    /// A change of a table's columns that the archive records (a record with
    /// other columns than the ones before): `stop` applies every transaction
    /// before it and stops, saying what changed, so the same change can be
    /// made to the target by hand (with the DEFAULT or USING the source
    /// used, which the archive does not carry); `apply` adds, drops and
    /// renames columns and widens types itself (an added column is NULL in
    /// rows with no later change) and stops at a type change that may alter
    /// values.
    #[arg(long, env = "TIDEMARK_SCHEMA_CHANGES", value_enum, default_value_t = SchemaChanges::Stop)]
    schema_changes: SchemaChanges,

    /// Apply ready transactions after this many changes were read (also
    /// whenever the archive has nothing more to read right now, when
    /// following after --max-delay, after 200,000 ready transactions, and
    /// when 30,000 wait behind one not whole yet). Larger batches apply
    /// faster (changes of one key within a batch are applied once); a batch
    /// waits in the target's temporary staging tables, and each of its
    /// transactions in 40 bytes of pg-replay's memory.
    #[arg(long, env = "TIDEMARK_BATCH_CHANGES", default_value_t = 1_000_000)]
    batch_changes: u64,

    /// With --follow, the longest time a read change waits for its apply
    /// (`200ms`).
    #[arg(long, env = "TIDEMARK_MAX_DELAY", default_value = "200ms", value_parser = humantime::parse_duration)]
    max_delay: Duration,

    /// Records (lines) longer than this are an error.
    #[arg(long, env = "TIDEMARK_MAX_LINE_BYTES", default_value_t = 64 * 1024 * 1024)]
    max_line_bytes: usize,

    /// Most source transactions that may wait behind one whose events are
    /// not all in the archive yet; past it the replay stops, naming it.
    #[arg(long, env = "TIDEMARK_MAX_PENDING_UNITS", default_value_t = 200_000)]
    max_pending_units: usize,

    /// Check instead of replay: read the configuration, look at the
    /// archive's files or topics, connect to the target, and print
    /// everything that would stop or weaken a replay (the position table
    /// and this replay's position, another pg-replay on the same name, each
    /// target table's primary key, privileges and triggers), each with its
    /// fix. Exits 0 when a replay would start, 1 when it would stop.
    /// Changes nothing.
    #[arg(long)]
    check: bool,

    /// Log one JSON object per line.
    #[arg(long, env = "TIDEMARK_JSON_LOGS")]
    json_logs: bool,

    /// Where to serve GET /healthz and GET /metrics (Prometheus); `off` to
    /// serve nothing. Loopback by default, so only this machine reaches it;
    /// `0.0.0.0:9466` serves every interface.
    #[arg(long, env = "TIDEMARK_HTTP_ADDR", default_value = "127.0.0.1:9466")]
    http_addr: String,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// The reference database (the source of the archive): a libpq or JDBC URL.
    #[arg(long, env = "TIDEMARK_SOURCE_URL", hide_env_values = true)]
    source_url: String,

    /// A file holding the source's password, which wins over --source-url's.
    #[arg(long, env = "TIDEMARK_SOURCE_PASSWORD_FILE")]
    source_password_file: Option<PathBuf>,

    /// The replayed database: a libpq or JDBC URL.
    #[arg(long, env = "TIDEMARK_TARGET_URL", hide_env_values = true)]
    target_url: String,

    /// A file holding the target's password, which wins over --target-url's.
    #[arg(long, env = "TIDEMARK_TARGET_PASSWORD_FILE")]
    target_password_file: Option<PathBuf>,

    /// SOURCE=TARGET tables to compare (`SOURCE` alone: the same name).
    /// Repeatable; at least one.
    #[arg(
        long = "table",
        env = "TIDEMARK_TABLES",
        value_delimiter = ',',
        required = true
    )]
    tables: Vec<String>,

    /// Rows per range of the first pass.
    #[arg(long, env = "TIDEMARK_CHUNK_ROWS", default_value_t = 10_000)]
    chunk_rows: u64,

    /// Ranges of at most this many rows a side are compared row by row.
    #[arg(long, env = "TIDEMARK_LEAF_ROWS", default_value_t = 256)]
    leaf_rows: u64,

    /// Differing keys to print at most.
    #[arg(long, env = "TIDEMARK_MAX_DIFFS", default_value_t = 20)]
    max_diffs: usize,

    /// Log one JSON object per line.
    #[arg(long, env = "TIDEMARK_JSON_LOGS")]
    json_logs: bool,
}

/// Parses the command line (warning about a password given on it), runs
/// the program and returns its exit code.
pub fn main() -> std::process::ExitCode {
    let json = |c: &Cli| match &c.command {
        Some(Command::Verify(a)) => a.json_logs,
        None => c.replay.json_logs,
    };
    tidemark_common::program::parse_and_run("pg-replay", json, |cli: Cli, shutdown| async move {
        match cli.command {
            Some(Command::Verify(args)) => {
                let cfg = verify_config(&args)?;
                let report = crate::verify::verify(&cfg).await?;
                crate::verify::print(&report, &cfg)
            }
            None => {
                if cli.replay.check {
                    let mut report = tidemark_common::check::Report::new();
                    match replay_config(cli.replay) {
                        Ok(cfg) => report = crate::check::check(&cfg).await,
                        Err(e) => report.error("configuration", &e),
                    }
                    return report.finish("pg-replay");
                }
                let cfg = replay_config(cli.replay)?;
                crate::run(cfg, shutdown).await.map(|_| ())
            }
        }
    })
}

/// A target from a libpq or JDBC URL, named by `flag` in errors, with the
/// password from `password_file` (named by `file_flag`) when given, which
/// wins over the URL's.
///
/// Fails naming the flag when the URL does not parse or the file cannot be
/// read.
pub fn parse_url_with(
    flag: &str,
    url: &str,
    file_flag: &str,
    password_file: Option<&std::path::Path>,
) -> anyhow::Result<PgTarget> {
    let target = parse_url(flag, url)?
        .with_credentials(format!(
            "the user and password in {flag} (or {file_flag}, PGPASSWORD)"
        ))
        .with_missing_database("create it first (createdb NAME), or fix the database in the URL");
    Ok(match password_file {
        Some(path) => {
            let secret = tidemark_common::secret::read_secret_file(file_flag, path)?;
            target.with_password(secret.expose())
        }
        None => target,
    })
}

/// A target from a libpq or JDBC URL, named by `flag` in errors.
///
/// Fails naming the flag when the URL does not parse.
pub fn parse_url(flag: &str, url: &str) -> anyhow::Result<PgTarget> {
    let target = if url.starts_with("jdbc:") {
        PgTarget::from_jdbc(flag, url, None, None)?
    } else {
        PgTarget::from_url(flag, url)?
    };
    Ok(target)
}

/// Parses `SOURCE=TARGET` or `SOURCE`.
///
/// Fails naming the flag when a name does not parse.
pub fn parse_tables(flag: &str, items: &[String]) -> anyhow::Result<Vec<(TableName, TableName)>> {
    items
        .iter()
        .filter(|t| !t.trim().is_empty())
        .map(|item| {
            let (s, t) = item.split_once('=').unwrap_or((item, item));
            let s = TableName::parse(s).map_err(|e| anyhow::anyhow!("{flag} {item}: {e}"))?;
            let t = TableName::parse(t).map_err(|e| anyhow::anyhow!("{flag} {item}: {e}"))?;
            Ok((s, t))
        })
        .collect()
}

/// Parses `--until` (RFC 3339) into µs since the epoch.
///
/// Fails saying the expected form.
pub fn parse_until(text: &str) -> anyhow::Result<i64> {
    let t = chrono::DateTime::parse_from_rfc3339(text.trim()).with_context(|| {
        format!("--until (TIDEMARK_UNTIL) {text:?} is not an RFC 3339 time like 2024-05-01T12:00:00Z or 2024-05-01T14:00:00.5+02:00")
    })?;
    Ok(t.timestamp_micros())
}

/// Parses an LSN `X/Y` (hex halves).
///
/// Fails saying the expected form.
pub fn parse_lsn(text: &str) -> anyhow::Result<u64> {
    let bad = || {
        anyhow::anyhow!("--until-lsn (TIDEMARK_UNTIL_LSN) {text:?} is not an LSN like 16/B374D848")
    };
    let (hi, lo) = text.trim().split_once('/').ok_or_else(bad)?;
    let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
    let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
    Ok((u64::from(hi) << 32) | u64::from(lo))
}

fn replay_config(a: ReplayArgs) -> anyhow::Result<crate::Config> {
    let Some(url) = a.target_url.as_deref() else {
        bail!("no target database: give --target-url (TIDEMARK_TARGET_URL), like postgres://user:password@host:5432/restore");
    };
    let mut cfg = crate::Config::new(parse_url_with(
        "--target-url",
        url,
        "--target-password-file",
        a.target_password_file.as_deref(),
    )?);
    cfg.inputs = a.inputs;
    cfg.topics = a
        .topics
        .into_iter()
        .filter(|t| !t.trim().is_empty())
        .collect();
    if !cfg.topics.is_empty() {
        cfg.kafka = a.kafka.settings()?;
    }
    cfg.tables = parse_tables("--table", &a.tables)?;
    if a.ignore_unmapped && cfg.tables.is_empty() {
        bail!("--ignore-unmapped needs --table: it skips the tables --table does not name");
    }
    cfg.ignore_unmapped = a.ignore_unmapped;
    if a.name.trim().is_empty() {
        bail!("--name (TIDEMARK_REPLAY_NAME) must not be empty");
    }
    cfg.name = a.name;
    cfg.until = match (a.until, a.until_txid, a.until_lsn) {
        (Some(t), _, _) => UntilArg::Time(parse_until(&t)?),
        (_, Some(x), _) => UntilArg::Txid(x),
        (_, _, Some(l)) => UntilArg::Lsn(parse_lsn(&l)?),
        _ => UntilArg::End,
    };
    cfg.follow = a.follow;
    cfg.on_conflict = a.on_conflict;
    cfg.from_snapshot = a.from_snapshot;
    cfg.user_triggers = a.user_triggers;
    cfg.schema_changes = a.schema_changes;
    if a.batch_changes == 0 {
        bail!("--batch-changes (TIDEMARK_BATCH_CHANGES) must be at least 1");
    }
    cfg.batch_changes = a.batch_changes;
    cfg.max_delay = a.max_delay;
    cfg.max_line_bytes = a.max_line_bytes.max(1);
    cfg.max_pending_units = a.max_pending_units.max(1);
    cfg.http_addr = tidemark_common::program::parse_http_addr(&a.http_addr)?;
    Ok(cfg)
}

fn verify_config(a: &VerifyArgs) -> anyhow::Result<crate::verify::VerifyConfig> {
    Ok(crate::verify::VerifyConfig {
        source: parse_url_with(
            "--source-url",
            &a.source_url,
            "--source-password-file",
            a.source_password_file.as_deref(),
        )?,
        target: parse_url_with(
            "--target-url",
            &a.target_url,
            "--target-password-file",
            a.target_password_file.as_deref(),
        )?,
        tables: parse_tables("--table", &a.tables)?,
        chunk_rows: a.chunk_rows.max(1),
        leaf_rows: a.leaf_rows.max(1),
        max_diffs: a.max_diffs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        assert_eq!(parse_lsn("16/B374D848").unwrap(), 0x16_B374_D848);
        assert!(parse_lsn("16-B3")
            .unwrap_err()
            .to_string()
            .contains("--until-lsn"));
        assert_eq!(parse_until("1970-01-01T00:00:01.5Z").unwrap(), 1_500_000);
        assert_eq!(parse_until("1970-01-01T02:00:00+02:00").unwrap(), 0);
        assert!(parse_until("yesterday")
            .unwrap_err()
            .to_string()
            .contains("RFC 3339"));
        let t = parse_tables(
            "--table",
            &["public.orders=restore.orders".into(), "t".into()],
        )
        .unwrap();
        assert_eq!(t[0].1.to_string(), "restore.orders");
        assert_eq!(t[1].0, t[1].1);
    }

    /// Issue 10.4: /metrics and /healthz are not served to the network
    /// unless asked, and --help says so.
    #[test]
    fn the_endpoint_listens_on_loopback_by_default() {
        use clap::CommandFactory as _;
        let cmd = Cli::command();
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == "http_addr")
            .unwrap();
        let default = arg.get_default_values()[0].to_str().unwrap();
        let addr = tidemark_common::program::parse_http_addr(default)
            .unwrap()
            .unwrap();
        assert!(addr.ip().is_loopback(), "{addr}");
        let help = arg.get_long_help().or(arg.get_help()).unwrap().to_string();
        assert!(help.contains("Loopback by default"), "{help}");
    }

    #[test]
    fn the_cli_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
