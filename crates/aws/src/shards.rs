//! A stream's shards for `tail`: listing them through the SDK, and a reader that takes a
//! stream's records shard by shard. (The worker lists shards for its rate limits with
//! [`KinesisApi::open_shards`](crate::api::KinesisApi::open_shards).)

use aws_sdk_kinesis::types::{Record, Shard, ShardIteratorType};

use crate::api::StreamId;
use crate::AwsError;

/// Every shard of `stream`, open and closed, following ListShards' pages (at most
/// [`MAX_LIST_SHARDS_PAGES`](crate::api::MAX_LIST_SHARDS_PAGES)).
pub async fn list_shards(
    client: &aws_sdk_kinesis::Client,
    stream: StreamId<'_>,
) -> Result<Vec<Shard>, AwsError> {
    let mut shards = Vec::new();
    let mut next: Option<String> = None;
    let label = stream.label();
    for _ in 0..crate::api::MAX_LIST_SHARDS_PAGES {
        // A page after the first names only its token, not the stream.
        let req = match &next {
            Some(token) => client.list_shards().next_token(token),
            None => match stream {
                StreamId::Name(name) => client.list_shards().stream_name(name),
                StreamId::Arn(arn) => client.list_shards().stream_arn(arn.as_str()),
            },
        };
        let out = req
            .send()
            .await
            .map_err(|e| AwsError::from_sdk(&format!("ListShards {label}"), &e))?;
        shards.extend(out.shards().iter().cloned());
        next = out.next_token().map(str::to_owned);
        if next.is_none() {
            return Ok(shards);
        }
    }
    Err(AwsError {
        request_id: None,
        class: crate::ErrorClass::Retryable,
        code: "ResponseError".into(),
        message: format!("ListShards {label}: more pages than a stream has"),
    })
}

/// Where a [`StreamReader`] starts in every shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest record kept.
    Oldest,
    /// Records written from now on.
    Latest,
}

/// Reads a stream's records, one shard after the other, each to its current end.
pub struct StreamReader {
    client: aws_sdk_kinesis::Client,
    /// (shard ID, its next iterator; `None` once the shard is closed and read).
    shards: Vec<(String, Option<String>)>,
}

impl StreamReader {
    /// Opens an iterator on every shard of `stream`.
    pub async fn open(
        client: aws_sdk_kinesis::Client,
        stream: StreamId<'_>,
        start: StartAt,
    ) -> Result<StreamReader, AwsError> {
        let kind = match start {
            StartAt::Oldest => ShardIteratorType::TrimHorizon,
            StartAt::Latest => ShardIteratorType::Latest,
        };
        let mut shards = Vec::new();
        for shard in list_shards(&client, stream).await? {
            let request = match stream {
                StreamId::Name(name) => client.get_shard_iterator().stream_name(name),
                StreamId::Arn(arn) => client.get_shard_iterator().stream_arn(arn.as_str()),
            };
            let out = request
                .shard_id(shard.shard_id())
                .shard_iterator_type(kind.clone())
                .send()
                .await
                .map_err(|e| AwsError::from_sdk("GetShardIterator", &e))?;
            shards.push((
                shard.shard_id().to_owned(),
                out.shard_iterator().map(str::to_owned),
            ));
        }
        Ok(StreamReader { client, shards })
    }

    /// Reads every shard to its current end, in shard order, handing each record to
    /// `each` with its shard ID; stops early when `each` returns false. Returns whether
    /// any shard is still open (has more to read later).
    pub async fn read_to_end(
        &mut self,
        mut each: impl FnMut(&str, &Record) -> bool,
    ) -> Result<bool, AwsError> {
        let mut any_open = false;
        for (shard, iterator) in self.shards.iter_mut() {
            while let Some(it) = iterator.take() {
                any_open = true;
                let out = self
                    .client
                    .get_records()
                    .shard_iterator(&it)
                    .limit(10_000)
                    .send()
                    .await
                    .map_err(|e| AwsError::from_sdk("GetRecords", &e))?;
                for r in out.records() {
                    if !each(shard, r) {
                        return Ok(true);
                    }
                }
                let at_end = out.records().is_empty() || out.millis_behind_latest() == Some(0);
                *iterator = out.next_shard_iterator().map(str::to_owned);
                if at_end {
                    break;
                }
            }
        }
        Ok(any_open)
    }
}
