//! SIGINT/SIGTERM handling shared by the long-running programs.

use tokio_util::sync::CancellationToken;

/// Returns a token that is cancelled on the first SIGINT or SIGTERM.
///
/// The programs check the token only at safe points (between batches), so a
/// signal never abandons a half-written batch; a second signal is left to the
/// default handler's successor, the process exit that follows shortly.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let child = token.clone();
    // The handlers are installed here, before this returns, not in the task:
    // a SIGTERM that arrives while the program starts (before the task first
    // runs) must stop it gracefully too, not kill it by the default action.
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::spawn(async move {
                    tokio::select! {
                        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
                        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
                    }
                    child.cancel();
                });
            }
            (term, int) => {
                let e = term.err().or(int.err()).expect("one failed");
                tracing::warn!(error = %e, "cannot listen for SIGTERM or SIGINT; stop with SIGKILL");
            }
        }
    }
    #[cfg(not(unix))]
    {
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            child.cancel();
        });
    }
    token
}
