//! The pgoutput messages logical capture needs (protocol version 1, text format):
//! Relation, Insert, Update, Delete and Truncate. Begin and Commit arrive already
//! parsed from pgwire-replication; Type and Origin messages carry nothing kbsync uses.
//! Reference: PostgreSQL's "Logical Replication Message Formats".

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("malformed pgoutput message: {0}")]
pub struct ParseError(pub String);

/// A table as the stream describes it; sent before the first change of the table on
/// each connection, and again after its definition changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub schema: String,
    pub name: String,
    pub columns: Vec<String>,
}

/// One column of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value the change did not touch; its text is not sent.
    UnchangedToast,
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldRow {
    /// Only the replica identity's key columns (the others are Null).
    Key(Vec<Value>),
    /// The whole old row (REPLICA IDENTITY FULL).
    Full(Vec<Value>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Relation(Relation),
    Insert {
        relation: u32,
        new: Vec<Value>,
    },
    Update {
        relation: u32,
        /// Only with REPLICA IDENTITY FULL, or when the key changed.
        old: Option<OldRow>,
        new: Vec<Value>,
    },
    Delete {
        relation: u32,
        old: OldRow,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Begin, Commit (handled by pgwire-replication), Type, Origin, Message.
    Other,
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ParseError> {
        if self.bytes.len() < n {
            return Err(ParseError(format!("truncated {what}")));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &str) -> Result<u8, ParseError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, ParseError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, ParseError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn cstring(&mut self, what: &str) -> Result<String, ParseError> {
        let end = self
            .bytes
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| ParseError(format!("unterminated {what}")))?;
        let text = String::from_utf8_lossy(&self.bytes[..end]).into_owned();
        self.bytes = &self.bytes[end + 1..];
        Ok(text)
    }

    fn tuple(&mut self) -> Result<Vec<Value>, ParseError> {
        let n = self.u16("tuple column count")?;
        let mut values = Vec::with_capacity(n as usize);
        for _ in 0..n {
            values.push(match self.u8("tuple column kind")? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => {
                    let len = self.u32("column length")? as usize;
                    let text = self.take(len, "column value")?;
                    Value::Text(String::from_utf8_lossy(text).into_owned())
                }
                other => {
                    return Err(ParseError(format!(
                        "column kind {:?} (binary output is not requested)",
                        other as char
                    )));
                }
            });
        }
        Ok(values)
    }

    fn old_row(&mut self, kind: u8) -> Result<OldRow, ParseError> {
        match kind {
            b'K' => Ok(OldRow::Key(self.tuple()?)),
            b'O' => Ok(OldRow::Full(self.tuple()?)),
            other => Err(ParseError(format!(
                "old tuple kind {:?}, expected K or O",
                other as char
            ))),
        }
    }
}

pub fn parse(data: &[u8]) -> Result<Message, ParseError> {
    let mut r = Reader { bytes: data };
    let tag = r.u8("message tag")?;
    match tag {
        b'R' => {
            let id = r.u32("relation id")?;
            let schema = r.cstring("namespace")?;
            let name = r.cstring("relation name")?;
            let _replica_identity = r.u8("replica identity")?;
            let n = r.u16("column count")?;
            let mut columns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let _flags = r.u8("column flags")?;
                columns.push(r.cstring("column name")?);
                let _type_oid = r.u32("column type")?;
                let _typmod = r.u32("column type modifier")?;
            }
            Ok(Message::Relation(Relation {
                id,
                schema,
                name,
                columns,
            }))
        }
        b'I' => {
            let relation = r.u32("relation id")?;
            match r.u8("new tuple marker")? {
                b'N' => Ok(Message::Insert {
                    relation,
                    new: r.tuple()?,
                }),
                other => Err(ParseError(format!(
                    "insert: tuple marker {:?}, expected N",
                    other as char
                ))),
            }
        }
        b'U' => {
            let relation = r.u32("relation id")?;
            let mut kind = r.u8("update tuple marker")?;
            let mut old = None;
            if kind == b'K' || kind == b'O' {
                old = Some(r.old_row(kind)?);
                kind = r.u8("update new tuple marker")?;
            }
            if kind != b'N' {
                return Err(ParseError(format!(
                    "update: tuple marker {:?}, expected N",
                    kind as char
                )));
            }
            Ok(Message::Update {
                relation,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let relation = r.u32("relation id")?;
            let kind = r.u8("delete tuple marker")?;
            Ok(Message::Delete {
                relation,
                old: r.old_row(kind)?,
            })
        }
        b'T' => {
            let n = r.u32("truncated relation count")?;
            let _options = r.u8("truncate options")?;
            let relations = (0..n)
                .map(|_| r.u32("truncated relation id"))
                .collect::<Result<_, _>>()?;
            Ok(Message::Truncate { relations })
        }
        _ => Ok(Message::Other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut out = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => out.push(b'n'),
                Some("<toast>") => out.push(b'u'),
                Some(text) => {
                    out.push(b't');
                    out.extend((text.len() as u32).to_be_bytes());
                    out.extend(text.as_bytes());
                }
            }
        }
        out
    }

    #[test]
    fn relation_messages_give_the_table_and_its_column_names() {
        let mut msg = vec![b'R'];
        msg.extend(16384u32.to_be_bytes());
        msg.extend(b"public\0faq\0");
        msg.push(b'f');
        msg.extend(2u16.to_be_bytes());
        for (flags, name) in [(1u8, "id"), (0, "question")] {
            msg.push(flags);
            msg.extend(name.as_bytes());
            msg.push(0);
            msg.extend(23u32.to_be_bytes());
            msg.extend(u32::MAX.to_be_bytes());
        }
        assert_eq!(
            parse(&msg),
            Ok(Message::Relation(Relation {
                id: 16384,
                schema: "public".into(),
                name: "faq".into(),
                columns: vec!["id".into(), "question".into()],
            }))
        );
    }

    #[test]
    fn updates_carry_the_full_old_row_unchanged_toast_and_nulls() {
        let mut msg = vec![b'U'];
        msg.extend(7u32.to_be_bytes());
        msg.push(b'O');
        msg.extend(tuple(&[Some("1"), Some("old"), None]));
        msg.push(b'N');
        msg.extend(tuple(&[Some("1"), Some("<toast>"), Some("x")]));
        assert_eq!(
            parse(&msg),
            Ok(Message::Update {
                relation: 7,
                old: Some(OldRow::Full(vec![
                    Value::Text("1".into()),
                    Value::Text("old".into()),
                    Value::Null
                ])),
                new: vec![
                    Value::Text("1".into()),
                    Value::UnchangedToast,
                    Value::Text("x".into())
                ],
            })
        );
        // Without an old row (REPLICA IDENTITY DEFAULT, key unchanged).
        let mut msg = vec![b'U'];
        msg.extend(7u32.to_be_bytes());
        msg.push(b'N');
        msg.extend(tuple(&[Some("2")]));
        assert_eq!(
            parse(&msg),
            Ok(Message::Update {
                relation: 7,
                old: None,
                new: vec![Value::Text("2".into())]
            })
        );
    }

    #[test]
    fn deletes_truncates_and_truncated_input() {
        let mut msg = vec![b'D'];
        msg.extend(9u32.to_be_bytes());
        msg.push(b'K');
        msg.extend(tuple(&[Some("5")]));
        assert_eq!(
            parse(&msg),
            Ok(Message::Delete {
                relation: 9,
                old: OldRow::Key(vec![Value::Text("5".into())])
            })
        );
        let mut msg = vec![b'T'];
        msg.extend(2u32.to_be_bytes());
        msg.push(0);
        msg.extend(9u32.to_be_bytes());
        msg.extend(10u32.to_be_bytes());
        assert_eq!(
            parse(&msg),
            Ok(Message::Truncate {
                relations: vec![9, 10]
            })
        );
        assert!(parse(&msg[..msg.len() - 1]).is_err());
        assert!(parse(&[b'I', 0, 0, 0, 9, b'N', 0, 1, b't', 0, 0, 0, 9, b'x']).is_err());
        assert_eq!(parse(&[b'Y', 1, 2]), Ok(Message::Other));
    }
}
