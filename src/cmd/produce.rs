//! `produce`: sample Segment events of every type, for demos, load and benchmarks.

use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use aws_smithy_types::date_time::Format;
use kd_event::sample::{sample_event, sample_user};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::CliError;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceIn {
    /// The `source_id` header.
    Header,
    /// The message's `projectId`.
    ProjectId,
    /// Both.
    Both,
}

#[derive(clap::Args)]
pub struct Args {
    #[arg(
        long,
        default_value = "127.0.0.1:9092",
        env = "KINESIS_DESTINATION__KAFKA__BOOTSTRAP_SERVERS"
    )]
    bootstrap_servers: String,
    #[arg(long, default_value = "segment-events")]
    topic: String,
    /// Source IDs to send for, comma-separated; events are spread round-robin.
    #[arg(long, value_delimiter = ',', required = true)]
    sources: Vec<String>,
    /// Total number of events.
    #[arg(long, default_value_t = 12)]
    count: u64,
    /// Distinct users per source.
    #[arg(long, default_value_t = 5)]
    users: u64,
    /// Where the source ID goes.
    #[arg(long, value_enum, default_value_t = SourceIn::Header)]
    source_in: SourceIn,
    /// Name of the source header.
    #[arg(long, default_value = "source_id")]
    source_id_header: String,
    /// Events per second (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Bytes of padding in each event's properties (to test sizes).
    #[arg(long, default_value_t = 0)]
    pad: usize,
    /// Most events per Kafka record batch (librdkafka's batch.num.messages; its default
    /// of 10,000 when not given).
    #[arg(long)]
    batch_size: Option<u32>,
    /// Compression of the record batches (librdkafka's compression.type).
    #[arg(long, value_enum, default_value_t = Compression::None)]
    compression: Compression,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

pub async fn run(args: Args) -> Result<ExitCode, CliError> {
    if args.sources.iter().any(|s| s.is_empty()) {
        return Err(CliError::Usage(
            "--sources: source IDs must not be empty".into(),
        ));
    }
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &args.bootstrap_servers)
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .set("compression.type", args.compression.as_str());
    if let Some(n) = args.batch_size {
        config.set("batch.num.messages", n.max(1).to_string());
    }
    let producer: FutureProducer = config
        .create()
        .map_err(|e| CliError::Usage(format!("--bootstrap-servers: {e}")))?;
    let started = Instant::now();
    let mut pending = Vec::with_capacity(1024);
    let mut sent = 0u64;
    for n in 0..args.count {
        let sources = args.sources.len() as u64;
        let source = &args.sources[(n % sources) as usize];
        // Each source's events are a sample stream of their own (its `i`th event): with
        // the overall count, round-robin sources would each meet only some of the users.
        let i = n / sources;
        let with_project = matches!(args.source_in, SourceIn::ProjectId | SourceIn::Both);
        let now = aws_smithy_types::DateTime::from(SystemTime::now())
            .fmt(Format::DateTime)
            .unwrap_or_default();
        let value = sample_event(source, i, args.users, with_project, args.pad, &now).to_string();
        let mut record: FutureRecord<'_, str, str> = FutureRecord::to(&args.topic).payload(&value);
        let key = format!("{source}:{}", sample_user(i, args.users));
        record = record.key(&key);
        if matches!(args.source_in, SourceIn::Header | SourceIn::Both) {
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: &args.source_id_header,
                value: Some(source.as_str()),
            }));
        }
        let delivery = producer
            .send_result(record)
            .map_err(|(e, _)| CliError::Failed(format!("cannot queue event: {e}")))?;
        pending.push(delivery);
        if pending.len() >= 1000 {
            sent += settle(&mut pending).await?;
        }
        if args.rate > 0 {
            let due = started + Duration::from_secs_f64((n + 1) as f64 / args.rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
    }
    sent += settle(&mut pending).await?;
    eprintln!(
        "sent {sent} events to {} in {:.2}s",
        args.topic,
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

async fn settle(pending: &mut Vec<rdkafka::producer::DeliveryFuture>) -> Result<u64, CliError> {
    let mut n = 0;
    for d in pending.drain(..) {
        match d.await {
            Ok(Ok(_)) => n += 1,
            Ok(Err((e, _))) => {
                return Err(CliError::Failed(format!(
                    "event not delivered to Kafka: {e}"
                )))
            }
            Err(_) => return Err(CliError::Failed("producer closed".into())),
        }
    }
    Ok(n)
}
