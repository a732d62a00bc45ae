//! The settings' field types, each valid by construction: source IDs, role and stream
//! ARNs, regions, stream names, secrets.

use std::fmt;
use std::sync::Arc;

/// A source (tenant) ID: the external ID the tenant's trust policy expects, unless a
/// secret is set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceId(pub(super) Arc<str>);

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
    #[error("is not a Kinesis stream ARN (arn:aws:kinesis:REGION:ACCOUNT:stream/NAME)")]
    NotStreamArn,
    /// The ARN's partition and the partition of its region.
    #[error("names partition {0:?}, but its region is in {1:?}")]
    WrongPartition(String, &'static str),
}

/// AWS's partitions (the SDK's partition data names the same).
const PARTITIONS: &[&str] = &[
    "aws",
    "aws-cn",
    "aws-us-gov",
    "aws-iso",
    "aws-iso-b",
    "aws-iso-e",
    "aws-iso-f",
    "aws-eusc",
];

/// A 12-digit AWS account ID.
fn is_account_id(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
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
            && PARTITIONS.contains(&parts[1])
            && parts[2] == "iam"
            && parts[3].is_empty();
        if !ok_shape {
            return Err(FieldError::NotRoleArn);
        }
        let account = parts[4];
        if !is_account_id(account) {
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
pub struct Region(pub(super) Arc<str>);

/// Regions where Kinesis Data Streams and STS are offered, in every partition: a typo
/// is refused when settings load rather than retried against a host that does not
/// exist. Hosts are not made from this list: the SDK's endpoint rules make them.
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
    "ap-southeast-6",
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
    "us-iso-east-1",
    "us-iso-west-1",
    "us-isob-east-1",
    "us-isob-west-1",
    "eu-isoe-west-1",
    "us-isof-east-1",
    "us-isof-south-1",
    "eusc-de-east-1",
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

    /// The partition the region is in (`aws`, `aws-cn`, `aws-us-gov`, `aws-iso`, ...).
    pub fn partition(&self) -> &'static str {
        let r = &*self.0;
        [
            ("cn-", "aws-cn"),
            ("us-gov-", "aws-us-gov"),
            ("us-iso-", "aws-iso"),
            ("us-isob-", "aws-iso-b"),
            ("eu-isoe-", "aws-iso-e"),
            ("us-isof-", "aws-iso-f"),
            ("eusc-", "aws-eusc"),
        ]
        .iter()
        .find(|(prefix, _)| r.starts_with(prefix))
        .map_or("aws", |(_, partition)| partition)
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Kinesis stream name: 1 to 128 of `[a-zA-Z0-9_.-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamName(pub(super) Arc<str>);

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

/// A Kinesis stream ARN, `arn:PARTITION:kinesis:REGION:ACCOUNT:stream/NAME`: the stream,
/// its region and the account that owns it in one value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamArn {
    arn: Arc<str>,
    pub(super) region: Region,
    pub(super) account: Arc<str>,
    pub(super) stream: StreamName,
}

impl StreamArn {
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        let parts: Vec<&str> = s.splitn(6, ':').collect();
        let [arn, partition, service, region, account, resource] = parts[..] else {
            return Err(FieldError::NotStreamArn);
        };
        if arn != "arn" || service != "kinesis" || !PARTITIONS.contains(&partition) {
            return Err(FieldError::NotStreamArn);
        }
        if !is_account_id(account) {
            return Err(FieldError::NoAccountId);
        }
        let region = Region::parse(region)?;
        if region.partition() != partition {
            return Err(FieldError::WrongPartition(
                partition.to_owned(),
                region.partition(),
            ));
        }
        let name = resource
            .strip_prefix("stream/")
            .ok_or(FieldError::NotStreamArn)?;
        let stream = StreamName::parse(name)?;
        Ok(StreamArn {
            arn: s.into(),
            region,
            account: account.into(),
            stream,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.arn
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    /// The account, shared.
    pub fn account_shared(&self) -> Arc<str> {
        self.account.clone()
    }
}

impl fmt::Display for StreamArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.arn)
    }
}

/// How the worker is allowed to write into a tenant's stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Access {
    /// The tenant's own role (`roleAddress`), assumed with the external ID.
    Role(RoleArn),
    /// No role (`streamArn` without `roleAddress`): the stream's resource-based policy
    /// grants the worker's own writer role (`aws.resource_policy_role`), on condition
    /// that the session carries the tenant's source ID as a tag (see "Setting up a
    /// tenant in AWS" in the README).
    ResourcePolicy,
}

/// A value that must never be printed: `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(pub(super) Arc<str>);

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
