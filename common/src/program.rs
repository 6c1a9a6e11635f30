//! What every long-running program's `main` does: start a runtime, set up
//! logs and signals, run, and turn the outcome into an exit code with the
//! error chain printed.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

/// Runs `run` on a new multi-threaded runtime with logging (`json_logs`
/// picks the format) and SIGINT/SIGTERM cancelling its token. Returns 0 on
/// success; on failure logs and prints `<name>: error: <chain>` and returns 1.
pub fn main<F, Fut>(name: &str, json_logs: bool, run: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        crate::telemetry::init(json_logs);
        let shutdown = crate::shutdown::on_signal();
        match run(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "{name} failed");
                eprintln!("{name}: error: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Parses `--http-addr`: an address, or `off` (or empty) for none.
///
/// Fails naming the flag and its variable when the address does not parse.
pub fn parse_http_addr(text: &str) -> anyhow::Result<Option<SocketAddr>> {
    match text {
        "off" | "" => Ok(None),
        addr => addr.parse().map(Some).map_err(|e| {
            anyhow::anyhow!(
                "--http-addr (TIDEMARK_HTTP_ADDR) `{addr}` is not an address like 0.0.0.0:9464: {e}"
            )
        }),
    }
}
