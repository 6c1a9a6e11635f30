//! JSON text as Postgres' `row_to_json` writes it.

/// Writes `s` as a JSON string exactly as Postgres' `escape_json` does:
/// `\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`, every other byte below 0x20 as
/// `\u00XX` in lower case, everything else (DEL and all non-ASCII UTF-8) as
/// it is.
pub fn escape_json_into(out: &mut Vec<u8>, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.push(b'"');
    let mut start = 0;
    for (i, &byte) in s.iter().enumerate() {
        let short: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => {
                out.extend_from_slice(&s[start..i]);
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0xf)]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&s[start..i]);
        out.extend_from_slice(short);
        start = i + 1;
    }
    out.extend_from_slice(&s[start..]);
    out.push(b'"');
}

/// Whether `s` is a JSON number (RFC 8259): what `row_to_json` prints bare
/// rather than as a string.
pub fn is_json_number(s: &[u8]) -> bool {
    let mut i = 0;
    if s.first() == Some(&b'-') {
        i += 1;
    }
    match s.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            while s.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
        }
        _ => return false,
    }
    if s.get(i) == Some(&b'.') {
        i += 1;
        let digits = i;
        while s.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == digits {
            return false;
        }
    }
    if matches!(s.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(s.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let digits = i;
        while s.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == digits {
            return false;
        }
    }
    i == s.len()
}

/// Whether `s` is an integer as Postgres' integer output functions print
/// it: an optional `-` and digits without leading zeros.
pub fn is_pg_integer(s: &[u8]) -> bool {
    let digits = s.strip_prefix(b"-").unwrap_or(s);
    match digits {
        [b'0'] => s.len() == 1,
        [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esc(s: &str) -> String {
        let mut out = Vec::new();
        escape_json_into(&mut out, s.as_bytes());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn strings_are_escaped_as_postgres_does() {
        assert_eq!(esc(""), r#""""#);
        assert_eq!(esc("plain"), r#""plain""#);
        assert_eq!(esc("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(esc("\u{8}\u{c}\n\r\t"), r#""\b\f\n\r\t""#);
        assert_eq!(esc("\u{1}\u{1f}\u{7f}"), "\"\\u0001\\u001f\u{7f}\"");
        assert_eq!(esc("é😀/"), "\"é😀/\"");
        // What comes out is JSON that reads back as the input.
        let s = "x\u{0}\u{1b}[1m\"\\\n😀";
        let v: serde_json::Value = serde_json::from_str(&esc(s)).unwrap();
        assert_eq!(v, s);
    }

    #[test]
    fn json_numbers_are_recognised() {
        for ok in [
            "0",
            "-0",
            "1.5",
            "1e+30",
            "1E5",
            "-2.2250738585072014e-308",
            "123",
        ] {
            assert!(is_json_number(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "-",
            "NaN",
            "Infinity",
            "-Infinity",
            "01",
            "1.",
            ".5",
            "1e",
            "+1",
            "1 ",
        ] {
            assert!(!is_json_number(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn integers_are_recognised() {
        for ok in ["0", "-1", "9223372036854775807", "-32768"] {
            assert!(is_pg_integer(ok.as_bytes()), "{ok}");
        }
        for bad in ["", "-", "-0", "01", "1.0", "1e3", " 1", "+1"] {
            assert!(!is_pg_integer(bad.as_bytes()), "{bad}");
        }
    }
}
