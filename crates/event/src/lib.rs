//! Decode: the first stage of the flow.
//!
//! A Kafka record's value is one Segment message (identify, track, page, screen, group,
//! alias) as a JSON object. The worker forwards those bytes to Kinesis untouched; this
//! crate only reads the handful of fields that routing needs (`type`, `userId`,
//! `anonymousId`, `messageId`, `projectId`) and derives the Kinesis partition key from
//! them (see "Output" in the README). Everything here is pure and allocation-light: it runs once per event.

pub mod sample;
pub mod text;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::de::IgnoredAny;
use serde::Deserialize;

/// Kinesis accepts partition keys of 1 to 256 Unicode characters.
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

/// The Segment message types the destination accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Identify,
    Track,
    Page,
    Screen,
    Group,
    Alias,
}

impl EventType {
    pub const ALL: [EventType; 6] = [
        EventType::Identify,
        EventType::Track,
        EventType::Page,
        EventType::Screen,
        EventType::Group,
        EventType::Alias,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Identify => "identify",
            EventType::Track => "track",
            EventType::Page => "page",
            EventType::Screen => "screen",
            EventType::Group => "group",
            EventType::Alias => "alias",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// Why a record value cannot be read as a Segment message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("value is not a JSON object: {0}")]
    InvalidJson(String),
    #[error("{0}")]
    UnsupportedType(String),
}

/// A partition key, already within Kinesis' limits (1..=256 characters). Shared: an
/// event's key is also its lane's and its batch entry's.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PartitionKey(Arc<str>);

impl PartitionKey {
    /// Builds a key from a non-empty identifier, shortening it deterministically when it
    /// is longer than Kinesis allows: the first 223 characters, `~`, then the MD5 of the
    /// whole identifier in hex (32 characters) — 256 characters in all. The same input
    /// always gives the same key, so one user keeps one shard and one lane.
    pub fn new(id: &str) -> Option<Self> {
        if id.is_empty() {
            return None;
        }
        if id.chars().count() <= MAX_PARTITION_KEY_CHARS {
            return Some(PartitionKey(Arc::from(id)));
        }
        let keep: String = id.chars().take(MAX_PARTITION_KEY_CHARS - 33).collect();
        Some(PartitionKey(Arc::from(format!(
            "{keep}~{:x}",
            md5::compute(id.as_bytes())
        ))))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0.to_string()
    }
}

impl fmt::Debug for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The routing fields of one message. The original bytes stay with the caller; the
/// fields are borrowed from them unless they had to be unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventView<'a> {
    pub event_type: EventType,
    pub user_id: Option<Cow<'a, str>>,
    pub anonymous_id: Option<Cow<'a, str>>,
    pub message_id: Option<Cow<'a, str>>,
    pub project_id: Option<Cow<'a, str>>,
}

/// Only the fields routing needs; serde skips everything else without building it.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(rename = "type", default, borrow)]
    event_type: Option<Field<'a>>,
    #[serde(rename = "userId", default, borrow)]
    user_id: Option<Field<'a>>,
    #[serde(rename = "anonymousId", default, borrow)]
    anonymous_id: Option<Field<'a>>,
    #[serde(rename = "messageId", default, borrow)]
    message_id: Option<Field<'a>>,
    #[serde(rename = "projectId", default, borrow)]
    project_id: Option<Field<'a>>,
}

/// One of those fields as found: a string (borrowed unless it had escapes), a number
/// as its decimal text (as `serde_json` prints it), or anything else (null, a bool, an
/// object, an array), which is skipped without being built.
enum Field<'a> {
    Text(Cow<'a, str>),
    Number(String),
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor)
    }
}

struct FieldVisitor;

impl<'de> serde::de::Visitor<'de> for FieldVisitor {
    type Value = Field<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Field<'de>, E> {
        Ok(Field::Text(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Field<'de>, E> {
        Ok(Field::Text(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Field<'de>, E> {
        Ok(Field::Text(Cow::Owned(v)))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Field<'de>, E> {
        Ok(Field::Number(serde_json::Number::from(v).to_string()))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Field<'de>, E> {
        Ok(Field::Number(serde_json::Number::from(v).to_string()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Field<'de>, E> {
        // JSON has no NaN or infinity: a float read from it is finite.
        Ok(serde_json::Number::from_f64(v).map_or(Field::Other, |n| Field::Number(n.to_string())))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Field<'de>, E> {
        Ok(Field::Other)
    }

    fn visit_unit<E>(self) -> Result<Field<'de>, E> {
        Ok(Field::Other)
    }

    fn visit_none<E>(self) -> Result<Field<'de>, E> {
        Ok(Field::Other)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Field<'de>, D::Error> {
        d.deserialize_any(FieldVisitor)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Field<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Field::Other)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Field<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Field::Other)
    }
}

/// An identifier field as the partition-key rules read it: a non-empty string, or a number as its
/// decimal text. Anything else (null, bool, object, array, "") counts as absent.
fn identifier(v: Option<Field<'_>>) -> Option<Cow<'_, str>> {
    match v? {
        Field::Text(s) if !s.is_empty() => Some(s),
        Field::Number(n) => Some(Cow::Owned(n)),
        _ => None,
    }
}

impl<'a> EventView<'a> {
    /// Reads the routing fields of a message. The whole value must be valid JSON and an
    /// object; `type` must be one of the six Segment types.
    pub fn decode(value: &'a [u8]) -> Result<EventView<'a>, DecodeError> {
        let first = value.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(DecodeError::InvalidJson(match first {
                None => "empty value".to_owned(),
                Some(_) => match serde_json::from_slice::<serde::de::IgnoredAny>(value) {
                    Ok(_) => "top-level JSON value is not an object".to_owned(),
                    Err(e) => e.to_string(),
                },
            }));
        }
        let fields: Fields<'a> =
            serde_json::from_slice(value).map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
        let event_type = match fields.event_type {
            Some(Field::Text(s)) => EventType::parse(&s).ok_or_else(|| {
                DecodeError::UnsupportedType(format!(
                    "type {:?} is not one of identify, track, page, screen, group, alias",
                    text::clip(&s, 64)
                ))
            })?,
            Some(_) => {
                return Err(DecodeError::UnsupportedType(
                    "type is not a string".to_owned(),
                ))
            }
            None => {
                return Err(DecodeError::UnsupportedType(
                    "message has no type".to_owned(),
                ))
            }
        };
        Ok(EventView {
            event_type,
            user_id: identifier(fields.user_id),
            anonymous_id: identifier(fields.anonymous_id),
            message_id: identifier(fields.message_id),
            project_id: identifier(fields.project_id),
        })
    }

    /// The Kinesis partition key (see "Output" in the README): `userId`, else `anonymousId`; `messageId`
    /// alone when the tenant partitions by message.
    pub fn partition_key(&self, use_message_id: bool) -> Result<PartitionKey, MissingKey> {
        let id = if use_message_id {
            self.message_id.as_deref()
        } else {
            self.user_id.as_deref().or(self.anonymous_id.as_deref())
        };
        id.and_then(PartitionKey::new).ok_or(if use_message_id {
            MissingKey::MessageId
        } else {
            MissingKey::UserOrAnonymousId
        })
    }
}

/// No field to partition by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MissingKey {
    #[error("message has neither userId nor anonymousId")]
    UserOrAnonymousId,
    #[error("tenant partitions by messageId (useMessageId) and the message has none")]
    MessageId,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(json: &str) -> EventView<'_> {
        EventView::decode(json.as_bytes()).expect("decodes")
    }

    #[test]
    fn reads_all_six_types() {
        for t in EventType::ALL {
            let json = format!(r#"{{"type":"{}","userId":"u"}}"#, t.as_str());
            let v = view(&json);
            assert_eq!(v.event_type, t);
        }
    }

    #[test]
    fn partition_key_prefers_user_id_then_anonymous_id() {
        let v = view(r#"{"type":"track","userId":"u1","anonymousId":"a1"}"#);
        assert_eq!(v.partition_key(false).unwrap().as_str(), "u1");
        let v = view(r#"{"type":"track","userId":"","anonymousId":"a1"}"#);
        assert_eq!(v.partition_key(false).unwrap().as_str(), "a1");
        let v = view(r#"{"type":"track","userId":null,"anonymousId":"a1"}"#);
        assert_eq!(v.partition_key(false).unwrap().as_str(), "a1");
    }

    #[test]
    fn numeric_user_id_is_its_decimal_text() {
        let v = view(r#"{"type":"identify","userId":12345}"#);
        assert_eq!(v.partition_key(false).unwrap().as_str(), "12345");
    }

    #[test]
    fn message_id_partitioning_ignores_user() {
        let v = view(r#"{"type":"track","userId":"u1","messageId":"m1"}"#);
        assert_eq!(v.partition_key(true).unwrap().as_str(), "m1");
        let v = view(r#"{"type":"track","userId":"u1"}"#);
        assert_eq!(v.partition_key(true), Err(MissingKey::MessageId));
    }

    #[test]
    fn dead_letters_event_without_user_or_anonymous_id() {
        let v = view(r#"{"type":"track","userId":"","anonymousId":""}"#);
        assert_eq!(v.partition_key(false), Err(MissingKey::UserOrAnonymousId));
    }

    #[test]
    fn long_keys_are_shortened_deterministically_to_256_chars() {
        let long = "é".repeat(300);
        let a = PartitionKey::new(&long).unwrap();
        let b = PartitionKey::new(&long).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.as_str().chars().count(), 256);
        let other = PartitionKey::new(&format!("{long}x")).unwrap();
        assert_ne!(a, other, "different ids keep different keys");
        let exact = "x".repeat(256);
        assert_eq!(PartitionKey::new(&exact).unwrap().as_str(), exact);
    }

    #[test]
    fn rejects_non_objects_and_broken_json() {
        for bad in [
            "",
            "  ",
            "[1,2]",
            "\"track\"",
            "{\"type\":",
            "not json",
            "{} trailing",
        ] {
            assert!(
                matches!(
                    EventView::decode(bad.as_bytes()),
                    Err(DecodeError::InvalidJson(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn rejects_unknown_or_missing_types() {
        for bad in [
            r#"{"type":"screenview"}"#,
            r#"{"userId":"u"}"#,
            r#"{"type":7}"#,
        ] {
            assert!(
                matches!(
                    EventView::decode(bad.as_bytes()),
                    Err(DecodeError::UnsupportedType(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn identifiers_read_as_json_values_would_be_borrowed_where_possible() {
        // What the identifier rules made of a `serde_json::Value` before.
        let as_value = |json: &str| match serde_json::from_str::<serde_json::Value>(json).unwrap() {
            serde_json::Value::String(s) if !s.is_empty() => Some(s),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        for json in [
            r#""u-1""#,
            r#""a\"b\u00e9""#,
            r#""""#,
            "12345",
            "-7",
            "1.5",
            "1e21",
            "18446744073709551615",
            "true",
            "null",
            r#"{"a":[1,{"b":null}]}"#,
            r#"[1,"x",[]]"#,
        ] {
            let event = format!(r#"{{"type":"identify","userId":{json},"projectId":"p"}}"#);
            let v = view(&event);
            assert_eq!(v.user_id.as_deref(), as_value(json).as_deref(), "{json}");
            assert_eq!(v.project_id.as_deref(), Some("p"), "read past {json}");
        }
        let v = view(r#"{"type":"track","userId":"plain","anonymousId":"esc\"aped"}"#);
        assert!(matches!(v.user_id, Some(Cow::Borrowed("plain"))), "no copy");
        assert_eq!(v.anonymous_id.as_deref(), Some("esc\"aped"));
    }

    #[test]
    fn reads_project_id_for_routing() {
        let v = view(
            r#"{"type":"page","anonymousId":"a","projectId":"src_9","properties":{"x":[1,2,{"y":null}]}}"#,
        );
        assert_eq!(v.project_id.as_deref(), Some("src_9"));
    }
}
