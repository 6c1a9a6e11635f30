//! schema-init: create the database objects Tidemark's pipeline needs.

fn main() -> std::process::ExitCode {
    schema_init::cli::main()
}
