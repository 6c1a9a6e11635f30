//! Liveness and readiness shared between a program's work loop and whoever
//! asks (the `/healthz` and `/readyz` endpoints of [`crate::ops`], tests).
//!
//! Liveness is the work loop coming round: it calls [`Health::progress`] on
//! every round, idle or not, failed or not. Readiness is [`Health::set_ready`]:
//! connected at both ends and doing the program's work.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Cheap to clone; all clones share the state.
#[derive(Debug, Clone)]
pub struct Health {
    ready: Arc<AtomicBool>,
    last_progress_ms: Arc<AtomicI64>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Default for Health {
    /// Not ready; alive, as a program that just started is.
    fn default() -> Self {
        Self {
            ready: Arc::default(),
            last_progress_ms: Arc::new(AtomicI64::new(now_ms())),
        }
    }
}

impl Health {
    /// A fresh, not-ready state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Pretends the loop last came round `ago` ago.
    #[doc(hidden)]
    pub fn stalled_for_tests(&self, ago: std::time::Duration) {
        self.last_progress_ms
            .store(now_ms() - ago.as_millis() as i64, Ordering::Release);
    }

    /// Marks the program connected and working (or not).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
        if ready {
            self.progress();
        }
    }

    /// Whether the program is connected and working.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Records that the work loop completed a round (even an idle one, or
    /// one that failed and will be retried).
    pub fn progress(&self) {
        self.last_progress_ms.store(now_ms(), Ordering::Release);
    }

    /// Milliseconds since the work loop last completed a round.
    pub fn since_progress_ms(&self) -> i64 {
        now_ms() - self.last_progress_ms.load(Ordering::Acquire)
    }

    /// Waits until ready, or `timeout` passes; returns whether it is ready.
    pub async fn wait_ready(&self, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.is_ready() {
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        true
    }
}
