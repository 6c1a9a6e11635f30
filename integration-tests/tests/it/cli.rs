//! The programs as a user runs them: real processes, their exit codes,
//! messages, endpoints and signals.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// A plain HTTP/1.0 GET: (status code, body).
pub(crate) fn http_get(port: u16, path: &str) -> (String, String) {
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

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends SIGTERM and expects exit 0 within 10 s.
/// A child process killed when dropped, so a failing test leaves no
/// program running behind it.
pub(crate) struct KillOnDrop(pub(crate) std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `GET path` until its body contains `want`, for at most 10 s.
fn wait_for_body(port: u16, path: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http_get(port, path);
        if status == "200" && body.contains(want) {
            return;
        }
        assert!(Instant::now() < deadline, "no {want:?} in {path}: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn sigterm_and_wait(child: &mut std::process::Child) {
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
}

#[tokio::test]
async fn schema_init_twice_changes_nothing_the_second_time() {
    let db = unique("tm_cli_");
    for _ in 0..2 {
        let out = Command::new(env!("CARGO_BIN_EXE_it-schema-init"))
            .args(["--database", &db, "--capture", "changelog"])
            .env("DATABASE_URL", database_url())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let pool = user_pool(&db, 1).await;
    let rows: i64 = sqlx::query_scalar("select count(*) from streaming_update_table")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 1, "one sample row");
    let triggers: i64 = sqlx::query_scalar(
        "select count(*) from pg_trigger where tgrelid = 'streaming_update_table'::regclass and not tgisinternal",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        triggers, 5,
        "last_updated, the three statement-level capture triggers (the default) and the TRUNCATE one, once each; no NOTIFY trigger"
    );
}

#[tokio::test]
async fn schema_init_with_a_wrong_password_exits_non_zero_without_echoing_it() {
    let mut u = url::Url::parse(&database_url()).unwrap();
    u.set_password(Some("wrong-secret")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_it-schema-init"))
        .env("DATABASE_URL", u.as_str())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("password or user is wrong"), "{err}");
    assert!(err.contains("DATABASE_URL"), "{err}");
    assert!(err.contains("--database-password-file"), "{err}");
    assert!(!err.contains("connection.password"), "{err}");
    assert!(!err.contains("wrong-secret"), "{err}");
}

/// A refused login names the flags of the program that was refused: pg-replay's
/// own, for its target and for verify's source, not pg-source's keys.
#[tokio::test]
async fn pg_replay_with_a_wrong_password_names_its_own_flags() {
    let mut u = url::Url::parse(&database_url()).unwrap();
    u.set_password(Some("wrong-secret")).unwrap();
    let archive = tempfile::NamedTempFile::new().unwrap();
    let runs: [(&[&str], &str, &str); 2] = [
        (
            &[
                "--input",
                archive.path().to_str().unwrap(),
                "--target-url",
                u.as_str(),
                "--http-addr",
                "off",
            ],
            "--target-url",
            "--target-password-file",
        ),
        (
            &[
                "verify",
                "--source-url",
                u.as_str(),
                "--target-url",
                &database_url(),
                "--table",
                "public.t",
            ],
            "--source-url",
            "--source-password-file",
        ),
    ];
    for (args, url_flag, file_flag) in runs {
        let out = Command::new(env!("CARGO_BIN_EXE_it-pg-replay"))
            .args(args)
            .output()
            .unwrap();
        assert_ne!(out.status.code(), Some(0), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("password or user is wrong"), "{err}");
        assert!(err.contains(url_flag) && err.contains(file_flag), "{err}");
        for other in [
            "connection.password",
            "--connection-password-file",
            "--database-password-file",
            "DATABASE_URL",
        ] {
            assert!(!err.contains(other), "names {other}: {err}");
        }
        assert!(!err.contains("wrong-secret"), "{err}");
    }
}

/// A target database that does not exist: pg-replay says to create it, not
/// to run schema-init (which creates the capture side's database, never a
/// restore's target).
#[tokio::test]
async fn pg_replay_into_a_missing_database_says_to_create_it() {
    let mut u = url::Url::parse(&database_url()).unwrap();
    u.set_path("/tm_no_such_database");
    let archive = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_it-pg-replay"))
        .args([
            "--input",
            archive.path().to_str().unwrap(),
            "--target-url",
            u.as_str(),
            "--http-addr",
            "off",
        ])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not exist") && err.contains("createdb"),
        "{err}"
    );
    assert!(!err.contains("schema-init"), "{err}");
}

/// Every series in a Prometheus scrape belongs to a family with `# HELP`
/// and `# TYPE` lines.
fn every_family_is_described(program: &str, body: &str) {
    let samples: Vec<&str> = body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(!samples.is_empty(), "{program}: no series: {body}");
    for sample in samples {
        let series = sample.split(['{', ' ']).next().unwrap();
        // A histogram's series are its family's name and a suffix.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                series
                    .strip_suffix(suffix)
                    .filter(|f| body.contains(&format!("# TYPE {f} histogram")))
            })
            .unwrap_or(series);
        for line in ["# HELP", "# TYPE"] {
            assert!(
                body.contains(&format!("{line} {family} ")),
                "{program}: no `{line}` for {family}: {body}"
            );
        }
    }
}

/// Runs `promtool check metrics` (Debian's `prometheus` package) on a
/// scrape. Without promtool on this machine the check is left out with a
/// note, except in CI (`CI` set), where `.ci/run` installs it.
fn promtool_check_metrics(program: &str, body: &str) {
    use std::io::Write as _;
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool is not installed; CI must run it (apt-get install prometheus)"
            );
            eprintln!("promtool not installed (apt-get install prometheus): `promtool check metrics` of {program} left out");
            return;
        }
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics of {program}'s /metrics: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_source_and_file_sink_serve_health_and_metrics_and_stop_on_sigterm() {
    let fx = Fixture::changelog(schema_init::TriggerLevel::Row).await;
    let dir = fx.dir.path();
    let c = fx.source_connector();
    let mut config = serde_json::Map::new();
    for (k, v) in &c.props {
        config.insert(k.clone(), serde_json::Value::String(v.clone()));
    }
    let source_file = dir.join("source.json");
    std::fs::write(
        &source_file,
        serde_json::json!({"name": c.name, "config": config}).to_string(),
    )
    .unwrap();
    let (source_port, sink_port) = (free_port(), free_port());
    let mut source = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_it-pg-source"))
            .arg("--connector-config")
            .arg(&source_file)
            .args(["--offsets-topic", &format!("{}offsets", fx.prefix)])
            .args(["--bootstrap-servers", &bootstrap()])
            .args(["--http-addr", &format!("127.0.0.1:{source_port}")])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut sink = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_it-file-sink"))
            .args(["--name", &fx.sink_name, "--topics", &fx.topic()])
            .arg("--file")
            .arg(fx.file())
            .args(["--bootstrap-servers", &bootstrap()])
            .args(["--http-addr", &format!("127.0.0.1:{sink_port}")])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Read on a thread, so a pg-source that logs nothing fails the test
    // instead of blocking it.
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = source.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains("committed") => break,
            Ok(_) => {}
            Err(e) => panic!("pg-source logged no commit within 60 s: {e}"),
        }
    }
    wait_for_events(&fx.file(), 1, Duration::from_secs(30)).await;
    wait_for_body(source_port, "/readyz", "ready");

    let (status, body) = http_get(source_port, "/healthz");
    assert_eq!((status.as_str(), body.as_str()), ("200", "ok\n"));
    // Issue 16.4: ready once the snapshot is sent and the stream read.
    let (status, body) = http_get(source_port, "/readyz");
    assert_eq!((status.as_str(), body.as_str()), ("200", "ready\n"));
    // pg-source counts a batch a moment after it logs its commit.
    wait_for_body(source_port, "/metrics", "tidemark_source_rows_read_total 1");
    // The snapshot's gauges, and the lag histogram once a change is sent.
    let (_, body) = http_get(source_port, "/metrics");
    for series in [
        "tidemark_source_snapshot_running 0",
        "tidemark_source_snapshot_rows_done 1",
        "tidemark_source_snapshot_rows_expected 1",
        "tidemark_source_snapshot_tables_left 0",
    ] {
        assert!(body.contains(series), "no `{series}`: {body}");
    }
    let (status, body) = http_get(source_port, "/metrics");
    assert_eq!(status, "200");
    assert!(body.contains("tidemark_source_batches_total"), "{body}");
    let (status, _) = http_get(sink_port, "/healthz");
    assert_eq!(status, "200");
    let (status, body) = http_get(sink_port, "/readyz");
    assert_eq!((status.as_str(), body.as_str()), ("200", "ready\n"));
    // The line is in the file a moment before the counter counts it.
    wait_for_body(sink_port, "/metrics", "tidemark_sink_lines_written_total 1");
    sqlx::query("update streaming_update_table set data = 'lag' where id = 1")
        .execute(&fx.pool)
        .await
        .unwrap();
    wait_for_body(
        source_port,
        "/metrics",
        "tidemark_source_change_lag_seconds_count 1",
    );
    let (_, body) = http_get(source_port, "/metrics");

    // Issue 10.16: what Prometheus' own checker accepts, every family
    // described, error counters at 0 for every kind before any error.
    let (_, sink_body) = http_get(sink_port, "/metrics");
    for (program, body, errors) in [
        ("pg-source", &body, r#"tidemark_source_errors_total{kind=""#),
        (
            "file-sink",
            &sink_body,
            r#"tidemark_sink_errors_total{kind=""#,
        ),
    ] {
        every_family_is_described(program, body);
        promtool_check_metrics(program, body);
        // At 0 from the start (ops' unit test); here one may have counted a
        // retried error meanwhile.
        let kinds = body.lines().filter(|l| l.starts_with(errors)).count();
        assert_eq!(kinds, 2, "{program}: an error counter per kind: {body}");
    }

    sigterm_and_wait(&mut source.0);
    sigterm_and_wait(&mut sink.0);
    let rest: Vec<String> = lines.iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("pg-source stopped")),
        "{rest:?}"
    );
}

/// Issue 10.15: pg-source waiting at start for a Postgres that does not
/// answer (here, a port nothing listens on) with the longest wait allowed
/// still stops at once on SIGTERM, with exit 0.
#[test]
fn pg_source_waiting_for_postgres_at_start_stops_on_sigterm() {
    let closed = free_port();
    let mut source = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_it-pg-source"))
            .args(["--name", &unique("src")])
            .args([
                "--connection-url",
                &format!("jdbc:postgresql://127.0.0.1:{closed}/db"),
            ])
            .args(["--connection-user", "postgres"])
            .args(["--mode", "changelog"])
            .args(["--connection-attempts", "24"])
            .args(["--connection-backoff-ms", "3600000"])
            .args(["--bootstrap-servers", &bootstrap()])
            .args(["--http-addr", "off"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = source.0.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains("postgres unreachable, retrying") => break,
            Ok(_) => {}
            Err(e) => panic!("pg-source did not say it waits for postgres: {e}"),
        }
    }
    sigterm_and_wait(&mut source.0);
    let rest: Vec<String> = lines.iter().collect();
    assert!(
        rest.iter()
            .any(|l| l.contains("stopped while waiting for postgres")),
        "{rest:?}"
    );
}

/// Issue 16.4: pg-replay serves the same endpoints, alive and ready while
/// it follows, with metrics promtool accepts: progress, position and the
/// lag histogram of the units it applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_replay_serves_health_readiness_and_metrics_while_following() {
    use crate::replay::{event, Db};
    let db = Db::new().await;
    db.exec("create table p (id int primary key, data text not null)")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("archive.txt");
    let row = |id: i64| serde_json::json!({"id": id, "data": "x"});
    let lines = [
        event(
            "c",
            "p",
            serde_json::Value::Null,
            row(1),
            1,
            1,
            None,
            100,
            1,
        ),
        event(
            "c",
            "p",
            serde_json::Value::Null,
            row(2),
            1,
            2,
            Some(2),
            100,
            1,
        ),
        event(
            "c",
            "p",
            serde_json::Value::Null,
            row(3),
            2,
            1,
            Some(1),
            101,
            2,
        ),
    ];
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let port = free_port();
    let mut replay = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_it-pg-replay"))
            .arg("--input")
            .arg(&input)
            .args(["--target-url", &db.url(), "--follow"])
            .args(["--http-addr", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "pg-replay never served its port");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for_body(port, "/metrics", "tidemark_replay_units_applied_total 2");
    wait_for_body(port, "/readyz", "ready");
    let (status, body) = http_get(port, "/healthz");
    assert_eq!((status.as_str(), body.as_str()), ("200", "ok\n"));
    let (_, body) = http_get(port, "/metrics");
    for series in [
        "tidemark_replay_changes_applied_total 3",
        "tidemark_replay_position 2",
        "tidemark_replay_read_ratio 1",
        "tidemark_replay_unit_lag_seconds_count 2",
        r#"tidemark_replay_unit_lag_seconds_bucket{le="+Inf"} 2"#,
    ] {
        assert!(body.contains(series), "no `{series}`: {body}");
    }
    every_family_is_described("pg-replay", &body);
    promtool_check_metrics("pg-replay", &body);
    sigterm_and_wait(&mut replay.0);
}

/// The first line of `program`'s JSON log whose message is `message`,
/// reading its stdout for at most 60 s.
fn json_line(child: &mut std::process::Child, message: &str) -> serde_json::Value {
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // Drained to the end, so the program never writes to a closed pipe.
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("no {message:?} line within 60 s: {e}"));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!("--json-logs printed a line that is not JSON ({e}): {line}")
        });
        if v["fields"]["message"] == message {
            return v;
        }
    }
}

/// Issue 16.5: each program's start line says its mode, tables, topics,
/// position and plan, under the JSON keys docs/operations.md lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_lines_say_mode_tables_topics_position_and_plan() {
    let fx = Fixture::changelog(schema_init::TriggerLevel::Row).await;
    let c = fx.source_connector();
    let offsets = format!("{}offsets", fx.prefix);
    let mut source = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_it-pg-source"))
            .args([
                "--json-logs",
                "--http-addr",
                "off",
                "--offsets-topic",
                &offsets,
            ])
            .args(["--bootstrap-servers", &bootstrap()])
            .args(["--name", &c.name, "--mode", "changelog"])
            .args(["--connection-url", c.props["connection.url"].as_str()])
            .args(["--connection-user", c.props["connection.user"].as_str()])
            .args(["--topic-prefix", &fx.prefix])
            .env(
                "TIDEMARK_CONNECTION_PASSWORD",
                c.props
                    .get("connection.password")
                    .cloned()
                    .unwrap_or_default(),
            )
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let line = json_line(&mut source.0, "pg-source started");
    let f = &line["fields"];
    assert_eq!(f["mode"], "changelog", "{line}");
    assert_eq!(f["tables"], "public.streaming_update_table", "{line}");
    assert_eq!(f["topics"], fx.topic().as_str(), "{line}");
    assert_eq!(f["position"], "none", "{line}");
    assert_eq!(f["plan"], "initial snapshot, then stream changes", "{line}");
    for key in ["timestamp", "level", "target", "fields"] {
        assert!(line.get(key).is_some(), "no {key}: {line}");
    }
    let mut lines = vec![line];

    let mut sink = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_it-file-sink"))
            .args(["--json-logs", "--http-addr", "off"])
            .args(["--name", &fx.sink_name, "--topics", &fx.topic()])
            .arg("--file")
            .arg(fx.file())
            .args(["--bootstrap-servers", &bootstrap()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let line = json_line(&mut sink.0, "file-sink started");
    assert_eq!(line["fields"]["mode"], "file", "{line}");
    assert_eq!(line["fields"]["topics"], fx.topic().as_str(), "{line}");
    assert_eq!(line["fields"]["position"], "none", "{line}");
    lines.push(line);
    wait_for_events(&fx.file(), 1, Duration::from_secs(30)).await;
    sigterm_and_wait(&mut source.0);
    sigterm_and_wait(&mut sink.0);

    // The sink again: it resumes after its checkpoint.
    let mut sink = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_it-file-sink"))
            .args(["--json-logs", "--http-addr", "off"])
            .args(["--name", &fx.sink_name, "--topics", &fx.topic()])
            .arg("--file")
            .arg(fx.file())
            .args(["--bootstrap-servers", &bootstrap()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let line = json_line(&mut sink.0, "file-sink started");
    assert_eq!(
        line["fields"]["plan"], "resume each partition after its checkpoint",
        "{line}"
    );
    sigterm_and_wait(&mut sink.0);

    let db = crate::replay::Db::new().await;
    let mut replay = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_it-pg-replay"))
            .args(["--json-logs", "--http-addr", "off", "--input"])
            .arg(fx.file())
            .args(["--target-url", &db.url()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let line = json_line(&mut replay.0, "pg-replay started");
    assert_eq!(line["fields"]["mode"], "replay", "{line}");
    assert_eq!(line["fields"]["position"], "none", "{line}");
    assert_eq!(
        line["fields"]["plan"], "apply from the archive's start, up to the archive's end",
        "{line}"
    );
    lines.push(line);
    let _ = replay.0.wait();

    // Every key of these lines is in docs/operations.md.
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"),
    )
    .unwrap();
    for line in &lines {
        let keys = line
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .chain(line["fields"].as_object().unwrap().keys().cloned());
        for key in keys {
            assert!(
                doc.contains(&format!("`{key}`")),
                "docs/operations.md does not list the log key `{key}` ({line})"
            );
        }
    }
}

/// Issue 16.6 as a user meets it: file-sink (the program) has written a
/// file, the topic is deleted and created again with other records (as
/// after `docker compose down -v`), and file-sink started again says in its
/// log what it does, keeps the old file unchanged under the name it
/// logs, next to its checkpoint, and writes the new topic's records to a
/// new file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reset_the_program_logs_where_the_old_file_went_and_starts_a_new_one() {
    let topic = crate::archive::topic(1).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out.txt");
    let name = unique("reset");
    let producer = crate::archive::producer();
    let start = || {
        KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_it-file-sink"))
                .args(["--json-logs", "--http-addr", "off"])
                .args(["--name", &name, "--topics", &topic])
                .arg("--file")
                .arg(&file)
                .args(["--bootstrap-servers", &bootstrap()])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    };
    let lines = |path: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let wait_lines = |want: Vec<String>| {
        let file = file.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while lines(&file) != want {
                assert!(Instant::now() < deadline, "{:?}", lines(&file));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let first = crate::archive::produce_units(&producer, &topic, 1..21, 1, |_, _| "false").await;
    let mut sink = start();
    wait_lines(first.clone()).await;
    sigterm_and_wait(&mut sink.0);
    let before = std::fs::read(&file).unwrap();

    crate::archive::recreate(&topic, 1).await;
    let second =
        crate::archive::produce_units(&producer, &topic, 500..505, 1, |_, _| "false").await;
    let mut sink = start();
    let line = json_line_where(&mut sink.0, |m| m.contains("deleted and created again"));
    assert_eq!(line["level"], "WARN", "{line}");
    let aside = std::path::PathBuf::from(line["fields"]["aside"].as_str().unwrap());
    assert_eq!(line["fields"]["file"], file.display().to_string(), "{line}");
    assert!(
        aside
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("out.txt.before-reset-"),
        "{line}"
    );
    wait_lines(second).await;
    sigterm_and_wait(&mut sink.0);
    assert_eq!(
        std::fs::read(&aside).unwrap(),
        before,
        "the old file, unchanged"
    );
    assert!(tidemark_common::offset::SinkCheckpoint::path_for(&aside).is_file());
}

/// The first line of a program's JSON log whose message passes `pred`,
/// reading its stdout for at most 60 s (and draining it after).
fn json_line_where(
    child: &mut std::process::Child,
    pred: impl Fn(&str) -> bool,
) -> serde_json::Value {
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("no such line within 60 s: {e}"));
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["fields"]["message"].as_str().is_some_and(&pred) {
            return v;
        }
    }
}

/// Logical mode's `--linger` (TIDEMARK_LINGER) became `--batch-linger-ms`
/// for both streaming modes: the old name is refused with the new one, not
/// ignored.
#[test]
fn pg_source_refuses_the_old_linger_setting_and_names_the_new_one() {
    let config = example("pg.source.connector.json");
    for (args, env) in [
        (vec!["--linger", "10ms"], None),
        (vec![], Some(("TIDEMARK_LINGER", "10ms"))),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_it-pg-source"));
        cmd.arg("--connector-config").arg(&config).args(&args);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert_ne!(out.status.code(), Some(0), "{args:?} {env:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--batch-linger-ms") && err.contains("batch.linger.ms"),
            "{args:?} {env:?}: {err}"
        );
    }
}
