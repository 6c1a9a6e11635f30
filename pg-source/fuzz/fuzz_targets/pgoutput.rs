//! `pgoutput::decode` on any bytes: never panics, and what it reads is
//! within the bytes it was given (no value longer than the message).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pg_source_fuzz::pgoutput::{decode, Message, Value};

fuzz_target!(|data: &[u8]| {
    let check = |values: &[Value<'_>]| {
        for v in values {
            if let Value::Text(t) = v {
                assert!(t.len() <= data.len());
            }
        }
    };
    match decode(data) {
        Ok(Message::Insert { new, .. }) => check(&new),
        Ok(Message::Update { old, new, .. }) => {
            check(&new);
            if let Some(old) = old {
                check(&old);
            }
        }
        Ok(Message::Delete { old, .. }) => {
            if let Some(old) = old {
                check(&old);
            }
        }
        Ok(Message::Relation(r)) => assert!(r.columns.len() <= data.len()),
        Ok(Message::Truncate { relations }) => assert!(relations.len() * 4 <= data.len()),
        Ok(Message::Type(_) | Message::Other(_)) | Err(_) => {}
    }
});
