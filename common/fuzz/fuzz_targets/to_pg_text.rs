//! `to_pg_text` on any JSON under any of the codec's field schemas (the
//! first byte picks one): never panics; a text it gives, encoded and played
//! back again, is stable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tidemark_codec_fuzz::codec::{to_pg_text, Variants};
use tidemark_codec_fuzz::one_column;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(json) = serde_json::from_slice::<Value>(rest) else {
        return;
    };
    let (oid, codec) = one_column(pick);
    let schemas = [
        codec.fields(&Variants::default())[0].clone(),
        serde_json::json!({"type": "string", "name": "tidemark.data.PgText", "field": "c"}),
        serde_json::json!({"type": "string", "name": "io.debezium.time.IsoTimestamp", "field": "c"}),
    ];
    let schema = &schemas[usize::from(pick >> 6) % schemas.len()];
    let Ok(Some(text)) = to_pg_text(schema, &json) else {
        return;
    };
    // Once through the codec normalises (`{ 1 }` to `[1]`); again, nothing
    // may change.
    let mut first = Vec::new();
    let Ok(variants) = codec.encode(&[Some(text.as_str())], &mut first) else {
        return;
    };
    let first: Value = serde_json::from_slice(&first).expect("the codec writes JSON");
    let field = &codec.fields(&variants)[0];
    let back = to_pg_text(field, &first["c"])
        .expect("the codec's JSON plays back")
        .expect("not NULL");
    let mut second = Vec::new();
    let again = codec
        .encode(&[Some(back.as_str())], &mut second)
        .expect("played-back text encodes");
    let second: Value = serde_json::from_slice(&second).expect("the codec writes JSON");
    assert_eq!(first, second, "{oid}: {text:?} -> {back:?}");
    assert_eq!(variants.get(0), again.get(0));
});
