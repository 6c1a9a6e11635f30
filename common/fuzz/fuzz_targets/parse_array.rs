//! `parse_array` on any text (the first byte picks the delimiter): never
//! panics, its dimensions multiply out to its elements, and what it reads,
//! written back as `array_out` would, reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_codec_fuzz::codec::{parse_array, MAX_DIMS};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let delimiter = if first & 1 == 0 { b',' } else { b';' };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if let Ok(array) = parse_array(text, delimiter) {
        assert!(array.dims.len() <= MAX_DIMS);
        let count: usize = array.dims.iter().map(|d| d.len).product();
        let count = if array.dims.is_empty() { 0 } else { count };
        assert_eq!(array.elements.len(), count, "{text:?}");
        let mut again = String::new();
        array.write(&mut again, delimiter);
        let reread = parse_array(&again, delimiter).expect("array_out's form reads back");
        assert_eq!(reread, array, "{text:?} -> {again:?}");
    }
});
