//! Dead letters: events that cannot be delivered, kept for inspection and replay.
//!
//! A dead letter is the original record (key, value, headers) produced to the
//! dead-letter topic with the `dlq.*` headers added (see "Dead letters" in the README). Producing the original back to
//! the input topic (without the `dlq.*` headers) replays it. An event counts as done
//! only once Kafka has acknowledged its dead letter.
//!
//! A dead letter too large for the dead-letter topic is written with its value cut to
//! what fits (`dlq.truncated`, `dlq.original_size`): the original stays findable by its
//! `dlq.topic`, `dlq.partition` and `dlq.offset`. Any other failure is retried; one
//! that will not go away by itself (unknown topic, no authorization) also takes the
//! worker's readiness away until a dead letter is written again.

//!
//! [`Reason`] and [`DeadLetter`] say why; [`headers`] what a dead letter carries (and how a
//! value too large is cut); [`DeadLetters`] produces them and waits for Kafka.

mod headers;
mod producer;
mod reason;

pub use headers::dead_letter_headers;
pub use producer::{DeadLetterClient, DeadLetterProducer, DeadLetters};
pub use reason::{DeadLetter, Reason};
