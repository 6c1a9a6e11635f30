//! pg-replay, built inside this package so its tests can run it as a real
//! process (killed with SIGKILL, restarted) through `CARGO_BIN_EXE_`.

fn main() -> std::process::ExitCode {
    pg_replay::cli::main()
}
