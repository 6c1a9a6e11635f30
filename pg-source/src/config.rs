//! pg-source's configuration: the connector keys shared by every mode, and
//! one type per capture mode with its own keys, parsing and defaults.

use std::time::Duration;

use tidemark_common::config::{
    accept_json_converter, accept_schemas_enabled, Conditional, ConnectorConfig, KeySet,
};
use tidemark_common::health::Health;
use tidemark_common::kafka::{KafkaSettings, TopicSpec};
use tidemark_common::offset::DEFAULT_OFFSETS_TOPIC;
use tidemark_common::pg::{PgTarget, TableName};
use tidemark_common::ConfigError;

/// The connector keys pg-source reads.
pub const KEYS: KeySet = KeySet {
    supported: &[
        "connection.url",
        "connection.user",
        "connection.password",
        "mode",
        "timestamp.column.name",
        "incrementing.column.name",
        "topic.prefix",
        "poll.interval.ms",
        "connection.attempts",
        "connection.backoff.ms",
        "batch.max.rows",
        "timestamp.delay.interval.ms",
        "timestamp.initial",
        "table.whitelist",
        "table.include.list",
        "db.timezone",
        "topic.creation.default.partitions",
        "topic.creation.default.replication.factor",
        "validate.non.null",
        "tombstones.on.delete",
        "skipped.operations",
        "snapshot.mode",
        "slot.name",
        "heartbeat.interval.ms",
        "heartbeat.topics.prefix",
        "snapshot.fetch.size",
        "snapshot.transaction.max.rows",
        "batch.linger.ms",
    ],
    ignored: &[
        (
            "numeric.mapping",
            "numerics are always sent as their exact decimal text",
        ),
        (
            "schema.pattern",
            "name the schema in table.whitelist (schema.table)",
        ),
        ("dialect.name", "Tidemark speaks PostgreSQL only"),
    ],
    conditional: &[
        Conditional {
            key: "key.converter",
            accept: accept_json_converter,
        },
        Conditional {
            key: "value.converter",
            accept: accept_json_converter,
        },
        Conditional {
            key: "key.converter.schemas.enable",
            accept: accept_schemas_enabled,
        },
        Conditional {
            key: "value.converter.schemas.enable",
            accept: accept_schemas_enabled,
        },
    ],
    unsupported: &[
        (
            "query",
            "pg-source reads whole tables; name them in table.whitelist",
        ),
        (
            "table.blacklist",
            "list the tables to read in table.whitelist instead",
        ),
        (
            "table.exclude.list",
            "list the tables to read in table.whitelist instead",
        ),
        (
            "transforms",
            "single message transforms are not supported; records are already keyed by primary key",
        ),
        ("predicates", "single message transforms are not supported"),
        (
            "numeric.precision.mapping",
            "numerics are always sent as their exact decimal text",
        ),
        (
            "exactly.once.support",
            "pg-source always writes in Kafka transactions",
        ),
        ("table.types", "pg-source reads tables only"),
        (
            "catalog.pattern",
            "name the schema in table.whitelist (schema.table)",
        ),
        ("quote.sql.identifiers", "identifiers are always quoted"),
        (
            "timestamp.granularity",
            "timestamps always keep microseconds",
        ),
        (
            "transaction.isolation.mode",
            "pg-source always reads committed rows below the oldest open transaction",
        ),
    ],
};

/// How pg-source finds changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The JDBC connector's mode: row states by `(timestamp, id)`; needs no
    /// trigger of Tidemark's, misses hard deletes.
    TimestampIncrementing,
    /// Every insert, update and delete from schema-init's change-log triggers.
    ChangeLog,
    /// Every insert, update and delete from a logical replication slot:
    /// nothing runs in the writers' transactions.
    Logical,
}

/// Everything pg-source needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Connector name: names the stored position and the transactional id.
    pub name: String,
    /// How changes are found, with that mode's own settings.
    pub mode: ModeConfig,
    /// `key.converter.schemas.enable`: keys carry their Connect schema.
    pub key_schemas: bool,
    /// `value.converter.schemas.enable`: values carry their Connect schema;
    /// without it a record is the payload alone, several times smaller.
    pub value_schemas: bool,
    /// The database to read.
    pub pg: PgTarget,
    /// The brokers.
    pub kafka: KafkaSettings,
    /// Tables named in `table.whitelist` / `table.include.list`; `None`
    /// finds them (see each mode). With patterns, the tables named exactly
    /// (possibly none).
    pub tables: Option<Vec<TableName>>,
    /// The entries of `table.include.list` that are patterns: the tables
    /// they match are found at start, and while running (changelog mode)
    /// those that come to match.
    pub table_patterns: Vec<TablePattern>,
    /// Topic = prefix + table name.
    pub topic_prefix: String,
    /// How long to wait for Postgres at start (`connection.attempts` x
    /// `connection.backoff.ms`); once running, pg-source waits for it
    /// without limit.
    pub connect_patience: Duration,
    /// How new topics look.
    pub topic: TopicSpec,
    /// Where positions are stored.
    pub offsets_topic: String,
    /// The Kafka transactional id.
    pub transactional_id: String,
    /// Set ready once connected and reading; for `/healthz` and tests.
    pub health: Health,
    /// Where to serve `/healthz` and `/metrics`; `None` serves nothing.
    pub http_addr: Option<std::net::SocketAddr>,
}

/// A capture mode and its settings.
#[derive(Debug, Clone)]
pub enum ModeConfig {
    /// `timestamp+incrementing`.
    Timestamp(TimestampConfig),
    /// `changelog`.
    ChangeLog(ChangeLogConfig),
    /// `logical`.
    Logical(LogicalConfig),
}

impl ModeConfig {
    /// Which mode.
    pub fn mode(&self) -> Mode {
        match self {
            Self::Timestamp(_) => Mode::TimestampIncrementing,
            Self::ChangeLog(_) => Mode::ChangeLog,
            Self::Logical(_) => Mode::Logical,
        }
    }
}

/// `timestamp+incrementing` mode's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimestampConfig {
    /// `timestamp.column.name`.
    pub timestamp_column: String,
    /// `incrementing.column.name`.
    pub incrementing_column: String,
    /// `poll.interval.ms`: the longest wait between polls; a NOTIFY wakes
    /// it sooner.
    pub poll_interval: Duration,
    /// `batch.max.rows`: rows per batch (and per Kafka transaction).
    pub batch_max_rows: i64,
    /// `timestamp.delay.interval.ms`: how far behind the clock the poll stays.
    pub delay_ms: i64,
    /// `timestamp.initial`: epoch ms to start from when no position is
    /// stored; -1 is now; `None` reads the table from the beginning.
    pub initial: Option<i64>,
    /// `db.timezone`: the zone of `timestamp` columns.
    pub db_timezone: String,
    /// Wake on `NOTIFY tidemark` as well as on the poll interval
    /// (`--no-listen` turns it off).
    pub listen: bool,
}

/// `changelog` mode's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeLogConfig {
    /// `tombstones.on.delete`: a null-valued record after each delete.
    pub tombstones: bool,
    /// `skipped.operations`: the kinds of change not sent.
    pub skipped: SkippedOps,
    /// `snapshot.mode=initial`: send every existing row first when no
    /// position is stored.
    pub initial_snapshot: bool,
    /// `batch.max.rows`: change-log rows per chunk (and per Kafka
    /// transaction) while streaming.
    pub batch_max_rows: i64,
    /// `batch.linger.ms`: under a steady stream of commits, a new snapshot
    /// of the change log is taken no sooner than this after the last one
    /// that found changes, so one Kafka transaction holds every commit of
    /// that time (a unit that filled a chunk is followed at once).
    pub batch_linger: Duration,
    /// `snapshot.fetch.size`: rows per read of an initial snapshot (its
    /// Kafka transactions hold several reads, see [`crate::snapshot`]).
    pub snapshot_fetch_size: i64,
    /// `snapshot.transaction.max.rows`: rows per Kafka transaction of an
    /// initial snapshot, at most.
    pub snapshot_transaction_rows: usize,
    /// `poll.interval.ms`: the longest wait between looks.
    pub poll_interval: Duration,
    /// `--probe-interval`: how often to compare the database's snapshot
    /// with the last one read, a query that reads no table. Commits are
    /// found this way without a NOTIFY trigger, which would cost every
    /// writing transaction a turn on Postgres' global notification queue
    /// lock.
    pub probe_interval: Duration,
    /// Wake on `NOTIFY tidemark` as well (`--no-listen` turns it off).
    pub listen: bool,
    /// `heartbeat.interval.ms`: with nothing to send for this long, a
    /// heartbeat says how far every change is sent (zero: never).
    pub heartbeat_interval: Duration,
    /// `heartbeat.topics.prefix`: heartbeats go to `<prefix>.<name>`.
    pub heartbeat_topics_prefix: String,
}

/// The default of `heartbeat.interval.ms`.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 10_000;

/// The default of `heartbeat.topics.prefix`.
pub const DEFAULT_HEARTBEAT_TOPICS_PREFIX: &str = "__tidemark-heartbeat";

/// `logical` mode's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalConfig {
    /// `tombstones.on.delete`.
    pub tombstones: bool,
    /// `skipped.operations`.
    pub skipped: SkippedOps,
    /// `snapshot.mode=initial`.
    pub initial_snapshot: bool,
    /// `batch.max.rows`: changes per Kafka transaction; a larger source
    /// transaction is split.
    pub batch_max_rows: i64,
    /// `snapshot.fetch.size`: rows per read of an initial snapshot.
    pub snapshot_fetch_size: i64,
    /// `snapshot.transaction.max.rows`.
    pub snapshot_transaction_rows: usize,
    /// `slot.name`: the replication slot.
    pub slot_name: String,
    /// `batch.linger.ms`: a batch holds the transactions read within this
    /// time after the last batch stopped reading, unless it fills first
    /// (`batch.max.rows`); see [`DEFAULT_BATCH_LINGER`].
    pub batch_linger: Duration,
}

/// `skipped.operations` (Debezium's key): the operations whose events
/// `logical` and `changelog` modes do not send, from `c` (create), `u`
/// (update), `d` (delete) and `t` (truncate). The default, `none`, sends
/// every change. A skipped change is not sent at all: it takes no place in
/// its unit's `total_order` and is not counted in `event_count`. An update
/// that changes the primary key (sent as a delete and a create) counts as
/// an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SkippedOps {
    /// `c`.
    pub create: bool,
    /// `u`.
    pub update: bool,
    /// `d`.
    pub delete: bool,
    /// `t`.
    pub truncate: bool,
}

impl SkippedOps {
    /// Reads `skipped.operations`.
    ///
    /// Fails on an operation it does not know, naming the key.
    pub fn from_connector(c: &ConnectorConfig) -> Result<Self, ConfigError> {
        let key = "skipped.operations";
        let mut ops = Self::default();
        let Some(text) = c.get(key) else {
            return Ok(ops);
        };
        for op in text.split(',').map(str::trim).filter(|op| !op.is_empty()) {
            match op {
                "c" => ops.create = true,
                "u" => ops.update = true,
                "d" => ops.delete = true,
                "t" => ops.truncate = true,
                "none" => {}
                _ => {
                    return Err(ConfigError::invalid(
                        key,
                        text,
                        "expected a comma-separated list of c (create), u (update), d (delete) and t (truncate), or none",
                    ))
                }
            }
        }
        Ok(ops)
    }

    /// Whether changes of the one-letter op `code` (`c`, `u`, `d`, `t`) are
    /// skipped.
    pub fn skips(&self, code: &str) -> bool {
        match code {
            "c" => self.create,
            "u" => self.update,
            "d" => self.delete,
            "t" => self.truncate,
            _ => false,
        }
    }
}

/// The default of [`ChangeLogConfig::probe_interval`]: a wake-up within
/// 20 ms, for about 50 one-row queries a second while idle.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(20);

/// The default of `batch.linger.ms`: a streaming Kafka transaction commits
/// when its batch is full (`batch.max.rows`) or when this much time has
/// passed since the previous batch stopped reading, whichever comes first.
/// Every transaction costs the broker about the same (its coordinator's
/// log, the markers, the requests), whatever it holds, so under a steady
/// stream of commits the number of transactions is about one per linger,
/// however high the rate, and what a change waits for is at most the
/// linger plus one commit.
pub const DEFAULT_BATCH_LINGER_MS: u64 = 25;

/// The longest `batch.linger.ms` accepted: more would only add latency.
pub const MAX_BATCH_LINGER_MS: i64 = 5000;

fn batch_linger(c: &ConnectorConfig) -> Result<Duration, ConfigError> {
    let ms = c.int(
        "batch.linger.ms",
        DEFAULT_BATCH_LINGER_MS as i64,
        0..=MAX_BATCH_LINGER_MS,
    )?;
    Ok(Duration::from_millis(ms as u64))
}

fn boolean(c: &ConnectorConfig, key: &str, default: &str) -> Result<bool, ConfigError> {
    match c.get(key).unwrap_or(default) {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(ConfigError::invalid(key, other, "expected true or false")),
    }
}

fn initial_snapshot(c: &ConnectorConfig) -> Result<bool, ConfigError> {
    match c.get("snapshot.mode").unwrap_or("initial") {
        "initial" => Ok(true),
        "no_data" | "never" => Ok(false),
        other => Err(ConfigError::invalid(
            "snapshot.mode",
            other,
            "expected initial (send existing rows first) or no_data (changes only)",
        )),
    }
}

fn batch_max_rows(c: &ConnectorConfig) -> Result<i64, ConfigError> {
    c.int("batch.max.rows", 1000, 1..=100_000)
}

/// The default of `snapshot.fetch.size`: a read of this many rows costs
/// little beside its rows, and its events (about 1 KB each without the
/// Connect schema, 2.6 KB with) stay a few MB.
pub const DEFAULT_SNAPSHOT_FETCH_SIZE: i64 = 2048;

fn snapshot_fetch_size(c: &ConnectorConfig) -> Result<i64, ConfigError> {
    c.int(
        "snapshot.fetch.size",
        DEFAULT_SNAPSHOT_FETCH_SIZE,
        1..=100_000,
    )
}

fn snapshot_transaction_rows(c: &ConnectorConfig) -> Result<usize, ConfigError> {
    let n = c.int(
        "snapshot.transaction.max.rows",
        crate::snapshot::SNAPSHOT_TXN_ROWS as i64,
        1..=10_000_000,
    )?;
    Ok(n as usize)
}

impl TimestampConfig {
    /// Reads the mode's keys.
    ///
    /// Fails on the first key that is missing or wrong, naming it.
    pub fn from_connector(c: &ConnectorConfig) -> Result<Self, ConfigError> {
        let initial = match c.get("timestamp.initial") {
            None => None,
            Some(text) => {
                let why = "expected epoch milliseconds, or -1 for now";
                let n: i64 = text
                    .parse()
                    .map_err(|_| ConfigError::invalid("timestamp.initial", text, why))?;
                if n < -1 {
                    return Err(ConfigError::invalid("timestamp.initial", text, why));
                }
                Some(n)
            }
        };
        Ok(Self {
            timestamp_column: c
                .require(
                    "timestamp.column.name",
                    "the column the trigger sets to now(), like last_updated",
                )?
                .to_owned(),
            incrementing_column: c
                .require(
                    "incrementing.column.name",
                    "the table's increasing id column, like id",
                )?
                .to_owned(),
            poll_interval: c.millis("poll.interval.ms", 5000)?,
            batch_max_rows: batch_max_rows(c)?,
            delay_ms: c.int("timestamp.delay.interval.ms", 0, 0..=i64::from(i32::MAX))?,
            initial,
            db_timezone: c.get("db.timezone").unwrap_or("UTC").to_owned(),
            listen: true,
        })
    }
}

impl ChangeLogConfig {
    /// Reads the mode's keys.
    ///
    /// Fails on the first key that is wrong, naming it.
    pub fn from_connector(c: &ConnectorConfig) -> Result<Self, ConfigError> {
        Ok(Self {
            tombstones: boolean(c, "tombstones.on.delete", "true")?,
            skipped: SkippedOps::from_connector(c)?,
            initial_snapshot: initial_snapshot(c)?,
            batch_max_rows: batch_max_rows(c)?,
            batch_linger: batch_linger(c)?,
            snapshot_fetch_size: snapshot_fetch_size(c)?,
            snapshot_transaction_rows: snapshot_transaction_rows(c)?,
            poll_interval: c.millis("poll.interval.ms", 5000)?,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            listen: true,
            heartbeat_interval: c.millis("heartbeat.interval.ms", DEFAULT_HEARTBEAT_INTERVAL_MS)?,
            heartbeat_topics_prefix: match c.get("heartbeat.topics.prefix") {
                Some("") => {
                    return Err(ConfigError::invalid(
                        "heartbeat.topics.prefix",
                        "",
                        "expected a topic name prefix; heartbeats go to <prefix>.<name>",
                    ))
                }
                Some(p) => p.to_owned(),
                None => DEFAULT_HEARTBEAT_TOPICS_PREFIX.to_owned(),
            },
        })
    }

    /// The topic of this connector's heartbeats, `None` when they are off.
    pub fn heartbeat_topic(&self, name: &str) -> Option<String> {
        (!self.heartbeat_interval.is_zero())
            .then(|| format!("{}.{name}", self.heartbeat_topics_prefix))
    }
}

impl LogicalConfig {
    /// Reads the mode's keys; the slot name defaults to one derived from the
    /// connector's name.
    ///
    /// Fails on the first key that is wrong, naming it.
    pub fn from_connector(c: &ConnectorConfig) -> Result<Self, ConfigError> {
        let slot_name = match c.get("slot.name") {
            Some(name) => {
                if name.is_empty()
                    || name.len() > 63
                    || !name
                        .chars()
                        .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
                {
                    return Err(ConfigError::invalid(
                        "slot.name",
                        name,
                        "a replication slot name has 1 to 63 lower-case letters, digits and underscores",
                    ));
                }
                name.to_owned()
            }
            None => crate::modes::logical::default_slot_name(&c.name),
        };
        Ok(Self {
            tombstones: boolean(c, "tombstones.on.delete", "true")?,
            skipped: SkippedOps::from_connector(c)?,
            initial_snapshot: initial_snapshot(c)?,
            batch_max_rows: batch_max_rows(c)?,
            snapshot_fetch_size: snapshot_fetch_size(c)?,
            snapshot_transaction_rows: snapshot_transaction_rows(c)?,
            slot_name,
            batch_linger: batch_linger(c)?,
        })
    }
}

impl Config {
    /// Builds the config from a connector config (file plus flag overrides).
    /// Returns warnings for ignored keys.
    ///
    /// Fails on the first key that is wrong, naming it.
    pub fn from_connector(
        c: &ConnectorConfig,
        kafka: KafkaSettings,
    ) -> Result<(Self, Vec<String>), ConfigError> {
        let warnings = c.check_keys(&KEYS)?;
        let mode = match c.get("mode").unwrap_or("timestamp+incrementing") {
            "timestamp+incrementing" => ModeConfig::Timestamp(TimestampConfig::from_connector(c)?),
            "changelog" => ModeConfig::ChangeLog(ChangeLogConfig::from_connector(c)?),
            "logical" => ModeConfig::Logical(LogicalConfig::from_connector(c)?),
            other => {
                return Err(ConfigError::invalid(
                    "mode",
                    other,
                    "pg-source supports logical and changelog (every change, deletes included) and timestamp+incrementing (the bulk, timestamp and incrementing modes miss changes)",
                ))
            }
        };
        let schemas = |key: &str| !c.get(key).is_some_and(|v| v.eq_ignore_ascii_case("false"));
        let url = c.require(
            "connection.url",
            "the database to read, like jdbc:postgresql://host:5432/streaming_example",
        )?;
        let pg = PgTarget::from_jdbc(
            "connection.url",
            url,
            c.get("connection.user"),
            c.props.get("connection.password").map(String::as_str),
        )?
        .with_credentials(
            "connection.user and connection.password (or --connection-password-file, \
             TIDEMARK_CONNECTION_PASSWORD, the URL's user and password, PGPASSWORD)",
        );
        let (tables, table_patterns) = table_list(c)?;
        let partitions = c.int("topic.creation.default.partitions", 1, 1..=10_000)?;
        let replication = c.int("topic.creation.default.replication.factor", -1, -1..=32)?;
        if replication == 0 {
            return Err(ConfigError::invalid(
                "topic.creation.default.replication.factor",
                "0",
                "expected -1 (the broker's default) or a positive number",
            ));
        }
        let cfg = Self {
            transactional_id: format!("tidemark-pg-source-{}", c.name),
            name: c.name.clone(),
            mode,
            key_schemas: schemas("key.converter.schemas.enable"),
            value_schemas: schemas("value.converter.schemas.enable"),
            pg,
            kafka,
            tables,
            table_patterns,
            topic_prefix: c.get("topic.prefix").unwrap_or("").to_owned(),
            connect_patience: connect_patience(c)?,
            topic: TopicSpec {
                partitions: partitions as i32,
                replication_factor: replication as i32,
                configs: Vec::new(),
            },
            offsets_topic: DEFAULT_OFFSETS_TOPIC.to_owned(),
            health: Health::new(),
            http_addr: None,
        };
        Ok((cfg, warnings))
    }
}

/// One pattern of `table.include.list`, as Debezium reads them: a regular
/// expression that must match a table's whole `schema.table` name (the
/// names as the catalog spells them, unquoted, case-sensitive).
#[derive(Debug, Clone)]
pub struct TablePattern {
    /// As the user wrote it, for messages.
    pub text: String,
    regex: regex::Regex,
}

impl TablePattern {
    /// Whether the pattern matches `table` as a whole.
    pub fn matches(&self, table: &TableName) -> bool {
        self.regex
            .is_match(&format!("{}.{}", table.schema, table.name))
    }
}

/// Whether any pattern of `patterns` matches `table`.
pub fn matches_any(patterns: &[TablePattern], table: &TableName) -> bool {
    patterns.iter().any(|p| p.matches(table))
}

/// The characters that make a `table.include.list` entry a pattern rather
/// than a table name.
const PATTERN_CHARS: &[char] = &['*', '+', '?', '[', ']', '(', ')', '{', '}', '|', '^', '\\'];

/// `table.whitelist` or `table.include.list` (the same key by two names):
/// comma-separated entries, each a table name (`t`, `schema.t`,
/// `"Odd Name"`) or, when it holds a regular-expression character
/// (`* + ? [ ] ( ) { } | ^ \\`) and no double quote, a pattern on
/// `schema.table`, anchored at both ends (`public\.orders_.*`). A `.` in a
/// pattern matches any character, as in Debezium's; write `\\.` for a dot.
/// `$` is not among them: Postgres allows it in unquoted names (`a$b`), and
/// the pattern is anchored anyway.
///
/// Fails naming the key on a name that does not parse or a pattern that
/// does not compile.
fn table_list(
    c: &ConnectorConfig,
) -> Result<(Option<Vec<TableName>>, Vec<TablePattern>), ConfigError> {
    // `--table-whitelist` overrides a file's `table.include.list`.
    let (key, list) = match (c.get("table.whitelist"), c.get("table.include.list")) {
        (Some(l), _) => ("table.whitelist", l),
        (None, Some(l)) => ("table.include.list", l),
        (None, None) => return Ok((None, Vec::new())),
    };
    let mut tables = Vec::new();
    let mut patterns = Vec::new();
    for entry in list.split(',').map(str::trim) {
        if !entry.contains('"') && entry.contains(PATTERN_CHARS) {
            let regex = regex::Regex::new(&format!("^(?:{entry})$")).map_err(|e| {
                ConfigError::invalid(
                    key,
                    list,
                    format!("`{entry}` is not a regular expression: {e}"),
                )
            })?;
            patterns.push(TablePattern {
                text: entry.to_owned(),
                regex,
            });
        } else {
            tables
                .push(TableName::parse(entry).map_err(|why| ConfigError::invalid(key, list, why))?);
        }
    }
    Ok((Some(tables), patterns))
}

/// The longest start-up wait for Postgres accepted: a day. Far beyond any
/// restart, and far from where a deadline computed from it could overflow.
pub const MAX_CONNECT_PATIENCE: Duration = Duration::from_secs(24 * 3600);

/// `connection.attempts` x `connection.backoff.ms`.
///
/// Fails when the product is above [`MAX_CONNECT_PATIENCE`], naming both
/// keys.
fn connect_patience(c: &ConnectorConfig) -> Result<Duration, ConfigError> {
    let backoff = c.millis("connection.backoff.ms", 10_000)?;
    let attempts = c.int("connection.attempts", 3, 1..=i64::from(u16::MAX))?;
    match backoff.checked_mul(attempts as u32) {
        Some(patience) if patience <= MAX_CONNECT_PATIENCE => Ok(patience),
        _ => Err(ConfigError::invalid(
            "connection.backoff.ms",
            &backoff.as_millis().to_string(),
            format!(
                "times connection.attempts ({attempts}) is how long pg-source waits for Postgres at start, \
                 and that must be at most a day (86400000 ms)"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connector(pairs: &[(&str, &str)]) -> ConnectorConfig {
        let mut c = ConnectorConfig {
            name: "My-Connector".into(),
            ..Default::default()
        };
        c.props.insert(
            "connection.url".into(),
            "jdbc:postgresql://127.0.0.1:5432/db".into(),
        );
        c.props.insert("connection.user".into(), "u".into());
        for (k, v) in pairs {
            c.props.insert((*k).into(), (*v).into());
        }
        c
    }

    fn kafka() -> KafkaSettings {
        KafkaSettings::new("127.0.0.1:9092", &[]).unwrap()
    }

    #[test]
    fn timestamp_mode_needs_both_columns_and_reads_its_keys() {
        let err = TimestampConfig::from_connector(&connector(&[])).unwrap_err();
        assert!(err.to_string().contains("timestamp.column.name"), "{err}");
        let c = connector(&[
            ("timestamp.column.name", "last_updated"),
            ("incrementing.column.name", "id"),
            ("timestamp.initial", "-1"),
            ("poll.interval.ms", "250"),
        ]);
        let t = TimestampConfig::from_connector(&c).unwrap();
        assert_eq!(t.initial, Some(-1));
        assert_eq!(t.poll_interval, Duration::from_millis(250));
        assert_eq!(t.db_timezone, "UTC");
        let bad = connector(&[
            ("timestamp.column.name", "last_updated"),
            ("incrementing.column.name", "id"),
            ("timestamp.initial", "-2"),
        ]);
        let err = TimestampConfig::from_connector(&bad).unwrap_err();
        assert!(err.to_string().contains("timestamp.initial"), "{err}");
    }

    #[test]
    fn changelog_mode_reads_tombstones_and_snapshot_mode() {
        let c = ChangeLogConfig::from_connector(&connector(&[])).unwrap();
        assert!(c.tombstones && c.initial_snapshot);
        assert_eq!(c.probe_interval, DEFAULT_PROBE_INTERVAL);
        let c = ChangeLogConfig::from_connector(&connector(&[
            ("tombstones.on.delete", "false"),
            ("snapshot.mode", "no_data"),
        ]))
        .unwrap();
        assert!(!c.tombstones && !c.initial_snapshot);
        assert_eq!(c.skipped, SkippedOps::default());
        let c = ChangeLogConfig::from_connector(&connector(&[("skipped.operations", " t, u ")]))
            .unwrap();
        assert!(c.skipped.skips("t") && c.skipped.skips("u"));
        assert!(!c.skipped.skips("c") && !c.skipped.skips("d"));
        let c =
            ChangeLogConfig::from_connector(&connector(&[("skipped.operations", "none")])).unwrap();
        assert_eq!(c.skipped, SkippedOps::default());
        for (key, value) in [
            ("tombstones.on.delete", "yes"),
            ("snapshot.mode", "always"),
            ("batch.max.rows", "0"),
            ("skipped.operations", "c,x"),
            ("batch.linger.ms", "5001"),
            ("batch.linger.ms", "-1"),
        ] {
            let err = ChangeLogConfig::from_connector(&connector(&[(key, value)])).unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn logical_mode_derives_or_checks_the_slot_name_and_bounds_the_batch_linger() {
        let l = LogicalConfig::from_connector(&connector(&[])).unwrap();
        assert!(
            l.slot_name.starts_with("tidemark_my_connector_"),
            "{}",
            l.slot_name
        );
        assert_eq!(
            l.batch_linger,
            Duration::from_millis(DEFAULT_BATCH_LINGER_MS)
        );
        let l = LogicalConfig::from_connector(&connector(&[("batch.linger.ms", "0")])).unwrap();
        assert_eq!(l.batch_linger, Duration::ZERO);
        let c = ChangeLogConfig::from_connector(&connector(&[("batch.linger.ms", "50")])).unwrap();
        assert_eq!(c.batch_linger, Duration::from_millis(50));
        let err =
            LogicalConfig::from_connector(&connector(&[("batch.linger.ms", "60000")])).unwrap_err();
        assert!(err.to_string().contains("batch.linger.ms"), "{err}");
        let named = LogicalConfig::from_connector(&connector(&[("slot.name", "mine")])).unwrap();
        assert_eq!(named.slot_name, "mine");
        let err =
            LogicalConfig::from_connector(&connector(&[("slot.name", "Bad-Name")])).unwrap_err();
        assert!(err.to_string().contains("slot.name"), "{err}");
    }

    #[test]
    fn table_lists_hold_names_and_anchored_patterns() {
        let list = |v: &str| {
            Config::from_connector(
                &connector(&[("mode", "changelog"), ("table.include.list", v)]),
                kafka(),
            )
            .map(|(c, _)| c)
        };
        let cfg = list("a, s.\"Odd*Name\", public\\.orders_[0-9]+, inv.*").unwrap();
        let names: Vec<String> = cfg
            .tables
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(names, ["public.a", "s.Odd*Name"]);
        let t = |s: &str| TableName::parse(s).unwrap();
        let p = &cfg.table_patterns;
        assert_eq!(p.len(), 2);
        assert!(matches_any(p, &t("orders_12")));
        assert!(!matches_any(p, &t("orders_12x")), "anchored at the end");
        assert!(!matches_any(p, &t("x.orders_12")), "anchored at the start");
        assert!(matches_any(p, &t("inv.stock")));
        assert!(!matches_any(p, &t("public.a")));
        let cfg = list("a,b,a$b").unwrap();
        assert_eq!(cfg.tables.unwrap().len(), 3, "a$b is a name");
        assert!(cfg.table_patterns.is_empty());
        let err = list("orders_(").unwrap_err().to_string();
        assert!(
            err.contains("table.include.list") && err.contains("regular expression"),
            "{err}"
        );
    }

    #[test]
    fn the_mode_key_picks_the_mode_type() {
        for (value, mode) in [("changelog", Mode::ChangeLog), ("logical", Mode::Logical)] {
            let (cfg, _) = Config::from_connector(&connector(&[("mode", value)]), kafka()).unwrap();
            assert_eq!(cfg.mode.mode(), mode);
        }
        let err = Config::from_connector(&connector(&[("mode", "bulk")]), kafka()).unwrap_err();
        assert!(err.to_string().contains("`mode`"), "{err}");
    }

    #[test]
    fn a_start_wait_too_long_to_hold_is_a_config_error_not_a_panic() {
        let c = connector(&[
            ("mode", "changelog"),
            ("connection.backoff.ms", &i64::MAX.to_string()),
            ("connection.attempts", "3"),
        ]);
        let err = Config::from_connector(&c, kafka()).unwrap_err().to_string();
        assert!(err.contains("connection.backoff.ms"), "{err}");
        assert!(err.contains("connection.attempts"), "{err}");
        let c = connector(&[
            ("mode", "changelog"),
            ("connection.backoff.ms", "2000"),
            ("connection.attempts", "3"),
        ]);
        let (cfg, _) = Config::from_connector(&c, kafka()).unwrap();
        assert_eq!(cfg.connect_patience, Duration::from_secs(6));
    }
}
