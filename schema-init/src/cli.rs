//! The command line: flags and environment variables, shared by the binary
//! and the test harness's copy of it.

use clap::Parser;
use tidemark_common::pg::{PgTarget, TableName};

/// Creates the database, the seed table with its `last_updated` trigger and
/// sample row, an index on (last_updated, id), and the NOTIFY trigger that
/// wakes pg-source. Safe to run again: it changes nothing the second time.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Superuser or owner URL, like postgres://postgres:postgres@127.0.0.1:5432/postgres.
    /// Its database is used only to create the target database.
    /// Prefer the variable to the flag: every local user can read a command
    /// line. libpq's PGPASSWORD, ~/.pgpass (PGPASSFILE), PGSSLMODE,
    /// PGSSLROOTCERT, PGSSLCERT, PGSSLKEY and PGAPPNAME apply where the URL
    /// does not say.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,

    /// The password of --database-url's user from a file (its whole content
    /// but one trailing newline), like a container secret; wins over the
    /// URL's.
    #[arg(long, env = "TIDEMARK_DATABASE_PASSWORD_FILE")]
    database_password_file: Option<std::path::PathBuf>,

    /// Database to create and fill.
    #[arg(long, env = "TIDEMARK_DATABASE", default_value = "streaming_example")]
    database: String,

    /// Table to create: `table` or `schema.table`.
    #[arg(long, env = "TIDEMARK_TABLE", default_value = "streaming_update_table")]
    table: String,

    /// Do not install the trigger that sends NOTIFY tidemark on each change
    /// (pg-source then finds changes only by polling). With --capture
    /// changelog it is never installed: pg-source finds commits without it.
    #[arg(long, env = "TIDEMARK_NO_NOTIFY")]
    no_notify: bool,

    /// Do not insert the seed's sample row into a new table.
    #[arg(long, env = "TIDEMARK_NO_SAMPLE_ROW")]
    no_sample_row: bool,

    /// Install capture of every insert, update and delete on the table, for
    /// pg-source's mode of the same name. `logical`: a publication read
    /// through a replication slot, with `replica identity full`; costs the
    /// writers least, needs `wal_level = logical`. `changelog`: triggers
    /// that write each change to `tidemark.change_log`, and an event
    /// trigger that follows ALTER TABLE; works on any server, and needs a
    /// superuser's DATABASE_URL (only superusers may create event
    /// triggers). See docs/benchmarks.md for what each costs.
    #[arg(long, env = "TIDEMARK_CAPTURE", value_parser = ["changelog", "logical"])]
    capture: Option<String>,

    /// How change-log triggers fire: `statement` (one log insert per
    /// statement, from its transition tables: cheapest for bulk statements,
    /// as cheap as `row` for single-row commits) or `row` (a function call
    /// per changed row). See docs/benchmarks.md for what each costs.
    #[arg(long, env = "TIDEMARK_CAPTURE_TRIGGER", default_value = "statement", value_parser = ["row", "statement"])]
    capture_trigger: String,

    /// What an update's change event carries as `before`: `full` (the whole
    /// old row, like Debezium with REPLICA IDENTITY FULL) or `null` (like
    /// Debezium's default replica identity; logs half as much per update).
    /// Deletes always carry the whole old row.
    #[arg(long, env = "TIDEMARK_UPDATE_BEFORE", default_value = "full", value_parser = ["full", "null"])]
    update_before: String,

    /// Do not install the seed's last_updated trigger and (last_updated, id)
    /// index: for capturing a table of your own shape.
    #[arg(long, env = "TIDEMARK_NO_SEED_OBJECTS")]
    no_seed_objects: bool,

    /// Print the SQL it would run, and exit without connecting.
    #[arg(long)]
    dry_run: bool,

    /// Log one JSON object per line.
    #[arg(long, env = "TIDEMARK_JSON_LOGS")]
    json_logs: bool,
}

/// Parses the command line, runs schema-init and returns its exit code.
pub fn main() -> std::process::ExitCode {
    let (cli, secrets_on_command_line) = tidemark_common::secret::parse::<Cli>();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("schema-init: error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async_main(cli, secrets_on_command_line))
}

async fn async_main(cli: Cli, secrets_on_command_line: Vec<String>) -> std::process::ExitCode {
    tidemark_common::telemetry::init(cli.json_logs);
    for w in secrets_on_command_line {
        tracing::warn!("{w}");
    }
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("schema-init: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let table = TableName::parse(&cli.table).map_err(|e| anyhow::anyhow!("--table: {e}"))?;
    let target = cli
        .database_url
        .as_deref()
        .map(|url| {
            PgTarget::from_url("DATABASE_URL", url).map(|t| {
                t.with_credentials(
                    "the user and password in DATABASE_URL (or --database-password-file, PGPASSWORD)",
                )
            })
        })
        .transpose()?;
    let target = match (target, &cli.database_password_file) {
        (Some(target), Some(path)) => Some(target.with_password(
            tidemark_common::secret::read_secret_file("--database-password-file", path)?.expose(),
        )),
        (target, _) => target,
    };
    let cfg = crate::Config {
        target,
        database: cli.database,
        table,
        notify: !cli.no_notify,
        sample_row: !cli.no_sample_row,
        seed_objects: !cli.no_seed_objects,
        logical: cli.capture.as_deref() == Some("logical"),
        capture: cli
            .capture
            .as_ref()
            .filter(|c| *c == "changelog")
            .map(|_| crate::Capture {
                trigger: match cli.capture_trigger.as_str() {
                    "row" => crate::TriggerLevel::Row,
                    _ => crate::TriggerLevel::Statement,
                },
                update_before: match cli.update_before.as_str() {
                    "null" => crate::UpdateBefore::Null,
                    _ => crate::UpdateBefore::Full,
                },
            }),
    };
    if cli.dry_run {
        print!("{}", crate::dry_run(&cfg));
        return Ok(());
    }
    let report = crate::run(&cfg).await?;
    tracing::info!(
        database = %cfg.database,
        table = %cfg.table,
        created_database = report.created_database,
        created_table = report.created_table,
        "schema ready"
    );
    Ok(())
}
