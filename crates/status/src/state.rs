//! A tenant's delivery state, from its counts over a window: what support staff and the
//! `kinesis_destination_tenants{state}` gauge call it.

use serde::Serialize;

use crate::record::Counts;

/// - `delivering`: events arrived or were written, and nothing failed;
/// - `degraded`: some were written, and some failed (an attempt retried, throttled
///   included, or an event dead-lettered);
/// - `failing`: something failed and nothing was written;
/// - `idle`: no events.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Failing,
    Degraded,
    Delivering,
    Idle,
}

impl State {
    pub const ALL: [State; 4] = [
        State::Delivering,
        State::Degraded,
        State::Failing,
        State::Idle,
    ];

    pub fn of(c: &Counts) -> State {
        let failed = c.dead_lettered_total() + c.retried_total() > 0;
        match (failed, c.delivered > 0) {
            (true, true) => State::Degraded,
            (true, false) => State::Failing,
            (false, _) if c.delivered > 0 || c.received > 0 => State::Delivering,
            (false, _) => State::Idle,
        }
    }

    /// Its place in [`State::ALL`].
    pub fn index(self) -> usize {
        match self {
            State::Delivering => 0,
            State::Degraded => 1,
            State::Failing => 2,
            State::Idle => 3,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Delivering => "delivering",
            State::Degraded => "degraded",
            State::Failing => "failing",
            State::Idle => "idle",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_follow_what_was_written_and_what_failed() {
        let mut c = Counts::default();
        assert_eq!(State::of(&c), State::Idle);
        c.received = 5;
        assert_eq!(
            State::of(&c),
            State::Delivering,
            "in flight, nothing failed"
        );
        c.retried.insert("AccessDenied".into(), 2);
        assert_eq!(State::of(&c), State::Failing);
        c.delivered = 1;
        assert_eq!(State::of(&c), State::Degraded);
        c.retried.clear();
        assert_eq!(State::of(&c), State::Delivering);
        c.dead_lettered.insert("destination_rejected".into(), 1);
        assert_eq!(State::of(&c), State::Degraded);
    }
}
