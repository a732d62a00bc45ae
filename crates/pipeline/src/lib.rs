//! The pipeline: how one event travels from Kafka to its tenant's Kinesis stream.
//!
//! ```text
//! consume ─► route ─► lane ─► deliver (retry) ─► acknowledge ─► commit
//!              │                  │
//!              └────── dead letter ┘
//! ```
//!
//! - [`route`]: decode the routing fields, find the tenant, derive the partition key.
//! - [`lanes`]: per (tenant, partition key) FIFO, one write in flight per lane.
//! - [`retry`]: backoff and retry windows.
//! - [`dead_letter`]: dead-letter records and their headers.
//! - [`offsets`]: commit only up to the lowest event not yet done; fairness skips.
//! - [`replay`]: dead letters sent back to their input topic once their cause is fixed.
//! - [`kafka`]: the `[kafka]` settings and the librdkafka configurations built from them.
//! - [`worker`]: sets the stages up, runs the consume loop (`consume`, with `flow`
//!   control), delivery (`deliver`), commits (`commits`, and the rebalance `callbacks`),
//!   and shuts down in order (`shutdown`).

mod broker_health;
mod callbacks;
mod commits;
mod consume;
pub mod dead_letter;
mod deliver;
mod drain_rate;
mod flow;
pub mod kafka;
pub mod lanes;
mod log_limit;
mod offset_set;
pub mod offsets;
mod panics;
mod reading;
pub mod record;
pub mod replay;
pub mod retry;
pub mod route;
mod shutdown;
mod unsaved;
pub mod worker;

pub use dead_letter::Reason;
pub use kafka::{
    command_client_config, dead_letter_max_bytes, validate_kafka, InvalidKafkaSetting,
    KafkaSettings,
};
pub use retry::RetryPolicy;
pub use worker::{run, StatusSettings, WorkerError, WorkerSettings};
