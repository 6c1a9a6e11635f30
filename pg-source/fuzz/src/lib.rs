//! The `pgoutput` decoder's source (`pg-source/src/pgoutput.rs`), compiled
//! on its own for the fuzz target: the rest of pg-source brings the Kafka
//! client, whose C build does not survive the fuzzer's compiler flags. The
//! decoder needs nothing else.

#[path = "../../src/pgoutput.rs"]
pub mod pgoutput;
