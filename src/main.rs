//! `kinesis-destination`: Segment events from Kafka into each tenant's own Amazon Kinesis
//! stream. This file only parses the command line and hands over to `cmd/`.

mod cmd;
mod config;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: the worker allocates and frees small objects
/// across threads for every event (messages, requests, futures), where glibc spent about
/// a fifth of the worker's CPU and fragmented its arenas (see the README's figures).
/// The `system-alloc` feature leaves the system allocator in place, for heap profilers
/// that hook malloc (heaptrack, valgrind's massif).
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Multi-tenant worker: Segment events from Kafka into each tenant's own Kinesis stream.
#[derive(Parser)]
#[command(name = "kinesis-destination", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker: consume Kafka, write each event to its tenant's stream.
    Run(cmd::run::Args),
    /// Validate one tenant end to end: settings, AssumeRole, stream reachable.
    Check(cmd::check::Args),
    /// Read a Kinesis stream and print each record's JSON, one per line.
    Tail(cmd::tail::Args),
    /// Print the IAM permission policy and role trust policy a tenant needs.
    Policy(cmd::policy::Args),
    /// Send sample Segment events to Kafka (demos, load, benchmarks).
    Produce(cmd::produce::Args),
    /// Send dead letters back to the topic they came from, without their dlq.* headers.
    Replay(cmd::replay::Args),
    /// Per-tenant delivery status from every pod: state, counts, errors, samples; or
    /// the delivery page (--serve).
    Status(cmd::status::Args),
}

fn main() -> ExitCode {
    // clap prints usage errors and exits with code 2 by itself.
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kinesis-destination: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            // On a worker thread of the runtime, not this one: the consume loop hands
            // every event to a lane task, and a task spawned from outside the runtime's
            // workers goes through its shared queue and wakes a worker each time.
            Command::Run(args) => match tokio::spawn(cmd::run::run(args)).await {
                Ok(result) => result,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => Err(cmd::CliError::Failed(format!("the worker stopped: {e}"))),
            },
            Command::Check(args) => cmd::check::run(args).await,
            Command::Tail(args) => cmd::tail::run(args).await,
            Command::Policy(args) => cmd::policy::run(args),
            Command::Produce(args) => cmd::produce::run(args).await,
            Command::Replay(args) => cmd::replay::run(args).await,
            Command::Status(args) => cmd::status::run(args).await,
        }
    });
    // Background tasks (HTTP server, file watcher) end with the runtime, without waiting.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kinesis-destination: error: {e}");
            e.exit_code()
        }
    }
}
