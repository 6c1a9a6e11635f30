//! The command line: flags, environment variables and the connector file,
//! shared by the binary and the test harness's copies of it.

use std::path::PathBuf;

use clap::Parser;
use tidemark_common::config::ConnectorConfig;
use tidemark_common::kafka::KafkaArgs;
use tidemark_common::secret::{read_secret_file, Secret};

/// Streams every change of Postgres tables into Kafka, each batch and its
/// position in one Kafka transaction, so nothing is missed or repeated.
///
/// Three modes (`mode`): `logical` reads every insert, update and delete
/// from a replication slot (schema-init --capture logical); `changelog`
/// reads them from a change log that triggers fill (schema-init --capture
/// changelog); `timestamp+incrementing`, the default and the JDBC source
/// connector's mode, reads row states and never sees a DELETE.
/// docs/modes.md says which to choose.
///
/// Reads the JDBC connector's JSON (`--connector-config`); every key can also
/// be set by a flag or an environment variable, which win over the file.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Kafka Connect connector JSON ({"name": ..., "config": {...}}).
    #[arg(long, env = "TIDEMARK_CONNECTOR_CONFIG")]
    connector_config: Option<PathBuf>,

    /// Connector name (`name`); names the stored position.
    #[arg(long, env = "TIDEMARK_NAME")]
    name: Option<String>,

    #[command(flatten)]
    kafka: KafkaArgs,

    /// `connection.url`: JDBC URL, like jdbc:postgresql://127.0.0.1:5432/streaming_example.
    #[arg(long, env = "TIDEMARK_CONNECTION_URL")]
    connection_url: Option<String>,

    /// `connection.user`.
    #[arg(long, env = "TIDEMARK_CONNECTION_USER")]
    connection_user: Option<String>,

    /// `connection.password`. Every local user can read a command line:
    /// prefer --connection-password-file or this variable.
    #[arg(long, env = "TIDEMARK_CONNECTION_PASSWORD", hide_env_values = true)]
    connection_password: Option<Secret>,

    /// `connection.password` from a file (its whole content but one trailing
    /// newline), like a container secret.
    #[arg(
        long,
        env = "TIDEMARK_CONNECTION_PASSWORD_FILE",
        conflicts_with = "connection_password"
    )]
    connection_password_file: Option<PathBuf>,

    /// `mode`: logical (every insert, update and delete, from a replication
    /// slot; schema-init --capture logical, wal_level = logical), changelog
    /// (the same from triggers; schema-init --capture changelog) or
    /// timestamp+incrementing (the JDBC connector's).
    #[arg(long, env = "TIDEMARK_MODE")]
    mode: Option<String>,

    /// `timestamp.column.name`, like last_updated.
    #[arg(long, env = "TIDEMARK_TIMESTAMP_COLUMN_NAME")]
    timestamp_column_name: Option<String>,

    /// `incrementing.column.name`, like id.
    #[arg(long, env = "TIDEMARK_INCREMENTING_COLUMN_NAME")]
    incrementing_column_name: Option<String>,

    /// `topic.prefix`: topic = prefix + table name.
    #[arg(long, env = "TIDEMARK_TOPIC_PREFIX")]
    topic_prefix: Option<String>,

    /// `poll.interval.ms` (5000): longest wait between polls; a NOTIFY from
    /// schema-init's trigger wakes pg-source sooner.
    #[arg(long, env = "TIDEMARK_POLL_INTERVAL_MS")]
    poll_interval_ms: Option<String>,

    /// `connection.attempts` (3): how long pg-source waits for Postgres at
    /// start is attempts x connection.backoff.ms; a wrong password or a
    /// missing database fails at once.
    #[arg(long, env = "TIDEMARK_CONNECTION_ATTEMPTS")]
    connection_attempts: Option<String>,

    /// `connection.backoff.ms` (10000): see --connection-attempts.
    #[arg(long, env = "TIDEMARK_CONNECTION_BACKOFF_MS")]
    connection_backoff_ms: Option<String>,

    /// `batch.max.rows` (1000): rows per batch and per Kafka transaction.
    #[arg(long, env = "TIDEMARK_BATCH_MAX_ROWS")]
    batch_max_rows: Option<String>,

    /// `batch.linger.ms` (25): logical and changelog modes, while
    /// streaming: a Kafka transaction commits when its batch is full
    /// (batch.max.rows) or this long after the last batch stopped reading,
    /// whichever comes first, so a steady stream of commits makes about one
    /// Kafka transaction per linger however high its rate. A change waits at
    /// most about the linger plus one commit; 0 sends what is read at once
    /// (at most 5000).
    #[arg(long, env = "TIDEMARK_BATCH_LINGER_MS")]
    batch_linger_ms: Option<String>,

    /// `timestamp.delay.interval.ms` (0): extra lag behind the clock. Not
    /// needed for safety: open transactions already hold the poll back.
    #[arg(long, env = "TIDEMARK_TIMESTAMP_DELAY_INTERVAL_MS")]
    timestamp_delay_interval_ms: Option<String>,

    /// `timestamp.initial`: epoch ms to start at with no stored position; -1
    /// for now. Unset reads the whole table first.
    #[arg(long, env = "TIDEMARK_TIMESTAMP_INITIAL", allow_hyphen_values = true)]
    timestamp_initial: Option<String>,

    /// `table.whitelist`: comma-separated tables (schema.table) or patterns
    /// (anchored regular expressions on schema.table, like
    /// `public\.orders_.*`); unset reads every captured table (every table
    /// with both columns in timestamp+incrementing mode). A captured table
    /// that comes to match a pattern is read while running; in changelog
    /// mode its existing rows are sent by an incremental snapshot.
    #[arg(long, env = "TIDEMARK_TABLE_WHITELIST")]
    table_whitelist: Option<String>,

    /// `tombstones.on.delete` (true): changelog mode sends a null-valued
    /// record after each delete, so compacted topics forget the row.
    #[arg(long, env = "TIDEMARK_TOMBSTONES_ON_DELETE")]
    tombstones_on_delete: Option<String>,

    /// `slot.name` (tidemark_<name>): logical mode's replication slot,
    /// created at the first start. Drop it when the connector is retired
    /// (`select pg_drop_replication_slot('...')`): a slot keeps WAL.
    #[arg(long, env = "TIDEMARK_SLOT_NAME")]
    slot_name: Option<String>,

    /// `snapshot.mode` (initial): changelog mode sends every existing row as
    /// `op: r` first when no position is stored; `no_data` skips that.
    #[arg(long, env = "TIDEMARK_SNAPSHOT_MODE")]
    snapshot_mode: Option<String>,

    /// `db.timezone` (UTC): the zone writers' `timestamp` columns are in.
    #[arg(long, env = "TIDEMARK_DB_TIMEZONE")]
    db_timezone: Option<String>,

    /// `topic.creation.default.partitions` (1) for topics pg-source creates.
    #[arg(long, env = "TIDEMARK_TOPIC_PARTITIONS")]
    topic_partitions: Option<String>,

    /// `topic.creation.default.replication.factor` (-1: broker default).
    #[arg(
        long,
        env = "TIDEMARK_TOPIC_REPLICATION_FACTOR",
        allow_hyphen_values = true
    )]
    topic_replication_factor: Option<String>,

    /// Compacted topic holding source positions.
    #[arg(long, env = "TIDEMARK_OFFSETS_TOPIC", default_value = tidemark_common::offset::DEFAULT_OFFSETS_TOPIC)]
    offsets_topic: String,

    /// Do not LISTEN for NOTIFY tidemark; find changes by polling only.
    #[arg(long, env = "TIDEMARK_NO_LISTEN")]
    no_listen: bool,

    /// Changelog mode: how often to look for new commits (`20ms`, `1s`). Each
    /// look compares Postgres' current snapshot with the last one read and
    /// reads no table, so writers need no NOTIFY trigger; poll.interval.ms
    /// caps it.
    #[arg(long, env = "TIDEMARK_PROBE_INTERVAL", default_value = "20ms", value_parser = humantime::parse_duration)]
    probe_interval: std::time::Duration,

    /// Replaced by `--batch-linger-ms` (kept to say so rather than be
    /// ignored).
    #[arg(long, env = "TIDEMARK_LINGER", hide = true)]
    linger: Option<String>,

    /// Check instead of run: read the configuration, connect to Postgres
    /// and Kafka, and print everything that would stop or weaken a run
    /// (privileges, wal_level, the slot, each table and its primary key and
    /// capture, the topics, the stored position), each with its fix. Exits
    /// 0 when a run would start, 1 when it would stop. Changes nothing.
    #[arg(long)]
    check: bool,

    /// Log one JSON object per line.
    #[arg(long, env = "TIDEMARK_JSON_LOGS")]
    json_logs: bool,

    /// Where to serve GET /healthz and GET /metrics (Prometheus); `off` to
    /// serve nothing. Loopback by default, so only this machine reaches it;
    /// `0.0.0.0:9464` serves every interface (the Docker images set that).
    #[arg(long, env = "TIDEMARK_HTTP_ADDR", default_value = "127.0.0.1:9464")]
    http_addr: String,
}

/// Parses the command line, runs the program and returns its exit code.
pub fn main() -> std::process::ExitCode {
    tidemark_common::program::parse_and_run("pg-source", |cli: &Cli| cli.json_logs, run)
}

async fn run(cli: Cli, shutdown: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    if cli.check {
        let mut report = tidemark_common::check::Report::new();
        match config(cli) {
            Ok(cfg) => report = crate::check::check(&cfg).await,
            Err(e) => report.error("configuration", &e),
        }
        return report.finish("pg-source");
    }
    crate::run(config(cli)?, shutdown).await
}

/// The configuration from the connector file, flags and variables.
fn config(cli: Cli) -> anyhow::Result<crate::Config> {
    if let Some(old) = &cli.linger {
        anyhow::bail!(
            "--linger (TIDEMARK_LINGER, here {old:?}) was replaced by --batch-linger-ms \
             (TIDEMARK_BATCH_LINGER_MS, connector key batch.linger.ms), in milliseconds, for both \
             streaming modes: set that instead (the default is 25)"
        );
    }
    let password = match &cli.connection_password_file {
        Some(path) => Some(read_secret_file("--connection-password-file", path)?),
        None => cli.connection_password,
    };
    let mut connector =
        ConnectorConfig::from_file_or_named(cli.connector_config.as_deref(), "pg-source")?;
    connector.apply_overrides([
        ("name", cli.name),
        ("connection.url", cli.connection_url),
        ("connection.user", cli.connection_user),
        (
            "connection.password",
            password.map(|p| p.expose().to_owned()),
        ),
        ("mode", cli.mode),
        ("timestamp.column.name", cli.timestamp_column_name),
        ("incrementing.column.name", cli.incrementing_column_name),
        ("topic.prefix", cli.topic_prefix),
        ("poll.interval.ms", cli.poll_interval_ms),
        ("connection.attempts", cli.connection_attempts),
        ("connection.backoff.ms", cli.connection_backoff_ms),
        ("batch.max.rows", cli.batch_max_rows),
        ("batch.linger.ms", cli.batch_linger_ms),
        (
            "timestamp.delay.interval.ms",
            cli.timestamp_delay_interval_ms,
        ),
        ("timestamp.initial", cli.timestamp_initial),
        ("table.whitelist", cli.table_whitelist),
        ("db.timezone", cli.db_timezone),
        ("tombstones.on.delete", cli.tombstones_on_delete),
        ("snapshot.mode", cli.snapshot_mode),
        ("slot.name", cli.slot_name),
        ("topic.creation.default.partitions", cli.topic_partitions),
        (
            "topic.creation.default.replication.factor",
            cli.topic_replication_factor,
        ),
    ]);
    let kafka = cli.kafka.settings()?;
    let (mut cfg, warnings) = crate::Config::from_connector(&connector, kafka)?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    cfg.offsets_topic = cli.offsets_topic;
    match &mut cfg.mode {
        crate::ModeConfig::Timestamp(t) => t.listen = !cli.no_listen,
        crate::ModeConfig::ChangeLog(c) => {
            c.listen = !cli.no_listen;
            if cli.probe_interval.is_zero() {
                anyhow::bail!(
                    "--probe-interval (TIDEMARK_PROBE_INTERVAL) must be at least 1ms, like 20ms"
                );
            }
            c.probe_interval = cli.probe_interval;
        }
        crate::ModeConfig::Logical(_) => {}
    }
    cfg.http_addr = tidemark_common::program::parse_http_addr(&cli.http_addr)?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// Issue 10.4: /metrics and /healthz are not served to the network
    /// unless asked, and --help says so.
    #[test]
    fn the_endpoint_listens_on_loopback_by_default() {
        let cmd = super::Cli::command();
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
}
