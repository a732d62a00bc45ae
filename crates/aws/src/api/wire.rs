//! What goes on the wire: the operations, how a stream is named, the request bodies
//! (JSON written directly) and the answers' types.

use base64::Engine;
use serde::Deserialize;

use crate::errors::{AwsError, Failure};

/// Where a record landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub shard_id: String,
    pub sequence_number: String,
}

/// The calls made here: their names (in errors) and `X-Amz-Target` values.
#[derive(Debug, Clone, Copy)]
pub(super) enum Operation {
    PutRecord,
    PutRecords,
    ListShards,
    DescribeStreamSummary,
}

impl Operation {
    pub(super) fn name(self) -> &'static str {
        match self {
            Operation::PutRecord => "PutRecord",
            Operation::PutRecords => "PutRecords",
            Operation::ListShards => "ListShards",
            Operation::DescribeStreamSummary => "DescribeStreamSummary",
        }
    }

    pub(super) fn target(self) -> &'static str {
        match self {
            Operation::PutRecord => "Kinesis_20131202.PutRecord",
            Operation::PutRecords => "Kinesis_20131202.PutRecords",
            Operation::ListShards => "Kinesis_20131202.ListShards",
            Operation::DescribeStreamSummary => "Kinesis_20131202.DescribeStreamSummary",
        }
    }

    /// Writes go to the data plane, the rest to the control plane: with a stream ARN
    /// the SDK's endpoint rules give them different hosts.
    pub(super) fn is_data(self) -> bool {
        matches!(self, Operation::PutRecord | Operation::PutRecords)
    }
}

/// How a call names its stream: by name, or by ARN (`StreamARN`, which AWS recommends
/// and cross-account access by resource policy requires).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamId<'a> {
    Name(&'a str),
    Arn(&'a kd_tenants::StreamArn),
}

impl<'a> StreamId<'a> {
    /// How `tenant`'s settings name their stream.
    pub fn of(tenant: &'a kd_tenants::TenantSettings) -> Self {
        match &tenant.stream_arn {
            Some(arn) => StreamId::Arn(arn),
            None => StreamId::Name(tenant.stream.as_str()),
        }
    }

    /// Appends `"StreamName":"…"` or `"StreamARN":"…"`.
    pub(super) fn push_field(self, body: &mut Vec<u8>) {
        let (field, value): (&[u8], &str) = match self {
            StreamId::Name(name) => (b"\"StreamName\":", name),
            StreamId::Arn(arn) => (b"\"StreamARN\":", arn.as_str()),
        };
        body.extend_from_slice(field);
        push_json_str(body, value);
    }

    pub(super) fn len(self) -> usize {
        self.label().len()
    }

    /// How the stream is named in messages: its ARN when given, else its name.
    pub fn label(self) -> &'a str {
        match self {
            StreamId::Name(name) => name,
            StreamId::Arn(arn) => arn.as_str(),
        }
    }
}

/// The shape of a stream, as `DescribeStreamSummary` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSummary {
    /// `ON_DEMAND` (AWS adds and merges shards itself) rather than `PROVISIONED`.
    pub on_demand: bool,
    pub open_shards: u32,
    /// `MaxRecordSizeInKiB` in bytes: 1 MiB unless the stream's owner raised it (up to
    /// 10 MiB); absent from older answers, which means 1 MiB.
    pub max_record_bytes: usize,
}

/// One shard open for writes: its number (`shardId-000000000004` is 4) and hash-key range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OpenShard {
    pub start: u128,
    pub end: u128,
    pub number: u64,
}

/// The number at the end of a shard ID (`shardId-000000000004`).
pub fn shard_number(id: &str) -> Option<u64> {
    id.rsplit('-').next()?.parse().ok()
}

/// One record of a `PutRecords` call.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub key: &'a str,
    pub data: &'a [u8],
}

/// A record's result in a `PutRecords` answer: written, or refused with its own code.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RecordResult {
    // A written record's sequence number is not read (nothing uses it), and its shard ID
    // only as a number: no string per record.
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    /// The shard the record went to, by number: tells a shard map that missed a
    /// reshard.
    #[serde(default, rename = "ShardId", deserialize_with = "shard_number_of")]
    pub shard: Option<u64>,
}

/// Reads a shard ID as its number, without keeping the string.
pub(super) fn shard_number_of<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<u64>, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a shard ID")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(shard_number(v))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct PutRecordOutput {
    pub(super) shard_id: String,
    pub(super) sequence_number: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct PutRecordsOutput {
    #[serde(default)]
    pub(super) records: Vec<RecordResult>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct ListShardsOutput {
    #[serde(default)]
    pub(super) shards: Vec<ShardOutput>,
    pub(super) next_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct DescribeStreamSummaryOutput {
    pub(super) stream_description_summary: SummaryOutput,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct SummaryOutput {
    pub(super) open_shard_count: u32,
    pub(super) stream_mode_details: Option<StreamModeDetails>,
    #[serde(rename = "MaxRecordSizeInKiB")]
    pub(super) max_record_size_in_kib: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct StreamModeDetails {
    pub(super) stream_mode: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct ShardOutput {
    pub(super) shard_id: String,
    pub(super) hash_key_range: HashKeyRange,
    pub(super) sequence_number_range: Option<SequenceNumberRange>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct HashKeyRange {
    pub(super) starting_hash_key: String,
    pub(super) ending_hash_key: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct SequenceNumberRange {
    pub(super) ending_sequence_number: Option<String>,
}

impl ShardOutput {
    /// A shard still open for writes (`None` for a closed one).
    pub(super) fn open(&self) -> Option<OpenShard> {
        let open = self
            .sequence_number_range
            .as_ref()
            .is_none_or(|r| r.ending_sequence_number.is_none());
        let shard = OpenShard {
            start: self.hash_key_range.starting_hash_key.parse().ok()?,
            end: self.hash_key_range.ending_hash_key.parse().ok()?,
            number: shard_number(&self.shard_id)?,
        };
        open.then_some(shard)
    }
}

/// A success answer's body, or a `ResponseError` (retried, as an unreadable answer is).
pub(super) fn parse_answer<T: serde::de::DeserializeOwned>(
    answer: &[u8],
    operation: Operation,
    context: &(dyn Fn() -> String + Sync),
) -> Result<T, AwsError> {
    serde_json::from_slice(answer).map_err(|e| {
        AwsError::new(
            context,
            Failure::Malformed,
            "ResponseError",
            &format!("unreadable {} answer: {e}", operation.name()),
        )
    })
}

/// The JSON body of a `PutRecord` call.
pub(super) fn put_record_body(stream: StreamId<'_>, entry: Entry<'_>) -> Vec<u8> {
    let mut body =
        Vec::with_capacity(64 + stream.len() + entry.key.len() + entry.data.len().div_ceil(3) * 4);
    body.push(b'{');
    stream.push_field(&mut body);
    body.push(b',');
    push_entry_fields(&mut body, entry);
    body.push(b'}');
    body
}

/// The JSON body of a `PutRecords` call.
pub(super) fn put_records_body(stream: StreamId<'_>, entries: &[Entry<'_>]) -> Vec<u8> {
    let size: usize = entries
        .iter()
        .map(|e| 40 + e.key.len() + e.data.len().div_ceil(3) * 4)
        .sum();
    let mut body = Vec::with_capacity(64 + stream.len() + size);
    body.push(b'{');
    stream.push_field(&mut body);
    body.extend_from_slice(b",\"Records\":[");
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.push(b'{');
        push_entry_fields(&mut body, *entry);
        body.push(b'}');
    }
    body.extend_from_slice(b"]}");
    body
}

/// Appends `"PartitionKey":…,"Data":…` for one record (the data base64-encoded).
pub(super) fn push_entry_fields(body: &mut Vec<u8>, entry: Entry<'_>) {
    body.extend_from_slice(b"\"PartitionKey\":");
    push_json_str(body, entry.key);
    body.extend_from_slice(b",\"Data\":\"");
    let start = body.len();
    body.resize(start + entry.data.len().div_ceil(3) * 4, 0);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(entry.data, &mut body[start..])
        .unwrap_or(0);
    body.truncate(start + written);
    body.push(b'"');
}

/// Appends `s` as a JSON string.
pub(super) fn push_json_str(body: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *body, s);
}

/// The error code and message of a failed call: the code from `x-amzn-ErrorType` or the
/// body's `__type` (either may carry a namespace before `#` or a URL after `:`).
pub(super) fn error_of(headers: &http::HeaderMap, body: &[u8]) -> (Option<String>, Option<String>) {
    #[derive(Deserialize, Default)]
    struct ErrorBody {
        #[serde(rename = "__type")]
        kind: Option<String>,
        #[serde(alias = "Message", alias = "errorMessage")]
        message: Option<String>,
    }
    let parsed: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let code = headers
        .get("x-amzn-errortype")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(parsed.kind)
        .map(|raw| {
            let raw = raw.split(':').next().unwrap_or_default();
            raw.rsplit('#').next().unwrap_or_default().trim().to_owned()
        })
        .filter(|c| !c.is_empty());
    (code, parsed.message)
}
