//! `policy`: the IAM documents a tenant creates for us (see "Setting up a tenant in
//! AWS" in the README): a permission policy on their stream, and a role trust policy that lets our
//! principal assume the role when it presents one of their external IDs; or, with
//! `--source-id`, the stream's resource-based policy that lets the worker's writer role
//! write to it only in sessions tagged with the tenant's source ID.

use std::process::ExitCode;

use serde_json::{json, Value};

use super::CliError;

#[derive(clap::Args)]
pub struct Args {
    /// Stream name (repeat for several streams).
    #[arg(long = "stream", required_unless_present = "stream_arns", requires_all = ["region", "account_id"])]
    streams: Vec<String>,
    /// Stream ARN, instead of --stream, --region and --account-id (repeatable).
    #[arg(long = "stream-arn", conflicts_with_all = ["streams", "region", "account_id"])]
    stream_arns: Vec<String>,
    /// AWS region of the stream(s).
    #[arg(long)]
    region: Option<String>,
    /// The tenant's AWS account ID (12 digits).
    #[arg(long = "account-id")]
    account_id: Option<String>,
    /// The principal allowed to assume the role: this worker's own IAM identity,
    /// for example arn:aws:iam::111122223333:root or a role ARN. With --source-id:
    /// the worker's writer role (aws.resource_policy_role).
    #[arg(long)]
    principal: String,
    /// External ID(s) the role accepts: source IDs, or one secret ID (repeatable).
    #[arg(long = "external-id", required_unless_present = "source_ids")]
    external_ids: Vec<String>,
    /// Resource-policy mode: the stream policy for tenants without a role, granting
    /// the writer role (--principal) only in sessions tagged with these source IDs.
    #[arg(
        long = "source-id",
        requires = "stream_arns",
        conflicts_with = "external_ids"
    )]
    source_ids: Vec<String>,
    /// Also allow kinesis:PutRecords (for batching).
    #[arg(long)]
    batching: bool,
}

pub fn run(args: Args) -> Result<ExitCode, CliError> {
    let out = if args.source_ids.is_empty() {
        let (permission, trust) = documents(&args)?;
        json!({"permissionPolicy": permission, "trustPolicy": trust})
    } else {
        stream_policies(&args)?
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&out).map_err(|e| CliError::Failed(e.to_string()))?
    );
    Ok(ExitCode::SUCCESS)
}

/// The streams' ARNs, from --stream-arn or from --stream, --region and --account-id.
fn stream_arns(args: &Args) -> Result<Vec<String>, CliError> {
    if !args.stream_arns.is_empty() {
        return args
            .stream_arns
            .iter()
            .map(|a| {
                kd_tenants::StreamArn::parse(a)
                    .map(|a| a.as_str().to_owned())
                    .map_err(|e| CliError::Usage(format!("--stream-arn: {e}")))
            })
            .collect();
    }
    let account = args.account_id.as_deref().unwrap_or_default();
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CliError::Usage(
            "--account-id: must be a 12-digit AWS account ID".into(),
        ));
    }
    let region = kd_tenants::Region::parse(args.region.as_deref().unwrap_or_default())
        .map_err(|e| CliError::Usage(format!("--region: {e}")))?;
    args.streams
        .iter()
        .map(|s| {
            kd_tenants::StreamName::parse(s)
                .map_err(|e| CliError::Usage(format!("--stream: {e}")))?;
            Ok(format!(
                "arn:{}:kinesis:{region}:{account}:stream/{s}",
                region.partition()
            ))
        })
        .collect()
}

/// Resource-policy mode: one policy per stream (a stream has one), granting the writer
/// role the calls the worker makes, in sessions tagged with one of the source IDs.
fn stream_policies(args: &Args) -> Result<Value, CliError> {
    kd_tenants::RoleArn::parse(&args.principal).map_err(|e| {
        CliError::Usage(format!(
            "--principal: {e} (the worker's aws.resource_policy_role)"
        ))
    })?;
    for id in &args.source_ids {
        let t = json!({"sourceId": id, "streamArn": args.stream_arns[0]});
        kd_tenants::parse_tenant(&t).map_err(|e| CliError::Usage(format!("--source-id: {e}")))?;
    }
    let tag = format!("aws:PrincipalTag/{}", kd_aws::credentials::SOURCE_TAG);
    let ids: Value = match args.source_ids.as_slice() {
        [one] => json!(one),
        many => json!(many),
    };
    let mut policies = serde_json::Map::new();
    for arn in stream_arns(args)? {
        let policy = json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Sid": "KinesisDestinationWrites",
                "Effect": "Allow",
                "Principal": {"AWS": args.principal},
                "Action": ["kinesis:PutRecord", "kinesis:PutRecords", "kinesis:ListShards", "kinesis:DescribeStreamSummary"],
                "Resource": arn,
                "Condition": {"StringEquals": {tag.clone(): ids.clone()}}
            }]
        });
        policies.insert(arn, policy);
    }
    Ok(json!({ "streamPolicies": policies }))
}

fn documents(args: &Args) -> Result<(Value, Value), CliError> {
    let resources = stream_arns(args)?;
    if !args.principal.starts_with("arn:") {
        return Err(CliError::Usage(
            "--principal: must be an IAM ARN such as arn:aws:iam::111122223333:root".into(),
        ));
    }
    if args.external_ids.iter().any(|id| id.is_empty()) {
        return Err(CliError::Usage("--external-id: must not be empty".into()));
    }
    let mut actions = vec!["kinesis:PutRecord"];
    if args.batching {
        actions.push("kinesis:PutRecords");
    }
    let permission = json!({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": actions, "Resource": resources}]
    });
    let external: Value = match args.external_ids.as_slice() {
        [one] => json!(one),
        many => json!(many),
    };
    let trust = json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": {"AWS": args.principal},
            "Action": "sts:AssumeRole",
            "Condition": {"StringEquals": {"sts:ExternalId": external}}
        }]
    });
    Ok((permission, trust))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(ids: &[&str]) -> Args {
        Args {
            streams: vec!["my-stream".into()],
            stream_arns: vec![],
            region: Some("us-west-2".into()),
            account_id: Some("123456789012".into()),
            principal: "arn:aws:iam::111122223333:root".into(),
            external_ids: ids.iter().map(|s| s.to_string()).collect(),
            source_ids: vec![],
            batching: false,
        }
    }

    #[test]
    fn stream_arns_name_streams_and_source_ids_make_a_stream_policy() {
        let arn = "arn:aws-cn:kinesis:cn-north-1:123456789012:stream/s";
        let mut a = args(&["x"]);
        a.streams.clear();
        a.stream_arns = vec![arn.into()];
        let (perm, _) = documents(&a).unwrap();
        assert_eq!(perm["Statement"][0]["Resource"][0], arn);
        a.external_ids.clear();
        a.source_ids = vec!["src_1".into()];
        a.principal = "arn:aws:iam::111122223333:role/kinesis-destination-writer".into();
        let out = stream_policies(&a).unwrap();
        let st = &out["streamPolicies"][arn]["Statement"][0];
        assert_eq!(st["Principal"]["AWS"], a.principal);
        assert_eq!(st["Resource"], arn);
        assert_eq!(
            st["Condition"]["StringEquals"]["aws:PrincipalTag/kinesis-destination-source-id"],
            "src_1"
        );
        a.principal = "arn:aws:iam::111122223333:root".into();
        assert!(stream_policies(&a)
            .unwrap_err()
            .to_string()
            .contains("--principal"));
    }

    #[test]
    fn one_external_id_is_a_string_several_are_a_list() {
        let (perm, trust) = documents(&args(&["src_1"])).unwrap();
        assert_eq!(
            perm["Statement"][0]["Resource"][0],
            "arn:aws:kinesis:us-west-2:123456789012:stream/my-stream"
        );
        assert_eq!(perm["Statement"][0]["Action"], json!(["kinesis:PutRecord"]));
        let cond = &trust["Statement"][0]["Condition"]["StringEquals"]["sts:ExternalId"];
        assert_eq!(cond, &json!("src_1"));
        let (_, trust) = documents(&args(&["a", "b"])).unwrap();
        let cond = &trust["Statement"][0]["Condition"]["StringEquals"]["sts:ExternalId"];
        assert_eq!(cond, &json!(["a", "b"]));
        assert_eq!(
            trust["Statement"][0]["Principal"]["AWS"],
            "arn:aws:iam::111122223333:root"
        );
    }

    #[test]
    fn bad_flags_are_named() {
        let mut a = args(&["x"]);
        a.account_id = Some("12".into());
        assert!(documents(&a)
            .unwrap_err()
            .to_string()
            .contains("--account-id"));
    }
}
