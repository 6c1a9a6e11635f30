//! Dates and times between Postgres' ISO text (`DateStyle=ISO`) and
//! Debezium's numbers, with integer arithmetic only: no value passes through
//! a float, so every microsecond of every year Postgres allows (4713 BC to
//! 294276 AD for timestamps, 5874897 AD for dates) comes back exactly.
//!
//! Years are astronomical inside (1 BC is year 0, 2 BC is -1), as in the
//! proleptic Gregorian calendar Postgres uses; the text has `BC` after them.

/// Microseconds in a day.
pub const US_PER_DAY: i128 = 86_400_000_000;

/// A point in time or a date, with Postgres' infinities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instant<T> {
    /// `-infinity`
    NegInfinity,
    /// A finite value: microseconds (timestamps) or days (dates) since
    /// 1970-01-01 (00:00 UTC for `timestamptz`).
    Finite(T),
    /// `infinity`
    Infinity,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (astronomical year).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let (m, d) = (i64::from(month), i64::from(day));
    let y = if m <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date (astronomical year, month, day) of a day
/// count since 1970-01-01; `days` must be within ±2^60.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u32, d as u32)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if year.rem_euclid(4) == 0
            && (year.rem_euclid(100) != 0 || year.rem_euclid(400) == 0) =>
        {
            29
        }
        2 => 28,
        _ => 31,
    }
}

/// A cursor over ASCII text.
struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn new(s: &'a str) -> Self {
        Self {
            s: s.as_bytes(),
            i: 0,
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.s.get(self.i) == Some(&b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn eat_str(&mut self, s: &str) -> bool {
        if self.s[self.i..].starts_with(s.as_bytes()) {
            self.i += s.len();
            true
        } else {
            false
        }
    }

    /// `min..=max` decimal digits as a number.
    fn digits(&mut self, min: usize, max: usize) -> Option<(i64, usize)> {
        let start = self.i;
        let mut n: i64 = 0;
        while self.i - start < max {
            match self.s.get(self.i) {
                Some(d @ b'0'..=b'9') => {
                    n = n * 10 + i64::from(d - b'0');
                    self.i += 1;
                }
                _ => break,
            }
        }
        let count = self.i - start;
        (count >= min).then_some((n, count))
    }

    fn done(&self) -> bool {
        self.i == self.s.len()
    }
}

/// Why a text is not the form the codec reads.
pub type TimeError = String;

fn bad(what: &str, text: &str) -> TimeError {
    let shown: String = text.chars().take(48).collect();
    format!("`{shown}` is not {what} in the ISO form Postgres prints with DateStyle=ISO")
}

/// Year, month, day (as written, year ≥ 1).
fn date_part(c: &mut Cursor<'_>) -> Option<(i64, u32, u32)> {
    let (year, _) = c.digits(4, 9)?;
    if !c.eat(b'-') {
        return None;
    }
    let (month, _) = c.digits(2, 2)?;
    if !c.eat(b'-') {
        return None;
    }
    let (day, _) = c.digits(2, 2)?;
    let (month, day) = (month as u32, day as u32);
    if year < 1 || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some((year, month, day))
}

/// `HH:MM:SS[.f]` as microseconds; `24:00:00` allowed.
fn time_part(c: &mut Cursor<'_>) -> Option<i64> {
    let (h, _) = c.digits(2, 2)?;
    if !c.eat(b':') {
        return None;
    }
    let (m, _) = c.digits(2, 2)?;
    if !c.eat(b':') {
        return None;
    }
    let (s, _) = c.digits(2, 2)?;
    let mut us = 0;
    if c.eat(b'.') {
        let (f, n) = c.digits(1, 6)?;
        us = f * 10_i64.pow(6 - n as u32);
    }
    if h > 24 || m > 59 || s > 59 || (h == 24 && (m, s, us) != (0, 0, 0)) {
        return None;
    }
    Some(((h * 60 + m) * 60 + s) * 1_000_000 + us)
}

/// The astronomical year of a written year and era.
fn astronomical(year: i64, bc: bool) -> i64 {
    if bc {
        1 - year
    } else {
        year
    }
}

fn checked_days(year: i64, month: u32, day: u32, bc: bool) -> Option<i64> {
    let year = astronomical(year, bc);
    (day <= days_in_month(year, month)).then(|| days_from_civil(year, month, day))
}

/// A `date`'s text: days since 1970-01-01, or an infinity.
pub fn parse_date(text: &str) -> Result<Instant<i64>, TimeError> {
    match text {
        "infinity" => return Ok(Instant::Infinity),
        "-infinity" => return Ok(Instant::NegInfinity),
        _ => {}
    }
    let mut c = Cursor::new(text);
    let parsed = (|| {
        let (y, m, d) = date_part(&mut c)?;
        let bc = c.eat_str(" BC");
        c.done().then_some(())?;
        checked_days(y, m, d, bc)
    })();
    parsed
        .map(Instant::Finite)
        .ok_or_else(|| bad("a date", text))
}

/// A `timestamp`'s text: microseconds since 1970-01-01 00:00, or an
/// infinity.
pub fn parse_timestamp(text: &str) -> Result<Instant<i128>, TimeError> {
    parse_stamp(text, false).ok_or_else(|| bad("a timestamp", text))
}

/// A `timestamptz`'s text: microseconds since 1970-01-01 00:00 UTC, or an
/// infinity. Any UTC offset is applied (Tidemark's sessions print `+00`).
pub fn parse_timestamptz(text: &str) -> Result<Instant<i128>, TimeError> {
    parse_stamp(text, true).ok_or_else(|| bad("a timestamp with time zone", text))
}

fn parse_stamp(text: &str, zoned: bool) -> Option<Instant<i128>> {
    match text {
        "infinity" => return Some(Instant::Infinity),
        "-infinity" => return Some(Instant::NegInfinity),
        _ => {}
    }
    let mut c = Cursor::new(text);
    let (y, m, d) = date_part(&mut c)?;
    if !c.eat(b' ') {
        return None;
    }
    let tod = time_part(&mut c)?;
    if tod >= 86_400_000_000 {
        return None;
    }
    let mut offset_s: i64 = 0;
    if zoned {
        let sign = if c.eat(b'+') {
            1
        } else if c.eat(b'-') {
            -1
        } else {
            return None;
        };
        let (h, _) = c.digits(2, 2)?;
        let mut secs = h * 3600;
        if c.eat(b':') {
            secs += c.digits(2, 2)?.0 * 60;
            if c.eat(b':') {
                secs += c.digits(2, 2)?.0;
            }
        }
        offset_s = sign * secs;
    }
    let bc = c.eat_str(" BC");
    if !c.done() {
        return None;
    }
    let days = checked_days(y, m, d, bc)?;
    let local = i128::from(days) * US_PER_DAY + i128::from(tod);
    Some(Instant::Finite(local - i128::from(offset_s) * 1_000_000))
}

/// A `time`'s text as microseconds since midnight (`24:00:00` is
/// 86400000000).
pub fn parse_time(text: &str) -> Result<i64, TimeError> {
    let mut c = Cursor::new(text);
    time_part(&mut c)
        .filter(|_| c.done())
        .ok_or_else(|| bad("a time", text))
}

/// Splits microseconds since 1970 into days and microseconds of the day.
fn split(us: i128) -> Option<(i64, i64)> {
    let days = i64::try_from(us.div_euclid(US_PER_DAY)).ok()?;
    if days.unsigned_abs() > 1 << 40 {
        return None;
    }
    Some((days, us.rem_euclid(US_PER_DAY) as i64))
}

/// Writes `n` in decimal, zero-padded to `width` digits.
fn push_number(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut buf = [b'0'; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for _ in buf.len() - i..width {
        out.push(b'0');
    }
    out.extend_from_slice(&buf[i..]);
}

/// Writes `YYYY-MM-DD` (at least four year digits) and whether the date is
/// BC.
fn write_date(out: &mut Vec<u8>, days: i64) -> bool {
    let (y, m, d) = civil_from_days(days);
    let (year, bc) = if y <= 0 { (1 - y, true) } else { (y, false) };
    push_number(out, year as u64, 4);
    out.push(b'-');
    push_number(out, u64::from(m), 2);
    out.push(b'-');
    push_number(out, u64::from(d), 2);
    bc
}

/// Writes `HH:MM:SS` of microseconds since midnight; returns the
/// microseconds left.
fn write_clock(out: &mut Vec<u8>, tod: i64) -> i64 {
    let secs = (tod / 1_000_000) as u64;
    push_number(out, secs / 3600, 2);
    out.push(b':');
    push_number(out, secs / 60 % 60, 2);
    out.push(b':');
    push_number(out, secs % 60, 2);
    tod % 1_000_000
}

/// Postgres' fraction: up to six digits, trailing zeros dropped, nothing
/// for a whole second.
fn write_fraction(out: &mut Vec<u8>, us: i64) {
    if us != 0 {
        let mut us = us as u64;
        let mut width = 6;
        while us.is_multiple_of(10) {
            us /= 10;
            width -= 1;
        }
        out.push(b'.');
        push_number(out, us, width);
    }
}

fn ascii(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).expect("dates and times are ASCII")
}

/// Writes the ISO text Tidemark's records carry for a `timestamp` that int64
/// microseconds cannot hold, and for `timestamptz` (`zulu`): what 0.1's
/// `to_char(.., 'YYYY-MM-DD"T"HH24:MI:SS.US')` printed, always six
/// fractional digits, `Z` for `timestamptz`, ` BC` after years before 1 AD.
/// `None` (and nothing written) beyond ±2^40 days.
pub fn write_iso(out: &mut Vec<u8>, us: i128, zulu: bool) -> Option<()> {
    let (days, tod) = split(us)?;
    let bc = write_date(out, days);
    out.push(b'T');
    let frac = write_clock(out, tod);
    out.push(b'.');
    push_number(out, frac as u64, 6);
    if zulu {
        out.push(b'Z');
    }
    if bc {
        out.extend_from_slice(b" BC");
    }
    Some(())
}

/// [`write_iso`] as a string.
#[cfg(test)]
pub fn iso_text(us: i128, zulu: bool) -> Option<String> {
    let mut out = Vec::with_capacity(32);
    write_iso(&mut out, us, zulu)?;
    Some(ascii(out))
}

/// Reads [`iso_text`] back to microseconds since 1970 (UTC for `zulu`).
pub fn parse_iso(text: &str, zulu: bool) -> Result<i128, TimeError> {
    let parsed = (|| {
        let mut c = Cursor::new(text);
        let (y, m, d) = date_part(&mut c)?;
        if !c.eat(b'T') {
            return None;
        }
        let tod = time_part(&mut c)?;
        if tod >= 86_400_000_000 || (zulu && !c.eat(b'Z')) {
            return None;
        }
        let bc = c.eat_str(" BC");
        c.done().then_some(())?;
        let days = checked_days(y, m, d, bc)?;
        Some(i128::from(days) * US_PER_DAY + i128::from(tod))
    })();
    parsed.ok_or_else(|| bad("an ISO 8601 timestamp", text))
}

/// A `timestamp` (or, with `zoned`, a `timestamptz` in UTC) as Postgres
/// prints it: `2024-02-29 23:59:59.5`, `+00` for `timestamptz`, ` BC`.
pub fn timestamp_text(us: i128, zoned: bool) -> Option<String> {
    let (days, tod) = split(us)?;
    let mut out = Vec::with_capacity(32);
    let bc = write_date(&mut out, days);
    out.push(b' ');
    let frac = write_clock(&mut out, tod);
    write_fraction(&mut out, frac);
    if zoned {
        out.extend_from_slice(b"+00");
    }
    if bc {
        out.extend_from_slice(b" BC");
    }
    Some(ascii(out))
}

/// A `date` as Postgres prints it.
pub fn date_text(days: i64) -> Option<String> {
    if days.unsigned_abs() > 1 << 40 {
        return None;
    }
    let mut out = Vec::with_capacity(16);
    if write_date(&mut out, days) {
        out.extend_from_slice(b" BC");
    }
    Some(ascii(out))
}

/// A `time` as Postgres prints it; `None` outside 00:00 to 24:00.
pub fn time_text(us: i64) -> Option<String> {
    if !(0..=86_400_000_000).contains(&us) {
        return None;
    }
    let mut out = Vec::with_capacity(16);
    let frac = write_clock(&mut out, us);
    write_fraction(&mut out, frac);
    Some(ascii(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_calendar_is_proleptic_gregorian() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 1, 1), 10_957);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        // 4714-11-24 BC (astronomical -4713), Postgres' first date, is
        // Julian day 0, 2440588 days before 1970.
        assert_eq!(days_from_civil(-4713, 11, 24), -2_440_588);
        for days in [-2_440_588, -1, 0, 59, 60, 10_957, 2_145_031_948] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        for days in (-3_000_000..3_000_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert!(d <= days_in_month(y, m));
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn timestamps_parse_to_microseconds() {
        let ts = |s| parse_timestamp(s).unwrap();
        assert_eq!(ts("1970-01-01 00:00:00"), Instant::Finite(0));
        assert_eq!(
            ts("2024-02-29 23:59:59.999999"),
            Instant::Finite(1_709_251_199_999_999)
        );
        assert_eq!(ts("1969-12-31 23:59:59.5"), Instant::Finite(-500_000));
        assert_eq!(ts("infinity"), Instant::Infinity);
        assert_eq!(ts("-infinity"), Instant::NegInfinity);
        assert_eq!(
            ts("294247-01-10 04:00:54.775807"),
            Instant::Finite(i128::from(i64::MAX))
        );
        assert_eq!(
            ts("4714-11-24 00:00:00 BC"),
            Instant::Finite(-2_440_588 * US_PER_DAY)
        );
        for bad in [
            "2024-02-30 00:00:00",
            "2023-02-29 00:00:00",
            "2024-01-01",
            "2024-01-01 24:00:00",
            "2024-01-01 00:00:00.1234567",
            "2024-01-01T00:00:00",
            "0000-01-01 00:00:00",
            "01/01/2024 00:00:00",
            "2024-01-01 00:00:00 AD",
        ] {
            assert!(parse_timestamp(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn zoned_timestamps_are_taken_to_utc() {
        let tz = |s| parse_timestamptz(s).unwrap();
        assert_eq!(tz("1970-01-01 00:00:00+00"), Instant::Finite(0));
        assert_eq!(
            tz("1970-01-01 05:30:00+05:30"),
            Instant::Finite(0),
            "an offset is applied"
        );
        assert_eq!(
            tz("0044-03-15 17:53:28.5+05:53:28 BC"),
            tz("0044-03-15 12:00:00.5+00 BC")
        );
        assert!(parse_timestamptz("1970-01-01 00:00:00").is_err());
    }

    #[test]
    fn iso_text_is_what_0_1_printed() {
        assert_eq!(
            iso_text(1_709_251_199_999_999, true).unwrap(),
            "2024-02-29T23:59:59.999999Z"
        );
        assert_eq!(iso_text(0, false).unwrap(), "1970-01-01T00:00:00.000000");
        let bc = match parse_timestamptz("0044-03-15 12:00:00.5+00 BC").unwrap() {
            Instant::Finite(us) => us,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            iso_text(bc, true).unwrap(),
            "0044-03-15T12:00:00.500000Z BC"
        );
        assert_eq!(
            parse_iso("0044-03-15T12:00:00.500000Z BC", true).unwrap(),
            bc
        );
        let far = match parse_timestamp("294276-12-31 23:59:59.999999").unwrap() {
            Instant::Finite(us) => us,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            iso_text(far, false).unwrap(),
            "294276-12-31T23:59:59.999999"
        );
        assert_eq!(
            parse_iso("294276-12-31T23:59:59.999999", false).unwrap(),
            far
        );
    }

    #[test]
    fn postgres_text_comes_back_exactly() {
        for s in [
            "2024-02-29 23:59:59.999999",
            "1969-12-31 23:59:59.5",
            "0044-03-15 12:00:00.5 BC",
            "4714-11-24 00:00:00 BC",
            "294276-12-31 23:59:59.999999",
            "1900-01-01 00:00:00.000001",
        ] {
            let Instant::Finite(us) = parse_timestamp(s).unwrap() else {
                panic!()
            };
            assert_eq!(timestamp_text(us, false).unwrap(), s);
            let zoned = match s.strip_suffix(" BC") {
                Some(rest) => format!("{rest}+00 BC"),
                None => format!("{s}+00"),
            };
            assert_eq!(timestamp_text(us, true).unwrap(), zoned);
        }
        for s in [
            "2024-02-29",
            "0044-03-15 BC",
            "5874897-12-31",
            "4714-11-24 BC",
        ] {
            let Instant::Finite(d) = parse_date(s).unwrap() else {
                panic!()
            };
            assert_eq!(date_text(d).unwrap(), s);
        }
        for s in ["00:00:00", "23:59:59.999999", "24:00:00", "12:00:00.5"] {
            assert_eq!(time_text(parse_time(s).unwrap()).unwrap(), s);
        }
        assert_eq!(parse_time("24:00:00").unwrap(), 86_400_000_000);
        assert!(parse_time("24:00:00.000001").is_err());
        assert!(time_text(-1).is_none());
    }
}
