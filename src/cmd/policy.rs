//! `policy`: the IAM documents a tenant creates for us (see "Setting up a tenant in
//! AWS" in the README): a permission policy on their stream, and a role trust policy that lets our
//! principal assume the role when it presents one of their external IDs.

use std::process::ExitCode;

use serde_json::{json, Value};

use super::CliError;

#[derive(clap::Args)]
pub struct Args {
    /// Stream name (repeat for several streams).
    #[arg(long = "stream", required = true)]
    streams: Vec<String>,
    /// AWS region of the stream(s).
    #[arg(long)]
    region: String,
    /// The tenant's AWS account ID (12 digits).
    #[arg(long = "account-id")]
    account_id: String,
    /// The principal allowed to assume the role: this worker's own IAM identity,
    /// for example arn:aws:iam::111122223333:root or a role ARN.
    #[arg(long)]
    principal: String,
    /// External ID(s) the role accepts: source IDs, or one secret ID (repeatable).
    #[arg(long = "external-id", required = true)]
    external_ids: Vec<String>,
    /// Also allow kinesis:PutRecords (for batching).
    #[arg(long)]
    batching: bool,
}

pub fn run(args: Args) -> Result<ExitCode, CliError> {
    let (permission, trust) = documents(&args)?;
    let out = json!({"permissionPolicy": permission, "trustPolicy": trust});
    println!(
        "{}",
        serde_json::to_string_pretty(&out).map_err(|e| CliError::Failed(e.to_string()))?
    );
    Ok(ExitCode::SUCCESS)
}

fn documents(args: &Args) -> Result<(Value, Value), CliError> {
    if args.account_id.len() != 12 || !args.account_id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CliError::Usage(
            "--account-id: must be a 12-digit AWS account ID".into(),
        ));
    }
    kd_tenants::Region::parse(&args.region)
        .map_err(|e| CliError::Usage(format!("--region: {e}")))?;
    let mut resources = Vec::new();
    for s in &args.streams {
        kd_tenants::StreamName::parse(s).map_err(|e| CliError::Usage(format!("--stream: {e}")))?;
        resources.push(format!(
            "arn:aws:kinesis:{}:{}:stream/{}",
            args.region, args.account_id, s
        ));
    }
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
            region: "us-west-2".into(),
            account_id: "123456789012".into(),
            principal: "arn:aws:iam::111122223333:root".into(),
            external_ids: ids.iter().map(|s| s.to_string()).collect(),
            batching: false,
        }
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
        a.account_id = "12".into();
        assert!(documents(&a)
            .unwrap_err()
            .to_string()
            .contains("--account-id"));
    }
}
