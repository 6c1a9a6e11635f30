//! The capture modes. Each owns its poll step, its wait and its position;
//! [`crate::run`] drives any of them through [`Capture`] with one loop that
//! saves the position, sends a batch with it, and restores it when the
//! batch did not commit.

pub mod changelog;
pub mod logical;
pub mod timestamp;

use std::time::Duration;

use futures::FutureExt as _;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::errors::SourceError;
use crate::producer::Record;

/// The NOTIFY channel schema-init's trigger signals on.
pub const NOTIFY_CHANNEL: &str = tidemark_common::names::NOTIFY_CHANNEL;

/// What one step read, ready to commit with the mode's position as the step
/// left it.
#[derive(Default)]
pub struct Batch {
    /// Records for Kafka, in order.
    pub records: Vec<Record>,
    /// Rows (changes or snapshot rows) read.
    pub rows: usize,
    /// When the newest change in the batch was made, ms since the epoch.
    pub newest_change_ms: Option<i64>,
    /// What the batch is, for the log line once it is committed.
    pub what: &'static str,
    /// The Kafka transaction stays open after this batch: the next batch
    /// goes into it, and the position is committed with the last one (an
    /// initial snapshot's chunks, each read on its own, commit together).
    pub more: bool,
}

/// A batch that Kafka committed.
pub struct Committed {
    /// Records sent.
    pub records: usize,
    /// Rows they came from.
    pub rows: usize,
    /// [`Batch::what`].
    pub what: &'static str,
    /// How long the Kafka transaction took.
    pub commit: Duration,
}

/// A capture mode, as the main loop drives it.
///
/// A step ([`Capture::next`]) moves the in-memory position to what its
/// batch covers; the loop sends the batch together with
/// [`Capture::position_record`] in one Kafka transaction and calls
/// [`Capture::committed`], or, when reading or sending failed, puts back the
/// position it saved before the step with [`Capture::restore`], so the same
/// changes are read again.
#[allow(async_fn_in_trait)]
pub trait Capture {
    /// A saved position.
    type Saved;

    /// The position before a step.
    fn save(&self) -> Self::Saved;

    /// Puts a saved position back after a failed step, dropping whatever
    /// was read past it (an open stream).
    fn restore(&mut self, saved: Self::Saved);

    /// Reads the next batch; `None` when caught up (or stopping).
    ///
    /// Fails when reading fails; the class of the error says whether the
    /// loop retries.
    async fn next(&mut self, shutdown: &CancellationToken) -> Result<Option<Batch>, SourceError>;

    /// The position as a record for the offsets topic.
    fn position_record(&self) -> Record;

    /// After the batch and the position committed: logs it and does what
    /// may follow (prune the change log, confirm the slot).
    async fn committed(&mut self, done: &Committed);

    /// Waits until more may be there to read, or `shutdown`.
    async fn wait(&mut self, shutdown: &CancellationToken);

    /// Whether the mode reports `tidemark_source_lag_seconds` as 0 when it
    /// is caught up (a row-state poll cannot know it is).
    fn zero_lag_when_caught_up(&self) -> bool {
        true
    }
}

/// Waits for the poll interval or a `NOTIFY tidemark`, whichever comes
/// first, keeping the listening connection (or doing without one).
pub struct Wakeup {
    pool: PgPool,
    listener: Option<PgListener>,
    listen: bool,
}

impl Wakeup {
    /// A waiter; with `listen`, it LISTENs for the trigger's notifications.
    pub async fn new(pool: &PgPool, listen: bool) -> Self {
        let listener = if listen { listen_on(pool).await } else { None };
        Self {
            pool: pool.clone(),
            listener,
            listen,
        }
    }

    /// Waits up to `wait`; returns whether a notification woke it. Many
    /// notifications make one wake-up.
    pub async fn wait(&mut self, wait: Duration, shutdown: &CancellationToken) -> bool {
        let woke = tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(wait) => false,
            woke = wait_notify(&mut self.listener) => {
                if woke {
                    if let Some(l) = self.listener.as_mut() {
                        while let Some(Ok(_)) = l.recv().now_or_never() {}
                    }
                } else {
                    tracing::warn!("lost the NOTIFY connection; polling every poll.interval.ms until it is back");
                    self.listener = None;
                }
                woke
            }
        };
        if self.listener.is_none() && self.listen && !shutdown.is_cancelled() {
            self.listener = listen_on(&self.pool).await;
        }
        woke
    }
}

async fn listen_on(pool: &PgPool) -> Option<PgListener> {
    let attempt = async {
        let mut l = PgListener::connect_with(pool).await?;
        l.listen(NOTIFY_CHANNEL).await?;
        Ok::<_, sqlx::Error>(l)
    };
    match attempt.await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "cannot LISTEN for changes; polling every poll.interval.ms");
            None
        }
    }
}

/// Waits for a notification; `false` when the listening connection failed.
/// Without a listener it never returns.
async fn wait_notify(listener: &mut Option<PgListener>) -> bool {
    match listener {
        Some(l) => l.try_recv().await.map(|n| n.is_some()).unwrap_or(false),
        None => std::future::pending().await,
    }
}
