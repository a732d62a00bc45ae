//! Kafka authentication that the worker provides itself: SASL/OAUTHBEARER tokens from a
//! token source (Amazon MSK IAM: tokens signed with the worker's AWS credentials). Every
//! Kafka client of the product (the consumer, the dead-letter producer, the settings
//! reader, the commands) carries one [`KafkaAuth`] in its librdkafka context.
//!
//! Without a token source nothing changes: librdkafka's own SASL mechanisms (PLAIN,
//! SCRAM, GSSAPI, OAUTHBEARER with `sasl.oauthbearer.method=oidc`) work as configured in
//! `[kafka.librdkafka]`.

use std::collections::BTreeMap;
use std::error::Error;
use std::ffi::{c_char, CStr, CString};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rdkafka::client::{Client, OAuthToken};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerContext;
use rdkafka::ClientContext;

/// Makes a token: its text and when it expires.
pub type TokenSource = Arc<dyn Fn() -> Result<(String, SystemTime), String> + Send + Sync>;

/// The principal name librdkafka reports for our tokens (MSK takes the identity from
/// the signature, not from this).
const PRINCIPAL: &str = "kinesis-destination";

/// How a Kafka client authenticates beyond its librdkafka settings.
#[derive(Clone, Default)]
pub struct KafkaAuth {
    tokens: Option<TokenSource>,
}

impl std::fmt::Debug for KafkaAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaAuth")
            .field("oauthbearer_tokens", &self.tokens.is_some())
            .finish()
    }
}

impl KafkaAuth {
    /// OAUTHBEARER with tokens from `tokens`.
    pub fn oauthbearer(tokens: TokenSource) -> Self {
        KafkaAuth {
            tokens: Some(tokens),
        }
    }

    pub fn is_oauthbearer(&self) -> bool {
        self.tokens.is_some()
    }

    /// Sets what the token source needs (`security.protocol=SASL_SSL`,
    /// `sasl.mechanism=OAUTHBEARER`) unless the operator's `librdkafka` settings say
    /// otherwise (e.g. `SASL_PLAINTEXT` towards a test broker).
    pub fn configure(&self, config: &mut ClientConfig, librdkafka: &BTreeMap<String, String>) {
        if !self.is_oauthbearer() {
            return;
        }
        for (key, value) in [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "OAUTHBEARER"),
        ] {
            if !librdkafka.contains_key(key) {
                config.set(key, value);
            }
        }
    }

    /// What a context's `generate_oauth_token` answers.
    pub fn token(&self) -> Result<OAuthToken, Box<dyn Error>> {
        let Some(tokens) = &self.tokens else {
            return Err(
                "sasl.mechanism OAUTHBEARER needs kafka.aws_msk_iam = true or \
                        sasl.oauthbearer.method = oidc"
                    .into(),
            );
        };
        let (token, expires) = tokens().map_err(|e| -> Box<dyn Error> { e.into() })?;
        let lifetime_ms = expires
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        tracing::debug!(lifetime_ms, "made a Kafka OAUTHBEARER token");
        Ok(OAuthToken {
            token,
            principal_name: PRINCIPAL.into(),
            lifetime_ms,
        })
    }
}

/// Gives a client a token now. librdkafka asks for tokens through an event that a
/// consumer serves only when it is polled, and does not connect before it has one: the
/// worker asks the brokers for metadata before its consumer's first poll (and again
/// while they cannot be reached, longer than a token lives). Once polled, later tokens
/// (at 80% of each one's lifetime) come through the event as usual. A failure is
/// logged; the event asks again.
pub fn set_token_now<C: ClientContext>(client: &Client<C>, auth: &KafkaAuth) {
    if !auth.is_oauthbearer() {
        return;
    }
    let result = auth.token().map_err(|e| e.to_string()).and_then(|t| {
        let value = CString::new(t.token).map_err(|e| e.to_string())?;
        let principal = CString::new(t.principal_name).map_err(|e| e.to_string())?;
        let mut errstr = [0 as c_char; 512];
        // SAFETY: the client pointer is live for the call (borrowed from `client`), the
        // strings are NUL-terminated and outlive it, no extensions are passed, and
        // librdkafka writes at most `errstr.len()` bytes into `errstr`, NUL-terminated.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_oauthbearer_set_token(
                client.native_ptr(),
                value.as_ptr(),
                t.lifetime_ms,
                principal.as_ptr(),
                std::ptr::null_mut(),
                0,
                errstr.as_mut_ptr(),
                errstr.len(),
            )
        };
        if err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            Ok(())
        } else {
            // SAFETY: librdkafka NUL-terminated what it wrote (the buffer starts zeroed).
            Err(unsafe { CStr::from_ptr(errstr.as_ptr()) }
                .to_string_lossy()
                .into_owned())
        }
    });
    if let Err(error) = result {
        tracing::warn!(%error, "cannot give the Kafka client its first OAUTHBEARER token; it will ask again");
    }
}

/// A librdkafka context that only authenticates, for clients without callbacks of
/// their own (the settings reader, the commands' clients).
#[derive(Clone, Default, Debug)]
pub struct AuthContext(pub KafkaAuth);

impl ClientContext for AuthContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(&self, _: Option<&str>) -> Result<OAuthToken, Box<dyn Error>> {
        self.0.token()
    }
}

impl ConsumerContext for AuthContext {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn without_a_token_source_the_configuration_is_left_alone_and_asking_fails_clearly() {
        let auth = KafkaAuth::default();
        let mut config = ClientConfig::new();
        auth.configure(&mut config, &BTreeMap::new());
        assert!(config.get("sasl.mechanism").is_none());
        let Err(err) = auth.token() else {
            panic!("a token without a source")
        };
        let err = err.to_string();
        assert!(err.contains("kafka.aws_msk_iam"), "{err}");
    }

    #[test]
    fn a_token_source_sets_sasl_oauthbearer_unless_the_operator_chose_otherwise() {
        let expires = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let auth = KafkaAuth::oauthbearer(Arc::new(move || Ok(("tok".into(), expires))));
        let mut config = ClientConfig::new();
        auth.configure(&mut config, &BTreeMap::new());
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.get("sasl.mechanism"), Some("OAUTHBEARER"));
        let mut plaintext = ClientConfig::new();
        let chosen =
            BTreeMap::from([("security.protocol".to_owned(), "SASL_PLAINTEXT".to_owned())]);
        auth.configure(&mut plaintext, &chosen);
        assert_eq!(
            plaintext.get("security.protocol"),
            None,
            "left to [kafka.librdkafka]"
        );
        let Ok(token) = AuthContext(auth).generate_oauth_token(None) else {
            panic!("no token")
        };
        assert_eq!(token.token, "tok");
        assert_eq!(token.lifetime_ms, 1_800_000_000_000);
        assert_eq!(
            format!("{:?}", KafkaAuth::default()),
            "KafkaAuth { oauthbearer_tokens: false }"
        );
    }
}
