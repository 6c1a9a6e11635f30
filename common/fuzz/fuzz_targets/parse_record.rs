//! `parse_record` on any text: never panics, and what it reads, written
//! back with `write_record`, reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_codec_fuzz::codec::{parse_record, write_record};

fuzz_target!(|text: &str| {
    if let Ok(fields) = parse_record(text) {
        let mut again = String::new();
        write_record(&mut again, &fields);
        let reread = parse_record(&again).expect("write_record's text reads back");
        assert_eq!(reread, fields, "{text:?} -> {again:?}");
    }
});
