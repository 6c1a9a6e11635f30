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
//! the syncer holds only a merged point, never data.
//!
//! The stages are generic ([`Appender`], [`Committer`]): the single file
//! ([`Output`]) and the segmented archive share the
//! threads and the hand-off.

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

/// The writing stage: appends what the reader sends, without syncing, and
/// says what a sync that starts afterwards may claim.
pub trait Appender: Send + 'static {
    /// What the reader sends.
    type Work: Send + 'static;
    /// What a sync may claim once the work is synced.
    type Point: Merge + Send + 'static;

    /// Appends `work`; `None` when there is nothing to sync for it.
    ///
    /// Fails on a write error; the pipeline then stops.
    fn append(&mut self, work: Self::Work) -> anyhow::Result<Option<Self::Point>>;
}

/// Points of consecutive work fold into one, so one sync covers them all.
pub trait Merge {
    /// Folds a later point into this one.
    fn merge(&mut self, later: Self);
}

/// The syncing stage: makes what was appended durable, then records it.
pub trait Committer: Send + 'static {
    /// What the appender's points are.
    type Point: Send + 'static;
    /// What the reader learns after each commit.
    type Report: Clone + Send + Sync + 'static;

    /// Syncs and records `point`. Every append that returned before this
    /// call is covered.
    ///
    /// Fails on a sync or write error; what was recorded before stays.
    fn commit(&mut self, point: Self::Point) -> anyhow::Result<()>;

    /// What is durable now.
    fn report(&self) -> Self::Report;

    /// Whether work of its own runs in the background (the syncer then
    /// looks in on it with [`Self::idle`] while no point comes).
    fn busy(&self) -> bool {
        false
    }

    /// Records background work that has finished; whether the report
    /// changed.
    ///
    /// Fails as [`Self::commit`] does.
    fn idle(&mut self) -> anyhow::Result<bool> {
        Ok(false)
    }

    /// Finishes background work before the pipeline stops.
    ///
    /// Fails as [`Self::commit`] does.
    fn finish(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// How often the syncer looks in on a committer's background work.
const IDLE_LOOK: std::time::Duration = std::time::Duration::from_millis(20);

/// What is durable, as last reported by the single file's syncer.
#[derive(Debug, Clone, Default)]
pub struct Committed {
    /// The checkpoint last saved.
    pub checkpoint: SinkCheckpoint,
    /// Records covered by checkpoints saved since start.
    pub totals: Totals,
}

impl Appender for Output {
    type Work = Batch;
    type Point = CommitPoint;

    fn append(&mut self, batch: Batch) -> anyhow::Result<Option<CommitPoint>> {
        self.write(batch).map(Some)
    }
}

impl Merge for CommitPoint {
    fn merge(&mut self, later: Self) {
        CommitPoint::merge(self, later)
    }
}

/// The single file's syncer and the totals it has committed.
pub struct FileCommitter {
    syncer: Syncer,
    totals: Totals,
}

impl Committer for FileCommitter {
    type Point = CommitPoint;
    type Report = Committed;

    fn commit(&mut self, point: CommitPoint) -> anyhow::Result<()> {
        self.syncer.commit(&point)?;
        self.totals.written += point.written;
        self.totals.dead += point.dead_count;
        self.totals.skipped += point.skipped;
        Ok(())
    }

    fn report(&self) -> Committed {
        Committed {
            checkpoint: self.syncer.checkpoint.clone(),
            totals: self.totals,
        }
    }
}

/// The writer and syncer threads, and the ends the reader holds.
pub struct Pipeline<A: Appender, C: Committer<Point = A::Point>> {
    batches: mpsc::Sender<A::Work>,
    committed: watch::Receiver<C::Report>,
    writer: JoinHandle<anyhow::Result<()>>,
    syncer: JoinHandle<anyhow::Result<()>>,
}

/// The writer's hand-off to the syncer: the merged point of everything
/// written and not yet synced.
struct Ahead<P> {
    point: Option<P>,
    /// The writer has stopped; the syncer syncs what is left and stops.
    closed: bool,
    /// The syncer has failed; the writer stops writing.
    failed: bool,
}

struct Handoff<P> {
    ahead: Mutex<Ahead<P>>,
    wake: Condvar,
}

impl<P> Handoff<P> {
    fn lock(&self) -> MutexGuard<'_, Ahead<P>> {
        // A panic in the other thread is reported when it is joined; the
        // state itself is always consistent.
        self.ahead.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut Ahead<P>)) {
        f(&mut self.lock());
        self.wake.notify_all();
    }
}

impl Pipeline<Output, FileCommitter> {
    /// Starts the writer and syncer threads over the single file `out`.
    ///
    /// Fails when a thread cannot be started or the file handle cannot be
    /// duplicated.
    pub fn start(out: Output) -> anyhow::Result<Self> {
        let committer = FileCommitter {
            syncer: out.syncer()?,
            totals: Totals::default(),
        };
        Self::start_stages(out, committer)
    }
}

impl<A: Appender, C: Committer<Point = A::Point>> Pipeline<A, C> {
    /// Starts the writer thread over `appender` and the syncer thread over
    /// `committer`.
    ///
    /// Fails when a thread cannot be started.
    pub fn start_stages(appender: A, committer: C) -> anyhow::Result<Self> {
        let (batches, rx) = mpsc::channel(BATCHES_IN_FLIGHT);
        let (committed_tx, committed) = watch::channel(committer.report());
        let handoff = Arc::new(Handoff {
            ahead: Mutex::new(Ahead {
                point: None,
                closed: false,
                failed: false,
            }),
            wake: Condvar::new(),
        });
        let h = handoff.clone();
        let writer = std::thread::Builder::new()
            .name("file-sink-write".into())
            .spawn(move || write_loop(appender, rx, &h))
            .context("cannot start the writer thread")?;
        let syncer = std::thread::Builder::new()
            .name("file-sink-sync".into())
            .spawn(move || sync_loop(committer, &handoff, committed_tx))
            .context("cannot start the syncer thread")?;
        Ok(Self {
            batches,
            committed,
            writer,
            syncer,
        })
    }

    /// Hands work to the writer, waiting while [`BATCHES_IN_FLIGHT`] wait
    /// already. Returns `false` when the writer has stopped (after an error
    /// that [`Pipeline::finish`] returns).
    pub async fn send(&self, work: A::Work) -> bool {
        self.batches.send(work).await.is_ok()
    }

    /// What the syncer last made durable; `changed()` on it wakes after each
    /// commit, and fails once the syncer has stopped.
    pub fn committed(&mut self) -> &mut watch::Receiver<C::Report> {
        &mut self.committed
    }

    /// Writes and syncs everything sent, stops both threads and returns
    /// what is durable.
    ///
    /// Fails with the first write or sync error; what is durable is then
    /// only what was before it.
    pub async fn finish(self) -> anyhow::Result<C::Report> {
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

fn write_loop<A: Appender>(
    mut appender: A,
    mut batches: mpsc::Receiver<A::Work>,
    handoff: &Handoff<A::Point>,
) -> anyhow::Result<()> {
    // Closed even if a write panics, so the syncer does not wait forever.
    struct Closed<'a, P>(&'a Handoff<P>);
    impl<P> Drop for Closed<'_, P> {
        fn drop(&mut self) {
            self.0.update(|a| a.closed = true);
        }
    }
    let _closed = Closed(handoff);
    while let Some(work) = batches.blocking_recv() {
        if handoff.lock().failed {
            return Ok(());
        }
        if let Some(point) = appender.append(work)? {
            handoff.update(|a| match &mut a.point {
                Some(p) => p.merge(point),
                None => a.point = Some(point),
            });
        }
    }
    Ok(())
}

fn sync_loop<C: Committer>(
    mut committer: C,
    handoff: &Handoff<C::Point>,
    committed: watch::Sender<C::Report>,
) -> anyhow::Result<()> {
    enum Next<P> {
        Point(P),
        Idle,
        Closed,
    }
    loop {
        let next = {
            let mut ahead = handoff.lock();
            loop {
                if let Some(p) = ahead.point.take() {
                    break Next::Point(p);
                }
                if ahead.closed {
                    break Next::Closed;
                }
                if committer.busy() {
                    let (guard, waited) = handoff
                        .wake
                        .wait_timeout(ahead, IDLE_LOOK)
                        .unwrap_or_else(|e| e.into_inner());
                    ahead = guard;
                    if waited.timed_out() {
                        break Next::Idle;
                    }
                } else {
                    ahead = handoff.wake.wait(ahead).unwrap_or_else(|e| e.into_inner());
                }
            }
        };
        let done = match next {
            Next::Point(point) => committer.commit(point).map(|()| true),
            Next::Idle => committer.idle(),
            Next::Closed => {
                let done = committer.finish();
                if done.is_ok() {
                    let _ = committed.send(committer.report());
                }
                return done.inspect_err(|_| handoff.update(|a| a.failed = true));
            }
        };
        match done {
            Ok(true) => {
                let _ = committed.send(committer.report());
            }
            Ok(false) => {}
            Err(e) => {
                handoff.update(|a| a.failed = true);
                // Dropping `committed` tells the reader at once.
                return Err(e);
            }
        }
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
