//! file-sink as a user runs it: the binary, its exit code and messages.

use std::process::Command;

#[test]
fn a_missing_output_folder_exits_non_zero_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sink.json");
    std::fs::write(
        &config,
        r#"{"name":"s","config":{"connector.class":"org.apache.kafka.connect.file.FileStreamSinkConnector",
            "tasks.max":"1","topics":"t","file":"/nonexistent-folder/out.txt"}}"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_file-sink"))
        .arg("--connector-config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the output folder /nonexistent-folder does not exist"),
        "{err}"
    );
}

#[test]
fn a_config_that_is_not_json_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sink.json");
    std::fs::write(&config, "topics=t\nfile=/tmp/x\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_file-sink"))
        .arg("--connector-config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sink.json") && err.contains("not valid JSON"),
        "{err}"
    );
}
