//! Secrets (passwords, keys) given to the programs without showing them to
//! other users of the machine, and without echoing them in messages.
//!
//! A command-line argument is visible to every local user (`ps`,
//! `/proc/<pid>/cmdline`); an environment variable only to the same user and
//! root; a file only to whoever may read it. So every secret a program takes
//! can also come from a file or the environment (pg-source's
//! `--connection-password-file` and `TIDEMARK_CONNECTION_PASSWORD`,
//! schema-init's `--database-password-file` and `DATABASE_URL`, every
//! program's `--kafka-property-file` and `TIDEMARK_KAFKA_PROPERTIES`), and
//! [`command_line_warnings`] names the safer way for each secret that was
//! given as an argument. A program parses its command line with [`parse`]
//! and logs those warnings once logging is up.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::Context as _;
use clap::parser::ValueSource;

use crate::pg::redact_url;

/// Whether a config key or librdkafka property holds a secret
/// (`connection.password`, `sasl.password`, `ssl.key.password`,
/// `ssl.keystore.password`, `sasl.oauthbearer.client.secret`, `ssl.key.pem`,
/// `sasl.oauthbearer.config`, which may carry a secret, ...), so its value is
/// never shown.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.trim().to_ascii_lowercase();
    key.contains("password")
        || key.contains("secret")
        || key.ends_with(".key.pem")
        || key == "ssl_key"
        || key == "sasl.oauthbearer.config"
}

/// A secret value: `Debug` and `Display` print `***`, so a config that holds
/// one can be logged whole.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Reads a secret from a file, as container secrets and `kubectl create
/// secret` write them: the whole file, without one trailing newline.
///
/// Fails naming `flag` and the path when the file cannot be read, is not
/// UTF-8 or is empty; the message never holds the file's content.
pub fn read_secret_file(flag: &str, path: &Path) -> anyhow::Result<Secret> {
    let bytes =
        std::fs::read(path).with_context(|| format!("{flag}: cannot read {}", path.display()))?;
    let mut text = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("{flag}: {} is not UTF-8 text", path.display()))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        anyhow::bail!("{flag}: {} is empty", path.display());
    }
    Ok(Secret(text))
}

/// Parses the command line like `P::parse()` (printing help, version or the
/// usage error and exiting as clap does), and returns beside it the
/// [`command_line_warnings`] to log once logging is set up.
pub fn parse<P: clap::Parser>() -> (P, Vec<String>) {
    let cmd = P::command();
    let matches = cmd.clone().get_matches();
    let warnings = command_line_warnings(&cmd, &matches);
    let parsed =
        P::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut P::command()).exit());
    (parsed, warnings)
}

/// One warning for each secret given as a command-line argument, naming
/// the flag (never the value) and the safer way to give it: its `-file`
/// flag or its environment variable.
///
/// A secret here is the value of a flag whose name says `password`, a URL
/// with a password in it, or a `key=value` whose key [`is_secret_key`]. The
/// same in an environment variable or a file is not warned about.
pub fn command_line_warnings(cmd: &clap::Command, matches: &clap::ArgMatches) -> Vec<String> {
    let mut warnings = Vec::new();
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if matches.value_source(id) != Some(ValueSource::CommandLine) {
            continue;
        }
        let Some(long) = arg.get_long() else { continue };
        let values: Vec<String> = matches
            .get_raw(id)
            .map(|vs| vs.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        // A URL, or libpq's `host=h password=p`; a lone `key=value` is a
        // property.
        let url_password = values.iter().any(|v| {
            let url_like = v.contains("://") || v.starts_with("jdbc:") || v.contains(' ');
            url_like && redact_url(v) != *v
        });
        let what = if long.contains("password") && !long.ends_with("-file") {
            format!("--{long}")
        } else if url_password {
            format!("the password in --{long}'s URL")
        } else if let Some((k, _)) = values
            .iter()
            .filter_map(|v| v.split_once('='))
            .find(|(k, _)| is_secret_key(k))
        {
            format!("--{long} {}=***", k.trim())
        } else {
            continue;
        };
        // The flag that reads the same from a file: `--x-file` beside
        // `--x`, or for a URL's password the program's password file.
        let file_flag = cmd.get_arguments().filter_map(|a| a.get_long()).find(|l| {
            *l == format!("{long}-file") || (url_password && l.ends_with("password-file"))
        });
        let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
        let safer = match (file_flag, &env) {
            (Some(file), Some(env)) => {
                format!("use --{file} FILE or the environment variable {env}")
            }
            (Some(file), None) => format!("use --{file} FILE"),
            (None, Some(env)) => format!("use the environment variable {env}"),
            (None, None) => "use a file or the environment".to_owned(),
        };
        warnings.push(format!(
            "{what} is given on the command line, where every local user can read it (ps); {safer}"
        ));
    }
    if let Some((name, sub_matches)) = matches.subcommand() {
        if let Some(sub) = cmd.find_subcommand(name) {
            warnings.extend(command_line_warnings(sub, sub_matches));
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn command() -> Command {
        Command::new("prog")
            .arg(
                Arg::new("connection_password")
                    .long("connection-password")
                    .env("T_PW"),
            )
            .arg(Arg::new("connection_password_file").long("connection-password-file"))
            .arg(
                Arg::new("connection_url")
                    .long("connection-url")
                    .env("T_URL"),
            )
            .arg(
                Arg::new("kafka_properties")
                    .long("kafka-property")
                    .action(ArgAction::Append),
            )
            .arg(Arg::new("kafka_property_file").long("kafka-property-file"))
            .arg(Arg::new("name").long("name"))
    }

    #[test]
    fn secrets_on_the_command_line_are_named_with_the_safer_way_and_never_shown() {
        let cmd = command();
        let matches = cmd.clone().get_matches_from([
            "prog",
            "--connection-password",
            "hunter2",
            "--connection-url",
            "jdbc:postgresql://u:hunter3@h/db",
            "--kafka-property",
            "security.protocol=SASL_SSL",
            "--kafka-property",
            "sasl.password=hunter4",
            "--name",
            "password",
        ]);
        let warnings = command_line_warnings(&cmd, &matches);
        assert_eq!(warnings.len(), 3, "{warnings:#?}");
        assert!(warnings[0].starts_with("--connection-password is given on the command line"));
        assert!(warnings[0]
            .ends_with("use --connection-password-file FILE or the environment variable T_PW"));
        assert!(warnings[1].contains("the password in --connection-url's URL"));
        assert!(warnings[1]
            .ends_with("use --connection-password-file FILE or the environment variable T_URL"));
        assert!(warnings[2].starts_with("--kafka-property sasl.password=*** is given"));
        assert!(warnings[2].ends_with("use --kafka-property-file FILE"));
        for w in &warnings {
            assert!(!w.contains("hunter"), "{w}");
        }
    }

    #[test]
    fn secrets_from_files_and_the_environment_are_not_warned_about() {
        let cmd = command();
        let matches = cmd.clone().get_matches_from([
            "prog",
            "--connection-password-file",
            "/run/secrets/pw",
            "--connection-url",
            "jdbc:postgresql://h/db",
            "--kafka-property",
            "sasl.username=u",
        ]);
        assert_eq!(command_line_warnings(&cmd, &matches), Vec::<String>::new());
    }

    #[test]
    fn secret_files_lose_one_trailing_newline_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        for (content, want) in [
            ("s3cret\n", "s3cret"),
            ("s3cret\r\n", "s3cret"),
            ("a b \n\n", "a b \n"),
        ] {
            std::fs::write(&path, content).unwrap();
            assert_eq!(read_secret_file("--x-file", &path).unwrap().expose(), want);
        }
        std::fs::write(&path, "\n").unwrap();
        let err = read_secret_file("--x-file", &path).unwrap_err().to_string();
        assert!(
            err.contains("--x-file") && err.contains("is empty"),
            "{err}"
        );
        let err = read_secret_file("--x-file", &dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--x-file: cannot read"), "{err}");
    }

    #[test]
    fn secrets_print_as_stars() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?} {:?}", Some(&s)), "*** *** Some(***)");
        for key in [
            "sasl.password",
            "ssl.key.password",
            "connection.password",
            "sasl.oauthbearer.client.secret",
            "ssl.key.pem",
        ] {
            assert!(is_secret_key(key), "{key}");
        }
        assert!(!is_secret_key("sasl.username"));
    }
}
