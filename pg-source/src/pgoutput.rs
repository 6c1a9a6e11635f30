//! A decoder of Postgres' `pgoutput` logical replication messages
//! (protocol version 1), as the replication stream's XLogData carries them.
//! Begin, Commit and logical decoding messages are decoded by the
//! replication client itself; this reads the rest.
//!
//! Decoding never panics, whatever the bytes: a message that is truncated,
//! has trailing garbage inside a tuple or an unknown column kind is a
//! [`DecodeError`] (the decoder is fuzzed, see `pg-source/fuzz`).

/// A message that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ends early.
    #[error("a truncated {0} message in the replication stream")]
    Truncated(&'static str),
    /// A column value of an unknown kind.
    #[error("unexpected column kind {0:#04x} in the replication stream")]
    ColumnKind(u8),
    /// A tuple of an unknown kind.
    #[error("unexpected tuple tag {0:#04x} in the replication stream")]
    TupleTag(u8),
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// A table's shape; it comes before the first change of the table in a
    /// session and again after the table changed.
    Relation(Relation),
    /// A type that a relation uses and that is not built in.
    Type(TypeInfo),
    /// A row was inserted.
    Insert {
        /// The relation's id.
        relation: u32,
        /// The new row.
        new: Vec<Value<'a>>,
    },
    /// A row was updated.
    Update {
        /// The relation's id.
        relation: u32,
        /// The old row (replica identity full) or its key, if sent.
        old: Option<Vec<Value<'a>>>,
        /// The new row.
        new: Vec<Value<'a>>,
    },
    /// A row was deleted.
    Delete {
        /// The relation's id.
        relation: u32,
        /// The old row or its key.
        old: Option<Vec<Value<'a>>>,
    },
    /// Tables were truncated.
    Truncate {
        /// The relations' ids.
        relations: Vec<u32>,
    },
    /// Anything this decoder has no use for (origin, ...).
    Other(u8),
}

/// A `Relation` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The relation's id (its OID).
    pub id: u32,
    /// Its schema.
    pub schema: String,
    /// Its name.
    pub name: String,
    /// Its replica identity setting (`d`, `n`, `f`, `i`).
    pub replica_identity: u8,
    /// Its columns in order (dropped and generated ones are not sent).
    pub columns: Vec<RelationColumn>,
}

/// A column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Whether the column is part of the replica identity key (with
    /// identity full, every column is).
    pub key: bool,
    /// The column's name.
    pub name: String,
    /// Its type's OID.
    pub type_oid: u32,
    /// Its type modifier (-1 for none).
    pub typmod: i32,
}

/// A `Type` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    /// The type's OID.
    pub oid: u32,
    /// Its schema.
    pub schema: String,
    /// Its name.
    pub name: String,
}

/// A column value in a tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    /// SQL NULL.
    Null,
    /// A TOASTed value the update did not change: not sent.
    Unchanged,
    /// The value's text form (its type's output function).
    Text(&'a [u8]),
}

/// Decodes one message.
///
/// Fails when the bytes are not a well-formed message.
pub fn decode(data: &[u8]) -> Result<Message<'_>, DecodeError> {
    let Some((&kind, mut b)) = data.split_first() else {
        return Err(DecodeError::Truncated("empty"));
    };
    let b = &mut b;
    Ok(match kind {
        b'R' => Message::Relation(relation(b)?),
        b'Y' => {
            let what = "Type";
            let oid = take_u32(b, what)?;
            let schema = take_cstr(b, what)?;
            let name = take_cstr(b, what)?;
            Message::Type(TypeInfo { oid, schema, name })
        }
        b'I' => {
            let what = "Insert";
            let relation = take_u32(b, what)?;
            match take_u8(b, what)? {
                b'N' => Message::Insert {
                    relation,
                    new: take_tuple(b, what)?,
                },
                other => return Err(DecodeError::TupleTag(other)),
            }
        }
        b'U' => {
            let what = "Update";
            let relation = take_u32(b, what)?;
            let mut old = None;
            let mut tag = take_u8(b, what)?;
            if tag == b'K' || tag == b'O' {
                old = Some(take_tuple(b, what)?);
                tag = take_u8(b, what)?;
            }
            if tag != b'N' {
                return Err(DecodeError::TupleTag(tag));
            }
            Message::Update {
                relation,
                old,
                new: take_tuple(b, what)?,
            }
        }
        b'D' => {
            let what = "Delete";
            let relation = take_u32(b, what)?;
            let old = match take_u8(b, what)? {
                b'K' | b'O' => Some(take_tuple(b, what)?),
                other => return Err(DecodeError::TupleTag(other)),
            };
            Message::Delete { relation, old }
        }
        b'T' => {
            let what = "Truncate";
            let n = take_u32(b, what)?;
            let _options = take_u8(b, what)?;
            // Each id takes 4 bytes: a count beyond what is there is a
            // truncated message, not an allocation.
            if b.len() / 4 < n as usize {
                return Err(DecodeError::Truncated(what));
            }
            let mut relations = Vec::with_capacity(n as usize);
            for _ in 0..n {
                relations.push(take_u32(b, what)?);
            }
            Message::Truncate { relations }
        }
        other => Message::Other(other),
    })
}

fn relation(b: &mut &[u8]) -> Result<Relation, DecodeError> {
    let what = "Relation";
    let id = take_u32(b, what)?;
    let schema = take_cstr(b, what)?;
    let name = take_cstr(b, what)?;
    let replica_identity = take_u8(b, what)?;
    let n = take_u16(b, what)?;
    let mut columns = Vec::with_capacity((n as usize).min(b.len() / 10));
    for _ in 0..n {
        let flags = take_u8(b, what)?;
        let name = take_cstr(b, what)?;
        let type_oid = take_u32(b, what)?;
        let typmod = take_u32(b, what)? as i32;
        columns.push(RelationColumn {
            key: flags & 1 == 1,
            name,
            type_oid,
            typmod,
        });
    }
    Ok(Relation {
        id,
        schema,
        name,
        replica_identity,
        columns,
    })
}

fn take_u8(b: &mut &[u8], what: &'static str) -> Result<u8, DecodeError> {
    let (&v, rest) = b.split_first().ok_or(DecodeError::Truncated(what))?;
    *b = rest;
    Ok(v)
}

fn take_bytes<'a>(b: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
    if b.len() < n {
        return Err(DecodeError::Truncated(what));
    }
    let (head, tail) = b.split_at(n);
    *b = tail;
    Ok(head)
}

fn take_u16(b: &mut &[u8], what: &'static str) -> Result<u16, DecodeError> {
    let v = take_bytes(b, 2, what)?;
    Ok(u16::from_be_bytes([v[0], v[1]]))
}

fn take_u32(b: &mut &[u8], what: &'static str) -> Result<u32, DecodeError> {
    let v = take_bytes(b, 4, what)?;
    Ok(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
}

fn take_cstr(b: &mut &[u8], what: &'static str) -> Result<String, DecodeError> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or(DecodeError::Truncated(what))?;
    let s = String::from_utf8_lossy(&b[..end]).into_owned();
    *b = &b[end + 1..];
    Ok(s)
}

fn take_tuple<'a>(b: &mut &'a [u8], what: &'static str) -> Result<Vec<Value<'a>>, DecodeError> {
    let n = take_u16(b, what)?;
    // Every value takes at least one byte.
    let mut values = Vec::with_capacity((n as usize).min(b.len()));
    for _ in 0..n {
        match take_u8(b, what)? {
            b'n' => values.push(Value::Null),
            b'u' => values.push(Value::Unchanged),
            b't' | b'b' => {
                let len = take_u32(b, what)? as usize;
                values.push(Value::Text(take_bytes(b, len, what)?));
            }
            other => return Err(DecodeError::ColumnKind(other)),
        }
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuples_decode_every_column_kind() {
        let mut bytes: &[u8] = &[0, 3, b'n', b'u', b't', 0, 0, 0, 2, b'h', b'i'];
        let t = take_tuple(&mut bytes, "test").unwrap();
        assert_eq!(t, [Value::Null, Value::Unchanged, Value::Text(b"hi")]);
        assert!(bytes.is_empty());
        let mut short: &[u8] = &[0, 1, b't', 0, 0, 0, 9, b'x'];
        assert!(take_tuple(&mut short, "test").is_err());
    }

    #[test]
    fn relations_and_changes_decode() {
        let mut rel = vec![b'R', 0, 0, 0, 42];
        rel.extend_from_slice(b"public\0t\0");
        rel.extend_from_slice(&[b'f', 0, 2]);
        rel.extend_from_slice(&[1]);
        rel.extend_from_slice(b"id\0");
        rel.extend_from_slice(&23u32.to_be_bytes());
        rel.extend_from_slice(&(-1i32).to_be_bytes());
        rel.extend_from_slice(&[0]);
        rel.extend_from_slice(b"v\0");
        rel.extend_from_slice(&1043u32.to_be_bytes());
        rel.extend_from_slice(&260i32.to_be_bytes());
        let Message::Relation(r) = decode(&rel).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(
            (r.id, r.schema.as_str(), r.name.as_str()),
            (42, "public", "t")
        );
        assert_eq!(r.columns.len(), 2);
        assert!(r.columns[0].key && !r.columns[1].key);
        assert_eq!((r.columns[1].type_oid, r.columns[1].typmod), (1043, 260));
        for cut in 0..rel.len() {
            assert!(decode(&rel[..cut]).is_err(), "cut at {cut}");
        }

        let update = [
            b'U', 0, 0, 0, 42, b'O', 0, 1, b't', 0, 0, 0, 1, b'a', b'N', 0, 1, b'n',
        ];
        assert_eq!(
            decode(&update).unwrap(),
            Message::Update {
                relation: 42,
                old: Some(vec![Value::Text(b"a")]),
                new: vec![Value::Null]
            }
        );
        let delete = [b'D', 0, 0, 0, 42, b'K', 0, 0];
        assert_eq!(
            decode(&delete).unwrap(),
            Message::Delete {
                relation: 42,
                old: Some(vec![])
            }
        );
        assert!(matches!(
            decode(&[b'U', 0, 0, 0, 1, b'X']),
            Err(DecodeError::TupleTag(b'X'))
        ));
        assert!(decode(&[b'T', 255, 255, 255, 255, 0]).is_err());
        assert_eq!(decode(&[b'O', 1, 2]).unwrap(), Message::Other(b'O'));
        assert!(decode(&[]).is_err());
    }
}
