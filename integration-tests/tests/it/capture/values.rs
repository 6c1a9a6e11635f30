//! Values the change log must carry exactly, whatever the table looks like:
//! columns named like anything the generated code uses (issue 10.5), json
//! values jsonb refuses (10.6), and the types of every contrib extension
//! Debian's Postgres ships (10.8).

use schema_init::{Capture, UpdateBefore};
use serde_json::{json, Value};

use super::*;

/// Every alias, variable, parameter and column name the capture functions,
/// their generator and pg-source's queries use or used.
const GENERATED_NAMES: &[&str] = &[
    "o",
    "new",
    "old",
    "tidemark_table",
    "tidemark_new",
    "tidemark_old",
    "key",
    "eq",
    "tg_op",
    "tg_table_name",
    "tg_table_schema",
    "tg_name",
    "tg_level",
    "tg_when",
    "tg_relid",
    "tg_nargs",
    "tg_argv",
    "found",
    "seq",
    "txid",
    "shape",
    "op",
    "before",
    "after",
    "table_name",
    "changed_at",
    "l",
    "b",
    "a",
    "t",
    "k",
    "e",
    "c",
    "u",
    "ord",
    "v_table",
    "p_relid",
    "tidemark.key",
    "tidemark.seg",
    "tidemark.w",
    "wide",
    "raw_key",
    "record_out",
    "textin",
    "row",
    "null",
    "*",
];

/// Columns named after [`GENERATED_NAMES`], a primary key named `n`, and a
/// second table keyed by (`o`, `new`): insert, update, a key change and a
/// delete arrive exactly, and no write fails.
async fn names_never_collide(capture: Capture) {
    let db = Db::new().await;
    let columns: Vec<String> = GENERATED_NAMES
        .iter()
        .map(|c| format!("{} text", quote(c)))
        .collect();
    exec(
        &db.admin,
        &format!(
            "create table public.by_n (n int primary key, {})",
            columns.join(", ")
        ),
    )
    .await;
    let others: Vec<String> = GENERATED_NAMES
        .iter()
        .filter(|c| !matches!(**c, "o" | "new"))
        .map(|c| format!("{} text", quote(c)))
        .collect();
    exec(
        &db.admin,
        &format!(
            "create table public.by_o_new (o int, new text, {}, primary key (o, new))",
            others.join(", ")
        ),
    )
    .await;
    db.capture("by_n", capture).await;
    db.capture("by_o_new", capture).await;
    let topics = [db.topic("by_n"), db.topic("by_o_new")];
    let mut reader = TopicReader::new(&topics);
    let source = db.start_source(&["by_n", "by_o_new"], &[]).await;

    let every = |table_columns: &[&str], values: &str| {
        let names: Vec<String> = table_columns.iter().map(|c| quote(c)).collect();
        format!("({}) values {values}", names.join(", "))
    };
    let all: Vec<&str> = GENERATED_NAMES.to_vec();
    let row = |n: i32, v: &str| {
        let vals: Vec<String> = all.iter().map(|c| format!("'{v} {c}'")).collect();
        format!("({n}, {})", vals.join(", "))
    };
    let mut by_n = vec!["n"];
    by_n.extend(&all);
    exec(
        &db.admin,
        &format!(
            "insert into public.by_n {}",
            every(&by_n, &format!("{}, {}", row(1, "one"), row(2, "two")))
        ),
    )
    .await;
    exec(
        &db.admin,
        r#"update public.by_n set "o" = 'changed', "new" = 'changed', "before" = null where n = 1"#,
    )
    .await;
    exec(&db.admin, "update public.by_n set n = n + 10").await;
    exec(&db.admin, "delete from public.by_n where n = 12").await;

    let others: Vec<&str> = all
        .iter()
        .copied()
        .filter(|c| !matches!(*c, "o" | "new"))
        .collect();
    let mut by_o_new = vec!["o", "new"];
    by_o_new.extend(&others);
    let row2 = |o: i32, new: &str| {
        let vals: Vec<String> = others.iter().map(|c| format!("'{new} {c}'")).collect();
        format!("({o}, '{new}', {})", vals.join(", "))
    };
    exec(
        &db.admin,
        &format!(
            "insert into public.by_o_new {}",
            every(&by_o_new, &format!("{}, {}", row2(1, "x"), row2(2, "y")))
        ),
    )
    .await;
    exec(
        &db.admin,
        r#"update public.by_o_new set "old" = 'changed', "key" = 'changed' where o = 1"#,
    )
    .await;
    exec(
        &db.admin,
        r#"update public.by_o_new set "new" = 'z' where o = 2"#,
    )
    .await;
    exec(&db.admin, "delete from public.by_o_new where o = 1").await;

    // by_n: c c u, then both keys change (d t c each), d t.
    // by_o_new: c c u, d t c, d t.
    reader.at_least(&topics[0], 3 + 6 + 2).await;
    reader.at_least(&topics[1], 3 + 3 + 2).await;
    reader.settle(std::time::Duration::from_secs(1)).await;
    source.stop().await;
    assert_eq!(
        replay(&reader.events[&topics[0]]),
        table_rows(&db.admin, "public.by_n", &["n"]).await
    );
    assert_eq!(
        replay(&reader.events[&topics[1]]),
        table_rows(&db.admin, "public.by_o_new", &["o", "new"]).await
    );
    let update = reader.events[&topics[0]][2].event.clone().unwrap();
    assert_eq!(update.after.as_ref().unwrap()["o"], "changed");
    assert_eq!(update.after.as_ref().unwrap()["n"], 1);
    assert_eq!(update.after.as_ref().unwrap()["before"], Value::Null);
    match capture.update_before {
        UpdateBefore::Full => {
            let before = update.before.unwrap();
            assert_eq!(before["o"], "one o");
            assert_eq!(before["before"], "one before");
            assert_eq!(before["*"], "one *");
        }
        UpdateBefore::Null => assert!(update.before.is_none()),
    }
}

fn quote(c: &str) -> String {
    tidemark_common::names::quote_ident(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_named_like_generated_code_are_captured_by_row_triggers() {
    names_never_collide(every_capture()[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_named_like_generated_code_are_captured_by_statement_triggers() {
    names_never_collide(every_capture()[1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_named_like_generated_code_are_captured_by_row_triggers_without_update_before() {
    names_never_collide(every_capture()[2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_named_like_generated_code_are_captured_by_statement_triggers_without_update_before(
) {
    names_never_collide(every_capture()[3]).await;
}

/// json values that jsonb refuses (a `\u0000` escape, a lone surrogate)
/// never make the application's write fail, and arrive as the exact text
/// written, as do duplicate keys and whitespace; jsonb `'null'` is not SQL
/// NULL.
async fn json_values_arrive_exactly(capture: Capture) {
    let db = Db::new().await;
    exec(
        &db.admin,
        "create table public.j (id int primary key, doc json, docb jsonb)",
    )
    .await;
    db.capture("j", capture).await;
    let topic = db.topic("j");
    let mut reader = TopicReader::new(&[topic.as_str()]);
    let source = db.start_source(&["j"], &[]).await;
    let docs = [
        r#"{"a":"\u0000"}"#,
        r#""\ud800""#,
        r#"{"a":1,  "a":2}"#,
        "null",
        r#"[1, "\ud83d\ude00", {"b" : [] }]"#,
    ];
    for (i, doc) in docs.iter().enumerate() {
        sqlx::query(
            "insert into public.j values ($1, $2::json, case when $1 = 4 then 'null'::jsonb end)",
        )
        .bind(i as i32 + 1)
        .bind(doc)
        .execute(&db.admin)
        .await
        .unwrap_or_else(|e| panic!("the write of {doc} failed: {e}"));
    }
    exec(
        &db.admin,
        r#"update public.j set doc = '{"a":"\u0000", "b":"\udfff"}' where id = 1"#,
    )
    .await;
    exec(&db.admin, "insert into public.j values (6, null, null)").await;
    exec(&db.admin, "delete from public.j where id = 2").await;
    let events = reader
        .at_least(&topic, docs.len() + 1 + 1 + 2)
        .await
        .to_vec();
    source.stop().await;
    for (i, doc) in docs.iter().enumerate() {
        assert_eq!(
            events[i].after().unwrap()["doc"],
            json!(doc),
            "{:?}",
            events[i]
        );
    }
    assert_eq!(events[3].after().unwrap()["docb"], json!("null"));
    assert_eq!(events[0].after().unwrap()["docb"], Value::Null);
    let update = events[5].event.as_ref().unwrap();
    assert_eq!(
        update.after.as_ref().unwrap()["doc"],
        json!(r#"{"a":"\u0000", "b":"\udfff"}"#)
    );
    if capture.update_before == UpdateBefore::Full {
        assert_eq!(update.before.as_ref().unwrap()["doc"], json!(docs[0]));
    }
    assert_eq!(events[6].after().unwrap()["doc"], Value::Null);
    assert_eq!(
        events[7].event.as_ref().unwrap().before.as_ref().unwrap()["doc"],
        json!(docs[1])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_values_jsonb_refuses_are_written_and_arrive_exactly_row_triggers() {
    json_values_arrive_exactly(every_capture()[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_values_jsonb_refuses_are_written_and_arrive_exactly_statement_triggers() {
    json_values_arrive_exactly(every_capture()[3]).await;
}

/// The column types of Debian's contrib extensions, each with values that
/// need quoting in a composite literal.
const CONTRIB: &[(&str, &str, &[&str])] = &[
    (
        "hstore",
        "hstore",
        &["a=>1", r#""x y"=>"q\"uote", n=>NULL"#, ""],
    ),
    ("ltree", "ltree", &["top.science.astronomy", "a"]),
    ("ltree", "lquery", &["*.science.*"]),
    ("cube", "cube", &["(1, 2), (3, 4)", "(1e-5)"]),
    ("citext", "citext", &["MiXeD Case", "a,b (c)"]),
    ("isn", "isbn13", &["978-0-393-04002-9"]),
    ("isn", "ean13", &["0036000291452"]),
    ("isn", "issn", &["0317-8471"]),
    ("seg", "seg", &["5 .. 6.3", "<1"]),
    ("lo", "lo", &["12345"]),
    ("earthdistance", "earth", &["(6378168, 0, 0)"]),
];

/// Issue 10.8: every contrib type travels in changelog mode as its exact
/// text (the codec carries extension types as text), and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contrib_extension_types_arrive_as_their_exact_text() {
    let db = Db::new().await;
    for ext in [
        "hstore",
        "ltree",
        "cube",
        "citext",
        "isn",
        "seg",
        "lo",
        "earthdistance",
    ] {
        exec(
            &db.admin,
            &format!("create extension if not exists {ext} cascade"),
        )
        .await;
    }
    let columns: Vec<String> = CONTRIB
        .iter()
        .map(|(_, ty, _)| format!("c_{ty} {ty}"))
        .collect();
    exec(
        &db.admin,
        &format!(
            "create table public.x (id int primary key, {})",
            columns.join(", ")
        ),
    )
    .await;
    // A key of an extension's type, whose equality is not pg_catalog's.
    exec(
        &db.admin,
        "create table public.by_citext (k citext primary key, h hstore)",
    )
    .await;
    for capture in [every_capture()[1]] {
        db.capture("x", capture).await;
        db.capture("by_citext", capture).await;
    }
    let topics = [db.topic("x"), db.topic("by_citext")];
    let mut reader = TopicReader::new(&topics);
    let source = db.start_source(&["x", "by_citext"], &[]).await;
    let rows = CONTRIB.iter().map(|(_, _, v)| v.len()).max().unwrap();
    for i in 0..rows {
        let names: Vec<String> = CONTRIB.iter().map(|(_, ty, _)| format!("c_{ty}")).collect();
        let placeholders: Vec<String> = CONTRIB
            .iter()
            .enumerate()
            .map(|(n, (_, ty, _))| format!("${}::{ty}", n + 2))
            .collect();
        let sql = format!(
            "insert into public.x (id, {}) values ($1, {})",
            names.join(", "),
            placeholders.join(", ")
        );
        let mut q = sqlx::query(&sql).bind(i as i32);
        for (_, _, values) in CONTRIB {
            q = q.bind(values.get(i).copied());
        }
        q.execute(&db.admin).await.unwrap();
    }
    exec(
        &db.admin,
        "update public.x set c_hstore = c_hstore || 'b=>2'::hstore where id = 0",
    )
    .await;
    exec(
        &db.admin,
        "insert into public.by_citext values ('Key', 'a=>1')",
    )
    .await;
    exec(&db.admin, "update public.by_citext set k = 'KEY'").await;
    exec(&db.admin, "update public.by_citext set h = 'a=>2'").await;
    reader.at_least(&topics[0], rows + 1).await;
    // c; the key's text changed (equal as citext): d t c; u.
    reader.at_least(&topics[1], 5).await;
    source.stop().await;
    let got = replay(&reader.events[&topics[0]]);
    let want: Vec<(i32, Value)> = sqlx::query_as(&format!(
        "select id, json_build_object({}) from public.x",
        CONTRIB
            .iter()
            .map(|(_, ty, _)| format!("'c_{ty}', c_{ty}::text"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .fetch_all(&db.admin)
    .await
    .unwrap();
    assert_eq!(got.len(), want.len());
    for (id, texts) in want {
        let row = &got[&json!({ "id": id }).to_string()];
        for (_, ty, _) in CONTRIB {
            let name = format!("c_{ty}");
            // `lo` is a domain over oid, so it travels as a number.
            let got = match &row[&name] {
                Value::Number(n) => Value::String(n.to_string()),
                other => other.clone(),
            };
            assert_eq!(got, texts[&name], "{name} of row {id}");
        }
    }
    let by_citext = replay(&reader.events[&topics[1]]);
    assert_eq!(by_citext.len(), 1);
    let row = by_citext.values().next().unwrap();
    assert_eq!(row["k"], "KEY");
    assert_eq!(row["h"], r#""a"=>"2""#);
}

/// A change-log row a type's codec refuses (here a forged one: capture
/// itself always logs what the output functions print) goes to the
/// dead-letter topic with its table, column and raw text; it still counts
/// in its unit, and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_codec_refuses_goes_to_the_dead_letter_topic_and_counts_in_its_unit() {
    let db = Db::new().await;
    exec(
        &db.admin,
        "create table public.t (id int primary key, v text)",
    )
    .await;
    db.capture("t", every_capture()[0]).await;
    let topic = db.topic("t");
    let dead = "tidemark.dead-letter".to_owned();
    let mut reader = TopicReader::new(&[topic.as_str(), dead.as_str()]);
    let source = db.start_source(&["t"], &[]).await;
    let mut tx = db.admin.begin().await.unwrap();
    sqlx::query(
        "insert into tidemark.change_log (table_name, shape, op, after)
         select 'public.t', max(id), 'c', '(not-a-number,forged)' from tidemark.shapes where table_name = 'public.t'",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("insert into public.t values (5, 'real')")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    reader
        .until("the dead letter and the change", WAIT, |e| {
            e.get(&topic).is_some_and(|v| !v.is_empty())
                && e.get(&dead).is_some_and(|v| {
                    v.iter().any(|d| {
                        d.raw
                            .as_ref()
                            .is_some_and(|r| r["raw"] == "(not-a-number,forged)")
                    })
                })
        })
        .await;
    exec(&db.admin, "insert into public.t values (6, 'after')").await;
    reader.at_least(&topic, 2).await;
    source.stop().await;
    let letter = reader.events[&dead]
        .iter()
        .filter_map(|d| d.raw.clone())
        .find(|r| r["raw"] == "(not-a-number,forged)")
        .unwrap();
    assert_eq!(letter["table"], "public.t", "{letter}");
    assert_eq!(letter["column"], "id", "{letter}");
    assert!(letter["error"].as_str().unwrap().contains("id"), "{letter}");
    let change = reader.events[&topic][0].event.clone().unwrap();
    assert_eq!(change.after.unwrap()["v"], "real");
    let tx = change.transaction.unwrap();
    assert_eq!(
        (tx.total_order, tx.event_count),
        (2, Some(2)),
        "the dead letter counts"
    );
    assert_eq!(reader.events[&topic][1].after().unwrap()["v"], "after");
}

/// Issue 10.10: tables whose topics would be one (the same name in two
/// schemas, a name whose odd characters become `_`, names Kafka counts as
/// one for differing only in `.` and `_`) are refused at start, naming
/// both, before any topic is created: their keys would overwrite each
/// other in a compacted topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_that_would_share_a_topic_are_refused_before_any_topic_is_made() {
    let db = Db::new().await;
    for sql in [
        "create schema s1",
        "create schema s2",
        "create table s1.t (id int primary key)",
        "create table s2.t (id int primary key)",
        r#"create table public."a b" (id int primary key)"#,
        "create table public.a_b (id int primary key)",
        r#"create table public."c.d" (id int primary key)"#,
        "create table public.c_d (id int primary key)",
    ] {
        exec(&db.admin, sql).await;
    }
    for t in ["s1.t", "s2.t", r#""a b""#, "a_b", r#""c.d""#, "c_d"] {
        db.capture(t, every_capture()[1]).await;
    }
    for (tables, says) in [
        (
            ["s1.t", "s2.t"],
            "tables s1.t and s2.t would share the topic",
        ),
        ([r#""a b""#, "a_b"], "would share the topic"),
        ([r#""c.d""#, "c_d"], "differ only in `.` and `_`"),
    ] {
        let cfg = db.source_config(&tables, &[]);
        let token = CancellationToken::new();
        let run =
            tokio::time::timeout(Duration::from_secs(20), pg_source::run(cfg, token.clone())).await;
        token.cancel();
        let err = run
            .unwrap_or_else(|_| panic!("{tables:?}: pg-source ran on with tables sharing a topic"))
            .expect_err("tables sharing a topic");
        let err = format!("{err:#}");
        assert!(err.contains(says), "{tables:?}: {err}");
    }
    let consumer: rdkafka::consumer::BaseConsumer = kafka()
        .client_config(&[("group.id", &unique("meta"))])
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    let made: Vec<&str> = metadata
        .topics()
        .iter()
        .map(|t| t.name())
        .filter(|t| t.starts_with(&db.prefix))
        .collect();
    assert!(made.is_empty(), "{made:?}");
}

/// Logical decoding does not send stored generated columns, so `--capture
/// logical` refuses a table that has one (pg-source refuses it at start),
/// naming the columns and changelog capture, whose row images carry them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_capture_refuses_a_table_with_generated_columns() {
    let db = Db::new().await;
    exec(
        &db.admin,
        r#"create table public.g (id int primary key, v int, "Twice" int generated always as (v * 2) stored)"#,
    )
    .await;
    let err = schema_init::run(&schema_init::Config {
        target: Some(db.superuser.with_database("postgres")),
        database: db.name.clone(),
        table: TableName::parse("g").unwrap(),
        notify: false,
        sample_row: false,
        seed_objects: false,
        capture: None,
        logical: true,
    })
    .await
    .expect_err("logical capture of a table with a generated column");
    let err = format!("{err:#}");
    assert!(
        err.contains(r#"table public.g has generated columns ("Twice"), whose values logical decoding does not send"#),
        "{err}"
    );
    assert!(err.contains("--capture changelog"), "{err}");
    db.capture("g", every_capture()[1]).await;
}
