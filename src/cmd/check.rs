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
            let access = match t.role() {
                Some(role) => format!(
                    "role {role} (external ID {})",
                    if t.secret_id.is_some() {
                        "secretId (***)"
                    } else {
                        "the source ID"
                    }
                ),
                None => match &config.aws.resource_policy_role {
                    Some(writer) => format!("no role: the stream's resource policy, through the worker's {writer} tagged with the source ID"),
                    None => "no role, and the worker has no aws.resource_policy_role: nothing can be written".into(),
                },
            };
            let shards = match t.shards {
                Some(n) => format!("{n} shard(s) planned until they are listed"),
                None => "shards from ListShards".into(),
            };
            report(
                t.role().is_some() || config.aws.resource_policy_role.is_some(),
                "settings",
                &format!(
                    "{access}, stream {} in {}, {shards}",
                    t.stream_label(),
                    t.region,
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

    let base = super::aws_base(&config.aws).await;
    let cache = kd_aws::CredentialCache::new(
        base,
        kd_aws::CredentialSettings {
            role_session_name: config.aws.role_session_name.clone(),
            resource_policy_role: config
                .aws
                .resource_policy_role
                .as_deref()
                .and_then(|r| kd_tenants::RoleArn::parse(r).ok()),
            ..Default::default()
        },
    );
    let session = match cache.session(&tenant).await {
        Ok(s) => {
            let detail = match tenant.role() {
                Some(role) => format!("{role} accepted our external ID"),
                None => "the writer role, tagged with the source ID".into(),
            };
            report(true, "assume role", &detail);
            s
        }
        Err(e) => {
            report(false, "assume role", &e.to_string());
            return Ok(ExitCode::FAILURE);
        }
    };
    let client = cache.kinesis(&session, &tenant.region);
    let described = match &tenant.stream_arn {
        Some(arn) => client.describe_stream_summary().stream_arn(arn.as_str()),
        None => client
            .describe_stream_summary()
            .stream_name(tenant.stream.as_str()),
    }
    .send()
    .await;
    let label = tenant.stream_label();
    let ok = match described {
        Ok(out) => match out.stream_description_summary() {
            Some(d) => {
                let status = d.stream_status().as_str().to_owned();
                let mode = d
                    .stream_mode_details()
                    .map(|m| m.stream_mode().as_str().to_owned())
                    .unwrap_or_else(|| "PROVISIONED".into());
                let shards = d.open_shard_count();
                let max_kib = d
                    .max_record_size_in_kib()
                    .unwrap_or(kd_tenants::DEFAULT_MAX_RECORD_KIB as i32);
                let mut detail = format!(
                    "{label} is {status}, {mode}, {shards} open shard(s), records up to {max_kib} KiB"
                );
                if let Some(planned) = tenant.shards.filter(|n| *n as i32 != shards) {
                    detail.push_str(&format!(
                        " (settings say shards = {planned}: only until the shards are listed)"
                    ));
                }
                if let Some(over) = tenant
                    .max_record_bytes
                    .filter(|n| *n != max_kib as usize * 1024)
                {
                    detail.push_str(&format!(
                        " (settings say maxRecordSizeKiB = {}: that wins)",
                        over / 1024
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
            if err.refuses_access() {
                // The suggested policy grants only kinesis:PutRecord: existence cannot be
                // checked without writing, which check never does.
                report(
                    true,
                    "stream",
                    "not verified: the role may not describe the stream (the suggested policy grants only kinesis:PutRecord); records up to 1024 KiB unless maxRecordSizeKiB says more, capacity from shards",
                )
            } else {
                report(false, "stream", &err.to_string())
            }
        }
    };
    let listed = kd_aws::shards::list_shards(&client, kd_aws::api::StreamId::of(&tenant)).await;
    match listed {
        Ok(shards) => {
            let open = shards
                .iter()
                .filter(|s| {
                    s.sequence_number_range()
                        .is_none_or(|r| r.ending_sequence_number().is_none())
                })
                .count();
            report(
                true,
                "shards",
                &format!(
                    "{open} open of {} listed: per-shard rate limits",
                    shards.len()
                ),
            );
        }
        Err(e) if e.class == kd_aws::ErrorClass::Permanent => {
            report(
                true,
                "shards",
                &format!("not listed ({}): a stream-wide rate limit", e.code),
            );
        }
        Err(e) => {
            report(false, "shards", &e.to_string());
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
