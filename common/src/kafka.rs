//! Kafka client setup shared by the programs: client properties, topic
//! creation, and the source-position store.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use anyhow::{bail, Context as _};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::TopicPartitionList;

/// The Kafka flags every program takes, flattened into its command line.
/// `Debug` hides secret property values.
#[derive(Clone, clap::Args)]
pub struct KafkaArgs {
    /// Kafka brokers, host:port[,host:port].
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    pub bootstrap_servers: String,

    /// Extra librdkafka property, key=value (TLS, SASL, tuning). Repeatable;
    /// in the environment, separated by `;`. Wins over
    /// --kafka-property-file. Secrets (sasl.password, ssl.key.password)
    /// belong in the file or the environment: every local user can read a
    /// command line.
    #[arg(
        long = "kafka-property",
        env = "TIDEMARK_KAFKA_PROPERTIES",
        value_delimiter = ';',
        hide_env_values = true
    )]
    pub kafka_properties: Vec<String>,

    /// A file of librdkafka properties, one key=value a line (blank lines
    /// and lines starting with # are skipped), as Kafka's client.properties
    /// holds them: the place for sasl.password and ssl.key.password.
    /// Repeatable.
    #[arg(long = "kafka-property-file", env = "TIDEMARK_KAFKA_PROPERTY_FILE")]
    pub kafka_property_files: Vec<std::path::PathBuf>,
}

impl fmt::Debug for KafkaArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: Vec<String> = self
            .kafka_properties
            .iter()
            .map(|p| redact_property(p))
            .collect();
        f.debug_struct("KafkaArgs")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("kafka_properties", &props)
            .field("kafka_property_files", &self.kafka_property_files)
            .finish()
    }
}

impl KafkaArgs {
    /// The settings these flags describe: the files' properties, then the
    /// flags' (which win).
    ///
    /// Fails naming a property that is not `key=value`, a file that cannot
    /// be read, or a property librdkafka rejects; never with a secret value.
    pub fn settings(&self) -> anyhow::Result<KafkaSettings> {
        let mut properties = Vec::new();
        for path in &self.kafka_property_files {
            properties.extend(read_properties_file(path)?);
        }
        for p in &self.kafka_properties {
            properties.push(parse_property(p)?);
        }
        KafkaSettings::from_pairs(&self.bootstrap_servers, properties)
    }
}

/// Reads `key=value` lines (Java properties without continuations or
/// escapes: `#` and `!` start a comment line, `key = value` is trimmed).
///
/// Fails naming the file and line, without its value.
pub fn read_properties_file(path: &std::path::Path) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--kafka-property-file: cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let (k, v) = line.split_once('=').with_context(|| {
            format!(
                "--kafka-property-file {} line {}: not key=value (like sasl.password=...)",
                path.display(),
                n + 1
            )
        })?;
        out.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    Ok(out)
}

/// Splits one `key=value` property.
///
/// Fails, without showing a value that may be a secret, when there is no
/// `=`.
fn parse_property(p: &str) -> anyhow::Result<(String, String)> {
    let (k, v) = p.split_once('=').with_context(|| {
        format!(
            "kafka property `{}` is not key=value (like security.protocol=SSL)",
            redact_property(p)
        )
    })?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

/// How to reach the brokers: `bootstrap.servers` and any extra librdkafka
/// properties (TLS, SASL, tuning). `Debug` hides secret values.
#[derive(Clone, Default)]
pub struct KafkaSettings {
    /// `host:port,host:port`.
    pub bootstrap_servers: String,
    /// Extra librdkafka properties, applied last so they win.
    pub properties: Vec<(String, String)>,
}

impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: Vec<String> = self
            .properties
            .iter()
            .map(|(k, v)| {
                if is_secret(k) {
                    format!("{k}=***")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect();
        f.debug_struct("KafkaSettings")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("properties", &props)
            .finish()
    }
}

fn is_secret(key: &str) -> bool {
    crate::secret::is_secret_key(key)
}

impl KafkaSettings {
    /// Builds settings from the bootstrap list and `key=value` property
    /// strings as given on the command line.
    ///
    /// Fails like [`Self::from_pairs`], or naming the property that is not
    /// `key=value`.
    pub fn new(bootstrap_servers: &str, properties: &[String]) -> anyhow::Result<Self> {
        let parsed = properties
            .iter()
            .map(|p| parse_property(p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Self::from_pairs(bootstrap_servers, parsed)
    }

    /// Builds settings from the bootstrap list and properties, checking
    /// each property with librdkafka now, so a mistake is reported at start
    /// and without the value of a secret (librdkafka's own message, and
    /// rdkafka's error, carry the value).
    ///
    /// Fails when no broker is given or librdkafka rejects a property,
    /// naming it.
    pub fn from_pairs(
        bootstrap_servers: &str,
        properties: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        if bootstrap_servers.trim().is_empty() {
            bail!("no Kafka brokers given: set KAFKA_BOOTSTRAP_SERVERS or --bootstrap-servers (like 127.0.0.1:9092)");
        }
        let mut check = ClientConfig::new();
        for (k, v) in &properties {
            check.set(k, v);
        }
        if let Err(e) = check.create_native_config() {
            match e {
                KafkaError::ClientConfig(_, desc, key, value) => {
                    // An unknown key may be a mistyped secret one.
                    let unknown = desc.starts_with("No such configuration property");
                    let (desc, shown) = if is_secret(&key) || unknown || value.is_empty() {
                        (desc.replace(&value, "***"), "***".to_owned())
                    } else {
                        (desc, value)
                    };
                    bail!("kafka property `{key}={shown}` is not accepted: {desc}");
                }
                other => bail!("kafka properties are not accepted: {other}"),
            }
        }
        Ok(Self {
            bootstrap_servers: bootstrap_servers.trim().to_owned(),
            properties,
        })
    }

    /// A client config with the brokers, Tidemark's defaults for `role`, and
    /// the user's properties on top.
    pub fn client_config(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        for (k, v) in defaults {
            config.set(*k, *v);
        }
        for (k, v) in &self.properties {
            config.set(k, v);
        }
        config
    }

    /// Like [`Self::client_config`], with `fixed` settings (key, value, why)
    /// set last: a guarantee rests on them, so a property that sets one to
    /// anything else is an error naming it.
    pub fn client_config_fixed(
        &self,
        defaults: &[(&str, &str)],
        fixed: &[(&str, &str, &str)],
    ) -> anyhow::Result<ClientConfig> {
        let mut config = self.client_config(defaults);
        for (k, v, why) in fixed {
            if let Some((_, user)) = self.properties.iter().find(|(pk, _)| pk == k) {
                if user != v {
                    bail!("kafka property {k}={user} is not allowed: {k} must be {v} ({why}); remove it");
                }
            }
            config.set(*k, *v);
        }
        Ok(config)
    }

    /// An admin client.
    ///
    /// Fails when librdkafka rejects a property.
    pub fn admin(&self) -> anyhow::Result<AdminClient<DefaultClientContext>> {
        self.client_config(&[])
            .create()
            .context("cannot create a Kafka admin client; check the kafka properties")
    }
}

/// A property for a message: a secret's value (or, without `=`, all but
/// the first word of anything that may hold one) as `***`.
fn redact_property(p: &str) -> String {
    match p.split_once('=') {
        Some((k, _)) if is_secret(k) => format!("{k}=***"),
        Some(_) => p.to_owned(),
        None if is_secret(p) || p.contains(':') || p.contains(' ') => {
            let word = p.split([':', ' ']).next().unwrap_or("");
            format!("{word}***")
        }
        None => p.to_owned(),
    }
}

/// A client context that logs librdkafka's errors like the default one,
/// except end-of-partition, which position readers ask for on purpose.
#[derive(Debug, Default, Clone, Copy)]
pub struct QuietEofContext;

impl ClientContext for QuietEofContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !eof {
            tracing::warn!(error = %error, reason, "kafka client error");
        }
    }
}

impl ConsumerContext for QuietEofContext {}

/// How a topic Tidemark creates looks.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    /// Partitions for a new topic.
    pub partitions: i32,
    /// Replication factor for a new topic; -1 takes the broker's default.
    pub replication_factor: i32,
    /// Topic configs (`cleanup.policy`, ...).
    pub configs: Vec<(String, String)>,
}

/// Creates `topic` if it does not exist; an existing topic is left as it is.
///
/// Fails when the broker refuses (no permission, a bad replication factor),
/// naming the topic and the likely fix.
pub async fn ensure_topic(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    spec: &TopicSpec,
) -> anyhow::Result<bool> {
    let replication = TopicReplication::Fixed(spec.replication_factor);
    let mut new = NewTopic::new(topic, spec.partitions, replication);
    for (k, v) in &spec.configs {
        new = new.set(k, v);
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let create = admin.create_topics([&new], &opts);
    tokio::pin!(create);
    let started = std::time::Instant::now();
    let results = loop {
        tokio::select! {
            r = &mut create => break r,
            _ = tokio::time::sleep(Duration::from_secs(5)) => tracing::warn!(
                topic,
                waited = ?started.elapsed(),
                "waiting for Kafka to answer (is the broker up and bootstrap.servers right?)"
            ),
        }
    }
    .with_context(|| format!("cannot reach Kafka to create topic {topic}"))?;
    // One topic asked for, one result.
    if let Some(result) = results.into_iter().next() {
        match result {
            Ok(_) => {
                tracing::info!(topic, partitions = spec.partitions, "topic created");
                return Ok(true);
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => return Ok(false),
            Err((_, code @ RDKafkaErrorCode::TopicAuthorizationFailed))
            | Err((_, code @ RDKafkaErrorCode::ClusterAuthorizationFailed)) => bail!(
                "not allowed to create topic {topic} ({code}): create it yourself or grant CREATE on it"
            ),
            Err((_, code @ RDKafkaErrorCode::InvalidReplicationFactor)) => bail!(
                "cannot create topic {topic}: {code}; lower topic.creation.default.replication.factor to at most the number of brokers"
            ),
            Err((_, code)) => bail!("cannot create topic {topic}: {code}"),
        }
    }
    Ok(false)
}

/// Reads every record of a (small, compacted) topic up to its end as a
/// `read_committed` consumer sees it, keeping the last value of each key.
/// Tombstones remove the key.
///
/// This is how a source finds its position: positions are written in the same
/// Kafka transaction as the records they cover, so what a `read_committed`
/// reader sees here is exactly what was committed.
///
/// Waits through transient errors (a broker restarting) and fails when the
/// topic cannot be read within `timeout`, or at once when reading it is not
/// allowed.
pub fn read_compacted(
    settings: &KafkaSettings,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<HashMap<Vec<u8>, Vec<u8>>> {
    let consumer: BaseConsumer<QuietEofContext> = settings
        .client_config_fixed(
            &[("group.id", "tidemark-position-reader")],
            &[
                (
                    "isolation.level",
                    "read_committed",
                    "only committed positions are positions",
                ),
                (
                    "enable.partition.eof",
                    "true",
                    "the reader stops at the end",
                ),
                ("enable.auto.commit", "false", "the reader commits nothing"),
            ],
        )?
        .create_with_context(QuietEofContext)
        .context("cannot create a Kafka consumer to read positions")?;
    // The caller has just made sure the topic exists: a topic without
    // partitions in the answer is a broker still starting, not an empty
    // topic, and reading nothing there would lose every stored position.
    let deadline = std::time::Instant::now() + timeout;
    let partitions: Vec<i32> = loop {
        let metadata = consumer
            .fetch_metadata(
                Some(topic),
                deadline.saturating_duration_since(std::time::Instant::now()),
            )
            .with_context(|| format!("cannot read metadata of topic {topic}"))?;
        let found = metadata.topics().iter().find(|t| t.name() == topic);
        let problem = match found {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                break t.partitions().iter().map(|p| p.id()).collect();
            }
            Some(t) => match t.error().map(RDKafkaErrorCode::from) {
                Some(code @ RDKafkaErrorCode::TopicAuthorizationFailed) => bail!(
                    "not allowed to read topic {topic} ({code}); grant READ and DESCRIBE on it to this user"
                ),
                Some(code) => format!("{code:?}"),
                None => "no partitions".to_owned(),
            },
            None => "not in the metadata".to_owned(),
        };
        if std::time::Instant::now() >= deadline {
            bail!("cannot read positions: topic {topic} stayed unavailable for {timeout:?} ({problem})");
        }
        tracing::warn!(topic, problem, "topic of positions not ready yet; waiting");
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut values = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut open: std::collections::HashSet<i32> = partitions.into_iter().collect();
    let mut last_error: Option<KafkaError> = None;
    while !open.is_empty() {
        if std::time::Instant::now() > deadline {
            match &last_error {
                Some(e) => bail!(
                    "cannot read positions from topic {topic} within {timeout:?}; last error: {e}"
                ),
                None => bail!(
                    "timed out reading positions from topic {topic}; is an open transaction of another producer holding it back?"
                ),
            }
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) if is_refusal(&e) => {
                return Err(e).with_context(|| {
                    format!("not allowed to read topic {topic}; grant READ on it to this user")
                })
            }
            // A broker restarting, a leader moving: librdkafka reconnects by
            // itself, so wait for it until the deadline.
            Some(Err(e)) => {
                if last_error.as_ref() != Some(&e) {
                    tracing::warn!(topic, error = %e, "reading positions, waiting for Kafka");
                }
                last_error = Some(e);
            }
            Some(Ok(msg)) => {
                let Some(key) = msg.key() else { continue };
                match msg.payload() {
                    Some(v) => values.insert(key.to_vec(), v.to_vec()),
                    None => values.remove(key),
                };
            }
        }
    }
    Ok(values)
}

/// Whether a consumer error is a refusal that waiting cannot cure.
fn is_refusal(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::Authentication
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn property_files_are_key_value_lines_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("client.properties");
        std::fs::write(
            &file,
            "# SASL\n\nsecurity.protocol = SASL_SSL\nsasl.mechanism=PLAIN\n! old comment\nsasl.password=hunter2\r\n",
        )
        .unwrap();
        let args = KafkaArgs {
            bootstrap_servers: "127.0.0.1:9092".into(),
            kafka_properties: vec!["sasl.mechanism=SCRAM-SHA-512".into()],
            kafka_property_files: vec![file.clone()],
        };
        let settings = args.settings().unwrap();
        assert_eq!(
            settings.properties,
            [
                ("security.protocol", "SASL_SSL"),
                ("sasl.mechanism", "PLAIN"),
                ("sasl.password", "hunter2"),
                ("sasl.mechanism", "SCRAM-SHA-512"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        let config = settings.client_config(&[]);
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert!(!format!("{settings:?}").contains("hunter2"));
        let flag = KafkaArgs {
            kafka_properties: vec!["sasl.password=hunter2".into()],
            ..args.clone()
        };
        assert!(!format!("{flag:?}").contains("hunter2"), "{flag:?}");

        std::fs::write(&file, "sasl.password hunter2\n").unwrap();
        let err = format!("{:#}", args.settings().unwrap_err());
        assert!(err.contains("line 1: not key=value"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    /// Issue 10.3: no message about a Kafka property shows a secret, also
    /// when the property is mistyped (librdkafka's and rdkafka's own
    /// messages carry the value).
    #[test]
    fn rejected_properties_are_named_without_their_value() {
        for (property, shown) in [
            (
                "sasl.password:hunter2",
                "`sasl.password***` is not key=value",
            ),
            ("sasl.passwrd=hunter2", "`sasl.passwrd=***` is not accepted"),
            (
                "sasl.password hunter2",
                "`sasl.password***` is not key=value",
            ),
        ] {
            let err = format!(
                "{:#}",
                KafkaSettings::new("127.0.0.1:9092", &[property.to_owned()]).unwrap_err()
            );
            assert!(err.contains(shown), "{property}: {err}");
            assert!(!err.contains("hunter2"), "{property}: {err}");
        }
        let err = format!(
            "{:#}",
            KafkaSettings::new("127.0.0.1:9092", &["acks=sometimes".to_owned()]).unwrap_err()
        );
        assert!(err.contains("`acks=sometimes` is not accepted"), "{err}");
    }
}
