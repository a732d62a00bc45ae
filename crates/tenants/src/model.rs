//! The settings of one tenant, with the names the destination's settings have always
//! had (`sourceId`, `roleAddress`, `secretId`, ...), validated at the edge.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

/// Kinesis' default maximum record size, in KiB (data plus partition key).
pub const DEFAULT_MAX_RECORD_KIB: u32 = 1024;
/// Kinesis' largest configurable maximum record size, in KiB.
pub const MAX_RECORD_KIB_LIMIT: u32 = 10240;

/// A source (tenant) ID: the external ID the tenant's trust policy expects, unless a
/// secret is set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceId(Arc<str>);

impl SourceId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The ID as a shared string (a reference count, no copy).
    pub fn shared(&self) -> Arc<str> {
        self.0.clone()
    }
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a tenant's records are written (`usePutRecords`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WriteMode {
    /// `PutRecords` batches, falling back to `PutRecord` for a role and stream whose
    /// policy refuses `kinesis:PutRecords` (tried again an hour later). The default.
    Auto,
    /// `PutRecords` batches only (`true`).
    PutRecords,
    /// One `PutRecord` per event (`false`): for roles that allow nothing else.
    PutRecord,
}

/// Why one setting's value is not valid (the message follows the setting's name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)")]
    NotRoleArn,
    #[error("has no 12-digit account ID")]
    NoAccountId,
    #[error("has no valid role name after role/")]
    NoRoleName,
    /// The value, clipped to 64 characters.
    #[error("{0:?} is not a known AWS region")]
    UnknownRegion(String),
    #[error("is empty")]
    Empty,
    /// The value, clipped to 64 characters.
    #[error("{0:?} is not a Kinesis stream name (1-128 of a-z A-Z 0-9 _ . -)")]
    NotStreamName(String),
}

/// An IAM role ARN, `arn:PARTITION:iam::ACCOUNT:role/NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoleArn {
    arn: Arc<str>,
    account: Arc<str>,
}

impl RoleArn {
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        let parts: Vec<&str> = s.splitn(6, ':').collect();
        let ok_shape = parts.len() == 6
            && parts[0] == "arn"
            && matches!(parts[1], "aws" | "aws-cn" | "aws-us-gov")
            && parts[2] == "iam"
            && parts[3].is_empty();
        if !ok_shape {
            return Err(FieldError::NotRoleArn);
        }
        let account = parts[4];
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(FieldError::NoAccountId);
        }
        let name = parts[5].strip_prefix("role/").unwrap_or("");
        let name_ok = !name.is_empty()
            && name.len() <= 512
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-/".contains(&b));
        if !name_ok {
            return Err(FieldError::NoRoleName);
        }
        Ok(RoleArn {
            arn: s.into(),
            account: account.into(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.arn
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    /// The account, shared (a key that holds it without a copy per lookup).
    pub fn account_shared(&self) -> Arc<str> {
        self.account.clone()
    }
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.arn)
    }
}

/// An AWS region the worker knows how to reach.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Region(Arc<str>);

/// Regions where Kinesis Data Streams and STS are offered (commercial, China, GovCloud).
const KNOWN_REGIONS: &[&str] = &[
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
    "af-south-1",
    "ap-east-1",
    "ap-east-2",
    "ap-south-1",
    "ap-south-2",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-northeast-3",
    "ap-southeast-1",
    "ap-southeast-2",
    "ap-southeast-3",
    "ap-southeast-4",
    "ap-southeast-5",
    "ap-southeast-7",
    "ca-central-1",
    "ca-west-1",
    "eu-central-1",
    "eu-central-2",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "eu-south-1",
    "eu-south-2",
    "eu-north-1",
    "il-central-1",
    "me-south-1",
    "me-central-1",
    "mx-central-1",
    "sa-east-1",
    "cn-north-1",
    "cn-northwest-1",
    "us-gov-east-1",
    "us-gov-west-1",
];

impl Region {
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        if KNOWN_REGIONS.contains(&s) {
            Ok(Region(s.into()))
        } else {
            Err(FieldError::UnknownRegion(
                kd_event::text::clip(s, 64).to_owned(),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Kinesis stream name: 1 to 128 of `[a-zA-Z0-9_.-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamName(Arc<str>);

impl StreamName {
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        if s.is_empty() {
            return Err(FieldError::Empty);
        }
        if s.len() > 128
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return Err(FieldError::NotStreamName(
                kd_event::text::clip(s, 64).to_owned(),
            ));
        }
        Ok(StreamName(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A value that must never be printed: `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(s: &str) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for the one place that needs it (the AssumeRole call).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The same, shared (a cache key that holds it without copying it per lookup).
    pub fn expose_shared(&self) -> Arc<str> {
        self.0.clone()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The valid settings of one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantSettings {
    pub source_id: SourceId,
    pub role: RoleArn,
    pub region: Region,
    pub stream: StreamName,
    pub secret_id: Option<Secret>,
    /// The stream's shard count (capacity hint); 1 when not given.
    pub shards: u32,
    pub use_message_id: bool,
    /// `PutRecords` batches or one `PutRecord` per event (`usePutRecords`).
    pub write_mode: WriteMode,
    /// Largest record Kinesis accepts for this stream, in bytes (data plus partition key).
    pub max_record_bytes: usize,
    /// Consecutive events of one user waiting in its lane are written as one Kinesis
    /// record in the KPL aggregated format (`aggregate`); the tenant's consumers must
    /// de-aggregate (KCL does; Lambda needs AWS's deaggregation module).
    pub aggregate: bool,
}

impl TenantSettings {
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
    #[error("tenant {source_id}: {field} {error}")]
    Field {
        source_id: String,
        field: &'static str,
        #[source]
        error: FieldError,
    },
    #[error("tenant {source_id}: {message}")]
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
    secret_id: Option<Value>,
    shards: Option<Value>,
    use_message_id: Option<Value>,
    use_put_records: Option<Value>,
    aggregate: Option<Value>,
    #[serde(rename = "maxRecordSizeKiB")]
    max_record_size_kib: Option<Value>,
}

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
    let role = RoleArn::parse(&required("roleAddress", &raw.role_address)?)
        .map_err(field("roleAddress"))?;
    let region = Region::parse(&required("region", &raw.region)?).map_err(field("region"))?;
    let stream = StreamName::parse(&required("stream", &raw.stream)?).map_err(field("stream"))?;
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
        None | Some(Value::Null) => 1,
        Some(v) => match v.as_u64() {
            Some(n @ 1..=100_000) => n as u32,
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
        None | Some(Value::Null) => DEFAULT_MAX_RECORD_KIB,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_RECORD_KIB_LIMIT as u64).contains(&n) => n as u32,
            _ => {
                return Err(invalid(format!(
                    "maxRecordSizeKiB must be a whole number from 1 to {MAX_RECORD_KIB_LIMIT}"
                )))
            }
        },
    };
    Ok(TenantSettings {
        source_id: SourceId(source_id.as_str().into()),
        role,
        region,
        stream,
        secret_id,
        shards,
        use_message_id,
        write_mode,
        max_record_bytes: max_kib as usize * 1024,
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
        assert_eq!(t.role.account(), "123456789012");
        assert_eq!(t.shards, 4);
        assert_eq!(t.max_record_bytes, 1024 * 1024);
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
    fn entries_without_source_id_cannot_be_keyed() {
        assert_eq!(
            parse_tenant(&json!({"region": "us-east-1"})),
            Err(SettingsError::MissingSourceId)
        );
        assert_eq!(parse_tenant(&json!([1])), Err(SettingsError::NotAnObject));
    }
}
