//! The fake's STS: AssumeRole checked against the role's trust policy, credentials
//! issued with an expiry, GetCallerIdentity; XML answers (query protocol).

use std::sync::Mutex;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::{Inner, Issued, CALLER_ACCOUNT};
use crate::proxy::AssumeRoleCall;

/// Does the trust policy let our caller assume the role with this external ID?
fn trusts(policy: &Value, external_id: Option<&str>) -> bool {
    let caller_root = format!("arn:aws:iam::{CALLER_ACCOUNT}:root");
    let as_list = |v: &Value| -> Vec<String> {
        match v {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect(),
            _ => vec![],
        }
    };
    let statements = match &policy["Statement"] {
        Value::Array(a) => a.clone(),
        s @ Value::Object(_) => vec![s.clone()],
        _ => vec![],
    };
    statements.iter().any(|st| {
        st["Effect"] == "Allow"
            && as_list(&st["Action"]).iter().any(|a| a == "sts:AssumeRole")
            && as_list(&st["Principal"]["AWS"])
                .iter()
                .any(|p| p == "*" || *p == caller_root)
            && match st["Condition"]["StringEquals"].get("sts:ExternalId") {
                None => true,
                Some(ids) => external_id.is_some_and(|x| as_list(ids).iter().any(|id| id == x)),
            }
    })
}

pub(super) fn sts(inner: &Mutex<Inner>, body: &[u8]) -> Response {
    let form: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    let get = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    if get("Action").as_deref() == Some("GetCallerIdentity") {
        if inner.lock().unwrap().reject_caller {
            return sts_error(
                403,
                "InvalidClientTokenId",
                "The security token included in the request is invalid.",
            );
        }
        let xml = format!(
            r#"<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <GetCallerIdentityResult>
    <Arn>arn:aws:iam::{CALLER_ACCOUNT}:user/worker</Arn>
    <UserId>AIDAFAKE</UserId>
    <Account>{CALLER_ACCOUNT}</Account>
  </GetCallerIdentityResult>
  <ResponseMetadata><RequestId>fake</RequestId></ResponseMetadata>
</GetCallerIdentityResponse>"#
        );
        return ([("content-type", "text/xml")], xml).into_response();
    }
    if get("Action").as_deref() != Some("AssumeRole") {
        return (
            StatusCode::BAD_REQUEST,
            "only AssumeRole and GetCallerIdentity are faked",
        )
            .into_response();
    }
    let role = get("RoleArn").unwrap_or_default();
    let external_id = get("ExternalId");
    let mut inner = inner.lock().unwrap();
    inner.assume_role.push(AssumeRoleCall {
        role_arn: role.clone(),
        external_id: external_id.clone(),
    });
    if inner.reject_caller {
        return sts_error(
            403,
            "InvalidClientTokenId",
            "The security token included in the request is invalid.",
        );
    }
    if let Some(policy) = inner.trust.get(&role) {
        if !trusts(policy, external_id.as_deref()) {
            return sts_error(
                403,
                "AccessDenied",
                &format!("User: arn:aws:iam::{CALLER_ACCOUNT}:user/worker is not authorized to perform: sts:AssumeRole on resource: {role}"),
            );
        }
    }
    // Session tags (`Tags.member.N.Key` / `.Value`), which a resource policy's
    // `aws:PrincipalTag/...` condition reads.
    let tags: Vec<(String, String)> = (1..=50)
        .map_while(|i| {
            Some((
                get(&format!("Tags.member.{i}.Key"))?,
                get(&format!("Tags.member.{i}.Value")).unwrap_or_default(),
            ))
        })
        .collect();
    let n = inner.assume_role.len();
    let lifetime = inner
        .credential_lifetime
        .unwrap_or(Duration::from_secs(3600));
    let expires = inner.now() + lifetime;
    let access_key = format!("ASIAFAKE{n:012}");
    inner.issued.insert(
        access_key.clone(),
        Issued {
            role: role.clone(),
            expires,
            secret: format!("fake-secret-{n}"),
            token: format!("fake-token-{n}"),
            tags,
        },
    );
    let expires = aws_smithy_types::DateTime::from(expires)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_default();
    let xml = format!(
        r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <Credentials>
      <AccessKeyId>{access_key}</AccessKeyId>
      <SecretAccessKey>fake-secret-{n}</SecretAccessKey>
      <SessionToken>fake-token-{n}</SessionToken>
      <Expiration>{expires}</Expiration>
    </Credentials>
    <AssumedRoleUser>
      <AssumedRoleId>AROAFAKE:{n}</AssumedRoleId>
      <Arn>{role}/session</Arn>
    </AssumedRoleUser>
  </AssumeRoleResult>
  <ResponseMetadata><RequestId>fake-{n}</RequestId></ResponseMetadata>
</AssumeRoleResponse>"#
    );
    ([("content-type", "text/xml")], xml).into_response()
}

pub(super) fn sts_error(status: u16, code: &str, message: &str) -> Response {
    let xml = format!(
        r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>
  <RequestId>fake</RequestId>
</ErrorResponse>"#
    );
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN),
        [("content-type", "text/xml")],
        xml,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn trust_policy_in_iam_json_form() {
        let one = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
            "Principal": {"AWS": "arn:aws:iam::999999999999:root"}, "Action": "sts:AssumeRole",
            "Condition": {"StringEquals": {"sts:ExternalId": "src_1"}}}]});
        assert!(trusts(&one, Some("src_1")));
        assert!(!trusts(&one, Some("src_2")));
        assert!(!trusts(&one, None));
        let many = json!({"Statement": [{"Effect": "Allow",
            "Principal": {"AWS": "arn:aws:iam::999999999999:root"}, "Action": "sts:AssumeRole",
            "Condition": {"StringEquals": {"sts:ExternalId": ["a", "b"]}}}]});
        assert!(trusts(&many, Some("b")));
        let other_principal = json!({"Statement": [{"Effect": "Allow",
            "Principal": {"AWS": "arn:aws:iam::595280932656:root"}, "Action": "sts:AssumeRole"}]});
        assert!(!trusts(&other_principal, Some("a")));
    }
}
