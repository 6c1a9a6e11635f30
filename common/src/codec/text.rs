//! Postgres' composite and array literals: reading what `record_out` and
//! `array_out` print, and writing literals their input functions read back.

use std::borrow::Cow;

use super::CodecError;

/// One field of a composite or one element of an array: its text, `None`
/// for SQL NULL. Borrowed from the input when it needed no unescaping.
pub type Field<'a> = Option<Cow<'a, str>>;

fn malformed(what: &'static str, text: &str, at: usize, reason: &str) -> CodecError {
    CodecError::Malformed {
        what,
        at,
        reason: format!("{reason} (in `{}`)", excerpt(text, at)),
    }
}

/// Up to 40 characters of `text` around byte `at`, for messages.
fn excerpt(text: &str, at: usize) -> String {
    let mut start = at.saturating_sub(20).min(text.len());
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let shown: String = text[start..].chars().take(40).collect();
    if start > 0 {
        format!("…{shown}")
    } else {
        shown
    }
}

/// Reads a composite literal as `record_out` prints it (and `record_in`
/// reads it): `(1,"a ""b""",,"")` is `1`, `a "b"`, NULL and the empty
/// string. Quoted parts, `""` inside quotes and backslash escapes anywhere
/// follow `record_in`; an empty unquoted field is NULL.
///
/// `()` is one NULL field, as `record_out` prints a one-column row whose
/// value is NULL (a row of no columns prints the same; the caller knows
/// which it has, see [`RowCodec::encode_record`](super::RowCodec::encode_record)).
///
/// Fails on text `record_in` would refuse.
pub fn parse_record(text: &str) -> Result<Vec<Field<'_>>, CodecError> {
    let bad = |at, reason| malformed("composite literal", text, at, reason);
    let b = text.as_bytes();
    let mut i = 0;
    while b.get(i).copied().is_some_and(is_c_space) {
        i += 1;
    }
    if b.get(i) != Some(&b'(') {
        return Err(bad(i, "missing left parenthesis"));
    }
    i += 1;
    let mut fields = Vec::new();
    loop {
        // A field ends at an unquoted `,` or `)`; an empty one is NULL.
        if matches!(b.get(i), Some(b',' | b')')) {
            fields.push(None);
        } else {
            fields.push(Some(
                record_field(text, &mut i).map_err(|at| bad(at, "unexpected end of input"))?,
            ));
        }
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b')') => {
                i += 1;
                break;
            }
            _ => return Err(bad(i, "unexpected end of input")),
        }
    }
    while b.get(i).copied().is_some_and(is_c_space) {
        i += 1;
    }
    if i != b.len() {
        return Err(bad(i, "junk after right parenthesis"));
    }
    Ok(fields)
}

/// One non-empty field of a composite literal starting at `*i`; leaves `*i`
/// at the `,` or `)` after it. Fails with the offset where the input ended.
fn record_field<'a>(text: &'a str, i: &mut usize) -> Result<Cow<'a, str>, usize> {
    let b = text.as_bytes();
    let start = *i;
    if start >= b.len() {
        return Err(start);
    }
    let ends = |j: usize| matches!(b.get(j), Some(b',' | b')'));
    // Unquoted without escapes: borrowed.
    let j = start
        + b[start..]
            .iter()
            .position(|c| matches!(c, b',' | b')' | b'"' | b'\\'))
            .unwrap_or(b.len() - start);
    if ends(j) {
        *i = j;
        return Ok(Cow::Borrowed(&text[start..j]));
    }
    // One quoted run without `"` or `\` inside: borrowed.
    if b[start] == b'"' {
        let j = start
            + 1
            + b[start + 1..]
                .iter()
                .position(|c| matches!(c, b'"' | b'\\'))
                .unwrap_or(b.len() - start - 1);
        if b.get(j) == Some(&b'"') && ends(j + 1) {
            *i = j + 1;
            return Ok(Cow::Borrowed(&text[start + 1..j]));
        }
    }
    // Anything else, as record_in reads it.
    let mut s = String::new();
    let mut in_quotes = false;
    let mut j = start;
    loop {
        let Some(&c) = b.get(j) else { return Err(j) };
        if !in_quotes && (c == b',' || c == b')') {
            break;
        }
        match c {
            b'\\' => {
                let Some(next) = text[j + 1..].chars().next() else {
                    return Err(j);
                };
                s.push(next);
                j += 1 + next.len_utf8();
            }
            b'"' if !in_quotes => {
                in_quotes = true;
                j += 1;
            }
            b'"' if b.get(j + 1) == Some(&b'"') => {
                s.push('"');
                j += 2;
            }
            b'"' => {
                in_quotes = false;
                j += 1;
            }
            _ => {
                let len = utf8_len(c);
                s.push_str(&text[j..j + len]);
                j += len;
            }
        }
    }
    *i = j;
    Ok(Cow::Owned(s))
}

/// The length of the UTF-8 sequence that starts with `first` (1 for a
/// continuation byte, which never starts a sequence in a `&str`).
fn utf8_len(first: u8) -> usize {
    match first {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

/// Writes a composite literal `record_in` reads back as `fields`, quoted
/// exactly as `record_out` quotes.
pub fn write_record<S: AsRef<str>>(out: &mut String, fields: &[Option<S>]) {
    out.push('(');
    for (n, f) in fields.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        let Some(f) = f else { continue };
        let f = f.as_ref();
        let quote = f.is_empty()
            || f.bytes()
                .any(|c| matches!(c, b'"' | b'\\' | b'(' | b')' | b',') || is_c_space(c));
        if quote {
            out.push('"');
        }
        for c in f.chars() {
            if c == '"' || c == '\\' {
                out.push(c);
            }
            out.push(c);
        }
        if quote {
            out.push('"');
        }
    }
    out.push(')');
}

/// C's `isspace` in the C locale, as `record_out` uses it, and Postgres'
/// `array_isspace`: space, `\t`, `\n`, `\v`, `\f`, `\r`.
fn is_c_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// One dimension of an array: its lower bound and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dim {
    /// The first subscript (1 unless the text says `[lo:hi]=`).
    pub lower: i32,
    /// How many elements.
    pub len: usize,
}

/// An array literal read: its dimensions (none for an empty array) and its
/// elements in row-major order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArrayText<'a> {
    /// Outermost first.
    pub dims: Vec<Dim>,
    /// `dims` multiplied out, row-major.
    pub elements: Vec<Field<'a>>,
}

impl ArrayText<'_> {
    /// Whether every lower bound is 1, as JSON arrays assume.
    pub fn one_based(&self) -> bool {
        self.dims.iter().all(|d| d.lower == 1)
    }

    /// Writes the array as `array_out` prints it: `[lo:hi]...=` first when
    /// a lower bound is not 1, elements quoted by [`write_array_element`].
    pub fn write(&self, out: &mut String, delimiter: u8) {
        if self.dims.is_empty() {
            out.push_str("{}");
            return;
        }
        if !self.one_based() {
            for d in &self.dims {
                let upper = i64::from(d.lower) + d.len as i64 - 1;
                out.push_str(&format!("[{}:{upper}]", d.lower));
            }
            out.push('=');
        }
        let mut elements = self.elements.iter();
        self.write_level(out, 0, delimiter, &mut elements);
    }

    fn write_level<'e>(
        &self,
        out: &mut String,
        depth: usize,
        delimiter: u8,
        elements: &mut impl Iterator<Item = &'e Field<'e>>,
    ) where
        Self: 'e,
    {
        out.push('{');
        for n in 0..self.dims[depth].len {
            if n > 0 {
                out.push(char::from(delimiter));
            }
            if depth + 1 < self.dims.len() {
                self.write_level(out, depth + 1, delimiter, elements);
            } else {
                match elements.next() {
                    Some(Some(e)) => write_array_element(out, e, delimiter),
                    _ => out.push_str("NULL"),
                }
            }
        }
        out.push('}');
    }
}

/// Postgres' limit on array dimensions (`MAXDIM`).
pub const MAX_DIMS: usize = 6;

/// Reads an array literal as `array_out` prints it and `array_in` reads it:
/// an optional `[lo:hi]...=` decoration, nested braces of the same length at
/// each level, elements separated by `delimiter` (the element type's
/// `typdelim`: `,`, or `;` for `box`), quoted with `"` and `\` escapes or
/// unquoted (whitespace around them ignored; unquoted `NULL`, in any case,
/// is NULL).
///
/// Fails on text `array_in` would refuse.
pub fn parse_array(text: &str, delimiter: u8) -> Result<ArrayText<'_>, CodecError> {
    ArrayParser {
        text,
        b: text.as_bytes(),
        i: 0,
        delimiter,
    }
    .parse()
}

struct ArrayParser<'a> {
    text: &'a str,
    b: &'a [u8],
    i: usize,
    delimiter: u8,
}

impl<'a> ArrayParser<'a> {
    fn bad(&self, reason: &str) -> CodecError {
        malformed("array literal", self.text, self.i, reason)
    }

    fn skip_space(&mut self) {
        while self.b.get(self.i).copied().is_some_and(is_c_space) {
            self.i += 1;
        }
    }

    fn bound(&mut self) -> Result<i32, CodecError> {
        let start = self.i;
        while self
            .b
            .get(self.i)
            .is_some_and(|c| c.is_ascii_digit() || *c == b'-' || *c == b'+')
        {
            self.i += 1;
        }
        if start == self.i {
            return Err(self.bad("missing array dimension value"));
        }
        self.text[start..self.i]
            .parse::<i32>()
            .map_err(|_| self.bad("array dimension value out of range"))
    }

    fn parse(mut self) -> Result<ArrayText<'a>, CodecError> {
        let mut given: Vec<Dim> = Vec::new();
        loop {
            self.skip_space();
            if self.b.get(self.i) != Some(&b'[') {
                break;
            }
            self.i += 1;
            if given.len() == MAX_DIMS {
                return Err(self.bad("more than 6 array dimensions"));
            }
            let first = self.bound()?;
            let (lower, upper) = if self.b.get(self.i) == Some(&b':') {
                self.i += 1;
                (first, self.bound()?)
            } else {
                (1, first)
            };
            if self.b.get(self.i) != Some(&b']') {
                return Err(self.bad("missing \"]\" after array dimensions"));
            }
            self.i += 1;
            if upper < lower {
                return Err(self.bad("upper bound cannot be less than lower bound"));
            }
            let len = i64::from(upper) - i64::from(lower) + 1;
            given.push(Dim {
                lower,
                len: len as usize,
            });
        }
        if !given.is_empty() {
            if self.b.get(self.i) != Some(&b'=') {
                return Err(self.bad("missing \"=\" after array dimensions"));
            }
            self.i += 1;
            self.skip_space();
        }
        if self.b.get(self.i) != Some(&b'{') {
            return Err(self.bad("array value must start with \"{\" or dimension information"));
        }
        let mut lens: Vec<Option<usize>> = Vec::new();
        let mut leaf_depth: Option<usize> = None;
        let mut elements = Vec::new();
        self.level(0, &mut lens, &mut leaf_depth, &mut elements)?;
        self.skip_space();
        if self.i != self.b.len() {
            return Err(self.bad("junk after closing right brace"));
        }
        // An empty array has no dimensions, whatever braces it was written with.
        let dims: Vec<Dim> = if elements.is_empty() {
            Vec::new()
        } else {
            lens.iter()
                .map(|l| Dim {
                    lower: 1,
                    len: l.unwrap_or(0),
                })
                .collect()
        };
        if given.is_empty() {
            return Ok(ArrayText { dims, elements });
        }
        if given.len() != dims.len() || given.iter().zip(&dims).any(|(g, d)| g.len != d.len) {
            return Err(self.bad("specified array dimensions do not match array contents"));
        }
        Ok(ArrayText {
            dims: given,
            elements,
        })
    }

    /// One `{...}` at `depth`; records the length of each level and checks
    /// every sub-array of a level has it.
    fn level(
        &mut self,
        depth: usize,
        lens: &mut Vec<Option<usize>>,
        leaf_depth: &mut Option<usize>,
        elements: &mut Vec<Field<'a>>,
    ) -> Result<(), CodecError> {
        if depth == MAX_DIMS {
            return Err(self.bad("more than 6 array dimensions"));
        }
        if lens.len() <= depth {
            lens.push(None);
        }
        self.i += 1; // `{`
        self.skip_space();
        let mut count = 0;
        if self.b.get(self.i) == Some(&b'}') {
            // `{}` is only an array of its own, never a sub-array.
            if depth > 0 {
                return Err(self.bad("unexpected \"}\" character"));
            }
            self.i += 1;
            return Ok(());
        }
        loop {
            self.skip_space();
            match self.b.get(self.i) {
                Some(b'{') => {
                    if leaf_depth.is_some_and(|l| l <= depth) {
                        return Err(self.bad("unexpected \"{\" character"));
                    }
                    self.level(depth + 1, lens, leaf_depth, elements)?;
                }
                Some(_) => {
                    match *leaf_depth {
                        None if lens.len() > depth + 1 => {
                            return Err(self.bad("unexpected array element"))
                        }
                        None => *leaf_depth = Some(depth),
                        Some(l) if l != depth => return Err(self.bad("unexpected array element")),
                        Some(_) => {}
                    }
                    let e = self.element()?;
                    elements.push(e);
                }
                None => return Err(self.bad("unexpected end of input")),
            }
            count += 1;
            self.skip_space();
            match self.b.get(self.i) {
                Some(&c) if c == self.delimiter => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    break;
                }
                Some(_) => return Err(self.bad("unexpected array element")),
                None => return Err(self.bad("unexpected end of input")),
            }
        }
        match lens[depth] {
            None => lens[depth] = Some(count),
            Some(n) if n == count => {}
            Some(_) => {
                return Err(self
                    .bad("multidimensional arrays must have sub-arrays with matching dimensions"))
            }
        }
        Ok(())
    }

    /// One element, quoted or not, up to (not including) the delimiter or
    /// `}` after it.
    fn element(&mut self) -> Result<Field<'a>, CodecError> {
        let text = self.text;
        if self.b[self.i] == b'"' {
            self.i += 1;
            let start = self.i;
            let mut owned: Option<String> = None;
            loop {
                match self.b.get(self.i) {
                    None => return Err(self.bad("unexpected end of input")),
                    Some(b'"') => {
                        let end = self.i;
                        self.i += 1;
                        return Ok(Some(match owned {
                            Some(s) => Cow::Owned(s),
                            None => Cow::Borrowed(&text[start..end]),
                        }));
                    }
                    Some(b'\\') => {
                        let Some(next) = text[self.i + 1..].chars().next() else {
                            return Err(self.bad("unexpected end of input"));
                        };
                        owned
                            .get_or_insert_with(|| text[start..self.i].to_owned())
                            .push(next);
                        self.i += 1 + next.len_utf8();
                    }
                    Some(&c) => {
                        let len = utf8_len(c);
                        if let Some(s) = &mut owned {
                            s.push_str(&text[self.i..self.i + len]);
                        }
                        self.i += len;
                    }
                }
            }
        }
        // Unquoted: up to the delimiter or `}`; trailing unescaped
        // whitespace is not part of it. An empty one is an error.
        let start = self.i;
        if self.b[start] == self.delimiter || self.b[start] == b'}' {
            return Err(self.bad("unexpected delimiter or \"}\""));
        }
        let mut owned: Option<String> = None;
        // Bytes of `owned` (or of the borrowed text) that end in
        // escaped characters, which whitespace trimming must keep.
        let mut keep = 0;
        loop {
            match self.b.get(self.i) {
                None => return Err(self.bad("unexpected end of input")),
                Some(&c) if c == self.delimiter || c == b'}' => break,
                Some(b'{' | b'"') => return Err(self.bad("unexpected character in an element")),
                Some(b'\\') => {
                    let Some(next) = text[self.i + 1..].chars().next() else {
                        return Err(self.bad("unexpected end of input"));
                    };
                    let s = owned.get_or_insert_with(|| text[start..self.i].to_owned());
                    s.push(next);
                    keep = s.len();
                    self.i += 1 + next.len_utf8();
                }
                Some(&c) => {
                    let len = utf8_len(c);
                    if let Some(s) = &mut owned {
                        s.push_str(&text[self.i..self.i + len]);
                    }
                    self.i += len;
                }
            }
        }
        Ok(Some(match owned {
            Some(mut s) => {
                let trimmed = s.as_bytes()[keep..]
                    .iter()
                    .rposition(|c| !is_c_space(*c))
                    .map_or(keep, |p| keep + p + 1);
                s.truncate(trimmed);
                Cow::Owned(s)
            }
            None => {
                let raw = &text[start..self.i];
                let trimmed = raw.trim_end_matches(|c: char| c.is_ascii() && is_c_space(c as u8));
                if trimmed.eq_ignore_ascii_case("NULL") {
                    return Ok(None);
                }
                Cow::Borrowed(trimmed)
            }
        }))
    }
}

/// Writes one array element as `array_out` does: quoted when it is empty,
/// `NULL` in any case, or holds `"`, `\`, braces, the delimiter or
/// whitespace; `"` and `\` escaped inside quotes.
pub fn write_array_element(out: &mut String, element: &str, delimiter: u8) {
    let quote = element.is_empty()
        || element.eq_ignore_ascii_case("NULL")
        || element
            .bytes()
            .any(|c| matches!(c, b'"' | b'\\' | b'{' | b'}') || c == delimiter || is_c_space(c));
    if !quote {
        out.push_str(element);
        return;
    }
    out.push('"');
    for c in element.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Writes one field of `COPY`'s text format (the tab-separated form
/// `COPY ... FROM STDIN` reads): `\N` for NULL; `\\`, `\b`, `\f`, `\n`, `\r`,
/// `\t`, `\v` for those characters, everything else as it is.
pub fn write_copy_field(out: &mut String, field: Option<&str>) {
    let Some(field) = field else {
        out.push_str("\\N");
        return;
    };
    for c in field.chars() {
        let escaped = match c {
            '\\' => "\\\\",
            '\u{8}' => "\\b",
            '\u{c}' => "\\f",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            '\u{b}' => "\\v",
            _ => {
                out.push(c);
                continue;
            }
        };
        out.push_str(escaped);
    }
}

/// Reads one line of `COPY ... TO` text format (without its newline): the
/// tab-separated fields, `\N` as NULL, backslash escapes as `COPY FROM`
/// reads them (`\b \f \n \r \t \v`, octal `\NNN`, hex `\xHH`, any other
/// character as itself).
///
/// Fails on a line that ends in a lone backslash or decodes to bytes that
/// are not UTF-8.
pub fn parse_copy_line(line: &str) -> Result<Vec<Option<String>>, CodecError> {
    let bad = |at, reason| malformed("COPY text line", line, at, reason);
    let mut fields = Vec::new();
    for raw in line.split('\t') {
        if raw == "\\N" {
            fields.push(None);
            continue;
        }
        if !raw.contains('\\') {
            fields.push(Some(raw.to_owned()));
            continue;
        }
        let b = raw.as_bytes();
        let mut bytes = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] != b'\\' {
                bytes.push(b[i]);
                i += 1;
                continue;
            }
            let Some(&c) = b.get(i + 1) else {
                return Err(bad(i, "a lone backslash at the end"));
            };
            i += 2;
            match c {
                b'b' => bytes.push(8),
                b'f' => bytes.push(12),
                b'n' => bytes.push(b'\n'),
                b'r' => bytes.push(b'\r'),
                b't' => bytes.push(b'\t'),
                b'v' => bytes.push(11),
                b'0'..=b'7' => {
                    let mut v = u32::from(c - b'0');
                    for _ in 0..2 {
                        match b.get(i) {
                            Some(d @ b'0'..=b'7') => {
                                v = v * 8 + u32::from(d - b'0');
                                i += 1;
                            }
                            _ => break,
                        }
                    }
                    bytes.push((v & 0xff) as u8);
                }
                b'x' if b.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                    let mut v = 0u32;
                    for _ in 0..2 {
                        match b.get(i) {
                            Some(d) if d.is_ascii_hexdigit() => {
                                v = v * 16 + (*d as char).to_digit(16).unwrap_or(0);
                                i += 1;
                            }
                            _ => break,
                        }
                    }
                    bytes.push(v as u8);
                }
                other => bytes.push(other),
            }
        }
        let s = String::from_utf8(bytes).map_err(|_| bad(0, "not UTF-8 after unescaping"))?;
        fields.push(Some(s));
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(s: &str) -> Vec<Option<String>> {
        parse_record(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .into_iter()
            .map(|f| f.map(Cow::into_owned))
            .collect()
    }

    fn some(v: &[Option<&str>]) -> Vec<Option<String>> {
        v.iter().map(|f| f.map(str::to_owned)).collect()
    }

    #[test]
    fn records_read_as_record_in_does() {
        assert_eq!(rec("(1,abc)"), some(&[Some("1"), Some("abc")]));
        assert_eq!(
            rec(r#"("a""b","c\\d","",,"x y","a,b","(")"#),
            some(&[
                Some("a\"b"),
                Some("c\\d"),
                Some(""),
                None,
                Some("x y"),
                Some("a,b"),
                Some("(")
            ])
        );
        assert_eq!(rec("()"), some(&[None]));
        assert_eq!(rec("(,)"), some(&[None, None]));
        // Mixed quoted and unquoted parts, escapes outside quotes.
        assert_eq!(rec(r#"(a"b c"d,\,x)"#), some(&[Some("ab cd"), Some(",x")]));
        assert_eq!(rec(" (\"é😀\") "), some(&[Some("é😀")]));
        for bad in [
            "", "1,2", "(1,2", "(\"a)", "(a)x", "(a\\", "(\"a\"\"", "x(a)",
        ] {
            assert!(parse_record(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn plain_fields_are_borrowed() {
        let text = r#"(abc,"d e",x\y)"#;
        let f = parse_record(text).unwrap();
        assert!(matches!(f[0], Some(Cow::Borrowed("abc"))));
        assert!(matches!(f[1], Some(Cow::Borrowed("d e"))));
        assert!(matches!(f[2], Some(Cow::Owned(_))));
    }

    #[test]
    fn records_written_read_back() {
        let fields = [
            Some("a\"b"),
            Some("c\\d"),
            Some(""),
            None,
            Some("x y"),
            Some("(,)"),
            Some("\n"),
        ];
        let mut s = String::new();
        write_record(&mut s, &fields);
        assert_eq!(s, "(\"a\"\"b\",\"c\\\\d\",\"\",,\"x y\",\"(,)\",\"\n\")");
        assert_eq!(rec(&s), some(&fields));
    }

    fn arr(s: &str) -> (Vec<Dim>, Vec<Option<String>>) {
        let a = parse_array(s, b',').unwrap_or_else(|e| panic!("{s}: {e}"));
        (
            a.dims,
            a.elements
                .into_iter()
                .map(|f| f.map(Cow::into_owned))
                .collect(),
        )
    }

    fn dims(d: &[(i32, usize)]) -> Vec<Dim> {
        d.iter().map(|&(lower, len)| Dim { lower, len }).collect()
    }

    #[test]
    fn arrays_read_as_array_in_does() {
        assert_eq!(arr("{}"), (vec![], vec![]));
        assert_eq!(
            arr("{1,NULL,-2}"),
            (dims(&[(1, 3)]), some(&[Some("1"), None, Some("-2")]))
        );
        assert_eq!(
            arr(r#"{"a\"b","c\\d","","NULL","x y","a,b","{",null}"#),
            (
                dims(&[(1, 8)]),
                some(&[
                    Some("a\"b"),
                    Some("c\\d"),
                    Some(""),
                    Some("NULL"),
                    Some("x y"),
                    Some("a,b"),
                    Some("{"),
                    None
                ])
            )
        );
        assert_eq!(
            arr("{{1,2},{3,NULL}}"),
            (
                dims(&[(1, 2), (1, 2)]),
                some(&[Some("1"), Some("2"), Some("3"), None])
            )
        );
        assert_eq!(
            arr("{{{x}}}"),
            (dims(&[(1, 1), (1, 1), (1, 1)]), some(&[Some("x")]))
        );
        assert_eq!(
            arr("[0:1]={7,8}"),
            (dims(&[(0, 2)]), some(&[Some("7"), Some("8")]))
        );
        assert_eq!(
            arr("[-2:-1][3:3]={{a},{b}}"),
            (dims(&[(-2, 2), (3, 1)]), some(&[Some("a"), Some("b")]))
        );
        // Whitespace around elements goes, inside and escaped stays.
        assert_eq!(
            arr("{ a b , c\\  }"),
            (dims(&[(1, 2)]), some(&[Some("a b"), Some("c ")]))
        );
        for bad in [
            "",
            "{",
            "{1,}",
            "{,1}",
            "{{1},2}",
            "{1,{2}}",
            "{{1},{2,3}}",
            "{{},{}}",
            "{\"a\" b}",
            "{1} x",
            "[1:2]={1}",
            "[2:1]={}",
            "[1:2]{1,2}",
            "1",
            "{a\"b}",
            "{{{{{{{1}}}}}}}",
            "[99999999999:1]={1}",
        ] {
            assert!(parse_array(bad, b',').is_err(), "{bad:?}");
        }
    }

    #[test]
    fn copy_text_fields_round_trip() {
        let fields = [
            Some("a\tb\\c\nd\re\u{8}\u{b}\u{c}"),
            None,
            Some(""),
            Some("\\N"),
            Some("😀"),
        ];
        let mut line = String::new();
        for (n, f) in fields.iter().enumerate() {
            if n > 0 {
                line.push('\t');
            }
            write_copy_field(&mut line, *f);
        }
        assert_eq!(line, "a\\tb\\\\c\\nd\\re\\b\\v\\f\t\\N\t\t\\\\N\t😀");
        let back = parse_copy_line(&line).unwrap();
        assert_eq!(back, some(&fields));
        assert_eq!(
            parse_copy_line("\\101\\x41\\q").unwrap(),
            some(&[Some("AAq")])
        );
        assert!(parse_copy_line("a\\").is_err());
    }

    #[test]
    fn arrays_are_written_as_array_out_does() {
        for text in [
            "{}",
            "{1,NULL,-2}",
            "{{1,2},{3,NULL}}",
            "[0:1]={7,8}",
            "[-2:-1][3:3]={{a},{b}}",
            r#"{"a\"b","c\\d","","NULL"," x "}"#,
        ] {
            let mut out = String::new();
            parse_array(text, b',').unwrap().write(&mut out, b',');
            assert_eq!(out, text);
        }
    }

    #[test]
    fn the_delimiter_is_the_element_types() {
        let a = parse_array("{(1,1),(0,0);(2,2),(1,1)}", b';').unwrap();
        assert_eq!(a.elements.len(), 2);
        assert_eq!(a.elements[0].as_deref(), Some("(1,1),(0,0)"));
    }

    #[test]
    fn elements_are_quoted_as_array_out_does() {
        let w = |e: &str, d: u8| {
            let mut s = String::new();
            write_array_element(&mut s, e, d);
            s
        };
        assert_eq!(w("plain", b','), "plain");
        assert_eq!(w("", b','), r#""""#);
        assert_eq!(w("null", b','), r#""null""#);
        assert_eq!(w("a\"b\\", b','), r#""a\"b\\""#);
        assert_eq!(w("a,b", b','), r#""a,b""#);
        assert_eq!(w("a,b", b';'), "a,b");
        assert_eq!(w("a;b", b';'), r#""a;b""#);
        assert_eq!(w("x y", b','), r#""x y""#);
        assert_eq!(w("{}", b','), r#""{}""#);
    }
}
