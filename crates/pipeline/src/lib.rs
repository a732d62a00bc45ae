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
//! - [`worker`]: the consumer loop, rebalance handling and shutdown that tie them together.

pub mod dead_letter;
pub mod lanes;
mod log_limit;
mod offset_set;
pub mod offsets;
mod panics;
pub mod retry;
pub mod route;
pub mod worker;

pub use dead_letter::Reason;
pub use retry::RetryPolicy;
pub use worker::{
    dead_letter_max_bytes, run, validate_kafka, KafkaSettings, WorkerError, WorkerSettings,
};
