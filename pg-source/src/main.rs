//! pg-source: stream a Postgres table's changes into Kafka.

fn main() -> std::process::ExitCode {
    pg_source::cli::main()
}
