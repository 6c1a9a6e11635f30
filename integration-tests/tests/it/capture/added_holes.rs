//! Review of the incremental snapshot (issue 14.2): interleavings that the
//! chunk queries and the stream's key filter do not survive. Each test makes
//! the interleaving certain instead of waiting for luck: a DDL held open in
//! its transaction while pg-source's next chunk takes its snapshot, or a
//! change made right after the first chunk arrived.
//!
//! Table `b` enters the set at a restart (as in `added.rs`), so it gets an
//! incremental snapshot; `a` is the table read before.

use std::collections::BTreeSet;

use schema_init::TriggerLevel;
use tidemark_common::envelope::Op;

use super::*;

/// Runs `sql` as the user.
async fn script(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Tables `a` (one row) and `b` (made by `create_b`), both captured;
/// pg-source runs with `a` alone until its position is stored, then with
/// `a` and `b`: `b` entered the set, and its incremental snapshot runs.
async fn b_enters_the_set(
    db: &Db,
    create_b: &str,
    overrides: &[(&str, &str)],
) -> (Task, TopicReader) {
    script(
        &db.admin,
        "create table public.a (id int8 primary key, v text not null);
         insert into public.a values (1, 'a1');",
    )
    .await;
    script(&db.admin, create_b).await;
    db.capture("a", Capture::full(TriggerLevel::Row)).await;
    db.capture("b", Capture::full(TriggerLevel::Row)).await;
    let mut reader = TopicReader::new(&[db.topic("a"), db.topic("b")]);
    let source = db.start_source(&["a"], overrides).await;
    reader.at_least(&db.topic("a"), 1).await;
    source.stop().await;
    let source = db.start_source(&["a", "b"], overrides).await;
    (source, reader)
}

/// The snapshot reads (`op: r`) in `topic`.
fn reads(events: &BTreeMap<String, Vec<Event>>, topic: &str) -> usize {
    events.get(topic).map_or(0, |ev| {
        ev.iter()
            .filter(|e| e.event.as_ref().is_some_and(|ev| ev.op == Op::Read))
            .count()
    })
}

/// Whether `topic` holds the row whose `v` is `end`.
fn has_end(events: &BTreeMap<String, Vec<Event>>, topic: &str) -> bool {
    events.get(topic).is_some_and(|ev| {
        ev.iter()
            .any(|e| e.after().is_some_and(|a| a["v"] == "end"))
    })
}

/// Reads until `done` holds, failing the test (with pg-source's error) if
/// pg-source stops meanwhile.
async fn until_running(
    reader: &mut TopicReader,
    source: &mut Task,
    what: &str,
    done: impl Fn(&BTreeMap<String, Vec<Event>>) -> bool,
) {
    let deadline = Instant::now() + WAIT * 2;
    while !done(&reader.events) {
        source
            .assert_running(&format!("pg-source, while waiting for {what},"))
            .await;
        assert!(
            Instant::now() < deadline,
            "waited {:?} for {what}",
            WAIT * 2
        );
        let _ = tokio::time::timeout(
            Duration::from_millis(500),
            reader.until(what, WAIT * 3, &done),
        )
        .await;
    }
}

/// Runs `ddl` in a transaction held open 2 s after it: pg-source's next
/// chunk takes its snapshot while the DDL is in progress, then waits for
/// the DDL's lock to read its rows.
async fn held(db: &Db, ddl: &str) {
    script(
        &db.admin,
        &format!("begin; {ddl}; select pg_sleep(2); commit;"),
    )
    .await;
}

/// The keys a replay of `events` holds are the keys of `table`.
async fn assert_same_keys(events: &[Event], db: &Db, table: &str, key: &str) {
    let replayed: BTreeSet<String> = replay(events).into_keys().collect();
    let rows: BTreeSet<String> = table_rows(&db.admin, table, &[key])
        .await
        .into_keys()
        .collect();
    let missing: Vec<&String> = rows.difference(&replayed).collect();
    let extra: Vec<&String> = replayed.difference(&rows).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "a replay of {table}'s topic lacks {} of its {} rows (e.g. {:?}) and holds {} it lacks (e.g. {:?})",
        missing.len(),
        rows.len(),
        &missing[..missing.len().min(5)],
        extra.len(),
        &extra[..extra.len().min(5)],
    );
}

/// 5000 rows in chunks of 10, so the snapshot runs for many seconds.
const FIVE_THOUSAND: &str =
    "create table public.b (id int4 primary key, n int4 not null, v text not null);
     insert into public.b select g, g, 'b' from generate_series(1, 5000) g;";

/// A table-rewriting `ALTER TABLE` (here a column widened to bigint, as the
/// fault-injection migration widens its key) that is in progress when a
/// chunk takes its snapshot: the chunk's `select` waits for its lock, then
/// reads the rewritten table in a snapshot older than the rewrite, which
/// shows it empty (Postgres' MVCC caveat for rewrites and TRUNCATE). The
/// chunk comes back short, the snapshot counts as done, and every row after
/// the chunks sent before never reaches the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_incremental_snapshot_survives_a_table_rewrite_during_a_chunk() {
    let db = Db::new().await;
    let overrides = [("batch.max.rows", "10")];
    let (mut source, mut reader) = b_enters_the_set(&db, FIVE_THOUSAND, &overrides).await;
    let topic = db.topic("b");
    until_running(&mut reader, &mut source, "b's first chunk", |e| {
        reads(e, &topic) >= 10
    })
    .await;
    held(&db, "alter table public.b alter column n type int8").await;
    // Above every key: it arrives once the snapshot has read everything.
    script(&db.admin, "insert into public.b values (1000000, 0, 'end')").await;
    until_running(&mut reader, &mut source, "b's row 'end'", |e| {
        has_end(e, &topic)
    })
    .await;
    reader.settle(Duration::from_secs(1)).await;
    source.stop().await;
    assert_same_keys(&reader.events[&topic], &db, "public.b", "id").await;
}

/// `ADD COLUMN` in progress when a chunk takes its snapshot: the shape is
/// read in the snapshot (three columns), the rows after the DDL's lock
/// (four fields), so every row of that chunk goes to the dead-letter topic
/// as a value that cannot be carried, and the snapshot moves past them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_incremental_snapshot_survives_add_column_during_a_chunk() {
    let db = Db::new().await;
    let overrides = [("batch.max.rows", "10")];
    let (mut source, mut reader) = b_enters_the_set(&db, FIVE_THOUSAND, &overrides).await;
    let topic = db.topic("b");
    until_running(&mut reader, &mut source, "b's first chunk", |e| {
        reads(e, &topic) >= 10
    })
    .await;
    held(&db, "alter table public.b add column extra int4").await;
    script(&db.admin, "insert into public.b values (1000000, 0, 'end')").await;
    until_running(&mut reader, &mut source, "b's row 'end'", |e| {
        has_end(e, &topic)
    })
    .await;
    reader.settle(Duration::from_secs(1)).await;
    source.stop().await;
    assert_same_keys(&reader.events[&topic], &db, "public.b", "id").await;
}

/// A table renamed while its incremental snapshot runs: its changes keep
/// going to its topic (changelog mode follows tables by OID), and the other
/// tables go on; pg-source must not stop on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_incremental_snapshot_of_a_table_renamed_while_it_runs() {
    let db = Db::new().await;
    let overrides = [("batch.max.rows", "10")];
    let (mut source, mut reader) = b_enters_the_set(&db, FIVE_THOUSAND, &overrides).await;
    let topic = db.topic("b");
    until_running(&mut reader, &mut source, "b's first chunk", |e| {
        reads(e, &topic) >= 10
    })
    .await;
    held(&db, "alter table public.b rename to b2").await;
    script(
        &db.admin,
        "insert into public.b2 values (1000000, 0, 'end'); insert into public.a values (2, 'end')",
    )
    .await;
    until_running(
        &mut reader,
        &mut source,
        "the rows 'end' of a and b2",
        |e| has_end(e, &topic) && has_end(e, &db.topic("a")),
    )
    .await;
    reader.settle(Duration::from_secs(1)).await;
    source.stop().await;
    assert_same_keys(&reader.events[&topic], &db, "public.b2", "id").await;
}

/// The same rename while pg-source is stopped (killed mid-snapshot), then a
/// restart with the same list: the table is still followed by its OID, so
/// its snapshot must go on (or start again), never end in silence with the
/// rows after its last chunk missing from the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_incremental_snapshot_of_a_table_renamed_while_stopped() {
    let db = Db::new().await;
    let overrides = [("batch.max.rows", "10")];
    let (mut source, mut reader) = b_enters_the_set(&db, FIVE_THOUSAND, &overrides).await;
    let topic = db.topic("b");
    until_running(&mut reader, &mut source, "b's first chunk", |e| {
        reads(e, &topic) >= 10
    })
    .await;
    source.kill().await;
    script(&db.admin, "alter table public.b rename to b2").await;
    let mut source = db.start_source(&["a", "b"], &overrides).await;
    script(
        &db.admin,
        "insert into public.b2 values (1000000, 0, 'end')",
    )
    .await;
    until_running(&mut reader, &mut source, "b2's row 'end'", |e| {
        has_end(e, &topic)
    })
    .await;
    reader.settle(Duration::from_secs(1)).await;
    source.stop().await;
    assert_same_keys(&reader.events[&topic], &db, "public.b2", "id").await;
}

/// Renaming the primary-key column while the snapshot runs: the stored
/// progress names the key column `id`, the table's key is now `ident`; the
/// snapshot must go on (one table's trouble never stops the others), not
/// stop pg-source at every start with "an unreadable key".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_incremental_snapshot_survives_a_renamed_key_column() {
    let db = Db::new().await;
    let overrides = [("batch.max.rows", "10")];
    let (mut source, mut reader) = b_enters_the_set(&db, FIVE_THOUSAND, &overrides).await;
    let topic = db.topic("b");
    until_running(&mut reader, &mut source, "b's first chunk", |e| {
        reads(e, &topic) >= 10
    })
    .await;
    script(&db.admin, "alter table public.b rename column id to ident").await;
    script(
        &db.admin,
        "insert into public.b values (1000000, 0, 'end'); insert into public.a values (2, 'end')",
    )
    .await;
    until_running(&mut reader, &mut source, "the rows 'end' of a and b", |e| {
        has_end(e, &topic) && has_end(e, &db.topic("a"))
    })
    .await;
    reader.settle(Duration::from_secs(1)).await;
    source.stop().await;
    assert!(
        reads(&reader.events, &topic) >= 5000,
        "{} rows of b read by its snapshot",
        reads(&reader.events, &topic)
    );
}

/// A text key with a collation of its own (ICU `en-x-icu`; the database's
/// is `C`). Chunks follow the key index (the column's collation: k00000 <
/// K00001 < k00002 ...), but the stream's filter compares a change's key
/// with the last key sent as two literals, in the database's collation
/// (uppercase before lowercase). Each chunk of 100 ends on an uppercase key
/// (K00099, K00199, ...), so every lowercase key looks above it: updates of
/// rows the snapshot has already sent are left out, and lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_incremental_snapshot_of_a_text_key_with_its_own_collation() {
    let db = Db::new().await;
    let overrides = [("batch.max.rows", "100")];
    let (mut source, mut reader) = b_enters_the_set(
        &db,
        "create table public.b (k text collate \"en-x-icu\" primary key, v text not null);
         insert into public.b
         select case when g % 2 = 0 then 'k' else 'K' end || pg_catalog.lpad(g::text, 5, '0'), 'before'
           from generate_series(0, 19999) g;",
        &overrides,
    )
    .await;
    let topic = db.topic("b");
    until_running(&mut reader, &mut source, "b's first chunk", |e| {
        reads(e, &topic) >= 100
    })
    .await;
    // Rows of the first chunk, sent already, while 199 chunks are to come.
    for g in (0..100).step_by(2) {
        script(
            &db.admin,
            &format!("update public.b set v = 'updated' where k = 'k{g:05}'"),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Last in both orders: it arrives once the snapshot has read everything.
    script(&db.admin, "insert into public.b values ('zzzzz', 'end')").await;
    until_running(&mut reader, &mut source, "b's row 'end'", |e| {
        has_end(e, &topic)
    })
    .await;
    reader.settle(Duration::from_secs(1)).await;
    source.stop().await;
    let replayed = replay(&reader.events[&topic]);
    let rows = table_rows(&db.admin, "public.b", &["k"]).await;
    let wrong: Vec<(&String, &Value, Option<&Value>)> = rows
        .iter()
        .filter(|(k, v)| replayed.get(*k) != Some(*v))
        .map(|(k, v)| (k, v, replayed.get(k)))
        .collect();
    assert!(
        wrong.is_empty() && replayed.len() == rows.len(),
        "{} of {} rows of b replay wrong ({} replayed), e.g. (key, table, replay): {:?}",
        wrong.len(),
        rows.len(),
        replayed.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// A key of an array of a domain whose CHECK calls its owner's function.
/// The chunk queries and the stream's key filter write keys as literals
/// (of a domain's base type, but an array of a domain has no domain-free
/// twin that compares alike without a cast its owner may define), and a
/// literal's input runs the element domain's CHECK: the owner's code would
/// run in pg-source's session, with pg-source's privileges. So such a
/// table's incremental snapshot is refused, with an error naming the table,
/// the column and the fix, before any chunk is read: the owner's code never
/// runs as pg-source, and the other tables go on. (Before the fix, the
/// second chunk's query ran the CHECK: pg-source stopped with "cannot
/// execute INSERT in a read-only transaction".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_incremental_snapshot_runs_no_code_of_the_table_owner() {
    let db = Db::new().await;
    exec(
        &db.admin,
        "create table public.calls (caller text, at timestamptz default clock_timestamp())",
    )
    .await;
    exec(&db.admin, "grant insert on public.calls to public").await;
    let (owner, _owner_pool) = db.role("own").await;
    exec(
        &db.admin,
        &format!("grant create on schema public to {owner}"),
    )
    .await;
    let as_owner = |sql: &str| format!("set role {owner}; {sql}; reset role;");
    let create_b = as_owner(
        "create function public.seen(v int4) returns bool language plpgsql
           as $f$ begin insert into public.calls (caller) values (current_user); return true; end $f$;
         create domain public.d as int4 check (public.seen(value));
         create table public.b (id public.d[] primary key, n int4 not null, v text not null);
         insert into public.b select array[g]::public.d[], g, 'b' from generate_series(1, 3000) g",
    );
    let overrides = [("batch.max.rows", "10")];
    let (mut source, mut reader) = b_enters_the_set(&db, &create_b, &overrides).await;
    // Changes of b, which the stream's filter would compare with a key.
    script(
        &db.admin,
        &as_owner(
            "update public.b set v = 'changed' where n in (5, 2500);
             insert into public.b values (array[1000000]::public.d[], 0, 'end')",
        ),
    )
    .await;
    // a goes on: its change arrives after b's, and after a few of b's
    // refused chunks (one every 5 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    script(&db.admin, "insert into public.a values (2, 'after b')").await;
    let topic_a = db.topic("a");
    until_running(&mut reader, &mut source, "a's row 'after b'", |e| {
        e.get(&topic_a).is_some_and(|ev| {
            ev.iter()
                .any(|e| e.after().is_some_and(|a| a["v"] == "after b"))
        })
    })
    .await;
    source.stop().await;
    let callers: Vec<String> =
        sqlx::query_scalar("select distinct caller from public.calls where caller <> $1")
            .bind(&owner)
            .fetch_all(&db.admin)
            .await
            .unwrap();
    assert!(
        callers.is_empty(),
        "the owner's domain check ran as {callers:?}"
    );
    let topic_b = db.topic("b");
    assert_eq!(
        reads(&reader.events, &topic_b),
        0,
        "b's snapshot is refused before a chunk is read"
    );
    assert!(
        !has_end(&reader.events, &topic_b),
        "b's changes wait for its snapshot"
    );
    // The error pg-source logs for b, every time it tries its chunk.
    let pool = db
        .superuser
        .connect(1, Duration::from_secs(10))
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let types = tidemark_common::codec::TypeCache::new();
    let oid: i64 = sqlx::query_scalar("select 'public.b'::regclass::oid::int8")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let shape = pg_source::shape::CatalogShape::load(&mut conn, &types, oid as u32)
        .await
        .unwrap()
        .unwrap();
    let err = shape.literal_safe_key(&"public.b").unwrap_err().to_string();
    for part in [
        "table public.b",
        "column \"id\"",
        "public.d[]",
        "domain public.d",
        "Fix:",
    ] {
        assert!(err.contains(part), "the error names {part:?}: {err}");
    }
}

/// Which key types are refused for their literals: the domain CHECKs a
/// literal's input would run, through arrays, composites, ranges and
/// domains over them; a domain key itself is written as its base type and
/// runs no CHECK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_literals_that_would_run_a_domain_check_are_found_through_every_container() {
    let db = Db::new().await;
    script(
        &db.admin,
        "create domain public.pos as int4 check (value > 0);
         create domain public.plain as int4;
         create domain public.posarr as public.pos[];
         create domain public.intarr as int4[] check (cardinality(value) > 0);
         create type public.pair as (a int4, b public.pos);
         create type public.plainpair as (a int4, b public.plain);
         create type public.posrange as range (subtype = public.pos);
         create table public.k_pos (k public.pos primary key);
         create table public.k_posarr (k public.pos[] primary key);
         create table public.k_dom_posarr (k public.posarr primary key);
         create table public.k_intarr (k public.intarr primary key);
         create table public.k_plainarr (k public.plain[] primary key);
         create table public.k_pair (k public.pair primary key);
         create table public.k_plainpair (k public.plainpair primary key);
         create table public.k_pairs (k public.pair[] primary key);
         create table public.k_range (k public.posrange primary key);
         create table public.k_two (a int4, b public.pos[], primary key (a, b));",
    )
    .await;
    let target = db
        .superuser
        .connect(1, Duration::from_secs(10))
        .await
        .unwrap();
    let mut conn = target.acquire().await.unwrap();
    let types = tidemark_common::codec::TypeCache::new();
    for (table, refused) in [
        ("k_pos", None),
        ("k_posarr", Some("public.pos")),
        ("k_dom_posarr", Some("public.pos")),
        ("k_intarr", None),
        ("k_plainarr", None),
        ("k_pair", Some("public.pos")),
        ("k_plainpair", None),
        ("k_pairs", Some("public.pos")),
        ("k_range", Some("public.pos")),
        ("k_two", Some("public.pos")),
    ] {
        let oid: i64 = sqlx::query_scalar(&format!("select 'public.{table}'::regclass::oid::int8"))
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        let shape = pg_source::shape::CatalogShape::load(&mut conn, &types, oid as u32)
            .await
            .unwrap()
            .unwrap();
        let found: Vec<&str> = shape
            .key
            .iter()
            .filter_map(|k| k.literal_check.as_deref())
            .collect();
        assert_eq!(found.first().copied(), refused, "table {table}: {found:?}");
        assert_eq!(
            shape.literal_safe_key(&table).is_ok(),
            refused.is_none(),
            "table {table}"
        );
    }
}

/// The initial snapshot of a table whose key literals would run a domain's
/// CHECK: pg-source refuses to start, naming the table and the fix (as it
/// does for a table without a primary key), in both capture modes, and the
/// CHECK never runs as pg-source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_snapshot_of_a_key_whose_literals_run_a_domain_check_is_refused() {
    for mode in ["changelog", "logical"] {
        let db = Db::new().await;
        script(
            &db.admin,
            "create table public.calls (caller text);
             create function public.seen(v int4) returns bool language plpgsql
               as $f$ begin insert into public.calls values (current_user); return true; end $f$;
             create domain public.d as int4 check (public.seen(value));
             create table public.b (id public.d[] primary key, v text not null);
             insert into public.b select array[g]::public.d[], 'b' from generate_series(1, 5000) g;",
        )
        .await;
        if mode == "logical" {
            let b = tidemark_common::pg::TableName::parse("b").unwrap();
            for step in schema_init::logical_steps(&b) {
                script(&db.admin, &step.sql).await;
            }
        } else {
            db.capture("b", Capture::full(TriggerLevel::Row)).await;
        }
        exec(&db.admin, "truncate public.calls").await;
        let cfg = db.source_config(&["b"], &[("mode", mode), ("snapshot.fetch.size", "10")]);
        let run = pg_source::run(cfg, tokio_util::sync::CancellationToken::new());
        let err = tokio::time::timeout(WAIT, run)
            .await
            .unwrap_or_else(|_| panic!("{mode}: pg-source still runs after {WAIT:?}"))
            .expect_err("pg-source refuses the table");
        let err = format!("{err:#}");
        assert!(
            err.contains("table public.b") && err.contains("cannot be snapshotted"),
            "{mode}: {err}"
        );
        let calls: i64 = sqlx::query_scalar("select count(*) from public.calls")
            .fetch_one(&db.admin)
            .await
            .unwrap();
        assert_eq!(
            calls, 0,
            "{mode}: the owner's CHECK ran in pg-source's session"
        );
        let slot = pg_source::modes::logical::default_slot_name(&db.source_name);
        let _ = sqlx::query("select pg_drop_replication_slot($1)")
            .bind(&slot)
            .execute(&db.admin)
            .await;
    }
}
