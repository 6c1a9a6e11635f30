//! file-sink: write Kafka records into a file, one JSON line each.

fn main() -> std::process::ExitCode {
    file_sink::cli::main()
}
