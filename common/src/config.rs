//! Connector-config parsing shared by the programs.
//!
//! Tidemark reads the same JSON a user posts to Kafka Connect's REST API
//! (`{"name": ..., "config": {...}}`), so an existing pipeline moves over with
//! its files unchanged. Every key is a string, as in Connect. A program lists
//! the keys it honours, the keys it knows but ignores (with a warning), and the
//! keys it knows but cannot honour (an error naming the key); anything else is
//! an unknown key, reported with the closest known key.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::ConfigError;

/// A connector config as Kafka Connect takes it. `Debug` shows secret
/// values (`connection.password`) as `***` and URLs without their password.
#[derive(Clone, Default, PartialEq)]
pub struct ConnectorConfig {
    /// The connector's name. It names the source position and the consumer
    /// group, so renaming a connector starts it from scratch.
    pub name: String,
    /// The `config` object, every value as a string.
    pub props: BTreeMap<String, String>,
}

impl std::fmt::Debug for ConnectorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let props: BTreeMap<&str, String> = self
            .props
            .iter()
            .map(|(k, v)| {
                let shown = if crate::secret::is_secret_key(k) {
                    "***".to_owned()
                } else {
                    crate::pg::redact_url(v)
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("ConnectorConfig")
            .field("name", &self.name)
            .field("props", &props)
            .finish()
    }
}

impl ConnectorConfig {
    /// Reads a connector JSON file.
    ///
    /// Fails when the file cannot be read or is not `{"name", "config"}`
    /// JSON; the message names the file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        Self::from_json(&text).map_err(|why| ConfigError::File {
            path: path.display().to_string(),
            why,
        })
    }

    /// The connector file at `path` or, without one, an empty config named
    /// `name` for flags and variables to fill.
    ///
    /// Fails like [`Self::from_file`].
    pub fn from_file_or_named(path: Option<&Path>, name: &str) -> Result<Self, ConfigError> {
        match path {
            Some(path) => Self::from_file(path),
            None => Ok(Self {
                name: name.to_owned(),
                ..Default::default()
            }),
        }
    }

    /// Parses connector JSON. Accepts both the REST body
    /// (`{"name": .., "config": {..}}`) and a bare config object with a
    /// `name` key, as Connect's standalone properties do.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let obj = value
            .as_object()
            .ok_or("expected a JSON object with `name` and `config`")?;
        let (name, config) = match obj.get("config") {
            Some(config) => (obj.get("name").cloned(), config),
            None => (obj.get("name").cloned(), &value),
        };
        let config = config
            .as_object()
            .ok_or("`config` must be a JSON object of string values")?;
        let mut props = BTreeMap::new();
        for (key, value) in config {
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                other => {
                    return Err(format!(
                        "config key `{key}` must be a string, number or boolean, got {other}"
                    ))
                }
            };
            if key != "name" {
                props.insert(key.clone(), text);
            }
        }
        let name = match name {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s,
            Some(other) if !other.is_null() => {
                return Err(format!("`name` must be a string, got {other}"))
            }
            _ => return Err("missing `name`: every connector needs a name".into()),
        };
        Ok(Self { name, props })
    }

    /// Applies overrides from flags and environment variables; `None` keeps
    /// the file's value.
    pub fn apply_overrides<'a>(
        &mut self,
        overrides: impl IntoIterator<Item = (&'a str, Option<String>)>,
    ) {
        for (key, value) in overrides {
            if let Some(value) = value {
                if key == "name" {
                    self.name = value;
                } else {
                    self.props.insert(key.to_owned(), value);
                }
            }
        }
    }

    /// Checks every key against a program's lists. Returns the keys that are
    /// ignored, for the caller to warn about.
    ///
    /// Fails on the first key that cannot be honoured or is unknown.
    pub fn check_keys(&self, keys: &KeySet) -> Result<Vec<String>, ConfigError> {
        let mut ignored = Vec::new();
        for (key, value) in &self.props {
            if keys.supported.contains(&key.as_str()) {
                continue;
            }
            if let Some((_, why)) = keys
                .ignored
                .iter()
                .chain(CONNECT_WORKER_KEYS)
                .find(|(k, _)| k == key)
            {
                ignored.push(format!("config key `{key}` is ignored: {why}"));
                continue;
            }
            if let Some(check) = keys.conditional.iter().find(|c| c.key == key) {
                match (check.accept)(value) {
                    Ok(()) => continue,
                    Err(why) => {
                        return Err(ConfigError::Unsupported {
                            key: key.clone(),
                            why,
                        })
                    }
                }
            }
            if let Some((_, why)) = keys
                .unsupported
                .iter()
                .find(|(k, _)| k == key || key.starts_with(&format!("{k}.")))
            {
                return Err(ConfigError::Unsupported {
                    key: key.clone(),
                    why: (*why).to_owned(),
                });
            }
            let known = keys
                .supported
                .iter()
                .copied()
                .chain(
                    keys.ignored
                        .iter()
                        .chain(CONNECT_WORKER_KEYS)
                        .map(|(k, _)| *k),
                )
                .chain(keys.conditional.iter().map(|c| c.key))
                .chain(keys.unsupported.iter().map(|(k, _)| *k));
            let hint = closest(key, known)
                .map(|k| format!("; did you mean `{k}`?"))
                .unwrap_or_default();
            return Err(ConfigError::UnknownKey {
                key: key.clone(),
                hint,
            });
        }
        Ok(ignored)
    }

    /// The value of a key, if set and not blank.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.props
            .get(key)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
    }

    /// A required key.
    ///
    /// Fails with an error naming the key when it is missing.
    pub fn require(&self, key: &str, why: &str) -> Result<&str, ConfigError> {
        self.get(key).ok_or_else(|| ConfigError::missing(key, why))
    }

    /// An integer key with a default.
    ///
    /// Fails when the value is not an integer in `range`.
    pub fn int(
        &self,
        key: &str,
        default: i64,
        range: std::ops::RangeInclusive<i64>,
    ) -> Result<i64, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(text) => {
                let n: i64 = text
                    .parse()
                    .map_err(|_| ConfigError::invalid(key, text, "expected a whole number"))?;
                if range.contains(&n) {
                    Ok(n)
                } else {
                    Err(ConfigError::invalid(
                        key,
                        text,
                        format!("expected {} to {}", range.start(), range.end()),
                    ))
                }
            }
        }
    }

    /// A millisecond key (`poll.interval.ms` and friends) as a duration.
    ///
    /// Fails when the value is not a non-negative whole number.
    pub fn millis(&self, key: &str, default_ms: u64) -> Result<Duration, ConfigError> {
        let ms = self.int(key, default_ms as i64, 0..=i64::MAX)?;
        Ok(Duration::from_millis(ms as u64))
    }
}

/// A key that is honoured only with some values (for example
/// `value.converter` only when it names the JSON converter).
pub struct Conditional {
    /// The key.
    pub key: &'static str,
    /// Accepts the value, or says why it cannot be honoured.
    pub accept: fn(&str) -> Result<(), String>,
}

/// The keys one program knows, by what it does with them.
pub struct KeySet {
    /// Keys the program honours.
    pub supported: &'static [&'static str],
    /// Keys that mean nothing here, with why; a warning. The Connect
    /// worker's keys ([`CONNECT_WORKER_KEYS`]) are always among them.
    pub ignored: &'static [(&'static str, &'static str)],
    /// Keys honoured only for some values.
    pub conditional: &'static [Conditional],
    /// Keys Kafka Connect knows that Tidemark cannot honour, with why; an error.
    pub unsupported: &'static [(&'static str, &'static str)],
}

/// Keys every program ignores: they steer Kafka Connect's worker, which
/// Tidemark replaces.
pub const CONNECT_WORKER_KEYS: &[(&str, &str)] = &[
    ("connector.class", "Tidemark is the connector"),
    ("tasks.max", "each Tidemark program is a single task"),
    ("errors.log.enable", "Tidemark always logs errors"),
    ("errors.log.include.messages", "Tidemark always logs errors"),
];

/// Accepts Kafka Connect's JSON converter, the only format Tidemark writes.
pub fn accept_json_converter(value: &str) -> Result<(), String> {
    if value == "org.apache.kafka.connect.json.JsonConverter" {
        Ok(())
    } else {
        Err(format!(
            "Tidemark reads and writes Kafka Connect JSON only; set it to org.apache.kafka.connect.json.JsonConverter or remove it (got {value})"
        ))
    }
}

/// Accepts `schemas.enable` `true` (the Connect schema beside each payload,
/// the default) or `false` (the payload alone).
pub fn accept_schemas_enabled(value: &str) -> Result<(), String> {
    if value.eq_ignore_ascii_case("true") || value.eq_ignore_ascii_case("false") {
        Ok(())
    } else {
        Err("expected true (the schema beside each payload) or false (the payload alone)".into())
    }
}

/// Parses a human duration (`500ms`, `5s`, `1m`).
///
/// Fails with a message that shows the expected form.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration like 500ms, 5s or 1m: {e}"))
}

/// The known key nearest to `key` by edit distance, if it is near enough to be
/// a plausible typo.
fn closest<'a>(key: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    known
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: KeySet = KeySet {
        supported: &["topics", "file"],
        ignored: &[],
        conditional: &[Conditional {
            key: "value.converter",
            accept: accept_json_converter,
        }],
        unsupported: &[("topics.regex", "list the topics in `topics`")],
    };

    #[test]
    fn reads_the_rest_body_and_stringifies_values() {
        let c = ConnectorConfig::from_json(
            r#"{"name":"s","config":{"connector.class":"x","tasks.max":1,"file":"/tmp/f"}}"#,
        )
        .unwrap();
        assert_eq!(c.name, "s");
        assert_eq!(c.props["tasks.max"], "1");
        assert_eq!(c.get("file"), Some("/tmp/f"));
    }

    #[test]
    fn debug_hides_passwords() {
        let c = ConnectorConfig::from_json(
            r#"{"name":"s","config":{"connection.password":"hunter2","connection.url":"jdbc:postgresql://u:hunter3@h/db?password=hunter4","topics":"t"}}"#,
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter"), "{shown}");
        assert!(shown.contains("topics"), "{shown}");
    }

    #[test]
    fn a_missing_name_is_an_error() {
        let err = ConnectorConfig::from_json(r#"{"config":{"file":"x"}}"#).unwrap_err();
        assert!(err.contains("name"), "{err}");
    }

    #[test]
    fn keys_are_sorted_into_ok_ignored_and_errors() {
        let mut c = ConnectorConfig::from_json(
            r#"{"name":"s","config":{"connector.class":"x","topics":"t"}}"#,
        )
        .unwrap();
        let ignored = c.check_keys(&KEYS).unwrap();
        assert_eq!(ignored.len(), 1);
        assert!(ignored[0].contains("connector.class"));

        c.props.insert("topcis".into(), "t".into());
        let err = c.check_keys(&KEYS).unwrap_err().to_string();
        assert_eq!(err, "unknown config key `topcis`; did you mean `topics`?");

        c.props.remove("topcis");
        c.props.insert("topics.regex".into(), ".*".into());
        let err = c.check_keys(&KEYS).unwrap_err().to_string();
        assert!(err.contains("`topics.regex` is not supported"), "{err}");

        c.props.remove("topics.regex");
        c.props.insert(
            "value.converter".into(),
            "org.apache.kafka.connect.storage.StringConverter".into(),
        );
        let err = c.check_keys(&KEYS).unwrap_err().to_string();
        assert!(err.contains("value.converter"), "{err}");
    }

    #[test]
    fn overrides_win_over_the_file() {
        let mut c = ConnectorConfig::from_json(r#"{"name":"s","config":{"file":"a"}}"#).unwrap();
        c.apply_overrides([("file", Some("b".to_owned())), ("topics", None)]);
        assert_eq!(c.get("file"), Some("b"));
        assert_eq!(c.get("topics"), None);
    }

    #[test]
    fn numbers_are_checked_against_their_range() {
        let c = ConnectorConfig::from_json(
            r#"{"name":"s","config":{"batch.max.rows":"0","poll.interval.ms":"abc"}}"#,
        )
        .unwrap();
        assert!(c.int("batch.max.rows", 100, 1..=1000).is_err());
        let err = c.millis("poll.interval.ms", 5000).unwrap_err().to_string();
        assert!(
            err.contains("poll.interval.ms") && err.contains("abc"),
            "{err}"
        );
        assert_eq!(c.millis("other.ms", 7).unwrap(), Duration::from_millis(7));
    }
}
