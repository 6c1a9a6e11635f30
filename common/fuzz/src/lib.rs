//! The codec's source (`common/src/codec`), compiled on its own for the fuzz
//! targets: the rest of tidemark-common brings the Kafka client, whose C
//! build does not survive the fuzzer's compiler flags. The codec needs only
//! `crate::pg::quote_ident` from the rest, given here as common has it.

/// What the codec uses of `common::pg`.
pub mod pg {
    /// As `tidemark_common::pg::quote_ident`.
    pub fn quote_ident(name: &str) -> String {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

#[path = "../../src/codec/mod.rs"]
pub mod codec;

/// A codec of one column `c` of the built-in type that `pick` selects, and
/// the type's OID.
pub fn one_column(pick: u8) -> (u32, codec::RowCodec) {
    let mut oids: Vec<u32> = codec::builtin_types().map(|t| t.oid).collect();
    oids.sort_unstable();
    let oid = oids[usize::from(pick) % oids.len()];
    let column = codec::ColumnSpec::new("c", codec::ColumnType::builtin(oid, -1).expect("built in"), false);
    (oid, codec::RowCodec::new(vec![column]))
}
