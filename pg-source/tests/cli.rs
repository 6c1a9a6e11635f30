//! pg-source as a user runs it: the binary, its exit code and messages.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn pg_source() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pg-source"))
}

fn connector_file(dir: &tempfile::TempDir, extra: &str) -> std::path::PathBuf {
    let path = dir.path().join("pg.source.connector.json");
    std::fs::write(
        &path,
        format!(
            r#"{{"name": "cli", "config": {{
                "connector.class": "io.confluent.connect.jdbc.JdbcSourceConnector",
                "connection.url": "jdbc:postgresql://127.0.0.1:1/streaming_example",
                "connection.user": "postgres", "connection.password": "hunter2",
                "timestamp.column.name": "last_updated", "incrementing.column.name": "id"
                {extra}}}}}"#
        ),
    )
    .unwrap();
    path
}

#[test]
fn an_unknown_key_exits_non_zero_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = connector_file(&dir, r#", "topic.prefx": "x.""#);
    let out = pg_source()
        .arg("--connector-config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown config key `topic.prefx`; did you mean `topic.prefix`?"),
        "{err}"
    );
    assert!(!err.contains("hunter2"));
}

#[test]
fn help_explains_and_never_shows_the_password() {
    let out = pg_source()
        .arg("--help")
        .env("TIDEMARK_CONNECTION_PASSWORD", "hunter2")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--connector-config"), "{help}");
    assert!(help.contains("poll.interval.ms"), "{help}");
    assert!(!help.contains("hunter2"), "{help}");
}

#[test]
fn sigterm_stops_it_cleanly() {
    let (Ok(url), Ok(kafka)) = (
        std::env::var("DATABASE_URL"),
        std::env::var("KAFKA_BOOTSTRAP_SERVERS"),
    ) else {
        panic!("DATABASE_URL and KAFKA_BOOTSTRAP_SERVERS are not set: run `eval \"$(dev/services up)\"` first");
    };
    let u = url::Url::parse(&url).unwrap();
    let db = format!("tm_cli_src_{}", std::process::id());
    let psql = |db: &str, sql: &str| {
        let out = Command::new("psql")
            .arg(format!("{}/{db}", url.rsplit_once('/').unwrap().0))
            .args(["-v", "ON_ERROR_STOP=1", "-Atc", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    psql("postgres", &format!("create database {db}"));
    psql(
        &db,
        "create table t (id serial primary key, last_updated timestamp not null default now())",
    );
    psql(&db, "insert into t default values");
    let dir = tempfile::tempdir().unwrap();
    let file = connector_file(&dir, "");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = pg_source()
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .arg("--connector-config")
        .arg(&file)
        .args([
            "--connection-url",
            &format!(
                "jdbc:postgresql://{}:{}/{db}",
                u.host_str().unwrap(),
                u.port().unwrap()
            ),
        ])
        .args(["--connection-password", u.password().unwrap()])
        .args(["--topic-prefix", &format!("{db}.")])
        .args(["--bootstrap-servers", &kafka])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let start = Instant::now();
    loop {
        let line = lines
            .next()
            .expect("pg-source logs until it commits")
            .unwrap();
        if line.contains("batch committed") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no batch within 60 s"
        );
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "did not stop within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|l| l.contains("pg-source stopped")),
        "{rest:?}"
    );
}

/// A plain HTTP/1.0 GET: (status code, body).
fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
