//! Logical mode's incremental snapshot of a table that enters the set under
//! faults (issue 14): the table still gets its snapshot, and its topic
//! replays to the table, when the step of pg-source that found it fails.

use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, TlsConfig};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use tidemark_common::names::{publication_name, quote_ident};

use super::added::{capture_logical, drop_slot, replay_strict, script, snapshot_reads};
use super::*;

/// Takes pg-source's replication slot with a session of the test's own
/// (pg-source's stream is ended first, and taken again until the test's
/// session holds the slot): while it is held, every stream pg-source opens
/// fails ("replication slot is active"), so each of its steps fails after
/// it began, and puts its position back. The session reports nothing as
/// flushed, so the slot does not move.
async fn hold_slot(db: &Db) -> ReplicationClient {
    let slot = pg_source::modes::logical::default_slot_name(&db.source_name);
    let t = db.superuser.replication_target().expect("a TCP connection");
    let app = unique("slot_holder");
    let publication = quote_ident(&publication_name(&TableName::parse("a").unwrap()));
    let deadline = Instant::now() + WAIT;
    loop {
        sqlx::query(
            "select pg_terminate_backend(active_pid) from pg_replication_slots
              where slot_name = $1 and active_pid is not null",
        )
        .bind(&slot)
        .execute(&db.admin)
        .await
        .unwrap();
        let cfg = ReplicationConfig::new(
            t.host.clone(),
            t.user.clone(),
            t.password.clone(),
            t.database.clone(),
            slot.clone(),
            publication.clone(),
        )
        .with_port(t.port)
        .with_tls(TlsConfig::disabled())
        .with_start_lsn(Lsn(0))
        .with_ack_lsn(Lsn(0))
        .with_application_name(app.clone());
        let client = ReplicationClient::connect(cfg).await.unwrap();
        for _ in 0..20 {
            let ours: bool = sqlx::query_scalar(
                "select exists (select 1 from pg_replication_slots s
                                  join pg_stat_activity a on a.pid = s.active_pid
                                 where s.slot_name = $1 and a.application_name = $2)",
            )
            .bind(&slot)
            .bind(&app)
            .fetch_one(&db.admin)
            .await
            .unwrap();
            if ours {
                return client;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(client);
        assert!(
            Instant::now() < deadline,
            "could not take slot {slot} from pg-source within {WAIT:?}"
        );
    }
}

/// Lets go of the slot taken by [`hold_slot`].
async fn release_slot(db: &Db, client: ReplicationClient) {
    drop(client);
    let slot = pg_source::modes::logical::default_slot_name(&db.source_name);
    sqlx::query(
        "select pg_terminate_backend(active_pid) from pg_replication_slots
          where slot_name = $1 and active_pid is not null",
    )
    .bind(&slot)
    .execute(&db.admin)
    .await
    .unwrap();
}

/// Whether Kafka has `topic` (pg-source makes a table's topic when a pattern
/// comes to match it).
fn topic_exists(topic: &str) -> bool {
    let consumer: BaseConsumer = kafka()
        .client_config(&[
            ("group.id", &unique("meta")),
            ("allow.auto.create.topics", "false"),
        ])
        .create()
        .unwrap();
    consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .is_ok_and(|m| {
            m.topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        })
}

/// Logical mode: a table a `table.include.list` pattern comes to match in a
/// step of pg-source that then fails (its replication stream cannot be
/// opened: the test holds the slot) still gets its incremental snapshot:
/// the failed step's position is put back, but the table stays read. Before
/// the fix the table joined the stream without its snapshot: its 300 rows
/// from before its capture never came, and its changes were sent as if its
/// snapshot had ended (updates of rows the archive never got).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_table_found_by_a_failing_step_still_gets_its_snapshot() {
    let db = Db::new().await;
    script(
        &db.admin,
        "create table public.a (id int8 primary key, v text not null)",
    )
    .await;
    capture_logical(&db, "a").await;
    let overrides = [
        ("mode", "logical"),
        ("batch.max.rows", "100"),
        ("table.whitelist", "a, public\\.n_[a-z]+"),
    ];
    let mut source = db.start_source(&["a"], &overrides).await;
    let topic = db.topic("n_new");
    let topics = [db.topic("a"), topic.clone()];
    let mut reader = TopicReader::new(&topics);
    script(&db.admin, "insert into public.a values (1, 'streams')").await;
    reader
        .until("a's first change", WAIT, |e| {
            e.get(&topics[0]).is_some_and(|v| !v.is_empty())
        })
        .await;

    let holder = hold_slot(&db).await;
    // Rows from before the capture (no change event holds them), captured
    // while every step of pg-source fails.
    script(
        &db.admin,
        "create table public.n_new (id int8 primary key, v text not null);
         insert into public.n_new select g, 'before capture ' || g from generate_series(0, 299) g;",
    )
    .await;
    capture_logical(&db, "n_new").await;
    script(&db.admin, "insert into public.a values (2, 'held')").await;
    // The look for tables the patterns match (every 10 s) finds n_new and
    // makes its topic, in a step whose stream then fails; a few more
    // steps fail after it.
    let deadline = Instant::now() + WAIT;
    while !tokio::task::block_in_place(|| topic_exists(&topic)) {
        source.assert_running("pg-source").await;
        assert!(
            Instant::now() < deadline,
            "pg-source did not find n_new within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    source.assert_running("pg-source").await;
    release_slot(&db, holder).await;

    // Changes after the capture: of rows from before it, and a new one.
    script(
        &db.admin,
        "update public.n_new set v = 'updated' where id < 10;
         delete from public.n_new where id between 10 and 14;
         insert into public.n_new values (1000, 'new');",
    )
    .await;
    reader
        .until("n_new's 285 rows from before its capture read", WAIT, |e| {
            snapshot_reads(e.get(&topic).map_or(&[][..], Vec::as_slice)).len() >= 285
        })
        .await;
    script(
        &db.admin,
        "insert into public.n_new values (-1, 'end'); insert into public.a values (-1, 'end')",
    )
    .await;
    reader
        .until("the last change of both tables", WAIT, |e| {
            topics.iter().all(|t| {
                e.get(t).is_some_and(|ev| {
                    ev.iter()
                        .any(|e| e.after().is_some_and(|a| a["v"] == "end"))
                })
            })
        })
        .await;
    source.assert_running("pg-source").await;
    source.stop().await;
    drop_slot(&db).await;
    let events = &reader.events[&topic];
    assert_eq!(
        replay_strict(events),
        table_rows(&db.admin, "public.n_new", &["id"]).await,
        "n_new replayed"
    );
    let twice: Vec<_> = snapshot_reads(events)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(twice.is_empty(), "keys read twice: {twice:?}");
    assert_eq!(
        replay(&reader.events[&topics[0]]),
        table_rows(&db.admin, "public.a", &["id"]).await,
        "a replayed"
    );
}
