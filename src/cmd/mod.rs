//! One module per command. Each parses its own flags and returns an exit code, or a
//! [`CliError`] that says whether the user (exit 2) or the world (exit 1) is at fault.

pub mod check;
pub mod policy;
pub mod produce;
pub mod replay;
pub mod run;
pub mod status;
pub mod tail;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use kd_tenants::{Snapshot, TenantStore};

use crate::config::Config;

/// What went wrong, as the user sees it: always one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad configuration or flags: exit code 2.
    #[error("{0}")]
    Usage(String),
    /// A failure outside the user's input (network, broker, AWS): exit code 1.
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Usage(_) => ExitCode::from(2),
            CliError::Failed(_) => ExitCode::FAILURE,
        }
    }
}

impl From<crate::config::ConfigError> for CliError {
    fn from(e: crate::config::ConfigError) -> Self {
        CliError::Usage(format!("config: {e}"))
    }
}

/// Logs to stderr: text or JSON lines, filtered by `RUST_LOG` or else `level`.
pub fn init_logging(format: &str, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The worker's AWS configuration for one-shot commands (tail, check).
pub async fn aws_base(aws: &crate::config::AwsConfig) -> aws_config::SdkConfig {
    kd_aws::base_config(&kd_aws::AwsSettings {
        endpoint_url: aws.endpoint_url.clone(),
        api_timeout: std::time::Duration::from_secs(10),
        connect_timeout: std::time::Duration::from_secs(3),
        use_fips: aws.use_fips,
        use_dual_stack: aws.use_dualstack,
    })
    .await
}

/// Starts following the settings topic into `tenants` and waits for its first full
/// read. Returns the follower, which goes on applying changes.
pub async fn read_settings_topic(
    config: &Config,
    topic: &str,
    tenants: &Arc<TenantStore>,
) -> Result<tokio::task::JoinHandle<Result<(), kd_tenants::TopicError>>, CliError> {
    let settings = kd_tenants::TopicSettings {
        bootstrap_servers: config.kafka.bootstrap_servers.clone(),
        topic: topic.to_owned(),
        librdkafka: config.kafka.librdkafka.clone(),
        auth: config.kafka.auth.clone(),
        flush_interval: Duration::from_millis(config.tenants.flush_interval_ms.max(1)),
    };
    let mut follower = tokio::spawn(kd_tenants::follow_topic(settings, tenants.clone()));
    tracing::info!(%topic, "reading tenant settings topic");
    let mut progress = tokio::time::interval(Duration::from_millis(50));
    while !tenants.is_loaded() {
        tokio::select! {
            _ = progress.tick() => {}
            ended = &mut follower => {
                return Err(match ended {
                    Ok(Err(e)) => CliError::Usage(format!("config: tenants.topic: {e}")),
                    Ok(Ok(())) => CliError::Failed("tenant settings reader stopped".into()),
                    Err(e) => CliError::Failed(format!("tenant settings reader failed: {e}")),
                });
            }
        }
    }
    Ok(follower)
}

/// Gives the configuration's Kafka clients the token source `kafka.aws_msk_iam` asks
/// for: MSK IAM tokens signed from the worker's own AWS credentials (fetched once here,
/// then kept fresh), for the cluster in `kafka.aws_msk_region` (else `AWS_REGION`).
///
/// With `readiness`, a token that cannot be made takes readiness away until one can.
pub async fn with_kafka_auth(
    mut config: Config,
    readiness: Option<Arc<kd_telemetry::Readiness>>,
) -> Result<Config, CliError> {
    if !config.kafka.aws_msk_iam {
        return Ok(config);
    }
    let region = config
        .kafka
        .aws_msk_region
        .clone()
        .or_else(|| std::env::var("AWS_REGION").ok())
        .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
        .filter(|r| !r.trim().is_empty())
        .ok_or_else(|| {
            CliError::Usage(
                "config: kafka.aws_msk_region: is required with kafka.aws_msk_iam (or set AWS_REGION)"
                    .into(),
            )
        })?;
    let aws = &config.aws;
    let base = kd_aws::base_config(&kd_aws::AwsSettings {
        endpoint_url: aws.endpoint_url.clone(),
        api_timeout: Duration::from_millis(aws.api_timeout_ms),
        connect_timeout: Duration::from_millis(aws.connect_timeout_ms),
        use_fips: aws.use_fips,
        use_dual_stack: aws.use_dualstack,
    })
    .await;
    let provider = base.credentials_provider().ok_or_else(|| {
        CliError::Usage("config: kafka.aws_msk_iam: no AWS credential chain".into())
    })?;
    let tokens = kd_aws::msk_iam::MskIamTokens::start(provider, region.clone())
        .await
        .map_err(|e| CliError::Usage(format!("config: kafka.aws_msk_iam: {e}")))?;
    tracing::info!(%region, "Kafka clients authenticate with MSK IAM");
    config.kafka.auth = kd_kafka::auth::KafkaAuth::oauthbearer(token_source(tokens, readiness));
    Ok(config)
}

/// Tokens from `tokens`; one that cannot be made takes `readiness` away until one can.
fn token_source(
    tokens: Arc<kd_aws::msk_iam::MskIamTokens>,
    readiness: Option<Arc<kd_telemetry::Readiness>>,
) -> kd_kafka::auth::TokenSource {
    Arc::new(move || {
        let token = tokens.token().map_err(|e| e.to_string());
        if let Some(r) = &readiness {
            let why = token
                .as_ref()
                .err()
                .map(|e| format!("Kafka authentication: {e}"));
            r.set_problem(kd_telemetry::Problem::KafkaAuth, why);
        }
        token.map(|t| (t.token, t.expires))
    })
}

/// The tenant settings a one-shot command (check, tail) looks a tenant up in: the
/// tenants file, or the settings topic read once to its end. Also says where they came
/// from, for messages.
pub async fn tenant_settings(config: &Config) -> Result<(Arc<Snapshot>, String), CliError> {
    match (&config.tenants.file, &config.tenants.topic) {
        (Some(file), _) => {
            let (snapshot, _) = kd_tenants::load_file(file)
                .map_err(|e| CliError::Usage(format!("config: tenants.file: {e}")))?;
            Ok((Arc::new(snapshot), file.display().to_string()))
        }
        (None, Some(topic)) => {
            let tenants = Arc::new(TenantStore::new());
            let follower = read_settings_topic(config, topic, &tenants).await?;
            follower.abort();
            Ok((tenants.snapshot(), format!("topic {topic}")))
        }
        (None, None) => Err(CliError::Usage("config: tenants.file: is required".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_credential_types::provider::SharedCredentialsProvider;
    use aws_credential_types::Credentials;
    use std::time::SystemTime;

    async fn tokens(credentials: Credentials) -> Arc<kd_aws::msk_iam::MskIamTokens> {
        let provider = SharedCredentialsProvider::new(credentials);
        kd_aws::msk_iam::MskIamTokens::start(provider, "eu-west-1".into())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_kafka_token_that_cannot_be_made_takes_readiness_away_until_one_can() {
        let readiness = Arc::new(kd_telemetry::Readiness::default());
        readiness.set_tenants_loaded();
        readiness.set_joined_group();
        assert!(readiness.is_ready());
        let expired = Credentials::new(
            "AKID",
            "secret",
            None,
            Some(SystemTime::now() - Duration::from_secs(1)),
            "test",
        );
        let source = token_source(tokens(expired).await, Some(readiness.clone()));
        assert!(source().is_err());
        assert!(!readiness.is_ready(), "no token: not ready");

        let valid = Credentials::new("AKID", "secret", None, None, "test");
        let source = token_source(tokens(valid).await, Some(readiness.clone()));
        assert!(source().is_ok());
        assert!(readiness.is_ready(), "a token again: ready");
    }
}
