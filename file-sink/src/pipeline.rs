//! Writing and syncing beside reading.
//!
//! Three stages run at once: the reader (the async loop in [`crate::run`])
//! validates records into batches; a writer thread appends each batch to the
//! file ([`Output::write`]); a syncer thread fsyncs and saves the checkpoint
//! ([`Syncer::commit`]) for everything written so far. While the disk
//! flushes one stretch of the file, the next is read and copied in, so the
//! sink runs at the speed of its slowest stage instead of the sum of all.
//!
//! The guarantee does not change: a checkpoint is saved only after an fsync
//! that started after the writes it covers had returned. Memory stays
//! bounded: at most [`BATCHES_IN_FLIGHT`] batches wait for the writer, and
//! the syncer holds only a merged [`CommitPoint`], never data.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use anyhow::Context as _;
use tidemark_common::offset::SinkCheckpoint;
use tokio::sync::{mpsc, watch};

use crate::output::{Batch, CommitPoint, Output, Syncer};
use crate::Totals;

/// Batches handed to the writer and not yet written. Two keep the writer busy
/// while the reader fills the next one; more would only hold memory.
pub const BATCHES_IN_FLIGHT: usize = 2;

/// What is durable, as last reported by the syncer.
#[derive(Debug, Clone, Default)]
pub struct Committed {
    /// The checkpoint last saved.
    pub checkpoint: SinkCheckpoint,
    /// Records covered by checkpoints saved since start.
    pub totals: Totals,
}

/// The writer and syncer threads, and the ends the reader holds.
pub struct Pipeline {
    batches: mpsc::Sender<Batch>,
    committed: watch::Receiver<Committed>,
    writer: JoinHandle<anyhow::Result<()>>,
    syncer: JoinHandle<anyhow::Result<()>>,
}

/// The writer's hand-off to the syncer: the merged point of everything
/// written and not yet synced.
#[derive(Default)]
struct Ahead {
    point: Option<CommitPoint>,
    /// The writer has stopped; the syncer syncs what is left and stops.
    closed: bool,
    /// The syncer has failed; the writer stops writing.
    failed: bool,
}

#[derive(Default)]
struct Handoff {
    ahead: Mutex<Ahead>,
    wake: Condvar,
}

impl Handoff {
    fn lock(&self) -> MutexGuard<'_, Ahead> {
        // A panic in the other thread is reported when it is joined; the
        // state itself is always consistent.
        self.ahead.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut Ahead)) {
        f(&mut self.lock());
        self.wake.notify_all();
    }
}

impl Pipeline {
    /// Starts the writer and syncer threads over `out`.
    ///
    /// Fails when a thread cannot be started or the file handle cannot be
    /// duplicated.
    pub fn start(out: Output) -> anyhow::Result<Self> {
        let syncer = out.syncer()?;
        let (batches, rx) = mpsc::channel(BATCHES_IN_FLIGHT);
        let (committed_tx, committed) = watch::channel(Committed {
            checkpoint: out.checkpoint.clone(),
            totals: Totals::default(),
        });
        let handoff = Arc::new(Handoff::default());
        let h = handoff.clone();
        let writer = std::thread::Builder::new()
            .name("file-sink-write".into())
            .spawn(move || write_loop(out, rx, &h))
            .context("cannot start the writer thread")?;
        let syncer = std::thread::Builder::new()
            .name("file-sink-sync".into())
            .spawn(move || sync_loop(syncer, &handoff, committed_tx))
            .context("cannot start the syncer thread")?;
        Ok(Self {
            batches,
            committed,
            writer,
            syncer,
        })
    }

    /// Hands a batch to the writer, waiting while [`BATCHES_IN_FLIGHT`] wait
    /// already. Returns `false` when the writer has stopped (after an error
    /// that [`Pipeline::finish`] returns).
    pub async fn send(&self, batch: Batch) -> bool {
        self.batches.send(batch).await.is_ok()
    }

    /// What the syncer last made durable; `changed()` on it wakes after each
    /// checkpoint, and fails once the syncer has stopped.
    pub fn committed(&mut self) -> &mut watch::Receiver<Committed> {
        &mut self.committed
    }

    /// Writes and syncs every batch sent, stops both threads and returns what
    /// is durable.
    ///
    /// Fails with the first write or sync error; the checkpoint then covers
    /// only what was durable before it.
    pub async fn finish(self) -> anyhow::Result<Committed> {
        let Self {
            batches,
            committed,
            writer,
            syncer,
        } = self;
        drop(batches);
        let (w, s) = tokio::task::spawn_blocking(move || (writer.join(), syncer.join())).await?;
        let w = w.map_err(|_| anyhow::anyhow!("the writer thread panicked"))?;
        let s = s.map_err(|_| anyhow::anyhow!("the syncer thread panicked"))?;
        // The first error is the cause: a writer stopped by a failed sync
        // returns `Ok`.
        w?;
        s?;
        let last = committed.borrow().clone();
        Ok(last)
    }
}

fn write_loop(
    mut out: Output,
    mut batches: mpsc::Receiver<Batch>,
    handoff: &Handoff,
) -> anyhow::Result<()> {
    // Closed even if a write panics, so the syncer does not wait forever.
    struct Closed<'a>(&'a Handoff);
    impl Drop for Closed<'_> {
        fn drop(&mut self) {
            self.0.update(|a| a.closed = true);
        }
    }
    let _closed = Closed(handoff);
    (|| {
        while let Some(batch) = batches.blocking_recv() {
            if handoff.lock().failed {
                return Ok(());
            }
            let point = out.write(batch)?;
            handoff.update(|a| match &mut a.point {
                Some(p) => p.merge(point),
                None => a.point = Some(point),
            });
        }
        Ok(())
    })()
}

fn sync_loop(
    mut syncer: Syncer,
    handoff: &Handoff,
    committed: watch::Sender<Committed>,
) -> anyhow::Result<()> {
    loop {
        let point = {
            let mut ahead = handoff.lock();
            loop {
                if let Some(p) = ahead.point.take() {
                    break p;
                }
                if ahead.closed {
                    return Ok(());
                }
                ahead = handoff.wake.wait(ahead).unwrap_or_else(|e| e.into_inner());
            }
        };
        if let Err(e) = syncer.commit(&point) {
            handoff.update(|a| a.failed = true);
            // Dropping `committed` tells the reader at once.
            return Err(e);
        }
        committed.send_modify(|c| {
            c.checkpoint = syncer.checkpoint.clone();
            c.totals.written += point.written;
            c.totals.dead += point.dead_count;
            c.totals.skipped += point.skipped;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(line: &str, next: i64) -> Batch {
        let mut b = Batch {
            lines: format!("{line}\n").into_bytes(),
            written: 1,
            ..Default::default()
        };
        b.reach("t", 0, next);
        b
    }

    #[tokio::test]
    async fn every_batch_sent_is_durable_after_finish() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        let p = Pipeline::start(Output::open(&path, "test").unwrap()).unwrap();
        for i in 0..100 {
            assert!(p.send(batch(&format!("{{\"n\":{i}}}"), i + 1)).await);
        }
        let last = p.finish().await.unwrap();
        assert_eq!(last.totals.written, 100);
        assert_eq!(last.checkpoint.next_offset("t", 0), Some(100));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 100);
        assert_eq!(last.checkpoint.file_len, text.len() as u64);
        let stored = SinkCheckpoint::load(&SinkCheckpoint::path_for(&path))
            .unwrap()
            .unwrap();
        assert_eq!(stored, last.checkpoint);
    }

    #[tokio::test]
    async fn dead_letters_are_synced_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        let p = Pipeline::start(Output::open(&path, "test").unwrap()).unwrap();
        let mut b = batch("{}", 1);
        b.dead = b"{\"reason\":\"x\"}\n".to_vec();
        b.dead_count = 1;
        b.reach("t", 0, 2);
        assert!(p.send(b).await);
        let last = p.finish().await.unwrap();
        assert_eq!(last.totals.dead, 1);
        assert_eq!(last.checkpoint.dead_letter_len, 15);
        assert_eq!(last.checkpoint.next_offset("t", 0), Some(2));
    }
}
