//! Why an event is dead-lettered: the `dlq.reason` values and the one-line `dlq.error`.

/// Why an event was dead-lettered: the values of the `dlq.reason` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    InvalidJson,
    MissingSourceId,
    UnknownSource,
    InvalidSettings,
    MissingPartitionKey,
    RecordTooLarge,
    UnsupportedType,
    DestinationRejected,
    RetriesExhausted,
}

impl Reason {
    pub const ALL: [Reason; 9] = [
        Reason::InvalidJson,
        Reason::MissingSourceId,
        Reason::UnknownSource,
        Reason::InvalidSettings,
        Reason::MissingPartitionKey,
        Reason::RecordTooLarge,
        Reason::UnsupportedType,
        Reason::DestinationRejected,
        Reason::RetriesExhausted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidJson => "invalid_json",
            Reason::MissingSourceId => "missing_source_id",
            Reason::UnknownSource => "unknown_source",
            Reason::InvalidSettings => "invalid_settings",
            Reason::MissingPartitionKey => "missing_partition_key",
            Reason::RecordTooLarge => "record_too_large",
            Reason::UnsupportedType => "unsupported_type",
            Reason::DestinationRejected => "destination_rejected",
            Reason::RetriesExhausted => "retries_exhausted",
        }
    }
}

/// A decision to dead-letter an event, with the one-line explanation for `dlq.error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub reason: Reason,
    pub error: String,
    /// The source it belongs to, when known (for per-source metrics only).
    pub source: Option<String>,
}

impl DeadLetter {
    pub fn new(reason: Reason, error: impl Into<String>) -> Self {
        DeadLetter {
            reason,
            error: kd_event::text::one_line(&error.into()),
            source: None,
        }
    }

    pub fn of_source(mut self, source: &str) -> Self {
        self.source = Some(source.to_owned());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_names_match_the_contract() {
        let names: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "invalid_json",
                "missing_source_id",
                "unknown_source",
                "invalid_settings",
                "missing_partition_key",
                "record_too_large",
                "unsupported_type",
                "destination_rejected",
                "retries_exhausted"
            ]
        );
    }
}
