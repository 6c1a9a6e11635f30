//! Bad configs fail at once, with a message that names what to fix.

use std::time::Duration;

use tidemark_common::config::ConnectorConfig;

use crate::support::*;

async fn source_error(c: &ConnectorConfig) -> String {
    let cfg = match pg_source::Config::from_connector(c, kafka()) {
        Ok((cfg, _)) => cfg,
        Err(e) => return e.to_string(),
    };
    let run = pg_source::run(cfg, tokio_util::sync::CancellationToken::new());
    match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(Err(e)) => format!("{e:#}"),
        Ok(Ok(())) => panic!("pg-source ran with a bad config"),
        Err(_) => panic!("pg-source kept running with a bad config instead of failing"),
    }
}

#[tokio::test]
async fn an_unknown_key_is_named_with_a_suggestion() {
    let fx = Fixture::new().await;
    let mut c = fx.source_connector();
    c.props
        .insert("timestamp.colum.name".into(), "last_updated".into());
    let err = source_error(&c).await;
    assert_eq!(
        err,
        "unknown config key `timestamp.colum.name`; did you mean `timestamp.column.name`?"
    );

    let mut c = fx.source_connector();
    c.props.insert("query".into(), "select 1".into());
    let err = source_error(&c).await;
    assert!(err.contains("`query` is not supported"), "{err}");
}

#[tokio::test]
async fn a_malformed_jdbc_url_is_named() {
    let fx = Fixture::new().await;
    let mut c = fx.source_connector();
    c.props.insert(
        "connection.url".into(),
        "postgresql://localhost/streaming_example".into(),
    );
    let err = source_error(&c).await;
    assert!(
        err.contains("connection.url") && err.contains("jdbc:postgresql://"),
        "{err}"
    );
}

#[tokio::test]
async fn a_missing_table_is_named() {
    let fx = Fixture::new().await;
    let mut c = fx.source_connector();
    c.props
        .insert("table.whitelist".into(), "no_such_table".into());
    let err = source_error(&c).await;
    assert!(
        err.contains("table public.no_such_table does not exist"),
        "{err}"
    );
    assert!(err.contains("schema-init"), "{err}");
}

#[tokio::test]
async fn a_wrong_password_fails_at_once_without_echoing_it() {
    let fx = Fixture::new().await;
    let mut c = fx.source_connector();
    c.props
        .insert("connection.password".into(), "not-the-password".into());
    let err = source_error(&c).await;
    assert!(err.contains("password"), "{err}");
    assert!(err.contains("connection.password"), "{err}");
    assert!(
        !err.contains("not-the-password"),
        "the password leaked: {err}"
    );
}

#[tokio::test]
async fn a_sink_without_its_folder_fails_clearly() {
    let fx = Fixture::new().await;
    let mut c = fx.sink_connector();
    c.props.insert(
        "file".into(),
        fx.dir.path().join("missing/out.txt").display().to_string(),
    );
    let (cfg, _) = file_sink::Config::from_connector(&c, kafka()).unwrap();
    let err = file_sink::run(cfg, tokio_util::sync::CancellationToken::new())
        .await
        .map(|_| ())
        .unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("output folder") && err.contains("does not exist"),
        "{err}"
    );

    let mut c = fx.sink_connector();
    c.props.remove("file");
    let err = file_sink::Config::from_connector(&c, kafka())
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "config key `file` is required: the output file, like /tmp/data/streaming_output.txt"
    );
}
