//! `tail`: read a Kinesis stream and print each record's JSON, one per line (the
//! "Kinesis tailing utility" of the destination this product re-creates). Reads with the worker's own identity, or as a tenant
//! (assuming its role with its external ID), or as a tenant of a config file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use kd_aws::shards::{StartAt, StreamReader};
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
    #[arg(long, required_unless_present_any = ["source_id", "stream_arn"])]
    stream: Option<String>,
    /// Stream to read, by ARN (instead of --stream and --region).
    #[arg(long, conflicts_with_all = ["stream", "source_id"])]
    stream_arn: Option<String>,
    /// Region of the stream.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Read as this role (the tenant's), assumed with --external-id.
    #[arg(long)]
    role_arn: Option<String>,
    /// The external ID to assume --role-arn with (the tenant's secretId). Prefer the
    /// environment variable: a flag's value is in the process list for every user of
    /// the machine to see.
    #[arg(long, env = "KINESIS_DESTINATION_EXTERNAL_ID", hide_env_values = true)]
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
    /// The endpoint, FIPS and dual-stack choices, and the writer role for a tenant
    /// without one.
    aws: crate::config::AwsConfig,
}

async fn target(args: &Args) -> Result<Target, CliError> {
    if let Some(source_id) = &args.source_id {
        let path = args
            .config
            .as_ref()
            .expect("clap requires --config with --source-id");
        let config = super::with_kafka_auth(crate::config::Config::load(path)?, None).await?;
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
        let mut aws = config.aws.clone();
        aws.endpoint_url = args.endpoint_url.clone().or(aws.endpoint_url);
        return Ok(Target {
            tenant,
            assume: true,
            aws,
        });
    }
    if args.external_id.is_some() && args.role_arn.is_none() {
        return Err(CliError::Usage(
            "--external-id (or KINESIS_DESTINATION_EXTERNAL_ID): needs --role-arn".into(),
        ));
    }
    let stream = args.stream.clone().unwrap_or_default();
    let role = args
        .role_arn
        .clone()
        .unwrap_or_else(|| "arn:aws:iam::000000000000:role/none".into());
    let mut settings = match &args.stream_arn {
        Some(arn) => json!({"sourceId": "tail", "roleAddress": role, "streamArn": arn}),
        None => {
            json!({"sourceId": "tail", "roleAddress": role, "region": args.region, "stream": stream})
        }
    };
    if let Some(x) = &args.external_id {
        settings["secretId"] = json!(x);
    }
    let tenant = kd_tenants::parse_tenant(&settings).map_err(|e| match e {
        kd_tenants::SettingsError::Field { field, error, .. } => {
            let flag = match field {
                "roleAddress" => "--role-arn",
                "region" => "--region",
                "streamArn" => "--stream-arn",
                _ => "--stream",
            };
            CliError::Usage(format!("{flag}: {error}"))
        }
        kd_tenants::SettingsError::Invalid { message, .. } if message.starts_with("secretId") => {
            CliError::Usage(format!("--external-id: {message}"))
        }
        other => CliError::Usage(other.to_string()),
    })?;
    Ok(Target {
        tenant,
        assume: args.role_arn.is_some(),
        aws: crate::config::AwsConfig {
            endpoint_url: args.endpoint_url.clone(),
            ..Default::default()
        },
    })
}

pub async fn run(args: Args) -> Result<ExitCode, CliError> {
    let t = target(&args).await?;
    let base = super::aws_base(&t.aws).await;
    let client = if t.assume {
        let settings = kd_aws::CredentialSettings {
            resource_policy_role: t
                .aws
                .resource_policy_role
                .as_deref()
                .and_then(|r| kd_tenants::RoleArn::parse(r).ok()),
            ..Default::default()
        };
        let cache = kd_aws::CredentialCache::new(base, settings);
        let session = cache
            .session(&t.tenant)
            .await
            .map_err(|e| CliError::Failed(e.to_string()))?;
        cache.kinesis(&session, &t.tenant.region)
    } else {
        let conf = aws_sdk_kinesis::config::Builder::from(&base)
            .region(aws_config::Region::new(t.tenant.region.as_str().to_owned()))
            .interceptor(kd_aws::sdk_calls::SdkCalls::new(Default::default()))
            .build();
        aws_sdk_kinesis::Client::from_conf(conf)
    };
    let stream = kd_aws::api::StreamId::of(&t.tenant);
    let label = stream.label();
    let fail = |e: kd_aws::AwsError| CliError::Failed(format!("stream {label}: {e}"));
    let start = if args.latest {
        StartAt::Latest
    } else {
        StartAt::Oldest
    };
    let mut reader = StreamReader::open(client, stream, start)
        .await
        .map_err(fail)?;
    let stdout = std::io::stdout();
    let mut reader_gone = false;
    loop {
        let any_open = reader
            .read_to_end(|shard, r| {
                let line = format_record(args.format, shard, r);
                use std::io::Write;
                // A reader that went away (a closed pipe) stops us quietly.
                reader_gone = writeln!(stdout.lock(), "{line}").is_err();
                !reader_gone
            })
            .await
            .map_err(fail)?;
        if reader_gone || !args.follow || !any_open {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One output line for a record: its data as JSON (a string when it is not JSON), or
/// the whole record.
fn format_record(format: Format, shard: &str, r: &aws_sdk_kinesis::types::Record) -> String {
    let data = r.data().as_ref();
    let decoded: Value =
        serde_json::from_slice(data).unwrap_or_else(|_| json!(String::from_utf8_lossy(data)));
    match format {
        Format::Data => decoded.to_string(),
        Format::Record => json!({
            "shardId": shard,
            "sequenceNumber": r.sequence_number(),
            "partitionKey": r.partition_key(),
            "data": decoded,
        })
        .to_string(),
    }
}
