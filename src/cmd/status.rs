//! `status`: every pod's per-tenant status records, read back from the status topic and
//! added up (see `kd_status`): one tenant's state, counts by minute or hour, success
//! rate, latency, last error and samples; or, without `--source-id`, the tenants with
//! the most failures. `--serve` shows the same on a page for support staff.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use kd_status::read::{ReadError, Reader};
use kd_status::report;
use kd_status::State;

use super::CliError;
use crate::config::Config;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, env = "KINESIS_DESTINATION_CONFIG", value_name = "FILE")]
    config: PathBuf,
    /// One tenant; without it, the tenants with the most failures.
    #[arg(long)]
    source_id: Option<String>,
    /// How far back to read: 90s, 30m, 1h, 2d.
    #[arg(long, default_value = "1h", value_parser = kd_status::time::parse_duration)]
    since: Duration,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Serve the delivery page on this address (127.0.0.1:9465 when given alone; a bare
    /// port binds 127.0.0.1) instead of printing.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:9465")]
    serve: Option<String>,
}

/// Exit code of a named tenant in the `failing` state.
const FAILING: u8 = 3;

pub async fn run(args: Args) -> Result<ExitCode, CliError> {
    let config = super::with_kafka_auth(Config::load(&args.config)?, None).await?;
    let Some(topic) = config.status.topic.clone() else {
        return Err(CliError::Usage(
            "config: status.topic: not set, so no pod writes status records".into(),
        ));
    };
    let reader = Reader {
        base: kd_pipeline::command_client_config(&config.kafka),
        auth: config.kafka.auth.clone(),
        topic,
    };
    if let Some(addr) = args.serve {
        return serve(reader, &addr).await;
    }
    // Rows of a minute up to three hours, of an hour past that.
    let bucket = if args.since > Duration::from_secs(3 * 3600) {
        3600
    } else {
        60
    };
    let source = args.source_id.clone();
    let since = args.since;
    let merged =
        tokio::task::spawn_blocking(move || reader.merged(since, source.as_deref(), bucket))
            .await
            .map_err(|e| CliError::Failed(e.to_string()))?
            .map_err(|e| match e {
                ReadError::MissingTopic(_) => CliError::Usage(format!("config: {e}")),
                e => CliError::Failed(e.to_string()),
            })?;
    match &args.source_id {
        Some(source) => {
            let summary = merged.summary(source);
            match args.format {
                Format::Table => print!("{}", report::tenant_table(&summary)),
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&summary).unwrap_or_default()
                ),
            }
            Ok(if summary.state == State::Failing {
                ExitCode::from(FAILING)
            } else {
                ExitCode::SUCCESS
            })
        }
        None => {
            match args.format {
                Format::Table => print!("{}", report::overview_table(&merged)),
                Format::Json => {
                    let tenants: Vec<_> = merged
                        .most_failing(usize::MAX)
                        .into_iter()
                        .map(|(source, h)| {
                            serde_json::json!({
                                "source_id": source,
                                "state": h.state(),
                                "total": h.total,
                                "success_rate": h.total.success_rate(),
                                "last_error": h.last_error,
                            })
                        })
                        .collect();
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&tenants).unwrap_or_default()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `--serve`'s address: `HOST:PORT`, or a bare port on 127.0.0.1.
fn address(addr: &str) -> Result<SocketAddr, CliError> {
    let addr = addr.trim();
    let parsed = match addr.parse::<u16>() {
        Ok(port) => Ok(SocketAddr::from(([127, 0, 0, 1], port))),
        Err(_) => addr.parse::<SocketAddr>(),
    };
    parsed.map_err(|_| {
        CliError::Usage(format!(
            "--serve: {addr:?} is not an address such as 127.0.0.1:9465"
        ))
    })
}

async fn serve(reader: Reader, addr: &str) -> Result<ExitCode, CliError> {
    let addr = address(addr)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| CliError::Failed(format!("--serve: cannot listen on {addr}: {e}")))?;
    eprintln!(
        "delivery page on http://{}/",
        listener.local_addr().unwrap_or(addr)
    );
    kd_status::page::serve(listener, reader)
        .await
        .map_err(|e| CliError::Failed(format!("--serve: {e}")))?;
    Ok(ExitCode::SUCCESS)
}
