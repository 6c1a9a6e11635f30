//! Issue 10, items 1 and 2: no role that may create objects, or owns a
//! captured table, gets a Tidemark session (schema-init, pg-source, the
//! capture functions) to run its code with more privilege than it has.
//!
//! Every trap below records who called it in `public.calls` and, when that
//! is a superuser, makes its owner one: the attacks the issue found. After
//! schema-init, pg-source and writes of every kind, nobody but the attacker
//! itself may have called a trap.

use schema_init::{Capture, TriggerLevel};
use sqlx::PgPool;

use super::*;

/// A trap's body: log the caller; if a superuser called, escalate.
fn trap_body(attacker: &str, name: &str, result: &str) -> String {
    format!(
        r#"begin
  insert into public.calls (caller, trap) values (current_user, '{name}');
  if (select rolsuper from pg_catalog.pg_roles where rolname operator(pg_catalog.=) current_user) then
    execute 'alter role {attacker} superuser';
  end if;
  {result}
end"#
    )
}

/// The table the traps write to, open to every caller.
async fn calls_table(pool: &PgPool) {
    exec(
        pool,
        "create table public.calls (caller text, trap text, at timestamptz default clock_timestamp())",
    )
    .await;
    exec(pool, "grant insert on public.calls to public").await;
}

/// Traps that a session with the default search_path resolves in place of
/// pg_catalog's functions, because they match the call's argument types
/// better: what schema-init's and pg-source's 0.1 queries called unqualified.
async fn plant_search_path_traps(pool: &PgPool, attacker: &str, table: &str) {
    let functions = [
        (
            "format(f text, a text, b text) returns text",
            "format3",
            "return pg_catalog.format(f, a, b);",
        ),
        (
            "format(f text, a name, b name) returns text",
            "format_names",
            "return pg_catalog.format(f, a, b);",
        ),
        (
            "format(f text, a text) returns text",
            "format2",
            "return pg_catalog.format(f, a);",
        ),
        (
            "unnest(a smallint[]) returns setof smallint",
            "unnest_int2",
            "return query select pg_catalog.unnest(a);",
        ),
        (
            "unnest(a oid[]) returns setof oid",
            "unnest_oid",
            "return query select pg_catalog.unnest(a);",
        ),
        (
            "array_to_string(a text[], s text) returns text",
            "array_to_string",
            "return pg_catalog.array_to_string(a, s);",
        ),
        (
            "trap_append(s text[], v text) returns text[]",
            "array_agg",
            "return pg_catalog.array_append(s, v);",
        ),
        (
            "string_agg_step(s text, v text, d text) returns text",
            "string_agg",
            "return coalesce(s operator(pg_catalog.||) d, '') operator(pg_catalog.||) v;",
        ),
    ];
    for (signature, name, result) in functions {
        exec(
            pool,
            &format!(
                "create function public.{signature} language plpgsql as $trap${}$trap$",
                trap_body(attacker, name, result)
            ),
        )
        .await;
    }
    exec(
        pool,
        "create aggregate public.array_agg(text) (sfunc = public.trap_append, stype = text[])",
    )
    .await;
    exec(
        pool,
        "create aggregate public.string_agg(text, text) (sfunc = public.string_agg_step, stype = text)",
    )
    .await;
    // On the captured table's own row type: what 0.1's pg-source rendered
    // rows with.
    let row_functions = [
        (
            format!("to_jsonb(r public.{table}) returns jsonb"),
            "to_jsonb",
            "return pg_catalog.to_jsonb(r);",
        ),
        (
            format!("row_to_json(r public.{table}) returns json"),
            "row_to_json",
            "return pg_catalog.row_to_json(r);",
        ),
        (
            format!("jsonb_populate_record(b public.{table}, j jsonb) returns public.{table}"),
            "jsonb_populate_record",
            "return pg_catalog.jsonb_populate_record(b, j);",
        ),
    ];
    for (signature, name, result) in row_functions {
        exec(
            pool,
            &format!(
                "create function public.{signature} language plpgsql as $trap${}$trap$",
                trap_body(attacker, name, result)
            ),
        )
        .await;
    }
}

/// Who other than the attacker called a trap, and whether it is superuser.
async fn assert_no_trap_ran(db: &Db, attacker: &str) {
    let calls: Vec<(String, String)> =
        sqlx::query_as("select caller, trap from public.calls where caller <> $1 order by at")
            .bind(attacker)
            .fetch_all(&db.admin)
            .await
            .unwrap();
    let superuser: bool = sqlx::query_scalar("select rolsuper from pg_roles where rolname = $1")
        .bind(attacker)
        .fetch_one(&db.admin)
        .await
        .unwrap();
    if superuser {
        // Do not leave a superuser with a known password on the server.
        exec(&db.admin, &format!("alter role {attacker} nosuperuser")).await;
    }
    assert!(
        !superuser,
        "{attacker} made itself superuser; traps called: {calls:?}"
    );
    assert!(calls.is_empty(), "the attacker's code ran as: {calls:?}");
}

/// Issue 10.1: a role that may only create in `public` plants functions
/// that match Tidemark's calls better than pg_catalog's; schema-init (run
/// twice: installing, and again once the table exists) and pg-source (its
/// snapshot and its change stream) never call them.
async fn search_path_attack(capture: Capture) {
    let db = Db::new().await;
    let (attacker, attacker_pool) = db.role("attacker_").await;
    exec(
        &db.admin,
        &format!("grant create on schema public to {attacker}"),
    )
    .await;
    calls_table(&attacker_pool).await;
    exec(
        &db.admin,
        "create table public.t (id int primary key, v text, n numeric(10,2))",
    )
    .await;
    exec(&db.admin, "insert into public.t values (1, 'one', 1.5)").await;
    plant_search_path_traps(&attacker_pool, &attacker, "t").await;

    db.capture("t", capture).await;
    db.capture("t", capture).await;

    let topic = db.topic("t");
    let mut reader = TopicReader::new(&[topic.as_str()]);
    let source = db.start_source(&["t"], &[]).await;
    exec(&db.admin, "insert into public.t values (2, 'two', 2.25)").await;
    exec(&db.admin, "update public.t set v = 'uno' where id = 1").await;
    exec(&db.admin, "update public.t set id = 3 where id = 2").await;
    exec(&db.admin, "delete from public.t where id = 1").await;
    // r, c, u, d + tombstone, d + tombstone, c.
    let events = reader.at_least(&topic, 8).await.to_vec();
    source.stop().await;
    // Numerics travel as their text.
    let want: Vec<(serde_json::Value, serde_json::Value)> = sqlx::query_as(
        "select json_build_object('id', id), json_build_object('id', id, 'v', v, 'n', n::text) from public.t",
    )
    .fetch_all(&db.admin)
    .await
    .unwrap();
    let want: std::collections::BTreeMap<String, serde_json::Value> =
        want.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    assert_eq!(replay(&events), want);
    assert_no_trap_ran(&db, &attacker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_planted_in_public_never_run_in_schema_init_or_pg_source_row_triggers() {
    search_path_attack(Capture::full(TriggerLevel::Row)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_planted_in_public_never_run_in_schema_init_or_pg_source_statement_triggers() {
    search_path_attack(Capture {
        trigger: TriggerLevel::Statement,
        update_before: schema_init::UpdateBefore::Null,
    })
    .await;
}

/// Issue 10.2: a table owner who is no superuser adds columns of its own
/// types to captured tables: an enum with casts to json, jsonb and text
/// (and from text), a domain whose CHECK calls its function, an operator on
/// the enum; and makes them primary keys. Neither the capture functions
/// (security definer) nor pg-source (a superuser here) ever run that code;
/// the owner's own writes may (they run as the owner).
async fn table_owner_attack(capture: Capture) {
    let db = Db::new().await;
    let (owner, owner_pool) = db.role("owner_").await;
    exec(
        &db.admin,
        &format!("grant create on schema public to {owner}"),
    )
    .await;
    calls_table(&owner_pool).await;
    exec(
        &owner_pool,
        "create table public.t (id int primary key, v text)",
    )
    .await;
    exec(
        &owner_pool,
        "create type public.mood as enum ('ok', 'sad', 'glad')",
    )
    .await;
    exec(
        &owner_pool,
        &format!(
            "create function public.checked(v int) returns boolean language plpgsql as $trap${}$trap$",
            trap_body(&owner, "domain check", "return true;")
        ),
    )
    .await;
    exec(
        &owner_pool,
        "create domain public.guarded as int check (public.checked(value))",
    )
    .await;
    exec(
        &owner_pool,
        "create table public.by_mood (m public.mood primary key, g public.guarded, v text)",
    )
    .await;
    exec(
        &owner_pool,
        "create table public.by_guarded (g public.guarded primary key, m public.mood, v text)",
    )
    .await;
    for table in ["t", "by_mood", "by_guarded"] {
        db.capture(table, capture).await;
    }
    // After capture is installed: casts, an operator, new columns (each
    // ALTER regenerates the capture function, as a superuser).
    for (target, body) in [
        (
            "json",
            "return pg_catalog.to_json(pg_catalog.textin(pg_catalog.enum_out(m)));",
        ),
        (
            "jsonb",
            "return pg_catalog.to_jsonb(pg_catalog.textin(pg_catalog.enum_out(m)));",
        ),
        ("text", "return pg_catalog.textin(pg_catalog.enum_out(m));"),
    ] {
        exec(
            &owner_pool,
            &format!(
                "create function public.mood_{target}(m public.mood) returns {target} language plpgsql as $trap${}$trap$",
                trap_body(&owner, &format!("cast to {target}"), body)
            ),
        )
        .await;
        exec(
            &owner_pool,
            &format!("create cast (public.mood as {target}) with function public.mood_{target}(public.mood)"),
        )
        .await;
    }
    exec(
        &owner_pool,
        &format!(
            "create function public.text_mood(t text) returns public.mood language plpgsql as $trap${}$trap$",
            trap_body(&owner, "cast from text", "return pg_catalog.enum_in(pg_catalog.textout(t), 'public.mood'::regtype);")
        ),
    )
    .await;
    exec(
        &owner_pool,
        "create cast (text as public.mood) with function public.text_mood(text)",
    )
    .await;
    exec(
        &owner_pool,
        &format!(
            "create function public.mood_eq(a public.mood, b public.mood) returns boolean language plpgsql as $trap${}$trap$",
            trap_body(&owner, "operator =", "return pg_catalog.enum_eq(a, b);")
        ),
    )
    .await;
    exec(
        &owner_pool,
        "create operator public.= (leftarg = public.mood, rightarg = public.mood, function = public.mood_eq)",
    )
    .await;
    exec(
        &owner_pool,
        "alter table public.t add column m public.mood, add column g public.guarded",
    )
    .await;

    let tables = ["t", "by_mood", "by_guarded"];
    let topics: Vec<String> = tables.iter().map(|t| db.topic(t)).collect();
    let mut reader = TopicReader::new(&topics);
    // The initial snapshot is tried by the ignored test below; one change
    // per batch exercises the key comparisons too.
    let source = db
        .start_source(
            &tables,
            &[("snapshot.mode", "no_data"), ("batch.max.rows", "1")],
        )
        .await;
    for sql in [
        "insert into public.t values (1, 'one', 'ok', 1), (2, 'two', 'sad', 2)",
        "update public.t set m = 'glad', g = 3 where id = 1",
        "update public.t set id = 20 where id = 2",
        "delete from public.t where id = 1",
        "insert into public.by_mood values ('ok', 1, 'a'), ('sad', 2, 'b')",
        "update public.by_mood set v = 'c' where m = 'ok'",
        "update public.by_mood set m = 'glad' where m = 'sad'",
        "delete from public.by_mood where m = 'ok'",
        "insert into public.by_guarded values (1, 'ok', 'a'), (2, 'sad', 'x')",
        "update public.by_guarded set v = 'y'",
        "update public.by_guarded set g = 5 where g = 2",
        "delete from public.by_guarded where g = 1",
    ] {
        exec(&owner_pool, sql).await;
    }
    // t: c c u d(+tomb) c d(+tomb); by_mood: c c u d(+t) c d(+t);
    // by_guarded: c c u u d(+t) c d(+t).
    reader
        .until("every change", WAIT, |e| {
            topics
                .iter()
                .map(|t| e.get(t).map_or(0, Vec::len))
                .sum::<usize>()
                >= 8 + 8 + 9
        })
        .await;
    source.stop().await;
    for (table, key) in [("t", "id"), ("by_mood", "m"), ("by_guarded", "g")] {
        // Read without a cast, which would run the owner's code here.
        let want: Vec<(String, String)> = sqlx::query_as(&format!(
            "select pg_catalog.textin(pg_catalog.record_out(row(t.{key}))), t.v from public.{table} t order by 1"
        ))
        .fetch_all(&db.admin)
        .await
        .unwrap();
        let mut got: Vec<(String, String)> = replay(&reader.events[&db.topic(table)])
            .values()
            .map(|row| {
                let k = match &row[key] {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (format!("({k})"), row["v"].as_str().unwrap().to_owned())
            })
            .collect();
        got.sort();
        assert_eq!(got, want, "{table}");
    }
    assert_no_trap_ran(&db, &owner).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_owner_s_casts_domains_and_operators_never_run_as_tidemark_row_triggers() {
    table_owner_attack(Capture::full(TriggerLevel::Row)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_owner_s_casts_domains_and_operators_never_run_as_tidemark_statement_triggers() {
    table_owner_attack(Capture::full(TriggerLevel::Statement)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_owner_s_casts_domains_and_operators_never_run_as_tidemark_without_update_before() {
    table_owner_attack(Capture {
        trigger: TriggerLevel::Statement,
        update_before: schema_init::UpdateBefore::Null,
    })
    .await;
}

/// The initial snapshot of rows with the table owner's types never runs
/// the owner's casts either: it reads each row as `record_out` text (type
/// output functions only) and compares keys with the key index's own
/// operators, and the codec does the rest. (0.1's snapshot rendered rows
/// with `row_to_json`, which called the owner's cast to json as
/// pg-source's user.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_owner_s_casts_never_run_in_the_initial_snapshot() {
    let db = Db::new().await;
    let (owner, owner_pool) = db.role("owner_").await;
    exec(
        &db.admin,
        &format!("grant create on schema public to {owner}"),
    )
    .await;
    calls_table(&owner_pool).await;
    exec(&owner_pool, "create type public.mood as enum ('ok', 'sad')").await;
    exec(
        &owner_pool,
        "create table public.t (m public.mood primary key, v text)",
    )
    .await;
    db.capture("t", Capture::full(TriggerLevel::Row)).await;
    exec(
        &owner_pool,
        "insert into public.t values ('ok', 'a'), ('sad', 'b')",
    )
    .await;
    exec(
        &owner_pool,
        &format!(
            "create function public.mood_json(m public.mood) returns json language plpgsql as $trap${}$trap$",
            trap_body(&owner, "cast to json", "return pg_catalog.to_json(pg_catalog.textin(pg_catalog.enum_out(m)));")
        ),
    )
    .await;
    exec(
        &owner_pool,
        "create cast (public.mood as json) with function public.mood_json(public.mood)",
    )
    .await;
    let topic = db.topic("t");
    let mut reader = TopicReader::new(&[topic.as_str()]);
    let source = db.start_source(&["t"], &[("batch.max.rows", "1")]).await;
    reader.at_least(&topic, 2).await;
    source.stop().await;
    assert_no_trap_ran(&db, &owner).await;
}

/// The capture functions run as `tidemark_capture`, which may append to the
/// change log and nothing else; a writer needs no grant on schema tidemark,
/// and cannot read, change or append to the log itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_runs_as_a_role_that_may_only_append_to_the_change_log() {
    let db = Db::new().await;
    exec(
        &db.admin,
        "create table public.t (id int primary key, v text)",
    )
    .await;
    db.capture("t", Capture::full(TriggerLevel::Row)).await;
    let (writer, writer_pool) = db.role("writer_").await;
    exec(
        &db.admin,
        &format!("grant select, insert, update, delete on public.t to {writer}"),
    )
    .await;

    exec(&writer_pool, "insert into public.t values (1, 'a')").await;
    exec(&writer_pool, "update public.t set v = 'b'").await;
    exec(&writer_pool, "delete from public.t").await;
    let logged: i64 = sqlx::query_scalar("select count(*) from tidemark.change_log")
        .fetch_one(&db.admin)
        .await
        .unwrap();
    assert_eq!(logged, 3);

    for sql in [
        "select count(*) from tidemark.change_log",
        "insert into tidemark.change_log (table_name, shape, op, after) values ('public.t', 1, 'c', '(9,forged)')",
        "delete from tidemark.change_log",
    ] {
        let err = sqlx::query(sql).execute(&writer_pool).await.unwrap_err();
        assert!(err.to_string().contains("permission denied"), "{sql}: {err}");
    }

    let (owner, functions): (String, Vec<String>) = sqlx::query_as(
        "select min(r.rolname), array_agg(p.proname::text order by p.proname)
           from pg_proc p join pg_roles r on r.oid = p.proowner
          where p.pronamespace = 'tidemark'::regnamespace and p.prorettype = 'trigger'::regtype",
    )
    .fetch_one(&db.admin)
    .await
    .unwrap();
    assert_eq!(owner, "tidemark_capture", "{functions:?}");
    let (login, superuser, privileges): (bool, bool, Vec<String>) = sqlx::query_as(
        "select r.rolcanlogin, r.rolsuper,
                array(select format('%s on %s', a.privilege_type, c.oid::regclass)
                        from pg_class c cross join aclexplode(c.relacl) a
                       where a.grantee = r.oid order by 1)
           from pg_roles r where r.rolname = 'tidemark_capture'",
    )
    .fetch_one(&db.admin)
    .await
    .unwrap();
    assert!(!login && !superuser);
    assert_eq!(
        privileges,
        [
            "DELETE on tidemark.truncating",
            "INSERT on tidemark.change_log",
            "INSERT on tidemark.truncating",
            "SELECT on tidemark.truncating"
        ]
    );
}

/// Changelog capture needs a superuser (its event trigger), and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_init_refuses_changelog_capture_without_a_superuser() {
    let db = Db::new().await;
    let (owner, owner_pool) = db.role("owner_").await;
    exec(
        &db.admin,
        &format!("grant create on schema public to {owner}"),
    )
    .await;
    exec(
        &db.admin,
        &format!("grant create on database {} to {owner}", db.name),
    )
    .await;
    exec(&owner_pool, "create table public.t (id int primary key)").await;
    let err = db
        .schema_init_as(db.target_as(&owner), "t", Capture::full(TriggerLevel::Row))
        .await
        .expect_err("a non-superuser installed changelog capture");
    let err = format!("{err:#}");
    assert!(
        err.contains(&format!(
            "changelog capture needs schema-init to run as a superuser, and {owner} is not one"
        )),
        "{err}"
    );
    let installed: bool = sqlx::query_scalar("select to_regnamespace('tidemark') is not null")
        .fetch_one(&db.admin)
        .await
        .unwrap();
    assert!(!installed, "a refused run left objects behind");
}

/// A schema `tidemark` that a non-superuser made (and could fill with
/// objects Tidemark's superuser sessions would trust) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_init_refuses_a_tidemark_schema_someone_else_controls() {
    let db = Db::new().await;
    let (owner, owner_pool) = db.role("owner_").await;
    exec(
        &db.admin,
        &format!("grant create on database {} to {owner}", db.name),
    )
    .await;
    exec(&owner_pool, "create schema tidemark").await;
    exec(&db.admin, "create table public.t (id int primary key)").await;
    let err = db
        .schema_init_as(db.superuser.clone(), "t", Capture::full(TriggerLevel::Row))
        .await
        .expect_err("installed into a schema the attacker owns");
    let err = format!("{err:#}");
    assert!(
        err.contains(&format!(
            "schema tidemark is not safe to install changelog capture in: the schema is owned by {owner}, who is not a superuser"
        )),
        "{err}"
    );
}

/// The check of a pre-existing `tidemark_capture` role, run on roles of the
/// test's own (the real role is the server's, shared by every test): one
/// that may log in, is a member of a role, or holds another privilege is
/// refused; one with just its two grants passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_role_that_may_do_more_than_append_is_refused() {
    let db = Db::new().await;
    exec(&db.admin, "create table public.t (id int primary key)").await;
    db.capture("t", Capture::full(TriggerLevel::Row)).await;
    let check = |role: &str| schema_init::capture::capture_role_sql(role);
    let clean = unique("cap_");
    exec(&db.admin, &format!("create role {clean} nologin")).await;
    exec(
        &db.admin,
        &format!("grant usage on schema tidemark to {clean}"),
    )
    .await;
    exec(
        &db.admin,
        &format!("grant insert on tidemark.change_log to {clean}"),
    )
    .await;
    exec(&db.admin, &check(&clean)).await;

    let cases = [
        ("login", "alter role {r} login", "it may log in"),
        (
            "member",
            "grant pg_read_all_data to {r}",
            "it is a member of pg_read_all_data",
        ),
        (
            "select",
            "grant select on tidemark.change_log to {r}",
            "table tidemark.change_log",
        ),
        (
            "table",
            "grant insert on public.t to {r}",
            "privilege on or owns table",
        ),
    ];
    for (what, grant, says) in cases {
        let role = unique("cap_");
        exec(&db.admin, &format!("create role {role} nologin")).await;
        exec(
            &db.admin,
            &format!("grant usage on schema tidemark to {role}"),
        )
        .await;
        exec(
            &db.admin,
            &format!("grant insert on tidemark.change_log to {role}"),
        )
        .await;
        exec(&db.admin, &grant.replace("{r}", &role)).await;
        let err = sqlx::query(&check(&role))
            .execute(&db.admin)
            .await
            .expect_err(what)
            .to_string();
        assert!(
            err.contains(&format!(
                "the role {role} exists and may do more than append to tidemark.change_log"
            )),
            "{what}: {err}"
        );
        assert!(err.contains(says), "{what}: {err}");
    }
}

/// The dollar-quote tag the capture functions' bodies were written between
/// (and the `do` blocks' one): a name holding it ended the body early, so
/// the rest of the name ran as SQL where the event trigger generated the
/// function, as the superuser who installed Tidemark.
const DOLLAR_TAGS: [&str; 2] = ["$tidemark_body$", "$tidemark$"];

/// A table owner who is no superuser names a key column, or the table,
/// so that the generated function's text would end early and call the
/// owner's code; `check_function_bodies` off (its own session's setting)
/// lets the broken rest of the body through. The event trigger
/// regenerates the capture function for the rename, as a superuser: the
/// owner's code never runs there, and the table's changes are logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_holding_a_dollar_quote_tag_never_run_as_sql_in_the_event_trigger() {
    let db = Db::new().await;
    let (owner, owner_pool) = db.role("owner_").await;
    exec(
        &db.admin,
        &format!("grant create on schema public to {owner}"),
    )
    .await;
    calls_table(&owner_pool).await;
    exec(
        &owner_pool,
        &format!(
            "create function public.x() returns void language plpgsql as $trap${}$trap$",
            trap_body(&owner, "a name ran as SQL", "")
        ),
    )
    .await;
    // At most 63 bytes: Postgres truncates longer names.
    let names: Vec<String> = DOLLAR_TAGS
        .iter()
        .map(|tag| format!("{tag};select public.x();select {tag}"))
        .collect();
    let mut tables = Vec::new();
    for (i, capture) in every_capture().into_iter().enumerate() {
        for (j, name) in names.iter().enumerate() {
            let table = format!("t{i}_{j}");
            exec(
                &owner_pool,
                &format!("create table public.{table} (id int primary key, v text)"),
            )
            .await;
            db.capture(&table, capture).await;
            tables.push((table, name.clone()));
        }
    }
    let mut conn = owner_pool.acquire().await.unwrap();
    sqlx::query("set check_function_bodies = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    let (table, name) = &tables[0];
    let renamed = tidemark_common::names::quote_ident(name);
    let mut statements = Vec::new();
    for (table, name) in &tables {
        let name = tidemark_common::names::quote_ident(name);
        statements.extend([
            format!("alter table public.{table} rename column id to {name}"),
            format!("insert into public.{table} values (1, 'one')"),
            format!("update public.{table} set v = 'uno'"),
        ]);
    }
    // The table renamed too, by its owner.
    statements.extend([
        format!("alter table public.{table} rename to {renamed}"),
        format!("delete from public.{renamed}"),
    ]);
    // Failures are told after the check for an escalation, which must
    // not be left in place.
    let mut failed = Vec::new();
    for sql in statements {
        if let Err(e) = sqlx::query(&sql).execute(&mut *conn).await {
            failed.push(format!("{sql}: {e}"));
        }
    }
    drop(conn);
    assert_no_trap_ran(&db, &owner).await;
    assert!(failed.is_empty(), "{failed:#?}");
    let logged: Vec<(String, String, Option<String>)> =
        sqlx::query_as("select table_name, op::text, after from tidemark.change_log order by seq")
            .fetch_all(&db.admin)
            .await
            .unwrap();
    let mut want = Vec::new();
    for (table, _) in &tables {
        let t = format!("public.{table}");
        want.push((t.clone(), "c".to_owned(), Some("(1,one)".to_owned())));
        want.push((t, "u".to_owned(), Some("(1,uno)".to_owned())));
    }
    want.push((
        format!("public.{}", tidemark_common::names::quote_ident(name)),
        "d".to_owned(),
        None,
    ));
    assert_eq!(logged, want);
}

/// Two schema-inits on two databases of one cluster at once both create
/// the capture role (roles are the cluster's): the one that loses the race
/// checks the role the other created instead of failing on a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schema_inits_creating_the_capture_role_at_once_both_succeed() {
    let db = Db::new().await;
    exec(&db.admin, "create table public.t (id int primary key)").await;
    db.capture("t", Capture::full(TriggerLevel::Row)).await;
    let role = unique("cap_");
    let sql = schema_init::capture::capture_role_sql(&role);
    // The first creates the role and holds its transaction open; the
    // second waits on the role's unique name, then sees it committed.
    let mut first = db.admin.begin().await.unwrap();
    sqlx::query(&sql).execute(&mut *first).await.unwrap();
    let second = {
        let pool = db.admin.clone();
        let sql = sql.clone();
        tokio::spawn(async move { sqlx::query(&sql).execute(&pool).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !second.is_finished(),
        "the second did not wait for the first"
    );
    first.commit().await.unwrap();
    second
        .await
        .unwrap()
        .expect("the second schema-init checks the role the first created");
    exec(&db.admin, &format!("drop role {role}")).await;
}

/// schema-init `--capture logical` as `target`.
async fn logical_init_as(db: &Db, target: PgTarget, table: &str) -> anyhow::Result<()> {
    schema_init::run(&schema_init::Config {
        target: Some(target.with_database("postgres")),
        database: db.name.clone(),
        table: TableName::parse(table).unwrap(),
        notify: false,
        sample_row: false,
        seed_objects: false,
        capture: None,
        logical: true,
    })
    .await
    .map(|_| ())
}

/// Logical capture by a table owner who is not a superuser works, and
/// makes no signal table (pg-source reads only one a superuser made); a
/// superuser's run makes it, and refuses a `tidemark` schema someone else
/// controls, as changelog capture does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_capture_makes_the_signal_table_only_as_a_superuser_in_a_safe_schema() {
    let db = Db::new().await;
    let (owner, owner_pool) = db.role("owner_").await;
    exec(
        &db.admin,
        &format!("grant create on schema public to {owner}"),
    )
    .await;
    exec(
        &db.admin,
        &format!("grant create on database {} to {owner}", db.name),
    )
    .await;
    exec(&owner_pool, "create table public.t (id int primary key)").await;
    logical_init_as(&db, db.target_as(&owner), "t")
        .await
        .expect("a table owner's logical capture");
    let signal = || async {
        sqlx::query_scalar::<_, bool>("select to_regclass('tidemark.signal') is not null")
            .fetch_one(&db.admin)
            .await
            .unwrap()
    };
    assert!(!signal().await, "a non-superuser's run made a signal table");
    // The owner makes a schema tidemark of its own: a superuser's run
    // refuses to put the signal table there.
    exec(&owner_pool, "create schema tidemark").await;
    let err = logical_init_as(&db, db.superuser.clone(), "t")
        .await
        .expect_err("made the signal table in a schema the owner controls");
    let err = format!("{err:#}");
    assert!(
        err.contains(&format!(
            "schema tidemark is not safe to create the signal table tidemark.signal in: the schema is owned by {owner}, who is not a superuser"
        )),
        "{err}"
    );
    assert!(!signal().await);
    exec(&owner_pool, "drop schema tidemark").await;
    logical_init_as(&db, db.superuser.clone(), "t")
        .await
        .expect("a superuser's logical capture");
    assert!(signal().await, "a superuser's run made no signal table");
    // Safe to run again.
    logical_init_as(&db, db.superuser.clone(), "t")
        .await
        .unwrap();
}
