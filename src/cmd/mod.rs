//! One module per command. Each parses its own flags and returns an exit code, or a
//! [`CliError`] that says whether the user (exit 2) or the world (exit 1) is at fault.

pub mod check;
pub mod policy;
pub mod produce;
pub mod replay;
pub mod run;
pub mod tail;

use std::process::ExitCode;

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
pub async fn aws_base(endpoint_url: Option<String>) -> aws_config::SdkConfig {
    kd_aws::base_config(&kd_aws::AwsSettings {
        endpoint_url,
        api_timeout: std::time::Duration::from_secs(10),
        connect_timeout: std::time::Duration::from_secs(3),
    })
    .await
}
