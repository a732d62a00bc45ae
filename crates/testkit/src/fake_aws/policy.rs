//! A resource-based policy evaluated as IAM documents it, for what the fake's streams
//! need: cross-account `Allow` statements naming a principal, actions, resources and
//! `StringEquals` conditions on `aws:PrincipalTag/KEY` (session tags) and
//! `aws:PrincipalAccount`; an explicit `Deny` wins
//! (https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_evaluation-logic.html).
//! Within one condition operator every key must match (AND), and a key matches when
//! any of its values does (OR); a missing tag never matches. An operator the fake does
//! not know fails closed: an `Allow` with it does not apply and a `Deny` with it does
//! (never a wider grant than AWS would give).

use serde_json::Value;

/// Whether `policy` lets `caller_role` (an assumed role, with session `tags`) do
/// `action` on `resource`.
pub(super) fn allows(
    policy: &Value,
    caller_role: &str,
    tags: &[(String, String)],
    action: &str,
    resource: &str,
) -> bool {
    let statements = as_list(&policy["Statement"]);
    let applies = |s: &Value| {
        principal_matches(&s["Principal"], caller_role)
            && as_list(&s["Action"])
                .iter()
                .any(|a| wildcard(a.as_str().unwrap_or_default(), action))
            && as_list(&s["Resource"])
                .iter()
                .any(|r| wildcard(r.as_str().unwrap_or_default(), resource))
            && match conditions_hold(&s["Condition"], caller_role, tags) {
                Some(holds) => holds,
                None => s["Effect"] == "Deny",
            }
    };
    let denied = statements
        .iter()
        .any(|s| s["Effect"] == "Deny" && applies(s));
    !denied
        && statements
            .iter()
            .any(|s| s["Effect"] == "Allow" && applies(s))
}

fn as_list(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        Value::Null => Vec::new(),
        other => vec![other.clone()],
    }
}

/// `*` and `?` as IAM's action and resource patterns use them.
fn wildcard(pattern: &str, value: &str) -> bool {
    fn go(p: &[u8], v: &[u8]) -> bool {
        match (p.first(), v.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], v) || (!v.is_empty() && go(p, &v[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &v[1..]),
            (Some(a), Some(b)) if a.eq_ignore_ascii_case(b) => go(&p[1..], &v[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), value.as_bytes())
}

/// The role ARN itself, its account (`arn:aws:iam::ACCOUNT:root` or the bare ID), or `*`.
fn principal_matches(principal: &Value, caller_role: &str) -> bool {
    let account = caller_role.split(':').nth(4).unwrap_or_default();
    if principal == "*" {
        return true;
    }
    as_list(&principal["AWS"]).iter().any(|p| {
        let p = p.as_str().unwrap_or_default();
        p == "*" || p == caller_role || p == account || p == format!("arn:aws:iam::{account}:root")
    })
}

/// Whether every condition holds; `None` when one is beyond what the fake knows.
fn conditions_hold(
    conditions: &Value,
    caller_role: &str,
    tags: &[(String, String)],
) -> Option<bool> {
    let Some(operators) = conditions.as_object() else {
        return conditions.is_null().then_some(true);
    };
    let mut holds = true;
    for (operator, keys) in operators {
        if operator != "StringEquals" {
            return None;
        }
        let keys = keys.as_object()?;
        holds &= keys.iter().all(|(key, wanted)| {
            let actual: Option<&str> = if let Some(tag) = key
                .strip_prefix("aws:PrincipalTag/")
                .or_else(|| key.strip_prefix("aws:principaltag/"))
            {
                tags.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(tag))
                    .map(|(_, v)| v.as_str())
            } else if key.eq_ignore_ascii_case("aws:PrincipalAccount") {
                caller_role.split(':').nth(4)
            } else {
                None
            };
            actual.is_some_and(|actual| as_list(wanted).iter().any(|w| w == actual))
        });
    }
    Some(holds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ARN: &str = "arn:aws:kinesis:us-east-1:222222222222:stream/s";
    const WRITER: &str = "arn:aws:iam::999999999999:role/writer";

    fn policy(ids: Value) -> Value {
        json!({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"AWS": WRITER},
            "Action": ["kinesis:PutRecord", "kinesis:PutRecords"], "Resource": ARN,
            "Condition": {"StringEquals": {"aws:PrincipalTag/kinesis-destination-source-id": ids}}}]})
    }

    fn tag(v: &str) -> Vec<(String, String)> {
        vec![("kinesis-destination-source-id".into(), v.into())]
    }

    #[test]
    fn the_tag_principal_action_and_resource_must_all_match() {
        let p = policy(json!("src_b"));
        assert!(allows(&p, WRITER, &tag("src_b"), "kinesis:PutRecords", ARN));
        assert!(
            !allows(&p, WRITER, &tag("src_a"), "kinesis:PutRecords", ARN),
            "another tenant's tag"
        );
        assert!(
            !allows(&p, WRITER, &[], "kinesis:PutRecords", ARN),
            "no tag"
        );
        assert!(!allows(
            &p,
            "arn:aws:iam::999999999999:role/other",
            &tag("src_b"),
            "kinesis:PutRecord",
            ARN
        ));
        assert!(!allows(
            &p,
            WRITER,
            &tag("src_b"),
            "kinesis:DeleteStream",
            ARN
        ));
        assert!(!allows(
            &p,
            WRITER,
            &tag("src_b"),
            "kinesis:PutRecord",
            "arn:aws:kinesis:us-east-1:222222222222:stream/t"
        ));
        // Any of a list of values; an explicit Deny wins.
        let p = policy(json!(["src_a", "src_b"]));
        assert!(allows(&p, WRITER, &tag("src_a"), "kinesis:PutRecord", ARN));
        let mut denied = p.clone();
        denied["Statement"]
            .as_array_mut()
            .unwrap()
            .push(json!({"Effect": "Deny",
            "Principal": "*", "Action": "kinesis:*", "Resource": "*"}));
        assert!(!allows(
            &denied,
            WRITER,
            &tag("src_a"),
            "kinesis:PutRecord",
            ARN
        ));
        // An operator the fake does not evaluate grants nothing.
        let mut other = policy(json!("src_b"));
        other["Statement"][0]["Condition"] =
            json!({"StringLikeIfExists": {"aws:PrincipalTag/x": "*"}});
        assert!(!allows(
            &other,
            WRITER,
            &tag("src_b"),
            "kinesis:PutRecord",
            ARN
        ));
        // ... and denies in full: a Deny it cannot evaluate applies.
        let mut guarded = policy(json!("src_b"));
        guarded["Statement"]
            .as_array_mut()
            .unwrap()
            .push(json!({"Effect": "Deny",
            "Principal": "*", "Action": "kinesis:*", "Resource": "*",
            "Condition": {"StringNotEqualsIfExists": {"aws:SourceVpc": "vpc-1"}}}));
        assert!(!allows(
            &guarded,
            WRITER,
            &tag("src_b"),
            "kinesis:PutRecord",
            ARN
        ));
    }
}
