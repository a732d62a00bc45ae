//! Checks a request's SigV4 signature as AWS does: the signature is computed again from
//! the request as received (method, path, the headers it names as signed, the body)
//! with the secret the fake issued for its access key, and must match. A request
//! whose headers, host, path or body changed after signing is refused.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use axum::http::{HeaderMap, Method, Uri};

/// What the `Authorization` header says.
struct Authorization<'a> {
    access_key: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn parse(header: &str) -> Option<Authorization<'_>> {
    let rest = header.strip_prefix("AWS4-HMAC-SHA256 ")?;
    let mut credential = None;
    let mut signed = None;
    let mut signature = None;
    for part in rest.split(',').map(str::trim) {
        if let Some(v) = part.strip_prefix("Credential=") {
            credential = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            signature = Some(v);
        }
    }
    let mut scope = credential?.split('/');
    let access_key = scope.next()?;
    let _date = scope.next()?;
    let region = scope.next()?;
    let service = scope.next()?;
    Some(Authorization {
        access_key,
        region,
        service,
        signed_headers: signed?.split(';').collect(),
        signature: signature?,
    })
}

/// `YYYYMMDDTHHMMSSZ` as a time.
fn amz_date(s: &str) -> Option<SystemTime> {
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(4..6)?, n(6..8)?);
    let (hh, mm, ss) = (n(9..11)?, n(11..13)?, n(13..15)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// Why a signature is refused, in AWS's words.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Its time is more than 5 minutes from the service's.
    Skewed(String),
    /// Anything else: wrong secret, token, headers, scope.
    Invalid(String),
}

impl From<&str> for Refusal {
    fn from(why: &str) -> Self {
        Refusal::Invalid(why.to_owned())
    }
}

impl From<String> for Refusal {
    fn from(why: String) -> Self {
        Refusal::Invalid(why)
    }
}

/// `YYYYMMDDTHHMMSSZ` of a time.
fn amz_date_of(t: SystemTime) -> String {
    aws_smithy_types::DateTime::from(t)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .map(|s| s.chars().filter(|c| !matches!(c, '-' | ':')).collect())
        .unwrap_or_default()
}

/// The request's `X-Amz-Date`, if it is within 5 minutes of the service's time `now`.
/// AWS refuses a signature further away ("the request must reach AWS within five minutes
/// of the time stamp in the request":
/// https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv-signing-elements.html)
/// with these messages (STS under the code `SignatureDoesNotMatch`, Kinesis under
/// `InvalidSignatureException`).
pub(super) fn within_five_minutes(
    headers: &HeaderMap,
    now: SystemTime,
) -> Result<SystemTime, Refusal> {
    let time = headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .and_then(amz_date)
        .ok_or("missing or malformed X-Amz-Date")?;
    let window = Duration::from_secs(300);
    if time + window < now {
        return Err(Refusal::Skewed(format!(
            "Signature expired: {} is now earlier than {} ({} - 5 min.)",
            amz_date_of(time),
            amz_date_of(now - window),
            amz_date_of(now)
        )));
    }
    if time > now + window {
        return Err(Refusal::Skewed(format!(
            "Signature not yet current: {} is still later than {} ({} + 5 min.)",
            amz_date_of(time),
            amz_date_of(now + window),
            amz_date_of(now)
        )));
    }
    Ok(time)
}

/// Whether the request carries a valid signature by `secret` (and `token`), judged at
/// the service's time `now`. `Err` says what is wrong, as AWS's message would.
pub(super) fn verify(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    secret: &str,
    token: &str,
    now: SystemTime,
) -> Result<(), Refusal> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let auth = header("authorization")
        .and_then(parse)
        .ok_or("missing or malformed Authorization header")?;
    let time = within_five_minutes(headers, now)?;
    if auth.service != "kinesis" {
        return Err(format!(
            "credential scope names service {:?}, not kinesis",
            auth.service
        )
        .into());
    }
    if header("x-amz-security-token") != Some(token) {
        return Err("the security token does not match the access key".into());
    }
    // The signer adds the date and token headers itself.
    let signed: Vec<(&str, &str)> = auth
        .signed_headers
        .iter()
        .filter(|h| !matches!(**h, "x-amz-date" | "x-amz-security-token"))
        .map(|h| {
            Ok((
                *h,
                header(h).ok_or_else(|| format!("signed header {h} is missing"))?,
            ))
        })
        .collect::<Result<_, String>>()?;
    let host = header("host").ok_or("no Host header")?;
    let url = format!(
        "http://{host}{}",
        uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let identity: Identity = Credentials::new(
        auth.access_key,
        secret,
        Some(token.to_owned()),
        None,
        "fake",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(auth.region)
        .name(auth.service)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| Refusal::Invalid(e.to_string()))?
        .into();
    let request = SignableRequest::new(
        method.as_str(),
        url,
        signed.into_iter(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| e.to_string())?;
    let (_, expected) = sign(request, &params)
        .map_err(|e| Refusal::Invalid(e.to_string()))?
        .into_parts();
    if expected == auth.signature {
        Ok(())
    } else {
        Err(Refusal::Invalid(
            "The request signature we calculated does not match the signature you provided.".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request signed as a client signs it, then as received.
    fn signed(body: &[u8]) -> (Method, Uri, HeaderMap) {
        signed_at(body, SystemTime::now(), "kinesis")
    }

    fn signed_at(body: &[u8], time: SystemTime, service: &str) -> (Method, Uri, HeaderMap) {
        let identity: Identity =
            Credentials::new("AK", "secret", Some("token".into()), None, "test").into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region("eu-west-1")
            .name(service)
            .time(time)
            .settings(SigningSettings::default())
            .build()
            .unwrap()
            .into();
        let headers = [
            ("content-type", "application/x-amz-json-1.1"),
            ("host", "127.0.0.1:4566"),
            ("x-amz-target", "Kinesis_20131202.PutRecord"),
        ];
        let request = SignableRequest::new(
            "POST",
            "http://127.0.0.1:4566/",
            headers.iter().copied(),
            SignableBody::Bytes(body),
        )
        .unwrap();
        let (instructions, _) = sign(request, &params).unwrap().into_parts();
        let mut req = axum::http::Request::post("http://127.0.0.1:4566/");
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let mut req = req.body(()).unwrap();
        instructions.apply_to_request_http1x(&mut req);
        let (parts, ()) = req.into_parts();
        (parts.method, "/".parse().unwrap(), parts.headers)
    }

    #[test]
    fn a_request_verifies_only_as_it_was_signed() {
        let body = br#"{"StreamName":"s"}"#;
        let (method, uri, headers) = signed(body);
        let verify_now =
            |uri: &Uri, headers: &HeaderMap, body: &[u8], secret: &str, token: &str| {
                verify(
                    &method,
                    uri,
                    headers,
                    body,
                    secret,
                    token,
                    SystemTime::now(),
                )
            };
        assert_eq!(verify_now(&uri, &headers, body, "secret", "token"), Ok(()));
        assert!(
            verify_now(&uri, &headers, b"{}", "secret", "token").is_err(),
            "body changed"
        );
        assert!(
            verify_now(&uri, &headers, body, "other", "token").is_err(),
            "wrong secret"
        );
        assert!(
            verify_now(&uri, &headers, body, "secret", "other").is_err(),
            "wrong token"
        );
        let other_path: Uri = "/x".parse().unwrap();
        assert!(verify_now(&other_path, &headers, body, "secret", "token").is_err());
        let mut moved = headers.clone();
        moved.insert("host", "127.0.0.1:4567".parse().unwrap());
        assert!(
            verify_now(&uri, &moved, body, "secret", "token").is_err(),
            "host changed"
        );
        let mut retargeted = headers.clone();
        retargeted.insert(
            "x-amz-target",
            "Kinesis_20131202.PutRecords".parse().unwrap(),
        );
        assert!(verify_now(&uri, &retargeted, body, "secret", "token").is_err());
        let mut unsigned = headers;
        unsigned.remove("authorization");
        assert!(verify_now(&uri, &unsigned, body, "secret", "token").is_err());
        let old = SystemTime::now() - Duration::from_secs(600);
        let (method, uri, stale) = signed_at(body, old, "kinesis");
        assert!(
            matches!(
                verify_now(&uri, &stale, body, "secret", "token"),
                Err(Refusal::Skewed(m)) if m.starts_with("Signature expired: ")
            ),
            "10 minutes old"
        );
        // The same request at a service whose clock is 10 minutes behind is on time.
        assert_eq!(
            verify(&method, &uri, &stale, body, "secret", "token", old),
            Ok(())
        );
        let ahead = SystemTime::now() + Duration::from_secs(600);
        let (_, uri, early) = signed_at(body, ahead, "kinesis");
        assert!(matches!(
            verify_now(&uri, &early, body, "secret", "token"),
            Err(Refusal::Skewed(m)) if m.starts_with("Signature not yet current: ")
        ));
        let (_, uri, other) = signed_at(body, SystemTime::now(), "firehose");
        assert!(
            verify_now(&uri, &other, body, "secret", "token").is_err(),
            "another service"
        );
    }

    #[test]
    fn amz_dates_read_as_utc() {
        assert_eq!(amz_date("19700101T000000Z"), Some(UNIX_EPOCH));
        assert_eq!(
            amz_date("20261126T213000Z"),
            Some(UNIX_EPOCH + Duration::from_secs(1_795_728_600))
        );
        assert_eq!(amz_date("2026"), None);
    }
}
