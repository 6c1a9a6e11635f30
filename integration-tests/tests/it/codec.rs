//! The codec against a real Postgres: every type's values, as the server
//! prints them (`record_out` of a row and `COPY TO` text), go through the
//! codec to JSON, back through `to_pg_text` into the server as literals of
//! the column type, and must come back as the same text and an equal value;
//! the JSON must be byte for byte what 0.1's SQL rendered for every value
//! 0.1 got right. Type names must be `format_type`'s, and the type cache
//! must resolve user types as the catalog says.

use std::collections::BTreeSet;

use futures::TryStreamExt as _;
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection as _, PgConnection, PgPool};
use tidemark_common::codec::{
    self, builtin_types, parse_copy_line, parse_record, to_pg_text, ColumnSpec, ColumnType,
    RowCodec, TypeCache, TypeKind, Variant,
};
use tidemark_common::envelope::{payload_and_wide_sql, Column};
use tidemark_common::pg::{quote_ident, PgTarget};

use crate::support::*;

/// A database of the test's own, with two sessions: the user's (server
/// defaults, or whatever a test sets) and Tidemark's (the codec's settings).
pub struct Db {
    /// The user's session.
    pub user: PgPool,
    /// A session as Tidemark opens them.
    pub tidemark: PgPool,
}

impl Db {
    pub async fn new(prefix: &str) -> Self {
        let admin: PgConnectOptions = database_url().parse().unwrap();
        let name = unique(prefix);
        let mut conn = PgConnection::connect_with(&admin).await.unwrap();
        sqlx::query(&format!("create database {}", quote_ident(&name)))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        let user = sqlx::pool::PoolOptions::new()
            .max_connections(2)
            .connect_with(admin.database(&name))
            .await
            .unwrap();
        // Tidemark's own session setup, with the settings the codec reads
        // values under.
        let tidemark = PgTarget::from_url("DATABASE_URL", &database_url())
            .unwrap()
            .with_database(&name)
            .connect(2, std::time::Duration::from_secs(10))
            .await
            .unwrap();
        Self { user, tidemark }
    }

    pub async fn exec(&self, sql: &str) {
        sqlx::query(sql)
            .execute(&self.user)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The codec of `table`'s columns, from the catalog as pg-source reads it.
    pub async fn codec(&self, cache: &TypeCache, table: &str) -> RowCodec {
        let rows: Vec<(String, i64, i32, bool)> = sqlx::query_as(
            "select a.attname::text, a.atttypid::int8, a.atttypmod, a.attnotnull \
             from pg_catalog.pg_attribute a \
             where a.attrelid = $1::pg_catalog.regclass and a.attnum > 0 and not a.attisdropped \
             order by a.attnum",
        )
        .bind(table)
        .fetch_all(&self.tidemark)
        .await
        .unwrap();
        let wanted: Vec<(u32, i32)> = rows.iter().map(|r| (r.1 as u32, r.2)).collect();
        let types = cache
            .column_types(&self.tidemark, &wanted)
            .await
            .unwrap_or_else(|e| panic!("{table}: {e}"));
        RowCodec::new(
            rows.into_iter()
                .zip(types)
                .map(|((name, _, _, not_null), ty)| ColumnSpec::new(name, ty, not_null))
                .collect(),
        )
    }

    /// Every row of `table` as `record_out` prints it, in `id` order.
    pub async fn records(&self, table: &str) -> Vec<String> {
        sqlx::query_scalar(&format!(
            "select pg_catalog.textin(pg_catalog.record_out(t.*)) from {table} t order by t.id"
        ))
        .fetch_all(&self.tidemark)
        .await
        .unwrap()
    }

    /// Every row of `table` as `COPY TO` text prints it, in `id` order.
    pub async fn copy_lines(&self, table: &str) -> Vec<String> {
        let mut conn = self.tidemark.acquire().await.unwrap();
        let chunks: Vec<_> = conn
            .copy_out_raw(&format!(
                "copy (select * from {table} t order by t.id) to stdout"
            ))
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let text = String::from_utf8(chunks.concat()).unwrap();
        text.lines().map(str::to_owned).collect()
    }
}

/// An SQL string literal.
pub fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// 0.1's rendering of `table`'s rows (`envelope::payload_and_wide_sql`), in
/// `id` order.
async fn rendered_by_0_1(db: &Db, table: &str) -> Vec<String> {
    #[derive(sqlx::FromRow)]
    struct Row {
        name: String,
        typname: String,
        typtype: String,
        elem: Option<String>,
        elem_typtype: Option<String>,
        not_null: bool,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "select a.attname::text as name, t.typname::text as typname, t.typtype::text as typtype, \
                et.typname::text as elem, et.typtype::text as elem_typtype, a.attnotnull as not_null \
         from pg_attribute a join pg_type t on t.oid = a.atttypid \
         left join pg_type et on et.oid = t.typelem and t.typcategory = 'A' \
         where a.attrelid = $1::regclass and a.attnum > 0 and not a.attisdropped order by a.attnum",
    )
    .bind(table)
    .fetch_all(&db.tidemark)
    .await
    .unwrap();
    let columns: Vec<Column> = rows
        .iter()
        .map(|r| {
            let element = r.elem.as_deref().zip(r.elem_typtype.as_deref());
            Column::from_catalog(&r.name, &r.typname, &r.typtype, element, r.not_null)
        })
        .collect();
    let (payload, _) = payload_and_wide_sql(&columns, "t");
    let sql = format!("select {payload} from {table} t order by t.id");
    sqlx::query_scalar(&sql)
        .fetch_all(&db.tidemark)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// One type and values of it (as SQL literals' text), in a table of its own
/// with, for `arrays`, a one- and a two-dimensional array column of it.
pub struct Case {
    /// The type as SQL writes it.
    pub ty: &'static str,
    /// Values (each the text of a literal).
    pub values: Vec<String>,
    /// Whether the type has an equality operator (`is not distinct from`).
    pub eq: bool,
    /// Whether to add array columns.
    pub arrays: bool,
}

/// What a check found: each problem, and each documented change from 0.1
/// it saw.
#[derive(Default)]
pub struct Findings {
    pub problems: Vec<String>,
    pub changes: BTreeSet<&'static str>,
    pub values: usize,
}

/// Why 0.1's JSON for a value may differ from the codec's: the documented
/// changes (`None`: it must not differ).
fn documented_change(ty: &ColumnType, text: &str, variant: Variant) -> Option<&'static str> {
    let base = ty.ty.base();
    let elem = match &base.kind {
        TypeKind::Array { elem, .. } => Some(elem.base()),
        _ => None,
    };
    let leaf = elem.unwrap_or(base);
    if matches!(ty.ty.kind, TypeKind::Domain { .. })
        || matches!(&ty.ty.kind, TypeKind::Array { elem, .. } if matches!(elem.kind, TypeKind::Domain { .. }))
    {
        return Some("domains map as their base type");
    }
    if matches!(leaf.kind, TypeKind::Oid) || matches!(base.kind, TypeKind::Vector { elem: 26 }) {
        return Some("oid is a number");
    }
    if variant == Variant::PgText && elem.is_some() {
        return Some(if text.starts_with('[') {
            "lower bounds kept"
        } else {
            "float arrays with NaN are their text"
        });
    }
    if base.name == "xml" || leaf.name == "xml" {
        return Some("xml is its output text");
    }
    None
}

/// The table of `case`: its columns (`id int primary key, v <type>`, and
/// with `arrays` a one- and a two-dimensional array column `a` and `m`) and
/// its rows as SQL `values` tuples: one per value, then (with arrays) all
/// values in one array, the NULL row, the empty array and lower bounds
/// other than 1, else the NULL row.
pub fn case_table(case: &Case) -> (String, Vec<String>) {
    let ty = case.ty;
    let mut cols = format!("id int primary key, v {ty}");
    if case.arrays {
        cols.push_str(&format!(", a {ty}[], m {ty}[]"));
    }
    let mut rows = Vec::new();
    for (i, v) in case.values.iter().enumerate() {
        let v = format!("{}::{ty}", lit(v));
        rows.push(if case.arrays {
            format!("({i}, {v}, array[{v}, null], array[[{v}, {v}], [null, {v}]])")
        } else {
            format!("({i}, {v})")
        });
    }
    let n = case.values.len();
    if case.arrays {
        let all: Vec<String> = case
            .values
            .iter()
            .map(|v| format!("{}::{ty}", lit(v)))
            .collect();
        rows.push(format!(
            "({n}, null, array[{}, null], '{{}}')",
            all.join(", ")
        ));
        rows.push(format!(
            "({}, null, pg_catalog.array_fill({}::{ty}, array[2], array[0]), \
             pg_catalog.array_fill({}::{ty}, array[1, 2], array[-3, 5]))",
            n + 1,
            lit(&case.values[0]),
            lit(&case.values[0])
        ));
    } else {
        rows.push(format!("({n}, null)"));
    }
    (cols, rows)
}

/// Runs `case` in `db`: creates its table, inserts its values, and checks
/// every value through the codec and back.
pub async fn check(db: &Db, cache: &TypeCache, table: &str, case: &Case) -> Findings {
    let mut f = Findings::default();
    let ty = case.ty;
    let (cols, rows) = case_table(case);
    db.exec(&format!("create table {table} ({cols})")).await;
    db.exec(&format!("insert into {table} values {}", rows.join(", ")))
        .await;

    let codec = db.codec(cache, table).await;
    let records = db.records(table).await;
    let lines = db.copy_lines(table).await;
    let old = rendered_by_0_1(db, table).await;
    assert_eq!(records.len(), rows.len(), "{ty}");
    assert_eq!(lines.len(), rows.len(), "{ty}");
    let columns: Vec<ColumnSpec> = codec.columns().cloned().collect();
    for (r, ((record, line), old)) in records.iter().zip(&lines).zip(&old).enumerate() {
        let mut json = Vec::new();
        let variants = match codec.encode_record(record, &mut json) {
            Ok(v) => v,
            Err(e) => {
                f.problems
                    .push(format!("{ty} row {r}: {record} does not encode: {e}"));
                continue;
            }
        };
        // COPY's text gives the same record.
        let copied = parse_copy_line(line).unwrap();
        let mut from_copy = Vec::new();
        match codec.encode(&copied, &mut from_copy) {
            Ok(v) if v == variants && from_copy == json => {}
            Ok(_) => f.problems.push(format!(
                "{ty} row {r}: COPY's {line:?} encodes as {} but record_out's as {}",
                String::from_utf8_lossy(&from_copy),
                String::from_utf8_lossy(&json)
            )),
            Err(e) => f
                .problems
                .push(format!("{ty} row {r}: COPY's {line:?}: {e}")),
        }
        let texts = parse_record(record).unwrap();
        let value: Value = serde_json::from_slice(&json)
            .unwrap_or_else(|e| panic!("{ty}: not JSON ({e}): {}", String::from_utf8_lossy(&json)));
        // The raw bytes of each value, as written.
        let raw =
            |json: &str| -> std::collections::HashMap<String, Box<serde_json::value::RawValue>> {
                serde_json::from_str(json)
                    .unwrap_or_else(|e| panic!("{ty}: not JSON ({e}): {json}"))
            };
        let new_text = String::from_utf8(json.clone()).unwrap();
        let (old_raw, new_raw) = (raw(old), raw(&new_text));
        let mut changed_row = false;
        let fields = codec.fields(&variants);
        let mut played = Vec::new();
        for (c, ((field, spec), text)) in fields.iter().zip(&columns).zip(&texts).enumerate() {
            let name = &spec.name;
            let got = &value[name.as_str()];
            f.values += 1;
            // Byte for byte as 0.1, unless documented.
            let old_bytes = old_raw[name.as_str()].get();
            let new_bytes = new_raw[name.as_str()].get();
            if old_bytes != new_bytes {
                changed_row = true;
                match text
                    .as_deref()
                    .and_then(|t| documented_change(&spec.ty, t, variants.get(c)))
                {
                    Some(change) => {
                        f.changes.insert(change);
                    }
                    None => f.problems.push(format!(
                        "{ty} row {r} column {name}: 0.1 wrote {old_bytes}, the codec {new_bytes} (text {text:?})"
                    )),
                }
            }
            match to_pg_text(field, got) {
                Ok(back) if back.as_deref() == text.as_deref() => played.push(back),
                Ok(back) => {
                    f.problems.push(format!(
                        "{ty} row {r} column {name}: {text:?} plays back as {back:?} (JSON {got}, schema {field})"
                    ));
                    played.push(back);
                }
                Err(e) => {
                    f.problems.push(format!("{ty} row {r} column {name}: {e}"));
                    played.push(None);
                }
            }
        }
        if !changed_row && *old != new_text {
            f.problems.push(format!(
                "{ty} row {r}: 0.1 wrote {old}, the codec {new_text}"
            ));
        }
        // Back into the server as literals of the column type: the same
        // text, and an equal value.
        let mut exprs = Vec::new();
        for (spec, back) in columns.iter().zip(&played) {
            let sql_type = spec.ty.sql_type();
            let literal = match back {
                Some(t) => format!("{}::{sql_type}", lit(t)),
                None => format!("null::{sql_type}"),
            };
            exprs.push(match back {
                Some(_) => format!("pg_catalog.format('%s', {literal})"),
                None => "null".to_owned(),
            });
            if case.eq {
                exprs.push(format!(
                    "(({literal}) is not distinct from t.{})::pg_catalog.text",
                    quote_ident(&spec.name)
                ));
            }
        }
        let sql = format!(
            "select array[{}]::pg_catalog.text[] from {table} t where t.id = {}",
            exprs.join(", "),
            texts[0].as_deref().unwrap()
        );
        // Extension types' equality operators live in `public`, which a
        // Tidemark session never searches; the check acts as the user.
        let got: Result<Vec<Option<String>>, _> = async {
            let mut tx = db.tidemark.begin().await?;
            sqlx::query("set local search_path = public, pg_catalog")
                .execute(&mut *tx)
                .await?;
            sqlx::query_scalar(&sql).fetch_one(&mut *tx).await
        }
        .await;
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                f.problems
                    .push(format!("{ty} row {r}: cannot play back ({e}): {sql}"));
                continue;
            }
        };
        let per = if case.eq { 2 } else { 1 };
        for (c, spec) in columns.iter().enumerate() {
            let printed = &got[c * per];
            if printed.as_deref() != texts[c].as_deref() {
                f.problems.push(format!(
                    "{ty} row {r} column {}: {:?} went in, the server printed {printed:?}",
                    spec.name, texts[c]
                ));
            }
            if case.eq && got[c * per + 1].as_deref() != Some("true") {
                f.problems.push(format!(
                    "{ty} row {r} column {}: {:?} played back is not the same value",
                    spec.name, texts[c]
                ));
            }
        }
    }
    f
}

fn s(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| (*v).to_owned()).collect()
}

/// Values at the edges of every built-in type the round-trip tests of
/// `bad_input` cover, and the other built-in types.
pub fn builtin_cases() -> Vec<Case> {
    let text = {
        let controls: String = (1u8..0x20).map(char::from).collect();
        vec![
            String::new(),
            "it's \"quoted\" \\ back\\\\slash\nnew line\r\n\ttab 😀 e\u{301} 🇩🇪 a\u{200d}b {}[],\"NULL\" end".to_owned(),
            controls + "\u{7f}",
            "NULL".to_owned(),
            " leading and trailing ".to_owned(),
            "(a,b)".to_owned(),
            "x;y".to_owned(),
        ]
    };
    let c = |ty, values: &[&str], eq| Case {
        ty,
        values: s(values),
        eq,
        arrays: true,
    };
    vec![
        c("smallint", &["-32768", "32767", "0"], true),
        c("integer", &["-2147483648", "2147483647"], true),
        c(
            "bigint",
            &["-9223372036854775808", "9223372036854775807"],
            true,
        ),
        c("oid", &["0", "4294967295"], true),
        c(
            "real",
            &[
                "3.4028235e+38",
                "1.17549435e-38",
                "1e-45",
                "-0",
                "0.1",
                "NaN",
                "Infinity",
                "-Infinity",
            ],
            true,
        ),
        c(
            "double precision",
            &[
                "0.30000000000000004",
                "1e-320",
                "4.9e-324",
                "-1.7976931348623157e+308",
                "-2.2250738585072014e-308",
                "-0",
                "NaN",
                "Infinity",
                "-Infinity",
            ],
            true,
        ),
        c("boolean", &["true", "false"], true),
        c(
            "numeric",
            &[
                "123456789012345678901234567890",
                "-0.000000000000000000000000000001",
                "0.0000000000",
                "-0.00",
                "1e-1000",
                "1e130",
                "NaN",
                "Infinity",
                "-Infinity",
            ],
            true,
        ),
        c(
            "numeric(40,10)",
            &["-12345678901234567890.12345", "0"],
            true,
        ),
        Case {
            ty: "text",
            values: text.clone(),
            eq: true,
            arrays: true,
        },
        Case {
            ty: "character varying(40)",
            values: text[1..]
                .iter()
                .map(|t| t.chars().take(40).collect())
                .collect(),
            eq: true,
            arrays: true,
        },
        c("character(5)", &["ab", "", "abcde"], true),
        c("name", &["a name", "we\"ird"], true),
        c("\"char\"", &["x", "", "\""], true),
        c("bytea", &["\\x00ff0a5c27228000", "\\x", "\\x5c78"], true),
        c(
            "timestamp",
            &[
                "2024-02-29 23:59:59.999999",
                "1900-01-01 00:00:00.000001",
                "1969-12-31 23:59:59.5",
                "infinity",
                "-infinity",
                "0044-03-15 12:00:00.5 BC",
                "4714-11-24 00:00:00 BC",
                "294247-01-10 04:00:54.775806",
                "294247-01-10 04:00:54.775807",
                "294276-12-31 23:59:59.999999",
            ],
            true,
        ),
        c("timestamp(3)", &["2024-02-29 23:59:59.999"], true),
        c(
            "timestamp with time zone",
            &[
                "2024-02-29 23:59:59.123456+05:30",
                "1969-12-31 23:59:59.999999+00",
                "1800-01-01 00:00:00+05:53:28",
                "infinity",
                "-infinity",
                "0044-03-15 12:00:00.5+00 BC",
                "4714-11-24 00:00:00+00 BC",
                "294276-12-31 23:59:59.999999+00",
            ],
            true,
        ),
        c(
            "date",
            &[
                "2024-02-29",
                "1901-12-13",
                "infinity",
                "-infinity",
                "0044-03-15 BC",
                "5874897-12-31",
                "4714-11-24 BC",
            ],
            true,
        ),
        c(
            "time",
            &[
                "24:00:00",
                "00:00:00",
                "23:59:59.999999",
                "00:00:00.000001",
                "12:00",
            ],
            true,
        ),
        c("time(2) without time zone", &["12:00:00.12"], true),
        c(
            "time with time zone",
            &[
                "12:34:56.789012+05:30",
                "23:59:59.999999-11:30",
                "24:00:00+00",
            ],
            true,
        ),
        c(
            "interval",
            &[
                "1 year 2 mons 3 days 04:05:06.789012",
                "-1 days +00:00:00.000001",
                "178000000 years",
                "-177999999 years -1 microsecond",
                "P-1D",
                "0",
            ],
            true,
        ),
        c(
            "uuid",
            &[
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                "00000000-0000-0000-0000-000000000000",
            ],
            true,
        ),
        c(
            "json",
            &[
                r#"{ "k" : 1,  "k": 2 , "s":"\u00e9", "n": 1.0E+2 }"#,
                r#"{"a":"\u0000"}"#,
                r#""\ud800""#,
                "null",
                "[]",
                "  {\n}\t",
            ],
            false,
        ),
        c(
            "jsonb",
            &[
                r#"{"b": [1, 2.50, {"c": null}], "a": "x\"y\\z", "big": 123456789012345678901234567890.5}"#,
                "null",
                "[]",
                "\"text\"",
            ],
            true,
        ),
        c("mood", &["happy", "it's \"complicated\"", "NULL"], true),
        c(
            "inet",
            &["10.0.0.1", "::1", "10.0.0.0/8", "::ffff:1.2.3.4/120"],
            true,
        ),
        c("cidr", &["10.0.0.0/8", "::/0", "192.168.1.1/32"], true),
        c("macaddr", &["08:00:2b:01:02:03"], true),
        c("macaddr8", &["08:00:2b:01:02:03:04:05"], true),
        c("money", &["1234.56", "-0.01"], true),
        c("bit(3)", &["101"], true),
        c("bit varying(5)", &["10", ""], true),
        c(
            "xml",
            &[
                "<a>x &amp; y</a>",
                "<?xml version=\"1.0\"?>\n<a/>",
                "text only",
            ],
            false,
        ),
        c("point", &["(1,2)", "(-0,1e-300)"], false),
        c("lseg", &["[(0,0),(1,1)]"], false),
        c("box", &["(1,1),(0,0)"], false),
        c("path", &["[(0,0),(1,1)]", "((0,0),(1,1),(1,0))"], false),
        c("polygon", &["((0,0),(1,1),(1,0))"], false),
        c("line", &["{1,-1,0}"], false),
        c("circle", &["<(0,0),1.5>"], false),
        c("tsvector", &["'a' 'b c':1A 'd\\'e':2"], true),
        c("tsquery", &["a & (b | !c)"], true),
        c("int4range", &["[1,5)", "empty", "(,)"], true),
        c("int8range", &["[1,)"], true),
        c("numrange", &["[1.5,2.50]"], true),
        c("tsrange", &["[\"2024-01-01 00:00:00\",infinity)"], true),
        c(
            "tstzrange",
            &["[\"2024-01-01 00:00:00+00\",\"2024-01-02 00:00:00+00\")"],
            true,
        ),
        c("daterange", &["[2024-01-01,2024-02-01)"], true),
        c("int4multirange", &["{[1,3),[5,7)}", "{}"], true),
        c("pg_lsn", &["16/B374D848"], true),
        c("xid8", &["12345"], true),
        c("jsonpath", &["$.a[*] ? (@ > 1)"], false),
        c("tid", &["(1,2)"], true),
        c("int2vector", &["1 2 -3", ""], true),
        c("oidvector", &["1 4294967295"], true),
        c(
            "pair",
            &["(1,\"x, y\",\"{1.5,NaN}\")", "(,,)", "(2,\"\",{})"],
            false,
        ),
        c("posint", &["5"], true),
        c("smallpos", &["3"], true),
        c("label", &["x y", ""], true),
        c("yes", &["true"], true),
        c("addr", &["10.0.0.1", "::1/64"], true),
        Case {
            ty: "ints",
            values: s(&["{1,2}", "{{1},{2}}", "[0:0]={7}"]),
            eq: true,
            arrays: false,
        },
        c("floatrange", &["[1.5,2.5)"], true),
        c("\"My Schema\".\"My Type\"", &["b", "a"], true),
    ]
}

/// The user types the cases use.
pub const USER_TYPES: &str = r#"
create type mood as enum ('happy', 'it''s "complicated"', 'NULL');
create type pair as (a int, b text, c float8[]);
create domain posint as integer check (value > 0);
create domain smallpos as posint check (value < 10);
create domain label as text;
create domain yes as boolean;
create domain ints as int[];
create domain addr as inet;
create type floatrange as range (subtype = float8);
create schema "My Schema";
create type "My Schema"."My Type" as enum ('a', 'b');
"#;

async fn run_cases(db: &Db, cases: &[Case]) -> Findings {
    let cache = TypeCache::new();
    let mut all = Findings::default();
    for (n, case) in cases.iter().enumerate() {
        let f = check(db, &cache, &format!("public.c{n}"), case).await;
        all.problems.extend(f.problems);
        all.changes.extend(f.changes);
        all.values += f.values;
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_built_in_type_round_trips_through_the_codec() {
    let db = Db::new("tm_codec_").await;
    for stmt in USER_TYPES.split(";\n").filter(|s| !s.trim().is_empty()) {
        db.exec(stmt).await;
    }
    let found = run_cases(&db, &builtin_cases()).await;
    assert!(
        found.problems.is_empty(),
        "{} problems in {} values:\n{}",
        found.problems.len(),
        found.values,
        found.problems.join("\n")
    );
    // Each documented change from 0.1 is real.
    let expected: BTreeSet<&str> = [
        "oid is a number",
        "domains map as their base type",
        "lower bounds kept",
        "float arrays with NaN are their text",
        "xml is its output text",
    ]
    .into_iter()
    .collect();
    assert_eq!(found.changes, expected);
}

/// The contrib extensions Debian's Postgres 15 ships whose types a column
/// can hold (the others are index-internal).
pub const CONTRIB_EXTENSIONS: &[&str] = &[
    "hstore",
    "ltree",
    "cube",
    "citext",
    "isn",
    "seg",
    "intarray",
    "earthdistance",
    "lo",
];

/// Values of every type [`CONTRIB_EXTENSIONS`] brings.
pub fn contrib_cases() -> Vec<Case> {
    let c = |ty, values: &[&str], eq| Case {
        ty,
        values: s(values),
        eq,
        arrays: true,
    };
    vec![
        c(
            "hstore",
            &[
                r#"a=>1, "b c"=>NULL, "d\"e"=>"f\\g""#,
                "",
                r#""NULL"=>"{}""#,
            ],
            true,
        ),
        c("ltree", &["Top.Science.Astronomy", ""], true),
        c(
            "lquery",
            &["*.Science.*", "Top.!Arts|Science@.*{1,2}"],
            false,
        ),
        c("ltxtquery", &["Europe & Russia*@", "!a | b"], false),
        c("cube", &["(1, 2), (3, 4)", "(1e-300)", "(0)"], true),
        c("citext", &["MiXeD Case", "", "a,b \"c\""], true),
        c("ean13", &["978-0-393-04002-9"], true),
        c("isbn13", &["978-0-393-04002-9"], true),
        c("isbn", &["0-393-04002-X"], true),
        c("ismn13", &["979-0-060-11561-5"], true),
        c("ismn", &["M-060-11561-5"], true),
        c("issn13", &["977-1234-567-00-3"], true),
        c("issn", &["1234-5679"], true),
        c("upc", &["123456789012"], true),
        c("seg", &["5 .. 7", "1.5e3", "<1", "~6.5"], true),
        c("query_int", &["1&(2|3)", "!4"], false),
        c("earth", &["(6378168, 0, 0)"], true),
        c("lo", &["12345"], true),
    ]
}

/// Every contrib extension type Debian's Postgres 15 ships that a column can
/// hold (the others are index-internal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_contrib_extension_type_round_trips_through_the_codec() {
    let db = Db::new("tm_codec_ext_").await;
    for ext in CONTRIB_EXTENSIONS {
        db.exec(&format!("create extension {ext}")).await;
    }
    let cases = contrib_cases();
    let found = run_cases(&db, &cases).await;
    assert!(
        found.problems.is_empty(),
        "{} problems in {} values:\n{}",
        found.problems.len(),
        found.values,
        found.problems.join("\n")
    );
    assert_eq!(
        found.changes,
        ["domains map as their base type", "lower bounds kept"]
            .into_iter()
            .collect(),
        "lo is a domain over oid"
    );
}

/// `ColumnType::sql_type` is `format_type(oid, typmod)` for every built-in
/// type and every typmod a column can have, and the static table agrees
/// with `pg_type`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_in_types_are_as_the_catalog_says() {
    let db = Db::new("tm_codec_types_").await;
    let mut problems = Vec::new();
    let mut n = 0;
    for ty in builtin_types() {
        n += 1;
        let row: Option<(String, String, i64, i64, String)> = sqlx::query_as(
            "select t.typname::text, pg_catalog.format_type(t.oid, -1), t.typelem::int8, \
                    t.typarray::int8, t.typdelim::text \
             from pg_catalog.pg_type t where t.oid = $1::int8::oid",
        )
        .bind(i64::from(ty.oid))
        .fetch_optional(&db.tidemark)
        .await
        .unwrap();
        let Some((name, sql_name, elem, _array, _delim)) = row else {
            problems.push(format!("{} ({}) is not in pg_type", ty.oid, ty.name));
            continue;
        };
        if name != ty.name || sql_name != ty.sql_name || ty.schema != "pg_catalog" {
            problems.push(format!(
                "{}: the table says {} / {}, pg_type {name} / {sql_name}",
                ty.oid, ty.name, ty.sql_name
            ));
        }
        if let TypeKind::Array { elem: e, delimiter } = &ty.kind {
            let delim: String = sqlx::query_scalar(
                "select typdelim::text from pg_catalog.pg_type where oid = $1::int8::oid",
            )
            .bind(i64::from(e.oid))
            .fetch_one(&db.tidemark)
            .await
            .unwrap();
            if i64::from(e.oid) != elem || delim.as_bytes() != [*delimiter] {
                problems.push(format!(
                    "{}: element {} delimiter {delimiter}",
                    ty.oid, e.oid
                ));
            }
        }
    }
    assert!(n > 140, "only {n} built-in types");
    // Every typmod a column can have.
    db.exec(
        "create table typmods (a varchar(10), b char(3), c numeric(10,2), d numeric(5,-2), e numeric(1000,0), \
         f bit(3), g varbit(7), h time(3), i timetz(2), j timestamp(0), k timestamptz(6), l interval(3), \
         m interval year to month, n interval day to second(2), o interval minute, p char, q bit, \
         r varchar(10)[], s numeric(10,2)[][], t timestamptz(1)[], u interval hour to minute, v varchar, \
         w bpchar)",
    )
    .await;
    let cols: Vec<(String, i64, i32, String)> = sqlx::query_as(
        "select attname::text, atttypid::int8, atttypmod, pg_catalog.format_type(atttypid, atttypmod) \
         from pg_catalog.pg_attribute where attrelid = 'public.typmods'::pg_catalog.regclass and attnum > 0",
    )
    .fetch_all(&db.tidemark)
    .await
    .unwrap();
    assert_eq!(cols.len(), 23);
    for (name, oid, typmod, format) in cols {
        let ours = ColumnType::builtin(oid as u32, typmod).unwrap();
        if ours.sql_type() != format {
            problems.push(format!(
                "{name}: {} but format_type says {format}",
                ours.sql_type()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The cache resolves user types as the catalog has them (domains to their
/// base, arrays to their element), with `format_type`'s names; a type
/// dropped since resolves only from a pgoutput Type message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_type_cache_resolves_user_types_from_the_catalog() {
    let db = Db::new("tm_codec_cache_").await;
    for stmt in USER_TYPES.split(";\n").filter(|s| !s.trim().is_empty()) {
        db.exec(stmt).await;
    }
    db.exec("create domain arr_of_dom as smallpos[]").await;
    let oid = |name: &'static str| {
        let pool = db.tidemark.clone();
        async move {
            let o: i64 = sqlx::query_scalar("select $1::pg_catalog.regtype::pg_catalog.oid::int8")
                .bind(name)
                .fetch_one(&pool)
                .await
                .unwrap();
            o as u32
        }
    };
    let cache = TypeCache::new();
    let names = [
        "public.mood",
        "public.mood[]",
        "public.pair",
        "public.smallpos",
        "public.smallpos[]",
        "public.ints",
        "public.arr_of_dom",
        "public.floatrange",
        "\"My Schema\".\"My Type\"",
        "\"My Schema\".\"My Type\"[]",
    ];
    let mut oids = Vec::new();
    for n in names {
        oids.push(oid(n).await);
    }
    let wanted: Vec<(u32, i32)> = oids.iter().map(|&o| (o, -1)).collect();
    let types = cache.column_types(&db.tidemark, &wanted).await.unwrap();
    for (t, n) in types.iter().zip(names) {
        assert_eq!(t.sql_type(), n, "format_type's name");
    }
    assert_eq!(types[0].ty.kind, TypeKind::Enum);
    assert!(
        matches!(&types[1].ty.kind, TypeKind::Array { elem, delimiter: b',' } if elem.kind == TypeKind::Enum)
    );
    assert_eq!(types[2].ty.kind, TypeKind::Composite);
    // A domain over a domain rests on the end of the chain.
    assert!(matches!(&types[3].ty.kind, TypeKind::Domain { base } if base.kind == TypeKind::Int4));
    assert!(
        matches!(&types[4].ty.kind, TypeKind::Array { elem, .. } if matches!(elem.kind, TypeKind::Domain { .. }))
    );
    assert!(
        matches!(&types[5].ty.kind, TypeKind::Domain { base } if matches!(base.kind, TypeKind::Array { .. }))
    );
    assert!(matches!(
        &types[7].ty.kind,
        TypeKind::Range { subtype: 701 }
    ));
    assert_eq!(types[8].ty.schema, "My Schema");
    assert_eq!(types[8].ty.name, "My Type");
    // Known now: no query.
    assert!(cache.column_type_cached(oids[0], -1).is_some());
    // A typmod on a type without a typmod output function.
    let with_mod = cache.column_type(&db.tidemark, oids[0], 7).await.unwrap();
    assert_eq!(with_mod.sql_type(), "public.mood(7)");

    // Renamed: a Type message with the new name makes the cache read it again.
    db.exec("alter type mood rename to feeling").await;
    cache.note_type(oids[0], "public", "feeling");
    let renamed = cache.column_type(&db.tidemark, oids[0], -1).await.unwrap();
    assert_eq!(renamed.sql_type(), "public.feeling");

    // Dropped: unknown, unless a Type message named it.
    db.exec("create type gone as enum ('x')").await;
    let gone = oid("public.gone").await;
    db.exec("drop type gone").await;
    let fresh = TypeCache::new();
    let err = fresh.column_type(&db.tidemark, gone, -1).await.unwrap_err();
    assert!(
        matches!(err, codec::CodecError::UnknownType { oid } if oid == gone),
        "{err}"
    );
    fresh.note_type(gone, "public", "gone");
    let t = fresh.column_type(&db.tidemark, gone, -1).await.unwrap();
    assert_eq!(t.sql_type(), "public.gone");
    assert_eq!(t.ty.kind, TypeKind::Other);
}

/// Values drawn in Rust per type (proptest strategies), written as literals,
/// printed by Postgres, and checked by [`check`] like the fixed ones: the
/// codec's JSON equals 0.1's, plays back as the same text and an equal value,
/// in scalars, arrays and two-dimensional arrays. `TIDEMARK_CODEC_CASES`
/// batches per type (default 4) of 12 values each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_values_round_trip_through_the_server() {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree as _;
    use proptest::test_runner::TestRunner;

    let db = Db::new("tm_codec_prop_").await;
    for stmt in USER_TYPES.split(";\n").filter(|s| !s.trim().is_empty()) {
        db.exec(stmt).await;
    }
    let batches: usize = std::env::var("TIDEMARK_CODEC_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);

    fn pg_text() -> BoxedStrategy<String> {
        any::<String>().prop_map(|s| s.replace('\0', "")).boxed()
    }
    fn frac() -> BoxedStrategy<String> {
        (0usize..=6, 0u32..1_000_000)
            .prop_map(|(n, f)| {
                if n == 0 {
                    String::new()
                } else {
                    format!(".{}", &format!("{f:06}")[..n])
                }
            })
            .boxed()
    }
    fn float_text(f: f64) -> String {
        if f.is_nan() {
            "NaN".into()
        } else if f.is_infinite() {
            if f > 0.0 { "Infinity" } else { "-Infinity" }.into()
        } else {
            format!("{f:e}")
        }
    }
    let date = (1u32..=294_275, 1u32..=12, 1u32..=28, any::<bool>()).prop_map(|(y, m, d, bc)| {
        if bc {
            format!("{:04}-{m:02}-{d:02} BC", y % 4713 + 1)
        } else {
            format!("{y:04}-{m:02}-{d:02}")
        }
    });
    let clock = (0u32..24, 0u32..60, 0u32..60, frac())
        .prop_map(|(h, m, s, f)| format!("{h:02}:{m:02}:{s:02}{f}"));
    let json_value = {
        let leaf = prop_oneof![
            Just("null".to_owned()),
            any::<bool>().prop_map(|b| b.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| format!("{f:e}")),
            pg_text().prop_map(|s| serde_json::to_string(&s).unwrap()),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            let space = prop_oneof![Just(""), Just(" "), Just("\n\t ")];
            prop_oneof![
                (prop::collection::vec(inner.clone(), 0..4), space.clone())
                    .prop_map(|(v, s)| format!("[{s}{}{s}]", v.join(&format!(",{s}")))),
                (prop::collection::vec((pg_text(), inner), 0..4), space).prop_map(|(v, s)| {
                    let members: Vec<String> = v
                        .iter()
                        .map(|(k, x)| format!("{}{s}:{s}{x}", serde_json::to_string(k).unwrap()))
                        .collect();
                    format!("{{{s}{}{s}}}", members.join(","))
                }),
            ]
        })
        .boxed()
    };
    let strategies: Vec<(&'static str, bool, BoxedStrategy<String>)> = vec![
        (
            "smallint",
            true,
            any::<i16>().prop_map(|n| n.to_string()).boxed(),
        ),
        (
            "integer",
            true,
            any::<i32>().prop_map(|n| n.to_string()).boxed(),
        ),
        (
            "bigint",
            true,
            any::<i64>().prop_map(|n| n.to_string()).boxed(),
        ),
        (
            "real",
            true,
            any::<f32>().prop_map(|f| float_text(f64::from(f))).boxed(),
        ),
        (
            "double precision",
            true,
            any::<f64>().prop_map(float_text).boxed(),
        ),
        (
            "numeric",
            true,
            prop_oneof![
                (any::<bool>(), "[0-9]{1,40}", "[0-9]{0,30}", -40i32..40).prop_map(
                    |(neg, int, fraction, exp)| format!(
                        "{}{int}{}{fraction}e{exp}",
                        if neg { "-" } else { "" },
                        if fraction.is_empty() { "" } else { "." }
                    )
                ),
                Just("NaN".to_owned()),
                Just("-Infinity".to_owned()),
            ]
            .boxed(),
        ),
        ("text", true, pg_text()),
        (
            "bytea",
            true,
            prop::collection::vec(any::<u8>(), 0..40)
                .prop_map(|b| {
                    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
                    format!("\\x{hex}")
                })
                .boxed(),
        ),
        ("date", true, date.clone().boxed()),
        (
            "timestamp",
            true,
            (date.clone(), clock.clone())
                .prop_map(|(d, t)| match d.strip_suffix(" BC") {
                    Some(d) => format!("{d} {t} BC"),
                    None => format!("{d} {t}"),
                })
                .boxed(),
        ),
        (
            "timestamp with time zone",
            true,
            (
                date,
                clock.clone(),
                -15i32..=15,
                prop_oneof![Just(0), Just(30), Just(45)],
            )
                .prop_map(|(d, t, h, m)| {
                    let zone = format!("{}{:02}:{m:02}", if h < 0 { '-' } else { '+' }, h.abs());
                    match d.strip_suffix(" BC") {
                        Some(d) => format!("{d} {t}{zone} BC"),
                        None => format!("{d} {t}{zone}"),
                    }
                })
                .boxed(),
        ),
        ("time", true, clock.boxed()),
        (
            "interval",
            true,
            (-1000i32..1000, -100i32..100, -1000i32..1000, any::<i32>())
                .prop_map(|(y, mo, d, us)| {
                    format!("{y} years {mo} mons {d} days {us} microseconds")
                })
                .boxed(),
        ),
        ("json", false, json_value.clone()),
        ("jsonb", true, json_value),
        (
            "uuid",
            true,
            any::<[u8; 16]>()
                .prop_map(|b| {
                    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
                    format!(
                        "{}-{}-{}-{}-{}",
                        &h[..8],
                        &h[8..12],
                        &h[12..16],
                        &h[16..20],
                        &h[20..]
                    )
                })
                .boxed(),
        ),
        (
            "inet",
            true,
            (any::<[u8; 4]>(), prop::option::of(0u8..=32))
                .prop_map(|(a, m)| {
                    let ip = format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3]);
                    m.map_or(ip.clone(), |m| format!("{ip}/{m}"))
                })
                .boxed(),
        ),
        (
            "pair",
            false,
            (
                prop::option::of(any::<i32>()),
                prop::option::of(pg_text()),
                prop::collection::vec(any::<f64>().prop_map(float_text), 0..3),
            )
                .prop_map(|(a, b, c)| {
                    let array = format!("{{{}}}", c.join(","));
                    let mut s = String::new();
                    codec::write_record(&mut s, &[a.map(|a| a.to_string()), b, Some(array)]);
                    s
                })
                .boxed(),
        ),
    ];
    let cache = TypeCache::new();
    let mut runner = TestRunner::default();
    let mut problems = Vec::new();
    let mut values = 0;
    let mut n = 0;
    for (ty, eq, strategy) in &strategies {
        for _ in 0..batches {
            let batch: Vec<String> = (0..12)
                .map(|_| strategy.new_tree(&mut runner).unwrap().current())
                .collect();
            let case = Case {
                ty,
                values: batch,
                eq: *eq,
                arrays: true,
            };
            let f = check(&db, &cache, &format!("public.p{n}"), &case).await;
            n += 1;
            values += f.values;
            problems.extend(f.problems);
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems in {values} generated values:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
