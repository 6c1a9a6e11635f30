//! Postgres client setup: JDBC URLs, connection options and the retry policy.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::ConfigError;

/// Where and how to connect to Postgres, with the password kept out of
/// `Debug` and `Display` so it never reaches a log line or an error message.
#[derive(Clone)]
pub struct PgTarget {
    /// The options sqlx connects with (they hold the password).
    pub options: PgConnectOptions,
    /// `user@host:port/database`, for messages.
    pub display: String,
    /// The password and TLS settings again, for the replication connection
    /// of `logical` mode, which sqlx does not make.
    replication: ReplicationAuth,
    /// Where the calling program takes the user and password from, for the
    /// message of a refused login (see [`Self::with_credentials`]).
    credentials: String,
    /// What to do about a database that does not exist (see
    /// [`Self::with_missing_database`]).
    missing_database: &'static str,
}

/// What a missing database's message says by default: the capture side's
/// schema-init creates it.
const MISSING_DATABASE: &str =
    "run schema-init first (it creates the database), or fix the database in the URL";

/// What a replication connection needs that [`PgConnectOptions`] does not
/// give back: the same password and TLS files the pool uses, from the same
/// places (the URL, then the libpq environment variables sqlx reads).
#[derive(Clone, Default)]
struct ReplicationAuth {
    password: Option<String>,
    ssl_root_cert: Option<String>,
    ssl_cert: Option<String>,
    ssl_key: Option<String>,
}

impl ReplicationAuth {
    fn new(password: Option<String>, url: Option<&url::Url>) -> Self {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self {
            password: password.or_else(|| env("PGPASSWORD")),
            ssl_root_cert: query_param(url, "sslrootcert").or_else(|| env("PGSSLROOTCERT")),
            ssl_cert: query_param(url, "sslcert").or_else(|| env("PGSSLCERT")),
            ssl_key: query_param(url, "sslkey").or_else(|| env("PGSSLKEY")),
        }
    }
}

/// How to open a replication connection to a [`PgTarget`]'s server.
#[derive(Clone)]
pub struct ReplicationTarget {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// User (needs the `REPLICATION` attribute, or superuser).
    pub user: String,
    /// Password, empty for none.
    pub password: String,
    /// Database.
    pub database: String,
    /// The sqlx TLS mode.
    pub ssl_mode: PgSslMode,
    /// CA file for `verify-ca` / `verify-full`.
    pub ssl_root_cert: Option<String>,
    /// Client certificate and key files, for certificate authentication.
    pub ssl_cert_key: Option<(String, String)>,
}

impl fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgTarget({})", self.display)
    }
}

impl fmt::Display for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

/// Query parameters of a JDBC URL that Tidemark honours.
const JDBC_PARAMS: &[&str] = &[
    "user",
    "password",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "ApplicationName",
    "applicationName",
];

impl PgTarget {
    /// Builds a target from a JDBC URL (`jdbc:postgresql://host:port/db?...`)
    /// as the JDBC connector's `connection.url` holds it, plus the separate
    /// `connection.user` and `connection.password` keys.
    ///
    /// The user and password come from, in this order: the keys, the URL's
    /// `user` and `password` parameters (as in the JDBC driver), the URL's
    /// userinfo (`jdbc:postgresql://user:password@host/db`, percent-encoded
    /// as in any URL; the JDBC driver does not read it, libpq does, and a
    /// user who writes it means it), and for the password last the
    /// `PGPASSWORD` environment variable. `PGSSLMODE`, `PGSSLROOTCERT`,
    /// `PGSSLCERT`, `PGSSLKEY` and `PGAPPNAME` apply where the URL does not
    /// say; `PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE` and `~/.pgpass` do
    /// not (the URL names the server, and the user is required).
    ///
    /// Fails naming `key` when the URL is not a single-host Postgres JDBC URL
    /// or carries a parameter Tidemark cannot honour; the URL in the message
    /// has its password replaced by `***`.
    pub fn from_jdbc(
        key: &str,
        url: &str,
        user: Option<&str>,
        password: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let shown = redact_jdbc_url(url);
        let invalid = |why: &str| ConfigError::invalid(key, &shown, why);
        let rest = url.strip_prefix("jdbc:postgresql:").ok_or_else(|| {
            invalid("expected a JDBC URL like jdbc:postgresql://host:5432/database")
        })?;
        let rest = rest.strip_prefix("//").ok_or_else(|| {
            invalid(
                "expected a host after jdbc:postgresql:, like jdbc:postgresql://host:5432/database",
            )
        })?;
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        if authority.rsplit('@').next().unwrap_or("").contains(',') {
            return Err(invalid("several hosts are not supported; name one host"));
        }
        let parsed = url::Url::parse(&format!("postgres://{rest}"))
            .map_err(|e| invalid(&format!("not a valid URL: {e}")))?;
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| invalid("the URL names no host"))?;
        let database = percent_decode(parsed.path().trim_start_matches('/'));
        if database.is_empty() {
            return Err(invalid(
                "the URL names no database; add it after the host, like jdbc:postgresql://host:5432/streaming_example",
            ));
        }
        let mut options = PgConnectOptions::new_without_pgpass()
            .host(host)
            .port(parsed.port().unwrap_or(5432))
            .database(&database);
        let mut url_user = None;
        let mut url_password = None;
        for (name, value) in parsed.query_pairs() {
            match name.as_ref() {
                "user" => url_user = Some(value.into_owned()),
                "password" => url_password = Some(value.into_owned()),
                "sslmode" => {
                    let mode = PgSslMode::from_str(&value).map_err(|_| {
                        invalid(&format!(
                            "sslmode `{value}` is not one of disable, allow, prefer, require, verify-ca, verify-full"
                        ))
                    })?;
                    options = options.ssl_mode(mode);
                }
                "sslrootcert" => options = options.ssl_root_cert(value.as_ref()),
                "sslcert" => options = options.ssl_client_cert(value.as_ref()),
                "sslkey" => options = options.ssl_client_key(value.as_ref()),
                "ApplicationName" | "applicationName" => options = options.application_name(&value),
                other => {
                    // A parameter name is not a secret, but a mistyped
                    // `password` might be followed by one: only its name shows.
                    return Err(invalid(&format!(
                        "the JDBC parameter `{other}` is not supported; Tidemark honours {}",
                        JDBC_PARAMS.join(", ")
                    )));
                }
            }
        }
        let userinfo_user =
            (!parsed.username().is_empty()).then(|| percent_decode(parsed.username()));
        let userinfo_password = parsed.password().map(percent_decode);
        let user = user
            .map(str::to_owned)
            .or(url_user)
            .or(userinfo_user)
            .ok_or_else(|| ConfigError::missing("connection.user", "the JDBC URL names no user"))?;
        options = options.username(&user);
        let display = format!("{user}@{host}:{}/{database}", parsed.port().unwrap_or(5432));
        let replication = ReplicationAuth::new(
            password
                .map(str::to_owned)
                .or(url_password)
                .or(userinfo_password),
            Some(&parsed),
        );
        if let Some(password) = &replication.password {
            options = options.password(password);
        }
        Ok(Self {
            options: with_session_settings(options),
            display,
            replication,
            credentials: format!("the user and password of {key} (or PGPASSWORD)"),
            missing_database: MISSING_DATABASE,
        })
    }

    /// Builds a target from a libpq-style URL (`postgres://user:pw@host/db`),
    /// as `DATABASE_URL` holds it.
    ///
    /// Fails naming `key` when the URL does not parse.
    pub fn from_url(key: &str, url: &str) -> Result<Self, ConfigError> {
        let options = PgConnectOptions::from_str(url).map_err(|e| {
            ConfigError::invalid(
                key,
                &redact_url(url),
                format!("expected a URL like postgres://user:password@host:5432/database ({e})"),
            )
        })?;
        let display = format!(
            "{}@{}:{}/{}",
            options.get_username(),
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("(default)")
        );
        let parsed = url::Url::parse(url).ok();
        let replication = ReplicationAuth::new(
            query_param(parsed.as_ref(), "password").or_else(|| {
                parsed
                    .as_ref()
                    .and_then(|u| u.password())
                    .map(percent_decode)
            }),
            parsed.as_ref(),
        );
        Ok(Self {
            options: with_session_settings(options),
            display,
            replication,
            credentials: format!("the user and password in {key} (or PGPASSWORD)"),
            missing_database: MISSING_DATABASE,
        })
    }

    /// Names where the calling program takes the user and password from
    /// (its flags, keys and environment variables), for the message of a
    /// refused login: `check {credentials}`.
    pub fn with_credentials(mut self, credentials: impl Into<String>) -> Self {
        self.credentials = credentials.into();
        self
    }

    /// Says what to do when the database does not exist, for a program
    /// whose database schema-init does not create (pg-replay's target):
    /// `the database does not exist: {hint}`.
    pub fn with_missing_database(mut self, hint: &'static str) -> Self {
        self.missing_database = hint;
        self
    }

    /// Where a replication connection to this server goes; `None` for a
    /// Unix socket, which the replication client here does not reach.
    pub fn replication_target(&self) -> Option<ReplicationTarget> {
        if self.options.get_socket().is_some() {
            return None;
        }
        Some(ReplicationTarget {
            host: self.options.get_host().to_owned(),
            port: self.options.get_port(),
            user: self.options.get_username().to_owned(),
            password: self.replication.password.clone().unwrap_or_default(),
            database: self.database().unwrap_or("postgres").to_owned(),
            ssl_mode: self.options.get_ssl_mode(),
            ssl_root_cert: self.replication.ssl_root_cert.clone(),
            ssl_cert_key: self
                .replication
                .ssl_cert
                .clone()
                .zip(self.replication.ssl_key.clone()),
        })
    }

    /// The same server and user with `password` (from a password file),
    /// which wins over the URL's.
    pub fn with_password(&self, password: &str) -> Self {
        let mut replication = self.replication.clone();
        replication.password = Some(password.to_owned());
        Self {
            options: self.options.clone().password(password),
            display: self.display.clone(),
            replication,
            credentials: self.credentials.clone(),
            missing_database: self.missing_database,
        }
    }

    /// The same server, another database.
    pub fn with_database(&self, database: &str) -> Self {
        let display = match self.display.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{database}"),
            None => format!("{}/{database}", self.display),
        };
        Self {
            options: self.options.clone().database(database),
            display,
            replication: self.replication.clone(),
            credentials: self.credentials.clone(),
            missing_database: self.missing_database,
        }
    }

    /// The database this target names.
    pub fn database(&self) -> Option<&str> {
        self.options.get_database()
    }

    /// Opens a small pool, retrying while the server is unreachable (it may be
    /// starting) for up to `patience`.
    ///
    /// Fails at once on errors waiting cannot cure (a wrong password, a
    /// missing database, no permission) with a message that says what to
    /// change. For one-shot programs and tests: a long-running program
    /// passes its shutdown token to [`Self::connect_until`].
    pub async fn connect(
        &self,
        max_connections: u32,
        patience: Duration,
    ) -> anyhow::Result<PgPool> {
        self.connect_until(max_connections, patience, &CancellationToken::new())
            .await?
            .ok_or_else(|| anyhow::anyhow!("stopped while connecting to postgres at {self}"))
    }

    /// Like [`Self::connect`], but returns `None` as soon as `shutdown` is
    /// cancelled, during a connection attempt or between attempts, so a
    /// SIGTERM is obeyed while Postgres is still coming up. Any `patience`
    /// is safe: one too long for a deadline (`Duration::MAX`) waits without
    /// limit.
    ///
    /// Fails like [`Self::connect`].
    pub async fn connect_until(
        &self,
        max_connections: u32,
        patience: Duration,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<PgPool>> {
        let deadline = tokio::time::Instant::now().checked_add(patience);
        let mut delay = Duration::from_millis(200);
        let mut logged = false;
        loop {
            // sqlx retries a refused connection itself until the acquire
            // timeout: no longer than the patience left.
            let left = deadline.map_or(Duration::from_secs(10), |deadline| {
                deadline.saturating_duration_since(tokio::time::Instant::now())
            });
            let attempt = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(left.clamp(Duration::from_millis(500), Duration::from_secs(10)))
                .connect_with(self.options.clone());
            let result = tokio::select! {
                result = attempt => result,
                _ = shutdown.cancelled() => return Ok(None),
            };
            let more_time =
                deadline.is_none_or(|deadline| tokio::time::Instant::now() + delay < deadline);
            match result {
                Ok(pool) => {
                    if logged {
                        tracing::info!(postgres = %self, "connected to postgres");
                    }
                    return Ok(Some(pool));
                }
                Err(e) if is_transient(&e) && more_time => {
                    if !logged {
                        tracing::warn!(postgres = %self, error = %e, "postgres unreachable, retrying");
                        logged = true;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return Ok(None),
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) if is_transient(&e) => {
                    return Err(explain(e, self)
                        .context(format!("postgres still unreachable after {patience:?}")))
                }
                Err(e) => return Err(explain(e, self)),
            }
        }
    }
}

/// The session settings every connection Tidemark opens runs with.
///
/// `search_path` holds only `pg_catalog` and, last, `pg_temp`: no object that
/// a less privileged role can create (a `public.format(text, text, text)`
/// that matches a call better than `pg_catalog.format`, a `pg_temp` operator)
/// is ever resolved by a Tidemark session, and Tidemark's own SQL names every
/// other object schema-qualified. The rest fix the text form of every value
/// (`common::codec` parses values under exactly these settings), whatever the
/// server's, the database's or the role's defaults are.
///
/// `row_security = off`: a table whose row-level security policies apply to
/// Tidemark's role is an error ("query would be affected by row-level
/// security policy") instead of a silently partial snapshot, poll or verify,
/// and no policy expression of a table owner's runs in a Tidemark session.
/// Grant the role `BYPASSRLS` (or use the table's owner) to read such a
/// table.
///
/// They go to the server as `-c` options in the startup packet, which win
/// over `ALTER ROLE/DATABASE ... SET` and `postgresql.conf`, and over a
/// user's `PGOPTIONS` or `options=`, which come before them in the string.
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("search_path", "pg_catalog, pg_temp"),
    ("DateStyle", "ISO"),
    ("IntervalStyle", "iso_8601"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    ("lc_monetary", "C"),
    ("client_encoding", "UTF8"),
    ("standard_conforming_strings", "on"),
    ("row_security", "off"),
];

/// [`SESSION_SETTINGS`] as a startup `options` string (`-c name=value ...`,
/// spaces and backslashes escaped as Postgres splits it), for connections
/// that sqlx does not make: `logical` mode's replication connection takes it
/// as its options.
pub fn session_options() -> String {
    SESSION_SETTINGS
        .iter()
        .map(|(name, value)| format!("-c {name}={}", escape_option(value)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Escapes a value for the startup `options` string, which Postgres splits
/// on unescaped whitespace.
fn escape_option(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c == '\\' || c.is_whitespace() {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Applies [`SESSION_SETTINGS`], and a name that shows in
/// `pg_stat_activity`.
///
/// sqlx sends `DateStyle`, `TimeZone`, `client_encoding` and
/// `extra_float_digits` as startup parameters of their own, which Postgres
/// applies after the `-c` options: `extra_float_digits` is therefore also set
/// there (sqlx's default is 2); sqlx's other three agree with ours.
fn with_session_settings(options: PgConnectOptions) -> PgConnectOptions {
    let options = options
        .options(
            SESSION_SETTINGS
                .iter()
                .map(|(name, value)| (*name, escape_option(value))),
        )
        .extra_float_digits(3);
    if options.get_application_name().is_none() {
        options.application_name("tidemark")
    } else {
        options
    }
}

/// Whether waiting may cure a connection error (the server is down or
/// restarting) as opposed to a configuration error.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            // admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections,
            // serialization/deadlock failures are retried by re-running the batch.
            Some("57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01")
        ),
        sqlx::Error::Protocol(_) => false,
        sqlx::Error::Tls(_) => false,
        _ => false,
    }
}

/// Turns a connection error into one that says what to change.
pub fn explain(e: sqlx::Error, target: &PgTarget) -> anyhow::Error {
    let hint = match &e {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("28P01") | Some("28000") => {
                format!(
                    "the password or user is wrong: check {}",
                    target.credentials
                )
            }
            Some("3D000") => format!("the database does not exist: {}", target.missing_database),
            Some("42501") => {
                "permission denied: grant the user access, or connect as the table's owner".into()
            }
            _ => String::new(),
        },
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => {
            "the server is unreachable: check the host and port, and that Postgres runs".into()
        }
        sqlx::Error::Tls(_) => {
            "the TLS handshake failed: check sslmode and the certificates".into()
        }
        _ => String::new(),
    };
    if hint.is_empty() {
        anyhow::anyhow!("cannot connect to postgres at {target}: {e}")
    } else {
        anyhow::anyhow!("cannot connect to postgres at {target}: {e}; {hint}")
    }
}

/// Replaces every password in a connection URL with `***`: the userinfo's
/// (`postgres://user:***@host`, also when the password holds a raw `@` or
/// `/`), query parameters whose (percent-decoded) name is a secret
/// (`password`, `sslpassword`), and, in a libpq `key=value` string, the
/// value of such a key. Safe on any text: what is not recognised stays.
pub fn redact_url(url: &str) -> String {
    use crate::secret::is_secret_key;
    let scheme_end = match url.find("://") {
        Some(i) => i + 3,
        None if url.starts_with("jdbc:postgresql:") => "jdbc:postgresql:".len(),
        None if url.contains('=') && !url.contains('?') => return redact_keyword_string(url),
        None => 0,
    };
    let (scheme, rest) = url.split_at(scheme_end);
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let mut out = String::with_capacity(url.len());
    out.push_str(scheme);
    match before_query.rfind('@') {
        Some(at) if before_query[..at].contains(':') => {
            let colon = before_query.find(':').unwrap_or(at);
            out.push_str(&before_query[..colon]);
            out.push_str(":***");
            out.push_str(&before_query[at..]);
        }
        _ => out.push_str(before_query),
    }
    if let Some(query) = query {
        out.push('?');
        let redacted: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if is_secret_key(&percent_decode(k)) => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        out.push_str(&redacted.join("&"));
    }
    out
}

/// [`redact_url`], and the value of every query parameter that is not a
/// known harmless one: a mistyped `passwort=` is refused, and its value
/// must not be shown in the refusal.
fn redact_jdbc_url(url: &str) -> String {
    let redacted = redact_url(url);
    let Some((base, query)) = redacted.split_once('?') else {
        return redacted;
    };
    let query: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if (!JDBC_PARAMS.contains(&k) || k == "password") && v != "***" => {
                format!("{k}=***")
            }
            _ => kv.to_owned(),
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

/// [`redact_url`] for libpq's `host=h password=secret` form: the value of
/// a secret keyword (to the next space, or to the end when it is quoted).
fn redact_keyword_string(text: &str) -> String {
    use crate::secret::is_secret_key;
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(eq) = rest.find('=') {
        let (before, after) = rest.split_at(eq);
        let keyword = before
            .rsplit(|c: char| c.is_whitespace())
            .next()
            .unwrap_or("");
        out.push_str(before);
        out.push('=');
        let after = &after[1..];
        if is_secret_key(keyword) {
            out.push_str("***");
            rest = if after.starts_with(['\'', '"']) {
                ""
            } else {
                after
                    .find(char::is_whitespace)
                    .map_or("", |end| &after[end..])
            };
        } else {
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn query_param(url: Option<&url::Url>, name: &str) -> Option<String> {
    url.and_then(|u| {
        u.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    })
}

/// Decodes `%XX` escapes (a URL's password), leaving anything else as is.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// Names and quoting moved to `names`; kept here for the callers of 0.1.
pub use crate::names::{publication_name, quote_ident, short_hashed};

/// A table name as the user wrote it: `table` or `schema.table`, optionally
/// with double quotes around either part.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    /// The schema; `public` when not given.
    pub schema: String,
    /// The table.
    pub name: String,
}

impl TableName {
    /// Parses `table`, `schema.table`, `"Odd.Name"` or `schema."Odd Name"`.
    /// Unquoted parts are folded to lower case, as Postgres does.
    ///
    /// Fails when the name is empty or its quotes do not balance.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut chars = text.trim().chars().peekable();
        let mut cur = String::new();
        let mut quoted_part = false;
        while let Some(c) = chars.next() {
            match c {
                '"' => {
                    quoted_part = true;
                    loop {
                        match chars.next() {
                            Some('"') if chars.peek() == Some(&'"') => {
                                chars.next();
                                cur.push('"');
                            }
                            Some('"') => break,
                            Some(c) => cur.push(c),
                            None => {
                                return Err(format!("unbalanced quotes in table name `{text}`"))
                            }
                        }
                    }
                }
                '.' => {
                    parts.push(std::mem::take(&mut cur));
                    quoted_part = false;
                }
                c if quoted_part => {
                    return Err(format!("unexpected `{c}` after a quoted part in `{text}`"))
                }
                c => cur.extend(c.to_lowercase()),
            }
        }
        parts.push(cur);
        if parts.iter().any(|p| p.is_empty()) {
            return Err(format!(
                "`{text}` is not a table name like table or schema.table"
            ));
        }
        match parts.len() {
            1 => Ok(Self {
                schema: "public".into(),
                name: parts.remove(0),
            }),
            2 => Ok(Self {
                name: parts.remove(1),
                schema: parts.remove(0),
            }),
            _ => Err(format!("`{text}` has too many dots; write schema.table")),
        }
    }

    /// `"schema"."table"`, safe to put in SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jdbc_urls_are_parsed_and_the_password_is_hidden() {
        let t = PgTarget::from_jdbc(
            "connection.url",
            "jdbc:postgresql://postgres:5432/streaming_example",
            Some("postgres"),
            Some("secret"),
        )
        .unwrap();
        assert_eq!(t.display, "postgres@postgres:5432/streaming_example");
        assert!(!format!("{t:?}").contains("secret"));
        assert_eq!(t.options.get_host(), "postgres");
        assert_eq!(t.options.get_database(), Some("streaming_example"));
    }

    #[test]
    fn every_connection_gets_the_session_settings() {
        assert_eq!(
            session_options(),
            "-c search_path=pg_catalog,\\ pg_temp -c DateStyle=ISO -c IntervalStyle=iso_8601 \
             -c TimeZone=UTC -c extra_float_digits=3 -c bytea_output=hex -c lc_monetary=C \
             -c client_encoding=UTF8 -c standard_conforming_strings=on -c row_security=off"
        );
        let jdbc = PgTarget::from_jdbc("connection.url", "jdbc:postgresql://h/db", Some("u"), None)
            .unwrap();
        let url = PgTarget::from_url("DATABASE_URL", "postgres://u@h/db").unwrap();
        for t in [&jdbc, &url, &url.with_database("other")] {
            assert_eq!(t.options.get_options(), Some(session_options().as_str()));
        }
    }

    /// A port nothing listens on.
    fn closed_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn waiting_for_postgres_ends_on_shutdown_whatever_the_patience() {
        let target = PgTarget::from_url(
            "DATABASE_URL",
            &format!("postgres://u:p@127.0.0.1:{}/db", closed_port()),
        )
        .unwrap();
        for patience in [
            Duration::MAX,
            Duration::from_secs(u64::MAX / 2),
            Duration::from_secs(3600),
        ] {
            let shutdown = CancellationToken::new();
            let cancel = shutdown.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                cancel.cancel();
            });
            let started = std::time::Instant::now();
            let pool = tokio::time::timeout(
                Duration::from_secs(5),
                target.connect_until(1, patience, &shutdown),
            )
            .await
            .expect("returns within seconds of the shutdown")
            .expect("a shutdown is not an error");
            assert!(pool.is_none());
            assert!(started.elapsed() >= Duration::from_millis(300));
        }
    }

    #[tokio::test]
    async fn an_unreachable_server_is_an_error_after_the_patience() {
        let target = PgTarget::from_url(
            "DATABASE_URL",
            &format!("postgres://u:p@127.0.0.1:{}/db", closed_port()),
        )
        .unwrap();
        let err = target
            .connect(1, Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("still unreachable after 500ms"),
            "{err:#}"
        );
    }

    #[test]
    fn malformed_jdbc_urls_name_the_key() {
        for url in [
            "postgres://x/y",
            "jdbc:postgresql:db",
            "jdbc:postgresql://h1,h2/db",
            "jdbc:postgresql://host:5432/",
            "jdbc:postgresql://host/db?loginTimeout=3",
        ] {
            let err = PgTarget::from_jdbc("connection.url", url, Some("u"), None)
                .unwrap_err()
                .to_string();
            assert!(err.contains("connection.url"), "{url}: {err}");
        }
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        for (url, want) in [
            ("postgres://u:pw@h:1/db", "postgres://u:***@h:1/db"),
            (
                "jdbc:postgresql://h/db?user=u&password=pw",
                "jdbc:postgresql://h/db?user=u&password=***",
            ),
            (
                "jdbc:postgresql://u:p@w/x@h/db",
                "jdbc:postgresql://u:***@h/db",
            ),
            (
                "jdbc:postgresql://h/db?pass%77ord=pw&sslpassword=pw&Password=pw",
                "jdbc:postgresql://h/db?pass%77ord=***&sslpassword=***&Password=***",
            ),
            ("postgres://u@h/db", "postgres://u@h/db"),
            (
                "host=h password=pw dbname=d",
                "host=h password=*** dbname=d",
            ),
            ("host=h password='p w' dbname=d", "host=h password=***"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    /// Issue 10.3: no message about a JDBC URL shows its password, whichever
    /// part of the URL is wrong.
    #[test]
    fn no_jdbc_url_error_shows_the_password() {
        for url in [
            "postgresql://u:hunter2@h/db",
            "jdbc:postgresql:u:hunter2@h/db",
            "jdbc:postgresql://h/?password=hunter2",
            "jdbc:postgresql://u:hunter2@h/",
            "jdbc:postgresql://u:hunter2@h1,h2/db",
            "jdbc:postgresql://h1,h2/db?password=hunter2",
            "jdbc:postgresql://h/db?password=hunter2&sslmode=sometimes",
            "jdbc:postgresql://u:hunter2@h/db?sslmode=sometimes",
            "jdbc:postgresql://u:hunter2@h:99999/db",
            "jdbc:postgresql://u:hun/ter2@h/db",
            "jdbc:postgresql://u:hunter2@/db",
            "jdbc:postgresql://h/db?password=hunter2&loginTimeout=3",
            "jdbc:postgresql://h/db?passwort=hunter2",
        ] {
            let err = PgTarget::from_jdbc("connection.url", url, Some("u"), None)
                .err()
                .unwrap_or_else(|| panic!("{url} is accepted"))
                .to_string();
            assert!(err.contains("connection.url"), "{url}: {err}");
            assert!(
                !err.contains("hunter2") && !err.contains("ter2"),
                "{url}: {err}"
            );
        }
        let err = PgTarget::from_url("DATABASE_URL", "postgres://u:hunter2@h:99999/db")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn the_userinfo_of_a_jdbc_url_gives_user_and_password() {
        let t = PgTarget::from_jdbc(
            "connection.url",
            "jdbc:postgresql://us%40er:p%3Aw%2F@h:6432/my%20db",
            None,
            None,
        )
        .unwrap();
        assert_eq!(t.options.get_username(), "us@er");
        assert_eq!(t.options.get_database(), Some("my db"));
        let r = t.replication_target().unwrap();
        assert_eq!((r.password.as_str(), r.port), ("p:w/", 6432));
        assert!(!format!("{t:?} {t}").contains("p:w"));
        // The keys, then the URL's parameters, win over the userinfo.
        let t = PgTarget::from_jdbc(
            "connection.url",
            "jdbc:postgresql://a:b@h/db?user=c&password=d",
            Some("e"),
            None,
        )
        .unwrap();
        assert_eq!(t.options.get_username(), "e");
        assert_eq!(t.replication_target().unwrap().password, "d");
    }

    #[test]
    fn table_names_fold_and_quote() {
        assert_eq!(
            TableName::parse("Streaming_Update_Table").unwrap().quoted(),
            r#""public"."streaming_update_table""#
        );
        let odd = TableName::parse(r#"s."We""ird Name""#).unwrap();
        assert_eq!(odd.name, r#"We"ird Name"#);
        assert_eq!(odd.quoted(), r#""s"."We""ird Name""#);
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse("\"abc").is_err());
    }
}
