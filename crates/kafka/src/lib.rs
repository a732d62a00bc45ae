//! What every Kafka client of the product needs, whichever crate makes it (the consumer
//! and the dead-letter producer in `kd-pipeline`, the settings reader in `kd-tenants`,
//! the commands): authentication the worker provides itself ([`auth`]: MSK IAM tokens),
//! librdkafka's error codes as names ([`code_name`]) and synchronous librdkafka calls
//! from async code ([`blocking`]).

pub mod auth;
mod blocking;
mod errors;

pub use blocking::blocking;
pub use errors::code_name;
