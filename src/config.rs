//! The configuration file: TOML, every key overridable from the environment as
//! `KINESIS_DESTINATION__SECTION__KEY`, checked once at start-up. A bad key stops the
//! worker with exit code 2 and one line that names it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod env;
mod validate;

use env::apply_override;

/// Prefix of environment overrides; levels are separated by `__`.
pub const ENV_PREFIX: &str = "KINESIS_DESTINATION__";

/// A configuration problem, naming the key (or file) concerned.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: kd_event::text::one_line(&message.into()),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub tenants: TenantsConfig,
    pub aws: AwsConfig,
    pub http: HttpConfig,
    pub delivery: DeliveryConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub status: StatusConfig,
}

/// The `[status]` section: per-tenant delivery status (docs/delivery-status.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    /// Topic each pod produces its per-tenant records to; off when unset.
    pub topic: Option<String>,
    /// How often (and how long a window each record covers).
    pub interval_secs: u64,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            topic: None,
            interval_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Sources also counted per source (`kinesis_destination_source_*` metrics). Empty
    /// (the default) turns per-source metrics off; the list bounds their label values.
    pub source_labels: Vec<String>,
}

/// The `[kafka]` section: the pipeline's own settings type, so the two cannot drift.
pub type KafkaConfig = kd_pipeline::KafkaSettings;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantsConfig {
    /// JSON array of tenant settings, re-read when it changes.
    pub file: Option<PathBuf>,
    /// Compacted Kafka topic of tenant settings (see "Tenant settings" in the README).
    pub topic: Option<String>,
    /// How often the file is checked for changes.
    pub poll_interval_ms: u64,
    /// With `topic`: how long changes are gathered before they take effect together.
    pub flush_interval_ms: u64,
    /// Route by the source ID header only; a `projectId` in the body is ignored.
    pub require_header: bool,
    /// Accept an edit of the tenants file that removes every tenant.
    pub allow_empty: bool,
}

impl Default for TenantsConfig {
    fn default() -> Self {
        TenantsConfig {
            file: None,
            topic: None,
            poll_interval_ms: 1000,
            flush_interval_ms: 100,
            require_header: false,
            allow_empty: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsConfig {
    /// One endpoint for STS and Kinesis (LocalStack, moto); unset for AWS itself.
    pub endpoint_url: Option<String>,
    /// AWS's FIPS endpoints (`kinesis-fips...`, `sts-fips...`).
    pub use_fips: bool,
    /// AWS's dual-stack (IPv4 and IPv6) endpoints (`...api.aws`).
    pub use_dualstack: bool,
    /// The worker's own role for tenants without `roleAddress` whose stream's resource
    /// policy grants it access: assumed with the tenant's source ID as a session tag.
    pub resource_policy_role: Option<String>,
    pub role_session_name: String,
    /// Lifetime asked of AssumeRole (900 to 43200 seconds; the role's maximum applies).
    pub session_duration_secs: u64,
    /// Cached credentials are replaced this long before they expire.
    pub credential_refresh_margin_secs: u64,
    /// A failed AssumeRole is remembered this long before STS is asked again.
    pub assume_role_failure_ttl_secs: u64,
    /// Most (role, external ID) sessions cached at once.
    pub max_cached_credentials: u64,
    /// Most AssumeRole calls on the wire at once.
    pub max_concurrent_assume_role: usize,
    /// Time allowed for one AWS API attempt.
    pub api_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Most AWS requests on the wire at once (each holds a pooled connection); one
    /// tenant may hold `delivery.tenant_share` of them.
    pub max_concurrent_requests: usize,
    /// Share of the request places one region, or one account in a region, may hold,
    /// and of the AssumeRole places one STS region may hold (0 to 1): what is left for
    /// the others while one hangs.
    pub region_share: f64,
    /// How long a `PutRecords` batch waits for more records (tenants with
    /// `usePutRecords`).
    pub put_records_linger_ms: u64,
    /// Share of each stream's capacity this pod may use (0 to 1): with a tenant's
    /// partitions spread over N pods, 1/N keeps their sum within the stream's limits.
    pub capacity_fraction: f64,
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            endpoint_url: None,
            use_fips: false,
            use_dualstack: false,
            resource_policy_role: None,
            role_session_name: "kinesis-destination".into(),
            session_duration_secs: 3600,
            credential_refresh_margin_secs: 300,
            assume_role_failure_ttl_secs: 10,
            max_cached_credentials: 100_000,
            max_concurrent_assume_role: 32,
            api_timeout_ms: 10_000,
            connect_timeout_ms: 3_000,
            max_concurrent_requests: 256,
            region_share: 0.75,
            put_records_linger_ms: 2,
            capacity_fraction: 1.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of /metrics, /healthz and /readyz.
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "0.0.0.0:9464".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Most events read but not yet written or dead-lettered (all partitions).
    pub max_in_flight: usize,
    /// Most events in flight from one partition; past it the partition is paused.
    pub max_in_flight_per_partition: usize,
    /// Most bytes (keys and values) of the events in flight (all partitions); one
    /// partition may hold the share `max_in_flight_per_partition / max_in_flight` of it,
    /// at most a tenth.
    pub max_in_flight_bytes: usize,
    /// Share of a full partition's in-flight budget one tenant may hold (0 to 1;
    /// 1 = off).
    pub tenant_share: f64,
    pub commit_interval_ms: u64,
    /// Retryable failures are retried until this long after the event was produced (its
    /// Kafka timestamp), then dead-lettered `retries_exhausted`.
    pub retry_window_secs: u64,
    /// ...but each worker that reads an event retries it at least this long from its
    /// first failure (at most the window), so a backlog older than the window is not
    /// dead-lettered at once.
    pub min_retry_secs: u64,
    /// Permanent failures are retried this long (IAM propagation), then dead-lettered
    /// `destination_rejected`.
    pub permanent_error_window_secs: u64,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// On SIGTERM, how long in-flight writes may take before they are abandoned.
    pub shutdown_timeout_secs: u64,
    /// How long leaving the consumer group may take.
    pub close_timeout_secs: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            max_in_flight: 20_000,
            // A healthy tenant's partition keeps this many events in flight at full speed
            // (Little's law: rate × time in the pipeline); 2,000 held one tenant to
            // 9,000 events/s in the bench where 10,000 reached 42,000.
            max_in_flight_per_partition: 10_000,
            max_in_flight_bytes: 256 * 1024 * 1024,
            tenant_share: 0.5,
            commit_interval_ms: 1_000,
            retry_window_secs: 4 * 3600,
            min_retry_secs: 300,
            permanent_error_window_secs: 180,
            initial_backoff_ms: 100,
            max_backoff_ms: 30_000,
            // Together within Kubernetes' default 30 s grace period, with 5 s to spare.
            shutdown_timeout_secs: 15,
            close_timeout_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter (`info`, `kd_pipeline=debug,info`); `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

impl Config {
    /// Reads the file, applies environment overrides and checks every key.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
        })?;
        let env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        let mut config = Config::parse(&text, &env)?;
        // A relative tenants file is relative to the config file, as an operator reading
        // the config would expect.
        if let Some(file) = &config.tenants.file {
            if file.is_relative() {
                if let Some(dir) = path.parent() {
                    config.tenants.file = Some(dir.join(file));
                }
            }
        }
        Ok(config)
    }

    /// Parses TOML text with the given `KINESIS_DESTINATION__…` overrides.
    pub fn parse(text: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let mut value: toml::Table = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].lines().count().max(1);
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            ConfigError::new("config file", format!("invalid TOML{at}: {}", e.message()))
        })?;
        let shape = toml::Table::try_from(Config::default()).unwrap_or_default();
        for (name, raw) in env {
            apply_override(&mut value, &shape, name, raw)?;
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(value)).map_err(|e| {
                let path = e.path().to_string();
                let key = if path == "." { "config".into() } else { path };
                ConfigError::new(key, e.inner().to_string())
            })?;
        config.validate()?;
        Ok(config)
    }

    pub fn listen(&self) -> Result<SocketAddr, ConfigError> {
        self.http.listen.parse().map_err(|_| {
            ConfigError::new(
                "http.listen",
                format!("{:?} is not an address like 0.0.0.0:9464", self.http.listen),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_EXAMPLE: &str = r#"
[kafka]
bootstrap_servers = "127.0.0.1:9092"
group_id = "kinesis-destination"
topics = ["segment-events"]
dead_letter_topic = "segment-events-dlq"
source_id_header = "source_id"
[kafka.librdkafka]
"session.timeout.ms" = "10000"

[tenants]
file = "tenants.json"

[aws]
endpoint_url = "http://127.0.0.1:4566"
role_session_name = "kinesis-destination"

[http]
listen = "0.0.0.0:9464"
"#;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_the_spec_example() {
        let c = Config::parse(SPEC_EXAMPLE, &[]).unwrap();
        assert_eq!(c.kafka.topics, ["segment-events"]);
        assert_eq!(c.kafka.librdkafka["session.timeout.ms"], "10000");
        assert_eq!(c.aws.endpoint_url.as_deref(), Some("http://127.0.0.1:4566"));
        assert_eq!(c.delivery.retry_window_secs, 4 * 3600);
    }

    #[test]
    fn environment_overrides_any_key_with_its_type() {
        let c = Config::parse(
            SPEC_EXAMPLE,
            &env(&[
                (
                    "KINESIS_DESTINATION__KAFKA__BOOTSTRAP_SERVERS",
                    "broker:9093",
                ),
                ("KINESIS_DESTINATION__KAFKA__GROUP_ID", "12345"),
                ("KINESIS_DESTINATION__KAFKA__TOPICS", "a, b"),
                ("KINESIS_DESTINATION__DELIVERY__MAX_IN_FLIGHT", "7"),
                ("KINESIS_DESTINATION__AWS__CAPACITY_FRACTION", "0.5"),
                (
                    "KINESIS_DESTINATION__KAFKA__LIBRDKAFKA__SECURITY.PROTOCOL",
                    "ssl",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.bootstrap_servers, "broker:9093");
        assert_eq!(c.kafka.group_id, "12345");
        assert_eq!(c.kafka.topics, ["a", "b"]);
        assert_eq!(c.delivery.max_in_flight, 7);
        assert_eq!(c.aws.capacity_fraction, 0.5);
        assert_eq!(c.kafka.librdkafka["security.protocol"], "ssl");
    }

    #[test]
    fn kafka_credentials_never_show_in_debug() {
        let text = SPEC_EXAMPLE.replace(
            "[kafka.librdkafka]",
            "[kafka.librdkafka]\n\"sasl.password\" = \"hunter2\"",
        );
        let c = Config::parse(&text, &[]).unwrap();
        assert_eq!(c.kafka.librdkafka["sasl.password"], "hunter2");
        let shown = format!("{c:?}");
        assert!(shown.contains("sasl.password"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                SPEC_EXAMPLE.replace("bootstrap_servers", "bootstrap_server"),
                "kafka.bootstrap_server",
            ),
            (
                SPEC_EXAMPLE.replace("topics = [\"segment-events\"]", "topics = []"),
                "kafka.topics",
            ),
            (
                SPEC_EXAMPLE.replace("topics = [\"segment-events\"]", "topics = 3"),
                "kafka.topics",
            ),
            (
                SPEC_EXAMPLE.replace("0.0.0.0:9464", "nowhere"),
                "http.listen",
            ),
            (
                SPEC_EXAMPLE.replace("http://127.0.0.1:4566", "localhost"),
                "aws.endpoint_url",
            ),
            (
                SPEC_EXAMPLE.replace("file = \"tenants.json\"", ""),
                "tenants.file",
            ),
            (SPEC_EXAMPLE.replace("[http]", "[http"), "config file"),
            (
                format!("{SPEC_EXAMPLE}\n[delivery]\nretry_window_secs = 99999999999"),
                "delivery.retry_window_secs",
            ),
            (
                SPEC_EXAMPLE.replace("[aws]", "[aws]\nput_records_linger_ms = 60000"),
                "aws.put_records_linger_ms",
            ),
            (
                format!("{SPEC_EXAMPLE}\n[delivery]\ntenant_share = 0\n"),
                "delivery.tenant_share",
            ),
            (
                SPEC_EXAMPLE.replace("[aws]", "[aws]\nresource_policy_role = \"writer\""),
                "aws.resource_policy_role",
            ),
            (
                SPEC_EXAMPLE.replace("[aws]", "[aws]\nuse_fips = \"yes\""),
                "aws.use_fips",
            ),
            (
                format!("{SPEC_EXAMPLE}\n[delivery]\nmax_in_flight_bytes = 1000\n"),
                "delivery.max_in_flight_bytes",
            ),
        ];
        for (text, key) in cases {
            let err = Config::parse(&text, &[]).unwrap_err();
            assert_eq!(err.key, key, "{err}");
            assert!(!err.to_string().contains('\n'), "one line: {err}");
        }
        let err = Config::parse(
            SPEC_EXAMPLE,
            &env(&[("KINESIS_DESTINATION__DELIVERY__MAX_IN_FLIGHT", "lots")]),
        )
        .unwrap_err();
        assert_eq!(err.key, "delivery.max_in_flight");
        let err = Config::parse(
            SPEC_EXAMPLE,
            &env(&[("KINESIS_DESTINATION__KAFKA__NOPE", "x")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
