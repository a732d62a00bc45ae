//! The fake's Kinesis: streams and shards, partition keys to shards by MD5, the
//! per-shard capacity, faults, and the JSON 1.1 answers.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{json, Value};

use super::{FakeRecord, Fault, Inner, Shard, Stream};

/// `n` shards splitting the 128-bit hash-key space evenly, as CreateStream does.
pub(super) fn even_shards(n: u32) -> Vec<Shard> {
    let n = n.max(1) as u128;
    let step = u128::MAX / n;
    (0..n)
        .map(|i| Shard {
            id: format!("shardId-{i:012}"),
            start: i * step,
            end: if i == n - 1 {
                u128::MAX
            } else {
                (i + 1) * step - 1
            },
            window: VecDeque::new(),
            closed: false,
        })
        .collect()
}

fn stream_not_found(name: &str) -> Response {
    json_error(
        400,
        "ResourceNotFoundException",
        &format!("Stream {name} under account not found."),
    )
}

fn stream_name(req: &Value) -> String {
    if let Some(arn) = req["StreamARN"].as_str() {
        return arn
            .rsplit_once(":stream/")
            .map_or("", |(_, n)| n)
            .to_owned();
    }
    req["StreamName"].as_str().unwrap_or_default().to_owned()
}

/// The stream a call names and whether the caller may make it: by ARN, the ARN must be
/// the stream's (its account and region); a caller of another account than the
/// stream's is let in only by the stream's resource policy, as AWS evaluates
/// cross-account access (both the caller's identity policy and the resource policy
/// must allow; the fake's identities allow everything).
fn authorize(
    inner: &Inner,
    req: &Value,
    access_key: &str,
    operation: &str,
) -> Result<String, Box<Response>> {
    let name = stream_name(req);
    if req.get("StreamARN").is_some() && req.get("StreamName").is_some() {
        return Err(Box::new(json_error(
            400,
            "InvalidArgumentException",
            "StreamARN and StreamName cannot be provided together.",
        )));
    }
    let Some(stream) = inner.streams.get(&name) else {
        return Err(Box::new(stream_not_found(&name)));
    };
    // A role whose own policy lacks the action (`deny_role_operation`).
    let caller_role = inner.issued.get(access_key).map(|c| &c.role);
    if caller_role.is_some_and(|role| {
        inner
            .denied_operations
            .iter()
            .any(|(r, op)| r == role && op == operation)
    }) {
        return Err(Box::new(json_error(
            400,
            "AccessDeniedException",
            &format!(
                "User is not authorized to perform: kinesis:{operation} on resource stream/{name}"
            ),
        )));
    }
    let Some((account, region)) = &stream.owner else {
        return Ok(name);
    };
    let arn = format!("arn:aws:kinesis:{region}:{account}:stream/{name}");
    if let Some(given) = req["StreamARN"].as_str() {
        if given != arn {
            return Err(Box::new(stream_not_found(given)));
        }
    }
    let Some(caller) = inner.issued.get(access_key) else {
        return Ok(name);
    };
    let caller_account = caller.role.split(':').nth(4).unwrap_or_default();
    if caller_account == account {
        return Ok(name);
    }
    let action = format!("kinesis:{operation}");
    let allowed = stream
        .policy
        .as_ref()
        .is_some_and(|p| super::policy::allows(p, &caller.role, &caller.tags, &action, &arn));
    if allowed {
        Ok(name)
    } else {
        Err(Box::new(json_error(
            400,
            "AccessDeniedException",
            &format!(
                "User: {}/session is not authorized to perform: {action} on resource: {arn} because no resource-based policy allows the {action} action",
                caller.role.replace(":iam::", ":sts::").replace(":role/", ":assumed-role/")
            ),
        )))
    }
}

fn hash_key(partition_key: &str) -> u128 {
    u128::from_be_bytes(md5::compute(partition_key.as_bytes()).0)
}

/// What a fault does to one write.
enum Effect {
    None,
    Fail(Response),
    Delay(Duration),
    Partial(u32),
}

fn fault_effect(stream: &mut Stream) -> Effect {
    let now = Instant::now();
    stream
        .faults
        .retain(|f| f.remaining.is_none_or(|n| n > 0) && f.until.is_none_or(|u| now < u));
    let Some(f) = stream.faults.first_mut() else {
        return Effect::None;
    };
    f.seen += 1;
    if let Some(n) = f.remaining.as_mut() {
        *n -= 1;
    }
    match &f.fault {
        // Deterministic share: the first `percent` of every hundred writes.
        Fault::Throttle { percent } => {
            if (f.seen - 1) % 100 < *percent as u64 {
                Effect::Fail(throttled())
            } else {
                Effect::None
            }
        }
        Fault::Error { status, code } => {
            Effect::Fail(json_error(*status, code, "injected failure"))
        }
        Fault::Latency(d) => Effect::Delay(*d),
        Fault::PartialFailure { percent } => Effect::Partial(*percent),
    }
}

fn throttled() -> Response {
    json_error(
        400,
        "ProvisionedThroughputExceededException",
        "Rate exceeded for shard in stream under account.",
    )
}

/// Takes a record into a shard, or says why not.
fn accept(stream: &mut Stream, partition_key: &str, bytes: usize) -> Result<String, &'static str> {
    let h = hash_key(partition_key);
    let capacity = stream.capacity;
    let shard = stream
        .shards
        .iter_mut()
        .find(|s| !s.closed && s.start <= h && h <= s.end)
        .ok_or("no shard")?;
    if let Some((max_records, max_bytes)) = capacity {
        let now = Instant::now();
        while shard
            .window
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= Duration::from_secs(1))
        {
            shard.window.pop_front();
        }
        let used: usize = shard.window.iter().map(|(_, b)| b).sum();
        if shard.window.len() >= max_records || used + bytes > max_bytes {
            return Err("throttled");
        }
        shard.window.push_back((now, bytes));
    }
    Ok(shard.id.clone())
}

/// The records of a PutRecord (the request itself) or PutRecords call.
fn entries<'a>(operation: &str, req: &'a Value) -> Vec<&'a Value> {
    if operation == "PutRecord" {
        vec![req]
    } else {
        req["Records"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    }
}

pub(super) async fn put(
    inner: &Mutex<Inner>,
    operation: &str,
    req: &Value,
    access_key: &str,
) -> Response {
    let effect = {
        let mut guard = inner.lock().unwrap();
        let name = match authorize(&guard, req, access_key, operation) {
            Ok(name) => name,
            Err(refused) => return *refused,
        };
        let role_denied = guard
            .issued
            .get(access_key)
            .is_some_and(|c| guard.denied_roles.contains(&c.role));
        let Some(stream) = guard.streams.get_mut(&name) else {
            return stream_not_found(&name);
        };
        if stream.denied || role_denied {
            return json_error(
                400,
                "AccessDeniedException",
                &format!("User is not authorized to perform: kinesis:{operation} on resource stream/{name}"),
            );
        }
        // Kinesis' limits: each record up to the stream's maximum (1 MiB unless
        // raised, up to 10 MiB), a PutRecords request up to 10 MiB and 500 records.
        let max = stream.max_record_kib.unwrap_or(1024) as usize * 1024;
        let sizes: Vec<usize> = entries(operation, req)
            .iter()
            .map(|e| {
                // The decoded size from the base64 text's length, without decoding it here
                // under the lock (the fake must keep up with thousands of writes a second).
                let data = e["Data"].as_str().unwrap_or_default();
                let padding = data.bytes().rev().take_while(|b| *b == b'=').count();
                (data.len() / 4 * 3).saturating_sub(padding)
                    + e["PartitionKey"].as_str().unwrap_or_default().len()
            })
            .collect();
        if let Some(size) = sizes.iter().find(|n| **n > max) {
            return json_error(
                400,
                "ValidationException",
                &format!("1 validation error detected: Value at 'data' failed to satisfy constraint: Member must have length less than or equal to {max} (record of {size} bytes)"),
            );
        }
        if sizes.len() > 500 || sizes.iter().sum::<usize>() > 10 * 1024 * 1024 {
            return json_error(
                400,
                "InvalidArgumentException",
                "Records size exceeds 10 MB limit or more than 500 records",
            );
        }
        (name, fault_effect(stream))
    };
    let (name, effect) = effect;
    let partial = match effect {
        Effect::Fail(r) => return r,
        Effect::Delay(d) => {
            tokio::time::sleep(d).await;
            0
        }
        Effect::Partial(p) => p,
        Effect::None => 0,
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut guard = inner.lock().unwrap();
    let inner = &mut *guard;
    let Some(stream) = inner.streams.get_mut(&name) else {
        return stream_not_found(&name);
    };
    let entries = entries(operation, req);
    let mut results = Vec::new();
    let mut failed = 0;
    for (i, e) in entries.iter().enumerate() {
        let key = e["PartitionKey"].as_str().unwrap_or_default().to_owned();
        let Ok(data) = b64.decode(e["Data"].as_str().unwrap_or_default()) else {
            return json_error(400, "ValidationException", "Data is not base64");
        };
        let outcome = if (i as u32 % 100) < partial {
            Err("throttled")
        } else {
            accept(stream, &key, data.len() + key.len())
        };
        match outcome {
            Ok(shard_id) => {
                inner.records.push(FakeRecord {
                    stream: name.clone(),
                    shard_id: shard_id.clone(),
                    partition_key: key,
                    data,
                    at: Instant::now(),
                    at_wall: std::time::SystemTime::now(),
                    operation: operation.to_owned(),
                    access_key: access_key.to_owned(),
                });
                let seq = format!("{:056}", inner.records.len());
                results.push(json!({"ShardId": shard_id, "SequenceNumber": seq}));
            }
            Err(_) if operation == "PutRecord" => {
                inner.throttled.push(Instant::now());
                return throttled();
            }
            Err(_) => {
                inner.throttled.push(Instant::now());
                failed += 1;
                results.push(
                    json!({"ErrorCode": "ProvisionedThroughputExceededException",
                    "ErrorMessage": "Rate exceeded for shard in stream under account."}),
                );
            }
        }
    }
    let body = if operation == "PutRecord" {
        results.pop().unwrap_or(Value::Null)
    } else {
        json!({"FailedRecordCount": failed, "Records": results})
    };
    json_ok(body)
}

/// Shards per ListShards page. AWS answers at most `MaxResults` (1,000 by default) and
/// may answer fewer; a small page makes every multi-page stream of the tests page.
const LIST_SHARDS_PAGE: usize = 100;

pub(super) fn list_shards(inner: &Mutex<Inner>, req: &Value, access_key: &str) -> Response {
    let inner = inner.lock().unwrap();
    // A later page names only its token (`<stream>/<first shard>`), as AWS requires.
    let (name, from) = match req.get("NextToken").and_then(Value::as_str) {
        Some(token) => {
            if req.get("StreamName").is_some() {
                return json_error(
                    400,
                    "InvalidArgumentException",
                    "NextToken and StreamName cannot be provided together.",
                );
            }
            match token
                .rsplit_once('/')
                .and_then(|(n, f)| Some((n.to_owned(), f.parse().ok()?)))
            {
                Some(parsed) => parsed,
                None => return json_error(400, "InvalidArgumentException", "invalid NextToken"),
            }
        }
        None => match authorize(&inner, req, access_key, "ListShards") {
            Ok(name) => (name, 0usize),
            Err(refused) => return *refused,
        },
    };
    let Some(stream) = inner.streams.get(&name) else {
        return stream_not_found(&name);
    };
    let shards: Vec<Value> = stream
        .shards
        .iter()
        .skip(from)
        .take(LIST_SHARDS_PAGE)
        .map(|s| {
            let range = if s.closed {
                json!({"StartingSequenceNumber": "0", "EndingSequenceNumber": "9"})
            } else {
                json!({"StartingSequenceNumber": "0"})
            };
            json!({"ShardId": s.id,
                "HashKeyRange": {"StartingHashKey": s.start.to_string(), "EndingHashKey": s.end.to_string()},
                "SequenceNumberRange": range})
        })
        .collect();
    let next = from + LIST_SHARDS_PAGE;
    if next < stream.shards.len() {
        json_ok(json!({"Shards": shards, "NextToken": format!("{name}/{next}")}))
    } else {
        json_ok(json!({"Shards": shards}))
    }
}

pub(super) fn describe(inner: &Mutex<Inner>, req: &Value, access_key: &str) -> Response {
    let inner = inner.lock().unwrap();
    let name = match authorize(&inner, req, access_key, "DescribeStreamSummary") {
        Ok(name) => name,
        Err(refused) => return *refused,
    };
    let Some(stream) = inner.streams.get(&name) else {
        return stream_not_found(&name);
    };
    let (account, region) = stream
        .owner
        .clone()
        .unwrap_or_else(|| ("000000000000".into(), "us-east-1".into()));
    let mode = if stream.on_demand {
        "ON_DEMAND"
    } else {
        "PROVISIONED"
    };
    let mut summary = json!({
        "StreamName": name, "StreamARN": format!("arn:aws:kinesis:{region}:{account}:stream/{name}"),
        "StreamStatus": "ACTIVE", "StreamModeDetails": {"StreamMode": mode},
        "RetentionPeriodHours": 24, "StreamCreationTimestamp": 0,
        "EnhancedMonitoring": [], "OpenShardCount": stream.shards.iter().filter(|s| !s.closed).count()});
    // Answers before 2025 had no MaxRecordSizeInKiB; the fake leaves it out unless set.
    if let Some(kib) = stream.max_record_kib {
        summary["MaxRecordSizeInKiB"] = json!(kib);
    }
    json_ok(json!({ "StreamDescriptionSummary": summary }))
}

/// Every answer carries a request ID, as Kinesis' do (`x-amzn-RequestId`).
fn request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("fake-kinesis-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

pub(super) fn json_ok(body: Value) -> Response {
    (
        [
            ("content-type", "application/x-amz-json-1.1".to_owned()),
            ("x-amzn-RequestId", request_id()),
        ],
        body.to_string(),
    )
        .into_response()
}

pub(super) fn json_error(status: u16, code: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        [
            ("content-type", "application/x-amz-json-1.1".to_owned()),
            ("x-amzn-RequestId", request_id()),
        ],
        json!({"__type": code, "message": message}).to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_the_hash_key_space() {
        let mut s = Stream {
            shards: even_shards(4),
            ..Stream::default()
        };
        let mut seen = std::collections::HashSet::new();
        for k in 0..200 {
            seen.insert(accept(&mut s, &format!("user-{k}"), 10).unwrap());
        }
        assert_eq!(seen.len(), 4, "keys spread over every shard");
        s.capacity = Some((1000, 1024 * 1024));
        let key = "hot";
        let ok = (0..1100)
            .filter(|_| accept(&mut s, key, 10).is_ok())
            .count();
        assert_eq!(ok, 1000, "one shard takes 1,000 records a second");
    }
}
