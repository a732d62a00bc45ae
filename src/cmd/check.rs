//! `check`: validates one tenant end to end and says what passed and what failed.

use std::path::PathBuf;
use std::process::ExitCode;

use kd_tenants::TenantEntry;

use super::CliError;
use crate::config::Config;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, env = "KINESIS_DESTINATION_CONFIG", value_name = "FILE")]
    config: PathBuf,
    /// The tenant to check.
    #[arg(long)]
    source_id: String,
}

fn report(ok: bool, what: &str, detail: &str) -> bool {
    println!("{} {what}: {detail}", if ok { "PASS" } else { "FAIL" });
    ok
}

pub async fn run(args: Args) -> Result<ExitCode, CliError> {
    let config = super::with_kafka_auth(Config::load(&args.config)?, None).await?;
    let (snapshot, from) = super::tenant_settings(&config).await?;
    let tenant = match snapshot.get(&args.source_id) {
        Some(TenantEntry::Valid(t)) => {
            report(
                true,
                "settings",
                &format!(
                    "role {}, stream {} in {}, {} shard(s), external ID {}",
                    t.role,
                    t.stream,
                    t.region,
                    t.shards,
                    if t.secret_id.is_some() {
                        "secretId (***)"
                    } else {
                        "the source ID"
                    }
                ),
            );
            report(
                true,
                "write mode",
                match t.write_mode {
                    kd_tenants::WriteMode::Auto => "PutRecords batches (usePutRecords auto: record by record with PutRecord, for an hour at a time, if the role refuses kinesis:PutRecords)",
                    kd_tenants::WriteMode::PutRecords => "PutRecords batches (usePutRecords true: the role must allow kinesis:PutRecords)",
                    kd_tenants::WriteMode::PutRecord => "PutRecord, record by record (usePutRecords false)",
                },
            );
            t.clone()
        }
        Some(TenantEntry::Invalid { reason }) => {
            report(false, "settings", reason);
            return Ok(ExitCode::FAILURE);
        }
        None => {
            report(
                false,
                "settings",
                &format!("no tenant {:?} in {from}", args.source_id),
            );
            return Ok(ExitCode::FAILURE);
        }
    };

    let base = super::aws_base(config.aws.endpoint_url.clone()).await;
    let cache = kd_aws::CredentialCache::new(
        base,
        kd_aws::CredentialSettings {
            role_session_name: config.aws.role_session_name.clone(),
            ..Default::default()
        },
    );
    let session = match cache.session(&tenant).await {
        Ok(s) => {
            report(
                true,
                "assume role",
                &format!("{} accepted our external ID", tenant.role),
            );
            s
        }
        Err(e) => {
            report(false, "assume role", &e.to_string());
            return Ok(ExitCode::FAILURE);
        }
    };
    let client = cache.kinesis(&session, &tenant.region);
    let described = client
        .describe_stream_summary()
        .stream_name(tenant.stream.as_str())
        .send()
        .await;
    let ok = match described {
        Ok(out) => match out.stream_description_summary() {
            Some(d) => {
                let status = d.stream_status().as_str().to_owned();
                let shards = d.open_shard_count();
                let mut detail =
                    format!("{} is {status} with {shards} open shard(s)", tenant.stream);
                if shards as u32 != tenant.shards {
                    detail.push_str(&format!(
                        " (settings say shards = {}: capacity is planned from that number)",
                        tenant.shards
                    ));
                }
                report(
                    status == "ACTIVE" || status == "UPDATING",
                    "stream",
                    &detail,
                )
            }
            None => report(false, "stream", "no description returned"),
        },
        Err(e) => {
            let err = kd_aws::AwsError::from_sdk("DescribeStreamSummary", &e);
            if err.code.contains("AccessDenied") {
                // The suggested policy grants only kinesis:PutRecord: existence cannot be
                // checked without writing, which check never does.
                report(
                    true,
                    "stream",
                    "not verified: the role may not describe the stream (the suggested policy grants only kinesis:PutRecord)",
                )
            } else {
                report(false, "stream", &err.to_string())
            }
        }
    };
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
