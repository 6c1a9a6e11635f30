//! Logging setup: `tracing` to stdout, human-readable or JSON.

use tracing_subscriber::EnvFilter;

/// Starts the global subscriber. `RUST_LOG` (or `TIDEMARK_LOG`) picks the
/// level, `info` by default; `json` switches to one JSON object per line for
/// log collectors.
pub fn init(json: bool) {
    let filter = std::env::var("TIDEMARK_LOG")
        .ok()
        .map(EnvFilter::new)
        .unwrap_or_else(|| {
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,rdkafka=warn"))
        });
    // Colours only on a terminal: not in `docker logs` or CI logs.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stdout);
    // A second init (tests start programs in-process) is harmless.
    if json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// Logs into the test harness's captured output, shown for failing tests.
pub fn init_for_tests() {
    let filter =
        std::env::var("TIDEMARK_LOG").unwrap_or_else(|_| "info,sqlx=warn,rdkafka=warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
}
