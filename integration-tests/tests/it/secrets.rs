//! Secrets as users give them (issue 10.3): from files and the
//! environment, in a JDBC URL's userinfo, and on the command line, where
//! the programs warn; and no output of a program ever holds one.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tidemark_common::config::ConnectorConfig;

use crate::cli::{sigterm_and_wait, KillOnDrop};
use crate::support::*;

async fn exec(pool: &sqlx::PgPool, sql: &str) {
    sqlx::query(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// A login role of the test's own, with a password that no other text
/// holds, so every output can be searched for it.
struct Role {
    name: String,
    password: String,
}

impl Role {
    async fn create(pool: &sqlx::PgPool, password: &str) -> Self {
        let role = Self {
            name: unique("tm_role_"),
            password: format!("{password}{}", unique("")),
        };
        exec(
            pool,
            &format!(
                "create role {} login superuser password '{}'",
                role.name, role.password
            ),
        )
        .await;
        role
    }

    /// Drops the role once nothing of it is left; best effort, since a
    /// failed test may leave a session behind.
    async fn drop(self, pool: &sqlx::PgPool) {
        let _ = sqlx::query(&format!("drop role if exists {}", self.name))
            .execute(pool)
            .await;
    }
}

/// The fixture's source connector for `role`, without any password.
fn connector_for(fx: &Fixture, role: &Role) -> ConnectorConfig {
    let mut c = fx.source_connector();
    c.props.insert("connection.user".into(), role.name.clone());
    c.props.remove("connection.password");
    c
}

fn write_connector(path: &Path, c: &ConnectorConfig) {
    let config: serde_json::Map<String, serde_json::Value> = c
        .props
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    std::fs::write(
        path,
        serde_json::json!({"name": c.name, "config": config}).to_string(),
    )
    .unwrap();
}

/// A program running as a process, its stdout and stderr read line by
/// line on threads.
struct Program {
    child: KillOnDrop,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Program {
    fn start(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(line);
            }
        });
        Self {
            child: KillOnDrop(child),
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits up to 60 s for a line that contains `want`.
    fn wait_for(&mut self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(want);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => panic!(
                    "no line with {want:?} within 60 s:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Stops it with SIGTERM (exit 0 expected) and returns all it wrote.
    fn stop(mut self) -> String {
        sigterm_and_wait(&mut self.child.0);
        self.seen.extend(self.lines.try_iter());
        // The reading threads end with the pipes; take what they still had.
        std::thread::sleep(Duration::from_millis(100));
        self.seen.extend(self.lines.try_iter());
        self.seen.join("\n")
    }
}

fn pg_source(fx: &Fixture, connector: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_it-pg-source"));
    cmd.arg("--connector-config")
        .arg(connector)
        .args(["--offsets-topic", &format!("{}offsets", fx.prefix)])
        .args(["--bootstrap-servers", &bootstrap()])
        .args(["--http-addr", "off"])
        .env_remove("PGPASSWORD")
        .env_remove("TIDEMARK_CONNECTION_PASSWORD");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_source_takes_its_password_from_a_file_and_warns_when_given_one_on_the_command_line() {
    let fx = Fixture::changelog(schema_init::TriggerLevel::Row).await;
    let role = Role::create(&fx.pool, "Sekr3t-file-").await;
    let connector = fx.dir.path().join("source.json");
    write_connector(&connector, &connector_for(&fx, &role));
    let password_file = fx.dir.path().join("password");
    std::fs::write(&password_file, format!("{}\n", role.password)).unwrap();

    let mut from_file = Program::start(
        pg_source(&fx, &connector)
            .arg("--connection-password-file")
            .arg(&password_file),
    );
    from_file.wait_for("committed");
    let out = from_file.stop();
    assert!(!out.contains("command line"), "{out}");
    assert!(!out.contains(&role.password), "{out}");

    let mut from_flag =
        Program::start(pg_source(&fx, &connector).args(["--connection-password", &role.password]));
    from_flag.wait_for("is given on the command line");
    let out = from_flag.stop();
    assert!(
        out.contains("--connection-password is given on the command line, where every local user can read it (ps); use --connection-password-file FILE or the environment variable TIDEMARK_CONNECTION_PASSWORD"),
        "{out}"
    );
    assert!(!out.contains(&role.password), "{out}");
    role.drop(&fx.pool).await;
}

/// sqlx reads `PGPASSWORD` for its pool; logical mode's replication
/// connection must find the same password, or the stream never opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_source_in_logical_mode_takes_pgpassword_for_both_its_connections() {
    let fx = Fixture::logical().await;
    let role = Role::create(&fx.pool, "Sekr3t-env-").await;
    let connector = fx.dir.path().join("source.json");
    write_connector(&connector, &connector_for(&fx, &role));

    let mut source = Program::start(pg_source(&fx, &connector).env("PGPASSWORD", &role.password));
    source.wait_for("replication stream opened");
    exec(
        &fx.pool,
        "insert into streaming_update_table (data) values ('through the slot')",
    )
    .await;
    source.wait_for("changes committed");
    let out = source.stop();
    assert!(!out.contains(&role.password), "{out}");
    fx.drop_slot().await;
    role.drop(&fx.pool).await;
}

/// `jdbc:postgresql://user:password@host/db` (percent-encoded) is honoured:
/// issue 10.3 found its password silently ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jdbc_url_with_userinfo_connects_as_its_user_with_its_password() {
    let fx = Fixture::changelog(schema_init::TriggerLevel::Row).await;
    let role = Role::create(&fx.pool, "S@k:r/3t-").await;
    let url = url::Url::parse(&database_url()).unwrap();
    let encoded: String = url::form_urlencoded::byte_serialize(role.password.as_bytes()).collect();
    let mut c = connector_for(&fx, &role);
    c.props.remove("connection.user");
    c.props.insert(
        "connection.url".into(),
        format!(
            "jdbc:postgresql://{}:{encoded}@{}:{}/{}",
            role.name,
            url.host_str().unwrap(),
            url.port().unwrap_or(5432),
            fx.database
        ),
    );
    let source = fx.start_source_from(&c).ready().await;
    source
        .stop()
        .await
        .expect("pg-source ran as the URL's user");
    role.drop(&fx.pool).await;
}

/// Every message that shows a JDBC URL shows it without its password,
/// whichever part of the URL is wrong, and the program warns about the
/// password on its command line without showing it either.
#[test]
fn config_errors_never_show_the_urls_password() {
    let secret = format!("Sekr3t-url-{}", unique(""));
    for url in [
        format!("jdbc:postgresql://h1,h2/db?user=u&password={secret}"),
        format!("jdbc:postgresql://u:{secret}@h1,h2/db"),
        format!("jdbc:postgresql://h/?user=u&password={secret}"),
        format!("jdbc:postgresql://u:{secret}@h/"),
        format!("jdbc:postgresql://h/db?user=u&password={secret}&sslmode=sometimes"),
        format!("jdbc:postgresql://u:{secret}@h/db?sslmode=sometimes"),
        format!("jdbc:postgresql://u:{secret}@h:99999/db"),
        format!("jdbc:postgresql://h/db?user=u&passwort={secret}"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_it-pg-source"))
            .args([
                "--name",
                "secrets",
                "--mode",
                "changelog",
                "--connection-url",
                &url,
            ])
            .args(["--bootstrap-servers", &bootstrap()])
            .args(["--http-addr", "off"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{url}: {stderr}");
        assert!(stderr.contains("connection.url"), "{url}: {stderr}");
        assert!(
            !stdout.contains(&secret) && !stderr.contains(&secret),
            "{url}:\n{stdout}\n{stderr}"
        );
    }
}

#[tokio::test]
async fn schema_init_takes_its_password_from_a_file_or_pgpassword_and_warns_about_one_in_its_url_flag(
) {
    let admin = user_pool("postgres", 1).await;
    let role = Role::create(&admin, "Sekr3t-init-").await;
    let url = url::Url::parse(&database_url()).unwrap();
    let without_password = format!(
        "postgres://{}@{}:{}/postgres",
        role.name,
        url.host_str().unwrap(),
        url.port().unwrap_or(5432)
    );
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, &role.password).unwrap();
    let with_password = format!(
        "postgres://{}:{}@{}:{}/postgres",
        role.name,
        role.password,
        url.host_str().unwrap(),
        url.port().unwrap_or(5432)
    );
    let mut databases = Vec::new();
    for how in ["file", "PGPASSWORD", "flag"] {
        let database = unique("tm_secret_");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_it-schema-init"));
        cmd.args(["--database", &database])
            .env_remove("PGPASSWORD")
            .env("DATABASE_URL", &without_password);
        match how {
            "file" => cmd.arg("--database-password-file").arg(&password_file),
            "PGPASSWORD" => cmd.env("PGPASSWORD", &role.password),
            _ => cmd.args(["--database-url", &with_password]),
        };
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{how}: {text}");
        assert!(!text.contains(&role.password), "{how}: {text}");
        assert_eq!(
            text.contains("the password in --database-url's URL is given on the command line"),
            how == "flag",
            "{how}: {text}"
        );
        databases.push(database);
    }
    for database in databases {
        exec(&admin, &format!("drop database {database} with (force)")).await;
    }
    role.drop(&admin).await;
}

/// `--kafka-property-file` is read (here it alone names the reachable
/// broker), and a secret given with `--kafka-property` is warned about,
/// naming the file flag, and never shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sink_takes_kafka_properties_from_a_file_and_warns_about_a_secret_on_the_command_line()
{
    let fx = Fixture::changelog(schema_init::TriggerLevel::Row).await;
    let source = fx.start_source_with(&[]).ready().await;
    let secret = format!("Sekr3t-kafka-{}", unique(""));
    let properties = fx.dir.path().join("client.properties");
    std::fs::write(
        &properties,
        format!(
            "# as Kafka's client.properties\nbootstrap.servers={}\nsasl.password={secret}\n",
            bootstrap()
        ),
    )
    .unwrap();
    let sink = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_it-file-sink"));
        cmd.args(["--name", &fx.sink_name, "--topics", &fx.topic()])
            .arg("--file")
            .arg(fx.file())
            .args(["--bootstrap-servers", "127.0.0.1:1"])
            .arg("--kafka-property-file")
            .arg(&properties)
            .args(["--http-addr", "off"])
            .args(extra);
        cmd
    };
    let from_file = Program::start(&mut sink(&[]));
    wait_for_events(&fx.file(), 1, Duration::from_secs(60)).await;
    let out = from_file.stop();
    assert!(!out.contains(&secret), "{out}");
    assert!(!out.contains("command line"), "{out}");

    let mut from_flag = Program::start(&mut sink(&[
        "--kafka-property",
        &format!("sasl.password={secret}"),
    ]));
    from_flag.wait_for("is given on the command line");
    let out = from_flag.stop();
    assert!(
        out.contains("--kafka-property sasl.password=*** is given on the command line, where every local user can read it (ps); use --kafka-property-file FILE"),
        "{out}"
    );
    assert!(!out.contains(&secret), "{out}");
    source.stop().await.unwrap();
}
