//! The checks every key gets once the file and the environment are read: each
//! failure names the key and says what it must be.

use super::{Config, ConfigError};

impl Config {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let k = &self.kafka;
        required("kafka.bootstrap_servers", &k.bootstrap_servers)?;
        required("kafka.group_id", &k.group_id)?;
        if k.topics.is_empty() || k.topics.iter().any(|t| t.trim().is_empty()) {
            return Err(ConfigError::new(
                "kafka.topics",
                "must list at least one topic, none empty",
            ));
        }
        required("kafka.dead_letter_topic", &k.dead_letter_topic)?;
        if k.topics.contains(&k.dead_letter_topic) {
            return Err(ConfigError::new(
                "kafka.dead_letter_topic",
                "must not be one of kafka.topics (dead letters would be read again)",
            ));
        }
        required("kafka.source_id_header", &k.source_id_header)?;
        match (&self.tenants.file, &self.tenants.topic) {
            (None, None) => {
                return Err(ConfigError::new(
                    "tenants.file",
                    "is required (a JSON array of tenant settings), unless tenants.topic is set",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "tenants.topic",
                    "set either tenants.file or tenants.topic, not both",
                ))
            }
            (None, Some(t)) if t.trim().is_empty() => {
                return Err(ConfigError::new("tenants.topic", "must not be empty"))
            }
            _ => {}
        }
        at_least_one("tenants.poll_interval_ms", self.tenants.poll_interval_ms)?;
        at_least_one("status.interval_secs", self.status.interval_secs)?;
        if let Some(topic) = &self.status.topic {
            if topic.trim().is_empty() {
                return Err(ConfigError::new("status.topic", "must not be empty"));
            }
            if k.topics.contains(topic) || *topic == k.dead_letter_topic {
                return Err(ConfigError::new(
                    "status.topic",
                    "must not be an input topic or the dead-letter topic",
                ));
            }
        }
        if let Some(url) = &self.aws.endpoint_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
                return Err(ConfigError::new(
                    "aws.endpoint_url",
                    format!("{url:?} is not an http:// or https:// URL"),
                ));
            }
        }
        if let Some(role) = &self.aws.resource_policy_role {
            kd_tenants::RoleArn::parse(role)
                .map_err(|e| ConfigError::new("aws.resource_policy_role", e.to_string()))?;
        }
        if self.aws.role_session_name.len() < 2
            || self.aws.role_session_name.len() > 64
            || !self
                .aws
                .role_session_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"=,.@-_".contains(&b))
        {
            return Err(ConfigError::new(
                "aws.role_session_name",
                "must be 2-64 of a-z A-Z 0-9 = , . @ - _",
            ));
        }
        if !(900..=43_200).contains(&self.aws.session_duration_secs) {
            return Err(ConfigError::new(
                "aws.session_duration_secs",
                "must be from 900 to 43200 (STS limits)",
            ));
        }
        if self.aws.api_timeout_ms == 0 || self.aws.connect_timeout_ms == 0 {
            return Err(ConfigError::new(
                "aws.api_timeout_ms",
                "timeouts must be at least 1 ms",
            ));
        }
        if !(self.aws.capacity_fraction > 0.0 && self.aws.capacity_fraction <= 1.0) {
            return Err(ConfigError::new(
                "aws.capacity_fraction",
                "must be more than 0 and at most 1",
            ));
        }
        at_least_one(
            "aws.max_concurrent_requests",
            self.aws.max_concurrent_requests,
        )?;
        if !(self.aws.region_share > 0.0 && self.aws.region_share <= 1.0) {
            return Err(ConfigError::new(
                "aws.region_share",
                "must be more than 0 and at most 1",
            ));
        }
        if self.aws.put_records_linger_ms > 5_000 {
            return Err(ConfigError::new(
                "aws.put_records_linger_ms",
                "must be at most 5000 (records wait this long before their call)",
            ));
        }
        at_least_one(
            "aws.max_concurrent_assume_role",
            self.aws.max_concurrent_assume_role,
        )?;
        at_least_one(
            "aws.max_cached_credentials",
            self.aws.max_cached_credentials,
        )?;
        self.listen()?;
        let d = &self.delivery;
        at_least_one("delivery.max_in_flight", d.max_in_flight)?;
        if d.max_in_flight_bytes < 1024 * 1024 {
            return Err(ConfigError::new(
                "delivery.max_in_flight_bytes",
                "must be at least 1048576 (1 MiB)",
            ));
        }
        if !(d.tenant_share > 0.0 && d.tenant_share <= 1.0) {
            return Err(ConfigError::new(
                "delivery.tenant_share",
                "must be more than 0 and at most 1",
            ));
        }
        at_least_one("delivery.commit_interval_ms", d.commit_interval_ms)?;
        // Kafka keeps records for days, not months: longer windows would only outlive the
        // records they are about (and overflow the clock's arithmetic at the extreme).
        const THIRTY_DAYS: u64 = 30 * 24 * 3600;
        for (key, secs) in [
            ("delivery.retry_window_secs", d.retry_window_secs),
            ("delivery.min_retry_secs", d.min_retry_secs),
            (
                "delivery.permanent_error_window_secs",
                d.permanent_error_window_secs,
            ),
        ] {
            if secs > THIRTY_DAYS {
                return Err(ConfigError::new(key, "must be at most 2592000 (30 days)"));
            }
        }
        if d.initial_backoff_ms == 0 || d.max_backoff_ms < d.initial_backoff_ms {
            return Err(ConfigError::new(
                "delivery.max_backoff_ms",
                "backoffs must satisfy 0 < initial_backoff_ms <= max_backoff_ms",
            ));
        }
        if self.metrics.source_labels.len() > 1000 {
            return Err(ConfigError::new(
                "metrics.source_labels",
                "lists more than 1000 sources; label only the ones you watch",
            ));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(ConfigError::new(
                "log.format",
                "must be \"text\" or \"json\"",
            ));
        }
        Ok(())
    }
}

/// A key whose value must not be empty (or only white space).
fn required(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        Err(ConfigError::new(key, "must not be empty"))
    } else {
        Ok(())
    }
}

/// A count or duration that must be at least 1.
fn at_least_one<N: PartialEq + Default>(key: &str, value: N) -> Result<(), ConfigError> {
    if value == N::default() {
        Err(ConfigError::new(key, "must be at least 1"))
    } else {
        Ok(())
    }
}
