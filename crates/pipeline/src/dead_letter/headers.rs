//! What a dead letter carries: the original headers and the `dlq.*` ones, and how a
//! value too large for the dead-letter topic is cut.

use rdkafka::message::{Header, OwnedHeaders};

use super::DeadLetter;
use crate::kafka::DEAD_LETTER_ROOM;
use crate::record::Record;

/// Kafka's default largest record (`message.max.bytes` of a broker, `max.message.bytes`
/// of a topic): a refused dead letter is cut to this first.
const KAFKA_DEFAULT_MAX_MESSAGE: usize = 1_048_588;

/// The headers of a dead letter: the original ones, then `dlq.reason`, `dlq.error`,
/// `dlq.topic`, `dlq.partition`, `dlq.offset`; for a value cut to fit,
/// `dlq.truncated = true` and `dlq.original_size` (bytes of the original value).
pub fn dead_letter_headers(
    original: &Record,
    dl: &DeadLetter,
    truncated_from: Option<usize>,
) -> OwnedHeaders {
    let mut headers = original.headers_to_produce(|_| true);
    let partition = original.partition().to_string();
    let offset = original.offset().to_string();
    for (key, value) in [
        ("dlq.reason", dl.reason.as_str()),
        ("dlq.error", dl.error.as_str()),
        ("dlq.topic", original.topic()),
        ("dlq.partition", partition.as_str()),
        ("dlq.offset", offset.as_str()),
    ] {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    if let Some(size) = truncated_from {
        headers = headers
            .insert(Header {
                key: "dlq.truncated",
                value: Some("true"),
            })
            .insert(Header {
                key: "dlq.original_size",
                value: Some(&size.to_string()),
            });
    }
    headers
}

/// The next, smaller value size to try for a dead letter of `value_len` bytes that was
/// refused as too large: first what the producer's own limit leaves room for, then
/// what a broker with Kafka's default limit accepts, then halves. `None` when even an
/// empty value was refused.
pub(super) fn cut_to(value_len: usize, other_bytes: usize, producer_max: usize) -> Option<usize> {
    if value_len == 0 {
        return None;
    }
    let room = other_bytes + DEAD_LETTER_ROOM;
    [
        producer_max.saturating_sub(room),
        KAFKA_DEFAULT_MAX_MESSAGE.saturating_sub(room),
    ]
    .into_iter()
    .find(|&n| n < value_len)
    .or(Some(value_len / 2))
}

#[cfg(test)]
mod tests {
    use super::super::Reason;
    use super::*;
    use rdkafka::message::{Headers, OwnedMessage, Timestamp};
    #[test]
    fn dead_letter_keeps_original_headers_and_adds_where_and_why() {
        let original = OwnedMessage::new(
            Some(b"{}".to_vec()),
            Some(b"k".to_vec()),
            "events".into(),
            Timestamp::NotAvailable,
            3,
            42,
            Some(OwnedHeaders::new().insert(Header {
                key: "source_id",
                value: Some("src_1"),
            })),
        );
        let original = Record::from_message(&original, "events".into());
        let dl = DeadLetter::new(Reason::UnknownSource, "no tenant\nsrc_1");
        let headers = dead_letter_headers(&original, &dl, None);
        let got: Vec<(String, String)> = headers
            .iter()
            .map(|h| {
                (
                    h.key.to_owned(),
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                )
            })
            .collect();
        let want = [
            ("source_id", "src_1"),
            ("dlq.reason", "unknown_source"),
            ("dlq.error", "no tenant src_1"),
            ("dlq.topic", "events"),
            ("dlq.partition", "3"),
            ("dlq.offset", "42"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_truncated_dead_letter_says_so_and_how_large_the_original_was() {
        let original = OwnedMessage::new(
            Some(vec![b'x'; 10]),
            None,
            "events".into(),
            Timestamp::NotAvailable,
            0,
            7,
            None,
        );
        let original = Record::from_message(&original, "events".into());
        let dl = DeadLetter::new(Reason::RecordTooLarge, "too large");
        let headers = dead_letter_headers(&original, &dl, Some(1_100_000));
        let get = |k: &str| {
            headers
                .iter()
                .find(|h| h.key == k)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(get("dlq.truncated").as_deref(), Some("true"));
        assert_eq!(get("dlq.original_size").as_deref(), Some("1100000"));
        assert_eq!(get("dlq.offset").as_deref(), Some("7"));
        let whole = dead_letter_headers(&original, &dl, None);
        assert!(whole.iter().all(|h| h.key != "dlq.truncated"));
    }

    #[test]
    fn an_oversized_value_is_cut_to_the_producer_limit_then_kafkas_default_then_halves() {
        let producer_max = 100_000_000;
        // Over the producer's own limit: cut to what it leaves room for.
        let first = cut_to(150_000_000, 100, producer_max).unwrap();
        assert_eq!(first, producer_max - 100 - DEAD_LETTER_ROOM);
        // Under it, yet refused by the broker: what Kafka's default limit accepts.
        let second = cut_to(1_100_000, 100, producer_max).unwrap();
        assert_eq!(second, KAFKA_DEFAULT_MAX_MESSAGE - 100 - DEAD_LETTER_ROOM);
        // Refused again: halves, down to nothing, then give up.
        assert_eq!(cut_to(second, 100, producer_max), Some(second / 2));
        assert_eq!(cut_to(1, 100, producer_max), Some(0));
        assert_eq!(cut_to(0, 100, producer_max), None);
    }
}
