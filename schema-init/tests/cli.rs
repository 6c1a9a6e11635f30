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
