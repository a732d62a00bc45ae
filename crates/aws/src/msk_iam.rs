//! Amazon MSK IAM authentication: SASL/OAUTHBEARER tokens signed with the worker's own
//! AWS credentials, as AWS's `aws-msk-iam-sasl-signer` libraries make them.
//!
//! A token is a presigned URL, `GET https://kafka.<region>.amazonaws.com/?Action=
//! kafka-cluster:Connect`, signed with SigV4 in its query (service `kafka-cluster`, valid
//! for 900 s, the session token included), plus a `User-Agent` parameter, encoded as
//! URL-safe base64 without padding. The broker checks the signature and the identity's
//! `kafka-cluster:*` permissions.
//!
//! librdkafka asks for a token when it connects and again at 80% of the last one's
//! lifetime, on whatever thread polls the client, so [`MskIamTokens::token`] only signs
//! (no I/O): the credentials are kept by a task that fetches them again from the
//! credential chain before they expire. A token never outlives the credentials it is
//! signed with.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use base64::Engine;

/// How long a token is valid at most (what AWS's signers use).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(900);
/// The `User-Agent` parameter, which MSK records.
pub const USER_AGENT: &str = concat!("kinesis-destination/", env!("CARGO_PKG_VERSION"));

/// A signed token and when it stops being valid.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthToken {
    pub token: String,
    pub expires: SystemTime,
}

impl std::fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a bearer credential for the cluster for 15 minutes.
        f.debug_struct("AuthToken")
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// Why no token could be made.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no AWS credentials for MSK IAM yet: {0}")]
    NoCredentials(String),
    #[error("the AWS credentials for MSK IAM expired and could not be renewed: {0}")]
    Expired(String),
    #[error("cannot sign the MSK IAM token: {0}")]
    Signing(String),
}

/// Signs a token for the MSK cluster in `region` with `credentials` at `now`. It is
/// valid for [`TOKEN_LIFETIME`], or until the credentials expire if that is sooner.
pub fn auth_token(
    credentials: &Credentials,
    region: &str,
    now: SystemTime,
    user_agent: &str,
) -> Result<AuthToken, TokenError> {
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(TOKEN_LIFETIME);
    let identity: Identity = credentials.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("kafka-cluster")
        .time(now)
        .settings(settings)
        .build()
        .map_err(|e| TokenError::Signing(e.to_string()))?
        .into();
    let url = format!("https://kafka.{region}.amazonaws.com/?Action=kafka-cluster%3AConnect");
    let signable = SignableRequest::new(
        "GET",
        &url,
        std::iter::empty(),
        // The empty body's hash, as AWS's signers (botocore) put in the canonical request.
        SignableBody::Bytes(&[]),
    )
    .map_err(|e| TokenError::Signing(e.to_string()))?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| TokenError::Signing(e.to_string()))?
        .into_parts();
    let mut request = http::Request::builder()
        .uri(&url)
        .body(())
        .map_err(|e| TokenError::Signing(e.to_string()))?;
    instructions.apply_to_request_http1x(&mut request);
    // Not signed: added after, as AWS's signers do.
    let signed = format!(
        "{}&User-Agent={}",
        request.uri(),
        percent_encode(user_agent)
    );
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signed);
    // Whole seconds, as in X-Amz-Date.
    let signed_at = UNIX_EPOCH
        + Duration::from_secs(now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs());
    let mut expires = signed_at + TOKEN_LIFETIME;
    if let Some(credentials_expire) = credentials.expiry() {
        expires = expires.min(credentials_expire);
    }
    Ok(AuthToken { token, expires })
}

/// RFC 3986 percent-encoding of a query value (every byte but the unreserved ones).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Tokens for one MSK cluster's region, signed with the worker's credentials, which a
/// task keeps fresh.
pub struct MskIamTokens {
    region: String,
    credentials: Mutex<Result<Credentials, String>>,
}

impl std::fmt::Debug for MskIamTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MskIamTokens")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// Credentials are fetched again this long before they expire (at most half their
/// remaining life), and after a failure this long after.
const REFRESH_AHEAD: Duration = Duration::from_secs(300);
const RETRY_AFTER: Duration = Duration::from_secs(10);
/// Failed fetches of the first credentials before giving up (1 + 2 + 4 + 8 s apart).
const START_ATTEMPTS: u32 = 4;

impl MskIamTokens {
    /// Fetches the credentials from `provider` once (an error here is a start-up
    /// error: the worker has no AWS identity for the cluster), then keeps them fresh
    /// in a task for as long as the returned value is alive.
    pub async fn start(
        provider: SharedCredentialsProvider,
        region: String,
    ) -> Result<Arc<MskIamTokens>, TokenError> {
        // A pod's credential source may not answer at its very start (the instance
        // metadata service, EKS's Pod Identity agent): a few tries, 15 s in all.
        let mut attempt = 0;
        let first = loop {
            match provider.provide_credentials().await {
                Ok(c) => break c,
                Err(e) if attempt < START_ATTEMPTS => {
                    tracing::warn!(error = %crate::errors::chain(Some(&e)), "no AWS credentials for MSK IAM yet; trying again");
                    tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(TokenError::NoCredentials(crate::errors::chain(Some(&e)))),
            }
        };
        let tokens = Arc::new(MskIamTokens {
            region,
            credentials: Mutex::new(Ok(first)),
        });
        let weak = Arc::downgrade(&tokens);
        tokio::spawn(async move {
            let mut failed = false;
            loop {
                let mut wait = match weak.upgrade() {
                    Some(t) => t.until_refresh(SystemTime::now()),
                    None => return,
                };
                if failed {
                    // Not the ever shorter halves of what is left before expiry.
                    wait = wait.clamp(Duration::from_secs(1), RETRY_AFTER);
                }
                tokio::time::sleep(wait).await;
                let fetched = provider.provide_credentials().await;
                let Some(tokens) = weak.upgrade() else { return };
                failed = fetched.is_err();
                match fetched {
                    Ok(c) => *tokens.lock() = Ok(c),
                    Err(e) => {
                        let why = crate::errors::chain(Some(&e));
                        tracing::warn!(error = %why, "cannot renew the AWS credentials for MSK IAM; will retry");
                        let mut held = tokens.lock();
                        // Credentials still valid are kept; an error shows only once
                        // they have expired.
                        if held
                            .as_ref()
                            .is_ok_and(|c| c.expiry().is_some_and(|e| e <= SystemTime::now()))
                        {
                            *held = Err(why);
                        }
                    }
                }
            }
        });
        Ok(tokens)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Result<Credentials, String>> {
        self.credentials.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long until the credentials are to be fetched again.
    fn until_refresh(&self, now: SystemTime) -> Duration {
        match &*self.lock() {
            Ok(c) => match c.expiry() {
                Some(expiry) => {
                    let left = expiry.duration_since(now).unwrap_or_default();
                    left.saturating_sub(REFRESH_AHEAD.min(left / 2))
                }
                // Long-lived keys: checked again now and then all the same (a rotated
                // key in the environment or profile).
                None => REFRESH_AHEAD,
            },
            Err(_) => RETRY_AFTER,
        }
    }

    /// A token signed now (no I/O: safe on any thread).
    pub fn token(&self) -> Result<AuthToken, TokenError> {
        let now = SystemTime::now();
        let credentials = match &*self.lock() {
            Ok(c) => c.clone(),
            Err(why) => return Err(TokenError::Expired(why.clone())),
        };
        if credentials.expiry().is_some_and(|e| e <= now) {
            return Err(TokenError::Expired(
                "their expiry has passed and no renewal arrived".into(),
            ));
        }
        auth_token(&credentials, &self.region, now, USER_AGENT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The URL inside a token, and its query as a map.
    fn decode(token: &str) -> (String, BTreeMap<String, String>) {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .unwrap();
        let url = String::from_utf8(bytes).unwrap();
        let (_, query) = url.split_once('?').unwrap();
        let map = query
            .split('&')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect();
        (url, map)
    }

    fn at_noon() -> SystemTime {
        // 2026-11-26T12:00:00Z
        UNIX_EPOCH + Duration::from_secs(1_795_694_400)
    }

    /// Made by AWS's own signer (`aws-msk-iam-sasl-signer-python` 1.0.2, botocore's
    /// SigV4QueryAuth) with the clock at 2026-11-26T12:00:00Z.
    const PYTHON_SIGNED_WITH_SESSION: &str = "aHR0cHM6Ly9rYWZrYS51cy1lYXN0LTEuYW1hem9uYXdzLmNvbS8_QWN0aW9uPWthZmthLWNsdXN0ZXIlM0FDb25uZWN0JlgtQW16LUFsZ29yaXRobT1BV1M0LUhNQUMtU0hBMjU2JlgtQW16LUNyZWRlbnRpYWw9QUtJREVYQU1QTEUlMkYyMDI2MTEyNiUyRnVzLWVhc3QtMSUyRmthZmthLWNsdXN0ZXIlMkZhd3M0X3JlcXVlc3QmWC1BbXotRGF0ZT0yMDI2MTEyNlQxMjAwMDBaJlgtQW16LUV4cGlyZXM9OTAwJlgtQW16LVNpZ25lZEhlYWRlcnM9aG9zdCZYLUFtei1TZWN1cml0eS1Ub2tlbj1zZXNzaW9uLXRva2VuJTJGd2l0aCUyQmNoYXJzJTNEJlgtQW16LVNpZ25hdHVyZT03OWVhZjUzNWFmZDYwYmYyOGMyYTlhZGU3MzI0NDk0YjhhMmMwZDJiNDgyMjM0ZDdlNTA3MWE0ZDRlYTk0N2EzJlVzZXItQWdlbnQ9YXdzLW1zay1pYW0tc2FzbC1zaWduZXItcHl0aG9uJTJGMS4wLjI";
    const PYTHON_SIGNED_LONG_LIVED: &str = "aHR0cHM6Ly9rYWZrYS5ldS13ZXN0LTEuYW1hem9uYXdzLmNvbS8_QWN0aW9uPWthZmthLWNsdXN0ZXIlM0FDb25uZWN0JlgtQW16LUFsZ29yaXRobT1BV1M0LUhNQUMtU0hBMjU2JlgtQW16LUNyZWRlbnRpYWw9QUtJREVYQU1QTEUlMkYyMDI2MTEyNiUyRmV1LXdlc3QtMSUyRmthZmthLWNsdXN0ZXIlMkZhd3M0X3JlcXVlc3QmWC1BbXotRGF0ZT0yMDI2MTEyNlQxMjAwMDBaJlgtQW16LUV4cGlyZXM9OTAwJlgtQW16LVNpZ25lZEhlYWRlcnM9aG9zdCZYLUFtei1TaWduYXR1cmU9NmQxYjQzZmJlMzE3OTlkMTYwNmRhMjZjZWM1ZmViZGQ1NzhkZjkzYTJhNzNhM2VkYjQyNjQ0ZWVmMjYwN2YzYSZVc2VyLUFnZW50PWF3cy1tc2staWFtLXNhc2wtc2lnbmVyLXB5dGhvbiUyRjEuMC4y";
    const PYTHON_USER_AGENT: &str = "aws-msk-iam-sasl-signer-python/1.0.2";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    #[test]
    fn a_token_matches_aws_own_signer_with_a_session_token() {
        let credentials = Credentials::new(
            "AKIDEXAMPLE",
            SECRET,
            Some("session-token/with+chars=".into()),
            None,
            "test",
        );
        let ours = auth_token(&credentials, "us-east-1", at_noon(), PYTHON_USER_AGENT).unwrap();
        let (our_url, our_query) = decode(&ours.token);
        let (aws_url, aws_query) = decode(PYTHON_SIGNED_WITH_SESSION);
        assert_eq!(our_query, aws_query, "{our_url}\n{aws_url}");
        assert_eq!(
            our_query["X-Amz-Signature"],
            "79eaf535afd60bf28c2a9ade7324494b8a2c0d2b482234d7e5071a4d4ea947a3"
        );
        assert!(our_url.starts_with("https://kafka.us-east-1.amazonaws.com/?"));
        assert!(our_url.ends_with("&User-Agent=aws-msk-iam-sasl-signer-python%2F1.0.2"));
        assert_eq!(ours.expires, at_noon() + TOKEN_LIFETIME);
        assert!(
            !ours.token.contains('=') && !ours.token.contains('+') && !ours.token.contains('/')
        );
    }

    #[test]
    fn a_token_matches_aws_own_signer_with_long_lived_keys() {
        let credentials = Credentials::new("AKIDEXAMPLE", SECRET, None, None, "test");
        let ours = auth_token(&credentials, "eu-west-1", at_noon(), PYTHON_USER_AGENT).unwrap();
        assert_eq!(decode(&ours.token).1, decode(PYTHON_SIGNED_LONG_LIVED).1);
        // Another second, another signature.
        let later = auth_token(
            &credentials,
            "eu-west-1",
            at_noon() + Duration::from_secs(1),
            PYTHON_USER_AGENT,
        )
        .unwrap();
        assert_ne!(
            decode(&later.token).1["X-Amz-Signature"],
            decode(&ours.token).1["X-Amz-Signature"]
        );
    }

    #[test]
    fn a_token_never_outlives_its_credentials() {
        let expiry = at_noon() + Duration::from_secs(120);
        let credentials = Credentials::new(
            "AKIDEXAMPLE",
            SECRET,
            Some("t".into()),
            Some(expiry),
            "test",
        );
        let token = auth_token(&credentials, "us-east-1", at_noon(), USER_AGENT).unwrap();
        assert_eq!(token.expires, expiry);
        assert!(
            format!("{token:?}").contains("expires")
                && !format!("{token:?}").contains(&token.token)
        );
    }

    type Answer = Result<Credentials, aws_credential_types::provider::error::CredentialsError>;

    /// A credential source answering its `n`th call (from 0) with `answer(n)`, counting
    /// the calls.
    struct Scripted<F> {
        calls: Arc<std::sync::atomic::AtomicUsize>,
        answer: F,
    }

    impl<F> std::fmt::Debug for Scripted<F> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Scripted")
        }
    }

    impl<F: Fn(usize) -> Answer + Send + Sync> ProvideCredentials for Scripted<F> {
        fn provide_credentials<'a>(
            &'a self,
        ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            aws_credential_types::provider::future::ProvideCredentials::ready((self.answer)(n))
        }
    }

    /// `answer` as a shared provider, and its call count.
    fn scripted(
        answer: impl Fn(usize) -> Answer + Send + Sync + 'static,
    ) -> (
        SharedCredentialsProvider,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let provider = Scripted {
            calls: calls.clone(),
            answer,
        };
        (SharedCredentialsProvider::new(provider), calls)
    }

    #[tokio::test]
    async fn short_lived_credentials_are_renewed_before_they_expire_and_tokens_follow() {
        // A new key at every call, valid for two seconds.
        let (provider, calls) = scripted(|n| {
            Ok(Credentials::new(
                format!("AKID{n}"),
                SECRET,
                Some(format!("token-{n}")),
                Some(SystemTime::now() + Duration::from_secs(2)),
                "rotating",
            ))
        });
        let tokens = MskIamTokens::start(provider, "us-east-1".into())
            .await
            .unwrap();
        let first = tokens.token().unwrap();
        let credential = |t: &AuthToken| decode(&t.token).1["X-Amz-Credential"].clone();
        assert!(
            credential(&first).starts_with("AKID0%2F"),
            "{}",
            credential(&first)
        );
        // Two-second credentials: the token lives as long as they do, not 900 s.
        let life = first
            .expires
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        assert!(life <= Duration::from_secs(2), "{life:?}");
        // Renewed at half their life, before they expire: the next token is signed
        // with the new key, and there never is a moment without valid credentials.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let t = tokens.token().expect("valid credentials all along");
            if credential(&t).starts_with("AKID1%2F") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never renewed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(calls.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    }

    /// A credential source that fails `failures` times, then answers.
    fn late(failures: usize) -> impl Fn(usize) -> Answer + Send + Sync + 'static {
        move |n| {
            if n < failures {
                Err(
                    aws_credential_types::provider::error::CredentialsError::not_loaded(
                        "the metadata service is not up yet",
                    ),
                )
            } else {
                Ok(Credentials::new("AKIDLATE", SECRET, None, None, "late"))
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_credential_source_late_at_start_is_waited_for_a_while() {
        let (provider, calls) = scripted(late(3));
        let tokens = MskIamTokens::start(provider, "us-east-1".into())
            .await
            .expect("the fourth try answers");
        assert!(tokens.token().is_ok());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 4);

        let (never, _) = scripted(late(usize::MAX));
        let err = MskIamTokens::start(never, "us-east-1".into())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not up yet"), "{err}");
    }

    #[test]
    fn credentials_past_their_expiry_give_no_token() {
        let tokens = MskIamTokens {
            region: "us-east-1".into(),
            credentials: Mutex::new(Ok(Credentials::new(
                "AKID",
                SECRET,
                None,
                Some(SystemTime::now() - Duration::from_secs(1)),
                "test",
            ))),
        };
        assert!(matches!(tokens.token(), Err(TokenError::Expired(_))));
    }
}
