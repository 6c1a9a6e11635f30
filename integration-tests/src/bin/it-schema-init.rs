//! schema-init, built inside this package so its tests can run it as a real
//! process through `CARGO_BIN_EXE_`.

fn main() -> std::process::ExitCode {
    schema_init::cli::main()
}
