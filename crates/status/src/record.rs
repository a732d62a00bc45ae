//! The status record: what a pod produces to the status topic, once per interval and
//! tenant with traffic in it, keyed by source ID. A contract a control plane may read
//! (see "Per-tenant delivery status" in the README): fields are added, never renamed or
//! given another meaning, without a new `v`; readers ignore fields they do not know.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The record format this build writes and reads.
pub const VERSION: u32 = 1;

/// Upper bounds, in milliseconds, of the delivery-latency buckets (Kafka timestamp to
/// the write's acknowledgement); a last bucket counts everything slower. Fixed, so
/// buckets of every pod and window add up.
pub const LATENCY_BOUNDS_MS: [u64; 12] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000,
];

/// Buckets: one per bound, and one past the last.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// One tenant's deliveries on one pod in one window.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct StatusRecord {
    pub v: u32,
    pub source_id: String,
    /// The pod that wrote it (its host name).
    pub pod: String,
    /// The window's start (RFC 3339, UTC), a multiple of `window_secs` since the epoch:
    /// every pod's windows line up.
    pub window_start: String,
    pub window_secs: u64,
    #[serde(flatten)]
    pub counts: Counts,
    /// The last write acknowledged, and the last failure (a retried attempt or a dead
    /// letter), as of the window's end; `null` when none since the pod started.
    pub last_delivery: Option<String>,
    pub last_failure: Option<String>,
    pub last_error: Option<LastError>,
    /// Up to three failures of the window.
    #[serde(default)]
    pub samples: Vec<Sample>,
}

/// Counts that add up across pods and windows.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Counts {
    /// Events read and routed to this tenant (valid settings or not).
    pub received: u64,
    /// Events written to the tenant's stream.
    pub delivered: u64,
    /// Events dead-lettered, by reason (SPEC's reasons).
    #[serde(default)]
    pub dead_lettered: BTreeMap<String, u64>,
    /// Write attempts that failed and were tried again, by AWS error code.
    #[serde(default)]
    pub retried: BTreeMap<String, u64>,
    /// Of those, refused for the shard's or the account's throughput.
    pub throttled: u64,
    /// Delivery latency, counted into [`LATENCY_BOUNDS_MS`].
    pub latency_ms: Latency,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Latency {
    pub bounds: Vec<u64>,
    pub counts: Vec<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            bounds: LATENCY_BOUNDS_MS.to_vec(),
            counts: vec![0; LATENCY_BUCKETS],
        }
    }
}

/// The most recent failure's error: what AWS answered (its error code, message and
/// request ID), or a dead letter's reason and error.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LastError {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub at: String,
}

/// A failed event: where it was read, and why it failed (`retrying` while it is still
/// retried, else its dead-letter reason). Never its body.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Sample {
    pub message_id: Option<String>,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub reason: String,
    pub error: String,
    pub at: String,
}

impl Counts {
    pub fn dead_lettered_total(&self) -> u64 {
        self.dead_lettered
            .values()
            .fold(0, |a, b| a.saturating_add(*b))
    }

    pub fn retried_total(&self) -> u64 {
        self.retried.values().fold(0, |a, b| a.saturating_add(*b))
    }

    /// Adds `other`'s counts to these. Latency buckets are added by bound, so a record
    /// of another bucket layout adds what lines up and nothing else.
    pub fn add(&mut self, other: &Counts) {
        // Saturating: a record is input, and anyone who can write the topic can send
        // one with any numbers in it.
        self.received = self.received.saturating_add(other.received);
        self.delivered = self.delivered.saturating_add(other.delivered);
        self.throttled = self.throttled.saturating_add(other.throttled);
        for (k, v) in &other.dead_lettered {
            let n = self.dead_lettered.entry(k.clone()).or_default();
            *n = n.saturating_add(*v);
        }
        for (k, v) in &other.retried {
            let n = self.retried.entry(k.clone()).or_default();
            *n = n.saturating_add(*v);
        }
        if other.latency_ms.bounds == self.latency_ms.bounds
            && other.latency_ms.counts.len() == self.latency_ms.counts.len()
        {
            for (a, b) in self
                .latency_ms
                .counts
                .iter_mut()
                .zip(&other.latency_ms.counts)
            {
                *a += b;
            }
        }
    }

    /// Delivered out of the events that ended (delivered or dead-lettered); `None` when
    /// none ended.
    pub fn success_rate(&self) -> Option<f64> {
        let ended = self.delivered.saturating_add(self.dead_lettered_total());
        (ended > 0).then(|| self.delivered as f64 / ended as f64)
    }

    /// The latency under which a fraction `q` of the deliveries fell: the upper bound of
    /// the bucket that holds it, in milliseconds (`None` for no deliveries, or past the
    /// last bound).
    pub fn latency_quantile_ms(&self, q: f64) -> Option<u64> {
        let total = self
            .latency_ms
            .counts
            .iter()
            .fold(0u64, |a, b| a.saturating_add(*b));
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, n) in self.latency_ms.counts.iter().enumerate() {
            seen = seen.saturating_add(*n);
            if seen >= rank {
                return self.latency_ms.bounds.get(i).copied();
            }
        }
        None
    }
}

/// The bucket a latency falls in.
pub fn latency_bucket(ms: u64) -> usize {
    LATENCY_BOUNDS_MS
        .iter()
        .position(|&b| ms <= b)
        .unwrap_or(LATENCY_BOUNDS_MS.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_and_quantiles_come_from_the_buckets() {
        let mut a = Counts {
            delivered: 90,
            ..Counts::default()
        };
        a.dead_lettered.insert("retries_exhausted".into(), 10);
        a.latency_ms.counts[latency_bucket(20)] = 50;
        a.latency_ms.counts[latency_bucket(400)] = 40;
        let mut b = Counts {
            delivered: 10,
            ..Counts::default()
        };
        b.retried
            .insert("ProvisionedThroughputExceededException".into(), 3);
        b.latency_ms.counts[latency_bucket(4_000)] = 10;
        a.add(&b);
        assert_eq!(a.delivered, 100);
        assert_eq!(a.retried_total(), 3);
        assert_eq!(a.success_rate(), Some(100.0 / 110.0));
        assert_eq!(a.latency_quantile_ms(0.5), Some(25));
        assert_eq!(a.latency_quantile_ms(0.9), Some(500));
        assert_eq!(a.latency_quantile_ms(0.99), Some(5_000));
        assert_eq!(Counts::default().latency_quantile_ms(0.5), None);
        assert_eq!(latency_bucket(300_001), LATENCY_BOUNDS_MS.len());
    }

    #[test]
    fn the_record_reads_back_and_unknown_fields_are_ignored() {
        let mut r = StatusRecord {
            v: VERSION,
            source_id: "src".into(),
            pod: "pod-1".into(),
            window_start: "2026-12-07T20:15:00Z".into(),
            window_secs: 60,
            ..Default::default()
        };
        r.counts.received = 3;
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["received"], 3, "counts are top-level fields: {json}");
        assert_eq!(
            json["latency_ms"]["counts"].as_array().unwrap().len(),
            LATENCY_BUCKETS
        );
        let mut with_more = json.clone();
        with_more["added_later"] = serde_json::json!({"x": 1});
        let back: StatusRecord = serde_json::from_value(with_more).unwrap();
        assert_eq!(back, r);
    }
}
