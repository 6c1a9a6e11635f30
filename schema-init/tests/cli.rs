//! schema-init as a user runs it: the binary, its exit code and output.

use std::process::Command;

fn schema_init() -> Command {
    Command::new(env!("CARGO_BIN_EXE_schema-init"))
}

#[test]
fn dry_run_prints_the_sql_without_connecting() {
    let out = schema_init()
        .args(["--dry-run", "--database", "shop", "--table", "sales.Orders"])
        .env("DATABASE_URL", "postgres://nobody:secret@127.0.0.1:1/none")
        .output()
        .unwrap();
    assert!(out.status.success());
    let sql = String::from_utf8(out.stdout).unwrap();
    assert!(sql.contains(r#"create database "shop";"#), "{sql}");
    assert!(
        sql.contains(r#"create table if not exists "sales"."orders""#),
        "{sql}"
    );
    assert!(sql.contains("(last_updated, id)"), "{sql}");
    assert!(!sql.contains("secret"));
}

#[test]
fn running_twice_changes_nothing_the_second_time() {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        panic!("DATABASE_URL is not set: run `eval \"$(dev/services up)\"` first");
    };
    let db = format!("tm_cli_{}", std::process::id());
    for _ in 0..2 {
        let out = schema_init()
            .args(["--database", &db])
            .env("DATABASE_URL", &url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rows = Command::new("psql")
        .arg(format!("{}/{db}", url.rsplit_once('/').unwrap().0))
        .args(["-Atc", "select count(*) from streaming_update_table"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&rows.stdout).trim(),
        "1",
        "one sample row"
    );
}

#[test]
fn a_wrong_password_exits_non_zero_with_a_clear_message() {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        panic!("DATABASE_URL is not set: run `eval \"$(dev/services up)\"` first");
    };
    let mut u = url::Url::parse(&url).unwrap();
    u.set_password(Some("wrong-secret")).unwrap();
    let out = schema_init()
        .env("DATABASE_URL", u.as_str())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("password or user is wrong"), "{err}");
    assert!(!err.contains("wrong-secret"), "{err}");
}
