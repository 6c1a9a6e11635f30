//! Retention that cannot lose a restore (`file.retention.window.ms`; off
//! unless set).
//!
//! A restore to a time `t` starts from a base snapshot taken at or before
//! `t` and applies every change after it up to `t`. To keep every time of
//! the last `window` restorable, the archive must keep the newest base
//! snapshot taken at or before `now - window`, and everything after it.
//! Sealed segments whose every event comes before that snapshot (a lower
//! commit order than the snapshot's unit) are what no such restore reads;
//! those, and only those, are deleted.
//!
//! A base snapshot is a snapshot the archive holds whole: its last event
//! (`source.snapshot = "last"`, ending its unit) is in a sealed segment and
//! the archive's sealed part is complete past its unit on every partition
//! ([`Archive::complete_before`]). Its time is its events' `source.ts_us`,
//! when the snapshot was taken. Events without a commit order are never
//! deleted: nothing proves a snapshot supersedes them.

use std::path::Path;
use std::time::{Duration, SystemTime};

use tidemark_common::archive::Archive;

/// The commit order below which sealed segments may go, and why; `None`
/// when no base snapshot is old enough (or whole) yet.
///
/// Fails when the archive cannot be read.
pub fn plan(
    root: &Path,
    window: Duration,
    now: SystemTime,
) -> anyhow::Result<Option<(i64, String)>> {
    let archive = Archive::open(root)?;
    let Some(complete) = archive.complete_before(true).and_then(|m| m.commit_order) else {
        return Ok(None);
    };
    let Archive::Segmented { partitions, .. } = &archive else {
        return Ok(None);
    };
    let horizon = now
        .checked_sub(window)
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_micros() as i64);
    let Some(horizon) = horizon else {
        return Ok(None);
    };
    let mut base: Option<(i64, i64)> = None;
    for p in partitions {
        for s in &p.segments {
            let Some(last) = &s.stats.snapshot_last else {
                continue;
            };
            let (Some(co), Some(ts)) = (last.commit_order, last.ts_us) else {
                continue;
            };
            if last.unit_end && co < complete && ts <= horizon && base.is_none_or(|(b, _)| co > b) {
                base = Some((co, ts));
            }
        }
    }
    Ok(base.map(|(co, ts)| {
        let when = u64::try_from(ts)
            .map(|us| humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_micros(us)).to_string())
            .unwrap_or_default();
        (
            co,
            format!(
                "before the base snapshot of commit order {co} taken at {when}, which every restore within the last {} starts from",
                humantime::format_duration(window)
            ),
        )
    }))
}
