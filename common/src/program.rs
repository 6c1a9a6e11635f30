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
    limit_malloc_arenas();
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
            Err(e) if e.downcast_ref::<crate::check::CheckFailed>().is_some() => {
                eprintln!("{name}: {e}");
                ExitCode::FAILURE
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "{name} failed");
                eprintln!("{name}: error: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Parses the command line with [`crate::secret::parse`] and runs `run` like
/// [`main`], first logging a warning for each secret found among the
/// arguments. `json_logs` picks the log format from the parsed flags.
pub fn parse_and_run<P, F, Fut>(name: &str, json_logs: fn(&P) -> bool, run: F) -> ExitCode
where
    P: clap::Parser,
    F: FnOnce(P, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let (cli, secrets_on_command_line) = crate::secret::parse::<P>();
    let json = json_logs(&cli);
    main(name, json, |shutdown| async move {
        for w in secrets_on_command_line {
            tracing::warn!("{w}");
        }
        run(cli, shutdown).await
    })
}

/// Makes glibc's allocator keep two arenas instead of up to eight per core.
///
/// glibc gives each thread that finds the heap busy an arena of its own, and
/// freed memory stays resident per arena; with tokio's and librdkafka's
/// threads passing batches around, that kept tens of MB of freed batches
/// resident (pg-source's peak RSS over a 200k-row snapshot: 54 MB by
/// default, 34 MB with two arenas). glibc reads `MALLOC_ARENA_MAX` only when
/// the process starts, so the program runs itself again with it set, as the
/// same process (`exec`), unless it is set already (to any value, which is
/// also how to opt out).
fn limit_malloc_arenas() {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt as _;
        // Once only: the marker stops a loop should the variable not reach
        // the new image (glibc drops MALLOC_* for setuid programs).
        const MARKER: &str = "TIDEMARK_MALLOC_REEXEC";
        if std::env::var_os("MALLOC_ARENA_MAX").is_some() || std::env::var_os(MARKER).is_some() {
            return;
        }
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let mut args = std::env::args_os();
        let mut command = std::process::Command::new(exe);
        if let Some(arg0) = args.next() {
            command.arg0(arg0);
        }
        // `exec` returns only when it fails; then run with glibc's default.
        let e = command
            .args(args)
            .env("MALLOC_ARENA_MAX", "2")
            .env(MARKER, "1")
            .exec();
        eprintln!("note: cannot restart with MALLOC_ARENA_MAX=2 ({e}); memory use may be higher");
    }
}

/// Parses `--http-addr`: an address, or `off` (or empty) for none.
///
/// Fails naming the flag and its variable when the address does not parse.
pub fn parse_http_addr(text: &str) -> anyhow::Result<Option<SocketAddr>> {
    match text {
        "off" | "" => Ok(None),
        addr => addr.parse().map(Some).map_err(|e| {
            anyhow::anyhow!(
                "--http-addr (TIDEMARK_HTTP_ADDR) `{addr}` is not an address like 127.0.0.1:9464 (this machine only) or 0.0.0.0:9464 (every interface): {e}"
            )
        }),
    }
}
