//! A decoder of the messages PostgreSQL's `pgoutput` plugin sends over
//! logical replication (protocol version 1, the `XLogData` payloads), for
//! the CDC source: Begin, Commit, Relation, Insert, Truncate and logical
//! Message are decoded in full; the others (Update, Delete, Origin, Type)
//! are recognised and skipped, since the outbox publication publishes
//! inserts only. Input comes from the network: every malformed message is an
//! error naming what is wrong, never a panic (see the property tests).
//!
//! Reference: "Logical Replication Message Formats" in the PostgreSQL 15
//! documentation.

use std::fmt;

/// A log sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// One column of a relation, as a Relation message describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity key.
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// A column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value that did not change (updates only).
    Unchanged,
    /// The value in text format.
    Text(Vec<u8>),
    /// The value in binary format (`binary` option).
    Binary(Vec<u8>),
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: Lsn,
        /// Microseconds since 2000-01-01.
        commit_ts: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts: i64,
    },
    Relation {
        id: u32,
        namespace: String,
        name: String,
        replica_identity: u8,
        columns: Vec<Column>,
    },
    Insert {
        relation: u32,
        tuple: Vec<Value>,
    },
    Truncate {
        options: u8,
        relations: Vec<u32>,
    },
    /// `pg_logical_emit_message`.
    Logical {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Vec<u8>,
    },
    /// A message the outbox does not use (Update, Delete, Origin, Type).
    Other(u8),
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput message is empty")]
    Empty,
    #[error("pgoutput {what}: message ends at byte {at}, {need} more needed")]
    Truncated {
        what: &'static str,
        at: usize,
        need: usize,
    },
    #[error("pgoutput {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    #[error("pgoutput message of unknown type {0:#04x}")]
    UnknownType(u8),
    #[error("pgoutput {what}: {extra} bytes after the end of the message")]
    Trailing { what: &'static str, extra: usize },
}

/// A cursor over one message's bytes.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.buf.len());
        let Some(end) = end else {
            return Err(DecodeError::Truncated {
                what: self.what,
                at: self.at,
                need: n - (self.buf.len() - self.at.min(self.buf.len())),
            });
        };
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        self.u64().map(Lsn)
    }

    /// A NUL-terminated UTF-8 string.
    fn cstring(&mut self) -> Result<String, DecodeError> {
        let rest = &self.buf[self.at.min(self.buf.len())..];
        let Some(nul) = rest.iter().position(|b| *b == 0) else {
            return Err(DecodeError::Invalid {
                what: self.what,
                detail: format!("string at byte {} has no terminating NUL", self.at),
            });
        };
        let s = std::str::from_utf8(&rest[..nul]).map_err(|e| DecodeError::Invalid {
            what: self.what,
            detail: format!("string at byte {} is not UTF-8: {e}", self.at),
        })?;
        self.at += nul + 1;
        Ok(s.to_string())
    }

    /// A count that bounds what follows: each item takes at least
    /// `min_item` bytes, so a count larger than the rest of the message
    /// allows is refused before anything is allocated for it.
    fn count(&mut self, n: usize, min_item: usize) -> Result<usize, DecodeError> {
        let left = self.buf.len().saturating_sub(self.at);
        if n.saturating_mul(min_item) > left {
            return Err(DecodeError::Invalid {
                what: self.what,
                detail: format!("{n} items announced, only {left} bytes left"),
            });
        }
        Ok(n)
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.buf.len().saturating_sub(self.at) {
            0 => Ok(()),
            extra => Err(DecodeError::Trailing {
                what: self.what,
                extra,
            }),
        }
    }
}

/// Decodes one `pgoutput` message (protocol version 1).
pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    let (&kind, _) = buf.split_first().ok_or(DecodeError::Empty)?;
    let what = match kind {
        b'B' => "Begin",
        b'C' => "Commit",
        b'R' => "Relation",
        b'I' => "Insert",
        b'T' => "Truncate",
        b'M' => "Message",
        b'U' | b'D' | b'O' | b'Y' => return Ok(Message::Other(kind)),
        other => return Err(DecodeError::UnknownType(other)),
    };
    let mut r = Reader { buf, at: 1, what };
    let message = match kind {
        b'B' => Message::Begin {
            final_lsn: r.lsn()?,
            commit_ts: r.i64()?,
            xid: r.u32()?,
        },
        b'C' => Message::Commit {
            flags: r.u8()?,
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_ts: r.i64()?,
        },
        b'R' => {
            let id = r.u32()?;
            let namespace = r.cstring()?;
            let name = r.cstring()?;
            let replica_identity = r.u8()?;
            let n = r.u16()? as usize;
            // flags, an empty name's NUL, type oid, modifier.
            let n = r.count(n, 10)?;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                columns.push(Column {
                    key: r.u8()? & 1 == 1,
                    name: r.cstring()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            Message::Relation {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            }
        }
        b'I' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'N' => {}
                other => {
                    return Err(DecodeError::Invalid {
                        what,
                        detail: format!("expected a new tuple ('N'), got {other:#04x}"),
                    })
                }
            }
            Message::Insert {
                relation,
                tuple: tuple(&mut r)?,
            }
        }
        b'T' => {
            let n = r.u32()? as usize;
            let options = r.u8()?;
            let n = r.count(n, 4)?;
            let mut relations = Vec::with_capacity(n);
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            Message::Truncate { options, relations }
        }
        _ => {
            let flags = r.u8()?;
            let lsn = r.lsn()?;
            let prefix = r.cstring()?;
            let len = r.u32()? as usize;
            Message::Logical {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content: r.take(len)?.to_vec(),
            }
        }
    };
    r.finish()?;
    Ok(message)
}

/// TupleData: a column count, then each column's kind and value.
fn tuple(r: &mut Reader<'_>) -> Result<Vec<Value>, DecodeError> {
    let n = r.u16()? as usize;
    let n = r.count(n, 1)?;
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        values.push(match r.u8()? {
            b'n' => Value::Null,
            b'u' => Value::Unchanged,
            kind @ (b't' | b'b') => {
                let len = r.i32()?;
                let len = usize::try_from(len).map_err(|_| DecodeError::Invalid {
                    what: r.what,
                    detail: format!("negative value length {len}"),
                })?;
                let bytes = r.take(len)?.to_vec();
                if kind == b't' {
                    Value::Text(bytes)
                } else {
                    Value::Binary(bytes)
                }
            }
            other => {
                return Err(DecodeError::Invalid {
                    what: r.what,
                    detail: format!("unknown column kind {other:#04x}"),
                })
            }
        });
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cstr(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    fn relation_bytes() -> Vec<u8> {
        let mut b = vec![b'R'];
        b.extend(16_385u32.to_be_bytes());
        b.extend(cstr("public"));
        b.extend(cstr("outbox_r0"));
        b.push(b'd');
        b.extend(2u16.to_be_bytes());
        for (name, oid) in [("position", 20u32), ("payload", 3802)] {
            b.push(0);
            b.extend(cstr(name));
            b.extend(oid.to_be_bytes());
            b.extend((-1i32).to_be_bytes());
        }
        b
    }

    fn insert_bytes() -> Vec<u8> {
        let mut b = vec![b'I'];
        b.extend(16_385u32.to_be_bytes());
        b.push(b'N');
        b.extend(3u16.to_be_bytes());
        b.push(b't');
        b.extend(2i32.to_be_bytes());
        b.extend(b"42");
        b.push(b'n');
        b.push(b'b');
        b.extend(1i32.to_be_bytes());
        b.push(7);
        b
    }

    #[test]
    fn decodes_begin_commit_relation_insert_truncate_and_message() {
        let mut begin = vec![b'B'];
        begin.extend(0x1_0000_0010u64.to_be_bytes());
        begin.extend(5i64.to_be_bytes());
        begin.extend(77u32.to_be_bytes());
        assert_eq!(
            decode(&begin),
            Ok(Message::Begin {
                final_lsn: Lsn(0x1_0000_0010),
                commit_ts: 5,
                xid: 77
            })
        );
        assert_eq!(Lsn(0x1_0000_0010).to_string(), "1/10");

        let mut commit = vec![b'C', 0];
        commit.extend(1u64.to_be_bytes());
        commit.extend(2u64.to_be_bytes());
        commit.extend(3i64.to_be_bytes());
        assert!(matches!(
            decode(&commit),
            Ok(Message::Commit {
                end_lsn: Lsn(2),
                ..
            })
        ));

        match decode(&relation_bytes()) {
            Ok(Message::Relation {
                id, name, columns, ..
            }) => {
                assert_eq!((id, name.as_str(), columns.len()), (16_385, "outbox_r0", 2));
                assert_eq!(columns[1].type_oid, 3802);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            decode(&insert_bytes()),
            Ok(Message::Insert {
                relation: 16_385,
                tuple: vec![
                    Value::Text(b"42".to_vec()),
                    Value::Null,
                    Value::Binary(vec![7])
                ]
            })
        );

        let mut truncate = vec![b'T'];
        truncate.extend(2u32.to_be_bytes());
        truncate.push(0);
        truncate.extend(1u32.to_be_bytes());
        truncate.extend(2u32.to_be_bytes());
        assert_eq!(
            decode(&truncate),
            Ok(Message::Truncate {
                options: 0,
                relations: vec![1, 2]
            })
        );

        let mut message = vec![b'M', 1];
        message.extend(9u64.to_be_bytes());
        message.extend(cstr("outbox.switch"));
        message.extend(3u32.to_be_bytes());
        message.extend(b"p=3");
        assert_eq!(
            decode(&message),
            Ok(Message::Logical {
                transactional: true,
                lsn: Lsn(9),
                prefix: "outbox.switch".into(),
                content: b"p=3".to_vec()
            })
        );
        assert_eq!(decode(b"U anything"), Ok(Message::Other(b'U')));
    }

    #[test]
    fn malformed_messages_are_named_errors() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(decode(b"Z"), Err(DecodeError::UnknownType(b'Z')));
        let insert = insert_bytes();
        assert!(matches!(
            decode(&insert[..insert.len() - 1]),
            Err(DecodeError::Truncated { what: "Insert", .. })
        ));
        let mut trailing = insert.clone();
        trailing.push(0);
        assert_eq!(
            decode(&trailing),
            Err(DecodeError::Trailing {
                what: "Insert",
                extra: 1
            })
        );
        // A column count far beyond the message's length allocates nothing.
        let mut huge = vec![b'I'];
        huge.extend(1u32.to_be_bytes());
        huge.push(b'N');
        huge.extend(u16::MAX.to_be_bytes());
        assert!(matches!(decode(&huge), Err(DecodeError::Invalid { .. })));
    }

    /// Captured from PostgreSQL 15 (`pg_logical_slot_peek_binary_changes`
    /// with `proto_version 1`, `messages true`, a publication of inserts):
    /// a 3-row `insert … select`, then a transaction with a logical message
    /// and a `truncate` (not published).
    const CAPTURED: &str = include_str!("testdata/pgoutput-v1.hex");

    fn unhex(line: &str) -> Vec<u8> {
        (0..line.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&line[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn decodes_what_postgres_sent() {
        let messages: Vec<Message> = CAPTURED
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| decode(&unhex(l)).expect("a message PostgreSQL sent"))
            .collect();
        let kinds: String = messages
            .iter()
            .map(|m| match m {
                Message::Begin { .. } => 'B',
                Message::Commit { .. } => 'C',
                Message::Relation { .. } => 'R',
                Message::Insert { .. } => 'I',
                Message::Truncate { .. } => 'T',
                Message::Logical { .. } => 'M',
                Message::Other(_) => '?',
            })
            .collect();
        assert_eq!(kinds, "BRIIICBMC");
        match &messages[1] {
            Message::Relation { name, columns, .. } => {
                assert_eq!(name, "outbox_r0");
                let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
                assert_eq!(names, ["position", "id", "payload"]);
            }
            other => panic!("{other:?}"),
        }
        match &messages[2] {
            Message::Insert { tuple, .. } => assert_eq!(tuple[0], Value::Text(b"1".to_vec())),
            other => panic!("{other:?}"),
        }
        match &messages[7] {
            Message::Logical {
                prefix,
                content,
                transactional,
                ..
            } => {
                assert_eq!(
                    (prefix.as_str(), content.as_slice(), *transactional),
                    ("outbox.switch", &b"p=3"[..], true)
                );
            }
            other => panic!("{other:?}"),
        }
        let (
            Message::Begin { final_lsn, .. },
            Message::Commit {
                commit_lsn,
                end_lsn,
                ..
            },
        ) = (&messages[0], &messages[5])
        else {
            panic!("{messages:?}")
        };
        assert_eq!(final_lsn, commit_lsn);
        assert!(end_lsn > commit_lsn);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn every_prefix_and_corruption_of_valid_messages_is_handled(
            which in 0usize..2,
            cut in 0usize..64,
            flip in proptest::option::of((0usize..64, any::<u8>())),
        ) {
            let mut bytes = if which == 0 { relation_bytes() } else { insert_bytes() };
            if let Some((at, v)) = flip {
                let i = at % bytes.len();
                bytes[i] = v;
            }
            let cut = cut.min(bytes.len());
            let _ = decode(&bytes[..bytes.len() - cut]);
        }
    }
}
