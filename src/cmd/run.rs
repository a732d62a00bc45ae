//! `run`: the worker.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use kd_aws::{
    AwsSettings, CredentialCache, CredentialSettings, KinesisWriter, RateLimits, RequestBudget,
};
use kd_pipeline::{RetryPolicy, WorkerSettings};
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
    /// Only check the configuration (keys, values, Kafka client settings; not the
    /// tenants file's content, nor whether services answer), print one line, and exit:
    /// 0 when it is good, 2 naming the offending key when it is not.
    #[arg(long)]
    check_config: bool,
}

pub async fn run(args: Args) -> Result<ExitCode, CliError> {
    let config = Config::load(&args.config)?;
    kd_pipeline::validate_kafka(&config.kafka).map_err(|e| {
        CliError::Usage(format!("config: kafka.librdkafka: {}: {}", e.key, e.reason))
    })?;
    if args.check_config {
        config.listen()?;
        if config.tenants.file.is_none() && config.tenants.topic.is_none() {
            return Err(CliError::Usage("config: tenants.file: is required".into()));
        }
        println!("config ok: {}", args.config.display());
        return Ok(ExitCode::SUCCESS);
    }
    super::init_logging(&config.log.format, &config.log.level);
    let readiness = Arc::new(Readiness::default());
    let config = super::with_kafka_auth(config, Some(readiness.clone())).await?;
    let kafka = config.kafka.clone();
    kd_telemetry::set_source_labels(config.metrics.source_labels.iter().cloned());
    let tenants = Arc::new(TenantStore::new());

    // A tenants file is read before anything starts: a bad one is a configuration error.
    let file_watch = match &config.tenants.file {
        Some(file) => {
            let contents = kd_tenants::load_file_into(file, &tenants)
                .map_err(|e| CliError::Usage(format!("config: tenants.file: {e}")))?;
            Some(kd_tenants::watch_file(
                file.clone(),
                tenants.clone(),
                Duration::from_millis(config.tenants.poll_interval_ms),
                Some(contents),
                config.tenants.allow_empty,
            ))
        }
        None => None,
    };

    let listen = config.listen()?;
    let server = kd_telemetry::bind(listen, readiness.clone(), kd_status::pod_routes())
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

    match (file_watch, &config.tenants.topic) {
        (Some(watch), _) => {
            tokio::spawn(watch);
        }
        // /healthz answers while the topic is read; /readyz waits for it.
        (None, Some(topic)) => load_from_topic(&config, topic, &tenants).await?,
        (None, None) => return Err(CliError::Usage("config: tenants.file: is required".into())),
    }
    readiness.set_tenants_loaded();

    let aws = &config.aws;
    let base = kd_aws::base_config(&AwsSettings {
        endpoint_url: aws.endpoint_url.clone(),
        api_timeout: Duration::from_millis(aws.api_timeout_ms),
        connect_timeout: Duration::from_millis(aws.connect_timeout_ms),
        use_fips: aws.use_fips,
        use_dual_stack: aws.use_dualstack,
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
            max_concurrent_assume_role: aws.max_concurrent_assume_role,
            region_share: aws.region_share,
            resource_policy_role: aws
                .resource_policy_role
                .as_deref()
                .and_then(|r| kd_tenants::RoleArn::parse(r).ok()),
        },
    )
    .with_readiness(readiness.clone());
    let writer = KinesisWriter::new(
        credentials,
        RateLimits::new(aws.capacity_fraction),
        RequestBudget::new(
            aws.max_concurrent_requests,
            config.delivery.tenant_share,
            aws.region_share,
        ),
        Duration::from_millis(aws.put_records_linger_ms),
    )
    .map_err(CliError::Failed)?;

    let shutdown = CancellationToken::new();
    tokio::spawn(on_signals(shutdown.clone()));

    let d = &config.delivery;
    let settings = WorkerSettings {
        kafka,
        max_in_flight: d.max_in_flight,
        max_in_flight_bytes: d.max_in_flight_bytes,
        max_in_flight_per_partition: d.max_in_flight_per_partition,
        tenant_share: d.tenant_share,
        require_header: config.tenants.require_header,
        commit_interval: Duration::from_millis(d.commit_interval_ms),
        shutdown_timeout: Duration::from_secs(d.shutdown_timeout_secs),
        close_timeout: Duration::from_secs(d.close_timeout_secs),
        retry: RetryPolicy {
            initial_backoff: Duration::from_millis(d.initial_backoff_ms),
            max_backoff: Duration::from_millis(d.max_backoff_ms),
            retry_window: Duration::from_secs(d.retry_window_secs),
            min_retry: Duration::from_secs(d.min_retry_secs),
            permanent_window: Duration::from_secs(d.permanent_error_window_secs),
        },
        status: config
            .status
            .topic
            .clone()
            .map(|topic| kd_pipeline::StatusSettings {
                topic,
                interval: Duration::from_secs(config.status.interval_secs),
            }),
    };
    kd_pipeline::run(settings, tenants, writer, readiness, shutdown)
        .await
        .map_err(|e| match e {
            missing @ kd_pipeline::WorkerError::MissingTopic { .. } => {
                CliError::Usage(format!("config: {missing}"))
            }
            e => CliError::Failed(e.to_string()),
        })?;
    Ok(ExitCode::SUCCESS)
}

/// Starts following the settings topic and waits for its first full read, since events
/// routed before it would be dead-lettered as unknown sources.
async fn load_from_topic(
    config: &Config,
    topic: &str,
    tenants: &Arc<TenantStore>,
) -> Result<(), CliError> {
    let follower = super::read_settings_topic(config, topic, tenants).await?;
    tokio::spawn(async move {
        if let Ok(Err(e)) = follower.await {
            tracing::error!(error = %e, "tenant settings reader stopped; the last settings stay in force");
        }
    });
    Ok(())
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
