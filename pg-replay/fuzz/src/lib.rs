//! pg-replay's record decoder and unit tracker (`pg-replay/src/record.rs`,
//! `pg-replay/src/units.rs`), compiled on their own for the fuzz target:
//! the rest of pg-replay brings the Kafka client, whose C build does not
//! survive the fuzzer's compiler flags. The tracker needs only the stream
//! position types from `archive`, given here as pg-replay has them.

/// What the tracker uses of pg-replay's `archive` module.
pub mod archive {
    /// As `pg_replay::archive::StreamId`.
    pub type StreamId = u32;

    /// As `pg_replay::archive::StreamPos`.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct StreamPos {
        /// Byte offset (file) or Kafka offset (partition).
        pub offset: u64,
        /// 1-based line number (files).
        pub line: u64,
    }
}

#[path = "../../src/record.rs"]
pub mod record;

#[path = "../../src/units.rs"]
pub mod units;
