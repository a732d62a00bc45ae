//! `tail`: read a Kinesis stream and print each record's JSON, one per line (the seed's
//! "Kinesis tailing utility"). Reads with the worker's own identity, or as a tenant
//! (assuming its role with its external ID), or as a tenant of a config file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use aws_sdk_kinesis::types::ShardIteratorType;
use serde_json::{json, Value};

use super::CliError;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The record's data (the event JSON) only.
    Data,
    /// {"shardId","sequenceNumber","partitionKey","data"}.
    Record,
}

#[derive(clap::Args)]
pub struct Args {
    /// Stream to read.
    #[arg(long, required_unless_present = "source_id")]
    stream: Option<String>,
    /// Region of the stream.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Read as this role (the tenant's), assumed with --external-id.
    #[arg(long)]
    role_arn: Option<String>,
    #[arg(long, requires = "role_arn")]
    external_id: Option<String>,
    /// Take stream, region, role and external ID from this tenant of --config.
    #[arg(long, requires = "config")]
    source_id: Option<String>,
    #[arg(long, env = "KINESIS_DESTINATION_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// AWS endpoint (LocalStack, moto); defaults to the config's aws.endpoint_url.
    #[arg(long)]
    endpoint_url: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Data)]
    format: Format,
    /// Keep reading new records instead of stopping at the end of every shard.
    #[arg(long)]
    follow: bool,
    /// Start at new records only.
    #[arg(long)]
    latest: bool,
}

/// Who reads and what.
struct Target {
    tenant: kd_tenants::TenantSettings,
    assume: bool,
    endpoint_url: Option<String>,
}

async fn target(args: &Args) -> Result<Target, CliError> {
    if let Some(source_id) = &args.source_id {
        let path = args
            .config
            .as_ref()
            .expect("clap requires --config with --source-id");
        let config = crate::config::Config::load(path)?;
        let (snapshot, from) = super::tenant_settings(&config).await?;
        let tenant = match snapshot.get(source_id) {
            Some(kd_tenants::TenantEntry::Valid(t)) => (**t).clone(),
            Some(kd_tenants::TenantEntry::Invalid { reason }) => {
                return Err(CliError::Usage(format!("--source-id: {reason}")))
            }
            None => {
                return Err(CliError::Usage(format!(
                    "--source-id: no tenant {source_id:?} in {from}"
                )))
            }
        };
        return Ok(Target {
            tenant,
            assume: true,
            endpoint_url: args.endpoint_url.clone().or(config.aws.endpoint_url),
        });
    }
    let stream = args.stream.clone().unwrap_or_default();
    let role = args
        .role_arn
        .clone()
        .unwrap_or_else(|| "arn:aws:iam::000000000000:role/none".into());
    let mut settings =
        json!({"sourceId": "tail", "roleAddress": role, "region": args.region, "stream": stream});
    if let Some(x) = &args.external_id {
        settings["secretId"] = json!(x);
    }
    let tenant = kd_tenants::parse_tenant(&settings).map_err(|e| {
        let msg = e.to_string();
        let flag = if msg.contains("roleAddress") {
            "--role-arn"
        } else if msg.contains("region") {
            "--region"
        } else {
            "--stream"
        };
        CliError::Usage(format!(
            "{flag}: {}",
            msg.trim_start_matches("tenant tail: ")
        ))
    })?;
    Ok(Target {
        tenant,
        assume: args.role_arn.is_some(),
        endpoint_url: args.endpoint_url.clone(),
    })
}

pub async fn run(args: Args) -> Result<ExitCode, CliError> {
    let t = target(&args).await?;
    let base = super::aws_base(t.endpoint_url.clone()).await;
    let client = if t.assume {
        let cache = kd_aws::CredentialCache::new(base, kd_aws::CredentialSettings::default());
        cache
            .session(&t.tenant)
            .await
            .map_err(|e| CliError::Failed(e.to_string()))?
            .kinesis(&t.tenant.region)
    } else {
        let conf = aws_sdk_kinesis::config::Builder::from(&base)
            .region(aws_config::Region::new(t.tenant.region.as_str().to_owned()))
            .build();
        aws_sdk_kinesis::Client::from_conf(conf)
    };
    let stream = t.tenant.stream.as_str();
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        CliError::Failed(format!("{what} on stream {stream}: {e}"))
    };

    let mut shards = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let mut req = client.list_shards();
        req = match &next {
            Some(token) => req.next_token(token),
            None => req.stream_name(stream),
        };
        let out = req
            .send()
            .await
            .map_err(|e| fail("ListShards", &kd_aws::AwsError::from_sdk("ListShards", &e)))?;
        shards.extend(out.shards().iter().map(|s| s.shard_id().to_owned()));
        next = out.next_token().map(str::to_owned);
        if next.is_none() {
            break;
        }
    }

    let mut iterators = Vec::new();
    for shard in &shards {
        let kind = if args.latest {
            ShardIteratorType::Latest
        } else {
            ShardIteratorType::TrimHorizon
        };
        let out = client
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(shard)
            .shard_iterator_type(kind)
            .send()
            .await
            .map_err(|e| {
                fail(
                    "GetShardIterator",
                    &kd_aws::AwsError::from_sdk("GetShardIterator", &e),
                )
            })?;
        iterators.push((shard.clone(), out.shard_iterator().map(str::to_owned)));
    }

    let stdout = std::io::stdout();
    loop {
        let mut any_open = false;
        for (shard, iterator) in iterators.iter_mut() {
            // Drain each shard to its current end before moving on, keeping shard order.
            while let Some(it) = iterator.take() {
                any_open = true;
                let out = client
                    .get_records()
                    .shard_iterator(&it)
                    .limit(10_000)
                    .send()
                    .await
                    .map_err(|e| {
                        fail("GetRecords", &kd_aws::AwsError::from_sdk("GetRecords", &e))
                    })?;
                for r in out.records() {
                    let data = r.data().as_ref();
                    let decoded: Value = serde_json::from_slice(data)
                        .unwrap_or_else(|_| json!(String::from_utf8_lossy(data)));
                    let line = match args.format {
                        Format::Data => decoded.to_string(),
                        Format::Record => json!({
                            "shardId": shard,
                            "sequenceNumber": r.sequence_number(),
                            "partitionKey": r.partition_key(),
                            "data": decoded,
                        })
                        .to_string(),
                    };
                    use std::io::Write;
                    if writeln!(stdout.lock(), "{line}").is_err() {
                        // Reader went away (a closed pipe): stop quietly.
                        return Ok(ExitCode::SUCCESS);
                    }
                }
                let at_end = out.records().is_empty() || out.millis_behind_latest() == Some(0);
                *iterator = out.next_shard_iterator().map(str::to_owned);
                if at_end {
                    break;
                }
            }
        }
        if !args.follow || !any_open {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
