//! librdkafka's error codes as names: metric labels and log limits (a small fixed set).

use rdkafka::error::KafkaError;

/// The librdkafka name of an error's code, for metric labels and log limits (a small
/// fixed set).
pub fn code_name(e: &KafkaError) -> String {
    e.rdkafka_error_code()
        .map_or_else(|| "Other".to_owned(), |c| format!("{c:?}"))
}
