//! Postgres snapshots (`pg_snapshot` text) read in Rust, so logical mode
//! tells which transactions an initial snapshot already holds without a
//! query, and changelog mode ends a batch at a schema change (the snapshot
//! its DDL recorded joined with the batch's start, [`PgSnapshot::union`]).

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

    /// The snapshot with transaction `xid` not visible, as if it were still
    /// in progress (a snapshot taken inside a transaction may show that
    /// transaction as ended).
    pub fn hiding(&self, xid: u64) -> Self {
        let mut s = self.clone();
        if xid < s.xmax && s.visible(xid) {
            s.xip.push(xid);
            s.xip.sort_unstable();
            s.xmin = s.xmin.min(xid);
        }
        s
    }

    /// The snapshot in which every transaction either shows is visible, and
    /// no other.
    pub fn union(&self, other: &Self) -> Self {
        let (big, small) = if self.xmax >= other.xmax {
            (self, other)
        } else {
            (other, self)
        };
        // Below the larger xmax, what the larger one hides is hidden by
        // both only when the smaller one hides it too.
        let xip: Vec<u64> = big
            .xip
            .iter()
            .copied()
            .filter(|&x| !small.visible(x))
            .collect();
        Self {
            xmin: xip.first().copied().unwrap_or(big.xmax),
            xmax: big.xmax,
            xip,
        }
    }

    /// Whether some transaction visible in this snapshot is not visible in
    /// `other`.
    pub fn shows_more_than(&self, other: &Self) -> bool {
        if self.xip.is_empty() && other.xip.is_empty() {
            return self.xmax > other.xmax;
        }
        // One visible here and hidden there: one `other` had in progress,
        // or one at or past its xmax below this xmax, not in progress here.
        if other.xip.iter().any(|&x| self.visible(x)) {
            return true;
        }
        if self.xmax > other.xmax {
            let hidden_above = self.xip.iter().filter(|&&x| x >= other.xmax).count() as u64;
            return self.xmax - other.xmax > hidden_above;
        }
        false
    }
}

impl std::fmt::Display for PgSnapshot {
    /// As Postgres prints it: `xmin:xmax:xip,...`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:", self.xmin, self.xmax)?;
        for (i, x) in self.xip.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{x}")?;
        }
        Ok(())
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

    /// Every xid below 40 is visible in the union exactly when it is in
    /// either snapshot; `hiding` hides one; `shows_more_than` says whether
    /// some xid is visible in one and not the other.
    #[test]
    fn union_hiding_and_shows_more_than_agree_with_visible() {
        let texts = [
            "10:10:",
            "10:20:10,12,15",
            "12:25:12,21,24",
            "5:30:5,6,29",
            "30:30:",
            "15:18:15,17",
        ];
        let snaps: Vec<PgSnapshot> = texts
            .iter()
            .map(|t| PgSnapshot::parse(t).unwrap())
            .collect();
        for a in &snaps {
            assert_eq!(PgSnapshot::parse(&a.to_string()).unwrap(), *a);
            for x in 0..40 {
                let h = a.hiding(x);
                assert!(!h.visible(x), "{a} hiding {x}");
                for y in (0..40).filter(|&y| y != x) {
                    assert_eq!(h.visible(y), a.visible(y), "{a} hiding {x}, at {y}");
                }
                assert_eq!(PgSnapshot::parse(&h.to_string()).unwrap(), h);
            }
            for b in &snaps {
                let u = a.union(b);
                assert_eq!(PgSnapshot::parse(&u.to_string()).unwrap(), u, "{a} ∪ {b}");
                for x in 0..40 {
                    assert_eq!(
                        u.visible(x),
                        a.visible(x) || b.visible(x),
                        "{a} ∪ {b} at {x}"
                    );
                }
                let more = (0..40).any(|x| a.visible(x) && !b.visible(x));
                assert_eq!(a.shows_more_than(b), more, "{a} shows more than {b}");
            }
        }
    }
}
