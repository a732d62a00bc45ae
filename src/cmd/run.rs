//! `run`: the worker.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use kd_aws::{AwsSettings, CredentialCache, CredentialSettings, KinesisWriter, RateLimits};
use kd_pipeline::{KafkaSettings, RetryPolicy, WorkerSettings};
use kd_telemetry::Readiness;
use kd_tenants::TenantStore;
use tokio_util::sync::CancellationToken;

use super::CliError;
use crate::config::Config;

#[derive(clap::Args)]
pub struct Args {
    /// Configuration file (TOML).
    #[arg(long, env = "KINESIS_DESTINATION_CONFIG", value_name = "FILE")]
    config: PathBuf,
}

pub async fn run(args: Args) -> Result<ExitCode, CliError> {
    let config = Config::load(&args.config)?;
    let k = &config.kafka;
    let kafka = KafkaSettings {
        bootstrap_servers: k.bootstrap_servers.clone(),
        group_id: k.group_id.clone(),
        topics: k.topics.clone(),
        dead_letter_topic: k.dead_letter_topic.clone(),
        source_id_header: k.source_id_header.clone(),
        librdkafka: k.librdkafka.clone(),
    };
    kd_pipeline::validate_kafka(&kafka).map_err(|(key, reason)| {
        CliError::Usage(format!("config: kafka.librdkafka: {key}: {reason}"))
    })?;
    let file = config
        .tenants
        .file
        .clone()
        .ok_or_else(|| CliError::Usage("config: tenants.file: is required".into()))?;
    // The first load must succeed: a worker with no tenants would dead-letter everything.
    let (snapshot, bytes) = kd_tenants::load_file(&file)
        .map_err(|e| CliError::Usage(format!("config: tenants.file: {e}")))?;
    super::init_logging(&config.log.format, &config.log.level);

    let readiness = Arc::new(Readiness::default());
    let tenants = Arc::new(TenantStore::new());
    tracing::info!(
        path = %file.display(),
        tenants = snapshot.len(),
        invalid = snapshot.invalid_count(),
        "tenant settings loaded"
    );
    tenants.replace(snapshot);
    readiness.set_tenants_loaded();
    tokio::spawn(kd_tenants::watch_file(
        file,
        tenants.clone(),
        Duration::from_millis(config.tenants.poll_interval_ms),
        Some(bytes),
    ));

    let listen = config.listen()?;
    let server = kd_telemetry::bind(listen, readiness.clone())
        .await
        .map_err(|e| {
            CliError::Usage(format!(
                "config: http.listen: cannot listen on {listen}: {e}"
            ))
        })?;
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    tracing::info!(%listen, "serving /metrics, /healthz, /readyz");

    let aws = &config.aws;
    let base = kd_aws::base_config(&AwsSettings {
        endpoint_url: aws.endpoint_url.clone(),
        api_timeout: Duration::from_millis(aws.api_timeout_ms),
        connect_timeout: Duration::from_millis(aws.connect_timeout_ms),
    })
    .await;
    let credentials = CredentialCache::new(
        base,
        CredentialSettings {
            role_session_name: aws.role_session_name.clone(),
            session_duration: Duration::from_secs(aws.session_duration_secs),
            refresh_margin: Duration::from_secs(aws.credential_refresh_margin_secs),
            failure_ttl: Duration::from_secs(aws.assume_role_failure_ttl_secs),
            max_entries: aws.max_cached_credentials,
        },
    );
    let writer = KinesisWriter::new(
        credentials,
        RateLimits::default(),
        aws.max_concurrent_requests,
    );

    let shutdown = CancellationToken::new();
    tokio::spawn(on_signals(shutdown.clone()));

    let d = &config.delivery;
    let settings = WorkerSettings {
        kafka,
        max_in_flight: d.max_in_flight,
        max_in_flight_per_partition: d.max_in_flight_per_partition,
        commit_interval: Duration::from_millis(d.commit_interval_ms),
        shutdown_timeout: Duration::from_secs(d.shutdown_timeout_secs),
        close_timeout: Duration::from_secs(d.close_timeout_secs),
        retry: RetryPolicy {
            initial_backoff: Duration::from_millis(d.initial_backoff_ms),
            max_backoff: Duration::from_millis(d.max_backoff_ms),
            retry_window: Duration::from_secs(d.retry_window_secs),
            permanent_window: Duration::from_secs(d.permanent_error_window_secs),
        },
    };
    kd_pipeline::run(settings, tenants, writer, readiness, shutdown)
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    Ok(ExitCode::SUCCESS)
}

/// First SIGTERM/SIGINT: graceful shutdown. A second one: exit at once.
async fn on_signals(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    let mut count = 0;
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        count += 1;
        if count == 1 {
            tracing::info!("shutdown requested");
            shutdown.cancel();
        } else {
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        }
    }
}
