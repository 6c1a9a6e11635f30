//! Property tests of the codec that need no server: every parser reads back
//! what its writer wrote, and `to_pg_text` inverts the forward mapping for
//! generated texts in the form Postgres prints. The server-backed ones (the
//! text comes from Postgres) are in `integration-tests`.

use std::borrow::Cow;

use proptest::prelude::*;
use serde_json::Value;

use super::text::{
    parse_array, parse_copy_line, parse_record, write_array_element, write_copy_field, write_record,
};
use super::time::{self, Instant, US_PER_DAY};
use super::{to_pg_text, to_pg_text_planned, ColumnSpec, ColumnType, Oid, RowCodec, TextPlan};

/// Postgres' first and last `timestamp` (4714-11-24 00:00:00 BC and
/// 294276-12-31 23:59:59.999999), in µs since 1970.
const FIRST_US: i128 = -2_440_588 * US_PER_DAY;
const LAST_US: i128 = 9_224_318_015_999_999_999;

#[test]
fn the_limits_are_postgres_limits() {
    assert_eq!(
        time::timestamp_text(FIRST_US, false).unwrap(),
        "4714-11-24 00:00:00 BC"
    );
    assert_eq!(
        time::timestamp_text(LAST_US, false).unwrap(),
        "294276-12-31 23:59:59.999999"
    );
}

/// Forward with a one-column codec of `oid`, then back.
fn round(oid: Oid, text: &str) -> Result<String, String> {
    let codec = RowCodec::new(vec![ColumnSpec::new(
        "c",
        ColumnType::builtin(oid, -1).unwrap(),
        false,
    )]);
    let mut out = Vec::new();
    let v = codec
        .encode(&[Some(text)], &mut out)
        .map_err(|e| e.to_string())?;
    let row: Value = serde_json::from_slice(&out).map_err(|e| e.to_string())?;
    let field = &codec.fields(&v)[0];
    let back = to_pg_text(field, &row["c"])
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "NULL".to_owned())?;
    // The planned path (pg-replay's) gives the same text.
    let planned = to_pg_text_planned(TextPlan::of(field), field, &row["c"])
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "NULL".to_owned())?;
    if planned != back {
        return Err(format!("planned {planned:?}, general {back:?}"));
    }
    Ok(back)
}

/// Text without NUL, which no Postgres text holds.
fn pg_string() -> impl Strategy<Value = String> {
    any::<String>().prop_map(|s| s.replace('\0', ""))
}

fn owned(fields: Vec<Option<Cow<'_, str>>>) -> Vec<Option<String>> {
    fields.into_iter().map(|f| f.map(Cow::into_owned)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn days_and_dates_convert_both_ways(days in -2_440_588i64..=2_145_031_948) {
        let (y, m, d) = time::civil_from_days(days);
        prop_assert_eq!(time::days_from_civil(y, m, d), days);
        let text = time::date_text(days).unwrap();
        prop_assert_eq!(time::parse_date(&text).unwrap(), Instant::Finite(days));
    }

    #[test]
    fn timestamps_convert_both_ways(us in FIRST_US..=LAST_US) {
        for zoned in [false, true] {
            let text = time::timestamp_text(us, zoned).unwrap();
            let back = if zoned { time::parse_timestamptz(&text) } else { time::parse_timestamp(&text) };
            prop_assert_eq!(back.unwrap(), Instant::Finite(us), "{}", text);
            let iso = time::iso_text(us, zoned).unwrap();
            prop_assert_eq!(time::parse_iso(&iso, zoned).unwrap(), us, "{}", iso);
        }
    }

    #[test]
    fn times_convert_both_ways(us in 0i64..=86_400_000_000) {
        let text = time::time_text(us).unwrap();
        prop_assert_eq!(time::parse_time(&text).unwrap(), us);
    }

    #[test]
    fn json_strings_read_back(s in pg_string()) {
        let mut out = Vec::new();
        super::escape_json_into(&mut out, s.as_bytes());
        let v: Value = serde_json::from_slice(&out).unwrap();
        prop_assert_eq!(v.as_str(), Some(s.as_str()));
    }

    #[test]
    fn records_read_back(fields in prop::collection::vec(prop::option::of(pg_string()), 1..8)) {
        let mut text = String::new();
        write_record(&mut text, &fields);
        prop_assert_eq!(owned(parse_record(&text).unwrap()), fields);
    }

    #[test]
    fn array_elements_read_back(
        elements in prop::collection::vec(prop::option::of(pg_string()), 1..8),
        semicolon in any::<bool>(),
    ) {
        let delimiter = if semicolon { b';' } else { b',' };
        let mut text = String::from("{");
        for (n, e) in elements.iter().enumerate() {
            if n > 0 {
                text.push(char::from(delimiter));
            }
            match e {
                Some(e) => write_array_element(&mut text, e, delimiter),
                None => text.push_str("NULL"),
            }
        }
        text.push('}');
        let parsed = parse_array(&text, delimiter).unwrap();
        prop_assert_eq!(parsed.dims.len(), 1);
        prop_assert_eq!(owned(parsed.elements), elements);
    }

    #[test]
    fn copy_fields_read_back(fields in prop::collection::vec(prop::option::of(pg_string()), 1..8)) {
        let mut line = String::new();
        for (n, f) in fields.iter().enumerate() {
            if n > 0 {
                line.push('\t');
            }
            write_copy_field(&mut line, f.as_deref());
        }
        prop_assert_eq!(parse_copy_line(&line).unwrap(), fields);
    }

    #[test]
    fn integers_play_back(n in any::<i64>(), m in any::<i16>()) {
        prop_assert_eq!(round(20, &n.to_string()).unwrap(), n.to_string());
        prop_assert_eq!(round(21, &m.to_string()).unwrap(), m.to_string());
    }

    #[test]
    fn floats_play_back_with_their_digits(f in any::<f64>(), g in any::<f32>()) {
        for text in [format!("{f:e}"), format!("{g:e}"), format!("{f:?}")] {
            // In Postgres' style: the three words, exponents with a sign.
            let text = match text.as_str() {
                "inf" => "Infinity".to_owned(),
                "-inf" => "-Infinity".to_owned(),
                "NaN" => text,
                _ if text.contains("e-") => text,
                _ => text.replace('e', "e+"),
            };
            prop_assert!(
                super::json::is_json_number(text.as_bytes())
                    || matches!(text.as_str(), "NaN" | "Infinity" | "-Infinity"),
                "{}", text
            );
            prop_assert_eq!(round(701, &text).unwrap(), text);
        }
    }

    #[test]
    fn strings_and_bytes_play_back(s in pg_string(), b in prop::collection::vec(any::<u8>(), 0..64)) {
        prop_assert_eq!(round(25, &s).unwrap(), s.clone());
        prop_assert_eq!(round(114, &s).unwrap(), s);
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let text = format!("\\x{hex}");
        prop_assert_eq!(round(17, &text).unwrap(), text);
    }

    #[test]
    fn time_values_play_back(us in FIRST_US..=LAST_US, day_us in 0i64..=86_400_000_000) {
        let ts = time::timestamp_text(us, false).unwrap();
        prop_assert_eq!(round(1114, &ts).unwrap(), ts);
        let tz = time::timestamp_text(us, true).unwrap();
        prop_assert_eq!(round(1184, &tz).unwrap(), tz);
        let days = i64::try_from(us.div_euclid(US_PER_DAY) / 50).unwrap();
        let d = time::date_text(days).unwrap();
        prop_assert_eq!(round(1082, &d).unwrap(), d);
        let t = time::time_text(day_us).unwrap();
        prop_assert_eq!(round(1083, &t).unwrap(), t);
    }

    #[test]
    fn arrays_play_back(
        dims in prop::collection::vec(1usize..4, 1..4),
        seed in prop::collection::vec(prop::option::of(pg_string()), 64),
        ints in prop::collection::vec(prop::option::of(any::<i32>()), 64),
    ) {
        // Texts as array_out prints them, built from nested levels.
        fn build(dims: &[usize], next: &mut dyn FnMut() -> String) -> String {
            let mut s = String::from("{");
            for n in 0..dims[0] {
                if n > 0 {
                    s.push(',');
                }
                if dims.len() == 1 {
                    s.push_str(&next());
                } else {
                    s.push_str(&build(&dims[1..], next));
                }
            }
            s.push('}');
            s
        }
        let mut i = 0;
        let text = build(&dims, &mut || {
            i += 1;
            let mut e = String::new();
            match &seed[i % seed.len()] {
                Some(v) => write_array_element(&mut e, v, b','),
                None => e.push_str("NULL"),
            }
            e
        });
        prop_assert_eq!(round(1009, &text).unwrap(), text);
        let mut j = 0;
        let text = build(&dims, &mut || {
            j += 1;
            ints[j % ints.len()].map_or("NULL".to_owned(), |v| v.to_string())
        });
        prop_assert_eq!(round(1007, &text).unwrap(), text);
    }
}
