//! `replay`: sends dead letters back to the topic they were read from, once whatever
//! stopped them is fixed (see `kd_pipeline::replay` for what is replayed and where).
//! Running it twice replays twice: narrow it with `--reason`, `--source-id` and
//! `--from-offset`.

use std::path::PathBuf;
use std::process::ExitCode;

use kd_pipeline::replay::{replay, ReplayError, ReplayRequest};

use super::CliError;
use crate::config::Config;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, env = "KINESIS_DESTINATION_CONFIG", value_name = "FILE")]
    config: PathBuf,
    /// Only dead letters with this dlq.reason (repeatable).
    #[arg(long = "reason")]
    reasons: Vec<String>,
    /// Only dead letters of this source (its source header, or projectId in the value).
    #[arg(long)]
    source_id: Option<String>,
    /// Start at this offset of every dead-letter partition.
    #[arg(long, default_value_t = 0)]
    from_offset: i64,
    /// Count what would be replayed, produce nothing.
    #[arg(long)]
    dry_run: bool,
    /// Produce every replayed event to this topic instead of its `dlq.topic`.
    #[arg(long)]
    to_topic: Option<String>,
}

pub async fn run(args: Args) -> Result<ExitCode, CliError> {
    let config = super::with_kafka_auth(Config::load(&args.config)?, None).await?;
    let req = ReplayRequest {
        reasons: args.reasons,
        source_id: args.source_id,
        from_offset: args.from_offset,
        dry_run: args.dry_run,
        to_topic: args.to_topic,
    };
    let report = replay(&config.kafka, &req, |r| {
        eprintln!(
            "refused offset {} of partition {}: dlq.topic {:?} is not an input topic (kafka.topics); --to-topic replays elsewhere",
            r.offset, r.partition, r.from_topic
        );
    })
    .await
    .map_err(|e| match e {
        ReplayError::Config(_) => CliError::Usage(e.to_string()),
        _ => CliError::Failed(e.to_string()),
    })?;
    if report.seen == 0 {
        eprintln!(
            "no dead letters to replay in {}",
            config.kafka.dead_letter_topic
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut line = format!(
        "{} {} of {} dead letters",
        if req.dry_run {
            "would replay"
        } else {
            "replayed"
        },
        report.replayed,
        report.seen
    );
    if report.refused > 0 {
        line += &format!("; refused {} not read from an input topic", report.refused);
    }
    if report.truncated > 0 {
        line += &format!(
            "; left {} truncated ones (their originals are where dlq.topic/dlq.offset say)",
            report.truncated
        );
    }
    eprintln!("{line}");
    Ok(ExitCode::SUCCESS)
}
