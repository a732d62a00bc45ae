//! An event read from Kafka, owned: what the worker keeps of a fetched message until it
//! is written or dead-lettered.
//!
//! The value, the key and the headers are copied out of librdkafka's message into one
//! buffer (one allocation per event, where rdkafka's `OwnedMessage` makes one per
//! field and per header through librdkafka's allocator, and copies the topic's name),
//! and the value is shared from it, uncopied, into the `PutRecords` batch.
//!
//! Header names are kept as bytes: Kafka allows any bytes there, and rdkafka's own
//! accessor panics on a name that is not UTF-8, which a producer could send.

use std::ffi::CStr;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use rdkafka::bindings as rd;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders, Timestamp};

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

/// A header name's or value's length as stored. Kafka's lengths are signed 32-bit and
/// librdkafka refuses messages of 2 GiB or more, so every length fits below [`NULL`].
fn length(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(NULL - 1).min(NULL - 1)
}

/// A fetched message's headers straight from librdkafka: name (bytes, up to a NUL, as
/// librdkafka keeps names as C strings) and value (`None` for a null one).
fn raw_headers<'a>(
    msg: &'a BorrowedMessage<'_>,
) -> impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)> + Clone {
    let mut headers: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `msg` is a live message; librdkafka parses its headers once and keeps
    // them with the message, so they live as long as the borrow of `msg`.
    let err = unsafe { rd::rd_kafka_message_headers(msg.ptr(), &mut headers) };
    let count = if err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && !headers.is_null()
    {
        // SAFETY: `headers` was just returned for this message and is not null.
        unsafe { rd::rd_kafka_header_cnt(headers) }
    } else {
        0
    };
    (0..count).filter_map(move |idx| {
        let mut name: *const std::os::raw::c_char = std::ptr::null();
        let mut value: *const std::os::raw::c_void = std::ptr::null();
        let mut size = 0usize;
        // SAFETY: `idx` is below the count; the out-pointers are valid locals.
        let err =
            unsafe { rd::rd_kafka_header_get_all(headers, idx, &mut name, &mut value, &mut size) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            return None;
        }
        // SAFETY: librdkafka's header names are NUL-terminated, its values `size`
        // bytes long; both live with the message (see above).
        let name = unsafe { CStr::from_ptr(name) }.to_bytes();
        let value = (!value.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) });
        Some((name, value))
    })
}

impl Record {
    /// Copies a fetched message out; `topic` is its topic's name, shared by the records
    /// read from it. Header names are read as bytes, whatever they hold.
    pub fn from_kafka(msg: &BorrowedMessage<'_>, topic: Arc<str>) -> Record {
        Record::build(msg, raw_headers(msg), topic)
    }

    /// Copies any rdkafka message out (its headers through rdkafka's accessor, which
    /// takes UTF-8 names only: for messages made here, such as the tests').
    pub fn from_message<M: Message>(msg: &M, topic: Arc<str>) -> Record {
        let headers: Vec<(&[u8], Option<&[u8]>)> = msg
            .headers()
            .into_iter()
            .flat_map(|h| h.iter().map(|h| (h.key.as_bytes(), h.value)))
            .collect();
        Record::build(msg, headers.into_iter(), topic)
    }

    fn build<'a, M: Message>(
        msg: &M,
        headers: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)> + Clone,
        topic: Arc<str>,
    ) -> Record {
        let value = msg.payload();
        let key = msg.key();
        let header_bytes: usize = headers
            .clone()
            .map(|(name, value)| 8 + name.len() + value.map_or(0, <[u8]>::len))
            .sum();
        let mut buf = BytesMut::with_capacity(
            value.map_or(0, <[u8]>::len) + key.map_or(0, <[u8]>::len) + header_bytes,
        );
        buf.put_slice(value.unwrap_or_default());
        buf.put_slice(key.unwrap_or_default());
        for (name, value) in headers {
            buf.put_u32_le(length(name.len()));
            buf.put_slice(name);
            match value {
                Some(v) => {
                    buf.put_u32_le(length(v.len()));
                    buf.put_slice(v);
                }
                None => buf.put_u32_le(NULL),
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

    /// Where this event was read and its `messageId`, for a status sample (read from
    /// the value only then: failures are rare, and samples fewer).
    pub(crate) fn status_place(&self) -> kd_status::Place {
        let message_id = self
            .payload()
            .and_then(|v| kd_event::EventView::decode(v).ok())
            .and_then(|v| v.message_id.map(|m| m.into_owned()));
        kd_status::Place {
            message_id,
            topic: self.topic().to_owned(),
            partition: self.partition(),
            offset: self.offset(),
        }
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

    /// The last value of the header `name`, as text (invalid UTF-8 replaced).
    pub fn header_text(&self, name: &str) -> Option<String> {
        self.headers()
            .filter(|(n, _)| *n == name.as_bytes())
            .filter_map(|(_, value)| value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .last()
    }

    /// The headers to produce again (to the dead letters, or back from them), in their
    /// order, those whose name `keep` accepts. rdkafka takes UTF-8 names only: a name
    /// that is not is passed on with its invalid bytes replaced (U+FFFD).
    pub fn headers_to_produce(&self, keep: impl Fn(&[u8]) -> bool) -> OwnedHeaders {
        self.headers().filter(|(name, _)| keep(name)).fold(
            OwnedHeaders::new(),
            |headers, (name, value)| {
                headers.insert(Header {
                    key: &String::from_utf8_lossy(name),
                    value,
                })
            },
        )
    }

    /// The headers in their order: name (bytes: Kafka does not require UTF-8), and
    /// value (`None` for a null one).
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
    type Item = (&'a [u8], Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        let name_len = self.length()? as usize;
        let name = self.take(name_len);
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
                (&b"x-source-id"[..], Some(&b"src_1"[..])),
                (&b"nothing"[..], None),
                (&b"empty"[..], Some(&b""[..])),
                (&b"x-source-id"[..], Some(&b"src_2"[..])),
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
