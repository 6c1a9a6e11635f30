//! Any bytes as an archive file: split into lines (a last line without its
//! newline is left out, as the reader does), each decoded as a record, each
//! change event's unit tracked; after every line the units ready to apply
//! are taken as a replay would. Checks: nothing panics, and a run handed out
//! for applying holds only units that a plain model of the archive says are
//! whole (every total_order from 1 to event_count exactly once), in commit
//! order, each once.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use libfuzzer_sys::fuzz_target;
use pg_replay_fuzz::archive::StreamPos;
use pg_replay_fuzz::record::{Decoder, Record};
use pg_replay_fuzz::units::{Disposition, EventInfo, Until, Units};

/// What the model knows of a unit: its events and its count.
#[derive(Default)]
struct Model {
    seen: BTreeSet<i64>,
    count: Option<i64>,
    broken: bool,
}

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::new();
    // Until a time, or not, by the first byte.
    let until = match data.first() {
        Some(b) if b % 3 == 1 => Until::Time(1_700_000_000_000_000 + i64::from(*b) * 1000),
        Some(b) if b % 3 == 2 => Until::CommitOrder(i64::from(*b)),
        _ => Until::End,
    };
    let mut units = Units::new(None, &[StreamPos::default()], until, 64);
    let mut model: BTreeMap<i64, Model> = BTreeMap::new();
    let mut applied: Option<i64> = None;
    let mut offset = 0u64;
    let mut complete = data.split_inclusive(|b| *b == b'\n').collect::<Vec<_>>();
    if complete.last().is_some_and(|l| l.last() != Some(&b'\n')) {
        complete.pop();
    }
    for (n, line) in complete.into_iter().enumerate() {
        let pos = StreamPos { offset, line: n as u64 + 1 };
        offset += line.len() as u64;
        let next = StreamPos { offset, line: n as u64 + 2 };
        let body = &line[..line.len() - 1];
        let Ok(Record::Change(c)) = decoder.decode(body) else {
            continue;
        };
        let Some(tx) = c.tx else {
            continue;
        };
        let info = EventInfo {
            commit_order: tx.commit_order,
            total_order: tx.total_order,
            event_count: tx.event_count,
            prev: tx.prev_commit_order,
            ts_us: c.ts_us,
            tx_id: c.tx_id,
            lsn: c.lsn,
            stream: 0,
            pos,
            truncate: false,
        };
        match units.add(&info, next) {
            // A refused event stops a replay: nothing after it applies.
            Err(_) => return,
            Ok(Disposition::Skip) => continue,
            Ok(Disposition::Stage) => {}
        }
        let m = model.entry(tx.commit_order).or_default();
        if !m.seen.insert(tx.total_order) {
            m.broken = true;
        }
        if let Some(count) = tx.event_count {
            if m.count.is_some_and(|c| c != count) {
                m.broken = true;
            }
            m.count = Some(count);
        }
        let run = match units.ready() {
            Ok(run) => run,
            Err(_) => return,
        };
        if let Some(run) = run {
            assert!(applied.is_none_or(|a| run.last > a), "runs move forward");
            for (co, m) in model.range(..=run.last) {
                if applied.is_some_and(|a| *co <= a) {
                    continue;
                }
                let whole = !m.broken
                    && m.count.is_some_and(|c| m.seen.len() as i64 == c && m.seen.iter().copied().eq(1..=c));
                assert!(whole, "unit {co} handed out but not whole");
                if let Until::CommitOrder(limit) = until {
                    assert!(*co <= limit, "unit {co} beyond --until");
                }
            }
            units.applied_run(run.last);
            applied = Some(run.last);
        }
    }
});
