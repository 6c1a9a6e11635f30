//! Postgres snapshots (`pg_snapshot` text) read in Rust, so logical mode
//! tells which transactions an initial snapshot already holds without a
//! query.

/// A snapshot as `pg_current_snapshot()` prints it: `xmin:xmax:xip,...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSnapshot {
    xmin: u64,
    xmax: u64,
    /// In progress when the snapshot was taken, sorted.
    xip: Vec<u64>,
}

/// A text that is not a `pg_snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a Postgres snapshot like 100:105:101,103")]
pub struct BadSnapshot(pub String);

impl PgSnapshot {
    /// Parses `xmin:xmax:xip,...`.
    ///
    /// Fails when the text is not in that form, or its ids are out of
    /// order.
    pub fn parse(text: &str) -> Result<Self, BadSnapshot> {
        let bad = || BadSnapshot(text.to_owned());
        let mut parts = text.splitn(3, ':');
        let id = |p: Option<&str>| p.and_then(|p| p.parse::<u64>().ok()).ok_or_else(bad);
        let xmin = id(parts.next())?;
        let xmax = id(parts.next())?;
        let rest = parts.next().ok_or_else(bad)?;
        let mut xip = Vec::new();
        if !rest.is_empty() {
            for x in rest.split(',') {
                xip.push(x.parse::<u64>().map_err(|_| bad())?);
            }
        }
        if xmin > xmax || xip.iter().any(|&x| x < xmin || x >= xmax) {
            return Err(bad());
        }
        xip.sort_unstable();
        Ok(Self { xmin, xmax, xip })
    }

    /// The transactions in progress when it was taken (below `xmax`).
    pub fn in_progress(&self) -> impl Iterator<Item = u64> + '_ {
        self.xip.iter().copied()
    }

    /// Whether a transaction that committed is visible in the snapshot, as
    /// `pg_visible_in_snapshot` says: it ended before the snapshot was
    /// taken.
    pub fn visible(&self, xid: u64) -> bool {
        if xid < self.xmin {
            true
        } else if xid >= self.xmax {
            false
        } else {
            self.xip.binary_search(&xid).is_err()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_say_what_pg_visible_in_snapshot_says() {
        let s = PgSnapshot::parse("100:105:101,103").unwrap();
        assert!(s.visible(99));
        assert!(s.visible(100));
        assert!(!s.visible(101));
        assert!(s.visible(102));
        assert!(!s.visible(103));
        assert!(s.visible(104));
        assert!(!s.visible(105));
        assert!(!s.visible(1000));
        let empty = PgSnapshot::parse("7:7:").unwrap();
        assert!(empty.visible(6) && !empty.visible(7));
        for bad in ["", "1:2", "a:b:", "5:3:", "1:5:9", "1:5:2,,3"] {
            assert!(PgSnapshot::parse(bad).is_err(), "{bad}");
        }
    }
}
