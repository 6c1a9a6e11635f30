//! The command line: flags, environment variables and the connector file,
//! shared by the binary and the test harness's copies of it.

use std::path::PathBuf;

use clap::Parser;
use tidemark_common::config::ConnectorConfig;
use tidemark_common::kafka::KafkaArgs;

/// Writes every record of Kafka topics into a file, one line of JSON per
/// record, like Kafka Connect's FileStreamSink, but fsynced before its
/// position moves, so the file holds each record exactly once across
/// crashes. Reads FileStreamSink's JSON (`--connector-config`); every key can
/// also be set by a flag or an environment variable, which win over the file.
///
/// With `file.rotate.bytes`, `file.rotate.interval.ms` or `file.compression`
/// it writes a segmented archive instead: per partition, segments that are
/// sealed (compressed, checksummed, listed in a manifest) by size or age,
/// exactly once, and several instances with the same name share a topic's
/// partitions as one consumer group.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Kafka Connect connector JSON ({"name": ..., "config": {"topics", "file"}}).
    #[arg(long, env = "TIDEMARK_CONNECTOR_CONFIG")]
    connector_config: Option<PathBuf>,

    /// Connector name (`name`); the consumer group is connect-<name>.
    #[arg(long, env = "TIDEMARK_NAME")]
    name: Option<String>,

    /// `topics`: comma-separated topics to read.
    #[arg(long, env = "TIDEMARK_TOPICS")]
    topics: Option<String>,

    /// `file`: the output file. Its folder must exist. The checkpoint
    /// `<file>.tidemark-checkpoint`, the lock `<file>.tidemark-lock` and bad
    /// records' `<file>.dead-letter` sit beside it. With any `file.rotate.*`
    /// or `file.compression` key, the folder of a segmented archive instead
    /// (created if missing; its parent must exist).
    #[arg(long, env = "TIDEMARK_FILE")]
    file: Option<String>,

    /// `file.rotate.bytes`: write a segmented archive in the folder `file`,
    /// sealing a partition's segment after the record that takes it to this
    /// many bytes [default with any file.* key: 134217728, 128 MiB].
    #[arg(long, env = "TIDEMARK_FILE_ROTATE_BYTES")]
    file_rotate_bytes: Option<String>,

    /// `file.rotate.interval.ms`: also seal a segment this many ms after its
    /// first record, whether or not more records come.
    #[arg(long, env = "TIDEMARK_FILE_ROTATE_INTERVAL_MS")]
    file_rotate_interval_ms: Option<String>,

    /// `file.compression`: none, zstd or gzip; each sealed segment is one
    /// complete stream (zstdcat, zcat) [default: none].
    #[arg(long, env = "TIDEMARK_FILE_COMPRESSION")]
    file_compression: Option<String>,

    /// `file.compression.level`: zstd -7 to 19 [3], gzip 0 to 9 [6].
    #[arg(
        long,
        env = "TIDEMARK_FILE_COMPRESSION_LEVEL",
        allow_hyphen_values = true
    )]
    file_compression_level: Option<String>,

    /// `file.retention.window.ms`: keep every time of this last stretch
    /// restorable and delete the sealed segments before the base snapshot
    /// such a restore starts from. Unset: nothing is ever deleted.
    #[arg(long, env = "TIDEMARK_FILE_RETENTION_WINDOW_MS")]
    file_retention_window_ms: Option<String>,

    #[command(flatten)]
    kafka: KafkaArgs,

    /// Most records per write to the file (a write also ends at 256 KiB or
    /// when no record waits); one fsync covers every write before it.
    #[arg(long, env = "TIDEMARK_MAX_BATCH_RECORDS", default_value_t = 5_000)]
    max_batch_records: usize,

    /// Records larger than this many bytes go to the dead-letter file.
    #[arg(long, env = "TIDEMARK_MAX_RECORD_BYTES", default_value_t = 16 * 1024 * 1024)]
    max_record_bytes: usize,

    /// Check instead of run: read the configuration, look at the output's
    /// folder, the file and its checkpoint, connect to Kafka, and print
    /// everything that would stop or weaken a run (a missing or read-only
    /// folder, a file without its checkpoint, a sink already writing it, a
    /// missing topic, records deleted before they were archived, a topic
    /// created anew), each with its fix. Exits 0 when a run would start, 1
    /// when it would stop. Changes nothing.
    #[arg(long)]
    check: bool,

    /// Log one JSON object per line.
    #[arg(long, env = "TIDEMARK_JSON_LOGS")]
    json_logs: bool,

    /// Where to serve GET /healthz and GET /metrics (Prometheus); `off` to
    /// serve nothing. Loopback by default, so only this machine reaches it;
    /// `0.0.0.0:9465` serves every interface (the Docker images set that).
    #[arg(long, env = "TIDEMARK_HTTP_ADDR", default_value = "127.0.0.1:9465")]
    http_addr: String,
}

/// Parses the command line, runs the program and returns its exit code.
pub fn main() -> std::process::ExitCode {
    tidemark_common::program::parse_and_run("file-sink", |cli: &Cli| cli.json_logs, run)
}

async fn run(cli: Cli, shutdown: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    if cli.check {
        let mut report = tidemark_common::check::Report::new();
        match config(cli) {
            Ok(cfg) => report = crate::check::check(&cfg).await,
            Err(e) => report.error("configuration", &e),
        }
        return report.finish("file-sink");
    }
    crate::run(config(cli)?, shutdown).await.map(|_| ())
}

/// The configuration from the connector file, flags and variables.
fn config(cli: Cli) -> anyhow::Result<crate::Config> {
    let mut connector =
        ConnectorConfig::from_file_or_named(cli.connector_config.as_deref(), "file-sink")?;
    connector.apply_overrides([
        ("name", cli.name),
        ("topics", cli.topics),
        ("file", cli.file),
        ("file.rotate.bytes", cli.file_rotate_bytes),
        ("file.rotate.interval.ms", cli.file_rotate_interval_ms),
        ("file.compression", cli.file_compression),
        ("file.compression.level", cli.file_compression_level),
        ("file.retention.window.ms", cli.file_retention_window_ms),
    ]);
    let kafka = cli.kafka.settings()?;
    let (mut cfg, warnings) = crate::Config::from_connector(&connector, kafka)?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    cfg.max_batch_records = cli.max_batch_records.max(1);
    cfg.max_record_bytes = cli.max_record_bytes;
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
