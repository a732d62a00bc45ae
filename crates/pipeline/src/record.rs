//! An event read from Kafka, owned: what the worker keeps of a fetched message until it
//! is written or dead-lettered.
//!
//! The value, the key and the headers are copied out of librdkafka's message into one
//! buffer (one allocation per event, where rdkafka's `OwnedMessage` makes one per
//! field and per header through librdkafka's allocator, and copies the topic's name),
//! and the value is shared from it, uncopied, into the `PutRecords` batch.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use rdkafka::message::{Headers, Message, Timestamp};

/// One fetched record: value, key, headers, and where it was read.
pub struct Record {
    /// The value, then the key, then the headers (see [`Record::headers`]).
    buf: Bytes,
    /// The value's length; `None` for a null value.
    value: Option<usize>,
    /// The key's length; `None` for a null key.
    key: Option<usize>,
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    timestamp: Timestamp,
}

/// Marks a header without a value (Kafka's null, not an empty value).
const NULL: u32 = u32::MAX;

impl Record {
    /// Copies `msg` out; `topic` is its topic's name, shared by the records read from it.
    pub fn from_message<M: Message>(msg: &M, topic: Arc<str>) -> Record {
        let value = msg.payload();
        let key = msg.key();
        let headers = msg.headers();
        let header_bytes: usize = headers.map_or(0, |h| {
            h.iter()
                .map(|h| 8 + h.key.len() + h.value.map_or(0, <[u8]>::len))
                .sum()
        });
        let mut buf = BytesMut::with_capacity(
            value.map_or(0, <[u8]>::len) + key.map_or(0, <[u8]>::len) + header_bytes,
        );
        buf.put_slice(value.unwrap_or_default());
        buf.put_slice(key.unwrap_or_default());
        if let Some(headers) = headers {
            for h in headers.iter() {
                // Kafka's lengths are 32-bit: a name or value cannot be longer.
                buf.put_u32_le(h.key.len() as u32);
                buf.put_slice(h.key.as_bytes());
                match h.value {
                    Some(v) => {
                        buf.put_u32_le(v.len() as u32);
                        buf.put_slice(v);
                    }
                    None => buf.put_u32_le(NULL),
                }
            }
        }
        Record {
            buf: buf.freeze(),
            value: value.map(<[u8]>::len),
            key: key.map(<[u8]>::len),
            topic,
            partition: msg.partition(),
            offset: msg.offset(),
            timestamp: msg.timestamp(),
        }
    }

    /// The value; `None` for a null value.
    pub fn payload(&self) -> Option<&[u8]> {
        self.value.map(|n| &self.buf[..n])
    }

    /// The value, shared (an empty one for a null value).
    pub fn payload_shared(&self) -> Bytes {
        self.buf.slice(..self.value.unwrap_or(0))
    }

    pub fn key(&self) -> Option<&[u8]> {
        let at = self.value.unwrap_or(0);
        self.key.map(|n| &self.buf[at..at + n])
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    pub fn offset(&self) -> i64 {
        self.offset
    }

    pub fn timestamp(&self) -> Timestamp {
        self.timestamp
    }

    /// The headers in their order: name, and value (`None` for a null one).
    pub fn headers(&self) -> RecordHeaders<'_> {
        let at = self.value.unwrap_or(0) + self.key.unwrap_or(0);
        RecordHeaders {
            rest: &self.buf[at..],
        }
    }
}

/// Iterates over a record's headers.
pub struct RecordHeaders<'a> {
    rest: &'a [u8],
}

impl<'a> RecordHeaders<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.rest.split_at(n.min(self.rest.len()));
        self.rest = rest;
        head
    }

    fn length(&mut self) -> Option<u32> {
        let bytes: [u8; 4] = self.take(4).try_into().ok()?;
        Some(u32::from_le_bytes(bytes))
    }
}

impl<'a> Iterator for RecordHeaders<'a> {
    type Item = (&'a str, Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        let name_len = self.length()? as usize;
        // Written from a `&str` by `from_message`.
        let name = std::str::from_utf8(self.take(name_len)).unwrap_or_default();
        let value = match self.length()? {
            NULL => None,
            n => Some(self.take(n as usize)),
        };
        Some((name, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};

    fn message(
        value: Option<&[u8]>,
        key: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
    ) -> OwnedMessage {
        OwnedMessage::new(
            value.map(<[u8]>::to_vec),
            key.map(<[u8]>::to_vec),
            "events".into(),
            Timestamp::CreateTime(1_700_000_000_123),
            2,
            41,
            headers,
        )
    }

    #[test]
    fn keeps_value_key_headers_and_position_as_read() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "x-source-id",
                value: Some("src_1"),
            })
            .insert(Header::<&[u8]> {
                key: "nothing",
                value: None,
            })
            .insert(Header {
                key: "empty",
                value: Some(""),
            })
            .insert(Header {
                key: "x-source-id",
                value: Some("src_2"),
            });
        let msg = message(Some(b"{\"a\":1}"), Some(b"user-1"), Some(headers));
        let r = Record::from_message(&msg, Arc::from("events"));
        assert_eq!(r.payload(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(&r.payload_shared()[..], b"{\"a\":1}");
        assert_eq!(r.key(), Some(&b"user-1"[..]));
        assert_eq!(
            (r.topic(), r.partition(), r.offset(), r.timestamp()),
            ("events", 2, 41, Timestamp::CreateTime(1_700_000_000_123))
        );
        let headers: Vec<_> = r.headers().collect();
        assert_eq!(
            headers,
            vec![
                ("x-source-id", Some(&b"src_1"[..])),
                ("nothing", None),
                ("empty", Some(&b""[..])),
                ("x-source-id", Some(&b"src_2"[..])),
            ]
        );
    }

    #[test]
    fn null_value_key_and_no_headers_stay_null() {
        let r = Record::from_message(&message(None, None, None), Arc::from("events"));
        assert_eq!(r.payload(), None);
        assert!(r.payload_shared().is_empty());
        assert_eq!(r.key(), None);
        assert_eq!(r.headers().count(), 0);
        // An empty value or key is not a null one.
        let r = Record::from_message(&message(Some(b""), Some(b""), None), Arc::from("t"));
        assert_eq!(r.payload(), Some(&b""[..]));
        assert_eq!(r.key(), Some(&b""[..]));
    }
}
