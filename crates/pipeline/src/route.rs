//! Route: from one Kafka record to (tenant, partition key), or to a dead letter.
//!
//! Checks run in the order an operator would fix them: is it JSON, is it a Segment
//! type, whose is it, is that tenant usable, can it be partitioned, does it fit.

use std::sync::Arc;

use kd_event::{DecodeError, EventView, PartitionKey};
use kd_tenants::{Snapshot, TenantEntry, TenantSettings};

use crate::dead_letter::{DeadLetter, Reason};
use crate::record::Record;

/// Where an event goes.
#[derive(Debug, Clone)]
pub struct Routed {
    pub tenant: Arc<TenantSettings>,
    pub key: PartitionKey,
}

/// Where an event's source ID is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceIdFrom {
    /// The header that carries it.
    pub header: String,
    /// Only the header: a `projectId` in the body is ignored, for platforms where the
    /// body is written by the tenant (who could otherwise name another tenant).
    pub header_only: bool,
}

/// The source ID from the header named `header`, when present, non-empty and UTF-8.
/// Two of them with different values make the record's tenant ambiguous: whoever added
/// the second (a tenant-written header next to the platform's) must not choose it, so
/// the record is dead-lettered `missing_source_id`, whatever `require_header` says.
fn header_source_id<'a>(msg: &'a Record, header: &str) -> Result<Option<&'a str>, DeadLetter> {
    let mut found: Option<&str> = None;
    let values = msg
        .headers()
        .filter(|(name, _)| *name == header.as_bytes())
        .filter_map(|(_, value)| value)
        .filter_map(|v| std::str::from_utf8(v).ok())
        .map(str::trim)
        .filter(|s| !s.is_empty());
    for value in values {
        match found {
            Some(first) if first != value => {
                return Err(DeadLetter::new(
                    Reason::MissingSourceId,
                    format!(
                        "two {header} headers with different values ({:?} and {:?}): the record's tenant is ambiguous",
                        kd_event::text::clip(first, 128),
                        kd_event::text::clip(value, 128)
                    ),
                ))
            }
            _ => found = Some(value),
        }
    }
    Ok(found)
}

/// Decides where one record goes.
pub fn route(msg: &Record, snapshot: &Snapshot, from: &SourceIdFrom) -> Result<Routed, DeadLetter> {
    let value = msg.payload().unwrap_or_default();
    let view = EventView::decode(value).map_err(|e| match e {
        DecodeError::InvalidJson(m) => DeadLetter::new(Reason::InvalidJson, m),
        DecodeError::UnsupportedType(m) => DeadLetter::new(Reason::UnsupportedType, m),
    })?;
    let source_id = header_source_id(msg, &from.header)?
        .or(view.project_id.as_deref().filter(|_| !from.header_only))
        .ok_or_else(|| {
            let header = &from.header;
            DeadLetter::new(
                Reason::MissingSourceId,
                if from.header_only {
                    format!("no {header} header (projectId in the message is not used: tenants.require_header)")
                } else {
                    format!("no {header} header and no projectId in the message")
                },
            )
        })?;
    let tenant = match snapshot.get(source_id) {
        Some(TenantEntry::Valid(t)) => t.clone(),
        Some(TenantEntry::Invalid { reason }) => {
            return Err(
                DeadLetter::new(Reason::InvalidSettings, reason.to_string()).of_source(source_id)
            )
        }
        None => {
            return Err(DeadLetter::new(
                Reason::UnknownSource,
                format!("no settings for source {source_id:?}"),
            )
            .of_source(source_id))
        }
    };
    let key = view.partition_key(tenant.use_message_id).map_err(|e| {
        DeadLetter::new(Reason::MissingPartitionKey, e.to_string()).of_source(source_id)
    })?;
    // Larger than any stream takes (or than the tenant says its stream takes): at once.
    // The stream's own maximum, from DescribeStreamSummary, is the writer's to check.
    let size = value.len() + key.as_str().len();
    let max = tenant
        .max_record_bytes
        .unwrap_or(kd_tenants::MAX_RECORD_KIB_LIMIT as usize * 1024);
    if size > max {
        return Err(DeadLetter::new(
            Reason::RecordTooLarge,
            format!(
                "record is {size} bytes (data plus partition key); stream {} takes at most {max}",
                tenant.stream_label()
            ),
        )
        .of_source(source_id));
    }
    Ok(Routed { tenant, key })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
    use std::collections::HashMap;

    fn snapshot() -> Snapshot {
        let good = kd_tenants::parse_tenant(&serde_json::json!({
            "sourceId": "src_1", "roleAddress": "arn:aws:iam::123456789012:role/r",
            "region": "us-east-1", "stream": "s", "maxRecordSizeKiB": 1}))
        .unwrap();
        let mut m: HashMap<Arc<str>, TenantEntry> = HashMap::new();
        m.insert("src_1".into(), TenantEntry::Valid(Arc::new(good)));
        m.insert(
            "bad".into(),
            TenantEntry::Invalid {
                reason: "tenant bad: region x".into(),
            },
        );
        Snapshot::new(m)
    }

    fn msg(value: &str, source: Option<&str>) -> Record {
        msg_with(value, source.as_slice())
    }

    /// A record with a `source_id` header for each of `sources`, in order.
    fn msg_with(value: &str, sources: &[&str]) -> Record {
        let headers = (!sources.is_empty()).then(|| {
            sources.iter().fold(OwnedHeaders::new(), |h, s| {
                h.insert(Header {
                    key: "source_id",
                    value: Some(*s),
                })
            })
        });
        let msg = OwnedMessage::new(
            Some(value.as_bytes().to_vec()),
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            0,
            headers,
        );
        Record::from_message(&msg, "t".into())
    }

    fn header(header_only: bool) -> SourceIdFrom {
        SourceIdFrom {
            header: "source_id".into(),
            header_only,
        }
    }

    fn reason(value: &str, source: Option<&str>) -> Reason {
        route(&msg(value, source), &snapshot(), &header(false))
            .unwrap_err()
            .reason
    }

    #[test]
    fn with_the_header_required_the_body_cannot_name_a_tenant() {
        let body = r#"{"type":"track","userId":"u","projectId":"src_1"}"#;
        let dl = route(&msg(body, None), &snapshot(), &header(true)).unwrap_err();
        assert_eq!(dl.reason, Reason::MissingSourceId);
        assert!(dl.error.contains("require_header"), "{}", dl.error);
        let r = route(&msg(body, Some("src_1")), &snapshot(), &header(true)).unwrap();
        assert_eq!(
            r.tenant.source_id.as_str(),
            "src_1",
            "the header still routes"
        );
    }

    #[test]
    fn two_source_id_headers_that_differ_are_dead_lettered_whatever_is_required() {
        let body = r#"{"type":"track","userId":"u"}"#;
        for header_only in [false, true] {
            // The platform's header first, a second one after it (or before it).
            for order in [["src_1", "src_other"], ["src_other", "src_1"]] {
                let dl =
                    route(&msg_with(body, &order), &snapshot(), &header(header_only)).unwrap_err();
                assert_eq!(dl.reason, Reason::MissingSourceId);
                assert!(dl.error.contains("two source_id headers"), "{}", dl.error);
                assert!(dl.error.contains("ambiguous"), "{}", dl.error);
            }
            // The same value twice names one tenant.
            let r = route(
                &msg_with(body, &["src_1", " src_1"]),
                &snapshot(),
                &header(header_only),
            )
            .unwrap();
            assert_eq!(r.tenant.source_id.as_str(), "src_1");
        }
    }

    #[test]
    fn routes_by_header_then_project_id() {
        let r = route(
            &msg(r#"{"type":"track","userId":"u"}"#, Some("src_1")),
            &snapshot(),
            &header(false),
        )
        .unwrap();
        assert_eq!(r.tenant.source_id.as_str(), "src_1");
        assert_eq!(r.key.as_str(), "u");
        let r = route(
            &msg(
                r#"{"type":"track","anonymousId":"a","projectId":"src_1"}"#,
                None,
            ),
            &snapshot(),
            &header(false),
        )
        .unwrap();
        assert_eq!(r.key.as_str(), "a");
    }

    #[test]
    fn each_bad_input_gets_its_reason() {
        assert_eq!(reason("nope", Some("src_1")), Reason::InvalidJson);
        assert_eq!(
            reason(r#"{"type":"bogus","userId":"u"}"#, Some("src_1")),
            Reason::UnsupportedType
        );
        assert_eq!(
            reason(r#"{"type":"track","userId":"u"}"#, None),
            Reason::MissingSourceId
        );
        assert_eq!(
            reason(r#"{"type":"track","userId":"u"}"#, Some("who")),
            Reason::UnknownSource
        );
        assert_eq!(
            reason(r#"{"type":"track","userId":"u"}"#, Some("bad")),
            Reason::InvalidSettings
        );
        assert_eq!(
            reason(r#"{"type":"track"}"#, Some("src_1")),
            Reason::MissingPartitionKey
        );
        let big = format!(
            r#"{{"type":"track","userId":"u","p":"{}"}}"#,
            "x".repeat(1024)
        );
        assert_eq!(reason(&big, Some("src_1")), Reason::RecordTooLarge);
    }
}
