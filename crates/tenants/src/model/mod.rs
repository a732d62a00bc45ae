//! The settings of one tenant, with the names the destination's settings have always
//! had (`sourceId`, `roleAddress`, `secretId`, ...), validated at the edge.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

/// Kinesis' default maximum record size, in KiB (data plus partition key).
pub const DEFAULT_MAX_RECORD_KIB: u32 = 1024;
/// Kinesis' largest configurable maximum record size, in KiB.
pub const MAX_RECORD_KIB_LIMIT: u32 = 10240;

mod fields;

pub use fields::{
    Access, FieldError, Region, RoleArn, Secret, SourceId, StreamArn, StreamName, WriteMode,
};

/// The valid settings of one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantSettings {
    pub source_id: SourceId,
    pub access: Access,
    /// The stream's region and name: from `region` and `stream`, or from `streamArn`.
    pub region: Region,
    pub stream: StreamName,
    /// The stream's ARN when the settings give one: then every call names the stream
    /// by it (`StreamARN`), as cross-account access by resource policy requires.
    pub stream_arn: Option<StreamArn>,
    /// The account that owns the stream: the ARN's, else the role's.
    pub account: Arc<str>,
    pub secret_id: Option<Secret>,
    /// The stream's shard count, when the tenant gives it: capacity is planned from it
    /// only until the stream's open shards are known (ListShards, DescribeStreamSummary).
    pub shards: Option<u32>,
    pub use_message_id: bool,
    /// `PutRecords` batches or one `PutRecord` per event (`usePutRecords`).
    pub write_mode: WriteMode,
    /// Largest record Kinesis accepts for this stream, in bytes (data plus partition
    /// key), when the tenant says (`maxRecordSizeKiB`): it overrides what
    /// DescribeStreamSummary answers.
    pub max_record_bytes: Option<usize>,
    /// Consecutive events of one user waiting in its lane are written as one Kinesis
    /// record in the KPL aggregated format (`aggregate`); the tenant's consumers must
    /// de-aggregate (KCL does; Lambda needs AWS's deaggregation module).
    pub aggregate: bool,
}

impl TenantSettings {
    /// The tenant's own role, unless its stream is shared by resource policy.
    pub fn role(&self) -> Option<&RoleArn> {
        match &self.access {
            Access::Role(role) => Some(role),
            Access::ResourcePolicy => None,
        }
    }

    /// Whether `other` writes to the same stream as the same identity (role, external
    /// ID or resource-policy grant): what a proof of access to the stream holds for.
    pub fn same_destination(&self, other: &TenantSettings) -> bool {
        self.source_id == other.source_id
            && self.access == other.access
            && self.external_id() == other.external_id()
            && self.account == other.account
            && self.region == other.region
            && self.stream == other.stream
            && self.stream_arn == other.stream_arn
    }

    /// How the stream is named in calls and messages: its ARN when given, else its name.
    pub fn stream_label(&self) -> &str {
        match &self.stream_arn {
            Some(arn) => arn.as_str(),
            None => self.stream.as_str(),
        }
    }

    /// The largest record the stream takes when nothing better is known: the tenant's
    /// `maxRecordSizeKiB`, else Kinesis' default of 1 MiB.
    pub fn default_max_record_bytes(&self) -> usize {
        self.max_record_bytes
            .unwrap_or(DEFAULT_MAX_RECORD_KIB as usize * 1024)
    }

    /// The external ID we present to STS: the secret when set, else the source ID (see
    /// "Setting up a tenant in AWS" in the README).
    pub fn external_id(&self) -> &str {
        match &self.secret_id {
            Some(s) => s.expose(),
            None => self.source_id.as_str(),
        }
    }

    /// [`external_id`](Self::external_id), shared: no copy per event.
    pub fn external_id_shared(&self) -> Arc<str> {
        match &self.secret_id {
            Some(s) => s.expose_shared(),
            None => self.source_id.shared(),
        }
    }
}

/// Why one tenant's settings were rejected. Names the setting; never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("tenant settings are not a JSON object")]
    NotAnObject,
    #[error("tenant settings have no sourceId")]
    MissingSourceId,
    #[error(
        "tenant {}: {field} {error}",
        kd_event::text::escape_clip(source_id, SOURCE_ID_MAX_CHARS)
    )]
    Field {
        source_id: String,
        field: &'static str,
        #[source]
        error: FieldError,
    },
    #[error(
        "tenant {}: {message}",
        kd_event::text::escape_clip(source_id, SOURCE_ID_MAX_CHARS)
    )]
    Invalid { source_id: String, message: String },
}

impl SettingsError {
    /// The source ID the error belongs to, when it could be read.
    pub fn source_id(&self) -> Option<&str> {
        match self {
            SettingsError::Invalid { source_id, .. } | SettingsError::Field { source_id, .. } => {
                Some(source_id)
            }
            _ => None,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSettings {
    role_address: Option<Value>,
    region: Option<Value>,
    stream: Option<Value>,
    #[serde(rename = "streamArn")]
    stream_arn: Option<Value>,
    secret_id: Option<Value>,
    shards: Option<Value>,
    use_message_id: Option<Value>,
    use_put_records: Option<Value>,
    aggregate: Option<Value>,
    #[serde(rename = "maxRecordSizeKiB")]
    max_record_size_kib: Option<Value>,
}

/// Valid settings for tests: source `src_1`, role `arn:aws:iam::123456789012:role/r`,
/// stream `s` in `us-east-1`, with the settings in `overrides` (a JSON object, the
/// names of the tenant settings; `null` removes one) set over them. Panics on settings
/// that do not parse.
#[doc(hidden)]
pub fn test_settings(overrides: Value) -> TenantSettings {
    let mut v = serde_json::json!({"sourceId": "src_1",
        "roleAddress": "arn:aws:iam::123456789012:role/r",
        "region": "us-east-1", "stream": "s"});
    if let (Some(base), Value::Object(over)) = (v.as_object_mut(), overrides) {
        for (k, val) in over {
            if val.is_null() {
                base.remove(&k);
            } else {
                base.insert(k, val);
            }
        }
    }
    parse_tenant(&v).unwrap_or_else(|e| panic!("test settings {v}: {e}"))
}

/// Longest `sourceId`, in characters.
pub const SOURCE_ID_MAX_CHARS: usize = 256;

/// Parses and validates one tenant object (see "Tenant settings" in the README).
pub fn parse_tenant(value: &Value) -> Result<TenantSettings, SettingsError> {
    let obj = value.as_object().ok_or(SettingsError::NotAnObject)?;
    let source_id = match obj.get("sourceId") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        _ => return Err(SettingsError::MissingSourceId),
    };
    let invalid = |message: String| SettingsError::Invalid {
        source_id: source_id.clone(),
        message,
    };
    // Source IDs reach logs, messages and headers: one bounded line each.
    if source_id.chars().count() > SOURCE_ID_MAX_CHARS || source_id.chars().any(char::is_control) {
        return Err(invalid(format!(
            "sourceId must be at most {SOURCE_ID_MAX_CHARS} characters, without control characters, line separators or bidirectional overrides"
        )));
    }
    // Field types are checked below, one by one, so the message can name the field.
    let raw: RawSettings = serde_json::from_value(value.clone())
        .map_err(|e| invalid(format!("unreadable settings: {e}")))?;

    let required = |name: &str, v: &Option<Value>| -> Result<String, SettingsError> {
        match v {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(invalid(format!("{name} must be a string"))),
            None => Err(invalid(format!("{name} is required"))),
        }
    };
    let field = |field: &'static str| {
        let source_id = source_id.clone();
        move |error| SettingsError::Field {
            source_id,
            field,
            error,
        }
    };
    let optional = |name: &str, v: &Option<Value>| -> Result<Option<String>, SettingsError> {
        match v {
            None | Some(Value::Null) => Ok(None),
            // A control plane may send an empty string for a setting it does not have.
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(_) => required(name, v).map(Some),
        }
    };
    let stream_arn = optional("streamArn", &raw.stream_arn)?
        .map(|a| StreamArn::parse(&a).map_err(field("streamArn")))
        .transpose()?;
    let access = match optional("roleAddress", &raw.role_address)? {
        Some(role) => Access::Role(RoleArn::parse(&role).map_err(field("roleAddress"))?),
        None if stream_arn.is_some() => {
            // The source ID becomes a session tag's value: IAM's characters and length.
            let taggable = source_id.chars().count() <= 256
                && source_id.chars().all(|c| {
                    c.is_alphanumeric()
                        || (c.is_whitespace() && !c.is_control())
                        || "_.:/=+-@".contains(c)
                });
            if !taggable {
                return Err(invalid(
                    "without roleAddress (resource-policy mode) the sourceId must be at most 256 letters, digits, spaces and _.:/=+-@ (it is a session tag's value)".into(),
                ));
            }
            Access::ResourcePolicy
        }
        None => return Err(invalid(
            "roleAddress is required (or a streamArn whose stream policy grants the worker access)"
                .into(),
        )),
    };
    let (region, stream, account) = match &stream_arn {
        Some(arn) => {
            // Both forms at once must name the same stream.
            for (name, given, from_arn) in [
                ("region", &raw.region, arn.region.as_str()),
                ("stream", &raw.stream, arn.stream.as_str()),
            ] {
                if let Some(given) = optional(name, given)? {
                    if given != from_arn {
                        return Err(invalid(format!(
                            "{name} {given:?} is not the one streamArn names ({from_arn:?}); give one or the other"
                        )));
                    }
                }
            }
            (arn.region.clone(), arn.stream.clone(), arn.account.clone())
        }
        None => {
            let region =
                Region::parse(&required("region", &raw.region)?).map_err(field("region"))?;
            let stream =
                StreamName::parse(&required("stream", &raw.stream)?).map_err(field("stream"))?;
            let account = match &access {
                Access::Role(role) => role.account_shared(),
                // Unreachable: resource-policy mode requires the ARN.
                Access::ResourcePolicy => Arc::from(""),
            };
            (region, stream, account)
        }
    };
    if let Access::Role(role) = &access {
        let role_partition = role.as_str().split(':').nth(1).unwrap_or_default();
        if role_partition != region.partition() {
            return Err(SettingsError::Field {
                source_id: source_id.clone(),
                field: "roleAddress",
                error: FieldError::WrongPartition(role_partition.to_owned(), region.partition()),
            });
        }
    }
    let secret_id = match &raw.secret_id {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) if s.len() <= 1224 => Some(Secret::new(s)),
        // The secret's value is never echoed, not even in part.
        Some(_) => {
            return Err(invalid(
                "secretId must be a string of at most 1224 characters".into(),
            ))
        }
    };
    let shards = match &raw.shards {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n @ 1..=100_000) => Some(n as u32),
            _ => {
                return Err(invalid(
                    "shards must be a whole number from 1 to 100000".into(),
                ))
            }
        },
    };
    let flag = |name: &str, v: &Option<Value>| match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(invalid(format!("{name} must be true or false"))),
    };
    let use_message_id = flag("useMessageId", &raw.use_message_id)?;
    let aggregate = flag("aggregate", &raw.aggregate)?;
    let write_mode = match &raw.use_put_records {
        None | Some(Value::Null) => WriteMode::Auto,
        Some(Value::Bool(true)) => WriteMode::PutRecords,
        Some(Value::Bool(false)) => WriteMode::PutRecord,
        Some(Value::String(s)) if s == "auto" => WriteMode::Auto,
        Some(_) => {
            return Err(invalid(
                "usePutRecords must be true, false or \"auto\"".into(),
            ))
        }
    };
    let max_kib = match &raw.max_record_size_kib {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_RECORD_KIB_LIMIT as u64).contains(&n) => Some(n as u32),
            _ => {
                return Err(invalid(format!(
                    "maxRecordSizeKiB must be a whole number from 1 to {MAX_RECORD_KIB_LIMIT}"
                )))
            }
        },
    };
    Ok(TenantSettings {
        source_id: SourceId(source_id.as_str().into()),
        access,
        region,
        stream,
        stream_arn,
        account,
        secret_id,
        shards,
        use_message_id,
        write_mode,
        max_record_bytes: max_kib.map(|k| k as usize * 1024),
        aggregate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn good() -> Value {
        json!({"sourceId": "src_1", "roleAddress": "arn:aws:iam::123456789012:role/segment-kinesis",
               "region": "us-west-2", "stream": "my-stream", "secretId": "hunter2", "shards": 4,
               "useMessageId": false, "maxRecordSizeKiB": 1024})
    }

    #[test]
    fn parses_the_spec_example() {
        let t = parse_tenant(&good()).unwrap();
        assert_eq!(t.source_id.as_str(), "src_1");
        assert_eq!(t.role().unwrap().account(), "123456789012");
        assert_eq!(&*t.account, "123456789012");
        assert_eq!(t.shards, Some(4));
        assert_eq!(t.max_record_bytes, Some(1024 * 1024));
        assert_eq!(t.stream_arn, None);
        assert_eq!(t.external_id(), "hunter2");
    }

    #[test]
    fn external_id_defaults_to_source_id() {
        let mut v = good();
        v.as_object_mut().unwrap().remove("secretId");
        assert_eq!(parse_tenant(&v).unwrap().external_id(), "src_1");
    }

    #[test]
    fn secret_never_shows_in_debug() {
        let t = parse_tenant(&good()).unwrap();
        let dbg = format!("{t:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("***"));
    }

    #[test]
    fn rejects_each_bad_setting_naming_it() {
        let cases = [
            ("roleAddress", json!("arn:aws:s3:::bucket"), "roleAddress"),
            (
                "roleAddress",
                json!("arn:aws:iam::12:role/x"),
                "roleAddress",
            ),
            ("region", json!("mars-north-1"), "region"),
            ("stream", json!(""), "stream"),
            ("stream", json!("has space"), "stream"),
            ("shards", json!(0), "shards"),
            ("useMessageId", json!("yes"), "useMessageId"),
            ("usePutRecords", json!(1), "usePutRecords"),
            ("aggregate", json!("yes"), "aggregate"),
            ("maxRecordSizeKiB", json!(20000), "maxRecordSizeKiB"),
            ("secretId", json!(42), "secretId"),
        ];
        for (key, val, named) in cases {
            let mut v = good();
            v[key] = val;
            let err = parse_tenant(&v).unwrap_err();
            assert_eq!(err.source_id(), Some("src_1"));
            let msg = err.to_string();
            assert!(msg.contains(named), "{key}: {msg}");
            assert!(!msg.contains("hunter2"), "{msg}");
        }
        let mut v = good();
        v.as_object_mut().unwrap().remove("stream");
        assert!(parse_tenant(&v)
            .unwrap_err()
            .to_string()
            .contains("stream is required"));
    }

    #[test]
    fn a_stream_arn_names_region_account_and_stream() {
        let arn = "arn:aws:kinesis:eu-west-1:222222222222:stream/orders.v2";
        let mut v = good();
        let o = v.as_object_mut().unwrap();
        o.remove("region");
        o.remove("stream");
        o.insert("streamArn".into(), json!(arn));
        let t = parse_tenant(&v).unwrap();
        assert_eq!(t.region.as_str(), "eu-west-1");
        assert_eq!(t.stream.as_str(), "orders.v2");
        assert_eq!(&*t.account, "222222222222");
        assert_eq!(t.stream_label(), arn);
        assert!(matches!(t.access, Access::Role(_)));
        // Both forms at once: they must agree.
        v["region"] = json!("eu-west-1");
        v["stream"] = json!("orders.v2");
        assert!(parse_tenant(&v).is_ok());
        v["stream"] = json!("other");
        let err = parse_tenant(&v).unwrap_err().to_string();
        assert!(
            err.contains("stream \"other\" is not the one streamArn names"),
            "{err}"
        );
        // Without a role: resource-policy mode.
        let t = parse_tenant(&json!({"sourceId": "src_2", "streamArn": arn, "roleAddress": ""}))
            .unwrap();
        assert_eq!(t.access, Access::ResourcePolicy);
        assert!(t.role().is_none());
        assert_eq!(t.shards, None);
        assert_eq!(t.max_record_bytes, None);
        assert_eq!(t.default_max_record_bytes(), 1024 * 1024);
        // Every partition, its region's partition only.
        for ok in [
            "arn:aws-cn:kinesis:cn-north-1:222222222222:stream/s",
            "arn:aws-us-gov:kinesis:us-gov-west-1:222222222222:stream/s",
            "arn:aws-iso-b:kinesis:us-isob-east-1:222222222222:stream/s",
            "arn:aws-eusc:kinesis:eusc-de-east-1:222222222222:stream/s",
        ] {
            assert!(StreamArn::parse(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            (
                "arn:aws:kinesis:cn-north-1:222222222222:stream/s",
                "partition",
            ),
            ("arn:aws:kinesis:us-east-1:2222:stream/s", "account"),
            (
                "arn:aws:kinesis:us-east-1:222222222222:table/s",
                "stream ARN",
            ),
            ("arn:aws:sqs:us-east-1:222222222222:stream/s", "stream ARN"),
            (
                "arn:aws:kinesis:us-east-1:222222222222:stream/a b",
                "stream name",
            ),
            ("arn:aws:kinesis:mars-1:222222222222:stream/s", "region"),
        ] {
            let err = parse_tenant(&json!({"sourceId": "s", "streamArn": bad}))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("streamArn") && err.contains(why),
                "{bad}: {err}"
            );
        }
        // A role of one partition for a stream of another.
        let err = parse_tenant(&json!({"sourceId": "s",
            "roleAddress": "arn:aws:iam::123456789012:role/r",
            "streamArn": "arn:aws-cn:kinesis:cn-north-1:222222222222:stream/s"}))
        .unwrap_err()
        .to_string();
        assert!(err.contains("roleAddress names partition \"aws\""), "{err}");
        // Neither a role nor an ARN; a source ID that cannot be a tag's value.
        let err = parse_tenant(&json!({"sourceId": "s", "region": "us-east-1", "stream": "x"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("roleAddress is required"), "{err}");
        let err = parse_tenant(&json!({"sourceId": "a#b", "streamArn": arn}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("session tag"), "{err}");
    }

    #[test]
    fn source_ids_that_would_forge_or_stretch_log_lines_are_invalid() {
        let arn = "arn:aws:kinesis:us-east-1:123456789012:stream/s";
        let forged = "src_1\n2026-12-07T00:00:00Z  INFO forged line";
        let err = parse_tenant(&json!({"sourceId": forged, "streamArn": arn,
            "roleAddress": "arn:aws:iam::123456789012:role/r"}))
        .unwrap_err();
        assert_eq!(err.source_id(), Some(forged), "still keyed by the raw ID");
        let text = err.to_string();
        assert!(
            !text.contains('\n') && text.contains("src_1\\u{a}2026"),
            "{text}"
        );
        assert!(text.contains("without control characters"), "{text}");
        let long = "x".repeat(10_000);
        let text = parse_tenant(&json!({"sourceId": long, "streamArn": arn,
            "roleAddress": "arn:aws:iam::123456789012:role/r"}))
        .unwrap_err()
        .to_string();
        assert!(text.len() < 500, "{text}");
        let longest = "x".repeat(SOURCE_ID_MAX_CHARS);
        assert!(parse_tenant(&json!({"sourceId": longest, "streamArn": arn,
            "roleAddress": "arn:aws:iam::123456789012:role/r"}))
        .is_ok());
    }

    #[test]
    fn entries_without_source_id_cannot_be_keyed() {
        assert_eq!(
            parse_tenant(&json!({"region": "us-east-1"})),
            Err(SettingsError::MissingSourceId)
        );
        assert_eq!(parse_tenant(&json!([1])), Err(SettingsError::NotAnObject));
    }
}
