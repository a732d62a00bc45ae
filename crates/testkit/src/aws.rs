//! Test tenants and their Kinesis streams in the emulator, reached as the tenant would:
//! by assuming the tenant's role (moto keeps each account's streams apart).

use kd_aws::shards::{StartAt, StreamReader};
use serde_json::{json, Value};

/// A tenant of a test: its settings and where its stream lives.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub source_id: String,
    pub account: String,
    pub region: String,
    pub stream: String,
    pub shards: u32,
    pub secret_id: Option<String>,
    pub max_record_kib: Option<u32>,
    /// `usePutRecords`: `Some(true)` batches, `Some(false)` (the tests' default) writes
    /// record by record, `None` leaves the worker's default (`auto`).
    pub use_put_records: Option<bool>,
    /// `aggregate`: one user's waiting events as one KPL aggregated record.
    pub aggregate: bool,
}

impl Tenant {
    pub fn new(source_id: &str, account: &str, region: &str, stream: &str) -> Tenant {
        Tenant {
            source_id: source_id.into(),
            account: account.into(),
            region: region.into(),
            stream: stream.into(),
            shards: 1,
            secret_id: None,
            max_record_kib: None,
            use_put_records: Some(false),
            aggregate: false,
        }
    }

    pub fn role_arn(&self) -> String {
        format!("arn:aws:iam::{}:role/segment-kinesis", self.account)
    }

    pub fn external_id(&self) -> &str {
        self.secret_id.as_deref().unwrap_or(&self.source_id)
    }

    /// The tenant's settings object, as the tenants file and topic hold it.
    pub fn settings(&self) -> Value {
        let mut v = json!({"sourceId": self.source_id, "roleAddress": self.role_arn(),
            "region": self.region, "stream": self.stream, "shards": self.shards});
        if let Some(s) = &self.secret_id {
            v["secretId"] = json!(s);
        }
        if let Some(k) = self.max_record_kib {
            v["maxRecordSizeKiB"] = json!(k);
        }
        if let Some(batch) = self.use_put_records {
            v["usePutRecords"] = json!(batch);
        }
        if self.aggregate {
            v["aggregate"] = json!(true);
        }
        v
    }
}

/// A record read back from a stream.
#[derive(Debug, Clone)]
pub struct StreamRecord {
    pub shard_id: String,
    pub partition_key: String,
    pub data: Vec<u8>,
}

impl StreamRecord {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.data).unwrap_or(Value::Null)
    }
}

/// Creates and reads tenants' streams in the emulator.
pub struct Streams {
    endpoint: String,
}

impl Streams {
    pub fn new(endpoint: &str) -> Streams {
        Streams {
            endpoint: endpoint.into(),
        }
    }

    async fn client(&self, t: &Tenant) -> aws_sdk_kinesis::Client {
        let base = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(aws_config::Region::new(t.region.clone()))
            .credentials_provider(aws_sdk_sts::config::Credentials::new(
                "test", "test", None, None, "testkit",
            ))
            .load()
            .await;
        let sts = aws_sdk_sts::Client::new(&base);
        let out = sts
            .assume_role()
            .role_arn(t.role_arn())
            .role_session_name("testkit")
            .external_id(t.external_id())
            .send()
            .await
            .expect("assume the tenant's role in the emulator");
        let c = out.credentials().expect("credentials");
        let creds = aws_sdk_sts::config::Credentials::new(
            c.access_key_id(),
            c.secret_access_key(),
            Some(c.session_token().to_owned()),
            None,
            "testkit",
        );
        let conf = aws_sdk_kinesis::config::Builder::from(&base)
            .credentials_provider(creds)
            .build();
        aws_sdk_kinesis::Client::from_conf(conf)
    }

    /// Creates the tenant's stream in its account and region, and waits until it is active.
    pub async fn create(&self, t: &Tenant) {
        let k = self.client(t).await;
        k.create_stream()
            .stream_name(&t.stream)
            .shard_count(t.shards as i32)
            .send()
            .await
            .expect("create stream");
        for _ in 0..100 {
            let d = k
                .describe_stream_summary()
                .stream_name(&t.stream)
                .send()
                .await
                .expect("describe stream");
            if d.stream_description_summary()
                .map(|s| s.stream_status().as_str())
                == Some("ACTIVE")
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("stream {} did not become active", t.stream);
    }

    /// Every record in the tenant's stream, shard by shard, in shard order (read as
    /// `tail` reads it).
    pub async fn read(&self, t: &Tenant) -> Vec<StreamRecord> {
        let k = self.client(t).await;
        let mut reader =
            StreamReader::open(k, kd_aws::api::StreamId::Name(&t.stream), StartAt::Oldest)
                .await
                .expect("open stream");
        let mut out = Vec::new();
        reader
            .read_to_end(|shard, rec| {
                out.push(StreamRecord {
                    shard_id: shard.to_owned(),
                    partition_key: rec.partition_key().unwrap_or_default().to_owned(),
                    data: rec.data().as_ref().to_vec(),
                });
                true
            })
            .await
            .expect("read stream");
        out
    }
}
