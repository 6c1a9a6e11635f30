//! The sessions Tidemark opens: their settings, and that nothing a less
//! privileged role can create in `public` is resolved by them.

use std::time::Duration;

use crate::support::*;

async fn exec(pool: &sqlx::PgPool, sql: &str) {
    sqlx::query(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The database's own defaults differ from every setting Tidemark fixes;
/// a session from `common::pg` (the pool pg-source and schema-init read
/// and write through) still shows Tidemark's.
#[tokio::test]
async fn tidemark_sessions_show_their_search_path_and_codec_settings_whatever_the_database_sets() {
    let fx = Fixture::new().await;
    for (name, value) in [
        ("search_path", "public, pg_catalog"),
        ("DateStyle", "SQL, DMY"),
        ("IntervalStyle", "postgres"),
        ("TimeZone", "Europe/Berlin"),
        ("extra_float_digits", "0"),
        ("bytea_output", "escape"),
        ("standard_conforming_strings", "off"),
        ("row_security", "on"),
    ] {
        // A list is written unquoted, a single value quoted.
        let value = match name {
            "search_path" => value.to_owned(),
            _ => format!("'{value}'"),
        };
        exec(
            &fx.pool,
            &format!("alter database \"{}\" set {name} = {value}", fx.database),
        )
        .await;
    }
    // The settings apply to sessions opened from now on.
    let user = user_pool(&fx.database, 1).await;
    let users: String = sqlx::query_scalar("select current_setting('search_path')")
        .fetch_one(&user)
        .await
        .unwrap();
    assert_eq!(
        users, "public, pg_catalog",
        "the database's default applies to the user"
    );

    let pool = fx.target.connect(1, Duration::from_secs(10)).await.unwrap();
    for (name, want) in [
        ("search_path", "pg_catalog, pg_temp"),
        ("DateStyle", "ISO, DMY"),
        ("IntervalStyle", "iso_8601"),
        ("TimeZone", "UTC"),
        ("extra_float_digits", "3"),
        ("bytea_output", "hex"),
        ("lc_monetary", "C"),
        ("client_encoding", "UTF8"),
        ("standard_conforming_strings", "on"),
        ("row_security", "off"),
    ] {
        let got: String = sqlx::query_scalar("select pg_catalog.current_setting($1)")
            .bind(name)
            .fetch_one(&pool)
            .await
            .unwrap();
        // DateStyle: sqlx's own startup parameter says `ISO, MDY`; the
        // output style is what the codec needs.
        if name == "DateStyle" {
            assert!(got.starts_with("ISO,"), "{name} = {got}");
        } else {
            assert_eq!(got, want, "{name}");
        }
    }
}

/// Functions and operators with a better-matching signature than the
/// `pg_catalog` ones Tidemark's SQL calls (the attack of issue 10.1: a
/// `public.format(text, text, text)` beats `pg_catalog.format(text,
/// variadic "any")`), each raising an error when called, planted before
/// schema-init runs again and pg-source starts. Every statement of both
/// programs goes through `common::pg`'s sessions, so none resolves them.
async fn plant_functions(pool: &sqlx::PgPool) {
    let raise =
        |what: &str| format!("begin raise exception 'planted public.{what} was called'; end");
    let functions: &[(&str, &str, &str)] = &[
        ("format", "text, text", "text"),
        ("format", "text, text, text", "text"),
        ("format", "text, text, text, text", "text"),
        ("format", "text, name", "text"),
        ("format", "text, text, name", "text"),
        ("array_to_string", "text[], text", "text"),
        ("array_to_string", "name[], text", "text"),
        ("unnest", "text[]", "setof text"),
        ("unnest", "name[]", "setof name"),
        ("unnest", "oid[]", "setof oid"),
        ("unnest", "smallint[]", "setof smallint"),
        ("unnest", "integer[]", "setof integer"),
        ("unnest", "bigint[]", "setof bigint"),
        ("quote_ident", "name", "text"),
        ("quote_literal", "name", "text"),
        ("to_jsonb", "record", "jsonb"),
        ("to_jsonb", "text", "jsonb"),
        ("to_json", "record", "json"),
        ("row_to_json", "public.streaming_update_table", "json"),
        (
            "jsonb_populate_record",
            "public.streaming_update_table, jsonb",
            "public.streaming_update_table",
        ),
        ("to_timestamp", "numeric", "timestamptz"),
        ("to_timestamp", "bigint", "timestamptz"),
        ("to_timestamp", "integer", "timestamptz"),
        ("concat", "text, text", "text"),
        ("jsonb_build_object", "text, text", "jsonb"),
        ("json_build_object", "text, text", "json"),
    ];
    for (name, args, returns) in functions {
        exec(
            pool,
            &format!(
                "create function public.{name}({args}) returns {returns} language plpgsql as $p${}$p$",
                raise(&format!("{name}({args})"))
            ),
        )
        .await;
    }
    // Aggregates: the final function runs even over no rows.
    for (name, args, state) in [
        ("array_agg", "text", "text[]"),
        ("array_agg", "name", "name[]"),
        ("array_agg", "oid", "oid[]"),
        ("string_agg", "name, text", "text"),
        ("jsonb_agg", "record", "jsonb"),
        ("json_agg", "record", "json"),
    ] {
        let tag = format!("{name}_{}", args.replace([',', ' ', '[', ']'], ""));
        exec(
            pool,
            &format!(
                "create function public.planted_step_{tag}(s {state}, {}) returns {state} language plpgsql as $p$begin return s; end$p$",
                args.split(", ")
                    .enumerate()
                    .map(|(i, t)| format!("a{i} {t}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .await;
        exec(
            pool,
            &format!(
                "create function public.planted_final_{tag}(s {state}) returns {state} language plpgsql as $p${}$p$",
                raise(&format!("{name}({args})"))
            ),
        )
        .await;
        exec(
            pool,
            &format!(
                "create aggregate public.{name}({args}) (sfunc = public.planted_step_{tag}, stype = {state}, finalfunc = public.planted_final_{tag})"
            ),
        )
        .await;
    }
    for (op, left, right, returns) in [
        ("=", "oid", "regclass", "boolean"),
        ("=", "regclass", "oid", "boolean"),
        ("||", "text", "name", "text"),
        ("||", "text", "integer", "text"),
        ("||", "text", "bigint", "text"),
        ("||", "text", "oid", "text"),
        ("*", "bigint", "interval", "interval"),
        ("/", "bigint", "numeric", "numeric"),
        ("<", "timestamptz", "timestamp", "boolean"),
        (">", "timestamptz", "timestamp", "boolean"),
    ] {
        let tag = format!(
            "{}_{left}_{right}",
            match op {
                "=" => "eq",
                "||" => "cat",
                "*" => "mul",
                "/" => "div",
                "<" => "lt",
                _ => "gt",
            }
        );
        exec(
            pool,
            &format!(
                "create function public.planted_op_{tag}(a {left}, b {right}) returns {returns} language plpgsql as $p${}$p$",
                raise(&format!("operator {op}({left}, {right})"))
            ),
        )
        .await;
        exec(
            pool,
            &format!(
                "create operator public.{op} (leftarg = {left}, rightarg = {right}, function = public.planted_op_{tag})"
            ),
        )
        .await;
    }
}

/// Plants the functions, streams a few changes through pg-source and
/// file-sink, then runs schema-init again on the fixture's database.
async fn planted_functions_are_never_called(fx: Fixture, expected_lines: usize) {
    plant_functions(&fx.pool).await;
    // Changes made once pg-source has its starting point arrive as changes.
    let source = fx.start_source_with(&[]).ready().await;
    let sink = fx.start_sink();
    exec(
        &fx.pool,
        "insert into streaming_update_table (data) values ('planted 1'), ('planted 2')",
    )
    .await;
    exec(
        &fx.pool,
        "update streaming_update_table set data = 'planted 3' where data = 'planted 2'",
    )
    .await;
    wait_for_lines(&fx.file(), expected_lines, Duration::from_secs(60)).await;
    source.assert_running();
    sink.assert_running();
    source.stop().await.expect("pg-source stops cleanly");
    sink.stop().await.expect("file-sink stops cleanly");
    if fx.logical {
        fx.drop_slot().await;
    }
    schema_init::run(&fx.init)
        .await
        .expect("schema-init runs again without calling what is planted in public");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_public_functions_are_not_called_in_timestamp_mode() {
    // The sample row and the two new rows (the update may merge with its
    // insert into one row state).
    planted_functions_are_never_called(Fixture::new().await, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_public_functions_are_not_called_in_changelog_mode() {
    // The sample row's snapshot, two inserts and the update.
    for capture in [
        schema_init::TriggerLevel::Statement,
        schema_init::TriggerLevel::Row,
    ] {
        planted_functions_are_never_called(Fixture::changelog(capture).await, 4).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_public_functions_are_not_called_in_logical_mode() {
    planted_functions_are_never_called(Fixture::logical().await, 4).await;
}

/// A table whose row-level security policy applies to Tidemark's role: a
/// Tidemark session gets an error naming the policy, not the rows the
/// policy lets through (a snapshot or a poll would silently miss the
/// others), and the policy's expression (the table owner's code) never runs.
#[tokio::test]
async fn a_row_level_security_policy_is_an_error_in_tidemark_sessions_not_a_partial_read() {
    let fx = Fixture::new().await;
    let role = unique("tm_rls_");
    for sql in [
        format!("create role {role} login password 'pw'"),
        "create table rls_t (id int primary key)".to_owned(),
        "insert into rls_t select generate_series(1, 10)".to_owned(),
        "alter table rls_t enable row level security".to_owned(),
        "create policy even on rls_t using (id % 2 = 0)".to_owned(),
        format!("grant select on rls_t to {role}"),
    ] {
        exec(&fx.pool, &sql).await;
    }
    let url = url::Url::parse(&database_url()).unwrap();
    let as_role = format!(
        "postgres://{role}:pw@{}:{}/{}",
        url.host_str().unwrap(),
        url.port().unwrap_or(5432),
        fx.database
    );
    // The role's own session sees half of the rows, silently.
    let plain = sqlx::PgPool::connect(&as_role).await.unwrap();
    let seen: i64 = sqlx::query_scalar("select count(*) from rls_t")
        .fetch_one(&plain)
        .await
        .unwrap();
    assert_eq!(seen, 5);
    plain.close().await;
    let target = tidemark_common::pg::PgTarget::from_url("DATABASE_URL", &as_role).unwrap();
    let pool = target.connect(1, Duration::from_secs(10)).await.unwrap();
    let err = sqlx::query_scalar::<_, i64>("select pg_catalog.count(*) from public.rls_t")
        .fetch_one(&pool)
        .await
        .expect_err("a policy that applies is an error");
    assert!(err.to_string().contains("row-level security"), "{err}");
    pool.close().await;
    exec(&fx.pool, "drop table rls_t").await;
    exec(&fx.pool, &format!("drop role {role}")).await;
}
