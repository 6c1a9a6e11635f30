//! pg-source as a user runs it: the binary, its exit code and messages.

use std::process::Command;

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
