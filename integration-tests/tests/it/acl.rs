//! A topic the program may not use is refused by the broker's ACLs: waiting
//! cannot help, so the program exits with a message that says what to grant,
//! instead of retrying forever.

use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn pg_source_exits_when_it_may_not_write_the_topic() {
    let fx = Fixture::new().await;
    let topic = fx.topic();
    let _acls = deny_acl(&topic, "Write").await;

    // The seed row is the first batch, so the first transaction meets the ACL.
    let result = fx.start_source().exited(Duration::from_secs(90)).await;

    let err = format!(
        "{:#}",
        result.expect_err("pg-source ran without write access")
    );
    let offsets = format!("{}offsets", fx.prefix);
    assert!(
        err.starts_with(&format!("cannot commit a batch to {offsets}, {topic}: ")),
        "{err}"
    );
    assert!(err.contains("Topic authorization failed"), "{err}");
    assert!(
        err.contains("not allowed to write to the topic: grant WRITE on it to this user"),
        "{err}"
    );
}

#[tokio::test]
async fn file_sink_exits_when_it_may_not_read_the_topic() {
    let fx = Fixture::new().await;
    let topic = fx.topic();
    // file-sink waits for a topic that does not exist yet: make it exist.
    let spec = tidemark_common::kafka::TopicSpec {
        partitions: 1,
        replication_factor: -1,
        configs: Vec::new(),
    };
    tidemark_common::kafka::ensure_topic(&kafka().admin().unwrap(), &topic, &spec)
        .await
        .unwrap();
    let _acls = deny_acl(&topic, "Read").await;

    let result = fx.start_sink().exited(Duration::from_secs(60)).await;

    let err = format!(
        "{:#}",
        result.expect_err("file-sink ran without read access")
    );
    let name = &fx.sink_name;
    assert_eq!(
        err,
        format!(
            "not allowed to read topic {topic}: Message consumption error: \
             TopicAuthorizationFailed (Broker: Topic authorization failed); \
             grant READ on it and on group connect-{name} to this user"
        )
    );
}
