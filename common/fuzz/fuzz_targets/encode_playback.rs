//! The forward mapping on any text for every built-in type (the first byte
//! picks it): never panics; whatever it accepts is JSON that plays back to
//! a text that encodes to the same JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tidemark_codec_fuzz::codec::to_pg_text;
use tidemark_codec_fuzz::one_column;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let (oid, codec) = one_column(pick);
    let mut out = Vec::new();
    let Ok(variants) = codec.encode(&[Some(rest)], &mut out) else {
        return;
    };
    let json: Value = serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("{oid}: not JSON ({e}): {}", String::from_utf8_lossy(&out)));
    let field = &codec.fields(&variants)[0];
    let text = to_pg_text(field, &json["c"])
        .unwrap_or_else(|e| panic!("{oid}: {json} does not play back: {e}"))
        .expect("not NULL");
    let mut again = Vec::new();
    let v2 = codec
        .encode(&[Some(text.as_str())], &mut again)
        .unwrap_or_else(|e| panic!("{oid}: played back {text:?} does not encode: {e}"));
    let again: Value = serde_json::from_slice(&again).expect("JSON");
    assert_eq!(
        json,
        again,
        "{oid}: {:?} -> {text:?}",
        String::from_utf8_lossy(rest)
    );
    assert_eq!(variants, v2);
});
