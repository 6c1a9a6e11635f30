//! pg-replay: play a Tidemark archive back into Postgres.

fn main() -> std::process::ExitCode {
    pg_replay::cli::main()
}
